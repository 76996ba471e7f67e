"""Permutation symmetry of hidden units, declared as data, and alignment of networks.

A :class:`PermutationSpec` maps each permutation name to the ``(parameter name, axis)`` pairs it acts on
(git-re-basin's idea). For an MLP it is derived directly: hidden layer l's permutation pi acts on
rows of W_l and b_l and columns of W_{l+1}; the network function is unchanged. For any other module it is derived
by tracing (:func:`derive_spec`, torch.fx): hidden units of Linear layers, channels of convolutions with their
norm layers (BatchNorm running statistics included), residual streams (every tensor added to a stream shares its
permutation), channel blocks across a Flatten, and the symmetries that modules declare (attention heads, see
:class:`lossglass.models.Attention`); the result is verified on the spot by a random permutation.

Convention: applying pi gives the network whose unit i is the original unit pi[i]
(W_l' = W_l[pi], b_l' = b_l[pi], W_{l+1}' = W_{l+1}[:, pi]).
"""

from __future__ import annotations

import copy
import math
import operator
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ._util import as_batch, seed_for
from .batchnorm import BATCHNORM_TYPES, is_batchnorm
from .errors import LossglassError, check, choice
from .layers import describe_node
from .problem import Problem

Perm = dict[str, torch.Tensor]


def _entries(axes) -> list[tuple[str, int, int, int]]:
    """(param, axis), (param, axis, block) or (param, axis, block, outer) -> (param, axis, block, outer). The axis
    holds outer x n x block entries (row-major) and the permutation acts on the n units: a block > 1 means each unit
    is ``block`` consecutive entries (the columns of a Linear after a Flatten hold one block of H*W per channel); an
    outer > 1 means the same permutation is applied within each of ``outer`` consecutive groups (the dimensions of
    every attention head)."""
    return [(e[0], int(e[1]), int(e[2]) if len(e) > 2 else 1, int(e[3]) if len(e) > 3 else 1) for e in axes]


def _shape_of(problem: Problem, name: str) -> tuple[int, ...] | None:
    """Shape of a parameter or buffer of the problem's model, None when it has neither."""
    entry = problem.layout.get(name)
    if entry is not None:
        return entry.shape
    buf = getattr(problem, "buffers", {}).get(name)
    return None if buf is None else tuple(buf.shape)


