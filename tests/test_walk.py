import math

import numpy as np
import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.protocols import walk as W


def _flat(p):
    return lg.Problem.from_function(lambda t: 0 * t.sum(1), p, dtype=torch.float64)


def test_isotropic_msd_equals_sigma2_t_p():
    p, sigma, steps, walkers = 50, 0.1, 40, 400
    res = lg.random_walk(_flat(p), torch.zeros(p, dtype=torch.float64), n_walkers=walkers, steps=steps,
                         step_size=sigma, seed=0, progress=False)
    t, m, alpha = lg.msd(res)
    expected = sigma**2 * t * p
    # theta_t ~ N(0, sigma^2 t I_P), so |theta_t|^2 = sigma^2 t chi^2_P: sd of the walker mean sigma^2 t sqrt(2P/W)
    se = sigma**2 * t * np.sqrt(2 * p / walkers)
    assert np.all(np.abs(m[1:] - expected[1:]) < 4 * se[1:])
    assert abs(alpha - 1) < 0.05


@pytest.mark.parametrize("kind", ["metropolis", "langevin"])
def test_equipartition_on_quadratic(kind):
    p, temp = 10, 0.2
    evals = torch.linspace(0.5, 2.0, p, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    quad = lg.models.quadratic(q @ torch.diag(evals) @ q.T)
    start = torch.zeros(p, dtype=torch.float64)
    if kind == "metropolis":
        res = lg.random_walk(quad, start, n_walkers=400, steps=600, step_size=0.12, temperature=temp, seed=1,
                             progress=False)
        assert 0.2 < float(res.acceptance_rate.mean()) < 0.9
    else:
        res = lg.langevin(quad, start, temperature=temp, lr=0.01, steps=600, n_walkers=400, seed=1, progress=False)
    e = res.energy[200:].numpy()  # after burn-in
    # independent walkers: the error of the grand mean from the spread of walker means
    walker_means = e.mean(0)
    mean, se = walker_means.mean(), walker_means.std() / math.sqrt(len(walker_means))
    expected = p * temp / 2
    if kind == "langevin":  # finite-step bias for Euler-Maruyama on a quadratic: T/(2(1 - lr*lambda/2)) per mode
        expected = float((temp / (2 * (1 - 0.01 * evals / 2))).sum())
    assert abs(mean - expected) < 4 * se + 1e-3, (mean, expected, se)
    assert abs(mean - p * temp / 2) < 0.05 * p * temp / 2


def test_zero_temperature_never_goes_uphill(tiny):
    theta = tiny.init(1, 0)[0]
    res = lg.random_walk(tiny, theta, n_walkers=6, steps=60, step_size=0.05, temperature=0.0, seed=2, progress=False)
    e = res.energy.numpy()
    assert np.all(np.diff(e, axis=0) <= 1e-12)
    assert res.accepted[1:].any()  # some downhill moves were taken


def test_walk_deterministic_and_walkers_independent(tiny):
    theta = tiny.init(1, 0)[0]
    kw = dict(steps=15, step_size=0.02, temperature=0.01, seed=3, progress=False)
    a = lg.random_walk(tiny, theta, n_walkers=4, **kw)
    b = lg.random_walk(tiny, theta, n_walkers=4, **kw)
    c = lg.random_walk(tiny, theta, n_walkers=7, **kw)
    assert torch.equal(a.energy, b.energy) and torch.equal(a.theta, b.theta)
    assert torch.allclose(a.theta, c.theta[:4], atol=1e-12)
    assert torch.equal(a.accepted, c.accepted[:, :4])


def _nan_region(a=0.3):
    """E = |theta|^2 / 2, but NaN where theta_0 > a."""
    def fn(t):
        e = 0.5 * t.pow(2).sum(1)
        return torch.where(t[:, 0] > a, torch.full_like(e, float("nan")), e)

    return lg.Problem.from_function(fn, 3, dtype=torch.float64)


def test_plain_walk_records_inf_in_a_nan_region_and_goes_on():
    res = lg.random_walk(_nan_region(), torch.zeros(3, dtype=torch.float64), n_walkers=8, steps=50, step_size=0.1,
                         seed=0, progress=False)
    assert res.alive.all()  # nobody is dropped
    inf = torch.isinf(res.energy)
    assert inf.any() and not torch.isnan(res.energy).any()
    assert torch.equal(res.nonfinite, inf.sum(0))  # one count per step spent in the region
    assert torch.equal(res.accepted[1:], torch.ones_like(res.accepted[1:]))  # every step is taken
    t, m, _ = lg.msd(res)  # the walk itself is unaffected: positions go on
    assert np.all(m[1:] > 0)
    br = W.basin_radius(res, [10.0])  # a rise of 10 is only reached by entering the region (E <= 1.5 elsewhere)
    first_inf = torch.where(inf.any(0), inf.int().argmax(0), -1)
    assert br["step"].tolist() == first_inf.tolist()
    s = W.summarize(res, [10.0])
    assert s["stopped_walkers"] == 0 and s["nonfinite"] == int(inf.sum())
    assert s["nonfinite_walkers"] == int(inf.any(0).sum()) and s["nonfinite_end"] == int(inf[-1].sum())
    assert math.isfinite(s["energy_end"])


def test_metropolis_rejects_nan_region_and_samples_the_truncated_law():
    # exp(-E/T) restricted to theta_0 <= a (E = +inf beyond): theta_0 is a normal truncated at a, the others N(0, T)
    a, temp, walkers = 0.3, 0.5, 400
    res = lg.random_walk(_nan_region(a), torch.zeros(3, dtype=torch.float64), n_walkers=walkers, steps=500,
                         step_size=0.6, temperature=temp, seed=4, progress=False)
    assert res.alive.all() and torch.isfinite(res.energy).all()
    assert (res.nonfinite > 0).all()  # every walker had proposals rejected for a NaN energy ...
    assert (res.theta[:, 0] <= a).all()  # ... and none was ever accepted
    assert W.summarize(res)["nonfinite"] == int(res.nonfinite.sum())
    sd = math.sqrt(temp)
    al = a / sd
    phi, cdf = math.exp(-al**2 / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(al / math.sqrt(2)))
    mean0 = -sd * phi / cdf  # truncated-normal mean: -0.388
    expected_e = temp / 2 * (1 - al * phi / cdf) + 2 * temp / 2  # <theta_0^2>/2 + (P - 1) T / 2 = 0.692
    wm = res.energy[100:].numpy().mean(0)
    assert abs(wm.mean() - expected_e) < 4 * wm.std() / math.sqrt(walkers), (wm.mean(), expected_e)
    x0 = res.theta[:, 0].numpy()
    assert abs(x0.mean() - mean0) < 4 * x0.std() / math.sqrt(walkers), (x0.mean(), mean0)
    others = res.theta[:, 1:].numpy()  # untouched directions keep Var = T
    assert abs(others.var() - temp) < 4 * temp * math.sqrt(2 / others.size)


def test_langevin_walker_stopped_by_nan_is_flagged_and_censored():
    res = lg.langevin(_nan_region(), torch.zeros(3, dtype=torch.float64), temperature=0.5, lr=0.05, steps=60,
                      n_walkers=8, seed=0, progress=False)
    assert (~res.alive).any() and res.alive.any()
    stopped = torch.nonzero(~res.alive).flatten()
    assert torch.isnan(res.energy[-1, stopped]).all() and torch.isfinite(res.energy[-1, res.alive]).all()
    assert torch.equal(res.nonfinite, (~res.alive).long())
    br = W.basin_radius(res, [10.0])  # never crossed: every walker censored, stopped ones at their last finite distance
    assert br["censored"].all()
    e, d = res.energy.numpy(), res.distance.numpy()
    last = np.where(np.isnan(e), -np.inf, d).max(0)
    assert np.allclose(br["censor_distance"].to_numpy(), last)
    s = W.summarize(res, [10.0])
    assert s["stopped_walkers"] == len(stopped) and s["radius_10_lower_bound"] and s["radius_10_censored"] == 1.0
    assert s["radius_10_median"] == pytest.approx(np.median(last))


def test_start_from_replicas_and_filter_normalisation(tiny):
    reps = lg.train(tiny, 3, epochs=1, batch_size=32, lr=0.1, progress=False)
    res = lg.random_walk(tiny, reps, n_walkers=2, steps=5, step_size=0.01, normalize="filter", progress=False)
    assert res.n_walkers == 6 and res.start_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(res.energy[0], torch.repeat_interleave(tiny.energy(reps.theta), 2).double())
    scale = W.step_scale(tiny, reps.theta, "filter")
    w = tiny.layout["0.weight"]
    row = reps.theta[0, w.slice].reshape(w.shape)[0]
    assert torch.allclose(scale[0, w.offset], row.norm() / math.sqrt(row.numel()))
    tab = res.table()
    assert {"step", "walker", "energy", "train_accuracy", "distance", "accepted", "test_loss"} <= set(tab.columns)
    assert tab["test_loss"].notna().sum() == 6 * len(res.test_steps)


def _traces(radius, crossed, steps=10):
    """Hand-made walk: walker i moves out linearly to ``radius[i]`` at step 5 and stays; a crossing walker's
    energy jumps from 0 to 1 at step 5 (so its radius at delta 0.5 is radius[i]); the others stay at 0."""
    r = torch.as_tensor(radius, dtype=torch.float64)
    w = len(r)
    t = torch.arange(steps + 1, dtype=torch.float64).unsqueeze(1)
    d = torch.minimum(t / 5, torch.ones(1, dtype=torch.float64)) * r
    e = torch.zeros(steps + 1, w, dtype=torch.float64)
    e[5:, torch.as_tensor(crossed)] = 1.0
    return W.WalkResult("walk", e, e.clone(), d, torch.ones_like(e, dtype=torch.bool), [0], torch.zeros(1, w),
                        torch.zeros(1, w), [0, 5], torch.randn(2, w, 4, dtype=torch.float64),
                        torch.ones(w, dtype=torch.bool), torch.zeros(w, dtype=torch.long), torch.zeros(w, 4))


@pytest.mark.parametrize("radius,crossed,median,lower,censored", [
    # no censoring, even count: the ordinary sample median
    ([1, 2, 3, 4], [1, 1, 1, 1], 2.5, False, 0.0),
    # textbook case, censored at 2 and 5: S = 5/6, 5/8, 5/12 at r = 1, 3, 4 -> 4 (dropping them gave 3.5)
    ([1, 2, 3, 4, 5, 6], [1, 0, 1, 1, 0, 1], 4.0, False, 2 / 6),
    # heavy censoring, 4 of 10 crossed: S = 6/7, 5/7, 15/28, 10/28 at r = 1, 2, 3, 4 -> 4 (dropping gave 2.5)
    ([1, 2, 3, 4, .5, .5, .5, 2.5, 6, 7], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], 4.0, False, 0.6),
    # 2 of 10 crossed, S stays at 0.8: only a lower bound, the median of all observed distances (dropping gave 1.5)
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], 5.5, True, 0.8),
])
def test_kaplan_meier_median_radius_on_known_traces(radius, crossed, median, lower, censored):
    crossed = [bool(c) for c in crossed]
    res = _traces(radius, crossed)
    br = W.basin_radius(res, [0.5])
    assert br["censored"].tolist() == [not c for c in crossed]
    assert np.allclose(br["radius"].fillna(-1), [r if c else -1 for r, c in zip(radius, crossed)])
    assert np.allclose(br["censor_distance"].fillna(-1), [-1 if c else r for r, c in zip(radius, crossed)])
    assert br["step"].tolist() == [5 if c else -1 for c in crossed]
    s = W.summarize(res, [0.5])
    assert s["radius_0.5_median"] == pytest.approx(median)
    assert s["radius_0.5_lower_bound"] is lower
    assert s["radius_0.5_censored"] == pytest.approx(censored)


