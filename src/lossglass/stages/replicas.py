"""Stage ``replicas`` (protocol 3): overlaps of the replicas (aligned, raw, functional), P(q), the dendrogram and the
calibrated ultrametricity test, and the P(q) of samples inside one basin."""

from __future__ import annotations

import pandas as pd

from ..errors import check
from ..protocols.replicas import ReplicaAnalysis, analyse_overlaps
from .base import Stage


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


class ReplicasStage(Stage):
    name = "replicas"
    position = 50
    section = "replicas"
    sections = ("replicas",)
    depends = ("train",)
    tables = ("replica_summary", "pq")
    command = "protocol 3: overlaps, P(q), tree, ultrametricity"
    report = ("replicas", "Protocol 3 — overlaps, the Parisi tree and ultrametricity")

    def run(self, ctx) -> dict:
        from ..protocols import replicas as R
        from .common import spec_missing

        c = ctx.cfg.replicas
        rep = ctx.alive()
        problem = ctx.problem
        check(len(rep) >= 4, f"the replicas stage needs at least 4 replicas, got {len(rep)}")
        summary, pq_rows = [], []
        why = spec_missing(problem)
        kinds = [("raw", False)] if why else [("aligned", True), ("raw", False)]
        for label, al in kinds:
            ctx.note(f"replicas: {label} overlaps of {len(rep)} replicas")
            q = R.overlaps(problem, rep, align=al, kind=c.kind).numpy()
            analyse(ctx, q, f"network-{label}", summary=summary, pq_rows=pq_rows)
        if c.kind != "functions":
            q = R.overlaps(problem, rep, kind="functions").numpy()
            analyse(ctx, q, "network-functions", summary=summary, pq_rows=pq_rows)
        if c.basin_temperature > 0:
            prob = problem.subset(c.basin_n_data)
            ctx.note(f"replicas: {c.basin_samples} within-basin chains at T = {c.basin_temperature:g}, "
                     f"{c.basin_sweeps} sweeps on {len(prob.dataset.y_train)} samples")
            q, info = R.within_basin(prob, rep.theta[0], temperature=c.basin_temperature, samples=c.basin_samples,
                                     sweeps=c.basin_sweeps, step_size=c.basin_step_size, seed=ctx.cfg.seed,
                                     progress=ctx.bars)
            analyse(ctx, q, "network-basin", summary=summary, pq_rows=pq_rows).update(info)
        if not why:
            ctx.store.write_table("replica_layers", R.layer_overlaps(problem, R.aligned_replicas(problem, rep.theta)))
        ctx.store.write_table("replica_summary", pd.DataFrame(summary))
        ctx.store.write_table("pq", pd.concat(pq_rows, ignore_index=True))
        return {"note": why} if why else {}

    def estimate(self, cfg, sizes, est) -> None:
        rc, p, k = cfg.replicas, sizes.n_params, sizes.replicas
        if p:  # alignment of every replica to the mean, the aligned and raw K x K Gram matrices
            est.add("time", "replica overlaps", sizes.cost("align", k * p) + sizes.cost("gemm", 2 * 2 * k * k * p))
        if p and rc.basin_temperature > 0:
            n_b = min(rc.basin_n_data or sizes.n_train, sizes.n_train)
            est.add("time", "within-basin sampling", sizes.cost("metropolis", rc.basin_samples * rc.basin_sweeps * p * n_b))
