"""Protocol 2: paths between solutions, barriers, permutation-interpolation, curved paths and planes.

Every path and plane is evaluated as a batch of replicas; for MLPs the first layer uses the exact affine
shortcut of :meth:`Problem.evaluate_affine` (J+1 matrix products per data chunk for all points).

On a constrained problem (``problem.manifold``, e.g. the sphere |s|^2 = N of the spherical p-spin) paths and
planes stay on the manifold: the straight path becomes the geodesic (a great circle, slerp), and Bezier curves and
planes are projected point by point onto the sphere (radial projection). Every such point is still a linear
combination of a few vectors, so the same batched evaluation applies. Barriers keep the baseline
(1-t) E(A) + t E(B). A problem with a custom projector but no declared manifold is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .._util import as_batch, check_finite, generators, seed_for
from ..errors import check, choice
from ..problem import Problem
from ..symmetry import align, permute, swap_permutation


@dataclass
class PathResult:
    """Loss and accuracy along a path t in [0, 1] between A (t=0) and B (t=1).

    ``barrier`` = max_t [E(phi(t)) - ((1-t) E(A) + t E(B))] on the training loss (Entezari et al. 2022);
    ``barrier_test`` the same on the test loss.
    """

    alphas: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    kind: str = "linear"
    midpoint: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def barrier(self) -> float:
        return barrier_of(self.alphas, self.train_loss)

    @property
    def barrier_test(self) -> float:
        return barrier_of(self.alphas, self.test_loss)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"alpha": self.alphas, "train_loss": self.train_loss,
                             "train_accuracy": self.train_accuracy, "test_loss": self.test_loss,
                             "test_accuracy": self.test_accuracy, "kind": self.kind})


def barrier_of(alphas: np.ndarray, losses: np.ndarray) -> float:
    """max_a [L(a) - ((1-a) L(0) + a L(1))] for losses sampled at ``alphas`` (which include 0 and 1)."""
    a, l_ = np.asarray(alphas, float), np.asarray(losses, float)
    base = (1 - a) * l_[..., :1] + a * l_[..., -1:]
    return float(np.max(l_ - base)) if l_.ndim == 1 else np.max(l_ - base, axis=-1)


def _pair(problem: Problem, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, _ = as_batch(torch.as_tensor(a), problem.n_params, "a")
    b, _ = as_batch(torch.as_tensor(b), problem.n_params, "b")
    check(a.shape == b.shape, f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_finite(a, "a")
    check_finite(b, "b")
    return a.to(problem.device, problem.dtype), b.to(problem.device, problem.dtype)


def _on_manifold(problem: Problem, what: str, *points: torch.Tensor):
    """The problem's manifold (None when unconstrained), after checking that ``points`` lie on it."""
    man = problem.constraint(what)
    if man is not None:
        for pt in points:
            check(bool(man.contains(pt.reshape(-1, problem.n_params), 1e-4).all()),
                  f"{what}: the end points must lie on the problem's manifold {man}; project them first "
                  "(problem.project)")
    return man


