"""What fixes the bits of a CPU run: the thread count, pinned, kept the same in local and Ray tasks, and recorded.

Measured on torch 2.13 (MKL 2024.2, OpenMP backend; GitHub issue 13):

- torch's parallel full reductions (``x.sum()``, ``x.mean()`` of a tensor larger than torch's grain size, 32,768
  elements) split the tensor into one chunk per OpenMP thread and add the partial sums in thread order, so their
  last bits depend on the number of threads that actually ran. The data loaders normalise with ``x.mean()``, so
  one thread (a Ray worker: ``OMP_NUM_THREADS=1``) and two threads give inputs one ulp apart and replicas that
  drift apart in training. On Ray a task's count even depended on the worker's history, so the chunk of replicas
  a retried task trained could differ while the others did not. Reductions along a dimension, the GEMMs (MKL
  ``sgemm``/``sgemm_batch`` behind ``addmm``/``bmm``/``baddbmm``), ``index_select`` and ``gather`` gave the same bits
  for 1, 2, 3, 4 and 8 threads, for operands shifted by 1 to 15 floats, and under load.
- With ``OMP_DYNAMIC=true`` in the environment, GNU OpenMP sizes each team by the load average: under load the
  reduction ran on one thread while ``torch.get_num_threads()`` said two, so the bits depended on what else ran on
  the machine. :func:`configure` switches dynamic teams off.
- MKL's own dynamic threading (``MKL_DYNAMIC``, on by default) changed no bits here and switching it off cost
  20-50 % more CPU time on small networks, so it is left as it is and recorded. MKL's reproducibility mode
  (``MKL_CBWR``) is read when torch is imported and can no longer change once MKL has run; ``AUTO`` gave the same
  bits as the default here, so it is recorded, not set.

Policy: every lossglass computation runs with one thread count, fixed per run (pinned when a run, a CLI command or
an entry such as ``train`` starts; importing the package pins nothing): ``LOSSGLASS_THREADS`` when set,
else the count torch has in the process that starts the run (``torch.set_num_threads`` or ``OMP_NUM_THREADS``
decide it, as usual). Ray tasks get the driver's count (and reserve as many CPUs), whatever ``OMP_NUM_THREADS``
Ray gives its workers. The same count, code, torch build and CPU model give the same bytes; a different thread
count may not.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from pathlib import Path

from .errors import LossglassError

ENV_THREADS = "LOSSGLASS_THREADS"
#: Environment variables that can change which code runs or with how many threads (recorded when set).
ENV_KEYS = (ENV_THREADS, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR",
            "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "OMP_THREAD_LIMIT", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY",
            "KMP_AFFINITY", "ONEDNN_DEFAULT_FPMATH_MODE")
GUARANTEE = ("CPU: the same bytes for the same code, data, seed, torch build, CPU model and thread count (threads), "
             "whatever else runs on the machine and whether tasks run locally or on Ray; a different thread count, CPU "
             "or torch/MKL version may change the last bits, which training then amplifies. GPU runs: not covered.")
_CBWR_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
                  10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_MKL_CBWR_ALL, _MKL_CBWR_STRICT = -1, 0x10000

_lock = threading.Lock()
_state: dict = {"threads": None, "source": None}
_libs: dict = {}


def _loaded_paths(*names: str) -> list[str]:
    """Shared libraries whose file name starts with one of ``names`` and that this process has loaded (Linux),
    torch's own first."""
    found: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if path.startswith("/") and Path(path).name.startswith(names) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return sorted(found, key=lambda p: "torch" not in p)


def _open(path: str):
    """A handle on an already loaded library (RTLD_NOLOAD: never a second copy), or None."""
    flags = getattr(os, "RTLD_NOLOAD", None)
    if flags is None:
        return None
    try:
        return ctypes.CDLL(path, mode=flags | getattr(os, "RTLD_LAZY", 1))
    except OSError:
        return None


def _lib(kind: str) -> list:
    """``omp``: the OpenMP runtimes loaded (torch's first); ``mkl``: the library holding torch's MKL."""
    if kind not in _libs:
        import torch

        libdir = Path(torch.__file__).parent / "lib"
        if kind == "omp":
            paths = _loaded_paths("libgomp", "libiomp5", "libomp")
            paths += [str(p) for p in sorted(libdir.glob("lib*omp*.so*")) if str(p) not in paths]
        else:
            paths = [str(p) for p in sorted(libdir.glob("libtorch_cpu.*"))] + _loaded_paths("libmkl_rt", "libmkl_core")
        handles = []
        for p in paths:
            h = _open(p)
            if h is not None and hasattr(h, "omp_set_dynamic" if kind == "omp" else "mkl_serv_get_dynamic"):
                handles.append(h)
        _libs[kind] = handles
    return _libs[kind]


