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


#: rows per tile of :func:`cosine_overlaps`: K <= TILE is one pass (one GEMM); above it no more than two tiles of
#: TILE rows are held in float64 at a time
TILE = 512


def _unit_rows(v: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    return v.double() / norms


def cosine_overlaps(a: torch.Tensor, b: torch.Tensor | None = None, *, paired: bool = False,
                    tile: int | None = None) -> torch.Tensor:
    """Cosine overlaps q_ab = <u_a, u_b>, u = v / |v| (each row normalised in float64, |v| floored at 1e-30), clipped
    to [-1, 1]: the one cosine of the package (the replicas' overlap matrix, the layer overlaps, the timeline's
    pair overlaps).

    - ``b`` None: the ``(K, K)`` matrix of the rows of ``a`` ``(K, P)``; ``b`` given: the ``(K, M)`` matrix between
      the rows of ``a`` and of ``b`` ``(M, P)``.
    - ``paired=True``: the ``(K,)`` overlaps of row i of ``a`` with row i of ``b``, sum_j u_aij u_bij.
    - ``tile``: the matrix in blocks of ``tile`` x ``tile`` rows (default :data:`TILE`), so that no more than two
      blocks of rows are held in float64 at once (memory O(tile P) beside the inputs, which stay in their own
      dtype); K <= tile is one GEMM; of ``a`` with itself only the blocks on and above the diagonal are computed and
      the others mirrored. The row norms are computed once, per row, so a block's entries are those of
      the one-pass product wherever the BLAS reduces each dot product in the same order (tests/test_replicas.py
      checks equality at the sizes it covers)."""
    a = torch.as_tensor(a)
    check(a.ndim == 2, f"cosine_overlaps needs (K, P) rows, got shape {tuple(a.shape)}")
    same = b is None
    b = a if same else torch.as_tensor(b)
    check(b.ndim == 2 and b.shape[1] == a.shape[1], f"rows of different lengths: {tuple(a.shape)} and {tuple(b.shape)}")
    tile = TILE if tile is None else tile
    check(isinstance(tile, int) and tile > 0, f"tile must be a positive int, got {tile!r}")
    na = a.double().norm(dim=1, keepdim=True).clamp_min(1e-30) if a.shape[0] <= tile else torch.cat(
        [a[i:i + tile].double().norm(dim=1, keepdim=True) for i in range(0, a.shape[0], tile)]).clamp_min(1e-30)
    nb = na if same else (b.double().norm(dim=1, keepdim=True).clamp_min(1e-30) if b.shape[0] <= tile else torch.cat(
        [b[i:i + tile].double().norm(dim=1, keepdim=True) for i in range(0, b.shape[0], tile)]).clamp_min(1e-30))
    if paired:
        check(a.shape[0] == b.shape[0], f"paired overlaps need as many rows in a as in b: {a.shape[0]} != {b.shape[0]}")
        return torch.cat([(_unit_rows(a[i:i + tile], na[i:i + tile]) * _unit_rows(b[i:i + tile], nb[i:i + tile]))
                          .sum(1) for i in range(0, a.shape[0], tile)]).clamp(-1, 1)
    if a.shape[0] <= tile and b.shape[0] <= tile:
        ua = _unit_rows(a, na)
        ub = ua if same else _unit_rows(b, nb)
        return (ua @ ub.T).clamp(-1, 1)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for i in range(0, a.shape[0], tile):
        ua = _unit_rows(a[i:i + tile], na[i:i + tile])
        for j in range(i if same else 0, b.shape[0], tile):  # of a matrix with itself: the upper blocks, mirrored
            ub = ua if same and i == j else _unit_rows(b[j:j + tile], nb[j:j + tile])
            out[i:i + tile, j:j + tile] = ua @ ub.T
            if same and j > i:
                out[j:j + tile, i:i + tile] = out[i:i + tile, j:j + tile].T
    return out.clamp_(-1, 1)


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
        return cosine_overlaps(theta.cpu())
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
        return cosine_overlaps(h.reshape(h.shape[0], -1).cpu())


def layer_overlaps(problem: Problem, theta: torch.Tensor) -> pd.DataFrame:
    """Mean and spread over pairs a < b of the overlap of each parameter tensor separately."""
    theta = torch.as_tensor(theta)
    iu = np.triu_indices(theta.shape[0], 1)
    rows = []
    for info in problem.params:
        q = cosine_overlaps(theta[:, info.slice].cpu()).numpy()[iu]
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
              symmetric: bool = False, norms: str = "auto") -> HierarchyResult:
    """Agglomerative clustering of the replicas (scipy linkage: average, complete, single or ward), the
    cophenetic correlation (the Pearson correlation of d_ab with the dendrogram's merge heights) and, with
    ``ultrametric=True``, the ultrametricity test against its calibrated null (:func:`ultrametricity`, which
    needs at least 4 points; ``n_null``, ``alpha``, ``max_triangles``, ``seed``, ``symmetric`` and ``norms`` are passed
    to it)."""
    d = check_distances(distances)
    choice("linkage method", method, ("average", "complete", "single", "ward"))
    cond = squareform(d, checks=False)
    z = sch.linkage(cond, method=method)
    coph_corr, coph = sch.cophenet(z, cond)
    heights = z[:, 2]
    levels = pd.DataFrame({"height": heights, "n_clusters": np.arange(len(heights), 0, -1)})
    um = (ultrametricity(d, max_triangles=max_triangles, n_null=n_null, alpha=alpha, seed=seed, symmetric=symmetric,
                         norms=norms) if ultrametric else None)
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


def _fit_norms(d2: np.ndarray, iters: int = 50) -> np.ndarray:
    """Squared norms s_a about a fitted origin: weighted least squares of d_ab^2 ~ s_a + s_b with weights
    1 / (s_a s_b), iterated from the unweighted fit (:func:`_additive_norms`).

    For x_a = rho_a u_a with random directions, d_ab^2 = s_a + s_b - 2 rho_a rho_b cos_ab: the residual's variance
    is proportional to s_a s_b, so the unweighted fit lets the large points' cross terms swamp the small points'
    norms (lognormal norms, sigma = 1.5: the smallest s off by a factor 30); the weighted fit recovers them to a
    few per cent. Each iteration solves the normal equations (diag(W 1) + W) s = (W o d^2) 1."""
    k = d2.shape[0]
    floor = 1e-9 * max(float(d2.max()), 1e-300)
    s = np.maximum(_additive_norms(d2), floor)
    off = ~np.eye(k, dtype=bool)
    for _ in range(iters):
        w = np.where(off, 1.0 / np.outer(s, s), 0.0)
        new = np.maximum(np.linalg.solve(np.diag(w.sum(1)) + w, (w * d2).sum(1)), floor)
        done = bool(np.allclose(new, s, rtol=1e-9, atol=0))
        s = new
        if done:
            break
    return s


