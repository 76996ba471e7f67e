"""Parallel tempering (replica exchange) for Ising spin glasses and for continuous energies.

M copies of the system at temperatures T_1 < ... < T_M, each updated by Metropolis at its own temperature;
after every sweep neighbouring temperatures m, m+1 exchange their configurations with probability

    min(1, exp((1/T_m - 1/T_{m+1}) (H_m - H_{m+1}))),

H the total energy (Swendsen & Wang, PRL 57, 2607, 1986; Hukushima & Nemoto, J. Phys. Soc. Jpn. 65, 1604,
1996). The exchange satisfies detailed balance for the product of the M Boltzmann laws exp(-H / T_m), and lets a
configuration trapped at low T escape through the high temperatures. R independent replicas of the whole ladder
(R x M chains) run together in one vectorised update, so two independent equilibrium copies at each temperature
give the overlap distribution P(q).

Temperatures are physical, in units of H = ``energy_scale`` * E, where E is the problem's energy
(``problem.energy_scale``: N for the spin glasses, whose E is the energy per spin; 1 for networks and plain
functions, whose E is the mean training loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.stats import t as stats_t
from tqdm.auto import tqdm

from ._util import as_batch, check_finite, seed_for
from .errors import check
from .problem import Problem
from .protocols.walk import step_scale
from .train import Replicas

_MAX_SAMPLE_BYTES = 4 * 2**30
_BLOCK_OVERLAPS = 2**21  # overlaps held at once by the streaming pair statistics (16 MiB of float64)
_Q_SMALL = 0.3
_ADAPT_EVERY = 10
_MAX_R_HAT = 1.1
_TARGET_ACCEPTANCE = 0.35


@dataclass
class PTResult:
    """A parallel-tempering run: M temperatures x R independent replicas of the ladder.

    - ``temperatures`` ``(M,)``: physical, units of H = ``energy_scale`` * E.
    - ``samples`` ``(M, S, R, P)`` tensor on the CPU: configuration of replica r at temperature m after sweep
      ``sample_sweeps[s]`` (every ``sample_every`` sweeps after ``burn_in``); int8 for Ising spins, else the
      problem's dtype.
    - ``energy`` ``(sweeps, M, R)``: E = H / ``energy_scale`` after every sweep, burn-in included (the energy per
      spin for SK and the p-spin, the mean loss for networks).
    - ``move_acceptance`` ``(M,)``: after burn-in, the fraction of accepted single-spin flips (Ising) or of
      accepted Gaussian proposals (continuous); ``exchange_acceptance`` ``(M-1,)``: the fraction of accepted
      swaps between T_m and T_{m+1}; ``round_trips`` ``(R,)``: walks of a configuration from T_1 to T_M and back.
    - ``final`` ``(M, R, P)``: the last configurations; ``step_sizes`` ``(M,)`` the proposal scale per
      temperature (continuous problems; None for Ising).
    - ``equilibration``: one row per temperature; ``equilibrated`` (all rows) needs every check of every row:

      1. energy (:func:`_equilibration`): the mean energy in the first and second half of the post-burn-in run with
         standard errors (from the spread of the R independent replicas; from 10 blocks when R = 1), their
         difference in standard errors ``drift_z`` (paired over replicas) within ``drift_limit`` (two-sided 1% of
         Student's t with R - 1 degrees of freedom for the whole ladder, Bonferroni over M: 3.76 for R = 32 and
         M = 14), and the Gelman-Rubin ``R_hat`` of the energy across replicas below 1.1 (stuck replicas disagree:
         R_hat >> 1): ``energy_ok``.
      2. q (:func:`_q_equilibration`, R >= 3 and S >= 2, else ``q_tested`` False): <|q|>, <q^2> and the share of
         |q| < 0.3 agree between the halves of the stored samples (jackknife z over replicas within ``q_z_limit``)
         and the pairs' |q| has mixed (``absq_R_hat`` < 1.1): ``q_halves_ok``; for Ising problems P(q) is symmetric
         under q -> -q (signed <q> and <q^3>, and the overlap with a given ``start``, consistent with 0; the pairs'
         signed q mixed, ``q_R_hat`` < 1.1): ``q_symmetric``.
      3. ladder (:func:`_ladder_mixing`): burn-in and measured run each at least one mean round-trip time
         ``round_trip_time``: ``ladder_ok``.

      The energy alone misses runs whose states have not yet the equilibrium weights. Measured
      (``benchmarks/bench_pt_equilibration.py``, SK N = 64, 14 temperatures, 32 replicas): 60 sweeps pass the
      energy checks in 57 of 60 disorder samples, while the round-trip time (~340 sweeps) is 11 times the burn-in
      (all 60 flagged by the ladder, 22 also by ``absq_R_hat``); replicas all started from one low state, 100
      sweeps, pass the energy in 60 of 60 and are caught by ``start_z`` in 43 and by the ladder in all 60.
      Equilibrated runs (2000-3000 sweeps, round-trip time ~250) raised no alarm in the trials listed there.
      For SK it also carries <q^2> and the Gaussian-coupling identity
      E_identity = -(beta/2)(1 - <q^2>) (Katzgraber, Palassini & Young 2001), exact for the disorder average
      only: one sample deviates by ~0.01 above T_c and by up to ~0.1 below it, where P_J(q) is not
      self-averaging; compare it over many samples.
    """

    temperatures: np.ndarray
    samples: torch.Tensor
    sample_sweeps: np.ndarray
    energy: np.ndarray
    move_acceptance: np.ndarray
    exchange_acceptance: np.ndarray
    round_trips: np.ndarray
    final: torch.Tensor
    step_sizes: np.ndarray | None
    equilibration: pd.DataFrame
    equilibrated: bool
    params: dict = field(default_factory=dict)

    @property
    def n_replicas(self) -> int:
        return int(self.energy.shape[2])

    def index_of(self, temperature: float) -> int:
        """Index of the ladder temperature nearest to ``temperature``."""
        return int(np.argmin(np.abs(self.temperatures - float(temperature))))

    def table(self) -> pd.DataFrame:
        """One row per temperature: T, post-burn-in mean energy and its standard error, move acceptance,
        exchange acceptance with the next temperature (NaN for the last) and the equilibration columns."""
        burn = self.params["burn_in"]
        post = self.energy[burn:]
        mean, se = _mean_se(post)
        ex = np.append(self.exchange_acceptance, np.nan)
        df = pd.DataFrame({"T": self.temperatures, "E_mean": mean, "E_se": se, "move_acceptance": self.move_acceptance,
                           "exchange_acceptance": ex})
        eq = self.equilibration.drop(columns=["T"])
        return pd.concat([df, eq], axis=1)


# ---------------------------------------------------------------------------- statistics
def _mean_se(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over time and replicas of ``x`` ``(L, M, R)`` and its standard error per temperature: from the
    spread of the R per-replica time averages (independent chains, so autocorrelation needs no model) or, for
    R = 1, from 10 consecutive blocks of the one chain."""
    length, m, r = x.shape
    if r >= 2:
        per = x.mean(0)  # (M, R)
        return per.mean(1), per.std(1, ddof=1) / math.sqrt(r)
    blocks = min(10, length)
    if blocks < 2:
        return x.mean((0, 2)), np.full(m, np.nan)
    b = x[: blocks * (length // blocks), :, 0].reshape(blocks, -1, m).mean(1)
    return b.mean(0), b.std(0, ddof=1) / math.sqrt(blocks)


def _r_hat(x: np.ndarray) -> np.ndarray:
    """Gelman-Rubin potential scale reduction per temperature of ``x`` ``(L, M, R)`` (Gelman & Rubin 1992): the
    R replicas are independent chains; R_hat = sqrt(((L-1)/L W + B/L) / W) with W the mean within-replica
    variance and B = L var(replica means). Replicas stuck in different states give R_hat >> 1. NaN for R < 2."""
    length, m, r = x.shape
    if r < 2 or length < 2:
        return np.full(m, np.nan)
    w = x.var(0, ddof=1).mean(1)
    b = length * x.mean(0).var(1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w > 0, np.sqrt(((length - 1) / length * w + b / length) / w), np.where(b > 0, np.inf, 1.0))


def _equilibration(energy: np.ndarray, burn_in: int, temperatures: np.ndarray) -> pd.DataFrame:
    """First-half vs second-half mean energy after burn-in (PHYSICS.md: equilibrium is reached when the two
    halves agree) and the Gelman-Rubin R_hat of the energy across the independent replicas.

    ``drift_z`` = (E_second - E_first) / se. With R >= 2 replicas, se is the standard error of the mean of the R
    independent per-replica differences (second-half minus first-half time average; a paired comparison, so the
    correlation of a replica's two halves is kept) and z follows Student's t with R - 1 degrees of freedom; with
    R = 1, se = sqrt(se_1^2 + se_2^2) from 10 blocks per half, t with 18 degrees of freedom. ``drift_limit``: the
    two-sided 1% point of that t for the whole ladder, Bonferroni over the M temperatures. ``energy_ok``:
    |drift_z| <= drift_limit and R_hat < 1.1."""
    post = energy[burn_in:]
    half = len(post) // 2
    m, r = len(temperatures), energy.shape[2]
    dof = r - 1 if r >= 2 else 2 * (min(10, max(half, 2)) - 1)
    limit = np.full(m, stats_t.ppf(1 - 0.005 / m, dof))  # Bonferroni 1% over the ladder
    if half < 1:
        nan = np.full(m, np.nan)
        return pd.DataFrame({"T": temperatures, "E_first": nan, "E_first_se": nan, "E_second": nan,
                             "E_second_se": nan, "drift_z": nan, "drift_limit": limit, "R_hat": nan,
                             "energy_ok": np.zeros(m, bool)})
    m1, s1 = _mean_se(post[:half])
    m2, s2 = _mean_se(post[half:2 * half])
    if r >= 2:
        d = post[half:2 * half].mean(0) - post[:half].mean(0)  # (M, R) per-replica drift
        se = d.std(1, ddof=1) / math.sqrt(r)
    else:
        se = np.sqrt(s1**2 + s2**2)
    diff = m2 - m1
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.inf))
    r_hat = _r_hat(post)
    ok = (np.abs(dz) <= limit) & ~(r_hat >= _MAX_R_HAT)
    return pd.DataFrame({"T": temperatures, "E_first": m1, "E_first_se": s1, "E_second": m2, "E_second_se": s2,
                         "drift_z": dz, "drift_limit": limit, "R_hat": r_hat, "energy_ok": ok})