def _omp_dynamic_off() -> None:
    """Fixed OpenMP team sizes in the calling thread (``OMP_DYNAMIC=false``) for every OpenMP runtime loaded."""
    for h in _lib("omp"):
        h.omp_set_dynamic(0)


def _omp_dynamic():
    libs = _lib("omp")
    return bool(libs[0].omp_get_dynamic()) if libs else None


def _mkl() -> dict:
    libs = _lib("mkl")
    if not libs:
        return {"mkl_dynamic": None, "mkl_cbwr": None, "blas": None}
    h = libs[0]
    out: dict = {"mkl_dynamic": bool(h.mkl_serv_get_dynamic())}
    try:
        get = h.mkl_serv_cbwr_get
        get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
        mode = get(_MKL_CBWR_ALL)
        name = _CBWR_BRANCHES.get(mode & 0xFFFF, str(mode & 0xFFFF)) if mode >= 0 else None
        out["mkl_cbwr"] = None if name is None else name + (",STRICT" if mode & _MKL_CBWR_STRICT else "")
    except AttributeError:
        out["mkl_cbwr"] = None
    try:
        buf = ctypes.create_string_buffer(256)
        h.MKL_Get_Version_String(buf, len(buf))
        out["blas"] = buf.value.decode(errors="replace").split(" for ")[0].strip()
    except AttributeError:
        out["blas"] = "MKL"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _as_threads(value, what: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise LossglassError(f"{what} must be a whole number of threads >= 1, got {value!r}")
    return n


def configure(threads: int | None = None) -> dict:
    """Pin what decides the bits of CPU results in this process and return :func:`numerics`.

    ``threads``: the intra-op thread count. Without it: the count an earlier ``configure(threads)`` fixed in this
    process (it holds until the next one: a resumed run keeps its recorded count), else ``LOSSGLASS_THREADS`` when
    set, else the count torch has now (so ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` still decide). OpenMP
    dynamic teams are switched off in the calling thread. Idempotent and cheap (0.1 ms). Importing lossglass does not
    call it (a library changes no process-wide setting as it is imported): the executors do before every task, and
    the entries whose results depend on it pin once as they start (:func:`pin_once`)."""
    import torch

    with _lock:
        if threads is not None:
            n, source = _as_threads(threads, "threads"), "argument"
        elif _state["source"] == "argument":
            n, source = _state["threads"], "argument"
        elif os.environ.get(ENV_THREADS, "").strip():
            n, source = _as_threads(os.environ[ENV_THREADS], ENV_THREADS), ENV_THREADS
        else:
            n, source = torch.get_num_threads(), "torch"
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        _omp_dynamic_off()
        _state.update(threads=n, source=source)
    return numerics()


def numerics() -> dict:
    """What this process's CPU numerics depend on, as a JSON-ready dict (for a run's meta.json): ``threads`` (in
    effect now), ``pinned`` (True when that is the count :func:`configure` fixed and OpenMP teams are not
    dynamic), the BLAS and its modes, the CPU, the torch build and the relevant environment variables."""
    import torch

    omp_dyn = _omp_dynamic()
    now = torch.get_num_threads()
    return {
        "threads": now,
        "threads_source": _state["source"],
        "pinned": _state["threads"] == now and omp_dyn is not True,
        "omp_dynamic": omp_dyn,
        **_mkl(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "guarantee": GUARANTEE,
    }


def pin_once() -> None:
    """:func:`configure` unless this process has pinned already: what the entries whose results depend on the
    thread count call as they start (the CLI, a study's run, ``train``, ``analyze``, ``datasets.load``). The first one
    pins (``LOSSGLASS_THREADS`` or torch's count, OpenMP teams fixed), later ones leave the count alone, so a count a
    run or ``configure(threads)`` fixed, or one the user set after the first entry, holds; importing the package
    pins nothing. A bad ``LOSSGLASS_THREADS`` raises a :class:`LossglassError` here (and nothing is pinned)."""
    if _state["source"] is None:
        configure()


def run_pinned(threads: int, fn, *args):
    """Run ``fn(*args)`` after :func:`configure` with ``threads`` (a task on a worker process: a Ray worker starts
    with ``OMP_NUM_THREADS=1``, the run it belongs to may have another count)."""
    configure(threads)
    return fn(*args)
