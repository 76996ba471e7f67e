"""Issue 26: which measure predicts generalisation. The measures against exact answers (scale symmetry of a ReLU
network, known power-law exponents), the statistics on constructed grids with known answers (granulated tau, Psi,
CMI) and their calibration on a grid where the true answer is "no", and the stage end to end on a tiny grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import kendalltau

from lossglass.config import validate
from lossglass.errors import LossglassError
from lossglass.protocols import measures as M
from lossglass.stages.common import build_problem
from lossglass.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    cfg = validate({"data": {"name": "digits", "n_train": 300, "n_test": 200}, "model": {"hidden": 24}})
    prob = build_problem(cfg)
    rep = train(prob, 3, epochs=15, batch_size=32, lr=0.05, progress=False)
    return prob, rep.theta


def _rescale(prob, theta: torch.Tensor, c: float) -> torch.Tensor:
    """(W1, b1, W2) -> (c W1, c b1, W2 / c): the same function for a ReLU network."""
    th = theta.clone()
    for n in ("0.weight", "0.bias"):
        th[:, prob.layout[n].slice] *= c
    th[:, prob.layout["2.weight"].slice] /= c
    return th


# ---------------------------------------------------------------------------- the measures
def test_rescaled_relu_network_leaves_scale_invariant_measures_and_moves_naive_ones_by_the_predicted_amount(trained):
    prob, theta = trained
    c = 3.0
    th2 = _rescale(prob, theta, c)
    # the same function: same outputs
    x = prob.data["train"][0][:50]
    assert torch.allclose(prob.forward(theta, x), prob.forward(th2, x), atol=1e-4)
    a, la = M.measure_table(prob, theta, eps=0.0, seed=3)
    b, lb = M.measure_table(prob, th2, eps=0.0, seed=3)
    for col in ("log_spec_product", "log_frob_product", "log_path_norm", "margin", "pacbayes_mag_sigma", "ww_alpha",
                "ww_stable_rank"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-5, err_msg=col)
    # weight norm: |theta'|^2 = |theta|^2 + (c^2 - 1)(|W1|^2 + |b1|^2) + (c^-2 - 1)|W2|^2
    sq = {n: theta[:, prob.layout[n].slice].double().square().sum(1).numpy() for n in prob.layout.names}
    pred = a["weight_norm"] ** 2 + (c**2 - 1) * (sq["0.weight"] + sq["0.bias"]) + (c**-2 - 1) * sq["2.weight"]
    np.testing.assert_allclose(b["weight_norm"] ** 2, pred, rtol=1e-5)
    assert (np.abs(b["weight_norm"] - a["weight_norm"]) > 0.1 * a["weight_norm"]).all()
    # alpha-hat of each layer moves by alpha log10 c^(+-2); the network's mean by their average
    for name, sign in (("0.weight", 1), ("2.weight", -1)):
        ra, rb = la[la["layer"] == name], lb[lb["layer"] == name]
        np.testing.assert_allclose(rb["alpha_hat"].to_numpy(),
                                   ra["alpha_hat"].to_numpy() + sign * ra["alpha"].to_numpy() * np.log10(c**2),
                                   rtol=1e-5)
    # the isotropic PAC-Bayes sigma is not scale-invariant (Dinh et al. 2017): it moves
    assert (np.abs(np.log(b["pacbayes_sigma"] / a["pacbayes_sigma"])) > 0.05).all()


def test_magnitude_aware_noise_floor_breaks_invariance_only_by_eps(trained):
    prob, theta = trained
    s1 = M.pac_bayes_sigma(prob, theta, magnitude=True, eps=1e-3, seed=1)
    s2 = M.pac_bayes_sigma(prob, _rescale(prob, theta, 3.0), magnitude=True, eps=1e-3, seed=1)
    assert torch.allclose(s1, s2, rtol=0.1)  # eps is small against the weights: nearly invariant
    assert torch.equal(s1, M.pac_bayes_sigma(prob, theta, magnitude=True, eps=1e-3, seed=1))  # deterministic


def test_pac_bayes_sigma_is_the_scale_where_the_error_rises_by_the_target(trained):
    prob, theta = trained
    sig = M.pac_bayes_sigma(prob, theta[:1], n_draws=16, seed=0, iters=20)
    base = 1 - prob.evaluate(theta[:1])["accuracy"].double()
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(1, 16, prob.n_params, generator=g)
    for f, below in ((0.98, True), (1.02, False)):
        pert = theta[:1].unsqueeze(1) + float(sig) * f * xi
        rise = (1 - prob.evaluate(pert.reshape(16, -1))["accuracy"].double()).mean() - base
        assert bool(rise <= 0.1) == below or abs(float(rise) - 0.1) < 0.02


def test_path_norm_is_the_sum_over_paths_of_squared_weight_products(trained):
    prob, theta = trained
    t = theta[:2].double()
    w1 = t[:, prob.layout["0.weight"].slice].reshape(2, *prob.layout["0.weight"].shape)
    b1 = t[:, prob.layout["0.bias"].slice]
    w2 = t[:, prob.layout["2.weight"].slice].reshape(2, *prob.layout["2.weight"].shape)
    b2 = t[:, prob.layout["2.bias"].slice]
    # explicit: paths input i -> hidden h -> output o, plus bias paths b1_h -> o and b2_o
    paths = torch.einsum("koh,khi->k", w2**2, w1**2) + torch.einsum("koh,kh->k", w2**2, b1**2) + (b2**2).sum(1)
    np.testing.assert_allclose(M.norm_measures(prob, theta[:2])["log_path_norm"].numpy(), torch.log(paths).numpy(),
                               rtol=1e-6)


def test_margin_is_the_quantile_of_true_minus_best_other_logit(trained):
    prob, theta = trained
    out = prob.forward(theta, prob.data["train"][0]).double()
    y = prob.data["train"][1]
    true = out[:, torch.arange(len(y)), y]
    other = out.clone()
    other[:, torch.arange(len(y)), y] = -np.inf
    ref = torch.quantile(true - other.amax(-1), 0.1, dim=1)
    np.testing.assert_allclose(M.output_margin(prob, theta).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- power laws
@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.0])
def test_power_law_fit_recovers_a_known_exponent(alpha):
    g = torch.Generator().manual_seed(int(alpha * 10))
    u = torch.rand(4, 1000, generator=g, dtype=torch.float64)
    x = (1 - u) ** (-1 / (alpha - 1))  # Pareto, p(x) ~ x^-alpha on x >= 1
    fit = M.fit_power_law(x)
    z = (fit.alpha - alpha) / fit.sigma
    assert (z.abs() < 4).all(), (fit.alpha, fit.sigma)
    assert abs(float(fit.alpha.median()) - alpha) < 0.1 * alpha


def test_power_law_fit_of_heavy_tailed_matrices_and_of_gaussian_ones():
    """Entries with P(|w| > x) = x^-mu, mu < 2: the ESD of W^T W has a power-law tail of exponent 1 + mu/2
    (Martin & Mahoney 2021, after Bouchaud & Potters); a Gaussian matrix (Marchenko-Pastur) has none: a large alpha."""
    g = torch.Generator().manual_seed(1)
    for mu in (1.0, 1.5):
        u = torch.rand(4, 300, 600, generator=g, dtype=torch.float64)
        sign = torch.where(torch.rand(4, 300, 600, generator=g) < 0.5, -1.0, 1.0).double()
        ev = torch.linalg.svdvals(sign * u ** (-1 / mu)).square()
        assert abs(float(M.fit_power_law(ev).alpha.median()) - (1 + mu / 2)) < 0.2
    gw = torch.randn(4, 300, 600, generator=g, dtype=torch.float64)
    assert float(M.fit_power_law(torch.linalg.svdvals(gw).square()).alpha.median()) > 4


def test_power_law_fit_is_scale_free_and_rejects_bad_input():
    g = torch.Generator().manual_seed(2)
    x = (1 - torch.rand(3, 200, generator=g, dtype=torch.float64)) ** (-1 / 1.5)
    a, b = M.fit_power_law(x), M.fit_power_law(x * 7.0)
    torch.testing.assert_close(a.alpha, b.alpha)
    torch.testing.assert_close(a.xmin * 7.0, b.xmin)
    with pytest.raises(LossglassError, match="min_tail"):
        M.fit_power_law(x, min_tail=1)
    with pytest.raises(LossglassError, match="rows, values"):
        M.fit_power_law(x[0])
    few = M.fit_power_law(torch.tensor([[1.0, float("nan"), -1.0]]))
    assert torch.isnan(few.alpha).all()


# ---------------------------------------------------------------------------- statistics
def test_kendall_tau_b_matches_scipy_with_ties_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (20, 12)).astype(float)
    y = rng.integers(0, 4, (20, 12)).astype(float)
    x[3, 2] = np.nan
    ours = M.kendall_tau_b(x, y)
    for i in range(20):
        ok = ~np.isnan(x[i])
        np.testing.assert_allclose(ours[i], kendalltau(x[i][ok], y[i][ok]).statistic, atol=1e-12)


def _grid(shape, seeds=2):
    cells = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), 1)
    rows = [dict(a=c[0], b=c[1], c=c[2], s=s) for c in cells for s in range(seeds)]
    return pd.DataFrame(rows)


def test_granulated_tau_on_a_grid_with_a_known_answer():
    """gap = a + b + 0.1 c. measure = a - b + (c's levels in an order with tau 0 against c): granulated tau is +1 along
    a, -1 along b, 0 along c; Psi = 0. A measure equal to the gap: +1 everywhere."""
    df = _grid((2, 3, 4))
    perm = np.array([1, 3, 0, 2])  # tau([0,1,2,3], [1,3,0,2]) = 0
    assert kendalltau(np.arange(4), perm).statistic == 0
    df["gap"] = df["a"] + df["b"] + 0.1 * df["c"]
    df["mu"] = 5 * df["a"] - 5 * df["b"] + 0.01 * perm[df["c"]]
    df["good"] = df["gap"]
    r = M.rank_measures(df, ["mu", "good"], ["a", "b", "c"], target="gap", n_boot=50, usable=None).set_index("measure")
    assert r.loc["mu", "psi_a"] == 1 and r.loc["mu", "psi_b"] == -1 and r.loc["mu", "psi_c"] == 0
    assert abs(r.loc["mu", "psi"]) < 1e-12
    assert r.loc["good", "psi"] == 1 and r.loc["good", "tau"] == 1 and r.loc["good", "cmi_0"] == pytest.approx(1)
    assert list(r.index) == ["good", "mu"]  # ranked best first
    # the granulated tau against a slice-by-slice loop with scipy (a random measure, 3 levels on b)
    rng = np.random.default_rng(1)
    cx, cy = rng.normal(size=24), rng.normal(size=24)
    ours = M.granulated_tau(cx, cy, (2, 3, 4))
    gx, gy = cx.reshape(2, 3, 4), cy.reshape(2, 3, 4)
    ref_b = np.mean([kendalltau(gx[i, :, k], gy[i, :, k]).statistic for i in range(2) for k in range(4)])
    assert ours[1] == pytest.approx(ref_b)


def _cmi_reference(x: np.ndarray, y: np.ndarray, values: np.ndarray, subset: tuple[int, ...]) -> float:
    """Jiang et al.'s normalised CMI one pair and one condition at a time (dictionaries of counts)."""
    from collections import Counter

    joint, cond = Counter(), Counter()
    for a in range(len(x)):
        for b in range(a + 1, len(x)):
            vm, vg = np.sign(x[a] - x[b]), np.sign(y[a] - y[b])
            if vm == 0 or vg == 0 or not (np.isfinite(vm) and np.isfinite(vg)):
                continue
            u = tuple(values[a, list(subset)]) + tuple(values[b, list(subset)])
            joint[u, vm, vg] += 1
            cond[u] += 1
    n = sum(cond.values())
    mi = h = 0.0
    for u, nu in cond.items():
        pm = {v: sum(joint[u, v, g] for g in (-1, 1)) / nu for v in (-1, 1)}
        pg = {g: sum(joint[u, v, g] for v in (-1, 1)) / nu for g in (-1, 1)}
        for v in (-1, 1):
            for g in (-1, 1):
                p = joint[u, v, g] / nu
                mi += nu / n * (p * np.log(p / (pm[v] * pg[g])) if p > 0 else 0.0)
        h -= nu / n * sum(p * np.log(p) for p in pg.values() if p > 0)
    return mi / h if h > 0 else float("nan")  # every condition with one pair: undefined


def test_conditional_mi_against_a_pair_by_pair_count_batched_over_draws_and_with_an_interval():
    rng = np.random.default_rng(3)
    codes = np.stack(np.unravel_index(np.arange(24), (2, 3, 4)), 1)
    x = rng.normal(size=(4, 24))
    y = 0.7 * x + rng.normal(size=(4, 24))
    x[1, 5] = np.nan
    x[2] = np.round(x[2])  # ties
    subsets = [(), (0,), (1,), (1, 2), (0, 1, 2)]  # the last: one pair per condition, H = 0, NaN
    many = M.conditional_mi_many(x, y, codes, subsets)  # every draw and subset in one pass
    for i in range(4):
        for j, s in enumerate(subsets):
            assert many[i, j] == pytest.approx(_cmi_reference(x[i], y[i], codes, s), abs=1e-12, nan_ok=True)
            assert M.conditional_mi(x[i], y[i], codes, s) == pytest.approx(many[i, j], abs=1e-12, nan_ok=True)
    # in rank_measures: the same within-cell resampling as tau_cells and psi; a measure equal to the gap has CMI 1 in
    # every draw, an unrelated one an interval around its (small) value
    df = _grid((2, 2, 2), seeds=3)
    df["gap"] = (df["a"] + df["b"] + df["c"]).to_numpy() + rng.normal(size=len(df))
    df["same"], df["noise"] = df["gap"], rng.normal(size=len(df))
    r = M.rank_measures(df, ["same", "noise"], ["a", "b", "c"], target="gap", n_boot=200, usable=None)
    r = r.set_index("measure")
    assert r.loc["same", "cmi"] == r.loc["same", "cmi_lo"] == r.loc["same", "cmi_hi"] == pytest.approx(1)
    assert 0 <= r.loc["noise", "cmi_lo"] <= r.loc["noise", "cmi"] <= r.loc["noise", "cmi_hi"] < 1


def test_bootstrap_intervals_are_calibrated_on_a_grid_where_the_answer_is_no_and_have_power_where_it_is_yes():
    """100 measures unrelated to the gap (the true Psi is 0) and 100 that follow the gap through noise of the size of
    the seed noise, on a 2 x 2 x 2 grid of 4 seeds: the Psi (and overall tau) interval excludes 0 for few of the
    first (false positives) and most of the second (power). The full calibration at the preset's design is
    benchmarks/calibrate_measures.py."""
    rng = np.random.default_rng(7)
    df = _grid((2, 2, 2), seeds=4)
    effect = 0.5 * (df["a"] + df["b"] + df["c"]).to_numpy()
    df["gap"] = effect + rng.normal(scale=0.5, size=len(df))
    null = {f"null{i}": rng.normal(size=len(df)) for i in range(100)}
    alt = {f"alt{i}": df["gap"].to_numpy() + rng.normal(scale=0.3, size=len(df)) for i in range(100)}
    df = pd.concat([df, pd.DataFrame({**null, **alt})], axis=1)
    r = M.rank_measures(df, list(null) + list(alt), ["a", "b", "c"], target="gap", n_boot=300, usable=None)
    excl = (r["psi_lo"] > 0) | (r["psi_hi"] < 0)
    null_rows = r["measure"].str.startswith("null")
    fp = excl[null_rows].mean()
    fp_tau = ((r["tau_lo"] > 0) | (r["tau_hi"] < 0))[null_rows].mean()
    fp_cells = ((r["tau_cells_lo"] > 0) | (r["tau_cells_hi"] < 0))[null_rows].mean()
    power = (r["psi_lo"] > 0)[~null_rows].mean()
    print(f"false positives Psi {fp:.2f}, tau {fp_tau:.2f}, tau_cells {fp_cells:.2f}; power {power:.2f}")
    assert fp_cells <= 0.09  # measured 0.07; 0.10 with the plain within-cell bootstrap (no rescaling)
    assert fp <= 0.12 and fp_tau <= 0.15 and power >= 0.8  # measured: 0.01, 0.12, 1.00 (tau: 32 networks)


def test_rank_measures_refuses_a_grid_that_is_not_full_factorial():
    df = _grid((2, 2, 2)).iloc[:-2].assign(gap=0.0, mu=1.0)
    with pytest.raises(LossglassError, match="not full factorial"):
        M.rank_measures(df, ["mu"], ["a", "b", "c"], target="gap", usable=None)


def test_complexity_orientation():
    df = pd.DataFrame({"margin": [2.0, 0.0, -1.0], "pacbayes_sigma": [0.5, 1.0, np.nan], "local_entropy": [-3.0, -1, 0]})
    c = M.complexity(df)
    np.testing.assert_allclose(c["inverse_margin"], [0.25, np.inf, np.inf])
    np.testing.assert_allclose(c["pacbayes_flatness"], [4.0, 1.0, np.nan])
    np.testing.assert_allclose(c["neg_local_entropy"], [3.0, 1.0, 0.0])


# ---------------------------------------------------------------------------- the stage
TINY = {
    "name": "tiny-measures",
    "data": {"name": "digits", "n_train": 300, "n_test": 300, "n_val": 100},
    "model": {"hidden": 16},
    "train": {"replicas": 4, "epochs": 10, "batch_size": 32},
    "measures": {"enabled": True, "widths": [8, 16], "batch_sizes": [32], "lrs": [0.02, 0.05], "weight_decays": [0.0],
                 "sam_rhos": [0.0], "seeds": 2, "epochs": 80, "stop_at_loss": 0.05, "n_data": 150, "n_boot": 100,
                 "curvature": False},
    "walk": {"enabled": False}, "connect": {"enabled": False}, "replicas": {"enabled": False},
    "timeline": {"enabled": False}, "curvature": {"enabled": False}, "select": {"enabled": False},
}


def test_measures_stage_on_a_tiny_grid(tmp_path):
    from lossglass.columns import describe
    from lossglass.store import RunStore
    from lossglass.study import Study

    cfg = validate(TINY)
    Study(cfg, tmp_path / "run", progress=False).run()
    store = RunStore(tmp_path / "run", create=False)
    grid = store.read_table("measures_grid")
    assert len(grid) == 2 * 2 * 2 and set(grid["width"]) == {8, 16}
    rank = store.read_table("measures_rank")
    assert {"psi", "psi_width", "psi_lr", "tau", "cmi"} <= set(rank.columns)
    assert set(rank["measure"]) >= {"log_path_norm", "pacbayes_flatness", "inverse_margin", "ww_stable_rank"}
    own = store.read_table("measures")
    assert len(own) == 4 and "pacbayes_mag_flatness" in own
    for t in ("measures", "measures_grid", "measures_rank", "measures_layers"):
        assert [c for c in store.read_table(t).columns if describe(t, c) is None] == [], t
    # deterministic: the same config gives the same bytes
    Study(cfg, tmp_path / "again", progress=False).run()
    again = RunStore(tmp_path / "again", create=False)
    for t in ("measures_grid", "measures_rank", "measures"):
        assert (store.path / f"tables/{t}.parquet").read_bytes() == (again.path / f"tables/{t}.parquet").read_bytes()


def test_select_measure_can_name_a_measure_of_the_measures_table(tmp_path):
    from lossglass.selection import _flatness, _measure_table
    from lossglass.store import RunStore

    store = RunStore(tmp_path / "r")
    store.write_table("flatness", pd.DataFrame({"replica": [0, 1, 2], "lambda_max": [1.0, 2.0, 3.0]}))
    store.write_table("measures", pd.DataFrame({"replica": [2, 1, 0], "margin": [0.5, 1.0, 2.0],
                                                "pacbayes_flatness": [4.0, 1.0, 0.25]}))
    t = _measure_table(store).set_index("replica")
    assert t.loc[0, "margin"] == 2.0 and t.loc[2, "pacbayes_flatness"] == 4.0
    # margin: larger = flatter (negated); the complexity form: larger = sharper
    assert np.argmin(_flatness(t["margin"].to_numpy(), "margin")) == 0
    assert np.argmin(_flatness(t["pacbayes_flatness"].to_numpy(), "pacbayes_flatness")) == 0


def test_power_law_fit_with_weightwatchers_ks_convention_matches_its_procedure():
    """ks="lower" is WeightWatcher's fit for >= 20 eigenvalues (WW_powerlaw.WWFit.fit_power_law_standard, v0.7.7):
    every value but the largest as xmin, MLE alpha, D = max |1 - (x / xmin)^(1 - alpha) - arange(m) / m|."""
    g = torch.Generator().manual_seed(5)
    x = torch.linalg.svdvals(torch.randn(3, 60, 90, generator=g, dtype=torch.float64) ** 3).square()
    fit = M.fit_power_law(x, ks="lower")
    for r in range(3):
        d = np.sort(x[r].numpy())
        best = (np.inf, None)
        for i in range(len(d) - 1):  # the reference: one candidate at a time
            m = len(d) - i
            a = 1 + m / (np.log(d[i:]).sum() - m * np.log(d[i]))
            dist = np.max(np.abs(1 - (d[i:] / d[i]) ** (1 - a) - np.arange(m) / m))
            if dist < best[0]:
                best = (dist, a)
        assert float(fit.alpha[r]) == pytest.approx(best[1], rel=1e-9)


def test_select_depends_on_measures_only_when_its_measure_is_one_only_that_stage_computes():
    from lossglass.stages import dependencies, dependents
    from lossglass.study import Study

    base = {**TINY, "select": {"enabled": True}}
    own = validate({**base, "select": {"enabled": True, "measure": "pacbayes_mag_flatness"}})
    flat = validate({**base, "select": {"enabled": True, "measure": "sharpness_average"}})
    wn = validate({**base, "select": {"enabled": True, "measure": "weight_norm"}})  # the flatness table has it
    assert "select" in dependents("measures", own) and "measures" in dependencies("select", own)
    assert "select" not in dependents("measures", flat) and "select" not in dependents("measures", wn)
    assert "select" not in dependents("measures")  # no config: the declared dependencies

    def fp(cfg, **measures):
        c = cfg.model_copy(deep=True)
        for k, v in measures.items():
            setattr(c.measures, k, v)
        return Study(c, "/nonexistent/run", progress=False).fingerprint("select")

    # a measure of the flatness table: the measures section does not enter select's fingerprint (old folders stay valid)
    assert fp(flat) == fp(flat, n_draws=5) == fp(flat, enabled=False)
    assert fp(wn) == fp(wn, n_draws=5)
    # a measure only the measures stage computes: it does
    assert fp(own) != fp(own, n_draws=5)


def test_select_reruns_when_the_measures_stage_it_reads_reruns(tmp_path):
    """``lossglass measures RUN --set ...`` (the measures change: select's fingerprint follows) and ``--redo`` (the
    same measures recomputed: select is among the stages redone after it) both rerun select when select.measure is
    one only the measures stage computes."""
    from lossglass.cli import main
    from lossglass.store import RunStore
    from lossglass.study import Study

    raw = {**TINY, "measures": {**TINY["measures"], "grid": False}, "train": {**TINY["train"], "replicas": 6},
           "select": {"enabled": True, "measure": "pacbayes_mag_flatness"}}
    Study(validate(raw), tmp_path / "run", progress=False).run()
    store = RunStore(tmp_path / "run", create=False)

    def records():
        return {s: store.stage_record(s) for s in ("measures", "select")}

    first = records()
    assert "skipped" not in first["select"] and store.has_table("selection")
    assert main(["measures", str(store.path), "--quiet", "--no-report", "--set", "measures.n_draws=4"]) == 0
    second = records()
    for s in ("measures", "select"):  # both redone, with new fingerprints
        assert second[s]["fingerprint"] != first[s]["fingerprint"] and second[s] != first[s], s
    assert main(["measures", str(store.path), "--quiet", "--no-report", "--redo"]) == 0
    third = records()
    assert third["select"]["fingerprint"] == second["select"]["fingerprint"] and third["select"] != second["select"]


def test_local_entropy_on_the_grid_is_the_curvature_protocols_with_the_stages_settings(trained):
    """measures.local_entropy on: every grid network gets the curvature protocol's local entropy (a log volume
    fraction: <= 0) on the first measures.n_data samples with the curvature section's radius, epsilon and chains, and
    its complexity form neg_local_entropy; off: neither column."""
    from types import SimpleNamespace

    from lossglass.protocols import curvature as K
    from lossglass.stages.measures import _measure

    prob, theta = trained
    base = {"data": {"name": "digits", "n_train": 300, "n_test": 200}, "model": {"hidden": 24},
            "curvature": {"entropy_chains": 20, "trace_probes": 3, "n_samples": 2, "entropy_radius": 0.02,
                          "entropy_epsilon": 0.5},
            "measures": {"n_data": 100, "n_draws": 2, "local_entropy": True}}
    cfg = validate(base)
    df, _ = _measure(SimpleNamespace(cfg=cfg), prob, theta, with_curvature=True)
    ref = K.local_entropy(prob.subset(100), theta, radius=0.02, epsilon=0.5, n_chains=20, seed=cfg.seed)
    np.testing.assert_array_equal(df["local_entropy"].to_numpy(), ref["local_entropy"].cpu().numpy())
    le = df["local_entropy"].to_numpy()
    assert np.isfinite(le).all() and (le <= 0).all()
    out = M.with_complexity(df)
    np.testing.assert_array_equal(out["neg_local_entropy"].to_numpy(), -le)
    cfg_off = validate({**base, "measures": {**base["measures"], "local_entropy": False}})
    off, _ = _measure(SimpleNamespace(cfg=cfg_off), prob, theta, with_curvature=True)
    assert "local_entropy" not in off and "neg_local_entropy" not in M.with_complexity(off)
    np.testing.assert_array_equal(off["lambda_max"].to_numpy(), df["lambda_max"].to_numpy())
