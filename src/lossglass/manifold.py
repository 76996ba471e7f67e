"""Constraint manifolds of the parameters: the sphere |theta| = r of the spherical p-spin.

A problem with ``manifold`` set keeps its replicas on it (``project``), measures curvature with the Riemannian
Hessian (:meth:`Sphere.hessian_operator`) and joins two points by geodesics (:meth:`Sphere.geodesic`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import check


class Sphere:
    """The constraint |theta|^2 = radius^2 (each replica on its own sphere), e.g. sum_i s_i^2 = N for the
    spherical p-spin (radius sqrt(N)).

    Tangent space at theta: {v : theta . v = 0}, projector P_T = I - theta theta^T / |theta|^2. The Hessian that
    matters on the sphere is the Riemannian one (Absil, Mahony & Sepulchre 2008, eq. 5.15 and sec. 5.5;
    PHYSICS.md):

        Hess E(theta) = P_T (grad^2 E(theta) - (theta . grad E(theta) / |theta|^2) I) P_T,

    the second term being the Weingarten map of the sphere. Geodesics are great circles (:meth:`geodesic`).

    Example (the unit circle in R^2):

        >>> import torch
        >>> s = Sphere(1.0)
        >>> s.project(torch.tensor([[3.0, 4.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929]]
        >>> theta = torch.tensor([[1.0, 0.0]])
        >>> s.tangent(theta, torch.tensor([[1.0, 1.0]])).tolist()        # the normal part removed
        [[0.0, 1.0]]
        >>> c = s.geodesic(theta, torch.tensor([[0.0, 1.0]]), torch.tensor([0.5]))   # halfway on the quarter circle
        >>> round(float(c[0, 0, 0]), 6), round(float(c[0, 0, 1]), 6)
        (0.707107, 0.707107)
    """

    codim = 1  # the tangent space has P - 1 dimensions

    def __init__(self, radius: float):
        check(isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0,
              f"the sphere's radius must be a positive number, got {radius!r}")
        self.radius = float(radius)

    def __repr__(self) -> str:
        return f"Sphere(radius={self.radius:g})"

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """theta * radius / |theta| (row-wise): the nearest point of the sphere."""
        return theta * (self.radius / theta.norm(dim=-1, keepdim=True).clamp_min(1e-30))

    def tangent(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P_T v = v - (theta . v / |theta|^2) theta; theta ``(..., P)`` broadcasts against v ``(..., P)``."""
        return v - ((v * theta).sum(-1, keepdim=True) / (theta * theta).sum(-1, keepdim=True)) * theta

    def contains(self, theta: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
        """Per row: ||theta|^2 / radius^2 - 1| <= rtol."""
        return ((theta * theta).sum(-1) / self.radius**2 - 1).abs() <= rtol

    def weingarten(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The coefficient theta . grad E / |theta|^2 of the curvature term, per replica ``(K,)``."""
        return (theta * grad).sum(-1) / (theta * theta).sum(-1)

    def hessian_operator(self, theta: torch.Tensor, grad: torch.Tensor,
                         hvp: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> P_T (H (P_T v) - c P_T v), c = theta . grad / |theta|^2, from the Euclidean product ``hvp``
        (all ``(K, P)``): the Riemannian Hessian of the class docstring. The normal direction maps to 0."""
        c = self.weingarten(theta, grad).unsqueeze(-1)

        def mv(v: torch.Tensor) -> torch.Tensor:
            vt = self.tangent(theta, v.to(theta.dtype))
            return self.tangent(theta, hvp(vt) - c * vt).to(v.dtype)

        return mv

    def geodesic(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(M, G, 2)`` of the great circle from a to b (``(M, P)`` each, on the sphere) at ``t``
        ``(G,)`` in [0, 1] (slerp, Shoemake 1985): phi(t) = sin((1-t) w)/sin w a + sin(t w)/sin w b with
        cos w = a . b / (|a| |b|), constant speed, phi(0) = a, phi(1) = b. Antipodal points (no unique geodesic)
        are refused; coincident ones (w -> 0) take the limit ((1-t), t)."""
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1, 1).double()
        w = torch.arccos(cos)
        check(bool((w < math.pi - 1e-6).all()), "the two end points are antipodal on the sphere: the geodesic "
              "between them is not unique")
        t = t.double().to(w.device)
        wt = w.unsqueeze(1) * t  # (M, G)
        sw = torch.sin(w).unsqueeze(1)
        small = sw < 1e-12
        ca = torch.where(small, 1 - t, torch.sin(w.unsqueeze(1) - wt) / sw.clamp_min(1e-300))
        cb = torch.where(small, t.expand_as(wt), torch.sin(wt) / sw.clamp_min(1e-300))
        return torch.stack([ca, cb], -1)
