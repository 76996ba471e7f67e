"""Calibration of the measures stage's statistics (lossglass.protocols.measures.rank_measures) on synthetic grids of
the preset's design (5 axes x 2 levels, ``seeds`` networks per cell): how often the 95% bootstrap interval of Psi, of
the per-cell tau (``tau_cells``, over the cells' seed means), of each axis' granulated tau and of the overall tau
excludes 0 when the measure has nothing to do with the gap (false positives), and how often it is above 0 when the
measure follows the gap (power), with Clopper-Pearson 95% intervals. The conditional mutual information is >= 0 by
construction (no interval can exclude 0 from below): for it the table gives the mean value and interval ends per kind
of measure, and the rate at which its interval's low end is above the 95th percentile of the CMI of the pure-noise
measures (a null threshold, ``cmi_lo > null q95``).

The gap of a network is a sum of axis effects plus seed noise (sd 1, the size of the effects). Null measures: (i) pure
noise; (ii) driven by axes the gap does not depend on (a measure of a hyperparameter that does not matter, plus
noise). Alternatives: the gap plus independent noise of sd 0.5, 1 and 2.

    python benchmarks/calibrate_measures.py [--trials 400] [--seeds 2 4]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
from scipy.stats import beta

from lossglass.protocols.measures import rank_measures

AXES = ["width", "batch_size", "lr", "weight_decay", "sam_rho"]


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)


def one(seeds: int, trials: int, rng: np.random.Generator) -> list[dict]:
    cells = np.stack(np.unravel_index(np.arange(32), (2,) * 5), 1)
    df = pd.DataFrame(np.repeat(cells, seeds, 0), columns=AXES)
    eff = df[["width", "batch_size", "lr"]].sum(axis=1).to_numpy(float)  # the gap depends on three axes
    df["gap"] = eff + rng.normal(size=len(df))
    kinds = {"null: noise": lambda: rng.normal(size=len(df)),
             "null: irrelevant axes": lambda: 2 * df[["weight_decay", "sam_rho"]].sum(axis=1).to_numpy(float)
             + rng.normal(size=len(df)),
             "gap + noise sd 0.5": lambda: df["gap"].to_numpy() + rng.normal(scale=0.5, size=len(df)),
             "gap + noise sd 1": lambda: df["gap"].to_numpy() + rng.normal(scale=1.0, size=len(df)),
             "gap + noise sd 2": lambda: df["gap"].to_numpy() + rng.normal(scale=2.0, size=len(df))}
    out, null_q95 = [], None
    for kind, draw in kinds.items():  # one call ranks every trial's measure (a column each)
        cols = {f"m{i}": draw() for i in range(trials)}
        r = rank_measures(pd.concat([df, pd.DataFrame(cols)], axis=1), list(cols), AXES, target="gap", n_boot=500,
                          seed=int(rng.integers(1 << 30)), usable=None)
        # psi_width, psi_lr: axes the gap depends on; psi_weight_decay: one it does not (under the nulls)
        null = kind.startswith("null")
        for stat in ("psi", "tau_cells", "tau", "psi_width", "psi_lr") + (("psi_weight_decay",) if null else ()):
            excl = int(((r[f"{stat}_lo"] > 0) | (r[f"{stat}_hi"] < 0)).sum())
            pos = int((r[f"{stat}_lo"] > 0).sum())
            k = excl if null else pos
            lo, hi = clopper_pearson(k, trials)
            out.append({"seeds": seeds, "measure": kind, "statistic": stat,
                        "rate": k / trials, "ci_low": lo, "ci_high": hi,
                        "what": "false positives (interval excludes 0)" if null else "power (interval above 0)",
                        "mean": float(r[stat].mean())})
        if null_q95 is None:  # the first kind is pure noise: its CMI distribution is the null
            null_q95 = float(np.nanpercentile(r["cmi"], 95))
        k = int((r["cmi_lo"] > null_q95).sum())
        lo, hi = clopper_pearson(k, trials)
        out.append({"seeds": seeds, "measure": kind, "statistic": "cmi", "rate": k / trials, "ci_low": lo,
                    "ci_high": hi, "what": f"cmi_lo > null q95 ({null_q95:.3f}); mean interval "
                    f"[{r['cmi_lo'].mean():.3f}, {r['cmi_hi'].mean():.3f}]", "mean": float(r["cmi"].mean())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = [row for s in args.seeds for row in one(s, args.trials, rng)]
    res = pd.DataFrame(rows)
    with pd.option_context("display.width", 200):
        print(res.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