def _radial(man, basis: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Coefficients of the radial projection onto the sphere of the points x = sum_j c_j b_j: with
    f = radius / |x|, f x = b_0 + (f - 1) b_0 + sum_{j>0} f c_j b_j. ``basis`` ``(M, J, P)`` (b_0 the centre,
    with coefficient 1 in ``coeffs`` ``(M, G, J)``); returns ``(M, G, J)`` for directions (b_0, b_1, ...)."""
    gram = torch.einsum("mjp,mip->mji", basis.double(), basis.double())
    c = coeffs.to(basis.device, torch.float64)
    norm2 = torch.einsum("mgj,mji,mgi->mg", c, gram, c)
    check(bool((norm2 > 1e-12 * man.radius**2).all()), "a point of the path or plane is at the origin, where the "
          "projection onto the sphere is undefined")
    f = (man.radius / norm2.sqrt()).unsqueeze(-1)
    out = f * c
    out[..., 0] -= 1
    return out


def _eval_both(problem: Problem, center, dirs, coeffs):
    tr = problem.evaluate_affine(center, dirs, coeffs, "train")
    te = problem.evaluate_affine(center, dirs, coeffs, "test") if problem.has_data else tr
    return tr, te


def interpolate(problem: Problem, a: torch.Tensor, b: torch.Tensor, *, n_points: int = 25) -> PathResult | list:
    """The straight path (1-t) A + t B at ``n_points`` equally spaced t in [0, 1], all points one batch.
    ``a``/``b`` of shape ``(M, P)`` give M paths in one batched evaluation (a list of results).
    On a sphere (``problem.manifold``) the path is the geodesic instead, the great circle
    phi(t) = sin((1-t) w)/sin w A + sin(t w)/sin w B (cos w = A.B/(|A||B|), :meth:`Sphere.geodesic`), at constant
    angular speed; A and B must lie on the sphere."""
    check(isinstance(n_points, int) and n_points >= 2, f"n_points must be an int >= 2, got {n_points!r}")
    single = torch.as_tensor(a).ndim == 1
    a, b = _pair(problem, a, b)
    man = _on_manifold(problem, "interpolate", a, b)
    m = a.shape[0]
    alphas = torch.linspace(0, 1, n_points, dtype=torch.float64)
    if man is None:
        coeffs = alphas.to(problem.dtype).reshape(1, -1, 1).expand(m, -1, -1)
        tr, te = _eval_both(problem, a, (b - a).unsqueeze(1), coeffs)
    else:  # phi = a + (c_a - 1) a + c_b b: phi(0) = a exactly
        c = man.geodesic(a, b, alphas)
        c[..., 0] -= 1
        tr, te = _eval_both(problem, a, torch.stack([a, b], 1), c.to(problem.dtype))
    res = [PathResult(alphas.numpy(), tr["loss"][i].cpu().double().numpy(), tr["accuracy"][i].cpu().double().numpy(),
                      te["loss"][i].cpu().double().numpy(), te["accuracy"][i].cpu().double().numpy())
           for i in range(m)]
    return res[0] if single else res


def bezier_path(problem: Problem, a: torch.Tensor, b: torch.Tensor, *, steps: int = 200, lr: float = 0.05,
                batch_size: int = 256, n_t: int = 4, n_points: int = 25, momentum: float = 0.9, seed: int = 0,
                progress: bool = True) -> PathResult:
    """Quadratic Bezier curve phi(t) = (1-t)^2 A + 2t(1-t) M + t^2 B (Garipov et al. 2018) whose middle point
    M (started at (A+B)/2) is trained by SGD on E(phi(t)), ``n_t`` values t ~ U(0, 1) per step evaluated as
    replicas on one mini-batch. The curve is then evaluated at ``n_points`` t (phi is affine in (t, t^2):
    phi = A + t 2(M-A) + t^2 (A - 2M + B), so the first-layer shortcut applies).
    On a sphere (``problem.manifold``) the curve is projected radially, phi_S(t) = radius phi(t) / |phi(t)|, both
    in training and in evaluation, and M (started at the projected midpoint) is kept on the sphere."""
    check(isinstance(steps, int) and steps >= 0, f"steps must be an int >= 0, got {steps!r}")
    check(lr > 0, f"lr must be > 0, got {lr}")
    a, b = _pair(problem, a, b)
    man = _on_manifold(problem, "bezier_path", a, b)
    a, b = a[0], b[0]
    mid = problem.project(((a + b) / 2).clone())
    buf = torch.zeros_like(mid)
    g = torch.Generator().manual_seed(seed_for(seed, 41))
    is_fn = not problem.has_data
    if not is_fn:
        x_all, y_all = problem.data["train"]
    for _ in tqdm(range(steps), desc="bezier", disable=not progress or None, leave=False):
        t = torch.rand(n_t, 1, generator=g, dtype=torch.float64).to(problem.device, problem.dtype)
        m_ = mid.detach().requires_grad_(True)
        phi = (1 - t) ** 2 * a + 2 * t * (1 - t) * m_ + t**2 * b
        phi = phi if man is None else man.project(phi)
        if is_fn:
            loss = problem.batch_loss(phi).mean()
        else:
            idx = torch.randint(len(y_all), (min(batch_size, len(y_all)),), generator=g).to(problem.device)
            loss = problem.batch_loss(phi, x_all[idx], y_all[idx]).mean()
        grad, = torch.autograd.grad(loss, m_)
        buf = momentum * buf + grad
        mid = problem.project(mid - lr * buf)
    ts = torch.linspace(0, 1, n_points, dtype=torch.float64)
    coeffs = torch.stack([ts, ts**2], 1).to(problem.dtype)
    dirs = torch.stack([2 * (mid - a), a - 2 * mid + b])
    if man is not None:
        ones = torch.ones(n_points, 1, dtype=torch.float64)
        coeffs = _radial(man, torch.cat([a[None], dirs]).unsqueeze(0),
                         torch.cat([ones, coeffs.double()], 1).unsqueeze(0))[0].to(problem.dtype)
        dirs = torch.cat([a[None], dirs])
    tr, te = _eval_both(problem, a, dirs, coeffs)
    return PathResult(ts.numpy(), tr["loss"].cpu().double().numpy(), tr["accuracy"].cpu().double().numpy(),
                      te["loss"].cpu().double().numpy(), te["accuracy"].cpu().double().numpy(), kind="bezier",
                      midpoint=mid.detach().cpu())


def permutation_barriers(problem: Problem, theta: torch.Tensor, swaps=(0, 2, 4, 8, 16, 32), *, n_points: int = 25,
                         seed: int = 0, layer: str | None = None) -> pd.DataFrame:
    """The paper's permutation-interpolation: for each k in ``swaps``, the barrier on the straight path from
    ``theta`` to its copy with k hidden units permuted (same function, different point). All paths are one
    batched evaluation. Columns: k, barrier, barrier_test, distance, max_loss."""
    theta = torch.as_tensor(theta).to(problem.device, problem.dtype)
    check(theta.ndim == 1, "theta must be one solution (P,)")
    n = next(iter(_sizes(problem, layer).values()))
    ks = [k for k in swaps if k <= n]
    check(len(ks) > 0, f"no swap count in {list(swaps)} fits the layer width {n}")
    copies = torch.stack([permute(problem, theta, swap_permutation(problem, k, seed, layer)) for k in ks])
    paths = interpolate(problem, theta.expand(len(ks), -1), copies, n_points=n_points)
    return pd.DataFrame({"k": ks, "barrier": [p.barrier for p in paths], "barrier_test": [p.barrier_test for p in paths],
                         "distance": (copies - theta).norm(dim=1).cpu().numpy(),
                         "max_loss": [float(p.train_loss.max()) for p in paths]})


def _sizes(problem, layer):
    from ..symmetry import spec_of

    sizes = spec_of(problem).sizes(problem)
    if layer is not None:
        choice("layer", layer, tuple(sizes))
        return {layer: sizes[layer]}
    return dict([next(iter(sizes.items()))])


def pair_barriers(problem: Problem, theta: torch.Tensor, *, pairs: int = 4, n_points: int = 25,
                  method: str = "weight", seed: int = 0) -> tuple[pd.DataFrame, list[PathResult], list[PathResult]]:
    """Barriers between independent replicas before and after aligning the second to the first.
    Pairs are (0,1), (2,3), ... up to ``pairs``. Returns (table, naive paths, aligned paths)."""
    theta = torch.as_tensor(theta)
    k = theta.shape[0]
    check(k >= 2, f"need at least 2 replicas for pair barriers, got {k}")
    m = min(pairs, k // 2)
    a, b = theta[0:2 * m:2], theta[1:2 * m:2]
    aligned = torch.stack([align(problem, a[i], b[i], method=method)[0] for i in range(m)])
    naive = interpolate(problem, a, b, n_points=n_points)
    al = interpolate(problem, a, aligned, n_points=n_points)
    df = pd.DataFrame({"a": np.arange(0, 2 * m, 2), "b": np.arange(1, 2 * m, 2),
                       "barrier_naive": [p.barrier for p in naive], "barrier_aligned": [p.barrier for p in al],
                       "barrier_test_naive": [p.barrier_test for p in naive],
                       "barrier_test_aligned": [p.barrier_test for p in al],
                       "distance_naive": (b - a).norm(dim=1).cpu().numpy(),
                       "distance_aligned": (aligned - a).norm(dim=1).cpu().numpy()})
    return df, naive, al


@dataclass
class PlaneResult:
    """Loss on a ``(steps, steps)`` grid theta(x, y) = center + x d1 + y d2; ``points`` marks named solutions
    in plane coordinates. ``projected``: the grid points were projected onto the problem's manifold,
    theta(x, y) = project(center + x d1 + y d2)."""

    xs: np.ndarray
    ys: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    directions: torch.Tensor
    points: dict = field(default_factory=dict)
    projected: bool = False

    def table(self) -> pd.DataFrame:
        xx, yy = np.meshgrid(self.xs, self.ys, indexing="ij")
        return pd.DataFrame({"x": xx.ravel(), "y": yy.ravel(), "train_loss": self.train_loss.ravel(),
                             "train_accuracy": self.train_accuracy.ravel(), "test_loss": self.test_loss.ravel(),
                             "test_accuracy": self.test_accuracy.ravel()})


def filter_normalize(problem: Problem, direction: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Filter normalisation (Li et al. 2018): each row (filter / output unit) of every weight matrix of the
    direction is rescaled to the norm of the same row of theta; 1-D parameters (biases) are set to zero."""
    d = direction.clone()
    for info in problem.params:
        if len(info.shape) < 2:
            d[..., info.slice] = 0
            continue
        rows = info.shape[0]
        dd = d[..., info.slice].reshape(*d.shape[:-1], rows, -1)
        tt = theta[..., info.slice].reshape(*theta.shape[:-1], rows, -1)
        dd = dd * (tt.norm(dim=-1, keepdim=True) / dd.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        d[..., info.slice] = dd.reshape(*d.shape[:-1], -1)
    return d


def plane(problem: Problem, center: torch.Tensor, *, directions="random", span: float = 1.0, steps: int = 21,
          normalize: str | None = "filter", seed: int = 0) -> PlaneResult:
    """Loss surface on the plane center + x d1 + y d2, x, y in [-span, span], ``steps`` x ``steps`` points
    evaluated as one batch of replicas. ``directions="random"``: two Gaussian directions, filter-normalised
    (Li et al. 2018) unless ``normalize=None`` or the model has no weight matrices (then plain Gaussian
    directions); or a pair ``(d1, d2)`` used as given.
    On a sphere (``problem.manifold``) the directions are first projected onto the tangent space at the centre and
    every grid point is projected radially onto the sphere: the grid is the gnomonic chart around the centre
    (great circles through the centre are straight lines in it)."""
    center = torch.as_tensor(center).to(problem.device, problem.dtype)
    check(center.ndim == 1 and center.shape[0] == problem.n_params,
          f"center must have shape ({problem.n_params},), got {tuple(center.shape)}")
    check_finite(center, "center")
    man = _on_manifold(problem, "plane", center)
    check(isinstance(steps, int) and steps >= 2, f"steps must be an int >= 2, got {steps!r}")
    check(span > 0, f"span must be > 0, got {span}")
    if isinstance(directions, str):
        choice("directions", directions, ("random",))
        gens = generators(seed, [0, 1], stream=43)
        d = torch.stack([torch.randn(problem.n_params, generator=g, dtype=problem.dtype) for g in gens])
        d = d.to(problem.device)
        if normalize not in (None, "none"):
            choice("normalize", normalize, ("filter",))
            if any(len(i.shape) >= 2 for i in problem.params):
                d = filter_normalize(problem, d, center.expand(2, -1))
    else:
        check(len(directions) == 2, "directions must be 'random' or a pair (d1, d2)")
        d = torch.stack([torch.as_tensor(x) for x in directions]).to(problem.device, problem.dtype)
        check(d.shape == (2, problem.n_params), f"directions must each have shape ({problem.n_params},)")
    if man is not None:
        d = man.tangent(center, d)
        check(bool((d.norm(dim=1) > 0).all()), "a plane direction is normal to the sphere at the centre: no tangent part")
    xs = torch.linspace(-span, span, steps, dtype=torch.float64)
    return _grid(problem, center, d, xs, xs, {}, man)


def _grid(problem, center, d, xs, ys, points, man=None) -> PlaneResult:
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    coeffs = torch.stack([xx.ravel(), yy.ravel()], 1).to(problem.dtype)
    dirs = d
    if man is not None:  # project(center + x d1 + y d2) = center + (f-1) center + f x d1 + f y d2
        ones = torch.ones(len(coeffs), 1, dtype=torch.float64)
        coeffs = _radial(man, torch.cat([center[None], d]).unsqueeze(0),
                         torch.cat([ones, coeffs.double()], 1).unsqueeze(0))[0].to(problem.dtype)
        dirs = torch.cat([center[None], d])
    tr, te = _eval_both(problem, center, dirs, coeffs)
    shape = (len(xs), len(ys))
    f = lambda t: t.cpu().double().numpy().reshape(shape)  # noqa: E731
    return PlaneResult(xs.numpy(), ys.numpy(), f(tr["loss"]), f(tr["accuracy"]), f(te["loss"]), f(te["accuracy"]),
                       d.cpu(), points, projected=man is not None)


def plane_through(problem: Problem, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, steps: int = 21,
                  margin: float = 0.3) -> PlaneResult:
    """The plane through three solutions (e.g. A, B, aligned B): orthonormal basis u = (B-A)/|B-A|,
    v = the part of C-A orthogonal to u, normalised; coordinates in units of |B-A|. Points are marked.
    On a sphere (``problem.manifold``; A, B, C on it) every grid point is projected radially onto the sphere;
    A, B and C are their own projections, so they keep their coordinates."""
    a, b, c = (torch.as_tensor(t).to(problem.device, problem.dtype).reshape(-1) for t in (a, b, c))
    man = _on_manifold(problem, "plane_through", a, b, c)
    ab, ac = b - a, c - a
    scale = ab.norm()
    check(scale > 0, "a and b are the same point")
    u = ab / scale
    w = ac - (ac @ u) * u
    check(w.norm() > 1e-9 * scale, "the three points are collinear: no plane through them")
    v = w / w.norm()
    pts = {"A": (0.0, 0.0), "B": (1.0, 0.0), "C": (float(ac @ u / scale), float(ac @ v / scale))}
    px = [p[0] for p in pts.values()]
    py = [p[1] for p in pts.values()]
    xs = torch.linspace(min(px) - margin, max(px) + margin, steps, dtype=torch.float64)
    ys = torch.linspace(min(py) - margin, max(py) + margin, steps, dtype=torch.float64)
    return _grid(problem, a, torch.stack([u, v]) * scale, xs, ys, pts, man)


def width_barrier_fit(widths, barriers) -> dict:
    """Fit barrier ~ c * m^(-beta) on log-log axes (Zhan, Li & Wu 2025 predict beta = 1/2 for two-layer
    ReLU networks after alignment). Returns {"beta": ..., "c": ...} (NaN with fewer than 2 positive points)."""
    w, bar = np.asarray(widths, float), np.asarray(barriers, float)
    ok = (bar > 0) & np.isfinite(bar)
    if ok.sum() < 2:
        return {"beta": float("nan"), "c": float("nan")}
    slope, icpt = np.polyfit(np.log(w[ok]), np.log(bar[ok]), 1)
    return {"beta": float(-slope), "c": float(math.exp(icpt))}
