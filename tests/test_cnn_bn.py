import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg

from .conftest import image_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return image_task(240, 60)


@pytest.fixture(scope="module")
def cnn_problem(images):
    return lg.Problem(lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3), images, dtype=torch.float64)


def _reference_loss(prob, theta, x, y):
    """The module in training mode on the whole set as one batch: BatchNorm uses exactly the set's statistics."""
    m = prob.to_module(theta).train()
    return F.cross_entropy(m(x), y)


def test_cnn_forward_equals_module_with_recomputed_statistics(cnn_problem, images):
    prob = cnn_problem
    assert prob.backend.name == "stack" and prob.has_batchnorm
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
    with pytest.raises(lg.LossglassError, match="with_frozen_batchnorm"):
        prob.energy(a)
    frozen = prob.with_frozen_batchnorm(a)
    assert frozen is not prob and frozen.batchnorm == "fixed" and frozen.model is prob.model
    with pytest.raises(lg.LossglassError, match="with_frozen_batchnorm"):
        prob.energy(a)  # a new problem: this one is unchanged
    # freezing a recompute problem at a gives the same energy, and leaves the recompute problem as it was
    assert torch.equal(full.with_frozen_batchnorm(a).energy(b), frozen.energy(b))
    assert full.batchnorm == "recompute"
    assert frozen.subset(100).bn_policy.frozen is frozen.bn_policy.frozen  # carried over to a subset
    prob = frozen
    path = lg.interpolate(prob, a, b, n_points=5)
    assert path.train_loss[0] == pytest.approx(float(full.energy(a)), abs=1e-12)  # at the reference: identical
    assert abs(path.train_loss[-1] - float(full.energy(b))) > 1e-6  # B judged with A's statistics: different
    m = full.to_module(a).eval()
    m.load_state_dict(full.to_module(a).state_dict())
    x, y = prob.data["train"]
    for name, mod in full.to_module(b).named_parameters():  # b's weights, a's running statistics = eval mode
        m.get_parameter(name).data.copy_(mod.data)
    assert path.train_loss[-1] == pytest.approx(float(F.cross_entropy(m(x), y)), abs=1e-10)


def _smooth_bn_cnn():
    """A BatchNorm CNN without kinks (tanh, average pooling): finite differences see no ReLU or max-pool switch."""
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 3))


def _unit(gen, shape):
    v = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("mode", ["recompute", "batch", "fixed"])
def test_batchnorm_derivatives_are_those_of_the_energy(images, mode):
    """grad and hvp against central finite differences of energy(), over several data chunks, for 1 and 8
    replicas batched (the chunk size falls with K: 100 and 16 samples of 240)."""
    prob = lg.Problem(_smooth_bn_cnn(), images, dtype=torch.float64, memory_mb=0.3, batchnorm=mode, bn_batch=32)
    assert prob.chunk_size(1) < 240 and prob.chunk_size(8) < prob.chunk_size(1)
    theta = prob.init(8, 0)
    if mode == "fixed":
        prob = prob.with_frozen_batchnorm(theta[0])
    gen = torch.Generator().manual_seed(1)
    v, w = _unit(gen, theta.shape), _unit(gen, theta.shape)
    for k in (1, 8):
        t, vv, ww = theta[:k], v[:k], w[:k]
        e, g = prob.energy_and_grad(t)
        assert torch.allclose(e, prob.energy(t), atol=1e-13, rtol=0)
        h = 1e-5
        fd = (prob.energy(t + h * vv) - prob.energy(t - h * vv)) / (2 * h)
        assert torch.allclose((g * vv).sum(1), fd, atol=1e-8, rtol=0), (mode, k)
        hv = prob.hvp(t, vv)
        h = 1e-4  # w^T H v from four energies
        fd2 = (prob.energy(t + h * (vv + ww)) - prob.energy(t + h * (vv - ww)) - prob.energy(t - h * (vv - ww))
               + prob.energy(t - h * (vv + ww))) / (4 * h * h)
        assert torch.allclose((hv * ww).sum(1), fd2, atol=1e-5, rtol=0), (mode, k)
        h = 1e-6  # the whole vector: H v = d/dh grad E(theta + h v)
        fdg = (prob.grad(t + h * vv) - prob.grad(t - h * vv)) / (2 * h)
        assert float(((hv - fdg).norm(dim=1) / fdg.norm(dim=1)).max()) < 1e-4, (mode, k)
    assert torch.allclose(prob.hvp_operator(theta[:1])(v[:1]), prob.hvp(theta[:1], v[:1]), atol=1e-12)


def test_batchnorm_hessian_of_a_replica_does_not_depend_on_its_batch(images):
    model = lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3)
    chunked = lg.Problem(model, images, dtype=torch.float64, memory_mb=0.3)
    whole = lg.Problem(model, images, dtype=torch.float64, memory_mb=1000.0)
    assert chunked.chunk_size(8) < chunked.chunk_size(1) < 240 <= whole.chunk_size(8)
    theta = chunked.init(8, 0)
    v = torch.randn(8, chunked.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    # one chunk: autograd through the batch statistics of the whole set is the exact reference
    ref_g, ref_hv = whole.grad(theta[:1]), whole.hvp(theta[:1], v[:1])
    for k in (1, 8):
        assert torch.allclose(chunked.grad(theta[:k])[0], ref_g[0], atol=1e-12)
        assert torch.allclose(chunked.hvp(theta[:k], v[:k])[0], ref_hv[0], atol=1e-11)
    # batch mode: statistics of fixed BatchNorm batches, so the energy is the same for any number of replicas
    batch = lg.Problem(model, images, dtype=torch.float64, memory_mb=0.3, batchnorm="batch", bn_batch=48)
    assert torch.allclose(batch.energy(theta[:1])[0], batch.energy(theta)[0], atol=1e-14)
    assert torch.allclose(batch.hvp(theta[:1], v[:1])[0], batch.hvp(theta, v)[0], atol=1e-11)
    x, y = batch.data["train"]
    m = batch.to_module(theta[0]).train()  # five BatchNorm batches of 48, each with its own statistics
    ref = sum(F.cross_entropy(m(x[i:i + 48]), y[i:i + 48], reduction="sum") for i in range(0, 240, 48)) / 240
    assert float(batch.energy(theta[0])) == pytest.approx(float(ref), abs=1e-12)
    with pytest.raises(lg.LossglassError, match="bn_batch must be an int >= 2"):
        lg.Problem(model, images, batchnorm="batch", bn_batch=1)


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
