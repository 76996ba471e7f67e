"""lossglass.analyze: the three-line entry for one's own model (issue 28, item 11), checked against exact answers."""

import math

import pytest
import torch
from torch import nn

import lossglass as lg
from lossglass.analyze import layer_measures, power_law_alpha

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_analyze_one_model_matches_the_exact_hessian_and_any_data_form():
    x, y = _data()
    m = _model(0)
    res = lg.analyze(m, (x, y), trace_probes=3 * 43)  # Hutch++ with s = 43 >= P probes: the trace is exact
    params = list(m.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params]).double()

    def energy(v):
        out, i = [], 0
        for p in params:
            out.append(v[i:i + p.numel()].reshape(p.shape))
            i += p.numel()
        h = torch.tanh(x.double() @ out[0].T + out[1])
        return nn.functional.cross_entropy(h @ out[2].T + out[3], y)

    hess = torch.autograd.functional.hessian(energy, flat)
    ev = torch.linalg.eigvalsh(hess)
    row = res.table.iloc[0]
    assert row["n_params"] == flat.numel() == 43
    assert row["loss"] == pytest.approx(float(energy(flat)), rel=1e-5)
    assert row["top_eigenvalue"] == pytest.approx(float(ev[-1]), rel=2e-3)
    assert row["trace"] == pytest.approx(float(ev.sum()), rel=1e-4, abs=1e-5)
    assert row["sharpness"] > 0
    # a DataLoader of the same data gives the same table; the model is left as it was
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    again = lg.analyze(m, loader, trace_probes=3 * 43)
    assert again.table.equals(res.table)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double(), flat)
    assert list(res.layers["layer"]) == ["0.weight", "2.weight"]


def test_analyze_a_list_gives_pairs_barriers_and_overlaps():
    x, y = _data()
    res = lg.analyze([_model(0), _model(1), _model(0)], (x, y))
    assert len(res.table) == 3 and len(res.pairs) == 3
    same = res.pairs[(res.pairs["a"] == 0) & (res.pairs["b"] == 2)].iloc[0]
    assert same["overlap"] == pytest.approx(1.0) and same["barrier_naive"] == pytest.approx(0.0, abs=1e-6)
    other = res.pairs[(res.pairs["a"] == 0) & (res.pairs["b"] == 1)].iloc[0]
    assert other["distance_aligned"] <= other["distance_naive"] + 1e-6  # aligning never moves b away from a
    with pytest.raises(lg.LossglassError, match="share one architecture"):
        lg.analyze([_model(0), nn.Sequential(nn.Linear(4, 3))], (x, y))
    with pytest.raises(lg.LossglassError, match="DataLoader"):
        lg.analyze(_model(0), 3)


def test_power_law_alpha_recovers_a_known_exponent():
    g = torch.Generator().manual_seed(3)
    for alpha in (2.0, 3.5):
        u = torch.rand(3000, generator=g, dtype=torch.float64)
        x = 0.5 * u ** (-1 / (alpha - 1))  # Pareto with x_min = 0.5: p(x) ~ x^-alpha
        est, xmin, tail = power_law_alpha(x)
        se = (est - 1) / math.sqrt(tail)  # the MLE's standard error (Clauset et al. 2009, eq. 3.2)
        assert abs(est - alpha) < 4 * se + 0.02, (alpha, est, se)
        assert xmin < 1.0 and tail > 1000
    assert math.isnan(power_law_alpha(torch.ones(5))[0])


def test_layer_measures_stable_rank_is_exact():
    lin = nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6) * 2)
    rank1 = nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        rank1.weight.copy_(torch.outer(torch.arange(1.0, 5.0), torch.ones(6)))
    df = layer_measures(nn.Sequential(lin, rank1))
    assert df["stable_rank"].tolist() == pytest.approx([6.0, 1.0])
    assert df["spectral_norm"].iloc[0] == pytest.approx(2.0)
    assert df["frobenius_norm"].iloc[1] == pytest.approx(math.sqrt(30 * 6))


def test_analyze_a_model_that_does_not_fit_the_data_fails_in_one_line():
    x, y = _data()
    with pytest.raises(lg.LossglassError, match="the model does not run on inputs"):
        lg.analyze(nn.Sequential(nn.Linear(7, 3)), (x, y))


def test_analyze_image_models_with_batchnorm_through_a_dataloader():
    """A CNN that needs (N, 1, 8, 8) inputs and has BatchNorm: analysed as model.eval() computes it, and its channel
    symmetry is derived through the input reshaping, so aligned barriers exist."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,), generator=g)

    def make(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
        with torch.no_grad():  # stored statistics that are not (0, 1): eval mode must use them
            m[1].running_mean.uniform_(-0.5, 0.5, generator=g)
            m[1].running_var.uniform_(0.5, 2.0, generator=g)
        return m

    models = [make(0), make(1)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    res = lg.analyze(models, loader)
    for i, m in enumerate(models):
        m.eval()
        with torch.no_grad():
            want = float(nn.functional.cross_entropy(m(x), y))
        assert res.table["loss"][i] == pytest.approx(want, rel=1e-5)
    assert res.notes == [] and res.pairs["distance_aligned"][0] <= res.pairs["distance_naive"][0] + 1e-6
