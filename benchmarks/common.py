"""Shared helpers for the side-by-side benchmarks: the machine's matmul rate, timers, data."""

from __future__ import annotations

import os
import platform
import resource
import time

import torch

import lossglass as lg


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Measured float32 GEMM rate (GFLOP/s) of an n x n product: the machine's floor for matmul-bound work."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def best_of(fn, reps: int = 2) -> float:
    """Best wall time of ``reps`` calls (the machine is shared and noisy: the minimum is the least noisy)."""
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def side_by_side(ours, peer, reps: int = 3, warm: bool = True) -> dict:
    """Time ``ours`` and ``peer`` alternately ``reps`` times each (both warmed up by one untimed call first unless
    ``warm`` is False), so that the noise of a shared machine hits both sides alike. Returns the best time of each
    side, the spread of each side over its repeats ((max - min) / min), and the speed-up peer / ours: best over best,
    with the smallest and largest of the per-repeat ratios."""
    if warm:
        ours()
        peer()
    t_o, t_p = [], []
    for _ in range(reps):
        t = time.perf_counter()
        ours()
        t_o.append(time.perf_counter() - t)
        t = time.perf_counter()
        peer()
        t_p.append(time.perf_counter() - t)
    ratios = [p / o for o, p in zip(t_o, t_p)]
    return {"ours_s": min(t_o), "ours_spread": max(t_o) / min(t_o) - 1, "peer_s": min(t_p),
            "peer_spread": max(t_p) / min(t_p) - 1, "speedup": min(t_p) / min(t_o), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "ours_times": t_o, "peer_times": t_p, **one_thread(ours, peer, reps)}


def one_thread(ours, peer, reps: int = 3) -> dict:
    """The same comparison on one thread, timed by the calling thread's CPU time (``time.thread_time``): on a
    machine shared with other jobs this is the robust ratio (a neighbour that takes a core stalls every barrier of
    a 2-thread run, but not the CPU time of a 1-thread one). Both sides warmed up on one thread first."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours()
        peer()
        c_o, c_p = [], []
        for _ in range(reps):
            t = time.thread_time()
            ours()
            c_o.append(time.thread_time() - t)
            t = time.thread_time()
            peer()
            c_p.append(time.thread_time() - t)
    finally:
        torch.set_num_threads(before)
    return {"ours_cpu1_s": min(c_o), "ours_cpu1_spread": max(c_o) / min(c_o) - 1, "peer_cpu1_s": min(c_p),
            "peer_cpu1_spread": max(c_p) / min(c_p) - 1, "speedup_cpu1": min(c_p) / min(c_o)}


def repeat(fn, reps: int = 3, warm: bool = True) -> dict:
    """Best time of ``reps`` calls of ``fn`` and their spread ((max - min) / min); one untimed warm-up call first."""
    if warm:
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"best_s": min(ts), "spread": max(ts) / min(ts) - 1, "times": ts}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmnist(n_train: int | None = 10000, n_test: int | None = 1000) -> lg.datasets.Dataset:
    return lg.datasets.load("fashion-mnist", n_train=n_train, n_test=n_test, seed=0)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def mlp_flops(widths: list[int], n: int) -> float:
    """Multiply-add FLOPs of one forward pass of an MLP over n samples (2 per multiply-add)."""
    return 2.0 * n * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
