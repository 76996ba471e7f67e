"""Cheap flatness proxies, light enough to log during training: the top Hessian eigenvalue of one mini-batch
by a few power iterations, and the loss rise under one random filter-normalised perturbation.

:class:`FlatnessProbe` works on any ``nn.Module`` inside a user's own training loop; :func:`batch_proxies`
computes the same numbers for K replicas at once, so they can be validated against the full measures."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp

from ._util import generators, randn_per
from .errors import check
from .problem import Problem


def _filter_unit(d: dict[str, torch.Tensor], p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in d.items():
        if v.ndim < 2:
            out[k] = torch.zeros_like(v)
        else:
            rows = v.reshape(v.shape[0], -1)
            scale = p[k].reshape(p[k].shape[0], -1).norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out[k] = (rows * scale).reshape(v.shape)
    return out


class FlatnessProbe:
    """For your own loop: ``probe = FlatnessProbe(); stats = probe(model, x, y)`` every few hundred steps.

    Returns ``{"loss", "lambda_batch", "perturbation_rise"}``: the mini-batch loss; the top eigenvalue of the
    mini-batch Hessian by ``n_iter`` power iterations (each one Hessian-vector product, forward-over-reverse);
    and L(theta + rho u) - L(theta) for one random direction u, filter-normalised (|u_row| = |theta_row|,
    biases zero). Costs about ``n_iter + 2`` backward passes on one batch; the model is not modified."""

    def __init__(self, loss_fn: Callable = F.cross_entropy, *, n_iter: int = 5, rho: float = 0.05, seed: int = 0):
        check(n_iter >= 1 and rho > 0, f"n_iter must be >= 1 and rho > 0 (got {n_iter}, {rho})")
        self.loss_fn, self.n_iter, self.rho = loss_fn, n_iter, rho
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        check(isinstance(model, nn.Module), "model must be a torch.nn.Module")
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p):
            return self.loss_fn(functional_call(model, {**p, **buffers}, (x,)), y)

        g = grad(loss)
        v = {k: torch.randn(t.shape, generator=self.gen).to(t) for k, t in params.items()}
        lam = torch.tensor(0.0)
        for _ in range(self.n_iter):
            norm = torch.sqrt(sum((t * t).sum() for t in v.values()))
            v = {k: t / norm for k, t in v.items()}
            _, hv = jvp(g, (params,), (v,))
            lam = sum((hv[k] * v[k]).sum() for k in v)
            v = hv
        with torch.no_grad():
            base = loss(params)
            u = _filter_unit({k: torch.randn(t.shape, generator=self.gen).to(t) for k, t in params.items()}, params)
            rise = loss({k: params[k] + self.rho * u[k] for k in params}) - base
        return {"loss": float(base), "lambda_batch": float(lam), "perturbation_rise": float(rise)}


def batch_proxies(problem: Problem, theta: torch.Tensor, *, batch_size: int = 256, n_iter: int = 5, rho: float = 0.05,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """The two proxies for K replicas at once on the same mini-batch (the first ``batch_size`` training
    samples): ``lambda_batch`` (power iteration, ``n_iter`` batched products) and ``perturbation_rise``."""
    from .protocols.connect import filter_normalize
    from .study import subset_problem

    sub = subset_problem(problem, batch_size)
    theta = theta.to(problem.device, problem.dtype)
    k, p = theta.shape
    op = sub.hvp_operator(theta)
    gens = generators(seed, range(k), stream=71)
    v = randn_per(gens, p, problem.device, problem.dtype)
    lam = torch.zeros(k, device=problem.device, dtype=problem.dtype)
    for _ in range(n_iter):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        hv = op(v)
        lam = (hv * v).sum(1)
        v = hv
    u = filter_normalize(problem, randn_per(gens, p, problem.device, problem.dtype), theta)
    rise = sub.energy(theta + rho * u) - sub.energy(theta)
    return {"lambda_batch": lam.detach(), "perturbation_rise": rise}
