"""Walkers as replicas against a Python loop over walkers doing the same Metropolis steps, at two sizes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import best_of, fmnist, matmul_gflops, mlp_flops
from torch.func import functional_call

import lossglass as lg


def loop_walk(prob: lg.Problem, theta0: torch.Tensor, walkers: int, steps: int, sigma: float, temp: float):
    """The naive instrument: one model, one walker at a time, one forward pass per proposal."""
    model = prob.model
    x, y = prob.data["train"]
    names = [p.name for p in prob.params]

    def energy(t):
        params = {n: v for n, v in zip(names, prob.split(t.unsqueeze(0)))}
        params = {n: v[0] for n, v in params.items()}
        with torch.no_grad():
            return F.cross_entropy(functional_call(model, params, (x,)), y)

    def run():
        gen = torch.Generator().manual_seed(0)
        for _ in range(walkers):
            th = theta0.clone()
            e = energy(th)
            for _ in range(steps):
                new = th + sigma * torch.randn(th.shape, generator=gen)
                e2 = energy(new)
                if e2 <= e or torch.rand((), generator=gen) < torch.exp(-(e2 - e) / temp):
                    th, e = new, e2
    return run


def case(hidden: int, n_data: int, walkers: int, steps: int, rate: float) -> dict:
    ds = fmnist(n_train=n_data, n_test=100)
    prob = lg.Problem(lg.models.mlp(784, hidden, 10), ds, device="cpu")
    theta0 = lg.train(prob, 1, epochs=1, batch_size=128, lr=0.05, progress=False).theta[0]
    sigma, temp = 1e-3, 1e-3

    def ours():
        lg.random_walk(prob, theta0, n_walkers=walkers, steps=steps, step_size=sigma, temperature=temp,
                       record_every=steps, progress=False)

    t_ours = best_of(ours, 1)
    t_loop = best_of(loop_walk(prob, theta0, walkers, steps, sigma, temp), 1)
    flops = mlp_flops([784, hidden, 10], n_data) * walkers * steps
    return {"case": f"Metropolis 784-{hidden}-10, {walkers} walkers x {steps} steps, {n_data} images",
            "ours_s": t_ours, "loop_s": t_loop, "speedup": t_loop / t_ours, "gflops": flops / t_ours / 1e9,
            "fraction_of_matmul": flops / t_ours / 1e9 / rate, "ours_ms_per_step": 1e3 * t_ours / steps}


def main(quick: bool = False) -> list[dict]:
    rate = matmul_gflops()
    rows = [case(64, 10000, 16, 20 if quick else 100, rate), case(16, 1000, 64, 50 if quick else 300, rate)]
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
