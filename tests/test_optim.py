"""The update rules of lossglass.optim: each against a hand computation on a tiny (K, P) problem with one learning rate
per replica, Adam/AdamW against torch.optim run replica by replica, SGHMC equipartition at one temperature per replica,
and the composed trainer against the inline trainer it replaced (tests/legacy_train.py), byte for byte."""

import math

import numpy as np
import pytest
import torch

import lossglass as lg
from lossglass import optim

from .legacy_train import legacy_train

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def ctx_for(lr, **kw):
    return optim.Context(lr=torch.tensor(lr, dtype=F64).reshape(-1, 1), **kw)


def run(rule, theta, grads, ctx):
    """Apply ``rule`` for each gradient in ``grads`` (a list, or a function of theta); returns theta and the state."""
    theta, state = theta.clone(), rule.init(theta)
    for g in grads:
        g = g(theta) if callable(g) else g
        step, state = rule.update(g, state, theta, ctx)
        theta = step.apply(theta)
    return theta, state


def test_sgd_and_momentum_by_hand_with_one_learning_rate_per_replica():
    theta0 = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=F64)
    g1, g2 = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=F64), torch.tensor([[0.5, -1.0], [1.0, 3.0]], dtype=F64)
    lr = torch.tensor([[0.1], [0.3]], dtype=F64)
    ctx = optim.Context(lr=lr)
    got, _ = run(optim.sgd(), theta0, [g1, g2], ctx)
    assert torch.allclose(got, theta0 - lr * (g1 + g2), rtol=0, atol=1e-15)
    # heavy ball, beta per replica: v1 = g1, v2 = beta v1 + g2; theta = theta0 - lr (v1 + v2)
    beta = torch.tensor([[0.0], [0.5]], dtype=F64)
    got, state = run(optim.momentum([0.0, 0.5]), theta0, [g1, g2], ctx)
    v2 = beta * g1 + g2
    assert torch.allclose(got, theta0 - lr * (g1 + v2), rtol=0, atol=1e-15)
    assert torch.equal(state["velocity"], v2)
    # one number per replica, all equal, gives the bytes of the scalar
    a, _ = run(optim.momentum(0.9), theta0, [g1, g2, g1], ctx)
    b, _ = run(optim.momentum([0.9, 0.9]), theta0, [g1, g2, g1], ctx)
    assert torch.equal(a, b)


