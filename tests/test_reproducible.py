"""Bit-reproducible CPU training (issue 13): the same multi-threaded data loading and training in fresh processes,
some of them beside a busy process, some with ``OMP_DYNAMIC=true``, one that ran BLAS before importing lossglass, and
one in a Ray-style worker environment (``OMP_NUM_THREADS=1``), gives the same bytes every time. Importing lossglass
changes no thread setting (issue 23); the loader, training, analysis, a study's run and the CLI pin them as they start.

What made the bits move (see ``lossglass._determinism``): torch's full reductions (``x.mean()`` as the data loaders
normalise) split the work into one chunk per OpenMP thread, so the thread count that actually ran (1 on a Ray
worker, fewer under load with dynamic OpenMP teams) changed the inputs by an ulp, and training amplified it.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

CHILD = r"""
import json, sys
args = json.loads(sys.argv[1])
if args.get("blas_first"):  # a user who imported torch and ran BLAS before importing lossglass
    import torch
    torch.ones(256, 256) @ torch.ones(256, 256)
import hashlib, torch
import lossglass as lg
from lossglass._determinism import run_pinned

def job():
    # pixel-like images in IDX files, read by lossglass's loader: it normalises them with the training set's mean
    # and standard deviation, a parallel full reduction whose last bit, for these images, differs between 1 and 2
    # threads (torch 2.13): the issue's mechanism. The loader pins the threads as it starts (importing does not).
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(2048, 28, 28, generator=g) ** 2 * 255).to(torch.uint8)
    y = (x.reshape(2048, -1).float() @ torch.randn(784, 10, generator=g)).argmax(1).to(torch.uint8)
    for split, rows in (("train", slice(0, 1024)), ("t10k", slice(1024, 2048))):
        lg.datasets.write_idx(f"{args['data']}/{split}-images-idx3-ubyte", x[rows].numpy())
        lg.datasets.write_idx(f"{args['data']}/{split}-labels-idx1-ubyte", y[rows].numpy())
    ds = lg.datasets.load("mnist", data_dir=args["data"])
    p = lg.Problem(lg.models.mlp(784, 64, 10), ds, device="cpu")  # 8 steps of (8 x 128 x 784) @ (784 x 64) GEMMs
    r = lg.train(p, 8, epochs=1, batch_size=128, lr=0.05, seed=0, progress=False, evaluate=False)
    return hashlib.sha256(r.theta.numpy().tobytes()).hexdigest()

