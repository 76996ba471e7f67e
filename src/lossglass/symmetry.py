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
                        nn.Hardtanh, nn.ReLU6, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Softsign)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_UNARY_FUNCTIONS = {torch.relu, F.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.softplus, F.leaky_relu, F.elu,
                    F.dropout, torch.exp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt, operator.neg, torch.clone,
                    F.mish, torch.square}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "neg", "abs", "sqrt", "rsqrt", "contiguous", "clone", "float",
                  "double", "half", "long", "int", "to", "type_as", "detach", "square"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                     operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                     torch.minimum, torch.masked_fill, torch.where}
_BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "add_", "mul_", "sub_", "div_", "masked_fill_"}
_SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
_REDUCTIONS_FN = {torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.var, torch.std}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin", "logsumexp", "var", "std"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze}
_SHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as"}


class _Tracer:
    """A torch.fx tracer that keeps layers with known symmetry rules (and modules declaring ``permutation_rule``)
    as leaves."""

    def __new__(cls):
        import torch.fx as fx

        class T(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                return (isinstance(m, _LEAVES) or callable(getattr(m, "permutation_rule", None))
                        or super().is_leaf_module(m, qualname))

        return T()


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


def _analyse(model: nn.Module, example_input: torch.Tensor):
    """Trace ``model`` and propagate permutation groups through its graph. Returns (groups, vals, named order)."""
    import torch.fx as fx
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
    mods = dict(gm.named_modules())
    params = dict(model.named_parameters())
    G = _Groups()
    vals: dict = {}

    def val(a):
        return vals.get(a.name) if isinstance(a, fx.Node) else None

    def tensor_args(node):
        out = []
        for a in list(node.args) + list(node.kwargs.values()):
            for b in (a if isinstance(a, (tuple, list)) else (a,)):
                if isinstance(b, fx.Node) and (shapes.get(b.name) is not None or b.name in tuples):
                    out.append(b)
        return out

    def shape(a):
        return shapes.get(a.name) if isinstance(a, fx.Node) else None

    def reads(v: _Val | None, entries, what: str, axis: int | None = None) -> None:
        """A layer reads features of ``v``: its entries join v's group (with v's block and outer)."""
        if v is None:
            return
        if axis is not None and v.axis != axis:
            raise _unsupported(f"{what} (it reads axis {axis} but the permutable features are on axis {v.axis})")
        for e in entries:
            G.add(v.group, (e[0], e[1], v.block * (e[2] if len(e) > 2 else 1), v.outer * (e[3] if len(e) > 3 else 1)))

    def channelwise(v: _Val | None, entries, what: str, axis: int) -> _Val | None:
        """A per-channel layer (norm): its entries join v's group, the output keeps v."""
        if v is None:
            return None
        if v.axis != axis or v.block != 1 or v.outer != 1:
            raise _unsupported(f"{what} (it acts per entry of axis {axis}; the permutable features are on axis "
                               f"{v.axis} in blocks of {v.block})")
        for e in entries:
            G.add(v.group, e)
        return v

    def binary(node, a, b, what):
        va, vb = val(a), val(b)
        sa, sb = shape(a), shape(b)
        if va is not None and vb is not None:
            if (va.axis, va.block, va.outer) != (vb.axis, vb.block, vb.outer):
                raise _unsupported(f"{what} (its operands hold the permutable features on different axes)")
            G.union(va.group, vb.group, what)
            return va
        v, s_other = (va, sb) if va is not None else (vb, sa)
        if v is None:
            return None
        if s_other is not None and len(s_other) >= -v.axis and s_other[v.axis] != 1:
            G.freeze(v.group)  # combined entry by entry with something that is not permuted with it
            return None
        return v

    def reduce(node, v, s_in, s_out, dims, keep):
        if v is None:
            return None
        if dims is None:
            return None
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = len(s_in)
        dims = sorted(d % nd for d in dims)
        a = _pos(v.axis, nd)
        if a in dims:
            return None  # a sum or mean over the permuted units is invariant
        return v if keep else _Val(a - sum(1 for d in dims if d < a) - len(s_out), v.group, v.block, v.outer)

    for node in gm.graph.nodes:
        what = describe_node(node, mods)
        s_out = shapes.get(node.name)
        if node.op == "placeholder":
            vals[node.name] = None
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for o in outs:
                if val(o) is not None:
                    G.freeze(val(o).group)
            continue
        if node.op == "get_attr":
            p = params.get(node.target)
            vals[node.name] = (None if p is None or p.ndim == 0 else
                               _Val(-1, G.new(p.shape[-1], [(node.target, p.ndim - 1)])))
            continue
        if s_out is None and node.name not in tuples and not (
                node.op == "call_module" and callable(getattr(mods[node.target], "permutation_rule", None))):
            if node.op == "call_function" and node.target is operator.getitem and isinstance(val(node.args[0]), tuple):
                vals[node.name] = val(node.args[0])[node.args[1]]
                continue
            vals[node.name] = None  # sizes, dims, shapes: not tensors
            continue
        ins = [val(a) for a in tensor_args(node)]
        first = node.args[0] if node.args else None
        v0 = val(first) if isinstance(first, fx.Node) else None
        s_in = shape(first) if isinstance(first, fx.Node) else None
        out: _Val | None | tuple = None
        if node.op == "call_module":
            m = mods[node.target]
            pre = f"{node.target}."
            rule = getattr(m, "permutation_rule", None)
            if callable(rule):
                r = rule()
                reads(v0, [(pre + e[0], *e[1:]) for e in r.get("in", [])], what, -1)
                outs = r.get("out", [])
                if outs:
                    e0 = outs[0]
                    units = params[pre + e0[0]].shape[e0[1]] // ((e0[2] if len(e0) > 2 else 1) * (e0[3] if len(e0) > 3 else 1))
                    out = _Val(-1, G.new(units, [(pre + e[0], *e[1:]) for e in outs]))
                for name, entries in r.get("internal", {}).items():
                    e0 = _entries(entries)[0]
                    units = params[pre + e0[0]].shape[e0[1]] // (e0[2] * e0[3])
                    G.new(units, [(pre + e[0], *e[1:]) for e in entries], name=f"{node.target}.{name}")
            elif isinstance(m, nn.Linear):
                reads(v0, [(pre + "weight", 1)], what, -1)
                out = _Val(-1, G.new(m.out_features, [(pre + "weight", 0)] + ([(pre + "bias", 0)] if m.bias is not None
                                                                             else [])))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                ch = -(len(m.kernel_size) + 1)
                bias = [(pre + "bias", 0)] if m.bias is not None else []
                if m.groups == 1:
                    reads(v0, [(pre + "weight", 1)], what, ch)
                    out = _Val(ch, G.new(m.out_channels, [(pre + "weight", 0)] + bias))
                elif m.groups == m.in_channels == m.out_channels:  # depthwise: channels stay where they are
                    out = channelwise(v0, [(pre + "weight", 0)] + bias, what, ch)
                else:
                    raise _unsupported(f"{what} (grouped convolution with {m.groups} groups)")
            elif is_batchnorm(m):
                entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
                entries += [(pre + n, 0) for n in ("running_mean", "running_var") if getattr(m, n, None) is not None]
                out = channelwise(v0, entries, what, 1 - len(s_in))
            elif isinstance(m, nn.LayerNorm):
                entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
                if v0 is not None and len(m.normalized_shape) != 1:
                    raise _unsupported(f"{what} (normalised over {len(m.normalized_shape)} axes)")
                out = channelwise(v0, entries, what, -1)
            elif isinstance(m, nn.GroupNorm):
                if v0 is not None and m.num_groups not in (1, m.num_channels):
                    raise _unsupported(f"{what} ({m.num_groups} groups: only permutations within a group are symmetries)")
                entries = [(pre + n, 0) for n in ("weight", "bias") if getattr(m, n, None) is not None]
                out = channelwise(v0, entries, what, 1 - len(s_in))
            elif isinstance(m, nn.Embedding):
                if v0 is not None:
                    raise _unsupported(f"{what} (its indices carry permutable features)")
                out = _Val(-1, G.new(m.embedding_dim, [(pre + "weight", 1)]))
            elif isinstance(m, _ELEMENTWISE_MODULES) or isinstance(m, (nn.Softmax, nn.LogSoftmax)):
                out = v0
            elif isinstance(m, _POOLS):
                if v0 is not None and _pos(v0.axis, len(s_in)) >= len(s_in) - (len(s_in) - 2 if len(s_in) > 2 else 1):
                    raise _unsupported(f"{what} (it pools over the permutable axis)")
                out = v0
            elif isinstance(m, (nn.Flatten, nn.Unflatten)):
                out = None if v0 is None else _reshape_axis(v0, s_in, s_out, what)
            elif all(v is None for v in ins):
                out = None
            else:
                raise _unsupported(what)
        elif node.op == "call_function":
            f = node.target
            if f is operator.getitem:
                out = None if v0 is None else _getitem_axis(v0, node.args[1], s_in, s_out, what)
            elif f in _UNARY_FUNCTIONS or f in _SOFTMAX:
                out = v0
            elif f in _BINARY_FUNCTIONS:
                nodes = [a for a in node.args if isinstance(a, fx.Node)]
                out = v0
                if len(nodes) >= 2:
                    out = binary(node, nodes[0], nodes[1], what)
                    for extra in nodes[2:]:
                        out = binary(node, nodes[0], extra, what) if out is not None else out
                elif len(nodes) == 1:
                    out = binary(node, nodes[0], None, what) if v0 is None and val(nodes[0]) is not None else val(nodes[0])
            elif f in _SHAPE_FUNCTIONS:
                out = None if v0 is None else _reshape_axis(v0, s_in, s_out, what)
            elif f in _REDUCTIONS_FN:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
                out = reduce(node, v0, s_in, s_out, dims, keep)
            elif f in (F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d):
                out = v0 if v0 is None or _pos(v0.axis, len(s_in)) < len(s_in) - 2 else None
                if v0 is not None and out is None:
                    raise _unsupported(f"{what} (it pools over the permutable axis)")
            elif f is torch.cat:
                items = [val(a) for a in node.args[0]]
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                if all(v is None for v in items):
                    out = None
                elif any(v is None for v in items) or _pos(items[0].axis, len(s_out)) == dim % len(s_out):
                    raise _unsupported(f"{what} (concatenation of permutable features)")
                else:
                    for v in items[1:]:
                        G.union(items[0].group, v.group, what)
                    out = items[0]
            elif all(v is None for v in ins):
                out = None
            else:
                raise _unsupported(what)
        elif node.op == "call_method":
            name = node.target
            if name in _UNARY_METHODS or name in ("softmax", "log_softmax"):
                out = v0
            elif name in _BINARY_METHODS:
                other = node.args[1] if len(node.args) > 1 else None
                out = binary(node, first, other, what) if isinstance(other, fx.Node) else v0
            elif name in _SHAPE_METHODS:
                out = None if v0 is None else _reshape_axis(v0, s_in, s_out, what)
            elif name in ("transpose", "permute"):
                if v0 is None:
                    out = None
                else:
                    nd = len(s_in)
                    a = _pos(v0.axis, nd)
                    if name == "transpose":
                        d0, d1 = node.args[1] % nd, node.args[2] % nd
                        order = list(range(nd))
                        order[d0], order[d1] = order[d1], order[d0]
                    else:
                        order = [d % nd for d in (node.args[1] if isinstance(node.args[1], (tuple, list))
                                                  else node.args[1:])]
                    out = _Val(order.index(a) - nd, v0.group, v0.block, v0.outer)
            elif name in _REDUCTION_METHODS:
                dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
                out = reduce(node, v0, s_in, s_out, dims, keep)
            elif all(v is None for v in ins):
                out = None
            else:
                raise _unsupported(what)
        vals[node.name] = out
    return G, params


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
