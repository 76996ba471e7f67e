"""Time of one energy evaluation of K replicas of 784-64-10 on 10,000 images, K = 1..256: the cost per replica
falls as K grows (fewer, larger kernels), until the matmul floor is reached."""

from __future__ import annotations

import sys

from common import fmnist, matmul_gflops, mlp_flops, repeat

import lossglass as lg


def main(quick: bool = False) -> list[dict]:
    rate = matmul_gflops()
    ds = fmnist(n_train=10000, n_test=100)
    prob = lg.Problem(lg.models.mlp(784, 64, 10), ds, device="cpu")
    rows = []
    for k in (1, 4, 16, 64) if quick else (1, 2, 4, 8, 16, 32, 64, 128, 256):
        theta = prob.init(k, 0)
        r = repeat(lambda th=theta: prob.energy(th), 3)
        t = r["best_s"]
        flops = mlp_flops([784, 64, 10], 10000) * k
        rows.append({"K": k, "seconds": t, "spread": r["spread"], "ms_per_replica": 1e3 * t / k, "gflops": flops / t / 1e9,
                     "fraction_of_matmul": flops / t / 1e9 / rate})
        print(rows[-1])
    return rows


if __name__ == "__main__":
    main("--quick" in sys.argv)
