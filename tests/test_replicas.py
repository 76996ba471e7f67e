import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster
from scipy.spatial.distance import squareform

import lossglass as lg
from lossglass.protocols import replicas as R

pytestmark = pytest.mark.usefixtures("one_thread")


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
    u = R.ultrametricity(d, n_null=100, seed=0)
    s = u.summary
    assert h.ultrametricity.summary["K_mean"] == pytest.approx(s["K_mean"])
    assert s["K_mean"] < 0.1 and s["K_mean"] < s["null_K_mean"] - 0.2
    assert s["z"] < -3 and s["p_value"] < s["alpha"] and s["verdict"] == "hierarchical" and not s["trivial"]
    assert s["subdominant_distance"] < 0.1 and 0 < s["K_mean_se"] < 0.05


def test_uniform_square_is_not_ultrametric():
    x = np.random.default_rng(1).uniform(0, 1, (40, 2))
    u = R.ultrametricity(_dist(x), n_null=100, seed=0)
    assert u.summary["K_mean"] > 0.25
    assert abs(u.summary["z"]) < 3 and u.summary["verdict"] == "no evidence of hierarchy"
    assert 1 <= u.summary["D_eff"] < 4  # a planar cloud is seen as low-dimensional
    assert lg.hierarchy(_dist(x), n_null=100).cophenetic < 0.9


def test_equilateral_case_is_flagged():
    k = 12
    d = np.ones((k, k)) - np.eye(k) + np.random.default_rng(0).uniform(-1e-3, 1e-3, (k, k))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0)
    s = R.ultrametricity(d, n_null=100).summary
    assert s["trivial"] and s["cv"] < 0.05 and s["verdict"] == "trivial"
    assert "trivially ultrametric" in R.describe_ultrametricity(s)
    exact = R.ultrametricity(np.ones((k, k)) - np.eye(k), n_null=100).summary
    assert exact["verdict"] == "trivial" and exact["cv"] == 0 and exact["K_mean"] == 0


def test_triangles_are_vectorised_and_sampled():
    tri = R._triangles(10, 10**6, 0)
    assert len(tri) == 120 and (tri[:, 0] < tri[:, 1]).all() and (tri[:, 1] < tri[:, 2]).all()
    tri = R._triangles(256, 5000, 0)
    assert tri.shape == (5000, 3) and (tri[:, 1] < tri[:, 2]).all()
    d = _dist(np.random.default_rng(0).normal(size=(256, 5)))
    u = R.ultrametricity(d, max_triangles=20000, n_null=20, alpha=0.1)  # K = 256: no loop over triangles
    assert u.summary["triangles"] == 20000 and u.null_K.shape == (20,)
    pairs = R._pair_lookup(256)
    sides = np.stack([pairs[tri[:, 0], tri[:, 1]], pairs[tri[:, 1], tri[:, 2]], pairs[tri[:, 0], tri[:, 2]]], 1)
    s = R.triangle_sides(d, tri)  # the sort-free, standardised K_mean equals the direct one
    direct = ((s[:, 2] - s[:, 1]) / squareform(d, checks=False).std()).mean()
    assert R._k_means(squareform(d, checks=False), sides)[0] == pytest.approx(direct, rel=1e-6)


def test_jackknife_matches_brute_force():
    d = _dist(np.random.default_rng(3).normal(size=(15, 3)))
    tri = R._triangles(15, 10**6, 0)
    loo = [R._k_stats(np.delete(np.delete(d, a, 0), a, 1), R._triangles(14, 10**6, 0))["K_mean"] for a in range(15)]
    brute = np.sqrt(14 / 15 * ((np.array(loo) - np.mean(loo)) ** 2).sum())
    assert R._k_mean_jackknife(d, tri) == pytest.approx(brute, rel=1e-10)


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


