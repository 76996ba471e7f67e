"""The 21x21 filter-normalised plane against loss-landscapes' random_plane, and weight matching of two
784-512-512-512-10 networks against rebasin's PermutationCoordinateDescent."""

from __future__ import annotations

import copy
import sys

import torch
from common import best_of, fmnist

import lossglass as lg


def plane_case(steps: int = 21) -> dict:
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

    t_ours = best_of(lambda: lg.plane(prob, theta, steps=steps, span=1.0), 2)
    t_theirs = best_of(theirs, 1)
    return {"case": f"{steps}x{steps} filter-normalised plane, 784-64-10, 10,000 images", "ours_s": t_ours,
            "peer": "loss-landscapes random_plane", "peer_s": t_theirs, "speedup": t_theirs / t_ours}


def matching_case() -> dict:
    from rebasin import PermutationCoordinateDescent

    ds = fmnist(n_train=10000, n_test=2000)
    prob = lg.Problem(lg.models.mlp(784, [512, 512, 512], 10), ds, device="cpu")
    reps = lg.train(prob, 2, epochs=2, batch_size=128, lr=0.05, seed=0, progress=False)
    a, b = reps.theta[0], reps.theta[1]
    res = {}
    t_ours = best_of(lambda: res.update(ours=lg.align(prob, a, b, method="weight")[0]), 2)
    ours = res["ours"]

    def peer():
        ma, mb = prob.to_module(a), prob.to_module(b)
        PermutationCoordinateDescent(ma, mb, ds.x_train[:8]).rebasin()
        res["theirs"] = prob.flatten(mb)

    t_theirs = best_of(peer, 2)
    theirs = res["theirs"]
    x = ds.x_test[:500]
    same_fn = torch.allclose(prob.forward(theirs[None], x), prob.forward(b[None], x), atol=1e-3)
    bars = lg.interpolate(prob, torch.stack([a, a, a]), torch.stack([b, ours, theirs]), n_points=21)
    return {"case": "weight matching, two 784-512-512-512-10 networks", "ours_s": t_ours,
            "peer": "rebasin PermutationCoordinateDescent", "peer_s": t_theirs, "speedup": t_theirs / t_ours,
            "barrier_naive": bars[0].barrier, "barrier_ours": bars[1].barrier, "barrier_peer": bars[2].barrier,
            "peer_preserves_function": bool(same_fn)}


def main(quick: bool = False) -> list[dict]:
    rows = [plane_case(11 if quick else 21), matching_case()]
    for r in rows:
        print(r)
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
