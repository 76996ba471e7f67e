"""Replica-batched forward passes for ``nn.Sequential`` stacks of Conv2d / Linear / BatchNorm / LayerNorm /
pooling / activations (CNNs without residual connections), and their permutation spec derived automatically.

Layouts: images of K replicas are one ``(N, K*C, H, W)`` tensor, so a convolution of all replicas is one
grouped ``conv2d`` (groups = K) and BatchNorm2d over K*C channels is exactly per-replica BatchNorm; vectors
are ``(K, N, F)``. BatchNorm uses either the statistics of the data it is given (training; with ``group=B``
the statistics of each consecutive block of B samples, the ``batch`` mode of :class:`~lossglass.problem.Problem`)
or statistics supplied per layer (``recompute``: the whole training set at the evaluated point, the choice of
Garipov et al. 2018 and REPAIR, Jordan et al. 2023, for paths, planes and walks; ``fixed``: frozen ones).
Supplied statistics enter as y = (h - mean) / sqrt(var + eps) * w + b computed elementwise, so the output is
differentiable in ``mean`` and ``var`` too (what the exact gradient of the recompute energy needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check

_ACT = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.GELU: F.gelu, nn.Identity: lambda z: z}
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


@dataclass
class Op:
    kind: str  # linear, conv, bn, ln, act, pool, flatten, unflatten
    name: str
    module: nn.Module
    out_shape: tuple[int, ...]  # per-sample output shape (from a dummy forward)


def build(model: nn.Module, in_dim: int) -> list[Op] | None:
    """The op list of a supported Sequential (with at least one Conv2d, norm layer or Unflatten), else None."""
    if not isinstance(model, nn.Sequential):
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    ops: list[Op] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            kind = "linear"
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return None
            kind = "conv"
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not m.affine:
                return None
            kind = "bn"
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1 or not m.elementwise_affine:
                return None
            kind = "ln"
        elif type(m) in _ACT:
            kind = "act"
        elif isinstance(m, _POOL):
            kind = "pool"
        elif isinstance(m, nn.Flatten):
            kind = "flatten"
        elif isinstance(m, nn.Unflatten):
            kind = "unflatten"
        else:
            return None
        ops.append(Op(kind, name, m, ()))
    if not any(o.kind in ("conv", "bn", "ln", "unflatten") for o in ops):
        return None
    was = model.training
    model.eval()
    h = torch.zeros(2, in_dim, dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    with torch.no_grad():
        for o in ops:
            h = o.module(h)
            shapes[o.name] = tuple(h.shape[1:])
            o.out_shape = shapes[o.name]
    model.train(was)
    return ops


def _img(h: torch.Tensor, k: int) -> torch.Tensor:
    """(K, N, C, H, W) -> (N, K*C, H, W)."""
    return h.permute(1, 0, *range(2, h.ndim)).reshape(h.shape[1], k * h.shape[2], *h.shape[3:])


def forward(problem, ops: list[Op], theta, x: torch.Tensor, *, stats: dict | None = None, stop_at: int | None = None,
            group: int | None = None):
    """Outputs ``(K, N, C)`` of K networks on ``x`` (``(N, D)`` shared or ``(K, N, D)``). BatchNorm op i uses
    ``stats[i] = (mean, var)`` (``(K*C,)`` each, biased variance) when given, else the statistics of ``x``: of
    all of it, or with ``group=B`` of each block of B consecutive samples (N must then be a multiple of B or at
    most B). With ``stop_at=i`` returns the input of op i in its layout (used to collect statistics layer by
    layer)."""
    p = problem._param
    info = problem._info
    k = p(theta, problem.params[0]).shape[0]
    h, layout = x, ("vec_shared" if x.ndim == 2 else "vec")
    for i, o in enumerate(ops):
        if stop_at == i:
            return h, layout
        m = o.module
        if o.kind == "unflatten":
            if layout == "vec_shared":
                h, layout = h.reshape(h.shape[0], *o.out_shape), "img_shared"
            else:
                h, layout = _img(h.reshape(k, h.shape[1], *o.out_shape), k), "img"
        elif o.kind == "conv":
            w = p(theta, info[f"{o.name}.weight"])
            b = p(theta, info[f"{o.name}.bias"]).reshape(-1) if m.bias is not None else None
            w = w.reshape(-1, *w.shape[2:])
            h = F.conv2d(h, w, b, m.stride, m.padding, m.dilation, groups=1 if layout == "img_shared" else k)
            layout = "img"
        elif o.kind == "bn":
            w = p(theta, info[f"{o.name}.weight"])
            b = p(theta, info[f"{o.name}.bias"])
            h = _batch_norm(h, layout, k, w, b, stats[i] if stats and i in stats else None, m.eps, group)
        elif o.kind == "ln":
            w = p(theta, info[f"{o.name}.weight"]).unsqueeze(1)
            b = p(theta, info[f"{o.name}.bias"]).unsqueeze(1)
            h = F.layer_norm(h, h.shape[-1:], eps=m.eps) * w + b
        elif o.kind == "act":
            h = _ACT[type(m)](h)
        elif o.kind == "pool":
            h = m(h) if layout.startswith("img") else h
        elif o.kind == "flatten":
            if layout == "img":
                n = h.shape[0]
                h, layout = h.reshape(n, k, -1).transpose(0, 1), "vec"
            elif layout == "img_shared":
                h, layout = h.reshape(h.shape[0], -1), "vec_shared"
        elif o.kind == "linear":
            from .problem import _Linear

            lin = _Linear(info[f"{o.name}.weight"], info.get(f"{o.name}.bias"))
            if i == len(ops) - 1 and layout == "vec":
                return problem._output_layer(theta, lin, h)
            h = problem._linear(theta, lin, h)
            layout = "vec"
    check(layout == "vec", "the model's output is not a (batch, classes) tensor")
    return h


def _batch_norm(h: torch.Tensor, layout: str, k: int, w: torch.Tensor, b: torch.Tensor, stats, eps: float,
                group: int | None) -> torch.Tensor:
    """y = (h - mean) / sqrt(var + eps) * w + b per channel of each replica (Ioffe & Szegedy 2015), with
    ``stats = (mean, var)`` supplied (``(K*C,)`` each), or else the biased batch statistics of ``h`` (of all its
    samples, or of each block of ``group`` consecutive samples)."""
    img = layout == "img"
    if stats is not None:
        mean, var = stats
        shape = (1, -1, 1, 1) if img else (k, 1, -1)
        scale = w.reshape(shape) * torch.rsqrt(var.reshape(shape) + eps)
        return (h - mean.reshape(shape)) * scale + b.reshape(shape)
    n = h.shape[0] if img else h.shape[1]
    if group is not None and n > group:
        check(n % group == 0, f"{n} samples do not split into BatchNorm batches of {group}")
        if img:  # (N, K*C, H, W) -> (G, B, K*C, H, W)
            hg = h.reshape(n // group, group, *h.shape[1:])
            var, mean = torch.var_mean(hg, dim=(1, 3, 4), keepdim=True, unbiased=False)
            out = (hg - mean) * torch.rsqrt(var + eps) * w.reshape(1, 1, -1, 1, 1) + b.reshape(1, 1, -1, 1, 1)
            return out.reshape(h.shape)
        hg = h.reshape(k, n // group, group, -1)  # (K, N, F) -> (K, G, B, F)
        var, mean = torch.var_mean(hg, dim=2, keepdim=True, unbiased=False)
        out = (hg - mean) * torch.rsqrt(var + eps) * w.reshape(k, 1, 1, -1) + b.reshape(k, 1, 1, -1)
        return out.reshape(h.shape)
    if img:
        return F.batch_norm(h, None, None, w.reshape(-1), b.reshape(-1), training=True, eps=eps)
    var, mean = torch.var_mean(h, dim=1, keepdim=True, unbiased=False)
    return (h - mean) / torch.sqrt(var + eps) * w.unsqueeze(1) + b.unsqueeze(1)


def channel_stats(h: torch.Tensor, layout: str, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares of a BatchNorm input, ``(K*C,)`` each, and the count per channel."""
    if layout == "img":
        dims = (0, 2, 3)
        n = h.shape[0] * h.shape[2] * h.shape[3]
        return h.sum(dims).double(), h.square().sum(dims).double(), n
    return h.sum(1).double().reshape(-1), h.square().sum(1).double().reshape(-1), h.shape[1]


