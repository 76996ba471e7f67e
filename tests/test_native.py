"""The fused CPU kernel (lossglass._native) against the torch path it replaces: equal to float32 roundoff, the same
bits whatever the thread count, NaN/inf handled as torch does, and a fallback that is said once when it cannot be
built. Its cache (issue 27): private 0700 folder, owner/mode/hash checked before loading, a planted or broken
library deleted and rebuilt, never run; a kernel's failure status raises."""

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import lossglass as lg
from lossglass import _native


@pytest.fixture(scope="module")
def ds():
    return lg.datasets.load("teacher", n_train=3000, n_test=500, in_dim=40, width=8, n_classes=7, seed=0)


@pytest.fixture
def torch_path(monkeypatch):
    def run(fn):
        monkeypatch.setenv("LOSSGLASS_NATIVE", "0")
        try:
            return fn()
        finally:
            monkeypatch.setenv("LOSSGLASS_NATIVE", "1")
    return run


def _rel(a, b):
    return float(((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30)).max())


needs_kernel = pytest.mark.skipif(_native.kernel(7) is None, reason=f"no fused kernel here: {_native.status()}")


@needs_kernel
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_evaluate_and_affine_equal_the_torch_path(ds, torch_path, loss):
    prob = lg.Problem(lg.models.mlp(40, 37, 7), ds, device="cpu", loss=loss)  # 37: no multiple of anything
    assert prob.backend.name == "fused" and prob.backend.kernel_ready()
    theta = prob.init(5, 0)
    for split in ("train", "test"):
        a = prob.evaluate(theta, split)
        b = torch_path(lambda split=split: prob.evaluate(theta, split))
        assert _rel(a["loss"], b["loss"]) < 1e-6
        assert torch.equal(a["accuracy"], b["accuracy"])
    d = torch.randn(2, prob.n_params, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 13, 2, generator=torch.Generator().manual_seed(1))
    centres = theta[:2]
    a = prob.evaluate_affine(centres, d.expand(2, -1, -1), c)
    b = torch_path(lambda: prob.evaluate_affine(centres, d.expand(2, -1, -1), c))
    assert _rel(a["loss"], b["loss"]) < 1e-6
    assert torch.equal(a["accuracy"], b["accuracy"])


@needs_kernel
def test_same_bits_for_any_thread_count_and_nan_inf_as_torch(ds, torch_path):
    prob = lg.Problem(lg.models.mlp(40, 20, 7), ds, device="cpu")
    theta = prob.init(6, 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = prob.evaluate(theta)
        torch.set_num_threads(2)
        two = prob.evaluate(theta)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one["loss"], two["loss"]) and torch.equal(one["accuracy"], two["accuracy"])
    bad = theta.clone()
    bad[1, 5] = float("nan")  # a first-layer weight: NaN reaches every logit through the ReLU
    w2 = prob.layout["2.bias"].slice
    bad[2, w2.start] = float("inf")  # a logit +inf: loss +inf or NaN as torch has it
    bad[3, w2.start:w2.stop] = -float("inf")  # every logit -inf: NaN
    a = prob.evaluate(bad)["loss"]
    b = torch_path(lambda: prob.evaluate(bad)["loss"])
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b))
    ok = torch.isfinite(b)
    assert _rel(a[ok], b[ok]) < 1e-6


