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
from scipy.stats import norm
from tqdm.auto import tqdm

from ._util import as_batch, check_finite, seed_for
from .errors import check
from .problem import Problem
from .protocols.walk import step_scale
from .train import Replicas

_MAX_SAMPLE_BYTES = 4 * 2**30
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
    - ``equilibration``: per temperature, the mean energy in the first and second half of the post-burn-in run
      with standard errors (from the spread of the R independent replicas; from 10 blocks when R = 1), their
      difference in standard errors ``drift_z`` and ``equilibrated`` (|drift_z| below the two-sided 1% point
      for the whole ladder, Bonferroni over M: 2.81 for M = 1, 3.42 for M = 16), the Gelman-Rubin ``R_hat`` of the
      energy across replicas (stuck replicas disagree: R_hat >> 1), and ``equilibrated`` (both tests pass,
      R_hat < 1.1); ``equilibrated`` (all temperatures).
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
    halves agree) and the Gelman-Rubin R_hat of the energy across the independent replicas."""
    post = energy[burn_in:]
    half = len(post) // 2
    m = len(temperatures)
    if half < 1:
        nan = np.full(m, np.nan)
        return pd.DataFrame({"T": temperatures, "E_first": nan, "E_first_se": nan, "E_second": nan,
                             "E_second_se": nan, "drift_z": nan, "R_hat": nan, "equilibrated": np.zeros(m, bool)})
    m1, s1 = _mean_se(post[:half])
    m2, s2 = _mean_se(post[half:2 * half])
    se = np.sqrt(s1**2 + s2**2)
    diff = m2 - m1
    with np.errstate(divide="ignore", invalid="ignore"):
        dz = np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.inf))
    r_hat = _r_hat(post)
    ok = (np.abs(dz) <= norm.ppf(1 - 0.005 / m)) & ~(r_hat >= _MAX_R_HAT)  # Bonferroni 1% over the ladder
    return pd.DataFrame({"T": temperatures, "E_first": m1, "E_first_se": s1, "E_second": m2, "E_second_se": s2,
                         "drift_z": dz, "R_hat": r_hat, "equilibrated": ok})


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
    rng = np.random.default_rng(seed_for(seed, 71))
    ladder = _Ladder(temps, r, rng)
    sample_sweeps = burn_in + sample_every * np.arange(1, n_samples + 1)
    run = _run_ising if ising else _run_continuous
    energy, samples, final, moves, steps = run(problem, theta, temps, r, sweeps, burn_in, sample_every, n_samples,
                                               scale, ladder, rng, seed, step_size, normalize, progress)
    eq = _equilibration(energy, burn_in, temps)
    params = {"sweeps": int(sweeps), "burn_in": int(burn_in), "sample_every": int(sample_every),
              "energy_scale": scale, "spins": "ising" if ising else "continuous", "seed": int(seed),
              "n_replicas": r, "problem": _name(problem)}
    res = PTResult(temps, samples, sample_sweeps, energy, moves, ladder.acceptance, ladder.half_trips // 2, final,
                   steps, eq, bool(eq["equilibrated"].all()), params)
    if ising and _name(problem) == "sk" and r >= 2:
        q2 = np.array([np.mean(overlap_samples(res, i) ** 2) for i in range(m)])
        eq["q2"] = q2
        eq["E_identity"] = -(1 / temps) / 2 * (1 - q2)
    return res


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
    x = x.double()
    if ising:
        return x @ x.transpose(-1, -2) / x.shape[-1]
    u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (u @ u.transpose(-1, -2)).clamp(-1, 1)


def overlap_samples(result: PTResult, t_index: int) -> np.ndarray:
    """Overlaps of the independent replicas a < b at temperature ``temperatures[t_index]``, at every stored
    sample: ``(S, R (R - 1) / 2)``. q_ab = s_a . s_b / N for Ising spins, <w_a, w_b> / (|w_a| |w_b|) otherwise
    (= s_a . s_b / N on the p-spin sphere). Replicas are independent chains, so ``.ravel()`` samples the P(q) of
    two independent equilibrium copies (successive rows are correlated in time)."""
    i = _t_index(result, t_index)
    check(result.n_replicas >= 2, f"overlaps need at least 2 replicas, the run has {result.n_replicas}")
    q = _overlaps(result.samples[i], result.params.get("spins") == "ising").numpy()
    iu = np.triu_indices(result.n_replicas, 1)
    return q[:, iu[0], iu[1]]


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