@dataclass(frozen=True)
class PermutationSpec:
    """``{perm_name: [(param_name, axis), (param_name, axis, block) or (param_name, axis, block, outer), ...]}``;
    every entry of a permutation must hold the same number of units (see :func:`_entries`). Entries may name buffers
    (BatchNorm running statistics): :func:`permute_state` moves them with their channels; parameter vectors
    (``theta``) hold parameters only."""

    perms: dict[str, tuple[tuple, ...]]

    def sizes(self, problem: Problem) -> dict[str, int]:
        out = {}
        for name, axes in self.perms.items():
            ns = set()
            for p, a, g, o in _entries(axes):
                n = _shape_of(problem, p)[a]
                check(n % (g * o) == 0, f"permutation {name!r}: axis {a} of {p!r} ({n}) is not a multiple of "
                      f"block x outer = {g} x {o}")
                ns.add(n // (g * o))
            check(len(ns) == 1, f"permutation {name!r} acts on axes of different sizes {sorted(ns)}")
            out[name] = ns.pop()
        return out

    def validate(self, problem: Problem) -> PermutationSpec:
        names = problem.layout.names + list(getattr(problem, "buffers", {}))
        for name, axes in self.perms.items():
            check(len(axes) > 0, f"permutation {name!r} acts on nothing")
            for entry in axes:
                check(isinstance(entry, (tuple, list)) and len(entry) in (2, 3, 4),
                      f"permutation {name!r}: entries must be (parameter, axis), (parameter, axis, block) or "
                      "(parameter, axis, block, outer)")
                p, a = entry[0], entry[1]
                shape = _shape_of(problem, p)
                check(shape is not None, f"permutation {name!r}: unknown parameter {p!r} (parameters: {', '.join(names)})")
                check(0 <= a < len(shape), f"permutation {name!r}: parameter {p!r} of shape {shape} has no axis {a}")
                check(all(int(v) >= 1 for v in entry[2:]), f"permutation {name!r}: block and outer must be >= 1")
        self.sizes(problem)
        return self

def mlp_spec(problem: Problem) -> PermutationSpec:
    """The hidden-unit permutations of an MLP of any depth (one per hidden layer), or of a Conv/Linear stack
    with norm layers (one per hidden layer of units or channels): what the problem's forward path
    (:meth:`lossglass.backends.Backend.permutation_spec`) knows of its layers."""
    backend = getattr(problem, "backend", None)
    perms = None if backend is None else backend.permutation_spec()
    if perms is None:
        raise LossglassError(f"{problem!r} is not a plain MLP, so its permutation symmetry cannot be derived; "
                             "declare it: problem.spec = PermutationSpec({'P0': (('layer.weight', 0), ...)})")
    return PermutationSpec(perms)


#: specs derived by tracing, per model (a problem and the problems it derives, e.g. with frozen BatchNorm
#: statistics, share their model; the entry goes when the model does)
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spec_of(problem: Problem) -> PermutationSpec:
    """The problem's spec: ``problem.spec`` when the user set one; for a plain MLP :func:`mlp_spec`; for any other
    model :func:`derive_spec` on two training inputs (derived once per problem, then reused)."""
    spec = getattr(problem, "spec", None)
    if spec is None:
        if problem.is_mlp:
            spec = mlp_spec(problem)
        else:
            spec = _DERIVED.get(problem.model)
            if spec is None:
                spec = derive_spec(problem.model, problem.data["train"][0][:2])
                _DERIVED[problem.model] = spec
    return spec.validate(problem)


def _check_perm(problem: Problem, perm: Perm, k: int | None) -> dict[str, torch.Tensor]:
    sizes = spec_of(problem).sizes(problem)
    check(isinstance(perm, dict), "perm must be a dict {permutation name: index tensor}")
    unknown = set(perm) - set(sizes)
    check(not unknown, f"unknown permutation(s) {sorted(unknown)}; this model has {sorted(sizes)}")
    out = {}
    for name, p in perm.items():
        p = torch.as_tensor(p, dtype=torch.long)
        n = sizes[name]
        check(p.shape[-1] == n and p.ndim in (1, 2), f"permutation {name!r} must have length {n}, got shape "
              f"{tuple(p.shape)}")
        check(bool((p.sort(-1).values == torch.arange(n)).all()), f"permutation {name!r} is not a bijection of 0..{n - 1}")
        if p.ndim == 2:
            check(k is not None and p.shape[0] == k, f"permutation {name!r} has {p.shape[0]} rows for {k} replicas")
        out[name] = p
    return out


def permute(problem: Problem, theta: torch.Tensor, perm: Perm) -> torch.Tensor:
    """Apply hidden-unit permutations to ``theta`` (``(P,)`` or ``(K, P)``); ``perm[name]`` is ``(n,)`` (same
    for all replicas) or ``(K, n)``. Permutations not named are the identity."""
    theta, single = as_batch(theta, problem.n_params)
    k = theta.shape[0]
    perm = _check_perm(problem, perm, k)
    out = theta.clone()
    spec = spec_of(problem)
    for name, p in perm.items():
        p = p.to(theta.device)
        pk = p.expand(k, -1) if p.ndim == 1 else p
        for pname, axis, _, outer in _entries(spec.perms[name]):
            info = problem.layout.get(pname)
            if info is None:  # a buffer: not part of theta (see permute_state)
                continue
            t = _permute_axis(out[:, info.slice].reshape(k, *info.shape), axis, pk, outer)
            out[:, info.slice] = t.reshape(k, -1)
    return out[0] if single else out


def permute_state(spec: PermutationSpec, state: dict[str, torch.Tensor], perm: Perm) -> dict[str, torch.Tensor]:
    """One network's ``state_dict`` (parameters and buffers) with the permutations ``perm`` (``{name: (n,)}``)
    applied to every entry of ``spec``, BatchNorm running statistics moving with their channels; tensors the spec
    does not name are returned as they are. This is how a module with stored statistics is permuted exactly."""
    out = dict(state)
    for name, p in perm.items():
        check(name in spec.perms, f"unknown permutation {name!r}; the spec has {sorted(spec.perms)}")
        p = torch.as_tensor(p, dtype=torch.long).reshape(1, -1)
        for pname, axis, _, outer in _entries(spec.perms[name]):
            if pname in out:
                t = out[pname]
                out[pname] = _permute_axis(t.unsqueeze(0), axis, p.to(t.device), outer)[0]
    return out


def _permute_axis(t: torch.Tensor, axis: int, pk: torch.Tensor, outer: int = 1) -> torch.Tensor:
    """Permute units along ``axis`` of ``t`` (``(K, *shape)``) by ``pk`` (``(K, n)``); the axis holds outer x n x
    block entries (see :func:`_entries`) and the same permutation acts within each of the ``outer`` groups."""
    moved = t.movedim(axis + 1, 1)
    shape = moved.shape
    n = pk.shape[1]
    flat = moved.reshape(shape[0], outer, n, -1)
    flat = torch.gather(flat, 2, pk.reshape(shape[0], 1, n, 1).expand_as(flat))
    return flat.reshape(shape).movedim(1, axis + 1)


def _unit_rows(t: torch.Tensor, axis: int, n: int, outer: int) -> torch.Tensor:
    """``(K, *shape)`` -> ``(K, n, -1)``: unit i's entries (all its blocks, in every outer group) as one row."""
    moved = t.movedim(axis + 1, 1)
    return moved.reshape(moved.shape[0], outer, n, -1).transpose(1, 2).reshape(moved.shape[0], n, -1)


def random_permutation(problem: Problem, seed: int = 0) -> Perm:
    """A uniformly random permutation of every hidden layer."""
    sizes = spec_of(problem).sizes(problem)
    g = torch.Generator().manual_seed(seed_for(seed, 31))
    return {name: torch.randperm(n, generator=g) for name, n in sizes.items()}


def swap_permutation(problem: Problem, k: int, seed: int = 0, layer: str | None = None) -> Perm:
    """A permutation of one hidden layer (default the first) that moves exactly ``k`` units: k units chosen at
    random are shifted cyclically among themselves (k = 0 is the identity; k = 1 is impossible)."""
    sizes = spec_of(problem).sizes(problem)
    layer = layer or next(iter(sizes))
    choice("layer", layer, tuple(sizes))
    n = sizes[layer]
    check(isinstance(k, int) and (k == 0 or 2 <= k <= n), f"k must be 0 or between 2 and {n}, got {k!r}")
    g = torch.Generator().manual_seed(seed_for(seed, 37, k))
    p = torch.arange(n)
    chosen = torch.randperm(n, generator=g)[:k]
    p[chosen] = chosen.roll(1)
    return {layer: p}


# ---------------------------------------------------------------------------- alignment
def _apply_on_axes(problem: Problem, params: dict[str, torch.Tensor], perm: dict[str, np.ndarray],
                   spec: PermutationSpec, skip: str) -> dict[str, torch.Tensor]:
    """Parameters (K, *shape) with every permutation but ``skip`` applied."""
    out = dict(params)
    for name, axes in spec.perms.items():
        if name == skip:
            continue
        p = torch.as_tensor(perm[name])  # (K, n)
        for pname, axis, _, outer in _entries(axes):
            if pname in out:
                out[pname] = _permute_axis(out[pname], axis, p.expand(out[pname].shape[0], -1), outer)
    return out


def weight_matching(problem: Problem, reference: torch.Tensor, theta: torch.Tensor, *, max_iter: int = 100,
                    seed: int = 0) -> Perm:
    """Weight matching (Ainsworth et al. 2023): maximise sum_l <W_l^ref, P_l W_l P_{l-1}^T>_F by coordinate
    descent over layers, one linear assignment per layer (exact in one pass for one hidden layer, where the
    cost is C = W1^A W1^B^T + b1^A b1^B^T + W2^A^T W2^B). The cost matrices of all K replicas are one batched
    product; the assignments are solved by scipy (Hungarian algorithm), one per replica and layer."""
    spec = spec_of(problem)
    sizes = spec.sizes(problem)
    dt = theta.dtype  # float32 costs for float32 networks: twice the speed, ties are not an issue in practice
    ref = problem.unflatten(reference.reshape(1, -1).to(dt).cpu())
    params = problem.unflatten(theta.cpu())
    k = theta.shape[0]
    perm = {n: np.tile(np.arange(s), (k, 1)) for n, s in sizes.items()}
    rng = np.random.default_rng(seed)
    names = list(sizes)
    for _ in range(max_iter):
        changed = False
        for name in rng.permutation(names) if len(names) > 1 else names:
            n = sizes[name]
            others = _apply_on_axes(problem, params, perm, spec, skip=name)
            cost = torch.zeros(k, n, n, dtype=dt)
            for pname, axis, _, outer in _entries(spec.perms[name]):
                if pname not in ref:  # buffers do not enter the weight-matching objective
                    continue
                a = _unit_rows(ref[pname], axis, n, outer)
                b = _unit_rows(others[pname], axis, n, outer)
                cost += a @ b.transpose(1, 2)  # cost[i, j] = <unit i of ref, unit j of theta>
            c = cost.numpy()
            for r in range(k):
                _, col = linear_sum_assignment(c[r], maximize=True)
                if not np.array_equal(col, perm[name][r]):
                    old = c[r][np.arange(n), perm[name][r]].sum()
                    new = c[r][np.arange(n), col].sum()
                    if new > old + 1e-12 * max(1.0, abs(old)):
                        perm[name][r] = col
                        changed = True
        if not changed or len(names) == 1:
            break
    return {n: torch.as_tensor(p) for n, p in perm.items()}


def hidden_activations(problem: Problem, theta: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    """What each hidden layer hands to the next Linear/Conv, as ``[(K, M, units_l)]``: for an MLP M = N samples
    and the units are the hidden neurons; for a CNN the units are channels and M = N x positions (each
    spatial position is a sample of the channel), also across a Flatten. BatchNorm layers use the statistics
    :meth:`~lossglass.problem.Problem.evaluate` uses (:meth:`~lossglass.problem.Problem.evaluation_statistics`)."""
    backend = getattr(problem, "backend", None)
    if backend is None or not backend.has_hidden_activations:
        raise LossglassError("activation matching (and activation overlaps) need an MLP or a Sequential Conv/Linear "
                             f"stack; {type(problem.model).__name__} is neither: use method='weight' (weight matching)")
    return backend.hidden_activations(theta, x, problem.evaluation_statistics(theta))


def activation_matching(problem: Problem, reference: torch.Tensor, theta: torch.Tensor, *,
                        n_samples: int = 2000) -> Perm:
    """Activation matching: for each hidden layer, the assignment maximising the summed correlation
    corr(a_i^ref, a_{pi(i)}) of hidden activations over ``n_samples`` training inputs. Each layer's
    activations are a function of the input only, so layers are matched independently."""
    spec = spec_of(problem)
    x = problem.data["train"][0][:n_samples]
    k = theta.shape[0]
    with torch.no_grad():
        ra = hidden_activations(problem, reference.reshape(1, -1).to(problem.device, problem.dtype), x)
        ta = hidden_activations(problem, theta.to(problem.device, problem.dtype), x)
    names = list(spec.perms)
    check(len(names) == len(ra), f"spec has {len(names)} permutations but the model {len(ra)} hidden layers")
    perm = {}
    for name, a, b in zip(names, ra, ta):
        a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-8)
        b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True) + 1e-8)
        corr = (a.transpose(1, 2) @ b / a.shape[1]).double().cpu().numpy()  # (K, n, n)
        perm[name] = torch.as_tensor(np.stack([linear_sum_assignment(corr[min(r, len(corr) - 1)],
                                                                     maximize=True)[1] for r in range(k)]))
    return perm


