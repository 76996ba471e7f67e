"""Protocol 4: curvature of the loss (Lanczos, Hutchinson/Hutch++, stochastic Lanczos quadrature) and
flatness measures (average- and worst-case sharpness, Keskar's epsilon-sharpness, local entropy).

Everything runs on Hessian-vector products, batched: Lanczos for K replicas, or for several probes of one
replica, advances in lockstep with one batched ``hvp`` per iteration. The Hessian is never formed.

On a constrained problem (``problem.manifold``, e.g. the sphere of the spherical p-spin) the Hessian is the
Riemannian one, P_T (grad^2 E - (theta . grad E / |theta|^2) I) P_T (:meth:`Problem.hessian_operator`), so
eigenvalues, traces and densities are over the P - 1 tangent directions; perturbations for sharpness and local
entropy are drawn in the tangent space at theta and mapped back onto the manifold by its projection.
A problem with a custom projector but no declared manifold is refused.
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


def _ids(replica_ids, k: int) -> list[int]:
    """The replicas' ids that seed their generators (default 0..K-1: their positions in the batch)."""
    if replica_ids is None:
        return list(range(k))
    ids = [int(i) for i in replica_ids]
    check(len(ids) == k, f"replica_ids must name the {k} replicas of theta, got {len(ids)} ids")
    return ids


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
    check(layer in problem.layout, f"unknown layer {layer!r}; parameters: {', '.join(problem.layout.names)}")
    return problem.layout.mask(layer, device=problem.device, dtype=problem.dtype)


def _manifold(problem: Problem, what: str, layer: str | None = None):
    """The problem's manifold (None when unconstrained); a per-layer restriction is refused on a manifold unless
    the layer is the whole parameter vector."""
    man = problem.constraint(what)
    if man is not None and layer is not None:
        check(problem.layout[layer].numel == problem.n_params,
              f"{what}: layer= restricts the Hessian to part of the parameters, which is not defined on the "
              f"problem's manifold {man}")
    return man


def _matvec(problem: Problem, theta: torch.Tensor, mask: torch.Tensor | None):
    """v -> (masked) Hessian-vector products at ``theta`` (K, P): Riemannian on a manifold."""
    op = problem.hessian_operator(theta)

    def mv(v: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            v = v * mask
        hv = op(v.to(problem.dtype)).to(v.dtype)
        return hv * mask if mask is not None else hv
    return mv


def lanczos(matvec, v0: torch.Tensor, m: int, *, tol: float | None = None, k: int = 1, per_row: bool = False):
    """Batched Lanczos with full re-orthogonalisation on B independent symmetric operators (row b of the
    batch is operator b). Returns (T (B, j, j) tridiagonal, V (B, j, P) orthonormal basis, j steps).
    With ``tol``, stops once the top-k Ritz values of every row satisfy |beta_j s_{j,i}| <= tol |theta_i|.
    ``per_row=True`` also returns each row's own stop ``(B,)``: the first step j_b at which its top-k Ritz values
    satisfied the bound (or its Krylov space was exhausted), so that T_b = T[b, :j_b, :j_b] and V[b, :j_b] are what
    row b alone would have given: the rows' recurrences are independent, only the batch's last step depends on
    the others."""
    b, p = v0.shape
    m = min(m, p)
    dt = torch.float64
    v = v0.to(dt) / v0.to(dt).norm(dim=1, keepdim=True)
    # the basis grows by doubling: a run that converges in 10 steps never touches (B, m, P) float64 (81 MB for
    # m = 200, P = 50,890), whose page faults cost a cold call more than the products
    basis = torch.empty(b, min(m, 16), p, dtype=dt, device=v0.device)
    alpha = torch.zeros(b, m, dtype=dt, device=v0.device)
    beta = torch.zeros(b, m, dtype=dt, device=v0.device)
    basis[:, 0] = v
    j_end = m
    stop = torch.full((b,), m, dtype=torch.long, device=v0.device)  # each row's own stop
    open_ = torch.ones(b, dtype=torch.bool, device=v0.device)
    for j in range(m):
        if j + 2 > basis.shape[1] and basis.shape[1] < m:  # room for the next vector
            grown = torch.empty(b, min(m, 2 * basis.shape[1]), p, dtype=dt, device=v0.device)
            grown[:, :j + 1] = basis[:, :j + 1]
            basis = grown
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
            ok = (resid <= tol * top.abs().clamp_min(1e-12)).all(1)
            stop = torch.where(open_ & ok, j + 1, stop)
            open_ &= ~ok
            if bool(ok.all()) or per_row and not bool(open_.any()):
                j_end = j + 1
                break
        if j + 1 < m:
            small = bnorm < 1e-10 * alpha[:, : j + 1].abs().max(1).values.clamp_min(1e-30)
            stop = torch.where(open_ & small, j + 1, stop)
            open_ &= ~small
            if bool(small.all()) or per_row and not bool(open_.any()):
                j_end = j + 1
                break
            nxt = w / bnorm.clamp_min(1e-30).unsqueeze(1)
            basis[:, j + 1] = torch.where(small.unsqueeze(1), torch.zeros_like(nxt), nxt)
    t = _tridiag(alpha[:, :j_end], beta[:, : j_end - 1])
    if per_row:
        return t, basis[:, :j_end], j_end, stop.clamp(max=j_end)
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
                    layer: str | None = None, seed: int = 0, replica_ids=None) -> EigenResult:
    """The k largest (algebraic) eigenvalues of the Hessian H(theta) by Lanczos with full
    re-orthogonalisation; stops when the residual bound |beta_j s_j| <= tol |lambda| holds for all k (an
    a-posteriori relative error bound on each Ritz value). ``layer`` restricts H to one parameter tensor.
    On a manifold H is the Riemannian Hessian and the Krylov space lies in the tangent space at theta (the start
    vector is projected onto it), so the eigenpairs are those of the P - 1 tangent directions. Each replica stops at
    its own step (:func:`lanczos` ``per_row``): its eigenpairs do not depend on the other replicas of the batch.
    ``replica_ids``: the ids that seed each replica's start vector (default its position 0..K-1), so that a replica
    run in a group of others draws what it draws in the whole batch."""
    theta, single = _prep(problem, theta)
    check(isinstance(k, int) and 1 <= k <= problem.n_params, f"k must be an int in 1..{problem.n_params}, got {k!r}")
    check(isinstance(tol, (int, float)) and 0 < tol < 1, f"tol must be in (0, 1), got {tol!r}")
    man = _manifold(problem, "top_eigenvalues", layer)
    mask = _mask(problem, layer)
    gens = generators(seed, _ids(replica_ids, theta.shape[0]), stream=51)
    v0 = randn_per(gens, problem.n_params, problem.device, torch.float64)
    if mask is not None:
        v0 = v0 * mask.double()
    n_eff = problem.n_params if mask is None else int(mask.sum())
    if man is not None:
        v0 = man.tangent(theta.double(), v0)
        n_eff -= man.codim
        check(k <= n_eff, f"k must be at most {n_eff} (the dimension of the tangent space), got {k}")
    t, basis, j, stop = lanczos(_matvec(problem, theta, mask), v0, min(max_iter, n_eff), tol=tol, k=k, per_row=True)
    kk = min(k, int(stop.min()))
    vals = torch.empty(theta.shape[0], kk, dtype=torch.float64, device=t.device)
    vecs = torch.empty(theta.shape[0], kk, problem.n_params, dtype=torch.float64, device=t.device)
    for s in torch.unique(stop).tolist():  # the rows that stopped at step s: their own leading s x s block
        rows = torch.nonzero(stop == s).flatten()
        evals, evecs = torch.linalg.eigh(t[rows, :s, :s])
        vals[rows] = evals[:, -kk:].flip(1)
        vecs[rows] = torch.einsum("bjp,bji->bip", basis[rows, :s], evecs[:, :, -kk:].flip(2))
    converged = j < min(max_iter, n_eff) or j == n_eff
    res = EigenResult(vals.to(problem.dtype), vecs.to(problem.dtype), j, bool(converged))
    if single:
        res.values, res.vectors = res.values[0], res.vectors[0]
    return res


