"""Parallel tempering and the SK model against known values: exact enumeration, the annealed paramagnet,
equipartition, and the low-temperature SK phase at N = 64."""

import itertools

import numpy as np
import pytest
import torch

import lossglass as lg
from lossglass import sampling as S
from lossglass.protocols import replicas as R

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- the SK model
def test_sk_model_definition():
    n = 40
    p = lg.models.sk(n, seed=3)
    j = p.couplings
    assert p.spins == "ising" and p.energy_scale == n and p.n_params == n
    assert torch.equal(j, j.T) and torch.all(torch.diagonal(j) == 0)
    assert float(j[np.triu_indices(n, 1)].var()) == pytest.approx(1 / n, rel=0.1)  # J_ij ~ N(0, 1/N)
    s = p.init(5, seed=1)
    assert s.dtype == torch.float64 and torch.all(s.abs() == 1) and torch.equal(s, p.init(5, seed=1))
    h = -0.5 * ((s @ j) * s).sum(1)  # H = -sum_{i<j} J_ij s_i s_j
    assert torch.allclose(p.energy(s) * p.energy_scale, h)
    flipped = s.clone()
    flipped[:, 7] *= -1
    assert torch.allclose(p.energy(flipped) * n - h, p.flip_energies(s)[:, 7])  # Delta H = 2 s_i h_i
    assert torch.equal(lg.models.sk(n, seed=3).couplings, j) and not torch.equal(lg.models.sk(n, seed=4).couplings, j)
    pspin = lg.models.spherical_pspin(20, 2, seed=0)
    assert pspin.energy_scale == 20
    with pytest.raises(lg.LossglassError, match="n_spins"):
        lg.models.sk(1)


# ---------------------------------------------------------------------------- exactness
def test_pt_matches_exact_enumeration_of_small_sk():
    """N = 12: 4096 states, <E> and <q^2> = sum_ij <s_i s_j>^2 / N^2 exactly, at five temperatures."""
    n = 12
    p = lg.models.sk(n, seed=5)
    j = p.couplings.numpy()
    states = np.array(list(itertools.product([-1.0, 1.0], repeat=n)))
    h = -0.5 * np.einsum("ki,ij,kj->k", states, j, states)
    temps = np.array([0.3, 0.5, 0.8, 1.2, 1.6])
    res = S.parallel_tempering(p, temps, n_replicas=8, sweeps=2000, burn_in=200, seed=1, progress=False)
    tab = res.table()
    for i, t in enumerate(temps):
        w = np.exp(-(h - h.min()) / t)
        w /= w.sum()
        e_exact = (w * h).sum() / n
        q2_exact = (np.einsum("k,ki,kj->ij", w, states, states) ** 2).sum() / n**2
        assert abs(tab["E_mean"][i] - e_exact) < 4 * tab["E_se"][i] + 1e-3, (t, tab["E_mean"][i], e_exact)
        q2 = (S.overlap_samples(res, i) ** 2).mean()
        assert q2 == pytest.approx(q2_exact, abs=0.03), (t, q2, q2_exact)
    assert res.equilibrated


