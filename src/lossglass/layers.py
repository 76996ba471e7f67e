"""Replica-batched forward passes for ``nn.Sequential`` stacks of Conv2d / Linear / BatchNorm / LayerNorm /
pooling / activations (CNNs without residual connections), and for free-form modules traced by torch.fx whose
graph is made of the same layers joined by additions (residual networks: :class:`Graph`).

Layouts: images of K replicas are one ``(N, K*C, H, W)`` tensor, so a convolution of all replicas is one
grouped ``conv2d`` (groups = K) and BatchNorm2d over K*C channels is exactly per-replica BatchNorm; vectors
are ``(K, N, F)``. BatchNorm uses either the statistics of the data it is given (training; with ``group=B``
the statistics of each consecutive block of B samples, the ``batch`` mode of :class:`~lossglass.problem.Problem`)
or statistics supplied per layer (``recompute``: the whole training set at the evaluated point, the choice of
Garipov et al. 2018 and REPAIR, Jordan et al. 2023, for paths, planes and walks; ``fixed``: frozen ones).
Supplied statistics enter as y = (h - mean) / sqrt(var + eps) * w + b computed elementwise, so the output is
differentiable in ``mean`` and ``var`` too (what the exact gradient of the recompute energy needs).

Parameters are read from the ``(K, P)`` vector (or its per-tensor list) through a
:class:`~lossglass.layout.ParamLayout`. The two replica-batched dense products every path shares live here too:
:func:`linear` (one GEMM for all replicas on shared inputs) and :func:`output_layer`.

Example (two replicas of a small CNN, one grouped convolution for both):

    >>> import torch
    >>> from torch import nn
    >>> from lossglass.layout import ParamLayout
    >>> net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(32, 3))
    >>> ops = build(net, 16)
    >>> [o.kind for o in ops]
    ['unflatten', 'conv', 'act', 'flatten', 'linear']
    >>> layout = ParamLayout.from_module(net)
    >>> theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).repeat(2, 1)
    >>> x = torch.randn(5, 16)
    >>> out = forward(layout, ops, theta, x)
    >>> out.shape, torch.allclose(out[1], net(x), atol=1e-6)
    (torch.Size([2, 5, 3]), True)
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import check
from .layout import ParamEntry, ParamLayout

_ACT = {nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.GELU: F.gelu, nn.Identity: lambda z: z}
_POOL = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)


@dataclass(frozen=True)
class Linear:
    """A dense layer inside the flat vector: the entries of its weight ``(out, in)`` and bias (or None)."""

    w: ParamEntry
    b: ParamEntry | None

    @classmethod
    def named(cls, layout: ParamLayout, name: str) -> Linear:
        """The layer whose parameters are ``{name}.weight`` and (when present) ``{name}.bias``."""
        return cls(layout[f"{name}.weight"], layout.get(f"{name}.bias"))


def linear(layout: ParamLayout, theta, layer: Linear, h: torch.Tensor) -> torch.Tensor:
    """z_k = h W_k^T + b_k for K replicas: ``h`` ``(N, in)`` shared by all (one GEMM X [W_1 ... W_K]^T, the bias
    fused into it) or ``(K, N, in)`` one batch each (``bmm``); returns ``(K, N, out)``."""
    w = layout.view(theta, layer.w)
    k, out_dim, in_dim = w.shape
    b = layout.view(theta, layer.b) if layer.b is not None else None
    if h.ndim == 2:  # shared input: one GEMM for all replicas, bias fused into it
        n = h.shape[0]
        wt = w.reshape(k * out_dim, in_dim).T
        z = h @ wt if b is None else torch.addmm(b.reshape(1, k * out_dim), h, wt)
        return z.view(n, k, out_dim).transpose(0, 1)
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.view(k, 1, out_dim), h, w.transpose(1, 2))


def output_layer(layout: ParamLayout, theta, layer: Linear, h: torch.Tensor) -> torch.Tensor:
    """The last (narrow) layer on ``h`` ``(K, N, in)`` computed as W (K, C, in) @ h^T (K, in, N): a bmm with a wide
    output runs several times faster than (K, N, in) @ (K, in, C) for C = 10. Returns a ``(K, N, C)`` view."""
    w = layout.view(theta, layer.w)
    if layer.b is None:
        return torch.bmm(w, h.transpose(1, 2)).transpose(1, 2)
    b = layout.view(theta, layer.b).unsqueeze(-1)
    return torch.baddbmm(b, w, h.transpose(1, 2)).transpose(1, 2)


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


def forward(param_layout: ParamLayout, ops, theta, x: torch.Tensor, *, stats: dict | None = None,
            stop_at: int | None = None, group: int | None = None, record: dict | None = None):
    """Outputs ``(K, N, C)`` of K networks on ``x`` (``(N, D)`` shared or ``(K, N, D)``), parameters
    read through ``param_layout``. BatchNorm op i uses
    ``stats[i] = (mean, var)`` (``(K*C,)`` each, biased variance) when given, else the statistics of ``x``: of
    all of it, or with ``group=B`` of each block of B consecutive samples (N must then be a multiple of B or at
    most B). With ``stop_at=i`` returns the input of op i in its layout (used to collect statistics layer by
    layer). With ``record`` (a dict), BatchNorm layers without supplied statistics compute those of ``x`` exactly as
    :func:`lossglass.batchnorm.layerwise_statistics` does (double-precision sums) and store them in ``record[i]``:
    one pass gives every layer's statistics when ``x`` is the whole training set. ``ops`` is a Sequential's op list
    or a :class:`Graph`; ``theta`` the ``(K, P)`` vector or its per-tensor list (``layout.split``)."""
    if isinstance(ops, Graph):
        return graph_forward(param_layout, ops, theta, x, stats=stats, stop_at=stop_at, group=group, record=record)
    p = param_layout.view
    info = param_layout
    k = p(theta, info.entries[0]).shape[0]
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
            h = _bn_apply(h, layout, k, w, b, stats[i] if stats and i in stats else None, m.eps, group, record, i)
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
            lin = Linear.named(info, o.name)
            if i == len(ops) - 1 and layout == "vec":
                return output_layer(info, theta, lin, h)
            h = linear(info, theta, lin, h)
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
        if img and not torch.is_grad_enabled():  # evaluation: one fused kernel (3x fewer passes over h)
            return F.batch_norm(h, mean.reshape(-1), var.reshape(-1), w.reshape(-1), b.reshape(-1), False, 0.0, eps)
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
    if img and not h.is_contiguous(memory_format=torch.channels_last):
        return F.batch_norm(h, None, None, w.reshape(-1), b.reshape(-1), training=True, eps=eps)
    if img:  # channels-last (traced graphs): as fast as the fused kernel once, twice as fast differentiated twice
        mean = h.mean((0, 2, 3), keepdim=True)
        d = h - mean
        scale = torch.rsqrt((d * d).mean((0, 2, 3), keepdim=True) + eps) * w.reshape(1, -1, 1, 1)
        return d * scale + b.reshape(1, -1, 1, 1)
    var, mean = torch.var_mean(h, dim=1, keepdim=True, unbiased=False)
    return (h - mean) / torch.sqrt(var + eps) * w.unsqueeze(1) + b.unsqueeze(1)


def _bn_apply(h: torch.Tensor, layout: str, k: int, w: torch.Tensor, b: torch.Tensor, stats, eps: float,
              group: int | None, record: dict | None, key) -> torch.Tensor:
    """BatchNorm with supplied statistics, with the batch's (recorded in ``record[key]`` when asked), or per group."""
    if stats is None and record is not None and group is None:
        s1, s2, n = channel_stats(h, layout, k)
        mean = s1 / n
        stats = (mean.to(h.dtype), (s2 / n - mean**2).clamp_min(0).to(h.dtype))
        record[key] = stats
    return _batch_norm(h, layout, k, w, b, stats, eps, group)


