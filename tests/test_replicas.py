import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster

import lossglass as lg
from lossglass.protocols import replicas as R


def _tree_points(seed=0, dim=60):
    """Three levels of nested Gaussian clusters with shrinking radii: 3 x 3 x 4 = 36 points."""
    rng = np.random.default_rng(seed)
    pts, labels = [], []
    for a in range(3):
        ca = rng.normal(0, 10, dim)
        for b in range(3):
            cb = ca + rng.normal(0, 2, dim)
            for _ in range(4):
                pts.append(cb + rng.normal(0, 0.2, dim))
                labels.append((a, b))
    return np.array(pts), labels


def _dist(x):
    return np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))


def test_hand_built_tree_is_ultrametric_and_recovered():
    x, labels = _tree_points()
    d = _dist(x)
    h = lg.hierarchy(d, method="average")
    assert h.cophenetic > 0.95
    top = fcluster(h.linkage, 3, criterion="maxclust")
    mid = fcluster(h.linkage, 9, criterion="maxclust")
    # every top-level cluster and every sub-cluster recovered exactly
    for level, found in ((0, top), (None, mid)):
        key = [lab[0] if level == 0 else lab for lab in labels]
        groups = {}
        for k_, f in zip(key, found):
            groups.setdefault(k_, set()).add(int(f))
        assert all(len(v) == 1 for v in groups.values())
        assert len({next(iter(v)) for v in groups.values()}) == len(groups)
    u = lg.ultrametricity(d, n_null=10, seed=0)
    s = u.summary
    assert h.ultrametricity.summary["K_mean"] == pytest.approx(s["K_mean"])
    assert s["K_mean"] < 0.1 and s["K_mean"] < s["K_mean_null_gaussian"] - 0.2
    assert s["K_mean_z_gaussian"] < -3 and s["subdominant_distance"] < s["subdominant_distance_null_gaussian"]
    assert not s["trivial"]


def test_uniform_square_is_not_ultrametric():
    x = np.random.default_rng(1).uniform(0, 1, (40, 2))
    u = lg.ultrametricity(_dist(x), n_null=10, seed=0)
    assert u.summary["K_mean"] > 0.25
    assert abs(u.summary["K_mean_z_gaussian"]) < 3  # indistinguishable from the no-hierarchy null
    assert lg.hierarchy(_dist(x)).cophenetic < 0.9


def test_equilateral_case_is_flagged():
    k = 12
    d = np.ones((k, k)) - np.eye(k) + np.random.default_rng(0).uniform(-1e-3, 1e-3, (k, k))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    u = lg.ultrametricity(d, n_null=3)
    assert u.summary["trivial"] and u.summary["cv"] < 0.05


def test_triangles_are_vectorised_and_sampled():
    tri = R._triangles(10, 10**6, 0)
    assert len(tri) == 120 and (tri[:, 0] < tri[:, 1]).all() and (tri[:, 1] < tri[:, 2]).all()
    tri = R._triangles(256, 5000, 0)
    assert tri.shape == (5000, 3) and (tri[:, 1] < tri[:, 2]).all()
    d = _dist(np.random.default_rng(0).normal(size=(256, 5)))
    u = lg.ultrametricity(d, max_triangles=20000, n_null=2)  # K = 256 runs without a loop over triangles
    assert u.summary["triangles"] == 20000


def test_overlaps_unchanged_when_a_replica_is_permuted(tiny):
    reps = lg.train(tiny, 5, epochs=2, batch_size=32, lr=0.1, progress=False)
    q = lg.overlaps(tiny, reps, align=True)
    moved = reps.theta.clone()
    moved[3] = lg.permute(tiny, moved[3], lg.random_permutation(tiny, 5))
    q2 = lg.overlaps(tiny, moved, align=True)
    assert torch.allclose(q, q2, atol=1e-10)
    raw = lg.overlaps(tiny, moved, align=False)
    assert not torch.allclose(raw, q2, atol=1e-6)
    assert torch.allclose(torch.diagonal(q), torch.ones(5, dtype=torch.float64))
    fq = lg.overlaps(tiny, reps, kind="functions")
    fq2 = lg.overlaps(tiny, moved, kind="functions")
    assert torch.equal(fq, fq2) and float(fq.min()) >= 0 and float(fq.max()) <= 1
    aq = lg.overlaps(tiny, moved, kind="activations")
    assert torch.allclose(aq, lg.overlaps(tiny, reps, kind="activations"), atol=1e-10)


