"""Calibration of the ultrametricity test (lossglass.ultrametricity, issue 22): false-positive rate on structureless
families, power and levels recovered on nested trees, and the spherical 3-spin's descent endpoints.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_ultrametric.py fpr --k 16 32 64 --trials 600 400 200
    OMP_NUM_THREADS=1 python benchmarks/calibrate_ultrametric.py power --trials 100
    OMP_NUM_THREADS=1 python benchmarks/calibrate_ultrametric.py pspin --trials 20
    OMP_NUM_THREADS=1 python benchmarks/calibrate_ultrametric.py cost

Each writes a JSON of its rows under --out (default benchmarks/results/) and prints a markdown table. A false
positive is a verdict of "clusters" or "nested" at alpha = 0.01 on a set with no hierarchy; intervals are
Clopper-Pearson 95 %. Trial t of family f at size K draws from numpy's default_rng([t, D, K, family index]), so
every row is reproducible on its own."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta

from lossglass.protocols import replicas as R


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (Clopper & Pearson 1934)."""
    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


# ------------------------------------------------------------------------------------------------ families
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """Chords sqrt(2 (1 - q)) of the normalised rows (what normalised overlaps give)."""
    u = _unit(x)
    return R.distances_from_overlaps(np.clip(u @ u.T, -1, 1))


def euclidean_distances(x: np.ndarray) -> np.ndarray:
    g = x @ x.T
    n = np.diag(g)
    d = np.sqrt(np.clip(n[:, None] + n[None] - 2 * g, 0, None))
    np.fill_diagonal(d, 0)
    return (d + d.T) / 2


def _lognormal_cloud(rng, k, dim, sigma):
    r = np.exp(rng.normal(0, sigma, k))
    return r[:, None] * rng.normal(size=(k, dim)) / np.sqrt(dim)


def _unequal_cloud(rng, k, dim, factor):
    r = np.exp(rng.uniform(0, np.log(factor), k))
    return r[:, None] * rng.normal(size=(k, dim)) / np.sqrt(dim)


def _great_circle(rng, k, dim):
    th = rng.uniform(0, 2 * np.pi, k)
    basis = np.linalg.qr(rng.normal(size=(dim, 2)))[0]
    return np.stack([np.cos(th), np.sin(th)], 1) @ basis.T


def _power_law(rng, k, dim, a):
    return rng.normal(size=(k, dim)) * np.arange(1, dim + 1) ** (-a / 2)


def _spiked(rng, k, dim):
    return rng.normal(size=(k, dim)) * np.sqrt(np.r_[np.full(5, 20.0), np.ones(dim - 5)])


def _ising(rng, k, n):
    s = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0)
    return R.distances_from_overlaps(s @ s.T / n, symmetric=True)


#: name -> (D, distances(rng, K, D), symmetric)
FAMILIES = {
    "unit vectors D=50": (50, lambda rng, k, d: cosine_distances(rng.normal(size=(k, d))), False),
    "unit vectors D=1000": (1000, lambda rng, k, d: cosine_distances(rng.normal(size=(k, d))), False),
    "Student-t(2) cosine D=100": (100, lambda rng, k, d: cosine_distances(rng.standard_t(2, (k, d))), False),
    "Student-t(2) cosine D=1000": (1000, lambda rng, k, d: cosine_distances(rng.standard_t(2, (k, d))), False),
    "Cauchy cosine D=100": (100, lambda rng, k, d: cosine_distances(rng.standard_cauchy((k, d))), False),
    "Cauchy cosine D=1000": (1000, lambda rng, k, d: cosine_distances(rng.standard_cauchy((k, d))), False),
    "Cauchy Euclidean D=100": (100, lambda rng, k, d: euclidean_distances(rng.standard_cauchy((k, d))), False),
    "Cauchy Euclidean D=1000": (1000, lambda rng, k, d: euclidean_distances(rng.standard_cauchy((k, d))), False),
    "lognormal norms s=1 D=100": (100, lambda rng, k, d: euclidean_distances(_lognormal_cloud(rng, k, d, 1.0)), False),
    "lognormal norms s=1.5 D=100": (100, lambda rng, k, d: euclidean_distances(_lognormal_cloud(rng, k, d, 1.5)),
                                    False),
    "lognormal norms s=1.5 D=1000": (1000, lambda rng, k, d: euclidean_distances(_lognormal_cloud(rng, k, d, 1.5)),
                                     False),
    "great circle D=50": (50, lambda rng, k, d: cosine_distances(_great_circle(rng, k, d)), False),
    "unequal norms x10 D=100": (100, lambda rng, k, d: euclidean_distances(_unequal_cloud(rng, k, d, 10.0)), False),
    "power-law j^-1 D=300": (300, lambda rng, k, d: cosine_distances(_power_law(rng, k, d, 1.0)), False),
    "power-law j^-1.5 D=300": (300, lambda rng, k, d: cosine_distances(_power_law(rng, k, d, 1.5)), False),
    "spiked (5 x 20) D=300": (300, lambda rng, k, d: cosine_distances(_spiked(rng, k, d)), False),
    "uniform square (2-d)": (2, lambda rng, k, d: euclidean_distances(rng.uniform(0, 1, (k, d))), False),
    "random +-1 states |q| N=64": (64, lambda rng, k, d: _ising(rng, k, d), True),
}


