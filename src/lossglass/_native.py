"""The fused CPU kernel: C++ in ``csrc/``, built on first use with PyTorch's extension machinery and cached on disk.

What is fused: the part of a single-hidden-layer MLP's evaluation that comes after the first layer's
pre-activations. Given, per point (a replica, or a grid point of a plane or path), the pre-activations
z = sum_j c_j Z_j (Z_j of shape (H, N), j < J), the kernel computes in one pass over the samples

    a = act(z),  o = W2 a + b2  (C logits),  loss = CE(o, y) = logsumexp(o) - o_y  or  MSE = |o - onehot(y)|^2 / 2,
    correct = [argmax o == y]

and returns per point the sums of the loss (float64) and of the correct flags. Nothing of size
points x samples x hidden is written to memory: sample blocks of 16 (one AVX-512 vector) stay in registers
and the Z_j of a super-block of samples stay in L2 while every point of a tile reuses them. This is
what makes a 21 x 21 plane cost a few tens of milliseconds (DESIGN.md, Performance notes).

Numbers: float32 arithmetic as in the torch path; exp and log are the polynomials of Cephes' ``expf``/``logf``
(S. L. Moshier, Cephes Math Library; <= 2 ulp), so per-sample losses agree with torch's to float32 roundoff
(~1e-7 relative) and the means to ~1e-7.
Bits: each (point, super-block) is computed by one thread in a fixed order and the super-blocks are summed
in order, so the result does not depend on the thread count or on how the work is split.
Threads: torch's own intra-op pool (``at::parallel_for``), so ``torch.set_num_threads`` governs it.

Build: ``csrc/mlp1_tail_kernel.cpp`` (the arithmetic, no torch header, so its machine code is that of the kernel
lossglass always had) and ``csrc/mlp1_tail_op.cpp`` (a typed torch operator: argument checks, the thread split,
the kernel's status turned into an error) are compiled by :func:`torch.utils.cpp_extension.load` (ninja and
``$CXX``, else ``c++``) with :data:`FLAGS`, once per number of classes, and loaded with
:func:`torch.ops.load_library`; the operator is ``torch.ops.<namespace>.mlp1_tail``.

Cache: ``$LOSSGLASS_CACHE`` (else ``$XDG_CACHE_HOME/lossglass``, else ``~/.cache/lossglass``) ``/native``, keyed
by the sources, the compiler, the flags, the CPU, torch and Python. The folder must be the user's own with mode
0700 (a readable one is made 0700), and no folder above it may be writable by others (unless sticky, as ``/tmp``);
a folder that fails this is refused with one line and the kernel is built in a private temporary folder instead.
Each library is recorded at build time with its SHA-256 in a 0600 file; before loading, the owner, the mode and
the hash are checked, and a library that fails a check or fails to load is deleted and rebuilt. (Between the hash
check and the load only this user or root can change the file: the folder and those above it are checked.) Builds
happen in a fresh private folder and are moved in atomically, so concurrent processes are safe.

When the kernel cannot be built (no compiler, no ninja, a compile error), one line says why and that the torch
path is used; ``LOSSGLASS_NATIVE=0`` switches the kernel off. :func:`status` tells what happened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from ._log import logger

#: Samples per super-block: the unit of work (with a group of points) and of the fixed summation order.
SUPER = 1024
#: Largest number of classes the kernel is built for (logits are held in registers).
MAX_CLASSES = 32
ACTS = {"relu": 0, "identity": 1}
LOSSES = {"cross_entropy": 0, "mse": 1}
#: Optimisation flags (those of every lossglass release: the arithmetic, hence the bits, depend on them).
FLAGS = ["-O3", "-march=native", "-fno-math-errno"]
#: The C++ sources, in build order, and the header they share.
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("mlp1_tail_kernel.cpp", "mlp1_tail_op.cpp")
HEADER = "mlp1_tail.h"
#: Largest library or record file read back from the cache (bytes).
MAX_LIBRARY = 64 << 20
MAX_RECORD = 64 << 10
#: Build folders left by a killed process are removed after this many seconds.
STALE_BUILD_S = 3600


class KernelError(RuntimeError):
    """The fused kernel was called and failed (a bad status or a rejected argument): never a silent zero."""


class _Refused(Exception):
    """A cache folder or file that must not be trusted (owner, mode, link, content)."""


_lock = threading.Lock()
_ops: dict[int, Callable] = {}  # n_classes -> operator
_namespaces: dict[str, tuple[str, Callable]] = {}  # namespace loaded in this process -> (library SHA-256, operator)
_failed: dict[int, str] = {}
_said: set[str] = set()
_temp: dict[str, Path] = {}


def _say(message: str) -> None:
    """One warning line per distinct message and process."""
    if message not in _said:
        _said.add(message)
        logger.warning("%s", message)


def enabled() -> bool:
    """False when ``LOSSGLASS_NATIVE`` is 0/false/no/off: the torch path is used throughout."""
    return os.environ.get("LOSSGLASS_NATIVE", "1").strip() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    base = os.environ.get("LOSSGLASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lossglass")
    return Path(base) / "native"


def _compiler() -> str | None:
    """The C++ compiler cpp_extension runs (``$CXX``, else ``c++``), as a path, or None if there is none."""
    from torch.utils.cpp_extension import get_cxx_compiler

    return shutil.which(get_cxx_compiler())


def _ninja_dir() -> str | None:
    """A folder holding ``ninja`` when it is not on PATH: the ``ninja`` Python package's, or this Python's scripts."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja  # the PyPI package ships the binary

        folder = getattr(ninja, "BIN_DIR", None)
        if folder and shutil.which("ninja", path=folder):
            return str(folder)
    except ImportError:
        pass
    folder = os.path.dirname(sys.executable)
    return folder if shutil.which("ninja", path=folder) else None


