"""Protocol 1: random walks, Metropolis and Langevin sampling at a temperature, and what they measure.

All walkers are replicas: every step evaluates the energy of all W walkers in one batched pass. Each
walker draws its noise from its own generator, seeded from ``(seed, walker_id)``, so walker i's path does
not depend on how many walkers run beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._util import as_batch, check_finite, generators, randn_per
from ..errors import check, choice
from ..problem import FunctionProblem, Problem
from ..train import Replicas


@dataclass
class WalkResult:
    """Traces of W walkers over ``steps`` steps (row t is after t steps; row 0 is the start).

    energy, accuracy, distance: ``(steps+1, W)``; accepted: ``(steps+1, W)`` bool (row 0 True);
    test_steps with test_loss/test_accuracy ``(len(test_steps), W)``; snapshots ``(S, W, P)`` at
    log-spaced ``snapshot_steps`` (for aging); alive ``(W,)`` False for a walker stopped by a NaN energy.
    """

    kind: str
    energy: torch.Tensor
    accuracy: torch.Tensor
    distance: torch.Tensor
    accepted: torch.Tensor
    test_steps: list[int]
    test_loss: torch.Tensor
    test_accuracy: torch.Tensor
    snapshot_steps: list[int]
    snapshots: torch.Tensor
    alive: torch.Tensor
    start_index: torch.Tensor
    theta: torch.Tensor
    params: dict = field(default_factory=dict)

    @property
    def n_walkers(self) -> int:
        return int(self.energy.shape[1])

    @property
    def acceptance_rate(self) -> torch.Tensor:
        """Fraction of proposals accepted, per walker (1 for the plain walk)."""
        return self.accepted[1:].float().mean(0)

    def table(self) -> pd.DataFrame:
        """Tidy table: one row per (step, walker): energy, train accuracy, distance, accepted, test columns."""
        t, w = self.energy.shape
        df = pd.DataFrame({
            "step": np.repeat(np.arange(t), w), "walker": np.tile(np.arange(w), t),
            "start": np.tile(self.start_index.numpy(), t),
            "energy": self.energy.reshape(-1).numpy(), "train_accuracy": self.accuracy.reshape(-1).numpy(),
            "distance": self.distance.reshape(-1).numpy(), "accepted": self.accepted.reshape(-1).numpy()})
        test = pd.DataFrame({
            "step": np.repeat(np.asarray(self.test_steps, dtype=np.int64), w),
            "walker": np.tile(np.arange(w), len(self.test_steps)),
            "test_loss": self.test_loss.reshape(-1).numpy(), "test_accuracy": self.test_accuracy.reshape(-1).numpy()})
        df = df.merge(test, on=["step", "walker"], how="left")
        for k, v in self.params.items():
            df[k] = v if v is not None else np.nan
        df["kind"] = self.kind
        return df


# ---------------------------------------------------------------------------- step scales
def step_scale(problem: Problem, theta0: torch.Tensor, normalize: str | None) -> torch.Tensor:
    """Per-coordinate scale s of the Gaussian step sigma * s * xi, ``(W, P)``.

    - None: s = 1 (isotropic; MSD = sigma^2 t P exactly).
    - "filter" (Li et al. 2018): s = |theta0_row| / sqrt(n_row) for each row (output unit) of a weight
      matrix, so E|step_row|^2 = sigma^2 |theta0_row|^2; a 1-D parameter (bias) is one row.
    - "layer": the same with one row = one whole parameter tensor.
    """
    if normalize in (None, "none"):
        return torch.ones_like(theta0)
    choice("normalize", normalize, ("filter", "layer"))
    scale = torch.empty_like(theta0)
    for info in problem.params:
        block = theta0[:, info.slice]
        rows = info.shape[0] if (normalize == "filter" and len(info.shape) > 1) else 1
        b = block.reshape(theta0.shape[0], rows, -1)
        s = b.norm(dim=-1, keepdim=True) / math.sqrt(b.shape[-1])
        scale[:, info.slice] = s.expand_as(b).reshape(theta0.shape[0], -1)
    return scale.clamp_min(1e-12)


def _starts(problem: Problem, start, n_walkers: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(start, Replicas):
        start = start.theta
    s, _ = as_batch(start, problem.n_params, "start")
    s = s.to(problem.device, problem.dtype)
    check_finite(s, "start")
    check(isinstance(n_walkers, int) and n_walkers > 0, f"n_walkers must be a positive int, got {n_walkers!r}")
    idx = torch.arange(s.shape[0]).repeat_interleave(n_walkers)
    return s[idx.to(s.device)].clone(), idx


def _log_steps(steps: int, n: int = 24) -> list[int]:
    return sorted({0, *np.unique(np.round(np.logspace(0, math.log10(max(steps, 1)), n)).astype(int)).tolist()})


def _run(problem: Problem, theta: torch.Tensor, start_idx: torch.Tensor, steps: int, record_every: int, kind: str,
         propose, params: dict, progress: bool) -> WalkResult:
    check(isinstance(steps, int) and steps > 0, f"steps must be a positive int, got {steps!r}")
    check(isinstance(record_every, int) and record_every > 0, f"record_every must be a positive int, got {record_every}")
    w = theta.shape[0]
    theta0 = theta.clone()
    has_test = not isinstance(problem, FunctionProblem)
    ev = problem.evaluate(theta, "train")
    e, acc = ev["loss"], ev["accuracy"]
    energy = torch.empty(steps + 1, w, dtype=torch.float64)
    accuracy = torch.empty_like(energy)
    distance = torch.zeros_like(energy)
    accepted = torch.ones(steps + 1, w, dtype=torch.bool)
    energy[0], accuracy[0] = e.cpu().double(), acc.cpu().double()
    alive = torch.isfinite(e)
    test_steps = [t for t in range(0, steps + 1, record_every)]
    if test_steps[-1] != steps:
        test_steps.append(steps)
    test_loss = torch.full((len(test_steps), w), float("nan"), dtype=torch.float64)
    test_acc = test_loss.clone()
    snap_steps = _log_steps(steps)
    snaps = torch.empty(len(snap_steps), w, problem.n_params, dtype=problem.dtype)
    snaps[0] = theta.cpu()
    ti, si = 0, 1
    if has_test:
        te = problem.evaluate(theta, "test")
        test_loss[0], test_acc[0] = te["loss"].cpu().double(), te["accuracy"].cpu().double()
        ti = 1
    state = {"e": e, "acc": acc}
    for t in tqdm(range(1, steps + 1), desc=kind, disable=not progress or None, leave=False, unit="step"):
        new, new_e, new_acc, acc_mask = propose(theta, state)
        ok = torch.isfinite(new_e) & torch.isfinite(new).all(1)
        alive = alive & ok
        take = acc_mask & alive
        theta = torch.where(take.unsqueeze(1), new, theta)
        state["e"] = torch.where(take, new_e, state["e"])
        state["acc"] = torch.where(take, new_acc, state["acc"])
        energy[t] = torch.where(alive, state["e"], torch.full_like(state["e"], float("nan"))).cpu().double()
        accuracy[t] = state["acc"].cpu().double()
        distance[t] = (theta - theta0).norm(dim=1).cpu().double()
        accepted[t] = take.cpu()
        if has_test and ti < len(test_steps) and test_steps[ti] == t:
            te = problem.evaluate(theta, "test")
            test_loss[ti], test_acc[ti] = te["loss"].cpu().double(), te["accuracy"].cpu().double()
            ti += 1
        if si < len(snap_steps) and snap_steps[si] == t:
            snaps[si] = theta.cpu()
            si += 1
    return WalkResult(kind, energy, accuracy, distance, accepted, test_steps, test_loss, test_acc, snap_steps,
                      snaps, alive.cpu(), start_idx, theta.detach().cpu(), params)


def random_walk(problem: Problem, start, *, n_walkers: int = 1, steps: int = 100, step_size: float = 0.01,
                temperature: float | None = None, normalize: str | None = None, record_every: int = 10,
                seed: int = 0, progress: bool = True) -> WalkResult:
    """Random walk theta_{t+1} = theta_t + sigma s * xi, xi ~ N(0, I_P), for W walkers at once.

    ``start``: one solution ``(P,)`` (all walkers there), several ``(S, P)`` or a ``Replicas`` (``n_walkers``
    walkers from each). ``temperature=None``: every step is taken (the paper's walk; MSD = sigma^2 t P for
    s = 1). ``temperature=T``: Metropolis, accept with probability min(1, exp(-(E' - E) / T)), E the mean
    training loss; the stationary law is exp(-E/T), so for E = 1/2 theta^T H theta, <E> = P T / 2.
    ``normalize`` scales the step per filter or layer (see :func:`step_scale`).
    """
    check(isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size),
          f"step_size must be a positive number, got {step_size!r}")
    check(temperature is None or (isinstance(temperature, (int, float)) and temperature >= 0),
          f"temperature must be None or >= 0, got {temperature!r}")
    theta_s, start_idx = _starts(problem, start, n_walkers)
    w = theta_s.shape[0]
    scale = step_scale(problem, theta_s, normalize) * step_size
    noise = generators(seed, range(w), stream=11)
    unif = generators(seed, range(w), stream=12)
    dev, dt = problem.device, problem.dtype

    def propose(theta, state):
        xi = randn_per(noise, problem.n_params, dev, dt)
        new = problem.project(theta + scale * xi)
        ev = problem.evaluate(new, "train")
        if temperature is None:
            acc = torch.ones(w, dtype=torch.bool, device=dev)
        else:
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in unif]).to(dev)
            de = (ev["loss"] - state["e"]).double()
            acc = (de <= 0) if temperature == 0 else (u < torch.exp(-de / temperature))
            acc = acc | (de <= 0)
        return new, ev["loss"], ev["accuracy"], acc

    kind = "walk" if temperature is None else "metropolis"
    return _run(problem, theta_s, start_idx, steps, record_every, kind, propose,
                {"step_size": step_size, "temperature": temperature, "normalize": normalize or "none"}, progress)


def langevin(problem: Problem, start, *, temperature: float, lr: float, steps: int = 100, n_walkers: int = 1,
             record_every: int = 10, seed: int = 0, progress: bool = True) -> WalkResult:
    """Overdamped Langevin dynamics theta <- theta - lr grad E + sqrt(2 lr T) xi (full-batch gradient);
    its stationary law tends to exp(-E/T) as lr -> 0 (for a quadratic, <E> = P T / (2 (1 - lr lambda / 2))
    per mode, so the bias is O(lr lambda))."""
    check(isinstance(temperature, (int, float)) and temperature >= 0, f"temperature must be >= 0, got {temperature!r}")
    check(isinstance(lr, (int, float)) and lr > 0, f"lr must be > 0, got {lr!r}")
    theta_s, start_idx = _starts(problem, start, n_walkers)
    w = theta_s.shape[0]
    noise = generators(seed, range(w), stream=13)
    dev, dt = problem.device, problem.dtype
    amp = math.sqrt(2 * lr * temperature)

    def propose(theta, state):
        _, g = problem.energy_and_grad(theta)
        xi = randn_per(noise, problem.n_params, dev, dt)
        new = problem.project(theta - lr * g + amp * xi)
        ev = problem.evaluate(new, "train")
        return new, ev["loss"], ev["accuracy"], torch.ones(w, dtype=torch.bool, device=dev)

    return _run(problem, theta_s, start_idx, steps, record_every, "langevin", propose,
                {"lr": lr, "temperature": temperature}, progress)


# ---------------------------------------------------------------------------- observables
def basin_radius(result: WalkResult, deltas=(0.01, 0.1, 0.5)) -> pd.DataFrame:
    """For each delta and walker: the distance from the start at the first step where E > E0 + delta
    (NaN if the walk never left). Columns: delta, walker, radius, step."""
    e, d = result.energy.numpy(), result.distance.numpy()
    rows = []
    for delta in deltas:
        above = e > (e[0] + delta)  # (T+1, W); NaN compares False
        hit = above.any(0)
        first = np.where(hit, above.argmax(0), -1)
        radius = np.where(hit, d[np.clip(first, 0, None), np.arange(e.shape[1])], np.nan)
        rows.append(pd.DataFrame({"delta": delta, "walker": np.arange(e.shape[1]), "radius": radius,
                                  "step": first}))
    return pd.concat(rows, ignore_index=True)


def msd(result: WalkResult) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean squared displacement MSD(t) = <|theta_t - theta_0|^2> over live walkers, and the exponent alpha
    of MSD ~ t^alpha fitted by least squares on log-log axes over t >= 1. Returns (t, msd, alpha)."""
    d2 = result.distance.numpy() ** 2
    live = result.alive.numpy()
    m = d2[:, live].mean(1) if live.any() else np.full(d2.shape[0], np.nan)
    t = np.arange(len(m))
    ok = (t >= 1) & (m > 0) & np.isfinite(m)
    alpha = float(np.polyfit(np.log(t[ok]), np.log(m[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    return t, m, alpha


def energy_vs_distance(result: WalkResult, bins: int = 20) -> pd.DataFrame:
    """Energy averaged over walkers in bins of distance from the start: bin centre, mean, std, count."""
    d, e = result.distance.numpy().ravel(), result.energy.numpy().ravel()
    ok = np.isfinite(e)
    d, e = d[ok], e[ok]
    edges = np.linspace(0, d.max() if len(d) and d.max() > 0 else 1, bins + 1)
    which = np.clip(np.digitize(d, edges) - 1, 0, bins - 1)
    df = pd.DataFrame({"bin": which, "energy": e, "distance": d}).groupby("bin")
    out = df.agg(distance=("distance", "mean"), energy=("energy", "mean"), std=("energy", "std"),
                 count=("energy", "size")).reset_index(drop=True)
    return out


def aging(result: WalkResult, normalized: bool = False) -> pd.DataFrame:
    """Two-time quantities on the log-spaced snapshots (Baity-Jesi et al. 2018), averaged over walkers:
    C(tw, tw+t) = <theta(tw) . theta(tw+t)> / P (or divided by the norms if ``normalized``) and
    Delta(tw, tw+t) = <|theta(tw+t) - theta(tw)|^2> / P. A system ages when C depends on tw, not only on t."""
    s = result.snapshots.double()  # (S, W, P)
    steps = result.snapshot_steps
    p = s.shape[-1]
    live = result.alive
    rows = []
    for i, tw in enumerate(steps):
        a = s[i][live]
        b = s[i + 1:][:, live]  # (S-i-1, W', P)
        if b.shape[0] == 0 or a.shape[0] == 0:
            continue
        dot = (b * a).sum(-1)
        c = dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30) if normalized else dot / p
        delta = (b - a).pow(2).sum(-1) / p
        for j, t2 in enumerate(steps[i + 1:]):
            rows.append({"tw": tw, "t": t2 - tw, "C": float(c[j].mean()), "Delta": float(delta[j].mean())})
    return pd.DataFrame(rows)


def summarize(result: WalkResult, deltas=(0.01, 0.1, 0.5)) -> dict:
    """Headline numbers of a walk: acceptance, MSD exponent, median basin radius per delta, final energy."""
    _, _, alpha = msd(result)
    br = basin_radius(result, deltas)
    out = {"kind": result.kind, "walkers": result.n_walkers, "steps": int(result.energy.shape[0] - 1),
           "acceptance": float(result.acceptance_rate.mean()), "msd_alpha": alpha,
           "energy_start": float(np.nanmean(result.energy[0].numpy())),
           "energy_end": float(np.nanmean(result.energy[-1].numpy())),
           "stopped_walkers": int((~result.alive).sum()),
           "distance_max": float(np.nanmax(result.distance.numpy()))}
    for delta, grp in br.groupby("delta"):
        r = grp["radius"].to_numpy()
        out[f"radius_{delta:g}_median"] = float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")
        out[f"radius_{delta:g}_iqr"] = (float(np.nanpercentile(r, 75) - np.nanpercentile(r, 25))
                                        if np.isfinite(r).any() else float("nan"))
        out[f"radius_{delta:g}_reached"] = float(np.isfinite(r).mean())
    out.update({k: v for k, v in result.params.items()})
    return out
