"""Stage ``measures`` (issue 26): which measure predicts generalisation. Networks trained on a designed grid of
hyperparameters (``[measures]``: width, batch size, learning rate, weight decay, SAM radius; several seeds per cell;
each stopped at the same training loss), every measure of :mod:`lossglass.protocols.measures` and of the curvature
protocol for each, and their ranking by Kendall's tau with the generalisation gap, granulated per axis (Jiang et al.
2020). One task per cell of (width, batch size, weight decay, SAM radius), all learning rates and seeds of the cell
trained together; one task measures the study's own replicas (table ``measures``, which select.measure can name)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .base import Stage, Task, TaskContext, TaskOutput

#: the hyperparameter axes of the grid, as columns of ``measures_grid``
AXES = ("width", "batch_size", "lr", "weight_decay", "sam_rho")


def _measure(ctx: TaskContext, problem, theta: torch.Tensor, with_curvature: bool) -> tuple[pd.DataFrame,
                                                                                           pd.DataFrame]:
    """Every measure of ``theta`` (K, P) on ``problem``: this module's and, with ``with_curvature``, the curvature
    protocol's (on the first ``measures.n_data`` training samples)."""
    from ..protocols import curvature as K
    from ..protocols import measures as M
    from ..protocols.timeline import TimelineSettings, ray_radii

    c, cv, seed = ctx.cfg.measures, ctx.cfg.curvature, ctx.cfg.seed
    sub = problem.subset(c.n_data)
    df, layers = M.measure_table(sub, theta, n_draws=c.n_draws, target=c.target, eps=c.eps,
                                 quantile=c.margin_quantile, seed=seed)
    df["margin"] = M.output_margin(problem, theta, quantile=c.margin_quantile).cpu().numpy()  # every sample
    if with_curvature:
        df["lambda_max"] = K.top_eigenvalues(sub, theta, k=1, tol=cv.tol, seed=seed).values[:, 0].cpu().numpy()
        df["hessian_trace"] = K.trace(sub, theta, n_probes=cv.trace_probes, seed=seed)["trace"].cpu().numpy()
        df["sharpness_average"] = K.sharpness(sub, theta, cv.rho, "average", n_samples=cv.n_samples,
                                              seed=seed).cpu().numpy()
        df["sharpness_worst"] = K.sharpness(sub, theta, cv.rho, "worst", seed=seed).cpu().numpy()
        per, _ = ray_radii(sub, theta, TimelineSettings(n_data=c.n_data, seed=seed))
        df["basin_radius_relative"] = per["basin_radius_relative"].to_numpy(float)
        if c.local_entropy:
            le = K.local_entropy(sub, theta, radius=cv.entropy_radius, epsilon=cv.entropy_epsilon,
                                 n_chains=cv.entropy_chains, seed=seed)
            df["local_entropy"] = le["local_entropy"].cpu().numpy()
    return df, layers


