"""Stage ``reference``: known landscapes through the same replica pipeline (:mod:`lossglass.protocols.reference`):
the SK spin glass sampled in equilibrium by parallel tempering (the positive control: full replica symmetry breaking
below T_c = 1), the spherical p-spin's gradient-descent minima (threshold states: nearly orthogonal, no Gibbs
sample), and a convex control (thermal samples of one quadratic well: one state)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .base import Stage, Task, TaskContext, TaskOutput
from .replicas import analyse


@dataclass(frozen=True)
class SKSampleTask(Task):
    """Disorder sample ``sample`` of the SK control (:func:`lossglass.protocols.reference.sk_sample`, parallel
    tempering over ``reference.sk_temperatures``): what the driver's analysis needs of it, as bytes: the ladder table,
    the overlaps q_ab of every stored sample at the analysed temperature T_low and at the top of the ladder (pooled
    into P(q) by the driver), the R x R overlap matrix at T_low (the tree and the ultrametricity test) and the scalars
    of the per-sample row."""

    sample: int
    stage = "reference"

    def key(self) -> str:
        return f"sk{self.sample}"

    def outputs(self, name: str) -> list[str]:
        return [f"tensors/{name}.safetensors", f"tables/{name}.parquet", f"{name}.json"]

    def compute(self, cfg, progress: bool) -> dict:
        """The sample's pieces (arrays and scalars), computed here."""
        from ..protocols import reference as ref
        from ..sampling import overlap_matrix, overlap_samples

        c = cfg.reference
        res = ref.sk_sample(c.sk_spins, c.sk_temperatures, replicas=c.sk_replicas, sweeps=c.sk_sweeps, seed=cfg.seed,
                            sample=self.sample, progress=progress)
        lo, hi = res.index_of(c.sk_temperature), len(c.sk_temperatures) - 1
        return {"ladder": res.table(), "q_low": overlap_samples(res, lo).ravel(),
                "q_high": overlap_samples(res, hi).ravel(), "overlap_low": overlap_matrix(res, lo),
                "record": {"lo": lo, "hi": hi, "t_low": float(res.temperatures[lo]),
                           "t_high": float(res.temperatures[hi]),
                           "exchange_min": float(np.nanmin(res.exchange_acceptance)),
                           "exchange_max": float(np.nanmax(res.exchange_acceptance)),
                           "equilibrated": bool(res.equilibrated)}}

    def run(self, ctx: TaskContext) -> TaskOutput:
        r = self.compute(ctx.cfg, ctx.progress)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(r[k])) for k in ("q_low", "q_high", "overlap_low")}
        return TaskOutput().tensors(ctx.name, tensors).table(ctx.name, r["ladder"]).json(ctx.name, r["record"])

    @staticmethod
    def read(store, name: str) -> dict:
        """The pieces of a finished task, back from the run folder (bit-identical to :meth:`compute`'s)."""
        t = store.read_tensors(name)
        return {"ladder": store.read_table(name), **{k: v.numpy() for k, v in t.items()},
                "record": store.read_json(f"{name}.json", kind=dict)}


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

        c = ctx.cfg.reference
        temps = c.sk_temperatures
        per, ladder = [], []
        pooled: dict[int, list] = {}
        t_low = t_high = None
        tasks = [SKSampleTask(j) for j in range(c.sk_samples)]
        ctx.note(f"reference: SK N = {c.sk_spins}, {c.sk_samples} disorder samples, parallel tempering "
                 f"({c.sk_replicas} replicas x {len(temps)} temperatures x {c.sk_sweeps} sweeps)")
        if ctx.executor.name == "local":  # computed in place, one sample at a time (no task files: same folder)
            samples = (t.compute(ctx.cfg, ctx.bars) for t in tasks)
        else:  # one task per disorder sample, anywhere on the cluster
            samples = (SKSampleTask.read(ctx.store, n) for n in ctx.run_tasks(self, tasks))
        for j, r in enumerate(samples):
            tab, rec = r["ladder"], r["record"]
            tab["disorder"] = j
            ladder.append(tab)
            lo, hi = rec["lo"], rec["hi"]
            t_low, t_high = rec["t_low"], rec["t_high"]
            pooled.setdefault(lo, []).append(r["q_low"])
            pooled.setdefault(hi, []).append(r["q_high"])
            row = analyse(ctx, r["overlap_low"], f"sk-{j}", system=f"SK sample {j} (T = {t_low:g}, equilibrium)",
                          symmetric=True, tree=j == 0, kind="equilibrium", summary=summary)
            qs = pooled[lo][-1]
            row.update(temperature=t_low, energy_mean=float(tab["E_mean"][lo]), disorder=j,
                       abs_q_mean=float(np.abs(qs).mean()), frac_abs_q_below_0_3=float(np.mean(np.abs(qs) < 0.3)),
                       exchange_min=rec["exchange_min"], exchange_max=rec["exchange_max"],
                       equilibrated=rec["equilibrated"])
            per.append(row)
        for idx, t in ((lo, t_low), (hi, t_high)):
            q = np.concatenate(pooled[idx])
            pq_rows.append(pd.DataFrame({"label": f"SK T = {t:g} ({len(per)} disorder samples)", "q": q}))
        ctx.store.write_table("reference_sk_ladder", pd.concat(ladder, ignore_index=True))
        row = ref.sk_pooled(per, np.concatenate(pooled[lo]), replicas=c.sk_replicas, temperature=t_low,
                            alpha=ctx.cfg.replicas.alpha)
        summary.append(row)
        if ctx.executor.name != "local":
            ctx.discard_partial("reference")
        return {"sk_verdict": row["verdict"], "sk_p_value": row["p_value"]}

    def estimate(self, cfg, sizes, est) -> None:
        r = cfg.reference
        n = r.n_spins
        est.add("memory", f"p-spin couplings (N = {n}, p = {r.p})", 40 * n**3 if r.p == 3 else 24 * n**2)
        est.add("time", "reference p-spin descent",
                sizes.cost("gemm", r.steps * r.replicas * 4 * (n**3 if r.p == 3 else n**2)))
        if r.sk_spins:  # vectorised single-spin flips
            est.add("time", "reference SK parallel tempering",
                    sizes.cost("sk_sweep", r.sk_samples * r.sk_sweeps * len(r.sk_temperatures) * r.sk_replicas
                               * r.sk_spins))