def align(problem: Problem, reference: torch.Tensor, theta: torch.Tensor, method: str = "weight",
          **kwargs) -> tuple[torch.Tensor, Perm]:
    """Permute ``theta`` (``(P,)`` or ``(K, P)``) to best match ``reference`` (``(P,)``); returns the aligned
    parameters (same function as ``theta``) and the permutations used."""
    choice("alignment method", method, ("weight", "activation"))
    ref = torch.as_tensor(reference)
    check(ref.ndim == 1 and ref.shape[0] == problem.n_params,
          f"reference must have shape ({problem.n_params},), got {tuple(ref.shape)}")
    theta, single = as_batch(theta, problem.n_params)
    fn = weight_matching if method == "weight" else activation_matching
    perm = fn(problem, ref, theta, **kwargs)
    aligned = permute(problem, theta, perm)
    if single:
        return aligned[0], {k: v[0] for k, v in perm.items()}
    return aligned, perm


# ---------------------------------------------------------------------------- derived by tracing
@dataclass
class _Val:
    """A traced tensor's permuted axis: ``axis`` (negative, from the end) holds outer x n x block entries of the
    units of group ``group`` (see :func:`_entries`). A tensor without one (the input, token ids, constants) has no
    ``_Val`` (None): its axes may not be permuted."""

    axis: int
    group: int
    block: int = 1
    outer: int = 1


