"""Walkers as replicas against a Python loop over walkers doing the same Metropolis steps, at two sizes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import fmnist, mlp_flops, side_by_side
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


def case(hidden: int, n_data: int, walkers: int, steps: int, reps: int = 3) -> dict:
    ds = fmnist(n_train=n_data, n_test=100)
    prob = lg.Problem(lg.models.mlp(784, hidden, 10), ds, device="cpu")
    theta0 = lg.train(prob, 1, epochs=1, batch_size=128, lr=0.05, progress=False).theta[0]
    sigma, temp = 1e-3, 1e-3

    def ours():
        lg.random_walk(prob, theta0, n_walkers=walkers, steps=steps, step_size=sigma, temperature=temp,
                       record_every=steps, progress=False)

    r = side_by_side(ours, loop_walk(prob, theta0, walkers, steps, sigma, temp), reps)
    flops = mlp_flops([784, hidden, 10], n_data) * walkers * steps
    return {"row": f"walk{walkers}", "case": f"Metropolis 784-{hidden}-10, {walkers} walkers x {steps} steps, "
            f"{n_data} images", "peer": "Python loop over walkers", **r, "useful_gflop": flops / 1e9,
            "ours_ms_per_step": 1e3 * r["ours_s"] / steps}


def main(quick: bool = False) -> list[dict]:
    reps = 2 if quick else 3
    rows = [case(64, 10000, 16, 10 if quick else 40, reps), case(16, 1000, 64, 30 if quick else 120, reps)]
    for r in rows:
        print({k: v for k, v in r.items() if not k.endswith("_times")})
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
