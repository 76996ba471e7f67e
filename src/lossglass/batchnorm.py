"""BatchNorm in a loss landscape: which statistics normalise the layer at a point theta, as one policy object.

A BatchNorm layer computes y = (h - mu) / sqrt(sigma^2 + eps) w + b per channel (Ioffe & Szegedy 2015). As a
function of theta the energy depends on where (mu, sigma^2) come from; :class:`BatchNormPolicy` holds that choice:

- ``"recompute"``: the statistics of the whole training set at the evaluated point, layer by layer (each layer's
  statistics computed with the earlier layers normalised by theirs), the choice of Garipov et al. 2018 and
  REPAIR (Jordan et al. 2023) for paths, planes and walks. They depend on theta, and the exact gradient follows
  them (:func:`exact_energy_and_grad`).
- ``"batch"``: each consecutive block of ``bn_batch`` training samples normalised by its own statistics
  (training mode, whatever the number of replicas evaluated together).
- ``"fixed"``: statistics frozen at one point (what a module in ``eval()`` mode does while its weights move);
  :meth:`BatchNormPolicy.frozen_at` makes such a policy.
- ``"module"``: a module's own stored statistics (eval mode), made canonical (0, 1) and folded into the affine
  parameters (:func:`fold_statistics`), so each replica carries its own.

``"auto"`` is resolved by the problem: ``"recompute"``, or ``"module"`` for a free-form module that does not
declare ``lossglass_batchnorm = "recompute"``.

Example (a policy decides the BatchNorm batches and the statistics passed to each forward pass):

    >>> import torch
    >>> pol = BatchNormPolicy("batch", layers=(1,), bn_batch=4)
    >>> pol.group
    4
    >>> [len(yb) for _, yb in pol.chunks(torch.zeros(10, 1), torch.zeros(10), step=5)]   # whole batches of 4
    [4, 4, 2]
    >>> fixed = BatchNormPolicy("recompute", layers=(1,)).frozen_at({1: (torch.zeros(2), torch.ones(2))})
    >>> fixed.mode, fixed.evaluation_statistics(3, compute=None)[1][0].shape
    ('fixed', torch.Size([6]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import check, choice

MODES = ("auto", "recompute", "batch", "fixed", "module")
#: modes a problem runs in once "auto" is resolved
RESOLVED = ("recompute", "batch", "fixed", "module")

Statistics = dict  # {op index: (mean (K*C,), biased variance (K*C,))}
#: torch's base class of BatchNorm1d/2d/3d (a torch-private name, read in this one place)
BATCHNORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm layer (1d, 2d, 3d or SyncBatchNorm)."""
    return isinstance(module, BATCHNORM_TYPES)


