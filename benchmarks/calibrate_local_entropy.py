"""Calibration of the local-entropy estimator (lossglass.local_entropy, subset simulation; issue 22 item 7) on
quadratics whose answer is exact.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_local_entropy.py quadratics --seeds 40
    OMP_NUM_THREADS=1 python benchmarks/calibrate_local_entropy.py quadratics --seeds 40 --steps 20 --cases ellipsoid
    OMP_NUM_THREADS=1 python benchmarks/calibrate_local_entropy.py exact-levels --runs 4000

``quadratics``: E = 1/2 (theta - c)^T diag(h) (theta - c), c = (1, ..., 1), ball radius R = 0.1 |c|, epsilon set so
that the fraction of the ball is known: isotropic and "stiff in m of P directions" (h = 1 on m coordinates, 0 on the
rest: the incomplete beta fraction I_s(m/2, (P-m)/2 + 1), s = 2 epsilon / R^2), and ellipsoids inside the ball (h
log-spaced over one or two decades, epsilon = h_min R^2 / 2: prod_i sqrt(2 epsilon / h_i) / R). Each seed is one
replica (replicas draw independent streams), so one batched call gives every seed. Columns: the exact log-fraction,
the mean estimate, the seed-to-seed standard deviation, the root-mean-square stated standard error, their ratio, the
bias in units of the stated error and of the standard error of the mean, and the batched energy evaluations.

``exact-levels``: the level structure alone, with every level's chains drawn exactly from its law (-log F(E) is Exp(1)
above the current threshold): the bias of the Nelson-Aalen level factors and of the k/n factors used before issue 22.

Writes a JSON of the rows under --out (default benchmarks/results/) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import betainc

import lossglass as lg
from lossglass.protocols.curvature import _na_step


def quadratic(h: torch.Tensor) -> lg.Problem:
    c = torch.ones(len(h), dtype=torch.float64)
    return lg.Problem.from_function(lambda t: 0.5 * (h * (t - c) ** 2).sum(1), len(h), dtype=torch.float64)


def stiff_case(p: int, m: int, log_target: float, radius: float = 0.1):
    """h = 1 on m of p coordinates: epsilon giving the fraction exp(log_target) of the ball."""
    h = torch.zeros(p, dtype=torch.float64)
    h[:m] = 1
    big_r = radius * math.sqrt(p)

    def frac(s: float) -> float:
        return float(np.log(betainc(m / 2, (p - m) / 2 + 1, s))) if m < p else p / 2 * math.log(s)

    s = math.exp(brentq(lambda x: frac(math.exp(x)) - log_target, -80, -1e-9))
    name = f"P={p} isotropic" if m == p else f"P={p} stiff in {m}"
    return name, h, 0.5 * s * big_r**2, frac(s)


def ellipsoid_case(p: int, decades: float, radius: float = 0.1):
    """h log-spaced over ``decades``; the ellipsoid 1/2 u^T H u <= epsilon touches the ball from inside."""
    h = torch.logspace(0, decades, p, dtype=torch.float64)
    big_r = radius * math.sqrt(p)
    eps = 0.5 * float(h.min()) * big_r**2
    return f"P={p} ellipsoid, condition {10**decades:g}", h, eps, float(0.5 * torch.log(2 * eps / (h * big_r**2)).sum())


CASES = {"stiff": lambda: [stiff_case(40, 40, -7.0), stiff_case(40, 40, -25.0), stiff_case(10, 3, -7.0),
                           stiff_case(10, 3, -25.0), stiff_case(50, 10, -15.0), stiff_case(1000, 100, -7.0),
                           stiff_case(1000, 1000, -25.0)],
         "ellipsoid": lambda: [ellipsoid_case(10, 1), ellipsoid_case(10, 2), ellipsoid_case(20, 2),
                               ellipsoid_case(30, 1)]}


def quadratics(a) -> list[dict]:
    rows = []
    print(f"seeds {a.seeds}, n_chains {a.chains}, mcmc_steps {a.steps}, max_levels {a.max_levels}\n")
    print("| case | exact | mean estimate | seed sd | mean stated se | se/sd | bias | bias/se | bias/sem | energy evals |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in a.cases:
        for name, h, eps, truth in CASES[family]():
            c = torch.ones(len(h), dtype=torch.float64)
            t0 = time.time()
            out = lg.local_entropy(quadratic(h), c.expand(a.seeds, -1), radius=0.1, epsilon=eps, n_chains=a.chains,
                                   mcmc_steps=a.steps, max_levels=a.max_levels, seed=a.seed)
            v, se = out["local_entropy"].numpy(), out["stderr"].numpy()
            ok = np.isfinite(v)
            v, se = v[ok], se[ok]
            rms, sd = float(np.sqrt((se**2).mean())), float(v.std(ddof=1))
            bias = float(v.mean()) - truth
            row = {"case": name, "exact": truth, "mean": float(v.mean()), "seed_sd": sd, "stated_se": rms,
                   "ratio": rms / sd, "bias": bias, "bias_se": bias / rms, "bias_sem": bias / (sd / len(v) ** 0.5),
                   "unconverged": int((~ok).sum()), "n_energy": int(out["n_energy"]), "seconds": time.time() - t0,
                   "seeds": a.seeds, "n_chains": a.chains, "mcmc_steps": a.steps}
            rows.append(row)
            note = f" ({row['unconverged']} unconverged)" if row["unconverged"] else ""
            print(f"| {name} | {truth:.2f} | {row['mean']:.2f} | {sd:.2f} | {rms:.2f} | {row['ratio']:.2f} | "
                  f"{bias:+.2f} | {row['bias_se']:+.2f} | {row['bias_sem']:+.1f} | {row['n_energy']} |{note}", flush=True)
    return rows


def exact_levels(a) -> list[dict]:
    """Subset simulation with exact sampling at every level, all runs in lockstep."""
    rows = []
    print("| n | k | log p | Nelson-Aalen bias (sem) | sd | k/n bias (sem) |")
    print("|---|---|---|---|---|---|")
    for n in (16, 32, 64):
        keep = max(2, math.ceil(0.2 * n))
        for y_star in (7.0, 25.0):
            rng = np.random.default_rng([n, int(y_star)])
            base, na, old = np.zeros(a.runs), np.zeros(a.runs), np.zeros(a.runs)
            active = np.ones(a.runs, bool)
            while active.any():
                y = base[:, None] + rng.exponential(size=(a.runs, n))
                tau = -np.sort(-y, 1)[:, keep - 1]
                done = active & (tau >= y_star)
                hits = (y >= y_star).sum(1)
                step = _na_step(torch.as_tensor(np.where(done, hits, keep - 1), dtype=torch.float64), n, final=True)
                na += np.where(active, step.numpy(), 0.0)
                old += np.where(done, np.log(np.maximum(hits, 1) / n), np.where(active, math.log(keep / n), 0.0))
                base, active = np.where(active & ~done, tau, base), active & ~done
            sem = na.std() / a.runs**0.5
            row = {"n": n, "k": keep, "log_p": -y_star, "na_bias": float(na.mean() + y_star), "na_sem": float(sem),
                   "sd": float(na.std()), "old_bias": float(old.mean() + y_star),
                   "old_sem": float(old.std() / a.runs**0.5), "runs": a.runs}
            rows.append(row)
            print(f"| {n} | {keep} | {-y_star:.0f} | {row['na_bias']:+.3f} ({sem:.3f}) | {row['sd']:.2f} | "
                  f"{row['old_bias']:+.3f} ({row['old_sem']:.3f}) |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("quadratics", "exact-levels"))
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-levels", type=int, default=30)
    ap.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = quadratics(a) if a.mode == "quadratics" else exact_levels(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_steps{a.steps}_chains{a.chains}" if a.mode == "quadratics" else ""
    (out / f"local_entropy_{a.mode}{tag}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
