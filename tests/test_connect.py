import numpy as np
import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.protocols.connect import barrier_of, filter_normalize, width_barrier_fit

from .conftest import needs_fmnist
from .symmetry_catalogue import Custom

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fixture", ["tiny", "deep"])
def test_permuted_network_computes_the_same_function(request, fixture):
    prob = request.getfixturevalue(fixture)
    theta = prob.init(2, 0)
    perm = lg.random_permutation(prob, seed=3)
    moved = lg.permute(prob, theta, perm)
    assert not torch.allclose(moved, theta)
    x = prob.data["test"][0]
    assert torch.allclose(prob.forward(moved, x), prob.forward(theta, x), atol=1e-12)
    # per-replica permutations
    batch = {k: torch.stack([v, v.flip(0)]) for k, v in perm.items()}
    assert torch.allclose(prob.forward(lg.permute(prob, theta, batch), x), prob.forward(theta, x), atol=1e-12)


@pytest.mark.parametrize("fixture,method", [("tiny", "weight"), ("deep", "weight"), ("tiny", "activation"),
                                            ("deep", "activation")])
def test_align_recovers_an_applied_permutation_exactly(request, fixture, method):
    prob = request.getfixturevalue(fixture)
    theta = lg.train(prob, 1, epochs=2, batch_size=32, lr=0.1, progress=False).theta[0]
    moved = lg.permute(prob, theta, lg.random_permutation(prob, seed=11))
    aligned, perm = lg.align(prob, theta, moved, method=method)
    assert float((aligned - theta).norm()) == 0.0


def test_swap_permutation_moves_exactly_k_units(tiny):
    for k in (0, 2, 3, 5):
        p = lg.swap_permutation(tiny, k, seed=1)["P0"]
        assert int((p != torch.arange(5)).sum()) == k
    with pytest.raises(lg.LossglassError, match="k must be 0 or between 2 and 5"):
        lg.swap_permutation(tiny, 1)


def test_barrier_zero_between_minimisers_of_a_convex_problem():
    # E = (theta_0)^2 / 2 + (theta_1 - 1)^2 / 2 is convex with a valley of minimisers along theta_2
    prob = lg.Problem.from_function(lambda t: 0.5 * t[:, 0] ** 2 + 0.5 * (t[:, 1] - 1) ** 2, 3, dtype=torch.float64)
    a = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64)
    assert lg.interpolate(prob, a, b, n_points=11).barrier == 0.0
    # convex, different minimum values at the ends: the line lies under the chord, barrier <= 0 -> max is 0 at ends
    assert lg.interpolate(prob, a, b + 1.0, n_points=11).barrier <= 1e-12


def test_barrier_on_a_hand_made_path_equals_the_formula():
    # double well: E = (x^2 - 1)^2 from -1 to +1: E(t) = ((2t-1)^2 - 1)^2, chord 0, barrier at t=1/2 equals 1
    prob = lg.models.double_well(1)
    res = lg.interpolate(prob, torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                         n_points=21)
    t = res.alphas
    assert np.allclose(res.train_loss, ((2 * t - 1) ** 2 - 1) ** 2)
    assert res.barrier == pytest.approx(1.0)
    assert barrier_of(np.array([0, 0.5, 1]), np.array([1.0, 4.0, 3.0])) == pytest.approx(2.0)


def test_bezier_finds_a_low_curved_path_where_the_line_is_blocked():
    # a bump just above the segment from A=(-1,0) to B=(1,0); a detour below it avoids it
    def fn(t):
        return 3 * torch.exp(-(t[:, 0] ** 2 + (t[:, 1] - 0.1) ** 2) / 0.1)

    prob = lg.Problem.from_function(fn, 2, dtype=torch.float64)
    a = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)
    prob_line = lg.interpolate(prob, a, b)
    curve = lg.bezier_path(prob, a, b, steps=300, lr=0.05, seed=0, progress=False)
    assert prob_line.barrier > 2.5
    assert curve.barrier < 0.1 * prob_line.barrier
    assert curve.train_loss[0] == pytest.approx(prob.energy(a).item())


