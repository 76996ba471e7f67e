"""The fused CPU kernel (lossglass._native) against the torch path it replaces, on the paper's shapes.

What the kernel serves: the loss sums of a float32 784-H-10 ReLU MLP on the CPU, i.e. ``Problem.evaluate`` (the
energy and accuracy of K replicas on the whole training set: every walk step, every recorded training epoch) and
``Problem.evaluate_affine`` (every point of paths and planes). Gradients do not go through it. Each row times the
same call with the kernel (lossglass) and with ``LOSSGLASS_NATIVE=0`` (the "peer": torch's GEMM, ReLU, GEMM and
log-softmax of the hand-batched MLP backend), alternating, after one warm-up call of each; ``max_rel_diff`` is the
largest relative difference of the per-replica mean losses between the two (float32 roundoff: about 1e-7) and
``same_accuracy`` says whether the accuracies agree exactly.

Run alone: ``python benchmarks/bench_kernel.py [--quick]`` (prints the rows as JSON).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from common import fmnist, side_by_side

import lossglass as lg
from lossglass import _native


def _with_native(on: bool, fn):
    before = os.environ.get("LOSSGLASS_NATIVE")
    os.environ["LOSSGLASS_NATIVE"] = "1" if on else "0"
    try:
        return fn()
    finally:
        if before is None:
            os.environ.pop("LOSSGLASS_NATIVE", None)
        else:
            os.environ["LOSSGLASS_NATIVE"] = before


def _compare(a: dict, b: dict) -> dict:
    la, lb = a["loss"].double(), b["loss"].double()
    rel = float(((la - lb).abs() / lb.abs().clamp_min(1e-30)).max())
    return {"max_rel_diff": rel, "same_accuracy": bool(torch.equal(a["accuracy"], b["accuracy"]))}


def energy_case(ds, hidden: int, k: int, reps: int) -> dict:
    """Energy and accuracy of K replicas of 784-hidden-10 on the whole training set."""
    prob = lg.Problem(lg.models.mlp(784, hidden, 10), ds, device="cpu")
    theta = prob.init(k, 0)
    t0 = time.perf_counter()
    ready = _native.kernel(10) is not None
    build_s = time.perf_counter() - t0  # building (or loading from the cache) the 10-class kernel
    ours = lambda: _with_native(True, lambda: prob.evaluate(theta))  # noqa: E731
    peer = lambda: _with_native(False, lambda: prob.evaluate(theta))  # noqa: E731
    r = side_by_side(ours, peer, reps)
    n = len(ds.y_train)
    flops = k * n * (2 * 784 * hidden + 2 * hidden * 10)
    return {"row": f"energy{hidden}x{k}", "case": f"energy of {k} replicas of 784-{hidden}-10, {n:,} images",
            "peer": "torch path (LOSSGLASS_NATIVE=0)", **r, "useful_gflop": flops / 1e9, "native": ready,
            "kernel_load_s": build_s, **_compare(ours(), peer())}


def plane_case(ds, hidden: int, steps: int, reps: int) -> dict:
    """A steps x steps plane (evaluate_affine: 3 first-layer products, then one fused pass per grid point)."""
    prob = lg.Problem(lg.models.mlp(784, hidden, 10), ds, device="cpu")
    theta = prob.init(3, 0)
    g = torch.linspace(-1, 1, steps)
    coeffs = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    dirs = theta[1:] - theta[0]
    ours = lambda: _with_native(True, lambda: prob.evaluate_affine(theta[0], dirs, coeffs))  # noqa: E731
    peer = lambda: _with_native(False, lambda: prob.evaluate_affine(theta[0], dirs, coeffs))  # noqa: E731
    r = side_by_side(ours, peer, reps)
    n = len(ds.y_train)
    flops = 3 * 2 * n * 784 * hidden + steps * steps * n * (2 * 3 * hidden + 2 * hidden * 10)
    return {"row": f"plane{hidden}", "case": f"{steps}x{steps} plane of 784-{hidden}-10, {n:,} images",
            "peer": "torch path (LOSSGLASS_NATIVE=0)", **r, "useful_gflop": flops / 1e9,
            "native": _native.kernel(10) is not None, **_compare(ours(), peer())}


def main(quick: bool = False) -> list[dict]:
    n = 2000 if quick else 10000
    reps = 2 if quick else 3
    ds = fmnist(n_train=n, n_test=100)
    rows = []
    for hidden, k in ((128, 64), (128, 32), (16, 64)):
        rows.append(energy_case(ds, hidden, 16 if quick else k, reps))
        print(f"kernel {rows[-1]['case']}: {rows[-1]['speedup']:.2f}x", flush=True)
    rows.append(plane_case(ds, 64, 11 if quick else 21, reps))
    print(f"kernel {rows[-1]['case']}: {rows[-1]['speedup']:.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    out = main("--quick" in sys.argv)
    print(json.dumps([{k: v for k, v in r.items() if not k.endswith("_times")} for r in out], indent=1))
