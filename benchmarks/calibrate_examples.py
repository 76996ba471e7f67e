"""Calibration of the examples stage's pair statistic (lossglass.protocols.examples.pair_rank_correlation and its
verdict): false-positive rate where churn and the other pair quantity are unrelated, and power where they are
related, each with a 95% Wilson interval.

Null families (K replicas, all pairs or a random subset of pairs, as the stage sees them):
- ``independent``: two unrelated geometries (cosines of independent random unit vectors);
- ``replica effects``: each matrix is a sum of per-replica effects plus pair noise, x_ab = u_a + u_b + e_ab, the
  effects of the two matrices independent (pairs that share a replica are correlated within each matrix: the case
  a pair-level test gets wrong);
- ``ties``: the other quantity is 0 on 70% of the pairs (barriers of mode-connected pairs) and independent elsewhere.
Power: churn = f(other) + noise at two noise levels.

Second part (``--part flatness``): the flatness-against-robustness verdict under independence and under a monotone
relation.

Usage: python benchmarks/calibrate_examples.py [--trials 150] [--draws 300] [--part pairs|flatness]
(prints Markdown table rows)
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np

from lossglass.protocols.examples import correlation_verdict, pair_rank_correlation, wilson


def sym(m: np.ndarray) -> np.ndarray:
    m = (m + m.T) / 2
    np.fill_diagonal(m, 0)
    return m


def geometry(k: int, rng) -> np.ndarray:
    v = rng.standard_normal((k, 20))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return sym(v @ v.T)


def effects(k: int, rng) -> np.ndarray:
    u = rng.standard_normal(k)
    return sym(u[:, None] + u[None] + 0.5 * rng.standard_normal((k, k)))


def subset(m: np.ndarray, n_pairs: int | None, rng) -> np.ndarray:
    if n_pairs is None:
        return m
    k = m.shape[0]
    iu = np.triu_indices(k, 1)
    keep = rng.permutation(len(iu[0]))[:n_pairs]
    out = np.full_like(m, np.nan)
    out[iu[0][keep], iu[1][keep]] = out[iu[1][keep], iu[0][keep]] = m[iu[0][keep], iu[1][keep]]
    return out


def scenario(name: str, k: int, rng):
    if name == "independent":
        return geometry(k, rng), geometry(k, rng), False
    if name == "replica effects":
        return effects(k, rng), effects(k, rng), False
    if name == "ties":
        other = np.abs(effects(k, rng))
        zero = sym((rng.random((k, k)) < 0.7).astype(float)) > 0
        other[zero] = 0
        return sym(other), effects(k, rng), False
    base = effects(k, rng)
    noise = {"related (strong)": 0.5, "related (weak)": 2.0}[name]
    return base, sym(base + noise * rng.standard_normal((k, k))), True


def flatness_part(trials: int) -> None:
    """The flatness-against-robustness verdict (rank_correlations' percentile bootstrap and scipy p-value, both
    required): replicas whose measure is independent of their robustness drop (false positives) or monotonically
    related with noise (power), n = 16 and 32 replicas."""
    import pandas as pd

    from lossglass.protocols.examples import flatness_robustness

    for n in (16, 32):
        for name, slope in (("independent", 0.0), ("related (tau ~ 0.5)", 1.0)):
            rng = np.random.default_rng(zlib.crc32(f"flat-{n}-{name}".encode()))
            hits, t0 = 0, time.time()
            for t in range(trials):
                f = rng.standard_normal(n)
                drop = slope * f + rng.standard_normal(n)
                flat = pd.DataFrame({"replica": np.arange(n), "sharpness_average": f})
                rob = pd.DataFrame({"replica": np.arange(n), "robust_drop": drop})
                v = flatness_robustness(flat, rob, seed=t).set_index("measure").loc["sharpness_average", "verdict"]
                hits += v != "nothing detectable"
            lo, hi = wilson(hits, trials)
            kind = "power" if slope else "false positives"
            print(f"| flatness vs robustness | n = {n} | {name} | {kind} | {hits}/{trials} = {hits / trials * 100:.1f}% "
                  f"[{lo * 100:.1f}, {hi * 100:.1f}] | {time.time() - t0:.0f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--part", choices=["pairs", "flatness"], default="pairs")
    a = ap.parse_args()
    if a.part == "flatness":
        flatness_part(a.trials)
        return
    rows = []
    for k, n_pairs in ((16, 60), (16, None), (8, None)):
        for name in ("independent", "replica effects", "ties", "related (strong)", "related (weak)"):
            rng = np.random.default_rng(zlib.crc32(f"{k}-{n_pairs}-{name}".encode()))
            hits, t0 = 0, time.time()
            for t in range(a.trials):
                other, ch, related = scenario(name, k, rng)
                other = subset(other, n_pairs, rng)
                r = pair_rank_correlation(other, ch, n_boot=a.draws, n_perm=a.draws, seed=t)
                hits += correlation_verdict(r["ci_low"], r["ci_high"], r["p_value"]) != "nothing detectable"
            lo, hi = wilson(hits, a.trials)
            rows.append((k, n_pairs or k * (k - 1) // 2, name, "power" if related else "false positives", hits,
                         a.trials, lo, hi, time.time() - t0))
            print(f"| {rows[-1][0]} | {rows[-1][1]} | {name} | {rows[-1][3]} | {hits}/{a.trials} = "
                  f"{hits / a.trials * 100:.1f}% [{lo * 100:.1f}, {hi * 100:.1f}] |", flush=True)


if __name__ == "__main__":
    main()
