import numpy as np
import pytest
import torch

import lossglass as lg
from lossglass import curvature as K


@pytest.fixture(scope="module")
def trained(tiny):
    return lg.train(tiny, 3, epochs=3, batch_size=32, lr=0.1, progress=False)


def _dense(prob, theta):
    x, y = prob.data["train"]
    return torch.autograd.functional.hessian(lambda t: prob.batch_loss(t.unsqueeze(0), x, y)[0], theta)


def test_top_eigenvalues_match_dense_hessian(tiny, trained):
    for r in range(2):
        h = _dense(tiny, trained.theta[r])
        ev = torch.linalg.eigvalsh(h).flip(0)
        res = K.top_eigenvalues(tiny, trained.theta[r], k=3, tol=1e-6)
        assert torch.allclose(res.values, ev[:3], rtol=1e-4)
        v = res.vectors[0]
        assert torch.allclose(h @ v, ev[0] * v, atol=1e-4 * float(ev[0]))
        assert res.n_hvp < tiny.n_params
    batched = K.top_eigenvalues(tiny, trained.theta, k=1, tol=1e-6)
    assert batched.values.shape == (3, 1)
    layer = K.top_eigenvalues(tiny, trained.theta[0], k=1, tol=1e-8, layer="2.weight")
    s = tiny._info["2.weight"].slice
    assert float(layer.values[0]) == pytest.approx(float(torch.linalg.eigvalsh(_dense(tiny, trained.theta[0])[s, s])[-1]),
                                                   rel=1e-4)


def test_trace_within_its_stated_error(tiny, trained):
    h = _dense(tiny, trained.theta[0])
    true = float(torch.trace(h))
    for method in ("hutchinson", "hutch++"):
        t = K.trace(tiny, trained.theta[0], n_probes=60, method=method, seed=1)
        assert abs(float(t["trace"]) - true) < 4 * float(t["stderr"]) + 1e-9, (method, t, true)
    # a deflated estimate with as many probes as parameters is exact up to round-off
    exact = K.trace(tiny, trained.theta[0], n_probes=3 * tiny.n_params, method="hutch++")
    assert float(exact["trace"]) == pytest.approx(true, rel=1e-6)


def test_density_integrates_to_one_and_mean_is_trace_over_p(tiny, trained):
    h = _dense(tiny, trained.theta[0])
    sd = K.spectral_density(tiny, trained.theta[0], n_probes=100, steps=30)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-3)
    per_probe = (sd.weights * sd.nodes).sum(1)  # v^T H v / |v|^2 for each probe
    mean, se = per_probe.mean(), per_probe.std() / np.sqrt(len(per_probe))
    assert abs(mean - float(torch.trace(h)) / tiny.n_params) < 4 * se
    assert sd.nodes.max() == pytest.approx(float(torch.linalg.eigvalsh(h)[-1]), rel=1e-3)


def test_every_sharpness_is_zero_for_a_constant_energy():
    prob = lg.Problem.from_function(lambda t: 0 * t.sum(1) + 1.5, 6, dtype=torch.float64)
    theta = torch.randn(2, 6, dtype=torch.float64)
    for kind in ("average", "worst", "keskar"):
        assert torch.equal(lg.sharpness(prob, theta, 0.1, kind), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(lg.local_entropy(prob, theta), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(K.top_eigenvalues(prob, theta[0], k=1).values, torch.zeros(1, dtype=torch.float64))


def test_sharpness_on_a_quadratic_has_known_values():
    h = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
    quad = lg.models.quadratic(h)
    theta = torch.zeros(3, dtype=torch.float64)
    # worst case in the rho-ball around the minimum: rho^2 lambda_max / 2
    assert float(lg.sharpness(quad, theta + 1e-9, 0.1, "worst", n_steps=20)) == pytest.approx(0.02, rel=1e-3)


def test_sam_lowers_worst_case_sharpness(teacher_ds):
    prob = lg.Problem(lg.models.mlp(8, 16, 3), teacher_ds, dtype=torch.float64)
    kw = dict(epochs=30, batch_size=32, lr=0.05, seed=0, progress=False)
    sgd = lg.train(prob, 4, **kw)
    sam = lg.train(prob, 4, method="sam", rho=0.2, **kw)
    s_sgd = lg.sharpness(prob, sgd.theta, 0.5, "worst")
    s_sam = lg.sharpness(prob, sam.theta, 0.5, "worst")
    assert float(s_sam.mean()) < float(s_sgd.mean())
    lam_sgd = K.top_eigenvalues(prob, sgd.theta, tol=1e-4).values.mean()
    lam_sam = K.top_eigenvalues(prob, sam.theta, tol=1e-4).values.mean()
    assert float(lam_sam) < float(lam_sgd)


def test_flatness_table_and_kendall(tiny, trained):
    df = K.flatness_table(tiny, trained, trace_probes=6, n_samples=4)
    for m in K.MEASURES:
        assert m in df and np.isfinite(df[m]).all()
    df2 = df.copy()
    df2["gap_error"] = df2["lambda_max"] * 2  # perfectly concordant by construction
    taus = K.rank_correlations(df2, measures=["lambda_max"], n_boot=50)
    assert taus["kendall_tau"].iloc[0] == pytest.approx(1.0)


def test_bad_curvature_inputs(tiny, trained):
    with pytest.raises(lg.LossglassError, match="k must be an int in 1..63"):
        K.top_eigenvalues(tiny, trained.theta[0], k=64)
    with pytest.raises(lg.LossglassError, match=r"tol must be in \(0, 1\)"):
        K.top_eigenvalues(tiny, trained.theta[0], tol=0.0)
    bad = trained.theta[0].clone()
    bad[3] = float("inf")
    with pytest.raises(lg.LossglassError, match="NaN or inf"):
        K.trace(tiny, bad)
    with pytest.raises(lg.LossglassError, match="unknown layer"):
        K.top_eigenvalues(tiny, trained.theta[0], layer="fc9.weight")
    with pytest.raises(lg.LossglassError, match="rho must be > 0"):
        lg.sharpness(tiny, trained.theta[0], rho=-1)
    with pytest.raises(lg.LossglassError, match="unknown sharpness kind"):
        lg.sharpness(tiny, trained.theta[0], kind="median")
