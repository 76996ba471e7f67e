"""The top Hessian eigenvalue of a 784-64-10 network on 10,000 Fashion-MNIST images to 1e-4 relative
tolerance: lossglass's Lanczos against PyHessian's power iteration at the same tolerance."""

from __future__ import annotations

import sys

import torch
from common import best_of, fmnist

import lossglass as lg
from lossglass import curvature


def main(quick: bool = False) -> list[dict]:
    import pyhessian  # noqa: F401  (the package exports a class named like its module)

    ph = sys.modules["pyhessian.hessian"]

    ds = fmnist(n_train=10000 if not quick else 3000, n_test=100)
    prob = lg.Problem(lg.models.mlp(784, 64, 10), ds, device="cpu")
    theta = lg.train(prob, 1, epochs=2, batch_size=128, lr=0.05, progress=False).theta[0]
    res = {}
    t_ours = best_of(lambda: res.update(r=curvature.top_eigenvalues(prob, theta, k=1, tol=1e-4)), 2)
    ours = res["r"]
    model = prob.to_module(theta)
    count = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(*a, **k):
        count["n"] += 1
        return orig(*a, **k)

    ph.hessian_vector_product = counted
    def peer():
        torch.manual_seed(0)
        count["n"] = 0
        h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(ds.x_train, ds.y_train), cuda=False)
        res["p"] = h.eigenvalues(maxIter=1000, tol=1e-4, top_n=1)[0]

    t_theirs = best_of(peer, 2)
    theirs = res["p"]
    ph.hessian_vector_product = orig
    ref = curvature.top_eigenvalues(prob, theta, k=1, tol=1e-9, max_iter=400).values[0].item()
    row = {"case": "top Hessian eigenvalue, 784-64-10, 10,000 images, tol 1e-4", "ours_s": t_ours,
           "peer": "PyHessian eigenvalues()", "peer_s": t_theirs, "speedup": t_theirs / t_ours,
           "ours_hvp": ours.n_hvp, "peer_hvp": count["n"], "reference": ref,
           "ours_rel_err": abs(ours.values[0].item() - ref) / abs(ref), "peer_rel_err": abs(theirs[0] - ref) / abs(ref)}
    print(row)
    return [row]


if __name__ == "__main__":
    main("--quick" in sys.argv)