def channel_stats(h: torch.Tensor, layout: str, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares of a BatchNorm input, ``(K*C,)`` each, and the count per channel."""
    if layout == "img":
        dims = (0, 2, 3)
        n = h.shape[0] * h.shape[2] * h.shape[3]
        return h.sum(dims).double(), h.square().sum(dims).double(), n
    return h.sum(1).double().reshape(-1), h.square().sum(1).double().reshape(-1), h.shape[1]


def spec(layout: ParamLayout, ops: list[Op]) -> dict[str, tuple]:
    """Permutations of hidden units / channels: op l's outputs (Linear rows, Conv filters, and the norm layers
    after it) and the next Linear/Conv's input axis; across a Flatten each channel is a block of H*W columns."""
    perms: dict[str, list] = {}
    current: str | None = None
    count = 0
    block = 1
    names = layout
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


# ---------------------------------------------------------------------------- traced graphs (residual networks)
_FN_ACT: dict = {torch.relu: torch.relu, F.relu: torch.relu, torch.tanh: torch.tanh, torch.sigmoid: torch.sigmoid,
                 F.gelu: F.gelu, F.silu: F.silu, torch.nn.functional.tanh: torch.tanh}
_METHOD_ACT: dict = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "contiguous": lambda z: z}
_ADDS = (operator.add, operator.iadd, torch.add)
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FNS = (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)


