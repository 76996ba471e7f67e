"""Protocol 3: replica overlaps, P(q), hierarchical clustering and ultrametricity (the Parisi picture).

Everything works on a ``(K, K)`` overlap or distance matrix with vectorised pair and triangle arithmetic;
no Python loop over pairs or triangles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.cluster import hierarchy as sch
from scipy.spatial.distance import squareform
from scipy.stats import gaussian_kde, kurtosis, skew

from .._util import seed_for
from ..errors import check, choice
from ..problem import Problem
from ..symmetry import align as align_fn
from ..symmetry import hidden_activations
from ..train import Replicas

KINDS = ("weights", "activations", "functions")


def _theta(replicas) -> torch.Tensor:
    return replicas.theta if isinstance(replicas, Replicas) else torch.as_tensor(replicas)


def aligned_replicas(problem: Problem, replicas, *, reference: int | str = "mean", method: str = "weight",
                     max_iter: int = 10) -> torch.Tensor:
    """Every replica permuted into one common frame.

    ``reference=k``: aligned to replica k (which then looks closer to everyone than the others do: the
    alignment maximises overlaps with it). ``reference="mean"`` (default) removes that bias: start from
    replica 0's frame, then repeatedly align every replica to the mean of the aligned set until no permutation
    changes (the barycentre, as in Ainsworth et al.'s MergeMany); no replica is special."""
    theta = _theta(replicas)
    k = theta.shape[0]
    if reference != "mean":
        check(isinstance(reference, int) and 0 <= reference < k, f"reference must be 'mean' or in 0..{k - 1}, got {reference!r}")
        aligned, _ = align_fn(problem, theta[reference], theta, method=method)
        aligned[reference] = theta[reference]
        return aligned
    aligned, perm = align_fn(problem, theta[0], theta, method=method)
    for _ in range(max_iter):
        centre = aligned.mean(0)
        new, new_perm = align_fn(problem, centre, theta, method=method)
        same = all(torch.equal(perm[n], new_perm[n]) for n in perm)
        aligned, perm = new, new_perm
        if same:
            break
    return aligned


def _cosine(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    n = v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    u = v / n
    return (u @ u.T).clamp(-1, 1)


def overlaps(problem: Problem, replicas, *, align: bool = True, kind: str = "weights", reference: int | str = "mean",
             method: str = "weight", n_samples: int = 2000) -> torch.Tensor:
    """The ``(K, K)`` overlap matrix q_ab.

    - ``weights``: q_ab = <w_a, w_b> / (|w_a| |w_b|) on the whole (aligned) parameter vector.
    - ``activations``: the same on the centred hidden activations (each unit minus its mean over inputs)
      of ``n_samples`` test inputs, all hidden layers concatenated (centred correlation).
    - ``functions``: the fraction of test inputs on which replicas a and b predict the same class.
    With ``align=True`` (weights/activations) every replica is first brought into one frame (by default the
    barycentre of the aligned set, see :func:`aligned_replicas`), so the permutation symmetry does not hide the
    structure. Function overlaps need no alignment.
    """
    choice("overlap kind", kind, KINDS)
    theta = _theta(replicas).to(problem.device, problem.dtype)
    check(theta.ndim == 2 and theta.shape[0] >= 2, f"need (K, P) replicas with K >= 2, got {tuple(theta.shape)}")
    if kind == "weights":
        if align and problem.has_data:
            theta = aligned_replicas(problem, theta, reference=reference, method=method)
        return _cosine(theta.cpu())
    check(problem.has_data, f"{kind} overlaps need a network with data")
    x = problem.data["test"][0][:n_samples]
    with torch.no_grad():
        if kind == "functions":
            pred = problem.forward(theta, x).contiguous().argmax(-1)  # (K, N)
            onehot = torch.nn.functional.one_hot(pred, problem.dataset.n_classes).double()
            return torch.einsum("anc,bnc->ab", onehot, onehot).cpu() / pred.shape[1]
        if align:
            theta = aligned_replicas(problem, theta, reference=reference, method=method)
        acts = hidden_activations(problem, theta, x)
        h = torch.cat([a - a.mean(1, keepdim=True) for a in acts], -1)  # (K, N, H)
        return _cosine(h.reshape(h.shape[0], -1).cpu())


def layer_overlaps(problem: Problem, theta: torch.Tensor) -> pd.DataFrame:
    """Mean and spread over pairs a < b of the overlap of each parameter tensor separately."""
    theta = torch.as_tensor(theta)
    iu = np.triu_indices(theta.shape[0], 1)
    rows = []
    for info in problem.params:
        q = _cosine(theta[:, info.slice].cpu()).numpy()[iu]
        rows.append({"parameter": info.name, "q_mean": float(q.mean()), "q_std": float(q.std())})
    return pd.DataFrame(rows)


def distances_from_overlaps(q: torch.Tensor | np.ndarray, *, symmetric: bool = False) -> np.ndarray:
    """d_ab = sqrt(2 (1 - q_ab)): the Euclidean distance between the normalised vectors (points on the unit
    sphere). ``symmetric=True`` uses |q_ab|, d_ab = sqrt(2 (1 - |q_ab|)) = min(|u_a - u_b|, |u_a + u_b|): the
    distance between states modulo a global sign flip, for systems with the Ising spin-flip symmetry
    H(s) = H(-s) (SK, p = 2 spherical model), where s and -s are the same state (q and -q are one overlap)."""
    q = np.asarray(q, dtype=np.float64)
    check(q.ndim == 2 and q.shape[0] == q.shape[1], f"q must be a square (K, K) matrix, got shape {q.shape}")
    check(bool(np.isfinite(q).all()), "overlap matrix holds NaN or inf")
    q = np.abs(q) if symmetric else q
    d = np.sqrt(np.clip(2 * (1 - q), 0, None))
    np.fill_diagonal(d, 0)
    return (d + d.T) / 2


@dataclass
class OverlapDistribution:
    """P(q) over pairs a < b: the values, a histogram, a kernel density and moments."""

    q: np.ndarray
    edges: np.ndarray
    hist: np.ndarray
    grid: np.ndarray
    density: np.ndarray
    moments: dict = field(default_factory=dict)


def overlap_distribution(q, bins: int = 30) -> OverlapDistribution:
    """P(q) of the off-diagonal overlaps: histogram (density-normalised), Gaussian KDE and the moments
    mean, variance, skewness, excess kurtosis and the Binder-like ratio <q^4>/<q^2>^2. One narrow peak is
    replica symmetric; two peaks one-step RSB; a continuous part between full RSB."""
    q = np.asarray(q, dtype=np.float64)
    check(q.ndim == 2 and q.shape[0] == q.shape[1] and q.shape[0] >= 2, f"q must be (K, K), got {q.shape}")
    vals = q[np.triu_indices(q.shape[0], 1)]
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(1e-3, 0.05 * (hi - lo))
    hist, edges = np.histogram(vals, bins=bins, range=(lo - pad, hi + pad), density=True)
    grid = np.linspace(lo - pad, hi + pad, 200)
    density = gaussian_kde(vals)(grid) if len(vals) > 2 and vals.std() > 1e-12 else np.zeros_like(grid)
    m2 = float(np.mean(vals**2))
    moments = {"q_mean": float(vals.mean()), "q_var": float(vals.var()), "q_min": lo, "q_max": hi,
               "q_skew": float(skew(vals)) if vals.std() > 0 else 0.0,
               "q_kurtosis": float(kurtosis(vals)) if vals.std() > 0 else 0.0,
               "q4_over_q2sq": float(np.mean(vals**4) / m2**2) if m2 > 0 else float("nan"), "pairs": int(len(vals))}
    return OverlapDistribution(vals, edges, hist, grid, density, moments)


# ---------------------------------------------------------------------------- distances, trees, triangles
def check_distances(d) -> np.ndarray:
    """A validated distance matrix: square, at least 3 points, finite, symmetric, non-negative."""
    d = np.asarray(d, dtype=np.float64)
    check(d.ndim == 2 and d.shape[0] == d.shape[1], f"distance matrix must be square, got shape {d.shape}")
    check(d.shape[0] >= 3, f"need at least 3 points, got {d.shape[0]}")
    check(bool(np.isfinite(d).all()), "distance matrix holds NaN or inf")
    check(bool((d >= 0).all()), f"distance matrix has negative entries (min {d.min():.3g})")
    scale = max(1.0, float(d.max()))
    check(np.allclose(d, d.T, atol=1e-8 * scale), "distance matrix is not symmetric")
    check(np.allclose(np.diag(d), 0, atol=1e-8 * scale), "distance matrix must have zeros on the diagonal")
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    return d


@dataclass
class HierarchyResult:
    """A dendrogram: scipy ``linkage``, leaf ``order``, ``cophenetic`` correlation with the distances, the
    number of clusters at each merge height (``levels``) and the cophenetic distance matrix."""

    linkage: np.ndarray
    order: list[int]
    cophenetic: float
    levels: pd.DataFrame
    cophenetic_distances: np.ndarray
    method: str
    ultrametricity: UltrametricityResult | None = None


def hierarchy(distances, method: str = "average", *, ultrametric: bool = True, seed: int = 0,
              max_triangles: int = 200000, n_null: int = 200, alpha: float = 0.01,
              symmetric: bool = False) -> HierarchyResult:
    """Agglomerative clustering of the replicas (scipy linkage: average, complete, single or ward), the
    cophenetic correlation (the Pearson correlation of d_ab with the dendrogram's merge heights) and, with
    ``ultrametric=True``, the ultrametricity test against its calibrated null (:func:`ultrametricity`, which
    needs at least 4 points; ``n_null``, ``alpha``, ``max_triangles``, ``seed`` and ``symmetric`` are passed to it)."""
    d = check_distances(distances)
    choice("linkage method", method, ("average", "complete", "single", "ward"))
    cond = squareform(d, checks=False)
    z = sch.linkage(cond, method=method)
    coph_corr, coph = sch.cophenet(z, cond)
    heights = z[:, 2]
    levels = pd.DataFrame({"height": heights, "n_clusters": np.arange(len(heights), 0, -1)})
    um = (ultrametricity(d, max_triangles=max_triangles, n_null=n_null, alpha=alpha, seed=seed, symmetric=symmetric)
          if ultrametric else None)
    return HierarchyResult(z, sch.leaves_list(z).tolist(), float(coph_corr), levels, squareform(coph), method, um)


def _triangles(k: int, max_triangles: int, seed: int) -> np.ndarray:
    """All triples i < j < l as a ``(T, 3)`` array, or a seeded sample of ``max_triangles`` when there are more."""
    total = k * (k - 1) * (k - 2) // 6
    if total <= max_triangles:
        idx = np.stack(np.meshgrid(np.arange(k), np.arange(k), np.arange(k), indexing="ij")).reshape(3, -1)
        return idx[:, (idx[0] < idx[1]) & (idx[1] < idx[2])].T
    rng = np.random.default_rng(seed)
    draws = np.sort(rng.integers(0, k, size=(int(max_triangles * 1.5) + 16, 3)), 1)
    draws = draws[(draws[:, 0] < draws[:, 1]) & (draws[:, 1] < draws[:, 2])]
    while len(draws) < max_triangles:  # rare for k >= 10: top up
        more = np.sort(rng.integers(0, k, size=(max_triangles, 3)), 1)
        draws = np.concatenate([draws, more[(more[:, 0] < more[:, 1]) & (more[:, 1] < more[:, 2])]])
    return draws[:max_triangles]


def triangle_sides(d: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Sorted sides (d_min, d_mid, d_max) of each triangle, ``(T, 3)``."""
    s = np.stack([d[tri[:, 0], tri[:, 1]], d[tri[:, 1], tri[:, 2]], d[tri[:, 0], tri[:, 2]]], 1)
    return np.sort(s, 1)


def _pair_lookup(k: int) -> np.ndarray:
    """``(K, K)`` map from a pair (a, b), a != b, to its position in the condensed (squareform) vector."""
    idx = np.zeros((k, k), dtype=np.int64)
    iu = np.triu_indices(k, 1)
    idx[iu] = np.arange(len(iu[0]))
    return idx + idx.T


def _k_means(dv: np.ndarray, sides: np.ndarray) -> np.ndarray:
    """K_mean = mean over triangles of (d_max - d_mid) / sigma(d) for one or a batch of condensed distance
    vectors ``(..., n_pairs)``; ``sides`` ``(T, 3)`` holds each triangle's three pair positions.

    K is invariant under d -> (d - mean) / sigma, so the distances are standardised first (in float64) and the
    triangle arithmetic runs in float32 on O(1) numbers; d_max - d_mid = 2 d_max + d_min - (d_1 + d_2 + d_3)
    needs no sort."""
    dv = np.atleast_2d(dv)
    sigma = dv.std(-1, keepdims=True)
    zs = torch.from_numpy((dv - dv.mean(-1, keepdims=True)) / np.where(sigma > 0, sigma, np.inf)).float()
    a, b, c = (torch.index_select(zs, 1, torch.from_numpy(np.ascontiguousarray(sides[:, j]))) for j in range(3))
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    torch.maximum(hi, c, out=hi)
    torch.minimum(lo, c, out=lo)
    # sum over triangles of d_1 + d_2 + d_3 = sum over pairs of (triangles through the pair) * d: one mat-vec
    through = np.bincount(sides.ravel(), minlength=dv.shape[-1]).astype(np.float64)
    total = hi.mul_(2).add_(lo).sum(-1, dtype=torch.float64).numpy() - zs.double().numpy() @ through
    return total / len(sides)


def _k_stats(d: np.ndarray, tri: np.ndarray) -> dict:
    """Per-triangle K, its mean and median, the sorted sides and the relative distance to the subdominant
    ultrametric (the cophenetic distances of single linkage)."""
    sides = triangle_sides(d, tri)
    dv = squareform(d, checks=False)
    sigma = dv.std()
    kval = (sides[:, 2] - sides[:, 1]) / sigma if sigma > 0 else np.zeros(len(sides))
    sub = sch.cophenet(sch.linkage(dv, "single"))
    return {"K": kval, "K_mean": float(kval.mean()), "K_median": float(np.median(kval)),
            "subdominant_distance": float(np.linalg.norm(dv - sub) / max(np.linalg.norm(dv), 1e-30)),
            "sides": sides}


def _k_mean_jackknife(d: np.ndarray, tri: np.ndarray) -> float:
    """Leave-one-point-out jackknife standard error of K_mean (Efron 1982), from per-point sums.

    Dropping point a removes the triangles through a and the K - 1 distances from a, so
    K_mean^(-a) = (G - G_a) / ((T - n_a) sigma^(-a)) with G the sum over triangles of d_max - d_mid, G_a and
    n_a the sum and count over the triangles through a, and sigma^(-a) from the sums of d and d^2 minus row a.
    se^2 = (K - 1)/K * sum_a (K_mean^(-a) - mean_a K_mean^(-a))^2."""
    k = d.shape[0]
    sides = triangle_sides(d, tri)
    gap = sides[:, 2] - sides[:, 1]
    g_a = sum(np.bincount(tri[:, j], weights=gap, minlength=k) for j in range(3))
    n_a = sum(np.bincount(tri[:, j], minlength=k) for j in range(3))
    dv = squareform(d, checks=False)
    n_pairs = len(dv) - (k - 1)
    s1, s2 = dv.sum() - d.sum(1), (dv**2).sum() - (d**2).sum(1)
    sigma = np.sqrt(np.clip(s2 / n_pairs - (s1 / n_pairs) ** 2, 0, None))
    left = len(tri) - n_a
    ok = (left > 0) & (sigma > 0)
    if ok.sum() < 2:
        return float("nan")
    kj = (gap.sum() - g_a[ok]) / (left[ok] * sigma[ok])
    m = ok.sum()
    return float(np.sqrt((m - 1) / m * ((kj - kj.mean()) ** 2).sum()))


def _additive_norms(d2: np.ndarray) -> np.ndarray:
    """Least-squares s_a in d_ab^2 ~ s_a + s_b over all pairs a != b (batched over leading axes):
    s_a = (R_a - W / (K - 1)) / (K - 2), R_a = sum_b d_ab^2, W = sum_{a<b} d_ab^2. For points x_a = rho_a u_a
    with independent random directions u_a, E d_ab^2 = rho_a^2 + rho_b^2, so s_a estimates rho_a^2 (the squared
    distance from the natural origin: the centre of the sphere for normalised overlaps)."""
    k = d2.shape[-1]
    row = d2.sum(-1)
    return (row - row.sum(-1, keepdims=True) / (2 * (k - 1))) / (k - 2)


def _cosines_of(d2: np.ndarray, symmetric: bool) -> np.ndarray:
    """Direction cosines implied by squared distances (batched ``(n, K, K)``), zero on the diagonal:
    cos_ab = (s_a + s_b - d_ab^2) / (2 sqrt(s_a s_b)) about the fitted additive norms s, or for ``symmetric``
    distances d^2 = 2 (1 - |q|) the folded overlaps |q| = 1 - d^2 / 2."""
    k = d2.shape[-1]
    if symmetric:
        c = 1 - d2 / 2
    else:
        s = _additive_norms(d2)
        s = np.maximum(s, 1e-12 * np.maximum(d2.max((-1, -2)), 1e-300)[:, None])
        r = np.sqrt(s)
        c = (s[:, :, None] + s[:, None, :] - d2) / (2 * r[:, :, None] * r[:, None, :])
    c = np.clip(c, -1, 1)
    c[:, np.arange(k), np.arange(k)] = 0
    return c


def _moments(d2: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Second and third moments of the cosines of each ``(K, K)`` matrix in a batch: m2 = mean over pairs of
    cos_ab^2 and m3 = mean over triangles of cos_ab cos_bc cos_ca (= tr(C^3) / (K (K-1) (K-2)) with C the
    cosines, zero diagonal). For Gaussian directions with population spectrum lambda, m2 ~ sum lambda^2 /
    (sum lambda)^2 and m3 ~ sum lambda^3 / (sum lambda)^3: the spread and the anisotropy of the directions."""
    k = d2.shape[-1]
    c = torch.from_numpy(_cosines_of(d2, symmetric))
    m2 = (c * c).sum((-1, -2)).numpy() / (k * (k - 1))
    m3 = (torch.bmm(c, c) * c).sum((-1, -2)).numpy() / (k * (k - 1) * (k - 2))
    return m2, m3


def _spectrum(a: float, dim: float, k: int) -> tuple[np.ndarray, float, float]:
    """The null's population spectrum lambda_j = j^-a, j = 1..dim (dim real >= 1): the first min(ceil(dim), K)
    values explicitly (the last scaled by the fractional part when dim < K), and the rest as a total weight w and
    an effective dimension w^2 / sum lambda_j^2 (sums beyond 10^5 terms by the integral)."""
    m = int(min(np.ceil(dim), k))
    lam = np.arange(1, m + 1, dtype=np.float64) ** -a
    if dim < k:
        lam[-1] *= dim - m + 1
    if dim <= m:
        return lam, 0.0, 0.0
    hi = min(dim, 1e5)
    j = np.arange(m + 1, int(hi) + 1, dtype=np.float64)
    w, w2 = float((j**-a).sum()), float((j ** (-2 * a)).sum())
    if dim > hi:
        def integral(p: float) -> float:
            lo, up = hi + 0.5, dim + 0.5
            return float(np.log(up / lo)) if abs(p - 1) < 1e-9 else float((up ** (1 - p) - lo ** (1 - p)) / (1 - p))

        w, w2 = w + integral(a), w2 + integral(2 * a)
    return lam, w, (w * w / w2 if w2 > 0 else 0.0)


def _wishart(k: int, dof: float, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``(n, K, K)`` Wishart(I_K, dof) matrices: the Gram matrix of K standard Gaussian vectors in dof dimensions.
    For dof >= K by the Bartlett decomposition W = L L^T, L_ii^2 ~ chi^2(dof - i) (i = 0..K-1), L_ij ~ N(0, 1)
    below the diagonal (Bartlett 1933): O(K^3) whatever dof, and defined for non-integer dof. Below K the vectors
    are drawn, the last of ceil(dof) coordinates scaled by sqrt(dof - ceil(dof) + 1)."""
    if dof >= k:
        chol = np.zeros((n, k, k))
        il = np.tril_indices(k, -1)
        chol[:, il[0], il[1]] = rng.standard_normal((n, len(il[0])))
        chol[:, np.arange(k), np.arange(k)] = np.sqrt(rng.chisquare(dof - np.arange(k), size=(n, k)))
        mat = torch.from_numpy(chol)
    else:
        m = int(np.ceil(dof))
        g = rng.standard_normal((n, k, m))
        g[..., -1] *= np.sqrt(dof - m + 1)
        mat = torch.from_numpy(g)
    return torch.bmm(mat, mat.transpose(1, 2))  # numpy's stacked matmul does not batch BLAS calls


def _direction_cosines(k: int, a: float, dim: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, K, K)`` cosines u_a . u_b of n sets of K independent Gaussian directions whose population covariance
    has the power-law spectrum lambda_j = j^-a over ``dim`` dimensions (a = 0: isotropic). The Gram matrix is
    G = Z diag(lambda_1..lambda_m) Z^T (m <= K explicit directions, Z standard normal) plus the remaining
    directions as w W / D_rest, W ~ Wishart(I_K, D_rest) with their total weight w and effective dimension
    D_rest (exact for a = 0; for a > 0 it keeps their first two moments): O(K^3) whatever ``dim``."""
    lam, w, d_rest = _spectrum(a, dim, k)
    z = torch.from_numpy(rng.standard_normal((n, k, len(lam))) * np.sqrt(lam))
    gram = torch.bmm(z, z.transpose(1, 2))
    if w > 0:
        gram += _wishart(k, d_rest, n, rng) * (w / d_rest)
    gram = gram.numpy()
    norm = np.sqrt(np.clip(np.diagonal(gram, axis1=1, axis2=2), 1e-300, None))
    return gram / norm[:, :, None] / norm[:, None, :]


def _null_distances(s: np.ndarray, a: float, dim: float, n: int, rng: np.random.Generator,
                    symmetric: bool = False) -> np.ndarray:
    """``(n, K, K)`` squared null distances with random directions u (:func:`_direction_cosines`).

    - Default: d'_ab^2 = s_a + s_b - 2 sqrt(s_a s_b) u_a . u_b with the data's fitted additive norms s, then the
      row structure the fresh directions add is removed, d'^2_ab -= e_a + e_b with e = s_hat(d'^2) - s, so that
      every null matrix has exactly the data's s (conditioning on the fitted norms: the data's own row structure
      is not counted twice; without it z was biased by +0.5 on random unit vectors).
    - ``symmetric``: d'^2_ab = 2 (1 - |u_a . u_b|), states identified with their sign-flipped copies. Here the
      norms are known (normalised overlaps: 1), nothing is fitted and nothing is conditioned (conditioning
      biased z by -1.1 on folded random vectors)."""
    k = len(s)
    cos = _direction_cosines(k, a, dim, n, rng)
    diag = np.arange(k)
    if symmetric:
        d2 = 2 - 2 * np.abs(cos)
        d2[:, diag, diag] = 0
        return np.clip(d2, 0, None)
    r = np.sqrt(s)
    d2 = s[:, None] + s[None] - 2 * r[:, None] * r[None] * cos
    d2[:, diag, diag] = 0
    e = _additive_norms(d2) - s
    d2 -= e[:, :, None] + e[:, None, :]
    d2[:, diag, diag] = 0
    return np.clip(d2, 0, None)


_MAX_DIM = 1e12
_MAX_EXPONENT = 3.0


def _fit_null(d2: np.ndarray, s: np.ndarray, symmetric: bool, seed: int) -> tuple[float, float]:
    """The null's spectrum (a, dim): dim matches the data's mean squared cosine m2 (rescaled by m2_null / m2,
    since m2 ~ 1/D), a matches the anisotropy kappa = m3 / m2^(3/2) (bisection on [0, 3], kappa grows with a).
    Each evaluation draws the same pilot null matrices (common random numbers: 32, fewer above K = 64, where each
    matrix averages more pairs), so the fit is deterministic and smooth in (a, dim)."""
    n_pilot = int(np.clip(2048 // d2.shape[-1], 4, 32))
    m2, m3 = (float(v[0]) for v in _moments(d2[None], symmetric))
    if m2 <= 0:
        return 0.0, _MAX_DIM
    kappa = m3 / m2**1.5

    def at(a: float, dim: float, iters: int) -> tuple[float, float]:
        for i in range(iters + 1):
            n2, n3 = _moments(_null_distances(s, a, dim, n_pilot, np.random.default_rng(seed), symmetric), symmetric)
            ratio = float(n2.mean()) / m2
            if i == iters or abs(ratio - 1) < 0.01:
                return dim, float(n3.mean()) / float(n2.mean()) ** 1.5
            dim = float(np.clip(dim * ratio, 1.0, _MAX_DIM))
        return dim, float("nan")  # unreachable

    dim, k0 = at(0.0, float(np.clip(1 / m2, 1.0, _MAX_DIM)), 4)
    if kappa <= k0:
        return 0.0, dim
    dim_hi, k_hi = at(_MAX_EXPONENT, dim, 4)
    if kappa >= k_hi:
        return _MAX_EXPONENT, dim_hi
    lo, hi = 0.0, _MAX_EXPONENT
    for _ in range(7):
        mid = (lo + hi) / 2
        dim, k_mid = at(mid, dim, 2)
        lo, hi = (mid, hi) if k_mid < kappa else (lo, mid)
    a = (lo + hi) / 2
    return a, at(a, dim, 3)[0]


NULL = "Gaussian directions (fitted norms, power-law spectrum matched to the cosine spread and anisotropy)"
VERDICTS = ("hierarchical", "no evidence of hierarchy", "trivial")


@dataclass
class UltrametricityResult:
    """Katzgraber-Hartmann K = (d_max - d_mid) / sigma(d) per triangle (``K``, with the sorted ``sides``), the
    ``summary`` (see :func:`ultrametricity`) and ``null_K``: K_mean of each null draw ``(n_null,)``."""

    K: np.ndarray
    sides: np.ndarray
    summary: dict
    null_K: np.ndarray


def ultrametricity(distances, *, max_triangles: int = 200000, n_null: int = 200, alpha: float = 0.01, seed: int = 0,
                   equilateral_cv: float = 0.05, symmetric: bool = False) -> UltrametricityResult:
    """Test whether a set of points is organised as a tree (ultrametric: d(a,c) <= max(d(a,b), d(b,c)) for
    every triangle), against a calibrated null with no hierarchy.

    Statistic (Katzgraber & Hartmann, PRL 102, 037207, 2009): K = (d_max - d_mid) / sigma(d) per triangle
    (sides sorted d_min <= d_mid <= d_max, sigma(d) the spread of all pairwise distances), averaged over every
    triangle or a seeded sample of ``max_triangles``; ultrametric sets have K concentrated at 0.

    Null: the same number of points with the same norms, the same spread and anisotropy of directions, and no
    hierarchy (one Gaussian law of directions, no clusters). The squared distances are read as
    d_ab^2 = s_a + s_b - 2 sqrt(s_a s_b) cos_ab, s_a the least-squares additive part (:func:`_additive_norms`: the
    squared distance of point a from the natural origin, e.g. the centre of the sphere for d = sqrt(2 (1 - q))
    of normalised overlaps, where s_a = 1). The null keeps s and draws the directions from a Gaussian whose
    covariance spectrum is lambda_j = j^-a over D dimensions (a = 0: isotropic), sampled through K x K Gram
    matrices (Wishart/Bartlett, O(K^3) whatever D); D matches the data's mean squared cosine m2 (~ 1/D for random
    directions) and a its anisotropy m3 / m2^(3/2), m3 the mean over triangles of cos_ab cos_bc cos_ca. Each null
    matrix is conditioned to have exactly the data's fitted s. With ``symmetric=True`` the distances are
    sqrt(2 (1 - |q|)) of states identified with their sign flips (``distances_from_overlaps(q, symmetric=True)``,
    Ising symmetry) and the null folds its overlaps the same way, with unit norms.

    ``n_null`` draws give null_K_mean, null_K_std, z = (K_mean - null_K_mean) / null_K_std and the one-sided
    p = (1 + #{null <= K_mean}) / (n_null + 1) (hierarchy = K smaller than the null); z and p use the same
    triangles for data and null. Calibration (tests/test_replicas.py and the measurements quoted there): random
    unit vectors (D = 50..5000, K = 16..128), Gaussian clouds whose norms differ by 3 to 10 times and
    anisotropic Gaussian directions (power-law, spiked and exponential spectra) give z of mean within +-0.6 of 0,
    spread about 1, and a false-positive rate near ``alpha``. Nulls that fail there and are not used: distances
    shuffled among the pairs (z of -11 to -52 on unequal-norm clouds); a Gaussian with the classical-MDS
    covariance (unequal norms, z of +3 to +10 on unit vectors); isotropic directions about the MDS centroid (z of
    -4 to -9 on unequal-norm clouds) or about the fitted origin (every power-law cloud, spectrum j^-1, came out
    hierarchical); an unfolded null on folded |q| distances (z ~ -8 on random states).

    Verdict: "hierarchical" when p < ``alpha`` and z < 0; otherwise "trivial" when the distances are nearly
    equal (cv = std/mean < ``equilateral_cv``: trivially ultrametric, one state, no tree); otherwise "no evidence
    of hierarchy". ``summary`` keys: points, triangles, K_mean, K_mean_se (leave-one-point-out jackknife),
    K_median, subdominant_distance (||d - d_single-linkage|| / ||d||), null (its name), D_eff (participation
    ratio (sum lambda)^2 / sum lambda^2 of the null's spectrum), null_exponent (a), null_dimensions (D),
    null_K_mean, null_K_std, z, p_value, alpha, n_null, cv, trivial, symmetric, verdict.
    :func:`describe_ultrametricity` turns it into a sentence.
    """
    d = check_distances(distances)
    k = d.shape[0]
    check(k >= 4, f"ultrametricity needs at least 4 points (its null is fitted to the distances), got {k}")
    check(isinstance(max_triangles, (int, np.integer)) and max_triangles > 0,
          f"max_triangles must be a positive int, got {max_triangles!r}")
    check(isinstance(alpha, (int, float)) and 0 < alpha < 1, f"alpha must be in (0, 1), got {alpha!r}")
    check(isinstance(n_null, (int, np.integer)) and n_null >= 2, f"n_null must be an int >= 2, got {n_null!r}")
    check(1 / (n_null + 1) < alpha, f"n_null = {n_null} cannot give p < alpha = {alpha:g} (the smallest p is "
          f"1/(n_null + 1)); use n_null >= {int(np.ceil(1 / alpha))}")
    check(isinstance(equilateral_cv, (int, float)) and equilateral_cv >= 0,
          f"equilateral_cv must be >= 0, got {equilateral_cv!r}")
    check(not symmetric or bool((d <= np.sqrt(2) * (1 + 1e-9)).all()),
          f"symmetric=True expects distances d = sqrt(2 (1 - |q|)) <= sqrt(2) of normalised overlaps "
          f"(distances_from_overlaps(q, symmetric=True)); the largest is {d.max():.4g}")
    tri = _triangles(k, max_triangles, seed)
    obs = _k_stats(d, tri)
    dv = squareform(d, checks=False)
    cv = float(dv.std() / dv.mean()) if dv.mean() > 0 else 0.0
    nan = float("nan")
    summary = {"points": k, "triangles": int(len(tri)), "K_mean": obs["K_mean"], "K_mean_se": nan,
               "K_median": obs["K_median"], "subdominant_distance": obs["subdominant_distance"],
               "null": NULL + (", folded |q|" if symmetric else ""), "D_eff": nan, "null_exponent": nan,
               "null_dimensions": nan, "null_K_mean": nan, "null_K_std": nan, "z": nan, "p_value": 1.0,
               "alpha": float(alpha), "n_null": int(n_null), "cv": cv, "trivial": bool(cv < equilateral_cv),
               "symmetric": bool(symmetric)}
    if dv.std() <= 1e-12 * max(dv.mean(), 1e-300):  # all distances equal: K is 0/0, nothing to test
        summary["verdict"] = "trivial"
        return UltrametricityResult(obs["K"], obs["sides"], summary, np.array([]))
    summary["K_mean_se"] = _k_mean_jackknife(d, tri)
    d2 = d**2
    s = np.maximum(_additive_norms(d2), 1e-12 * d2.max())
    a, dim = _fit_null(d2, s, symmetric, seed_for(seed, 62))
    lam, w, d_rest = _spectrum(a, dim, k)
    d_eff = float((lam.sum() + w) ** 2 / ((lam**2).sum() + (w * w / d_rest if w > 0 else 0.0)))
    rng = np.random.default_rng(seed_for(seed, 61))
    pairs = _pair_lookup(k)
    sides = np.stack([pairs[tri[:, 0], tri[:, 1]], pairs[tri[:, 1], tri[:, 2]], pairs[tri[:, 0], tri[:, 2]]], 1)
    iu = np.triu_indices(k, 1)
    chunk = max(1, min(n_null, int(1e6 // max(k * k, len(tri)))))
    null_k = np.concatenate([
        _k_means(np.sqrt(_null_distances(s, a, dim, min(chunk, n_null - i), rng, symmetric)[:, iu[0], iu[1]]), sides)
        for i in range(0, n_null, chunk)])
    k_obs = float(_k_means(dv, sides)[0])
    m, sd = float(null_k.mean()), float(null_k.std(ddof=1))
    z = (k_obs - m) / sd if sd > 0 else nan
    p = float((1 + np.sum(null_k <= k_obs)) / (n_null + 1))
    hier = p < alpha and z < 0
    verdict = "hierarchical" if hier else ("trivial" if summary["trivial"] else "no evidence of hierarchy")
    summary.update({"D_eff": d_eff, "null_exponent": float(a), "null_dimensions": float(dim), "null_K_mean": m,
                    "null_K_std": sd, "z": float(z), "p_value": p, "verdict": verdict})
    return UltrametricityResult(obs["K"], obs["sides"], summary, null_k)


def describe_ultrametricity(summary: dict) -> str:
    """One sentence chosen from the numbers of an :func:`ultrametricity` summary: direction and significance
    of K against its null, or the trivial (near-equilateral) case."""
    need = ("K_mean", "K_mean_se", "null_K_mean", "null_K_std", "z", "p_value", "alpha", "n_null", "cv", "verdict")
    missing = [key for key in need if key not in summary]
    check(not missing, f"not an ultrametricity summary: missing {', '.join(missing)}")
    v = summary["verdict"]
    choice("verdict", v, VERDICTS)
    k, se, nm, ns = summary["K_mean"], summary["K_mean_se"], summary["null_K_mean"], summary["null_K_std"]
    z, p, alpha, cv = summary["z"], summary["p_value"], summary["alpha"], summary["cv"]
    p_min = 1 / (summary["n_null"] + 1)
    p_txt = f"p <= {p_min:.2g}" if p <= p_min * (1 + 1e-9) else f"p = {p:.2g}"
    stats = f"(z = {z:+.1f}, {p_txt} at alpha = {alpha:g})"
    k_txt = f"K = {k:.2f} ± {se:.2f}" if np.isfinite(se) else f"K = {k:.2f}"
    null_txt = f"its null {nm:.2f} ± {ns:.2f}"
    if v == "trivial" and not np.isfinite(z):
        return f"All distances are equal (cv = {cv:.2g}): trivially ultrametric, one state, no tree."
    if v == "trivial":
        return (f"The distances are nearly equal (cv = {cv:.2g}): trivially ultrametric, one state, no tree "
                f"({k_txt} against {null_txt}, {stats[1:-1]}).")
    if v == "hierarchical":
        weak = f"; the contrast is small (cv = {cv:.2g})" if summary.get("trivial") else ""
        return (f"{k_txt} lies below {null_txt} {stats}: the points are hierarchically organised (ultrametric), "
                f"as the states of a spin glass{weak}.")
    where = "lies below" if z < 0 else "does not lie below"
    but = " but not significantly" if z < 0 else ""
    return (f"{k_txt} {where} {null_txt}{but} {stats}: no evidence of hierarchy; the distances look like one "
            f"Gaussian cloud of directions with the same norms, spread and anisotropy.")


def parisi_matrix(q, order) -> np.ndarray:
    """The overlap matrix with rows and columns in dendrogram leaf order (blocks on the diagonal = states)."""
    q = np.asarray(q)
    return q[np.ix_(order, order)]


@dataclass
class ReplicaAnalysis:
    """One system's overlaps analysed: the summary ``row`` (P(q) moments, cophenetic correlation, the ultrametricity
    summary and its sentence), the off-diagonal overlaps ``pq`` (P(q)'s sample) and the tables that draw its tree
    (``overlaps``, ``linkage``, ``order``, ``triangles``: the first 5,000 triangles' sorted sides)."""

    row: dict
    pq: np.ndarray
    tables: dict[str, pd.DataFrame]


def analyse_overlaps(q: np.ndarray, *, label: str, system: str | None = None, method: str = "average",
                     max_triangles: int = 200000, seed: int = 0, alpha: float = 0.01, symmetric: bool = False,
                     tree: bool = True) -> ReplicaAnalysis:
    """Overlaps -> distances d = sqrt(2 (1 - q)) (of |q| when ``symmetric``: spin-flip symmetric systems) -> the
    dendrogram (:func:`hierarchy`) and the calibrated ultrametricity test (:func:`ultrametricity`), P(q) and its
    moments. ``system`` names the row (default ``label``); ``tree``: also the tables that draw the tree.

    Example::

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((8, 50))
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> a = analyse_overlaps(x @ x.T, label="cloud")
        >>> a.row["replicas"], sorted(a.tables)
        (8, ['linkage', 'order', 'overlaps', 'triangles'])
    """
    d = distances_from_overlaps(q, symmetric=symmetric)
    h = hierarchy(d, method=method, max_triangles=max_triangles, seed=seed, alpha=alpha, symmetric=symmetric)
    u = h.ultrametricity
    pq = overlap_distribution(q)
    k = q.shape[0]
    tables = {}
    if tree:
        ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        tables = {"overlaps": pd.DataFrame({"a": ii.ravel(), "b": jj.ravel(), "q": q.ravel()}),
                  "linkage": pd.DataFrame(h.linkage, columns=["left", "right", "height", "size"]),
                  "order": pd.DataFrame({"leaf": h.order}),
                  "triangles": pd.DataFrame(u.sides[:5000], columns=["d_min", "d_mid", "d_max"])}
    row = {"system": system or label, "label": label, "replicas": k, **pq.moments, "cophenetic": h.cophenetic,
           **u.summary, "sentence": describe_ultrametricity(u.summary)}
    return ReplicaAnalysis(row, pq.q, tables)


def within_basin(problem: Problem, start: torch.Tensor, *, temperature: float, samples: int, sweeps: int,
                 step_size: float, seed: int = 0, progress: bool = False) -> tuple[np.ndarray, dict]:
    """Equilibrium samples of exp(-E/T) drawn around one trained solution: ``samples`` independent Metropolis chains
    started at ``start`` (:func:`lossglass.parallel_tempering` at the one temperature ``temperature``), the second
    half of each chain sampled. Returns their ``(samples, samples)`` overlap matrix (the P(q) of one basin, to set
    beside the overlaps of independent solutions) and the sampler's summary: temperature, move acceptance, mean
    energy after burn-in, whether it equilibrated, and the number of training samples."""
    from ..sampling import overlap_matrix, parallel_tempering

    res = parallel_tempering(problem, [temperature], n_replicas=samples, sweeps=sweeps, seed=seed, start=start,
                             step_size=step_size, sample_every=max(1, sweeps - sweeps // 2), progress=progress)
    info = {"temperature": temperature, "move_acceptance": float(res.move_acceptance[0]),
            "energy_mean": float(res.energy[res.params["burn_in"]:, 0].mean()),
            "equilibrated": bool(res.equilibrated), "n_data": len(problem.dataset.y_train)}
    return overlap_matrix(res, 0), info
