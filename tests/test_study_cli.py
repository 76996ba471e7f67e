import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.cli import main
from lossglass.config import load_config, presets

SMALL = """
name = "small"
seed = 1
[data]
name = "digits"
n_train = 600
n_test = 200
[model]
hidden = 12
[train]
replicas = 6
epochs = {epochs}
batch_size = 32
lr = 0.05
[walk]
n_walkers = 3
steps = 12
step_size = 0.01
temperatures = ["none", 0.01]
record_every = 4
langevin_steps = 6
langevin_temperature = 0.001
[connect]
swaps = [0, 2, 4]
pairs = 2
bezier_steps = 10
plane_steps = 5
widths = [4, 8]
width_replicas = 2
[curvature]
trace_probes = 6
n_samples = 4
slq_steps = 8
[reference]
enabled = true
n_spins = 20
replicas = 6
steps = 100
sk_spins = 24
sk_replicas = 8
sk_sweeps = 200
sk_samples = 2
sk_temperatures = [0.4, 0.8, 1.2, 1.6]
[replicas]
basin_temperature = 0.01
basin_samples = 6
basin_sweeps = 20
basin_n_data = 200
"""


def _cfg(tmp_path, epochs=2, extra=""):
    p = tmp_path / "cfg.toml"
    p.write_text(SMALL.format(epochs=epochs) + extra)
    return p


