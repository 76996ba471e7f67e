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

from ..errors import check, choice
from ..problem import FunctionProblem, Problem
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
        if align and not isinstance(problem, FunctionProblem):
            theta = aligned_replicas(problem, theta, reference=reference, method=method)
        return _cosine(theta.cpu())
    check(not isinstance(problem, FunctionProblem), f"{kind} overlaps need a network with data")
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


def distances_from_overlaps(q: torch.Tensor | np.ndarray) -> np.ndarray:
    """d_ab = sqrt(2 (1 - q_ab)): the Euclidean distance between the normalised vectors."""
    q = np.asarray(q, dtype=np.float64)
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
              max_triangles: int = 200000) -> HierarchyResult:
    """Agglomerative clustering of the replicas (scipy linkage: average, complete, single or ward), the
    cophenetic correlation (the Pearson correlation of d_ab with the dendrogram's merge heights) and, with
    ``ultrametric=True``, the ultrametricity index against its nulls (:func:`ultrametricity`)."""
    d = check_distances(distances)
    choice("linkage method", method, ("average", "complete", "single", "ward"))
    cond = squareform(d, checks=False)
    z = sch.linkage(cond, method=method)
    coph_corr, coph = sch.cophenet(z, cond)
    heights = z[:, 2]
    levels = pd.DataFrame({"height": heights, "n_clusters": np.arange(len(heights), 0, -1)})
    um = ultrametricity(d, max_triangles=max_triangles, seed=seed) if ultrametric else None
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


def _k_stats(d: np.ndarray, tri: np.ndarray) -> dict:
    sides = triangle_sides(d, tri)
    sigma = squareform(d, checks=False).std()
    kval = (sides[:, 2] - sides[:, 1]) / sigma if sigma > 0 else np.zeros(len(sides))
    sub = sch.cophenet(sch.linkage(squareform(d, checks=False), "single"))
    dv = squareform(d, checks=False)
    return {"K": kval, "K_mean": float(kval.mean()), "K_median": float(np.median(kval)),
            "subdominant_distance": float(np.linalg.norm(dv - sub) / max(np.linalg.norm(dv), 1e-30)),
            "sides": sides}


def _mds(d: np.ndarray) -> np.ndarray:
    """Classical MDS coordinates of a distance matrix (positive eigen-directions)."""
    k = d.shape[0]
    j = np.eye(k) - 1 / k
    b = -0.5 * j @ (d**2) @ j
    w, v = np.linalg.eigh(b)
    pos = w > 1e-10 * max(w.max(), 1e-30)
    return v[:, pos] * np.sqrt(w[pos])


@dataclass
class UltrametricityResult:
    """Katzgraber-Hartmann K = (d_max - d_mid) / sigma(d) over triangles (K concentrated at 0 = ultrametric),
    the relative distance to the subdominant ultrametric, the same for null models with no hierarchy,
    and whether the set is trivially ultrametric (nearly equal distances, equilateral)."""

    K: np.ndarray
    sides: np.ndarray
    summary: dict
    null_K: np.ndarray


def ultrametricity(distances, *, max_triangles: int = 200000, n_null: int = 20, seed: int = 0,
                   equilateral_cv: float = 0.05) -> UltrametricityResult:
    """Test the ultrametric inequality d(a,c) <= max(d(a,b), d(b,c)) on every triangle (or a seeded sample
    of ``max_triangles``), against two nulls of the same size: the distances shuffled among the pairs, and
    points drawn from a Gaussian with the covariance of the classical-MDS embedding of the distances.
    ``summary`` holds K_mean, K_median, subdominant_distance, their null means and standard deviations,
    z-scores, ``cv`` (spread / mean of distances) and ``trivial`` (cv < ``equilateral_cv``)."""
    d = check_distances(distances)
    k = d.shape[0]
    rng = np.random.default_rng(seed)
    tri = _triangles(k, max_triangles, seed)
    obs = _k_stats(d, tri)
    dv = squareform(d, checks=False)
    cv = float(dv.std() / dv.mean()) if dv.mean() > 0 else 0.0
    coords = _mds(d)
    cov = np.cov(coords.T) if coords.shape[1] > 1 else np.atleast_2d(coords.var())
    mean = coords.mean(0)
    nulls: dict[str, list] = {"shuffle": [], "gaussian": []}
    null_k = []
    iu = np.triu_indices(k, 1)
    for _ in range(n_null):
        sh = np.zeros_like(d)
        sh[iu] = rng.permutation(dv)
        sh = sh + sh.T
        s = _k_stats(sh, tri)
        nulls["shuffle"].append((s["K_mean"], s["subdominant_distance"]))
        null_k.append(s["K"][: min(len(s["K"]), 20000)])
        pts = rng.multivariate_normal(mean, cov, size=k, method="eigh") if coords.shape[1] else np.zeros((k, 1))
        gd = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
        g = _k_stats(gd, tri)
        nulls["gaussian"].append((g["K_mean"], g["subdominant_distance"]))
    summary = {"points": k, "triangles": int(len(tri)), "K_mean": obs["K_mean"], "K_median": obs["K_median"],
               "subdominant_distance": obs["subdominant_distance"], "cv": cv, "trivial": bool(cv < equilateral_cv)}
    for name, vals in nulls.items():
        arr = np.asarray(vals)
        for i, key in enumerate(("K_mean", "subdominant_distance")):
            m, s = float(arr[:, i].mean()), float(arr[:, i].std())
            summary[f"{key}_null_{name}"] = m
            summary[f"{key}_null_{name}_std"] = s
            summary[f"{key}_z_{name}"] = float((obs[key] - m) / s) if s > 0 else float("nan")
    return UltrametricityResult(obs["K"], obs["sides"], summary, np.concatenate(null_k) if null_k else np.array([]))


def parisi_matrix(q, order) -> np.ndarray:
    """The overlap matrix with rows and columns in dendrogram leaf order (blocks on the diagonal = states)."""
    q = np.asarray(q)
    return q[np.ix_(order, order)]
