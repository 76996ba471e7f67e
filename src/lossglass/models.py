"""Networks and reference landscapes.

``mlp`` builds the paper's single-hidden-layer ReLU network (any depth with a list). The reference
landscapes are energies with known answers, run through the same protocols as the networks:
a quadratic bowl (convex, equipartition exact), a double well, the spherical p-spin glass and the
Sherrington-Kirkpatrick Ising spin glass (``sk``, sampled by parallel tempering).
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
    """theta rescaled onto the p-spin sphere |s|^2 = N (N = theta.shape[-1]); the problem's manifold does this."""
    from .problem import Sphere

    return Sphere(math.sqrt(theta.shape[-1])).project(theta)


def spherical_pspin(n_spins: int, p: int = 3, seed: int = 0, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float64) -> FunctionProblem:
    """The spherical p-spin glass (Crisanti & Sommers 1992), energy per spin:

        E(s) = H(s) / N,  H(s) = - sum_{i1<...<ip} J_{i1..ip} s_i1 ... s_ip,  J ~ N(0, p! / (2 N^(p-1))),

    spins on the sphere sum_i s_i^2 = N: ``problem.manifold`` is ``Sphere(sqrt(N))``, so ``project`` renormalises,
    curvature is the Riemannian Hessian P_T (grad^2 E - (s . grad E / N) I) P_T and paths follow great circles.
    For p = 2, H = -1/2 s^T M s with M the symmetric coupling matrix (zero diagonal) and min E = -lambda_max(M) / 2;
    at the ground state the Riemannian Hessian of E has eigenvalues (lambda_max - lambda_i) / N. Supported: p = 2, 3.

    ``energy_scale = N``: H = energy_scale * E. The Boltzmann weight is exp(-H / T_phys), so a walk or Metropolis
    temperature T given in units of E (the energy per spin) is the physical temperature T_phys = N T;
    :func:`lossglass.sampling.parallel_tempering` takes physical temperatures (units of H).
    """
    from .problem import Sphere

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
                           init_scale=1.0, manifold=Sphere(math.sqrt(n)))
    prob.couplings, prob.p = couplings, p
    prob.energy_scale = float(n)
    return prob


class IsingProblem(FunctionProblem):
    """A :class:`FunctionProblem` over Ising spins s_i = +-1 (``spins = "ising"``), stored as floats.

    ``init`` draws random +-1 configurations. Continuous protocols (random walks, Langevin, curvature, paths)
    make no sense on a discrete configuration space: callers check ``problem.spins == "ising"`` and refuse;
    sample it with :func:`lossglass.sampling.parallel_tempering` (single-spin-flip Metropolis)."""

    spins = "ising"

    def __init__(self, fn, n_params: int, couplings: torch.Tensor, **kwargs):
        super().__init__(fn, n_params, **kwargs)
        self.couplings = couplings

    def __repr__(self) -> str:
        return f"IsingProblem({self.name!r}, N={self.n_params})"

    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """Replica k: s_i = sign(g_i), g ~ N(0, I) from the seed mixed from (seed, ids[k]): uniform over {-1, +1}^N."""
        return torch.where(super().init(n_replicas, seed, ids=ids) >= 0, 1.0, -1.0).to(self.dtype)

    def local_fields(self, s: torch.Tensor) -> torch.Tensor:
        """h_i = sum_j J_ij s_j, ``(K, N)``; flipping spin i changes H by Delta H_i = 2 s_i h_i."""
        s, _ = self._prepare(s)
        return s @ self.couplings

    def flip_energies(self, s: torch.Tensor) -> torch.Tensor:
        """Delta H_i = 2 s_i h_i for every single-spin flip of every configuration, ``(K, N)`` (units of H)."""
        s, _ = self._prepare(s)
        return 2 * s * (s @ self.couplings)


def sk(n_spins: int, seed: int = 0, *, device: str = "cpu", dtype: torch.dtype = torch.float64) -> IsingProblem:
    """The Sherrington-Kirkpatrick spin glass (Sherrington & Kirkpatrick 1975), energy per spin:

        E(s) = H(s) / N,  H(s) = - sum_{i<j} J_ij s_i s_j = -1/2 s^T J s,  J_ij = J_ji ~ N(0, 1/N),  s_i = +-1,

    ``couplings`` the symmetric J with zero diagonal. ``energy_scale = N`` (H = N E); temperatures are in units
    of H, where T_c = 1. Known values: the annealed (high-temperature) energy E[<H>]/N = -(beta/2)(N-1)/N,
    the exact Gaussian-coupling identity E[<H>]/N = -(beta/2)(1 - E<q^2>) (q the overlap of two copies), and
    the Parisi ground-state energy per spin -0.7633 as N -> infinity. Below T_c the overlap distribution of two
    equilibrium copies is broad (full replica symmetry breaking). ``spins = "ising"``: only spin-flip
    samplers apply (:func:`lossglass.sampling.parallel_tempering`); ``local_fields`` gives h = J s.
    """
    check(isinstance(n_spins, int) and n_spins >= 2, f"n_spins must be an int >= 2, got {n_spins!r}")
    check(dtype in (torch.float32, torch.float64), f"dtype must be torch.float32 or torch.float64, got {dtype}")
    dev = resolve_device(device)
    n = n_spins
    g = torch.Generator().manual_seed(int(seed))
    j = torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n), 1)
    j = (j + j.T).to(dev, dtype)

    def energy(s: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((s @ j) * s).sum(-1) / n

    prob = IsingProblem(energy, n, j, name="sk", device=str(dev), dtype=dtype)
    prob.energy_scale = float(n)
    prob.seed = int(seed)
    return prob
