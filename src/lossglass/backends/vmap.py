"""The generic backend: any ``nn.Module`` through ``torch.func.functional_call`` + ``vmap`` over the replicas,

    forward(theta, x)_k = model(x; params = unflatten(theta_k), buffers),

with the module in eval mode (dropout off; BatchNorm with its stored statistics, see module mode in
:mod:`lossglass.batchnorm`). The reference every faster backend is tested against (tests/test_backends.py).

Example:

    >>> import torch
    >>> from torch import nn
    >>> from lossglass.layout import ParamLayout
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> backend = VmapBackend(net, ParamLayout.from_module(net), dict(net.named_buffers()))
    >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).repeat(3, 1)
    >>> x = torch.randn(5, 3)
    >>> out = backend.forward(theta, x)
    >>> out.shape, torch.allclose(out[2], net(x))
    (torch.Size([3, 5, 2]), True)
"""

from __future__ import annotations

import torch
from torch import nn

from ..layout import ParamLayout
from .base import Backend


class VmapBackend(Backend):
    """See the module docstring. ``buffers``: the module's buffers, passed to every call (live references)."""

    name = "vmap"

    def __init__(self, model: nn.Module, layout: ParamLayout, buffers: dict[str, torch.Tensor]):
        super().__init__(layout)
        self.model = model
        self.buffers = buffers

    def forward(self, theta, x: torch.Tensor, stats: dict | None = None, *, group: int | None = None) -> torch.Tensor:
        from torch.func import functional_call, vmap

        params = dict(zip(self.layout.names, theta)) if isinstance(theta, (list, tuple)) else self.layout.unflatten(theta)

        def f(p, xx):
            return functional_call(self.model, {**p, **self.buffers}, (xx,))

        return vmap(f, in_dims=(0, 0 if x.ndim == 3 else None))(params, x)
