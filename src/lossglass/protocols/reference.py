"""Known landscapes run through the same replica pipeline as the networks, so the analogy can be checked number for
number: the Sherrington-Kirkpatrick spin glass in equilibrium (the positive control for replica symmetry breaking),
the spherical p-spin's gradient-descent minima (threshold states), and a convex control (one well, one state).

Each function returns plain arrays and numbers; the reference stage (:mod:`lossglass.stages.reference`) passes
the overlaps to :func:`lossglass.protocols.replicas.analyse_overlaps` and writes the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .._util import seed_for
from ..sampling import PTResult, parallel_tempering


@dataclass
class DescentMinima:
    """Gradient-descent endpoints of the spherical p-spin from random starts: their energies per spin, the overlap
    matrix ``q`` of all runs and ``distinct`` (indices of one run per minimum: runs that ended in the same minimum
    are one state, kept once)."""

    energy: torch.Tensor
    q: np.ndarray
    distinct: list[int]

    @property
    def q_distinct(self) -> np.ndarray:
        return self.q[np.ix_(self.distinct, self.distinct)]


def distinct_states(q: np.ndarray, *, spin_flip: bool, same: float = 0.999) -> list[int]:
    """One index per state: run i is dropped when an earlier run j has q_ij > ``same`` (or |q_ij| > ``same`` for a
    spin-flip symmetric energy, where s and -s are one state). A duplicate is a zero distance that would dominate
    sigma(d) in the ultrametricity index.

    Example::

        >>> import numpy as np
        >>> distinct_states(np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1.]]), spin_flip=False)
        [0, 2]
    """
    dup = np.abs(q) > same if spin_flip else q > same
    return [i for i in range(len(q)) if not any(dup[i, j] for j in range(i))]


def pspin_descent_minima(n_spins: int, p: int, *, replicas: int, steps: int, lr: float, seed: int = 0,
                         progress: bool = False) -> DescentMinima:
    """``replicas`` gradient descents of the spherical ``p``-spin (:func:`lossglass.models.spherical_pspin`, energy per
    spin H/N, spins on |s|^2 = N) from random starts. The gradient of H/N is O(1/N) per component, so the step is
    ``lr * N * grad(H/N)``. For p = 3 the endpoints lie near the threshold energy E_th/N = -sqrt(2 (p-1)/p) and are
    threshold states, nearly orthogonal (q ~ 1/sqrt(N)): no sample of the Gibbs measure (Castellani & Cavagna 2005)."""
    from ..models import spherical_pspin
    from ..train import descend

    ps = spherical_pspin(n_spins, p, seed=seed)
    s = descend(ps, ps.init(replicas, seed), steps=steps, lr=lr * n_spins, progress=progress)
    q = ((s @ s.T) / n_spins).double().numpy()
    return DescentMinima(ps.energy(s), q, distinct_states(q, spin_flip=p % 2 == 0))


def convex_control(n: int, *, replicas: int, seed: int = 0, temperature: float = 0.05) -> tuple[np.ndarray, float]:
    """Thermal samples of one quadratic well E = 1/2 x^T H x (eigenvalues 0.5..2, a random basis), centred at the
    all-ones point: one state, replica symmetric. Langevin at ``temperature`` (400 steps of 0.05) from the centre;
    returns the samples' cosine overlaps and their mean energy."""
    from ..models import quadratic
    from . import walk as W

    g = torch.Generator().manual_seed(seed)
    evals = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    qmat, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    quad = quadratic(qmat @ torch.diag(evals) @ qmat.T)
    samp = W.langevin(quad, torch.zeros(n, dtype=torch.float64), temperature=temperature, lr=0.05, steps=400,
                      n_walkers=replicas, seed=seed, progress=False)
    x = (samp.theta.double() + torch.ones(n, dtype=torch.float64)).numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(u @ u.T, -1, 1), float(quad.energy(samp.theta).mean())


def sk_sample(n_spins: int, temperatures, *, replicas: int, sweeps: int, seed: int, sample: int,
              progress: bool = False) -> PTResult:
    """Disorder sample ``sample`` of the SK model (:func:`lossglass.models.sk`, couplings from seed_for(seed, 97,
    sample)) in equilibrium by parallel tempering: the first half of the sweeps burn in, 8 samples of the second."""
    from ..models import sk

    prob = sk(n_spins, seed=seed_for(seed, 97, sample))
    burn = sweeps // 2
    return parallel_tempering(prob, temperatures, n_replicas=replicas, sweeps=sweeps, burn_in=burn,
                              sample_every=max(1, (sweeps - burn) // 8), seed=seed_for(seed, 98, sample),
                              progress=progress)


def sk_pooled(rows: list[dict], q_low: np.ndarray, *, replicas: int, temperature: float, alpha: float) -> dict:
    """The 'SK all samples' summary row: P(q) pooled over the disorder samples at ``temperature`` (the disorder
    average the Parisi solution describes), mean K and null K, and the per-sample verdicts combined by
    :func:`lossglass.protocols.replicas.combine_samples` (Fisher's method for the p-values, Stouffer's for z, the
    levels counted level by level) at ``alpha``."""
    from .replicas import combine_samples

    comb = combine_samples(rows, alpha, name="disorder samples")
    return {"system": f"SK all samples (T = {temperature:g})", "label": "sk-all", "replicas": replicas,
            "q_mean": float(q_low.mean()), "q_var": float(q_low.var()),
            "abs_q_mean": float(np.abs(q_low).mean()),
            "frac_abs_q_below_0_3": float(np.mean(np.abs(q_low) < 0.3)),
            "K_mean": float(np.mean([r["K_mean"] for r in rows])),
            "null_K_mean": float(np.mean([r["null_K_mean"] for r in rows])),
            "alpha": alpha, "temperature": temperature,
            "energy_mean": float(np.mean([r["energy_mean"] for r in rows])), **comb}
