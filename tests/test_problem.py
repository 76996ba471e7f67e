import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossglass as lg

pytestmark = pytest.mark.usefixtures("one_thread")


def _module_loss(prob, theta, x, y):
    m = prob.to_module(theta)
    out = m(x)
    return F.cross_entropy(out, y), (out.argmax(1) == y).double().mean()


@pytest.mark.parametrize("hidden", [5, [7, 6]])
def test_batched_energy_equals_plain_forward(teacher_ds, hidden):
    prob = lg.Problem(lg.models.mlp(8, hidden, 3), teacher_ds, device="cpu")
    theta = prob.init(5, seed=1)
    tr, te = prob.evaluate(theta, "train"), prob.evaluate(theta, "test")
    for k in range(5):
        for split, res in (("train", tr), ("test", te)):
            x, y = prob.data[split]
            loss, acc = _module_loss(prob, theta[k], x, y)
            assert abs(float(res["loss"][k]) - float(loss)) < 1e-5
            assert abs(float(res["accuracy"][k]) - float(acc)) < 1e-6
    assert torch.allclose(prob.energy(theta[2]), tr["loss"][2])


class Odd(nn.Module):
    """Not a Sequential: takes the generic functional_call + vmap path."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) * 2)


def test_generic_vmap_path_matches_module(teacher_ds):
    prob = lg.Problem(Odd(), teacher_ds, device="cpu")
    assert not prob.is_mlp
    theta = prob.init(3, seed=0)
    e = prob.energy(theta)
    x, y = prob.data["train"]
    for k in range(3):
        assert abs(float(e[k]) - float(_module_loss(prob, theta[k], x, y)[0])) < 1e-5


def test_grad_equals_autograd_on_module(tiny):
    theta = tiny.init(2, seed=3)
    g = tiny.grad(theta)
    x, y = tiny.data["train"]
    for k in range(2):
        m = tiny.to_module(theta[k])
        F.cross_entropy(m(x), y).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        assert torch.allclose(g[k], ref, atol=1e-10)


def test_hvp_equals_dense_hessian(tiny):
    theta = tiny.init(1, seed=4)[0]
    x, y = tiny.data["train"]
    h = torch.autograd.functional.hessian(lambda t: tiny.batch_loss(t.unsqueeze(0), x, y)[0], theta)
    v = torch.randn(tiny.n_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tiny.hvp(theta, v), h @ v, atol=1e-10)
    vv = torch.stack([v, 2 * v])
    th2 = torch.stack([theta, theta])
    assert torch.allclose(tiny.hvp(th2, vv)[1], 2 * (h @ v), atol=1e-10)


def test_chunking_does_not_change_results(teacher_ds):
    big = lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, device="cpu", dtype=torch.float64)
    small = lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, device="cpu", dtype=torch.float64, memory_mb=0.001)
    assert small.chunk_size(4) < 300  # really chunked
    theta = big.init(4, 0)
    assert torch.allclose(big.energy(theta), small.energy(theta), atol=1e-12)
    assert torch.allclose(big.grad(theta), small.grad(theta), atol=1e-12)
    v = torch.randn_like(theta)
    assert torch.allclose(big.hvp(theta, v), small.hvp(theta, v), atol=1e-10)


def test_evaluate_affine_matches_direct(tiny):
    c = tiny.init(3, 0)
    d = torch.randn(2, tiny.n_params, dtype=torch.float64)
    coeffs = torch.randn(7, 2, dtype=torch.float64)
    fast = tiny.evaluate_affine(c[0], d, coeffs, "test")
    direct = tiny.evaluate(c[0] + coeffs @ d, "test")
    assert torch.allclose(fast["loss"], direct["loss"], atol=1e-10)
    assert torch.allclose(fast["accuracy"], direct["accuracy"])
    # several families at once
    dd = torch.randn(3, 1, tiny.n_params, dtype=torch.float64)
    cc = torch.rand(3, 5, 1, dtype=torch.float64)
    many = tiny.evaluate_affine(c, dd, cc)["loss"]
    for m in range(3):
        assert torch.allclose(many[m], tiny.energy(c[m] + cc[m] @ dd[m]), atol=1e-10)


def test_init_is_seeded_per_replica(tiny):
    a, b = tiny.init(4, seed=7), tiny.init(6, seed=7)
    assert torch.equal(a, b[:4])
    assert not torch.equal(tiny.init(2, 8), a[:2])
    assert torch.equal(tiny.init(2, 7, ids=[3, 1]), a[[3, 1]])


def test_bad_inputs(tiny, teacher_ds):
    with pytest.raises(lg.LossglassError, match=r"shape \(63,\) or \(K, 63\)"):
        tiny.energy(torch.zeros(62, dtype=torch.float64))
    with pytest.raises(lg.LossglassError, match="unknown loss 'hinge'"):
        lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, loss="hinge")
    with pytest.raises(lg.LossglassError, match="expected \\(2, 3\\)"):
        lg.Problem(lg.models.mlp(8, 5, 4), teacher_ds)
    with pytest.raises(lg.LossglassError, match="unknown split"):
        tiny.evaluate(tiny.init(1, 0), "val")
    with pytest.raises(lg.LossglassError, match="hidden widths must be positive"):
        lg.models.mlp(8, -3, 3)
    with pytest.raises(lg.LossglassError, match="unknown device"):
        lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, device="tpu9")
    with pytest.raises(lg.LossglassError, match="fn must map"):
        lg.Problem.from_function(lambda t: t, 3)


def test_function_problem_and_mse(teacher_ds):
    quad = lg.models.quadratic(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    th = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(quad.energy(th), torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(quad.grad(th), th * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(quad.hvp(th, th), quad.grad(th))
    prob = lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, loss="mse", dtype=torch.float64)
    theta = prob.init(1, 0)[0]
    x, y = prob.data["train"]
    out = prob.to_module(theta)(x)
    ref = 0.5 * (out - F.one_hot(y, 3).double()).pow(2).sum(1).mean()
    assert abs(float(prob.energy(theta)) - float(ref)) < 1e-12


def test_sphere_manifold_and_riemannian_hessian_of_the_3_spin():
    n = 10
    prob = lg.models.spherical_pspin(n, 3, seed=4)
    sph = prob.manifold
    assert isinstance(sph, lg.problem.Sphere) and sph.radius == pytest.approx(n**0.5) and sph.codim == 1
    s = prob.init(2, 0)
    assert torch.allclose(s.pow(2).sum(1), torch.full((2,), float(n), dtype=torch.float64))
    assert bool(sph.contains(s).all()) and not bool(sph.contains(1.01 * s).any())
    assert torch.allclose(prob.project(3 * s), s)
    v = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float((sph.tangent(s, v) * s).sum(1).abs().max()) < 1e-12
    # dense Riemannian Hessian P (grad^2 E - (s . grad E / N) I) P against the batched operator
    op = prob.hessian_operator(s)
    hv = op(v)
    for k in range(2):
        x = s[k]
        h = torch.autograd.functional.hessian(lambda t: prob.fn(t[None])[0], x)
        g = torch.autograd.functional.jacobian(lambda t: prob.fn(t[None])[0], x)
        proj = torch.eye(n, dtype=torch.float64) - torch.outer(x, x) / n
        riem = proj @ (h - (x @ g) / n * torch.eye(n, dtype=torch.float64)) @ proj
        assert torch.allclose(hv[k], riem @ v[k], atol=1e-12)
    assert torch.allclose(op(s), torch.zeros_like(s), atol=1e-12)  # the normal direction maps to 0
    # an unconstrained problem: the Euclidean Hessian
    quad = lg.models.quadratic(torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    assert quad.manifold is None and not quad.has_projector()
    th = torch.ones(1, 3, dtype=torch.float64)
    assert torch.allclose(quad.hessian_operator(th)(th), torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    with pytest.raises(lg.LossglassError, match="not on the problem's manifold"):
        prob.hessian_operator(2 * s)


def test_manifold_arguments_are_checked():
    fn = lambda t: t.sum(1)  # noqa: E731
    with pytest.raises(lg.LossglassError, match="not both"):
        lg.Problem.from_function(fn, 3, projector=lambda t: t, manifold=lg.problem.Sphere(1.0))
    with pytest.raises(lg.LossglassError, match="manifold must be"):
        lg.Problem.from_function(fn, 3, manifold="sphere")
    with pytest.raises(lg.LossglassError, match="radius must be a positive number"):
        lg.problem.Sphere(-1.0)
    bare = lg.Problem.from_function(fn, 3, projector=lambda t: t / t.norm(dim=-1, keepdim=True))
    assert bare.has_projector() and bare.manifold is None
    with pytest.raises(lg.LossglassError, match="declares no manifold"):
        bare.hessian_operator(torch.ones(1, 3))


def test_both_kinds_implement_the_energy_interface_without_inheriting_each_other(tiny):
    """Problem and the function-defined problems share the Energy interface; FunctionProblem is no Problem (it
    used to subclass it while skipping its __init__), and protocols ask ``has_data`` instead of the type."""
    from lossglass.energy import Energy, FunctionProblem

    quad = lg.models.quadratic(torch.diag(torch.tensor([1.0, 2.0])))
    ising = lg.models.sk(6)
    for p, data in ((tiny, True), (quad, False), (ising, False), (lg.models.spherical_pspin(5, 3), False)):
        assert isinstance(p, Energy) and p.has_data is data
        assert p.layout.n_params == p.n_params and [e.name for e in p.params] == p.layout.names
    assert not isinstance(quad, lg.Problem) and not issubclass(FunctionProblem, lg.Problem)
    assert lg.Problem.from_function(lambda t: t.sum(-1), 3).has_data is False
    assert quad.subset(10) is quad and tiny.subset(None) is tiny and not quad.is_mlp
    th = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    ev = quad.evaluate_affine(th[0], torch.eye(2, dtype=torch.float64), torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    assert ev["loss"].tolist() == [1.5, 2.0] and bool(ev["accuracy"].isnan().all())  # E(1,1), E(2,0)


def test_affine_families_of_a_network_without_a_first_layer_shortcut(teacher_ds):
    """A vmap-path network evaluates affine families as replicas, in blocks: the same numbers as evaluate()."""
    prob = lg.Problem(Odd(), teacher_ds, device="cpu", dtype=torch.float64)
    assert not prob.backend.first_layer_affine
    c = prob.init(1, 0)[0]
    d = torch.randn(2, prob.n_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coeffs = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = prob.evaluate_affine(c, d, coeffs, "test", block=3)
    ev = prob.evaluate(c + coeffs @ d, "test")
    assert torch.allclose(res["loss"], ev["loss"], atol=1e-14) and torch.equal(res["accuracy"], ev["accuracy"])
