"""Every forward path of Problem against the vmap reference (as curvlinops tests its operators against torch.func):
energies, accuracies, gradients, Hessian-vector products, mini-batch gradients and affine families, in float64
where exactness is checked, over several data chunks.

The reference is an independent energy: ``torch.func.functional_call`` of the module under ``vmap`` over the
replicas on the whole split at once, cross-entropy from ``F.cross_entropy``, derivatives by autograd
(:class:`~lossglass.energy.FunctionProblem`). For BatchNorm the reference module runs in training mode on the
whole training set (no running statistics), which is the definition of the recompute energy; batch mode is the
reference on each BatchNorm batch; fixed mode is eval mode with the frozen statistics as running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

import lossglass as lg
from lossglass import _native
from lossglass.backends import FusedMLPBackend, MLPBackend, StackBackend, VmapBackend
from lossglass.batchnorm import is_batchnorm
from lossglass.energy import FunctionProblem

from .conftest import image_task

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _per_sample(out, y, loss):
    if loss == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    return 0.5 * (out - F.one_hot(y, out.shape[-1]).to(out.dtype)).pow(2).sum(-1)


def _module(prob, bn="eval", stats=None):
    """A copy of the problem's module: eval mode; or BatchNorm on the batch's statistics (``bn="train"``, no
    running statistics); or eval mode with ``stats`` ({op: (mean, var)} of one point) as running statistics."""
    m = copy.deepcopy(prob.model)
    if bn == "train":
        for mod in m.modules():
            if is_batchnorm(mod):
                mod.track_running_stats = False
                mod.running_mean = mod.running_var = mod.num_batches_tracked = None
        return m.train()
    m.eval()
    if stats is not None:
        with torch.no_grad():
            for i, (mean, var) in stats.items():
                mod = m.get_submodule(prob.backend.ops[i].name)
                mod.running_mean.copy_(mean.reshape(-1))
                mod.running_var.copy_(var.reshape(-1))
    return m


def _outputs(prob, module, theta, x):
    buffers = dict(module.named_buffers())
    params = prob.layout.unflatten(theta)
    return vmap(lambda p: functional_call(module, {**p, **buffers}, (x,)))(params)  # (K, N, C)


def reference(prob, split="train", bn="eval", stats=None, blocks=None) -> FunctionProblem:
    """The energy of ``prob`` on a split, computed independently (see the module docstring); ``blocks``: the
    BatchNorm batch of batch mode (each block of samples its own statistics)."""
    module = _module(prob, bn, stats)
    x, y = prob.data[split]
    edges = [(0, len(y))] if blocks is None else [(i, min(i + blocks, len(y))) for i in range(0, len(y), blocks)]

    def energy(theta):
        total = 0
        k = theta.shape[0]
        for a, b in edges:
            out = _outputs(prob, module, theta, x[a:b])
            total = total + _per_sample(out.reshape(-1, out.shape[-1]), y[a:b].repeat(k), prob.loss_name
                                        ).reshape(k, -1).sum(1)
        return total / len(y)

    return FunctionProblem(energy, prob.n_params, dtype=prob.dtype, device="cpu")


def _accuracy(prob, theta, split, bn="eval", stats=None):
    x, y = prob.data[split]
    with torch.no_grad():
        out = _outputs(prob, _module(prob, bn, stats), theta, x)
    return (out.argmax(-1) == y).double().mean(1)


def _close(a, b, tol=1e-10):
    assert a.shape == b.shape
    scale = float(b.abs().max()) + 1e-30
    assert float((a - b).abs().max()) <= tol * max(scale, 1.0), float((a - b).abs().max())


def check_against(prob, ref, k=3, seed=0, tol=1e-10, hvp=True):
    """energy, evaluate, grad, hvp and the hvp operator of ``prob`` against ``ref`` at k points."""
    theta = prob.init(k, seed) * 1.3
    gen = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(theta.shape, generator=gen, dtype=prob.dtype)
    _close(prob.energy(theta), ref.energy(theta), tol)
    e, g = prob.energy_and_grad(theta)
    er, gr = ref.energy_and_grad(theta)
    _close(e, er, tol)
    _close(g, gr, tol)
    if hvp:
        hr = ref.hvp(theta, v)
        _close(prob.hvp(theta, v), hr, tol)
        _close(prob.hvp_operator(theta)(v), hr, tol)
    return theta


@pytest.fixture(scope="module")
def teacher():
    return lg.datasets.load("teacher", n_train=150, n_test=60, in_dim=7, width=5, n_classes=3, seed=0)


# ---------------------------------------------------------------------------- the hand-batched MLP
@pytest.mark.parametrize("hidden,activation,bias,loss", [
    (6, "relu", True, "cross_entropy"), (6, "relu", True, "mse"), ([6, 5], "relu", True, "cross_entropy"),
    ([6, 5], "relu", False, "mse"), (6, "tanh", True, "cross_entropy"), ([5, 4], "gelu", True, "mse"),
])
def test_mlp_backend_equals_the_vmap_reference(teacher, hidden, activation, bias, loss):
    prob = lg.Problem(lg.models.mlp(7, hidden, 3, activation=activation, bias=bias), teacher, loss=loss, device="cpu",
                      dtype=F64, memory_mb=0.01)
    assert type(prob.backend) is MLPBackend and prob.chunk_size(3) < 60  # several chunks
    theta = check_against(prob, reference(prob))
    for split in ("train", "test"):
        ev = prob.evaluate(theta, split)
        _close(ev["loss"], reference(prob, split).energy(theta))
        assert torch.equal(ev["accuracy"], _accuracy(prob, theta, split))


@pytest.mark.parametrize("activation,loss", [("relu", "cross_entropy"), ("relu", "mse"), ("sigmoid", "cross_entropy"),
                                             ("gelu", "cross_entropy")])
def test_mini_batch_gradients_equal_autograd_of_the_reference(teacher, activation, loss):
    """The hand-written reverse pass (ReLU, tanh, sigmoid) and the autograd route (GELU) on per-replica batches:
    a masked replica gets no gradient; so does a non-finite one on the hand-written route (the autograd route
    gives it NaN, which training never applies: such a replica is frozen)."""
    prob = lg.Problem(lg.models.mlp(7, [6, 5], 3, activation=activation), teacher, loss=loss, device="cpu", dtype=F64)
    hand = activation != "gelu"
    k, b = 4, 16
    theta = prob.init(k, 0)
    theta[3, prob.layout["4.bias"].slice] = float("nan")
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(150, (k, b), generator=gen)
    x, y = prob.data["train"][0][idx], prob.data["train"][1][idx]
    mask = torch.tensor([True, False, True, True])
    loss_k, g = prob.batch_loss_and_grad(theta, x, y, mask)
    keep = [0, 2]
    module = _module(prob)
    th = theta[keep].clone().requires_grad_(True)
    out = vmap(lambda p, xx: functional_call(module, p, (xx,)))(prob.layout.unflatten(th), x[keep])
    ref = _per_sample(out.reshape(len(keep) * b, -1), y[keep].reshape(-1), loss).reshape(len(keep), b).mean(1)
    gr, = torch.autograd.grad(ref.sum(), th)
    _close(loss_k[keep], ref.detach())
    assert not torch.isfinite(loss_k[3]) and torch.isfinite(loss_k[1])
    _close(g[keep], gr)
    assert float(g[1].abs().max()) == 0
    assert (float(g[3].abs().max()) == 0) if hand else bool(torch.isnan(g[3]).any())


def test_affine_families_equal_their_points_evaluated_as_replicas(teacher):
    prob = lg.Problem(lg.models.mlp(7, [6, 5], 3), teacher, device="cpu", dtype=F64, memory_mb=0.01)
    c = prob.init(2, 0)
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(2, 2, prob.n_params, generator=gen, dtype=F64) * 0.3
    coeffs = torch.randn(2, 9, 2, generator=gen, dtype=F64)
    res = prob.evaluate_affine(c, d, coeffs, "test")
    points = (c.unsqueeze(1) + torch.einsum("mgj,mjp->mgp", coeffs, d)).reshape(-1, prob.n_params)
    _close(res["loss"].reshape(-1), reference(prob, "test").energy(points))
    assert torch.equal(res["accuracy"].reshape(-1), _accuracy(prob, points, "test"))


# ---------------------------------------------------------------------------- the fused CPU kernel
needs_kernel = pytest.mark.skipif(_native.kernel(3) is None, reason=f"no fused kernel here: {_native.status()}")


@needs_kernel
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fused_backend_equals_the_vmap_reference_to_float32_roundoff(teacher, loss, monkeypatch):
    prob = lg.Problem(lg.models.mlp(7, 9, 3), teacher, loss=loss, device="cpu")
    assert type(prob.backend) is FusedMLPBackend and prob.backend.kernel_ready()
    theta = prob.init(5, 0)
    gen = torch.Generator().manual_seed(4)
    d = torch.randn(2, prob.n_params, generator=gen) * 0.2
    coeffs = torch.randn(11, 2, generator=gen)
    points = theta[0] + coeffs @ d
    for split in ("train", "test"):
        ev = prob.evaluate(theta, split)
        ref = reference(prob, split).energy(theta.double()).float()
        _close(ev["loss"], ref, 2e-6)
        af = prob.evaluate_affine(theta[0], d, coeffs, split)
        _close(af["loss"], reference(prob, split).energy(points.double()).float(), 2e-6)
        monkeypatch.setenv("LOSSGLASS_NATIVE", "0")  # the kernel off: the hand-batched MLP path, the same numbers
        assert not prob.backend.kernel_ready()
        ev0, af0 = prob.evaluate(theta, split), prob.evaluate_affine(theta[0], d, coeffs, split)
        monkeypatch.setenv("LOSSGLASS_NATIVE", "1")
        _close(ev["loss"], ev0["loss"], 2e-6)
        _close(af["loss"], af0["loss"], 2e-6)
        # accuracies: the same predictions except where two logits tie to float32 roundoff
        assert float((ev["accuracy"] - ev0["accuracy"]).abs().max()) <= 1 / len(prob.data[split][1])


# ---------------------------------------------------------------------------- layer stacks and traced graphs
@pytest.fixture(scope="module")
def images():
    return image_task(96, 40)


def _bn_cnn():
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.AvgPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("memory_mb", [0.05, 64.0])
def test_stack_recompute_equals_training_mode_on_the_whole_training_set(images, memory_mb):
    """Chunked (exact gradient through the statistics, forward-over-reverse HVP) and in one chunk."""
    prob = lg.Problem(_bn_cnn(), images, device="cpu", dtype=F64, memory_mb=memory_mb)
    assert type(prob.backend) is StackBackend and prob.backend.name == "stack" and prob.batchnorm == "recompute"
    assert (prob.chunk_size(2) < 96) == (memory_mb < 1)
    theta = check_against(prob, reference(prob, bn="train"), k=2)
    # the test split is normalised by the training set's statistics at theta: eval mode with those as running ones
    for k in range(2):
        ref = reference(prob, "test", stats=prob.bn_statistics(theta[k:k + 1])).energy(theta[k:k + 1])
        _close(prob.evaluate(theta[k:k + 1], "test")["loss"], ref)


def test_stack_batch_and_fixed_modes_equal_their_reference(images):
    batch = lg.Problem(_bn_cnn(), images, device="cpu", dtype=F64, memory_mb=0.05, batchnorm="batch", bn_batch=32)
    assert batch.bn_policy.group == 32
    check_against(batch, reference(batch, bn="train", blocks=32), k=2)
    fixed = lg.Problem(_bn_cnn(), images, device="cpu", dtype=F64, memory_mb=0.05, batchnorm="fixed")
    at = fixed.init(1, 5)[0]
    frozen = fixed.with_frozen_batchnorm(at)
    stats = frozen.bn_policy.frozen
    check_against(frozen, reference(frozen, stats=stats), k=2)


def test_stack_without_batchnorm_and_shared_mini_batches(images):
    net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.LayerNorm(192), nn.Linear(192, 3))
    prob = lg.Problem(net, images, device="cpu", dtype=F64, memory_mb=0.05)
    assert prob.backend.name == "stack" and not prob.has_batchnorm
    theta = check_against(prob, reference(prob), k=2)
    x, y = prob.data["train"][0][:20], prob.data["train"][1][:20]
    loss, g = prob.batch_loss_and_grad(theta, x, y)  # one batch shared by the replicas
    ref = FunctionProblem(lambda th: _per_sample(_outputs(prob, _module(prob), th, x).reshape(-1, 3),
                                                 y.repeat(th.shape[0]), "cross_entropy").reshape(th.shape[0], -1)
                          .mean(1), prob.n_params, dtype=F64, device="cpu")
    er, gr = ref.energy_and_grad(theta)
    _close(loss, er)
    _close(g, gr)


def test_graph_backend_recompute_equals_training_mode(images):
    prob = lg.Problem(lg.models.resnet(8, 2, (1, 8, 8), 3), images, device="cpu", dtype=F64, memory_mb=0.2)
    assert prob.backend.name == "graph" and len(prob.backend.bn_layers) == 9 and prob.chunk_size(2) < 96
    check_against(prob, reference(prob, bn="train"), k=2, hvp=False)
    theta = prob.init(1, 1)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    _close(prob.hvp(theta, v), reference(prob, bn="train").hvp(theta, v))


# ---------------------------------------------------------------------------- the generic path
def test_vmap_backend_problem_equals_the_reference():
    ds = lg.datasets.modular(7, "add", 0.5, seed=0)
    prob = lg.Problem(lg.models.transformer(8, 3, 7, d_model=8, n_heads=2), ds, device="cpu", dtype=F64,
                      memory_mb=0.02)
    assert type(prob.backend) is VmapBackend and prob.chunk_size(2) < len(ds.y_train)
    theta = check_against(prob, reference(prob), k=2)
    assert torch.equal(prob.evaluate(theta, "test")["accuracy"], _accuracy(prob, theta, "test"))


def test_module_mode_uses_the_stored_statistics(images):
    """A free-form module with BatchNorm that does not ask for recomputed statistics: eval mode, canonical (0, 1)
    running statistics (the vmap path)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(128, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x.reshape(-1, 1, 8, 8)))).flatten(1))

    prob = lg.Problem(Net(), images, device="cpu", dtype=F64)
    assert prob.backend.name == "vmap" and prob.batchnorm == "module" and not prob.has_batchnorm
    assert float(prob.model.bn.running_var.min()) == 1.0
    check_against(prob, reference(prob), k=2)
    assert prob.with_frozen_batchnorm(prob.init(1, 0)[0]) is prob  # nothing to freeze