def test_planes(tiny):
    theta = lg.train(tiny, 3, epochs=2, batch_size=32, lr=0.1, progress=False).theta
    pl = lg.plane(tiny, theta[0], steps=5, span=0.5)
    assert pl.train_loss.shape == (5, 5)
    assert pl.train_loss[2, 2] == pytest.approx(float(tiny.energy(theta[0])))
    d = pl.directions
    assert torch.allclose(tiny.energy(theta[0] + 0.5 * d[0] - 0.25 * d[1]).double(),
                          torch.tensor(pl.train_loss[4, 1], dtype=torch.float64))
    fn = filter_normalize(tiny, torch.randn(tiny.n_params, dtype=torch.float64), theta[0])
    w = tiny.layout["0.weight"]
    assert torch.allclose(fn[w.slice].reshape(w.shape).norm(dim=1), theta[0, w.slice].reshape(w.shape).norm(dim=1))
    assert float(fn[tiny.layout["0.bias"].slice].abs().sum()) == 0.0
    thr = lg.plane_through(tiny, theta[0], theta[1], theta[2], steps=6)
    (bx, by), (cx, cy) = thr.points["B"], thr.points["C"]
    assert (bx, by) == (1.0, 0.0)
    rec = theta[0] + cx * thr.directions[0] + cy * thr.directions[1]
    assert torch.allclose(rec, theta[2], atol=1e-10)


def _sphere_problem(n: int = 12):
    """E(s) = (|s|^2 / N - 1)^2 on the sphere |s|^2 = N: exactly 0 on it, positive anywhere off it."""
    return lg.Problem.from_function(lambda t: (t.pow(2).sum(1) / n - 1) ** 2, n, dtype=torch.float64,
                                    manifold=lg.problem.Sphere(n**0.5))


def test_paths_and_planes_stay_on_the_sphere():
    n = 12
    prob = _sphere_problem(n)
    a, b, c = prob.init(3, 0)
    assert float(prob.energy(torch.stack([a, b, c])).abs().max()) < 1e-24
    chord = (a + b) / 2
    assert float(prob.energy(chord)) > 1e-3  # the straight chord leaves the sphere
    assert np.abs(lg.interpolate(prob, a, b, n_points=21).train_loss).max() < 1e-24
    many = lg.interpolate(prob, torch.stack([a, b]), torch.stack([b, c]), n_points=9)
    assert max(np.abs(r.train_loss).max() for r in many) < 1e-24
    assert np.abs(lg.bezier_path(prob, a, b, steps=5, progress=False).train_loss).max() < 1e-24
    pl = lg.plane(prob, a, steps=7, span=2.0)
    assert pl.projected and np.abs(pl.train_loss).max() < 1e-24
    assert float(pl.directions @ a @ torch.ones(2, dtype=torch.float64)) == pytest.approx(0.0, abs=1e-9)  # tangent
    thr = lg.plane_through(prob, a, b, c, steps=6)
    assert np.abs(thr.train_loss).max() < 1e-24 and thr.points["B"] == (1.0, 0.0)
    with pytest.raises(lg.LossglassError, match="must lie on the problem's manifold"):
        lg.interpolate(prob, a, 2 * b)
    with pytest.raises(lg.LossglassError, match="antipodal"):
        lg.interpolate(prob, a, -a)


def test_geodesic_is_the_great_circle_at_constant_speed():
    # E(s) = s_0 on the sphere of radius 2: from A = 2 e0 to B = 2 e1 the geodesic is 2 (cos(t pi/2) e0 + sin(t pi/2) e1)
    prob = lg.Problem.from_function(lambda t: t[:, 0].clone(), 3, dtype=torch.float64, manifold=lg.problem.Sphere(2.0))
    a = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)
    res = lg.interpolate(prob, a, b, n_points=11)
    t = res.alphas
    assert np.allclose(res.train_loss, 2 * np.cos(t * np.pi / 2), atol=1e-14)
    # barrier baseline stays the chord of the end energies: max_t 2 cos(t pi/2) - 2 (1 - t)
    assert res.barrier == pytest.approx(float(np.max(2 * np.cos(t * np.pi / 2) - 2 * (1 - t))))
    w = lg.problem.Sphere(2.0).geodesic(a[None], a[None], torch.tensor([0.0, 0.5, 1.0]))  # coincident: the limit
    assert torch.allclose(w[0], torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))


def test_pspin_geodesic_is_the_projected_chord():
    n = 32
    prob = lg.models.spherical_pspin(n, 3, seed=0)
    th = lg.descend(prob, prob.init(2, 0), steps=200, lr=0.2)  # near two different minima
    assert float((th.pow(2).sum(1) / n - 1).abs().max()) < 1e-12
    geo = lg.interpolate(prob, th[0], th[1], n_points=41)
    chord = 0.5 * (th[0] + th[1])
    # the same path through the radially projected chord points: a reparametrised great circle
    a_ = torch.linspace(0, 1, 401, dtype=torch.float64).unsqueeze(1)
    e = prob.energy(prob.project((1 - a_) * th[0] + a_ * th[1])).max()
    assert float(geo.train_loss.max()) == pytest.approx(float(e), abs=2e-3)
    assert float(prob.fn(chord[None])[0]) != pytest.approx(float(prob.energy(prob.project(chord))), abs=1e-3)


