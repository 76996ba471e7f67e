"""Coverage of the model-selection intervals (lossglass.selection, issue 22 item 5) on simulated pools whose truth is
known.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_selection.py --k 8 16 32 64 --trials 400
    OMP_NUM_THREADS=1 python benchmarks/calibrate_selection.py --k 8 16 32 --trials 400 --method bootstrap

The simulation. Replica i has a population accuracy a_i ~ N(0.85, tau^2) (tau = 0.01: the seed-to-seed spread of a
small network), a validation accuracy a_i + N(0, a_i (1 - a_i) / n_val) and a flatness measure
-r (a_i - 0.85) / tau + sqrt(1 - r^2) N(0, 1) (r = 0: useless, r > 0: flatter replicas are better). The test split is
n_test images drawn from the population: image j has a difficulty U_j ~ U(0, 1) shared by all replicas, and replica i
gets it right with probability a_i, as 1{U_j < a_i} with probability rho (the replicas err on the same images) and as
an independent coin otherwise. So P(correct) = a_i exactly, and two truths are known:

- on new data (unconditional): E[a_pick] over fresh pools of ``pool`` replicas, by Monte Carlo over 200,000 pools;
- on this test split (conditional): E[rho F_n(a_pick) + (1 - rho) a_pick] over the same pools, F_n the empirical
  distribution function of this split's U_j (the expected test accuracy of the pick with the test images held fixed).

Each trial draws K replicas and a test split, runs ``evaluate_strategies`` and records whether each interval covers
its truth; coverage intervals are Clopper-Pearson 95%. ``--method bootstrap`` grades the interval used before issue 22
(a percentile bootstrap over replicas, conditional on the test split) against the same truths. Trial t draws from
numpy's default_rng([t, K, seed]), so every row is reproducible on its own. Writes a JSON of the rows under --out
(default benchmarks/results/) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.stats import beta

from lossglass.selection import STRATEGIES, _subpools, evaluate_strategies, picks

MU = 0.85


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (Clopper & Pearson 1934)."""
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def draw_replicas(rng: np.random.Generator, k: int, *, n_val: int, tau: float, r: float):
    """Population accuracy, validation accuracy and flatness of k replicas (the model in the module docstring)."""
    a = MU + tau * rng.standard_normal(k)
    val = a + np.sqrt(a * (1 - a) / n_val) * rng.standard_normal(k)
    flat = -r * (a - MU) / tau + np.sqrt(1 - r**2) * rng.standard_normal(k)
    return a, val, flat


def draw_test_split(rng: np.random.Generator, a: np.ndarray, *, n_test: int, rho: float):
    """Test accuracies of the replicas on one split and the split's sorted difficulties."""
    u = rng.random(n_test)
    shared = rng.random((len(a), n_test)) < rho
    c = np.where(shared, u[None, :] < a[:, None], rng.random((len(a), n_test)) < a[:, None])
    return c.mean(1), np.sort(u)


def pick_accuracies(m: int, *, n_val: int, tau: float, r: float, n_pools: int = 200_000, seed: int = 12345) -> dict:
    """Population accuracy of each strategy's pick over ``n_pools`` fresh pools of m replicas (the 1-SE window from
    each pool's own best validation accuracy, as ``evaluate_strategies`` does from the run's)."""
    rng = np.random.default_rng(seed)
    a, val, flat = (x.reshape(n_pools, m) for x in draw_replicas(rng, n_pools * m, n_val=n_val, tau=tau, r=r))
    p = np.clip(val.max(1, keepdims=True), 1 / n_val, 1 - 1 / n_val)
    near = np.where(val >= val.max(1, keepdims=True) - np.sqrt(p * (1 - p) / n_val), flat, np.inf)
    idx = {"best-val": val.argmax(1), "flattest": flat.argmin(1), "flattest-within-1se": near.argmin(1),
           "random": rng.integers(0, m, n_pools)}
    return {s: np.take_along_axis(a, i[:, None], 1)[:, 0] for s, i in idx.items()}


