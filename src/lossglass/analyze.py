"""Three lines for one's own model: ``lossglass.analyze(model, data, loss=...)``.

Any ``torch.nn.Module`` (or a list of them, same architecture) and any data (a ``DataLoader`` or other iterable of
``(inputs, labels)`` batches, one ``(inputs, labels)`` batch, or a :class:`~lossglass.datasets.Dataset`) give, with
no :class:`~lossglass.problem.Problem`, run folder or config to write::

    import lossglass as lg
    res = lg.analyze(model, loader, loss="cross_entropy")
    print(res.table)          # loss, accuracy, top Hessian eigenvalue, trace, sharpness
    print(res.layers)         # per weight matrix, no data needed: norms, stable rank, power-law alpha

and for a list of models, ``res.pairs``: the loss barrier on the straight path between every pair before and after
aligning their hidden units (when the permutation symmetry can be derived), and their weight overlap.

The energy is the mean loss over the data given, ``E(theta) = (1/N) sum_i loss(f_theta(x_i), y_i)``; BatchNorm
layers keep the model's own running statistics (eval mode, ``batchnorm="module"``), so every number describes the
model exactly as ``model.eval()`` computes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from .datasets import Dataset, from_tensors
from .errors import LossglassError, check


@dataclass
class Analysis:
    """What :func:`analyze` measured: ``table`` (one row per model), ``layers`` (one row per model and weight
    matrix), ``pairs`` (one row per pair of models; empty for one model), ``plane`` (a
    :class:`~lossglass.protocols.connect.PlaneResult` around the first model when asked for), ``problem`` (the
    :class:`~lossglass.problem.Problem` built, for every other lossglass protocol) and ``theta`` (``(K, P)``)."""

    table: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    plane: object | None = None
    problem: object | None = None
    theta: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        parts = [self.table.to_string(index=False)]
        if len(self.pairs):
            parts.append(self.pairs.to_string(index=False))
        parts += self.notes
        return "\n\n".join(parts)


class _Reshaped(nn.Module):
    """The user's module fed inputs of their original shape (lossglass stores them flattened)."""

    def __init__(self, model: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.model, self.shape = model, tuple(shape)

    def forward(self, x):
        return self.model(x.reshape(-1, *self.shape))  # traceable by torch.fx (the symmetry is derived through it)


def _as_dataset(data, n_classes: int | None) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        from .byo import _materialise

        try:
            x, y = _materialise(data, "data")
        except TypeError:
            raise LossglassError(f"data must be a DataLoader (or any iterable of (inputs, labels) batches), one "
                                 f"(inputs, labels) batch or a lossglass Dataset; got {type(data).__name__}") from None
    # one data set: the energy and every measure use all of it (the 'test' split is the same data)
    return from_tensors(x, y, x, y, n_classes=n_classes, name="data")


def power_law_alpha(eigenvalues: torch.Tensor, min_tail: int = 10) -> tuple[float, float, int]:
    """The exponent of a power-law tail p(x) ~ x^(-alpha), x >= x_min, of positive ``eigenvalues``: for every
    candidate x_min (each value with at least ``min_tail`` values at or above it) the continuous maximum-likelihood
    estimate alpha = 1 + n / sum_i ln(x_i / x_min), and the x_min whose fitted CDF is closest to the empirical one
    in Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman 2009, eqs. 3.1 and 3.9; the fit WeightWatcher applies
    to the eigenvalues of W^T W, Martin & Mahoney 2021). All candidates in one batched pass. Returns
    (alpha, x_min, tail size); NaN when fewer than ``min_tail`` positive values."""
    x = torch.sort(eigenvalues.detach().double().flatten()).values
    x = x[x > x.max() * 1e-12] if len(x) else x
    n = len(x)
    if n < min_tail:
        return float("nan"), float("nan"), 0
    cand = torch.arange(0, n - min_tail + 1)  # tails x[i:], each at least min_tail long
    logx = x.log()
    csum = torch.cat([torch.zeros(1, dtype=x.dtype), logx.flip(0).cumsum(0)]).flip(0)  # csum[i] = sum_{j >= i} ln x_j
    size = (n - cand).double()
    s = csum[cand] - size * logx[cand]
    alpha = 1 + size / s.clamp_min(1e-300)
    # KS distance of each candidate's tail: empirical CDF (j - i) / size at the sorted tail values vs the fit
    j = torch.arange(n)
    rel = (j.unsqueeze(0) - cand.unsqueeze(1)).double()  # (C, n): rank within the tail
    inside = rel >= 0
    ratio = (x.unsqueeze(0) / x[cand].unsqueeze(1)).clamp_min(1.0)
    fit = 1 - ratio ** (1 - alpha.unsqueeze(1))
    emp_hi, emp_lo = (rel + 1) / size.unsqueeze(1), rel / size.unsqueeze(1)
    gap = torch.maximum((emp_hi - fit).abs(), (emp_lo - fit).abs()).masked_fill(~inside, 0)
    ks = gap.max(1).values
    best = int(torch.argmin(ks))
    return float(alpha[best]), float(x[best]), int(size[best])


def layer_measures(model: nn.Module) -> pd.DataFrame:
    """Per weight matrix (every parameter with at least two dimensions, reshaped to ``(out, rest)``), with no data:
    the Frobenius norm |W|_F, the spectral norm |W|_2 (largest singular value), the stable rank |W|_F^2 / |W|_2^2
    (Rudelson & Vershynin 2007) and the power-law exponent alpha of the eigenvalues of W^T W (:func:`power_law_alpha`;
    NaN for matrices with fewer than 10 singular values)."""
    rows = []
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        w = p.detach().double().reshape(p.shape[0], -1).cpu()
        sv = torch.linalg.svdvals(w)
        fro, spec = float(w.norm()), float(sv[0])
        alpha, xmin, tail = power_law_alpha(sv**2)
        rows.append({"layer": name.removeprefix("model.") if isinstance(model, _Reshaped) else name,
                     "shape": "x".join(map(str, p.shape)), "frobenius_norm": fro, "spectral_norm": spec,
                     "stable_rank": fro**2 / spec**2 if spec > 0 else float("nan"), "alpha": alpha, "alpha_tail": tail})
    return pd.DataFrame(rows)


def analyze(models, data, loss: str = "cross_entropy", *, n_classes: int | None = None, trace_probes: int = 9,
            rho: float = 0.05, plane: bool = False, plane_steps: int = 11, device: str = "cpu",
            memory_mb: float = 256.0, seed: int = 0) -> Analysis:
    """Measure one model, or a list of models of one architecture, on ``data`` (a ``DataLoader`` or any iterable of
    ``(inputs, labels)`` batches, one ``(inputs, labels)`` batch, or a lossglass ``Dataset``).

    Per model (``table``): the energy E (mean ``loss`` over the data) and accuracy; the largest Hessian eigenvalue
    lambda_max by Lanczos (:func:`lossglass.curvature.top_eigenvalues`); tr H by Hutch++ with ``trace_probes``
    probes and its standard error (:func:`lossglass.curvature.trace`); the average sharpness
    E_u[E(theta + rho |theta| u)] - E(theta) over 16 random filter-normalised unit directions
    (:func:`lossglass.sharpness`). Per weight matrix (``layers``, no data): :func:`layer_measures`. For two or more
    models (``pairs``): for every pair, the loss barrier max_t E((1 - t) a + t b) - ((1 - t) E(a) + t E(b)) on the
    straight path before and after aligning b's hidden units to a's (:func:`lossglass.pair_barriers`; naive only
    when the permutation symmetry cannot be derived, said in ``notes``), and the weight overlap
    q_ab = <a, b> / (|a| |b|). ``plane=True``: the loss on a ``plane_steps`` x ``plane_steps`` grid of two random
    filter-normalised directions around the first model (:func:`lossglass.plane`).

    BatchNorm keeps each model's own running statistics (eval mode). The models are not modified."""
    from ._determinism import pin_once
    from .problem import Problem
    from .protocols.connect import interpolate
    from .protocols.connect import plane as plane_fn
    from .protocols.curvature import sharpness, top_eigenvalues, trace

    pin_once()  # the thread count and OpenMP teams that fix the bits (lossglass._determinism)
    many = isinstance(models, (list, tuple))
    models = list(models) if many else [models]
    check(len(models) > 0 and all(isinstance(m, nn.Module) for m in models),
          "models must be a torch.nn.Module or a non-empty list of them")
    ds = _as_dataset(data, n_classes)
    first = models[0]
    try:
        with torch.no_grad():
            was = first.training
            first.eval()
            first(ds.x_train[:2])
            first.train(was)
        wrap = False
    except Exception:  # noqa: BLE001 - the model wants its inputs in their original shape
        wrap = True
    if wrap:
        check(len(ds.shape) > 1, f"the model does not run on inputs of shape {tuple(ds.x_train.shape[1:])}")
        models = [_Reshaped(m, ds.shape) for m in models]
    try:
        prob = Problem(models[0], ds, loss=loss, device=device, batchnorm="module", memory_mb=memory_mb)
    except LossglassError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model fails on the data: one line, not a traceback from inside
        raise LossglassError(f"the model does not run on inputs of shape {tuple(ds.shape) or ds.in_dim}: "
                             f"{type(e).__name__}: {e}") from None
    names = [n for n, _ in prob.model.named_parameters()]
    for i, m in enumerate(models[1:], 1):
        check([n for n, _ in m.named_parameters()] == names,
              f"model {i} has other parameters than model 0: every model of a list must share one architecture")
    theta = torch.stack([prob.flatten(m) for m in models])
    ev = prob.evaluate(theta, "train")
    eig = top_eigenvalues(prob, theta, k=1, tol=1e-3, seed=seed)
    tr = trace(prob, theta, n_probes=trace_probes, seed=seed)
    sh = sharpness(prob, theta, rho=rho, seed=seed)
    table = pd.DataFrame({"model": range(len(models)), "n_params": prob.n_params,
                          "loss": ev["loss"].cpu().numpy(), "accuracy": ev["accuracy"].cpu().numpy(),
                          "top_eigenvalue": eig.values[:, 0].cpu().numpy(),
                          "trace": tr["trace"].cpu().numpy(), "trace_stderr": tr["stderr"].cpu().numpy(),
                          "sharpness": sh.cpu().numpy()})
    layers = pd.concat([layer_measures(m).assign(model=i) for i, m in enumerate(models)], ignore_index=True)
    layers = layers[["model"] + [c for c in layers.columns if c != "model"]]
    notes: list[str] = []
    pairs = pd.DataFrame()
    if len(models) >= 2:
        pairs, note = _pairs(prob, theta, interpolate)
        if note:
            notes.append(note)
    pl = plane_fn(prob, theta[0], steps=plane_steps, seed=seed) if plane else None
    return Analysis(table, layers, pairs, pl, prob, theta, notes)


def _pairs(prob, theta: torch.Tensor, interpolate) -> tuple[pd.DataFrame, str | None]:
    from .protocols.connect import pair_barriers
    from .symmetry import spec_of

    idx = list(itertools.combinations(range(theta.shape[0]), 2))
    a = [i for i, _ in idx]
    b = [j for _, j in idx]
    unit = theta / theta.norm(dim=1, keepdim=True).clamp_min(1e-30)
    q = (unit @ unit.T).cpu().numpy()
    try:
        spec_of(prob)
        inter = torch.stack([theta[k] for pair in idx for k in pair])
        df, _, _ = pair_barriers(prob, inter, pairs=len(idx))
        df["a"], df["b"] = a, b
        note = None
    except LossglassError as e:
        naive = interpolate(prob, theta[a], theta[b])
        df = pd.DataFrame({"a": a, "b": b, "barrier_naive": [p.barrier for p in naive],
                           "barrier_aligned": np.nan, "distance_naive": (theta[b] - theta[a]).norm(dim=1).cpu().numpy()})
        note = f"no aligned barriers: the model's permutation symmetry could not be derived ({e})"
    df["overlap"] = [float(q[i, j]) for i, j in idx]
    keep = [c for c in ("a", "b", "barrier_naive", "barrier_aligned", "distance_naive", "distance_aligned", "overlap")
            if c in df.columns]
    return df[keep].reset_index(drop=True), note


__all__ = ["Analysis", "analyze", "layer_measures", "power_law_alpha"]