NORMS = ("auto", "unit", "fitted")
#: the smallest set the null is calibrated for, per norms mode (benchmarks/calibrate_ultrametric.py; 300 sets per
#: family at alpha = 0.01): unit norms from K = 6 (0-2.3 %: a great circle 5/300 at K = 6, 7/300 at K = 8); general
#: distances need more points to place their origin (lognormal norms, sigma = 1.5: 11/300 at K = 6, 10/300 at K = 8,
#: 1-2 of 60 at K = 16-64). Below it: "cannot tell"
K_MIN = {"unit": 6, "fitted": 16}
#: the fewest clusters whose centroids are tested for grouping when the top level is searched (:func:`_partition`):
#: unit norms at K = 4-5: 0-5 of 300 structureless sets at alpha = 0.01 (little power: a 2 + 2 grouping of 4
#: centroids gives p ~ 0.2-0.3)
K_CLIMB = {"unit": 4, "fitted": 16}
#: largest share of the implied Gram matrix's spectral weight that may sit in negative eigenvalues
MAX_NEGATIVE = 0.05


def _on_unit_sphere(d: np.ndarray) -> bool:
    """Whether the distances can be chords d = sqrt(2 (1 - q)) of unit vectors: every d <= 2 and the implied
    q = 1 - d^2 / 2 is positive semi-definite (a Gram matrix of unit vectors)."""
    if d.max() > 2 * (1 + 1e-9):
        return False
    w = np.linalg.eigvalsh(1 - d**2 / 2)
    return bool(w[0] >= -1e-8 * max(w[-1], 1.0))


def _centroid_norms(d2: np.ndarray) -> np.ndarray:
    """Squared distances from the centroid, the diagonal of the classical-MDS Gram matrix -J D^2 J / 2
    (Torgerson 1952; J = I - 1 1^T / K)."""
    k = d2.shape[0]
    j = np.eye(k) - 1 / k
    return np.maximum(np.diag(-j @ d2 @ j / 2), 1e-9 * max(float(d2.max()), 1e-300))


#: where the origin of general (``norms="fitted"``) distances is put: both are tried (:func:`_um_test`)
ORIGINS = ("fitted", "centroid")


def _geometry(d: np.ndarray, norms: str, symmetric: bool, origin: str = "fitted") -> tuple[np.ndarray, np.ndarray, str]:
    """Squared norms s about the origin and the implied cosines c (unit diagonal, clipped to [-1, 1]):
    ``unit``: s = 1, c = 1 - d^2 / 2 (for symmetric distances: |q|); ``fitted``: s about the ``origin``
    (``"fitted"``: :func:`_fit_norms`; ``"centroid"``: :func:`_centroid_norms`),
    c_ab = (s_a + s_b - d_ab^2) / (2 sqrt(s_a s_b)). ``auto`` is ``unit`` when :func:`_on_unit_sphere`."""
    k = d.shape[0]
    mode = "unit" if symmetric or norms == "unit" or (norms == "auto" and _on_unit_sphere(d)) else "fitted"
    d2 = d**2
    if mode == "unit":
        s = np.ones(k)
        c = 1 - d2 / 2
    else:
        s = _fit_norms(d2) if origin == "fitted" else _centroid_norms(d2)
        r = np.sqrt(s)
        c = (s[:, None] + s[None] - d2) / (2 * r[:, None] * r[None])
    c = np.clip(c, -1, 1)
    np.fill_diagonal(c, 1)
    return s, c, mode


def _haar_gram(lam: np.ndarray, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, K, K)`` cosine matrices of K points with Gram matrix O diag(lam) O^T, O a Haar-random rotation of
    replica space (only its first m = len(lam) columns matter: the QR frame of a K x m Gaussian matrix), each
    normalised to a unit diagonal."""
    z = torch.from_numpy(rng.standard_normal((n, k, len(lam))))
    q, _ = torch.linalg.qr(z)
    g = torch.bmm(q * torch.from_numpy(lam), q.transpose(1, 2)).numpy()
    dg = np.sqrt(np.clip(np.diagonal(g, axis1=1, axis2=2), 1e-300, None))
    return g / dg[:, :, None] / dg[:, None, :]


def _matched_spectrum(target: np.ndarray, k: int, rng: np.random.Generator, iters: int = 4) -> np.ndarray:
    """The spectrum lam to mix so that the mixed and normalised cosine matrices have on average the eigenvalues
    ``target`` (increasing): normalising the rows of O diag(lam) O^T flattens its spectrum (unit vectors in D = 50:
    without this the null was less anisotropic than the data and z was biased by -0.9 at K = 64). Fixed point
    lam <- lam * target / E[spectrum], on a fixed pilot of frames (common random numbers: deterministic)."""
    n = int(np.clip(1024 // k, 2, 16))
    m = len(target)
    z = torch.from_numpy(rng.standard_normal((n, k, m)))
    q, _ = torch.linalg.qr(z)
    lam = target.copy()
    for _ in range(iters):
        g = torch.bmm(q * torch.from_numpy(lam), q.transpose(1, 2))
        dg = torch.sqrt(torch.diagonal(g, dim1=1, dim2=2).clamp_min(1e-300))
        mean = torch.linalg.eigvalsh(g / dg[:, :, None] / dg[:, None, :]).numpy()[:, k - m:].mean(0)
        lam = lam * target / np.maximum(mean, 1e-12 * mean.max())
        lam *= target.sum() / lam.sum()
    return lam


def _rank_map(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Each row of ``x`` replaced, rank for rank, by the sorted ``values`` (a monotone map onto their law)."""
    out = np.empty_like(x)
    np.put_along_axis(out, np.argsort(x, -1), np.broadcast_to(np.sort(values), x.shape), -1)
    return out


def _log_row_scales(c: np.ndarray) -> np.ndarray:
    """log of each point's robust overlap scale, the median over b != a of c_ab^2 (batched over leading axes)."""
    k = c.shape[-1]
    c2 = c**2 + np.where(np.eye(k) > 0, np.nan, 0.0)
    return np.log(np.maximum(np.nanmedian(c2, -1), 1e-300))