def test_momentum_zero_keeps_a_buffer_equal_to_the_gradient():
    theta0, g = torch.zeros(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    ctx = ctx_for([0.1, 0.2])
    a, _ = run(optim.momentum(0.0), theta0, [g, 2 * g], ctx)
    b, _ = run(optim.sgd(), theta0, [g, 2 * g], ctx)
    assert torch.equal(a, b)


def test_adam_by_hand_with_its_constants_as_parameters():
    b1, b2, eps = 0.8, 0.99, 1e-6
    theta0 = torch.tensor([[1.0, -1.0], [2.0, 0.5]], dtype=F64)
    gs = [torch.tensor([[0.3, -2.0], [1.0, 0.1]], dtype=F64), torch.tensor([[-0.1, 1.0], [0.5, 0.2]], dtype=F64)]
    lr = torch.tensor([[0.01], [0.05]], dtype=F64)
    rule, theta = optim.adam(b1, b2, eps), theta0.clone()
    state = rule.init(theta)
    m = v = torch.zeros_like(theta0)
    want = theta0.clone()
    for t, g in enumerate(gs, start=1):
        step, state = rule.update(g, state, theta, optim.Context(lr=lr, count=t - 1))
        theta = step.apply(theta)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        want = want - lr * (m / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    assert torch.allclose(theta, want, rtol=1e-13, atol=0)
    assert torch.allclose(state["mu"], m, rtol=1e-14) and torch.allclose(state["nu"], v, rtol=1e-14)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_and_adamw_match_torch_optim_replica_by_replica(decoupled):
    k, p, steps, wd = 3, 5, 6, 0.3
    gen = torch.Generator().manual_seed(1)
    theta0 = torch.randn(k, p, dtype=F64, generator=gen)
    lrs = [0.01, 0.05, 0.2]
    target = torch.randn(k, p, dtype=F64, generator=gen)
    grad = lambda th: (th - target) ** 3  # noqa: E731 - E = sum (theta - target)^4 / 4
    rule = optim.adamw(wd) if decoupled else optim.adam()
    theta, state = theta0.clone(), rule.init(theta0)
    for t in range(steps):
        step, state = rule.update(grad(theta), state, theta, optim.Context(lr=torch.tensor(lrs, dtype=F64)[:, None],
                                                                           count=t))
        theta = step.apply(theta)
    for a in range(k):
        w = theta0[a].clone().requires_grad_(True)
        opt = (torch.optim.AdamW([w], lr=lrs[a], weight_decay=wd) if decoupled else torch.optim.Adam([w], lr=lrs[a]))
        for _ in range(steps):
            opt.zero_grad()
            w.grad = (w.detach() - target[a]) ** 3
            opt.step()
        assert torch.allclose(theta[a], w.detach(), rtol=1e-12, atol=1e-14), a


def test_weight_decay_coupled_and_decoupled_by_hand():
    theta = torch.tensor([[1.0, -2.0], [3.0, 1.0], [1.0, 1.0]], dtype=F64)
    g = torch.tensor([[0.5, 0.5], [1.0, -1.0], [2.0, 2.0]], dtype=F64)
    moving = torch.tensor([True, True, False])
    ctx = ctx_for([0.1, 0.2, 0.3], moving=moving)
    out, _ = optim.add_decayed_weights([0.1, 0.01, 0.5]).update(g * moving[:, None], {}, theta, ctx)
    want = g + torch.tensor([[0.1], [0.01], [0.5]], dtype=F64) * theta
    want[2] = 0  # a replica that does not move gets no decay
    assert torch.allclose(out, want, rtol=0, atol=1e-15)
    step, _ = optim.chain(optim.sgd(), optim.decoupled_weight_decay(0.5)).update(g, {}, theta, ctx)
    new = step.apply(theta.clone())
    lr = ctx.lr
    assert torch.allclose(new[:2], ((1 - lr * 0.5) * theta - lr * g)[:2], rtol=0, atol=1e-15)
    assert torch.allclose(new[2], theta[2] - 0.3 * g[2])  # not moving: no decay (its gradient is the driver's to mask)


def test_replicated_coupling_by_hand_and_its_schedule():
    theta = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, -1.0], [100.0, 100.0]], dtype=F64)
    alive = torch.tensor([True, True, True, False])
    g = torch.zeros_like(theta)
    rule = optim.replicated((0.01, 1.0))
    centre = theta[:3].mean(0)
    for progress, gam in ((0.0, 0.01), (0.5, 0.1), (1.0, 1.0)):
        out, _ = rule.update(g, {}, theta, ctx_for([0.1] * 4, progress=progress, alive=alive))
        assert torch.allclose(out, gam * (theta - centre), rtol=1e-14, atol=1e-14), progress
    # it is the gradient of gamma/2 sum_a |theta_a - mean|^2 over the replicas in the centre
    th = theta[:3].clone().requires_grad_(True)
    (0.5 * ((th - th.mean(0)) ** 2).sum()).backward()
    out, _ = rule.update(g[:3], {}, theta[:3], ctx_for([0.1] * 3, progress=1.0))
    assert torch.allclose(out, th.grad)
    moving = torch.tensor([True, False, True, False])
    out, _ = rule.update(g, {}, theta, ctx_for([0.1] * 4, progress=1.0, alive=alive, moving=moving))
    assert torch.equal(out[[0, 2]], (theta - centre)[[0, 2]]) and out[[1, 3]].eq(0).all()


def test_sam_takes_the_gradient_at_the_ascent_point_per_replica_radius():
    theta = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=F64)
    grad_at = lambda th: th  # noqa: E731 - E = |theta|^2 / 2
    out = optim.sam([0.5, 1.0])(grad_at, theta, grad_at(theta))
    want = theta * (1 + torch.tensor([[0.5 / 5], [1.0 / 2]], dtype=F64))  # theta + rho theta / |theta|
    assert torch.allclose(out, want, rtol=0, atol=1e-15)
    assert torch.equal(optim.sam(0.1)(grad_at, theta, torch.zeros_like(theta)), theta)  # g = 0: no perturbation