# ---------------------------------------------------------------------------- calibration of the ultrametricity null
def _unit_vectors(rng, k, dim):
    x = rng.normal(size=(k, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _unequal_cloud(rng, k, dim, factor):
    """x_a = r_a g_a, g_a ~ N(0, I/D), r_a log-uniform over a factor: structureless, norms unequal."""
    r = np.exp(rng.uniform(0, np.log(factor), k))
    return r[:, None] * rng.normal(size=(k, dim)) / np.sqrt(dim)


def _sphere_tree(rng, dim=200, shape=(3, 3, 4), spreads=(1.0, 0.5, 0.2)):
    """Nested clusters of unit vectors (3 x 3 x 4 = 36 points), normalised onto the sphere."""
    top = rng.normal(size=(shape[0], 1, 1, dim)) * spreads[0]
    mid = top + rng.normal(size=(shape[0], shape[1], 1, dim)) * spreads[1]
    leaf = mid + rng.normal(size=(*shape, dim)) * spreads[2]
    x = leaf.reshape(-1, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# (K, D, seeds, max_triangles): K = 16..128, D = 50..5000; larger K -> fewer draws (each costs more)
_CALIBRATION = [(16, 50, 12, 200000), (16, 5000, 12, 200000), (32, 500, 8, 200000), (64, 5000, 3, 200000),
                (128, 1000, 2, 20000)]


def _calibration_draws(make):
    zs, verdicts = [], []
    for k, dim, n_seeds, tri in _CALIBRATION:
        for seed in range(n_seeds):
            rng = np.random.default_rng([k, dim, seed])
            s = R.ultrametricity(_dist(make(rng, k, dim, seed)), n_null=100, seed=seed, max_triangles=tri).summary
            zs.append(s["z"])
            verdicts.append(s["verdict"])
    return np.array(zs), verdicts


def _assert_calibrated(zs, verdicts):
    # z of a calibrated null is ~ N(0, 1): |z| < 2 in 95.4% of draws, so with ~37 draws allow 3 misses; the mean
    # and spread of z test the calibration more sharply than the tail count. At alpha = 0.01 a calibrated verdict
    # is wrong in 1% of structureless sets (measured with n_null = 200: 26 of 2410 sets of unit vectors, unequal-
    # norm clouds, anisotropic and folded directions, K = 16..128), so "never" cannot be asked of 37 draws
    # (P = 0.69): at most one.
    assert (np.abs(zs) < 2).mean() >= 0.9, zs
    assert abs(zs.mean()) < 0.5 and 0.6 < zs.std() < 1.4, (zs.mean(), zs.std())
    assert verdicts.count("hierarchical") <= 1, verdicts


def test_null_is_calibrated_on_random_unit_vectors():
    """Points on the sphere with no hierarchy (what normalised overlaps of unrelated solutions give)."""
    zs, verdicts = _calibration_draws(lambda rng, k, dim, seed: _unit_vectors(rng, k, dim))
    _assert_calibrated(zs, verdicts)


def test_null_is_calibrated_on_unequal_norm_clouds():
    """Gaussian clouds whose norms vary by a factor 3 or 10: no hierarchy, but many isosceles triangles (the old
    shuffle null called these 'strongly ultrametric', z of -11 to -52)."""
    zs, verdicts = _calibration_draws(lambda rng, k, dim, seed: _unequal_cloud(rng, k, dim, (3.0, 10.0)[seed % 2]))
    _assert_calibrated(zs, verdicts)


def _anisotropic(rng, k, dim, seed):
    """Unit vectors from a Gaussian with a power-law (j^-1, j^-1.5) or spiked (5 directions 20x) spectrum: one
    Gaussian law, no clusters, but strongly anisotropic (an isotropic null calls every j^-1 set hierarchical)."""
    j = np.arange(1, dim + 1)
    lam = (j**-1.0, j**-1.5, np.r_[np.full(5, 20.0), np.ones(dim - 5)])[seed % 3]
    return _normalise(rng.normal(size=(k, dim)) * np.sqrt(lam))


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_null_is_calibrated_on_anisotropic_directions():
    zs, verdicts = [], []
    for seed in range(24):
        rng = np.random.default_rng([7, seed])
        s = R.ultrametricity(_dist(_anisotropic(rng, 24, 300, seed)), n_null=100, seed=seed).summary
        zs.append(s["z"])
        verdicts.append(s["verdict"])
        assert s["null_exponent"] > 0.3 or seed % 3 == 2  # the null picks up the anisotropy
    _assert_calibrated(np.array(zs), verdicts)


def test_folded_overlaps_need_the_folded_null():
    """Distances from |q| (Ising states identified with their flips) of random +-1 states: the folding piles the
    distances up at sqrt(2), so an unfolded null calls them hierarchical; the folded null does not."""
    zs, verdicts, plain = [], [], []
    for seed in range(20):
        s = np.where(np.random.default_rng([9, seed]).random((24, 64)) < 0.5, -1.0, 1.0)
        d = R.distances_from_overlaps(s @ s.T / 64, symmetric=True)
        u = R.ultrametricity(d, symmetric=True, n_null=100, seed=seed).summary
        zs.append(u["z"])
        verdicts.append(u["verdict"])
        if seed < 3:
            plain.append(R.ultrametricity(d, n_null=100, seed=seed).summary["z"])
    _assert_calibrated(np.array(zs), verdicts)
    assert max(plain) < -4
    with pytest.raises(lg.LossglassError, match="symmetric=True expects"):
        R.ultrametricity(2 * d, symmetric=True)


def test_hierarchical_sets_on_the_sphere_are_detected():
    for seed in range(3):
        x = _sphere_tree(np.random.default_rng(seed))
        assert np.allclose(np.linalg.norm(x, axis=1), 1)
        s = R.ultrametricity(_dist(x), seed=seed).summary
        assert s["z"] < -3 and s["verdict"] == "hierarchical" and s["p_value"] < 0.01, s
        assert s["K_mean"] < 0.15 and s["null_K_mean"] > 0.4 and s["D_eff"] < 10
        text = R.describe_ultrametricity(s)
        assert "hierarchically organised" in text and "lies below its null" in text and f"{s['z']:+.1f}" in text


def test_distances_from_overlaps_and_spin_flip_symmetry():
    q = np.array([[1, 0.5, -0.5], [0.5, 1, -0.2], [-0.5, -0.2, 1]])
    d = R.distances_from_overlaps(q)
    assert d[0, 1] == pytest.approx(1.0) and d[0, 2] == pytest.approx(np.sqrt(3)) and np.all(np.diag(d) == 0)
    ds = R.distances_from_overlaps(q, symmetric=True)  # s and -s are one state: |q|
    assert ds[0, 2] == pytest.approx(1.0) and ds[1, 2] == pytest.approx(np.sqrt(1.6))
    with pytest.raises(lg.LossglassError, match="square"):
        R.distances_from_overlaps(q[:2])


def test_describe_no_evidence_and_bad_arguments():
    d = _dist(_unit_vectors(np.random.default_rng(5), 20, 30))
    s = R.ultrametricity(d, n_null=100).summary
    assert s["verdict"] == "no evidence of hierarchy"
    assert set(s) >= {"points", "triangles", "K_mean", "K_mean_se", "K_median", "subdominant_distance", "null_K_mean",
                      "null_K_std", "z", "p_value", "alpha", "n_null", "null", "cv", "trivial", "verdict"}
    assert s["z"] == pytest.approx((s["K_mean"] - s["null_K_mean"]) / s["null_K_std"])
    assert "no evidence of hierarchy" in R.describe_ultrametricity(s)
    with pytest.raises(lg.LossglassError, match="cannot give p < alpha"):
        R.ultrametricity(d, n_null=50, alpha=0.01)
    with pytest.raises(lg.LossglassError, match="alpha must be in"):
        R.ultrametricity(d, alpha=1.5)
    with pytest.raises(lg.LossglassError, match="at least 4 points"):
        R.ultrametricity(d[:3, :3])
    with pytest.raises(lg.LossglassError, match="missing"):
        R.describe_ultrametricity({"K_mean": 0.1})
    again = R.ultrametricity(d, n_null=100).summary  # seeded: identical
    assert again == s