def fpr(ks: list[int], trials_per_k: list[int], families: list[str] | None, start: int = 0) -> list[dict]:
    rows = []
    for fi, (name, (dim, make, symmetric)) in enumerate(FAMILIES.items()):
        if families and not any(f.lower() in name.lower() for f in families):
            continue
        for k, trials in zip(ks, trials_per_k):
            t0 = time.time()
            verdicts, zs = [], []
            for t in range(start, start + trials):
                d = make(np.random.default_rng([t, dim, k, fi]), k, dim)
                s = R.ultrametricity(d, seed=t, symmetric=symmetric).summary
                verdicts.append(s["verdict"])
                zs.append(s["z"])
            hits = sum(v in ("clusters", "nested") for v in verdicts)
            lo, hi = clopper_pearson(hits, trials)
            zs = np.array(zs, dtype=float)
            row = {"family": name, "K": k, "trials": trials, "first_trial": start, "false_positives": hits, "rate": hits / trials,
                   "ci_low": lo, "ci_high": hi, "z_mean": float(np.nanmean(zs)), "z_sd": float(np.nanstd(zs)),
                   "nested": sum(v == "nested" for v in verdicts), "cannot_tell": verdicts.count("cannot tell"),
                   "seconds_per_call": (time.time() - t0) / trials}
            rows.append(row)
            print(f"| {name} | {k} | {hits}/{trials} = {100 * hits / trials:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] | "
                  f"{row['z_mean']:+.2f} ± {row['z_sd']:.2f} | {row['nested']} | {row['cannot_tell']} |", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ trees
def nested_tree(rng: np.random.Generator, shape: tuple[int, ...], leaf: int, noise: float, dim: int = 200,
                ratio: float = 0.5) -> np.ndarray:
    """Chord distances of unit vectors in nested clusters: branching ``shape`` (one entry per level), ``leaf``
    points per finest cluster. Level l's centres are displaced from their parent's by N(0, ratio^(2l) I / D);
    the points from their finest centre by noise * ratio^(L-1) (noise relative to the finest level's spread);
    then normalised onto the unit sphere."""
    x = np.zeros((1, dim))
    spread = 1.0
    for b in shape:
        x = (x[:, None, :] + rng.normal(size=(x.shape[0], b, dim)) * spread / np.sqrt(dim)).reshape(-1, dim)
        spread *= ratio
    finest = spread / ratio
    x = (x[:, None, :] + rng.normal(size=(x.shape[0], leaf, dim)) * noise * finest / np.sqrt(dim)).reshape(-1, dim)
    return cosine_distances(x)


TREES = [((4,), 8), ((4,), 16), ((3, 3), 4), ((4, 4), 4), ((2, 2, 2), 8), ((3, 3, 3), 2)]


def power(trials: int, noises: list[float]) -> list[dict]:
    rows = []
    for ti, (shape, leaf) in enumerate(TREES):
        for noise in noises:
            t0 = time.time()
            found = []
            for t in range(trials):
                d = nested_tree(np.random.default_rng([t, ti, int(noise * 1000)]), shape, leaf, noise)
                s = R.ultrametricity(d, seed=t).summary
                found.append((s["verdict"], int(s["levels"]), bool(s["levels_complete"])))
            detected = sum(v in ("clusters", "nested") for v, _, _ in found)
            exact = sum(n == len(shape) for v, n, _ in found if v in ("clusters", "nested"))
            lo, hi = clopper_pearson(detected, trials)
            elo, ehi = clopper_pearson(exact, trials)
            counts = Counter(n for v, n, _ in found if v in ("clusters", "nested"))
            row = {"shape": "x".join(map(str, shape)), "leaf": leaf, "K": int(np.prod(shape)) * leaf,
                   "depth": len(shape), "noise": noise, "trials": trials, "detected": detected, "power": detected / trials,
                   "ci_low": lo, "ci_high": hi, "levels_exact": exact, "levels_exact_rate": exact / trials,
                   "levels_ci_low": elo, "levels_ci_high": ehi, "levels_found": dict(sorted(counts.items())),
                   "lower_bound": sum(not c for v, _, c in found if v in ("clusters", "nested")),
                   "seconds_per_call": (time.time() - t0) / trials}
            rows.append(row)
            print(f"| {row['shape']} x {leaf} (K = {row['K']}) | {len(shape)} | {noise:g} | {100 * row['power']:.0f} % "
                  f"[{100 * lo:.0f}, {100 * hi:.0f}] | {100 * row['levels_exact_rate']:.0f} % [{100 * elo:.0f}, "
                  f"{100 * ehi:.0f}] | {row['levels_found']} |", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ p-spin
def pspin_overlaps(seed: int, n: int = 100, runs: int = 16, steps: int = 2000, lr: float = 0.2) -> np.ndarray:
    """Overlaps of ``runs`` gradient-descent endpoints of the spherical 3-spin (as Study.stage_reference), runs
    that ended in the same minimum (q > 0.999) counted once."""
    import lossglass as lg

    ps = lg.models.spherical_pspin(n, 3, seed=seed)
    s = lg.descend(ps, ps.init(runs, seed), steps=steps, lr=lr * n, progress=False)
    q = ((s @ s.T) / n).double().numpy()
    keep = [i for i in range(runs) if not any(q[i, j] > 0.999 for j in range(i))]
    return q[np.ix_(keep, keep)]


def pspin(trials: int) -> list[dict]:
    from scipy.stats import kurtosis

    rows = []
    for seed in range(trials):
        q = pspin_overlaps(seed)
        d = R.distances_from_overlaps(q)
        s = R.ultrametricity(d, seed=seed).summary
        iu = np.triu_indices(len(q), 1)
        rows.append({"seed": seed, "distinct": len(q), "q_max": float(q[iu].max()),
                     "excess_kurtosis": float(kurtosis(q[iu])), "z": s["z"], "p_value": s["p_value"],
                     "verdict": R.verdict_label(s), "sentence": R.describe_ultrametricity(s, kind="threshold")})
        print(f"| {seed} | {len(q)} | {rows[-1]['q_max']:.2f} | {rows[-1]['excess_kurtosis']:.1f} | {s['z']:+.2f} | "
              f"{s['p_value']:.3f} | {rows[-1]['verdict']} |", flush=True)
    return rows


def cost(repeats: int = 3) -> list[dict]:
    rows = []
    for k in (16, 64, 256):
        d = cosine_distances(np.random.default_rng(k).normal(size=(k, 500)))
        tree = nested_tree(np.random.default_rng(k), (4, 4), k // 16, 0.5)
        euclid = euclidean_distances(_lognormal_cloud(np.random.default_rng(k), k, 100, 1.0))
        for name, dist in (("unit vectors", d), ("nested tree (unit)", tree), ("lognormal cloud (fitted)", euclid)):
            wall, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                s = R.ultrametricity(dist).summary
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            rows.append({"K": k, "set": name, "seconds": float(np.median(wall)), "cpu_seconds": float(np.median(cpu)),
                         "verdict": R.verdict_label(s)})
            print(f"| {k} | {name} | {rows[-1]['seconds']:.2f} s | {rows[-1]['cpu_seconds']:.2f} s | "
                  f"{rows[-1]['verdict']} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("fpr", "power", "pspin", "cost"))
    ap.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--trials", type=int, nargs="+", default=[200], help="one number, or one per --k")
    ap.add_argument("--families", nargs="*", default=None, help="substrings of family names (default: all)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--start", type=int, default=0, help="first trial index (fpr: to extend an earlier run)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.what == "fpr":
        print("| family | K | false positives [95 % CI] | z mean ± sd | nested | cannot tell |\n|---|---|---|---|---|---|")
        rows = fpr(a.k, a.trials * len(a.k) if len(a.trials) == 1 else a.trials, a.families, a.start)
    elif a.what == "power":
        print("| tree | depth | noise | power [95 % CI] | levels exact [95 % CI] | levels found |\n|---|---|---|---|---|---|")
        rows = power(a.trials[0], a.noise)
    elif a.what == "pspin":
        print("| seed | distinct minima | q max | excess kurtosis | z | p | verdict |\n|---|---|---|---|---|---|---|")
        rows = pspin(a.trials[0])
    else:
        print("| K | set | wall time per call | CPU time per call | verdict |\n|---|---|---|---|---|")
        rows = cost()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ultrametric_{a.what}{a.tag}.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
