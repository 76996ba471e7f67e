"""Update rules for K replicas trained at once, in the shape of optax: small pairs of functions on ``(K, P)`` tensors.

A :class:`Rule` is ``init(theta) -> state`` and ``update(u, state, theta, ctx) -> (out, state)``; :func:`chain`
feeds each rule's output to the next. Three kinds of rule compose:

- *gradient* rules map a gradient to a gradient (:func:`add_decayed_weights`, :func:`replicated`);
- *optimisers* map a gradient to a :class:`Step` (:func:`sgd`, :func:`momentum`, :func:`sghmc`, :func:`adam`);
- *step* rules map a step to a step (:func:`decoupled_weight_decay`; :func:`adamw` is adam chained with it).

:func:`sam` wraps the gradient itself (it evaluates the gradient again at a perturbed point).

Why in-house rather than optax or ``torch.optim``: every replica has its own learning rate (and may have its own
momentum, temperature, weight decay or SAM radius) while all K replicas live in one ``(K, P)`` tensor; a
:class:`Context` carries the learning rates of this step as a ``(K, 1)`` column, and any hyper-parameter documented
as :data:`Hyper` may be one number or one per replica. Two departures from optax, both to keep the arithmetic of the
trainer bit for bit: a :class:`Step` is applied by one fused operation (``theta - rate * direction``, and a decay
factor first), not added as a finished update; and the rules update their buffers in place (as ``torch.optim``
does: no ``(K, P)`` copy per step), so the state passed to ``update`` must not be used again.

A rule must leave a replica whose ``ctx.moving`` is False where it is: the driver zeroes its gradient and its
buffers (:func:`zero_rows`), and a rule that adds a term not proportional to the gradient (weight decay, coupling,
noise) masks it.

Example (two replicas, one learning rate each, heavy-ball momentum on E = |theta|^2 / 2)::

    >>> import torch
    >>> from lossglass import optim
    >>> rule = optim.chain(optim.add_decayed_weights(0.0), optim.momentum(0.5))
    >>> theta = torch.ones(2, 3)
    >>> state = rule.init(theta)
    >>> ctx = optim.Context(lr=torch.tensor([[0.1], [0.5]]))
    >>> for _ in range(2):
    ...     step, state = rule.update(theta, state, theta, ctx)   # grad E = theta
    ...     theta = step.apply(theta)
    >>> theta[:, 0]   # replica 0: 1 - 0.1 = 0.9, v = 0.5 + 0.9, 0.9 - 0.1 * 1.4; replica 1: 0.5, 0.5 - 0.5 * 1.0
    tensor([0.7600, 0.0000])
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ._util import randn_per
from .errors import check

__all__ = ["Context", "Hyper", "Rule", "Step", "adam", "adamw", "add_decayed_weights", "chain", "decoupled_weight_decay",
           "momentum", "replicated", "sam", "sgd", "sghmc", "zero_rows"]

#: a hyper-parameter: one number for every replica, or a sequence / 1-D tensor of one number per replica
Hyper = float | Sequence[float] | torch.Tensor
State = dict[str, torch.Tensor]

GRADIENT, OPTIMIZER, STEP = "gradient", "optimizer", "step"


@dataclass
class Context:
    """What the driver knows at one step and every rule may read.

    ``lr``: ``(K, 1)`` learning rate of each replica at this step (any schedule applied); ``count``: optimiser steps
    taken before this one (Adam's t is ``count + 1``); ``progress``: the fraction of the planned steps done, in
    [0, 1] (the coupling schedule of :func:`replicated`); ``moving``: ``(K,)`` bool, the replicas that may move
    (None: all); ``alive``: ``(K,)`` bool, the replicas that did not diverge (None: all)."""

    lr: torch.Tensor
    count: int = 0
    progress: float = 0.0
    moving: torch.Tensor | None = None
    alive: torch.Tensor | None = None
    all_moving: bool = field(init=False)

    def __post_init__(self) -> None:
        check(self.lr.ndim == 2 and self.lr.shape[1] == 1, f"Context.lr must be a (K, 1) column, got {tuple(self.lr.shape)}")
        self.all_moving = self.moving is None or bool(self.moving.all())


@dataclass(frozen=True)
class Step:
    """One update of ``(K, P)`` parameters: theta <- keep * theta - rate * direction / denom.

    ``rate`` and ``keep`` are ``(K, 1)`` columns or None (1); ``denom`` is ``(K, P)`` or None (1); at most one of
    ``rate`` and ``denom`` is given. :meth:`apply` does it in place with one fused operation per term (``mul_``, then
    ``addcmul_``, ``addcdiv_`` or ``sub_``): ``addcmul_`` rounds theta - rate * direction once (a fused multiply-add
    on CPUs), so adding a finished update -rate * direction instead would move the last bit of theta."""

    direction: torch.Tensor
    rate: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    denom: torch.Tensor | None = None

    def apply(self, theta: torch.Tensor) -> torch.Tensor:
        """Update ``theta`` in place and return it."""
        if self.keep is not None:
            theta.mul_(self.keep)
        if self.denom is not None:
            return theta.addcdiv_(self.direction, self.denom, value=-1)
        if self.rate is None:
            return theta.sub_(self.direction)
        return theta.addcmul_(self.direction, self.rate, value=-1)


@dataclass(frozen=True)
class Rule:
    """An update rule: ``init(theta) -> state`` (a dict of tensors, ``(K, P)`` buffers) and
    ``update(u, state, theta, ctx) -> (out, state)``. ``kind`` says what ``u`` and ``out`` are: ``"gradient"``
    (gradient -> gradient), ``"optimizer"`` (gradient -> :class:`Step`) or ``"step"`` (Step -> Step)."""

    init: Callable[[torch.Tensor], State]
    update: Callable[[Any, State, torch.Tensor, Context], tuple[Any, State]]
    kind: str
    name: str


def _stateless(theta: torch.Tensor) -> State:
    return {}


def _hyper(value: Hyper, name: str, *, upper: float | None = None) -> float | torch.Tensor:
    """One number as a float, or one per replica as a 1-D float64 tensor; finite, >= 0 and < ``upper``."""
    if isinstance(value, (int, float)):
        out = float(value)
        vals = torch.tensor([out], dtype=torch.float64)
    else:
        out = vals = torch.as_tensor(value, dtype=torch.float64).reshape(-1).clone()
    ok = bool(torch.isfinite(vals).all()) and bool((vals >= 0).all()) and (upper is None or bool((vals < upper).all()))
    check(ok, f"{name} must be finite, >= 0{f' and < {upper}' if upper is not None else ''}, got {value}")
    return out


def _column(h: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A hyper-parameter ready to multiply ``(K, P)`` rows: a float stays a float (the scalar kernels), one value
    per replica becomes a ``(K, 1)`` column of ``like``'s dtype."""
    if isinstance(h, float):
        return h
    check(h.numel() == like.shape[0], f"a per-replica hyper-parameter has {h.numel()} values for {like.shape[0]} replicas")
    return h.to(like.device, like.dtype).reshape(-1, 1)


def _axpy(y: torch.Tensor, a: float | torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y + a x in one fused pass; ``a`` a float or a ``(K, 1)`` column (the same arithmetic either way)."""
    if isinstance(a, float):
        return torch.add(y, x, alpha=a, out=out)
    return torch.addcmul(y, x, a, out=out)


def _masked(u: torch.Tensor, ctx: Context) -> torch.Tensor:
    """``u`` with the rows of replicas that must not move set to 0 (nothing to do when all move)."""
    return u if ctx.all_moving else torch.where(ctx.moving.unsqueeze(1), u, 0)


def zero_rows(state: State, mask: torch.Tensor) -> None:
    """Clear the buffers of the replicas in ``mask`` (diverged or stopped): nothing moves them again."""
    for v in state.values():
        v[mask] = 0


def _one_minus(b: float) -> float:
    """1 - b as written in decimal (0.1 for 0.9; binary 1 - 0.9 is 0.09999999999999998): the constants Adam had."""
    return float(decimal.Decimal(1) - decimal.Decimal(repr(float(b))))


# ---------------------------------------------------------------------------------------------------- optimisers


def sgd() -> Rule:
    """Plain gradient descent: theta <- theta - eta g (Robbins & Monro 1951), eta the replica's learning rate.

    >>> import torch
    >>> from lossglass import optim
    >>> theta, g = torch.zeros(2, 2), torch.ones(2, 2)
    >>> step, _ = optim.sgd().update(g, {}, theta, optim.Context(lr=torch.tensor([[0.1], [0.3]])))
    >>> step.apply(theta)
    tensor([[-0.1000, -0.1000],
            [-0.3000, -0.3000]])
    """

    def update(g, state, theta, ctx):
        return Step(g, rate=ctx.lr), state

    return Rule(_stateless, update, OPTIMIZER, "sgd")


def _heavy_ball(beta: float | torch.Tensor, noise: Callable[[torch.Tensor, Context], torch.Tensor] | None,
                name: str) -> Rule:
    def init(theta):
        return {"velocity": torch.zeros_like(theta)}

    def update(g, state, theta, ctx):
        v = state["velocity"]
        _axpy(g, _column(beta, theta), v, out=v)  # v <- beta v + g, one pass
        if noise is not None:
            v.sub_(noise(theta, ctx))
        return Step(v, rate=ctx.lr), state

    return Rule(init, update, OPTIMIZER, name)


def momentum(beta: Hyper = 0.9) -> Rule:
    """Heavy-ball momentum (Polyak 1964, in ``torch.optim.SGD``'s form): v <- beta v + g; theta <- theta - eta v.

    State: ``velocity`` ``(K, P)``. ``beta`` in [0, 1), one or one per replica; ``beta = 0`` keeps v = g.

    >>> import torch
    >>> from lossglass import optim
    >>> rule, theta = optim.momentum([0.0, 0.5]), torch.zeros(2, 1)
    >>> state, ctx = rule.init(theta), optim.Context(lr=torch.tensor([[1.0], [1.0]]))
    >>> for _ in range(3):
    ...     step, state = rule.update(torch.ones(2, 1), state, theta, ctx)
    ...     theta = step.apply(theta)
    >>> theta.flatten()   # v = 1, 1, 1 and 1, 1.5, 1.75
    tensor([-3.0000, -4.2500])
    """
    return _heavy_ball(_hyper(beta, "momentum", upper=1.0), None, "momentum")


def sghmc(temperature: Hyper, gens: Sequence[torch.Generator], beta: Hyper = 0.9) -> Rule:
    """Stochastic-gradient Hamiltonian Monte Carlo (Chen et al. 2014, sec. 3.3): heavy-ball momentum with noise in
    the velocity, so that theta samples exp(-E/T).

    Heavy-ball SGD has friction (1 - beta)/eta; the momentum p = -eta v then needs noise of variance
    2 (1 - beta) eta T per step (PHYSICS.md). In the buffer's units:
      v <- beta v + g - sqrt(2 (1 - beta) T / eta) xi,  xi ~ N(0, I);  theta <- theta - eta v.
    ``beta = 0`` is SGLD, theta <- theta - eta g + sqrt(2 eta T) xi (Welling & Teh 2011). On E = theta^T H theta / 2
    this gives equipartition <E> = P T / 2 up to an O(eta lambda) step bias. Row k of xi comes from ``gens[k]``
    (drawn for every replica at every step, so a replica's noise does not depend on the others); no noise reaches a
    replica that is not moving, or one whose learning rate is 0. State: ``velocity``. ``temperature`` and ``beta``:
    one or one per replica.

    >>> import torch
    >>> from lossglass import optim
    >>> k, p, temp = 8, 500, 0.1
    >>> gens = [torch.Generator().manual_seed(i) for i in range(k)]
    >>> rule = optim.sghmc(temp, gens, beta=0.9)
    >>> theta = torch.randn(k, p, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * temp ** 0.5
    >>> state, ctx, e = rule.init(theta), optim.Context(lr=torch.full((k, 1), 0.05, dtype=torch.float64)), []
    >>> for t in range(400):                      # E = |theta|^2 / 2, grad E = theta
    ...     step, state = rule.update(theta, state, theta, ctx)
    ...     theta = step.apply(theta)
    ...     e.append(0.5 * theta.pow(2).sum(1).mean().item())
    >>> round(sum(e) / len(e) / (p * temp / 2), 1)   # <E> / (P T / 2)
    1.0
    """
    temperature = _hyper(temperature, "temperature")
    beta = _hyper(beta, "momentum", upper=1.0)
    check(gens is not None and len(gens) > 0, "sghmc needs one random generator per replica")
    gens = list(gens)
    coef = 2 * (1 - beta) * temperature  # a float, or a float64 tensor when either is per replica

    def noise(theta, ctx):
        xi = randn_per(gens, theta.shape[1], theta.device, theta.dtype)
        lr = ctx.lr
        # coef / lr as torch computes a number over a tensor (lr.reciprocal() * coef): one rounding for both kinds
        amp = torch.where(lr > 0, (lr.clamp_min(1e-300).reciprocal() * _column(coef, theta)).sqrt(), 0)
        if ctx.moving is not None:
            amp = amp * ctx.moving.unsqueeze(1)
        return xi * amp

    return _heavy_ball(beta, noise, "sghmc")


def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Rule:
    """Adam (Kingma & Ba 2015, Algorithm 1), with t = ``ctx.count + 1``:
      m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
      theta <- theta - eta (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    State: ``mu`` (m) and ``nu`` (v), ``(K, P)``. ``b1``, ``b2``, ``eps`` are numbers shared by all replicas.

    >>> import torch
    >>> from lossglass import optim
    >>> rule, theta = optim.adam(), torch.zeros(2, 1)
    >>> step, state = rule.update(torch.tensor([[4.0], [-0.5]]), rule.init(theta), theta,
    ...                           optim.Context(lr=torch.tensor([[0.1], [0.2]])))
    >>> step.apply(theta).flatten()   # the first step is -eta sign(g) (up to eps)
    tensor([-0.1000,  0.2000])
    """
    check(0 <= b1 < 1 and 0 <= b2 < 1 and eps > 0, f"adam needs 0 <= b1, b2 < 1 and eps > 0, got {b1}, {b2}, {eps}")
    c1, c2 = _one_minus(b1), _one_minus(b2)

    def init(theta):
        return {"mu": torch.zeros_like(theta), "nu": torch.zeros_like(theta)}

    def update(g, state, theta, ctx):
        m, v = state["mu"], state["nu"]
        m.mul_(b1).add_(g, alpha=c1)
        v.mul_(b2).addcmul_(g, g, value=c2)
        t = ctx.count + 1
        denom = (v / (1 - b2**t)).sqrt_().add_(eps)
        return Step(m * (ctx.lr / (1 - b1**t)), denom=denom), state

    return Rule(init, update, OPTIMIZER, "adam")


def adamw(weight_decay: Hyper = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Rule:
    """AdamW (Loshchilov & Hutter 2019): Adam with the weight decay taken out of the gradient,
      theta <- (1 - eta lambda) theta - eta adam(g),
    i.e. ``chain(adam(b1, b2, eps), decoupled_weight_decay(weight_decay))`` (the optimiser of the grokking
    experiments, Power et al. 2022; ``torch.optim.AdamW``'s arithmetic).

    >>> import torch
    >>> from lossglass import optim
    >>> rule, theta = optim.adamw(0.5), torch.ones(1, 2)
    >>> step, _ = rule.update(torch.zeros(1, 2), rule.init(theta), theta, optim.Context(lr=torch.tensor([[0.1]])))
    >>> step.apply(theta)   # no gradient: only the decay, 1 - 0.1 * 0.5
    tensor([[0.9500, 0.9500]])
    """
    return chain(adam(b1, b2, eps), decoupled_weight_decay(weight_decay))


# ------------------------------------------------------------------------------------------ gradient and step rules


def add_decayed_weights(weight_decay: Hyper) -> Rule:
    """L2 weight decay through the gradient: g <- g + lambda theta, so the energy minimised (and sampled by
    :func:`sghmc`) is E(theta) + lambda |theta|^2 / 2 (Krogh & Hertz 1992). One lambda or one per replica.

    >>> import torch
    >>> from lossglass import optim
    >>> theta = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
    >>> optim.add_decayed_weights([0.1, 0.0]).update(torch.zeros(2, 2), {}, theta, optim.Context(lr=torch.ones(2, 1)))[0]
    tensor([[ 0.1000, -0.2000],
            [ 0.0000,  0.0000]])
    """
    wd = _hyper(weight_decay, "weight_decay")

    def update(g, state, theta, ctx):
        if isinstance(wd, float) and wd == 0:
            return g, state
        return _masked(_axpy(g, _column(wd, theta), theta), ctx), state

    return Rule(_stateless, update, GRADIENT, "add_decayed_weights")


def decoupled_weight_decay(weight_decay: Hyper) -> Rule:
    """Weight decay outside the gradient (Loshchilov & Hutter 2019): a step theta <- keep theta - rate d becomes
    theta <- (1 - eta lambda) keep theta - rate d, applied before the step's own term; replicas that do not move
    keep their parameters. One lambda or one per replica. See :func:`adamw`."""
    wd = _hyper(weight_decay, "weight_decay")

    def update(step, state, theta, ctx):
        if isinstance(wd, float) and wd == 0:
            return step, state
        shrink = ctx.lr * _column(wd, theta)
        if ctx.moving is not None:
            shrink = shrink * ctx.moving.unsqueeze(1)
        keep = 1 - shrink
        return replace(step, keep=keep if step.keep is None else step.keep * keep), state

    return Rule(_stateless, update, STEP, "decoupled_weight_decay")


def replicated(gamma: tuple[float, float] = (1e-3, 1.0)) -> Rule:
    """Replicated SGD's elastic coupling (Baldassi et al., PNAS 2016 and 2020): each replica is pulled towards the
    centre of the replicas, g_a <- g_a + gamma (theta_a - theta_bar), theta_bar the mean of the replicas that did
    not diverge (``ctx.alive``). This is the gradient of gamma/2 sum_a |theta_a - theta_bar|^2 (the sum of
    theta_a - theta_bar vanishes). gamma grows geometrically with ``ctx.progress`` p: gamma0 (gamma1/gamma0)^p.

    >>> import torch
    >>> from lossglass import optim
    >>> theta = torch.tensor([[0.0], [2.0], [10.0]])
    >>> alive = torch.tensor([True, True, False])          # the diverged replica is not in the centre (1.0)
    >>> ctx = optim.Context(lr=torch.ones(3, 1), progress=1.0, alive=alive)
    >>> optim.replicated((0.1, 0.5)).update(torch.zeros(3, 1), {}, theta, ctx)[0].flatten()
    tensor([-0.5000,  0.5000,  4.5000])
    """
    check(len(gamma) == 2 and all(math.isfinite(x) and x > 0 for x in gamma),
          f"gamma must be two positive numbers (start, end), got {gamma}")
    g0, g1 = float(gamma[0]), float(gamma[1])

    def update(g, state, theta, ctx):
        gam = g0 * (g1 / g0) ** ctx.progress
        alive = ctx.alive
        if alive is None or not alive.any():
            centre = theta.mean(0, keepdim=True)
        else:
            centre = theta[alive].mean(0, keepdim=True)
        return _masked(g + gam * (theta - centre), ctx), state

    return Rule(_stateless, update, GRADIENT, "replicated")


def sam(rho: Hyper = 0.05) -> Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor],
                                        torch.Tensor]:
    """Sharpness-aware minimisation (Foret et al. 2021) as a gradient wrapper: the gradient of the same mini-batch
    taken at the worst point of the rho-ball to first order,
      g_SAM = grad E(theta + rho g / |g|),  g = grad E(theta).
    Returns ``wrap(grad_at, theta, g) -> g_SAM``, ``grad_at(theta')`` the mini-batch gradient at theta'. ``rho``: one
    radius or one per replica.

    >>> import torch
    >>> from lossglass import optim
    >>> theta = torch.tensor([[1.0, 0.0]])
    >>> grad_at = lambda th: th ** 3                       # E = sum theta^4 / 4
    >>> optim.sam(0.5)(grad_at, theta, grad_at(theta))     # (1 + 0.5)^3
    tensor([[3.3750, 0.0000]])
    """
    r = _hyper(rho, "rho")
    check(isinstance(r, torch.Tensor) or r > 0, f"rho must be > 0, got {rho}")

    def wrap(grad_at, theta, g):
        eps = _column(r, theta) * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return grad_at(theta + eps)

    return wrap


# ------------------------------------------------------------------------------------------------------ chain


def chain(*rules: Rule) -> Rule:
    """Rules applied in turn, each to the previous one's output (optax's ``chain``): gradient rules first, then at
    most one optimiser, then step rules. The state is one dict, rule i's entries prefixed ``"i."``.

    >>> from lossglass import optim
    >>> r = optim.chain(optim.add_decayed_weights(1e-4), optim.replicated(), optim.momentum(0.9))
    >>> r.kind, r.name
    ('optimizer', 'chain(add_decayed_weights, replicated, momentum)')
    """
    check(len(rules) > 0, "chain needs at least one rule")
    order = {GRADIENT: 0, OPTIMIZER: 1, STEP: 2}
    ranks = [order[r.kind] for r in rules]
    check(ranks == sorted(ranks) and ranks.count(1) <= 1 and (1 in ranks or len(set(ranks)) == 1),
          "chain: gradient rules first, then one optimiser, then step rules (got "
          f"{', '.join(f'{r.name} ({r.kind})' for r in rules)})")
    kind = OPTIMIZER if 1 in ranks else rules[0].kind
    prefixes = [f"{i}." for i in range(len(rules))]

    def init(theta):
        return {p + k: v for p, r in zip(prefixes, rules) for k, v in r.init(theta).items()}

    def update(u, state, theta, ctx):
        out: State = {}
        for p, r in zip(prefixes, rules):
            sub = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
            u, sub = r.update(u, sub, theta, ctx)
            out.update({p + k: v for k, v in sub.items()})
        return u, out

    return Rule(init, update, kind, f"chain({', '.join(r.name for r in rules)})")