def _jackknife_z(est: np.ndarray, loo: np.ndarray) -> np.ndarray:
    """z = est / se with the jackknife error over the R replicas (Efron & Stein 1981): se^2 = (R - 1) / R
    sum_a (est_(a) - mean_a est_(a))^2, ``loo`` ``(K, R)`` the estimates without replica a, ``est`` ``(K,)``. A
    replica's whole trajectory leaves at once, so the error keeps the correlation of the pairs that share a replica
    and of successive samples. 0 where est and se are both 0, +-inf where only se is."""
    r = loo.shape[1]
    se = np.sqrt((r - 1) / r * ((loo - loo.mean(1, keepdims=True)) ** 2).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, est / se, np.where(np.abs(est) < 1e-12, 0.0, np.sign(est) * np.inf))


def _q_equilibration(samples: torch.Tensor, ising: bool, temperatures: np.ndarray,
                     start: torch.Tensor | None = None) -> pd.DataFrame:
    """Equilibrium in q (PHYSICS.md: an observable is in equilibrium when its two halves agree and, for Ising
    spins, P(q) is symmetric under q -> -q), per temperature, from the stored samples ``(M, S, R, P)``; q_ab the
    overlap of independent replicas a < b, O a mean over the R (R - 1) / 2 pairs and over samples:

    - halves: <|q|>, <q^2> and the share of |q| < 0.3 in the first and second half of the stored samples
      ([0, h) and [h, 2h), h = S // 2; ``absq_first`` / ``absq_second``, ``q2_*``, ``small_q_*``) and the z of
      their difference O_2 - O_1 (``absq_z``, ``q2_z``, ``small_q_z``);
    - symmetry (Ising problems, H(s) = H(-s)): the signed <q> and <q^3> over the whole run (``q_mean``,
      ``q3_mean``), which vanish when every replica is as likely to be found in a state as in its flip, and their z
      (``q_mean_z``, ``q3_z``); replicas that remember a common start (or a common sign) give <q> > 0. When the
      run was given a ``start`` ``(R, P)``, also the overlap of each replica with its own start, m_a = time mean of
      s_a . s0_a / N (``start_overlap``, the mean over replicas), which vanishes in equilibrium (the Gibbs law of
      H(s) = H(-s) is flip symmetric), and its one-sample t over the R independent replicas (``start_z``);
    - mixing: the Gelman-Rubin R_hat with the replica pairs as chains (:func:`_pair_r_hat`) of |q| (``absq_R_hat``)
      and, for Ising problems, of the signed q about 0 (``q_R_hat``): a pair whose replicas keep their valleys
      keeps its q.

    Every z is a jackknife over replicas (:func:`_jackknife_z`), the estimate recomputed from the pairs without
    replica a, so it respects the correlation of pairs that share a replica and of successive samples. The limit
    ``q_z_limit`` is the two-sided 1% point of Student's t with R - 1 degrees of freedom, Bonferroni over the z
    of the M temperatures (3, 5 or 6 per temperature: halves, odd moments for Ising problems, the start). The
    halves are tested two-sided (|z|); the odd moments and the start one-sided (z > limit, the same limit, so at
    half the level): replicas that remember a common state can only make them positive, while <q> < 0 is bounded
    by -1/(R - 1) (sum_a s_a = 0) and there the jackknife error collapses (z -> -inf with one dominant pair of
    states, z = |Z| - 1/|Z|, Z normal, when the symmetry holds), so a negative z is no evidence. When the symmetry
    holds the odd moments are degenerate U-statistics and the jackknife over-estimates their error (about 2 in
    variance when many states contribute): the test errs on the safe side, and its power is about half that of
    ``start_z``, where a start is known.
    ``q_halves_ok``: the three halves |z| within the limit and absq_R_hat < 1.1; ``q_symmetric``: the odd-moment and
    start z below the limit and q_R_hat < 1.1 (True for continuous problems, which have no flip symmetry).

    The overlaps stream in bounded blocks (:func:`_overlap_stats`): memory O(S R) per temperature, never S R^2.
    ``q_tested`` is False where nothing can be compared (fewer than 3 replicas or 2 stored samples): the q columns
    are then NaN and the flag rests on the energy and the ladder. ``q2`` is <q^2> over the whole run."""
    m, s_n, r, _ = samples.shape
    names = ["absq_first", "absq_second", "absq_z", "q2_first", "q2_second", "q2_z", "small_q_first",
             "small_q_second", "small_q_z", "absq_R_hat", "q_mean", "q_mean_z", "q3_mean", "q3_z", "q_R_hat",
             "start_overlap", "start_z", "q2"]
    cols = {k: np.full(m, np.nan) for k in names}
    tested = r >= 3 and s_n >= 2
    with_start = ising and start is not None
    n_tests = 3 + 2 * ising + with_start
    limit = float(stats_t.ppf(1 - 0.005 / (n_tests * m), r - 1)) if tested else np.nan
    n_pairs, n_loo = r * (r - 1) / 2, (r - 1) * (r - 2) / 2
    h = s_n // 2
    for i in range(m if r >= 2 else 0):
        st = _overlap_stats(samples[i], ising)
        tot, row = st["tot"], st["row"]
        cols["q2"][i] = tot[1].mean() / n_pairs
        if not tested:
            continue
        o1, o2 = tot[:, :h].mean(1) / n_pairs, tot[:, h:2 * h].mean(1) / n_pairs
        loo = (tot[:, :, None] - row) / n_loo  # (3, S, R): the pair mean without replica a
        z = _jackknife_z(o2 - o1, loo[:, h:2 * h].mean(1) - loo[:, :h].mean(1))
        for k, name in enumerate(("absq", "q2", "small_q")):
            cols[f"{name}_first"][i], cols[f"{name}_second"][i], cols[f"{name}_z"][i] = o1[k], o2[k], z[k]
        r_q, r_abs = _pair_r_hat(st, r, s_n)
        cols["absq_R_hat"][i] = r_abs
        if ising:
            odd = st["g_sum"][:2] / n_pairs
            z = _jackknife_z(odd, (st["g_sum"][:2, None] - st["g_row"]) / n_loo)
            cols["q_mean"][i], cols["q3_mean"][i] = odd
            cols["q_mean_z"][i], cols["q3_z"][i] = z
            cols["q_R_hat"][i] = r_q
        if with_start:
            y = _unit(samples[i], True)
            ma = torch.einsum("srp,rp->sr", y, _unit(start, True)).double().numpy().mean(0) / y.shape[-1]  # (R,)
            cols["start_overlap"][i] = ma.mean()
            cols["start_z"][i] = _jackknife_z(ma.mean()[None], ((ma.sum() - ma) / (r - 1))[None])[0]
    halves = np.abs(np.stack([cols["absq_z"], cols["q2_z"], cols["small_q_z"]]))
    odd = np.stack([cols["q_mean_z"], cols["q3_z"], cols["start_z"]])  # one-sided: memory makes them positive
    out = pd.DataFrame(cols)
    out["q_z_limit"] = limit
    out["q_tested"] = np.full(m, tested)
    out["q_halves_ok"] = ~(halves > limit).any(0) & ~(cols["absq_R_hat"] >= _MAX_R_HAT)
    out["q_symmetric"] = ~(odd > limit).any(0) & ~(cols["q_R_hat"] >= _MAX_R_HAT)
    return out


