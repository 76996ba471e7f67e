"""Bit-reproducible CPU training (issue 13): the same multi-threaded training in fresh processes, some of them
beside a busy process, some with ``OMP_DYNAMIC=true``, one that ran BLAS before importing lossglass, and one in a
Ray-style worker environment (``OMP_NUM_THREADS=1``), gives the same bytes every time.

What made the bits move (see ``lossglass._determinism``): torch's full reductions (``x.mean()`` as the data loaders
normalise) split the work into one chunk per OpenMP thread, so the thread count that actually ran (1 on a Ray
worker, fewer under load with dynamic OpenMP teams) changed the inputs by an ulp, and training amplified it.
"""

import json
import os
import subprocess
import sys
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
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2048, 784, generator=g) ** 2 * 255  # non-negative, pixel-like
    # normalised as the data loaders do; x.mean() is a parallel full reduction whose last bit, for these
    # numbers, differs between 1 and 2 threads (torch 2.13): the issue's mechanism
    x = (x - x.mean()) / x.std()
    y = (x @ torch.randn(784, 10, generator=g)).argmax(1)
    ds = lg.datasets.from_tensors(x[:1024], y[:1024], x[1024:], y[1024:], 10, name="synthetic")
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


def _child(env_extra: dict, **args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOSSGLASS_THREADS",
                                                           "OMP_DYNAMIC", "MKL_DYNAMIC", "MKL_CBWR")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=300)
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
