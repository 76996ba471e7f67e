"""Permutation symmetry of hidden units, declared as data, and alignment of networks.

A :class:`PermutationSpec` maps each permutation name to the ``(parameter name, axis)`` pairs it acts on
(git-re-basin's idea). For an MLP it is derived automatically: hidden layer l's permutation pi acts on
rows of W_l and b_l and columns of W_{l+1}; the network function is unchanged.

Convention: applying pi gives the network whose unit i is the original unit pi[i]
(W_l' = W_l[pi], b_l' = b_l[pi], W_{l+1}' = W_{l+1}[:, pi]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ._util import as_batch, seed_for
from .errors import LossglassError, check, choice
from .problem import Problem

Perm = dict[str, torch.Tensor]


def _entries(axes) -> list[tuple[str, int, int]]:
    """(param, axis) or (param, axis, block): a block > 1 means the axis holds units of ``block`` consecutive
    entries (the columns of a Linear after a Flatten hold one block of H*W per channel)."""
    return [(e[0], int(e[1]), int(e[2]) if len(e) > 2 else 1) for e in axes]


@dataclass(frozen=True)
class PermutationSpec:
    """``{perm_name: [(param_name, axis) or (param_name, axis, block), ...]}``; every entry of a permutation
    must hold the same number of units."""

    perms: dict[str, tuple[tuple, ...]]

    def sizes(self, problem: Problem) -> dict[str, int]:
        out = {}
        for name, axes in self.perms.items():
            ns = set()
            for p, a, g in _entries(axes):
                n = problem._info[p].shape[a]
                check(n % g == 0, f"permutation {name!r}: axis {a} of {p!r} ({n}) is not a multiple of block {g}")
                ns.add(n // g)
            check(len(ns) == 1, f"permutation {name!r} acts on axes of different sizes {sorted(ns)}")
            out[name] = ns.pop()
        return out

    def validate(self, problem: Problem) -> PermutationSpec:
        for name, axes in self.perms.items():
            check(len(axes) > 0, f"permutation {name!r} acts on nothing")
            for entry in axes:
                check(isinstance(entry, (tuple, list)) and len(entry) in (2, 3),
                      f"permutation {name!r}: entries must be (parameter, axis) or (parameter, axis, block)")
                p, a = entry[0], entry[1]
                check(p in problem._info, f"permutation {name!r}: unknown parameter {p!r} "
                      f"(parameters: {', '.join(problem._info)})")
                check(0 <= a < len(problem._info[p].shape),
                      f"permutation {name!r}: parameter {p!r} of shape {problem._info[p].shape} has no axis {a}")
        self.sizes(problem)
        return self


def mlp_spec(problem: Problem) -> PermutationSpec:
    """The hidden-unit permutations of an MLP of any depth (one per hidden layer), or of a Conv/Linear stack
    with norm layers (one per hidden layer of units or channels)."""
    if problem._plan is None and getattr(problem, "_seq", None) is not None:
        from . import layers

        return PermutationSpec(layers.spec(problem, problem._seq))
    if problem._plan is None:
        raise LossglassError(f"{problem!r} is not a plain MLP, so its permutation symmetry cannot be derived; "
                             "declare it: problem.spec = PermutationSpec({'P0': (('layer.weight', 0), ...)})")
    lin = [op for kind, op in problem._plan if kind == "linear"]
    perms = {}
    for i, (a, b) in enumerate(zip(lin[:-1], lin[1:])):
        axes = [(a.w.name, 0)] + ([(a.b.name, 0)] if a.b is not None else []) + [(b.w.name, 1)]
        perms[f"P{i}"] = tuple(axes)
    return PermutationSpec(perms)


def spec_of(problem: Problem) -> PermutationSpec:
    """The problem's spec: ``problem.spec`` when the user set one, else derived from the MLP."""
    spec = getattr(problem, "spec", None)
    return (spec if spec is not None else mlp_spec(problem)).validate(problem)


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
        for pname, axis, _ in _entries(spec.perms[name]):
            info = problem._info[pname]
            t = _permute_axis(out[:, info.slice].reshape(k, *info.shape), axis, pk)
            out[:, info.slice] = t.reshape(k, -1)
    return out[0] if single else out


def _permute_axis(t: torch.Tensor, axis: int, pk: torch.Tensor) -> torch.Tensor:
    """Permute units along ``axis`` of ``t`` (``(K, *shape)``) by ``pk`` (``(K, n)``); the axis may hold n blocks."""
    moved = t.movedim(axis + 1, 1)
    shape = moved.shape
    n = pk.shape[1]
    flat = moved.reshape(shape[0], n, -1)
    flat = torch.gather(flat, 1, pk.reshape(shape[0], n, 1).expand_as(flat))
    return flat.reshape(shape).movedim(1, axis + 1)


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
        for pname, axis, _ in _entries(axes):
            out[pname] = _permute_axis(out[pname], axis, p.expand(out[pname].shape[0], -1))
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
            for pname, axis, _ in _entries(spec.perms[name]):
                a = ref[pname].movedim(axis + 1, 1).reshape(1, n, -1)
                b = others[pname].movedim(axis + 1, 1).reshape(k, n, -1)
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
    spatial position is a sample of the channel), also across a Flatten."""
    k = theta.shape[0]
    if problem._plan is not None:
        outs, h = [], x
        plan = problem._plan
        for i, (kind, op) in enumerate(plan):
            h = problem._linear(theta, op, h) if kind == "linear" else op(h)
            if kind == "act" and (i + 1 == len(plan) or plan[i + 1][0] == "linear"):
                outs.append(h)
        return outs
    if getattr(problem, "_seq", None) is None:
        raise LossglassError("activation matching needs an MLP or a Conv/Linear stack (or use method='weight')")
    from . import layers

    ops = problem._seq
    consumers = [i for i, o in enumerate(ops) if o.kind in ("linear", "conv")][1:]
    stats = problem._eval_stats(theta)
    outs = []
    for i in consumers:
        h, layout = layers.forward(problem, ops, theta, x, stats=stats, stop_at=i)
        n = h.shape[0] if layout == "img" else h.shape[1]
        if layout == "img":  # (N, K*C, H, W) -> (K, N*H*W, C)
            c = h.shape[1] // k
            h = h.reshape(n, k, c, -1).permute(1, 0, 3, 2).reshape(k, -1, c)
        elif i > 0 and ops[i - 1].kind == "flatten" and len(ops[i - 2].out_shape) == 3:  # channel blocks
            c = ops[i - 2].out_shape[0]
            h = h.reshape(k, n, c, -1).permute(0, 1, 3, 2).reshape(k, -1, c)
        outs.append(h)
    return outs


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