def test_sghmc_noise_enters_the_velocity_with_the_right_variance():
    k, p, temp, beta = 3, 4, 0.7, 0.6
    lr = torch.tensor([[0.1], [0.4], [0.0]], dtype=F64)
    moving = torch.tensor([True, False, True])
    gens = [torch.Generator().manual_seed(10 + i) for i in range(k)]
    copies = [torch.Generator().manual_seed(10 + i) for i in range(k)]
    theta, g = torch.zeros(k, p, dtype=F64), torch.ones(k, p, dtype=F64)
    step, state = optim.sghmc(temp, gens, beta).update(g, {"velocity": torch.full((k, p), 2.0, dtype=F64)}, theta,
                                                        optim.Context(lr=lr, moving=moving))
    xi = torch.stack([torch.randn(p, generator=c, dtype=F64) for c in copies])
    amp = torch.sqrt(2 * (1 - beta) * temp / lr.clamp_min(1e-300))
    want = beta * 2.0 + g - amp * xi
    assert torch.allclose(state["velocity"][0], want[0], rtol=1e-14)
    assert torch.equal(state["velocity"][1:], (beta * 2.0 + g)[1:])  # not moving, or lr = 0: no noise
    # T = 0 is plain momentum, bit for bit
    a, _ = run(optim.sghmc(0.0, gens, beta), theta, [g, 2 * g], optim.Context(lr=lr))
    b, _ = run(optim.momentum(beta), theta, [g, 2 * g], optim.Context(lr=lr))
    assert torch.equal(a, b)


def _exact_sghmc_energy(evals, temp, lr, beta):
    """Stationary <E> of the discrete SGHMC on E = theta^T H theta / 2, mode by mode (p = -lr v):
    p' = beta p - lr lambda theta + sqrt(2 (1 - beta) lr T) xi, theta' = theta + p'; Sigma = A Sigma A^T + Q."""
    from scipy.linalg import solve_discrete_lyapunov

    tot = 0.0
    for lam in evals.tolist():
        a = np.array([[1 - lr * lam, beta], [-lr * lam, beta]])
        tot += lam * solve_discrete_lyapunov(a, 2 * (1 - beta) * lr * temp * np.ones((2, 2)))[0, 0] / 2
    return tot


