"""Protocol 4: curvature of the loss (Lanczos, Hutchinson/Hutch++, stochastic Lanczos quadrature) and
flatness measures (average- and worst-case sharpness, Keskar's epsilon-sharpness, local entropy).

Everything runs on Hessian-vector products, batched: Lanczos for K replicas, or for several probes of one
replica, advances in lockstep with one batched ``hvp`` per iteration. The Hessian is never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from .._util import as_batch, check_finite, generators, randn_per
from ..errors import check
from ..problem import Problem
from ..train import Replicas
from .connect import filter_normalize


def _prep(problem: Problem, theta) -> tuple[torch.Tensor, bool]:
    if isinstance(theta, Replicas):
        theta = theta.theta
    theta, single = as_batch(torch.as_tensor(theta), problem.n_params)
    theta = theta.to(problem.device, problem.dtype)
    check_finite(theta, "theta")
    return theta, single


def _mask(problem: Problem, layer: str | None) -> torch.Tensor | None:
    if layer is None:
        return None
    check(layer in problem._info, f"unknown layer {layer!r}; parameters: {', '.join(problem._info)}")
    m = torch.zeros(problem.n_params, device=problem.device, dtype=problem.dtype)
    m[problem._info[layer].slice] = 1
    return m


def _matvec(problem: Problem, theta: torch.Tensor, mask: torch.Tensor | None):
    op = problem.hvp_operator(theta)

    def mv(v: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            v = v * mask
        hv = op(v.to(problem.dtype)).to(v.dtype)
        return hv * mask if mask is not None else hv
    return mv


def lanczos(matvec, v0: torch.Tensor, m: int, *, tol: float | None = None, k: int = 1):
    """Batched Lanczos with full re-orthogonalisation on B independent symmetric operators (row b of the
    batch is operator b). Returns (T (B, j, j) tridiagonal, V (B, j, P) orthonormal basis, j steps).
    With ``tol``, stops once the top-k Ritz values of every row satisfy |beta_j s_{j,i}| <= tol |theta_i|."""
    b, p = v0.shape
    m = min(m, p)
    dt = torch.float64
    v = v0.to(dt) / v0.to(dt).norm(dim=1, keepdim=True)
    basis = torch.zeros(b, m, p, dtype=dt, device=v0.device)
    alpha = torch.zeros(b, m, dtype=dt, device=v0.device)
    beta = torch.zeros(b, m, dtype=dt, device=v0.device)
    basis[:, 0] = v
    j_end = m
    for j in range(m):
        w = matvec(basis[:, j])
        alpha[:, j] = (w * basis[:, j]).sum(1)
        # full re-orthogonalisation (twice is enough, Parlett-Kahan)
        for _ in range(2):
            w = w - torch.einsum("bj,bjp->bp", torch.einsum("bjp,bp->bj", basis[:, :j + 1], w), basis[:, :j + 1])
        bnorm = w.norm(dim=1)
        beta[:, j] = bnorm
        if tol is not None and j + 1 >= k:
            t = _tridiag(alpha[:, :j + 1], beta[:, :j])
            evals, evecs = torch.linalg.eigh(t)
            top = evals[:, -k:]
            resid = (bnorm.unsqueeze(1) * evecs[:, -1, -k:]).abs()
            if bool((resid <= tol * top.abs().clamp_min(1e-12)).all()):
                j_end = j + 1
                break
        if j + 1 < m:
            small = bnorm < 1e-10 * alpha[:, : j + 1].abs().max(1).values.clamp_min(1e-30)
            if bool(small.all()):
                j_end = j + 1
                break
            nxt = w / bnorm.clamp_min(1e-30).unsqueeze(1)
            basis[:, j + 1] = torch.where(small.unsqueeze(1), torch.zeros_like(nxt), nxt)
    t = _tridiag(alpha[:, :j_end], beta[:, : j_end - 1])
    return t, basis[:, :j_end], j_end


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    t = torch.diag_embed(alpha)
    if beta.shape[1]:
        t = t + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return t


@dataclass
class EigenResult:
    """Top-k eigenvalues ``(K, k)`` (descending) and eigenvectors ``(K, k, P)``; ``n_hvp`` products per replica."""

    values: torch.Tensor
    vectors: torch.Tensor
    n_hvp: int
    converged: bool


def top_eigenvalues(problem: Problem, theta, k: int = 1, tol: float = 1e-4, *, max_iter: int = 200,
                    layer: str | None = None, seed: int = 0) -> EigenResult:
    """The k largest (algebraic) eigenvalues of the Hessian H(theta) by Lanczos with full
    re-orthogonalisation; stops when the residual bound |beta_j s_j| <= tol |lambda| holds for all k (an
    a-posteriori relative error bound on each Ritz value). ``layer`` restricts H to one parameter tensor."""
    theta, single = _prep(problem, theta)
    check(isinstance(k, int) and 1 <= k <= problem.n_params, f"k must be an int in 1..{problem.n_params}, got {k!r}")
    check(isinstance(tol, (int, float)) and 0 < tol < 1, f"tol must be in (0, 1), got {tol!r}")
    mask = _mask(problem, layer)
    gens = generators(seed, range(theta.shape[0]), stream=51)
    v0 = randn_per(gens, problem.n_params, problem.device, torch.float64)
    if mask is not None:
        v0 = v0 * mask.double()
    n_eff = problem.n_params if mask is None else int(mask.sum())
    t, basis, j = lanczos(_matvec(problem, theta, mask), v0, min(max_iter, n_eff), tol=tol, k=k)
    evals, evecs = torch.linalg.eigh(t)
    kk = min(k, j)
    vals = evals[:, -kk:].flip(1)
    vecs = torch.einsum("bjp,bji->bip", basis, evecs[:, :, -kk:].flip(2))
    converged = j < min(max_iter, n_eff) or j == n_eff
    res = EigenResult(vals.to(problem.dtype), vecs.to(problem.dtype), j, bool(converged))
    if single:
        res.values, res.vectors = res.values[0], res.vectors[0]
    return res


def _rademacher(gens, p, device, dtype):
    return torch.stack([torch.randint(0, 2, (p,), generator=g) * 2 - 1 for g in gens]).to(device, dtype)


def trace(problem: Problem, theta, *, n_probes: int = 30, method: str = "hutch++", layer: str | None = None,
          seed: int = 0) -> dict:
    """tr H estimated from Hessian-vector products: Hutchinson tr H = E[v^T H v], v Rademacher; or Hutch++
    (Meyer et al. 2021): tr(Q^T H Q) on the range Q of H S (S: n/3 probes) plus Hutchinson on the rest.
    Returns ``{"trace", "stderr", "n_hvp"}`` per replica (tensors) — stderr is the standard error of the
    stochastic part (sample std / sqrt(probes)); the deflated part of Hutch++ is exact."""
    theta, single = _prep(problem, theta)
    check(isinstance(n_probes, int) and n_probes >= 3, f"n_probes must be an int >= 3, got {n_probes!r}")
    check(method in ("hutchinson", "hutch++"), f"unknown trace method {method!r}; use 'hutchinson' or 'hutch++'")
    kk, p = theta.shape[0], problem.n_params
    mask = _mask(problem, layer)
    ops: dict[int, object] = {}

    def mv_many(v: torch.Tensor) -> torch.Tensor:  # v (K, n, P): all probes of all replicas in one batch
        n = v.shape[1]
        if n not in ops:
            ops[n] = _matvec(problem, theta.repeat_interleave(n, 0), mask)
        return ops[n](v.reshape(kk * n, p)).reshape(kk, n, p)

    gens = generators(seed, range(kk), stream=53)

    def probes(n):
        v = torch.stack([_rademacher(gens, p, problem.device, problem.dtype) for _ in range(n)], 1)  # (K, n, P)
        return v * mask if mask is not None else v

    if method == "hutchinson":
        v = probes(n_probes)
        est = (v * mv_many(v)).sum(-1).double()  # (K, n)
        tr, se, n_hvp = est.mean(1), est.std(1) / math.sqrt(n_probes), n_probes
    else:
        s = max(1, n_probes // 3)
        g_ = n_probes - 2 * s
        hs = mv_many(probes(s))
        q, _ = torch.linalg.qr(hs.transpose(1, 2).double())  # (K, P, s)
        q = q.to(problem.dtype)
        hq = mv_many(q.transpose(1, 2))
        exact = (q.transpose(1, 2) * hq).sum((-1, -2)).double()
        v = probes(g_)
        v = v - torch.einsum("kps,kns->knp", q, torch.einsum("knp,kps->kns", v, q))
        est = (v * mv_many(v)).sum(-1).double()
        tr = exact + est.mean(1)
        se = est.std(1) / math.sqrt(max(g_, 1))
        n_hvp = 2 * s + g_
    out = {"trace": tr, "stderr": se, "n_hvp": n_hvp}
    return {k: (v[0] if single and torch.is_tensor(v) else v) for k, v in out.items()}


@dataclass
class SpectralDensity:
    """Density of Hessian eigenvalues on ``grid`` (integrates to 1), with the quadrature nodes and weights."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray


