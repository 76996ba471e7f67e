"""Networks and reference landscapes.

``mlp`` builds the paper's single-hidden-layer ReLU network (any depth with a list). The reference
landscapes are energies with known answers, run through the same protocols as the networks:
a quadratic bowl (convex, equipartition exact), a double well, and the spherical p-spin glass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._util import resolve_device
from .errors import check, choice
from .problem import FunctionProblem

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def mlp(in_dim: int, hidden: int | list[int] | tuple[int, ...], out_dim: int, activation: str = "relu",
        bias: bool = True) -> nn.Sequential:
    """x -> W_L s(... s(W_1 x + b_1) ...) + b_L with s the activation; ``hidden`` an int (one hidden layer,
    the paper's case) or a list of widths."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    check(isinstance(in_dim, int) and in_dim > 0, f"in_dim must be a positive int, got {in_dim!r}")
    check(isinstance(out_dim, int) and out_dim > 0, f"out_dim must be a positive int, got {out_dim!r}")
    check(len(widths) > 0 and all(isinstance(w, int) and w > 0 for w in widths),
          f"hidden widths must be positive ints, got {hidden!r}")
    act = ACTIVATIONS[choice("activation", activation, tuple(ACTIVATIONS))]
    layers: list[nn.Module] = []
    for a, b in zip([in_dim] + widths[:-1], widths):
        layers += [nn.Linear(a, b, bias=bias), act()]
    layers.append(nn.Linear(widths[-1], out_dim, bias=bias))
    return nn.Sequential(*layers)


def cnn(in_shape: tuple[int, int, int] = (1, 28, 28), channels=(16, 32), n_classes: int = 10, *,
        batchnorm: bool = True, kernel: int = 3) -> nn.Sequential:
    """A small CNN on flat inputs: Unflatten -> [Conv(k x k, same padding) -> BatchNorm2d -> ReLU -> MaxPool 2]
    per entry of ``channels`` -> Flatten -> Linear to ``n_classes``."""
    check(len(in_shape) == 3 and all(int(v) > 0 for v in in_shape), f"in_shape must be (C, H, W), got {in_shape}")
    check(len(channels) > 0 and all(int(c) > 0 for c in channels), f"channels must be positive ints, got {channels}")
    c, h, w = in_shape
    layers: list[nn.Module] = [nn.Unflatten(1, tuple(in_shape))]
    for ch in channels:
        layers += [nn.Conv2d(c, ch, kernel, padding=kernel // 2)]
        layers += [nn.BatchNorm2d(ch)] if batchnorm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = ch, h // 2, w // 2
    check(h > 0 and w > 0, f"input {in_shape} is too small for {len(channels)} pooling layers")
    layers += [nn.Flatten(), nn.Linear(c * h * w, n_classes)]
    return nn.Sequential(*layers)


def quadratic(hessian: torch.Tensor, *, device: str = "cpu", dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """E(theta) = 1/2 theta^T H theta, H symmetric. With H positive definite the Boltzmann law exp(-E/T)
    has <E> = P T / 2 (equipartition) and Var(theta . u_i) = T / lambda_i."""
    h = torch.as_tensor(hessian, dtype=dtype)
    check(h.ndim == 2 and h.shape[0] == h.shape[1], f"hessian must be square, got shape {tuple(h.shape)}")
    check(bool(torch.isfinite(h).all()), "hessian holds NaN or inf")
    check(torch.allclose(h, h.T, atol=1e-8 * (1 + h.abs().max().item())), "hessian must be symmetric")
    dev = resolve_device(device)
    h = h.to(dev)

    def energy(theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((theta @ h) * theta).sum(-1)

    p = FunctionProblem(energy, h.shape[0], name="quadratic", device=str(dev), dtype=dtype)
    p.hessian = h
    return p


def double_well(n_params: int, *, height: float = 1.0, device: str = "cpu",
                dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """E(theta) = height * sum_i (theta_i^2 - 1)^2: 2^P minima at theta_i = +-1 separated by barriers of
    ``height`` per coordinate (a minimal rugged landscape with exactly known barriers)."""
    check(height > 0, f"height must be positive, got {height}")

    def energy(theta: torch.Tensor) -> torch.Tensor:
        return height * (theta.pow(2) - 1).pow(2).sum(-1)

    return FunctionProblem(energy, n_params, name="double-well", device=device, dtype=dtype)


def _sphere(theta: torch.Tensor) -> torch.Tensor:
    n = theta.shape[-1]
    return theta * (math.sqrt(n) / theta.norm(dim=-1, keepdim=True).clamp_min(1e-30))


def spherical_pspin(n_spins: int, p: int = 3, seed: int = 0, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """The spherical p-spin glass (Crisanti & Sommers 1992), energy per spin:

        E(s) = H(s) / N,  H(s) = - sum_{i1<...<ip} J_{i1..ip} s_i1 ... s_ip,  J ~ N(0, p! / (2 N^(p-1))),

    spins on the sphere sum_i s_i^2 = N (``project`` renormalises). For p = 2, H = -1/2 s^T M s with M the
    symmetric coupling matrix (zero diagonal) and min E = -lambda_max(M) / 2. Supported: p = 2, 3.
    """
    check(p in (2, 3), f"spherical_pspin supports p = 2 or 3, got {p}")
    check(isinstance(n_spins, int) and n_spins >= p, f"n_spins must be an int >= {p}, got {n_spins!r}")
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(int(seed))
    n = n_spins
    std = math.sqrt(math.factorial(p) / (2 * n ** (p - 1)))
    if p == 2:
        j = torch.randn(n, n, generator=g, dtype=dtype) * std
        m = torch.triu(j, 1)
        m = (m + m.T).to(dev)

        def energy(s: torch.Tensor) -> torch.Tensor:
            return -0.5 * ((s @ m) * s).sum(-1) / n

        couplings = m
    else:
        j = torch.randn(n, n, n, generator=g, dtype=dtype) * std
        i, k, l_ = torch.meshgrid(torch.arange(n), torch.arange(n), torch.arange(n), indexing="ij")
        j = (j * ((i < k) & (k < l_))).to(dev)  # keep i<j<k only

        flat = j.reshape(n * n, n)

        def energy(s: torch.Tensor) -> torch.Tensor:
            js = (flat @ s.T).T.reshape(-1, n, n)  # sum_k J_ijk s_k, one GEMM for all replicas
            return -(torch.bmm(js, s.unsqueeze(-1)).squeeze(-1) * s).sum(-1) / n

        couplings = j
    prob = FunctionProblem(energy, n, name=f"spherical-{p}-spin", device=str(dev), dtype=dtype,
                           init_scale=1.0, projector=_sphere)
    prob.couplings, prob.p = couplings, p
    return prob