def test_kaplan_meier_curve_and_quantiles():
    times, surv = W.kaplan_meier([1, 2, 3, 4, 5, 6], [1, 0, 1, 1, 0, 1])
    assert times.tolist() == [1, 3, 4, 6] and np.allclose(surv, [5 / 6, 5 / 8, 5 / 12, 0])
    assert W.km_quantile([1, 2, 3, 4, 5, 6], [1, 0, 1, 1, 0, 1], 0.25) == (3.0, False)
    assert W.km_quantile([1, 2, 3], [0, 0, 0]) == (2.0, True)  # nobody crossed
    assert math.isnan(W.km_quantile([np.nan], [False])[0])
    with pytest.raises(lg.LossglassError, match="deltas must be positive"):
        W.basin_radius(_traces([1.0], [True]), [0.0])


def test_aging_of_free_diffusion_matches_closed_form():
    # theta_t = theta_0 + sigma sum xi: Delta(tw, tw+t) = sigma^2 t, C(tw, tw+t) = |theta_0|^2/P + sigma^2 tw
    p, sigma, walkers, steps = 20, 0.1, 500, 60
    theta0 = torch.full((p,), 0.5, dtype=torch.float64)
    res = lg.random_walk(_flat(p), theta0, n_walkers=walkers, steps=steps, step_size=sigma, seed=6, progress=False)
    ag = W.aging(res)
    assert list(ag.columns) == ["tw", "t", "C", "Delta", "C_norm", "C_se", "Delta_se", "walkers"]
    assert len(ag) == len(res.snapshot_steps) * (len(res.snapshot_steps) - 1) // 2 and (ag["walkers"] == walkers).all()
    tw, t = ag["tw"].to_numpy(float), ag["t"].to_numpy(float)
    n0 = float(theta0 @ theta0)
    # exact standard errors: Delta ~ sigma^2 t chi^2_P / P; Var(theta(tw).theta(tw+t)) =
    # sigma^2 |theta_0|^2 (4 tw + t) + P sigma^4 tw (2 tw + t)
    se_d = sigma**2 * t * np.sqrt(2 / (p * walkers))
    se_c = np.sqrt((sigma**2 * n0 * (4 * tw + t) + p * sigma**4 * tw * (2 * tw + t)) / walkers) / p
    z_d = (ag["Delta"] - sigma**2 * t) / se_d
    z_c = (ag["C"] - (n0 / p + sigma**2 * tw)) / se_c
    assert np.abs(z_d).max() < 4.5 and np.abs(z_c).max() < 4.5, (np.abs(z_d).max(), np.abs(z_c).max())
    assert abs(z_d.mean()) < 1 and abs(z_c.mean()) < 1.5  # no systematic offset
    assert np.allclose(ag["Delta_se"], se_d, rtol=0.3) and np.allclose(ag["C_se"][tw > 0], se_c[tw > 0], rtol=0.3)
    # it ages: at fixed t, C grows with tw by sigma^2 tw
    big = ag[(ag["t"] == ag["t"].max())]
    assert len(big) == 1 and big["C"].iloc[0] > n0 / p
    # the normalised version is <= 1 and a 1-walker walk gives NaN errors, no warning
    assert (ag["C_norm"] <= 1 + 1e-12).all() and (W.aging(res, normalized=True)["C"] == ag["C_norm"]).all()
    one = W.aging(lg.random_walk(_flat(p), theta0, steps=5, step_size=sigma, seed=6, progress=False))
    assert one["C_se"].isna().all() and one["walkers"].eq(1).all()


