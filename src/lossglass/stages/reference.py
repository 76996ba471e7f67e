"""Stage ``reference``: known landscapes through the same replica pipeline (:mod:`lossglass.protocols.reference`):
the SK spin glass sampled in equilibrium by parallel tempering (the positive control: full replica symmetry breaking
below T_c = 1), the spherical p-spin's gradient-descent minima (threshold states: nearly orthogonal, no Gibbs
sample), and a convex control (thermal samples of one quadratic well: one state)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import Stage
from .replicas import analyse


class ReferenceStage(Stage):
    name = "reference"
    position = 80
    section = "reference"
    sections = ("seed", "reference")
    command = "the SK and spherical p-spin glasses and a convex control"
    tables = ("reference_summary", "reference_pq", "reference_energies")

    def run(self, ctx) -> dict:
        from ..protocols import reference as ref

        c, seed = ctx.cfg.reference, ctx.cfg.seed
        summary, pq_rows = [], []
        info: dict = {}
        if c.sk_spins:
            info.update(self._sk_control(ctx, summary, pq_rows))
        ctx.note(f"reference: {c.replicas} descent minima of the spherical {c.p}-spin, N = {c.n_spins}")
        minima = ref.pspin_descent_minima(c.n_spins, c.p, replicas=c.replicas, steps=c.steps, lr=c.lr, seed=seed,
                                          progress=ctx.bars)
        e = minima.energy
        if len(minima.distinct) >= 4:
            row = analyse(ctx, minima.q_distinct, f"pspin{c.p}", system=f"{c.p}-spin descent minima (threshold states)",
                          symmetric=c.p % 2 == 0, kind="threshold", summary=summary, pq_rows=pq_rows)
            row.update(energy_mean=float(e.mean()), energy_min=float(e.min()), n_spins=c.n_spins,
                       descent_runs=len(minima.q), distinct_minima=len(minima.distinct))
        q, energy = ref.convex_control(c.n_spins, replicas=c.replicas, seed=seed)
        row = analyse(ctx, q, "convex-control", system="convex control (one well)", kind="control",
                      summary=summary, pq_rows=pq_rows)
        row["energy_mean"] = energy
        ctx.store.write_table("reference_summary", pd.DataFrame(summary))
        ctx.store.write_table("reference_pq", pd.concat(pq_rows, ignore_index=True))
        ctx.store.write_table("reference_energies", pd.DataFrame({"replica": np.arange(len(e)), "energy": e.numpy()}))
        return {"pspin_energy_mean": float(e.mean()), **info}

    def _sk_control(self, ctx, summary: list, pq_rows: list) -> dict:
        """SK over ``sk_samples`` disorder samples: per sample the exchange acceptances, equilibration, energy and the
        tree of the replicas at ``sk_temperature``; P(q) pooled over the samples at that temperature and at the top of
        the ladder; the per-sample verdicts combined (:func:`~lossglass.protocols.reference.sk_pooled`)."""
        from ..protocols import reference as ref
        from ..sampling import overlap_matrix, overlap_samples

        c = ctx.cfg.reference
        temps = c.sk_temperatures
        per, ladder = [], []
        pooled: dict[int, list] = {}
        t_low = t_high = None
        for j in range(c.sk_samples):
            ctx.note(f"reference: SK N = {c.sk_spins}, disorder sample {j + 1}/{c.sk_samples}, parallel tempering "
                     f"({c.sk_replicas} replicas x {len(temps)} temperatures x {c.sk_sweeps} sweeps)")
            res = ref.sk_sample(c.sk_spins, temps, replicas=c.sk_replicas, sweeps=c.sk_sweeps, seed=ctx.cfg.seed,
                                sample=j, progress=ctx.bars)
            tab = res.table()
            tab["disorder"] = j
            ladder.append(tab)
            lo, hi = res.index_of(c.sk_temperature), len(temps) - 1
            t_low, t_high = float(res.temperatures[lo]), float(res.temperatures[hi])
            for idx in (lo, hi):
                pooled.setdefault(idx, []).append(overlap_samples(res, idx).ravel())
            row = analyse(ctx, overlap_matrix(res, lo), f"sk-{j}", system=f"SK sample {j} (T = {t_low:g}, equilibrium)",
                          symmetric=True, tree=j == 0, kind="equilibrium", summary=summary)
            qs = pooled[lo][-1]
            row.update(temperature=t_low, energy_mean=float(tab["E_mean"][lo]), disorder=j,
                       abs_q_mean=float(np.abs(qs).mean()), frac_abs_q_below_0_3=float(np.mean(np.abs(qs) < 0.3)),
                       exchange_min=float(np.nanmin(res.exchange_acceptance)),
                       exchange_max=float(np.nanmax(res.exchange_acceptance)), equilibrated=bool(res.equilibrated))
            per.append(row)
        for idx, t in ((lo, t_low), (hi, t_high)):
            q = np.concatenate(pooled[idx])
            pq_rows.append(pd.DataFrame({"label": f"SK T = {t:g} ({len(per)} disorder samples)", "q": q}))
        ctx.store.write_table("reference_sk_ladder", pd.concat(ladder, ignore_index=True))
        row = ref.sk_pooled(per, np.concatenate(pooled[lo]), replicas=c.sk_replicas, temperature=t_low,
                            alpha=ctx.cfg.replicas.alpha)
        summary.append(row)
        return {"sk_verdict": row["verdict"], "sk_p_value": row["p_value"]}

    def estimate(self, cfg, sizes, est) -> None:
        r = cfg.reference
        n = r.n_spins
        est.add("memory", f"p-spin couplings (N = {n}, p = {r.p})", 40 * n**3 if r.p == 3 else 24 * n**2)
        est.add("time", "reference p-spin descent", r.steps * r.replicas * 4 * (n**3 if r.p == 3 else n**2) / sizes.rate)
        if r.sk_spins:  # ~80 ns per chain, site and sweep (vectorised single-spin flips), measured at N = 64
            est.add("time", "reference SK parallel tempering",
                    r.sk_samples * r.sk_sweeps * len(r.sk_temperatures) * r.sk_replicas * r.sk_spins * 8e-8)