@dataclass
class _Null:
    """What the null keeps of the data: squared norms ``s``, the sorted off-diagonal overlaps ``values`` (folded for
    symmetric data), the shared weights ``w`` (per point) and the spectrum ``lam`` to mix."""

    s: np.ndarray
    values: np.ndarray
    w: np.ndarray
    lam: np.ndarray
    shrink: float
    symmetric: bool


def _null_model(s: np.ndarray, c: np.ndarray, symmetric: bool, rng: np.random.Generator) -> _Null:
    """Fit the null's parts (:func:`_null_draws`) to the data's norms ``s`` and cosines ``c``.

    Row scales: heavy-tailed coordinates make some points 'pure' (one dominant coordinate: small overlaps with
    everyone) and others not; that spread of overlap scale between rows, which mixing alone erases, made the
    mixed null call 15-54 % of Cauchy sets at K = 64 hierarchical. Model u_a = sqrt(w_a) v_a + sqrt(1 - w_a) p_a
    (v_a in a shared space, p_a private): q_ab = sqrt(w_a w_b) v_ab. log w_a is the robust row scale
    (:func:`_log_row_scales`) shrunk towards its largest value by lambda = max(0, 1 - v_0 / v), v its variance over
    the points and v_0 the 95th percentile of that variance under the homoscedastic null (a pilot of
    :func:`_null_draws` with w = 1): neither sampling noise nor the spread of scales that anisotropy alone produces
    is taken for intrinsic (lambda = 0 for random unit vectors and power-law spectra, ~ 0.7 for Cauchy
    coordinates; without the pilot's anisotropy the weights made the null less anisotropic than the data,
    z = -1.6 on j^-1.5 spectra at K = 64), w = scale / max scale. The mixed matrix is
    V = I + clip((c - I) / sqrt(w w^T), -1, 1), its positive spectrum matched by :func:`_matched_spectrum`.

    Folded overlaps (``symmetric``: c = |q|, signs unknown) are unfolded as signed overlaps without structure: the
    spectrum mixed is the mean spectrum of cosines of K Gaussian vectors in D = 1 / <q^2> dimensions (mixing |q|
    itself, whose mean is a strong shared component, made the null cluster its points: z = +1.2 to +4.2 on random
    Ising states, K = 16-64; |q| with random signs has a semicircle instead of a Marchenko-Pastur spectrum: z =
    -1.6 at K = 64)."""
    k = len(s)
    iu = np.triu_indices(k, 1)
    values = np.sort(np.abs(c[iu]) if symmetric else c[iu])
    if symmetric:  # unfold |q|: the mean spectrum of cosines of K Gaussian vectors in D = 1 / <q^2> dimensions
        dim = int(np.clip(round(1 / max(float(np.mean(values**2)), 1e-300)), 1, 50 * k))
        z = rng.standard_normal((8, k, dim))
        g = z @ z.transpose(0, 2, 1)
        dg = np.sqrt(np.diagonal(g, axis1=1, axis2=2))
        w = np.sort(np.linalg.eigvalsh(g / dg[:, :, None] / dg[:, None, :]), -1).mean(0)
    else:
        w = np.linalg.eigvalsh(c)
    lam = _matched_spectrum(w[w > 1e-12 * max(w[-1], 1e-300)], k, rng)
    pilot = _null_draws(_Null(s, values, np.ones(k), lam, 0.0, symmetric), int(np.clip(2048 // k, 8, 32)), rng,
                        cosines=True)
    ls = _log_row_scales(c)
    v_obs, v_0 = float(ls.var()), float(np.quantile(_log_row_scales(pilot).var(-1), 0.95))
    shrink = max(0.0, 1.0 - v_0 / v_obs) if v_obs > 0 else 0.0
    if shrink == 0:
        return _Null(s, values, np.ones(k), lam, 0.0, symmetric)
    scale = np.exp(shrink * (ls - ls.max()))
    if not symmetric:
        sw = np.sqrt(np.outer(scale, scale))
        wv = np.linalg.eigvalsh(np.eye(k) + np.clip((c - np.eye(k)) / sw, -1, 1) * (1 - np.eye(k)))
        lam = _matched_spectrum(wv[wv > 1e-12 * max(wv[-1], 1e-300)], k, rng)
    return _Null(s, values, scale, lam, shrink, symmetric)


def _null_draws(null: _Null, n: int, rng: np.random.Generator, cosines: bool = False) -> np.ndarray:
    """``(n, n_pairs)`` condensed null distances (or with ``cosines`` the ``(n, K, K)`` overlap matrices): the
    replicas mixed by random orthogonal matrices, each point's shared weight kept, the mixed overlaps mapped onto
    the data's own overlap law, the data's norms.

    1. Mixing: V' = O diag(lam) O^T normalised to a unit diagonal, O a Haar-random rotation of replica space
       (:func:`_haar_gram`): the Gram matrix of the K points after x' = O x. Clusters are spread over all mixed
       replicas; the spectrum (dimension, anisotropy, any low-dimensional shape: a circle stays a circle) is kept.
    2. Shared weights: q'_ab = sqrt(w_a w_b) V'_ab (folded |q'| for symmetric data).
    3. Overlap law: the off-diagonal q' of each draw are replaced rank for rank by the data's own sorted
       off-diagonal overlaps (:func:`_rank_map`), so the null has exactly the data's P(q), tails included.
    4. Norms: d'^2_ab = s_a + s_b - 2 sqrt(s_a s_b) q'_ab."""
    k = len(null.s)
    iu = np.triu_indices(k, 1)
    g = _haar_gram(null.lam, k, n, rng)
    q = (g * np.sqrt(np.outer(null.w, null.w)))[:, iu[0], iu[1]]
    q = _rank_map(np.abs(q) if null.symmetric else q, null.values)
    if cosines:
        out = np.zeros((n, k, k))
        out[:, iu[0], iu[1]] = q
        out = out + out.transpose(0, 2, 1)
        out[:, np.arange(k), np.arange(k)] = 1
        return out
    r = np.sqrt(null.s)
    return np.sqrt(np.clip(null.s[iu[0]] + null.s[iu[1]] - 2 * (r[iu[0]] * r[iu[1]]) * q, 0, None))


def _why_not(d: np.ndarray, w: np.ndarray, mode: str, symmetric: bool, k_min: int) -> str:
    """The reason no calibrated null exists for these distances ('' when there is one); ``w`` the eigenvalues of
    the implied cosine matrix (unit norms: it must be a Gram matrix; fitted norms: the distances must be
    Euclidean)."""
    k = d.shape[0]
    if k < k_min:
        what = "" if mode == "unit" else " for general distances, whose origin is fitted"
        return f"too few points ({k}): the null is calibrated from K = {k_min} on{what}"
    dv = squareform(d, checks=False)
    same = int(np.sum(dv <= 1e-12 * max(dv.max(), 1e-300)))
    if same and dv.max() > 0:  # ultrametricity() merges coinciding points; a set of centroids may still have some
        return f"{same} pair{'s' if same > 1 else ''} of points coincide"
    if symmetric:
        return ""
    if mode == "fitted":  # Euclidean at all? the classical-MDS Gram -J D^2 J / 2 (Torgerson 1952)
        j = np.eye(k) - 1 / k
        w = np.linalg.eigvalsh(-j @ (d**2) @ j / 2)
    neg = float(-w[w < 0].sum() / max(np.abs(w).sum(), 1e-300))
    if neg > MAX_NEGATIVE:
        where = "unit vectors" if mode == "unit" else "points in a Euclidean space"
        return (f"the distances are not those of {where} ({neg:.0%} of the Gram matrix's weight is in negative "
                "eigenvalues), which the null's points are")
    return ""


def _um_test(d: np.ndarray, *, norms: str, symmetric: bool, n_null: int, max_triangles: int, seed: int,
             climb: bool = False) -> dict:
    """One test of K_mean against the null (:func:`_null_model`, :func:`_null_draws`; no levels): observed and
    null K_mean, z, p, the norms' mode, D_eff (participation ratio (sum lam)^2 / sum lam^2 of the data's
    spectrum), the row-scale shrinkage and the reason when no null can be calibrated (then p is NaN).

    General distances (norms "fitted") have no known origin: the weighted fit (:func:`_fit_norms`) is right for
    clouds whose norms differ (lognormal norms: the centroid null called 30 of 30 sets at K = 32 hierarchical) and
    the centroid for low-dimensional shapes (a uniform square: the fitted null called 18-23 % hierarchical, the
    centroid null 0 of 30). Both nulls are run and the larger p is kept: an intersection-union test (Berger 1982),
    whose false-positive rate is at most that of the better-calibrated of the two."""
    k = d.shape[0]
    s, c, mode = _geometry(d, norms, symmetric)
    w = np.linalg.eigvalsh(c)
    lam = w[w > 1e-12 * max(w[-1], 1e-300)]
    why = _why_not(d, w, mode, symmetric, (K_CLIMB if climb else K_MIN)[mode])
    out = {"norms": "folded |q|" if symmetric else mode, "D_eff": float(lam.sum() ** 2 / max((lam**2).sum(), 1e-300)),
           "why": why, "null_k": np.array([]), "K_obs": float("nan"),
           "null_K_mean": float("nan"), "null_K_std": float("nan"), "z": float("nan"), "p": float("nan"),
           "shrink": float("nan")}
    tri = _triangles(k, max_triangles, seed)
    pairs = _pair_lookup(k)
    sides = np.stack([pairs[tri[:, 0], tri[:, 1]], pairs[tri[:, 1], tri[:, 2]], pairs[tri[:, 0], tri[:, 2]]], 1)
    dv = squareform(d, checks=False)
    out["K_obs"] = float(_k_means(dv, sides)[0])
    if out["why"]:
        return out
    chunk = max(1, min(n_null, int(2e6 // max(k * k, len(tri)))))
    best = None
    for origin in ORIGINS if mode == "fitted" else ("unit",):
        if origin == "centroid":
            s, c, _ = _geometry(d, norms, symmetric, origin)
        null = _null_model(s, c, symmetric, np.random.default_rng(seed_for(seed, 62)))
        rng = np.random.default_rng(seed_for(seed, 61))
        null_k = np.concatenate([_k_means(_null_draws(null, min(chunk, n_null - i), rng), sides)
                                 for i in range(0, n_null, chunk)])
        m, sd = float(null_k.mean()), float(null_k.std(ddof=1))
        res = {"shrink": null.shrink, "null_k": null_k, "null_K_mean": m, "null_K_std": sd,
               "z": (out["K_obs"] - m) / sd if sd > 0 else float("nan"),
               "p": float((1 + np.sum(null_k <= out["K_obs"])) / (n_null + 1))}
        if best is None or (res["p"], np.nan_to_num(res["z"])) > (best["p"], np.nan_to_num(best["z"])):
            best = res
    out.update(best)
    return out


def _top_partition(d: np.ndarray) -> np.ndarray:
    """Labels of the top-level clusters: the average-linkage dendrogram cut at its largest relative gap,
    m = argmax h_(K-m) / h_(K-m-1) over m = 2..K/2 (h the merge heights in increasing order: the cut leaves m
    clusters whose merges are all far below the merges between them)."""
    k = d.shape[0]
    z = sch.linkage(squareform(d, checks=False), "average")
    h = np.maximum(z[:, 2], 1e-12 * max(z[-1, 2], 1e-300))
    ms = np.arange(2, max(2, k // 2) + 1)
    m = int(ms[np.argmax(h[k - ms] / h[k - ms - 1])])
    return sch.fcluster(z, m, criterion="maxclust") - 1


def _fisher(p: np.ndarray) -> float:
    """Fisher's combination of independent p-values: P(chi^2_(2n) >= -2 sum log p) (Fisher 1925), by
    ``scipy.stats.combine_pvalues``."""
    from scipy.stats import combine_pvalues

    p = np.asarray(p, dtype=np.float64)
    return float(combine_pvalues(p, method="fisher").pvalue) if len(p) else float("nan")


def _centroid_distances(d: np.ndarray, labels: np.ndarray, norms: str, symmetric: bool) -> np.ndarray:
    """Distances between the clusters' centroids: the Gram matrix about the origin (:func:`_geometry`)
    averaged over the members, G_AB = mean_{a in A, b in B} sqrt(s_a s_b) q_ab; with unit norms the centroids'
    directions, d_AB = sqrt(2 (1 - G_AB / sqrt(G_AA G_BB))) (for ``symmetric`` the same with |q|), else the
    Euclidean distances between the centroids, d_AB^2 = G_AA + G_BB - 2 G_AB."""
    s, c, mode = _geometry(d, norms, symmetric)
    r = np.sqrt(s)
    m = int(labels.max()) + 1
    onehot = (labels[:, None] == np.arange(m)[None]).astype(np.float64)
    onehot /= onehot.sum(0, keepdims=True)
    g = onehot.T @ (r[:, None] * r[None] * c) @ onehot
    dg = np.clip(np.diag(g), 1e-300, None)
    if mode == "unit":
        out = np.sqrt(np.clip(2 * (1 - g / np.sqrt(dg[:, None] * dg[None])), 0, None))
    else:
        out = np.sqrt(np.clip(dg[:, None] + dg[None] - 2 * g, 0, None))
    np.fill_diagonal(out, 0)
    return (out + out.T) / 2


def _partition(d: np.ndarray, *, alpha: float, norms: str, symmetric: bool, n_null: int, max_triangles: int,
               seed: int) -> np.ndarray:
    """The top-level clusters of a set: the dendrogram cut at its largest gap (:func:`_top_partition`), then
    climbed: while there are at least :data:`K_CLIMB` clusters and their centroids (:func:`_centroid_distances`)
    are themselves significantly clustered (the same test), the clusters are merged into the centroids' own
    top-level clusters. The largest gap of a nested tree may lie at a lower level (small leaf noise); the climb
    finds the coarsest level the tests support."""
    labels = _top_partition(d)
    for step in range(d.shape[0]):
        m = int(labels.max()) + 1
        if m < K_CLIMB["unit" if symmetric or norms == "unit" else "fitted"]:
            break
        dc = _centroid_distances(d, labels, norms, symmetric)
        t = _um_test(dc, norms=norms, symmetric=symmetric, n_null=n_null, max_triangles=max_triangles,
                     seed=seed_for(seed, 64, step), climb=True)
        if not (t["p"] < alpha and t["z"] < 0):
            break
        labels = _top_partition(dc)[labels]
    return labels


def _levels(d: np.ndarray, p_top: float, *, alpha: float, norms: str, symmetric: bool, n_null: int,
            max_triangles: int, seed: int) -> tuple[pd.DataFrame, int, bool, int]:
    """How many nested levels of clusters. Level 1 is the whole set's test (significant when called). Level
    L + 1 is the test for structure within the clusters of level L: each group is split into its top-level
    clusters (:func:`_partition`), every cluster with at least :data:`K_MIN` points is tested against its own null
    (same norms mode), and the per-cluster p-values are combined by Fisher's method; the level counts when the
    combination is below ``alpha``, and the next level descends into the clusters that were individually
    significant. Returns the per-level table (level, groups, clusters tested, points, p_value), the number of
    levels, whether the count is complete (False when the next level could not be tested: clusters smaller than
    K_MIN) and the number of top-level clusters."""
    kw = dict(norms=norms, symmetric=symmetric, n_null=n_null, max_triangles=max_triangles)
    rows = [{"level": 1, "groups": 1, "tested": 1, "points": d.shape[0], "p_value": p_top}]
    groups = [np.arange(d.shape[0])]
    levels, complete, top = 1, True, 0
    while True:
        children = []
        for i, g in enumerate(groups):
            lab = _partition(d[np.ix_(g, g)], alpha=alpha, seed=seed_for(seed, 65, levels, i), **kw)
            children += [g[lab == j] for j in range(lab.max() + 1)]
        if levels == 1:
            top = len(children)
        testable = [c for c in children if len(c) >= K_MIN["unit" if symmetric or norms == "unit" else "fitted"]]
        if not testable:
            complete = False
            break
        ps = np.array([_um_test(d[np.ix_(c, c)], seed=seed_for(seed, 63, levels, i), **kw)["p"]
                       for i, c in enumerate(testable)])
        ok = np.isfinite(ps)
        if not ok.any():
            complete = False
            break
        p = _fisher(ps[ok])
        rows.append({"level": levels + 1, "groups": len(children), "tested": int(ok.sum()),
                     "points": int(sum(len(c) for c, o in zip(testable, ok) if o)), "p_value": p})
        if not p < alpha:
            break
        levels += 1
        groups = [c for c, pc in zip(testable, ps) if np.isfinite(pc) and pc < alpha]
        if not groups:  # significant together, none alone: nowhere to look for the next level
            complete = False
            break
    return pd.DataFrame(rows), levels, complete, top


NULL = ("the same points mixed by a random rotation of replica space (same Gram spectrum), each point's overlap scale "
        "kept, overlaps mapped onto the data's own overlap law, the data's norms")
VERDICTS = ("clusters", "nested", "no evidence", "trivial", "cannot tell")


@dataclass
class UltrametricityResult:
    """Katzgraber-Hartmann K = (d_max - d_mid) / sigma(d) per triangle (``K``, with the sorted ``sides``), the
    ``summary`` (see :func:`ultrametricity`), ``null_K``: K_mean of each null draw ``(n_null,)``, and ``levels``:
    one row per level tested (level, groups, clusters tested, points, p_value)."""

    K: np.ndarray
    sides: np.ndarray
    summary: dict
    null_K: np.ndarray
    levels: pd.DataFrame = field(default_factory=pd.DataFrame)


def ultrametricity(distances, *, max_triangles: int = 200000, n_null: int = 200, alpha: float = 0.01, seed: int = 0,
                   equilateral_cv: float = 0.05, symmetric: bool = False, norms: str = "auto",
                   levels: bool = True) -> UltrametricityResult:
    """Test whether a set of points is organised in clusters, and in clusters within clusters (a tree:
    ultrametric, d(a,c) <= max(d(a,b), d(b,c)) for every triangle), against a null that keeps everything that is
    not hierarchy.

    Statistic (Katzgraber & Hartmann, PRL 102, 037207, 2009): K = (d_max - d_mid) / sigma(d) per triangle
    (sides sorted d_min <= d_mid <= d_max, sigma(d) the spread of all pairwise distances), averaged over every
    triangle or a seeded sample of ``max_triangles``; ultrametric sets have K concentrated at 0.

    Null (:func:`_null_model`, :func:`_null_draws`): the distances are read as
    d_ab^2 = s_a + s_b - 2 sqrt(s_a s_b) q_ab, points at squared norms s about an origin with overlaps q.
    ``norms="unit"``: s = 1, q = 1 - d^2 / 2 (the chords of normalised overlaps, :func:`distances_from_overlaps`);
    ``"fitted"``: general Euclidean distances, whose origin is unknown: the test is run about a weighted-least-
    squares origin (:func:`_fit_norms`) and about the centroid, and the larger p is kept (:func:`_um_test`);
    ``"auto"``: unit when every d <= 2 and 1 - d^2 / 2 is a Gram matrix (positive semi-definite), else fitted (a
    Euclidean cloud smaller than 2 with unequal norms must be passed ``norms="fitted"``). ``symmetric=True``:
    distances from |q| (spin-flip symmetric systems), unit norms, the null's overlaps folded. The null mixes the
    replicas by a random rotation of replica space with the data's Gram spectrum (matched after normalisation,
    :func:`_matched_spectrum`: dimension, anisotropy, a low-dimensional shape are kept), keeps each point's
    overlap scale where the data's scales differ beyond what that mixing gives (heavy-tailed coordinates), maps
    the mixed overlaps rank for rank onto the data's own off-diagonal overlaps (keeps P(q), tails included) and
    keeps the norms; it destroys which replica is close to which, hence clusters. ``n_null`` draws give
    null_K_mean, null_K_std, z = (K_mean - null_K_mean) / null_K_std and the one-sided
    p = (1 + #{null <= K_mean}) / (n_null + 1).

    Calibration (benchmarks/calibrate_ultrametric.py, 18 structureless families, K = 16, 32, 64; FPR_TEXT):
    iid Student-t(2) and Cauchy coordinates (cosine and Euclidean distances), Gaussian clouds with lognormal norms
    (sigma = 1, 1.5), points on a great circle, random unit vectors, unequal-norm clouds, power-law and spiked
    spectra, a uniform square and random Ising states (folded). Nested trees on the sphere (K = 32-64, noise up to
    0.75 of the finest spread) are detected in 60 of 60 sets each. Nulls that fail there and are not used:
    Gaussian directions matched to the second and third moments of the cosines (the previous null: 70-95 % false
    positives on Cauchy coordinates, 20-60 % on lognormal norms); the mixing alone (keeps the spectrum, not the
    tails: 65-93 % on Cauchy); shuffling the overlaps among pairs (loses the geometry: 100 % on a great circle);
    mixing without the spectrum matched after normalisation (49-94 % on power-law spectra at K = 64); any null with
    norms fitted to unit-sphere data (the fit's noise is a spurious row structure: 45-100 %); a single origin for
    general distances (weighted fit: 18-23 % on the uniform square; centroid: 30 of 30 on lognormal norms).

    Levels (:func:`_levels`, ``levels=True``): when the whole set is significant, the same test within its
    top-level clusters (the largest dendrogram gap, climbed while the clusters' centroids test as grouped:
    :func:`_partition`; Fisher-combined over the clusters), then within theirs, and so on. Measured on nested
    trees (benchmarks/calibrate_ultrametric.py power, 60 sets per row): one level (4 clusters) counted as one in
    360 of 360 sets (never "nested"); two levels (3 x 3 and 4 x 4 clusters) counted as two in 90-100 %; three
    levels in 0-92 % (mostly counted as two: the binary and ternary upper levels are too few centroids to test).
    The count is a lower bound: it errs towards fewer levels.

    Verdict (``summary["verdict"]``, one of :data:`VERDICTS`): "cannot tell" when no calibrated null exists
    (fewer than :data:`K_MIN` distinct points: 6 with unit norms, 16 for general distances; non-Euclidean
    distances: ``verdict_reason`` says which);
    "clusters" when p < ``alpha`` and z < 0 and no structure is found within the top-level clusters
    (``levels`` = 1: one level, as one-step RSB); "nested" with ``levels`` >= 2 (clusters within clusters, as a
    Parisi tree); otherwise "trivial" when the distances are nearly equal (cv = std/mean < ``equilateral_cv``) and
    "no evidence". ``levels_complete`` is False when the level below the last one found could not be tested
    (clusters smaller than K_MIN), so the count is a lower bound. ``summary`` keys: points, triangles, K_mean,
    K_mean_se (leave-one-point-out jackknife), K_median, subdominant_distance, null, norms, D_eff, null_K_mean,
    null_K_std, z, p_value, alpha, n_null, cv, trivial, symmetric, levels, levels_complete, top_clusters,
    within_p (Fisher p of structure within the top-level clusters), level_p_values (the p-value of each level
    tested, "p1, p2, ..."), duplicates (coinciding points, d = 0, merged into one before everything else: the same
    state sampled twice), verdict, verdict_reason.
    :func:`describe_ultrametricity` turns it into a sentence; :func:`verdict_label` into "nested (3 levels)".
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
    choice("norms", norms, NORMS)
    check(not symmetric or bool((d <= np.sqrt(2) * (1 + 1e-9)).all()),
          f"symmetric=True expects distances d = sqrt(2 (1 - |q|)) <= sqrt(2) of normalised overlaps "
          f"(distances_from_overlaps(q, symmetric=True)); the largest is {d.max():.4g}")
    check(not (symmetric and norms == "fitted"), "symmetric=True distances are of unit vectors: norms='fitted' "
          "does not apply")
    # coinciding points (d = 0: the same state sampled twice, common for SK replicas at low T) are one state: a zero
    # side makes every triangle through the pair isosceles, which no null with the same overlap law reproduces
    keep = ~np.triu(d <= 1e-9 * d.max(), 1).any(0)
    duplicates = int(k - keep.sum())
    d = d[np.ix_(keep, keep)]
    k = d.shape[0]
    nan = float("nan")
    summary = {"points": k, "duplicates": duplicates, "triangles": 0, "K_mean": nan, "K_mean_se": nan,
               "K_median": nan, "subdominant_distance": nan, "null": NULL + (", folded |q|" if symmetric else ""),
               "norms": "", "D_eff": nan, "null_K_mean": nan, "null_K_std": nan, "z": nan, "p_value": nan,
               "alpha": float(alpha), "n_null": int(n_null), "cv": nan, "trivial": False, "symmetric": bool(symmetric),
               "levels": 0, "levels_complete": True, "top_clusters": 0, "within_p": nan, "level_p_values": "",
               "verdict": "", "verdict_reason": ""}
    if k < 3:
        summary.update(verdict="cannot tell", verdict_reason=f"only {k} distinct point{'s' if k > 1 else ''} "
                       f"({duplicates} coincide with others)")
        return UltrametricityResult(np.array([]), np.zeros((0, 3)), summary, np.array([]))
    tri = _triangles(k, max_triangles, seed)
    obs = _k_stats(d, tri)
    dv = squareform(d, checks=False)
    cv = float(dv.std() / dv.mean()) if dv.mean() > 0 else 0.0
    summary.update(triangles=int(len(tri)), K_mean=obs["K_mean"], K_median=obs["K_median"], cv=cv,
                   subdominant_distance=obs["subdominant_distance"], trivial=bool(cv < equilateral_cv))
    if dv.std() <= 1e-12 * max(dv.mean(), 1e-300):  # all distances equal: K is 0/0, nothing to test
        summary.update(verdict="trivial", p_value=1.0, verdict_reason="all distances are equal")
        return UltrametricityResult(obs["K"], obs["sides"], summary, np.array([]))
    summary["K_mean_se"] = _k_mean_jackknife(d, tri)
    t = _um_test(d, norms=norms, symmetric=symmetric, n_null=n_null, max_triangles=max_triangles, seed=seed)
    summary.update(norms=t["norms"], D_eff=t["D_eff"], null_K_mean=t["null_K_mean"], null_K_std=t["null_K_std"],
                   z=float(t["z"]), p_value=float(t["p"]))
    table = pd.DataFrame([{"level": 1, "groups": 1, "tested": 0 if t["why"] else 1, "points": k, "p_value": t["p"]}])
    if t["why"]:
        summary.update(verdict="cannot tell", verdict_reason=t["why"] + (f" ({duplicates} coinciding points counted "
                                                                          "once)" if duplicates else ""))
        return UltrametricityResult(obs["K"], obs["sides"], summary, t["null_k"], table)
    if t["p"] < alpha and t["z"] < 0:
        n_levels, complete, top = 1, False, 0
        if levels:
            mode = "unit" if symmetric else t["norms"]
            table, n_levels, complete, top = _levels(d, t["p"], alpha=alpha, norms=mode, symmetric=symmetric,
                                                     n_null=n_null, max_triangles=max_triangles, seed=seed)
        within = table.loc[table["level"] == 2, "p_value"]
        summary.update(levels=n_levels, levels_complete=bool(complete), top_clusters=int(top),
                       within_p=float(within.iloc[0]) if len(within) else nan,
                       verdict="nested" if n_levels >= 2 else "clusters",
                       verdict_reason=f"K below the null at p = {t['p']:.2g} < alpha = {alpha:g}")
    elif summary["trivial"]:
        summary.update(verdict="trivial", verdict_reason=f"the distances are nearly equal (cv = {cv:.2g})")
    else:
        summary.update(verdict="no evidence", verdict_reason=f"p = {t['p']:.2g} >= alpha = {alpha:g}"
                       if t["p"] >= alpha else "K is not below the null")
    summary["level_p_values"] = ", ".join(f"{x:.4g}" for x in table["p_value"])
    if duplicates:
        summary["verdict_reason"] += f"; {duplicates} coinciding point{'s' if duplicates > 1 else ''} counted once"
    return UltrametricityResult(obs["K"], obs["sides"], summary, t["null_k"], table)


def verdict_label(summary: dict) -> str:
    """The verdict in its display words: "clusters (one level)", "nested (3 levels)" ("at least" when the count is
    a lower bound), "no evidence", "trivial", "cannot tell"."""
    v = summary.get("verdict", "")
    complete = summary.get("levels_complete", True)
    complete = True if complete is None or (isinstance(complete, float) and np.isnan(complete)) else bool(complete)
    if v == "clusters":
        return "clusters (one level)" if complete else "clusters (at least one level)"
    if v == "nested":
        n = summary.get("levels", 2)
        n = int(n) if isinstance(n, (int, float, np.integer, np.floating)) and np.isfinite(n) else 2
        return f"nested ({n} levels)" if complete else f"nested (at least {n} levels)"
    return str(v)


#: what kind of states the points are: their sentences differ (threshold states never speak of RSB)
STATE_KINDS = ("states", "equilibrium", "threshold", "control")


def describe_ultrametricity(summary: dict, kind: str = "states") -> str:
    """One sentence chosen from the numbers of an :func:`ultrametricity` summary: the verdict, its levels and
    the significance of K against its null; one level of clusters reads "as one-step RSB", nested clusters "as a
    Parisi tree". ``kind``: "states" (solutions, e.g. trained replicas), "equilibrium" (samples of a Gibbs measure),
    "control" (a known answer: no RSB reading), or "threshold" (gradient-descent endpoints of a glassy landscape:
    threshold states, not equilibrium states; their sentence says so and never reads as replica symmetry
    breaking, see :func:`describe_threshold`)."""
    need = ("K_mean", "K_mean_se", "null_K_mean", "null_K_std", "z", "p_value", "alpha", "n_null", "cv", "verdict")
    missing = [key for key in need if key not in summary]
    check(not missing, f"not an ultrametricity summary: missing {', '.join(missing)}")
    v = summary["verdict"]
    choice("verdict", v, VERDICTS)
    choice("kind", kind, STATE_KINDS)
    if kind == "threshold":
        return describe_threshold(summary)
    return _describe_core(summary, rsb=kind != "control")


def _stats_text(summary: dict) -> tuple[str, str, str]:
    k, se, nm, ns = summary["K_mean"], summary["K_mean_se"], summary["null_K_mean"], summary["null_K_std"]
    z, p, alpha = summary["z"], summary["p_value"], summary["alpha"]
    p_min = 1 / (summary["n_null"] + 1)
    p_txt = f"p <= {p_min:.2g}" if p <= p_min * (1 + 1e-9) else f"p = {p:.2g}"
    stats = f"(z = {z:+.1f}, {p_txt} at alpha = {alpha:g})"
    k_txt = f"K = {k:.2f} ± {se:.2f}" if np.isfinite(se) else f"K = {k:.2f}"
    return k_txt, f"its null {nm:.2f} ± {ns:.2f}", stats


def _describe_core(summary: dict, rsb: bool) -> str:
    dup = int(summary.get("duplicates", 0) or 0)
    note = (f" ({dup} replica{'s' if dup > 1 else ''} coincided with another and {'were' if dup > 1 else 'was'} "
            "counted once.)") if dup else ""
    return _describe_verdict(summary, rsb) + note


def _describe_verdict(summary: dict, rsb: bool) -> str:
    v, cv = summary["verdict"], summary["cv"]
    if v == "cannot tell":
        return f"Cannot tell whether the points form clusters or a tree: {summary.get('verdict_reason', '')}."
    if v == "trivial" and not np.isfinite(summary["z"]):
        return f"All distances are equal (cv = {cv:.2g}): trivially ultrametric, one state, no tree."
    k_txt, null_txt, stats = _stats_text(summary)
    if v == "trivial":
        return (f"The distances are nearly equal (cv = {cv:.2g}): trivially ultrametric, one state, no tree "
                f"({k_txt} against {null_txt}, {stats[1:-1]}).")
    weak = f"; the contrast is small (cv = {cv:.2g})" if summary.get("trivial") else ""
    levels, complete = int(summary.get("levels", 1)), bool(summary.get("levels_complete", True))
    top, wp = int(summary.get("top_clusters", 0)), summary.get("within_p", float("nan"))
    wp_txt = f"p = {wp:.2g}" if isinstance(wp, float) and np.isfinite(wp) else "not testable"
    if v == "clusters":
        if not complete:
            return (f"{k_txt} lies below {null_txt} {stats}: the points form clusters ({top} at the top level); "
                    f"whether they nest could not be tested (every cluster is too small to test){weak}.")
        return (f"{k_txt} lies below {null_txt} {stats}: the points form one level of clusters ({top}), with no "
                f"structure detected within them ({wp_txt}){', as one-step RSB' if rsb else ''}, not a nested tree"
                f"{weak}.")
    if v == "nested":
        n_txt = f"{levels}" if complete else f"at least {levels}"
        return (f"{k_txt} lies below {null_txt} {stats}, and the {top} top-level clusters hold clusters of their own "
                f"({wp_txt}): clusters within clusters, {n_txt} levels{', as a Parisi tree' if rsb else ''}{weak}.")
    where = "lies below" if summary["z"] < 0 else "does not lie below"
    but = " but not significantly" if summary["z"] < 0 else ""
    return (f"{k_txt} {where} {null_txt}{but} {stats}: no evidence of clusters or a tree; the distances look like "
            f"the same points mixed at random (same overlap law, norms and Gram spectrum).")


def describe_threshold(summary: dict) -> str:
    """The sentence for gradient-descent endpoints of a glassy landscape (the spherical p-spin's minima reached by
    descent): threshold states, nearly orthogonal, no sample of the low-temperature Gibbs measure (Castellani &
    Cavagna 2005), so their overlaps say nothing about replica symmetry breaking whatever the test finds; when the
    test finds clusters, it says why they are no RSB: descents from independent starts that end close to each
    other (pairs of correlated minima) are a property of the dynamics, not of an equilibrium measure."""
    lead = ("Gradient-descent endpoints (threshold states), not equilibrium states: their overlaps say nothing "
            "about replica symmetry breaking. ")
    v = summary["verdict"]
    if v in ("clusters", "nested"):
        k_txt, null_txt, stats = _stats_text(summary)
        return (lead + f"{k_txt} lies below {null_txt} {stats}: some descents ended in minima close to each other "
                "(a property of the descent dynamics, which a null with the same overlap law and spectrum does not "
                "reproduce), not a hierarchy of equilibrium states.")
    return lead + _describe_core(summary, rsb=False)


def combine_samples(summaries: list[dict], alpha: float, name: str = "samples") -> dict:
    """One verdict from independent samples (e.g. disorder samples of SK, each an :func:`ultrametricity` summary):
    the whole-set p-values combined by Fisher's method (:func:`_fisher`), z as sum z / sqrt(n) (Stouffer), and
    the level count: level L + 1 counts while the level-(L + 1) p-values (``level_p_values``), combined by Fisher
    over all samples with p = 1 where a sample did not reach or could not test that level, stay below ``alpha``.
    Returns p_value, z, levels, levels_complete, verdict, verdict_reason and sentence."""
    check(len(summaries) > 0, "need at least one sample")
    ps = np.array([s["p_value"] for s in summaries], dtype=np.float64)
    ok = np.isfinite(ps)
    if not ok.any():
        reasons = "; ".join(dict.fromkeys(str(s.get("verdict_reason", "")) for s in summaries))
        return {"p_value": float("nan"), "z": float("nan"), "levels": 0, "levels_complete": True,
                "verdict": "cannot tell", "verdict_reason": reasons,
                "sentence": f"Cannot tell whether the {name} form clusters or a tree: {reasons}."}
    n = int(ok.sum())
    p = _fisher(ps[ok])
    z = float(np.nansum([s["z"] for s in summaries]) / np.sqrt(n))
    levels, complete = 0, True
    if p < alpha:
        levels = 1
        while True:
            lp = [_level_p(s, levels + 1) for s in summaries]
            if all(x is None for x in lp):
                complete = not any(not s.get("levels_complete", True) for s in summaries)
                break
            if not _fisher(np.array([1.0 if x is None else x for x in lp])) < alpha:
                break
            levels += 1
    verdict = "nested" if levels >= 2 else "clusters" if levels == 1 else "no evidence"
    what = {"clusters": "one level of clusters, as one-step RSB" if complete else "clusters (whether they nest "
            "could not be tested)", "nested": f"clusters within clusters, {'' if complete else 'at least '}{levels} "
            "levels, as a Parisi tree", "no evidence": "no evidence of clusters or a tree"}[verdict]
    return {"p_value": p, "z": z, "levels": levels, "levels_complete": complete, "verdict": verdict,
            "verdict_reason": f"Fisher's combination of {n} {name}' p-values: p = {p:.2g}, alpha = {alpha:g}",
            "sentence": f"Fisher's combination of the {n} {name}' p-values gives p = {p:.2g} at alpha = {alpha:g}: "
                        f"{what}."}


def _level_p(summary: dict, level: int) -> float | None:
    """The p-value of ``level`` (1 = the whole set) from a summary's ``level_p_values`` ("p1, p2, ..."), None
    when that level was not tested."""
    text = summary.get("level_p_values")
    vals = [float(x) for x in text.split(",")] if isinstance(text, str) and text.strip() else []
    x = vals[level - 1] if level <= len(vals) else None
    return None if x is None or not np.isfinite(x) else x


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
                     tree: bool = True, kind: str = "states") -> ReplicaAnalysis:
    """Overlaps -> distances d = sqrt(2 (1 - q)) (of |q| when ``symmetric``: spin-flip symmetric systems) -> the
    dendrogram (:func:`hierarchy`) and the calibrated ultrametricity test (:func:`ultrametricity`), P(q) and its
    moments. ``system`` names the row (default ``label``); ``tree``: also the tables that draw the tree; ``kind``:
    what the states are, for the sentence (:data:`STATE_KINDS`). The distances are chords of unit-norm overlaps
    (``norms="unit"``).

    Example::

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((8, 50))
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> a = analyse_overlaps(x @ x.T, label="cloud")
        >>> a.row["replicas"], sorted(a.tables)
        (8, ['linkage', 'order', 'overlaps', 'triangles'])
    """
    d = distances_from_overlaps(q, symmetric=symmetric)
    h = hierarchy(d, method=method, max_triangles=max_triangles, seed=seed, alpha=alpha, symmetric=symmetric,
                  norms="unit")
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
           **u.summary, "sentence": describe_ultrametricity(u.summary, kind=kind)}
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
