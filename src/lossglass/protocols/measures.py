"""Which measure predicts generalisation (issue 26): the measures of Jiang et al. (2020, "Fantastic generalization
measures and where to find them", ICLR) and of WeightWatcher (Martin & Mahoney 2021, "Predicting trends in the
quality of state-of-the-art neural networks without access to training or testing data", Nat. Commun. 12:4122),
computed for K replicas at once, and the statistics that rank them on a designed grid of hyperparameters.

Every measure is written as a *complexity* (larger = predicted to generalise worse); measures where larger means
flatter or safer (margin, sigma, local entropy, basin radius) enter the ranking through their inverse or negative,
named in :data:`COMPLEXITY`. The statistics (:func:`rank_measures`) are Kendall's tau-b of each complexity with the
generalisation gap over all networks, Jiang's granulated tau per hyperparameter axis (the tau over networks that
differ in that axis only, averaged over the values of the other axes) and their mean Psi, each with a bootstrap
interval over seeds, and Jiang's conditional mutual information.

Scale symmetry: a ReLU network with its hidden layer rescaled (W1, b1) -> (c W1, c b1), W2 -> W2 / c computes the same
function (Dinh et al. 2017). The margin, the path norm, the products of layer norms, the magnitude-aware PAC-Bayes
sigma (eps = 0), the power-law alpha and the stable rank are unchanged by it; the weight norm, the isotropic
PAC-Bayes sigma, lambda_max and alpha-hat move (tests/test_measures.py checks both, the latter by the predicted
amount where there is a closed form).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import check
from ..problem import Problem

#: complexity form of every measure the ranking uses: column -> (source column, orientation); the complexity is
#: ``orientation * source`` except for "inverse-square" (1 / source^2, Jiang's inverse margin and PAC-Bayes forms)
COMPLEXITY: dict[str, tuple[str, str]] = {
    "lambda_max": ("lambda_max", "+"),
    "hessian_trace": ("hessian_trace", "+"),
    "sharpness_average": ("sharpness_average", "+"),
    "sharpness_worst": ("sharpness_worst", "+"),
    "neg_local_entropy": ("local_entropy", "-"),
    "neg_basin_radius": ("basin_radius_relative", "-"),
    "weight_norm": ("weight_norm", "+"),
    "pacbayes_flatness": ("pacbayes_sigma", "inverse-square"),
    "pacbayes_mag_flatness": ("pacbayes_mag_sigma", "inverse-square"),
    "log_path_norm": ("log_path_norm", "+"),
    "log_spec_product": ("log_spec_product", "+"),
    "log_frob_product": ("log_frob_product", "+"),
    "inverse_margin": ("margin", "inverse-square"),
    "ww_alpha": ("ww_alpha", "+"),
    "ww_alpha_hat": ("ww_alpha_hat", "+"),
    "ww_stable_rank": ("ww_stable_rank", "+"),
}


#: the raw measures :func:`measure_table` writes for every replica (the measures stage's table of the study's replicas)
RAW: tuple[str, ...] = ("weight_norm", "log_spec_product", "log_frob_product", "log_path_norm", "margin",
                        "pacbayes_sigma", "pacbayes_mag_sigma", "ww_alpha", "ww_alpha_hat", "ww_stable_rank")
#: every column of that table a measure can be read from: the raw measures and their complexity forms
REPLICA_MEASURES: tuple[str, ...] = RAW + tuple(k for k, (src, _) in COMPLEXITY.items() if src in RAW and k not in RAW)


def complexity(df: pd.DataFrame) -> pd.DataFrame:
    """The complexity columns of :data:`COMPLEXITY` from a table of raw measures (those whose source is present).
    Inverse-square of a value <= 0 is +inf (no margin / no flat direction: maximal complexity)."""
    out = {}
    for name, (src, how) in COMPLEXITY.items():
        if src not in df:
            continue
        v = df[src].to_numpy(float)
        if how == "inverse-square":
            with np.errstate(divide="ignore", invalid="ignore"):
                out[name] = np.where(v > 0, 1.0 / np.square(v), np.where(np.isnan(v), np.nan, np.inf))
        else:
            out[name] = v if how == "+" else -v
    return pd.DataFrame(out, index=df.index)


def with_complexity(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the complexity columns of :func:`complexity` added (identical ones kept once)."""
    return df.assign(**{k: v for k, v in complexity(df).items()})