class _Groups:
    """Union-find over permutation groups: each root holds the entries it acts on, its number of units, whether it
    is frozen (it touches the input or the output, so it may not be permuted) and an optional declared name."""

    def __init__(self):
        self.parent: list[int] = []
        self.entries: list[list[tuple]] = []
        self.units: list[int] = []
        self.frozen: list[bool] = []
        self.names: list[str | None] = []

    def new(self, units: int, entries=(), name: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.entries.append(list(entries))
        self.units.append(int(units))
        self.frozen.append(False)
        self.names.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def add(self, g: int, entry: tuple) -> None:
        self.entries[self.find(g)].append(entry)

    def union(self, a: int, b: int, where: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        check(self.units[a] == self.units[b], f"derive_spec: {where} joins features of {self.units[a]} and "
              f"{self.units[b]} units")
        lo, hi = min(a, b), max(a, b)
        self.parent[hi] = lo
        self.entries[lo] += self.entries[hi]
        self.frozen[lo] = self.frozen[lo] or self.frozen[hi]
        self.names[lo] = self.names[lo] or self.names[hi]
        return lo

    def freeze(self, g: int) -> None:
        self.frozen[self.find(g)] = True


_NORMS = (*BATCHNORM_TYPES, nn.LayerNorm, nn.GroupNorm)
_LEAVES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding) + _NORMS
_ELEMENTWISE_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                        nn.Hardtanh, nn.ReLU6, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Softsign,
                        nn.Dropout3d, nn.AlphaDropout, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Softmax,
                        nn.LogSoftmax)
#: pooling modules and functions -> how many trailing (spatial) axes they pool over
_POOL_MODULES = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
                 nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
                 nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}
_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, torch.max_pool1d: 1, torch.max_pool2d: 2,
                   torch.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3, F.adaptive_avg_pool1d: 1,
                   F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2,
                   F.adaptive_max_pool3d: 3, F.max_pool1d_with_indices: 1, F.max_pool2d_with_indices: 2,
                   F.max_pool3d_with_indices: 3, F.adaptive_max_pool1d_with_indices: 1,
                   F.adaptive_max_pool2d_with_indices: 2, F.adaptive_max_pool3d_with_indices: 3,
                   torch.adaptive_avg_pool1d: 1, torch.adaptive_max_pool1d: 1}
_UNARY_FUNCTIONS = (torch.relu, F.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.softplus, F.leaky_relu, F.elu,
                    F.dropout, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt, operator.neg, torch.clone,
                    F.mish, torch.square, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.selu, F.celu, F.softsign,
                    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.selu, torch.celu,
                    F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
_UNARY_METHODS = ("relu", "tanh", "sigmoid", "exp", "neg", "abs", "sqrt", "rsqrt", "contiguous", "clone", "float",
                  "double", "half", "long", "int", "to", "type_as", "detach", "square", "softmax", "log_softmax")
_BINARY_FUNCTIONS = (operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                     operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                     torch.minimum, torch.masked_fill, torch.where)
_BINARY_METHODS = ("add", "sub", "mul", "div", "masked_fill", "add_", "mul_", "sub_", "div_", "masked_fill_")
_REDUCTION_FUNCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.var, torch.std)
_REDUCTION_METHODS = ("mean", "sum", "amax", "amin", "logsumexp", "var", "std")
_SHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze)
_SHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as")


class _Tracer(fx.Tracer):
    """A torch.fx tracer that keeps layers with known symmetry rules (and modules declaring ``permutation_rule``)
    as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, _LEAVES) or callable(getattr(m, "permutation_rule", None))
                or super().is_leaf_module(m, qualname))


def _unsupported(what: str) -> LossglassError:
    return LossglassError(
        f"derive_spec: {what}, whose permutation symmetry is unknown, acts on permutable features; declare it: "
        "problem.spec = lossglass.PermutationSpec({...}), or config model.spec = 'package.module:function', or a "
        "permutation_rule() method on the module (see lossglass.models.Attention)")


def _pos(axis: int, ndim: int) -> int:
    return axis % ndim


def _reshape_axis(v: _Val, s_in: tuple, s_out: tuple, what: str) -> _Val:
    """The permuted axis after a reshape from ``s_in`` to ``s_out``: it must survive as one output axis, perhaps
    merged with neighbours (which multiplies its outer count or block size)."""
    a = _pos(v.axis, len(s_in))
    prefix, size, suffix = math.prod(s_in[:a]), s_in[a], math.prod(s_in[a + 1:])
    for j in range(len(s_out)):
        pj, qj = math.prod(s_out[:j]), math.prod(s_out[j + 1:])
        if pj and qj and prefix % pj == 0 and suffix % qj == 0 and s_out[j] == (prefix // pj) * size * (suffix // qj):
            if s_out[j] == 1 and size != 1:
                continue
            return _Val(j - len(s_out), v.group, v.block * (suffix // qj), v.outer * (prefix // pj))
    raise _unsupported(f"{what} (it splits the permuted axis of shape {tuple(s_in)} into {tuple(s_out)})")


def _getitem_axis(v: _Val, idx, s_in: tuple, s_out: tuple, what: str) -> _Val | None:
    """The permuted axis after basic indexing ``x[idx]`` (slices, integers, None, Ellipsis)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (isinstance(i, (int, slice)) or i is None or i is Ellipsis) for i in idx):
        raise _unsupported(f"{what} (advanced indexing)")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (len(s_in) - n_real) + idx[e + 1:]
    idx = idx + (slice(None),) * (len(s_in) - sum(1 for i in idx if i is not None))
    a = _pos(v.axis, len(s_in))
    d_in = d_out = 0
    for i in idx:
        if i is None:
            d_out += 1
            continue
        if d_in == a:
            if not (isinstance(i, slice) and i == slice(None)):
                raise _unsupported(f"{what} (it indexes the permuted axis)")
            return _Val(d_out - len(s_out), v.group, v.block, v.outer)
        d_out += 0 if isinstance(i, int) else 1
        d_in += 1
    raise _unsupported(what)