def test_full_study_writes_every_table_and_a_report(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet"]) == 0
    store = lg.RunStore(out, create=False)
    for t in ("replicas", "walk", "walk_summary", "walk_msd", "walk_aging", "perm_barriers", "pair_barriers", "paths",
              "plane_random", "plane_through", "width_barriers", "width_barrier_fit", "replica_summary", "pq",
              "flatness", "kendall", "spectral_density", "reference_energies"):
        assert store.has_table(t), t
        assert len(pd.read_parquet(store.table_path(t))) > 0, t
    summary = store.read_table("replica_summary")
    assert {"network-aligned", "network-raw", "network-functions"} <= set(summary["system"])
    ref = store.read_table("reference_summary")
    assert {"3-spin descent minima (threshold states)", "convex control (one well)", "SK all samples (T = 0.4)"} <= set(
        ref["system"])
    assert {"network-basin"} <= set(summary["system"]) and summary["verdict"].notna().all()
    assert store.has_table("reference_sk_ladder") and "SK T = 0.4 (2 disorder samples)" in set(
        store.read_table("reference_pq")["label"])
    theta = store.read_tensors("replicas")["theta"]
    assert theta.shape[0] == 6
    # every column of every table is documented (docs/tables.md comes from the same registry)
    from lossglass.columns import describe

    undocumented = [f"{t}.{c}" for t in store.tables() for c in store.read_table(t).columns if describe(t, c) is None]
    assert not undocumented, undocumented
    html = (out / "report.html").read_text()
    assert "Protocol 1" in html and "Protocol 4" in html and "incomplete" not in html
    assert (out / "figures" / "perm_barriers.svg").exists() and (out / "figures" / "pq.png").exists()
    # a second run of the same command recomputes nothing
    capsys.readouterr()
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "train: done already, skipped" in err and "curvature: done already" in err
    # report rebuilt from saved data is byte-for-byte stable apart from its timestamp
    from lossglass.report import build_report

    build_report(out, timestamp="T")
    a = (out / "report.html").read_bytes()
    svg = (out / "figures" / "walk_msd.svg").read_bytes()
    build_report(out, timestamp="T")
    assert (out / "report.html").read_bytes() == a
    assert (out / "figures" / "walk_msd.svg").read_bytes() == svg
    # info and export
    assert main(["info", str(out)]) == 0
    assert "replicas: 6 x" in capsys.readouterr().out
    assert main(["export", str(out), "--format", "csv"]) == 0
    assert pd.read_csv(out / "csv" / "replicas.csv").shape[0] == 6
    # a protocol sub-command with new options recomputes that stage only
    assert main(["walk", str(out), "--set", "walk.steps=5", "--quiet"]) == 0
    w = store.read_table("walk")
    assert w[w["kind"] == "walk"]["step"].max() == 5 and w[w["kind"] == "langevin"]["step"].max() == 6


def test_config_errors_are_one_clear_line(tmp_path, capsys):
    bad = [("[train]\nrepliccas = 3\n", "unknown key 'train.repliccas'"),
           ("[model]\nhidden = -4\n", "model.hidden"), ("[train]\nepochs = \"many\"\n", "train.epochs"),
           ("[data]\nname = \"imagenet\"\n", "data.name"), ("this is not toml", "not valid TOML")]
    for text, msg in bad:
        p = tmp_path / "bad.toml"
        p.write_text(text)
        assert main(["run", str(p), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["run", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert main(["run", "--preset", "quickstart", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    p = _cfg(tmp_path, extra="")
    p.write_text(p.read_text().replace('name = "digits"', 'name = "mnist"\ndata_dir = "/nonexistent"'))
    assert main(["run", str(p), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err


def test_presets_listed_valid_and_overridable(capsys):
    names = presets()
    assert {"quickstart", "paper", "lmc-width", "flatness", "spin-glass"} <= set(names)
    for n in names:
        load_config(preset=n)
    cfg = load_config(preset="paper", overrides=["walk.steps=5000", "model.hidden=512"])
    assert cfg.walk.steps == 5000 and cfg.model.hidden == 512
    assert main(["presets", "--show", "paper"]) == 0
    assert "[walk]" in capsys.readouterr().out


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    cfg = _cfg(tmp_path, epochs=40)
    ref = tmp_path / "ref"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--quiet", "--stages", "train,walk"]
    subprocess.run(cmd + ["--out", str(ref)], check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(out.glob("checkpoints/train-*.safetensors")) and time.time() - t0 < 120:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "train.json").exists(), "the run finished before it could be killed"
    subprocess.run(cmd + ["--out", str(out)], check=True, env=env, capture_output=True)
    a = lg.RunStore(ref, create=False)
    b = lg.RunStore(out, create=False)
    assert torch.equal(a.read_tensors("replicas")["theta"], b.read_tensors("replicas")["theta"])
    pd.testing.assert_frame_equal(a.read_table("replicas"), b.read_table("replicas"))
    pd.testing.assert_frame_equal(a.read_table("walk"), b.read_table("walk"))


class _Killed(Exception):
    pass


def test_walk_stage_resumes_mid_walk_from_its_checkpoint(tmp_path, monkeypatch):
    """The walk stage dies part-way through a walk; run again, it resumes from the walkers' checkpoint (exactly
    WALK_CHECKPOINT_EVERY fewer energy evaluations than a walk from the start) and its table equals that of a run
    that was never interrupted."""
    from lossglass.problem import Problem
    from lossglass.stages.walk import WALK_CHECKPOINT_EVERY

    steps = 2 * WALK_CHECKPOINT_EVERY + 10
    (tmp_path / "long.toml").write_text(_cfg(tmp_path).read_text().replace("steps = 12", f"steps = {steps}"))
    run = ["run", str(tmp_path / "long.toml"), "--quiet", "--stages"]
    orig, calls = Problem.evaluate, {"n": 0, "die": None}

    def counting(self, theta, split="train"):
        if split == "train":
            calls["n"] += 1
            if calls["die"] is not None and calls["n"] > calls["die"]:
                raise _Killed
        return orig(self, theta, split)

    monkeypatch.setattr(Problem, "evaluate", counting)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    for folder in (ref, out):
        assert main(run + ["train", "--out", str(folder)]) == 0
    calls.update(n=0)
    assert main(run + ["walk", "--out", str(ref)]) == 0
    uninterrupted = calls["n"]
    calls.update(n=0, die=WALK_CHECKPOINT_EVERY + 20)  # dies in the first walk, after its checkpoint at step 50
    with pytest.raises(_Killed):
        main(run + ["walk", "--out", str(out)])
    assert list(out.glob("checkpoints/walk-*.safetensors")), "no walk checkpoint was written"
    calls.update(n=0, die=None)
    assert main(run + ["walk", "--out", str(out)]) == 0
    assert calls["n"] == uninterrupted - WALK_CHECKPOINT_EVERY, (calls["n"], uninterrupted)
    a, b = lg.RunStore(ref, create=False), lg.RunStore(out, create=False)
    pd.testing.assert_frame_equal(a.read_table("walk"), b.read_table("walk"))
    assert not list(out.glob("checkpoints/walk-*")), "the walk checkpoints outlived the stage"


def test_changed_config_in_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet", "--stages", "train"]) == 0
    assert main(["run", str(_cfg(tmp_path, epochs=3)), "--out", str(out), "--quiet", "--stages", "train"]) == 2
    assert "different config" in capsys.readouterr().err


def test_report_of_an_incomplete_or_missing_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet", "--stages", "train"]) == 0
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "This run is incomplete" in html and "stage walk not finished" in html
    assert "replicas_accuracy" in html
    assert main(["walk", str(tmp_path / "nothing")]) == 2


def test_stale_task_results_are_discarded_when_options_change(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(_cfg(tmp_path)), "--out", str(out), "--quiet", "--stages", "train,walk"]) == 0
    store = lg.RunStore(out, create=False)
    # an interrupted walk with other options left a task result behind (named after those options' fingerprint)
    from lossglass.study import Study

    cfg = load_config(_cfg(tmp_path))
    tag = Study(cfg, out).fingerprint("walk")[:10]
    stale = pd.DataFrame({"x": [1]})
    store.write_table(f"tasks/walk-{tag}-0", stale)
    store.write_tensors(f"tasks/walk-{tag}-0", {"energy": torch.zeros(1)})
    store.write_json(f"tasks/walk-{tag}-0.json", {"kind": "walk", "params": {}, "test_steps": [0], "snapshot_steps": [0]})
    assert main(["walk", str(out), "--set", "walk.steps=4", "--quiet"]) == 0
    assert not list(out.glob("tasks/*")), "stale task files were left behind"
    w = store.read_table("walk")
    assert w[w["kind"] == "walk"]["step"].max() == 4
    # --force with a new config starts over, without reusing any task file
    store.write_tensors("tasks/train-x-0-0-6", {"theta": torch.zeros(6, 3)})
    assert main(["run", str(_cfg(tmp_path, epochs=3)), "--out", str(out), "--quiet", "--stages", "train",
                 "--force"]) == 0
    assert store.read_tensors("replicas")["theta"].shape[1] > 3
