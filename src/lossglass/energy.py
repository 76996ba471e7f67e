"""The energy interface every landscape implements, and the function-defined landscapes.

An energy is E: R^P -> R evaluated for K replicas at once, ``theta`` ``(K, P)`` -> ``(K,)``, with its gradient, its
Hessian-vector products and, for a network, mini-batch losses. Two kinds implement :class:`Energy`:

- :class:`lossglass.problem.Problem`: E(theta) = (1/N) sum_n loss(f_theta(x_n), y_n) over a data set
  (``has_data`` True: accuracies, test and validation splits, mini-batches);
- :class:`FunctionProblem`: E(theta) = fn(theta) for any ``fn: (K, P) -> (K,)`` (reference landscapes such as the
  spherical p-spin, quadratics, tests; ``has_data`` False: accuracy is NaN and there is no test split).

Protocols ask ``problem.has_data`` instead of the type of the problem. Both share what does not depend on the data:
the constraint manifold (:meth:`Energy.project`, :meth:`Energy.constraint`, the Riemannian
:meth:`Energy.hessian_operator`), the parameter layout and the generic evaluation of affine families.

Example (a quadratic bowl E = |theta|^2 / 2, two replicas):

    >>> import torch
    >>> bowl = FunctionProblem(lambda th: 0.5 * (th * th).sum(-1), 3, dtype=torch.float64, device="cpu")
    >>> isinstance(bowl, Energy), bowl.has_data
    (True, False)
    >>> theta = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    >>> bowl.energy(theta).tolist()
    [4.5, 0.5]
    >>> bowl.grad(theta)[0].tolist()                              # grad E = theta
    [1.0, 2.0, 2.0]
    >>> bowl.hvp(theta, torch.ones_like(theta))[1].tolist()       # H = I
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ._util import as_batch, check_finite, resolve_device, seed_for
from .errors import LossglassError, check
from .layout import ParamEntry, ParamLayout
from .manifold import Sphere


def masked_total(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum_k [mask_k and loss_k finite] loss_k: ``torch.where`` passes no gradient (not even NaN) to the masked
    side, so frozen or diverged replicas get none."""
    keep = torch.isfinite(loss) if mask is None else (mask & torch.isfinite(loss))
    return torch.where(keep, loss, torch.zeros_like(loss)).sum()


