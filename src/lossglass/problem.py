"""The energy of a network: a model, a data set and a loss seen as a function E(theta) of a flat parameter vector,
evaluated for a batch of K replicas ``(K, P)`` in one vectorised pass, chunked over the data:

    E(theta_k) = (1/N) sum_n loss(f_{theta_k}(x_n), y_n),   k = 1..K.

:class:`Problem` implements :class:`~lossglass.energy.Energy` (as the function-defined
:class:`~lossglass.energy.FunctionProblem` does) on top of one forward path chosen once when it is built
(:mod:`lossglass.backends`): the hand-batched MLP (with the fused CPU kernel for one hidden ReLU layer), the layer
stack / traced graph, or ``torch.func.vmap``. BatchNorm statistics follow one :class:`~lossglass.batchnorm.
BatchNormPolicy`; the parameters are laid out by a :class:`~lossglass.layout.ParamLayout`.

A problem may live on a constraint manifold (``problem.manifold``, e.g. :class:`Sphere` for the spherical p-spin):
then :meth:`Problem.project` maps onto it and :meth:`Problem.hessian_operator` is the Riemannian Hessian.

Example (a small network on a teacher task; energies, gradients and Hessian-vector products of 3 replicas):

    >>> import torch
    >>> import lossglass as lg
    >>> ds = lg.datasets.load("teacher", n_train=64, n_test=32, in_dim=5, width=4, n_classes=3, seed=0)
    >>> prob = Problem(lg.models.mlp(5, 8, 3), ds, device="cpu", dtype=torch.float64)
    >>> prob.backend.name, prob.n_params, prob.layout["0.weight"].shape
    ('mlp', 75, (8, 5))
    >>> theta = prob.init(3, seed=0)
    >>> e, g = prob.energy_and_grad(theta)
    >>> e.shape, g.shape
    (torch.Size([3]), torch.Size([3, 75]))
    >>> v = torch.randn(3, 75, dtype=torch.float64)
    >>> hv = prob.hvp(theta, v)                       # H v, exact (R-operator)
    >>> eps = 1e-6                                    # against central differences of the gradient
    >>> fd = (prob.grad(theta + eps * v) - prob.grad(theta - eps * v)) / (2 * eps)
    >>> bool(torch.allclose(hv, fd, atol=1e-6))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from ._util import as_batch, resolve_device, seed_for
from .backends import Backend, FusedMLPBackend, MLPBackend, StackBackend, VmapBackend, fused_applies, mlp_plan
from .batchnorm import (
    MODES as BATCHNORM_MODES,
)
from .batchnorm import (
    BatchNormPolicy,
    canonical_statistics,
    exact_energy_and_grad,
    fold_statistics,
    is_batchnorm,
    layerwise_statistics,
)
from .datasets import Dataset
from .energy import Energy, FunctionProblem, masked_total
from .errors import check, choice
from .layout import ParamEntry, ParamInfo, ParamLayout
from .manifold import Sphere

__all__ = ["BATCHNORM_MODES", "LOSSES", "FunctionProblem", "ParamEntry", "ParamInfo", "ParamLayout", "Problem",
           "Sphere"]

LOSSES = ("cross_entropy", "mse")


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


class Problem(Energy):
    """E(theta) = (1/N) sum_n loss(f_theta(x_n), y_n) over the training set, for K replicas at once.

    ``theta`` is ``(P,)`` for one network or ``(K, P)`` for K replicas; every method accepts both and
    returns per-replica results. Data are processed in chunks so that peak memory stays near
    ``memory_mb`` whatever K and N. ``loss``: ``"cross_entropy"`` (log-sum-exp minus the true logit) or ``"mse"``
    ((1/2) |f(x) - onehot(y)|^2 per sample).

    The forward path (``problem.backend``, :mod:`lossglass.backends`) is chosen here, once: ``"mlp"`` (``"fused"``
    for a float32 single-hidden-layer ReLU network on the CPU) for an ``nn.Sequential`` of Linear layers and
    element-wise activations; ``"stack"`` for a Sequential with convolutions, norm layers or an Unflatten;
    ``"graph"`` for a free-form module with BatchNorm whose statistics are recomputed (traced by torch.fx);
    ``"vmap"`` for anything else.

    BatchNorm (``batchnorm``, one :class:`~lossglass.batchnorm.BatchNormPolicy` in ``problem.bn_policy``):
    ``"recompute"`` (default) normalises with the statistics of the whole training set at the evaluated point
    (layer by layer, see :meth:`bn_statistics`); ``"fixed"`` with statistics frozen at one point
    (:meth:`with_frozen_batchnorm`); ``"batch"`` cuts the data into consecutive BatchNorm batches of ``bn_batch``
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
    has_data = True

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
        self.layout = ParamLayout.from_module(self.model)
        check(self.layout.n_params > 0, "model has no parameters")
        self.n_params = self.layout.n_params
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
        mode = choice("batchnorm mode", batchnorm, BATCHNORM_MODES)
        check(isinstance(bn_batch, int) and bn_batch >= 2, f"bn_batch must be an int >= 2, got {bn_batch!r}")
        self.backend, mode = self._choose_backend(model, mode)
        self.bn_policy = BatchNormPolicy(mode, self.backend.bn_layers, bn_batch)
        self.buffers = {k: v for k, v in self.model.named_buffers()}
        widths = [e.shape[0] for e in self.layout if len(e.shape) == 2] + self.backend.activation_sizes()
        self._width = max(widths + [dataset.n_classes])

    def _choose_backend(self, model: nn.Module, mode: str) -> tuple[Backend, str]:
        """The forward path (see the class docstring) and the BatchNorm mode with ``"auto"`` resolved."""
        declared = getattr(model, "lossglass_batchnorm", None)
        plan = mlp_plan(self.model, self.layout)
        has_bn = any(is_batchnorm(m) for m in self.model.modules())
        seq = None
        if plan is None and mode != "module":
            seq = layers.build(self.model, self.dataset.in_dim)
            if seq is None and has_bn and (mode != "auto" or declared):
                # a free-form module with BatchNorm: its traced graph, batched by grouped convolutions, so that the
                # statistics can be recomputed at every point like those of a Sequential
                seq, why = layers.build_graph(self.model, self.data["train"][0][:2])
                check(seq is not None, f"batchnorm={mode!r} needs the BatchNorm statistics of every "
                      f"evaluated point, which lossglass computes on the traced graph of {type(model).__name__}, but "
                      f"{why} is not supported there; use the module's own stored statistics (model.bn_stats = 'module' "
                      "in a config, batchnorm='module' in Python)")
        if mode == "auto":
            mode = declared or "recompute"
        hand = self._hand_written_ok()
        if plan is not None:
            cls = FusedMLPBackend if fused_applies(plan, self.dtype, self.device) else MLPBackend
            return cls(plan, self.layout, self.loss_name, hand), mode
        if seq is not None:
            return StackBackend(seq, self.layout), mode
        if has_bn:
            # a free-form module (or batchnorm='module'): vmap cannot update running statistics, so BatchNorm uses
            # stored statistics everywhere (eval mode). They are made canonical (mean 0, variance 1) and a module's
            # own statistics are folded into its affine parameters (flatten, import_checkpoints), so each replica
            # carries its statistics and a channel permutation is a symmetry.
            mode = "module"
            canonical_statistics(self.model)
        self.model.eval()  # the generic path evaluates the deterministic function: dropout off
        return VmapBackend(self.model, self.layout, {k: v for k, v in self.model.named_buffers()}), mode

    def _hand_written_ok(self) -> bool:
        """The hand-written MLP routes (fused kernel, manual gradient, R-operator) reproduce Problem's own forward
        pass and loss; a subclass that overrides either keeps the generic (autograd) routes."""
        cls = type(self)
        return all(getattr(cls, n) is getattr(Problem, n) for n in ("_loss", "forward", "batch_loss"))

    # ------------------------------------------------------------------ BatchNorm
    @property
    def batchnorm(self) -> str:
        """The BatchNorm mode (``"auto"`` resolved): recompute, batch, fixed or module."""
        return self.bn_policy.mode

    @property
    def bn_batch(self) -> int:
        return self.bn_policy.bn_batch

    @property
    def has_batchnorm(self) -> bool:
        """Whether the problem supplies BatchNorm statistics to some layer (a layer stack or traced graph with
        BatchNorm, outside module mode): what :meth:`with_frozen_batchnorm` and :meth:`bn_statistics` act on."""
        return self.bn_policy.supplies_statistics

    def fold_statistics(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                        source: str = "state") -> dict[str, torch.Tensor]:
        """Parameters with a module's stored BatchNorm statistics folded into the affine parameters in module mode
        (:func:`lossglass.batchnorm.fold_statistics`); a new dict, the identity outside module mode."""
        if self.batchnorm != "module":
            return dict(params)
        return fold_statistics(self.model, params, buffers, self.device, source)

    def with_frozen_batchnorm(self, theta: torch.Tensor) -> Problem:
        """A new problem whose BatchNorm layers keep the statistics of the point ``theta`` (``(P,)``) for every
        evaluation (mode ``"fixed"``), as a module in ``eval()`` mode does while its weights are perturbed (what most
        landscape tools do; along a path between two networks it is the known failure that recomputing repairs).
        ``self`` is unchanged (it shares the model, the data and the forward path); without statistics to freeze (no
        BatchNorm, an MLP, module mode) the result is ``self``."""
        if not self.has_batchnorm:
            return self
        out = copy.copy(self)
        out.bn_policy = self.bn_policy.frozen_at(self._statistics_at(theta))
        return out

    def _statistics_at(self, theta: torch.Tensor) -> dict:
        return self.bn_statistics(torch.as_tensor(theta).to(self.device, self.dtype).reshape(1, -1))

    def evaluation_statistics(self, theta: torch.Tensor) -> dict | None:
        """The BatchNorm statistics :meth:`evaluate` normalises ``(K, P)`` theta with, ``{op: (mean, var)}``: the
        training-set ones at theta (recompute), the frozen ones (fixed), or None (no BatchNorm, batch or module
        mode)."""
        return self.bn_policy.evaluation_statistics(theta.shape[0], lambda: self.bn_statistics(theta))

    def bn_statistics(self, theta: torch.Tensor) -> dict:
        """Per-replica BatchNorm statistics over the whole training set at ``theta``, layer by layer (each layer's
        statistics are computed with the earlier layers already normalised by theirs): ``{op: (mean, var)}``
        with the biased variance (the training set as the population); see
        :func:`lossglass.batchnorm.layerwise_statistics`. In one pass when it fits in ``memory_mb``."""
        k = theta.shape[0]
        one = self._one_pass_statistics(theta)
        if one is not None:
            return one
        with torch.no_grad():
            stats, _ = layerwise_statistics(theta, lambda: self._chunks("train", k), self.backend.bn_layers,
                                            self.dtype, self.backend.moments)
        return stats

    def _one_pass_statistics(self, theta: torch.Tensor) -> dict | None:
        """:meth:`bn_statistics` in one forward pass over the whole training set, in groups of as many replicas as
        :meth:`chunk_size` lets see all of it at once (:meth:`StackBackend.record_statistics`). None when not even
        one replica's pass fits in ``memory_mb``."""
        if not isinstance(theta, torch.Tensor):
            return None
        x = self.data["train"][0]
        k = theta.shape[0]
        per = int(self.memory_mb * 2**20 // max((self._width + self.dataset.n_classes) * 16 * len(x), 1))
        step = min(k, per) if self.chunk_size(k) < len(x) else k
        if step < 1:
            return None
        return self.backend.record_statistics(theta, x, step)

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def from_function(fn: Callable[[torch.Tensor], torch.Tensor], n_params: int, **kwargs) -> FunctionProblem:
        """A problem whose energy is any function ``fn: (K, P) -> (K,)`` (reference landscapes, tests); see
        :class:`~lossglass.energy.FunctionProblem`."""
        return FunctionProblem(fn, n_params, **kwargs)

    @property
    def is_mlp(self) -> bool:
        return isinstance(self.backend, MLPBackend)

    def __repr__(self) -> str:
        return (f"Problem({type(self.model).__name__}, {self.dataset.name}, P={self.n_params}, "
                f"loss={self.loss_name}, device={self.device})")

    # ------------------------------------------------------------------ parameters <-> flat vectors
    def flatten(self, params: dict[str, torch.Tensor] | nn.Module) -> torch.Tensor:
        """A flat ``(P,)`` vector from a module or a ``{name: tensor}`` mapping (the inverse of unflatten). In BatchNorm
        module mode, running statistics found in the module (or the mapping) are folded in (:meth:`fold_statistics`)."""
        if isinstance(params, nn.Module):
            params = self.fold_statistics(dict(params.named_parameters()), dict(params.named_buffers()),
                                          type(params).__name__)
        elif self.batchnorm == "module":
            params = self.fold_statistics(params, params, "the state dict")
        return self.layout.flatten(params).to(self.device, self.dtype)

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
            if self.backend.bn_layers:
                for i, (mean, var) in self.bn_statistics(theta.unsqueeze(0)).items():
                    mod = m.get_submodule(self.backend.ops[i].name)
                    mod.running_mean.copy_(mean.reshape(mod.running_mean.shape))
                    mod.running_var.copy_(var.reshape(mod.running_var.shape))
        return m

    # ------------------------------------------------------------------ the batched forward pass
    def forward(self, theta: torch.Tensor, x: torch.Tensor, stats: dict | None = None, *,
                bn_batch: int | None = None) -> torch.Tensor:
        """Outputs of K networks: ``x`` is ``(N, D)`` shared by all replicas or ``(K, N, D)`` one batch each;
        returns ``(K, N, C)``. BatchNorm layers use ``stats`` (see :meth:`bn_statistics`) when given, else the
        statistics of ``x`` (training mode), or with ``bn_batch=B`` those of each block of B samples."""
        return self.backend.forward(theta, x, stats, group=bn_batch)

    def _chunk_forward(self, theta, x: torch.Tensor, stats: dict | None) -> torch.Tensor:
        """The forward pass of one data chunk as :meth:`evaluate` defines it (BatchNorm batches in batch mode)."""
        return self.forward(theta, x, stats, bn_batch=self.bn_policy.group)

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
        """Consecutive data chunks for K replicas (whole BatchNorm batches in batch mode, see
        :meth:`BatchNormPolicy.chunks`)."""
        x, y = self.data[choice("split", split, tuple(self.data))]
        return self.bn_policy.chunks(x, y, self.chunk_size(k))

    # ------------------------------------------------------------------ energies and their derivatives
    def evaluate(self, theta: torch.Tensor, split: str = "train") -> dict[str, torch.Tensor]:
        """Mean loss and accuracy on a split: ``{"loss": (K,), "accuracy": (K,)}`` (scalars for one theta)."""
        theta, single = self._prepare(theta)
        k = theta.shape[0]
        x_all, y_all = self.data[choice("split", split, tuple(self.data))]
        out = self.backend.evaluate_sums(theta, x_all, y_all, self.memory_mb)  # the fused kernel, where it serves
        if out is not None:
            nn_ = max(len(y_all), 1)
            res = {"loss": (out[0] / nn_).to(self.dtype), "accuracy": (out[1] / nn_).to(self.dtype)}
            return {k_: v[0] for k_, v in res.items()} if single else res
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        correct = torch.zeros(k, device=self.device, dtype=torch.float64)
        n = 0
        stats = self.evaluation_statistics(theta)
        with torch.no_grad():
            for xb, yb in self._chunks(split, k):
                out = self._chunk_forward(theta, xb, stats)
                loss_sum += self._loss(out, yb).sum(1, dtype=torch.float64)
                correct += (out.contiguous().argmax(-1) == yb).sum(1, dtype=torch.float64)
                n += len(yb)
        res = {"loss": (loss_sum / max(n, 1)).to(self.dtype), "accuracy": (correct / max(n, 1)).to(self.dtype)}
        return {k_: v[0] for k_, v in res.items()} if single else res

    def predictions(self, theta: torch.Tensor, split: str = "test", *, x: torch.Tensor | None = None,
                    y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example predicted class, loss and output margin of K replicas: ``{"prediction": (K, N) int64, "loss":
        (K, N), "margin": (K, N) float64}`` on a split, or on inputs ``x`` with labels ``y`` (e.g. corrupted test
        inputs), computed in chunks as :meth:`evaluate` does (same BatchNorm statistics), so ``loss.mean(1)`` and
        ``(prediction == y).mean(1)`` are :meth:`evaluate`'s loss and accuracy. The margin is
        gamma_n = f(x_n)_{y_n} - max_{j != y_n} f(x_n)_j (negative when the example is misclassified). Rows of one
        theta come back as ``(N,)``."""
        theta, single = self._prepare(theta)
        k = theta.shape[0]
        if x is None:
            x, y = self.data[choice("split", split, tuple(self.data))]
        check(y is not None and len(x) == len(y), "predictions on given inputs need one label per input (y)")
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        stats = self.evaluation_statistics(theta)
        preds, losses, margins = [], [], []
        with torch.no_grad():
            for xb, yb in self.bn_policy.chunks(x, y, self.chunk_size(k)):
                out = self._chunk_forward(theta, xb, stats)
                losses.append(self._loss(out, yb))
                preds.append(out.contiguous().argmax(-1))
                yk = yb.expand(out.shape[0], -1).unsqueeze(-1)
                margins.append((out.gather(-1, yk).squeeze(-1) - out.scatter(-1, yk, float("-inf")).amax(-1)).double())
        pred = torch.cat(preds, 1) if preds else torch.zeros(k, 0, dtype=torch.long, device=self.device)
        loss = torch.cat(losses, 1) if losses else torch.zeros(k, 0, dtype=self.dtype, device=self.device)
        margin = torch.cat(margins, 1) if margins else torch.zeros(k, 0, dtype=torch.float64, device=self.device)
        res = {"prediction": pred.cpu(), "loss": loss.cpu(), "margin": margin.cpu()}
        return {k_: v[0] for k_, v in res.items()} if single else res

    def energy_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, grad E)`` over the whole training set, accumulated chunk by chunk: the exact derivative of
        :meth:`energy` (for BatchNorm in recompute mode over several chunks, see
        :func:`lossglass.batchnorm.exact_energy_and_grad`)."""
        theta, single = self._prepare(theta)
        k = theta.shape[0]
        if self._needs_stat_derivative(k):
            e, g = self._exact_bn_grad(theta.detach(), list(self._chunks("train", k)))
            return (e[0], g[0]) if single else (e, g)
        parts = self.split(theta, leaf=True)
        n_total = len(self.data["train"][1])
        stats = self.bn_policy.chunk_statistics(k)
        e = torch.zeros(k, device=self.device, dtype=self.dtype)
        acc = [torch.zeros_like(t) for t in parts]
        for xb, yb in self._chunks("train", k):
            per = self._loss(self._chunk_forward(parts, xb, stats), yb).sum(1) / n_total
            for a, gb in zip(acc, torch.autograd.grad(per.sum(), parts)):
                a += gb
            e += per.detach()
        g = self.layout.join(acc, k)
        return (e[0], g[0]) if single else (e, g)

    def _needs_stat_derivative(self, k: int) -> bool:
        return self.bn_policy.needs_statistics_derivative(self.chunk_size(k) < len(self.data["train"][1]))

    def _exact_bn_grad(self, theta: torch.Tensor, chunks: list) -> tuple[torch.Tensor, torch.Tensor]:
        """E and dE/dtheta with the training-set statistics' dependence on theta
        (:func:`lossglass.batchnorm.exact_energy_and_grad` on this problem's layer stack)."""
        backend = self.backend
        return exact_energy_and_grad(theta, chunks, list(backend.bn_layers), self.dtype,
                                     output=lambda th, xb, st: backend.forward(th, xb, st),
                                     moments=backend.moments, loss=self._loss)

    def batch_loss_and_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-replica mini-batch loss ``(K,)`` and its gradient ``(K, P)``; replicas where ``mask`` is False
        (or whose loss is not finite) contribute nothing to the backward pass."""
        out = self.backend.batch_loss_and_grad(theta, x, y, mask)  # the hand-written reverse pass, where it applies
        if out is not None:
            return out
        parts = self.split(theta, leaf=True)
        loss = self.batch_loss(parts, x, y)
        grads = torch.autograd.grad(masked_total(loss, mask), parts)
        return loss.detach(), self.layout.join(grads, theta.shape[0])

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Hessian-vector product H(theta) v = d/de grad E(theta + e v) at e = 0, chunked over the training data;
        theta and v are ``(P,)`` or ``(K, P)``. Double back-propagation per chunk (the R-operator for a ReLU MLP),
        except for BatchNorm in recompute mode over several chunks: forward-over-reverse (torch.func.jvp of the
        exact gradient, chunks of half the size for the tangents), so the statistics' dependence on theta is
        included."""
        theta, single = self._prepare(theta)
        v, _ = as_batch(v.to(self.device, self.dtype), self.n_params, "v")
        check(v.shape == theta.shape, f"v has shape {tuple(v.shape)} but theta has {tuple(theta.shape)}")
        k = theta.shape[0]
        if self._needs_stat_derivative(k):
            from torch.func import jvp

            chunks = list(self._chunks("train", 2 * k))
            _, out = jvp(lambda th: self._exact_bn_grad(th, chunks)[1], (theta.detach(),), (v.detach(),))
            return out[0] if single else out
        n_total = len(self.data["train"][1])
        op = self.backend.hvp_operator(theta, lambda: list(self._chunks("train", k)), n_total, self.memory_mb,
                                       cache=False)
        if op is not None:
            out = op(v)
            return out[0] if single else out
        parts, vparts = self.split(theta, leaf=True), self.split(v)
        stats = self.bn_policy.chunk_statistics(k)
        acc = [torch.zeros_like(t) for t in parts]
        for xb, yb in self._chunks("train", k):
            per = self._loss(self._chunk_forward(parts, xb, stats), yb).sum() / n_total
            gs = torch.autograd.grad(per, parts, create_graph=True)
            for a, hv in zip(acc, torch.autograd.grad(gs, parts, grad_outputs=vparts)):
                a += hv
        out = self.layout.join(acc, k)
        return out[0] if single else out

    def hvp_operator(self, theta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H(theta) v for a fixed ``(K, P)`` theta. When the training set fits in one chunk, the gradient's
        graph is built once and each product is a single backward pass through it (what iterative solvers
        need); otherwise each product recomputes chunk by chunk (:meth:`hvp`), keeping memory bounded."""
        theta, _ = self._prepare(theta)
        op = self.backend.hvp_operator(theta, lambda: list(self._chunks("train", theta.shape[0])),
                                       len(self.data["train"][1]), self.memory_mb)
        if op is not None:
            return op
        chunks = list(self._chunks("train", theta.shape[0]))
        if len(chunks) > 1 or self._needs_stat_derivative(theta.shape[0]):
            return lambda v: self.hvp(theta, v)
        parts = self.split(theta, leaf=True)
        xb, yb = chunks[0]
        per = self._loss(self._chunk_forward(parts, xb, self.bn_policy.chunk_statistics(theta.shape[0])), yb).sum() / len(yb)
        gs = torch.autograd.grad(per, parts, create_graph=True)

        def mv(v: torch.Tensor) -> torch.Tensor:
            v = v.to(self.device, self.dtype).reshape(theta.shape)
            hv = torch.autograd.grad(gs, parts, grad_outputs=self.split(v), retain_graph=True)
            return self.layout.join(hv, theta.shape[0])

        return mv

    # ------------------------------------------------------------------ affine families (paths, planes)
    def evaluate_affine(self, center: torch.Tensor, directions: torch.Tensor, coeffs: torch.Tensor,
                        split: str = "train", block: int = 512) -> dict[str, torch.Tensor]:
        """Loss and accuracy at theta_{m,g} = center_m + sum_j coeffs[m, g, j] directions[m, j].

        Shapes: center ``(P,)`` or ``(M, P)``; directions ``(J, P)`` or ``(M, J, P)``; coeffs ``(G, J)`` or
        ``(M, G, J)``; results ``(G,)`` or ``(M, G)``. M families (paths, planes) of G points each.
        For an MLP the first layer's pre-activations are affine in theta, so
        z_{m,g} = Z_{m,0} + sum_j c_{m,g,j} Z_{m,j} with Z_{m,j} = X W_{m,j}^T + b_{m,j}: J+1 products per
        family and data chunk serve all G points (exact; fused on the CPU for one hidden layer). Other models
        evaluate the points as replicas.
        """
        single, basis, cc_all = self._affine_setup(center, directions, coeffs)
        m, g_total = basis.shape[0], cc_all.shape[1]
        x_all, y_all = self.data[choice("split", split, tuple(self.data))]
        out = self.backend.affine_sums(basis, cc_all, x_all, y_all, self.memory_mb)
        if out is not None:  # one GEMM per basis vector and data chunk, then one fused pass per grid point
            n_total = max(len(y_all), 1)
            res = {"loss": (out[0] / n_total).view(m, g_total).to(self.dtype),
                   "accuracy": (out[1] / n_total).view(m, g_total).to(self.dtype)}
            return {k: v[0] for k, v in res.items()} if single else res
        shortcut = None
        if self.backend.first_layer_affine:
            def shortcut(theta, cc, loss_sum, correct):
                step = max(1, self.chunk_size(theta.shape[0]) // 2)
                self.backend.affine_into(theta, basis, cc, x_all, y_all, step, self._loss, loss_sum, correct)
                n_total = len(y_all)
                loss_sum /= n_total
                correct /= n_total
        loss_sum, correct = self._affine_blocks(basis, cc_all, split, block, shortcut)
        res = {"loss": loss_sum.to(self.dtype), "accuracy": correct.to(self.dtype)}
        return {k: v[0] for k, v in res.items()} if single else res

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
        out.bn_policy = out.bn_policy.with_frozen(self.bn_policy.frozen)
        return out