def test_backend_is_chosen_once_from_the_model(teacher, images):
    assert lg.Problem(lg.models.mlp(7, 4, 3), teacher, device="cpu", dtype=F64).backend.name == "mlp"
    assert lg.Problem(lg.models.mlp(7, 4, 3, activation="tanh"), teacher, device="cpu").backend.name == "mlp"
    assert lg.Problem(_bn_cnn(), images, device="cpu", batchnorm="module").backend.name == "vmap"
    if _native.kernel(3) is not None:
        assert lg.Problem(lg.models.mlp(7, 4, 3), teacher, device="cpu").backend.name == "fused"

    class Custom(lg.Problem):  # a subclass with its own loss keeps the autograd routes
        def _loss(self, out, y):
            return super()._loss(out, y) * 2

    c = Custom(lg.models.mlp(7, 4, 3), teacher, device="cpu", dtype=F64)
    assert not c.backend.hand_written
    theta = c.init(2, 0)
    plain = lg.Problem(lg.models.mlp(7, 4, 3), teacher, device="cpu", dtype=F64)
    _close(c.energy_and_grad(theta)[1], 2 * plain.energy_and_grad(theta)[1])


def test_forward_passes_equal_the_vmap_backend_on_shared_and_per_replica_inputs(teacher, images):
    """The forward pass itself, backend against VmapBackend on the same module: shared inputs (N, D) and one batch
    per replica (K, N, D), flat theta and per-tensor lists (what the autograd routes pass)."""
    ln = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                       nn.Flatten(), nn.LayerNorm(48), nn.Linear(48, 3))
    cases = [(lg.models.mlp(7, [6, 5], 3), teacher, "mlp"), (lg.models.mlp(7, 6, 3, activation="tanh"), teacher, "mlp"),
             (ln, images, "stack")]
    for model, ds, name in cases:
        prob = lg.Problem(model, ds, device="cpu", dtype=F64)
        assert prob.backend.name == name
        ref = VmapBackend(_module(prob), prob.layout, {})
        theta = prob.init(3, 0)
        x = prob.data["train"][0][:10]
        xk = prob.data["train"][0][10:40].reshape(3, 10, -1)
        for th in (theta, prob.split(theta)):
            _close(prob.backend.forward(th, x), ref.forward(theta, x), 1e-12)
            _close(prob.backend.forward(th, xk), ref.forward(theta, xk), 1e-12)
