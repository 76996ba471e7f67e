"""Ensemble training against a plain loop of torch.nn models (same SGD steps), at two sizes, plus the
peak memory of evaluating 64 replicas on all 60,000 Fashion-MNIST training images."""

from __future__ import annotations

import subprocess
import sys

import torch
from common import fmnist, mlp_flops, side_by_side
from torch import nn

import lossglass as lg


def loop_baseline(ds, hidden: int, k: int, batch: int, steps: int, lr: float = 0.05):
    models = [lg.models.mlp(784, hidden, 10) for _ in range(k)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in models]
    gens = [torch.Generator().manual_seed(i) for i in range(k)]
    orders = [torch.randperm(len(ds.y_train), generator=g) for g in gens]
    loss_fn = nn.CrossEntropyLoss()

    def run():
        for s in range(steps):
            for m, o, order in zip(models, opts, orders):
                idx = order[s * batch:(s + 1) * batch]
                o.zero_grad()
                loss_fn(m(ds.x_train[idx]), ds.y_train[idx]).backward()
                o.step()
    return run


def case(ds, hidden: int, batch: int, k: int, steps: int, reps: int = 3) -> dict:
    sub = lg.datasets.Dataset(ds.name, ds.x_train[: batch * steps], ds.y_train[: batch * steps], ds.x_test[:100],
                              ds.y_test[:100], 10)
    prob = lg.Problem(lg.models.mlp(784, hidden, 10), sub, device="cpu")

    def ours():
        lg.train(prob, k, epochs=1, batch_size=batch, lr=0.05, progress=False, evaluate=False)

    r = side_by_side(ours, loop_baseline(sub, hidden, k, batch, steps), reps)
    # forward + weight gradients (2 x forward) + the output layer's input gradient; the first layer's input gradient
    # is not needed
    flops = (2 * mlp_flops([784, hidden, 10], batch) + 2.0 * batch * hidden * 10) * k * steps
    return {"row": f"train{hidden}", "case": f"train {k} replicas of 784-{hidden}-10, batch {batch}, 1 epoch "
            f"({steps} steps), plain SGD", "peer": f"loop of {k} torch models", **r, "useful_gflop": flops / 1e9}


RSS_CODE = """
import resource, sys, torch, lossglass as lg
ds = lg.datasets.load('fashion-mnist')
prob = lg.Problem(lg.models.mlp(784, 64, 10), ds, device='cpu')
theta = prob.init(64, 0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
e = prob.evaluate(theta, 'train')
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(before, after)
"""


def rss_check() -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CODE], capture_output=True, text=True, check=True).stdout.split()
    before, after = float(out[0]), float(out[1])
    return {"case": "peak RSS, K=64 replicas of 784-64-10 evaluated on all 60,000 training images",
            "rss_before_eval_mb": before, "peak_rss_mb": after}


def main(quick: bool = False) -> list[dict]:
    ds = fmnist(n_train=60000 if not quick else 20000)
    steps = 20 if quick else 60
    reps = 2 if quick else 3
    rows = [case(ds, 64, 128, 32, steps, reps), case(ds, 16, 32, 32, steps * 2, reps), rss_check()]
    for r in rows:
        print({k: v for k, v in r.items() if not k.endswith("_times")})
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