def test_sghmc_equipartition_at_one_temperature_per_replica():
    # <E> = P T / 2 for each half of the replicas at its own temperature, in one (K, P) tensor
    p, lr, beta, n, steps = 8, 0.01, 0.9, 600, 150
    evals = torch.linspace(0.5, 2.0, p, dtype=F64)
    temps = torch.tensor([0.2] * n + [0.05] * n, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(2 * n, p, dtype=F64, generator=gen) * (temps[:, None] / evals).sqrt()  # Boltzmann start
    rule = optim.sghmc(temps, [torch.Generator().manual_seed(i) for i in range(2 * n)], beta)
    state, ctx = rule.init(theta), optim.Context(lr=torch.full((2 * n, 1), lr, dtype=F64))
    for _ in range(steps):
        step, state = rule.update(theta * evals, state, theta, ctx)
        theta = step.apply(theta)
    e = 0.5 * (theta**2 * evals).sum(1)
    for half, temp in ((e[:n], 0.2), (e[n:], 0.05)):
        mean, se = half.mean().item(), half.std().item() / math.sqrt(n)
        exact = _exact_sghmc_energy(evals, temp, lr, beta)
        assert abs(exact - p * temp / 2) < 0.01 * p * temp / 2  # the O(lr lambda) step bias is below 1 %
        assert abs(mean - exact) < 4 * se, (temp, mean, exact, se)


def test_chain_orders_rules_and_prefixes_their_state():
    r = optim.chain(optim.add_decayed_weights(0.1), optim.adamw(0.01))
    assert r.kind == "optimizer"
    assert sorted(r.init(torch.zeros(2, 3))) == ["1.0.mu", "1.0.nu"]
    for bad in ((optim.momentum(), optim.add_decayed_weights(0.1)), (optim.sgd(), optim.adam()),
                (optim.decoupled_weight_decay(0.1), optim.sgd())):
        with pytest.raises(lg.LossglassError, match="chain: gradient rules first"):
            optim.chain(*bad)
    assert optim.chain(optim.add_decayed_weights(0.1), optim.replicated()).kind == "gradient"
    # a chain is its rules applied in turn
    theta, g = torch.ones(2, 2, dtype=F64), torch.full((2, 2), 0.5, dtype=F64)
    ctx = ctx_for([0.1, 0.2], progress=0.5)
    u, _ = optim.replicated().update(optim.add_decayed_weights(0.1).update(g, {}, theta, ctx)[0], {}, theta, ctx)
    step, _ = optim.momentum(0.9).update(u, {"velocity": torch.zeros_like(theta)}, theta, ctx)
    chained, _ = optim.chain(optim.add_decayed_weights(0.1), optim.replicated(), optim.momentum(0.9)).update(
        g, {"2.velocity": torch.zeros_like(theta)}, theta, ctx)
    assert torch.equal(chained.apply(theta.clone()), step.apply(theta.clone()))


def test_bad_rule_arguments_are_one_line_errors():
    for make, msg in ((lambda: optim.momentum(1.0), "momentum must be finite, >= 0 and < 1"),
                      (lambda: optim.add_decayed_weights(-1), "weight_decay must be finite, >= 0"),
                      (lambda: optim.adam(b1=1.0), "adam needs 0 <= b1, b2 < 1"),
                      (lambda: optim.replicated((0.0, 1.0)), "gamma must be two positive numbers"),
                      (lambda: optim.sam(0.0), "rho must be > 0"),
                      (lambda: optim.chain(), "at least one rule"),
                      (lambda: optim.Context(lr=torch.ones(3)), r"Context.lr must be a \(K, 1\) column")):
        with pytest.raises(lg.LossglassError, match=msg):
            make()
    with pytest.raises(lg.LossglassError, match="has 3 values for 2 replicas"):
        run(optim.momentum([0.1, 0.2, 0.3]), torch.zeros(2, 2), [torch.ones(2, 2)], ctx_for([0.1, 0.1]))


CASES = [dict(), dict(momentum=0.0, weight_decay=0.01), dict(method="sam", weight_decay=0.01),
         dict(method="langevin", temperature=1e-3), dict(method="replicated", weight_decay=0.01, lr_schedule="cosine"),
         dict(optimizer="adam", lr=0.01), dict(optimizer="adam", lr=0.01, method="sam", weight_decay=0.01),
         dict(optimizer="adamw", lr=0.01, weight_decay=0.05, method="replicated"),
         dict(lr=[0.1, 1e200, 0.05], stop_at_loss=0.6), dict(optimizer="adam", lr=[0.01, 1e200, 0.02]),
         dict(keep_at=[0, 4, 19], lr_schedule="cosine")]


def _bits(t):
    return None if t is None else t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_composed_trainer_gives_the_bytes_of_the_inline_one(teacher_ds, kw, dtype):
    prob = lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, device="cpu", dtype=dtype)
    args = dict(epochs=3, batch_size=32, lr=0.1, seed=3) | kw
    old = legacy_train(prob, 3, **args)
    new = lg.train(prob, 3, progress=False, **args)
    assert torch.equal(_bits(new.theta), _bits(old["theta"]))
    assert torch.equal(_bits(new.snapshots), _bits(old["snapshots"])) if "keep_at" in kw else new.snapshots is None
    assert new.alive.tolist() == old["alive"].tolist()
    assert new.table["diverged_at_step"].tolist() == old["diverged_at"].tolist()
    assert new.table["epochs_trained"].tolist() == old["epochs_trained"].tolist()


@pytest.mark.parametrize("kw", [dict(method="langevin", temperature=0.05), dict(optimizer="adam", lr=0.01),
                                dict(method="replicated")])
def test_composed_trainer_gives_the_bytes_of_the_inline_one_on_the_sphere(kw):
    pspin = lg.models.spherical_pspin(12, 3, seed=0)  # an energy function with a projection onto the sphere
    args = dict(epochs=20, lr=0.05, seed=1) | kw
    assert torch.equal(lg.train(pspin, 4, progress=False, **args).theta, legacy_train(pspin, 4, **args)["theta"])
