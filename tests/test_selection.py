"""Model selection (issue 14): the validation split chooses, the test split grades; the words say whether flatness
added anything, and they are right on runs where the answer is known by construction."""

import numpy as np
import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.cli import main
from lossglass.selection import evaluate_strategies, verdict

from .test_run_folder import TINY


def _pool(seed, k=40):
    rng = np.random.default_rng(seed)
    test = 0.80 + 0.01 * rng.normal(size=k)
    val = test + 0.05 * rng.normal(size=k)  # a very noisy judge of test accuracy
    return rng, test, val


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flatness_verdicts_on_pools_with_known_answers(seed):
    rng, test, val = _pool(seed)
    useless = rng.normal(size=len(test))  # independent of everything: ranking by it is arbitrary
    helpful = -test  # flatter = better on the test split, exactly
    harmful = test
    kw = dict(n_val=500, n_resamples=1000, n_boot=200, seed=seed)
    tab = evaluate_strategies(val, test, useless, **kw)
    assert verdict(tab, "flattest-within-1se") == "nothing detectable" and verdict(tab, "flattest") != "helped"
    assert verdict(evaluate_strategies(val, test, helpful, **kw), "flattest") == "helped"
    assert verdict(evaluate_strategies(val, test, harmful, **kw), "flattest") == "hurt"
    by = evaluate_strategies(val, test, helpful, **kw).set_index("strategy")["expected_test_accuracy"]
    assert by["flattest"] > by["best-val"] > by["random"] - 0.01
    assert tab["ci_low"].le(tab["expected_test_accuracy"]).all() and tab["ci_high"].ge(tab["expected_test_accuracy"]).all()


def test_validation_split_is_carved_from_training_and_disjoint():
    ds = lg.datasets.load("digits", n_train=600, n_test=200, seed=1)
    v = ds.with_validation(150, seed=3)
    assert len(v.y_train) == 450 and v.n_val == 150 and torch.equal(v.x_test, ds.x_test)
    rows = {tuple(r) for r in ds.x_train.numpy().round(5)}
    tr = {tuple(r) for r in v.x_train.numpy().round(5)}
    va = {tuple(r) for r in v.x_val.numpy().round(5)}
    assert tr | va <= rows and not (tr & va)
    assert torch.equal(v.x_val, ds.with_validation(150, seed=3).x_val)
    with pytest.raises(lg.LossglassError, match="leaves no training samples"):
        ds.with_validation(600)


def _run(tmp_path, extra=""):
    cfg = tmp_path / "sel.toml"
    cfg.write_text(TINY.replace("n_test = 100", "n_test = 150\nn_val = 150").replace("replicas = 4", "replicas = 12")
                   + extra)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


def test_select_command_words_follow_constructed_answers(tmp_path, capsys):
    out = _run(tmp_path)
    store = lg.RunStore(out, create=False)
    reps = store.read_table("replicas")
    assert {"val_accuracy", "val_loss"} <= set(reps.columns) and reps["val_accuracy"].notna().all()
    flat = store.read_table("flatness")
    rng = np.random.default_rng(0)
    # useless by construction: every replica has the same curvature up to noise (they differ in a direction that
    # does not change it), so ranking by it cannot add anything
    flat["sharpness_average"] = 1.0 + 1e-9 * rng.normal(size=len(flat))
    store.write_table("flatness", flat)
    capsys.readouterr()
    assert main(["select", str(out), "--strategy", "flattest"]) == 0
    said = capsys.readouterr().out
    assert "added nothing detectable" in said and "the test split only grades" in said
    # helpful by construction: validation says nothing (a coin toss per replica) and the measure tracks the test
    # accuracy itself
    noisy = reps.copy()
    noisy["val_accuracy"] = 0.5 + 0.01 * rng.permutation(len(noisy)) / len(noisy)
    store.write_table("replicas", noisy)
    flat["sharpness_average"] = -reps.set_index("replica").loc[flat["replica"], "test_accuracy"].to_numpy()
    store.write_table("flatness", flat)
    capsys.readouterr()
    assert main(["select", str(out), "--strategy", "flattest"]) == 0
    said = capsys.readouterr().out
    d = store.read_json("selection.json")
    assert d["test_accuracy"] == pytest.approx(reps["test_accuracy"].max())  # the flattest is now the best
    assert "Flatness helped on this run" in said and d["verdict"] == "helped"
    # the export is a state_dict loadable with strict=True into the user's model
    cfg = lg.config.load_config(out / "config.toml")
    prob = lg.study.build_problem(cfg)
    from safetensors.torch import load_file

    m = lg.models.mlp(64, 8, 10)
    m.load_state_dict(load_file(str(out / d["exported"])), strict=True)
    theta = prob.flatten(m)
    ev = prob.evaluate(theta, "test")
    assert float(ev["accuracy"]) == pytest.approx(d["test_accuracy"], abs=1e-6)
    tab = store.read_table("selection")
    assert {"best-val", "flattest", "flattest-within-1se", "random", "merged", "pool median"} <= set(tab["strategy"])


def test_coupled_replicas_get_no_independence_interval(tmp_path, capsys):
    out = _run(tmp_path, extra='\n[[train.groups]]\nmethod = "replicated"\nreplicas = 12\n')
    d = lg.RunStore(out, create=False).read_json("selection.json")
    assert d["coupled"] and d["verdict"] is None
    assert main(["select", str(out)]) == 0
    said = capsys.readouterr().out
    assert "coupled by design" in said and "95% interval" not in said


def test_select_without_a_validation_split_says_how_to_get_one(tmp_path):
    cfg = tmp_path / "noval.toml"
    cfg.write_text(TINY)
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    rec = lg.RunStore(out, create=False).stages()["select"]
    assert "data.n_val" in rec["skipped"]
    assert not (out / "selection.json").exists()
    assert pd.isna(rec.get("replica"))