@dataclass(frozen=True, eq=False)
class _Sym:
    """What :class:`_Propagate` knows of one traced value: its ``shape`` (None for what is not a tensor: sizes,
    dims, tuples), whether it is a tuple of tensors (a recurrent layer's outputs, a pool's values and indices) and
    ``val``, its permuted axis (a :class:`_Val`, a tuple of them for a tuple of tensors, or None)."""

    shape: tuple | None
    val: _Val | tuple | None
    is_tuple: bool = False

    @property
    def is_value(self) -> bool:
        return self.shape is not None or self.is_tuple


def _sym_val(a) -> _Val | tuple | None:
    """The permuted axis of an argument: None for constants (numbers, dims, slices) and unpermuted tensors."""
    return a.val if isinstance(a, _Sym) else None


def _sym_shape(a) -> tuple | None:
    return a.shape if isinstance(a, _Sym) else None


class _Propagate(fx.Interpreter):
    """Abstract interpretation of a traced model (a :class:`torch.fx.Interpreter` whose values are :class:`_Sym`):
    every node's handler maps the permuted axes of its inputs to that of its output, creating groups of units
    (Linear, convolution, embedding, parameters used directly), joining them (residual sums, products, norm
    layers) and freezing those that reach the input or the output. Shapes come from one real run
    (``ShapeProp``) beforehand. Handlers are looked up in dispatch tables: by module type, by function, by method
    name; an op in none of them is an error when it touches permutable features, else passes nothing on."""

    def __init__(self, gm: fx.GraphModule, shapes: dict, tuples: set, params: dict):
        super().__init__(gm)
        self.extra_traceback = False  # its messages are ours: one line, naming the op
        self.shapes, self.tuples, self.params = shapes, tuples, params
        self.mods = dict(gm.named_modules())
        self.groups = _Groups()

    # ---- the node loop
    def run_node(self, n: fx.Node) -> _Sym:
        self.what = describe_node(n, self.mods)
        self.s_out, self.is_tuple = self.shapes.get(n.name), n.name in self.tuples
        is_value = self.s_out is not None or self.is_tuple
        if (not is_value and n.op in ("call_module", "call_function", "call_method")
                and not (n.op == "call_module" and self._rule_of(n.target) is not None)):
            args, _ = self.fetch_args_kwargs_from_env(n)  # sizes, dims, shapes: not tensors
            tup = _sym_val(args[0]) if n.op == "call_function" and n.target is operator.getitem else None
            val = tup[args[1]] if isinstance(tup, tuple) else None
        else:
            val = super().run_node(n)
        return _Sym(self.s_out, val, self.is_tuple)

    def _rule_of(self, target: str):
        rule = getattr(self.mods[target], "permutation_rule", None)
        return rule if callable(rule) else None

    # ---- the six kinds of node
    def placeholder(self, target, args, kwargs) -> None:
        return None  # the input: its axes may not be permuted

    def get_attr(self, target, args, kwargs) -> _Val | None:
        p = self.params.get(target)
        return None if p is None or p.ndim == 0 else _Val(-1, self.groups.new(p.shape[-1], [(target, p.ndim - 1)]))

    def output(self, target, args, kwargs) -> None:
        outs = args[0] if isinstance(args[0], (tuple, list)) else (args[0],)
        for o in outs:
            if isinstance(_sym_val(o), _Val):
                self.groups.freeze(o.val.group)

    def call_module(self, target, args, kwargs):
        m = self.mods[target]
        rule = self._rule_of(target)
        if rule is not None:
            return self._declared(target, rule(), args)
        for types, handler in self.MODULE_RULES:
            if isinstance(m, types):
                return handler(self, target, args, kwargs)
        return self._unknown(args, kwargs)

    def call_function(self, target, args, kwargs):
        handler = self.FUNCTION_RULES.get(target)
        return self._unknown(args, kwargs) if handler is None else handler(self, target, args, kwargs)

    def call_method(self, target, args, kwargs):
        handler = self.METHOD_RULES.get(target)
        return self._unknown(args, kwargs) if handler is None else handler(self, target, args, kwargs)

    # ---- helpers
    def _unknown(self, args, kwargs) -> None:
        """An op without a rule: fine when none of its tensor inputs carries permutable features."""
        for a in list(args) + list(kwargs.values()):
            for b in (a if isinstance(a, (tuple, list)) else (a,)):
                if isinstance(b, _Sym) and b.is_value and b.val is not None:
                    raise _unsupported(self.what)
        return None

    def _reads(self, v: _Val | None, entries, axis: int | None = None) -> None:
        """A layer reads features of ``v``: its entries join v's group (with v's block and outer)."""
        if v is None:
            return
        if axis is not None and v.axis != axis:
            raise _unsupported(f"{self.what} (it reads axis {axis} but the permutable features are on axis "
                               f"{v.axis})")
        for e in entries:
            self.groups.add(v.group, (e[0], e[1], v.block * (e[2] if len(e) > 2 else 1),
                                      v.outer * (e[3] if len(e) > 3 else 1)))

    def _channelwise(self, v: _Val | None, entries, axis: int) -> _Val | None:
        """A per-channel layer (norm): its entries join v's group, the output keeps v."""
        if v is None:
            return None
        if v.axis != axis or v.block != 1 or v.outer != 1:
            raise _unsupported(f"{self.what} (it acts per entry of axis {axis}; the permutable features are on "
                               f"axis {v.axis} in blocks of {v.block})")
        for e in entries:
            self.groups.add(v.group, e)
        return v

    def _combine(self, a, b) -> _Val | None:
        """Two operands combined entry by entry: permuted together (one group), or the permuted one is fixed
        when the other is not permuted with it along that axis."""
        va, vb = _sym_val(a), _sym_val(b)
        sa, sb = _sym_shape(a), _sym_shape(b)
        if va is not None and vb is not None:
            if (va.axis, va.block, va.outer) != (vb.axis, vb.block, vb.outer):
                raise _unsupported(f"{self.what} (its operands hold the permutable features on different axes)")
            self.groups.union(va.group, vb.group, self.what)
            return va
        v, s_other = (va, sb) if va is not None else (vb, sa)
        if v is None:
            return None
        if s_other is not None and len(s_other) >= -v.axis and s_other[v.axis] != 1:
            self.groups.freeze(v.group)  # combined entry by entry with something that is not permuted with it
            return None
        return v

    # ---- handlers, one per kind of op: (self, target, args, kwargs) -> the output's permuted axis; for a module
    # the target is its qualified name (its parameters are named target.weight, ...)
    def _declared(self, target: str, r: dict, args) -> _Val | None:
        """A module's ``permutation_rule()``: entries that read the input's features ("in"), that make the
        output's ("out") and internal groups of their own ("internal", named ``module.name``)."""
        pre, out = f"{target}.", None
        self._reads(_sym_val(args[0]) if args else None, [(pre + e[0], *e[1:]) for e in r.get("in", [])], -1)
        outs = r.get("out", [])
        if outs:
            e0 = _entries(outs[:1])[0]
            units = self.params[pre + e0[0]].shape[e0[1]] // (e0[2] * e0[3])
            out = _Val(-1, self.groups.new(units, [(pre + e[0], *e[1:]) for e in outs]))
        for name, entries in r.get("internal", {}).items():
            e0 = _entries(entries)[0]
            units = self.params[pre + e0[0]].shape[e0[1]] // (e0[2] * e0[3])
            self.groups.new(units, [(pre + e[0], *e[1:]) for e in entries], name=f"{target}.{name}")
        return out

    def _linear(self, target: str, args, kwargs) -> _Val:
        """y = x W^T + b: the columns of W join the input's group, the rows of W and b are a new group."""
        m, pre = self.mods[target], f"{target}."
        self._reads(_sym_val(args[0]), [(pre + "weight", 1)], -1)
        bias = [(pre + "bias", 0)] if m.bias is not None else []
        return _Val(-1, self.groups.new(m.out_features, [(pre + "weight", 0)] + bias))

    def _conv(self, target: str, args, kwargs) -> _Val | None:
        """A convolution: input channels (weight axis 1) join the input's group, output channels are new;
        a depthwise one keeps its channels; other grouped convolutions are refused."""
        m, pre = self.mods[target], f"{target}."
        ch = -(len(m.kernel_size) + 1)
        bias = [(pre + "bias", 0)] if m.bias is not None else []
        v0 = _sym_val(args[0])
        if m.groups == 1:
            self._reads(v0, [(pre + "weight", 1)], ch)
            return _Val(ch, self.groups.new(m.out_channels, [(pre + "weight", 0)] + bias))
        if m.groups == m.in_channels == m.out_channels:  # depthwise: channels stay where they are
            return self._channelwise(v0, [(pre + "weight", 0)] + bias, ch)
        raise _unsupported(f"{self.what} (grouped convolution with {m.groups} groups)")

    def _batchnorm(self, target: str, args, kwargs) -> _Val | None:
        m, pre = self.mods[target], f"{target}."
        entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        entries += [(pre + n, 0) for n in ("running_mean", "running_var") if getattr(m, n, None) is not None]
        return self._channelwise(_sym_val(args[0]), entries, 1 - len(_sym_shape(args[0])))

    def _layernorm(self, target: str, args, kwargs) -> _Val | None:
        m, pre = self.mods[target], f"{target}."
        v0 = _sym_val(args[0])
        if v0 is not None and len(m.normalized_shape) != 1:
            raise _unsupported(f"{self.what} (normalised over {len(m.normalized_shape)} axes)")
        entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        return self._channelwise(v0, entries, -1)

    def _groupnorm(self, target: str, args, kwargs) -> _Val | None:
        m, pre = self.mods[target], f"{target}."
        v0 = _sym_val(args[0])
        if v0 is not None and m.num_groups not in (1, m.num_channels):
            raise _unsupported(f"{self.what} ({m.num_groups} groups: only permutations within a group are "
                               "symmetries)")
        entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
        return self._channelwise(v0, entries, 1 - len(_sym_shape(args[0])))

    def _embedding(self, target: str, args, kwargs) -> _Val:
        m, pre = self.mods[target], f"{target}."
        if _sym_val(args[0]) is not None:
            raise _unsupported(f"{self.what} (its indices carry permutable features)")
        return _Val(-1, self.groups.new(m.embedding_dim, [(pre + "weight", 1)]))

    def _pool_module(self, target: str, args, kwargs):
        return self._pool(args, next(k for t, k in _POOL_MODULES.items() if isinstance(self.mods[target], t)))

    def _same(self, target, args, *rest) -> _Val | None:
        """Element-wise (activations, dropout, casts) or along the classes (softmax): the axis passes on."""
        return _sym_val(args[0]) if args else None

    def _reshape(self, target, args, *rest) -> _Val | None:
        v0 = _sym_val(args[0]) if args else None
        return None if v0 is None else _reshape_axis(v0, _sym_shape(args[0]), self.s_out, self.what)

    def _binary_function(self, target, args, kwargs) -> _Val | None:
        syms = [a for a in args if isinstance(a, _Sym)]
        if len(syms) == 1:
            return syms[0].val
        if not syms:
            return _sym_val(args[0]) if args else None
        out = self._combine(syms[0], syms[1])
        for extra in syms[2:]:
            out = self._combine(syms[0], extra) if out is not None else out
        return out

    def _binary_method(self, target, args, kwargs) -> _Val | None:
        other = args[1] if len(args) > 1 else None
        return self._combine(args[0], other) if isinstance(other, _Sym) else _sym_val(args[0])

    def _reduce(self, target, args, kwargs) -> _Val | None:
        """A sum, mean, max, ... over ``dim``: invariant when it runs over the permuted units."""
        v, s_in = _sym_val(args[0]), _sym_shape(args[0])
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if v is None or dims is None:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = len(s_in)
        dims = sorted(d % nd for d in dims)
        a = _pos(v.axis, nd)
        if a in dims:
            return None  # a sum or mean over the permuted units is invariant
        return v if keep else _Val(a - sum(1 for d in dims if d < a) - len(self.s_out), v.group, v.block, v.outer)

    def _pool_function(self, target, args, kwargs):
        return self._pool(args, _POOL_FUNCTIONS[target])

    def _pool(self, args, k: int):
        """Pooling over the last ``k`` axes: the permuted axis must be another one (the channels). A pool that also
        returns where the maxima were (``return_indices``) gives (values, indices), the indices not permuted."""
        v0, s_in = _sym_val(args[0]), _sym_shape(args[0])
        if v0 is not None and _pos(v0.axis, len(s_in)) >= len(s_in) - k:
            raise _unsupported(f"{self.what} (it pools over the permutable axis)")
        return (v0, None) if self.is_tuple else v0

    def _getitem(self, target, args, kwargs) -> _Val | None:
        v0 = _sym_val(args[0])
        if isinstance(v0, tuple):
            return v0[args[1]]
        return None if v0 is None else _getitem_axis(v0, args[1], _sym_shape(args[0]), self.s_out, self.what)

    def _cat(self, target, args, kwargs) -> _Val | None:
        """Concatenation: of tensors permuted together, along an axis other than theirs."""
        items = [_sym_val(a) for a in args[0]]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if all(v is None for v in items):
            return None
        if any(v is None for v in items) or _pos(items[0].axis, len(self.s_out)) == dim % len(self.s_out):
            raise _unsupported(f"{self.what} (concatenation of permutable features)")
        for v in items[1:]:
            self.groups.union(items[0].group, v.group, self.what)
        return items[0]

    def _transpose(self, target, args, kwargs) -> _Val | None:
        v0, s_in = _sym_val(args[0]), _sym_shape(args[0])
        if v0 is None:
            return None
        nd = len(s_in)
        a = _pos(v0.axis, nd)
        if target == "transpose":
            d0, d1 = args[1] % nd, args[2] % nd
            order = list(range(nd))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = [d % nd for d in (args[1] if isinstance(args[1], (tuple, list)) else args[1:])]
        return _Val(order.index(a) - nd, v0.group, v0.block, v0.outer)


    # ---- the dispatch tables: (module types, handler) tried in order (the first type that matches applies; modules
    # declaring ``permutation_rule()`` come first), function -> handler, method name -> handler
    MODULE_RULES = ((nn.Linear, _linear), ((nn.Conv1d, nn.Conv2d, nn.Conv3d), _conv), (BATCHNORM_TYPES, _batchnorm),
                    (nn.LayerNorm, _layernorm), (nn.GroupNorm, _groupnorm), (nn.Embedding, _embedding),
                    (_ELEMENTWISE_MODULES, _same), (tuple(_POOL_MODULES), _pool_module),
                    ((nn.Flatten, nn.Unflatten), _reshape))
    FUNCTION_RULES = {**dict.fromkeys(_UNARY_FUNCTIONS, _same), **dict.fromkeys(_BINARY_FUNCTIONS, _binary_function),
                      **dict.fromkeys(_SHAPE_FUNCTIONS, _reshape), **dict.fromkeys(_REDUCTION_FUNCTIONS, _reduce),
                      **dict.fromkeys(_POOL_FUNCTIONS, _pool_function), operator.getitem: _getitem, torch.cat: _cat}
    METHOD_RULES = {**dict.fromkeys(_UNARY_METHODS, _same), **dict.fromkeys(_BINARY_METHODS, _binary_method),
                    **dict.fromkeys(_SHAPE_METHODS, _reshape), **dict.fromkeys(_REDUCTION_METHODS, _reduce),
                    "transpose": _transpose, "permute": _transpose}


