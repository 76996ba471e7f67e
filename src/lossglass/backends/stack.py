"""The layer-stack backend: ``nn.Sequential`` stacks of Conv2d / Linear / BatchNorm / LayerNorm / pooling layers
and free-form modules traced by torch.fx (:class:`lossglass.layers.Graph`, residual networks), replica-batched by
grouped convolutions (:func:`lossglass.layers.forward`).

It is the backend whose BatchNorm statistics a problem supplies (:mod:`lossglass.batchnorm`). Computing the
training-set statistics at theta in one pass (:meth:`StackBackend.record_statistics`) also computes the outputs of
that pass; they are kept with a copy of theta, so the forward passes that follow with those statistics over slices
of the same training set return them instead of computing them again (exactly what they would compute).

Example (a small CNN with BatchNorm; the statistics of two replicas recorded in one pass):

    >>> import torch
    >>> from torch import nn
    >>> from lossglass import layers
    >>> from lossglass.layout import ParamLayout
    >>> net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2),
    ...                     nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    >>> layout = ParamLayout.from_module(net)
    >>> backend = StackBackend(layers.build(net, 16), layout)
    >>> backend.bn_layers
    (2,)
    >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).repeat(2, 1)
    >>> stats = backend.record_statistics(theta, torch.randn(8, 16), step=2)
    >>> [t.shape for t in stats[2]]                       # (mean, var) of 2 replicas x 2 channels
    [torch.Size([4]), torch.Size([4])]
"""

from __future__ import annotations

import math

import torch

from .. import layers
from ..layout import ParamLayout
from .base import Backend


class StackBackend(Backend):
    """See the module docstring. ``ops``: a Sequential's op list (:func:`lossglass.layers.build`, name
    ``"stack"``) or a traced :class:`~lossglass.layers.Graph` (name ``"graph"``)."""

    def __init__(self, ops, layout: ParamLayout):
        super().__init__(layout)
        self.ops = ops
        self.name = "graph" if isinstance(ops, layers.Graph) else "stack"
        self._bn = tuple(i for i, o in enumerate(ops) if o.kind == "bn")
        self.stat_cache: tuple | None = None  # (theta, statistics, data, outputs) of the last one-pass record

    @property
    def bn_layers(self) -> tuple[int, ...]:
        return self._bn

    def activation_sizes(self) -> list[int]:
        return [math.prod(o.out_shape) for o in self.ops]

    def forward(self, theta, x: torch.Tensor, stats: dict | None = None, *, group: int | None = None,
                stop_at: int | None = None, record: dict | None = None):
        """:func:`lossglass.layers.forward` on this stack (``stop_at``: the input of op i and its layout;
        ``record``: the statistics of ``x`` per BatchNorm op), reusing the recorded outputs where they apply."""
        if stats is not None and stop_at is None and record is None and group is None and not torch.is_grad_enabled():
            out = self._cached_outputs(theta, x, stats)
            if out is not None:
                return out
        return layers.forward(self.layout, self.ops, theta, x, stats=stats, stop_at=stop_at, group=group,
                              record=record)

    def moments(self, theta: torch.Tensor, x: torch.Tensor, stats: dict, i: int) -> tuple:
        """Per-channel sums (s1, s2) of the input of BatchNorm op i on ``x`` and the count per channel, the
        earlier BatchNorm ops normalised by ``stats`` (see :func:`lossglass.batchnorm.layerwise_statistics`)."""
        h, layout = self.forward(theta, x, stats=stats, stop_at=i)
        return layers.channel_stats(h, layout, theta.shape[0])

    def record_statistics(self, theta: torch.Tensor, x: torch.Tensor, step: int) -> dict:
        """The training-set statistics ``{op: (mean, var)}`` at ``theta`` over the whole of ``x`` in one forward
        pass per group of ``step`` replicas (each BatchNorm op records the statistics of its input, computed as the
        layer-by-layer procedure does, so the result is the same). The last result is kept with a copy of theta
        and the pass's outputs: the same theta again returns it, and forward passes over slices of ``x`` with these
        statistics return the outputs already computed."""
        cache = self.stat_cache
        if cache is not None and cache[0].shape == theta.shape and torch.equal(cache[0], theta):
            return cache[1]
        k = theta.shape[0]
        self.stat_cache = None
        parts, outs = [], []
        with torch.no_grad():
            for g in range(0, k, step):
                record: dict = {}
                outs.append(self.forward(theta[g:g + step], x, record=record))
                parts.append(record)
        stats = {i: tuple(torch.cat([r[i][j] for r in parts]) for j in (0, 1)) for i in self._bn}
        self.stat_cache = (theta.detach().clone(), stats, x, torch.cat(outs) if len(outs) > 1 else outs[0])
        return stats

    def _cached_outputs(self, theta, x: torch.Tensor, stats: dict) -> torch.Tensor | None:
        """The outputs on ``x`` (a slice of the recorded data) at the point whose statistics ``stats`` were just
        recorded (:meth:`record_statistics`), or None: the pass that recorded them computed exactly these."""
        cache = self.stat_cache
        if cache is None or stats is not cache[1] or not isinstance(theta, torch.Tensor) or theta.shape != cache[0].shape:
            return None
        xa = cache[2]
        if x.dtype != xa.dtype or x.shape[1:] != xa.shape[1:] or x.stride() != xa.stride() or x.device != xa.device:
            return None
        row = xa.stride(0) * xa.element_size()
        off = x.data_ptr() - xa.data_ptr()
        if off % row or not 0 <= off // row <= len(xa) - len(x) or not torch.equal(theta, cache[0]):
            return None
        return cache[3][:, off // row:off // row + len(x)]

    @property
    def has_hidden_activations(self) -> bool:
        return self.name == "stack"

    def hidden_activations(self, theta: torch.Tensor, x: torch.Tensor,
                           stats: dict | None = None) -> list[torch.Tensor] | None:
        """What each hidden layer hands to the next Linear/Conv (a Sequential stack only): ``[(K, M, units_l)]``,
        units the channels and M = N x positions (each spatial position a sample of the channel), also across a
        Flatten (each channel a block of columns)."""
        if self.name != "stack":
            return None
        ops = self.ops
        k = theta.shape[0]
        consumers = [i for i, o in enumerate(ops) if o.kind in ("linear", "conv")][1:]
        outs = []
        for i in consumers:
            h, layout = self.forward(theta, x, stats=stats, stop_at=i)
            n = h.shape[0] if layout == "img" else h.shape[1]
            if layout == "img":  # (N, K*C, H, W) -> (K, N*H*W, C)
                c = h.shape[1] // k
                h = h.reshape(n, k, c, -1).permute(1, 0, 3, 2).reshape(k, -1, c)
            elif i > 0 and ops[i - 1].kind == "flatten" and len(ops[i - 2].out_shape) == 3:  # channel blocks
                c = ops[i - 2].out_shape[0]
                h = h.reshape(k, n, c, -1).permute(0, 1, 3, 2).reshape(k, -1, c)
            outs.append(h)
        return outs

    def permutation_spec(self) -> dict[str, tuple]:
        """Permutations of hidden units / channels of the stack (:func:`lossglass.layers.spec`)."""
        return layers.spec(self.layout, self.ops)
