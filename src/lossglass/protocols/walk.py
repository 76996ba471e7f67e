"""Protocol 1: random walks, Metropolis and Langevin sampling at a temperature, and what they measure.

All walkers are replicas: every step evaluates the energy of all W walkers in one batched pass. Each
walker draws its noise from its own generator, seeded from ``(seed, walker_id)``, so walker i's path does
not depend on how many walkers run beside it.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt_io
from .._util import as_batch, check_finite, generators
from ..errors import check, choice
from ..problem import Problem
from ..train import Replicas


@dataclass
class WalkResult:
    """Traces of W walkers over ``steps`` steps (row t is after t steps; row 0 is the start).

    energy, accuracy, distance: ``(steps+1, W)``; accepted: ``(steps+1, W)`` bool (row 0 True);
    test_steps with test_loss/test_accuracy ``(len(test_steps), W)``; snapshots ``(S, W, P)`` at
    log-spaced ``snapshot_steps`` (for aging); alive ``(W,)`` False for a walker stopped by a non-finite
    state (Langevin only; or a start whose energy is not finite).

    nonfinite ``(W,)``: proposals whose energy (or parameters) were NaN/inf. Metropolis rejects them (the
    walker stays and goes on); the plain walk records E = +inf for that step (the walker has left the basin)
    and goes on; Langevin stops the walker there (count 0 or 1, ``alive`` False, energy NaN from then on).
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
    nonfinite: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.nonfinite is None:  # results saved before the count existed
            self.nonfinite = torch.zeros(self.energy.shape[1], dtype=torch.long)

    #: the tensor fields (saved as one safetensors file) and the rest (saved as JSON): :meth:`split`, :meth:`join`
    TENSORS = ("energy", "accuracy", "distance", "accepted", "test_loss", "test_accuracy", "snapshots", "alive",
               "start_index", "theta", "nonfinite")
    RECORD = ("kind", "params", "test_steps", "snapshot_steps")

    def split(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The result as ``(tensors, record)``: contiguous tensors and a JSON-ready dict (see :meth:`join`)."""
        return ({k: getattr(self, k).contiguous() for k in self.TENSORS}, {k: getattr(self, k) for k in self.RECORD})

    @classmethod
    def join(cls, tensors: dict[str, torch.Tensor], record: dict) -> WalkResult:
        """The inverse of :meth:`split` (``nonfinite`` may be absent in results saved before it existed)."""
        return cls(**{k: tensors.get(k) for k in cls.TENSORS}, **{k: record[k] for k in cls.RECORD})

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


NONFINITE = ("reject", "record", "stop")


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _executor(n: int) -> ThreadPoolExecutor:
    """A shared pool of at least ``n`` threads for drawing the walkers' noise in parallel."""
    global _pool, _pool_size
    if _pool is None or _pool_size < n:
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lossglass-pool"), n
    return _pool


def randn_into(gens: list[torch.Generator], out: torch.Tensor) -> torch.Tensor:
    """Row i of ``out`` ``(W, P)`` <- a standard normal vector from generator i (the same numbers as one
    ``torch.randn(P, generator=gens[i])`` call, so walker i's stream does not depend on W). Written in place: no
    stacked copy; with several threads the walkers' rows are drawn in parallel (each generator is used by one thread,
    torch releases the GIL while it draws)."""
    w = len(gens)
    threads = min(torch.get_num_threads(), w)
    if threads <= 1 or out.numel() < (1 << 16):
        for i, g in enumerate(gens):
            torch.randn(out.shape[1], generator=g, out=out[i])
        return out
    def part(a: int, b: int) -> None:
        for i in range(a, b):
            torch.randn(out.shape[1], generator=gens[i], out=out[i])

    bounds = [w * t // threads for t in range(threads + 1)]
    futs = [_executor(threads - 1).submit(part, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    part(bounds[0], bounds[1])
    for f in futs:
        f.result()
    return out


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Per row: every entry finite. One pass (min and max propagate NaN) instead of isfinite's several."""
    lo, hi = torch.aminmax(x, dim=1)
    return (lo > -math.inf) & (hi < math.inf)


def _fingerprint(kind: str, theta: torch.Tensor, steps: int, record_every: int, params: dict, seed: int) -> torch.Tensor:
    """What a checkpoint must match to be resumed: the walk's kind, length, parameters, seed and start positions."""
    import hashlib

    h = hashlib.sha256(f"{kind}|{steps}|{record_every}|{seed}|{sorted(params.items())}|{tuple(theta.shape)}".encode())
    h.update(theta.detach().cpu().contiguous().numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def _load_walk(path, fingerprint: torch.Tensor) -> dict | None:
    """The newest readable walk checkpoint at ``path`` (else ``NAME.prev``) made for this very walk, or None. A
    damaged file is discarded with a warning; one made for another walk (other start, parameters or length) is an
    error: the walk would otherwise silently continue someone else's."""
    from ..errors import LossglassError

    def accept(st: dict, file) -> None:
        if not torch.equal(st["fingerprint"], fingerprint):
            raise LossglassError(f"walk checkpoint {file} was written by another walk (different start, parameters, "
                                 "seed or length); remove it or give another checkpoint path")

    return ckpt_io.load(path, keys=("fingerprint",), accept=accept, what="walk checkpoint", stacklevel=4)


def _run(problem: Problem, theta: torch.Tensor, start_idx: torch.Tensor, steps: int, record_every: int, kind: str,
         propose, params: dict, progress: bool, on_nonfinite: str, *, gens: list | None = None, seed: int = 0,
         checkpoint=None, checkpoint_every: int = 100) -> WalkResult:
    """Drive ``propose`` for ``steps`` steps on all walkers at once and record the traces.

    ``propose(theta, state) -> (new, E(new), accuracy(new), accept mask)``. A proposal with a non-finite
    energy or parameters is counted per walker and, by ``on_nonfinite``: ``"reject"`` (Metropolis: exp(-inf)
    = 0, the walker stays where it is), ``"record"`` (plain walk: the step is taken and E = +inf recorded;
    a non-finite *position* still stops the walker) or ``"stop"`` (Langevin: the walker is frozen, flagged
    ``alive=False`` and its energy recorded as NaN from then on).

    ``checkpoint``: a file where the whole walk state (positions, traces so far, snapshots, RNG states of ``gens``) is
    written atomically every ``checkpoint_every`` steps and at the end (the previous one kept as ``NAME.prev``); a walk
    started again with the same file and arguments resumes from it, bit-identical to an uninterrupted one."""
    check(isinstance(steps, int) and steps > 0, f"steps must be a positive int, got {steps!r}")
    check(isinstance(record_every, int) and record_every > 0, f"record_every must be a positive int, got {record_every}")
    check(isinstance(checkpoint_every, int) and checkpoint_every > 0,
          f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    choice("on_nonfinite", on_nonfinite, NONFINITE)
    gens = list(gens or [])
    w = theta.shape[0]
    theta0 = theta.clone()
    fp = _fingerprint(kind, theta0, steps, record_every, params, seed) if checkpoint is not None else None
    has_test = problem.has_data
    ev = problem.evaluate(theta, "train")
    e, acc = ev["loss"], ev["accuracy"]
    energy = torch.empty(steps + 1, w, dtype=torch.float64)
    accuracy = torch.empty_like(energy)
    distance = torch.zeros_like(energy)
    accepted = torch.ones(steps + 1, w, dtype=torch.bool)
    energy[0], accuracy[0] = e.cpu().double(), acc.cpu().double()
    alive = torch.isfinite(e)
    nonfinite = torch.zeros(w, dtype=torch.long, device=e.device)
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
    inf = torch.full_like(e, float("inf"))
    t_start = 1
    st = _load_walk(checkpoint, fp) if checkpoint is not None else None
    if st is not None:  # resume: everything the loop reads or writes, as it was after step t_done
        dev = theta.device
        t_done = int(st["t"])
        theta = st["theta"].to(dev, problem.dtype)
        state = {"e": st["e"].to(dev), "acc": st["acc"].to(dev)}
        alive, nonfinite = st["alive"].to(dev).bool(), st["nonfinite"].to(dev)
        energy[:t_done + 1], accuracy[:t_done + 1] = st["energy"], st["accuracy"]
        distance[:t_done + 1], accepted[:t_done + 1] = st["distance"], st["accepted"].bool()
        ti, si = int(st["ti"]), int(st["si"])
        test_loss[:ti], test_acc[:ti] = st["test_loss"], st["test_acc"]
        snaps[:si] = st["snapshots"]
        ckpt_io.restore_generators(st, gens)
        t_start = t_done + 1

    def save(t: int) -> None:
        ckpt_io.save(checkpoint, {
            "fingerprint": fp, "t": torch.tensor(t), "theta": theta, "e": state["e"], "acc": state["acc"],
            "alive": alive.to(torch.uint8), "nonfinite": nonfinite, "energy": energy[:t + 1],
            "accuracy": accuracy[:t + 1], "distance": distance[:t + 1], "accepted": accepted[:t + 1].to(torch.uint8),
            "ti": torch.tensor(ti), "si": torch.tensor(si), "test_loss": test_loss[:ti], "test_acc": test_acc[:ti],
            "snapshots": snaps[:si]}, gens)

    for t in tqdm(range(t_start, steps + 1), desc=kind, disable=not progress or None, leave=False, unit="step",
                  initial=t_start - 1, total=steps):
        new, new_e, new_acc, acc_mask = propose(theta, state)
        finite_theta = _all_finite(new)
        bad = alive & ~(torch.isfinite(new_e) & finite_theta)
        nonfinite += bad.long()
        if on_nonfinite == "reject":
            acc_mask = acc_mask & ~bad
        elif on_nonfinite == "record":
            alive = alive & finite_theta
            new_e = torch.where(bad, inf, new_e)
        else:
            alive = alive & ~bad
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
        if checkpoint is not None and (t % checkpoint_every == 0 or t == steps):
            save(t)
    return WalkResult(kind, energy, accuracy, distance, accepted, test_steps, test_loss, test_acc, snap_steps,
                      snaps, alive.cpu(), start_idx, theta.detach().cpu(), params, nonfinite.cpu())


def random_walk(problem: Problem, start, *, n_walkers: int = 1, steps: int = 100, step_size: float = 0.01,
                temperature: float | None = None, normalize: str | None = None, record_every: int = 10,
                seed: int = 0, progress: bool = True, checkpoint=None, checkpoint_every: int = 100) -> WalkResult:
    """Random walk theta_{t+1} = theta_t + sigma s * xi, xi ~ N(0, I_P), for W walkers at once.

    ``start``: one solution ``(P,)`` (all walkers there), several ``(S, P)`` or a ``Replicas`` (``n_walkers``
    walkers from each). ``temperature=None``: every step is taken (the paper's walk; MSD = sigma^2 t P for
    s = 1); a step into a region where E is NaN/inf is still taken and recorded as E = +inf (the walker has
    left the basin; it counts as crossing every basin-radius threshold) and counted in ``nonfinite``.
    ``temperature=T``: Metropolis, accept with probability min(1, exp(-(E' - E) / T)), E the mean
    training loss; the stationary law is exp(-E/T), so for E = 1/2 theta^T H theta, <E> = P T / 2. A
    proposal with a non-finite energy is rejected (acceptance exp(-inf) = 0, i.e. E = +inf there; also for
    E' = -inf) and counted in ``nonfinite``: no walker is lost, so there is no survivor bias.
    T is in the units of the problem's energy (the mean training loss for a network); for the spherical
    p-spin, whose energy is per spin (H/N), the physical temperature is N T.
    ``normalize`` scales the step per filter or layer (see :func:`step_scale`).
    ``checkpoint``: a file where the walk's state is saved atomically every ``checkpoint_every`` steps; the same call
    again resumes from it, bit-identical to an uninterrupted walk (see :func:`_run`).
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
    buf = torch.empty(w, problem.n_params, dtype=dt)

    def propose(theta, state):
        xi = randn_into(noise, buf).to(dev)
        new = problem.project(theta + xi.mul_(scale))  # xi is scratch: scaled in place (same bits as scale * xi)
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
                {"step_size": step_size, "temperature": temperature, "normalize": normalize or "none"}, progress,
                "record" if temperature is None else "reject", gens=noise + unif, seed=seed, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every)


def langevin(problem: Problem, start, *, temperature: float, lr: float, steps: int = 100, n_walkers: int = 1,
             record_every: int = 10, seed: int = 0, progress: bool = True, checkpoint=None,
             checkpoint_every: int = 100) -> WalkResult:
    """Overdamped Langevin dynamics theta <- theta - lr grad E + sqrt(2 lr T) xi (full-batch gradient);
    its stationary law tends to exp(-E/T) as lr -> 0 (for a quadratic, <E> = P T / (2 (1 - lr lambda / 2))
    per mode, so the bias is O(lr lambda)).

    T is in the units of the problem's energy (the mean training loss for a network); for the spherical
    p-spin, whose energy is per spin (H/N), the physical temperature is N T. The drift is deterministic, so
    a walker whose energy or parameters become NaN/inf cannot be rejected back: it is stopped there
    (``alive`` False, energy NaN from then on, ``nonfinite`` 1) and censored in :func:`basin_radius`.
    ``checkpoint`` / ``checkpoint_every``: as for :func:`random_walk`."""
    check(isinstance(temperature, (int, float)) and temperature >= 0, f"temperature must be >= 0, got {temperature!r}")
    check(isinstance(lr, (int, float)) and lr > 0, f"lr must be > 0, got {lr!r}")
    theta_s, start_idx = _starts(problem, start, n_walkers)
    w = theta_s.shape[0]
    noise = generators(seed, range(w), stream=13)
    dev, dt = problem.device, problem.dtype
    amp = math.sqrt(2 * lr * temperature)
    buf = torch.empty(w, problem.n_params, dtype=dt)

    def propose(theta, state):
        _, g = problem.energy_and_grad(theta)
        xi = randn_into(noise, buf).to(dev)
        new = problem.project(theta - lr * g + amp * xi)
        ev = problem.evaluate(new, "train")
        return new, ev["loss"], ev["accuracy"], torch.ones(w, dtype=torch.bool, device=dev)

    return _run(problem, theta_s, start_idx, steps, record_every, "langevin", propose,
                {"lr": lr, "temperature": temperature}, progress, "stop", gens=noise, seed=seed, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every)


# ---------------------------------------------------------------------------- observables
def kaplan_meier(distance, crossed) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival curve S(r) = prod_{r_j <= r} (1 - d_j / n_j) (Kaplan & Meier 1958).

    ``distance`` per walker is the distance at which it crossed (``crossed`` True) or at which it was
    censored; r_j are the distinct crossing distances, d_j the crossings at r_j and n_j the walkers still at
    risk there (observed distance >= r_j: a walker censored at r_j counts as at risk at r_j). Non-finite
    distances are left out. Returns (r_j, S(r_j))."""
    r = np.asarray(distance, dtype=np.float64)
    ev = np.asarray(crossed, dtype=bool)
    ok = np.isfinite(r)
    r, ev = r[ok], ev[ok]
    times = np.unique(r[ev])
    if len(times) == 0:
        return times, np.ones(0)
    at_risk = len(r) - np.searchsorted(np.sort(r), times, side="left")
    ev_sorted = np.sort(r[ev])
    d = np.searchsorted(ev_sorted, times, side="right") - np.searchsorted(ev_sorted, times, side="left")
    return times, np.cumprod(1 - d / at_risk)


def km_groups(distance, crossed, q: float = 0.5, level: float = 0.95) -> dict[str, np.ndarray]:
    """Kaplan-Meier q-quantile of the radius, with a confidence interval, for every row of ``(G, n)`` arrays (one
    group of walkers per row; NaN distances pad rows of unequal size and are left out), in one vectorised pass.

    S(r) = prod_{r_j <= r} (1 - d_j / n_j) (Kaplan & Meier 1958, as :func:`kaplan_meier`); the variance of log S is
    Greenwood's v(r) = sum_{r_j <= r} d_j / (n_j (n_j - d_j)) (Greenwood 1926). The quantile is the smallest crossing
    distance with S <= 1 - q (the midpoint to the next crossing where S equals 1 - q exactly, as R's ``survfit``;
    without censoring the ordinary sample quantile). Its interval follows Brookmeyer & Crowley (1982) with the
    complementary log-log band S^exp(-+ z sqrt(v) / |log S|) (Kalbfleisch & Prentice 2002, statsmodels' default): the
    low end is the first crossing distance where the lower band falls to 1 - q, the high end the first where the upper
    band does (inf when it never does: the walks do not bound the radius from above). Coverage of the 95% interval of
    the median, simulated (4,000 sets each; exponential and lognormal radii, uncensored, censored at a fixed reach or
    at uniform reaches): 0.946 to 0.970 with 8 to 64 walkers, 0.89 to 0.94 with 4 (the log band, R's default: 0.86 at
    8 walkers, 0.93 at 32 and 64).

    Where S never falls to 1 - q the quantile is not estimable: ``value`` is then the q-quantile of every walker's
    observed distance (each walker's radius is at least its observed distance, so this is a lower bound),
    ``lower_bound`` is True and the interval is [ci_low, inf), ci_low the lower of that bound and the band's end.
    Ties: crossings before censorings at equal distance (a
    walker censored at r_j is at risk at r_j). Returns arrays of length G: ``value``, ``lower_bound``, ``ci_low``,
    ``ci_high``, ``censored`` (share of the walkers with a finite distance that never crossed) and ``n`` (those
    walkers); a row without any finite distance gives NaN everywhere and n = 0."""
    check(0 < q < 1, f"q must be in (0, 1), got {q}")
    check(0 < level < 1, f"level must be in (0, 1), got {level}")
    r = np.asarray(distance, dtype=np.float64)
    ev = np.asarray(crossed, dtype=bool)
    check(r.shape == ev.shape, f"distance and crossed must have one shape, got {r.shape} and {ev.shape}")
    r, ev = np.atleast_2d(r), np.atleast_2d(ev)
    check(r.ndim == 2, f"distance must be (n,) or (G, n), got shape {r.shape}")
    g, w = r.shape
    finite = np.isfinite(r)
    ev = ev & finite
    n = finite.sum(1)
    key = np.where(finite, r, np.inf)
    order = np.lexsort((~ev, key), axis=-1)  # by distance, crossings first at ties
    rs, es = np.take_along_axis(key, order, 1), np.take_along_axis(ev, order, 1)
    at_risk = (n[:, None] - np.arange(w)).astype(np.float64)  # at sorted position p: n - p walkers left
    # one factor per crossing: d tied crossings telescope to (1 - d/n) and to Greenwood's d / (n (n - d))
    surv = np.cumprod(np.where(es, 1 - 1 / np.where(es, at_risk, 2.0), 1.0), 1)
    two = np.where(es & (at_risk > 1), at_risk, 2.0)
    var = np.cumsum(np.where(es & (at_risk > 1), 1 / (two * (two - 1)), np.where(es, np.inf, 0.0)), 1)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    # the band on log(-log S) (se sqrt(v) / |log S|): S^exp(+-z sqrt(v) / |log S|). Where S = 0 (the last walker at
    # risk crossed) it says nothing: lower 0, upper 1 (R: NA). Positions before any crossing (S = 1) are never used.
    inner = (surv > 0) & (surv < 1) & np.isfinite(var)
    log_s = np.log(np.where(inner, surv, 0.5))
    spread = np.exp(z * np.sqrt(np.where(inner, var, 0.0)) / np.abs(log_s))
    lo_band = np.where(inner, surv ** spread, np.where(surv >= 1, 1.0, 0.0))
    hi_band = np.where(inner, surv ** (1 / spread), 1.0)
    tie_next = np.zeros_like(es)
    tie_next[:, :-1] = es[:, 1:] & (rs[:, 1:] == rs[:, :-1])
    last = es & ~tie_next  # the last crossing at its distance: the curves there are their values at r_j
    target, eps, rows = 1 - q, 1e-12, np.arange(g)

    def first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hit = mask.any(1)
        return hit, np.where(hit, mask.argmax(1), 0)

    hit, j = first(last & (surv <= target + eps))
    after = np.full_like(rs, np.inf)  # the next crossing distance after each position
    after[:, :-1] = np.minimum.accumulate(np.where(es, rs, np.inf)[:, ::-1], 1)[:, ::-1][:, 1:]
    t_j, t_next = rs[rows, j], after[rows, j]
    flat = hit & (np.abs(surv[rows, j] - target) <= eps) & np.isfinite(t_next)
    value = np.where(flat, 0.5 * (t_j + np.where(flat, t_next, 0.0)), t_j)
    obs = np.where(finite, r, np.nan)
    obs[n == 0] = 0.0  # no finite distance: set to NaN below (nanquantile would warn on an all-NaN row)
    bound = np.nanquantile(obs, q, axis=1)
    value = np.where(hit, value, bound)
    hit_lo, j_lo = first(last & (lo_band <= target + eps))
    hit_hi, j_hi = first(last & (hi_band <= target + eps))
    ci_low = np.where(hit_lo, np.minimum(rs[rows, j_lo], value), value)
    ci_high = np.where(hit_hi, rs[rows, j_hi], np.inf)
    censored = (finite & ~ev).sum(1) / np.maximum(n, 1)
    nan = n == 0
    return {"value": np.where(nan, np.nan, value), "lower_bound": ~hit & ~nan, "ci_low": np.where(nan, np.nan, ci_low),
            "ci_high": np.where(nan, np.nan, ci_high), "censored": np.where(nan, np.nan, censored), "n": n}


def km_quantile(distance, crossed, q: float = 0.5) -> tuple[float, bool]:
    """The q-quantile of the radius from the Kaplan-Meier curve, as :func:`km_groups` on one group of walkers: the
    smallest crossing distance r with S(r) <= 1 - q (the midpoint to the next crossing where S equals 1 - q exactly,
    as R's ``survfit``; without censoring the ordinary sample quantile, e.g. the median of an even count).

    Returns ``(value, is_lower_bound)``. When S never falls to 1 - q (for the median: fewer than half of the walkers
    crossed and the censored ones were not shed early) the quantile is not estimable; then the value returned is the
    q-quantile of every walker's observed distance (crossing or censoring distance), a conservative lower bound (each
    walker's radius is at least its observed distance), and the flag is True. NaN when no walker has a finite
    distance."""
    k = km_groups(np.ravel(np.asarray(distance, dtype=np.float64)), np.ravel(np.asarray(crossed, dtype=bool)), q)
    return float(k["value"][0]), bool(k["lower_bound"][0])


def radius_words(value: float, lower_bound: bool, censored: float, digits: int = 3) -> str:
    """A radius in words that say what it is: ``"≥ 0.11 (100% censored)"`` for a lower bound (the walkers' median
    was not reached: the basin is at least that wide), ``"0.031 (25% censored)"`` for a Kaplan-Meier value."""
    if not math.isfinite(value):
        return "—"
    share = f" ({100 * censored:.0f}% censored)" if math.isfinite(censored) else ""
    return ("≥ " if lower_bound else "") + f"{value:.{digits}g}" + share


def basin_radius(result: WalkResult, deltas=(0.01, 0.1, 0.5), *, relative: bool = False) -> pd.DataFrame:
    """Per delta and walker, the radius of the basin (PHYSICS.md): the distance from the start at the first
    step where E > E0 + delta (E = +inf, a step of the plain walk into a NaN region, counts as crossing).
    With ``relative`` the rise is a fraction of the walker's start energy: E > E0 + delta |E0| (snapshots with
    different losses compared at the same relative rise; E0 = 0 makes any rise a crossing).

    Columns: delta, walker, radius (NaN when censored), step (first crossing, -1 when censored), censored,
    censor_distance, threshold (the energy E0 + rise that counts as crossing). A walker that never crosses is
    censored at the largest distance it reached while its energy was recorded (a Langevin walker stopped by a
    non-finite state: up to its last finite step); a walker whose start energy is not finite has no basin (censored,
    censor_distance NaN, left out of the Kaplan-Meier estimate). Use :func:`km_groups` / :func:`km_quantile` on
    (radius or censor_distance, not censored) for the median; :func:`summarize` does."""
    e, d = result.energy.numpy(), result.distance.numpy()
    w = e.shape[1]
    deltas = [float(x) for x in np.atleast_1d(deltas)]
    check(all(math.isfinite(x) and x > 0 for x in deltas), f"deltas must be positive numbers, got {deltas}")
    recorded = ~np.isnan(e)  # +inf is recorded (left the basin); NaN: the walker was stopped
    reach = np.where(recorded, d, -np.inf).max(0)  # largest distance while recorded
    start_ok = np.isfinite(e[0])
    rows = []
    for delta in deltas:  # a handful of thresholds; every walker at once
        threshold = e[0] + delta * (np.abs(e[0]) if relative else 1.0)
        above = (e > threshold) & start_ok  # (T+1, W); NaN compares False
        hit = above.any(0)
        first = np.where(hit, above.argmax(0), -1)
        radius = np.where(hit, d[np.clip(first, 0, None), np.arange(w)], np.nan)
        censor = np.where(hit | ~start_ok, np.nan, reach)
        rows.append(pd.DataFrame({"delta": delta, "walker": np.arange(w), "radius": radius, "step": first,
                                  "censored": ~hit, "censor_distance": censor, "threshold": threshold}))
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
    """Energy averaged over walkers in bins of distance from the start: distance (bin mean), energy (mean of
    the finite energies), std, count (finite energies) and nonfinite (steps in the bin recorded as E = +inf
    by the plain walk: they are left out of the mean, so read it with this count)."""
    d, e = result.distance.numpy().ravel(), result.energy.numpy().ravel()
    keep = ~np.isnan(e)  # NaN: a stopped walker's rows, not data
    d, e = d[keep], e[keep]
    edges = np.linspace(0, d.max() if len(d) and d.max() > 0 else 1, bins + 1)
    which = np.clip(np.digitize(d, edges) - 1, 0, bins - 1)
    fin = np.isfinite(e)
    df = pd.DataFrame({"bin": which, "energy": np.where(fin, e, np.nan), "distance": d, "nonfinite": ~fin})
    out = df.groupby("bin").agg(distance=("distance", "mean"), energy=("energy", "mean"), std=("energy", "std"),
                                count=("energy", "count"), nonfinite=("nonfinite", "sum")).reset_index(drop=True)
    return out


def _mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the last axis and its standard error std/sqrt(n) (ddof 1); NaN error for n < 2."""
    n = x.shape[-1]
    m = x.mean(-1)
    if n < 2:
        return m, torch.full_like(m, float("nan"))
    return m, x.std(-1) / math.sqrt(n)


def aging(result: WalkResult, normalized: bool = False) -> pd.DataFrame:
    """Two-time quantities on the log-spaced snapshots (Baity-Jesi et al. 2018), averaged over live walkers:

        C(tw, tw+t) = <theta(tw) . theta(tw+t)> / P  (``C_norm``: divided by |theta(tw)| |theta(tw+t)|),
        Delta(tw, tw+t) = <|theta(tw+t) - theta(tw)|^2> / P.

    ``C`` is C_norm when ``normalized``. A system ages when C depends on tw, not only on t. For free
    diffusion theta_t = theta_0 + sigma sum xi: Delta = sigma^2 t and C = |theta_0|^2 / P + sigma^2 tw
    (it ages). Near a trained minimum C ~ |theta|^2 / P hides the motion: plot Delta (or 1 - C_norm).
    Columns: tw, t, C, Delta, C_norm, C_se, Delta_se (standard errors over walkers), walkers."""
    s = result.snapshots.double()  # (S, W, P)
    steps = result.snapshot_steps
    p = s.shape[-1]
    live = result.alive
    n_live = int(live.sum())
    frames = []
    for i, tw in enumerate(steps):  # loop over waiting times only; all walkers and later times at once
        a = s[i][live]
        b = s[i + 1:][:, live]  # (S-i-1, W', P)
        if b.shape[0] == 0 or a.shape[0] == 0:
            continue
        dot = (b * a).sum(-1)
        c_norm = dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
        c, c_se = _mean_se(c_norm if normalized else dot / p)
        dl, dl_se = _mean_se((b - a).pow(2).sum(-1) / p)
        frames.append(pd.DataFrame({"tw": tw, "t": np.asarray(steps[i + 1:]) - tw, "C": c.numpy(), "Delta": dl.numpy(),
                                    "C_norm": c_norm.mean(-1).numpy(), "C_se": c_se.numpy(), "Delta_se": dl_se.numpy(),
                                    "walkers": n_live}))
    cols = ["tw", "t", "C", "Delta", "C_norm", "C_se", "Delta_se", "walkers"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def summarize(result: WalkResult, deltas=(0.01, 0.1, 0.5)) -> dict:
    """Headline numbers of a walk: acceptance, MSD exponent, energies, non-finite counts, and per delta the
    Kaplan-Meier median basin radius (censored walkers kept, see :func:`basin_radius`, :func:`km_groups`).

    Keys: kind, walkers, steps, acceptance, msd_alpha, energy_start / energy_end (means over the finite
    values), stopped_walkers (alive False), nonfinite (non-finite proposals, all walkers), nonfinite_walkers
    (walkers with at least one), nonfinite_end (walkers whose final energy is not finite), distance_max; per
    delta: radius_{delta}_median (the KM median, or a lower bound when ``radius_{delta}_lower_bound``),
    radius_{delta}_lower_bound (S(r) never fell to 1/2: the basin is at least this wide), radius_{delta}_ci_low /
    radius_{delta}_ci_high (95% Brookmeyer-Crowley interval of the median over walkers; high inf when the walks do
    not bound it), radius_{delta}_iqr (KM q75 - q25, NaN when either is not estimable), radius_{delta}_censored
    (share of the walkers that never crossed); then the walk's params."""
    _, _, alpha = msd(result)
    br = basin_radius(result, deltas)
    e0, e1 = result.energy[0].numpy(), result.energy[-1].numpy()
    out = {"kind": result.kind, "walkers": result.n_walkers, "steps": int(result.energy.shape[0] - 1),
           "acceptance": float(result.acceptance_rate.mean()), "msd_alpha": alpha,
           "energy_start": float(e0[np.isfinite(e0)].mean()) if np.isfinite(e0).any() else float("nan"),
           "energy_end": float(e1[np.isfinite(e1)].mean()) if np.isfinite(e1).any() else float("nan"),
           "stopped_walkers": int((~result.alive).sum()),
           "nonfinite": int(result.nonfinite.sum()), "nonfinite_walkers": int((result.nonfinite > 0).sum()),
           "nonfinite_end": int((~np.isfinite(e1)).sum()),
           "distance_max": float(np.nanmax(result.distance.numpy()))}
    w = result.n_walkers
    crossed = ~br["censored"].to_numpy().reshape(-1, w)  # (deltas, W): rows in delta order
    obs = np.where(crossed, br["radius"].to_numpy().reshape(-1, w), br["censor_distance"].to_numpy().reshape(-1, w))
    med, q25, q75 = (km_groups(obs, crossed, q) for q in (0.5, 0.25, 0.75))
    for i, delta in enumerate(br["delta"].to_numpy()[::w]):
        out[f"radius_{delta:g}_median"] = float(med["value"][i])
        out[f"radius_{delta:g}_lower_bound"] = bool(med["lower_bound"][i])
        out[f"radius_{delta:g}_ci_low"] = float(med["ci_low"][i])
        out[f"radius_{delta:g}_ci_high"] = float(med["ci_high"][i])
        lb = q25["lower_bound"][i] or q75["lower_bound"][i]
        out[f"radius_{delta:g}_iqr"] = float(q75["value"][i] - q25["value"][i]) if not lb else float("nan")
        out[f"radius_{delta:g}_censored"] = float(med["censored"][i])
    out.update({k: v for k, v in result.params.items()})
    return out
