"""Stage ``replicas`` (protocol 3): overlaps of the replicas (aligned, raw, functional), P(q), the dendrogram and the
calibrated ultrametricity test, and the P(q) of samples inside one basin."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import check
from ..protocols.replicas import ReplicaAnalysis, analyse_overlaps
from .base import Stage, Task, TaskContext, TaskOutput

#: the tables that draw one system's tree (:func:`lossglass.protocols.replicas.analyse_overlaps`)
TREE_TABLES = ("overlaps", "linkage", "order", "triangles")


def write_analysis(store, a: ReplicaAnalysis) -> None:
    """The tables that draw one system's tree, saved as ``NAME_LABEL``."""
    for name, df in a.tables.items():
        store.write_table(f"{name}_{a.row['label']}", df)


def analyse(ctx, q, label: str, *, system: str | None = None, symmetric: bool = False, tree: bool = True,
            kind: str = "states", summary: list | None = None, pq_rows: list | None = None) -> dict:
    """One system through :func:`analyse_overlaps` with the study's settings; its tables written, its summary row
    appended to ``summary`` and its overlaps to ``pq_rows``; ``kind`` says what the states are, for the sentence
    (:data:`lossglass.protocols.replicas.STATE_KINDS`). Returns the row."""
    c = ctx.cfg.replicas
    a = analyse_overlaps(q, label=label, system=system, method=c.method, max_triangles=c.max_triangles,
                         seed=ctx.cfg.seed, alpha=c.alpha, symmetric=symmetric, tree=tree, kind=kind)
    write_analysis(ctx.store, a)
    if pq_rows is not None:
        pq_rows.append(pd.DataFrame({"label": system or label, "q": a.pq}))
    if summary is not None:
        summary.append(a.row)
    return a.row


@dataclass(frozen=True)
class ReplicaSystem(Task):
    """One system of the replicas stage, as a task: its overlaps (``aligned``, ``raw`` weights or the configured kind,
    ``functions``; ``basin``: the within-basin chains around the first replica) and their analysis
    (:func:`lossglass.protocols.replicas.analyse_overlaps`: P(q), the tree, the calibrated ultrametricity test), or
    ``layers``: the per-tensor overlaps of the aligned replicas. Its files: the summary row (a JSON list of key, value
    pairs, in the row's order), P(q)'s sample and the tree's tables; the driver copies them into the stage's tables.
    The analysis (its null draws grow as K^3) runs wherever the executor puts the task, not in the driver."""

    label: str
    stage = "replicas"

    def key(self) -> str:
        return self.label

    def outputs(self, name: str) -> list[str]:
        if self.label == "layers":
            return [f"tables/{name}.parquet"]
        return [f"{name}.json", f"tensors/{name}.safetensors", *(f"tables/{name}-{t}.parquet" for t in TREE_TABLES)]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import replicas as R
        from .common import alive_replicas

        c = ctx.cfg.replicas
        rep, problem = alive_replicas(ctx.input("replicas"), ctx.problem)
        if self.label == "layers":
            return TaskOutput().table(ctx.name, R.layer_overlaps(problem, R.aligned_replicas(problem, rep.theta)))
        info = {}
        if self.label == "basin":
            prob = problem.subset(c.basin_n_data)
            q, info = R.within_basin(prob, rep.theta[0], temperature=c.basin_temperature, samples=c.basin_samples,
                                     sweeps=c.basin_sweeps, step_size=c.basin_step_size, seed=ctx.cfg.seed,
                                     progress=ctx.progress)
        elif self.label == "functions":
            q = R.overlaps(problem, rep, kind="functions").numpy()
        else:
            q = R.overlaps(problem, rep, align=self.label == "aligned", kind=c.kind).numpy()
        a = analyse_overlaps(q, label=f"network-{self.label}", method=c.method, max_triangles=c.max_triangles,
                             seed=ctx.cfg.seed, alpha=c.alpha)
        a.row.update(info)
        out = TaskOutput().json(ctx.name, {"row": [[k, v] for k, v in a.row.items()]})
        out.tensors(ctx.name, {"pq": torch.from_numpy(a.pq)})
        for t in TREE_TABLES:
            out.table(f"{ctx.name}-{t}", a.tables[t])
        return out

    @staticmethod
    def read(store, name: str) -> ReplicaAnalysis:
        """The analysis of a finished task, back from the run folder (the row in its order, P(q)'s sample, the tree's
        tables)."""
        row = dict(store.read_json(f"{name}.json", kind=dict)["row"])
        return ReplicaAnalysis(row, store.read_tensors(name)["pq"].numpy(),
                               {t: store.read_table(f"{name}-{t}") for t in TREE_TABLES})


class ReplicasStage(Stage):
    name = "replicas"
    position = 50
    section = "replicas"
    sections = ("replicas",)
    depends = ("train",)
    tables = ("replica_summary", "pq")
    command = "protocol 3: overlaps, P(q), tree, ultrametricity"
    report = ("replicas", "Protocol 3 — overlaps, the Parisi tree and ultrametricity")

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def run(self, ctx) -> dict:
        from .common import spec_missing

        c = ctx.cfg.replicas
        n = len(ctx.alive())  # not kept while the tasks run: the driver holds one copy of the replicas (theirs)
        problem = ctx.problem
        check(n >= 4, f"the replicas stage needs at least 4 replicas, got {n}")
        why = spec_missing(problem)
        labels = ["raw"] if why else ["aligned", "raw"]
        labels += ["functions"] if c.kind != "functions" else []
        labels += ["basin"] if c.basin_temperature > 0 else []
        tasks = [ReplicaSystem(label) for label in labels + ([] if why else ["layers"])]
        ctx.note(f"replicas: {', '.join(labels)} overlaps of {n} replicas, each with its tree and "
                 f"ultrametricity test{'' if why else ', and the layer overlaps'}: {len(tasks)} tasks")
        names = ctx.run_tasks(self, tasks)
        summary, pq_rows = [], []
        for task, name in zip(tasks, names):
            if task.label == "layers":
                ctx.store.write_table("replica_layers", ctx.store.read_table(name))
                continue
            a = ReplicaSystem.read(ctx.store, name)
            write_analysis(ctx.store, a)
            pq_rows.append(pd.DataFrame({"label": a.row["label"], "q": a.pq}))
            summary.append(a.row)
        ctx.store.write_table("replica_summary", pd.DataFrame(summary))
        ctx.store.write_table("pq", pd.concat(pq_rows, ignore_index=True))
        ctx.discard_partial("replicas")  # the tasks' copies (K^2 overlap tables) are in the stage's tables now
        out = {"tasks": len(tasks), "executor": ctx.executor.name}
        return {"note": why, **out} if why else out

    def estimate(self, cfg, sizes, est) -> None:
        rc, p, k = cfg.replicas, sizes.n_params, sizes.replicas
        if p:  # alignment of every replica to the mean, the aligned and raw K x K Gram matrices
            est.add("time", "replica overlaps", sizes.cost("align", k * p) + sizes.cost("gemm", 2 * 2 * k * k * p))
        if p and rc.basin_temperature > 0:
            n_b = min(rc.basin_n_data or sizes.n_train, sizes.n_train)
            est.add("time", "within-basin sampling", sizes.cost("metropolis", rc.basin_samples * rc.basin_sweeps * p * n_b))