def test_permutation_and_pair_barriers_tables(tiny):
    reps = lg.train(tiny, 4, epochs=3, batch_size=32, lr=0.1, progress=False)
    pb = lg.permutation_barriers(tiny, reps.theta[0], swaps=[0, 2, 5])
    assert pb["barrier"].iloc[0] == 0.0 and list(pb["k"]) == [0, 2, 5]
    df, naive, aligned = lg.pair_barriers(tiny, reps.theta, pairs=2)
    assert len(df) == 2 and (df["distance_aligned"] <= df["distance_naive"] + 1e-9).all()
    assert width_barrier_fit([16, 64, 256], [0.4, 0.2, 0.1])["beta"] == pytest.approx(0.5)
    from lossglass.stages.connect import width_fit_table

    # the connect stage's table: means per width first (two pairs per width), then the fit; a zero barrier is left out
    wb = pd.DataFrame({"width": [16, 16, 64, 64, 256, 256, 1024], "barrier_aligned": [0.3, 0.5, 0.1, 0.3, 0.1, 0.1, 0.0]})
    t = width_fit_table(wb)
    assert t["beta"].iloc[0] == pytest.approx(0.5) and t["c"].iloc[0] == pytest.approx(1.6)
    assert (t["n_widths"].iloc[0], t["width_min"].iloc[0], t["width_max"].iloc[0]) == (3, 16, 1024)
    assert width_fit_table(pd.DataFrame({"width": [8]})) is None


def test_bad_symmetry_inputs(tiny, deep, teacher_ds):
    theta = tiny.init(1, 0)[0]
    with pytest.raises(lg.LossglassError, match="must have length 5"):
        lg.permute(tiny, theta, {"P0": torch.arange(4)})
    with pytest.raises(lg.LossglassError, match="not a bijection"):
        lg.permute(tiny, theta, {"P0": torch.tensor([0, 0, 1, 2, 3])})
    with pytest.raises(lg.LossglassError, match="unknown permutation"):
        lg.permute(tiny, theta, {"P7": torch.arange(5)})
    with pytest.raises(lg.LossglassError, match=r"reference must have shape \(63,\)"):
        lg.align(tiny, deep.init(1, 0)[0], theta)
    with pytest.raises(lg.LossglassError, match="a and b must have the same shape"):
        lg.interpolate(tiny, theta, torch.stack([theta, theta]))

    class Opaque(Custom):  # a cumulative sum over the hidden units: no permutation of them is a symmetry
        def forward(self, x):
            return self.out(torch.cumsum(torch.relu(self.inp(x)), -1))

    with pytest.raises(lg.LossglassError, match=r"torch\.cumsum.*declare it"):
        lg.random_permutation(lg.Problem(Opaque(), teacher_ds, dtype=torch.float64))
    prob = lg.Problem(Custom(), teacher_ds, dtype=torch.float64)
    # a free-form module's symmetry is derived by tracing (issue 17): the one a user would declare
    assert lg.symmetry.spec_of(prob).perms == {"P0": (("inp.weight", 0), ("inp.bias", 0), ("out.weight", 1))}
    prob.spec = lg.PermutationSpec({"h": (("inp.weight", 0), ("inp.bias", 0), ("out.weight", 1))})
    th = prob.init(1, 0)[0]
    moved = lg.permute(prob, th, lg.random_permutation(prob, 2))
    x = prob.data["test"][0]
    assert torch.allclose(prob.forward(moved[None], x), prob.forward(th[None], x), atol=1e-12)
    assert float((lg.align(prob, th, moved)[0] - th).norm()) == 0.0
    prob.spec = lg.PermutationSpec({"h": (("inp.weight", 0), ("out.weight", 0))})
    with pytest.raises(lg.LossglassError, match="axes of different sizes"):
        lg.random_permutation(prob)


@pytest.mark.slow
@needs_fmnist
def test_aligned_barrier_below_naive_on_fashion_mnist(fmnist):
    prob = lg.Problem(lg.models.mlp(784, 128, 10), fmnist, device="cpu")
    reps = lg.train(prob, 2, epochs=3, batch_size=128, lr=0.05, seed=0, progress=False)
    df, _, _ = lg.pair_barriers(prob, reps.theta, pairs=1)
    assert df["barrier_aligned"].iloc[0] < df["barrier_naive"].iloc[0]
    assert df["barrier_naive"].iloc[0] > 0.05
