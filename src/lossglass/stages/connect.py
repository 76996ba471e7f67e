"""Stage ``connect`` (protocol 2): permutation-interpolation, barriers between replica pairs before and after
alignment, a Bezier curve, loss planes, and the width experiment; each piece an independent task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import torch

from ..problem import Problem
from .base import Stage, Task, TaskContext, TaskOutput


@dataclass(frozen=True)
class ConnectTask(Task):
    """A piece of the connect stage; ``part`` names its kind (and the table it feeds)."""

    stage = "connect"
    part: ClassVar[str] = ""

    def key(self) -> str:
        return f"{self.part}-0"

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}.parquet"]

    def alive(self, ctx: TaskContext) -> tuple[torch.Tensor, Problem]:
        """The live replicas' parameters and the problem to measure them with."""
        from .common import alive_replicas

        rep, problem = alive_replicas(ctx.input("replicas"), ctx.problem)
        return rep.theta, problem


@dataclass(frozen=True)
class PermTask(ConnectTask):
    """Permutation-interpolation: barriers between replica 0 and copies with k hidden units swapped."""

    part = "perm"

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C

        c = ctx.cfg.connect
        theta, prob = self.alive(ctx)
        df = C.permutation_barriers(prob, theta[0], swaps=[k for k in c.swaps if k != 1],
                                    n_points=c.n_points, seed=ctx.cfg.seed)
        return TaskOutput().table(ctx.name, df)


@dataclass(frozen=True)
class PairTask(ConnectTask):
    """Replicas (2 pair, 2 pair + 1): naive and aligned barriers and both paths."""

    pair: int
    part = "pair"

    def key(self) -> str:
        return f"pair-{self.pair}"

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}-paths.parquet", f"tables/{name}.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C

        c, i = ctx.cfg.connect, self.pair
        theta, prob = self.alive(ctx)
        pair, naive, aligned = C.pair_barriers(prob, theta[2 * i:2 * i + 2], pairs=1,
                                               n_points=c.n_points, method=c.align, seed=ctx.cfg.seed)
        pair[["a", "b"]] = [2 * i, 2 * i + 1]
        paths = []
        for kind, pr in (("naive", naive[0]), ("aligned", aligned[0])):
            t = pr.table()
            t["pair"], t["kind"] = i, kind
            paths.append(t)
        return TaskOutput().table(ctx.name + "-paths", pd.concat(paths, ignore_index=True)).table(ctx.name, pair)


@dataclass(frozen=True)
class BezierTask(ConnectTask):
    """A quadratic Bezier curve between replicas 0 and 1, its middle point trained."""

    part = "bezier"

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C

        c = ctx.cfg.connect
        theta, prob = self.alive(ctx)
        df = C.bezier_path(prob, theta[0], theta[1], steps=c.bezier_steps, n_points=c.n_points,
                           seed=ctx.cfg.seed, progress=ctx.progress).table()
        df["pair"], df["kind"] = 0, "bezier"
        return TaskOutput().table(ctx.name, df)