@dataclass(frozen=True)
class MeasuresCell(Task):
    """Train every learning rate x seed of one (width, batch size, weight decay, SAM radius) cell of the grid in one
    vectorised run (per-replica learning rates), then measure them. ``width`` -1: the study's own model."""

    width: int
    batch_size: int
    weight_decay: float
    sam_rho: float
    index: int
    stage = "measures"

    def key(self) -> str:
        return f"cell{self.index}"

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}.parquet", f"tables/{name}-layers.parquet", f"tensors/{name}.safetensors"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..train import train
        from .common import build_problem

        c = ctx.cfg.measures
        problem = build_problem(ctx.cfg, hidden=self.width if self.width > 0 else None)
        lrs = [lr for lr in c.lrs for _ in range(c.seeds)]
        ids = [self.index * len(lrs) + i for i in range(len(lrs))]  # every network of the grid its own seed
        extra = {"stop_at_loss": c.stop_at_loss} if c.stop_at_loss is not None else {}
        rep = train(problem, len(lrs), epochs=c.epochs, batch_size=self.batch_size, lr=lrs,
                    optimizer="sgd", method="sam" if self.sam_rho > 0 else "sgd", momentum=ctx.cfg.train.momentum,
                    weight_decay=self.weight_decay, rho=self.sam_rho if self.sam_rho > 0 else 0.05, seed=ctx.cfg.seed,
                    replica_ids=ids, progress=ctx.progress, **extra)
        df = rep.table[["replica", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "gap_error",
                        "gap_loss", "diverged", "epochs_trained", "reached_stop"]].copy()
        df.insert(0, "cell", self.index)
        df.insert(1, "width", self.width if self.width > 0 else 0)
        df.insert(2, "batch_size", self.batch_size)
        df.insert(4, "weight_decay", self.weight_decay)
        df.insert(5, "sam_rho", self.sam_rho)
        df["seed_index"] = [i % c.seeds for i in range(len(lrs))]
        df["n_params"] = problem.n_params
        theta = rep.theta
        alive = ~df["diverged"].to_numpy(bool)
        if alive.any():
            meas, layers = _measure(ctx, problem, theta[torch.as_tensor(alive)], c.curvature)
            meas.index = np.flatnonzero(alive)
            df = pd.concat([df, meas.reindex(range(len(df)))], axis=1)
            layers["replica"] = df["replica"].to_numpy()[np.flatnonzero(alive)][layers["replica"].to_numpy()]
        else:  # every network of the cell diverged: no measures (NaN), the cell is not usable
            layers = pd.DataFrame({"replica": pd.Series(dtype="int64"), "layer": pd.Series(dtype=str)})
        layers.insert(0, "cell", self.index)
        return (TaskOutput().table(ctx.name, df).table(f"{ctx.name}-layers", layers)
                .tensors(ctx.name, {"theta": theta.cpu()}, {"width": str(self.width), "n_params": str(problem.n_params)}))


