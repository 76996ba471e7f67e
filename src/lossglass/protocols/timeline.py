"""The landscape over training time: the light protocols at one kept training snapshot, as one table.

At a snapshot (the replicas' parameters at one optimiser step) :func:`snapshot_rows` measures train/test loss and
accuracy, lambda_max, the basin radius along straight walks in two kinds of directions, and the naive and aligned
barriers and overlaps of replica pairs. The study's timeline stage calls it once per snapshot; it needs no run folder.

The basin radius (PHYSICS.md) is measured so that snapshots can be compared (:func:`ray_radii`):

- the threshold is relative to the snapshot's loss: a walker has left the basin at the first point where
  E > E0 (1 + delta), so a snapshot at loss 0.48 and one at 0.28 are held to the same relative rise;
- the walks are straight (a ray theta + s d, with |d| = |theta|, scanned on a geometric grid of s from
  ``step_size`` to 1 and each crossing refined by bisection), so the radius s, in units of |theta|, is resolved over
  two and more decades at the cost of a short walk; a diffusive walk of T steps spans only a factor sqrt(T) in
  distance and crossed within its first step after memorisation (isotropic directions) in the grokking run;
- two kinds of directions from every replica: filter-normalised (each row of each parameter tensor of d has the
  norm of the same row of theta, Li et al. 2018, biases as one row) and isotropic (a uniformly random direction,
  |d| = |theta|). A change of the basin is claimed only where both kinds agree;
- every radius carries its censoring: the share of walkers that never crossed within s <= 1, and a flag when the
  Kaplan-Meier median was not reached (then the value is a lower bound, never a measurement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import torch

from .._util import generators
from ..errors import LossglassError, check, choice
from ..problem import Problem
from . import walk as W

#: the columns of the table ``timeline``, in order (rows of kind "replica" and "pair"; per-snapshot values repeat on
#: every row of their step)
TIMELINE_COLUMNS = (
    "step", "kind", "replica", "a", "b", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "weight_norm",
    "lambda_max", "basin_radius", "basin_radius_relative", "basin_radius_lower_bound", "basin_radius_censored",
    "basin_radius_iso", "basin_radius_iso_relative", "basin_radius_iso_lower_bound", "basin_radius_iso_censored",
    "pooled_radius_relative", "pooled_radius_ci_low", "pooled_radius_ci_high", "pooled_radius_lower_bound",
    "pooled_radius_censored", "pooled_radius_iso_relative", "pooled_radius_iso_ci_low", "pooled_radius_iso_ci_high",
    "pooled_radius_iso_lower_bound", "pooled_radius_iso_censored",
    "barrier_naive", "barrier_aligned", "barrier_test_naive", "barrier_test_aligned", "q_raw", "q_aligned",
    "q_raw_mean", "q_aligned_mean", "n_data", "delta", "delta_loss")

#: the two kinds of walk directions: (column infix, words)
KINDS = (("", "filter-normalised"), ("_iso", "isotropic"))
#: bisection steps refining each crossing between two grid points (the interval shrinks 2^BISECT-fold)
BISECT = 6


@dataclass(frozen=True)
class TimelineSettings:
    """What the timeline measures at each snapshot (the study's ``[timeline]`` section plus its seed).

    walkers: straight walks per replica and kind of direction; walk_steps: points of the geometric grid of radii s
    (units of |theta|) from step_size to 1; delta: the loss rise that defines the radius, as a fraction of the
    snapshot's loss (threshold E0 (1 + delta)); normalize: the first kind of direction ("filter" or "layer"; the
    second is always isotropic)."""

    n_data: int | None = 2000
    tol: float = 1e-3
    walkers: int = 4
    walk_steps: int = 30
    step_size: float = 0.02
    normalize: str = "filter"
    delta: float = 0.1
    pairs: int = 2
    n_points: int = 11
    seed: int = 0

    def __post_init__(self) -> None:
        choice("timeline.normalize", self.normalize, ("filter", "layer"))
        check(isinstance(self.walkers, int) and self.walkers > 0, f"walkers must be a positive int, got {self.walkers!r}")
        check(isinstance(self.walk_steps, int) and self.walk_steps >= 2,
              f"walk_steps must be an int >= 2 (points of the radius grid), got {self.walk_steps!r}")
        check(0 < self.step_size < 1, f"step_size (the smallest radius, in units of |theta|) must be in (0, 1), got "
                                      f"{self.step_size!r}")
        check(self.delta > 0 and math.isfinite(self.delta), f"delta must be > 0, got {self.delta!r}")

    @classmethod
    def from_config(cls, section, seed: int) -> TimelineSettings:
        """From a :class:`~lossglass.config.TimelineConfig` (the fields named alike) and the study seed."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls) if f.name != "seed"}, seed=int(seed))

    @property
    def grid(self) -> np.ndarray:
        """The radii s (units of |theta|) scanned along each straight walk: geometric from step_size to 1."""
        return np.geomspace(self.step_size, 1.0, self.walk_steps)