def _ladder_mixing(half_trips: np.ndarray, m: int, r: int, burn_in: int, post: int) -> tuple[float, bool]:
    """The mean round-trip time of a configuration, T_1 -> T_M -> T_1, in sweeps: tau_rt = 2 (sweeps after burn-in)
    M R / (half trips after burn-in, all walkers); inf when none completed. Below T_c a configuration changes
    valley only by a trip through the high temperatures, so tau_rt bounds the time the valley weights (and P(q))
    need to relax (Katzgraber, Trebst, Huse & Troyer, J. Stat. Mech. P03018, 2006). ``ladder_ok``: the burn-in and
    the measured run are each at least tau_rt long, i.e. every configuration had time to forget its start and the
    run holds at least one round trip per configuration. Always True for one temperature (no ladder)."""
    if m < 2:
        return np.nan, True
    total = float(half_trips.sum())
    tau = 2 * post * m * r / total if total > 0 else math.inf
    return tau, bool(burn_in >= tau and post >= tau)


# ---------------------------------------------------------------------------- checks
def _check_temperatures(temperatures) -> np.ndarray:
    t = np.asarray(temperatures, dtype=np.float64)
    check(t.ndim == 1 and len(t) >= 1, f"temperatures must be a 1-D list of at least one temperature, got shape {t.shape}")
    check(bool(np.isfinite(t).all()), "temperatures hold NaN or inf")
    check(bool((t > 0).all()), f"temperatures must be positive, got min {t.min():g}")
    check(bool((np.diff(t) > 0).all()), "temperatures must be strictly increasing, T_1 < ... < T_M (sort them, drop repeats)")
    return t