def test_quadratic_equipartition_at_every_temperature():
    """E = 1/2 x^T H x in P = 10 dimensions: <E> = P T / 2 exactly at every temperature of the ladder."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    hess = u @ np.diag(np.linspace(0.5, 5, 10)) @ u.T
    p = lg.models.quadratic(torch.tensor((hess + hess.T) / 2))
    temps = np.array([0.05, 0.1, 0.2, 0.4])
    res = S.parallel_tempering(p, temps, n_replicas=16, sweeps=3000, burn_in=500, seed=0, progress=False)
    tab = res.table()
    exact = 10 * temps / 2
    assert np.all(np.abs(tab["E_mean"] - exact) < 0.05 * exact)
    assert np.all(np.abs(tab["E_mean"] - exact) < 4 * tab["E_se"])
    assert np.all((res.exchange_acceptance > 0) & (res.exchange_acceptance < 1))
    assert np.all((res.move_acceptance > 0.2) & (res.move_acceptance < 0.6))  # adapted toward 0.35 in burn-in
    assert res.step_sizes is not None and np.all(np.diff(res.step_sizes) > 0)  # hotter -> larger steps


# ---------------------------------------------------------------------------- SK physics at N = 64
def test_sk_paramagnet_matches_the_annealed_energy_and_gaussian_pq():
    """T = 1.5 > T_c = 1, N = 64. Annealed: ln E_J Z = N ln 2 + beta^2 (N-1)/4, so E_J <H>/N = -beta (N-1)/(2N)
    = -0.32813. Exact for Gaussian couplings (integration by parts): E_J <H>/N = -(beta/2)(1 - E_J <q^2>), and in
    the paramagnet <q^2> = 1/(N(1 - beta^2)) + O(1/N^2), so the finite-N value is -(beta/2)(1 - 1/(N(1-beta^2)))
    = -0.32396, above the annealed one by (beta/2N) beta^2/(1-beta^2) = 0.0042 (the O(1/N) correction).
    Tolerances: that 0.0042 plus 3 standard errors of the average over 16 disorder samples (one sample deviates
    by about 0.015: measured over 32 samples, which gave -0.3235 +- 0.0027 and the identity to 0.001 +- 0.003)."""
    n, t = 64, 1.5
    beta = 1 / t
    e, ident, q_all = [], [], []
    for sample in range(16):
        res = S.parallel_tempering(lg.models.sk(n, seed=200 + sample), [t, 2.0], n_replicas=4, sweeps=120,
                                   burn_in=40, seed=sample, progress=False)
        e.append(res.table()["E_mean"][0])
        q = S.overlap_samples(res, 0)
        q_all.append(q.ravel())
        ident.append(-beta / 2 * (1 - (q**2).mean()))
    e, ident, q = np.array(e), np.array(ident), np.concatenate(q_all)
    se = e.std(ddof=1) / np.sqrt(len(e))
    annealed = -beta * (n - 1) / (2 * n)
    finite_n = -beta / 2 * (1 - 1 / (n * (1 - beta**2)))
    assert annealed == pytest.approx(-0.328125) and finite_n == pytest.approx(-0.32396, abs=1e-5)
    assert abs(e.mean() - annealed) < 0.0042 + 3 * se, (e.mean(), annealed, se)
    assert abs(e.mean() - finite_n) < 3 * se + 0.001, (e.mean(), finite_n, se)
    diff = e - ident
    assert abs(diff.mean()) < 3 * diff.std(ddof=1) / np.sqrt(len(diff)) + 0.001
    width = 1 / np.sqrt(n * (1 - 1 / t**2))  # one Gaussian around 0 of width 1/sqrt(N (1 - 1/T^2)) = 0.168
    assert abs(q.mean()) < 0.02 and q.std() == pytest.approx(width, rel=0.15)
    assert np.abs(q).mean() == pytest.approx(width * np.sqrt(2 / np.pi), rel=0.15)  # <|q|> ~ 0.13
    assert abs(((q - q.mean()) ** 4).mean() / q.var() ** 2 - 3) < 0.5  # Gaussian kurtosis


@pytest.fixture(scope="module")
def sk64():
    """One N = 64 SK sample, 10 temperatures 0.3..1.6 (geometric), 6 replicas, 800 sweeps."""
    p = lg.models.sk(64, seed=1)
    temps = np.geomspace(0.3, 1.6, 10)
    return p, S.parallel_tempering(p, temps, n_replicas=6, sweeps=800, seed=0, progress=False)


def test_sk_low_temperature_phase(sk64):
    """Reference (PHYSICS.md): an independent PT at N = 64 gives at T = 0.42 E/N of -0.64 to -0.65, <|q|> of
    0.44 to 0.53 and 20 to 34% of |q| < 0.3 (two disorder samples). Six samples with 3000 sweeps gave E/N from
    -0.64 to -0.74, <|q|> 0.37 to 0.73 and 0 to 50% below 0.3: P_J(q) is not self-averaging, so one sample is
    held to the band of that spread. Disorder sample 1 is one with weight near q = 0 (samples 0 and 3 show only
    the +-q_EA peaks at this size)."""
    p, res = sk64
    i = res.index_of(0.42)
    assert res.temperatures[i] == pytest.approx(0.42, abs=0.05)
    tab = res.table()
    assert -0.72 < tab["E_mean"][i] < -0.62
    q = np.abs(S.overlap_samples(res, i).ravel())
    assert 0.4 < q.mean() < 0.75 and (q < 0.3).mean() > 0.05
    hot = np.abs(S.overlap_samples(res, len(res.temperatures) - 1).ravel())
    assert hot.mean() < 0.2 and q.std() > 1.2 * hot.std()  # broad below T_c, narrow above
    e = tab["E_mean"].to_numpy()
    assert np.all(np.diff(e) > 0)  # energy rises with temperature
    assert -0.7633 - 0.05 < e[0] < e[i] - 0.01  # T = 0.3: near the finite-N ground state (Parisi: -0.7633, N -> inf)
    assert np.all((res.exchange_acceptance > 0.2) & (res.exchange_acceptance < 1)) and res.round_trips.sum() > 0
    assert np.all(np.diff(res.move_acceptance) > 0)  # more flips accepted when hotter
    assert res.equilibrated and np.all(res.equilibration["R_hat"] < 1.05)


def test_pt_bookkeeping_is_consistent(sk64):
    """Swaps move whole configurations with their energies: every stored sample's energy is the recorded one,
    and the final configurations are +-1 spins on the ladder."""
    p, res = sk64
    m, s_count, r, n = res.samples.shape
    assert (m, r, n) == (10, 6, 64) and s_count == 400 and res.energy.shape == (800, 10, 6)
    last = res.samples[:, -1].reshape(-1, n).double()
    assert np.allclose(p.energy(last).numpy().reshape(m, r), res.energy[-1])
    assert torch.equal(res.final, res.samples[:, -1].double())
    assert res.sample_sweeps[0] == 401 and res.sample_sweeps[-1] == 800
    q = S.overlap_matrix(res, 0)
    assert q.shape == (6, 6) and np.allclose(q, q.T) and np.allclose(np.diag(q), 1)
    assert S.overlap_samples(res, 0).shape == (400, 15)
    d = R.distances_from_overlaps(q, symmetric=True)
    assert np.all(d >= 0) and np.allclose(np.diag(d), 0)


def test_same_seed_same_run_and_start():
    p = lg.models.sk(16, seed=0)
    kw = dict(n_replicas=3, sweeps=40, burn_in=10, progress=False)
    a = S.parallel_tempering(p, [0.5, 1.0, 2.0], seed=7, **kw)
    b = S.parallel_tempering(p, [0.5, 1.0, 2.0], seed=7, **kw)
    c = S.parallel_tempering(p, [0.5, 1.0, 2.0], seed=8, **kw)
    assert torch.equal(a.samples, b.samples) and np.array_equal(a.energy, b.energy)
    assert a.equilibration.equals(b.equilibration)  # the q statistics too, bit for bit
    assert not np.array_equal(a.energy, c.energy)
    q = lg.models.quadratic(torch.eye(4))
    start = torch.tensor([3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    res = S.parallel_tempering(q, [1e-4, 2e-4], n_replicas=2, sweeps=20, burn_in=0, start=start, step_size=1e-3,
                               progress=False)
    assert res.energy[0].flatten() == pytest.approx(4.5, abs=0.05)  # every chain started at the given point


def test_bad_inputs_are_refused():
    p = lg.models.sk(8)
    q = lg.models.quadratic(torch.eye(3))
    for temps, msg in (([1.0, 0.5], "strictly increasing"), ([-1.0, 1.0], "positive"), ([[1.0]], "1-D"),
                       ([0.5, float("nan")], "NaN")):
        with pytest.raises(lg.LossglassError, match=msg):
            S.parallel_tempering(p, temps, n_replicas=2, sweeps=10, progress=False)
    with pytest.raises(lg.LossglassError, match="n_replicas"):
        S.parallel_tempering(p, [1.0], n_replicas=0, sweeps=10, progress=False)
    with pytest.raises(lg.LossglassError, match="step_size"):
        S.parallel_tempering(p, [1.0], n_replicas=2, sweeps=10, step_size=0.1, progress=False)
    with pytest.raises(lg.LossglassError, match="start must have shape"):
        S.parallel_tempering(q, [1.0], n_replicas=2, sweeps=20, step_size=0.1, start=torch.zeros(3, 3), progress=False)
    with pytest.raises(lg.LossglassError, match=r"\+1 and -1"):
        S.parallel_tempering(p, [1.0], n_replicas=2, sweeps=10, start=torch.zeros(8), progress=False)
    with pytest.raises(lg.LossglassError, match="burn_in"):
        S.parallel_tempering(p, [1.0], n_replicas=2, sweeps=10, burn_in=10, progress=False)
    with pytest.raises(lg.LossglassError, match="sample_every"):
        S.parallel_tempering(p, [1.0], n_replicas=2, sweeps=10, burn_in=5, sample_every=6, progress=False)
    with pytest.raises(lg.LossglassError, match="t_index"):
        S.overlap_samples(S.parallel_tempering(p, [1.0], n_replicas=2, sweeps=4, progress=False), 3)


def test_continuous_pt_on_the_pspin_sphere_and_a_network(tiny):
    ps = lg.models.spherical_pspin(12, 3, seed=0)
    res = S.parallel_tempering(ps, [0.5 * 12, 2.0 * 12], n_replicas=2, sweeps=60, burn_in=20, step_size=0.3,
                               progress=False)
    assert torch.allclose((res.samples.double() ** 2).sum(-1), torch.full(res.samples.shape[:3], 12.0, dtype=torch.float64))
    assert res.params["energy_scale"] == 12 and np.all(res.move_acceptance > 0)
    reps = lg.train(tiny, 2, epochs=2, batch_size=32, lr=0.1, progress=False)
    res = S.parallel_tempering(tiny, [1e-3, 1e-2], n_replicas=2, sweeps=30, burn_in=10, start=reps, normalize="filter",
                               progress=False)
    assert res.samples.shape == (2, 20, 2, tiny.n_params) and res.step_sizes is not None
    assert np.all(res.energy[0] < 2 * float(tiny.energy(reps.theta).max()))  # sampled inside the trained basins


def test_equilibration_flag_catches_stuck_replicas():
    """Plain Metropolis at T = 0.3 (one temperature, no exchange): the four replicas freeze in different valleys,
    each half agrees with itself but the replicas disagree (Gelman-Rubin R_hat > 1.1); the PT ladder of the
    ``sk64`` fixture mixes them (R_hat ~ 1.00, checked in test_sk_low_temperature_phase)."""
    res = S.parallel_tempering(lg.models.sk(64, seed=2), [0.3], n_replicas=4, sweeps=200, seed=0, progress=False)
    eq = res.equilibration
    assert not res.equilibrated and eq["R_hat"][0] > 1.1 and not eq["equilibrated"][0]
    assert np.isnan(res.table()["exchange_acceptance"][0]) and res.exchange_acceptance.shape == (0,)


# ---------------------------------------------------------------------------- equilibrium in q (issue 22)
STUDY_LADDER = np.round(np.arange(0.3, 1.61, 0.1), 2)  # the study's SK ladder (config.reference.sk_temperatures)


def _brute_pairs(res, i):
    """q_ab (S, R, R) of one temperature, from the full array (only for small tests)."""
    x = res.samples[i].double()
    if res.params["spins"] == "ising":
        return (x @ x.transpose(1, 2) / x.shape[-1]).numpy()
    u = x / x.norm(dim=-1, keepdim=True)
    return (u @ u.transpose(1, 2)).clamp(-1, 1).numpy()


def test_streamed_overlaps_match_the_full_array_whatever_the_block(monkeypatch):
    """overlap_samples and the pair statistics are filled block by block; with blocks of 5, 50 and 2^21 overlaps
    the results equal the (S, R, R) array's, and the jackknife z of the equilibration table equal a brute-force
    leave-one-replica-out recomputation."""
    p = lg.models.sk(16, seed=0)
    res = S.parallel_tempering(p, [0.5, 1.0, 2.0], n_replicas=7, sweeps=201, seed=1, progress=False)
    r = 7
    iu = np.triu_indices(r, 1)
    eq = res.equilibration
    for budget in (5, 50, 2**21):
        monkeypatch.setattr(S, "_BLOCK_OVERLAPS", budget)
        for i in range(3):
            q = _brute_pairs(res, i)
            assert np.array_equal(S.overlap_samples(res, i), q[:, iu[0], iu[1]])
            st = S._overlap_stats(res.samples[i], True)
            pairs = q[:, iu[0], iu[1]]
            assert np.allclose(st["tot"], [np.abs(pairs).sum(1), (pairs**2).sum(1), (np.abs(pairs) < 0.3).sum(1)])
            off = q * (1 - np.eye(r))
            assert np.allclose(st["row"][1], (off**2).sum(2)) and np.allclose(st["row"][0], np.abs(off).sum(2))
            g = q.mean(0)[iu]
            assert np.allclose(st["g_sum"][0], g.sum()) and np.allclose(st["g_sq"][0], (g**2).sum())
    h = res.samples.shape[1] // 2
    for i in range(3):
        q = _brute_pairs(res, i)

        def pair_mean(keep, f, q=q):
            return np.mean([f(q[:, a, b]) for a in keep for b in keep if a < b], 0)  # (S,)

        def jack_z(stat):
            loo = np.array([stat([b for b in range(r) if b != a]) for a in range(r)])
            return stat(range(r)) / np.sqrt((r - 1) / r * ((loo - loo.mean()) ** 2).sum())

        for col, f in (("absq_z", np.abs), ("q2_z", np.square), ("small_q_z", lambda v: (np.abs(v) < 0.3) * 1.0)):
            assert eq[col][i] == pytest.approx(jack_z(lambda k, f=f: pair_mean(k, f)[h:2 * h].mean()
                                                      - pair_mean(k, f)[:h].mean()), rel=1e-9)
        assert eq["q_mean_z"][i] == pytest.approx(jack_z(lambda k: pair_mean(k, lambda v: v).mean()), rel=1e-9)
        assert eq["q3_z"][i] == pytest.approx(jack_z(lambda k: pair_mean(k, lambda v: v**3).mean()), rel=1e-9)
        assert eq["q2"][i] == pytest.approx((q[:, iu[0], iu[1]] ** 2).mean())
    # continuous problems: normalised overlaps
    qd = lg.models.quadratic(torch.eye(5))
    res = S.parallel_tempering(qd, [0.1, 0.2], n_replicas=5, sweeps=40, burn_in=20, step_size=0.3, progress=False)
    monkeypatch.setattr(S, "_BLOCK_OVERLAPS", 3)
    q = _brute_pairs(res, 1)
    iu = np.triu_indices(5, 1)
    assert np.allclose(S.overlap_samples(res, 1), q[:, iu[0], iu[1]])
    assert np.isnan(res.equilibration["q_mean"]).all() and res.equilibration["q_symmetric"].all()


def test_no_s_r_r_array_on_the_default_path(monkeypatch):
    """R = 1500 replicas, S = 4 samples, a budget of 2^16 overlaps per block: the (S, R, R) overlaps would be 9e6
    numbers; no block the streamed statistics hold exceeds the budget, every pair is visited, and the run uses no
    other route to the overlaps (measured at R = 6000: peak RSS 0.72 GiB for the whole run, see the issue-22 note)."""
    monkeypatch.setattr(S, "_BLOCK_OVERLAPS", 2**16)
    sizes = []
    blocks = S._pair_blocks

    def spy(x, ising, budget=None):
        for out in blocks(x, ising, budget):
            sizes.append(out[4].numel())
            yield out

    monkeypatch.setattr(S, "_pair_blocks", spy)
    monkeypatch.setattr(S, "_overlaps", lambda *a: pytest.fail("full overlap matrix built"))
    res = S.parallel_tempering(lg.models.sk(8, seed=0), [1.0], n_replicas=1500, sweeps=8, burn_in=4, progress=False)
    s_n, r = res.samples.shape[1:3]
    assert s_n * r * r > 100 * 2**16 and max(sizes) <= 2**16 and sum(sizes) >= s_n * r * (r - 1) / 2
    assert res.equilibration["q_tested"][0] and np.isfinite(res.equilibration["absq_z"][0])


def test_flag_catches_sixty_sweeps_of_sk_that_the_energy_passes():
    """Issue 22: SK N = 64, the study's ladder, 32 replicas, 60 sweeps (burn-in 30). The energy halves agree and
    R_hat < 1.1 (the old flag passed), but the ladder has carried about one configuration in ten through a round
    trip (round-trip time ~ 300 sweeps against a burn-in of 30): not equilibrated. Over 60 disorder samples every
    run was flagged, none by the energy (benchmarks/bench_pt_equilibration.py)."""
    res = S.parallel_tempering(lg.models.sk(64, seed=1001), STUDY_LADDER, n_replicas=32, sweeps=60, seed=1,
                               progress=False)
    eq = res.equilibration
    assert eq["energy_ok"].all() and eq["q_tested"].all()  # what the energy-only flag saw
    assert not res.equilibrated and not eq["ladder_ok"].any()
    assert eq["round_trip_time"][0] > 5 * res.params["burn_in"]


def test_flag_catches_replicas_started_from_one_low_state():
    """Issue 22: all replicas started from one low state of the sample (the lowest of a 1000-sweep PT at T = 0.3),
    100 sweeps: energy R_hat < 1.1, but the replicas still remember the start: signed <q> > 0 and their overlap
    with the start is positive by > 4 errors at T = 0.3, so P(q) is not symmetric (q_symmetric False) besides the
    ladder being too short. The same start run 1000 sweeps has forgotten it and passes every check."""
    p = lg.models.sk(64, seed=1000)
    pre = S.parallel_tempering(p, STUDY_LADDER, n_replicas=4, sweeps=1000, seed=10_000, progress=False)
    low = pre.final[0, int(np.argmin(pre.energy[-1, 0]))]
    res = S.parallel_tempering(p, STUDY_LADDER, n_replicas=32, sweeps=100, seed=0, start=low, progress=False)
    eq = res.equilibration
    assert eq["energy_ok"].all() and (eq["R_hat"] < 1.1).all()
    assert not res.equilibrated and not eq["q_symmetric"][0] and not eq["ladder_ok"][0]
    assert eq["q_mean"][0] > 0.05 and eq["start_overlap"][0] > 0.1 and eq["start_z"][0] > eq["q_z_limit"][0]
    long = S.parallel_tempering(p, STUDY_LADDER, n_replicas=4, sweeps=1000, seed=0, start=low, progress=False)
    assert long.equilibrated and np.all(np.abs(long.equilibration["start_z"]) < long.equilibration["q_z_limit"])


def test_q_halves_see_a_drift_the_burn_in_would_have_removed():
    """No burn-in, 40 sweeps of SK N = 64 from random spins: the overlaps grow while the replicas fall into their
    valleys, so the first and second halves of <|q|> differ by many jackknife errors at low temperature."""
    res = S.parallel_tempering(lg.models.sk(64, seed=3), [0.3, 0.6, 1.6], n_replicas=16, sweeps=40, burn_in=0,
                               seed=0, progress=False)
    eq = res.equilibration
    assert eq["absq_z"][0] > eq["q_z_limit"][0] and eq["absq_second"][0] > eq["absq_first"][0]
    assert not eq["q_halves_ok"][0] and not res.equilibrated


def test_sign_flip_z_is_calibrated_under_random_starts():
    """With random starts every replica's trajectory is as likely as its flip, for any run length, so signed <q>
    and <q^3> are 0 in expectation exactly; their jackknife z (tested one-sided) must not exceed Student's
    one-sided 1% point more often than 1% (it errs on the safe side: a degenerate U-statistic). 40 short runs x 3
    temperatures x 2 moments."""
    from scipy.stats import t as student

    z = []
    for seed in range(40):
        res = S.parallel_tempering(lg.models.sk(16, seed=seed), [0.3, 0.6, 1.2], n_replicas=8, sweeps=60, seed=seed,
                                   progress=False)
        z.append(res.equilibration[["q_mean_z", "q3_z"]].to_numpy().ravel())
    z = np.concatenate(z)
    assert np.isfinite(z).all() and len(z) == 240
    assert (z > student.ppf(0.99, 7)).sum() <= 3  # 1% of 240 is 2.4
    assert 0.3 < z.std() < 1.1  # conservative, not degenerate


def test_q_checks_need_three_replicas_and_two_samples():
    p = lg.models.sk(12, seed=0)
    for kw in (dict(n_replicas=2, sweeps=40), dict(n_replicas=4, sweeps=40, burn_in=20, sample_every=20)):
        res = S.parallel_tempering(p, [0.5, 1.0], progress=False, **kw)
        eq = res.equilibration
        assert not eq["q_tested"].any() and eq["absq_z"].isna().all() and eq["q_halves_ok"].all()
        assert (eq["equilibrated"] == (eq["energy_ok"] & eq["ladder_ok"])).all()


def test_every_ladder_column_is_described():
    from lossglass.columns import describe

    res = S.parallel_tempering(lg.models.sk(12, seed=0), [0.5, 1.0], n_replicas=4, sweeps=60, progress=False,
                               start=torch.ones(12))
    tab = res.table()
    tab["disorder"] = 0
    assert [c for c in tab.columns if describe("reference_sk_ladder", c) is None] == []
    assert np.isfinite(tab["start_z"]).all()


@pytest.mark.slow
def test_physics_reference_run_passes_every_check():
    """PHYSICS.md's reference: N = 64, 16 temperatures 0.3-1.6, 3000 sweeps (here 16 replicas): equilibrated, with
    the ladder's round-trip time far below the burn-in and the reference <|q|> band at T = 0.42."""
    res = S.parallel_tempering(lg.models.sk(64, seed=1), np.geomspace(0.3, 1.6, 16), n_replicas=16, sweeps=3000,
                               seed=0, progress=False)
    eq = res.equilibration
    assert res.equilibrated, eq[~eq["equilibrated"]].T
    assert eq["round_trip_time"][0] < res.params["burn_in"] / 3
    i = res.index_of(0.42)
    assert 0.4 < (eq["absq_first"][i] + eq["absq_second"][i]) / 2 < 0.75