def ray_directions(problem: Problem, start: torch.Tensor, normalize: str | None, seed: int,
                   stream: int) -> torch.Tensor:
    """One random direction d per row of ``start`` ``(M, P)`` with |d| = |start|: isotropic (``normalize`` None: a
    standard normal vector rescaled) or per row of every parameter tensor (``"filter"``: each output row of d has the
    norm of the same row of start, Li et al. 2018; a 1-D tensor is one row) or per tensor (``"layer"``). Row i's
    direction comes from its own generator seeded from (seed, stream, i)."""
    xi = torch.empty(start.shape, dtype=start.dtype)
    W.randn_into(generators(seed, range(start.shape[0]), stream=stream), xi)
    xi = xi.to(start.device)
    if normalize is None:
        return xi * (start.norm(dim=1, keepdim=True) / xi.norm(dim=1, keepdim=True).clamp_min(1e-30))
    choice("normalize", normalize, ("filter", "layer"))
    d = torch.empty_like(start)
    for info in problem.params:  # a handful of parameter tensors; every direction at once
        rows = info.shape[0] if (normalize == "filter" and len(info.shape) > 1) else 1
        x = xi[:, info.slice].reshape(start.shape[0], rows, -1)
        t = start[:, info.slice].reshape(start.shape[0], rows, -1)
        d[:, info.slice] = (x * (t.norm(dim=-1, keepdim=True) / x.norm(dim=-1, keepdim=True).clamp_min(1e-30))
                            ).reshape(start.shape[0], -1)
    return d


def ray_crossings(problem: Problem, start: torch.Tensor, direction: torch.Tensor, threshold: torch.Tensor,
                  grid: np.ndarray, bisect: int = BISECT) -> tuple[np.ndarray, np.ndarray]:
    """Along each straight walk theta(s) = start + s d (rows of ``start``/``direction`` ``(M, P)``), the first s of
    the increasing ``grid`` where E(theta(s)) > ``threshold`` (a non-finite E counts as crossing), refined by
    ``bisect`` bisections inside its grid interval (s in (grid[j-1], grid[j]], (0, grid[0]] for the first). Every
    walker is evaluated at once at each grid point; the scan stops once all have crossed.

    Returns ``(s, crossed)``: s is the upper end of the refined interval for a walker that crossed (the interval
    is at most (grid[j] - grid[j-1]) / 2^bisect wide), the last grid point for one that never did (censored there)."""
    check(not problem.has_projector(), "straight walks need unconstrained parameters (this problem projects them "
                                       "onto a constraint)")
    m = start.shape[0]
    thr = threshold.to(start.device)

    def above(s: torch.Tensor) -> torch.Tensor:
        e = problem.evaluate(start + s.to(start.dtype).unsqueeze(1) * direction, "train")["loss"]
        return ~(e.double() <= thr)  # NaN / inf: crossed

    first = torch.full((m,), -1, dtype=torch.long, device=start.device)
    for j, s in enumerate(grid):  # points along the walk, like a walk's steps; all walkers at once
        hit = above(torch.full((m,), float(s), dtype=torch.float64, device=start.device)) & (first < 0)
        first[hit] = j
        if bool((first >= 0).all()):
            break
    g = torch.as_tensor(np.concatenate([[0.0], grid]), dtype=torch.float64, device=start.device)
    crossed = first >= 0
    lo, hi = g[first.clamp_min(0)], g[first.clamp_min(0) + 1]
    if bool(crossed.any()):
        for _ in range(bisect):
            mid = 0.5 * (lo + hi)
            up = above(mid)
            hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    s_out = torch.where(crossed, hi, torch.full_like(hi, float(grid[-1])))
    return s_out.cpu().numpy(), crossed.cpu().numpy()


