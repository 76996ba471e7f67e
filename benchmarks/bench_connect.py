"""The 21x21 filter-normalised plane against loss-landscapes' random_plane, and weight matching of two
784-512-512-512-10 networks against rebasin's PermutationCoordinateDescent."""

from __future__ import annotations

import copy
import sys
import time

import torch
from common import fmnist, side_by_side

import lossglass as lg
from lossglass import _native


def plane_case(steps: int = 21, reps: int = 3) -> dict:
    import loss_landscapes
    import loss_landscapes.metrics

    ds = fmnist(n_train=10000, n_test=100)
    prob = lg.Problem(lg.models.mlp(784, 64, 10), ds, device="cpu")
    theta = lg.train(prob, 1, epochs=2, batch_size=128, lr=0.05, progress=False).theta[0]
    model = prob.to_module(theta)
    x, y = ds.x_train, ds.y_train
    metric = loss_landscapes.metrics.Loss(torch.nn.CrossEntropyLoss(), x, y)

    def theirs():
        with torch.no_grad():
            loss_landscapes.random_plane(copy.deepcopy(model), metric, distance=1, steps=steps, normalization="filter")

    t0 = time.perf_counter()
    lg.plane(prob, theta, steps=steps, span=1.0)
    first = time.perf_counter() - t0  # includes building the fused kernel when its cache is cold
    r = side_by_side(lambda: lg.plane(prob, theta, steps=steps, span=1.0), theirs, reps, warm=False)
    # useful work: 3 first-layer products (centre, 2 directions), then per grid point and image the combination
    # (2 x 3 x 64), the output layer (2 x 64 x 10) and the soft-max; test split (100 images) left out
    n, g = len(y), steps * steps
    flops = 3 * 2 * n * 784 * 64 + g * n * (2 * 3 * 64 + 2 * 64 * 10)
    return {"row": "plane", "case": f"{steps}x{steps} filter-normalised plane, 784-64-10, 10,000 images",
            "peer": "loss-landscapes random_plane", **r, "first_call_s": first, "useful_gflop": flops / 1e9,
            "native": bool(_native.status()["built"])}


def matching_case() -> dict:
    from rebasin import PermutationCoordinateDescent

    ds = fmnist(n_train=10000, n_test=2000)
    prob = lg.Problem(lg.models.mlp(784, [512, 512, 512], 10), ds, device="cpu")
    reps = lg.train(prob, 2, epochs=2, batch_size=128, lr=0.05, seed=0, progress=False)
    a, b = reps.theta[0], reps.theta[1]
    res = {}

    def peer():
        ma, mb = prob.to_module(a), prob.to_module(b)
        PermutationCoordinateDescent(ma, mb, ds.x_train[:8]).rebasin()
        res["theirs"] = prob.flatten(mb)

    r = side_by_side(lambda: res.update(ours=lg.align(prob, a, b, method="weight")[0]), peer, 3)
    ours, theirs = res["ours"], res["theirs"]
    x = ds.x_test[:500]
    same_fn = torch.allclose(prob.forward(theirs[None], x), prob.forward(b[None], x), atol=1e-3)
    bars = lg.interpolate(prob, torch.stack([a, a, a]), torch.stack([b, ours, theirs]), n_points=21)
    return {"row": "matching", "case": "weight matching, two 784-512-512-512-10 networks",
            "peer": "rebasin PermutationCoordinateDescent", **r,
            "barrier_naive": bars[0].barrier, "barrier_ours": bars[1].barrier, "barrier_peer": bars[2].barrier,
            "peer_preserves_function": bool(same_fn)}


def main(quick: bool = False) -> list[dict]:
    rows = [plane_case(11 if quick else 21, 2 if quick else 3), matching_case()]
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
