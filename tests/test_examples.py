"""Where the replicas disagree (protocols/examples.py, stages/examples.py, report/examples.py, ``lossglass examples``):
constructed answers (replicas that differ on a known subset, clusters that fail on different classes, a corruption
that cannot change a prediction, identical replicas), the rank statistics against exact values and under a null, and
the stage end to end on a tiny study."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import kendalltau
from torch import nn

import lossglass as lg
from lossglass.cli import main
from lossglass.protocols import examples as X

pytestmark = pytest.mark.usefixtures("one_thread")


def onehot_problem(n: int = 12, c: int = 3, shape=None) -> lg.Problem:
    """A linear model on one-hot inputs x_n = e_n: the prediction on example n is the argmax of column n of W."""
    x = torch.eye(n)
    y = torch.arange(n) % c
    if shape is not None:
        x = x.reshape(n, *shape)
    ds = lg.datasets.from_tensors(x, y, x, y, n_classes=c)
    return lg.Problem(nn.Sequential(nn.Linear(n, c)), ds, device="cpu", dtype=torch.float64)


def linear_theta(w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """theta of nn.Linear (weight (C, D) then bias (C,))."""
    return torch.cat([w.flatten(), torch.zeros(w.shape[0]) if b is None else b]).double()


# ------------------------------------------------------------------------------------------------ constructed answers
def test_replicas_that_differ_on_a_known_subset_are_found_exactly():
    n, c, k = 12, 3, 5
    prob = onehot_problem(n, c)
    base = torch.full((c, n), -1.0)
    base[torch.arange(n) % c, torch.arange(n)] = 1.0  # every replica right on every example
    subset = [2, 7, 9]
    thetas = []
    for a in range(k):
        w = base.clone()
        if a >= 2:  # replicas 2..4 vote for another class on the subset only
            for j in subset:
                w[:, j] = -1.0
                w[(j % c + 1 + (a % 2)) % c, j] = 1.0  # one of the two wrong classes
        thetas.append(linear_theta(w))
    theta = torch.stack(thetas)
    out = prob.predictions(theta, "test")
    ev = prob.evaluate(theta, "test")
    y = prob.data["test"][1]
    assert torch.allclose(out["loss"].mean(1), ev["loss"].double())
    assert torch.allclose((out["prediction"] == y).double().mean(1), ev["accuracy"].double())
    table = X.per_example(out["prediction"], out["loss"], y, n_classes=c)
    assert sorted(table.loc[table["disagree"], "example"]) == subset
    assert (table.loc[table["example"].isin(subset), "error_share"] == 3 / 5).all()
    assert (table.loc[~table["example"].isin(subset), ["error_share", "vote_entropy"]] == 0).all().all()
    # vote entropy: 2 right, 3 wrong split 2:1 or 3:0 between the other classes, exact value
    p = X.vote_counts(out["prediction"], c)[subset] / k
    want = -(p * torch.log(p.clamp_min(1e-300))).sum(1).numpy()
    assert np.allclose(table.set_index("example").loc[subset, "vote_entropy"], want)
    assert (table["cluster_spread"] == 0).all()


def test_churn_is_zero_for_identical_replicas_and_one_minus_the_function_overlap():
    prob = onehot_problem()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(prob.n_params, generator=g, dtype=torch.float64)
    same = prob.predictions(torch.stack([t, t, t]), "test")["prediction"]
    assert (X.churn(same) == 0).all()
    theta = torch.randn(4, prob.n_params, generator=g, dtype=torch.float64)
    pred = prob.predictions(theta, "test")["prediction"]
    ch = X.churn(pred)
    from lossglass.protocols.replicas import overlaps

    assert np.allclose(ch, 1 - overlaps(prob, theta, kind="functions").numpy())
    brute = (pred[:, None] != pred[None]).double().mean(-1).numpy()
    assert np.allclose(ch, brute)


def test_clusters_that_fail_on_different_classes_show_in_their_confusion_matrices():
    c, n_per = 4, 25
    y = torch.arange(c).repeat_interleave(n_per)
    pred = y.repeat(6, 1).clone()
    labels = np.array([0, 0, 0, 1, 1, 1])
    pred[:3][:, y == 1] = 2  # cluster 0 calls every 1 a 2
    pred[3:][:, y == 3] = 0  # cluster 1 calls every 3 a 0
    conf = X.confusion(pred, y, labels, c).set_index(["cluster", "true", "predicted"])["share"]
    assert conf[(0, 1, 2)] == 1 and conf[(0, 3, 3)] == 1 and conf[(1, 3, 0)] == 1 and conf[(1, 1, 1)] == 1
    for k_ in (0, 1):
        rows = conf.loc[k_].groupby(level="true").sum()
        assert np.allclose(rows, 1)
    table = X.per_example(pred, torch.zeros(pred.shape), y, labels, c)
    assert (table.loc[table["label"] == 1, ["error_cluster_0", "error_cluster_1"]].to_numpy() == [1, 0]).all()
    assert (table.loc[table["label"] == 3, ["error_cluster_0", "error_cluster_1"]].to_numpy() == [0, 1]).all()
    assert sorted(table.loc[table["cluster_spread"] == 1, "label"].unique()) == [1, 3]


def test_clusters_come_from_the_replica_dendrogram():
    from scipy.cluster import hierarchy as sch
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]])
    pts = np.concatenate([c + 0.1 * rng.standard_normal((4, 2)) for c in centres])
    z = sch.linkage(pdist(pts), "average")
    lab = X.clusters_from_linkage(z, 3)
    assert list(lab) == [0] * 4 + [1] * 4 + [2] * 4
    assert X.largest_gap_clusters(z) == 3
    assert (X.clusters_from_linkage(z, 1) == 0).all()


def test_a_corruption_that_cannot_change_the_prediction_keeps_clean_accuracy():
    # a linear model with rows of W summing to 0 and no bias: f(m + s (x - m)) = s W x, argmax unchanged for s > 0
    n, c = 16, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 1, 4, 4, generator=g)
    y = torch.randint(0, c, (60,), generator=g)
    ds = lg.datasets.from_tensors(x[:30], y[:30], x[30:], y[30:], n_classes=c)
    prob = lg.Problem(nn.Sequential(nn.Linear(n, c)), ds, device="cpu", dtype=torch.float64)
    ws = torch.randn(5, c, n, generator=g, dtype=torch.float64)
    ws = ws - ws.mean(2, keepdim=True)
    theta = torch.stack([linear_theta(w) for w in ws])
    xt, yt = prob.data["test"]
    clean = (prob.predictions(theta, "test")["prediction"] == yt).double().mean(1)
    for s in X.IMAGE_CORRUPTIONS["contrast"]:
        xc = X.corrupt(xt, "contrast", s, shape=(1, 4, 4))
        assert not torch.equal(xc, xt.float())
        acc = (prob.predictions(theta, x=xc, y=yt)["prediction"] == yt).double().mean(1)
        assert torch.equal(acc, clean)
    # and a corruption that does change inputs changes some prediction (the check above can fail)
    xn = X.corrupt(xt, "noise", 0.6, shape=(1, 4, 4))
    assert not torch.equal(prob.predictions(theta, x=xn, y=yt)["prediction"], prob.predictions(theta, "test")["prediction"])


def test_corruptions_are_seeded_and_severity_zero_is_the_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1 * 8 * 8, generator=g)
    for kind in ("noise", "blur", "contrast", "shift", "rotate"):
        a = X.corrupt(x, kind, X.IMAGE_CORRUPTIONS[kind][1], shape=(1, 8, 8), seed=3)
        b = X.corrupt(x, kind, X.IMAGE_CORRUPTIONS[kind][1], shape=(1, 8, 8), seed=3)
        assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
        assert torch.equal(X.corrupt(x, kind, 0, shape=(1, 8, 8)), x)
    assert not torch.equal(X.corrupt(x, "noise", 0.3, seed=1), X.corrupt(x, "noise", 0.3, seed=2))
    # a shift by whole pixels along an axis moves the image; rotation by 0 degrees... is severity 0 (identity above)
    tok = torch.randint(0, 7, (50, 5), generator=g).float()
    t = X.corrupt(tok, "tokens", 0.5, vocab=7)
    assert set(t.unique().tolist()) <= set(range(7)) and 0 < (t != tok).float().mean() < 0.5
    with pytest.raises(lg.LossglassError, match="image inputs"):
        X.corrupt(x, "blur", 1.0, shape=(64,))
    with pytest.raises(lg.LossglassError, match="vocabulary"):
        X.corrupt(tok, "tokens", 0.5)


# ------------------------------------------------------------------------------------------------ rank statistics
def test_masked_kendall_matches_scipy_with_ties_and_multiplicities():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (3, 15)).astype(float), rng.standard_normal((3, 15))
    got = X._kendall_masked(x, y, np.ones_like(x))
    want = [kendalltau(a, b)[0] for a, b in zip(x, y)]
    assert np.allclose(got, want)
    w = np.ones_like(x)
    w[:, :5] = 0
    assert np.allclose(X._kendall_masked(x, y, w), [kendalltau(a[5:], b[5:])[0] for a, b in zip(x, y)])
    w2 = np.ones((1, 15))
    w2[0, 0] = 2  # item 0 twice = item 0 duplicated
    want2 = kendalltau(np.r_[x[0], x[0, 0]], np.r_[y[0], y[0, 0]])[0]
    assert np.isclose(X._kendall_masked(x[:1], y[:1], w2)[0], want2)


def _points(k, rng):
    v = rng.standard_normal((k, 30))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def test_churn_correlation_detects_a_relation_and_stays_quiet_without_one():
    rng = np.random.default_rng(1)
    k = 12
    q = _points(k, rng)
    related = 0.3 - 0.2 * q + 0.005 * rng.standard_normal((k, k))
    related = (related + related.T) / 2
    r = X.pair_rank_correlation(q, related, n_boot=300, n_perm=300, seed=0)
    assert r["tau"] < -0.7 and r["ci_high"] < 0 and r["p_value"] < 0.01 and r["pairs"] == 66
    assert X.correlation_verdict(r["ci_low"], r["ci_high"], r["p_value"]) == "negative"
    # null: churn from other points, independent of q; 30 trials, false positives at 5% expected 1.5
    fp = 0
    for t in range(30):
        other = _points(k, rng)
        r = X.pair_rank_correlation(q, other, n_boot=200, n_perm=200, seed=t)
        fp += X.correlation_verdict(r["ci_low"], r["ci_high"], r["p_value"]) != "nothing detectable"
    assert fp <= 5  # P(Binomial(30, 0.05) > 5) < 0.3%


def test_pick_cost_and_disagreement_in_numbers():
    ch = np.array([[0, .1, .2, .3], [.1, 0, .1, .1], [.2, .1, 0, .2], [.3, .1, .2, 0]])
    c = X.pick_cost(ch, np.array([.8, .9, .85, .7]), 1, 1000)
    assert np.isclose(c["churn_mean"], 0.1) and np.isclose(c["cases_mean"], 100) and c["churn_ci_low"] <= 0.1
    assert c["accuracy_worst"] == .7 and c["accuracy_best"] == .9 and c["accuracy_chosen"] == .9
    lo, hi = X.wilson(10, 100)
    assert 0.05 < lo < 0.1 < hi < 0.18
    with pytest.raises(lg.LossglassError):
        X.pick_cost(ch, np.ones(4), 7, 10)


# ------------------------------------------------------------------------------------------------ end to end
TINY = """
name = "ex"
seed = 1
[data]
name = "digits"
n_train = 300
n_test = 120
n_val = 60
[model]
hidden = 8
[train]
replicas = 6
epochs = 2
batch_size = 32
lr = 0.05
[walk]
enabled = false
[connect]
swaps = [0, 2]
pairs = 2
n_points = 5
bezier_steps = 0
plane_steps = 0
[replicas]
basin_temperature = 0
[curvature]
trace_probes = 3
n_samples = 2
slq_steps = 4
density = false
n_hvp_data = 100
[examples]
enabled = true
top = 4
n_boot = 200
"""


def _run(tmp_path_factory, name, stages=None):
    d = tmp_path_factory.mktemp(name)
    (d / "ex.toml").write_text(TINY)
    args = ["run", str(d / "ex.toml"), "--out", str(d / "run"), "--quiet"] + (["--stages", stages] if stages else [])
    assert main(args) == 0
    return d / "run"


@pytest.fixture(scope="module")
def ex_run(tmp_path_factory):
    """Train, connect and replicas only (a few seconds; no curvature, so no select and no merged model), then
    ``lossglass examples RUN`` runs the stage on the finished folder."""
    run = _run(tmp_path_factory, "ex", "train,connect,replicas")
    assert not (run / "tables/examples.parquet").exists()
    assert main(["examples", str(run), "--no-report", "--quiet"]) == 0
    return run


def _describe_all(store):
    from lossglass.columns import describe

    for t in [p.stem for p in (store.path / "tables").glob("examples*.parquet")]:
        for col in store.read_table(t).columns:
            assert describe(t, col), (t, col)


def test_the_stage_writes_its_tables_section_and_dashboard_layer(ex_run):
    store = lg.store.RunStore(ex_run, create=False)
    ex = store.read_table("examples")
    assert len(ex) == 120 and {"error_cluster_0", "cluster_spread", "vote_entropy"} <= set(ex.columns)
    rob = store.read_table("examples_robustness")
    assert set(rob["corruption"]) == {"clean", "noise", "blur", "contrast", "shift", "rotate"}
    assert len(rob) == 16 * 6 and set(rob["model"]) == {"replica"}
    reps = store.read_table("replicas")
    clean = rob[rob["corruption"] == "clean"].set_index("replica")["accuracy"]
    assert np.allclose(clean.sort_index(), reps.set_index("replica")["test_accuracy"].sort_index(), atol=1e-6)
    churn = store.read_table("examples_churn")
    assert len(churn) == 15 and churn["q_aligned"].notna().all() and churn["barrier_aligned"].notna().sum() == 2
    d = store.read_json("examples.json")
    assert 0 <= d["disagree_share"] <= 1 and d["cost"]["replicas"] == 6 and d["flatness_words"] is None
    assert np.isclose(d["disagree_share"], ex["disagree"].mean())
    _describe_all(store)
    from lossglass.report.base import Page, RunView
    from lossglass.report.examples import section

    page = Page(RunView(ex_run))
    section(page)
    html = "".join(page.parts)
    assert 'id="examples"' in html and "hardest test cases" in html and (ex_run / "figures/examples_hardest.png").exists()
    assert page.summary and page.summary[0][0] == "Replicas disagree on"
    from lossglass.dashboard.collect import collect_run

    got = collect_run(ex_run, 0)
    assert "robustness" in got["overlays"] and any(s["id"] == "examples" for s in got["sections"])
    # same seed, same bytes
    files = ("tables/examples.parquet", "tables/examples_robustness.parquet", "tables/examples_churn_tests.parquet")
    before = [(ex_run / f).read_bytes() for f in files]
    assert main(["examples", str(ex_run), "--redo", "--no-report", "--quiet"]) == 0
    assert before == [(ex_run / f).read_bytes() for f in files]


def test_the_examples_command_prints_and_exports(ex_run, capsys):
    assert main(["examples", str(ex_run), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "hardest: 3 test cases" in out and "disagree on" in out
    assert main(["examples", str(ex_run), "--top", "2", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    df = pd.read_csv(io.StringIO(csv))
    assert (df["kind"] == "hardest").sum() == 2 and "error_share" in df
    assert main(["examples", str(ex_run), "--format", "xml"]) == 2
    assert main(["examples", str(ex_run), "--set", "train.epochs=3"]) == 2


@pytest.mark.slow
def test_a_full_study_grades_the_merged_model_flatness_and_the_pick(tmp_path_factory):
    run = _run(tmp_path_factory, "exfull")
    store = lg.store.RunStore(run, create=False)
    rob = store.read_table("examples_robustness")
    assert "merged" in set(rob["model"]) and "merged" in set(store.read_table("examples_clusters")["cluster"])
    ft = store.read_table("examples_flatness")
    assert {"sharpness_average", "lambda_max"} <= set(ft["measure"]) and (ft["target"] == "robust_drop").all()
    d = store.read_json("examples.json")
    sel = store.read_json("selection.json")
    assert d["cost_strategy"] == sel["strategy"] and "Flatness" in d["flatness_words"]
    ids = store.read_table("replicas")["replica"].tolist()
    assert d["cost"]["chosen"] == ids.index(sel["replica"])
    html = (run / "report.html").read_text()
    assert 'id="examples"' in html and "could not be drawn" not in html
    _describe_all(store)


def test_examples_keep_their_index_in_the_users_own_test_set():
    from types import SimpleNamespace

    from lossglass.stages.examples import source_index

    ds = lg.datasets.from_tensors(torch.randn(5, 3), torch.zeros(5).long(), torch.randn(4, 3), torch.ones(4).long(),
                                  n_classes=2)
    factory = SimpleNamespace(data=SimpleNamespace(factory="pkg:data"))
    named = SimpleNamespace(data=SimpleNamespace(factory=None))
    assert list(source_index(factory, ds)) == [0, 1, 2, 3]
    assert list(source_index(named, ds)) == [-1] * 4
    ds.info["test_index"] = [7, 9, 20, 31]
    assert list(source_index(named, ds)) == [7, 9, 20, 31]


@pytest.mark.parametrize("mode", ["recompute", "batch"])
def test_predictions_agree_with_evaluate_for_a_batchnorm_cnn(mode):
    from .conftest import image_task

    ds = image_task(64, 40)
    prob = lg.Problem(lg.models.cnn((1, 8, 8), [4], 3, batchnorm=True), ds, device="cpu", batchnorm=mode, bn_batch=16,
                      memory_mb=0.01)
    theta = prob.init(3, seed=0)
    out, ev = prob.predictions(theta, "test"), prob.evaluate(theta, "test")
    y = prob.data["test"][1]
    assert out["prediction"].shape == (3, 40)
    assert torch.allclose(out["loss"].mean(1), ev["loss"], atol=1e-5)
    assert torch.allclose((out["prediction"] == y).float().mean(1), ev["accuracy"])
    one = prob.predictions(theta[0], x=prob.data["test"][0], y=y)
    assert torch.equal(one["prediction"], out["prediction"][0])


def test_token_sequences_get_token_corruption_and_images_the_image_shifts():
    ds = lg.datasets.load("modular", p=7, op="add", train_fraction=0.5, seed=0)
    assert X.corruption_plan(tuple(ds.shape), ds.info) == X.TOKEN_CORRUPTIONS
    x = ds.x_test
    t = X.corrupt(x, "tokens", 0.5, vocab=int(ds.info["vocab"]), seed=0)
    assert t.shape == x.shape and bool((t == t.round()).all()) and int(t.max()) < int(ds.info["vocab"])
    assert X.corruption_plan((1, 8, 8), {}) == X.IMAGE_CORRUPTIONS and X.corruption_plan((5,), {}) == X.FLAT_CORRUPTIONS