def test_bad_walk_inputs(tiny):
    theta = tiny.init(1, 0)[0]
    with pytest.raises(lg.LossglassError, match="step_size must be a positive number"):
        lg.random_walk(tiny, theta, step_size=-0.1)
    with pytest.raises(lg.LossglassError, match="temperature must be None or >= 0"):
        lg.random_walk(tiny, theta, step_size=0.1, temperature=-1.0)
    with pytest.raises(lg.LossglassError, match=r"start must have shape \(63,\)"):
        lg.random_walk(tiny, theta[:10], step_size=0.1)
    with pytest.raises(lg.LossglassError, match="unknown normalize"):
        lg.random_walk(tiny, theta, step_size=0.1, normalize="row")
    with pytest.raises(lg.LossglassError, match="lr must be > 0"):
        lg.langevin(tiny, theta, temperature=0.1, lr=0.0)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["walk", "metropolis", "langevin"])
def test_walk_checkpoint_resume_equals_uninterrupted(tiny, tmp_path, kind):
    """A walk killed mid-way and started again with the same checkpoint file ends bit-identical to one that ran
    through; the checkpoint also holds traces, test evaluations, snapshots and RNG states (Metropolis: two streams)."""
    start = tiny.init(2, 0)
    ck = tmp_path / f"{kind}.safetensors"

    calls = {"n": 0}

    def run(checkpoint=None, fail_at=None):
        calls["n"] = 0
        orig = type(tiny).evaluate

        class Dying(type(tiny)):  # counts training evaluations; dies after fail_at of them
            def evaluate(self, theta, split="train"):
                if split == "train":
                    calls["n"] += 1
                    if fail_at is not None and calls["n"] > fail_at:
                        raise _Interrupt
                return orig(self, theta, split)

        prob = object.__new__(Dying)
        prob.__dict__.update(tiny.__dict__)
        kw = dict(n_walkers=2, steps=23, record_every=4, seed=3, progress=False, checkpoint=checkpoint,
                  checkpoint_every=5)
        if kind == "langevin":
            return lg.langevin(prob, start, temperature=1e-3, lr=0.05, **kw)
        return lg.random_walk(prob, start, step_size=0.05, temperature=None if kind == "walk" else 0.05, **kw)

    ref = run()
    with pytest.raises(_Interrupt):
        run(ck, fail_at=13)  # dies during step 12: the checkpoint holds step 10
    assert ck.exists()
    res = run(ck)
    assert calls["n"] == 1 + 23 - 10  # the start's evaluation, then only steps 11..23 were walked
    for name in ("energy", "accuracy", "distance", "accepted", "test_loss", "test_accuracy", "snapshots", "theta",
                 "alive", "nonfinite"):
        a, b = getattr(ref, name), getattr(res, name)
        assert torch.equal(torch.nan_to_num(a.double() if a.dtype != torch.bool else a),
                           torch.nan_to_num(b.double() if b.dtype != torch.bool else b)), name
    again = run(ck)  # a finished walk's checkpoint returns the result without walking
    assert torch.equal(again.theta, ref.theta)