def _analyse(model: nn.Module, example_input: torch.Tensor) -> tuple[_Groups, dict]:
    """Trace ``model``, run it once on ``example_input`` for the shapes, and propagate permutation groups through
    its graph (:class:`_Propagate`). Returns (groups, named parameters)."""
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - say why tracing failed
        raise LossglassError(f"derive_spec: {type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: "
                             f"{e}); declare its spec instead (problem.spec = lossglass.PermutationSpec({{...}}), or "
                             "config model.spec)") from None
    gm = fx.GraphModule(model, graph)
    probe = copy.deepcopy(gm).eval()
    try:
        with torch.no_grad():
            ShapeProp(probe).propagate(example_input)
    except Exception as e:  # noqa: BLE001
        raise LossglassError(f"derive_spec: {type(model).__name__} does not run on the example input of shape "
                             f"{tuple(example_input.shape)} ({type(e).__name__}: {e})") from None
    shapes, tuples = {}, set()
    for n in probe.graph.nodes:
        meta = n.meta.get("tensor_meta")
        shapes[n.name] = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        if meta is not None and not hasattr(meta, "shape"):
            tuples.add(n.name)  # a tuple of tensors (e.g. a recurrent layer's outputs)
    params = dict(model.named_parameters())
    interp = _Propagate(gm, shapes, tuples, params)
    interp.run(example_input)
    return interp.groups, params