def test_overlap_distribution_moments():
    q = np.array([[1, 0.2, 0.4], [0.2, 1, 0.6], [0.4, 0.6, 1]])
    pq = lg.overlap_distribution(q, bins=5)
    assert pq.moments["q_mean"] == pytest.approx(0.4) and pq.moments["pairs"] == 3
    assert np.trapezoid(pq.hist, 0.5 * (pq.edges[1:] + pq.edges[:-1])) > 0
    assert np.sum(pq.hist * np.diff(pq.edges)) == pytest.approx(1.0)


def test_p2_spherical_ground_state_by_gradient_descent():
    n = 60
    ps = lg.models.spherical_pspin(n, 2, seed=3)
    s = lg.descend(ps, ps.init(4, 0), steps=5000, lr=float(n), tol=1e-15)
    lam = torch.linalg.eigvalsh(ps.couplings)[-1]
    assert torch.allclose(ps.energy(s), -lam / 2 * torch.ones(4, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(s.norm(dim=1) ** 2, torch.full((4,), float(n), dtype=torch.float64))


def test_pspin_normalisation_and_p3_descent():
    n = 40
    ps = lg.models.spherical_pspin(n, 3, seed=0)
    s = ps.init(400, 1)
    e = ps.energy(s)
    # E[H H'] = N q^p / 2  ->  sd of H/N at random s is 1/sqrt(2N)
    assert float(e.std()) == pytest.approx(1 / np.sqrt(2 * n), rel=0.15)
    m = lg.descend(ps, s[:8], steps=500, lr=0.2 * n)
    assert float(ps.energy(m).mean()) < -0.9  # far below random (0), near the threshold at this small N


def test_bad_distance_matrices():
    good = _dist(np.random.default_rng(0).normal(size=(5, 2)))
    for bad, msg in ((good[:, :4], "must be square"), (good[:2, :2], "at least 3 points"),
                     (np.where(np.eye(5) > 0, 0, np.nan), "NaN"), (good - 5 * (1 - np.eye(5)), "negative"),
                     (good + np.triu(np.ones((5, 5)), 1), "not symmetric")):
        with pytest.raises(lg.LossglassError, match=msg):
            lg.ultrametricity(bad)
        with pytest.raises(lg.LossglassError, match=msg):
            lg.hierarchy(bad)
    with pytest.raises(lg.LossglassError, match="unknown linkage method"):
        lg.hierarchy(good, method="median")


def test_reference_choice_does_not_change_overlaps_beyond_noise(tiny):
    reps = lg.train(tiny, 8, epochs=3, batch_size=32, lr=0.1, progress=False)
    q_mean = lg.overlaps(tiny, reps).numpy()
    iu = np.triu_indices(8, 1)
    shuffled = reps.theta[torch.tensor([5, 1, 2, 3, 4, 0, 6, 7])]  # a different replica starts the frame
    q_other = lg.overlaps(tiny, shuffled).numpy()
    perm = [5, 1, 2, 3, 4, 0, 6, 7]
    q_other = q_other[np.ix_(np.argsort(perm), np.argsort(perm))]
    assert abs(q_mean[iu].mean() - q_other[iu].mean()) < 0.02
    # aligning to one replica biases its own overlaps upwards; the barycentre does not single anyone out
    q_ref = lg.overlaps(tiny, reps, reference=0).numpy()
    assert q_ref[0, 1:].mean() >= q_ref[iu].mean()
