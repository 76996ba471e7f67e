"""Where the replicas disagree: per-example statistics, prediction churn between replicas set beside their barriers
and overlaps, the clusters of solutions (from the replica protocol's dendrogram) and how each fails, robustness under
seeded input shifts, and the cost of picking the wrong replica.

Everything works on the ``(K, N)`` predictions and losses of K replicas on N test examples (one batched forward pass
per input set, :meth:`lossglass.problem.Problem.predictions`); pairs, examples, bootstrap draws and permutations are
handled as arrays, never one at a time in Python.

Definitions (Fort et al. 2019, "Deep ensembles: a loss landscape perspective", for prediction disagreement; Hendrycks
& Dietterich 2019, ICLR, for corruption robustness):

- error share of example n: e_n = (1/K) sum_a [pred_a(n) != y_n];
- vote entropy: H_n = -sum_c p_nc log p_nc with p_nc the share of replicas predicting class c (nats; 0: unanimous,
  log K at most);
- churn between replicas a and b: c_ab = (1/N) sum_n [pred_a(n) != pred_b(n)] (0 for identical predictions; it is
  1 - the function overlap of :func:`lossglass.protocols.replicas.overlaps`);
- robustness of a model under corruption s at severity l: its accuracy on the test inputs corrupted by s at level l
  (seeded: the same seed gives the same corrupted inputs);
- rank statistics over pairs (churn against barrier or overlap): Kendall's tau-b over the K(K-1)/2 pairs; pairs that
  share a replica are not independent, so the 95% interval resamples *replicas* (bootstrap, every pair among the
  drawn replicas kept) and the p-value permutes the replicas of one matrix against the other (a Mantel test, Mantel
  1967): both keep the dependence between pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from .._util import seed_for
from ..errors import check, choice

#: corruptions of image inputs and their severities (Hendrycks & Dietterich 2019 style, on the normalised inputs)
IMAGE_CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "noise": (0.1, 0.3, 0.6),  # Gaussian noise, standard deviation in units of the test inputs' spread
    "blur": (0.5, 1.0, 1.5),  # Gaussian blur, kernel standard deviation in pixels
    "contrast": (0.3, 0.6, 0.8),  # x -> m + (1 - s) (x - m), m the image's mean: contrast reduced by the share s
    "shift": (1, 2, 3),  # translation by this many pixels (a seeded direction per image), background filled in
    "rotate": (5, 15, 30),  # rotation by +-this many degrees (a seeded sign per image), background filled in
}
#: corruptions of token sequences: the share of tokens replaced by a random token of the vocabulary
TOKEN_CORRUPTIONS: dict[str, tuple[float, ...]] = {"tokens": (0.1, 0.25, 0.5)}
#: corruptions of flat (tabular) inputs
FLAT_CORRUPTIONS: dict[str, tuple[float, ...]] = {"noise": (0.1, 0.3, 0.6)}
CORRUPTIONS = ("noise", "blur", "contrast", "shift", "rotate", "tokens")


# ------------------------------------------------------------------------------------------------ per example
def vote_counts(pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``(N, C)``: how many of the K replicas predict each class on each example (``pred`` ``(K, N)``)."""
    pred = torch.as_tensor(pred).long()
    k, n = pred.shape
    out = torch.zeros(n, n_classes, dtype=torch.float64)
    out.scatter_add_(1, pred.T.contiguous(), torch.ones(n, k, dtype=torch.float64))
    return out


