"""Stage ``walk`` (protocol 1): random walks, Metropolis at each temperature and Langevin from the trained replicas,
one task per walk."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .base import Stage, Task, TaskContext, TaskOutput

#: steps between two checkpoints of a walk task's walkers
WALK_CHECKPOINT_EVERY = 50


@dataclass(frozen=True)
class WalkTask(Task):
    """The ``index``-th walk of the study: one per entry of ``walk.temperatures``, then Langevin. The walkers' whole
    state is checkpointed every :data:`WALK_CHECKPOINT_EVERY` steps: an interrupted stage resumes mid-walk,
    bit-identical to an uninterrupted one (the file is discarded once the stage is gathered)."""

    index: int
    stage = "walk"
    checkpoints = True

    def key(self) -> str:
        return str(self.index)

    def outputs(self, name: str) -> list[str]:
        return [f"tensors/{name}.safetensors", f"{name}.json"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import walk as W
        from .common import alive_replicas

        cfg, c = ctx.cfg, ctx.cfg.walk
        rep, full = alive_replicas(ctx.input("replicas"), ctx.problem)
        starts = rep.theta[: c.starts]
        problem = full.subset(c.n_data)
        kw = dict(n_walkers=c.n_walkers, record_every=c.record_every, seed=cfg.seed, progress=ctx.progress,
                  checkpoint=ctx.checkpoint(), checkpoint_every=WALK_CHECKPOINT_EVERY)
        if self.index < len(c.temperatures):
            t = c.temperatures[self.index]
            r = W.random_walk(problem, starts, steps=c.steps, step_size=c.step_size,
                              temperature=None if t == "none" else float(t), normalize=c.normalize, **kw)
        else:
            r = W.langevin(problem, starts, temperature=c.langevin_temperature, lr=c.langevin_lr,
                           steps=c.langevin_steps, **kw)
        tensors, record = r.split()
        return TaskOutput().tensors(ctx.name, tensors).json(ctx.name, record)


class WalkStage(Stage):
    name = "walk"
    position = 30
    section = "walk"
    sections = ("walk",)
    depends = ("train",)
    tables = ("walk_summary", "walk_msd", "walk_aging", "walk_energy_distance", "walk")
    command = "protocol 1: random walks / Metropolis / Langevin"
    report = ("walk", "Protocol 1 — random walks and Monte Carlo")

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def run(self, ctx) -> dict:
        from ..protocols import walk as W

        c = ctx.cfg.walk
        ctx.alive()
        n_runs = len(c.temperatures) + (1 if c.langevin_steps > 0 else 0)
        names = ctx.run_tasks(self, [WalkTask(i) for i in range(n_runs)])
        results = [W.WalkResult.join(ctx.store.read_tensors(n), ctx.store.read_json(f"{n}.json")) for n in names]
        traces, summaries, msds, agings, evd, radii = [], [], [], [], [], []
        n_data = min(c.n_data or len(ctx.problem.dataset.y_train), len(ctx.problem.dataset.y_train))
        for i, r in enumerate(results):
            t_ = r.params.get("temperature")
            label = (f"{r.kind} T={t_:g}" if isinstance(t_, (int, float)) else "walk (every step taken)"
                     if r.kind == "walk" else r.kind)
            tab = r.table()
            tab["run"] = i
            tab["label"] = label
            traces.append(tab)
            s = W.summarize(r, c.deltas)
            s.update(run=i, label=label, n_data=n_data)
            summaries.append(s)
            t_, m_, _ = W.msd(r)
            msds.append(pd.DataFrame({"run": i, "label": label, "t": t_, "msd": m_}))
            ag = W.aging(r)
            ag["run"], ag["label"] = i, label
            agings.append(ag)
            ed = W.energy_vs_distance(r)
            ed["run"], ed["label"] = i, label
            evd.append(ed)
            br = W.basin_radius(r, c.deltas)
            br["run"], br["label"] = i, label
            radii.append(br)
        for name, parts in (("walk", traces), ("walk_msd", msds), ("walk_aging", agings),
                            ("walk_energy_distance", evd), ("walk_radius", radii)):
            ctx.store.write_table(name, pd.concat(parts, ignore_index=True))
        ctx.store.write_table("walk_summary", pd.DataFrame(summaries))
        ctx.discard_partial("walk")
        return {"runs": len(results), "n_data": n_data}

    def estimate(self, cfg, sizes, est) -> None:
        w, p = cfg.walk, sizes.n_params
        if not p:
            return
        walkers = w.n_walkers * w.starts
        runs = len(w.temperatures) + (1 if w.langevin_steps else 0)
        n_w = min(w.n_data or sizes.n_train, sizes.n_train)
        est.add("memory", "walk snapshots", 24 * walkers * p * 4 * 2)
        est.add("disk", "walk snapshots", runs * 24 * walkers * p * 4)
        steps = len(w.temperatures) * w.steps + w.langevin_steps
        est.add("time", "walk", sizes.cost("metropolis", len(w.temperatures) * w.steps * walkers * p * n_w)
                + sizes.cost("langevin", w.langevin_steps * walkers * p * n_w)
                + sizes.cost("forward", steps / max(w.record_every, 1) * walkers * p * (n_w + sizes.n_test)))
