"""The parameter layout: where each named parameter tensor of a model lives inside the flat vector theta.

A model with parameter tensors W_1 (shape s_1), ..., W_L (shape s_L) is one point theta in R^P,
P = sum_l prod(s_l), the tensors laid end to end in the order of ``named_parameters()`` (row-major inside each,
as ``torch.nn.utils.parameters_to_vector`` does):

    theta[o_l : o_l + n_l] = vec(W_l),   o_l = sum_{j < l} n_j,   n_l = prod(s_l).

K replicas are the rows of a ``(K, P)`` tensor. :class:`ParamLayout` is this map and its inverse, shared by
every module that needs a parameter by name (symmetry, layers, curvature, the protocols) instead of a
problem's internals.

Example:

    >>> import torch
    >>> from torch import nn
    >>> layout = ParamLayout.from_module(nn.Linear(3, 2))
    >>> [(e.name, e.shape, e.offset) for e in layout]
    [('weight', (2, 3), 0), ('bias', (2,), 6)]
    >>> layout.n_params
    8
    >>> theta = torch.arange(16.0).reshape(2, 8)            # two replicas
    >>> w, b = layout.split(theta)
    >>> w.shape, b.tolist()
    (torch.Size([2, 2, 3]), [[6.0, 7.0], [14.0, 15.0]])
    >>> torch.equal(layout.join([w, b], 2), theta)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import check


@dataclass(frozen=True)
class ParamEntry:
    """One parameter tensor inside the flat vector: its name, shape and first index (``offset``)."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """n = prod(shape): the entries it occupies."""
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        """theta[..., slice] is this tensor, flattened: ``slice(offset, offset + numel)``."""
        return slice(self.offset, self.offset + self.numel)


#: the name the entries had before the layout was public
ParamInfo = ParamEntry


class ParamLayout:
    """The named parameter tensors of a model laid end to end in a flat vector (see the module docstring).

    It behaves as a read-only mapping ``name -> ParamEntry`` in parameter order (``layout["0.weight"]``,
    ``"0.bias" in layout``, ``for entry in layout``) and converts between a ``(K, P)`` tensor and its per-tensor
    views: :meth:`split` / :meth:`join` (lists of ``(K, *shape)`` tensors), :meth:`unflatten` / :meth:`flatten`
    (dicts by name), :meth:`view` (one tensor), :meth:`mask` (the indicator of some tensors).

    Example:

        >>> layout = ParamLayout.from_shapes({"w": (2, 2), "b": (2,)})
        >>> layout["b"].slice, layout.index("b"), len(layout)
        (slice(4, 6, None), 1, 2)
        >>> layout.mask("b").tolist()
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    """

    def __init__(self, entries: Sequence[ParamEntry]):
        entries = tuple(entries)
        off = 0
        for e in entries:
            check(isinstance(e, ParamEntry), f"layout entries must be ParamEntry, got {type(e).__name__}")
            check(e.offset == off, f"parameter {e.name!r} starts at {e.offset}, expected {off} (entries must be "
                  "contiguous, in order)")
            off += e.numel
        self.entries: tuple[ParamEntry, ...] = entries
        self.n_params: int = off
        self._by_name = {e.name: e for e in entries}
        check(len(self._by_name) == len(entries), "parameter names must be unique")
        self._index = {e.name: i for i, e in enumerate(entries)}

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> ParamLayout:
        """The layout of tensors of the given shapes, in the mapping's order."""
        entries, off = [], 0
        for name, shape in shapes.items():
            e = ParamEntry(str(name), tuple(int(s) for s in shape), off)
            entries.append(e)
            off += e.numel
        return cls(entries)

    @classmethod
    def from_module(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model.named_parameters()`` (the order :meth:`torch.nn.Module.parameters` uses)."""
        return cls.from_shapes({name: tuple(p.shape) for name, p in model.named_parameters()})

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.entries)} tensors, P={self.n_params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamLayout) and self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ mapping
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ParamEntry]:
        """The entries in parameter order."""
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> ParamEntry:
        e = self._by_name.get(name)
        check(e is not None, f"unknown parameter {name!r}; parameters: {', '.join(self._by_name)}")
        return e

    def get(self, name: str, default: ParamEntry | None = None) -> ParamEntry | None:
        """The entry named ``name``, or ``default``."""
        return self._by_name.get(name, default)

    @property
    def names(self) -> list[str]:
        """Parameter names in order."""
        return list(self._by_name)

    def index(self, name: str) -> int:
        """Position of ``name`` in the parameter order (its place in :meth:`split`'s list)."""
        self[name]
        return self._index[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` in order."""
        return {e.name: e.shape for e in self.entries}

    # ------------------------------------------------------------------ flat <-> per-tensor
    def split(self, theta: torch.Tensor, *, leaf: bool = False) -> list[torch.Tensor]:
        """``(K, P)`` -> one ``(K, *shape)`` view per tensor; with ``leaf=True`` each is a fresh autograd leaf, so
        a backward pass writes one gradient per tensor instead of zero-filling (K, P) per tensor (what slicing one
        big leaf costs)."""
        k = theta.shape[0]
        parts = [theta[:, e.slice].view(k, *e.shape) for e in self.entries]
        return [t.detach().requires_grad_(True) for t in parts] if leaf else parts

    def join(self, parts: Sequence[torch.Tensor], k: int) -> torch.Tensor:
        """Per-tensor ``(K, *shape)`` -> one ``(K, P)`` tensor (the inverse of :meth:`split`)."""
        return torch.cat([t.reshape(k, -1) for t in parts], 1)

    def view(self, theta: torch.Tensor | Sequence[torch.Tensor], entry: ParamEntry | str) -> torch.Tensor:
        """One tensor ``(K, *shape)`` of ``theta``: a view of the ``(K, P)`` tensor, or the item of a list from
        :meth:`split` (so one forward pass serves both a flat point and per-tensor autograd leaves)."""
        e = self[entry] if isinstance(entry, str) else entry
        if isinstance(theta, (list, tuple)):
            return theta[self._index[e.name]]
        return theta[:, e.slice].view(theta.shape[0], *e.shape)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` ``(..., P)`` as the named tensors ``(..., *shape)``."""
        lead = theta.shape[:-1]
        return {e.name: theta[..., e.slice].reshape(*lead, *e.shape) for e in self.entries}

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``{name: (*shape)}`` -> ``(P,)`` (the inverse of :meth:`unflatten` for one point); names not in the
        layout are ignored, missing ones or wrong shapes refused."""
        missing = [e.name for e in self.entries if e.name not in tensors]
        check(not missing, f"parameters missing: {missing}")
        parts = []
        for e in self.entries:
            t = tensors[e.name]
            check(tuple(t.shape) == e.shape, f"parameter {e.name!r} has shape {tuple(t.shape)}, expected {e.shape}")
            parts.append(t.detach().reshape(-1))
        return torch.cat(parts)

    def mask(self, *names: str, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(P,)`` indicator of the named tensors (1 on their entries, 0 elsewhere)."""
        m = torch.zeros(self.n_params, device=device, dtype=dtype)
        for name in names:
            m[self[name].slice] = 1
        return m