def _rademacher(gens, p, device, dtype):
    return torch.stack([torch.randint(0, 2, (p,), generator=g) * 2 - 1 for g in gens]).to(device, dtype)


def trace(problem: Problem, theta, *, n_probes: int = 30, method: str = "hutch++", layer: str | None = None,
          seed: int = 0, replica_ids=None) -> dict:
    """tr H estimated from Hessian-vector products: Hutchinson tr H = E[v^T H v], v Rademacher; or Hutch++
    (Meyer et al. 2021): tr(Q^T H Q) on the range Q of H S (S: n/3 probes) plus Hutchinson on the rest.
    Returns ``{"trace", "stderr", "n_hvp"}`` per replica (tensors) — stderr is the standard error of the
    stochastic part (sample std / sqrt(probes)); the deflated part of Hutch++ is exact.
    On a manifold the probes are projected onto the tangent space, v -> P_T v (E[P_T v v^T P_T] = P_T), and H is
    the Riemannian Hessian: the trace is over the P - 1 tangent directions. ``replica_ids``: the ids that seed each
    replica's probes (default its position 0..K-1)."""
    theta, single = _prep(problem, theta)
    check(isinstance(n_probes, int) and n_probes >= 3, f"n_probes must be an int >= 3, got {n_probes!r}")
    check(method in ("hutchinson", "hutch++"), f"unknown trace method {method!r}; use 'hutchinson' or 'hutch++'")
    kk, p = theta.shape[0], problem.n_params
    man = _manifold(problem, "trace", layer)
    mask = _mask(problem, layer)
    ops: dict[int, object] = {}

    def mv_many(v: torch.Tensor) -> torch.Tensor:  # v (K, n, P): all probes of all replicas in one batch
        n = v.shape[1]
        if n not in ops:
            ops[n] = _matvec(problem, theta.repeat_interleave(n, 0), mask)
        return ops[n](v.reshape(kk * n, p)).reshape(kk, n, p)

    gens = generators(seed, _ids(replica_ids, kk), stream=53)

    def probes(n):
        v = torch.stack([_rademacher(gens, p, problem.device, problem.dtype) for _ in range(n)], 1)  # (K, n, P)
        v = v * mask if mask is not None else v
        return v if man is None else man.tangent(theta.unsqueeze(1), v)

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
        # one Hutchinson probe left has no sample spread: its standard error is unknown (NaN), not a warning
        se = est.std(1) / math.sqrt(g_) if g_ >= 2 else torch.full_like(tr, float("nan"))
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
    sum tau_i theta_i estimates tr(H) / P. All probes run as one batch. On a manifold the probes lie in the tangent
    space and H is the Riemannian Hessian: the density is that of its P - 1 tangent eigenvalues (mean tr H / (P-1))."""
    theta, _ = _prep(problem, theta)
    check(theta.shape[0] == 1, "spectral_density takes one solution (P,)")
    check(isinstance(steps, int) and steps >= 2, f"steps must be an int >= 2, got {steps!r}")
    man = _manifold(problem, "spectral_density", layer)
    mask = _mask(problem, layer)
    gens = generators(seed, range(n_probes), stream=57)
    v0 = randn_per(gens, problem.n_params, problem.device, torch.float64)
    if mask is not None:
        v0 = v0 * mask.double()
    if man is not None:
        v0 = man.tangent(theta.double(), v0)
        steps = min(steps, problem.n_params - man.codim)
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
def _unit_directions(problem: Problem, theta: torch.Tensor, n: int, seed: int, normalize: str,
                     replica_ids=None) -> torch.Tensor:
    """n random unit directions per replica, ``(K, n, P)`` with |u| = 1: Gaussian directions filter-normalised
    (Li et al. 2018: each row of every weight matrix rescaled to the norm of theta's row, biases and other 1-D
    parameters zeroed) and then divided by their own norm; plain uniform directions on the unit sphere with
    ``normalize="none"`` or for models without weight matrices. On a manifold the directions are projected onto
    the tangent space at theta before the final normalisation."""
    k, p = theta.shape
    gens = generators(seed, _ids(replica_ids, k), stream=59)
    u = torch.stack([randn_per(gens, p, problem.device, problem.dtype) for _ in range(n)], 1)
    has_matrix = any(len(i.shape) >= 2 for i in problem.params)
    if normalize == "filter" and has_matrix:
        u = filter_normalize(problem, u, theta.unsqueeze(1).expand_as(u))
    if problem.manifold is not None:
        u = problem.manifold.tangent(theta.unsqueeze(1), u)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def _retract(problem: Problem, theta: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """theta + u, mapped back onto the manifold (radial projection for a sphere) when there is one."""
    return theta + u if problem.manifold is None else problem.manifold.project(theta + u)


def sharpness(problem: Problem, theta, rho: float = 0.05, kind: str = "average", *, n_samples: int = 16,
              n_steps: int = 5, normalize: str = "filter", seed: int = 0, replica_ids=None) -> torch.Tensor:
    """Sharpness of each replica (``(K,)`` or a scalar). ``"average"`` and ``"worst"`` share one convention: a
    relative radius, R = rho |theta| with |theta| the Euclidean norm of the whole parameter vector (weights and
    biases) of that replica (``sharpness_radius`` gives R):

    - ``"average"``: E_u [E(theta + R u) - E(theta)], u random unit directions (|u| = 1), filter-normalised
      before normalisation (:func:`_unit_directions`), ``n_samples`` of them evaluated as one batch. On a
      quadratic with isotropic directions this is (1/2) R^2 tr(H) / P (E[u^T H u] = tr(H) / P for u uniform on
      the unit sphere).
    - ``"worst"`` (SAM, Foret et al. 2021): max_{|u| <= R} E(theta + u) - E(theta) by ``n_steps`` of
      normalised gradient ascent projected on the R-ball, started at R grad/|grad| (a random direction where
      the gradient vanishes); 1/2 R^2 lambda_max on a quadratic at its minimum, once converged.
    - ``"keskar"`` (Keskar et al. 2017), its own definition: 100 (max_{u in C} E(theta + u) - E(theta)) /
      (1 + E(theta)) with the box C = {|u_i| <= rho (|theta_i| + 1)}, by projected sign-gradient ascent started at
      the corner sign(grad) (random signs where the gradient component vanishes).

    On a manifold u is drawn (average) or ascended (worst) in the tangent space at theta and the point is
    projected back onto the manifold; Keskar's coordinate box has no tangent-space counterpart and is refused.
    A constant energy gives 0 for every kind. ``replica_ids``: the ids that seed each replica's random directions
    (default its position 0..K-1).
    """
    theta, single = _prep(problem, theta)
    check(isinstance(rho, (int, float)) and rho > 0 and math.isfinite(rho), f"rho must be > 0, got {rho!r}")
    check(kind in ("average", "worst", "keskar"), f"unknown sharpness kind {kind!r}; use average, worst or keskar")
    man = _manifold(problem, f"sharpness ({kind})")
    check(man is None or kind != "keskar", f"Keskar sharpness uses a box in coordinates, which is not defined on "
          f"the problem's manifold {man}; use kind='average' or 'worst'")
    e0 = problem.energy(theta)
    k, p = theta.shape
    radius = sharpness_radius(theta, rho).unsqueeze(1)  # (K, 1)
    if kind == "average":
        u = _unit_directions(problem, theta, n_samples, seed, normalize, replica_ids)
        pts = _retract(problem, theta.unsqueeze(1), radius.unsqueeze(1) * u)
        e = problem.energy(pts.reshape(k * n_samples, p)).view(k, n_samples)
        out = (e - e0.unsqueeze(1)).mean(1)
    elif kind == "worst":
        gens = generators(seed, _ids(replica_ids, k), stream=63)
        rand = randn_per(gens, p, problem.device, problem.dtype)

        def ascent(u: torch.Tensor) -> torch.Tensor:
            """The gradient of u -> E(retract(theta + u)) in the ambient space (tangent at theta on a manifold)."""
            x = theta + u
            _, g = problem.energy_and_grad(_retract(problem, theta, u))
            if man is None:
                return g
            # d project(x) / dx = (R_m / |x|) P_T(x): chain rule, then restrict to the tangent space at theta
            g = man.tangent(x, g) * (man.radius / x.norm(dim=1, keepdim=True))
            return man.tangent(theta, g)

        def unit(d: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
            if man is not None:
                fallback = man.tangent(theta, fallback)
            n = d.norm(dim=1, keepdim=True)
            return torch.where(n > 1e-30, d / n.clamp_min(1e-300), fallback / fallback.norm(dim=1, keepdim=True))

        u = radius * unit(ascent(torch.zeros_like(theta)), rand)
        best = problem.energy(_retract(problem, theta, u))
        for _ in range(n_steps):
            u = u + radius * unit(ascent(u), rand)
            u = u * (radius / u.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(max=1)
            best = torch.maximum(best, problem.energy(_retract(problem, theta, u)))
        out = torch.clamp(best - e0, min=0)
    else:
        box = rho * (theta.abs() + 1)
        gens = generators(seed, _ids(replica_ids, k), stream=63)
        coin = torch.sign(randn_per(gens, p, problem.device, problem.dtype))
        _, g = problem.energy_and_grad(theta)
        u = box * torch.where(g != 0, torch.sign(g), coin)
        best = problem.energy(theta + u)
        for _ in range(n_steps):
            _, g = problem.energy_and_grad(theta + u)
            u = torch.clamp(u + 0.5 * box * torch.sign(g), -box, box)
            best = torch.maximum(best, problem.energy(theta + u))
        out = 100 * torch.clamp(best - e0, min=0) / (1 + e0)
    return out[0] if single else out


def sharpness_radius(theta, rho: float) -> torch.Tensor:
    """The absolute radius R = rho |theta| (whole parameter vector) that average and worst-case sharpness use."""
    theta = theta.theta if isinstance(theta, Replicas) else torch.as_tensor(theta)
    return rho * theta.norm(dim=-1)


def _ball_map(z: torch.Tensor, d: int) -> torch.Tensor:
    """T(z) = z / |z| * F_d(|z|^2)^(1/d), F_d the chi-square CDF with d degrees of freedom: maps z ~ N(0, I_d) to
    the uniform law on the unit d-ball (|T(z)|^d = F_d(|z|^2) is uniform on [0, 1])."""
    r2 = (z.double() ** 2).sum(-1, keepdim=True)
    log_f = torch.log(torch.special.gammainc(torch.tensor(d / 2, dtype=torch.float64, device=z.device), r2 / 2))
    scale = torch.exp(log_f / d - 0.5 * torch.log(r2.clamp_min(1e-300)))
    return z * scale.to(z.dtype)


def _cluster_var(ind: torch.Tensor, cluster: torch.Tensor, n_clusters: torch.Tensor) -> torch.Tensor:
    """Variance of the fraction p = mean(ind) over n chains grouped in clusters (the clones of one seed are
    correlated): C/(C-1) sum_c (S_c - p n_c)^2 / n^2, S_c and n_c the hits and chains of cluster c (Cochran 1977,
    eq. 11.30, cluster sampling with a ratio estimator). Shapes: ind, cluster ``(K, n)``, n_clusters ``(K,)``."""
    k, n = ind.shape
    x = ind.double()
    p = x.mean(1, keepdim=True)
    hits = torch.zeros(k, n, dtype=torch.float64, device=ind.device).scatter_add_(1, cluster, x)
    size = torch.zeros_like(hits).scatter_add_(1, cluster, torch.ones_like(x))
    c = n_clusters.double()
    return (c / (c - 1).clamp_min(1)) * ((hits - p * size) ** 2).sum(1) / n**2


def _na_step(hits: torch.Tensor, n: int, *, final: bool | torch.Tensor) -> torch.Tensor:
    """log P(E <= t | level) by the Nelson-Aalen estimator (Aalen 1978) from n chains of the level's law of which
    ``hits`` lie below t: minus the sum of 1 / (chains at risk) over the chains that exit, taken in order of
    decreasing energy. A fixed t (``final``; also an intermediate level whose kept chains lie strictly below the
    threshold chain, which exits last): exits j = hits + 1 .. n, psi(hits + 1) - psi(n + 1). An intermediate level
    that keeps the chain at t (ties): j = hits .. n, psi(hits) - psi(n + 1). Unbiased for log F(t) when the n chains are
    independent draws of the level's law, including thresholds chosen as order statistics of the same chains (the
    Nelson-Aalen martingale stopped at an order statistic); log(hits / n) is not: E log F(e_(k)) = psi(k) - psi(n + 1)
    for the k-th lowest of n, below log(k / n) by about 1/(2k) - 1/(2n) nats per level. ``final`` may be a bool
    tensor (per replica)."""
    h = hits + torch.as_tensor(final, device=hits.device).to(hits.dtype)
    return torch.special.digamma(h) - torch.special.digamma(torch.full_like(h, n + 1.0))


def local_entropy(problem: Problem, theta, *, radius: float = 0.05, epsilon: float = 0.01, n_chains: int = 64,
                  p0: float = 0.2, mcmc_steps: int = 3, max_levels: int = 20, seed: int = 0,
                  replica_ids=None) -> dict:
    """Local entropy (Baldassi et al. 2016/2020), relative form: the log of the fraction of the ball

        S(theta) = log Vol{theta' : |theta' - theta| <= R, E(theta') <= E(theta) + epsilon} / Vol(B_R),

    R = ``radius`` * |theta| (|theta| the norm of the whole parameter vector: a relative radius, as for
    sharpness). The log-volume is this plus log Vol_P(R). Flat minima have values near 0.

    Estimated by subset simulation (Au & Beck 2001), so fractions far below 1/n_chains are resolved: with u uniform
    on B_R, p = P(E(theta + u) <= E(theta) + epsilon) = prod_l P(E < tau_l | E < tau_{l-1}) over decreasing
    energy thresholds tau_0 > tau_1 > ... > tau_L = E(theta) + epsilon, each tau_l the k-th lowest energy of the
    current n = ``n_chains`` chains, k = ceil(p0 n). The log of each factor is the Nelson-Aalen estimate
    (:func:`_na_step`): psi(k) - psi(n + 1) at an intermediate level, psi(h + 1) - psi(n + 1) at the last one (h chains
    at or below E(theta) + epsilon), psi the digamma function, so

        log p = L (psi(k) - psi(n + 1)) + psi(h + 1) - psi(n + 1),

    L ~ log p / log p0 levels. The k - 1 chains strictly below tau_l (the chain at tau_l is the level's last exit;
    with ties at tau_l, as on a flat energy, the tied chains are kept too) are cloned back to n, n // (k - 1) clones
    each and one more for seeds picked by a random offset, and moved by ``mcmc_steps`` preconditioned
    Crank-Nicolson steps that leave the uniform law on B_R intersect {E < tau_l} invariant (Papaioannou et al. 2015):
    u = R T(z), T maps N(0, I) to the uniform unit ball (:func:`_ball_map`), z' = a z + sqrt(1 - a^2) xi, accepted
    iff E(theta + R T(z')) < tau_l, with sqrt(1 - a^2) adapted per replica towards 44% acceptance. The standard
    error treats the levels as independent and, within a level, the clones of one seed as a cluster
    (:func:`_cluster_var`): var(log p) = sum_l var(phat_l) / phat_l^2.

    Three biases of the estimator before issue 22: (1) the factor k/n at a threshold chosen as the k-th order
    statistic of the same chains overestimates log p by about 1/(2k) - 1/(2n) nats per level (E log F(e_(k)) =
    psi(k) - psi(n + 1)); with every level sampled exactly, +0.69 nats at log p = -25 with n = 64, +1.28 with n = 32,
    +2.50 with n = 16; (2) the chain at the threshold was kept as a seed: its clones start on the boundary of the new
    set, where the level's law has no mass, and with 3 MCMC steps the population stays too close to the boundary
    (-0.04 nats per level); (3) the extra clones of the n mod k seeds always went to the lowest seeds (+0.03 nats per
    level); (2) and (3) measured level by level on an isotropic quadratic (P = 40), where log F(tau_l) is exact. They
    partly cancelled: on the quadratics below the net bias was +0.03 to +0.55 nats with 64 chains (40 seeds), +0.66
    at log p = -24.4 in P = 10 with 32 chains (64 seeds).

    Cost: 1 + 1 + (levels) * ``mcmc_steps`` batched energy evaluations of (active replicas) x ``n_chains`` points,
    at most 2 + ``max_levels`` * ``mcmc_steps`` (62 with the defaults, which resolve log p down to about
    ``max_levels`` * log(p0) = -32; about 3.6 levels, 11 evaluations, per factor e^-10); unchanged by issue 22.
    Checked on quadratics against closed forms (isotropic: (sqrt(2 epsilon / h) / R)^P; stiff in m of P directions:
    the incomplete beta fraction I_s(m/2, (P-m)/2 + 1), s = 2 epsilon / (h R^2); an ellipsoid inside the ball:
    prod_i sqrt(2 epsilon / h_i) / R), 40 seeds each, defaults (benchmarks/calibrate_local_entropy.py): isotropic and
    stiff cases at log p = -7 to -25, P = 10 to 1000, bias -0.6 to +0.1 nats (within 0.5 stated standard errors),
    stated error / seed-to-seed spread 0.91 to 1.18; ellipsoids with semi-axes spread 10-fold (condition number 10),
    P = 10 and 30: bias +0.03 and -0.68 (-0.7 se), ratio 0.99 and 0.69. Not resolved: strongly anisotropic sets,
    where 3 isotropic steps per level do not mix: an ellipsoid with condition number 100 in P = 20 (log p = -23.0)
    gives -26.9, spread 4.1 against a stated error of 1.2 (bias -3.1 se); more steps mix (``mcmc_steps=20``: -23.4,
    spread 1.3, stated 1.0; all four ellipsoids within 0.4 se, ratios 0.81 to 1.33). A trained network is anisotropic
    too: for 4 replicas of 784-64-10 on 1,000 Fashion-MNIST images at log p of -2.5 to -11 the seed-to-seed spread
    over 6 seeds was 0.9 to 1.6 times the stated error, so read differences between replicas against about 1.5
    ``stderr``. Replicas, chains and levels are batched; replicas are processed in groups so that the chains' states
    (about 5 n_chains P numbers per replica) stay within ``problem.memory_mb``. Deterministic for a seed; replica
    k's result does not depend on the others. On a manifold the ball is the ball of radius R in the tangent space at
    theta (dimension P - 1), each point projected onto the manifold.

    Returns ``{"local_entropy", "stderr", "upper_bound", "levels", "converged", "radius", "n_energy"}``
    (per-replica tensors, ``n_energy`` the number of batched energy evaluations). A replica that has not reached
    E(theta) + epsilon after ``max_levels`` levels is ``converged=False`` with local_entropy and stderr NaN (not a
    number that would tie with every other unresolved replica); ``upper_bound`` is then the estimated
    log P(E <= tau_last) >= log p of the last level reached (for converged replicas it equals local_entropy).
    In P dimensions log p scales like P log(r*/R), so it moves from about 0 to far below -30 over a narrow range
    of radii: choose ``radius`` (and ``epsilon``) so that the replicas compared fall inside the resolved range.
    """
    theta, single = _prep(problem, theta)
    check(isinstance(radius, (int, float)) and radius > 0, f"radius must be > 0, got {radius!r}")
    check(isinstance(epsilon, (int, float)) and epsilon > 0, f"epsilon must be > 0, got {epsilon!r}")
    check(isinstance(p0, float) and 0 < p0 < 1, f"p0 must be a float in (0, 1), got {p0!r}")
    check(isinstance(n_chains, int) and n_chains * p0 >= 4,
          f"n_chains must be an int with n_chains * p0 >= 4 (so that each level keeps several seeds), got {n_chains!r}")
    check(isinstance(mcmc_steps, int) and mcmc_steps >= 1, f"mcmc_steps must be an int >= 1, got {mcmc_steps!r}")
    check(isinstance(max_levels, int) and max_levels >= 1, f"max_levels must be an int >= 1, got {max_levels!r}")
    man = _manifold(problem, "local_entropy")
    k, p = theta.shape
    ids = _ids(replica_ids, k)
    e0 = problem.energy(theta)
    per_replica = n_chains * p * theta.element_size() * 5  # bytes: z, proposal, noise, points, ball map
    group = max(1, int(getattr(problem, "memory_mb", 256.0) * 2**20 // per_replica))
    parts = [_subset_simulation(problem, theta[i:i + group], e0[i:i + group] + epsilon,
                                radius * theta[i:i + group].norm(dim=1), ids[i:i + group], n_chains, p0,
                                mcmc_steps, max_levels, seed, man)
             for i in range(0, k, group)]
    keys = ("local_entropy", "stderr", "upper_bound", "levels", "converged")
    out = {key: torch.cat([q[key] for q in parts]) for key in keys}
    out["radius"] = radius * theta.norm(dim=1)
    out["n_energy"] = 1 + sum(q["n_energy"] for q in parts)
    return {key: (v[0] if single and torch.is_tensor(v) else v) for key, v in out.items()}


def _subset_simulation(problem: Problem, theta: torch.Tensor, target: torch.Tensor, rad: torch.Tensor, ids,
                       n: int, p0: float, steps: int, max_levels: int, seed: int, man) -> dict:
    """Subset simulation of :func:`local_entropy` for one group of replicas (theta ``(K, P)``)."""
    k, p = theta.shape
    dev, dt = problem.device, problem.dtype
    d = p - (man.codim if man is not None else 0)
    gens = generators(seed, ids, stream=61)
    keep = max(2, math.ceil(p0 * n))
    rows = torch.arange(k, device=dev)

    def noise(active: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(active).flatten().tolist()
        xi = randn_per([gens[i] for i in idx], n * p, dev, dt).view(len(idx), n, p)
        return xi if man is None else man.tangent(theta[idx].unsqueeze(1), xi)

    def energy(z: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        th = theta[active].unsqueeze(1)
        u = rad[active].view(-1, 1, 1).to(dt) * _ball_map(z, d)
        pts = th + u if man is None else man.project(th + u)
        e = problem.energy(pts.reshape(-1, p)).view(-1, n).double()
        return torch.nan_to_num(e, nan=math.inf)

    everyone = torch.ones(k, dtype=torch.bool, device=dev)
    z = noise(everyone)
    e = energy(z, everyone)
    n_energy = 1
    target = target.double()
    log_p = torch.zeros(k, dtype=torch.float64, device=dev)
    bound = torch.zeros_like(log_p)
    var = torch.zeros_like(log_p)
    levels = torch.zeros(k, dtype=torch.long, device=dev)
    active = everyone.clone()
    converged = torch.zeros(k, dtype=torch.bool, device=dev)
    cluster = torch.arange(n, device=dev).expand(k, n).clone()
    n_clusters = torch.full((k,), n, device=dev)
    sigma = torch.full((k,), 0.5, dtype=torch.float64, device=dev)
    for level in range(max_levels + 1):
        tau = e.sort(1).values[:, keep - 1]
        done = active & ((tau <= target) | (level == max_levels))
        if bool(done.any()):  # last level: the fraction below E(theta) + epsilon itself
            ind = e <= target.unsqueeze(1)
            reached = done & (tau <= target)
            hits = ind.sum(1).double()
            step = _na_step(hits, n, final=True)
            v = _cluster_var(ind, cluster, n_clusters) / (hits / n)**2
            bound = torch.where(done, torch.where(reached, log_p + step, log_p), bound)
            nan = torch.full_like(var, math.nan)
            log_p = torch.where(done, torch.where(reached, log_p + step, nan), log_p)
            var = torch.where(done, torch.where(reached, var + v, nan), var)
            converged |= reached
            levels = torch.where(done, torch.full_like(levels, level), levels)
            active &= ~done
        if not bool(active.any()):
            break
        # intermediate level: keep the chains strictly below tau (the chain at tau is the level's last exit: its clones
        # would start on the boundary of the new set, where the level's law puts no mass), clone them back to n chains
        below = e < tau.unsqueeze(1)
        strict = below.sum(1) >= 2  # else ties at tau (a flat energy): keep the chains at tau too
        ind = torch.where(strict.unsqueeze(1), below, e <= tau.unsqueeze(1))
        hits = ind.sum(1)
        frac = hits.double() / n
        log_p = torch.where(active, log_p + _na_step(hits.double(), n, final=strict), log_p)
        var = torch.where(active, var + _cluster_var(ind, cluster, n_clusters) / frac**2, var)
        order = e.argsort(dim=1, stable=True)  # the kept chains come first
        # n clones of the hits seeds, n // hits each and one more for n % hits of them, chosen by a random offset (the
        # lowest seeds always taking the extra clones would bias the population towards low energies)
        idx = torch.nonzero(active).flatten().tolist()
        offset = torch.zeros(k, dtype=torch.long, device=dev)
        if idx:
            offset[idx] = torch.cat([torch.randint(0, n, (1,), generator=gens[i]) for i in idx]).to(dev)
        seed_of = (torch.arange(n, device=dev).unsqueeze(0) + offset.unsqueeze(1)) % hits.clamp_min(1).unsqueeze(1)
        pick = order.gather(1, seed_of)
        z = z[rows.unsqueeze(1), pick]
        e = e.gather(1, pick)
        cluster, n_clusters = seed_of, hits
        # constrained pCN moves in the level's set {E < tau} (only for the replicas still active)
        act = active.clone()
        for _ in range(steps):
            s = sigma[act].view(-1, 1, 1).to(dt)
            prop = torch.sqrt(1 - s**2) * z[act] + s * noise(act)
            ep = energy(prop, act)
            n_energy += 1
            lim = tau[act].unsqueeze(1)
            ok = torch.where(strict[act].unsqueeze(1), ep < lim, ep <= lim)
            z[act] = torch.where(ok.unsqueeze(-1), prop, z[act])
            e[act] = torch.where(ok, ep, e[act])
            rate = ok.double().mean(1)
            sigma[act] = (sigma[act] * torch.exp(rate - 0.44)).clamp(1e-4, 0.99)
    return {"local_entropy": log_p.to(dt), "stderr": var.sqrt().to(dt), "upper_bound": bound.to(dt), "levels": levels,
            "converged": converged, "n_energy": n_energy}


# ---------------------------------------------------------------------------- the generalisation study
def flatness_table(problem: Problem, replicas: Replicas, *, rho: float = 0.05, top_k: int = 1, tol: float = 1e-3,
                   trace_probes: int = 12, n_samples: int = 8, entropy_radius: float = 0.3,
                   entropy_epsilon: float = 0.05, entropy_chains: int = 64, seed: int = 0,
                   replica_ids=None) -> pd.DataFrame:
    """Every flatness measure for every replica, beside its test error and generalisation gap.

    Columns added to ``replicas.table``: lambda_max, hessian_trace, hessian_trace_se, sharpness_radius (the
    absolute radius R = rho |theta| of sharpness_average and sharpness_worst, |theta| the whole parameter vector),
    sharpness_average, sharpness_worst, sharpness_keskar (Keskar's box |u_i| <= 0.1 rho (|theta_i| + 1), its own
    definition), local_entropy (log volume fraction, ball of radius entropy_radius |theta|), local_entropy_se
    (its standard error), local_entropy_radius (that absolute radius), weight_norm, proxy_lambda_batch,
    proxy_perturbation, test_error.

    ``replica_ids``: the ids that seed each replica's random numbers in every measure (default its position 0..K-1 in
    ``replicas``): a group of the replicas measured with their positions in the whole set draws what the whole set
    draws (the curvature stage measures groups as tasks)."""
    theta = replicas.theta
    ids = _ids(replica_ids, theta.shape[0])
    eig = top_eigenvalues(problem, theta, k=top_k, tol=tol, seed=seed, replica_ids=ids)
    tr = trace(problem, theta, n_probes=trace_probes, seed=seed, replica_ids=ids)
    df = replicas.table.copy().reset_index(drop=True)
    df["lambda_max"] = eig.values[:, 0].cpu().numpy()
    df["hessian_trace"] = tr["trace"].cpu().numpy()
    df["hessian_trace_se"] = tr["stderr"].cpu().numpy()
    df["sharpness_radius"] = sharpness_radius(theta, rho).cpu().numpy()
    df["sharpness_average"] = sharpness(problem, theta, rho, "average", n_samples=n_samples, seed=seed,
                                        replica_ids=ids).cpu().numpy()
    df["sharpness_worst"] = sharpness(problem, theta, rho, "worst", seed=seed, replica_ids=ids).cpu().numpy()
    df["sharpness_keskar"] = sharpness(problem, theta, rho * 0.1, "keskar", seed=seed, replica_ids=ids).cpu().numpy()
    le = local_entropy(problem, theta, radius=entropy_radius, epsilon=entropy_epsilon, n_chains=entropy_chains,
                       seed=seed, replica_ids=ids)
    df["local_entropy"] = le["local_entropy"].cpu().numpy()
    df["local_entropy_se"] = le["stderr"].cpu().numpy()
    df["local_entropy_radius"] = le["radius"].cpu().numpy()
    df["weight_norm"] = theta.norm(dim=1).cpu().numpy()
    from ..proxies import batch_proxies

    prox = batch_proxies(problem, theta, rho=rho, seed=seed, replica_ids=ids)
    df["proxy_lambda_batch"] = prox["lambda_batch"].cpu().numpy()
    df["proxy_perturbation"] = prox["perturbation_rise"].cpu().numpy()
    df["test_error"] = 1 - df["test_accuracy"]
    return df


MEASURES = ("lambda_max", "hessian_trace", "sharpness_average", "sharpness_worst", "sharpness_keskar",
            "local_entropy", "weight_norm", "proxy_lambda_batch", "proxy_perturbation")


def rank_correlations(df: pd.DataFrame, measures=MEASURES, target: str = "gap_error", *, n_boot: int = 1000,
                      seed: int = 0) -> pd.DataFrame:
    """Kendall's tau-b of each measure with ``target`` across replicas (Jiang et al. 2020), with a 95%
    percentile bootstrap confidence interval (``n_boot`` resamples of the rows, degenerate resamples whose tau is
    undefined skipped) and scipy's two-sided p-value (exact for small samples without ties). Rows where the
    measure or the target is NaN or infinite are dropped first; ``n`` counts the rows used. A measure with fewer
    than 3 usable rows is left out. Local entropy is negated (higher = flatter) so that a positive tau always
    means "sharper -> larger gap"."""
    y = df[target].to_numpy(float)
    check(len(y) >= 3, f"need at least 3 replicas for a rank correlation, got {len(y)}")
    rows = []
    for m in measures:
        if m not in df:
            continue
        x = df[m].to_numpy(float) * (-1 if m == "local_entropy" else 1)
        ok = np.isfinite(x) & np.isfinite(y)
        n = int(ok.sum())
        if n < 3:
            continue
        xo, yo = x[ok], y[ok]
        tau, pval = kendalltau(xo, yo)
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        boots = np.asarray([kendalltau(xo[i], yo[i])[0] for i in idx])
        boots = boots[np.isfinite(boots)]
        lo, hi = (np.percentile(boots, [2.5, 97.5]) if len(boots) else (np.nan, np.nan))
        rows.append({"measure": m, "target": target, "kendall_tau": float(tau), "ci_low": float(lo),
                     "ci_high": float(hi), "p_value": float(pval), "n": n})
    return pd.DataFrame(rows)


def independent_rows(df: pd.DataFrame, *, min_left: int = 3) -> tuple[pd.DataFrame, int]:
    """The replicas whose rank statistics can be treated as independent draws, and how many were left out.

    Kendall's p-values and bootstrap intervals resample replicas as independent; replicated-SGD replicas
    (``method == "replicated"``, Baldassi et al. 2016) are coupled to their centre by design, so they are left out
    when at least ``min_left`` others remain (otherwise every row is kept and the coupling is the reader's to weigh).

    Example::

        >>> import pandas as pd
        >>> df = pd.DataFrame({"method": ["sgd"] * 3 + ["replicated"] * 2, "lambda_max": [1., 2., 3., 4., 5.]})
        >>> rows, left_out = independent_rows(df)
        >>> len(rows), left_out
        (3, 2)
    """
    coupled = df["method"].eq("replicated") if "method" in df else pd.Series(False, index=df.index)
    indep = df[~coupled] if coupled.any() and (~coupled).sum() >= min_left else df
    return indep, int(len(df) - len(indep))
