"""Stage ``curvature`` (protocol 4): flatness measures of every replica, their rank correlations with the
generalisation gap, the cheap proxies checked against them, and the Hessian spectral densities."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .base import Stage, Task, TaskContext, TaskOutput

#: live replicas per curvature task: groups are measured as tasks on every executor (the local one runs them in turn),
#: each replica seeded by its position among the live replicas (``replica_ids``), so a run of at most GROUP replicas is
#: the one batch it always was, and the local and Ray runs give the same bytes
GROUP = 64


@dataclass(frozen=True)
class CurvatureGroup(Task):
    """The flatness measures (:func:`lossglass.protocols.curvature.flatness_table`) of the live replicas
    ``start``..``stop - 1`` (positions among the live replicas, which seed their random numbers), on the first
    ``curvature.n_hvp_data`` training samples: one table."""

    start: int
    stop: int
    stage = "curvature"

    def key(self) -> str:
        return f"g{self.start}-{self.stop}"

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import curvature as K
        from .common import alive_replicas

        c, seed = ctx.cfg.curvature, ctx.cfg.seed
        rep, problem = alive_replicas(ctx.input("replicas"), ctx.problem)
        ids = list(range(self.start, self.stop))
        df = K.flatness_table(problem.subset(c.n_hvp_data), rep[torch.tensor(ids)], rho=c.rho, top_k=c.top_k,
                              tol=c.tol, trace_probes=c.trace_probes, n_samples=c.n_samples,
                              entropy_radius=c.entropy_radius, entropy_chains=c.entropy_chains,
                              entropy_epsilon=c.entropy_epsilon, seed=seed, replica_ids=ids)
        return TaskOutput().table(ctx.name, df)


def groups(n: int, size: int = GROUP) -> list[CurvatureGroup]:
    """The tasks of ``n`` live replicas: consecutive groups of ``size`` (the last one smaller)."""
    return [CurvatureGroup(i, min(i + size, n)) for i in range(0, n, size)]


class CurvatureStage(Stage):
    name = "curvature"
    position = 60
    section = "curvature"
    sections = ("curvature",)
    depends = ("train",)
    tables = ("flatness", "kendall", "spectral_density")
    command = "protocol 4: Hessian, flatness, Kendall tau"
    report = ("curvature", "Protocol 4 — curvature, flatness and generalisation")

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def run(self, ctx) -> dict:
        from tqdm.auto import tqdm

        from ..protocols import curvature as K

        c, seed = ctx.cfg.curvature, ctx.cfg.seed
        n = len(ctx.alive())  # not kept while the tasks run: the driver holds one copy of the replicas (theirs)
        prob = ctx.problem.subset(c.n_hvp_data)
        tasks = groups(n)
        ctx.note(f"curvature: flatness measures of {n} replicas on {len(prob.dataset.y_train)} samples, "
                 f"{len(tasks)} task{'s' if len(tasks) > 1 else ''} of up to {GROUP}")
        names = ctx.run_tasks(self, tasks)
        steps = tqdm(total=3 if c.density else 2, desc="curvature", disable=not ctx.bars, leave=False)
        df = pd.concat([ctx.store.read_table(n) for n in names], ignore_index=True)
        steps.update(1)
        ctx.store.write_table("flatness", df)
        indep, left_out = K.independent_rows(df)
        taus = pd.concat([K.rank_correlations(indep, target=t, seed=seed) for t in ("gap_error", "gap_loss",
                                                                                   "test_error")])
        taus["excluded_coupled"] = left_out
        ctx.store.write_table("kendall", taus)
        # the cheap proxies against the full measures they stand for, on the same replicas
        pv = [K.rank_correlations(df, measures=[m], target=t, seed=seed)
              for m, t in (("proxy_lambda_batch", "lambda_max"), ("proxy_perturbation", "sharpness_average"))]
        ctx.store.write_table("proxy_validation", pd.concat(pv, ignore_index=True))
        steps.update(1)
        if c.density:
            ctx.note("curvature: spectral densities")
            rep = ctx.alive()
            rows = []
            for label, idx in (("flattest", int(df["lambda_max"].idxmin())), ("sharpest", int(df["lambda_max"].idxmax()))):
                sd = K.spectral_density(prob, rep.theta[idx], steps=c.slq_steps, seed=seed)
                rows.append(pd.DataFrame({"label": label, "replica": idx, "eigenvalue": sd.grid, "density": sd.density}))
            ctx.store.write_table("spectral_density", pd.concat(rows, ignore_index=True))
            steps.update(1)
        steps.close()
        ctx.discard_partial("curvature")  # the groups' tables are in "flatness" now
        return {"n_data": len(prob.dataset.y_train), "tasks": len(tasks), "executor": ctx.executor.name}

    def estimate(self, cfg, sizes, est) -> None:
        cv, p = cfg.curvature, sizes.n_params
        if not p:
            return
        n_h = min(cv.n_hvp_data or sizes.n_train, sizes.n_train)
        from ..resources import curvature_passes

        passes = sizes.replicas * curvature_passes(cv) + (2 * cv.slq_steps if cv.density else 0)
        est.add("time", "curvature", sizes.cost("curvature", passes * p * n_h))
