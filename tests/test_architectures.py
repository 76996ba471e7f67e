"""Beyond one hidden layer (issue 17): the ResNet (traced graph, grouped convolutions, recomputed BatchNorm) and the
transformer (vmap, token inputs) through every protocol; the modular arithmetic data; AdamW; snapshots at chosen
steps and the timeline stage of the grokking preset."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import lossglass as lg
from lossglass.protocols import curvature as K
from lossglass.symmetry import spec_of

from .conftest import image_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return image_task(64, 32)


@pytest.fixture(scope="module")
def res64(images):
    return lg.Problem(lg.models.resnet(8, 2, (1, 8, 8), 3), images, dtype=torch.float64)


@pytest.fixture(scope="module")
def res32(images):
    return lg.Problem(lg.models.resnet(8, 2, (1, 8, 8), 3), images)


@pytest.fixture(scope="module")
def tokens():
    return lg.datasets.load("modular", p=7, op="add", train_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def tf64(tokens):
    return lg.Problem(lg.models.transformer(8, 3, 7, d_model=8, n_heads=2, d_mlp=12), tokens, dtype=torch.float64)


@pytest.fixture(scope="module")
def tf32(tokens):
    return lg.Problem(lg.models.transformer(8, 3, 7, d_model=8, n_heads=2, d_mlp=12), tokens)


# ---------------------------------------------------------------------------- the two models in a Problem
def test_resnet_energy_and_gradient_are_those_of_the_module_with_training_set_statistics(res64):
    prob = res64
    assert prob.batchnorm == "recompute" and prob.backend.name == "graph" and len(prob.backend.bn_layers) == 9
    theta = prob.init(3, 0)
    x, y = prob.data["train"]
    e, g = prob.energy_and_grad(theta)
    for k in range(3):
        m = prob.to_module(theta[k])
        loss = F.cross_entropy(m.train()(x), y)  # one batch = the training set: its statistics
        assert float(e[k]) == pytest.approx(float(loss), abs=1e-12)
        ref = torch.autograd.grad(loss, list(m.parameters()))
        assert torch.allclose(g[k], torch.cat([r.reshape(-1) for r in ref]), atol=1e-12)
        # to_module carries the statistics at theta: eval mode reproduces evaluate()
        assert float(F.cross_entropy(prob.to_module(theta[k]).eval()(x), y)) == pytest.approx(float(e[k]), abs=1e-12)
    # the BatchNorm statistics of one replica do not depend on which replicas are evaluated beside it
    assert float((prob.energy(theta[1:2]) - e[1]).abs()) < 1e-13
    # the exact derivative over several chunks (statistics of the whole set, not of each chunk)
    small = lg.Problem(prob.model, prob.dataset, dtype=torch.float64, memory_mb=0.05)
    assert small.chunk_size(3) < len(y)
    e2, g2 = small.energy_and_grad(theta)
    assert torch.allclose(e2, e, atol=1e-12) and torch.allclose(g2, g, atol=1e-11)
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(small.hvp(theta, v), prob.hvp(theta, v), atol=1e-9)


def test_transformer_reads_float_token_ids_and_matches_the_module(tf64, tokens):
    prob = tf64
    assert prob.batchnorm == "recompute" and prob.backend.name == "vmap"  # the vmap path
    assert torch.equal(tokens.x_train, tokens.x_train.round()) and tokens.x_train.dtype == torch.float32
    theta = prob.init(2, 0)
    x, y = prob.data["train"]
    e, g = prob.energy_and_grad(theta)
    m = prob.to_module(theta[1])
    loss = F.cross_entropy(m(x.long()), y)  # the module also takes integer tokens
    assert float(e[1]) == pytest.approx(float(loss), abs=1e-12)
    ref = torch.autograd.grad(loss, list(m.parameters()))
    assert torch.allclose(g[1], torch.cat([r.reshape(-1) for r in ref]), atol=1e-12)


@pytest.mark.parametrize("name", ["res32", "tf32"])
def test_derived_spec_preserves_outputs_and_alignment_recovers_the_permutation(name, request):
    prob = request.getfixturevalue(name)
    spec = spec_of(prob)
    if name == "tf32":
        assert {"blocks.0.attn.heads", "blocks.0.attn.qk", "blocks.0.attn.vo"} <= set(spec.perms)
        assert ("tok.weight", 1) in spec.perms["P0"] and ("unembed.weight", 1) in spec.perms["P0"]  # the stream
    else:
        assert ("layers.0.conv2.weight", 0) in spec.perms["P0"]  # the stem and the first block's output: one stream
    theta = lg.train(prob, 1, epochs=3, batch_size=16, lr=0.05, progress=False).theta[0]
    perm = lg.random_permutation(prob, seed=3)
    moved = lg.permute(prob, theta, perm)
    assert float((moved - theta).abs().max()) > 1e-2
    x = prob.data["test"][0]
    stats_a = prob.evaluation_statistics(theta[None])
    stats_b = prob.evaluation_statistics(moved[None])
    out_a, out_b = prob.forward(theta[None], x, stats_a), prob.forward(moved[None], x, stats_b)
    assert float((out_a - out_b).abs().max()) < 1e-5
    aligned, found = lg.align(prob, theta, moved)
    assert torch.equal(aligned, theta)
    assert all(torch.equal(found[n], perm[n].argsort()) for n in perm)  # the inverse of the applied permutation


@pytest.mark.parametrize("name", ["res32", "tf32"])
def test_every_protocol_runs_end_to_end(name, request):
    prob = request.getfixturevalue(name)
    reps = lg.train(prob, 4, epochs=2, batch_size=16, lr=0.05 if name == "res32" else 0.01,
                    optimizer="sgd" if name == "res32" else "adamw", progress=False)
    assert bool(reps.alive.all())
    theta = reps.theta
    walk = lg.random_walk(prob, theta[0], n_walkers=2, steps=3, step_size=0.01, normalize="filter", progress=False)
    assert walk.energy.shape == (4, 2) and torch.isfinite(walk.energy).all()
    assert len(lg.basin_radius(walk, [0.1])) == 2
    perm = lg.permutation_barriers(prob, theta[0], swaps=(0, 2), n_points=5)
    assert perm["barrier"].iloc[0] == 0.0 and perm["distance"].iloc[0] == 0.0  # k = 0: the path stays at theta
    assert perm["distance"].iloc[1] > 0
    pairs, naive, aligned = lg.pair_barriers(prob, theta, pairs=2, n_points=5)
    assert len(pairs) == 2 and np.isfinite(pairs[["barrier_naive", "barrier_aligned"]].to_numpy()).all()
    assert (pairs["distance_aligned"] <= pairs["distance_naive"] + 1e-6).all()
    q = lg.overlaps(prob, theta)
    assert torch.allclose(q, q.T) and torch.allclose(q.diagonal(), torch.ones(4, dtype=q.dtype))
    assert not torch.allclose(q, lg.overlaps(prob, theta, align=False))  # the alignment moved the replicas
    pq = lg.overlap_distribution(q)
    assert len(pq.q) == 6
    eig = K.top_eigenvalues(prob, theta[:2], k=1, tol=1e-2)
    assert eig.values.shape == (2, 1) and bool(torch.isfinite(eig.values).all())
    tr = K.trace(prob, theta[:1], n_probes=3)
    assert bool(torch.isfinite(tr["trace"]).all())
    assert bool(torch.isfinite(lg.sharpness(prob, theta[:2], 0.05, n_samples=2)).all())


# ---------------------------------------------------------------------------- data, optimiser, snapshots
def test_modular_data_are_the_arithmetic_tables():
    for op, fn in (("add", lambda a, b: a + b), ("sub", lambda a, b: a - b), ("mul", lambda a, b: a * b)):
        ds = lg.datasets.load("modular", p=11, op=op, train_fraction=0.3, seed=4)
        x = torch.cat([ds.x_train, ds.x_test]).long()
        y = torch.cat([ds.y_train, ds.y_test])
        assert len(y) == 121 and len(ds.y_train) == round(0.3 * 121)
        assert torch.equal(y, fn(x[:, 0], x[:, 1]) % 11) and bool((x[:, 2] == 11).all())
        assert len({(int(a), int(b)) for a, b in x[:, :2]}) == 121  # every equation once, in one split
    ds = lg.datasets.load("modular", p=7, op="div", train_fraction=0.5, seed=0)
    x, y = torch.cat([ds.x_train, ds.x_test]).long(), torch.cat([ds.y_train, ds.y_test])
    assert len(y) == 42 and torch.equal((y * x[:, 1]) % 7, x[:, 0])
    a, b = lg.datasets.load("modular", p=11, seed=1), lg.datasets.load("modular", p=11, seed=1)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, lg.datasets.load("modular", p=11).x_train)
    with pytest.raises(lg.LossglassError, match="needs a prime p"):
        lg.datasets.load("modular", p=9, op="div")


def test_adamw_decays_decoupled_from_the_gradient():
    zero = lg.Problem.from_function(lambda t: 0 * t.sum(1), 5, dtype=torch.float64)  # gradient 0
    theta0 = torch.ones(2, 5, dtype=torch.float64)
    out = lg.train(zero, 2, epochs=10, lr=0.1, optimizer="adamw", weight_decay=0.5, theta0=theta0, progress=False)
    assert torch.allclose(out.theta, theta0 * (1 - 0.1 * 0.5) ** 10, rtol=1e-12)  # no gradient: pure decay
    coupled = lg.train(zero, 2, epochs=10, lr=0.1, optimizer="adam", weight_decay=0.5, theta0=theta0, progress=False)
    assert not torch.allclose(coupled.theta, out.theta)  # Adam normalises the L2 gradient away: a different update
    with pytest.raises(lg.LossglassError, match="langevin"):
        lg.train(zero, 1, epochs=1, optimizer="adamw", method="langevin", progress=False)


def test_snapshots_at_chosen_steps_are_the_replicas_at_those_steps(tf64):
    kw = dict(batch_size=12, lr=0.01, optimizer="adamw", weight_decay=0.1, progress=False, evaluate=False)
    full = lg.train(tf64, 2, epochs=3, keep_at=[0, 1, 2, 5], **kw)  # 2 steps per epoch
    assert full.snapshot_steps == [0, 1, 2, 5] and full.snapshots.shape == (4, 2, tf64.n_params)
    assert torch.equal(full.snapshots[0], tf64.init(2, 0))
    one = lg.train(tf64, 2, epochs=1, **kw)
    assert torch.equal(full.snapshots[2], one.theta)  # step 2 = the end of epoch 1, as a run of one epoch
    assert not torch.equal(full.snapshots[1], full.snapshots[2])
    assert torch.equal(full[[1]].snapshots[:, 0], full.snapshots[:, 1])
    with pytest.raises(lg.LossglassError, match="keep_at steps must be in 0..6"):
        lg.train(tf64, 1, epochs=3, keep_at=[7], **kw)


def test_grokking_preset_at_tiny_size_keeps_snapshots_and_measures_the_timeline(tmp_path):
    from lossglass.protocols.timeline import TIMELINE_COLUMNS
    from lossglass.stages.train import keep_steps

    overrides = ["data.p=7", "model.d_model=8", "model.n_heads=2", "train.epochs=6", "train.batch_size=8",
                 "train.keep_at=[0, 3, 9, 18]", "timeline.walk_steps=3", "timeline.walkers=2", "timeline.n_points=3"]
    store = lg.run_study("grokking", tmp_path / "run", stages=("train", "timeline"), overrides=overrides,
                         progress=False)
    snaps = store.read_tensors("snapshots")
    assert snaps["steps"].tolist() == [0, 3, 9, 18] and snaps["theta"].shape[:2] == (4, 4)
    theta = store.read_tensors("replicas")["theta"]
    assert torch.equal(snaps["theta"][-1], theta)  # 6 epochs of 3 steps: the last snapshot is the end of training
    tl = store.read_table("timeline")
    assert list(tl.columns) == list(TIMELINE_COLUMNS)
    rows = tl[tl["kind"] == "replica"]
    assert sorted(rows["step"].unique()) == [0, 3, 9, 18] and len(rows) == 16 and len(tl[tl["kind"] == "pair"]) == 8
    assert rows[["lambda_max", "train_accuracy", "basin_radius"]].notna().all().all()
    assert (tl[tl["kind"] == "pair"]["barrier_aligned"] >= -1e-6).all()
    last = rows[rows["step"] == 18].sort_values("replica")
    assert np.allclose(last["train_accuracy"], store.read_table("replicas")["train_accuracy"], atol=1e-6)
    assert keep_steps("log", 5, 1000) == [0, 1, 10, 100, 1000]
    assert keep_steps([5, 0, 5], 12, 10) == [0, 5]
    # the report and the dashboard show it
    from lossglass.dashboard.collect import _panels
    from lossglass.report import build_report
    from lossglass.report.base import RunView

    html = open(build_report(store)).read()
    assert 'id="timeline"' in html and "4 snapshots from step 0 to 18" in html
    assert (store.path / "figures" / "timeline.png").exists()
    assert any(sec["id"] == "timeline" for sec in _panels(RunView(store), "r0"))


def _curve(train, test, lam=(1.0, 1.0, 1.0, 1.0)):
    steps = [0, 10, 100, 1000]
    rows = [{"step": s, "kind": "replica", "replica": r, "train_accuracy": a, "test_accuracy": b, "lambda_max": l_,
             "basin_radius": 1.0, "weight_norm": 5.0} for s, a, b, l_ in zip(steps, train, test, lam) for r in (0, 1)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("train,test,said,not_said", [
    ((0.1, 1.0, 1.0, 1.0), (0.1, 0.3, 0.5, 0.95), "only at step 1000, 100.0× later than memorisation (grokking)",
     "no delayed"),
    ((0.1, 1.0, 1.0, 1.0), (0.1, 0.95, 0.96, 0.97), "no delayed generalisation", "grokking"),
    ((0.1, 0.5, 0.6, 0.7), (0.1, 0.3, 0.4, 0.5), "never memorise", "grokking"),
    ((0.1, 1.0, 1.0, 1.0), (0.1, 0.2, 0.3, 0.4), "no generalisation step within the run", "grokking"),
])
def test_timeline_caption_follows_constructed_curves(train, test, said, not_said):
    from lossglass.report import timeline as T

    class View:
        def table(self, name):
            return _curve(train, test, lam=(1.0, 2.0, 50.0, 10.0))

    text = T.caption(T.timeline_data(View()))
    assert said in text and not_said not in text, text
    if "grokking" in said:
        assert "λ_max falls (2 → 10)" not in text and "λ_max rises (2 → 10)" in text  # memorised at 10, grokked at 1000