def test_walk_checkpoint_of_another_walk_is_refused(tiny, tmp_path):
    ck = tmp_path / "w.safetensors"
    start = tiny.init(1, 0)
    lg.random_walk(tiny, start, steps=6, step_size=0.05, seed=0, progress=False, checkpoint=ck, checkpoint_every=2)
    with pytest.raises(lg.LossglassError, match="another walk"):
        lg.random_walk(tiny, start, steps=6, step_size=0.07, seed=0, progress=False, checkpoint=ck)


def test_km_groups_interval_from_the_band_by_hand():
    z = 1.959963984540054
    # textbook set, censored at 2 and 5: S = 5/6, 5/8, 5/12, 0 at 1, 3, 4, 6; Greenwood v = 1/30, 7/60, 17/60, inf.
    # log-log band S^exp(+-z sqrt(v)/|log S|): lower 0.273 at r = 1 (<= 1/2), upper 0.975, 0.893, 0.767, then S = 0
    # (uninformative): the median 4 has the interval [1, inf)
    k = W.km_groups([1, 2, 3, 4, 5, 6], [1, 0, 1, 1, 0, 1])
    assert k["value"][0] == 4 and k["ci_low"][0] == 1 and k["ci_high"][0] == math.inf and not k["lower_bound"][0]
    assert k["censored"][0] == pytest.approx(2 / 6) and k["n"][0] == 6
    # uncensored r = 1..n: at the j-th crossing S = 1 - j/n and v = j / (n (n - j)); the ends are the first j whose
    # lower (upper) band value is <= 1/2
    n = 40
    j = np.arange(1, n)
    s, v = 1 - j / n, j / (n * (n - j))
    f = np.exp(z * np.sqrt(v) / np.abs(np.log(s)))
    lo_end, hi_end = j[np.argmax(s**f <= 0.5)], j[np.argmax(s ** (1 / f) <= 0.5)]
    k = W.km_groups(np.arange(1.0, n + 1), np.ones(n, bool))
    assert k["value"][0] == 20.5 and (k["ci_low"][0], k["ci_high"][0]) == (lo_end, hi_end)
    assert 13 <= lo_end < 20.5 < hi_end <= 28  # (an exact binomial interval for the median of 40: order stats 14, 27)
    # ties: S at the tie equals kaplan_meier's; groups of unequal size (NaN-padded) equal one-group calls
    r, c = [1, 1, 2, 2, 2, 3, 4], [1, 1, 1, 0, 1, 0, 1]  # S = 5/7, then 5/7 * 3/5 = 3/7 at r = 2 (two crossings)
    times, surv = W.kaplan_meier(r, c)
    assert W.km_groups(r, c)["value"][0] == times[np.argmax(surv <= 0.5)] == 2
    # S = 4/6, then exactly 1/2 at r = 2 up to the next crossing at 3.5: the midpoint, as R's survfit
    assert W.km_groups([1, 1, 2, 2, 3, 3.5], [1, 1, 0, 1, 0, 1])["value"][0] == 2.75
    rows = np.array([r, [2, 1, 4, 3, np.nan, np.nan, np.nan]])
    crossed = np.array([c, [1, 0, 1, 1, 0, 0, 0]], bool)
    both = W.km_groups(rows, crossed)
    for i in range(2):
        one = W.km_groups(rows[i][np.isfinite(rows[i])], crossed[i][np.isfinite(rows[i])])
        for key in ("value", "lower_bound", "ci_low", "ci_high", "censored", "n"):
            assert both[key][i] == one[key][0], key


