"""Stage ``timeline``: the landscape over training time, one task per snapshot kept by ``train.keep_at``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import LossglassError, check
from .base import Stage, Task, TaskContext, TaskOutput

TIMELINE_COLUMNS = ("step", "kind", "replica", "a", "b", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                    "weight_norm", "lambda_max", "basin_radius", "basin_radius_relative", "basin_radius_lower_bound",
                    "barrier_naive", "barrier_aligned", "barrier_test_naive", "barrier_test_aligned", "q_raw",
                    "q_aligned", "q_raw_mean", "q_aligned_mean", "n_data", "delta")


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
        """Train/test loss and accuracy, lambda_max, the basin radius of a short walk, naive and aligned barriers and
        overlaps of replica pairs, the mean aligned overlap: one table (rows per replica and per pair)."""
        from ..protocols import connect as C
        from ..protocols import curvature as K
        from ..protocols import replicas as R
        from ..protocols import walk as W
        from ..symmetry import align, spec_of

        cfg, c = ctx.cfg, ctx.cfg.timeline
        prob = ctx.problem
        snaps = ctx.input("snapshots")
        step = int(snaps["steps"][self.index])
        rep = ctx.input("replicas")
        alive = torch.nonzero(rep.alive).flatten()
        check(len(alive) > 0, "every replica diverged: nothing to measure")
        theta = snaps["theta"][self.index][alive].to(prob.device, prob.dtype)
        ids = rep.table["replica"].to_numpy()[alive.numpy()]
        check(bool(torch.isfinite(theta).all()), f"a snapshot at step {step} holds NaN or inf")
        if prob.batchnorm == "fixed":
            prob = prob.with_frozen_batchnorm(theta[0])
        sub = prob.subset(c.n_data)
        tr, te = prob.evaluate(theta, "train"), prob.evaluate(theta, "test")
        lam = K.top_eigenvalues(sub, theta, k=1, tol=c.tol, seed=cfg.seed).values[:, 0]
        walk = W.random_walk(sub, theta, n_walkers=c.walkers, steps=c.walk_steps, step_size=c.step_size,
                             normalize=c.normalize, record_every=c.walk_steps, seed=cfg.seed, progress=ctx.progress)
        br = W.basin_radius(walk, [c.delta])
        starts = walk.start_index.numpy()
        dist = br["radius"].fillna(br["censor_distance"]).to_numpy()
        radius = [W.km_quantile(dist[starts == j], ~br["censored"].to_numpy()[starts == j]) for j in range(len(theta))]
        norms = theta.norm(dim=1).cpu().double().numpy()
        rows = pd.DataFrame({"step": step, "kind": "replica", "replica": ids, "a": -1, "b": -1,
                             "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                             "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                             "weight_norm": norms, "lambda_max": lam.cpu().numpy(),
                             "basin_radius": [r for r, _ in radius],
                             "basin_radius_relative": [r / n for (r, _), n in zip(radius, norms)],
                             "basin_radius_lower_bound": [lb for _, lb in radius]})
        try:
            spec_of(prob)
            symmetric = True
        except LossglassError:
            symmetric = False
        m = min(c.pairs, len(theta) // 2)
        if m:
            a, b = theta[0:2 * m:2], theta[1:2 * m:2]
            b_al = torch.stack([align(prob, a[i], b[i])[0] for i in range(m)]) if symmetric else b
            naive, al = C.interpolate(prob, a, b, n_points=c.n_points), C.interpolate(prob, a, b_al, n_points=c.n_points)

            def cos(u, v):
                return ((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))).cpu().double().numpy()

            nan = np.full(m, np.nan)
            pairs = pd.DataFrame({"step": step, "kind": "pair", "replica": -1, "a": ids[0:2 * m:2], "b": ids[1:2 * m:2],
                                  "barrier_naive": [p.barrier for p in naive],
                                  "barrier_aligned": [p.barrier for p in al] if symmetric else nan,
                                  "barrier_test_naive": [p.barrier_test for p in naive],
                                  "barrier_test_aligned": [p.barrier_test for p in al] if symmetric else nan,
                                  "q_raw": cos(a, b), "q_aligned": cos(a, b_al) if symmetric else nan})
            rows = pd.concat([rows, pairs], ignore_index=True)
        if len(theta) >= 2:
            iu = np.triu_indices(len(theta), 1)
            rows["q_raw_mean"] = float(R.overlaps(prob, theta, align=False).numpy()[iu].mean())
            rows["q_aligned_mean"] = (float(R.overlaps(prob, theta, align=True).numpy()[iu].mean()) if symmetric
                                      else np.nan)
        rows["basin_radius_lower_bound"] = rows["basin_radius_lower_bound"].astype("boolean")
        rows["n_data"] = len(sub.dataset.y_train)
        rows["delta"] = c.delta
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