@dataclass
class GraphOp:
    """One node of a traced graph: ``kind`` (input, conv, bn, ln, linear, act, pool, flatten, reshape, mean, add,
    output), ``name`` the module path its parameters live under (or the fx node name), the indices of the ops whose
    values it reads, and its per-sample output shape (from a shape propagation on two samples)."""

    kind: str
    name: str
    module: nn.Module | None
    args: tuple[int, ...]
    out_shape: tuple[int, ...] = ()
    fn: Callable | None = None
    extra: dict = field(default_factory=dict)


class Graph:
    """A free-form module (traced by torch.fx) as a list of :class:`GraphOp`, run for K replicas at once with the
    layouts of the Sequential path: images ``(N, K*C, H, W)`` (one grouped convolution for all replicas, BatchNorm
    over K*C channels is per-replica BatchNorm), vectors ``(K, N, ...)``, and values that depend on the input only
    ``(N, ...)`` (shared). Supports Conv2d, BatchNorm, LayerNorm, Linear, element-wise activations, pooling, flatten,
    reshapes of the input, spatial means and additions (residual connections). It behaves as a list of ops (the
    keys of the BatchNorm statistics are op indices, as for a Sequential)."""

    def __init__(self, ops: list[GraphOp]):
        self.ops = ops

    def __iter__(self):
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    def __getitem__(self, i: int) -> GraphOp:
        return self.ops[i]


def _shapes(gm, x: torch.Tensor) -> dict[str, tuple | None]:
    """Output shape of every node of ``gm`` on ``x`` (None for values that are not tensors), from a shape
    propagation on a copy in eval mode (the module's running statistics are not touched)."""
    from torch.fx.passes.shape_prop import ShapeProp

    g = copy.deepcopy(gm).eval()
    with torch.no_grad():
        ShapeProp(g).propagate(x)
    out = {}
    for n in g.graph.nodes:
        meta = n.meta.get("tensor_meta")
        out[n.name] = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    return out


def build_graph(model: nn.Module, x: torch.Tensor) -> tuple[Graph | None, str]:
    """``(Graph, "")`` for a module whose torch.fx graph uses only the supported ops (see :class:`Graph`), else
    ``(None, why)`` naming the first op that is not supported. ``x``: two example inputs ``(2, D)``."""
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: say which
        return None, f"it cannot be traced by torch.fx ({type(e).__name__}: {e})"
    try:
        shapes = _shapes(gm, x[:2])
    except Exception as e:  # noqa: BLE001
        return None, f"its traced graph does not run ({type(e).__name__}: {e})"
    mods = dict(gm.named_modules())
    ops: list[GraphOp] = []
    index: dict = {}
    batch = x[:2].shape[0]

    def arg(a):
        if not isinstance(a, torch.fx.Node) or index.get(a) is None:
            raise _Unsupported(f"{a} used as a tensor")
        return index[a]

    try:
        for node in gm.graph.nodes:
            shape = shapes.get(node.name)
            if node.op == "output":
                out = node.args[0]
                check(isinstance(out, torch.fx.Node), "")
                ops.append(GraphOp("output", node.name, None, (arg(out),), shapes.get(out.name, ())[1:]))
                continue
            if node.op == "placeholder":
                index[node] = len(ops)
                ops.append(GraphOp("input", node.name, None, (), tuple(x.shape[1:])))
                continue
            if shape is None:  # sizes, dims: read by reshapes, whose output shapes are known already
                index[node] = None
                continue
            if len(shape) == 0 or shape[0] != batch:
                raise _Unsupported(f"{describe_node(node, mods)} (it does not keep the batch dimension first)")
            op = _graph_op(node, mods, shape[1:], arg)
            index[node] = len(ops)
            ops.append(op)
    except _Unsupported as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"
    return Graph(ops), ""


class _Unsupported(Exception):
    pass