def spectral_density(problem: Problem, theta, *, n_probes: int = 5, steps: int = 40, sigma: float | None = None,
                     n_grid: int = 400, seed: int = 0, layer: str | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): for each Gaussian probe, ``steps`` Lanczos
    steps give Ritz values theta_i and weights tau_i (squared first components of the tridiagonal's
    eigenvectors); the density is (1/n_probes) sum tau_i N(lambda; theta_i, sigma^2). Its mean
    sum tau_i theta_i estimates tr(H) / P. All probes run as one batch."""
    theta, _ = _prep(problem, theta)
    check(theta.shape[0] == 1, "spectral_density takes one solution (P,)")
    check(isinstance(steps, int) and steps >= 2, f"steps must be an int >= 2, got {steps!r}")
    mask = _mask(problem, layer)
    gens = generators(seed, range(n_probes), stream=57)
    v0 = randn_per(gens, problem.n_params, problem.device, torch.float64)
    if mask is not None:
        v0 = v0 * mask.double()
    th = theta.expand(n_probes, -1)
    t, _, _ = lanczos(_matvec(problem, th, mask), v0, steps)
    evals, evecs = torch.linalg.eigh(t)
    nodes = evals.cpu().numpy()
    weights = (evecs[:, 0, :] ** 2).cpu().numpy()
    lo, hi = nodes.min(), nodes.max()
    width = max(hi - lo, 1e-12)
    sigma = sigma or width / 100
    grid = np.linspace(lo - 5 * sigma - 0.05 * width, hi + 5 * sigma + 0.05 * width, n_grid)
    dens = (weights[..., None] * np.exp(-0.5 * ((grid - nodes[..., None]) / sigma) ** 2)).sum((0, 1))
    dens /= n_probes * sigma * math.sqrt(2 * math.pi)
    return SpectralDensity(grid, dens, nodes, weights)


# ---------------------------------------------------------------------------- flatness measures
def _unit_directions(problem: Problem, theta: torch.Tensor, n: int, seed: int, normalize: str) -> torch.Tensor:
    """n random directions per replica, ``(K, n, P)``: filter-normalised (|u_row| = |theta_row|, biases zero)
    and divided by |theta| so that |u| = 1; or plain unit Gaussian directions (``normalize="none"`` or models
    without weight matrices)."""
    k, p = theta.shape
    gens = generators(seed, range(k), stream=59)
    u = torch.stack([randn_per(gens, p, problem.device, problem.dtype) for _ in range(n)], 1)
    has_matrix = any(len(i.shape) >= 2 for i in problem.params)
    if normalize == "filter" and has_matrix:
        u = filter_normalize(problem, u, theta.unsqueeze(1).expand_as(u))
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def sharpness(problem: Problem, theta, rho: float = 0.05, kind: str = "average", *, n_samples: int = 16,
              n_steps: int = 5, normalize: str = "filter", seed: int = 0) -> torch.Tensor:
    """Sharpness of each replica (``(K,)`` or a scalar):

    - ``"average"``: E_u [E(theta + rho |theta| u) - E(theta)], u random unit filter-normalised directions
      (``n_samples``, evaluated as one batch), so rho is a relative radius.
    - ``"worst"`` (SAM, Foret et al. 2021): max_{|u| <= rho} E(theta + u) - E(theta) by ``n_steps`` of
      normalised gradient ascent projected on the rho-ball, started at rho grad/|grad|.
    - ``"keskar"`` (Keskar et al. 2017): 100 (max_{u in C} E(theta + u) - E(theta)) / (1 + E(theta)) with
      the box C = {|u_i| <= rho (|theta_i| + 1)}, by projected sign-gradient ascent.
    A constant energy gives 0 for every kind.
    """
    theta, single = _prep(problem, theta)
    check(isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho), f"rho must be > 0, got {rho!r}")
    check(kind in ("average", "worst", "keskar"), f"unknown sharpness kind {kind!r}; use average, worst or keskar")
    e0 = problem.energy(theta)
    k, p = theta.shape
    if kind == "average":
        u = _unit_directions(problem, theta, n_samples, seed, normalize)
        pts = theta.unsqueeze(1) + rho * theta.norm(dim=1).view(k, 1, 1) * u
        e = problem.energy(pts.reshape(k * n_samples, p)).view(k, n_samples)
        out = (e - e0.unsqueeze(1)).mean(1)
    elif kind == "worst":
        _, g = problem.energy_and_grad(theta)
        u = rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        best = problem.energy(theta + u)
        for _ in range(n_steps):
            _, g = problem.energy_and_grad(theta + u)
            u = u + rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
            u = u * (rho / u.norm(dim=1, keepdim=True).clamp_min(rho))
            best = torch.maximum(best, problem.energy(theta + u))
        out = torch.clamp(best - e0, min=0)
    else:
        box = rho * (theta.abs() + 1)
        _, g = problem.energy_and_grad(theta)
        u = box * torch.sign(g)
        best = problem.energy(theta + u)
        for _ in range(n_steps):
            _, g = problem.energy_and_grad(theta + u)
            u = torch.clamp(u + 0.5 * box * torch.sign(g), -box, box)
            best = torch.maximum(best, problem.energy(theta + u))
        out = 100 * torch.clamp(best - e0, min=0) / (1 + e0)
    return out[0] if single else out


def local_entropy(problem: Problem, theta, *, radius: float = 0.05, epsilon: float = 0.01, n_samples: int = 64,
                  seed: int = 0) -> torch.Tensor:
    """Local entropy (Baldassi et al. 2016/2020), relative form: log of the fraction of the ball
    |theta' - theta| <= radius |theta| (sampled uniformly, ``n_samples`` points as one batch) where
    E(theta') <= E(theta) + epsilon. The log-volume is this plus log Vol_P(radius |theta|). Flat minima have
    values near 0; the fraction uses (count + 1/2) / (n + 1) so that it stays finite."""
    theta, single = _prep(problem, theta)
    check(radius > 0 and epsilon > 0, f"radius and epsilon must be > 0 (got {radius}, {epsilon})")
    k, p = theta.shape
    e0 = problem.energy(theta)
    u = _unit_directions(problem, theta, n_samples, seed, "none")
    gens = generators(seed, range(k), stream=61)
    r = torch.stack([torch.rand(n_samples, generator=g, dtype=torch.float64) for g in gens]).to(problem.device)
    r = (r ** (1.0 / p)).to(problem.dtype)  # uniform in the ball
    pts = theta.unsqueeze(1) + (radius * theta.norm(dim=1).view(k, 1, 1)) * r.unsqueeze(-1) * u
    e = problem.energy(pts.reshape(k * n_samples, p)).view(k, n_samples)
    frac = ((e <= e0.unsqueeze(1) + epsilon).sum(1).double() + 0.5) / (n_samples + 1)
    out = torch.log(frac).to(problem.dtype)
    out = torch.where(frac >= (n_samples + 0.5) / (n_samples + 1), torch.zeros_like(out), out)
    return out[0] if single else out


# ---------------------------------------------------------------------------- the generalisation study
def flatness_table(problem: Problem, replicas: Replicas, *, rho: float = 0.05, top_k: int = 1, tol: float = 1e-3,
                   trace_probes: int = 12, n_samples: int = 8, entropy_radius: float = 0.3,
                   entropy_epsilon: float = 0.05, seed: int = 0) -> pd.DataFrame:
    """Every flatness measure for every replica, beside its test error and generalisation gap."""
    theta = replicas.theta
    eig = top_eigenvalues(problem, theta, k=top_k, tol=tol, seed=seed)
    tr = trace(problem, theta, n_probes=trace_probes, seed=seed)
    df = replicas.table.copy().reset_index(drop=True)
    df["lambda_max"] = eig.values[:, 0].cpu().numpy()
    df["hessian_trace"] = tr["trace"].cpu().numpy()
    df["hessian_trace_se"] = tr["stderr"].cpu().numpy()
    df["sharpness_average"] = sharpness(problem, theta, rho, "average", n_samples=n_samples, seed=seed).cpu().numpy()
    df["sharpness_worst"] = sharpness(problem, theta, rho, "worst", seed=seed).cpu().numpy()
    df["sharpness_keskar"] = sharpness(problem, theta, rho * 0.1, "keskar", seed=seed).cpu().numpy()
    df["local_entropy"] = local_entropy(problem, theta, radius=entropy_radius, epsilon=entropy_epsilon,
                                        n_samples=4 * n_samples, seed=seed).cpu().numpy()
    df["weight_norm"] = theta.norm(dim=1).cpu().numpy()
    from ..proxies import batch_proxies

    prox = batch_proxies(problem, theta, rho=rho, seed=seed)
    df["proxy_lambda_batch"] = prox["lambda_batch"].cpu().numpy()
    df["proxy_perturbation"] = prox["perturbation_rise"].cpu().numpy()
    df["test_error"] = 1 - df["test_accuracy"]
    return df


MEASURES = ("lambda_max", "hessian_trace", "sharpness_average", "sharpness_worst", "sharpness_keskar",
            "local_entropy", "weight_norm", "proxy_lambda_batch", "proxy_perturbation")


def rank_correlations(df: pd.DataFrame, measures=MEASURES, target: str = "gap_error", *, n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """Kendall's tau of each measure with ``target`` across replicas (Jiang et al. 2020), with a 95%
    percentile bootstrap confidence interval and the two-sided p-value. Local entropy is negated (higher =
    flatter) so that a positive tau always means "sharper -> larger gap"."""
    rng = np.random.default_rng(seed)
    y = df[target].to_numpy(float)
    n = len(y)
    check(n >= 3, f"need at least 3 replicas for a rank correlation, got {n}")
    idx = rng.integers(0, n, size=(n_boot, n))
    rows = []
    for m in measures:
        if m not in df:
            continue
        x = df[m].to_numpy(float) * (-1 if m == "local_entropy" else 1)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3:
            continue
        tau, pval = kendalltau(x[ok], y[ok])
        boots = [kendalltau(x[i], y[i])[0] for i in idx if np.isfinite(x[i]).all()]
        boots = np.asarray([b for b in boots if np.isfinite(b)])
        lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan))
        rows.append({"measure": m, "target": target, "kendall_tau": float(tau), "ci_low": float(lo),
                     "ci_high": float(hi), "p_value": float(pval), "n": int(ok.sum())})
    return pd.DataFrame(rows)