def derive_spec(model: nn.Module, example_input: torch.Tensor, *, verify: bool = True, seed: int = 0) -> PermutationSpec:
    """The permutation symmetry of ``model``, derived by tracing it with torch.fx on ``example_input`` (a few
    inputs, e.g. two training samples) and propagating the permutable feature axis of every tensor:

    - a Linear's outputs (rows of W, b) and a convolution's channels are new groups of units; the layer that reads
      them permutes its input axis with them (columns, in blocks of H*W across a Flatten);
    - norm layers (BatchNorm with its running statistics, LayerNorm, GroupNorm with 1 or C groups), element-wise
      activations, dropout, pooling, softmax, reshapes that keep the axis whole and basic indexing pass them on;
    - tensors added (or multiplied) entry by entry share one permutation: a residual stream is one group across
      all its blocks; an embedding's columns start a stream;
    - a module with ``permutation_rule()`` declares its own (lossglass's :class:`~lossglass.models.Attention`:
      whole heads, query/key and value/output dimensions within heads);
    - groups that reach the input or the output (classes) are fixed; groups of one unit are dropped.

    The spec is verified on the spot (``verify``): on a float64 copy in eval mode with perturbed parameters and
    random BatchNorm statistics, a random permutation of every group (buffers included, :func:`permute_state`)
    must leave the outputs unchanged to 1e-9 relative. An op whose symmetry is unknown and that touches permutable
    features, or a module that cannot be traced, raises a :class:`LossglassError` naming it; declare the spec
    instead (``problem.spec``, config ``model.spec``). Groups are named P0, P1, ... in order of appearance,
    declared ones ``module.name``.

    Example::

        >>> import lossglass as lg
        >>> spec = derive_spec(lg.models.mlp(4, 3, 2), torch.zeros(2, 4))
        >>> spec.perms["P0"]
        (('0.weight', 0), ('0.bias', 0), ('2.weight', 1))
    """
    check(isinstance(model, nn.Module), f"model must be a torch.nn.Module, got {type(model).__name__}")
    example_input = torch.as_tensor(example_input)
    G, params = _analyse(model, example_input)
    roots = sorted({G.find(g) for g in range(len(G.parent))})
    perms: dict[str, tuple] = {}
    count = 0
    for r in roots:
        if G.frozen[r] or G.units[r] < 2 or not any(e[0] in params for e in G.entries[r]):
            continue
        entries, seen = [], set()
        for e in G.entries[r]:
            e = _entries([e])[0]
            if e in seen:
                continue
            seen.add(e)
            name, axis, block, outer = e
            entries.append((name, axis) if block == outer == 1 else (name, axis, block) if outer == 1 else e)
        if G.names[r] is not None:
            key = G.names[r]
        else:
            key, count = f"P{count}", count + 1
        perms[key] = tuple(entries)
    spec = PermutationSpec(perms)
    if verify and perms:
        _verify(model, spec, example_input, seed)
    return spec


def _verify(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int) -> None:
    """Check that a random permutation of every group of ``spec`` leaves the outputs of ``model`` unchanged."""
    g = torch.Generator().manual_seed(seed_for(seed, 41))
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
        for mod in m.modules():
            if is_batchnorm(mod) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64))
        xx = x.double() if torch.is_floating_point(x) else x
        state = m.state_dict()
        sizes = {}
        for name, axes in spec.perms.items():
            p, a, b, o = _entries(axes)[0]
            sizes[name] = state[p].shape[a] // (b * o)
        perm = {name: torch.randperm(n, generator=g) for name, n in sizes.items()}
        y0 = m(xx)
        m2 = copy.deepcopy(m)
        m2.load_state_dict(permute_state(spec, state, perm))
        y1 = m2(xx)
    err = float((y1 - y0).abs().max() / y0.abs().max().clamp_min(1e-30))
    check(err < 1e-9, f"derive_spec: the derived permutation spec of {type(model).__name__} is wrong: a random "
          f"permutation changed the outputs by {err:.2e} (relative); declare the spec instead (problem.spec or config "
          f"model.spec). Spec: {dict(spec.perms)}")
