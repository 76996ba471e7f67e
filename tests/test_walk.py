import math

import numpy as np
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


def test_nan_walker_is_stopped_and_flagged():
    def fn(t):
        e = 0.5 * t.pow(2).sum(1)
        return torch.where(t[:, 0] > 0.3, torch.full_like(e, float("nan")), e)

    prob = lg.Problem.from_function(fn, 3, dtype=torch.float64)
    res = lg.random_walk(prob, torch.zeros(3, dtype=torch.float64), n_walkers=8, steps=50, step_size=0.1, seed=0,
                         progress=False)
    assert (~res.alive).any() and res.alive.any()
    stopped = torch.nonzero(~res.alive).flatten()
    assert torch.isnan(res.energy[-1, stopped]).all()
    assert torch.isfinite(res.energy[-1, res.alive]).all()
    assert W.summarize(res)["stopped_walkers"] == int((~res.alive).sum())


def test_start_from_replicas_and_filter_normalisation(tiny):
    reps = lg.train(tiny, 3, epochs=1, batch_size=32, lr=0.1, progress=False)
    res = lg.random_walk(tiny, reps, n_walkers=2, steps=5, step_size=0.01, normalize="filter", progress=False)
    assert res.n_walkers == 6 and res.start_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.allclose(res.energy[0], torch.repeat_interleave(tiny.energy(reps.theta), 2).double())
    scale = W.step_scale(tiny, reps.theta, "filter")
    w = tiny._info["0.weight"]
    row = reps.theta[0, w.slice].reshape(w.shape)[0]
    assert torch.allclose(scale[0, w.offset], row.norm() / math.sqrt(row.numel()))
    tab = res.table()
    assert {"step", "walker", "energy", "train_accuracy", "distance", "accepted", "test_loss"} <= set(tab.columns)
    assert tab["test_loss"].notna().sum() == 6 * len(res.test_steps)


def test_basin_radius_and_aging_on_known_traces():
    steps = 10
    e = torch.zeros(steps + 1, 2, dtype=torch.float64)
    e[:, 0] = torch.arange(steps + 1) * 0.1  # walker 0 climbs 0.1 per step
    d = torch.arange(steps + 1, dtype=torch.float64).unsqueeze(1).repeat(1, 2) * 2.0
    res = W.WalkResult("walk", e, e.clone(), d, torch.ones_like(e, dtype=torch.bool), [0], torch.zeros(1, 2),
                       torch.zeros(1, 2), [0, 5], torch.randn(2, 2, 4), torch.ones(2, dtype=torch.bool),
                       torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))
    br = W.basin_radius(res, [0.25])
    assert br["radius"].iloc[0] == 6.0 and np.isnan(br["radius"].iloc[1])  # E > 0.25 first at step 3
    ag = W.aging(res)
    assert list(ag.columns) == ["tw", "t", "C", "Delta"] and len(ag) == 1


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
