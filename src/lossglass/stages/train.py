"""Stage ``train``: K replicas from K seeds, in tasks of ``train.chunk`` replicas per training group."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..train import train
from .base import Stage, Task, TaskContext, TaskOutput


@dataclass(frozen=True)
class TrainChunk(Task):
    """Train replicas ``first..last-1`` of training group ``group``; checkpointed, so an interrupted task resumes
    from its last epoch."""

    group: int
    first: int
    last: int
    stage = "train"
    checkpoints = True

    def key(self) -> str:
        return f"{self.group}-{self.first}-{self.last}"

    def outputs(self, name: str) -> list[str]:
        return [f"tensors/{name}.safetensors", f"tables/{name}.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..executor import maybe_fail_once

        cfg, c = ctx.cfg, ctx.cfg.train
        grp = c.groups[self.group].model_dump(exclude_none=True) if c.groups else {}
        problem = ctx.problem
        ckpt = ctx.checkpoint()
        maybe_fail_once(f"train-{self.group}-{self.first}")
        extra = {k: getattr(c, k) for k in ("stop_at_loss", "stop_at_accuracy") if getattr(c, k) is not None}
        epochs, batch_size = grp.get("epochs", c.epochs), grp.get("batch_size", c.batch_size)
        keep = keep_steps(c.keep_at, c.keep_points, epochs * max(1, len(problem.dataset.y_train) // batch_size))
        rep = train(problem, self.last - self.first, epochs=epochs, batch_size=batch_size,
                    lr=grp.get("lr", c.lr), optimizer=grp.get("optimizer", c.optimizer),
                    method=grp.get("method", c.method), momentum=c.momentum, weight_decay=c.weight_decay,
                    seed=cfg.seed, replica_ids=range(self.first, self.last), rho=c.rho, temperature=c.temperature,
                    lr_schedule=c.lr_schedule, checkpoint=ckpt, progress=ctx.progress, keep_at=keep, **extra)
        rep.table["group"] = self.group
        rep.table["device"] = str(problem.device)
        kept = {} if rep.snapshots is None else {"snapshots": rep.snapshots.contiguous(),
                                                 "snapshot_steps": torch.tensor(rep.snapshot_steps, dtype=torch.int64)}
        return TaskOutput().tensors(ctx.name, {"theta": rep.theta.cpu(), **kept}).table(ctx.name, rep.table)


def keep_steps(keep_at, points: int, total: int) -> list[int]:
    """The optimiser steps whose snapshots training keeps: ``keep_at`` as given, or for ``"log"`` ``points``
    log-spaced steps from 0 (the initialisation) to ``total`` (the last step), duplicates merged."""
    if keep_at != "log":
        return sorted({int(v) for v in keep_at})
    if total < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, np.log10(total), max(points - 1, 1))).astype(int))
    return sorted({0, *grid.tolist(), total})


class TrainStage(Stage):
    name = "train"
    position = 10
    section = None
    sections = ("seed", "device", "data", "model", "train")
    tables = ("replicas",)
    report = ("train", "Replicas")

    def tasks(self, ctx) -> list[Task]:
        """Each training group in chunks of ``train.chunk`` replica ids."""
        c = ctx.cfg.train
        tasks, offset = [], 0
        for gi, grp in enumerate(c.groups or [None]):
            k = (grp.model_dump(exclude_none=True) if grp is not None else {}).get("replicas", c.replicas)
            tasks += [TrainChunk(gi, a, min(a + c.chunk, offset + k)) for a in range(offset, offset + k, c.chunk)]
            offset += k
        return tasks

    def run(self, ctx) -> dict:
        tasks = self.tasks(ctx)
        if len(tasks) > 1:
            ctx.log(f"train: {len(tasks)} tasks on the {ctx.executor.name} executor")
        names = ctx.run_tasks(self, tasks)
        store = ctx.store
        thetas, tables, snaps = [], [], []
        for n in names:
            t = store.read_tensors(n)
            thetas.append(t["theta"])
            tables.append(store.read_table(n))
            if "snapshots" in t:
                snaps.append((t["snapshots"], t["snapshot_steps"]))
        if snaps and all(torch.equal(st, snaps[0][1]) for _, st in snaps):
            store.write_tensors("snapshots", {"theta": torch.cat([sn for sn, _ in snaps], 1), "steps": snaps[0][1]})
        elif snaps:
            ctx.log("train: the groups keep snapshots at different steps (their lengths differ): no timeline")
        theta = torch.cat(thetas)
        table = pd.concat(tables, ignore_index=True)
        table["source"] = "trained"
        store.write_tensors("replicas", {"theta": theta}, {"n_params": ctx.problem.n_params})
        store.write_table("replicas", table)
        ctx.discard_partial("train")
        ctx.log(f"train: {len(table)} replicas, median test accuracy {table['test_accuracy'].median():.4f}, "
                f"{int(table['diverged'].sum())} diverged")
        return {"replicas": len(table), "tasks": len(tasks), "executor": ctx.executor.name}

    def estimate(self, cfg, sizes, est) -> None:
        p, k, t = sizes.n_params, sizes.replicas, cfg.train
        if not p:
            return
        est.add("memory", f"{k:,} replicas x {p:,} parameters", k * p * 4 * 3 + min(k, t.chunk) * p * 4 * 8 + 2**28)
        est.add("disk", "replicas, task results and checkpoints", k * p * 4 * 2 + min(k, t.chunk) * p * 4 * 3)
        epochs = max([g.epochs or t.epochs for g in t.groups] or [t.epochs])
        what = "train (at most; a stop criterion ends it earlier)" if t.stop_at_loss or t.stop_at_accuracy else "train"
        steps = -(-k // t.chunk) * epochs * -(-sizes.n_train // t.batch_size)  # SGD steps of all tasks
        est.add("time", what, sizes.cost("train_step", steps) + sizes.cost("train", k * p * sizes.n_train * epochs)
                + sizes.cost("forward", k * p * (sizes.n_train + sizes.n_test)))