def describe_node(node, mods) -> str:
    """A traced node in words, for messages that name what cannot be handled (here and in
    :func:`lossglass.symmetry.derive_spec`)."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(mods[node.target]).__name__})"
    if node.op == "call_method":
        return f"method .{node.target}() (node {node.name!r})"
    if node.op == "get_attr":
        return f"attribute {node.target!r} used directly (not through a module)"
    t = node.target
    return f"{getattr(t, '__module__', None) or 'builtin'}.{getattr(t, '__name__', t)} (node {node.name!r})"


def _graph_op(node, mods, shape: tuple, arg) -> GraphOp:
    """The :class:`GraphOp` of one fx node, or raise :class:`_Unsupported` naming it."""
    what = describe_node(node, mods)
    if node.op == "call_module":
        m = mods[node.target]
        a = (arg(node.args[0]),)
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            return GraphOp("conv", node.target, m, a, shape)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            return GraphOp("bn", node.target, m, a, shape)
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.elementwise_affine and m.bias is not None:
            return GraphOp("ln", node.target, m, a, shape)
        if isinstance(m, nn.Linear):
            return GraphOp("linear", node.target, m, a, shape)
        if type(m) in _ACT or isinstance(m, nn.Dropout):  # dropout: off (the energy is deterministic)
            return GraphOp("act", node.target, m, a, shape, fn=_ACT.get(type(m), lambda z: z))
        if isinstance(m, _POOL_MODULES):
            return GraphOp("pool", node.target, m, a, shape, fn=m)
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            return GraphOp("flatten", node.target, m, a, shape)
        if isinstance(m, nn.Unflatten):
            return GraphOp("reshape", node.target, m, a, shape)
        raise _Unsupported(what)
    if node.op == "call_function":
        f = node.target
        if f in _ADDS and len(node.args) == 2 and not node.kwargs:
            return GraphOp("add", node.name, None, (arg(node.args[0]), arg(node.args[1])), shape)
        if f in _FN_ACT and len(node.args) == 1:
            return GraphOp("act", node.name, None, (arg(node.args[0]),), shape, fn=_FN_ACT[f])
        if f is torch.flatten and tuple(node.args[1:]) in ((1,), (1, -1)) and not node.kwargs:
            return GraphOp("flatten", node.name, None, (arg(node.args[0]),), shape)
        if f in _POOL_FNS:
            rest, kw = tuple(node.args[1:]), dict(node.kwargs)
            return GraphOp("pool", node.name, None, (arg(node.args[0]),), shape, fn=lambda z: f(z, *rest, **kw))
        raise _Unsupported(what)
    if node.op == "call_method":
        name = node.target
        a = (arg(node.args[0]),)
        if name in _METHOD_ACT and len(node.args) == 1:
            return GraphOp("act", node.name, None, a, shape, fn=_METHOD_ACT[name])
        if name in ("view", "reshape"):
            return GraphOp("reshape", node.name, None, a, shape)
        if name == "flatten" and tuple(node.args[1:]) in ((1,), (1, -1)):
            return GraphOp("flatten", node.name, None, a, shape)
        if name == "add" and len(node.args) == 2:
            return GraphOp("add", node.name, None, (a[0], arg(node.args[1])), shape)
        if name == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if isinstance(dims, (tuple, list)) and sorted(int(d) % 4 for d in dims) == [2, 3]:
                return GraphOp("mean", node.name, None, a, shape, extra={"keepdim": bool(keep)})
        raise _Unsupported(what)
    raise _Unsupported(what)


#: memory format of replica-batched images in traced graphs without and with autograd: oneDNN's grouped convolution
#: runs about twice as fast channels-last, but BatchNorm's fused training kernels (and their derivatives) favour NCHW;
#: measured on a 2-core CPU: evaluation 10% faster channels-last, training steps, gradients and Hessian-vector
#: products 20 to 40% faster NCHW
_FORMAT = {False: torch.channels_last, True: torch.contiguous_format}


def _as_img(h: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """An image value in the replica-batched layout (N, K*C, H, W)."""
    if layout == "img":
        return h
    if layout == "vec":  # (K, N, C, H, W)
        return _img(h, k)
    return h.repeat(1, k, 1, 1)  # shared (N, C, H, W)


def _as_vec(h: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """Any value as (K, N, ...)."""
    if layout == "vec":
        return h
    if layout == "img":
        n, kc = h.shape[:2]
        return h.reshape(n, k, kc // k, *h.shape[2:]).transpose(0, 1)
    return h.unsqueeze(0).expand(k, *h.shape)


def graph_forward(param_layout: ParamLayout, g: Graph, theta, x: torch.Tensor, *, stats: dict | None = None,
                  stop_at: int | None = None, group: int | None = None, record: dict | None = None):
    """The forward pass of :func:`forward` for a traced :class:`Graph` (same arguments and layouts)."""
    p, info = param_layout.view, param_layout
    k = p(theta, info.entries[0]).shape[0]
    vals: list = [None] * len(g.ops)
    last = g.ops[-1].args[0]
    for i, o in enumerate(g.ops):
        if stop_at == i:
            return vals[o.args[0]]
        if o.kind == "input":
            vals[i] = (x, "shared" if x.ndim == 2 else "vec")
            continue
        h, layout = vals[o.args[0]]
        m = o.module
        if o.kind == "output":
            return _as_vec(h, layout, k)
        if o.kind == "conv":
            w = p(theta, info[f"{o.name}.weight"])
            b = p(theta, info[f"{o.name}.bias"]).reshape(-1) if m.bias is not None else None
            fmt = _FORMAT[torch.is_grad_enabled()]
            w = w.reshape(-1, *w.shape[2:]).contiguous(memory_format=fmt)
            h = (h if layout == "shared" and m.groups == 1 else _as_img(h, layout, k)).contiguous(memory_format=fmt)
            h = F.conv2d(h, w, b, m.stride, m.padding, m.dilation, groups=1 if layout == "shared" and m.groups == 1
                         else k * m.groups).contiguous(memory_format=fmt)
            vals[i] = (h, "img")
        elif o.kind == "bn":
            w = p(theta, info[f"{o.name}.weight"])
            b = p(theta, info[f"{o.name}.bias"])
            if isinstance(m, nn.BatchNorm2d) or layout == "img":
                h, layout = _as_img(h, layout, k), "img"
            else:
                h, layout = _as_vec(h, layout, k), "vec"
                check(h.ndim == 3, f"BatchNorm1d {o.name!r} on inputs of shape {tuple(h.shape[2:])}: only (N, C) is "
                      "supported for replica-batched graphs")
            vals[i] = (_bn_apply(h, layout, k, w, b, stats[i] if stats and i in stats else None, m.eps, group, record, i),
                       layout)
        elif o.kind == "ln":
            h = _as_vec(h, layout, k)
            shape = (k,) + (1,) * (h.ndim - 2) + (-1,)
            w = p(theta, info[f"{o.name}.weight"]).reshape(shape)
            b = p(theta, info[f"{o.name}.bias"]).reshape(shape)
            vals[i] = (F.layer_norm(h, h.shape[-1:], eps=m.eps) * w + b, "vec")
        elif o.kind == "linear":
            lin = Linear.named(info, o.name)
            if layout == "img":
                h, layout = _as_vec(h, layout, k), "vec"
            if layout == "vec" and h.ndim == 3 and i == last:  # the output layer: (K, N, C) as a bmm (see Problem)
                vals[i] = (output_layer(info, theta, lin, h), "vec")
                continue
            mid = h.shape[:-1] if layout == "shared" else h.shape[1:-1]
            flat = h.reshape(-1, h.shape[-1]) if layout == "shared" else h.reshape(k, -1, h.shape[-1])
            vals[i] = (linear(info, theta, lin, flat).reshape(k, *mid, -1), "vec")
        elif o.kind == "act":
            vals[i] = (o.fn(h), layout)
        elif o.kind == "pool":
            if layout == "vec":
                h, layout = _as_img(h, layout, k), "img"
            vals[i] = (o.fn(h), layout)
        elif o.kind == "flatten":
            if layout == "img":
                n = h.shape[0]
                vals[i] = (h.reshape(n, k, -1).transpose(0, 1), "vec")
            else:
                vals[i] = (h.flatten(1 if layout == "shared" else 2), layout)
        elif o.kind == "reshape":
            if layout == "img":
                h, layout = _as_vec(h, layout, k), "vec"
            lead = h.shape[:1] if layout == "shared" else h.shape[:2]
            vals[i] = (h.reshape(*lead, *o.out_shape), layout)
        elif o.kind == "mean":
            keep = o.extra["keepdim"]
            if layout == "img" and not keep:
                n = h.shape[0]
                vals[i] = (h.mean((2, 3)).reshape(n, k, -1).transpose(0, 1), "vec")
            else:
                vals[i] = (h.mean((-2, -1), keepdim=keep), layout)
        elif o.kind == "add":
            h2, layout2 = vals[o.args[1]]
            if "img" in (layout, layout2):
                vals[i] = (_as_img(h, layout, k) + _as_img(h2, layout2, k), "img")
            elif "vec" in (layout, layout2):
                vals[i] = (_as_vec(h, layout, k) + _as_vec(h2, layout2, k), "vec")
            else:
                vals[i] = (h + h2, "shared")
    raise AssertionError("a graph ends with its output op")