def test_km_median_interval_covers_at_its_level():
    # exponential radii (median ln 2), 16 walkers censored at a common reach 1.1 (about a third censored), 3,000 sets:
    # the 95% interval covers the true median in 93-97.5% (the simulated rate is 0.954; Wilson half-width ~0.008)
    rng = np.random.default_rng(0)
    r = rng.exponential(1.0, (3000, 16))
    crossed = r <= 1.1
    k = W.km_groups(np.where(crossed, r, 1.1), crossed)
    cover = (k["ci_low"] <= math.log(2)) & (math.log(2) <= k["ci_high"])
    assert 0.93 <= cover.mean() <= 0.975, cover.mean()
    assert k["lower_bound"].mean() < 0.1 and 0.25 < k["censored"].mean() < 0.4


def test_relative_threshold_follows_the_start_energy():
    # walker i's energy climbs linearly from E0_i by 0.05 per step: a rise of delta |E0| is first exceeded at step
    # delta |E0| / 0.05 + 1; the absolute threshold (a rise of 0.5) ignores E0
    e0 = torch.tensor([0.2, 1.0, -2.0], dtype=torch.float64)
    t = torch.arange(21, dtype=torch.float64).unsqueeze(1)
    res = _traces([1.0, 1.0, 1.0], [False] * 3, steps=20)
    res.energy = e0 + 0.05 * t
    res.distance = t.repeat(1, 3) / 10
    rel = W.basin_radius(res, [0.5], relative=True)
    assert rel["step"].tolist() == [3, 11, -1]  # a rise of 0.1, 0.5 and 1.0: the last needs step 21 of 20
    assert rel["censored"].tolist() == [False, False, True]
    assert np.allclose(rel["threshold"], e0.numpy() + 0.5 * np.abs(e0.numpy()))
    ab = W.basin_radius(res, [0.5])
    assert ab["step"].tolist() == [11, 11, 11] and np.allclose(ab["radius"], 1.1)


def test_report_words_say_when_a_radius_is_a_bound():
    from lossglass.report import walk as RW

    never = W.summarize(_traces([1, 2, 3, 4], [False] * 4), [0.5])  # nobody crossed: >= the median reach, 2.5
    some = W.summarize(_traces([1, 2, 3, 4, 5, 6], [c == 1 for c in (1, 0, 1, 1, 0, 1)]), [0.5])  # the textbook set: 4, [1, inf)
    rows = []
    for i, s in enumerate((never, some)):
        s.update(run=i, label=f"walk {i}")
        rows.append(s)

    class View:
        def table(self, name):
            return pd.DataFrame(rows) if name == "walk_summary" else None

    said = {name: value for name, value, _ in RW.summary(View())}
    assert said["Basin radius (walk 0, loss rise 0.5)"] == "≥ 2.5 (100% censored)"
    assert said["Basin radius (walk 1, loss rise 0.5)"] == ("4 (33% censored), 95% interval 1 to ∞ (too few "
                                                               "crossings to bound it above)")
    ov = RW.overview(View())
    assert ov["radius_text"] == "≥ 2.5 (100% censored, ΔE 0.5)" and ov["radius_lower_bound"] and ov["radius_censored"] == 1
