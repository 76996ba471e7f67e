"""The energy: a model, a data set and a loss seen as a function E(theta) of a flat parameter vector,
evaluated for a batch of K replicas ``(K, P)`` in one vectorised pass, chunked over the data.

For an MLP (``nn.Sequential`` of ``Linear`` and element-wise activations) the pass is hand-batched
matrix products: the first layer of all K replicas is one GEMM ``X (N, D) @ [W_1 ... W_K]^T``, the later
layers one ``bmm``. Any other module goes through ``torch.func.functional_call`` + ``vmap``.

A problem may live on a constraint manifold (``problem.manifold``, e.g. :class:`Sphere` for the spherical p-spin):
then :meth:`Problem.project` maps onto it and :meth:`Problem.hessian_operator` is the Riemannian Hessian.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._util import as_batch, check_finite, resolve_device, seed_for
from .datasets import Dataset
from .errors import LossglassError, check, choice

LOSSES = ("cross_entropy", "mse")
BATCHNORM_MODES = ("auto", "recompute", "batch", "fixed", "module")
_ACTS: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid, nn.GELU: F.gelu,
    nn.Identity: lambda z: z, nn.Flatten: lambda z: z,
}


@dataclass(frozen=True)
class ParamInfo:
    """Where one parameter tensor lives inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class _Linear:
    w: ParamInfo
    b: ParamInfo | None


def _mlp_plan(model: nn.Module) -> list | None:
    """The layer plan of a plain MLP, or None when the model is anything else (generic vmap path)."""
    if not isinstance(model, nn.Sequential):
        return None
    plan, names = [], dict(model.named_parameters())
    for idx, m in model.named_children():
        if isinstance(m, nn.Linear):
            w = names[f"{idx}.weight"]
            plan.append(("linear", f"{idx}.weight", f"{idx}.bias" if m.bias is not None else None, w.shape))
        elif type(m) in _ACTS:
            plan.append(("act", _ACTS[type(m)]))
        else:
            return None
    return plan if plan and plan[0][0] == "linear" else None