@dataclass(frozen=True)
class PlaneThroughTask(ConnectTask):
    """The loss plane through replica 0, replica 1 and replica 1 aligned to 0."""

    part = "plane_through"

    def outputs(self, name: str) -> list[str]:
        return [f"{name}.json", f"tables/{name}.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C
        from ..symmetry import align

        c = ctx.cfg.connect
        theta, prob = self.alive(ctx)
        b_al, _ = align(prob, theta[0], theta[1], method=c.align)
        pt = C.plane_through(prob, theta[0], theta[1], b_al, steps=c.plane_steps)
        return TaskOutput().json(ctx.name, pt.points).table(ctx.name, pt.table())


@dataclass(frozen=True)
class PlaneRandomTask(ConnectTask):
    """The loss plane around replica 0 along two random filter-normalised directions."""

    part = "plane_random"

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C

        c = ctx.cfg.connect
        theta, prob = self.alive(ctx)
        df = C.plane(prob, theta[0], span=c.plane_span, steps=c.plane_steps, seed=ctx.cfg.seed).table()
        return TaskOutput().table(ctx.name, df)


@dataclass(frozen=True)
class WidthTask(ConnectTask):
    """The width experiment at one width: replicas of a single-hidden-layer network of that width, trained as the
    study's, and the barriers between their pairs."""

    width: int
    part = "width"

    def key(self) -> str:
        return f"width-{self.width}"

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..protocols import connect as C
        from ..train import train
        from .common import build_problem

        cfg, c, t = ctx.cfg, ctx.cfg.connect, ctx.cfg.train
        _, prob = self.alive(ctx)  # the study's replicas are checked as in every piece
        wprob = build_problem(cfg, prob.dataset, hidden=self.width)
        wr = train(wprob, c.width_replicas, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                   momentum=t.momentum, seed=cfg.seed + 1000 + self.width, progress=ctx.progress)
        ok = wr[torch.nonzero(wr.alive).flatten()]
        rows = []
        if len(ok) >= 2:
            pairs, _, _ = C.pair_barriers(wprob, ok.theta, pairs=len(ok) // 2, n_points=c.n_points, method=c.align)
            rows = [{"width": self.width, "n_params": wprob.n_params, **r.to_dict(),
                     "test_accuracy": float(ok.table["test_accuracy"].mean())} for _, r in pairs.iterrows()]
        return TaskOutput().table(ctx.name, pd.DataFrame(rows, columns=None if rows else ["width"]))


def width_fit_table(widths: pd.DataFrame) -> pd.DataFrame | None:
    """One row: the aligned barrier's mean per width fitted as barrier ~ c m^(-beta) on log-log axes
    (:func:`lossglass.protocols.connect.width_barrier_fit`; Zhan, Li & Wu 2025 predict beta = 1/2 for two-layer ReLU
    networks), with the widths it used. None when the table has no aligned barriers."""
    from ..protocols.connect import width_barrier_fit

    if not len(widths) or "barrier_aligned" not in widths:
        return None
    g = widths.groupby("width")["barrier_aligned"].mean()
    fit = width_barrier_fit(g.index, g.to_numpy())
    used = int(((g > 0) & g.notna()).sum())
    return pd.DataFrame({"beta": [fit["beta"]], "c": [fit["c"]], "n_widths": [used],
                         "width_min": [int(g.index.min())], "width_max": [int(g.index.max())]})


#: the table each kind of piece feeds
TABLES = {"perm": "perm_barriers", "pair": "pair_barriers", "plane_random": "plane_random",
          "plane_through": "plane_through", "width": "width_barriers"}


class ConnectStage(Stage):
    name = "connect"
    position = 40
    section = "connect"
    sections = ("connect", "train")
    depends = ("train",)
    tables = ("perm_barriers", "pair_barriers", "paths", "plane_random", "plane_through")
    command = "protocol 2: permutations, barriers, paths, planes"
    report = ("connect", "Protocol 2 — permutations, barriers and connectivity")

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def tasks(self, ctx) -> list[Task]:
        """Permutation-interpolation, each pair, the Bezier curve, each plane, each width of the width experiment."""
        c, k = ctx.cfg.connect, len(ctx.alive())
        tasks: list[Task] = [PermTask()]
        if k >= 2:
            tasks += [PairTask(i) for i in range(min(c.pairs, k // 2))]
            tasks += [BezierTask()] if c.bezier_steps > 0 else []
            tasks += [PlaneThroughTask()] if c.plane_steps >= 2 else []
        tasks += [PlaneRandomTask()] if c.plane_steps >= 2 else []
        tasks += [WidthTask(w) for w in c.widths]
        return tasks

    def run(self, ctx) -> dict:
        from .common import spec_missing

        why = spec_missing(ctx.problem)
        if why:
            return {"skipped": why}
        tasks = self.tasks(ctx)
        names = ctx.run_tasks(self, tasks, bar="piece")
        store = ctx.store
        got: dict[str, list[pd.DataFrame]] = {}
        for task, name in zip(tasks, names):
            for suffix in ("", "-paths"):
                if store.has_table(name + suffix):
                    got.setdefault(task.part + suffix, []).append(store.read_table(name + suffix))
        for part, table in TABLES.items():
            if part in got:
                store.write_table(table, pd.concat(got[part], ignore_index=True))
        paths = got.get("pair-paths", []) + got.get("bezier", [])
        if paths:
            store.write_table("paths", pd.concat(paths, ignore_index=True))
        pts = [n for task, n in zip(tasks, names) if task.part == "plane_through"]
        if pts:
            p = store.read_json(f"{pts[0]}.json")
            store.write_table("plane_through_points", pd.DataFrame(
                {"label": list(p), "x": [v[0] for v in p.values()], "y": [v[1] for v in p.values()]}))
        ctx.discard_partial("connect")
        if "width" in got:
            for w, g in pd.concat(got["width"]).groupby("width"):
                ctx.log(f"width {w}: aligned barrier {g['barrier_aligned'].mean():.4f}, naive "
                        f"{g['barrier_naive'].mean():.4f}")
            fit = width_fit_table(pd.concat(got["width"], ignore_index=True))
            if fit is not None:
                store.write_table("width_barrier_fit", fit)
        return {"tasks": len(tasks), "executor": ctx.executor.name}

    def estimate(self, cfg, sizes, est) -> None:
        c, p = cfg.connect, sizes.n_params
        if not p:
            return
        n_all = sizes.n_train + sizes.n_test
        planes = 2 * c.plane_steps**2 if c.plane_steps >= 2 else 0
        paths = (len(c.swaps) + 2 * c.pairs + (1 if c.bezier_steps else 0)) * c.n_points
        est.add("time", f"connect ({planes:,} plane points, {paths:,} path points, {c.pairs} alignments)",
                sizes.cost("plane_point", planes * p * n_all) + sizes.cost("path_point", paths * p * n_all)
                + sizes.cost("align", (c.pairs + 1) * p) + sizes.cost("bezier_step", c.bezier_steps * p))
        for wd in c.widths:
            pw = sizes.features * wd + wd + wd * sizes.classes + sizes.classes
            k = c.width_replicas
            steps = cfg.train.epochs * -(-sizes.n_train // cfg.train.batch_size)
            est.add("time", f"connect width {wd}", sizes.cost("train_step", steps)
                    + sizes.cost("train", k * pw * sizes.n_train * cfg.train.epochs)
                    + sizes.cost("path_point", k // 2 * c.n_points * pw * n_all) + sizes.cost("align", k // 2 * pw))
            est.add("memory", f"width {wd} replicas", c.width_replicas * pw * 4 * 8)
