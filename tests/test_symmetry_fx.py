"""Permutation symmetry derived by tracing (derive_spec), BatchNorm buffers as part of the symmetry and of the model
(module mode, checkpoint import), and the shape probe that must not touch the module's state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg
from lossglass.byo import import_checkpoints
from lossglass.symmetry import _entries, derive_spec, mlp_spec, permute_state, spec_of

from .conftest import image_task
from .symmetry_catalogue import Branchy, Cumsum, Gru, Outer, ResidualBN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return image_task(100, 20)


def _random_statistics(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    return model


def test_derived_spec_of_an_mlp_is_the_hand_derived_one(teacher_ds):
    prob = lg.Problem(lg.models.mlp(8, [7, 6], 3), teacher_ds, dtype=torch.float64)
    assert derive_spec(prob.model, prob.data["train"][:2][0][:2]).perms == mlp_spec(prob).perms


def test_derived_spec_of_a_cnn_stack_adds_the_running_statistics(images):
    from lossglass import layers

    prob = lg.Problem(lg.models.cnn((1, 8, 8), channels=(3, 4), n_classes=3), images, dtype=torch.float64)
    derived = spec_of(prob).perms
    hand = layers.spec(prob.layout, prob.backend.ops)
    assert list(derived) == list(hand) == ["P0", "P1"]
    for name in hand:
        params_only = tuple(e for e in derived[name] if not e[0].endswith(("running_mean", "running_var")))
        assert _entries(params_only) == _entries(hand[name])
        assert {e[0] for e in derived[name]} - {e[0] for e in hand[name]} == {
            f"{i}.running_{s}" for i in ({"P0": 2, "P1": 6}[name],) for s in ("mean", "var")}


def test_residual_stream_is_one_permutation_and_buffers_move_with_channels():
    model = _random_statistics(ResidualBN(), 1).double().eval()
    x = torch.randn(5, 64, dtype=torch.float64)
    spec = derive_spec(model, x[:2])
    # the stem's channels, both residual branches and the BatchNorms on the stream are one group
    stream = [name for name, axes in spec.perms.items() if ("conv.weight", 0) in axes]
    assert len(stream) == 1
    axes = spec.perms[stream[0]]
    for e in (("c1.weight", 1), ("c2.weight", 0), ("b2.running_mean", 0), ("b1.running_var", 0), ("fc.weight", 1, 16)):
        assert e in axes
    assert len(spec.perms) == 1  # the two residual blocks add into the stream: no other free channels
    perm = {stream[0]: torch.tensor([2, 0, 3, 1])}
    moved = permute_state(spec, model.state_dict(), perm)
    assert not torch.equal(moved["b1.running_mean"], model.state_dict()["b1.running_mean"])
    other = ResidualBN().double().eval()
    other.load_state_dict(moved)
    assert torch.allclose(other(x), model(x), rtol=0, atol=1e-12)
    params_only = {k: v for k, v in moved.items() if "running" not in k}  # parameters alone: outputs change
    other.load_state_dict({**model.state_dict(), **params_only})
    assert not torch.allclose(other(x), model(x), atol=1e-3)


def test_unknown_op_and_untraceable_module_are_named():
    with pytest.raises(lg.LossglassError, match=r"torch\.cumsum.*symmetry is unknown.*model\.spec"):
        derive_spec(Cumsum(), torch.zeros(2, 4))
    with pytest.raises(lg.LossglassError, match="cannot be traced by torch.fx"):
        derive_spec(Branchy(), torch.zeros(2, 4))  # data-dependent control flow
    with pytest.raises(lg.LossglassError, match=r"module 'rnn' \(GRU\)"):
        derive_spec(Gru(), torch.zeros(2, 4))


def test_a_wrong_declared_rule_is_caught_by_the_verification():
    with pytest.raises(lg.LossglassError, match="derived permutation spec of Outer is wrong"):
        derive_spec(Outer(), torch.randn(2, 4))  # its inner module's permutation_rule forgets the columns of b


def test_shape_probe_leaves_running_statistics_untouched(images):
    model = ResidualBN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in ("auto", "recompute", "module"):
        prob = lg.Problem(model, images, batchnorm=mode)
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v)
        assert model.training
    assert int(lg.Problem(model, images, batchnorm="module").model.bn.num_batches_tracked) == 0
    assert prob.batchnorm == "module"


def test_module_mode_carries_each_replicas_statistics_through_a_permutation(images):
    """Issue 17: a correct channel permutation of a free-form BatchNorm model in module mode changed the loss. The
    stored statistics are folded into the affine parameters, so the permutation of theta is exact."""
    model = _random_statistics(ResidualBN(), 3).double()
    prob = lg.Problem(model, images, dtype=torch.float64, batchnorm="module")
    theta = prob.flatten(model)
    x, y = prob.data["train"]
    ref = model.eval()(x).detach()
    assert torch.allclose(prob.forward(theta[None], x)[0], ref, rtol=0, atol=1e-10)
    assert float(prob.energy(theta)) == pytest.approx(float(F.cross_entropy(ref, y)), abs=1e-12)
    moved = lg.permute(prob, theta, lg.random_permutation(prob, seed=5))
    assert float((moved - theta).abs().max()) > 0.1
    assert torch.allclose(prob.forward(moved[None], x)[0], ref, rtol=0, atol=1e-6)
    # float32 as well, with the problem's default BatchNorm mode for a free-form module
    prob32 = lg.Problem(_random_statistics(ResidualBN(), 3), images)
    assert prob32.batchnorm == "module"
    th32 = prob32.flatten(_random_statistics(ResidualBN(), 3))
    mv32 = lg.permute(prob32, th32, lg.random_permutation(prob32, seed=6))
    assert torch.allclose(prob32.forward(mv32[None], x.float()), prob32.forward(th32[None], x.float()), atol=1e-5)
    # the exported module (canonical statistics, folded parameters) computes the same function
    assert torch.allclose(prob.to_module(moved).eval()(x), ref, atol=1e-6)


def test_imported_checkpoints_with_buffers_reproduce_eval_mode_outputs(images, tmp_path):
    from safetensors.torch import save_file

    nets = [_random_statistics(ResidualBN(), 10 + i) for i in range(3)]
    for i, n in enumerate(nets):
        if i == 1:
            save_file({k: v.contiguous() for k, v in n.state_dict().items()}, str(tmp_path / f"m{i}.safetensors"))
        else:
            torch.save(n.state_dict(), tmp_path / f"m{i}.pt")
    prob = lg.Problem(ResidualBN(), images, batchnorm="module")
    theta, files = import_checkpoints(prob, tmp_path)
    assert files == ["m0.pt", "m1.safetensors", "m2.pt"]
    x = prob.data["test"][0]
    out = prob.forward(theta, x)
    for i, n in enumerate(nets):
        assert torch.allclose(out[i], n.eval()(x), rtol=0, atol=1e-5)
    # in recompute mode the stored statistics play no part: the parameters are imported as they are
    rec = lg.Problem(ResidualBN(), images, batchnorm="recompute")
    th_rec, _ = import_checkpoints(rec, tmp_path)
    assert torch.equal(th_rec[0], rec.flatten(dict(nets[0].named_parameters())))
    bad = nets[0].state_dict()
    bad["b1.running_var"] = -bad["b1.running_var"].abs()
    torch.save(bad, tmp_path / "m3.pt")
    with pytest.raises(lg.LossglassError, match=r"m3.pt: BatchNorm 'b1' has invalid running statistics"):
        import_checkpoints(prob, tmp_path)


def test_recomputed_statistics_need_a_graph_of_supported_ops(images):
    class CumsumBN(ResidualBN):
        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8))))
            return self.fc(F.max_pool2d(torch.cumsum(h, 1), 2).flatten(1))

    with pytest.raises(lg.LossglassError, match=r"torch\.cumsum.*batchnorm='module'"):
        lg.Problem(CumsumBN(), images, batchnorm="recompute")
    prob = lg.Problem(CumsumBN(), images)  # its own stored statistics, as before: it runs
    assert prob.batchnorm == "module" and bool(torch.isfinite(prob.energy(prob.init(2, 0))).all())
    # a traceable free-form module recomputes them when asked, exactly as the module in training mode on the set
    rec = lg.Problem(ResidualBN(), images, batchnorm="recompute", dtype=torch.float64)
    theta = rec.init(2, 1)
    x, y = rec.data["train"]
    loss = F.cross_entropy(rec.to_module(theta[1]).train()(x), y)
    assert float(rec.energy(theta)[1]) == pytest.approx(float(loss.detach()), abs=1e-12)