def _probe(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's output on ``x`` in eval mode, leaving its state as it was: the training flag and every buffer
    (a training-mode call would move BatchNorm running statistics and count a batch)."""
    saved = {k: v.clone() for k, v in model.named_buffers()}
    was = model.training
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        model.train(was)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])


def _join(parts, k: int) -> torch.Tensor:
    """Per-parameter tensors ``(K, *shape)`` -> one flat ``(K, P)`` tensor."""
    return torch.cat([t.reshape(k, -1) for t in parts], 1)


def _masked_total(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of the per-replica losses where ``mask`` holds and the loss is finite; ``torch.where`` passes no
    gradient (not even NaN) to the masked side, so frozen or diverged replicas get none."""
    keep = torch.isfinite(loss) if mask is None else (mask & torch.isfinite(loss))
    return torch.where(keep, loss, torch.zeros_like(loss)).sum()


class Sphere:
    """The constraint |theta|^2 = radius^2 (each replica on its own sphere), e.g. sum_i s_i^2 = N for the
    spherical p-spin (radius sqrt(N)).

    Tangent space at theta: {v : theta . v = 0}, projector P_T = I - theta theta^T / |theta|^2. The Hessian that
    matters on the sphere is the Riemannian one (Absil, Mahony & Sepulchre 2008, eq. 5.15 and sec. 5.5;
    PHYSICS.md):

        Hess E(theta) = P_T (grad^2 E(theta) - (theta . grad E(theta) / |theta|^2) I) P_T,

    the second term being the Weingarten map of the sphere. Geodesics are great circles (:meth:`geodesic`).
    """

    codim = 1  # the tangent space has P - 1 dimensions

    def __init__(self, radius: float):
        check(isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0,
              f"the sphere's radius must be a positive number, got {radius!r}")
        self.radius = float(radius)

    def __repr__(self) -> str:
        return f"Sphere(radius={self.radius:g})"

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """theta * radius / |theta| (row-wise): the nearest point of the sphere."""
        return theta * (self.radius / theta.norm(dim=-1, keepdim=True).clamp_min(1e-30))

    def tangent(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """P_T v = v - (theta . v / |theta|^2) theta; theta ``(..., P)`` broadcasts against v ``(..., P)``."""
        return v - ((v * theta).sum(-1, keepdim=True) / (theta * theta).sum(-1, keepdim=True)) * theta

    def contains(self, theta: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
        """Per row: ||theta|^2 / radius^2 - 1| <= rtol."""
        return ((theta * theta).sum(-1) / self.radius**2 - 1).abs() <= rtol

    def weingarten(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The coefficient theta . grad E / |theta|^2 of the curvature term, per replica ``(K,)``."""
        return (theta * grad).sum(-1) / (theta * theta).sum(-1)

    def hessian_operator(self, theta: torch.Tensor, grad: torch.Tensor,
                         hvp: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> P_T (H (P_T v) - c P_T v), c = theta . grad / |theta|^2, from the Euclidean product ``hvp``
        (all ``(K, P)``): the Riemannian Hessian of the class docstring. The normal direction maps to 0."""
        c = self.weingarten(theta, grad).unsqueeze(-1)

        def mv(v: torch.Tensor) -> torch.Tensor:
            vt = self.tangent(theta, v.to(theta.dtype))
            return self.tangent(theta, hvp(vt) - c * vt).to(v.dtype)

        return mv

    def geodesic(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(M, G, 2)`` of the great circle from a to b (``(M, P)`` each, on the sphere) at ``t``
        ``(G,)`` in [0, 1] (slerp, Shoemake 1985): phi(t) = sin((1-t) w)/sin w a + sin(t w)/sin w b with
        cos w = a . b / (|a| |b|), constant speed, phi(0) = a, phi(1) = b. Antipodal points (no unique geodesic)
        are refused; coincident ones (w -> 0) take the limit ((1-t), t)."""
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).clamp(-1, 1).double()
        w = torch.arccos(cos)
        check(bool((w < math.pi - 1e-6).all()), "the two end points are antipodal on the sphere: the geodesic "
              "between them is not unique")
        t = t.double().to(w.device)
        wt = w.unsqueeze(1) * t  # (M, G)
        sw = torch.sin(w).unsqueeze(1)
        small = sw < 1e-12
        ca = torch.where(small, 1 - t, torch.sin(w.unsqueeze(1) - wt) / sw.clamp_min(1e-300))
        cb = torch.where(small, t.expand_as(wt), torch.sin(wt) / sw.clamp_min(1e-300))
        return torch.stack([ca, cb], -1)


class Problem:
    """E(theta) = (1/N) sum_n loss(f_theta(x_n), y_n) over the training set, for K replicas at once.

    ``theta`` is ``(P,)`` for one network or ``(K, P)`` for K replicas; every method accepts both and
    returns per-replica results. Data are processed in chunks so that peak memory stays near
    ``memory_mb`` whatever K and N.

    BatchNorm (``batchnorm``): ``"recompute"`` (default) normalises with the statistics of the whole training set
    at the evaluated point (layer by layer, see :meth:`bn_statistics`); ``"fixed"`` with statistics frozen at one
    point (:meth:`freeze_batchnorm`); ``"batch"`` cuts the data into consecutive BatchNorm batches of ``bn_batch``
    samples (the last one shorter), each normalised by its own statistics, whatever the number of replicas
    evaluated together (a chunk then holds at least one BatchNorm batch, which can exceed ``memory_mb``). In every
    mode :meth:`grad`, :meth:`energy_and_grad`, :meth:`hvp` and :meth:`hvp_operator` are the exact derivatives of
    :meth:`energy`; for ``"recompute"`` they include the dependence of the statistics on theta.
    Sequential stacks and free-form modules traced by torch.fx (residual networks, :class:`~lossglass.layers.Graph`)
    support these modes. ``"module"``: the stored running statistics, eval mode (the generic vmap path); they are
    canonical (0, 1) in the problem and a module's own are folded into its affine parameters
    (:meth:`fold_statistics`), so each replica carries them. ``"auto"`` (default): ``"recompute"``, except for a
    free-form module with BatchNorm that does not declare ``lossglass_batchnorm = "recompute"`` (lossglass's
    :class:`~lossglass.models.ResNet` does): it keeps its stored statistics (``"module"``); ask for ``"recompute"``
    explicitly to recompute them. The constructor's shape check runs the module in eval mode and leaves its buffers
    as they were.

    Inputs are the data set's float tensors; a model that embeds tokens casts them to integers itself (see
    :class:`~lossglass.models.Transformer`).

    ``manifold`` is None: the parameters are unconstrained (a constrained subclass sets it, see :class:`Sphere`).
    """

    manifold: Sphere | None = None

    def __init__(self, model: nn.Module, dataset: Dataset, loss: str = "cross_entropy", device: str = "auto",
                 *, dtype: torch.dtype = torch.float32, memory_mb: float = 256.0, batchnorm: str = "auto",
                 bn_batch: int = 128):
        check(isinstance(model, nn.Module), f"model must be a torch.nn.Module, got {type(model).__name__}")
        check(isinstance(dataset, Dataset), f"dataset must be a lossglass Dataset, got {type(dataset).__name__}")
        self.loss_name = choice("loss", loss, LOSSES)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(self.device, dtype)
        self.dataset = dataset
        self.memory_mb = float(memory_mb)
        self.params: list[ParamInfo] = []
        off = 0
        for name, p in self.model.named_parameters():
            self.params.append(ParamInfo(name, tuple(p.shape), off))
            off += p.numel()
        check(off > 0, "model has no parameters")
        self.n_params = off
        self._info = {p.name: p for p in self.params}
        self._index = {p.name: i for i, p in enumerate(self.params)}
        self.buffers = {k: v for k, v in self.model.named_buffers()}
        self.data = {
            "train": (dataset.x_train.to(self.device, dtype), dataset.y_train.to(self.device)),
            "test": (dataset.x_test.to(self.device, dtype), dataset.y_test.to(self.device)),
        }
        if getattr(dataset, "y_val", None) is not None and len(dataset.y_val):
            self.data["val"] = (dataset.x_val.to(self.device, dtype), dataset.y_val.to(self.device))
        out = _probe(self.model, self.data["train"][0][:2])
        check(out.ndim == 2 and out.shape[1] == dataset.n_classes,
              f"model outputs shape {tuple(out.shape)} for 2 inputs of size {dataset.in_dim}; expected "
              f"(2, {dataset.n_classes}) for {dataset.n_classes} classes")
        raw = _mlp_plan(self.model)
        self._plan = None if raw is None else [
            ("linear", _Linear(self._info[r[1]], self._info[r[2]] if r[2] else None)) if r[0] == "linear" else r
            for r in raw]
        from . import layers

        mode = choice("batchnorm mode", batchnorm, BATCHNORM_MODES)
        check(isinstance(bn_batch, int) and bn_batch >= 2, f"bn_batch must be an int >= 2, got {bn_batch!r}")
        self.bn_batch = bn_batch
        self._frozen_stats: dict | None = None
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self._seq = None
        if self._plan is None and mode != "module":
            self._seq = layers.build(self.model, dataset.in_dim)
            if self._seq is None and has_bn and (mode != "auto" or getattr(model, "lossglass_batchnorm", None)):
                # a free-form module with BatchNorm: its traced graph, batched by grouped convolutions, so that the
                # statistics can be recomputed at every point like those of a Sequential
                self._seq, why = layers.build_graph(self.model, self.data["train"][0][:2])
                check(self._seq is not None, f"batchnorm={batchnorm!r} needs the BatchNorm statistics of every "
                      f"evaluated point, which lossglass computes on the traced graph of {type(model).__name__}, but "
                      f"{why} is not supported there; use batchnorm='module' (the module's own stored statistics, "
                      "config model.bn_stats = 'module')")
        if mode == "auto":
            mode = getattr(model, "lossglass_batchnorm", None) or "recompute"
        self.batchnorm = mode
        self._bn = [i for i, o in enumerate(self._seq or []) if o.kind == "bn"]
        if self._plan is None and self._seq is None and has_bn:
            # a free-form module (or batchnorm='module'): vmap cannot update running statistics, so BatchNorm uses
            # stored statistics everywhere (eval mode), recorded in self.batchnorm. They are made canonical (mean 0,
            # variance 1) and a module's own statistics are folded into its affine parameters (flatten,
            # import_checkpoints), so each replica carries its statistics and a channel permutation is a symmetry.
            self.batchnorm = "module"
            self._canonical_statistics()
        if self._plan is None and self._seq is None:
            self.model.eval()  # the generic path evaluates the deterministic function: dropout off
        self.buffers = {k: v for k, v in self.model.named_buffers()}
        widths = [p.shape[0] for p in self.params if len(p.shape) == 2]
        widths += [math.prod(o.out_shape) for o in (self._seq or [])]
        self._width = max(widths + [dataset.n_classes])

    def _canonical_statistics(self) -> None:
        """Set every BatchNorm's running statistics to mean 0, variance 1 (module mode; see :meth:`fold_statistics`).
        A layer without affine parameters keeps its statistics (nothing could carry them)."""
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.running_mean is not None:
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)

    def fold_statistics(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                        source: str = "state") -> dict[str, torch.Tensor]:
        """Parameters with a module's stored BatchNorm statistics folded into the affine parameters (module mode).

        In eval mode BatchNorm is the per-channel affine map y = (h - m) w / sqrt(v + eps) + b. With the problem's
        canonical statistics (m, v) = (0, 1) the same map is y = h w' / sqrt(1 + eps) + b' with

            w' = w sqrt(1 + eps) / sqrt(v + eps),   b' = b - m w / sqrt(v + eps),

        so every replica carries its own statistics in theta, and permutations, paths and walks move them with their
        channels. Parameters of other layers, and layers whose ``buffers`` are missing, are returned unchanged; a
        BatchNorm without affine parameters whose statistics differ from the problem's is refused (``source`` names
        the file or module in the message). Returns a new dict; the identity outside module mode."""
        if self.batchnorm != "module":
            return dict(params)
        out = dict(params)
        for name, m in self.model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or m.running_mean is None:
                continue
            pre = f"{name}." if name else ""
            mean, var = buffers.get(pre + "running_mean"), buffers.get(pre + "running_var")
            if mean is None or var is None:
                continue
            mean, var = mean.to(self.device, torch.float64), var.to(self.device, torch.float64)
            if not m.affine:
                check(torch.allclose(mean, m.running_mean.double()) and torch.allclose(var, m.running_var.double()),
                      f"{source}: BatchNorm {name!r} has no affine parameters to carry its running statistics, and "
                      "they differ from the model's; lossglass cannot give each replica its own")
                continue
            check(bool((var >= 0).all()) and bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all()),
                  f"{source}: BatchNorm {name!r} has invalid running statistics (NaN, inf or negative variance)")
            if pre + "weight" not in out or pre + "bias" not in out or out[pre + "weight"].shape != mean.shape:
                continue  # flatten names what is missing or misshapen
            ref_mean, ref_var = m.running_mean.double(), m.running_var.double()
            w, b = out[pre + "weight"].detach(), out[pre + "bias"].detach()
            dt = w.dtype
            scale = torch.sqrt(ref_var + m.eps) / torch.sqrt(var + m.eps)
            w64 = w.to(self.device, torch.float64)
            out[pre + "weight"] = (w64 * scale).to(dt)
            out[pre + "bias"] = (b.to(self.device, torch.float64) - (mean - ref_mean) * w64 / torch.sqrt(var + m.eps)).to(dt)
        return out

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def from_function(fn: Callable[[torch.Tensor], torch.Tensor], n_params: int, **kwargs) -> FunctionProblem:
        """A Problem whose energy is any function ``fn: (K, P) -> (K,)`` (reference landscapes, tests)."""
        return FunctionProblem(fn, n_params, **kwargs)

    @property
    def is_mlp(self) -> bool:
        return self._plan is not None

    def __repr__(self) -> str:
        return (f"Problem({type(self.model).__name__}, {self.dataset.name}, P={self.n_params}, "
                f"loss={self.loss_name}, device={self.device})")

    # ------------------------------------------------------------------ parameters <-> flat vectors
    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta`` as the model's named parameters, ``(K, *shape)`` or ``(*shape)``."""
        lead = theta.shape[:-1]
        return {p.name: theta[..., p.slice].reshape(*lead, *p.shape) for p in self.params}

    def flatten(self, params: dict[str, torch.Tensor] | nn.Module) -> torch.Tensor:
        """A flat ``(P,)`` vector from a module or a ``{name: tensor}`` mapping (the inverse of unflatten). In BatchNorm
        module mode, running statistics found in the module (or the mapping) are folded in (:meth:`fold_statistics`)."""
        if isinstance(params, nn.Module):
            params = self.fold_statistics(dict(params.named_parameters()), dict(params.named_buffers()),
                                          type(params).__name__)
        elif self.batchnorm == "module":
            params = self.fold_statistics(params, params, "the state dict")
        missing = [p.name for p in self.params if p.name not in params]
        check(not missing, f"parameters missing: {missing}")
        parts = []
        for p in self.params:
            t = params[p.name]
            check(tuple(t.shape) == p.shape, f"parameter {p.name!r} has shape {tuple(t.shape)}, expected {p.shape}")
            parts.append(t.detach().reshape(-1).to(self.device, self.dtype))
        return torch.cat(parts)

    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """``(K, P)`` initial parameters: replica k gets the model's own initialisation (``reset_parameters``)
        under the seed mixed from ``(seed, ids[k])`` (ids default 0..K-1), so a replica is the same whatever
        K is or whichever group it is trained in."""
        check(isinstance(n_replicas, int) and n_replicas > 0, f"n_replicas must be a positive int, got {n_replicas}")
        ids = list(range(n_replicas)) if ids is None else list(ids)
        m = copy.deepcopy(self.model).cpu()
        out = torch.empty(n_replicas, self.n_params, dtype=self.dtype)
        for k, rid in enumerate(ids):  # RNG only: one seeded re-initialisation per replica
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_for(seed, 7, rid))
                for mod in m.modules():
                    if hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            out[k] = torch.cat([p.detach().reshape(-1) for p in m.parameters()]).to(self.dtype)
        return out.to(self.device)

    def to_module(self, theta: torch.Tensor) -> nn.Module:
        """A standalone copy of the model holding the parameters ``theta`` (P,); BatchNorm running statistics are
        set to the training-set statistics at theta (module mode: the problem's canonical ones, theta carrying the
        folded statistics), so ``model.eval()`` reproduces :meth:`evaluate`."""
        m = copy.deepcopy(self.model)
        theta = theta.to(self.device, self.dtype).reshape(-1)
        with torch.no_grad():
            for name, t in self.unflatten(theta).items():
                m.get_parameter(name).copy_(t)
            if self._bn:
                for i, (mean, var) in self.bn_statistics(theta.unsqueeze(0)).items():
                    mod = m.get_submodule(self._seq[i].name)
                    mod.running_mean.copy_(mean.reshape(mod.running_mean.shape))
                    mod.running_var.copy_(var.reshape(mod.running_var.shape))
        return m

    def _one_pass_statistics(self, theta: torch.Tensor) -> dict | None:
        """:meth:`bn_statistics` in one forward pass over the whole training set, in groups of as many replicas as
        :meth:`chunk_size` lets see all of it at once: each BatchNorm layer records the statistics of its input,
        computed as the layer-by-layer procedure does, so the result is the same (replicas are independent), for one
        pass instead of one per BatchNorm layer. None when not even one replica's pass fits in ``memory_mb``.

        The last result is kept with a copy of theta and the pass's outputs: the same theta again (the test split
        after the training split, a path point evaluated on both) reuses the statistics, and the training-set
        forward passes that follow with them (:meth:`evaluate`) return the outputs already computed
        (:func:`lossglass.layers.forward`), which are what they would compute."""
        if not isinstance(theta, torch.Tensor):
            return None
        x = self.data["train"][0]
        k = theta.shape[0]
        per = int(self.memory_mb * 2**20 // max((self._width + self.dataset.n_classes) * 16 * len(x), 1))
        step = min(k, per) if self.chunk_size(k) < len(x) else k
        if step < 1:
            return None
        cache = self.__dict__.get("_stat_cache")
        if cache is not None and cache[0].shape == theta.shape and torch.equal(cache[0], theta):
            return cache[1]
        from . import layers

        self._stat_cache = None
        parts, outs = [], []
        with torch.no_grad():
            for g in range(0, k, step):
                record: dict = {}
                outs.append(layers.forward(self, self._seq, theta[g:g + step], x, record=record))
                parts.append(record)
        stats = {i: tuple(torch.cat([r[i][j] for r in parts]) for j in (0, 1)) for i in self._bn}
        self._stat_cache = (theta.detach().clone(), stats, x, torch.cat(outs) if len(outs) > 1 else outs[0])
        return stats

    # ------------------------------------------------------------------ the batched forward pass
    def forward(self, theta: torch.Tensor, x: torch.Tensor, stats: dict | None = None, *,
                bn_batch: int | None = None) -> torch.Tensor:
        """Outputs of K networks: ``x`` is ``(N, D)`` shared by all replicas or ``(K, N, D)`` one batch each;
        returns ``(K, N, C)``. BatchNorm layers use ``stats`` (see :meth:`bn_statistics`) when given, else the
        statistics of ``x`` (training mode), or with ``bn_batch=B`` those of each block of B samples."""
        if self._plan is not None:
            return self._forward_mlp(theta, x)
        if self._seq is not None:
            from . import layers

            return layers.forward(self, self._seq, theta, x, stats=stats, group=bn_batch)
        return self._forward_vmap(theta, x)

    def _chunk_forward(self, theta, x: torch.Tensor, stats: dict | None) -> torch.Tensor:
        """The forward pass of one data chunk as :meth:`evaluate` defines it (BatchNorm batches in batch mode)."""
        group = self.bn_batch if self._bn and self.batchnorm == "batch" else None
        return self.forward(theta, x, stats, bn_batch=group)

    def freeze_batchnorm(self, theta: torch.Tensor) -> None:
        """For ``batchnorm="fixed"``: keep the BatchNorm statistics of the point ``theta`` (``(P,)``) for every
        later evaluation, as a module in ``eval()`` mode does while its weights are perturbed (what most landscape
        tools do; along a path between two networks it is the known failure that recomputing repairs)."""
        self._frozen_stats = self.bn_statistics(torch.as_tensor(theta).to(self.device, self.dtype).reshape(1, -1))

    def _eval_stats(self, theta: torch.Tensor) -> dict | None:
        if not self._bn or self.batchnorm == "batch":
            return None
        if self.batchnorm == "fixed":
            check(self._frozen_stats is not None, "batchnorm='fixed' needs problem.freeze_batchnorm(theta) first")
            k = theta.shape[0]
            return {i: tuple(t.repeat(k) for t in st) for i, st in self._frozen_stats.items()}
        return self.bn_statistics(theta)

    def bn_statistics(self, theta: torch.Tensor) -> dict:
        """Per-replica BatchNorm statistics over the whole training set at ``theta``, layer by layer (each layer's
        statistics are computed with the earlier layers already normalised by theirs): ``{op: (mean, var)}``
        with the biased variance (the training set as the population)."""
        from . import layers

        k = theta.shape[0]
        one = self._one_pass_statistics(theta)
        if one is not None:
            return one
        stats: dict = {}
        with torch.no_grad():
            for i in self._bn:
                s1 = s2 = 0
                cnt = 0
                for xb, _ in self._chunks("train", k):
                    h, layout = layers.forward(self, self._seq, theta, xb, stats=stats, stop_at=i)
                    a, b, n = layers.channel_stats(h, layout, k)
                    s1, s2, cnt = s1 + a, s2 + b, cnt + n
                mean = s1 / cnt
                stats[i] = (mean.to(self.dtype), (s2 / cnt - mean**2).clamp_min(0).to(self.dtype))
        return stats

    def split(self, theta: torch.Tensor, *, leaf: bool = False) -> list[torch.Tensor]:
        """``(K, P)`` -> one ``(K, *shape)`` view per parameter tensor; with ``leaf=True`` each is a fresh
        autograd leaf, so a backward pass writes one gradient per tensor instead of zero-filling (K, P) per
        parameter (what slicing one big leaf costs)."""
        k = theta.shape[0]
        parts = [theta[:, p.slice].view(k, *p.shape) for p in self.params]
        return [t.detach().requires_grad_(True) for t in parts] if leaf else parts

    def _param(self, theta, info: ParamInfo) -> torch.Tensor:
        if isinstance(theta, (list, tuple)):
            return theta[self._index[info.name]]
        return theta[:, info.slice].view(theta.shape[0], *info.shape)

    def _linear(self, theta, layer: _Linear, h: torch.Tensor) -> torch.Tensor:
        w = self._param(theta, layer.w)
        k, out_dim, in_dim = w.shape
        b = self._param(theta, layer.b) if layer.b is not None else None
        if h.ndim == 2:  # shared input: one GEMM for all replicas, bias fused into it
            n = h.shape[0]
            wt = w.reshape(k * out_dim, in_dim).T
            z = h @ wt if b is None else torch.addmm(b.reshape(1, k * out_dim), h, wt)
            return z.view(n, k, out_dim).transpose(0, 1)
        if b is None:
            return torch.bmm(h, w.transpose(1, 2))
        return torch.baddbmm(b.view(k, 1, out_dim), h, w.transpose(1, 2))

    def _forward_mlp(self, theta: torch.Tensor, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        h = x
        plan = self._plan
        for i in range(start, len(plan)):
            kind, op = plan[i]
            if kind == "linear" and i == len(plan) - 1 and h.ndim == 3:
                return self._output_layer(theta, op, h)
            h = self._linear(theta, op, h) if kind == "linear" else op(h)
        return h

    def _output_layer(self, theta, layer: _Linear, h: torch.Tensor) -> torch.Tensor:
        """The last (narrow) layer computed as W (K, C, h) @ h^T (K, h, N): a bmm with a wide output runs
        several times faster than (K, N, h) @ (K, h, C) for C = 10. Returns a (K, N, C) view."""
        w = self._param(theta, layer.w)
        if layer.b is None:
            return torch.bmm(w, h.transpose(1, 2)).transpose(1, 2)
        b = self._param(theta, layer.b).unsqueeze(-1)
        return torch.baddbmm(b, w, h.transpose(1, 2)).transpose(1, 2)

    def _forward_vmap(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        params = dict(zip(self._index, theta)) if isinstance(theta, (list, tuple)) else self.unflatten(theta)

        def f(p, xx):
            return functional_call(self.model, {**p, **self.buffers}, (xx,))

        return vmap(f, in_dims=(0, 0 if x.ndim == 3 else None))(params, x)

    _ACT_BACKWARD = {torch.relu: lambda g, a: torch.ops.aten.threshold_backward(g, a, 0.0),
                     torch.tanh: torch.ops.aten.tanh_backward, torch.sigmoid: torch.ops.aten.sigmoid_backward}

    def _hand_written_ok(self) -> bool:
        """The hand-written MLP paths (fused kernel, manual gradient, R-operator) reproduce Problem's own forward
        pass and loss; a subclass that overrides either keeps the generic (autograd) paths."""
        cls = type(self)
        return all(getattr(cls, n) is getattr(Problem, n) for n in ("_loss", "forward", "_forward_mlp", "_linear",
                                                                     "_output_layer", "batch_loss"))

    def _bmm_into(self, g: torch.Tensor, block, a: torch.Tensor, b: torch.Tensor) -> None:
        """g[:, block] <- a @ b (batched over replicas). The product goes to a contiguous scratch buffer (kept between
        calls) and is then copied into its slice of g: a batched GEMM whose output rows are P apart runs about twice as
        slow on oneDNN/MKL as one into contiguous memory plus the copy (8.1 vs 3.7 ms for 32 x (64 x 128 @ 128 x 784))."""
        k = g.shape[0]
        shape = (k, *block.shape)
        scratch = self.__dict__.setdefault("_scratch", {})
        key = (shape, g.dtype, g.device)
        buf = scratch.get(key)
        if buf is None:
            buf = scratch[key] = torch.empty(shape, dtype=g.dtype, device=g.device)
        torch.bmm(a, b, out=buf)
        g[:, block.slice].view(shape).copy_(buf)

    def _mlp_batch_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                        mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:meth:`batch_loss_and_grad` for an MLP on per-replica batches ``x`` ``(K, B, D)``, by hand: the forward pass
        of :meth:`_forward_mlp`, then its reverse pass written out (the same products autograd would run), each
        gradient GEMM writing straight into its slice of one ``(K, P)`` tensor. No autograd graph, no per-parameter
        leaves to join: this is the training step's whole cost besides the optimiser. None for activations without
        a known derivative (autograd then)."""
        plan = self._plan
        acts = [op for kind, op in plan if kind == "act"]
        if [kind for kind, _ in plan] != ["linear", "act"] * len(acts) + ["linear"] or any(
                a not in self._ACT_BACKWARD for a in acts) or not self._hand_written_ok():
            return None
        k, b = x.shape[0], x.shape[1]
        theta = theta.detach()
        with torch.no_grad():
            hs, pre = [x], []  # inputs of each linear layer; activation outputs
            h = x
            for i in range(len(plan) - 1):
                kind, op = plan[i]
                if kind == "linear":
                    h = self._linear(theta, op, h)
                else:
                    h = op(h)
                    pre.append((op, h))
                if i + 1 < len(plan) and plan[i + 1][0] == "linear":
                    hs.append(h)
            last: _Linear = plan[-1][1]
            w_last = self._param(theta, last.w)  # (K, C, H)
            c = w_last.shape[1]
            if last.b is None:
                o = torch.bmm(w_last, h.transpose(1, 2))
            else:
                o = torch.baddbmm(self._param(theta, last.b).unsqueeze(-1), w_last, h.transpose(1, 2))  # (K, C, B)
            yk = y.expand(k, b).unsqueeze(1)  # (K, 1, B)
            if self.loss_name == "cross_entropy":
                lse = torch.logsumexp(o, 1, keepdim=True)
                per = (lse - o.gather(1, yk)).squeeze(1)  # (K, B)
            else:
                diff = o - F.one_hot(y.expand(k, b), c).to(o.dtype).transpose(1, 2)
                per = 0.5 * diff.pow(2).sum(1)
            loss = per.mean(1)
            keep = torch.isfinite(loss) if mask is None else (mask & torch.isfinite(loss))
            s = torch.where(keep, torch.full_like(loss, 1.0 / b), torch.zeros_like(loss)).view(k, 1, 1)
            if self.loss_name == "cross_entropy":
                do = torch.exp(o - lse).mul_(s)
                do.scatter_add_(1, yk, (-s).expand(k, 1, b))
            else:
                do = diff.mul_(s)
            do = torch.where(keep.view(k, 1, 1), do, 0.0)  # nothing from a masked or non-finite replica
            g = torch.empty_like(theta)
            self._bmm_into(g, last.w, do, h)
            if last.b is not None:
                torch.sum(do, 2, out=g[:, last.b.slice])
            dh = torch.bmm(do.transpose(1, 2), w_last)  # (K, B, H)
            layers = [op for kind, op in plan[:-1] if kind == "linear"]
            for li in range(len(layers) - 1, -1, -1):
                layer = layers[li]
                op, a = pre[li]
                dz = self._ACT_BACKWARD[op](dh, a)
                self._bmm_into(g, layer.w, dz.transpose(1, 2), hs[li])
                if layer.b is not None:
                    torch.sum(dz, 1, out=g[:, layer.b.slice])
                if li > 0:
                    dh = torch.bmm(dz, self._param(theta, layer.w))
        return loss, g

    def _fused_mlp1(self) -> tuple[_Linear, str, _Linear] | None:
        """(first layer, activation, last layer) when the fused CPU kernel of :mod:`lossglass._native` applies: a
        float32 single-hidden-layer MLP (Linear, ReLU, Linear) on the CPU with a compiled kernel for its classes."""
        plan = self._plan
        if (plan is None or len(plan) != 3 or plan[0][0] != "linear" or plan[2][0] != "linear"
                or plan[1][0] != "act" or plan[1][1] is not torch.relu or self.dtype != torch.float32
                or self.device.type != "cpu" or not self._hand_written_ok()):
            return None
        from . import _native

        if _native.kernel(plan[2][1].w.shape[0]) is None:
            return None
        return plan[0][1], "relu", plan[2][1]

    def _fused_sums(self, fused, wb: torch.Tensor, bb: torch.Tensor | None, coef: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor, per_basis: int, x: torch.Tensor, y: torch.Tensor):
        """Sums over the samples of ``x`` of the loss and of the correct flags per point (float64), by the fused
        kernel: the first layer of B bases of J maps ``wb`` ``(B*J*H, D)`` (+ ``bb`` ``(B*J*H, 1)``) is one GEMM per
        data chunk, the rest one pass per point (:func:`lossglass._native.mlp1_tail`). None if the kernel declines."""
        from . import _native

        first, act, _ = fused
        h = first.w.shape[0]
        rows = wb.shape[0]
        j = coef.shape[1]
        # a chunk's first-layer maps stay within a few MB (L3) where possible, whole super-blocks of samples
        step = max(_native.SUPER, int(min(self.memory_mb, 8.0) * 2**20 // max(rows * 4, 1)) // _native.SUPER * _native.SUPER)
        loss = torch.zeros(coef.shape[0], dtype=torch.float64)
        corr = torch.zeros_like(loss)
        for i in range(0, len(y), step):
            xb, yb = x[i:i + step], y[i:i + step]
            zt = torch.addmm(bb, wb, xb.T) if bb is not None else wb @ xb.T  # (B*J*H, n)
            out = _native.mlp1_tail(zt.view(rows // (j * h), j, h, len(yb)), coef, w2, b2, yb, per_basis, act,
                                    self.loss_name)
            if out is None:
                return None
            loss += out[0]
            corr += out[1]
        return loss, corr

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``(K, N)`` for outputs ``(K, N, C)`` and labels ``(N,)`` or ``(K, N)``."""
        k, n, c = out.shape
        y = y.expand(k, n)
        if self.loss_name == "cross_entropy":  # log-sum-exp minus the true logit; any memory layout of out
            return torch.logsumexp(out, -1) - out.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        # mse: (1/2) |f(x) - onehot(y)|^2 per sample
        return 0.5 * (out - F.one_hot(y, c).to(out.dtype)).pow(2).sum(-1)

    def batch_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of each replica on a batch: ``(K,)``; differentiable (used by training)."""
        return self._loss(self.forward(theta, x), y).mean(1)

    def chunk_size(self, k: int) -> int:
        """Samples per chunk so that K replicas' activations stay within ``memory_mb``."""
        per_sample = k * (self._width + self.dataset.n_classes) * 4 * 4  # activations, grads, temporaries
        return max(16, int(self.memory_mb * 2**20 // max(per_sample, 1)))

    def _chunks(self, split: str, k: int):
        """Consecutive data chunks for K replicas; in BatchNorm batch mode each chunk is a whole number of
        BatchNorm batches of ``bn_batch`` samples, or the shorter last batch alone."""
        x, y = self.data[choice("split", split, tuple(self.data))]
        if self._bn and self.batchnorm == "batch":
            bb = self.bn_batch
            step = bb * max(1, self.chunk_size(k) // bb)
            full = len(x) - len(x) % bb
            for i in range(0, full, step):
                j = min(i + step, full)
                yield x[i:j], y[i:j]
            if full < len(x):
                yield x[full:], y[full:]
            return
        step = self.chunk_size(k)
        for i in range(0, len(x), step):
            yield x[i:i + step], y[i:i + step]

    # ------------------------------------------------------------------ energies and their derivatives
    def evaluate(self, theta: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        """Mean loss and accuracy on a split: ``{"loss": (K,), "accuracy": (K,)}`` (scalars for one theta)."""
        theta, single = self._prepare(theta)
        k = theta.shape[0]
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, device=self.device, dtype=torch.float64)
        n = 0
        fused = self._fused_mlp1()
        if fused is not None:  # single-hidden-layer float32 MLP on the CPU: first layer one GEMM, the rest fused
            first, _, last = fused
            x_all, y_all = self.data[choice("split", split, tuple(self.data))]
            h, c = first.w.shape[0], last.w.shape[0]
            from ._native import SUPER

            group = max(1, int(self.memory_mb * 2**20 // (h * SUPER * 4)))  # replicas whose maps of a chunk fit
            parts = []
            with torch.no_grad():
                for a in range(0, k, group):
                    th = theta[a:a + group]
                    kk = th.shape[0]
                    wb = th[:, first.w.slice].reshape(kk * h, -1)
                    bb = th[:, first.b.slice].reshape(kk * h, 1) if first.b is not None else None
                    b2 = (th[:, last.b.slice] if last.b is not None
                          else torch.zeros(kk, c, device=self.device, dtype=self.dtype))
                    parts.append(self._fused_sums(fused, wb, bb, torch.ones(kk, 1, dtype=self.dtype),
                                                  th[:, last.w.slice].view(kk, c, h), b2, 1, x_all, y_all))
                    if parts[-1] is None:
                        break
            out = None if parts[-1] is None else (torch.cat([p_[0] for p_ in parts]), torch.cat([p_[1] for p_ in parts]))
            if out is not None:
                nn_ = max(len(y_all), 1)
                res = {"loss": (out[0] / nn_).to(self.dtype), "accuracy": (out[1] / nn_).to(self.dtype)}
                return {k_: v[0] for k_, v in res.items()} if single else res
        stats = self._eval_stats(theta)
        with torch.no_grad():
            for xb, yb in self._chunks(split, k):
                out = self._chunk_forward(theta, xb, stats)
                loss_sum += self._loss(out, yb).sum(1, dtype=torch.float64)
                correct += (out.contiguous().argmax(-1) == yb).sum(1, dtype=torch.float64)
                n += len(yb)
        res = {"loss": (loss_sum / max(n, 1)).to(self.dtype), "accuracy": (correct / max(n, 1)).to(self.dtype)}
        return {k_: v[0] for k_, v in res.items()} if single else res

    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        """E(theta) = mean training loss; ``(P,) -> ()`` or ``(K, P) -> (K,)``."""
        return self.evaluate(theta, "train")["loss"]

    def energy_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, grad E)`` over the whole training set, accumulated chunk by chunk: the exact derivative of
        :meth:`energy` (for BatchNorm in recompute mode over several chunks, see :meth:`_exact_bn_grad`)."""
        theta, single = self._prepare(theta)
        k = theta.shape[0]
        if self._needs_stat_derivative(k):
            e, g = self._exact_bn_grad(theta.detach(), list(self._chunks("train", k)))
            return (e[0], g[0]) if single else (e, g)
        parts = self.split(theta, leaf=True)
        n_total = len(self.data["train"][1])
        stats = self._chunk_stats(theta)
        e = torch.zeros(k, device=self.device, dtype=self.dtype)
        acc = [torch.zeros_like(t) for t in parts]
        for xb, yb in self._chunks("train", k):
            per = self._loss(self._chunk_forward(parts, xb, stats), yb).sum(1) / n_total
            for a, gb in zip(acc, torch.autograd.grad(per.sum(), parts)):
                a += gb
            e += per.detach()
        g = _join(acc, k)
        return (e[0], g[0]) if single else (e, g)

    def _chunk_stats(self, theta: torch.Tensor) -> dict | None:
        """Statistics passed to each chunk's forward pass by the chunk-wise derivatives: the frozen ones in fixed
        mode; None otherwise (batch mode: each BatchNorm batch's own; recompute in one chunk: the chunk is the
        whole training set, so its batch statistics are the training-set statistics, theta-dependence included)."""
        return self._eval_stats(theta) if self._bn and self.batchnorm == "fixed" else None

    def _needs_stat_derivative(self, k: int) -> bool:
        """Recompute-mode BatchNorm over more than one chunk: the chunk-wise derivative would use each chunk's
        statistics, so the exact one (:meth:`_exact_bn_grad`) is needed."""
        return bool(self._bn) and self.batchnorm == "recompute" and self.chunk_size(k) < len(self.data["train"][1])

    def _exact_bn_grad(self, theta: torch.Tensor, chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """E and dE/dtheta for BatchNorm with training-set statistics, chunked, by explicit reverse
        accumulation through the statistics. With S_j = (mean_j, var_j) the statistics of BatchNorm layer j
        (j = 1..L, each computed with the earlier layers normalised by theirs),

            dE/dtheta = dE/dtheta|_S + sum_j (dE/dS_j)_total dS_j/dtheta|_{S_<j},
            (dE/dS_i)_total = dE/dS_i|_S + sum_{j > i} (dE/dS_j)_total dS_j/dS_i|_{S_<j, theta},

        where S_j = (s1/n, s2/n - (s1/n)^2) from the sums s1 = sum h, s2 = sum h^2 of the layer's input over the
        training set. One pass with S as explicit leaves gives the partial derivatives (torch.func.vjp per chunk);
        a reverse sweep j = L..1 pulls (dE/dS_j)_total back through s1, s2 (one more pass over the chunks each,
        the chunk recomputed up to layer j). No autograd graph spans two chunks, so memory stays per chunk, and the
        procedure is a pure function of theta: :meth:`hvp` differentiates it in forward mode (torch.func.jvp).
        Cost: L passes for the statistics, 1 forward/backward pass, and L partial ones."""
        from torch.func import vjp

        from . import layers

        k = theta.shape[0]
        seq, keys = self._seq, list(self._bn)
        n_total = sum(len(yb) for _, yb in chunks)
        stats: dict = {}
        moments = []
        for i in keys:  # the statistics, layer by layer (as bn_statistics, but without no_grad: jvp sees them)
            s1 = s2 = 0
            cnt = 0
            for xb, _ in chunks:
                h, layout = layers.forward(self, seq, theta, xb, stats=stats, stop_at=i)
                a, b, n = layers.channel_stats(h, layout, k)
                s1, s2, cnt = s1 + a, s2 + b, cnt + n
            mean = s1 / cnt
            stats[i] = (mean.to(self.dtype), (s2 / cnt - mean**2).clamp_min(0).to(self.dtype))
            moments.append((mean, cnt))
        st = tuple(stats[i] for i in keys)
        e = torch.zeros(k, device=self.device, dtype=self.dtype)
        g = torch.zeros_like(theta)
        gs = [(torch.zeros_like(m_), torch.zeros_like(v_)) for m_, v_ in st]
        for xb, yb in chunks:  # partial derivatives with the statistics held fixed
            def chunk_loss(th, st_, xb=xb, yb=yb):
                return self._loss(layers.forward(self, seq, th, xb, stats=dict(zip(keys, st_))), yb).sum(1) / n_total

            val, back = vjp(chunk_loss, theta, st)
            gth, gst = back(torch.ones_like(val))
            e, g = e + val, g + gth
            gs = [(a + c, b + d) for (a, b), (c, d) in zip(gs, gst)]
        for j in reversed(range(len(keys))):  # reverse sweep through the statistics
            mean, cnt = moments[j]
            a_mean, a_var = gs[j][0].double(), gs[j][1].double()
            cot = ((a_mean - 2 * mean * a_var) / cnt, a_var / cnt)  # d/ds1, d/ds2 of (mean, var) -> E
            for xb, _ in chunks:
                def chunk_sums(th, st_prev, xb=xb, j=j):
                    h, layout = layers.forward(self, seq, th, xb, stats=dict(zip(keys[:j], st_prev)), stop_at=keys[j])
                    return layers.channel_stats(h, layout, k)[:2]

                _, back = vjp(chunk_sums, theta, st[:j])
                gth, gprev = back(cot)
                g = g + gth
                gs[:j] = [(a + c, b + d) for (a, b), (c, d) in zip(gs[:j], gprev)]
        return e, g

    def batch_loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-replica mini-batch loss ``(K,)`` and its gradient ``(K, P)``; replicas where ``mask`` is False
        (or whose loss is not finite) contribute nothing to the backward pass."""
        if self._plan is not None and x is not None and x.ndim == 3:
            out = self._mlp_batch_grad(theta, x, y, mask)
            if out is not None:
                return out
        parts = self.split(theta, leaf=True)
        loss = self.batch_loss(parts, x, y)
        grads = torch.autograd.grad(_masked_total(loss, mask), parts)
        return loss.detach(), _join(grads, theta.shape[0])

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """grad E(theta), same shape as theta (replicas are independent, so one backward serves all K)."""
        return self.energy_and_grad(theta)[1]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Hessian-vector product H(theta) v = d/de grad E(theta + e v) at e = 0, chunked over the training data;
        theta and v are ``(P,)`` or ``(K, P)``. Double back-propagation per chunk, except for BatchNorm in
        recompute mode over several chunks: forward-over-reverse (torch.func.jvp of :meth:`_exact_bn_grad`,
        chunks of half the size for the tangents), so the statistics' dependence on theta is included."""
        theta, single = self._prepare(theta)
        v, _ = as_batch(v.to(self.device, self.dtype), self.n_params, "v")
        check(v.shape == theta.shape, f"v has shape {tuple(v.shape)} but theta has {tuple(theta.shape)}")
        k = theta.shape[0]
        if self._needs_stat_derivative(k):
            from torch.func import jvp

            chunks = list(self._chunks("train", 2 * k))
            _, out = jvp(lambda th: self._exact_bn_grad(th, chunks)[1], (theta.detach(),), (v.detach(),))
            return out[0] if single else out
        op = self._mlp_hvp_operator(theta, cache=False)
        if op is not None:
            out = op(v)
            return out[0] if single else out
        parts, vparts = self.split(theta, leaf=True), self.split(v)
        n_total = len(self.data["train"][1])
        stats = self._chunk_stats(theta)
        acc = [torch.zeros_like(t) for t in parts]
        for xb, yb in self._chunks("train", k):
            per = self._loss(self._chunk_forward(parts, xb, stats), yb).sum() / n_total
            gs = torch.autograd.grad(per, parts, create_graph=True)
            for a, hv in zip(acc, torch.autograd.grad(gs, parts, grad_outputs=vparts)):
                a += hv
        out = _join(acc, k)
        return out[0] if single else out

    def _mlp_hvp_operator(self, theta: torch.Tensor, cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """v -> H(theta) v for a ReLU MLP (no BatchNorm) by Pearlmutter's R-operator written out: the forward
        quantities at theta (layer inputs, ReLU masks, softmax, output gradient, hidden-layer deltas) are computed
        once, kept per data chunk when they fit in ``memory_mb`` (``cache``), and each product is one R-forward and
        one R-backward pass: for one hidden layer two GEMMs with the data (X V1^T and R(dZ)^T X) and a few narrow
        ones. The exact Hessian (ReLU'' = 0 almost everywhere, as autograd has it), without an autograd graph.
        None for other models (the autograd paths)."""
        plan = self._plan
        if plan is None:
            return None
        acts = [op for kind, op in plan if kind == "act"]
        if [kind for kind, _ in plan] != ["linear", "act"] * len(acts) + ["linear"] or any(
                a is not torch.relu for a in acts) or not self._hand_written_ok():
            return None
        theta = theta.detach()
        k = theta.shape[0]
        lin = [op for kind, op in plan if kind == "linear"]
        ws = [self._param(theta, l_.w) for l_ in lin]
        c = lin[-1].w.shape[0]
        n_total = len(self.data["train"][1])
        chunks = list(self._chunks("train", k))
        per_sample = k * (3 * sum(l_.w.shape[0] for l_ in lin[:-1]) + 3 * c) * 4
        keep = cache and per_sample * n_total <= self.memory_mb * 2**20
        ce = self.loss_name == "cross_entropy"

        def wgrad(dz: torch.Tensor, h: torch.Tensor) -> torch.Tensor:  # sum_n dz_n h_n^T per replica: (K, out, in)
            if h.ndim == 2:  # the shared data: one GEMM for all replicas
                n, out = dz.shape[1], dz.shape[2]
                return (dz.transpose(1, 2).reshape(k * out, n) @ h).view(k, out, -1)
            return torch.bmm(dz.transpose(1, 2), h)

        def forward(xb, yb):
            with torch.no_grad():
                hs, masks = [xb], []
                h = xb
                for l_ in lin[:-1]:
                    z = self._linear(theta, l_, h)
                    masks.append(z > 0)
                    h = torch.relu(z)
                    hs.append(h)
                o = self._output_layer(theta, lin[-1], h)  # (K, n, C)
                onehot = F.one_hot(yb, c).to(o.dtype)
                p = torch.softmax(o, -1) if ce else None
                do = ((p if ce else o) - onehot) / n_total
                dzs = []
                dh = torch.bmm(do, ws[-1])
                for i in range(len(lin) - 2, -1, -1):
                    dz = dh * masks[i]
                    dzs.insert(0, dz)
                    if i > 0:
                        dh = torch.bmm(dz, ws[i])
                return hs, masks, p, do, dzs

        saved = [forward(xb, yb) for xb, yb in chunks] if keep else None

        def mv(v: torch.Tensor) -> torch.Tensor:
            v = v.to(self.device, self.dtype).reshape(theta.shape)
            vs = [self._param(v, l_.w) for l_ in lin]
            out = torch.zeros_like(theta)
            with torch.no_grad():
                for ci, (xb, yb) in enumerate(chunks):
                    hs, masks, p, do, dzs = saved[ci] if saved is not None else forward(xb, yb)
                    rhs = [None]  # R of each linear layer's input (the data: 0)
                    for i, l_ in enumerate(lin[:-1]):
                        rz = self._linear(v, l_, hs[i])
                        if rhs[i] is not None:
                            rz = rz + torch.bmm(rhs[i], ws[i].transpose(1, 2))
                        rhs.append(rz * masks[i])
                    ro = self._output_layer(v, lin[-1], hs[-1])
                    if rhs[-1] is not None:
                        ro = ro + torch.bmm(rhs[-1], ws[-1].transpose(1, 2))
                    rdo = (p * (ro - (p * ro).sum(-1, keepdim=True)) if ce else ro) / n_total  # R of dE/do
                    last = lin[-1]
                    hw = torch.bmm(rdo.transpose(1, 2), hs[-1])
                    if rhs[-1] is not None:
                        hw += torch.bmm(do.transpose(1, 2), rhs[-1])
                    out[:, last.w.slice] += hw.reshape(k, -1)
                    if last.b is not None:
                        out[:, last.b.slice] += rdo.sum(1)
                    rdh = torch.bmm(rdo, ws[-1]) + torch.bmm(do, vs[-1])
                    for i in range(len(lin) - 2, -1, -1):
                        rdz = rdh * masks[i]
                        hw = wgrad(rdz, hs[i])
                        if rhs[i] is not None:
                            hw += torch.bmm(dzs[i].transpose(1, 2), rhs[i])
                        out[:, lin[i].w.slice] += hw.reshape(k, -1)
                        if lin[i].b is not None:
                            out[:, lin[i].b.slice] += rdz.sum(1)
                        if i > 0:
                            rdh = torch.bmm(rdz, ws[i]) + torch.bmm(dzs[i], vs[i])
            return out

        return mv

    def hvp_operator(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H(theta) v for a fixed ``(K, P)`` theta. When the training set fits in one chunk, the gradient's
        graph is built once and each product is a single backward pass through it (what iterative solvers
        need); otherwise each product recomputes chunk by chunk (:meth:`hvp`), keeping memory bounded."""
        theta, _ = self._prepare(theta)
        op = self._mlp_hvp_operator(theta)
        if op is not None:
            return op
        chunks = list(self._chunks("train", theta.shape[0]))
        if len(chunks) > 1 or self._needs_stat_derivative(theta.shape[0]):
            return lambda v: self.hvp(theta, v)
        parts = self.split(theta, leaf=True)
        xb, yb = chunks[0]
        per = self._loss(self._chunk_forward(parts, xb, self._chunk_stats(theta)), yb).sum() / len(yb)
        gs = torch.autograd.grad(per, parts, create_graph=True)

        def mv(v: torch.Tensor) -> torch.Tensor:
            v = v.to(self.device, self.dtype).reshape(theta.shape)
            hv = torch.autograd.grad(gs, parts, grad_outputs=self.split(v), retain_graph=True)
            return _join(hv, theta.shape[0])

        return mv

    # ------------------------------------------------------------------ constraints
    def has_projector(self) -> bool:
        """Whether :meth:`project` is anything but the identity (a constraint, known or not)."""
        return self.manifold is not None or type(self).project is not Problem.project

    def constraint(self, what: str) -> Sphere | None:
        """The manifold that ``what`` (a curvature or path routine) must respect: ``self.manifold``, or None for
        an unconstrained problem. A problem that projects its parameters without declaring the manifold is
        refused: its tangent space, Riemannian Hessian and geodesics are unknown."""
        if self.manifold is None and self.has_projector():
            raise LossglassError(
                f"{what}: this problem projects its parameters onto a constraint (a custom projector) but declares "
                "no manifold, so its tangent space, Riemannian Hessian and geodesics are unknown; give it one "
                "(e.g. Problem.from_function(fn, P, manifold=lossglass.problem.Sphere(radius)) or set "
                "problem.manifold) instead of a bare projector")
        return self.manifold

    def hessian_operator(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> Hess E(theta) v for ``(K, P)`` theta: the Euclidean Hessian for an unconstrained problem, the
        Riemannian Hessian P_T (grad^2 E - (theta . grad E / |theta|^2) I) P_T on a :class:`Sphere` (the normal
        direction maps to 0). Refuses a problem with an undeclared constraint (:meth:`constraint`)."""
        man = self.constraint("the Hessian")
        theta, _ = self._prepare(theta)
        op = self.hvp_operator(theta)
        if man is None:
            return op
        check(bool(man.contains(theta, 1e-4).all()), f"theta is not on the problem's manifold {man}; project it "
              "first (problem.project)")
        return man.hessian_operator(theta, self.grad(theta), op)

    def _prepare(self, theta) -> tuple[torch.Tensor, bool]:
        theta, single = as_batch(theta, self.n_params)
        return theta.to(self.device, self.dtype), single

    # ------------------------------------------------------------------ affine families (paths, planes)
    def evaluate_affine(self, center: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor,
                        split: str = "train", block: int = 512) -> dict[str, torch.Tensor]:
        """Loss and accuracy at theta_{m,g} = center_m + sum_j coeffs[m, g, j] directions[m, j].

        Shapes: center ``(P,)`` or ``(M, P)``; directions ``(J, P)`` or ``(M, J, P)``; coeffs ``(G, J)`` or
        ``(M, G, J)``; results ``(G,)`` or ``(M, G)``. M families (paths, planes) of G points each.
        For an MLP the first layer's pre-activations are affine in theta, so
        z_{m,g} = Z_{m,0} + sum_j c_{m,g,j} Z_{m,j} with Z_{m,j} = X W_{m,j}^T + b_{m,j}: J+1 products per
        family and data chunk serve all G points (exact). Other models evaluate the points as replicas.
        """
        single = torch.as_tensor(center).ndim == 1
        center = center.to(self.device, self.dtype).reshape(-1, self.n_params)
        m = center.shape[0]
        directions = directions.to(self.device, self.dtype).reshape(m, -1, self.n_params)
        coeffs = coeffs.to(self.device, self.dtype).reshape(m, -1, directions.shape[1])
        check_finite(center, "center")
        check_finite(directions.reshape(-1, self.n_params), "directions")
        check(bool(torch.isfinite(coeffs).all()), "coefficients hold NaN or inf")
        g_total = coeffs.shape[1]
        basis = torch.cat([center.unsqueeze(1), directions], 1)  # (M, J+1, P)
        cc_all = torch.cat([torch.ones(m, g_total, 1, device=self.device, dtype=self.dtype), coeffs], 2)
        loss_sum = torch.zeros(m, g_total, device=self.device, dtype=torch.float64)
        correct = torch.zeros_like(loss_sum)
        x_all, y_all = self.data[choice("split", split, tuple(self.data))] if self.dataset is not None else (None, None)
        fused = self._fused_mlp1() if self.dataset is not None else None
        if fused is not None:  # one GEMM per basis vector and data chunk, then one fused pass per grid point
            first, _, last = fused
            j1, h, c = basis.shape[1], first.w.shape[0], last.w.shape[0]
            with torch.no_grad():
                wb = basis[:, :, first.w.slice].reshape(m * j1 * h, -1)
                bb = basis[:, :, first.b.slice].reshape(m * j1 * h, 1) if first.b is not None else None
                w2 = torch.bmm(cc_all, basis[:, :, last.w.slice]).reshape(m * g_total, c, h)
                b2 = (torch.bmm(cc_all, basis[:, :, last.b.slice]).reshape(m * g_total, c) if last.b is not None
                      else torch.zeros(m * g_total, c, device=self.device, dtype=self.dtype))
                out = self._fused_sums(fused, wb, bb, cc_all.reshape(m * g_total, j1), w2, b2, g_total, x_all, y_all)
            if out is not None:
                n_total = max(len(y_all), 1)
                res = {"loss": (out[0] / n_total).view(m, g_total).to(self.dtype),
                       "accuracy": (out[1] / n_total).view(m, g_total).to(self.dtype)}
                return {k: v[0] for k, v in res.items()} if single else res
        per_block = max(1, block // m)
        with torch.no_grad():
            for g0 in range(0, g_total, per_block):
                cc = cc_all[:, g0:g0 + per_block]  # (M, Gb, J+1)
                gb = cc.shape[1]
                theta = torch.bmm(cc, basis).reshape(m * gb, self.n_params)
                if self._plan is None or self._plan[0][0] != "linear":
                    ev = self.evaluate(theta, split)
                    loss_sum[:, g0:g0 + gb] = ev["loss"].double().view(m, gb)
                    correct[:, g0:g0 + gb] = ev["accuracy"].double().view(m, gb)
                    continue
                first: _Linear = self._plan[0][1]
                step = max(1, self.chunk_size(m * gb) // 2)
                for i in range(0, len(x_all), step):
                    xb, yb = x_all[i:i + step], y_all[i:i + step]
                    n, h = len(xb), first.w.shape[0]
                    zb = self._linear(basis.reshape(-1, self.n_params), first, xb)  # (M*(J+1), n, h)
                    z = torch.bmm(cc, zb.reshape(m, basis.shape[1], n * h)).reshape(m * gb, n, h)
                    out = self._forward_mlp(theta, z, start=1)
                    loss_sum[:, g0:g0 + gb] += self._loss(out, yb).sum(1, dtype=torch.float64).view(m, gb)
                    correct[:, g0:g0 + gb] += (out.contiguous().argmax(-1) == yb).sum(1, dtype=torch.float64).view(m, gb)
                n_total = len(y_all)
                loss_sum[:, g0:g0 + gb] /= n_total
                correct[:, g0:g0 + gb] /= n_total
        res = {"loss": loss_sum.to(self.dtype), "accuracy": correct.to(self.dtype)}
        return {k: v[0] for k, v in res.items()} if single else res

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """Map parameters back onto the problem's manifold (``self.manifold.project``; the identity when None)."""
        return theta if self.manifold is None else self.manifold.project(theta)

    def subset(self, n: int | None) -> Problem:
        """The same model, loss and BatchNorm settings on the first ``n`` training samples (curvature or walks on a
        stated subset keep cost bounded); ``self`` when ``n`` is None or covers the training set. A declared
        permutation spec and frozen BatchNorm statistics carry over."""
        if n is None or n >= len(self.dataset.y_train):
            return self
        check(isinstance(n, int) and n > 0, f"n must be a positive int, got {n!r}")
        ds = self.dataset
        sub = Dataset(ds.name, ds.x_train[:n], ds.y_train[:n], ds.x_test, ds.y_test, ds.n_classes, ds.shape,
                      {**ds.info, "subset_of_train": n})
        for extra in ("x_val", "y_val"):
            if hasattr(ds, extra):
                setattr(sub, extra, getattr(ds, extra))
        out = Problem(self.model, sub, loss=self.loss_name, device=str(self.device), dtype=self.dtype,
                      memory_mb=self.memory_mb, batchnorm=self.batchnorm,
                      bn_batch=self.bn_batch)
        if getattr(self, "spec", None) is not None:
            out.spec = self.spec
        out._frozen_stats = self._frozen_stats
        return out


class FunctionProblem(Problem):
    """E(theta) = fn(theta) for any ``fn: (K, P) -> (K,)``; accuracy is NaN (there are no labels).

    ``manifold`` (e.g. :class:`Sphere`) constrains theta: :meth:`project` maps onto it, curvature is Riemannian and
    paths and planes stay on it. A bare ``projector`` is still used by training and walks, but curvature and path
    routines refuse such a problem (its geometry is unknown)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], n_params: int, *, name: str = "function",
                 device: str = "auto", dtype: torch.dtype = torch.float32,
                 init_scale: float = 1.0, projector: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 manifold: Sphere | None = None):
        check(callable(fn), "fn must be callable: (K, P) -> (K,)")
        check(isinstance(n_params, int) and n_params > 0, f"n_params must be a positive int, got {n_params!r}")
        check(manifold is None or isinstance(manifold, Sphere),
              f"manifold must be a lossglass.problem.Sphere or None, got {type(manifold).__name__}")
        check(projector is None or manifold is None, "give a projector or a manifold, not both (the manifold "
              "brings its own projection)")
        self.manifold = manifold
        self.fn, self.n_params, self.name = fn, n_params, name
        self.device, self.dtype = resolve_device(device), dtype
        self.params = [ParamInfo("theta", (n_params,), 0)]
        self._info = {"theta": self.params[0]}
        self._plan, self.model, self.dataset, self.loss_name = None, None, None, name
        self.init_scale = float(init_scale)
        self._projector = projector
        with torch.no_grad():
            e = fn(torch.zeros(2, n_params, device=self.device, dtype=dtype))
        check(isinstance(e, torch.Tensor) and tuple(e.shape) == (2,),
              f"fn must map (K, P) to (K,); for K=2 it returned shape {tuple(getattr(e, 'shape', ()))}")

    def __repr__(self) -> str:
        return f"FunctionProblem({self.name!r}, P={self.n_params})"

    def init(self, n_replicas: int, seed: int = 0, *, ids=None) -> torch.Tensor:
        """Replica k: ``init_scale`` * N(0, I) from the seed mixed from (seed, ids[k]), projected."""
        check(isinstance(n_replicas, int) and n_replicas > 0, f"n_replicas must be a positive int, got {n_replicas}")
        ids = range(n_replicas) if ids is None else ids
        rows = [torch.randn(self.n_params, generator=torch.Generator().manual_seed(seed_for(seed, 7, k)),
                            dtype=self.dtype) for k in ids]
        return self.project(torch.stack(rows).to(self.device) * self.init_scale)

    def project(self, theta: torch.Tensor) -> torch.Tensor:
        """theta mapped onto the manifold (or by the custom projector); the identity when there is neither."""
        if self.manifold is not None:
            return self.manifold.project(theta)
        return theta if self._projector is None else self._projector(theta)

    def has_projector(self) -> bool:
        return self.manifold is not None or self._projector is not None

    def evaluate(self, theta: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        theta, single = self._prepare(theta)
        with torch.no_grad():
            e = self._energy(theta)
        res = {"loss": e, "accuracy": torch.full_like(e, float("nan"))}
        return {k: v[0] for k, v in res.items()} if single else res

    def _energy(self, theta: torch.Tensor) -> torch.Tensor:
        e = self.fn(theta)
        if tuple(e.shape) != (theta.shape[0],):
            raise LossglassError(f"{self.name}: fn returned shape {tuple(e.shape)} for {theta.shape[0]} replicas")
        return e

    def batch_loss(self, theta: torch.Tensor, x=None, y=None) -> torch.Tensor:
        return self._energy(theta)

    def batch_loss_and_grad(self, theta, x=None, y=None, mask=None):
        theta = theta.detach().requires_grad_(True)
        loss = self._energy(theta)
        g, = torch.autograd.grad(_masked_total(loss, mask), theta, allow_unused=True)
        return loss.detach(), (torch.zeros_like(theta) if g is None else g)

    def energy_and_grad(self, theta):
        theta, single = self._prepare(theta)
        theta = theta.detach().requires_grad_(True)
        e = self._energy(theta)
        g, = torch.autograd.grad(e.sum(), theta, allow_unused=True)
        g = torch.zeros_like(theta) if g is None else g
        return (e.detach()[0], g[0]) if single else (e.detach(), g)

    def hvp_operator(self, theta):
        theta, _ = self._prepare(theta)
        theta = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(self._energy(theta).sum(), theta, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # linear or constant energy: H = 0
            return lambda v: torch.zeros_like(theta)

        def mv(v):
            hv, = torch.autograd.grad(g, theta, grad_outputs=v.to(self.device, self.dtype).reshape(theta.shape),
                                      retain_graph=True, allow_unused=True)
            return torch.zeros_like(theta) if hv is None else hv

        return mv

    def hvp(self, theta, v):
        theta, single = self._prepare(theta)
        v, _ = as_batch(v.to(self.device, self.dtype), self.n_params, "v")
        theta = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(self._energy(theta).sum(), theta, create_graph=True, allow_unused=True)
        hv = None
        if g is not None and g.requires_grad:
            hv, = torch.autograd.grad(g, theta, grad_outputs=v, allow_unused=True)
        hv = torch.zeros_like(theta) if hv is None else hv
        return hv[0] if single else hv

    def forward(self, theta, x):
        raise LossglassError(f"{self.name} is an energy function, not a network: it has no outputs to compute")