def per_example(pred, loss, y, clusters=None, n_classes: int | None = None, index=None) -> pd.DataFrame:
    """One row per test example: ``example`` (its index in the test split, or ``index``), ``label``, ``majority`` (the
    most voted class), ``error_share`` e_n, ``vote_entropy`` H_n (nats), ``disagree`` (not every replica predicts the
    same class), ``loss_mean`` and ``loss_std`` (over replicas, nats), ``cluster_spread`` (largest minus smallest
    cluster error rate) and, for each cluster c of ``clusters`` (``(K,)`` labels 0..m-1), ``error_cluster_c``: the
    share of that cluster's replicas that misclassify the example. See the module docstring for the equations."""
    pred, loss, y = torch.as_tensor(pred).long(), torch.as_tensor(loss).double(), torch.as_tensor(y).long()
    check(pred.ndim == 2 and pred.shape == loss.shape and pred.shape[1] == len(y),
          f"pred and loss must be (K, N) with N = {len(y)} labels, got {tuple(pred.shape)} and {tuple(loss.shape)}")
    k, n = pred.shape
    c = int(n_classes or int(max(int(pred.max()), int(y.max())) + 1))
    votes = vote_counts(pred, c)
    p = votes / k
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(1)
    wrong = (pred != y[None]).double()  # (K, N)
    df = pd.DataFrame({"example": np.arange(n) if index is None else np.asarray(index), "label": y.numpy(),
                       "majority": votes.argmax(1).numpy(), "error_share": wrong.mean(0).numpy(),
                       "vote_entropy": (ent.clamp_min(0) + 0.0).numpy(), "disagree": (votes.max(1).values < k).numpy(),
                       "loss_mean": loss.mean(0).numpy(), "loss_std": loss.std(0, unbiased=k > 1).nan_to_num(0).numpy()})
    if clusters is not None:
        lab = torch.as_tensor(np.asarray(clusters)).long()
        check(len(lab) == k, f"clusters must hold one label per replica ({k}), got {len(lab)}")
        onehot = F.one_hot(lab).double()  # (K, m)
        rates = (onehot.T @ wrong) / onehot.sum(0)[:, None]  # (m, N)
        for j in range(rates.shape[0]):
            df[f"error_cluster_{j}"] = rates[j].numpy()
        df["cluster_spread"] = (rates.max(0).values - rates.min(0).values).numpy()
    else:
        df["cluster_spread"] = 0.0
    return df


def churn(pred) -> np.ndarray:
    """``(K, K)`` churn c_ab = share of examples on which replicas a and b predict different classes (one-hot
    products; 0 on the diagonal and for identical predictions)."""
    pred = torch.as_tensor(pred).long()
    oh = F.one_hot(pred).double()  # (K, N, C)
    same = torch.einsum("anc,bnc->ab", oh, oh) / pred.shape[1]
    return (1 - same).clamp_min(0).numpy()


def confusion(pred, y, clusters, n_classes: int) -> pd.DataFrame:
    """Per-cluster confusion matrices: rows (cluster, true, predicted, count, share) with ``share`` = count / (number
    of examples of class ``true`` times the cluster's replicas): the rate at which the cluster's replicas predict
    ``predicted`` for an example of class ``true`` (each true row sums to 1)."""
    pred, y = torch.as_tensor(pred).long(), torch.as_tensor(y).long()
    lab = torch.as_tensor(np.asarray(clusters)).long()
    m, c = int(lab.max()) + 1, n_classes
    cell = (lab[:, None] * c + y[None]) * c + pred  # (K, N): flat index of (cluster, true, predicted)
    counts = torch.bincount(cell.flatten(), minlength=m * c * c).reshape(m, c, c).double()
    denom = counts.sum(2, keepdim=True).clamp_min(1)
    mi, ti, pi = np.meshgrid(np.arange(m), np.arange(c), np.arange(c), indexing="ij")
    return pd.DataFrame({"cluster": mi.ravel(), "true": ti.ravel(), "predicted": pi.ravel(),
                         "count": counts.numpy().ravel().astype(np.int64), "share": (counts / denom).numpy().ravel()})


# ------------------------------------------------------------------------------------------------ clusters
def clusters_from_linkage(linkage: np.ndarray, n_clusters: int) -> np.ndarray:
    """Labels 0..m-1 of the replicas: the replica protocol's dendrogram (scipy linkage, saved as table
    ``linkage_LABEL``) cut into ``n_clusters`` clusters (``maxclust``), numbered by their smallest member."""
    from scipy.cluster import hierarchy as sch

    z = np.asarray(linkage, dtype=np.float64)
    k = z.shape[0] + 1
    m = int(min(max(n_clusters, 1), k))
    raw = sch.fcluster(z, m, criterion="maxclust") if m > 1 else np.ones(k, int)
    _, first, inv = np.unique(raw, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inv]