# ---------------------------------------------------------------------------- layers
def layer_matrices(problem: Problem, theta: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every weight tensor of ``theta`` ``(K, P)`` with two or more dimensions, as a batch of matrices
    ``(K, out, fan_in)`` (a convolution kernel ``(out, in, k, k)`` as ``(out, in k k)``), in layout order."""
    out = []
    for e in problem.layout:
        if len(e.shape) >= 2:
            out.append((e.name, theta[:, e.slice].reshape(theta.shape[0], e.shape[0], -1)))
    return out


def _mlp_chain(problem: Problem) -> list[tuple[str, str | None]] | None:
    """(weight, bias) names of a plain ReLU MLP (alternating 2-D weight / 1-D bias in layout order), else None."""
    if not problem.is_mlp:
        return None
    acts = [op for kind, op in problem.backend.plan if kind == "act"]
    if not all(a is torch.relu for a in acts):
        return None
    names = [(e.name, len(e.shape)) for e in problem.layout]
    chain, i = [], 0
    while i < len(names):
        if names[i][1] != 2:
            return None
        b = names[i + 1][0] if i + 1 < len(names) and names[i + 1][1] == 1 else None
        chain.append((names[i][0], b))
        i += 2 if b else 1
    return chain


# ---------------------------------------------------------------------------- norm-based measures
def norm_measures(problem: Problem, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Norm-based measures per replica (Jiang et al. 2020, sec. 6 / appendix C; Neyshabur et al. 2015, 2017):

    - ``weight_norm`` = |theta|_2 (every parameter, as the curvature stage);
    - ``log_spec_product`` = sum_l log |W_l|_2^2 (log of the product of squared spectral norms);
    - ``log_frob_product`` = sum_l log |W_l|_F^2 (log of the product of squared Frobenius norms);
    - ``log_path_norm`` = log sum_i f_{theta^2}(1)_i: the network with every parameter squared applied to the
      all-ones input, summed over outputs; for a ReLU MLP this is the sum over input-output paths of the product of
      squared weights (biases as paths from a constant unit). NaN for other architectures.

    Products of layer norms and the path norm are invariant under the ReLU rescaling W_l -> c W_l, W_{l+1} -> W_{l+1}/c;
    the weight norm is not."""
    theta = theta.detach()
    mats = layer_matrices(problem, theta)
    k = theta.shape[0]
    spec = torch.zeros(k, dtype=torch.float64, device=theta.device)
    frob = torch.zeros_like(spec)
    for _, w in mats:
        sv = torch.linalg.svdvals(w.double())
        spec += 2 * torch.log(sv[:, 0])
        frob += torch.log(sv.square().sum(-1))
    out = {"weight_norm": theta.norm(dim=1).double(), "log_spec_product": spec, "log_frob_product": frob}
    chain = _mlp_chain(problem)
    if chain is None:
        out["log_path_norm"] = torch.full_like(spec, float("nan"))
    else:
        first = problem.layout[chain[0][0]].shape[1]
        v = torch.ones(k, first, dtype=torch.float64, device=theta.device)
        for wn, bn in chain:  # a handful of layers; every replica at once
            w = problem.layout.view(theta, wn).reshape(k, *problem.layout[wn].shape).double().square()
            v = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
            if bn is not None:
                v = v + problem.layout.view(theta, bn).reshape(k, -1).double().square()
        out["log_path_norm"] = torch.log(v.sum(1))
    return out


# ---------------------------------------------------------------------------- output margin
def output_margin(problem: Problem, theta: torch.Tensor, *, quantile: float = 0.1) -> torch.Tensor:
    """The ``quantile`` (Jiang et al. use the 10th percentile) over training samples of the output margin
    gamma_n = f(x_n)_{y_n} - max_{j != y_n} f(x_n)_j, per replica ``(K,)``. Jiang's "inverse margin" complexity is
    1 / gamma^2 (:func:`complexity`). Unchanged by any reparametrisation that keeps the function. The margins come
    from :meth:`lossglass.Problem.predictions` (chunked, evaluate's BatchNorm statistics)."""
    check(0 < quantile < 1, f"quantile must be in (0, 1), got {quantile}")
    gam = problem.predictions(theta.detach(), "train")["margin"]
    return torch.quantile(gam, quantile, dim=1)


# ---------------------------------------------------------------------------- PAC-Bayes flatness
def pac_bayes_sigma(problem: Problem, theta: torch.Tensor, *, magnitude: bool = False, target: float = 0.1,
                    n_draws: int = 8, eps: float = 1e-3, iters: int = 16, bounds: tuple[float, float] = (1e-5, 10.0),
                    seed: int = 0) -> torch.Tensor:
    """The PAC-Bayes flatness scale of Jiang et al. (2020, eqs. 46-50 / "pacbayes.flatness", "pacbayes.mag.flatness"):
    the largest sigma such that the expected training error under a Gaussian perturbation rises by at most
    ``target`` (Jiang: 0.1),

        E_u[err(theta + u)] - err(theta) <= target,
        u ~ N(0, sigma^2 I)                                  (isotropic),
        u_i ~ N(0, sigma^2 theta_i^2 + eps^2)                (``magnitude``: Keskar-style, scale-aware).

    Found by bisection on log sigma in ``bounds`` (``iters`` halvings), every replica and draw in one batched
    evaluation per step, with common random numbers (the same ``n_draws`` standard normal draws xi per replica at
    every sigma, u = sigma xi or u = sqrt(sigma^2 theta^2 + eps^2) xi): deterministic for a seed. Returns sigma
    ``(K,)``; Jiang's complexity is 1 / sigma^2. With ``magnitude`` and eps = 0 it is exactly invariant under any
    positive rescaling that keeps the function (u rescales with theta)."""
    check(0 < target < 1, f"target (the allowed rise of the training error) must be in (0, 1), got {target}")
    check(n_draws >= 1 and iters >= 1, f"n_draws and iters must be >= 1, got {n_draws}, {iters}")
    check(0 < bounds[0] < bounds[1], f"bounds must be 0 < low < high, got {bounds}")
    theta = theta.detach()
    k, p = theta.shape
    g = torch.Generator().manual_seed(int(seed))
    xi = torch.randn(k, n_draws, p, generator=g, dtype=theta.dtype).to(theta.device)
    base = 1 - problem.evaluate(theta, "train")["accuracy"].double()
    lo = torch.full((k,), math.log(bounds[0]), dtype=torch.float64, device=theta.device)
    hi = torch.full_like(lo, math.log(bounds[1]))
    scale = theta.abs().unsqueeze(1) if magnitude else None
    for _ in range(iters):  # bisection steps; every replica and draw evaluated together
        mid = 0.5 * (lo + hi)
        s = mid.exp().to(theta.dtype).view(k, 1, 1)
        u = (torch.sqrt((s * scale).square() + eps**2) if magnitude else s) * xi
        pert = (theta.unsqueeze(1) + u).reshape(k * n_draws, p)
        err = 1 - problem.evaluate(pert, "train")["accuracy"].double().view(k, n_draws)
        rise = torch.nan_to_num(err, nan=1.0).mean(1) - base
        ok = rise <= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return (0.5 * (lo + hi)).exp()


# ---------------------------------------------------------------------------- power laws (WeightWatcher's alpha)
@dataclass
class PowerLawFit:
    """A continuous power-law fit p(x) ~ x^-alpha for x >= xmin, per row: alpha, its standard error
    (alpha - 1) / sqrt(n_tail) (Clauset et al. 2009, eq. 3.2), xmin, the KS distance of the tail and n_tail."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    xmin: torch.Tensor
    ks: torch.Tensor
    n_tail: torch.Tensor


def fit_power_law(x: torch.Tensor, *, min_tail: int = 2, ks: str = "both") -> PowerLawFit:
    """Clauset, Shalizi & Newman (2009, SIAM Rev. 51:661) maximum-likelihood power-law fit, every row of ``x``
    ``(B, n)`` (positive values; NaN or <= 0 ignored) at once.

    For each candidate xmin = x_(i) (every observed value with at least ``min_tail`` values at or above it; the
    largest excluded, as the ``powerlaw`` package that WeightWatcher uses does) the MLE of the continuous power law
    on the tail is alpha = 1 + m / sum_{x_j >= xmin} ln(x_j / xmin) (m values), and its Kolmogorov-Smirnov distance
    D = max_j |S(x_j) - P(x_j)| with P(x) = 1 - (x / xmin)^(1 - alpha) and S the tail's empirical CDF (both sides of
    each step); xmin is the candidate with the smallest D. ``ks="lower"``: D against the lower end of each step only,
    max_j |P(x_j) - j / m| (WeightWatcher's own fit, ``WW_powerlaw.WWFit``, for 20 or more eigenvalues). Vectorised over
    rows and candidates ((B, n, n) work)."""
    check(x.ndim == 2, f"x must be (rows, values), got shape {tuple(x.shape)}")
    check(ks in ("both", "lower"), f"ks must be 'both' or 'lower', got {ks!r}")
    check(min_tail >= 2, f"min_tail must be >= 2, got {min_tail}")
    x = x.detach().double()
    b, n = x.shape
    x = torch.where(torch.isfinite(x) & (x > 0), x, torch.full_like(x, float("nan")))
    xs, _ = torch.sort(x, dim=1)  # NaN last
    valid = torch.isfinite(xs)
    nv = valid.sum(1)  # (B,)
    lx = torch.log(torch.where(valid, xs, torch.ones_like(xs)))
    # suffix sums of ln x over the valid values: S_i = sum_{j >= i, valid} ln x_j
    suffix = torch.flip(torch.cumsum(torch.flip(lx * valid, [1]), 1), [1])
    idx = torch.arange(n, device=x.device)
    m = (nv.unsqueeze(1) - idx).clamp_min(0)  # tail sizes (B, n)
    denom = suffix - m * lx
    alpha = 1 + m / denom.clamp_min(1e-300)
    cand = valid & (m >= min_tail) & (idx < (nv - 1).unsqueeze(1))
    # KS distance of each candidate's tail: rows i (candidate), columns j (tail value j >= i)
    jj = idx.view(1, 1, n)
    ii = idx.view(1, n, 1)
    in_tail = (jj >= ii) & valid.unsqueeze(1)
    ratio = torch.exp(lx.unsqueeze(1) - lx.unsqueeze(2))  # x_j / x_i
    model = 1 - ratio.pow(1 - alpha.unsqueeze(2))
    rank = (jj - ii).double()
    mm = m.unsqueeze(2).double().clamp_min(1)
    dist = (model - rank / mm).abs()
    if ks == "both":
        dist = torch.maximum(dist, (model - (rank + 1) / mm).abs())
    ks = torch.where(in_tail, dist, torch.zeros_like(dist)).amax(2)
    ks = torch.where(cand, ks, torch.full_like(ks, float("inf")))
    best = ks.argmin(1, keepdim=True)
    has = torch.isfinite(ks.gather(1, best)).squeeze(1)
    nan = torch.full((b,), float("nan"), dtype=torch.float64, device=x.device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return torch.where(has, t.gather(1, best).squeeze(1).double(), nan)

    a, mt = pick(alpha), pick(m.double())
    return PowerLawFit(alpha=a, sigma=(a - 1) / mt.sqrt(), xmin=pick(xs), ks=pick(ks), n_tail=mt)


def spectral_layers(problem: Problem, theta: torch.Tensor, *, min_evals: int = 8, min_tail: int = 2,
                    ks: str = "both") -> pd.DataFrame:
    """WeightWatcher-style spectral measures of every weight matrix of every replica (Martin & Mahoney 2021; the
    ``weightwatcher`` package's ``analyze``): the empirical spectral density of X = W^T W, i.e. the eigenvalues
    lambda_i = s_i^2 (s_i the singular values of W, a convolution kernel flattened to (out, in k k)), its power-law
    exponent ``alpha`` (:func:`fit_power_law`, tail lambda >= xmin), ``alpha_hat`` = alpha log10 lambda_max
    (WeightWatcher's "alpha_weighted"), the ``stable_rank`` |W|_F^2 / |W|_2^2 = sum_i lambda_i / lambda_max, and
    ``log_spectral_norm`` = log10 lambda_max. A layer with fewer than ``min_evals`` eigenvalues (min(out, fan_in)) is
    listed with NaN alpha (as WeightWatcher skips it). Rows: replica (position in ``theta``), layer, n_evals, ...

    alpha and the stable rank are scale-free (lambda -> c^2 lambda leaves them unchanged); alpha_hat moves by
    alpha log10 c^2."""
    rows = []
    for name, w in layer_matrices(problem, theta.detach()):  # a handful of layers; every replica at once
        ev = torch.linalg.svdvals(w.double()).square()  # (K, r) descending
        k, r = ev.shape
        lmax = ev[:, 0]
        sr = ev.sum(1) / lmax
        if r >= min_evals:
            fit = fit_power_law(ev, min_tail=min_tail, ks=ks)
        else:
            nan = torch.full((k,), float("nan"), dtype=torch.float64)
            fit = PowerLawFit(nan, nan, nan, nan, nan)
        rows.append(pd.DataFrame({
            "replica": np.arange(k), "layer": name, "n_evals": r, "alpha": fit.alpha.cpu().numpy(),
            "alpha_sigma": fit.sigma.cpu().numpy(), "xmin": fit.xmin.cpu().numpy(), "ks": fit.ks.cpu().numpy(),
            "n_tail": fit.n_tail.cpu().numpy(), "lambda_max": lmax.cpu().numpy(),
            "alpha_hat": (fit.alpha * torch.log10(lmax)).cpu().numpy(), "stable_rank": sr.cpu().numpy(),
            "log_spectral_norm": torch.log10(lmax).cpu().numpy()}))
    check(bool(rows), "the model has no weight matrices (2-D or larger parameters): no spectral measures")
    return pd.concat(rows, ignore_index=True)


def spectral_summary(layers: pd.DataFrame) -> pd.DataFrame:
    """Per replica, WeightWatcher's network averages over the fitted layers: ``ww_alpha`` (mean alpha),
    ``ww_alpha_hat`` (mean alpha-hat, WeightWatcher's "alpha_weighted" quality metric) and ``ww_stable_rank`` (mean
    stable rank over every layer)."""
    g = layers.groupby("replica", sort=True)
    return pd.DataFrame({"ww_alpha": g["alpha"].mean(), "ww_alpha_hat": g["alpha_hat"].mean(),
                         "ww_stable_rank": g["stable_rank"].mean()}).reset_index()


# ---------------------------------------------------------------------------- every measure
def measure_table(problem: Problem, theta: torch.Tensor, *, n_draws: int = 8, target: float = 0.1, eps: float = 1e-3,
                  iters: int = 16, quantile: float = 0.1, min_evals: int = 8, seed: int = 0
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The measures of this module for every replica of ``theta`` ``(K, P)``: a per-replica table (row i = theta[i]:
    weight_norm, log_spec_product, log_frob_product, log_path_norm, margin, pacbayes_sigma, pacbayes_mag_sigma,
    ww_alpha, ww_alpha_hat, ww_stable_rank) and the per-layer spectral table (:func:`spectral_layers`)."""
    check(theta.ndim == 2 and theta.shape[1] == problem.n_params,
          f"theta must have shape (K, {problem.n_params}), got {tuple(theta.shape)}")
    out = {k: v.cpu().numpy() for k, v in norm_measures(problem, theta).items()}
    out["margin"] = output_margin(problem, theta, quantile=quantile).cpu().numpy()
    kw = dict(target=target, n_draws=n_draws, eps=eps, iters=iters, seed=seed)
    out["pacbayes_sigma"] = pac_bayes_sigma(problem, theta, **kw).cpu().numpy()
    out["pacbayes_mag_sigma"] = pac_bayes_sigma(problem, theta, magnitude=True, **kw).cpu().numpy()
    layers = spectral_layers(problem, theta, min_evals=min_evals)
    df = pd.DataFrame(out)
    df = pd.concat([df, spectral_summary(layers).drop(columns="replica")], axis=1)
    return df, layers


# ---------------------------------------------------------------------------- statistics
def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of ``x`` and ``y`` along the last axis, batched over the leading ones:
    tau_b = sum_{i<j} sgn(x_i - x_j) sgn(y_i - y_j) / sqrt(n_x n_y), n_x (n_y) the pairs not tied in x (y)
    (Kendall 1945). Pairs with a NaN in either are left out; +-inf rank as extremes. NaN when undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~(np.isnan(x) | np.isnan(y))
    with np.errstate(invalid="ignore"):
        sx = np.sign(x[..., :, None] - x[..., None, :])
        sy = np.sign(y[..., :, None] - y[..., None, :])
    sx = np.where(np.isnan(sx), 0.0, sx)  # inf - inf: a tie
    sy = np.where(np.isnan(sy), 0.0, sy)
    pair = ok[..., :, None] & ok[..., None, :]
    sx, sy = sx * pair, sy * pair
    num = (sx * sy).sum((-1, -2))
    den = np.sqrt((sx * sx).sum((-1, -2)) * (sy * sy).sum((-1, -2)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


@dataclass
class Grid:
    """Networks on a full factorial grid: ``values`` (n_cells, n_axes) of hyperparameter values per cell (axes named
    by ``axes``), the cell of every network (``cell``) and the grid's shape (levels per axis, C order)."""

    axes: list[str]
    levels: list[list]
    cell: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.levels)

    @classmethod
    def from_table(cls, df: pd.DataFrame, axes: list[str]) -> Grid:
        """The grid spanned by the columns ``axes`` of ``df`` (one row per network); every combination of their
        levels must be present (a full factorial design, as Jiang et al.)."""
        check(len(axes) >= 1, "need at least one hyperparameter axis")
        for a in axes:
            check(a in df, f"hyperparameter axis {a!r} is not a column of the table")
        levels = [sorted(df[a].unique().tolist()) for a in axes]
        codes = np.stack([df[a].map({v: i for i, v in enumerate(lv)}).to_numpy() for a, lv in zip(axes, levels)], 1)
        shape = tuple(len(v) for v in levels)
        cell = np.ravel_multi_index(codes.T, shape)
        missing = int(np.prod(shape)) - len(np.unique(cell))
        check(missing == 0, f"the grid over {axes} is not full factorial: {missing} of {int(np.prod(shape))} cells "
                            "have no network")
        return cls(list(axes), levels, cell)


def _seed_index(grid: Grid, ok: np.ndarray) -> np.ndarray:
    """(n_cells, S) row indices of the usable networks of each cell, padded with -1."""
    n_cells = int(np.prod(grid.shape))
    lists = [np.flatnonzero((grid.cell == c) & ok) for c in range(n_cells)]
    s = max(1, max(len(li) for li in lists))
    out = -np.ones((n_cells, s), dtype=np.int64)
    for c, li in enumerate(lists):  # one short list per cell (bookkeeping, not arithmetic)
        out[c, : len(li)] = li
    return out


def granulated_tau(cell_x: np.ndarray, cell_y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Jiang et al.'s granulated Kendall coefficient per axis i (eq. 4): psi_i = mean over every combination of the
    other axes' values of tau(measure, gap) over the |Theta_i| cells that differ in axis i only. ``cell_x``,
    ``cell_y``: (..., n_cells) in C order of ``shape``. Returns (..., n_axes); Psi is its mean over axes."""
    lead = cell_x.shape[:-1]
    gx, gy = cell_x.reshape(*lead, *shape), cell_y.reshape(*lead, *shape)
    nl, out = len(lead), []
    for i in range(len(shape)):  # a handful of axes
        ax = np.moveaxis(gx, nl + i, -1).reshape(*lead, -1, shape[i])
        ay = np.moveaxis(gy, nl + i, -1).reshape(*lead, -1, shape[i])
        t = kendall_tau_b(ax, ay)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out.append(np.nanmean(t, -1))
    return np.stack(out, -1)


def conditional_mi(cell_x: np.ndarray, cell_y: np.ndarray, values: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """Jiang et al.'s (2020, sec. 5) normalised conditional mutual information I(V_mu; V_g | U_S) / H(V_g | U_S) over
    every pair of cells (a, b): V_mu = sgn(mu_a - mu_b), V_g = sgn(g_a - g_b) (pairs tied in either, or with a NaN,
    left out), U_S the hyperparameter values of the axes in ``subset`` of both cells:
    I = sum_u p(u) sum_{v_mu, v_g} p(v_mu, v_g | u) log[p(v_mu, v_g | u) / (p(v_mu | u) p(v_g | u))],
    H = -sum_u p(u) sum_{v_g} p(v_g | u) log p(v_g | u).
    ``cell_x``, ``cell_y``: (..., n_cells), batched over the leading axes (e.g. bootstrap draws: the pairs' conditions
    U_S depend on the design only, so every draw is counted in one pass); ``values``: (n_cells, n_axes) level codes.
    Returns (...); a float for 1-D input. NaN with fewer than 2 kept pairs or H = 0."""
    out = conditional_mi_many(cell_x, cell_y, values, [tuple(subset)])[..., 0]
    return float(out) if out.ndim == 0 else out


def conditional_mi_many(cell_x: np.ndarray, cell_y: np.ndarray, values: np.ndarray,
                        subsets: list[tuple[int, ...]]) -> np.ndarray:
    """:func:`conditional_mi` for every subset of axes in ``subsets`` at once (the pairs' signs are computed once,
    one matrix product counts every condition of every subset): (..., len(subsets))."""
    cell_x, cell_y = np.asarray(cell_x, float), np.asarray(cell_y, float)
    n = cell_x.shape[-1]
    a, b = np.triu_indices(n, 1)
    with np.errstate(invalid="ignore"):
        vm, vg = np.sign(cell_x[..., a] - cell_x[..., b]), np.sign(cell_y[..., a] - cell_y[..., b])
    keep = (vm != 0) & (vg != 0) & np.isfinite(vm) & np.isfinite(vg)  # (..., pairs)
    state = (vm > 0).astype(np.int64) * 2 + (vg > 0).astype(np.int64)  # joint state 0..3
    onehot = ((state[..., None] == np.arange(4)) & keep[..., None]).astype(float)  # (..., pairs, 4)
    blocks = []  # per subset: (pairs, n_u) indicator of each pair's condition u = (values of both cells on S)
    for sub in subsets:  # a handful of subsets (10 pairs of 5 axes)
        if sub:
            u = np.unique(np.concatenate([values[a][:, list(sub)], values[b][:, list(sub)]], 1), axis=0,
                          return_inverse=True)[1].reshape(-1)
        else:
            u = np.zeros(len(a), dtype=np.int64)
        blocks.append(np.eye(u.max() + 1)[u])
    counts_all = np.concatenate(blocks, 1).T @ onehot  # (..., sum n_u, 4)
    outs, lo = [], 0
    for blk in blocks:
        counts = counts_all[..., lo: lo + blk.shape[1], :]
        lo += blk.shape[1]
        total = counts.sum((-1, -2))
        with np.errstate(divide="ignore", invalid="ignore"):
            pu = np.nan_to_num(counts.sum(-1) / total[..., None])  # a condition with no kept pair has weight 0
            pj = (counts / counts.sum(-1, keepdims=True)).reshape(*counts.shape[:-1], 2, 2)
            pm, pg = pj.sum(-1), pj.sum(-2)  # p(v_mu | u), p(v_g | u)
            ratio = pj / (pm[..., :, None] * pg[..., None, :])
            mi = np.where(pj > 0, pj * np.log(np.where(pj > 0, ratio, 1.0)), 0.0).sum((-1, -2))
            hg = -np.where(pg > 0, pg * np.log(np.where(pg > 0, pg, 1.0)), 0.0).sum(-1)
            h = (pu * hg).sum(-1)
            outs.append(np.where((total >= 2) & (h > 0), (pu * mi).sum(-1) / np.where(h > 0, h, 1.0), np.nan))
    return np.stack(outs, -1)


def rank_measures(df: pd.DataFrame, measures: list[str], axes: list[str], *, target: str = "gap_error",
                  n_boot: int = 500, seed: int = 0, usable: str | None = "reached_stop") -> pd.DataFrame:
    """Every measure (a complexity column of ``df``: larger = predicted worse) ranked against ``target`` on the
    full factorial grid of ``axes`` (one row per network; several seeds per cell):

    - ``tau`` (Kendall tau-b with the target over all usable networks) and ``tau_cells`` (over the cells' seed means);
    - ``psi_<axis>``: the granulated tau of that axis on the cells' seed means (:func:`granulated_tau`), and ``psi``
      their mean (Jiang's Psi; NaN when an axis has no defined tau, e.g. a measure undefined at one width);
    - for each, a 95% percentile bootstrap interval (``_lo``, ``_hi``): for the cell statistics (``tau_cells``,
      ``psi_*``, ``psi``, ``cmi``) over seeds, ``n_boot`` resamples of the networks with replacement within each cell
      (the grid design held fixed), each drawn value moved from its cell's mean by sqrt(n_c / (n_c - 1)) so that the
      resampled cell means vary as much as the sampling variance s^2 / n_c (the plain bootstrap gives half of it with
      2 seeds: 11% false positives for tau_cells); for ``tau`` over networks, resamples of all usable networks with
      replacement (with 2 seeds per cell the within-cell resampling made tau's interval too narrow: 18% [12, 25]
      false positives under a null, benchmarks/calibrate_measures.py), all at once;
    - ``cmi`` = min over pairs of axes S of the normalised I(V_mu; V_g | U_S) (Jiang's |S| = 2 column; |S| = 1
      with one axis, 0 with none), on the cells' seed means, with the same within-cell bootstrap interval as
      ``tau_cells`` and ``psi`` (the min taken in every draw), and ``cmi_0`` (S empty: plain mutual information).

    ``usable``: a boolean column naming the networks kept (Jiang keep only models that reached the stop criterion);
    rows with a NaN target are dropped. A cell without a usable network is NaN: the pairs and slices that need it are
    left out (``n_cells`` counts the cells used). Sorted by ``psi`` (then ``tau``), best first."""
    check(target in df, f"target {target!r} is not a column of the table")
    ok = np.isfinite(df[target].to_numpy(float))
    if usable and usable in df:
        ok &= df[usable].to_numpy(bool)
    grid = Grid.from_table(df, axes)
    n_cells = int(np.prod(grid.shape))
    idx = _seed_index(grid, ok)
    cnt = (idx >= 0).sum(1)
    check(int((cnt > 0).sum()) >= 3, f"only {int((cnt > 0).sum())} cells of the grid have a usable network (one that "
          "reached the stop criterion): at least 3 are needed")
    rng = np.random.default_rng(seed)
    draw = np.floor(rng.random((n_boot, n_cells, idx.shape[1])) * cnt[None, :, None]).astype(np.int64)
    bidx = np.where(np.arange(idx.shape[1])[None, None, :] < cnt[None, :, None],
                    np.take_along_axis(np.broadcast_to(idx, (n_boot, *idx.shape)), draw, 2), -1)
    codes = np.stack(np.unravel_index(np.arange(n_cells), grid.shape), 1)
    y = df[target].to_numpy(float)
    rows_ok = np.flatnonzero(ok)
    ball = rows_ok[rng.integers(0, len(rows_ok), size=(n_boot, len(rows_ok)))]  # networks resampled, design ignored

    inflate = np.sqrt(cnt / np.maximum(cnt - 1, 1))[:, None]  # sqrt(n_c / (n_c - 1)); 1 for a single network

    def gather(w: np.ndarray, ix: np.ndarray, boot: bool) -> np.ndarray:
        """The values of ``w`` at the networks ``ix`` (..., n_cells, S), NaN where none. With ``boot``, each drawn
        value is moved away from its cell's mean by sqrt(n_c / (n_c - 1)) (a rescaled bootstrap): the plain within-cell
        bootstrap's cell means vary by (n_c - 1) / n_c of the sampling variance s^2 / n_c, half of it with 2 seeds,
        which made the tau_cells interval too narrow (11% [7, 18] false positives under a null with 2 seeds,
        benchmarks/calibrate_measures.py). Non-finite values (an infinite complexity) are left as drawn."""
        xs = np.where(ix >= 0, w[np.clip(ix, 0, None)], np.nan)
        if boot:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(np.where(idx >= 0, w[np.clip(idx, 0, None)], np.nan), -1)[:, None]
                xs = np.where(np.isfinite(xs) & np.isfinite(m), m + inflate * (xs - m), xs)
        return xs

    def stats(v: np.ndarray, ix: np.ndarray, boot: bool = False) -> tuple[np.ndarray, ...]:
        xs, ys = gather(v, ix, boot), gather(y, ix, boot)
        flat_x, flat_y = xs.reshape(*xs.shape[:-2], -1), ys.reshape(*ys.shape[:-2], -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            cx, cy = np.nanmean(xs, -1), np.nanmean(ys, -1)
        return kendall_tau_b(flat_x, flat_y), kendall_tau_b(cx, cy), granulated_tau(cx, cy, grid.shape), cx, cy

    size = min(2, len(axes))
    subsets = list(itertools.combinations(range(len(axes)), size))

    def cmi(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """min over the subsets S of |S| = ``size`` axes of the normalised CMI (NaN where none is defined)."""
        c = conditional_mi_many(cx, cy, codes, subsets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmin(c, -1)

    rows = []
    for m in measures:  # a few dozen measures; every bootstrap draw at once
        if m not in df:
            continue
        v = df[m].to_numpy(float)
        tau, tau_c, psi_ax, cx, cy = stats(v, idx)
        _, b_tauc, b_psi, bcx, bcy = stats(v, bidx, boot=True)
        b_tau = kendall_tau_b(v[ball], y[ball])
        row = {"measure": m, "target": target, "n_networks": int(cnt.sum()), "n_cells": int((cnt > 0).sum())}

        def put(name: str, val, boots, row=row) -> None:
            row[name] = float(val)
            ok_b = boots[np.isfinite(boots)]
            row[f"{name}_lo"], row[f"{name}_hi"] = (np.percentile(ok_b, [2.5, 97.5]).tolist() if len(ok_b)
                                                    else (np.nan, np.nan))

        put("tau", tau, b_tau)
        put("tau_cells", tau_c, b_tauc)
        for i, a in enumerate(axes):
            put(f"psi_{a}", psi_ax[i], b_psi[:, i])
        put("psi", np.mean(psi_ax), np.mean(b_psi, -1))  # NaN when an axis has no defined tau
        put("cmi", cmi(cx, cy), cmi(bcx, bcy))  # the cells' seed means resampled as for tau_cells and psi
        row["cmi_0"] = conditional_mi(cx, cy, codes, ())
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out = out.sort_values(["psi", "tau"], ascending=False, na_position="last").reset_index(drop=True)
        out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out