@dataclass(frozen=True)
class MeasuresReplicas(Task):
    """The measures of the study's own (live) replicas, for model selection and the report."""

    stage = "measures"

    def key(self) -> str:
        return "replicas"

    def outputs(self, name: str) -> list[str]:
        return [f"tables/{name}.parquet", f"tables/{name}-layers.parquet"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from .common import alive_replicas

        rep, problem = alive_replicas(ctx.input("replicas"), ctx.problem)
        df, layers = _measure(ctx, problem, rep.theta, with_curvature=False)
        ids = rep.table["replica"].to_numpy()
        df.insert(0, "replica", ids)
        layers["replica"] = ids[layers["replica"].to_numpy()]
        return TaskOutput().table(ctx.name, df).table(f"{ctx.name}-layers", layers)


def grid_cells(cfg) -> list[MeasuresCell]:
    """The cells of ``cfg.measures``' grid that are tasks: every (width, batch size, weight decay, SAM radius)."""
    c = cfg.measures
    widths = c.widths or [-1]
    combos = itertools.product(widths, c.batch_sizes, c.weight_decays, c.sam_rhos)
    return [MeasuresCell(int(w), int(b), float(wd), float(r), i) for i, (w, b, wd, r) in enumerate(combos)]

_RAW = {
    "weight_norm": "|theta|_2 over every parameter",
    "log_spec_product": "sum over weight matrices of log |W|_2^2 (log product of squared spectral norms)",
    "log_frob_product": "sum over weight matrices of log |W|_F^2 (log product of squared Frobenius norms)",
    "log_path_norm": "log sum_i f_{theta^2}(1)_i, the path norm (ReLU MLPs; NaN otherwise)",
    "margin": "output margin: 10th percentile (measures.margin_quantile) over training samples of f_y - max_{j!=y} f_j",
    "pacbayes_sigma": "largest sigma with E[train error(theta + N(0, sigma^2 I))] - train error <= measures.target",
    "pacbayes_mag_sigma": "the same with u_i ~ N(0, sigma^2 theta_i^2 + eps^2) (magnitude-aware)",
    "ww_alpha": "mean over weight matrices of the power-law exponent alpha of the ESD of W^T W (layers with >= 8 "
                "eigenvalues)",
    "ww_alpha_hat": "mean over weight matrices of alpha log10 lambda_max (WeightWatcher's alpha_weighted)",
    "ww_stable_rank": "mean over weight matrices of |W|_F^2 / |W|_2^2",
    "lambda_max": "largest Hessian eigenvalue on measures.n_data samples (Lanczos)",
    "hessian_trace": "Hessian trace on measures.n_data samples (Hutch++)",
    "sharpness_average": "E_u[E(theta + R u)] - E(theta), R = curvature.rho |theta|, filter-normalised u",
    "sharpness_worst": "max over the rho-ball (projected ascent) of E(theta + u) - E(theta)",
    "basin_radius_relative": "Kaplan-Meier median over straight filter-normalised walks of the radius / |theta| where "
                             "the loss first exceeds E0 (1 + 0.1)",
    "local_entropy": "log volume fraction of the ball (curvature.entropy_radius |theta|) within entropy_epsilon",
    "pacbayes_flatness": "complexity 1 / pacbayes_sigma^2 (Jiang et al. 2020)",
    "pacbayes_mag_flatness": "complexity 1 / pacbayes_mag_sigma^2",
    "inverse_margin": "complexity 1 / margin^2 (inf for a margin <= 0)",
    "neg_basin_radius": "complexity -basin_radius_relative", "neg_local_entropy": "complexity -local_entropy",
}
_GRID = {
    "cell": "cell index of the grid task (width, batch size, weight decay, SAM radius)",
    "width": "hidden width (0: the study's own model)", "batch_size": "mini-batch size", "lr": "learning rate",
    "weight_decay": "L2 weight decay", "sam_rho": "SAM radius (0: plain SGD)", "replica": "network id (its seed)",
    "seed_index": "seed within the cell's learning rate", "n_params": "parameters of the network",
    "train_loss": "training loss", "train_accuracy": "training accuracy", "test_loss": "test loss",
    "test_accuracy": "test accuracy", "gap_error": "train accuracy - test accuracy", "gap_loss": "test - train loss",
    "diverged": "training diverged", "epochs_trained": "epochs trained", "reached_stop": "reached stop_at_loss",
    "usable": "kept in the ranking (reached the stop criterion, did not diverge)", "task": "the task that trained it",
}
_STAT = "; 95% bootstrap interval over seeds in _lo/_hi"


class MeasuresStage(Stage):
    name = "measures"
    position = 65
    section = "measures"
    sections = ("measures", "curvature")
    depends = ("train",)
    tables = ("measures", "measures_layers", "measures_grid", "measures_rank")
    command = "which measure predicts generalisation: a grid of hyperparameters, every measure, granulated tau"
    report = ("measures", "Which measure predicts generalisation")
    columns = {
        "measures": {"replica": "replica id", **_RAW},
        "measures_grid": {**_GRID, **_RAW},
        "measures_layers": {
            "replica": "replica / network id", "cell": "grid cell (-1: the study's replicas)",
            "source": "'replicas' (the study's) or 'grid'", "layer": "parameter name of the weight matrix",
            "n_evals": "eigenvalues of W^T W (min(out, fan_in))", "alpha": "power-law exponent of the ESD tail "
            "(Clauset-Shalizi-Newman MLE, KS-chosen xmin; NaN below 8 eigenvalues, as WeightWatcher)",
            "alpha_sigma": "standard error (alpha - 1) / sqrt(n_tail)", "xmin": "start of the fitted tail",
            "ks": "KS distance of the fit", "n_tail": "eigenvalues in the tail", "lambda_max": "largest eigenvalue",
            "alpha_hat": "alpha log10 lambda_max", "stable_rank": "sum lambda / lambda_max",
            "log_spectral_norm": "log10 lambda_max"},
        "measures_rank": {
            "rank": "rank by psi (then tau), 1 = best predictor", "measure": "complexity measure (larger = predicted "
            "worse)", "target": "gap_error", "n_networks": "usable networks", "n_cells": "cells with a usable network",
            "tau": "Kendall tau-b with the gap over all usable networks" + _STAT,
            "tau_cells": "Kendall tau-b over the cells' seed means" + _STAT,
            "psi_*": "granulated tau of one axis (Jiang et al. 2020): mean over the other axes' values of the tau over "
                     "cells differing in that axis only" + _STAT,
            "psi": "Psi: mean of the granulated taus over the axes" + _STAT,
            "tau_lo": "low end", "tau_hi": "high end", "tau_cells_lo": "low end", "tau_cells_hi": "high end",
            "psi_lo": "low end", "psi_hi": "high end",
            "cmi": "min over pairs of axes S of I(V_mu; V_g | U_S) / H(V_g | U_S) over pairs of cells (Jiang et al.)"
                   + _STAT, "cmi_lo": "low end", "cmi_hi": "high end",
            "cmi_0": "I(V_mu; V_g) / H(V_g) over pairs of cells (no conditioning)"},
    }

    def inputs(self, ctx) -> dict:
        from .common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def tasks(self, ctx) -> list[Task]:
        return [MeasuresReplicas(), *(grid_cells(ctx.cfg) if ctx.cfg.measures.grid else [])]

    def gather(self, ctx, tasks: list[Task], names: list[str]) -> dict:
        from ..protocols import measures as M

        st, c = ctx.store, ctx.cfg.measures
        own = st.read_table(names[0])
        own = M.with_complexity(own)
        st.write_table("measures", own)
        layers = [st.read_table(f"{names[0]}-layers").assign(source="replicas", cell=-1)]
        out = {"replicas": len(own)}
        if len(tasks) > 1:
            grid = pd.concat([st.read_table(n) for n in names[1:]], ignore_index=True)
            grid = M.with_complexity(grid)
            grid["task"] = [n for n, t in zip(names[1:], tasks[1:]) for _ in range(len(c.lrs) * c.seeds)]
            layers += [st.read_table(f"{n}-layers").assign(source="grid") for n in names[1:]]
            axes = [a for a in AXES if grid[a].nunique() > 1]
            usable = grid["reached_stop"].astype(bool) & ~grid["diverged"].astype(bool) if c.stop_at_loss else \
                ~grid["diverged"].astype(bool)
            grid["usable"] = usable
            st.write_table("measures_grid", grid)
            out.update(networks=len(grid), usable=int(usable.sum()), axes=axes)
            if not axes:
                out["note"] = "every axis of the grid has one value: nothing to rank"
            else:
                try:
                    rank = M.rank_measures(grid, [m for m in M.COMPLEXITY if m in grid], axes, n_boot=c.n_boot,
                                           seed=ctx.cfg.seed, usable="usable")
                    st.write_table("measures_rank", rank)
                except Exception as e:  # noqa: BLE001 - a grid that cannot be ranked says why, the tables stay
                    from ..errors import LossglassError

                    if not isinstance(e, LossglassError):
                        raise
                    out["note"] = f"no ranking: {e}"
        st.write_table("measures_layers", pd.concat(layers, ignore_index=True))
        return out

    def estimate(self, cfg, sizes, est) -> None:
        c, p = cfg.measures, sizes.n_params
        if not p:
            return
        n = len(grid_cells(cfg)) * len(c.lrs) * c.seeds if c.grid else 0
        n_m = min(c.n_data or sizes.n_train, sizes.n_train)
        est.add("time", "measures grid (at most; the stop criterion ends it earlier)",
                sizes.cost("train", p * sizes.n_train * c.epochs * n)
                + sizes.cost("forward", n * (2 * 16 * c.n_draws + 200) * p * n_m))
        est.add("disk", "measures grid networks", n * p * 4)