def ray_radii(problem: Problem, theta: torch.Tensor, settings: TimelineSettings) -> tuple[pd.DataFrame, dict]:
    """The basin radius of every replica in ``theta`` ``(K, P)`` from ``settings.walkers`` straight walks per replica
    and kind of direction (:func:`ray_directions`: ``settings.normalize``, seed stream 81; isotropic, stream 82).

    A walker's radius s (units of its replica's |theta|) is the first point where E > E0 (1 + delta) along
    theta + s d, |d| = |theta| (:func:`ray_crossings` on ``settings.grid``), censored at s = 1 when it never
    crosses. Per replica (rows in ``theta``'s order) and kind (infix "" filter, "_iso" isotropic):
    ``basin_radius{k}_relative`` (Kaplan-Meier median of s over the replica's walkers, :func:`~lossglass.protocols.
    walk.km_groups`), ``basin_radius{k}`` (times |theta|), ``basin_radius{k}_lower_bound`` (the median was not
    reached: a lower bound) and ``basin_radius{k}_censored`` (share of its walkers that never crossed), with
    ``weight_norm`` and ``delta_loss`` (the rise delta |E0|). The dict holds the snapshot's pooled values over every
    walker: ``pooled_radius{k}_relative`` (KM median of s), its 95% interval over walkers (``_ci_low``,
    ``_ci_high``), ``_lower_bound`` and ``_censored``."""
    check(theta.ndim == 2 and theta.shape[1] == problem.n_params,
          f"theta must have shape (K, {problem.n_params}), got {tuple(theta.shape)}")
    s, (k, w) = settings, (theta.shape[0], settings.walkers)
    norms = theta.norm(dim=1).cpu().double().numpy()
    check(bool((norms > 0).all()), "a replica has |theta| = 0: radii relative to |theta| are undefined")
    e0 = problem.evaluate(theta, "train")["loss"].double()
    check(bool(torch.isfinite(e0).all()), "a replica's training loss is not finite: it has no basin")
    start = theta.repeat_interleave(w, 0)
    thr = (e0 + s.delta * e0.abs()).repeat_interleave(w)
    per = pd.DataFrame({"weight_norm": norms, "delta_loss": s.delta * e0.abs().cpu().numpy()})
    pooled: dict = {}
    for (infix, _), normalize, stream in zip(KINDS, (s.normalize, None), (81, 82), strict=True):
        d = ray_directions(problem, start, normalize, s.seed, stream)
        rel, crossed = ray_crossings(problem, start, d, thr, s.grid)
        rk = W.km_groups(rel.reshape(k, w), crossed.reshape(k, w))  # walkers grouped by replica
        per[f"basin_radius{infix}"] = rk["value"] * norms
        per[f"basin_radius{infix}_relative"] = rk["value"]
        per[f"basin_radius{infix}_lower_bound"] = pd.array(rk["lower_bound"], dtype="boolean")
        per[f"basin_radius{infix}_censored"] = rk["censored"]
        pk = W.km_groups(rel, crossed)
        pooled[f"pooled_radius{infix}_relative"] = float(pk["value"][0])
        for name in ("ci_low", "ci_high", "lower_bound", "censored"):
            pooled[f"pooled_radius{infix}_{name}"] = pk[name][0].item()
    return per, pooled