def _is_ising(problem: Problem) -> bool:
    return getattr(problem, "spins", None) == "ising"


def _name(problem: Problem) -> str:
    return str(getattr(problem, "name", type(problem).__name__))


def _starts(problem: Problem, start, m: int, r: int, seed: int) -> torch.Tensor:
    """``(M * R, P)`` starting configurations, chain c = m * R + r: ``start`` row r for every temperature, or
    independent ``problem.init`` draws (one per chain) when ``start`` is None."""
    if start is None:
        return problem.init(m * r, seed).to(problem.device, problem.dtype)
    if isinstance(start, Replicas):
        start = start.theta
    s, _ = as_batch(torch.as_tensor(start), problem.n_params, "start")
    check(s.shape[0] in (1, r), f"start must have shape ({problem.n_params},), (1, {problem.n_params}) or "
          f"(n_replicas={r}, {problem.n_params}), got {tuple(torch.as_tensor(start).shape)}")
    s = s.to(problem.device, problem.dtype)
    check_finite(s, "start")
    return s.expand(r, -1).repeat(m, 1).clone()


# ---------------------------------------------------------------------------- exchange
class _Ladder:
    """Replica-exchange bookkeeping for M temperatures x R replicas (chain c = m * R + r, slot m fixed): the
    permutation of chains after a round of swaps, acceptance counts, and the walkers' round trips."""

    def __init__(self, temperatures: np.ndarray, r: int, rng: np.random.Generator):
        self.beta = 1 / temperatures
        self.m, self.r, self.rng = len(temperatures), r, rng
        self.attempts = np.zeros(max(self.m - 1, 0))
        self.accepts = np.zeros(max(self.m - 1, 0))
        self.walker = np.repeat(np.arange(self.m)[:, None], r, 1)  # walker id at slot (m, r)
        self.last = np.full((self.m, r), -1)  # last extreme visited by walker (w, r): 0 bottom, 1 top
        self.half_trips = np.zeros(r, dtype=np.int64)

    def exchange(self, h: np.ndarray, parity: int, count: bool) -> np.ndarray:
        """Propose swaps between slots m, m+1 for m = parity, parity + 2, ...; ``h`` ``(M, R)`` total energies.
        Returns the chain permutation ``(M * R,)`` to apply to every per-chain array."""
        perm = np.arange(self.m * self.r).reshape(self.m, self.r)
        lo = np.arange(parity, self.m - 1, 2)
        if len(lo):
            delta = (self.beta[lo] - self.beta[lo + 1])[:, None] * (h[lo] - h[lo + 1])  # (pairs, R)
            with np.errstate(divide="ignore"):
                acc = np.log(self.rng.random(delta.shape)) < delta
            a, b = perm[lo], perm[lo + 1]
            perm[lo], perm[lo + 1] = np.where(acc, b, a), np.where(acc, a, b)
            wa, wb = self.walker[lo], self.walker[lo + 1]
            self.walker[lo], self.walker[lo + 1] = np.where(acc, wb, wa), np.where(acc, wa, wb)
            if count:
                self.attempts[lo] += self.r
                self.accepts[lo] += acc.sum(1)
        if self.m > 1:
            cols = np.arange(self.r)
            for slot, end in ((0, 0), (self.m - 1, 1)):
                w = self.walker[slot]
                self.half_trips += (self.last[w, cols] == 1 - end) & count
                self.last[w, cols] = end
        return perm.ravel()

    @property
    def acceptance(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.where(self.attempts > 0, self.accepts / np.maximum(self.attempts, 1), np.nan)


# ---------------------------------------------------------------------------- the sampler
def parallel_tempering(problem: Problem, temperatures, *, n_replicas: int, sweeps: int, seed: int = 0,
                       burn_in: int | None = None, sample_every: int = 1, start=None, step_size: float | None = None,
                       normalize: str | None = None, progress: bool = True) -> PTResult:
    """Parallel tempering (replica exchange; Swendsen & Wang 1986, Hukushima & Nemoto 1996) of ``problem`` at
    the physical ``temperatures`` T_1 < ... < T_M (units of H = ``problem.energy_scale`` * E, default scale 1),
    with ``n_replicas`` independent copies of the whole ladder, all R x M chains advanced in one vectorised update.

    One sweep:

    - Ising problems (``problem.spins == "ising"``, H = -1/2 s^T J s with J = ``problem.couplings``): N
      single-spin-flip Metropolis attempts, sites in order, each site for all chains at once; flipping s_i costs
      Delta H = 2 s_i h_i and is accepted with min(1, exp(-Delta H / T)); the local fields h = J s are kept up to
      date (rank-one update per site, recomputed exactly every 1000 sweeps). numpy: on these small arrays it
      matched torch on CPU in a measurement (about 2.5 ms per sweep for 512 chains of N = 64).
    - Continuous problems: one Metropolis step per chain, theta' = project(theta + sigma_m * s * xi), xi ~ N(0, I),
      s = :func:`~lossglass.protocols.walk.step_scale` of the start (``normalize`` None, "filter" or "layer"),
      accepted with min(1, exp(-(H' - H) / T_m)); a non-finite energy is a rejected move. All energies in one
      batched ``problem.evaluate`` call. sigma_m = ``step_size`` * sqrt(T_m / T_1) (thermal fluctuations grow
      as sqrt(T), so the acceptance stays similar along the ladder); with ``step_size=None`` each sigma_m starts
      at 0.1 and is adapted during burn-in toward an acceptance of 0.35 (multiplied by exp(2 (a - 0.35)) every
      10 sweeps), then frozen, so the sampled chain is a fixed Metropolis chain. On a sphere (spherical p-spin)
      the radial projection of an isotropic step is a symmetric proposal (its density depends on theta . theta'
      only), so Metropolis stays exact there; keep ``normalize=None`` on such problems.

    After every sweep, neighbours (m, m+1) with m even (odd sweeps: m odd) swap configurations with probability
    min(1, exp((1/T_m - 1/T_{m+1}) (H_m - H_{m+1}))), independently in every replica.

    ``start``: None (independent ``problem.init`` draws, one per chain), or one configuration ``(P,)`` or one per
    replica ``(R, P)`` that every temperature of that replica starts from (e.g. a trained network, to sample the
    Gibbs measure of its basin). ``burn_in`` (default ``sweeps // 2``) sweeps are discarded; then every
    ``sample_every``-th sweep is stored. The run is deterministic given ``seed`` (numpy and torch generators
    seeded from it), but not invariant to ``n_replicas``.
    """
    temps = _check_temperatures(temperatures)
    check(isinstance(n_replicas, (int, np.integer)) and n_replicas >= 1, f"n_replicas must be an int >= 1, got {n_replicas!r}")
    check(isinstance(sweeps, (int, np.integer)) and sweeps >= 1, f"sweeps must be an int >= 1, got {sweeps!r}")
    burn_in = sweeps // 2 if burn_in is None else burn_in
    check(isinstance(burn_in, (int, np.integer)) and 0 <= burn_in < sweeps,
          f"burn_in must be an int in [0, sweeps={sweeps}), got {burn_in!r}")
    check(isinstance(sample_every, (int, np.integer)) and 1 <= sample_every <= sweeps - burn_in,
          f"sample_every must be an int in [1, sweeps - burn_in = {sweeps - burn_in}], got {sample_every!r}")
    ising = _is_ising(problem)
    check(not (ising and step_size is not None), f"{_name(problem)} has Ising spins: it is sampled by single-spin flips, "
          "which take no step_size (leave it None)")
    check(not (ising and normalize is not None), f"{_name(problem)} has Ising spins: normalize applies to Gaussian "
          "proposals only (leave it None)")
    check(step_size is None or (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0),
          f"step_size must be None or a positive number, got {step_size!r}")
    check(ising or step_size is not None or burn_in >= _ADAPT_EVERY,
          f"step_size=None adapts the proposal during burn-in, which needs burn_in >= {_ADAPT_EVERY}; got {burn_in}")
    m, r, n = len(temps), int(n_replicas), problem.n_params
    n_samples = (sweeps - burn_in) // sample_every
    itemsize = 1 if ising else torch.empty((), dtype=problem.dtype).element_size()
    need = m * n_samples * r * n * itemsize
    check(need <= _MAX_SAMPLE_BYTES, f"storing {n_samples} samples of {m} x {r} chains x {n} parameters needs "
          f"{need / 2**30:.1f} GiB (limit {_MAX_SAMPLE_BYTES / 2**30:.0f} GiB): raise sample_every or lower sweeps")
    scale = float(getattr(problem, "energy_scale", 1.0))
    check(math.isfinite(scale) and scale > 0, f"problem.energy_scale must be a positive number, got {scale!r}")
    theta = _starts(problem, start, m, r, seed)
    start_rows = None if start is None else theta[:r].detach().cpu().clone()  # chain c = m R + r: replica r's start
    rng = np.random.default_rng(seed_for(seed, 71))
    ladder = _Ladder(temps, r, rng)
    sample_sweeps = burn_in + sample_every * np.arange(1, n_samples + 1)
    run = _run_ising if ising else _run_continuous
    energy, samples, final, moves, steps = run(problem, theta, temps, r, sweeps, burn_in, sample_every, n_samples,
                                               scale, ladder, rng, seed, step_size, normalize, progress)
    eq = _equilibration(energy, burn_in, temps)
    qeq = _q_equilibration(samples, ising, temps, start_rows)
    eq = pd.concat([eq, qeq.drop(columns=["q2"])], axis=1)
    eq["round_trip_time"], eq["ladder_ok"] = _ladder_mixing(ladder.half_trips, m, r, burn_in, sweeps - burn_in)
    eq.insert(1, "equilibrated", eq["energy_ok"] & eq["q_halves_ok"] & eq["q_symmetric"] & eq["ladder_ok"])
    if ising and _name(problem) == "sk" and r >= 2:
        eq["q2"] = qeq["q2"]
        eq["E_identity"] = -(1 / temps) / 2 * (1 - qeq["q2"])
    params = {"sweeps": int(sweeps), "burn_in": int(burn_in), "sample_every": int(sample_every),
              "energy_scale": scale, "spins": "ising" if ising else "continuous", "seed": int(seed),
              "n_replicas": r, "problem": _name(problem)}
    return PTResult(temps, samples, sample_sweeps, energy, moves, ladder.acceptance, ladder.half_trips // 2, final,
                    steps, eq, bool(eq["equilibrated"].all()), params)


def _run_ising(problem, theta, temps, r, sweeps, burn_in, sample_every, n_samples, scale, ladder, rng, seed,
               step_size, normalize, progress):
    m = len(temps)
    s0 = theta.detach().cpu().double().numpy()
    check(bool(np.all(np.abs(s0) == 1)), "Ising configurations (start) must hold only +1 and -1")
    j = problem.couplings.detach().cpu().double().numpy()
    n = j.shape[0]
    check(j.shape == (n, n) and n == problem.n_params and np.allclose(j, j.T) and np.allclose(np.diag(j), 0),
          f"{_name(problem)}: couplings must be a symmetric ({problem.n_params}, {problem.n_params}) matrix with zero diagonal")
    st = np.ascontiguousarray(s0.T)  # (N, C): row i = spin i of every chain, contiguous per site
    ht = j @ st
    h_tot = -0.5 * (st * ht).sum(0)
    e_check = problem.energy(torch.as_tensor(s0[:4], device=problem.device, dtype=problem.dtype)).double().cpu().numpy()
    check(np.allclose(scale * e_check, h_tot[:4], rtol=1e-6, atol=1e-8 * max(1.0, scale)),
          f"{_name(problem)}: energy_scale * energy(s) differs from -1/2 s^T J s; the spin-flip sampler needs that form")
    c = m * r
    half_beta = np.repeat(2 / temps, r)  # 2 beta per chain: accept iff s_i h_i < -log(u) / (2 beta)
    energy = np.empty((sweeps, m, r))
    samples = torch.empty((m, n_samples, r, n), dtype=torch.int8)
    flips = np.zeros(c)
    k = 0
    for t in tqdm(range(sweeps), desc="parallel tempering", disable=not progress or None, leave=False, unit="sweep"):
        with np.errstate(divide="ignore"):
            thr = -np.log(rng.random((n, c))) / half_beta
        acc_count = np.zeros(c)
        for i in range(n):
            acc = st[i] * ht[i] < thr[i]
            delta = np.where(acc, -2 * st[i], 0.0)
            st[i] += delta
            ht += j[i][:, None] * delta[None]
            acc_count += acc
        if (t + 1) % 1000 == 0:
            ht = j @ st  # wipe the round-off of the rank-one updates
        h_tot = -0.5 * (st * ht).sum(0)
        if t >= burn_in:
            flips += acc_count
        perm = ladder.exchange(h_tot.reshape(m, r), t % 2, t >= burn_in)
        st, ht, h_tot = st[:, perm], ht[:, perm], h_tot[perm]
        energy[t] = (h_tot / scale).reshape(m, r)
        if t + 1 > burn_in and (t + 1 - burn_in) % sample_every == 0:
            samples[:, k] = torch.from_numpy(st.T.reshape(m, r, n).astype(np.int8))
            k += 1
    moves = (flips / max(sweeps - burn_in, 1) / n).reshape(m, r).mean(1)
    final = torch.as_tensor(st.T.reshape(m, r, n).copy(), dtype=problem.dtype)
    return energy, samples, final, moves, None


def _run_continuous(problem, theta, temps, r, sweeps, burn_in, sample_every, n_samples, scale, ladder, rng, seed,
                    step_size, normalize, progress):
    m = len(temps)
    c = m * r
    dev, dt = problem.device, problem.dtype
    theta = problem.project(theta)
    e = problem.evaluate(theta, "train")["loss"].double()
    check(bool(torch.isfinite(e).all()), "the energy at the start is NaN or inf")
    h_tot = e * scale
    s = step_scale(problem, theta, normalize)
    adapt = step_size is None
    sigma = np.full(m, 0.1) if adapt else step_size * np.sqrt(temps / temps[0])
    g = torch.Generator(device=dev).manual_seed(seed_for(seed, 72))
    t_chain = torch.as_tensor(np.repeat(temps, r), device=dev, dtype=torch.float64)
    energy = np.empty((sweeps, m, r))
    samples = torch.empty((m, n_samples, r, problem.n_params), dtype=dt)
    accepted = np.zeros(c)
    window = np.zeros(c)
    k = 0
    for t in tqdm(range(sweeps), desc="parallel tempering", disable=not progress or None, leave=False, unit="sweep"):
        step = torch.as_tensor(np.repeat(sigma, r), device=dev, dtype=dt)[:, None]
        xi = torch.randn(theta.shape, generator=g, device=dev, dtype=dt)
        new = problem.project(theta + step * s * xi)
        with torch.no_grad():
            e_new = problem.evaluate(new, "train")["loss"].double()
        h_new = e_new * scale
        u = torch.rand(c, generator=g, device=dev, dtype=torch.float64)
        acc = torch.isfinite(h_new) & torch.isfinite(new).all(1) & (torch.log(u) < -(h_new - h_tot) / t_chain)
        theta = torch.where(acc[:, None], new, theta)
        h_tot = torch.where(acc, h_new, h_tot)
        acc_np = acc.cpu().numpy()
        window += acc_np
        if t >= burn_in:
            accepted += acc_np
        elif adapt and (t + 1) % _ADAPT_EVERY == 0:
            rate = (window / _ADAPT_EVERY).reshape(m, r).mean(1)
            sigma = sigma * np.exp(2 * (rate - _TARGET_ACCEPTANCE))
        if (t + 1) % _ADAPT_EVERY == 0:
            window[:] = 0
        h_np = h_tot.cpu().numpy()
        perm = ladder.exchange(h_np.reshape(m, r), t % 2, t >= burn_in)
        perm_t = torch.as_tensor(perm, device=dev)
        theta, h_tot = theta[perm_t], h_tot[perm_t]
        energy[t] = (h_np[perm] / scale).reshape(m, r)
        if t + 1 > burn_in and (t + 1 - burn_in) % sample_every == 0:
            samples[:, k] = theta.detach().reshape(m, r, -1).cpu()
            k += 1
    moves = (accepted / max(sweeps - burn_in, 1)).reshape(m, r).mean(1)
    return energy, samples, theta.detach().reshape(m, r, -1).cpu(), moves, sigma


# ---------------------------------------------------------------------------- overlaps
def _t_index(result: PTResult, t_index: int) -> int:
    m = len(result.temperatures)
    check(isinstance(t_index, (int, np.integer)) and -m <= t_index < m,
          f"t_index must be an int in [{-m}, {m - 1}] (the run has {m} temperatures), got {t_index!r}")
    return int(t_index) % m


def _overlaps(x: torch.Tensor, ising: bool) -> torch.Tensor:
    """q_ab over the last-but-one axis of ``x`` ``(..., R, P)``: s_a . s_b / N for spins, else the normalised
    overlap <w_a, w_b> / (|w_a| |w_b|)."""
    y = _unit(x, ising)
    q = y @ y.transpose(-1, -2)
    return q.double() / x.shape[-1] if ising else q.clamp(-1, 1)


def _unit(x: torch.Tensor, ising: bool) -> torch.Tensor:
    """What the overlap multiplies: Ising spins as float32 (the dot products are integers below 2^24, so exact in
    any summation order), anything else as float64 unit vectors."""
    if ising:
        return x.to(torch.float32 if x.shape[-1] < 2**24 else torch.float64)
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _pair_blocks(x: torch.Tensor, ising: bool, budget: int | None = None):
    """The overlaps q_ab, a < b, of the replicas of ``x`` ``(S, R, P)`` (one temperature) in bounded blocks, rows
    outermost: yields ``(a0, a1, s0, s1, q, upper)`` with ``q`` ``(s1 - s0, a1 - a0, R - a0)`` float64, the overlaps
    of replicas a0..a1-1 with replicas a0..R-1 in samples s0..s1-1, and ``upper`` ``(a1 - a0, R - a0)`` the mask
    b > a. At most about ``budget`` overlaps (plus one row of R per sample) exist at once, so memory is
    O(S R P + budget), never S R^2; each pair is computed once (the triangle), one batched product per block."""
    s_n, r, p = x.shape
    budget = _BLOCK_OVERLAPS if budget is None else budget
    y = _unit(x, ising)
    sc = min(s_n, max(1, budget // r))
    a0 = 0
    while a0 < r - 1:
        width = r - a0
        a1 = min(r - 1, a0 + max(1, budget // (sc * width)))
        upper = torch.arange(a0, r)[None, :] > torch.arange(a0, a1)[:, None]
        for s0 in range(0, s_n, sc):
            s1 = min(s_n, s0 + sc)
            q = y[s0:s1, a0:a1] @ y[s0:s1, a0:].transpose(1, 2)
            q = q.double() / p if ising else q.clamp(-1, 1)
            yield a0, a1, s0, s1, q, upper
        a0 = a1


def _overlap_stats(x: torch.Tensor, ising: bool) -> dict:
    """Streaming pair statistics of one temperature's samples ``x`` ``(S, R, P)`` (:func:`_pair_blocks`):

    - ``tot`` ``(3, S)``: sum over pairs a < b of |q_ab|, q_ab^2 and 1[|q_ab| < 0.3] in each sample;
    - ``row`` ``(3, S, R)``: the same sums over the pairs that contain replica a (for the jackknife);
    - ``g_sum``, ``g_sq`` ``(3,)``: sum over pairs a < b of g_ab and of g_ab^2, g_ab the time mean over the S samples
      of q_ab, q_ab^3 and |q_ab|; ``g_row`` ``(2, R)``: sum over b != a of g_ab for q and q^3 (the jackknife of the
      odd moments and the across-pair R_hat of :func:`_q_equilibration`).

    Memory O(S R) besides the blocks."""
    s_n, r, _ = x.shape
    tot = np.zeros((3, s_n))
    row = np.zeros((3, s_n, r))
    g_sum, g_sq = np.zeros(3), np.zeros(3)
    g_row = np.zeros((2, r))
    g = None
    for a0, a1, s0, s1, q, upper in _pair_blocks(x, ising):  # numpy from here: single-threaded, same bytes always
        q, upper = q.numpy(), upper.numpy()
        if s0 == 0:
            g = np.zeros((3, a1 - a0, r - a0))
        qa = np.abs(q)
        for k, f in enumerate((qa, q * q, (qa < _Q_SMALL) * 1.0)):
            f = np.where(upper, f, 0.0)
            rows, cols = f.sum(2), f.sum(1)
            tot[k, s0:s1] += rows.sum(1)
            row[k, s0:s1, a0:a1] += rows
            row[k, s0:s1, a0:] += cols
        g[0] += q.sum(0)
        g[1] += (q * q * q).sum(0)
        g[2] += qa.sum(0)
        if s1 == s_n:
            g = np.where(upper, g / s_n, 0.0)
            g_sum += g.sum((1, 2))
            g_sq += (g * g).sum((1, 2))
            g_row[:, a0:a1] += g[:2].sum(2)
            g_row[:, a0:] += g[:2].sum(1)
    return {"tot": tot, "row": row, "g_sum": g_sum, "g_sq": g_sq, "g_row": g_row}


def _pair_r_hat(st: dict, r: int, s_n: int) -> tuple[float, float]:
    """Gelman-Rubin R_hat of q and of |q| with the R (R - 1) / 2 replica pairs as the chains (:func:`_r_hat` with
    pairs for replicas): R_hat = sqrt(((S - 1)/S W + B) / W), W the mean within-pair variance of the S samples and
    B the variance of the pair means (for the signed q about 0, its value under the q -> -q symmetry). A pair whose
    two replicas stay in the same valleys keeps its own q, so its time mean differs from the others' (B >> W / S)
    until the ladder has carried every replica through the high temperatures and back."""
    n_pairs = r * (r - 1) / 2
    second = st["tot"][1].sum() / s_n  # sum over pairs of the time mean of q^2 (= |q|^2)
    out = []
    for k, about_zero in ((0, True), (2, False)):
        w = s_n / (s_n - 1) * (second - st["g_sq"][k]) / n_pairs
        if about_zero:
            b = st["g_sq"][k] / n_pairs
        else:
            b = (st["g_sq"][k] - st["g_sum"][k] ** 2 / n_pairs) / max(n_pairs - 1, 1)
        out.append(math.sqrt(((s_n - 1) / s_n * w + b) / w) if w > 0 else (1.0 if b <= 0 else math.inf))
    return out[0], out[1]


def overlap_samples(result: PTResult, t_index: int) -> np.ndarray:
    """Overlaps of the independent replicas a < b at temperature ``temperatures[t_index]``, at every stored
    sample: ``(S, R (R - 1) / 2)``, pairs in ``np.triu_indices(R, 1)`` order. q_ab = s_a . s_b / N for Ising spins,
    <w_a, w_b> / (|w_a| |w_b|) otherwise (= s_a . s_b / N on the p-spin sphere). Replicas are independent chains,
    so ``.ravel()`` samples the P(q) of two independent equilibrium copies (successive rows are correlated in
    time). The result itself holds S R (R - 1) / 2 numbers; it is filled block by block (:func:`_pair_blocks`), so
    nothing larger is built on the way."""
    i = _t_index(result, t_index)
    r = result.n_replicas
    check(r >= 2, f"overlaps need at least 2 replicas, the run has {r}")
    x = result.samples[i]
    out = np.empty((x.shape[0], r * (r - 1) // 2))
    for a0, _a1, s0, s1, q, upper in _pair_blocks(x, result.params.get("spins") == "ising"):
        start = a0 * r - a0 * (a0 + 1) // 2  # pairs of the rows before a0
        block = q[:, upper]  # row-major: (a0, a0+1), (a0, a0+2), ... = np.triu_indices order
        out[s0:s1, start:start + block.shape[1]] = block.numpy()
    return out


def overlap_matrix(result: PTResult, t_index: int, sweep: int = -1) -> np.ndarray:
    """The ``(R, R)`` overlap matrix of the replicas at temperature ``temperatures[t_index]`` in one stored
    sample (``sweep`` indexes ``result.sample_sweeps``; -1 = the last): R independent equilibrium states, ready
    for :func:`lossglass.protocols.replicas.distances_from_overlaps` and the ultrametricity test."""
    i = _t_index(result, t_index)
    n_s = result.samples.shape[1]
    check(isinstance(sweep, (int, np.integer)) and -n_s <= sweep < n_s,
          f"sweep must index the {n_s} stored samples (-{n_s}..{n_s - 1}), got {sweep!r}")
    q = _overlaps(result.samples[i, int(sweep)], result.params.get("spins") == "ising").numpy()
    np.fill_diagonal(q, 1.0)
    return q