class Energy(ABC):
    """What every landscape offers (see the module docstring). ``theta`` is ``(P,)`` for one point or ``(K, P)``
    for K replicas; every method accepts both and returns per-replica results.

    Attributes: ``n_params`` (P), ``layout`` (:class:`~lossglass.layout.ParamLayout`), ``device``, ``dtype``,
    ``manifold`` (None: unconstrained; a :class:`~lossglass.manifold.Sphere`), ``has_data`` (labelled data:
    accuracies, test split, mini-batches)."""

    manifold: Sphere | None = None
    has_data: bool = False
    n_params: int
    layout: ParamLayout
    device: torch.device
    dtype: torch.dtype

    # ------------------------------------------------------------------ what each kind computes
    @abstractmethod
    def evaluate(self, theta: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        """``{"loss": E, "accuracy": ...}`` per replica on a split."""

    @abstractmethod
    def energy_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E(theta), grad E(theta))``."""

    @abstractmethod
    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(theta) v = d/de grad E(theta + e v) at e = 0."""

    @abstractmethod
    def hvp_operator(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H(theta) v for a fixed ``(K, P)`` theta (what iterative eigensolvers call repeatedly)."""

    @abstractmethod
    def batch_loss(self, theta, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable per-replica loss on a mini-batch ``(K,)`` (the energy itself without data)."""

    @abstractmethod
    def batch_loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-replica mini-batch loss ``(K,)`` and its gradient ``(K, P)``; replicas where ``mask`` is False (or
        whose loss is not finite) get a zero gradient."""

    @abstractmethod
    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """``(K, P)`` initial points; replica k depends on (seed, ids[k]) only."""

    @abstractmethod
    def subset(self, n: int | None) -> Energy:
        """The same energy on the first ``n`` training samples (itself without data)."""

    @abstractmethod
    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Network outputs ``(K, N, C)`` (refused without a network)."""

    # ------------------------------------------------------------------ shared
    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        """E(theta) = the training-split loss of :meth:`evaluate`; ``(P,) -> ()`` or ``(K, P) -> (K,)``."""
        return self.evaluate(theta, "train")["loss"]

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """grad E(theta), same shape as theta (replicas are independent, so one backward pass serves all K)."""
        return self.energy_and_grad(theta)[1]

    @property
    def params(self) -> list[ParamEntry]:
        """The layout's entries (name, shape, offset) in order."""
        return list(self.layout.entries)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` as the named parameter tensors, ``(K, *shape)`` or ``(*shape)``."""
        return self.layout.unflatten(theta)

    def split(self, theta: torch.Tensor, *, leaf: bool = False) -> list[torch.Tensor]:
        """``(K, P)`` -> one ``(K, *shape)`` view per parameter tensor (see :meth:`ParamLayout.split`)."""
        return self.layout.split(theta, leaf=leaf)

    def _prepare(self, theta) -> tuple[torch.Tensor, bool]:
        theta, single = as_batch(theta, self.n_params)
        return theta.to(self.device, self.dtype), single

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Map parameters back onto the manifold (``self.manifold.project``; the identity when None)."""
        return theta if self.manifold is None else self.manifold.project(theta)

    def has_projector(self) -> bool:
        """Whether :meth:`project` is anything but the identity (a constraint, known or not)."""
        return self.manifold is not None or type(self).project is not Energy.project

    def constraint(self, what: str) -> Sphere | None:
        """The manifold that ``what`` (a curvature or path routine) must respect: ``self.manifold``, or None for
        an unconstrained problem. A problem that projects its parameters without declaring the manifold is
        refused: its tangent space, Riemannian Hessian and geodesics are unknown."""
        if self.manifold is None and self.has_projector():
            raise LossglassError(
                f"{what}: this problem projects its parameters onto a constraint (a custom projector) but declares "
                "no manifold, so its tangent space, Riemannian Hessian and geodesics are unknown; give it one "
                "(e.g. Problem.from_function(fn, P, manifold=lossglass.problem.Sphere(radius)) or set "
                "problem.manifold) instead of a bare projector")
        return self.manifold

    def hessian_operator(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> Hess E(theta) v for ``(K, P)`` theta: the Euclidean Hessian for an unconstrained problem, the
        Riemannian Hessian P_T (grad^2 E - (theta . grad E / |theta|^2) I) P_T on a :class:`Sphere` (Absil, Mahony
        & Sepulchre 2008, eq. 5.15; the normal direction maps to 0). Refuses a problem with an undeclared
        constraint (:meth:`constraint`)."""
        man = self.constraint("the Hessian")
        theta, _ = self._prepare(theta)
        op = self.hvp_operator(theta)
        if man is None:
            return op
        check(bool(man.contains(theta, 1e-4).all()), f"theta is not on the problem's manifold {man}; project it "
              "first (problem.project)")
        return man.hessian_operator(theta, self.grad(theta), op)

    def _affine_setup(self, center: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor):
        """Validated ``(single, basis (M, J+1, P), coefficients (M, G, J+1) with a leading 1)``."""
        single = torch.as_tensor(center).ndim == 1
        center = center.to(self.device, self.dtype).reshape(-1, self.n_params)
        m = center.shape[0]
        directions = directions.to(self.device, self.dtype).reshape(m, -1, self.n_params)
        coeffs = coeffs.to(self.device, self.dtype).reshape(m, -1, directions.shape[1])
        check_finite(center, "center")
        check_finite(directions.reshape(-1, self.n_params), "directions")
        check(bool(torch.isfinite(coeffs).all()), "coefficients hold NaN or inf")
        basis = torch.cat([center.unsqueeze(1), directions], 1)  # (M, J+1, P)
        cc_all = torch.cat([torch.ones(m, coeffs.shape[1], 1, device=self.device, dtype=self.dtype), coeffs], 2)
        return single, basis, cc_all

    def evaluate_affine(self, center: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor,
                        split: str = "train", block: int = 512) -> dict[str, torch.Tensor]:
        """Loss and accuracy at theta_{m,g} = center_m + sum_j coeffs[m, g, j] directions[m, j].

        Shapes: center ``(P,)`` or ``(M, P)``; directions ``(J, P)`` or ``(M, J, P)``; coeffs ``(G, J)`` or
        ``(M, G, J)``; results ``(G,)`` or ``(M, G)``. M families (paths, planes) of G points each, evaluated as
        replicas in blocks of about ``block`` points (a network may share work between the points, see
        :meth:`lossglass.problem.Problem.evaluate_affine`)."""
        single, basis, cc_all = self._affine_setup(center, directions, coeffs)
        loss_sum, correct = self._affine_blocks(basis, cc_all, split, block, None)
        res = {"loss": loss_sum.to(self.dtype), "accuracy": correct.to(self.dtype)}
        return {k: v[0] for k, v in res.items()} if single else res

    def _affine_blocks(self, basis: torch.Tensor, cc_all: torch.Tensor, split: str, block: int,
                       shortcut: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy ``(M, G)`` (float64) of every point, in blocks of points evaluated as replicas, or by
        ``shortcut(theta, cc, loss_sum_view, correct_view)`` (which fills the block's sums)."""
        m, g_total = basis.shape[0], cc_all.shape[1]
        loss_sum = torch.zeros(m, g_total, device=self.device, dtype=torch.float64)
        correct = torch.zeros_like(loss_sum)
        per_block = max(1, block // m)
        with torch.no_grad():
            for g0 in range(0, g_total, per_block):
                cc = cc_all[:, g0:g0 + per_block]  # (M, Gb, J+1)
                gb = cc.shape[1]
                theta = torch.bmm(cc, basis).reshape(m * gb, self.n_params)
                if shortcut is None:
                    ev = self.evaluate(theta, split)
                    loss_sum[:, g0:g0 + gb] = ev["loss"].double().view(m, gb)
                    correct[:, g0:g0 + gb] = ev["accuracy"].double().view(m, gb)
                    continue
                shortcut(theta, cc, loss_sum[:, g0:g0 + gb], correct[:, g0:g0 + gb])
        return loss_sum, correct


class FunctionProblem(Energy):
    """E(theta) = fn(theta) for any ``fn: (K, P) -> (K,)``; accuracy is NaN (there are no labels), ``has_data``
    False.

    ``manifold`` (e.g. :class:`Sphere`) constrains theta: :meth:`project` maps onto it, curvature is Riemannian and
    paths and planes stay on it. A bare ``projector`` is still used by training and walks, but curvature and path
    routines refuse such a problem (its geometry is unknown). The attributes ``model`` and ``dataset`` are None."""

    has_data = False

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n_params: int, *, name: str = "function",
                 device: str = "auto", dtype: torch.dtype = torch.float32,
                 init_scale: float = 1.0, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 manifold: Sphere | None = None):
        check(callable(fn), "fn must be callable: (K, P) -> (K,)")
        check(isinstance(n_params, int) and n_params > 0, f"n_params must be a positive int, got {n_params!r}")
        check(manifold is None or isinstance(manifold, Sphere),
              f"manifold must be a lossglass.problem.Sphere or None, got {type(manifold).__name__}")
        check(projector is None or manifold is None, "give a projector or a manifold, not both (the manifold "
              "brings its own projection)")
        self.manifold = manifold
        self.fn, self.n_params, self.name = fn, n_params, name
        self.device, self.dtype = resolve_device(device), dtype
        self.layout = ParamLayout([ParamEntry("theta", (n_params,), 0)])
        self.model, self.dataset, self.loss_name = None, None, name
        self.init_scale = float(init_scale)
        self._projector = projector
        with torch.no_grad():
            e = fn(torch.zeros(2, n_params, device=self.device, dtype=dtype))
        check(isinstance(e, torch.Tensor) and tuple(e.shape) == (2,),
              f"fn must map (K, P) to (K,); for K=2 it returned shape {tuple(getattr(e, 'shape', ()))}")

    def __repr__(self) -> str:
        return f"FunctionProblem({self.name!r}, P={self.n_params})"

    @property
    def is_mlp(self) -> bool:
        return False

    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """Replica k: ``init_scale`` * N(0, I) from the seed mixed from (seed, ids[k]), projected."""
        check(isinstance(n_replicas, int) and n_replicas > 0, f"n_replicas must be a positive int, got {n_replicas}")
        ids = range(n_replicas) if ids is None else ids
        rows = [torch.randn(self.n_params, generator=torch.Generator().manual_seed(seed_for(seed, 7, k)),
                            dtype=self.dtype) for k in ids]
        return self.project(torch.stack(rows).to(self.device) * self.init_scale)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """theta mapped onto the manifold (or by the custom projector); the identity when there is neither."""
        if self.manifold is not None:
            return self.manifold.project(theta)
        return theta if self._projector is None else self._projector(theta)

    def has_projector(self) -> bool:
        return self.manifold is not None or self._projector is not None

    def subset(self, n: int | None) -> FunctionProblem:
        """Itself: a function energy has no training samples to take a subset of."""
        return self

    def evaluate(self, theta: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        """``{"loss": fn(theta), "accuracy": NaN}`` whatever the split (there is no data)."""
        theta, single = self._prepare(theta)
        with torch.no_grad():
            e = self._energy(theta)
        res = {"loss": e, "accuracy": torch.full_like(e, float("nan"))}
        return {k: v[0] for k, v in res.items()} if single else res

    def _energy(self, theta: torch.Tensor) -> torch.Tensor:
        e = self.fn(theta)
        if tuple(e.shape) != (theta.shape[0],):
            raise LossglassError(f"{self.name}: fn returned shape {tuple(e.shape)} for {theta.shape[0]} replicas")
        return e

    def batch_loss(self, theta: torch.Tensor, x=None, y=None) -> torch.Tensor:
        """fn(theta), differentiable (``x`` and ``y`` are ignored)."""
        return self._energy(theta)

    def batch_loss_and_grad(self, theta, x=None, y=None, mask=None):
        theta = theta.detach().requires_grad_(True)
        loss = self._energy(theta)
        g, = torch.autograd.grad(masked_total(loss, mask), theta, allow_unused=True)
        return loss.detach(), (torch.zeros_like(theta) if g is None else g)

    def energy_and_grad(self, theta):
        theta, single = self._prepare(theta)
        theta = theta.detach().requires_grad_(True)
        e = self._energy(theta)
        g, = torch.autograd.grad(e.sum(), theta, allow_unused=True)
        g = torch.zeros_like(theta) if g is None else g
        return (e.detach()[0], g[0]) if single else (e.detach(), g)

    def hvp_operator(self, theta):
        theta, _ = self._prepare(theta)
        theta = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(self._energy(theta).sum(), theta, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # linear or constant energy: H = 0
            return lambda v: torch.zeros_like(theta)

        def mv(v):
            hv, = torch.autograd.grad(g, theta, grad_outputs=v.to(self.device, self.dtype).reshape(theta.shape),
                                      retain_graph=True, allow_unused=True)
            return torch.zeros_like(theta) if hv is None else hv

        return mv

    def hvp(self, theta, v):
        theta, single = self._prepare(theta)
        v, _ = as_batch(v.to(self.device, self.dtype), self.n_params, "v")
        theta = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(self._energy(theta).sum(), theta, create_graph=True, allow_unused=True)
        hv = None
        if g is not None and g.requires_grad:
            hv, = torch.autograd.grad(g, theta, grad_outputs=v, allow_unused=True)
        hv = torch.zeros_like(theta) if hv is None else hv
        return hv[0] if single else hv

    def forward(self, theta, x):
        raise LossglassError(f"{self.name} is an energy function, not a network: it has no outputs to compute")
