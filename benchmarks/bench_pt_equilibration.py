"""Calibration of ``PTResult.equilibrated`` (issue 22, item 4): how often the flag fires on runs that are in
equilibrium (false alarms) and on runs that are not (detection), per check family, with Wilson 95% intervals.

Cases (SK, ``lossglass.models.sk``; every trial its own disorder sample and run seed):

- ``short60``: N = 64, the study's ladder (14 temperatures 0.3..1.6), 32 replicas, 60 sweeps (burn-in 30).
- ``low100``: the same, all replicas and temperatures started from one low state (the lowest configuration at
  T = 0.3 of a 1000-sweep, 4-replica PT of the same sample), 100 sweeps (burn-in 50).
- ``low1000``: the same low start, 16 replicas, 1000 sweeps (burn-in 500, several round-trip times): a control.
- ``eq3000``: PHYSICS.md's reference, N = 64, 16 temperatures 0.3..1.6 (geometric), 32 replicas, 3000 sweeps.
- ``study2000``: the study's SK control, N = 64, 14 temperatures, 32 replicas, 2000 sweeps, every 125th stored.
- ``fixture800``: the ``sk64`` test fixture, N = 64, 10 temperatures (geometric), 6 replicas, 800 sweeps.
- ``small``: N = 32, 10 temperatures (geometric), 16 replicas, 1000 sweeps.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_pt_equilibration.py run CASE FIRST LAST OUT.jsonl
    python benchmarks/bench_pt_equilibration.py summary OUT.jsonl [...]
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import torch

import lossglass as lg
from lossglass import sampling as S

STUDY = np.round(np.arange(0.3, 1.61, 0.1), 2)
CASES = {
    "short60": dict(n=64, temps=STUDY, r=32, sweeps=60, every=1),
    "low100": dict(n=64, temps=STUDY, r=32, sweeps=100, every=1, low_start=True),
    "low1000": dict(n=64, temps=STUDY, r=16, sweeps=1000, every=1, low_start=True),
    "eq3000": dict(n=64, temps=np.geomspace(0.3, 1.6, 16), r=32, sweeps=3000, every=1),
    "study2000": dict(n=64, temps=STUDY, r=32, sweeps=2000, every=125),
    "fixture800": dict(n=64, temps=np.geomspace(0.3, 1.6, 10), r=6, sweeps=800, every=1),
    "small": dict(n=32, temps=np.geomspace(0.3, 1.6, 10), r=16, sweeps=1000, every=1),
}
FAMILIES = ("energy_ok", "q_halves_ok", "q_symmetric", "ladder_ok")


def fails(eq, cols, one_sided: bool = False) -> bool:
    z = eq[list(cols)].to_numpy()
    return bool(((z if one_sided else np.abs(z)) > eq["q_z_limit"].to_numpy()[:, None]).any())


def trial(case: str, d: int) -> dict:
    c = CASES[case]
    p = lg.models.sk(c["n"], seed=1000 + d)
    start = None
    if c.get("low_start"):
        pre = S.parallel_tempering(p, c["temps"], n_replicas=4, sweeps=1000, seed=10_000 + d, progress=False)
        start = pre.final[0, int(np.argmin(pre.energy[-1, 0]))]
    t0 = time.time()
    res = S.parallel_tempering(p, c["temps"], n_replicas=c["r"], sweeps=c["sweeps"], seed=d, start=start,
                               sample_every=c["every"], progress=False)
    eq = res.equilibration
    i = res.index_of(0.4)
    worst = {k: float(np.nanmax(np.abs(eq[k])) if eq[k].notna().any() else np.nan)
             for k in ("drift_z", "absq_z", "q2_z", "small_q_z")}  # two-sided tests: largest |z|
    worst.update({k: float(np.nanmax(eq[k])) if eq[k].notna().any() else np.nan
                  for k in ("q_mean_z", "q3_z", "start_z")})  # one-sided tests: largest z
    worst.update(R_hat=float(eq["R_hat"].max()), absq_R_hat=float(eq["absq_R_hat"].max()),
                 q_R_hat=float(eq["q_R_hat"].max()))
    return dict(case=case, disorder=d, secs=round(time.time() - t0, 1), equilibrated=bool(res.equilibrated),
                **{f: bool(eq[f].all()) for f in FAMILIES}, **worst,
                halves_fail=fails(eq, ("absq_z", "q2_z", "small_q_z")), halves_rhat_fail=bool((eq["absq_R_hat"] >= 1.1).any()),
                sym_z_fail=fails(eq, ("q_mean_z", "q3_z"), True), start_z_fail=fails(eq, ("start_z",), True),
                sym_rhat_fail=bool((eq["q_R_hat"] >= 1.1).any()),
                drift_limit=float(eq["drift_limit"][0]), q_z_limit=float(eq["q_z_limit"][0]),
                round_trip_time=float(eq["round_trip_time"][0]),
                burn_in=int(res.params["burn_in"]), failed_T=[float(t) for t in eq["T"][~eq["equilibrated"]]],
                T04=float(res.temperatures[i]), absq_04=float((eq["absq_first"][i] + eq["absq_second"][i]) / 2),
                small_q_04=float((eq["small_q_first"][i] + eq["small_q_second"][i]) / 2),
                q_mean_04=float(eq["q_mean"][i]), q_mean_z_04=float(eq["q_mean_z"][i]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _med(sub: list[dict], k: str) -> str:
    v = np.array([r.get(k, np.nan) for r in sub], dtype=float)
    v = v[np.isfinite(v)]
    return f"{np.median(v):.2f} [{v.max():.2f}]" if len(v) else "-"


def summary(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in open(p) if line.strip()]
    cols = [("not equilibrated", lambda r: not r["equilibrated"]), ("energy", lambda r: not r["energy_ok"]),
            ("q halves z", lambda r: r["halves_fail"]), ("|q| R_hat", lambda r: r["halves_rhat_fail"]),
            ("q odd moments z", lambda r: r["sym_z_fail"]), ("start z", lambda r: r.get("start_z_fail", False)),
            ("q R_hat", lambda r: r["sym_rhat_fail"]),
            ("ladder", lambda r: not r["ladder_ok"])]
    out = ["| case | trials | " + " | ".join(c for c, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for case in CASES:
        sub = [r for r in rows if r["case"] == case]
        if not sub:
            continue
        cells = []
        for _, f in cols:
            k = sum(bool(f(r)) for r in sub)
            lo, hi = wilson(k, len(sub))
            cells.append(f"{k}/{len(sub)} = {k / len(sub):.0%} [{lo:.0%}, {hi:.0%}]")
        out.append(f"| {case} | {len(sub)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("| case | largest abs z: drift / absq / q2 / small_q; largest z: q_mean / q3 / start (median [max]) | "
               "limits energy / q | "
               "R_hat / absq_R_hat / q_R_hat (median [max]) | round-trip time (median) |")
    out.append("|---|---|---|---|---|")
    for case in CASES:
        sub = [r for r in rows if r["case"] == case]
        if not sub:
            continue

        z = " / ".join(_med(sub, k) for k in ("drift_z", "absq_z", "q2_z", "small_q_z", "q_mean_z", "q3_z", "start_z"))
        lim = f"{sub[0]['drift_limit']:.2f} / {sub[0]['q_z_limit']:.2f}"
        rh = " / ".join(_med(sub, k) for k in ("R_hat", "absq_R_hat", "q_R_hat"))
        rt = np.median([r["round_trip_time"] for r in sub])
        out.append(f"| {case} | {z} | {lim} | {rh} | {rt:.0f} (burn-in {sub[0]['burn_in']}) |")
    return "\n".join(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "run":
        case, first, last, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        for d in range(first, last):
            row = trial(case, d)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    else:
        print(summary(sys.argv[2:]))
