"""The interface every forward path of :class:`~lossglass.problem.Problem` implements.

A backend computes the outputs f_theta_k(x) of K networks at once, ``theta`` ``(K, P)`` laid out by a
:class:`~lossglass.layout.ParamLayout`, ``x`` ``(N, D)`` shared or ``(K, N, D)`` one batch per replica:

    forward(theta, x) = [f_theta_1(x), ..., f_theta_K(x)]   (K, N, C).

The problem builds the energy, its chunking and its derivatives on top of :meth:`Backend.forward` (autograd). A
backend may also offer faster exact routes, each returning None where it does not apply (the problem then takes
the autograd route): a hand-written mini-batch gradient (:meth:`Backend.batch_loss_and_grad`), a Hessian-vector
operator (:meth:`Backend.hvp_operator`), fused loss sums (:meth:`Backend.evaluate_sums`,
:meth:`Backend.affine_sums`), the first-layer shortcut of affine families (:attr:`Backend.first_layer_affine`),
hidden activations and the permutation symmetry of its layers. Every fast route is tested against the vmap
backend (tests/test_backends.py), as curvlinops tests its operators against torch.func.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..layout import ParamLayout


class Backend(ABC):
    """One forward path (see the module docstring). ``name``: ``"mlp"``, ``"fused"``, ``"stack"``, ``"graph"`` or
    ``"vmap"``; ``layout``: where each parameter tensor lives in theta; ``bn_layers``: the indices of the BatchNorm
    ops whose statistics the problem supplies (only the layer-stack backends have any)."""

    name: str = "backend"
    #: the first layer's pre-activations are affine in theta, so affine families share them (:meth:`affine_into`)
    first_layer_affine: bool = False

    def __init__(self, layout: ParamLayout):
        self.layout = layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout!r})"

    @property
    def bn_layers(self) -> tuple[int, ...]:
        return ()

    def activation_sizes(self) -> list[int]:
        """Per-sample sizes of the intermediate values besides the rows of 2-D weights (memory budgeting)."""
        return []

    @abstractmethod
    def forward(self, theta, x: torch.Tensor, stats: dict | None = None, *, group: int | None = None) -> torch.Tensor:
        """Outputs ``(K, N, C)``; ``theta`` is ``(K, P)`` or the per-tensor list of ``layout.split``. BatchNorm
        layers use ``stats`` when given, else the batch's statistics (of blocks of ``group`` samples with group)."""

    # ------------------------------------------------------------------ optional exact shortcuts (None: not here)
    def batch_loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-replica mini-batch loss ``(K,)`` and gradient ``(K, P)`` without autograd, or None."""
        return None

    def hvp_operator(self, theta: torch.Tensor, chunks: Callable[[], list], n_total: int, memory_mb: float,
                     cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """v -> H(theta) v over the training set (``chunks()`` its chunks, ``n_total`` samples), or None."""
        return None

    def evaluate_sums(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      memory_mb: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed loss and number of correct predictions per replica (float64), fused, or None."""
        return None

    def affine_sums(self, basis: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    memory_mb: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Summed loss and correct predictions at every point of M affine families (fused), or None."""
        return None

    def affine_into(self, theta: torch.Tensor, basis: torch.Tensor, cc: torch.Tensor, x: torch.Tensor,
                    y: torch.Tensor, step: int, loss: Callable, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """Accumulate summed losses and correct predictions of affine-family points (first-layer shortcut);
        only where :attr:`first_layer_affine`."""
        raise NotImplementedError(f"{self.name} backend has no first-layer shortcut")

    def hidden_activations(self, theta: torch.Tensor, x: torch.Tensor,
                           stats: dict | None) -> list[torch.Tensor] | None:
        """What each hidden layer hands to the next Linear/Conv, ``[(K, M, units)]``, or None (not supported)."""
        return None

    @property
    def has_hidden_activations(self) -> bool:
        return False

    def permutation_spec(self) -> dict[str, tuple] | None:
        """The hidden-unit / channel permutations of its layers (``PermutationSpec.perms``), or None (unknown)."""
        return None