digest = run_pinned(args["threads"], job) if args.get("threads") else job()
n, rec = torch.get_num_threads(), lg.numerics()
# did the reductions really run on n threads? full sums of fixed tensors, now and on one thread
g = torch.Generator().manual_seed(1)
xs = [torch.randn(1 << 20, generator=g) for _ in range(4)]
now = [x.sum().item() for x in xs]
torch.set_num_threads(1)
one = [x.sum().item() for x in xs]
print(json.dumps({"sha256": digest, "threads": n, "multi": now != one, "numerics": rec}))
"""


def _env(env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOSSGLASS_THREADS",
                                                           "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR")}
    env.update(env_extra)
    return env


def _child(env_extra: dict, **args) -> dict:
    with tempfile.TemporaryDirectory(prefix="lossglass-repro-") as data:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**args, "data": data})], env=_env(env_extra),
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_is_bit_identical_in_fresh_processes_under_load_and_in_a_ray_style_worker():
    multi = (os.cpu_count() or 1) >= 2  # CI has 2 cores: the multi-threaded case is what is tested there
    runs: list[tuple[str, dict]] = []
    for _ in range(5):
        runs.append(("plain", _child({})))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        for i in range(5):
            env = {"OMP_DYNAMIC": "true"} if i % 2 else {}  # dynamic OpenMP teams shrink with the load average
            label = "busy" + (" OMP_DYNAMIC=true" if i % 2 else "") + (" BLAS before import" if i == 2 else "")
            runs.append((label, _child(env, blas_first=i == 2)))
    finally:
        busy.kill()
        busy.wait()
    ref = runs[0][1]
    # a Ray worker starts with OMP_NUM_THREADS=1; the executor runs each task pinned to the driver's count
    runs.append(("ray-style", _child({"OMP_NUM_THREADS": "1"}, threads=ref["threads"])))
    # control: the same worker environment without the pinning runs on one thread
    control = _child({"OMP_NUM_THREADS": "1"})
    table = "\n".join(f"{label:28s} threads={r['threads']} multi={r['multi']} {r['sha256'][:16]}"
                      for label, r in [*runs, ("control: ray-style, unpinned", control)])
    print(table)
    assert len(runs) >= 11
    assert {r["sha256"] for _, r in runs} == {ref["sha256"]}, f"training bytes differ between runs:\n{table}"
    assert all(r["threads"] == ref["threads"] and r["numerics"]["pinned"] for _, r in runs), table
    assert all(r["numerics"]["omp_dynamic"] is False for _, r in runs), table
    if multi:
        assert ref["threads"] >= 2, table
        assert all(r["multi"] for _, r in runs), f"a run's reductions did not use several threads:\n{table}"
        assert control["threads"] == 1 and control["sha256"] != ref["sha256"], (
            "one thread gave the same bytes as several: this test no longer exercises a thread-count-dependent "
            f"path (a new torch?); choose data whose x.mean() differs between 1 and 2 threads\n{table}")


def test_numerics_record_is_json_and_names_the_thread_count():
    import torch

    import lossglass as lg
    from lossglass import _determinism as d

    rec = lg.numerics()
    json.dumps(rec)
    assert rec["threads"] == torch.get_num_threads() and rec["omp_dynamic"] in (False, None)
    assert {"threads", "pinned", "mkl_cbwr", "mkl_dynamic", "cpu", "torch", "guarantee"} <= set(rec)
    before, state = torch.get_num_threads(), dict(d._state)
    try:
        assert d.configure(1)["threads"] == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(before)
        assert not lg.numerics()["pinned"]  # the record tells when the count in effect is not the pinned one
        assert d.configure()["threads"] == 1 and lg.numerics()["threads_source"] == "argument"  # a pin holds
        with pytest.raises(lg.LossglassError, match="threads"):
            d.configure(0)
    finally:
        torch.set_num_threads(before)
        d._state.update(state)


IMPORT_CHILD = r"""
import contextlib, io, json, os, sys
import torch
from lossglass_probe import omp_dynamic
before = {"threads": torch.get_num_threads(), "omp_dynamic": omp_dynamic()}
import lossglass as lg
after = {"threads": torch.get_num_threads(), "omp_dynamic": omp_dynamic()}
from lossglass.cli import main
os.environ["LOSSGLASS_THREADS"] = "zero"
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
    rc = main(["presets"])  # a command pins as it starts: here it refuses the bad count, in one line
cli = {"rc": rc, "error_lines": len(err.getvalue().strip().splitlines()), "names": "LOSSGLASS_THREADS" in err.getvalue(),
       "threads": torch.get_num_threads()}
os.environ["LOSSGLASS_THREADS"] = "1"
ds = lg.datasets.load("teacher", n_train=64, n_test=16, in_dim=4, width=3, n_classes=2)
prob = lg.Problem(lg.models.mlp(4, 3, 2), ds)
lg.train(prob, 2, epochs=1, batch_size=32, progress=False, evaluate=False)
trained = {"threads": torch.get_num_threads(), "omp_dynamic": omp_dynamic(), "pinned": lg.numerics()["pinned"]}
print(json.dumps({"before": before, "after": after, "cli": cli, "trained": trained}))
"""

PROBE = """
import ctypes, os
from pathlib import Path
import torch

def omp_dynamic():
    \"\"\"omp_get_dynamic() of the OpenMP runtime torch loaded (read without lossglass).\"\"\"
    for line in open("/proc/self/maps"):
        path = line.rsplit(None, 1)[-1]
        if path.startswith("/") and Path(path).name.startswith(("libgomp", "libiomp5", "libomp")):
            return bool(ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY).omp_get_dynamic())
    return None
"""


def test_importing_lossglass_changes_no_thread_setting_and_its_entries_pin_them(tmp_path):
    """``import lossglass`` leaves torch's thread count and OpenMP's dynamic teams as they were, even with
    ``LOSSGLASS_THREADS`` asking for another count; a CLI command pins as it starts (a bad count is a one-line error,
    exit 2, nothing changed); the loader and ``train`` pin both."""
    (tmp_path / "lossglass_probe.py").write_text(PROBE)
    env = _env({"OMP_NUM_THREADS": "2", "LOSSGLASS_THREADS": "1", "OMP_DYNAMIC": "true"})
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", IMPORT_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["before"] == {"threads": 2, "omp_dynamic": True}, r
    assert r["after"] == r["before"], f"importing lossglass changed a thread setting: {r}"
    assert r["cli"] == {"rc": 2, "error_lines": 1, "names": True, "threads": 2}, r
    assert r["trained"] == {"threads": 1, "omp_dynamic": False, "pinned": True}, r