def spec(problem, ops: list[Op]) -> dict[str, tuple]:
    """Permutations of hidden units / channels: op l's outputs (Linear rows, Conv filters, and the norm layers
    after it) and the next Linear/Conv's input axis; across a Flatten each channel is a block of H*W columns."""
    perms: dict[str, list] = {}
    current: str | None = None
    count = 0
    block = 1
    names = problem._info
    layers = [i for i, o in enumerate(ops) if o.kind in ("linear", "conv")]
    last = layers[-1] if layers else -1
    for i, o in enumerate(ops):
        if o.kind in ("linear", "conv"):
            if current is not None:
                perms[current].append((f"{o.name}.weight", 1, block))
            if i == last:
                current = None
                continue
            current = f"P{count}"
            count += 1
            perms[current] = [(f"{o.name}.weight", 0, 1)]
            if f"{o.name}.bias" in names:
                perms[current].append((f"{o.name}.bias", 0, 1))
            block = 1
        elif o.kind in ("bn", "ln") and current is not None:
            perms[current] += [(f"{o.name}.weight", 0, 1), (f"{o.name}.bias", 0, 1)]
        elif o.kind == "flatten" and current is not None:
            prev = ops[i - 1].out_shape if i > 0 else ()
            block = int(torch.tensor(prev[1:]).prod()) if len(prev) > 1 else 1
    return {k_: tuple(v) for k_, v in perms.items() if len(v) > 1}