@dataclass(frozen=True)
class BatchNormPolicy:
    """Which statistics normalise each BatchNorm layer (see the module docstring).

    ``mode``: one of ``recompute``, ``batch``, ``fixed``, ``module``. ``layers``: the indices (in the layer stack or
    traced graph) of the BatchNorm ops whose statistics the problem supplies; empty for a model without BatchNorm,
    for an MLP and in module mode (the statistics are the module's), in which case every rule below is the plain
    no-BatchNorm one. ``bn_batch``: the BatchNorm batch of ``batch`` mode. ``frozen``: the statistics of ``fixed``
    mode, ``{op: (mean, var)}`` for one point.

    Immutable: freezing the statistics gives a new policy (:meth:`frozen_at`), so a problem that freezes them is a
    new problem."""

    mode: str
    layers: tuple[int, ...] = ()
    bn_batch: int = 128
    frozen: Statistics | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        choice("batchnorm mode", self.mode, RESOLVED)
        check(isinstance(self.bn_batch, int) and self.bn_batch >= 2,
              f"bn_batch must be an int >= 2, got {self.bn_batch!r}")

    @property
    def supplies_statistics(self) -> bool:
        """Whether some BatchNorm layer is normalised by statistics this policy chooses (False: none, or module
        mode)."""
        return bool(self.layers)

    @property
    def group(self) -> int | None:
        """The BatchNorm batch every forward pass over the data uses: ``bn_batch`` in batch mode, else None."""
        return self.bn_batch if self.layers and self.mode == "batch" else None

    def chunks(self, x: torch.Tensor, y: torch.Tensor, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive chunks of about ``step`` samples; in batch mode each chunk is a whole number of BatchNorm
        batches of ``bn_batch`` samples (at least one), or the shorter last batch alone."""
        if self.layers and self.mode == "batch":
            bb = self.bn_batch
            step = bb * max(1, step // bb)
            full = len(x) - len(x) % bb
            for i in range(0, full, step):
                j = min(i + step, full)
                yield x[i:j], y[i:j]
            if full < len(x):
                yield x[full:], y[full:]
            return
        for i in range(0, len(x), step):
            yield x[i:i + step], y[i:i + step]

    def evaluation_statistics(self, k: int, compute: Callable[[], Statistics] | None) -> Statistics | None:
        """The statistics :meth:`~lossglass.problem.Problem.evaluate` normalises K replicas with: None without
        supplied statistics or in batch mode (each batch its own), the frozen ones repeated K times in fixed mode,
        else ``compute()`` (the training-set statistics at the point)."""
        if not self.layers or self.mode == "batch":
            return None
        if self.mode == "fixed":
            check(self.frozen is not None, "batchnorm='fixed' needs statistics frozen at a point first: "
                  "problem = problem.with_frozen_batchnorm(theta)")
            return {i: tuple(t.repeat(k) for t in st) for i, st in self.frozen.items()}
        return compute()

    def chunk_statistics(self, k: int) -> Statistics | None:
        """Statistics passed to each chunk's forward pass by the chunk-wise derivatives: the frozen ones in fixed
        mode; None otherwise (batch mode: each BatchNorm batch's own; recompute in one chunk: the chunk is the
        whole training set, so its batch statistics are the training-set statistics, theta-dependence included)."""
        return self.evaluation_statistics(k, None) if self.layers and self.mode == "fixed" else None

    def needs_statistics_derivative(self, chunked: bool) -> bool:
        """Recompute mode over more than one chunk: the chunk-wise derivative would use each chunk's statistics,
        so the exact one (:func:`exact_energy_and_grad`) is needed."""
        return bool(self.layers) and self.mode == "recompute" and chunked

    def frozen_at(self, stats: Statistics) -> BatchNormPolicy:
        """A new policy in fixed mode with the statistics ``stats`` of one point; without supplied statistics
        (no BatchNorm, or module mode) the policy itself (nothing to freeze)."""
        if not self.layers:
            return self
        return replace(self, mode="fixed", frozen=stats)

    def with_frozen(self, stats: Statistics) -> BatchNormPolicy:
        """The same mode with ``frozen`` replaced."""
        return replace(self, frozen=stats)


# ---------------------------------------------------------------------------- statistics and their derivative
def layerwise_statistics(theta: torch.Tensor, chunks: Callable[[], Iterable], keys: Iterable[int],
                         dtype: torch.dtype, moments: Callable) -> tuple[Statistics, list]:
    """Training-set statistics of each BatchNorm layer ``i`` in ``keys`` at ``theta``, layer by layer: with the
    per-channel sums s1 = sum_n h_n, s2 = sum_n h_n^2 over the n samples of the layer's input (earlier layers
    normalised by the statistics already found),

        mean = s1 / n,   var = s2 / n - mean^2   (biased: the training set as the population),

    accumulated in double precision over ``chunks()`` (called once per layer). ``moments(theta, x, stats, i)`` gives
    ``(s1, s2, n)`` of chunk x. Returns the statistics ``{i: (mean, var)}`` in ``dtype`` and the list of
    ``(mean in float64, n)`` per layer (what the exact gradient pulls back through)."""
    stats: Statistics = {}
    out = []
    for i in keys:
        s1 = s2 = 0
        cnt = 0
        for xb, _ in chunks():
            a, b, n = moments(theta, xb, stats, i)
            s1, s2, cnt = s1 + a, s2 + b, cnt + n
        mean = s1 / cnt
        stats[i] = (mean.to(dtype), (s2 / cnt - mean**2).clamp_min(0).to(dtype))
        out.append((mean, cnt))
    return stats, out


def exact_energy_and_grad(theta: torch.Tensor, chunks: list, keys: list[int], dtype: torch.dtype, *,
                          output: Callable, moments: Callable, loss: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """E and dE/dtheta for BatchNorm with training-set statistics, chunked, by explicit reverse accumulation
    through the statistics. With S_j = (mean_j, var_j) the statistics of BatchNorm layer j (j = 1..L, each
    computed with the earlier layers normalised by theirs),

        dE/dtheta = dE/dtheta|_S + sum_j (dE/dS_j)_total dS_j/dtheta|_{S_<j},
        (dE/dS_i)_total = dE/dS_i|_S + sum_{j > i} (dE/dS_j)_total dS_j/dS_i|_{S_<j, theta},

    where S_j = (s1/n, s2/n - (s1/n)^2) from the sums s1 = sum h, s2 = sum h^2 of the layer's input over the
    training set. One pass with S as explicit leaves gives the partial derivatives (torch.func.vjp per chunk);
    a reverse sweep j = L..1 pulls (dE/dS_j)_total back through s1, s2 (one more pass over the chunks each,
    the chunk recomputed up to layer j). No autograd graph spans two chunks, so memory stays per chunk, and the
    procedure is a pure function of theta: a Hessian-vector product differentiates it in forward mode
    (torch.func.jvp). Cost: L passes for the statistics, 1 forward/backward pass, and L partial ones.

    ``output(theta, x, stats)``: the outputs ``(K, n, C)`` of chunk x with the statistics ``stats`` supplied;
    ``moments(theta, x, stats, i)``: ``(s1, s2, n)`` of layer i's input (see :func:`layerwise_statistics`);
    ``loss(out, y)``: per-sample losses ``(K, n)``; ``chunks``: the training set as a list of ``(x, y)``."""
    from torch.func import vjp

    k = theta.shape[0]
    n_total = sum(len(yb) for _, yb in chunks)
    stats, moms = layerwise_statistics(theta, lambda: chunks, keys, dtype, moments)
    st = tuple(stats[i] for i in keys)
    e = torch.zeros(k, device=theta.device, dtype=dtype)
    g = torch.zeros_like(theta)
    gs = [(torch.zeros_like(m_), torch.zeros_like(v_)) for m_, v_ in st]
    for xb, yb in chunks:  # partial derivatives with the statistics held fixed
        def chunk_loss(th, st_, xb=xb, yb=yb):
            return loss(output(th, xb, dict(zip(keys, st_))), yb).sum(1) / n_total

        val, back = vjp(chunk_loss, theta, st)
        gth, gst = back(torch.ones_like(val))
        e, g = e + val, g + gth
        gs = [(a + c, b + d) for (a, b), (c, d) in zip(gs, gst)]
    for j in reversed(range(len(keys))):  # reverse sweep through the statistics
        mean, cnt = moms[j]
        a_mean, a_var = gs[j][0].double(), gs[j][1].double()
        cot = ((a_mean - 2 * mean * a_var) / cnt, a_var / cnt)  # d/ds1, d/ds2 of (mean, var) -> E
        for xb, _ in chunks:
            def chunk_sums(th, st_prev, xb=xb, j=j):
                return moments(th, xb, dict(zip(keys[:j], st_prev)), keys[j])[:2]

            _, back = vjp(chunk_sums, theta, st[:j])
            gth, gprev = back(cot)
            g = g + gth
            gs[:j] = [(a + c, b + d) for (a, b), (c, d) in zip(gs[:j], gprev)]
    return e, g


# ---------------------------------------------------------------------------- module mode: stored statistics
def canonical_statistics(model: nn.Module) -> None:
    """Set every BatchNorm's running statistics to mean 0, variance 1 (module mode; see :func:`fold_statistics`).
    A layer without affine parameters keeps its statistics (nothing could carry them)."""
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.affine and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)


def fold_statistics(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    device: torch.device, source: str = "state") -> dict[str, torch.Tensor]:
    """Parameters with a module's stored BatchNorm statistics folded into the affine parameters (module mode).

    In eval mode BatchNorm is the per-channel affine map y = (h - m) w / sqrt(v + eps) + b. With the problem's
    canonical statistics (m, v) = (0, 1) held by ``model`` the same map is y = h w' / sqrt(1 + eps) + b' with

        w' = w sqrt(1 + eps) / sqrt(v + eps),   b' = b - m w / sqrt(v + eps),

    so every replica carries its own statistics in theta, and permutations, paths and walks move them with their
    channels. Parameters of other layers, and layers whose ``buffers`` are missing, are returned unchanged; a
    BatchNorm without affine parameters whose statistics differ from the model's is refused (``source`` names the
    file or module in the message). Returns a new dict.

    Example (one channel with stored mean 1 and variance 4: the folded layer computes the same map):

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.BatchNorm1d(1)).eval()
        >>> canonical_statistics(net)
        >>> p = fold_statistics(net, {"0.weight": torch.ones(1), "0.bias": torch.zeros(1)},
        ...                     {"0.running_mean": torch.ones(1), "0.running_var": torch.full((1,), 4.0)}, "cpu")
        >>> net[0].weight.data, net[0].bias.data = p["0.weight"], p["0.bias"]
        >>> with torch.no_grad():
        ...     round(float(net(torch.tensor([[3.0]]))), 4)                 # (3 - 1) / sqrt(4 + eps)
        1.0
    """
    out = dict(params)
    for name, m in model.named_modules():
        if not is_batchnorm(m) or m.running_mean is None:
            continue
        pre = f"{name}." if name else ""
        mean, var = buffers.get(pre + "running_mean"), buffers.get(pre + "running_var")
        if mean is None or var is None:
            continue
        mean, var = mean.to(device, torch.float64), var.to(device, torch.float64)
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
        w64 = w.to(device, torch.float64)
        out[pre + "weight"] = (w64 * scale).to(dt)
        out[pre + "bias"] = (b.to(device, torch.float64) - (mean - ref_mean) * w64 / torch.sqrt(var + m.eps)).to(dt)
    return out
