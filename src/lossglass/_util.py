"""Small shared helpers: seeding, device choice, tensor checks."""

from __future__ import annotations

import numpy as np
import torch

from .errors import LossglassError, check


def seed_for(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy's SeedSequence), so that replica or walker ``k`` of run
    ``seed`` gets the same random stream whatever the number of replicas it is run with."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generators(seed: int, indices, stream: int = 0, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent generator per index (replica or walker), seeded by ``(seed, stream, index)``."""
    return [torch.Generator(device=device).manual_seed(seed_for(seed, stream, int(i))) for i in indices]


def randn_per(gens: list[torch.Generator], n: int, device, dtype) -> torch.Tensor:
    """Stack of ``len(gens)`` standard normal vectors of length n, row i from generator i.

    Drawing per row costs one small RNG call per replica; it keeps every replica's stream independent of how
    many replicas run together (the price of reproducible groups, e.g. 1,024 replicas in groups of 64)."""
    return torch.stack([torch.randn(n, generator=g, device=gens[0].device, dtype=dtype) for g in gens]).to(device)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; anything else is checked."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise LossglassError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LossglassError("device 'cuda' requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    return dev


def as_batch(theta, n_params: int, name: str = "theta") -> tuple[torch.Tensor, bool]:
    """Return ``(theta as (K, P), was_single)``, checking the shape and finiteness."""
    theta = torch.as_tensor(theta)
    check(torch.is_floating_point(theta), f"{name} must be a floating-point tensor, got {theta.dtype}")
    single = theta.ndim == 1
    if single:
        theta = theta.unsqueeze(0)
    check(theta.ndim == 2 and theta.shape[1] == n_params,
          f"{name} must have shape ({n_params},) or (K, {n_params}), got {tuple(theta.shape)}")
    return theta, single


def check_finite(theta: torch.Tensor, name: str = "theta") -> None:
    bad = ~torch.isfinite(theta).all(dim=-1)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise LossglassError(f"{name} holds NaN or inf values (rows {rows[:10]}{'...' if len(rows) > 10 else ''})")


def finite_number(v) -> float | None:
    """``v`` as a finite float when it is a JSON number that has one (not a bool, NaN, inf, a string or an integer of
    400 digits), else None: what a record read from a run folder may be trusted to hold."""
    import math

    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
