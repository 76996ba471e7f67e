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