@contextmanager
def _ninja_on_path():
    """PATH with ninja's folder appended for the duration of a build (cpp_extension runs ``ninja`` from PATH)."""
    folder = _ninja_dir()
    if folder is None:
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(p for p in (before, folder) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


def _cpu() -> str:
    from ._determinism import _cpu_model

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return f"{_cpu_model()}|{torch.backends.cpu.get_cpu_capability()}|{hashlib.sha256(flags.encode()).hexdigest()}"


def _compiler_id(cxx: str) -> str:
    """The compiler's path and version line; raises when it does not run."""
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {cxx} does not run ({type(e).__name__}); set CXX") from e
    if res.returncode != 0:
        raise RuntimeError(f"the C++ compiler {cxx} does not run ('--version' exits {res.returncode}); set CXX")
    lines = res.stdout.splitlines()
    return f"{os.path.realpath(cxx)}|{lines[0] if lines else ''}"


def _sources() -> dict[str, bytes]:
    return {name: (CSRC / name).read_bytes() for name in (*SOURCES, HEADER)}


def _key(n_classes: int, sources: dict[str, bytes], cxx: str) -> str:
    """What a cached library is valid for: the sources, classes, flags, compiler, CPU, torch and Python."""
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    ident = [str(n_classes), str(SUPER), " ".join(FLAGS), _compiler_id(cxx), _cpu(), torch.__version__,
             str(torch.compiled_with_cxx11_abi()), sys.implementation.cache_tag or "", sys.platform]
    h.update("\0".join(ident).encode())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------ the private cache folder
def _unsafe_ancestor(path: Path) -> str | None:
    """Why a folder above the cache could let another user swap its contents (owned by someone else, or writable
    by group/others without the sticky bit), or None."""
    uid = os.getuid()
    for a in (path, *path.parents):
        try:
            st = os.stat(a)
        except FileNotFoundError:
            continue
        if st.st_uid not in (0, uid):
            return f"{a} is owned by uid {st.st_uid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return f"{a} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _private_folder(folder: Path) -> Path:
    """``folder``, created 0700 if missing, after checking it is safe: a real directory, the user's own, not
    writable by group/others, under folders nobody else can change; one that is only readable by others is made
    0700. Raises :class:`_Refused` otherwise."""
    parent = Path(os.path.realpath(folder.parent))
    parent.mkdir(parents=True, exist_ok=True)
    why = _unsafe_ancestor(parent)
    if why:
        raise _Refused(why)
    folder = parent / folder.name
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise _Refused(f"{folder} is not a directory (a link or a file)")
    if st.st_uid != os.getuid():
        raise _Refused(f"{folder} is owned by uid {st.st_uid}, not by this user ({os.getuid()})")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _Refused(f"{folder} is writable by group or others (mode {mode:04o}): what is in it cannot be trusted; "
                       "remove it")
    if mode != 0o700:
        os.chmod(folder, 0o700)
        logger.info("kernel cache %s made private (mode %04o -> 0700)", folder, mode)
    return folder


def _cache_folder() -> Path:
    """The verified cache folder, or (said once) a private temporary one for this process when it is refused."""
    folder = _cache_dir()
    try:
        return _private_folder(folder)
    except (_Refused, OSError) as e:
        if "tmp" not in _temp:
            _temp["tmp"] = Path(tempfile.mkdtemp(prefix="lossglass-native-"))  # 0700, ours
            import atexit

            atexit.register(shutil.rmtree, _temp["tmp"], True)
        _say(f"kernel cache {folder} refused ({e}); building the fused kernel in {_temp['tmp']} for this process")
        return _temp["tmp"]


def _read_checked(path: Path, limit: int) -> bytes:
    """The bytes of a cache file after checking, on the open file itself, that it is a regular file (a link is not
    followed) of this user that group/others cannot write, and at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{path.name} is not a regular file")
        if st.st_uid != os.getuid():
            raise _Refused(f"{path.name} is owned by uid {st.st_uid}, not by this user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise _Refused(f"{path.name} is writable by group or others")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _Refused(f"{path.name} is larger than {limit} bytes")
    return data


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------ loading and building
def _load_library(path: Path, ns: str, n_classes: int, digest: str) -> Callable:
    """Load a built library whose bytes hash to ``digest`` (its static constructors register ``ns``) and check it
    is the kernel asked for. A namespace this process already loaded from the same bytes is not loaded again."""
    if ns in _namespaces and _namespaces[ns][0] == digest:
        return _namespaces[ns][1]
    torch.ops.load_library(str(path))
    lib = getattr(torch.ops, ns)
    got = (int(lib.n_classes()), int(lib.super_block()))
    if got != (n_classes, SUPER):
        raise _Refused(f"{path.name} is built for (classes, super-block) {got}, not {(n_classes, SUPER)}")
    _namespaces[ns] = (digest, lib.mlp1_tail)
    return lib.mlp1_tail


def _load_cached(folder: Path, n_classes: int, key: str) -> Callable | None:
    """The cached kernel after its checks, or None when there is none; a cached library that fails a check or
    fails to load is deleted (said once), so the caller rebuilds it."""
    record = folder / f"mlp1_c{n_classes}_{key}.json"
    if not os.path.lexists(record):
        return None
    lib = None
    try:
        rec = json.loads(_read_checked(record, MAX_RECORD))
        if not isinstance(rec, dict):
            raise _Refused(f"{record.name} is not a record of this kernel")
        name, digest, ns = rec.get("file"), rec.get("sha256"), rec.get("namespace")
        if not (isinstance(name, str) and re.fullmatch(rf"mlp1_c{n_classes}_{key}_[0-9a-f]{{16}}\.so", name)
                and isinstance(ns, str) and re.fullmatch(rf"lossglass_mlp1_c{n_classes}_[0-9a-f]{{16}}", ns)
                and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise _Refused(f"{record.name} is not a record of this kernel")
        lib = folder / name
        data = _read_checked(lib, MAX_LIBRARY)
        if hashlib.sha256(data).hexdigest() != digest:
            raise _Refused(f"{name} does not match the SHA-256 recorded when it was built")
    except (_Refused, OSError, ValueError, RecursionError) as e:
        _say(f"kernel cache: {e}; deleting it and rebuilding")
        _remove(record, *([lib] if lib is not None else []))
        return None
    try:
        return _load_library(lib, ns, n_classes, digest)
    except (OSError, RuntimeError, _Refused) as e:
        _say(f"kernel cache: {name} failed to load ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
             "deleting it and rebuilding")
        _remove(record, lib)
        return None


def _sweep(folder: Path) -> None:
    """Remove build folders that a killed process left more than :data:`STALE_BUILD_S` ago, and the libraries of the
    ctypes kernel of earlier releases (``mlp1_c<C>_<20 hex>.so``, never loaded any more)."""
    now = time.time()
    for p in folder.glob("mlp1_c*.so"):
        if re.fullmatch(r"mlp1_c\d+_[0-9a-f]{20}\.so", p.name):
            _remove(p)
    for p in folder.glob("build-*"):
        try:
            if p.is_dir() and not p.is_symlink() and now - p.lstat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _build(folder: Path, n_classes: int, key: str, sources: dict[str, bytes]) -> Callable:
    """Compile the sources in a fresh private folder with cpp_extension, load the library, then move it into the
    cache with its SHA-256 recorded (0600). Raises with the compiler's reason on failure."""
    from torch.utils.cpp_extension import load

    _sweep(folder)
    build = Path(tempfile.mkdtemp(prefix="build-", dir=folder))  # 0700
    try:
        for name, data in sources.items():  # compile exactly the bytes the key was made of
            (build / name).write_bytes(data)
        ns = f"lossglass_mlp1_c{n_classes}_{secrets.token_hex(8)}"
        with _ninja_on_path():
            load(name=ns, sources=[str(build / s) for s in SOURCES], build_directory=str(build),
                 extra_cflags=[*FLAGS, f"-DLG_NCLASS={n_classes}", f"-DLG_SUPER={SUPER}", f"-DLG_NS={ns}"],
                 is_python_module=False, verbose=False)
        built = build / f"{ns}.so"
        digest = hashlib.sha256(_read_checked(built, MAX_LIBRARY)).hexdigest()
        op = _load_library(built, ns, n_classes, digest)  # load() has loaded it: this checks what it registered
        name = f"mlp1_c{n_classes}_{key}_{digest[:16]}.so"
        os.chmod(built, 0o600)
        os.replace(built, folder / name)  # atomic; the loaded mapping is unaffected
        fd, tmp = tempfile.mkstemp(prefix=".record-", dir=folder)  # 0600
        with os.fdopen(fd, "w") as f:
            json.dump({"file": name, "sha256": digest, "namespace": ns, "n_classes": n_classes, "super": SUPER,
                       "flags": FLAGS, "torch": torch.__version__, "built": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
        os.replace(tmp, folder / f"mlp1_c{n_classes}_{key}.json")
        return op
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _reason(e: BaseException) -> str:
    """The line of a build failure that says why: the compiler's first ``error:`` line (without the build folder's
    path), else the message's first line."""
    text = str(e) or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror:", ln):
            return "compile error: " + re.sub(r"^\S*/", "", ln)[:300]
    return (lines[0] if lines else type(e).__name__)[:300]


def _kernel(n_classes: int) -> Callable:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX') or 'c++'} not found; set CXX)")
    sources = _sources()
    folder = _cache_folder()
    key = _key(n_classes, sources, cxx)
    op = _load_cached(folder, n_classes, key)
    return op if op is not None else _build(folder, n_classes, key, sources)


def kernel(n_classes: int) -> Callable | None:
    """The fused tail operator for ``n_classes`` logits, or None (disabled, too many classes, or the build failed,
    which is said once, with the reason, and the torch path is used)."""
    if not enabled() or not (2 <= n_classes <= MAX_CLASSES):
        return None
    op = _ops.get(n_classes)
    if op is not None:
        return op
    with _lock:
        if n_classes in _ops:
            return _ops[n_classes]
        if n_classes in _failed:
            return None
        try:
            _ops[n_classes] = _kernel(n_classes)
        except Exception as e:  # noqa: BLE001 - any failure means: say why once, use the torch path
            _failed[n_classes] = _reason(e)
            _say(f"the fused CPU kernel could not be built ({_failed[n_classes]}); using the torch path, which gives "
                 "the same results to float32 roundoff but is slower (LOSSGLASS_NATIVE=0 silences this)")
            return None
        return _ops[n_classes]


def status() -> dict:
    """What the native path did in this process: built kernels and failures (for diagnostics)."""
    return {"enabled": enabled(), "compiler": _compiler(), "ninja": shutil.which("ninja") or _ninja_dir(),
            "built": sorted(_ops), "failed": dict(_failed), "cache": str(_cache_dir()),
            "threads": "torch intra-op (at::parallel_for)"}


def mlp1_tail(z: torch.Tensor, coef: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, y: torch.Tensor,
              per_basis: int, act: str, loss: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-point sums over the samples of the loss and of the correct flags, ``(G,)`` float64 each, or None when
    the kernel is not available or does not apply (the caller then uses the torch path).

    ``z``: ``(B, J, H, N)`` float32 CPU with unit stride along N (B bases of J pre-activation maps); point g uses
    basis ``g // per_basis`` with coefficients ``coef[g]`` ``(G, J)``; ``w2`` ``(G, C, H)``, ``b2`` ``(G, C)`` the
    point's last layer; ``y`` ``(N,)`` int64 labels. With ``o = w2[g] act(sum_j coef[g, j] z[b, j]) + b2[g]`` per
    sample, the loss is ``logsumexp(o) - o_y`` (cross_entropy) or ``|o - onehot(y)|^2 / 2`` (mse).

    Raises :class:`KernelError` when the kernel rejects its arguments or returns a non-zero status."""
    g_total, c, h = w2.shape
    if z.device.type != "cpu" or z.dtype != torch.float32 or act not in ACTS or loss not in LOSSES:
        return None
    f = kernel(c)
    if f is None:
        return None
    b, j, hz, n = z.shape
    if hz != h or z.stride(3) != 1 or n == 0:
        return None
    coef = coef.to(torch.float32).contiguous()
    w2 = w2.to(torch.float32).transpose(1, 2).contiguous()  # (G, H, C): the C weights of a hidden unit together
    b2 = b2.to(torch.float32).contiguous()
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        return None  # let torch raise its own error for bad labels
    y = y.to(torch.int32).contiguous()
    try:
        out_l, out_c = f(z, coef, w2, b2, y, int(per_basis), ACTS[act], LOSSES[loss])
    except RuntimeError as e:
        raise KernelError(f"the fused CPU kernel failed: {str(e).splitlines()[0]} (LOSSGLASS_NATIVE=0 uses the torch "
                          "path)") from e
    return out_l.sum(1), out_c.sum(1)