def largest_gap_clusters(linkage: np.ndarray) -> int:
    """How many clusters the dendrogram's largest relative gap between merge heights leaves (2..K/2), the rule of
    :func:`lossglass.protocols.replicas._top_partition` (used when the ultrametricity test found no clusters: the
    split is then descriptive, not a finding)."""
    z = np.asarray(linkage, dtype=np.float64)
    k = z.shape[0] + 1
    if k < 4:
        return 1
    h = np.maximum(z[:, 2], 1e-12 * max(z[-1, 2], 1e-300))
    ms = np.arange(2, max(2, k // 2) + 1)
    return int(ms[np.argmax(h[k - ms] / h[k - ms - 1])])


# ------------------------------------------------------------------------------------------------ rank statistics
def _kendall_masked(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row: ``x``, ``y`` ``(B, n)`` values and ``w`` ``(B, n)`` multiplicities (0 drops an
    item, 2 counts it twice); tau_b = (n_c - n_d) / sqrt(n_x n_y), n_x (n_y) the pairs of items not tied in x (y)."""
    sx = np.sign(x[:, :, None] - x[:, None, :])
    sy = np.sign(y[:, :, None] - y[:, None, :])
    ww = w[:, :, None] * w[:, None, :]
    s = (sx * sy * ww).sum((1, 2))
    nx, ny = (np.abs(sx) * ww).sum((1, 2)), (np.abs(sy) * ww).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((nx > 0) & (ny > 0), s / np.sqrt(nx * ny), np.nan)


def pair_rank_correlation(a: np.ndarray, b: np.ndarray, *, n_boot: int = 1000, n_perm: int = 1000, seed: int = 0,
                          block: int | None = None) -> dict:
    """Kendall's tau-b between two ``(K, K)`` symmetric matrices over the pairs a < b where both are finite, a 95%
    interval from a bootstrap over replicas (``n_boot`` draws of K replicas with replacement; the pairs of distinct
    drawn replicas kept, with their multiplicities; percentile interval) and a two-sided Mantel p-value (``n_perm``
    random relabellings of the replicas of ``b``: p = (1 + #{|tau_perm| >= |tau|}) / (n_perm + 1)). Returns tau,
    ci_low, ci_high, p_value, pairs, replicas. Vectorised over draws, in blocks of ``block`` draws (default: as many
    as keep each block near 4 million cells, a few hundred MB)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    check(a.shape == b.shape and a.ndim == 2 and a.shape[0] == a.shape[1], "need two square matrices of one shape")
    k = a.shape[0]
    iu = np.triu_indices(k, 1)
    ok = np.isfinite(a[iu]) & np.isfinite(b[iu])
    rows = (iu[0][ok], iu[1][ok])
    n = int(ok.sum())
    nan = float("nan")
    out = {"tau": nan, "ci_low": nan, "ci_high": nan, "p_value": nan, "pairs": n,
           "replicas": int(len(np.union1d(*rows))) if n else 0}
    if n < 3:
        return out
    x0, y0 = a[rows], b[rows]
    block = block or max(1, min(64, int(4e6 // n**2)))  # draws per batch: about 4 million pair-of-pair cells
    out["tau"] = float(_kendall_masked(x0[None], y0[None], np.ones((1, n)))[0])
    rng = np.random.default_rng(seed_for(seed, 251))
    # bootstrap over replicas: the multiplicity of pair (i, j) is m_i m_j, m the draw's replica counts
    taus = []
    for s in range(0, n_boot, block):
        nb = min(block, n_boot - s)
        m = np.stack([np.bincount(rng.integers(0, k, k), minlength=k) for _ in range(nb)]).astype(float)
        w = m[:, rows[0]] * m[:, rows[1]]
        taus.append(_kendall_masked(np.broadcast_to(x0, w.shape), np.broadcast_to(y0, w.shape), w))
    taus = np.concatenate(taus)
    taus = taus[np.isfinite(taus)]
    if len(taus):
        out["ci_low"], out["ci_high"] = (float(v) for v in np.percentile(taus, [2.5, 97.5]))
    # Mantel: relabel the replicas of b
    hits = 0
    for s in range(0, n_perm, block):
        nb = min(block, n_perm - s)
        perms = np.argsort(rng.random((nb, k)), 1)
        yp = b[perms[:, rows[0]], perms[:, rows[1]]]
        good = np.isfinite(yp)
        tp = _kendall_masked(np.broadcast_to(x0, yp.shape), np.where(good, yp, 0), good.astype(float))
        hits += int((np.abs(tp) >= abs(out["tau"]) - 1e-12).sum())
    out["p_value"] = (1 + hits) / (n_perm + 1)
    return out


def correlation_verdict(lo: float, hi: float, p: float | None = None, alpha: float = 0.05) -> str:
    """``positive``, ``negative`` or ``nothing detectable``: the sign of a rank correlation when its 95% interval
    excludes 0 (and, when given, its p-value is below ``alpha``), else nothing detectable."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "nothing detectable"
    ok = p is None or (np.isfinite(p) and p < alpha)
    if lo > 0 and ok:
        return "positive"
    if hi < 0 and ok:
        return "negative"
    return "nothing detectable"


# ------------------------------------------------------------------------------------------------ corruptions
def corruption_plan(shape: tuple, info: dict) -> dict[str, tuple[float, ...]]:
    """The corruptions that apply to inputs of this ``shape`` (a data set's ``shape``/``info``): images (C, H, W) get
    :data:`IMAGE_CORRUPTIONS`, token sequences (``info["vocab"]``) :data:`TOKEN_CORRUPTIONS`, anything else
    :data:`FLAT_CORRUPTIONS`."""
    if "vocab" in info:
        return dict(TOKEN_CORRUPTIONS)
    if len(shape) == 3:
        return dict(IMAGE_CORRUPTIONS)
    return dict(FLAT_CORRUPTIONS)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def corrupt(x: torch.Tensor, kind: str, severity: float, *, shape: tuple = (), vocab: int | None = None,
            seed: int = 0) -> torch.Tensor:
    """``x`` ``(N, D)`` (flattened as the data set stores it) corrupted by ``kind`` at ``severity`` (see
    :data:`IMAGE_CORRUPTIONS`, :data:`TOKEN_CORRUPTIONS`); severity 0 returns ``x`` unchanged. Seeded: the same
    seed gives the same bytes. Images are corrupted in their ``shape`` (C, H, W) with the background (each image's
    smallest value) filled in where a shift or rotation uncovers the frame."""
    choice("corruption", kind, CORRUPTIONS)
    x = torch.as_tensor(x, dtype=torch.float32)
    if severity == 0:
        return x.clone()
    g = torch.Generator().manual_seed(seed_for(seed, 252, CORRUPTIONS.index(kind), int(round(severity * 1000))))
    n = x.shape[0]
    if kind == "noise":
        return x + float(severity) * x.std() * torch.randn(x.shape, generator=g)
    if kind == "tokens":
        check(vocab is not None and vocab >= 2, "token corruption needs the vocabulary size (data info 'vocab')")
        hit = torch.rand(x.shape, generator=g) < float(severity)
        rand = torch.randint(0, int(vocab), x.shape, generator=g).to(x.dtype)
        return torch.where(hit, rand, x)
    check(len(shape) == 3 and int(np.prod(shape)) == x.shape[1],
          f"the {kind} corruption needs image inputs (C, H, W); got shape {shape} for inputs of size {x.shape[1]}")
    c, h, w = shape
    img = x.reshape(n, c, h, w)
    bg = img.amin((1, 2, 3), keepdim=True)
    if kind == "contrast":
        m = img.mean((1, 2, 3), keepdim=True)
        return (m + (1 - float(severity)) * (img - m)).reshape(n, -1)
    if kind == "blur":
        k1 = _gauss_kernel(float(severity))
        r = len(k1) // 2
        flat = img.reshape(n * c, 1, h, w)
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), k1.view(1, 1, 1, -1))
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), k1.view(1, 1, -1, 1))
        return flat.reshape(n, -1)
    # shift and rotate: one affine map per image, sampled with the background outside the frame
    if kind == "shift":
        ang = torch.rand(n, generator=g) * 2 * math.pi
        dx, dy = float(severity) * torch.cos(ang), float(severity) * torch.sin(ang)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2], theta[:, 1, 2] = -2 * dx / w, -2 * dy / h
    else:
        sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        a = sign * float(severity) * math.pi / 180
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
    out = F.grid_sample(img - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
    return out.reshape(n, -1)


# ------------------------------------------------------------------------------------------------ the analysis
@dataclass
class Churn:
    """Pairwise churn beside the aligned overlap and barrier: ``pairs`` (a, b, churn, q_aligned, barrier_aligned),
    ``correlations`` (one row per quantity compared with churn: tau, interval, p-value, verdict)."""

    pairs: pd.DataFrame
    correlations: pd.DataFrame


def churn_table(ch: np.ndarray, *, overlap: np.ndarray | None = None, barrier: np.ndarray | None = None,
                seed: int = 0, n_boot: int = 1000, n_perm: int = 1000) -> Churn:
    """Churn of every pair a < b beside the aligned weight overlap q_ab and the aligned loss barrier (NaN where not
    measured), and the rank correlation of churn with each (:func:`pair_rank_correlation`; ``versus`` names the
    other quantity: tau > 0 means more disagreement where it is larger). A barrier known on fewer than 3 pairs gives
    no interval."""
    k = ch.shape[0]
    iu = np.triu_indices(k, 1)
    nan = np.full((k, k), np.nan)
    q = nan if overlap is None else np.asarray(overlap, float)
    bar = nan if barrier is None else np.asarray(barrier, float)
    pairs = pd.DataFrame({"a": iu[0], "b": iu[1], "churn": ch[iu], "q_aligned": q[iu], "barrier_aligned": bar[iu]})
    rows = []
    for name, mat in (("q_aligned", q), ("barrier_aligned", bar)):
        r = pair_rank_correlation(mat, ch, n_boot=n_boot, n_perm=n_perm, seed=seed)
        rows.append({"versus": name, "kendall_tau": r["tau"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                     "p_value": r["p_value"], "pairs": r["pairs"], "replicas": r["replicas"],
                     "verdict": correlation_verdict(r["ci_low"], r["ci_high"], r["p_value"])})
    return Churn(pairs, pd.DataFrame(rows))


def wilson(k: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion k/n (Wilson 1927)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def pick_cost(ch: np.ndarray, test_accuracy: np.ndarray, chosen: int, n_test: int) -> dict:
    """The cost of picking wrong, for the chosen replica ``chosen`` (an index into the replicas): the expected churn
    between it and a random other replica (the mean over the other K - 1, which are independent draws given the
    pick) with a 95% Student t interval over them (this test split held fixed), the same as test cases, the most any
    other replica changes, and the pool's test accuracy spread (worst, best)."""
    k = ch.shape[0]
    check(0 <= chosen < k, f"chosen replica index {chosen} out of range 0..{k - 1}")
    others = np.delete(ch[chosen], chosen)
    mean = float(others.mean()) if len(others) else float("nan")
    if len(others) >= 2:
        hw = float(stats.t.ppf(0.975, len(others) - 1) * others.std(ddof=1) / math.sqrt(len(others)))
    else:
        hw = float("nan")
    acc = np.asarray(test_accuracy, float)
    return {"chosen": int(chosen), "churn_mean": mean, "churn_ci_low": max(0.0, mean - hw), "churn_ci_high": mean + hw,
            "cases_mean": mean * n_test, "cases_ci_low": max(0.0, mean - hw) * n_test, "cases_ci_high": (mean + hw) * n_test,
            "churn_max": float(others.max()) if len(others) else float("nan"), "n_test": int(n_test),
            "accuracy_chosen": float(acc[chosen]), "accuracy_worst": float(acc.min()), "accuracy_best": float(acc.max()),
            "accuracy_mean": float(acc.mean()), "replicas": int(k)}


def cost_words(c: dict, strategy: str | None) -> str:
    """The cost of picking wrong in one paragraph (numbers first, then what they mean)."""
    how = f"the {strategy} rule" if strategy else "the chosen replica"
    s = (f"The model picked by {how} scores {c['accuracy_chosen'] * 100:.2f}% on the test split; across the pool of "
         f"{c['replicas']} replicas test accuracy runs from {c['accuracy_worst'] * 100:.2f}% (worst) to "
         f"{c['accuracy_best'] * 100:.2f}% (best), mean {c['accuracy_mean'] * 100:.2f}%.")
    if c.get("excluded_coupled"):
        s += (f" (The {c['excluded_coupled']} replicas trained with replicated SGD are coupled by design and left out "
              "of the pool.)")
    if np.isfinite(c["churn_ci_low"]):
        s += (f" Swapping it for a random other replica changes the decision on {c['cases_mean']:.0f} of "
              f"{c['n_test']} test cases on average ({c['churn_mean'] * 100:.1f}%; 95% interval "
              f"{c['cases_ci_low']:.0f}-{c['cases_ci_high']:.0f} cases over the other replicas, this test split held "
              f"fixed), and up to {c['churn_max'] * c['n_test']:.0f} cases for the most different one.")
    return s


def disagreement_words(df: pd.DataFrame) -> tuple[str, float, float, float]:
    """The share of test cases on which the replicas disagree, with its Wilson interval, in words."""
    n = len(df)
    k = int(df["disagree"].sum())
    lo, hi = wilson(k, n)
    s = (f"The replicas disagree on {k} of {n} test cases ({k / max(n, 1) * 100:.1f}%, 95% Wilson interval "
         f"{lo * 100:.1f}-{hi * 100:.1f}%); every replica is wrong on {int((df['error_share'] == 1).sum())} and every "
         f"replica right on {int((df['error_share'] == 0).sum())}.")
    return s, k / max(n, 1), lo, hi


def churn_words(row: dict, what: str) -> str:
    """One sentence: does churn rise with ``what`` (a row of :func:`churn_table`'s correlations)."""
    if not np.isfinite(row["kendall_tau"]):
        return f"Churn against {what}: not measured on at least 3 pairs."
    iv = (f"Kendall tau {row['kendall_tau']:+.2f}, 95% interval {row['ci_low']:+.2f} to {row['ci_high']:+.2f} "
          f"(replicas resampled), Mantel p = {row['p_value']:.3g}, {row['pairs']} pairs")
    v = row["verdict"]
    if v == "positive":
        return f"Replicas with a larger {what} disagree more ({iv})."
    if v == "negative":
        return f"Replicas with a larger {what} disagree less ({iv})."
    return f"No detectable relation between churn and {what} ({iv})."


def flatness_robustness(flat: pd.DataFrame, robust: pd.DataFrame, *, seed: int = 0, n_boot: int = 1000) -> pd.DataFrame:
    """Kendall tau of each flatness measure with the robustness drop (clean minus mean corrupted accuracy, per
    replica: positive tau = sharper replicas lose more), by :func:`lossglass.protocols.curvature.rank_correlations`
    (percentile bootstrap interval, scipy p-value) on the independent replicas, with a verdict column."""
    from .curvature import MEASURES, independent_rows, rank_correlations

    df = flat.merge(robust[["replica", "robust_drop"]], on="replica")
    indep, _ = independent_rows(df)
    if len(indep) < 3:
        return pd.DataFrame(columns=["measure", "target", "kendall_tau", "ci_low", "ci_high", "p_value", "n", "verdict"])
    taus = rank_correlations(indep, measures=[m for m in MEASURES if m in indep], target="robust_drop", seed=seed,
                             n_boot=n_boot)
    taus["verdict"] = [correlation_verdict(lo, hi, p) for lo, hi, p in zip(taus["ci_low"], taus["ci_high"],
                                                                          taus["p_value"])]
    return taus


def flatness_words(taus: pd.DataFrame, measure: str) -> str:
    """Whether the declared flatness measure predicts robustness, in words."""
    if taus is None or not len(taus) or measure not in set(taus["measure"]):
        return "Flatness against robustness: no flatness measures on this run (enable the curvature stage)."
    r = taus.set_index("measure").loc[measure]
    iv = (f"Kendall tau {r['kendall_tau']:+.2f}, 95% interval {r['ci_low']:+.2f} to {r['ci_high']:+.2f}, "
          f"p = {r['p_value']:.3g}, {int(r['n'])} replicas")
    if r["verdict"] == "positive":
        return f"Flatter replicas (by {measure}) were more robust to the input shifts ({iv})."
    if r["verdict"] == "negative":
        return f"Flatter replicas (by {measure}) were less robust to the input shifts ({iv})."
    return f"Flatness ({measure}) does not detectably predict robustness to the input shifts ({iv})."
