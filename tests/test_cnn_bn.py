import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg
from lossglass.datasets import from_tensors


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g)
    y = ((x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:, :4].mean((1, 2)) > 0.1).long())
    return from_tensors(x[:240], y[:240], x[240:], y[240:], n_classes=3)


@pytest.fixture(scope="module")
def cnn_problem(images):
    return lg.Problem(lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3), images, dtype=torch.float64)


def _reference_loss(prob, theta, x, y):
    """The module in training mode on the whole set as one batch: BatchNorm uses exactly the set's statistics."""
    m = prob.to_module(theta).train()
    return F.cross_entropy(m(x), y)


def test_cnn_forward_equals_module_with_recomputed_statistics(cnn_problem, images):
    prob = cnn_problem
    assert prob._seq is not None and prob._bn
    theta = prob.init(3, 0)
    e = prob.energy(theta)
    x, y = prob.data["train"]
    for k in range(3):
        assert abs(float(e[k]) - float(_reference_loss(prob, theta[k], x, y))) < 1e-10
        # to_module carries the statistics: eval mode reproduces evaluate()
        m = prob.to_module(theta[k]).eval()
        assert abs(float(F.cross_entropy(m(x), y)) - float(e[k])) < 1e-10
    g = prob.grad(theta)
    m = prob.to_module(theta[1]).train()
    F.cross_entropy(m(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.allclose(g[1], ref, atol=1e-10)  # one chunk: batch statistics = training-set statistics


def test_batchnorm_path_endpoints_equal_endpoint_losses(cnn_problem):
    prob = cnn_problem
    reps = lg.train(prob, 2, epochs=3, batch_size=40, lr=0.05, progress=False)
    a, b = reps.theta
    path = lg.interpolate(prob, a, b, n_points=7)
    x, y = prob.data["train"]
    assert path.train_loss[0] == pytest.approx(float(_reference_loss(prob, a, x, y)), abs=1e-12)
    assert path.train_loss[-1] == pytest.approx(float(_reference_loss(prob, b, x, y)), abs=1e-12)
    mid = 0.5 * (a + b)
    assert path.train_loss[3] == pytest.approx(float(_reference_loss(prob, mid, x, y)), abs=1e-12)
    assert float(reps.table["train_loss"].max()) < 1.0  # it learned


def test_cnn_channel_permutation_and_alignment(cnn_problem):
    prob = cnn_problem
    spec = lg.symmetry.spec_of(prob)
    assert set(spec.sizes(prob).values()) == {3, 4}
    assert any(len(e) == 3 and e[2] == 4 for e in spec.perms["P1"])  # 4 channels of 2x2 before the Linear
    theta = lg.train(prob, 1, epochs=2, batch_size=40, lr=0.05, progress=False).theta[0]
    moved = lg.permute(prob, theta, lg.random_permutation(prob, seed=3))
    assert not torch.allclose(moved, theta)
    x = prob.data["test"][0]
    stats_a = prob.bn_statistics(theta[None])
    stats_b = prob.bn_statistics(moved[None])
    assert torch.allclose(prob.forward(moved[None], x, stats_b), prob.forward(theta[None], x, stats_a), atol=1e-10)
    assert float(prob.energy(moved)) == pytest.approx(float(prob.energy(theta)), abs=1e-12)
    aligned, _ = lg.align(prob, theta, moved)
    assert float((aligned - theta).norm()) == 0.0
    aligned, _ = lg.align(prob, theta, moved, method="activation")
    assert float((aligned - theta).norm()) == 0.0


def test_layernorm_mlp_and_batch_mode(images):
    model = nn.Sequential(nn.Linear(64, 10), nn.LayerNorm(10), nn.ReLU(), nn.Linear(10, 3))
    prob = lg.Problem(model, images, dtype=torch.float64)
    theta = prob.init(2, 1)
    x, y = prob.data["train"]
    for k in range(2):
        ref = F.cross_entropy(prob.to_module(theta[k])(x), y)
        assert abs(float(prob.energy(theta[k])) - float(ref)) < 1e-10
    moved = lg.permute(prob, theta[0], lg.random_permutation(prob, 1))
    assert float(prob.energy(moved)) == pytest.approx(float(prob.energy(theta[0])), abs=1e-12)
    batch = lg.Problem(lg.models.cnn((1, 8, 8), channels=(3,), n_classes=3), images, dtype=torch.float64,
                       batchnorm="batch", memory_mb=0.01)
    full = lg.Problem(lg.models.cnn((1, 8, 8), channels=(3,), n_classes=3), images, dtype=torch.float64)
    th = full.init(1, 0)
    assert batch.chunk_size(1) < 240  # chunked: per-chunk statistics differ from the full set's
    assert float(batch.energy(th)[0]) != pytest.approx(float(full.energy(th)[0]), abs=1e-9)
    with pytest.raises(lg.LossglassError, match="unknown batchnorm mode"):
        lg.Problem(lg.models.cnn((1, 8, 8), channels=(3,), n_classes=3), images, batchnorm="frozen")


def test_fixed_statistics_mode(images):
    prob = lg.Problem(lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3), images, dtype=torch.float64,
                      batchnorm="fixed")
    full = lg.Problem(lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3), images, dtype=torch.float64)
    reps = lg.train(full, 2, epochs=3, batch_size=40, lr=0.05, progress=False)
    a, b = reps.theta
    with pytest.raises(lg.LossglassError, match="freeze_batchnorm"):
        prob.energy(a)
    prob.freeze_batchnorm(a)
    path = lg.interpolate(prob, a, b, n_points=5)
    assert path.train_loss[0] == pytest.approx(float(full.energy(a)), abs=1e-12)  # at the reference: identical
    assert abs(path.train_loss[-1] - float(full.energy(b))) > 1e-6  # B judged with A's statistics: different
    m = full.to_module(a).eval()
    m.load_state_dict(full.to_module(a).state_dict())
    x, y = prob.data["train"]
    for name, mod in full.to_module(b).named_parameters():  # b's weights, a's running statistics = eval mode
        m.get_parameter(name).data.copy_(mod.data)
    assert path.train_loss[-1] == pytest.approx(float(F.cross_entropy(m(x), y)), abs=1e-10)


class FreeFormBN(nn.Module):
    """Not a Sequential: BatchNorm inside a custom forward takes the vmap path with the module's statistics."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(64, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def test_free_form_module_with_batchnorm_uses_its_own_statistics(images):
    prob = lg.Problem(FreeFormBN(), images, dtype=torch.float64)
    assert prob.batchnorm == "module"
    theta = prob.init(2, 0)
    x, y = prob.data["train"]
    m = prob.to_module(theta[1]).eval()
    assert float(prob.energy(theta)[1]) == pytest.approx(float(F.cross_entropy(m(x), y)), abs=1e-10)
    r = lg.train(prob, 2, epochs=1, batch_size=40, lr=0.05, progress=False)
    assert torch.isfinite(r.theta).all()
