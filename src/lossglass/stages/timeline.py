"""Stage ``timeline``: the landscape over training time, one task per snapshot kept by ``train.keep_at``."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from ..errors import check
from ..protocols.timeline import TIMELINE_COLUMNS, TimelineSettings, snapshot_rows
from .base import Stage, Task, TaskContext, TaskOutput


@dataclass(frozen=True)
class SnapshotTask(Task):
    """The light protocols at the ``index``-th kept snapshot."""

    index: int
    stage = "timeline"

    def key(self) -> str:
        return str(self.index)

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        """The snapshot's live replicas through :func:`lossglass.protocols.timeline.snapshot_rows`: one table (rows
        per replica and per pair)."""
        cfg = ctx.cfg
        snaps = ctx.input("snapshots")
        step = int(snaps["steps"][self.index])
        rep = ctx.input("replicas")
        alive = torch.nonzero(rep.alive).flatten()
        check(len(alive) > 0, "every replica diverged: nothing to measure")
        rows = snapshot_rows(ctx.problem, snaps["theta"][self.index][alive],
                             rep.table["replica"].to_numpy()[alive.numpy()], step,
                             TimelineSettings.from_config(cfg.timeline, cfg.seed))
        return TaskOutput().table(ctx.name, rows)


class TimelineStage(Stage):
    """At every snapshot kept by ``train.keep_at``, the light protocols of :class:`SnapshotTask`, gathered into the
    table ``timeline`` (one row per step and replica, and per step and pair; columns :data:`TIMELINE_COLUMNS`)."""

    name = "timeline"
    position = 20
    section = "timeline"
    sections = ("timeline",)
    depends = ("train",)
    tables = ("timeline",)
    report = ("timeline", "The landscape over training time")

    def wanted(self, cfg) -> bool:
        """Only when training keeps snapshots (``train.keep_at``)."""
        return self.enabled(cfg) and bool(cfg.train.keep_at)

    def wanted_raw(self, cfg: dict) -> bool:
        train = cfg.get("train")
        return super().wanted_raw(cfg) and isinstance(train, dict) and bool(train.get("keep_at"))

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store), "snapshots": ctx.store.read_tensors("snapshots")}

    def run(self, ctx) -> dict:
        if not ctx.store.has_tensors("snapshots"):
            return {"skipped": "no snapshots: set train.keep_at (a list of steps, or 'log') to keep the replicas during "
                               "training"}
        steps = ctx.store.read_tensors("snapshots")["steps"].tolist()
        names = ctx.run_tasks(self, [SnapshotTask(i) for i in range(len(steps))])
        df = pd.concat([ctx.store.read_table(n) for n in names], ignore_index=True)
        df = df[[c for c in TIMELINE_COLUMNS if c in df] + [c for c in df if c not in TIMELINE_COLUMNS]]
        ctx.store.write_table("timeline", df)
        ctx.discard_partial("timeline")
        return {"steps": steps}