def snapshot_rows(problem: Problem, theta: torch.Tensor, ids, step: int, settings: TimelineSettings) -> pd.DataFrame:
    """The light protocols at one training snapshot: ``theta`` ``(K, P)`` the live replicas at optimiser step
    ``step``, ``ids`` their replica ids. One row per replica (kind "replica": train/test loss and accuracy on the
    full splits, |theta|, lambda_max by Lanczos to relative accuracy ``tol``, the radii of :func:`ray_radii`) and
    one per pair (0, 1), (2, 3), ... up to ``settings.pairs`` (kind "pair": naive and aligned barriers on the
    straight path (train and test loss), raw and aligned overlaps q = cos(a, b)); per-snapshot values (pooled radii,
    mean overlaps over all pairs, n_data, delta) repeat on every row. Curvature and walks use the first
    ``n_data`` training samples. Columns: :data:`TIMELINE_COLUMNS`. Aligned columns are NaN when the model's
    permutation symmetry is unknown."""
    from ..symmetry import align, spec_of
    from . import connect as C
    from . import curvature as K
    from . import replicas as R

    s = settings
    theta = theta.to(problem.device, problem.dtype)
    ids = np.asarray(ids)
    check(theta.ndim == 2 and len(ids) == theta.shape[0], f"ids must name the {theta.shape[0]} replicas of theta")
    check(bool(torch.isfinite(theta).all()), f"a snapshot at step {step} holds NaN or inf")
    if problem.batchnorm == "fixed":
        problem = problem.with_frozen_batchnorm(theta[0])
    sub = problem.subset(s.n_data)
    tr, te = problem.evaluate(theta, "train"), problem.evaluate(theta, "test")
    lam = K.top_eigenvalues(sub, theta, k=1, tol=s.tol, seed=s.seed).values[:, 0]
    per, pooled = ray_radii(sub, theta, s)
    rows = pd.DataFrame({"step": step, "kind": "replica", "replica": ids, "a": -1, "b": -1,
                         "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                         "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                         "lambda_max": lam.cpu().numpy()})
    rows = pd.concat([rows, per], axis=1)
    try:
        spec_of(problem)
        symmetric = True
    except LossglassError:
        symmetric = False
    m = min(s.pairs, len(theta) // 2)
    if m:
        a, b = theta[0:2 * m:2], theta[1:2 * m:2]
        b_al = torch.stack([align(problem, a[i], b[i])[0] for i in range(m)]) if symmetric else b
        naive = C.interpolate(problem, a, b, n_points=s.n_points)
        al = C.interpolate(problem, a, b_al, n_points=s.n_points)

        def cos(u, v):
            return R.cosine_overlaps(u, v, paired=True).cpu().numpy()

        nan = np.full(m, np.nan)
        pairs = pd.DataFrame({"step": step, "kind": "pair", "replica": -1, "a": ids[0:2 * m:2], "b": ids[1:2 * m:2],
                              "barrier_naive": [p.barrier for p in naive],
                              "barrier_aligned": [p.barrier for p in al] if symmetric else nan,
                              "barrier_test_naive": [p.barrier_test for p in naive],
                              "barrier_test_aligned": [p.barrier_test for p in al] if symmetric else nan,
                              "q_raw": cos(a, b), "q_aligned": cos(a, b_al) if symmetric else nan})
        rows = pd.concat([rows, pairs], ignore_index=True)
    for col, v in pooled.items():
        rows[col] = v
    if len(theta) >= 2:
        iu = np.triu_indices(len(theta), 1)
        rows["q_raw_mean"] = float(R.overlaps(problem, theta, align=False).numpy()[iu].mean())
        rows["q_aligned_mean"] = (float(R.overlaps(problem, theta, align=True).numpy()[iu].mean()) if symmetric
                                  else np.nan)
    for col in ("basin_radius_lower_bound", "basin_radius_iso_lower_bound", "pooled_radius_lower_bound",
                "pooled_radius_iso_lower_bound"):
        rows[col] = rows[col].astype("boolean")
    rows["n_data"] = len(sub.dataset.y_train)
    rows["delta"] = s.delta
    return rows[[c for c in TIMELINE_COLUMNS if c in rows]]