def test_no_compiler_falls_back_to_torch_and_says_so_once(tmp_path, ds):
    code = ("import lossglass as lg, torch\n"
            "from lossglass import _native\n"
            "ds = lg.datasets.load('teacher', n_train=300, n_test=50, in_dim=8, width=4, n_classes=3, seed=0)\n"
            "p = lg.Problem(lg.models.mlp(8, 5, 3), ds, device='cpu')\n"
            "assert not p.backend.kernel_ready() and _native.kernel(3) is None, _native.status()\n"
            "assert _native.kernel(5) is None and _native.kernel(3) is None\n"
            "e = p.evaluate(p.init(2, 0))['loss']\n"
            "assert torch.isfinite(e).all()\n"
            "assert sorted(_native.status()['failed']) == [3, 5], _native.status()\n")
    env = {**os.environ, "CXX": "/bin/false", "PATH": str(tmp_path), "LOSSGLASS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    said = [ln for ln in out.stderr.splitlines() if "fused CPU kernel could not be built" in ln]
    assert len(said) == 1 and "torch path" in said[0], out.stderr[-2000:]  # one line, with the reason and fallback


# ------------------------------------------------------------------ the kernel cache (issue 27 item 3)
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


N_CLASSES = 7  # the classes of the module's dataset: its kernel is built (or found) once in the user's cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache folder for this test holding a copy of the 7-class kernel's cache entry (record and library),
    the kernel not yet loaded in this process; ``.lines`` are the warning lines said."""
    op = _native.kernel(N_CLASSES)
    if op is None:
        pytest.skip(f"no fused kernel here: {_native.status()}")
    source = _native._cache_folder()
    key = _native._key(N_CLASSES, _native._sources(), _native._compiler())
    record = source / f"mlp1_c{N_CLASSES}_{key}.json"
    native = tmp_path / "cache" / "native"
    native.mkdir(parents=True, mode=0o700)
    for p in (record, source / json.loads(record.read_text())["file"]):
        shutil.copy2(p, native / p.name)
    monkeypatch.setenv("LOSSGLASS_CACHE", str(native.parent))
    for name in ("_ops", "_failed", "_temp"):
        monkeypatch.setattr(_native, name, {})
    monkeypatch.setattr(_native, "_said", set())
    lines = _Lines()
    logger = logging.getLogger("lossglass")
    logger.addHandler(lines)
    yield type("Cache", (), {"native": native, "lines": lines.lines, "tmp": tmp_path, "key": key, "op": op})
    logger.removeHandler(lines)


def _libraries(native):
    return sorted(p for p in native.iterdir() if p.suffix == ".so")


def _replace_bytes(path, data: bytes) -> None:
    """Put ``data`` at ``path`` as a new file (write, then rename), as an attacker or a broken compiler would leave it.
    Writing in place would change the pages of a library this process has already loaded (mapped): its code would
    then be read from a truncated file (SIGBUS when the interpreter exits)."""
    tmp = path.with_name(path.name + ".planting")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _planted_library(tmp, marker):
    """A shared library whose constructor writes ``marker``: what an attacker would plant."""
    src = tmp / "planted.cpp"
    src.write_text('#include <cstdio>\n__attribute__((constructor)) static void planted() {\n'
                   f'  if (FILE* f = std::fopen("{marker}", "w")) {{ std::fputs("ran", f); std::fclose(f); }}\n}}\n')
    out = tmp / "planted.so"
    subprocess.run([_native._compiler(), "-shared", "-fPIC", str(src), "-o", str(out)], check=True, timeout=120)
    return out.read_bytes()


def _forge_record(native, data):
    """Make the cache's record vouch for ``data`` (as one could with write access to the folder)."""
    (record,) = native.glob("*.json")
    rec = json.loads(record.read_text())
    rec["sha256"] = hashlib.sha256(data).hexdigest()
    record.write_text(json.dumps(rec))


def _usable(n_classes=N_CLASSES):
    """The kernel loads and computes: loss sums of a tiny problem are finite and positive."""
    op = _native.kernel(n_classes)
    assert op is not None, _native.status()
    g = torch.Generator().manual_seed(0)
    z, w2 = torch.randn(2, 1, 4, 40, generator=g), torch.randn(2, n_classes, 4, generator=g)
    loss, corr = _native.mlp1_tail(z, torch.ones(2, 1), w2, torch.zeros(2, n_classes),
                                   torch.randint(0, n_classes, (40,), generator=g), 1, "relu", "cross_entropy")
    assert torch.isfinite(loss).all() and (loss > 0).all() and (corr <= 40).all()


def test_a_planted_library_is_never_run_and_is_deleted(cache, monkeypatch):
    marker = cache.tmp / "constructor-ran"
    evil = _planted_library(cache.tmp, marker)
    for lib in _libraries(cache.native):  # the cached library's name is known: overwrite it in place
        _replace_bytes(lib, evil)
    rebuilt = []
    monkeypatch.setattr(_native, "_build", lambda *a: rebuilt.append(a[1]) or cache.op)
    _native.kernel(N_CLASSES)
    assert not marker.exists(), "a planted library's constructor ran"
    assert rebuilt == [N_CLASSES] and not _libraries(cache.native) and not list(cache.native.glob("*.json"))
    assert len(cache.lines) == 1 and "does not match the SHA-256" in cache.lines[0], cache.lines


def test_a_library_that_fails_to_load_is_deleted(cache, monkeypatch):
    (lib,) = _libraries(cache.native)
    _replace_bytes(lib, b"")  # what a broken compiler leaves, recorded as if it had built it
    _forge_record(cache.native, b"")
    rebuilt = []
    monkeypatch.setattr(_native, "_build", lambda *a: rebuilt.append(a[1]) or cache.op)
    _native.kernel(N_CLASSES)
    assert rebuilt == [N_CLASSES] and not lib.exists() and not list(cache.native.glob("*.json"))
    assert len(cache.lines) == 1 and "failed to load" in cache.lines[0], cache.lines


@pytest.mark.slow
def test_a_planted_or_broken_library_is_rebuilt_and_the_rebuilt_one_is_used(cache):
    """End to end, with real builds (about 10-40 s each): after a planted library and after an empty one."""
    marker = cache.tmp / "constructor-ran"
    evil = _planted_library(cache.tmp, marker)
    for lib in _libraries(cache.native):
        _replace_bytes(lib, evil)
    _usable()
    assert not marker.exists()
    (lib,) = _libraries(cache.native)
    assert lib.read_bytes() != evil
    _replace_bytes(lib, b"")
    _forge_record(cache.native, b"")
    _native._ops.clear()
    _usable()
    (lib,) = _libraries(cache.native)
    assert lib.stat().st_size > 0 and json.loads(next(cache.native.glob("*.json")).read_text())["sha256"] == (
        hashlib.sha256(lib.read_bytes()).hexdigest())
    assert not marker.exists()


def test_the_cache_is_private_and_a_folder_others_can_write_is_refused(cache):
    cache.native.chmod(0o755)  # what the umask gave before: readable by all
    _usable()
    assert stat.S_IMODE(cache.native.stat().st_mode) == 0o700 and not cache.lines  # made private, loaded as it is
    # writable by others: an attacker could have planted a library together with a matching record
    marker = cache.tmp / "constructor-ran"
    evil = _planted_library(cache.tmp, marker)
    (lib,) = _libraries(cache.native)
    _replace_bytes(lib, evil)
    _forge_record(cache.native, evil)
    cache.native.chmod(0o777)
    elsewhere = _native._cache_folder()
    assert elsewhere != cache.native and stat.S_IMODE(elsewhere.stat().st_mode) == 0o700
    assert _native._load_cached(elsewhere, N_CLASSES, cache.key) is None  # nothing of the refused folder is used
    assert not marker.exists(), "a library from a folder others can write was loaded"
    assert len(cache.lines) == 1 and "refused" in cache.lines[0] and "writable by group or others" in cache.lines[0]
    assert lib.read_bytes() == evil  # left where it is (not ours to trust or to clean)


def test_a_cache_folder_owned_by_another_user_or_under_a_shared_folder_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may rename what is inside
    with pytest.raises(_native._Refused, match="writable by group or others"):
        _native._private_folder(shared / "native")
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner may rename its entries
    assert _native._private_folder(shared / "native") == shared / "native"
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    foreign = tmp_path / "foreign"
    foreign.mkdir(0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(_native._Refused, match="owned by uid 65534"):
        _native._private_folder(foreign)


@needs_kernel
def test_a_failing_kernel_raises_never_zero_losses():
    z = torch.randn(2, 0, 4, 50)  # no pre-activation maps: the kernel returns status -1
    args = (torch.zeros(2, 0), torch.randn(2, 7, 4), torch.zeros(2, 7), torch.randint(0, 7, (50,)), 1, "relu",
            "cross_entropy")
    with pytest.raises(_native.KernelError, match="status -1"):
        _native.mlp1_tail(z, *args)
    op = _native.kernel(7)
    with pytest.raises(RuntimeError, match="w2t must be a contiguous"):  # typed and checked: no out-of-bounds read
        op(torch.randn(2, 1, 4, 50), torch.ones(2, 1), torch.randn(2, 5, 7), torch.zeros(2, 7),
           torch.zeros(50, dtype=torch.int32), 1, 0, 0)


@needs_kernel
def test_the_kernel_runs_on_torchs_threads(ds, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    submitted = []
    real = ThreadPoolExecutor.submit
    monkeypatch.setattr(ThreadPoolExecutor, "submit", lambda self, *a, **k: submitted.append(a) or real(self, *a, **k))
    prob = lg.Problem(lg.models.mlp(40, 20, 7), ds, device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prob.evaluate(prob.init(8, 0))
    finally:
        torch.set_num_threads(before)
    assert not submitted  # no private pool next to torch's: the operator's at::parallel_for uses torch's threads