def bootstrap_intervals(val, test, flat, *, n_val: int, pool: int, n_resamples: int = 2000, n_boot: int = 200,
                        seed: int = 0) -> dict:
    """The interval used before issue 22: percentile bootstrap over replicas (pools of K drawn with replacement, the
    sub-pool resampling repeated inside each), conditional on the test split. Returns {strategy: (low, high)}."""
    k = len(val)
    p = float(np.clip(val.max(), 1 / n_val, 1 - 1 / n_val))
    se = float(np.sqrt(p * (1 - p) / n_val))
    rng = np.random.default_rng(seed)
    picks(val, flat, se, _subpools(k, pool, n_resamples, rng), rng)  # the point estimate's draws (the old stream)
    boot_idx = rng.integers(0, k, size=(n_boot, k))
    sub = _subpools(k, pool, max(200, n_resamples // 10), rng, lead=(n_boot,))
    got = picks(val, flat, se, np.take_along_axis(boot_idx[:, None, :], sub, -1), rng)
    return {s: tuple(np.percentile(test[i].mean(-1), [2.5, 97.5])) for s, i in got.items()}


def coverage(k: int, trials: int, *, n_val: int, n_test: int, tau: float, rho: float, r: float, method: str,
             seed: int = 0) -> list[dict]:
    m = max(3, k // 2)
    bank = pick_accuracies(m, n_val=n_val, tau=tau, r=r)
    truth_new = {s: float(v.mean()) for s, v in bank.items()}
    hits = {s: np.zeros((trials, 3)) for s in STRATEGIES}
    widths = {s: np.zeros((trials, 2)) for s in STRATEGIES}
    for t in range(trials):
        rng = np.random.default_rng([t, k, seed])
        a, val, flat = draw_replicas(rng, k, n_val=n_val, tau=tau, r=r)
        test, u = draw_test_split(rng, a, n_test=n_test, rho=rho)
        truth_split = {s: float((rho * np.searchsorted(u, ap) / n_test + (1 - rho) * ap).mean()) for s, ap in bank.items()}
        if method == "bootstrap":
            iv = bootstrap_intervals(val, test, flat, n_val=n_val, pool=m, seed=t)
            rows = {s: (lo, hi, lo, hi, np.nan, np.nan) for s, (lo, hi) in iv.items()}
        else:
            tab = evaluate_strategies(val, test, flat, n_val=n_val, n_test=n_test, seed=t).set_index("strategy")
            rows = {s: tuple(tab.loc[s, c] for c in ("ci_low", "ci_high", "split_ci_low", "split_ci_high",
                                                      "gain_ci_low", "gain_ci_high")) for s in STRATEGIES}
        for s, (lo, hi, slo, shi, glo, ghi) in rows.items():
            gain = truth_split[s] - truth_split["best-val"]
            hits[s][t] = [lo <= truth_new[s] <= hi, slo <= truth_split[s] <= shi, glo <= gain <= ghi]
            widths[s][t] = [hi - lo, shi - slo]
    out = []
    for s in STRATEGIES:
        h = hits[s].sum(0).astype(int)
        row = {"k": k, "pool": m, "strategy": s, "method": method, "trials": trials, "n_val": n_val, "n_test": n_test,
               "tau": tau, "rho": rho, "r": r, "truth_new_data": truth_new[s],
               "new_data": h[0] / trials, "new_data_ci": clopper_pearson(int(h[0]), trials),
               "this_split": h[1] / trials, "this_split_ci": clopper_pearson(int(h[1]), trials),
               "width_new_data": float(widths[s][:, 0].mean()), "width_this_split": float(widths[s][:, 1].mean())}
        if method != "bootstrap" and s != "best-val":
            row.update(gain=h[2] / trials, gain_ci=clopper_pearson(int(h[2]), trials))
        out.append(row)
    return out


def _pct(x: float, ci) -> str:
    return f"{x * 100:.1f} [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--n-val", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--rho", type=float, default=0.8)
    ap.add_argument("--r", type=float, default=0.0, help="correlation of flatness with accuracy")
    ap.add_argument("--method", choices=("jackknife", "bootstrap"), default="jackknife")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    rows = []
    print("| K | strategy | method | covers on new data % [95% CI] | covers on this split % [95% CI] | gain on this split % "
          "| mean width new / split |")
    print("|---|---|---|---|---|---|---|")
    for k in a.k:
        t0 = time.time()
        for r in coverage(k, a.trials, n_val=a.n_val, n_test=a.n_test, tau=a.tau, rho=a.rho, r=a.r, method=a.method):
            rows.append(r)
            gain = _pct(r["gain"], r["gain_ci"]) if "gain" in r else "-"
            print(f"| {k} | {r['strategy']} | {a.method} | {_pct(r['new_data'], r['new_data_ci'])} | "
                  f"{_pct(r['this_split'], r['this_split_ci'])} | {gain} | {r['width_new_data']:.4f} / "
                  f"{r['width_this_split']:.4f} |", flush=True)
        rows[-1]["seconds_for_k"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"selection_coverage_{a.method}_rho{a.rho}_r{a.r}_ntest{a.n_test}.json"
    (out / name).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
