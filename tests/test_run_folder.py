"""The run folder can be trusted (issue 18) and a folder from someone else cannot hurt (issue 19): each test here
failed on the code before these fixes."""

import os
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.cli import main

from .test_study_cli import _cfg

TINY = """
name = "tiny"
seed = 2
[data]
name = "digits"
n_train = 300
n_test = 100
[model]
hidden = 8
[train]
replicas = 4
epochs = 1
batch_size = 32
lr = 0.05
[walk]
enabled = false
[connect]
enabled = false
[replicas]
enabled = false
[curvature]
trace_probes = 3
n_samples = 2
slq_steps = 4
top_k = 1
density = false
n_hvp_data = 100
"""


def _tiny(tmp_path, extra="", name="tiny.toml"):
    p = tmp_path / name
    p.write_text(TINY + extra)
    return p


def _run(*args):
    return main(["run", *map(str, args), "--quiet"])


def _with_val(path):
    """A tiny config with a validation split, so that select chooses and exports a replica."""
    path.write_text(path.read_text().replace("n_test = 100", "n_test = 100\nn_val = 60"))
    return path


def test_force_with_fewer_stages_leaves_nothing_of_the_old_run(tmp_path):
    out = tmp_path / "r"
    assert _run(_with_val(_tiny(tmp_path)), "--out", out) == 0
    for old in ("tables/flatness.parquet", "tables/kendall.parquet", "selection.json", "figures/flatness_vs_gap.png"):
        assert (out / old).exists(), old
    assert list((out / "selected").glob("*.safetensors"))
    (out / "my-notes.txt").write_text("mine")  # a user's own file in the folder
    cfg = _with_val(_tiny(tmp_path, name="new.toml"))
    cfg.write_text(cfg.read_text().replace("lr = 0.05", "lr = 0.02").replace("[curvature]", "[curvature]\nenabled = false"))
    assert _run(cfg, "--out", out, "--force") == 0
    store = lg.RunStore(out, create=False)
    assert set(store.tables()) == {"replicas"}
    assert not (out / "selection.json").exists() and not (out / "selected").exists()
    assert not (out / "figures" / "flatness_vs_gap.png").exists()
    html = (out / "report.html").read_text()
    assert "Model to ship" not in html and "Protocol 4" not in html
    assert (out / "my-notes.txt").read_text() == "mine"


def test_protocol_commands_refuse_options_of_earlier_stages(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train") == 0
    before = (out / "config.toml").read_text()
    assert main(["walk", str(out), "--set", "train.lr=0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "new replicas" in err
    assert main(["walk", str(out), "--set", "data.n_train=50", "--quiet"]) == 2
    assert (out / "config.toml").read_text() == before


_FACTORY = """
import torch


def data():
    g = torch.Generator().manual_seed({seed})
    x = torch.randn(120, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return x[:90], y[:90], x[90:], y[90:]
"""


def test_edited_data_factory_redoes_the_stages_that_used_it(tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "mydata.py").write_text(_FACTORY.format(seed=0))
    cfg = tmp_path / "byo.toml"
    cfg.write_text('name = "byo"\n[data]\nfactory = "mydata:data"\n[model]\nhidden = 4\n[train]\nreplicas = 2\nepochs = 1\n'
                   "batch_size = 30\n")
    out = tmp_path / "r"
    env = dict(os.environ, PYTHONPATH=f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--out", str(out), "--stages", "train"]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    first = lg.RunStore(out, create=False).read_tensors("replicas")["theta"]
    again = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    assert "done already, skipped" in again.stderr
    (pkg / "mydata.py").write_text(_FACTORY.format(seed=1))
    redo = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    assert "inputs changed" in redo.stderr and "train: finished" in redo.stderr
    second = lg.RunStore(out, create=False).read_tensors("replicas")["theta"]
    assert not torch.equal(first, second)  # retrained on the new data
    meta = lg.RunStore(out, create=False).read_json("meta.json")
    assert "data.factory" in meta["inputs"]["code"]


def test_failed_start_leaves_the_folder_usable(tmp_path, capsys):
    out = tmp_path / "r"
    bad = _tiny(tmp_path, name="bad.toml")
    bad.write_text(bad.read_text().replace('name = "digits"', 'name = "mnist"\ndata_dir = "/nonexistent/folder"'))
    assert _run(bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert "--set data.data_dir=" in err or "data.data_dir" in err
    assert not (out / "config.toml").exists()
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--device", "cuda"]) in (0, 2)
    if not torch.cuda.is_available():
        assert not (out / "config.toml").exists()
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train") == 0


def test_every_option_is_checked_at_load_time(tmp_path, capsys):
    for setting, key in (("curvature.trace_probes=2", "curvature.trace_probes"), ("curvature.slq_steps=1", "slq_steps"),
                         ("connect.n_points=1", "connect.n_points"), ("connect.plane_steps=1", "plane_steps"),
                         ("walk.deltas=[]", "walk.deltas"), ("name='../../x'", "name")):
        assert main(["run", str(_tiny(tmp_path)), "--out", str(tmp_path / "x"), "--set", setting]) == 2
        err = capsys.readouterr().err
        assert key in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


def test_selection_cannot_fail_a_measurement_stage(tmp_path):
    # every replica has the same gap (perfectly separable data, all at 100%): Kendall's tau is undefined
    pkg = tmp_path / "sep"
    pkg.mkdir()
    (pkg / "sepdata.py").write_text(
        "import torch\n\ndef data():\n    x = torch.cat([torch.full((40, 3), 5.0), torch.full((40, 3), -5.0)])\n"
        "    y = torch.cat([torch.zeros(40), torch.ones(40)]).long()\n    return x, y, x[::4], y[::4]\n")
    sys.path.insert(0, str(pkg))
    try:
        cfg = tmp_path / "sep.toml"
        cfg.write_text(TINY.replace('name = "digits"\nn_train = 300\nn_test = 100', 'factory = "sepdata:data"'))
        out = tmp_path / "r"
        assert _run(cfg, "--out", out) == 0
        store = lg.RunStore(out, create=False)
        assert store.stage_done("curvature") and store.stage_done("select")
        assert _run(cfg, "--out", out) == 0  # and a re-run does not fail either
    finally:
        sys.path.remove(str(pkg))


def test_import_records_its_sources_and_never_retrains(tmp_path, capsys):
    src = tmp_path / "src"
    assert _run(_tiny(tmp_path), "--out", src, "--stages", "train") == 0
    theta = lg.RunStore(src, create=False).read_tensors("replicas")["theta"][:3]
    cfg = lg.config.load_config(_tiny(tmp_path))
    prob = lg.study.build_problem(cfg)
    out = tmp_path / "imp"
    ck = out / "checkpoints"  # the checkpoints live inside the run folder
    ck.mkdir(parents=True)
    for i in range(3):
        torch.save(prob.to_module(theta[i]).state_dict(), ck / f"epoch{i}.pt")
    assert main(["import", str(ck), "--config", str(_tiny(tmp_path)), "--out", str(out), "--quiet"]) == 0
    store = lg.RunStore(out, create=False)
    t = store.read_table("replicas")
    assert list(t["source"]) == ["epoch0.pt", "epoch1.pt", "epoch2.pt"] and t["sha256"].str.len().eq(64).all()
    assert t["seed"].isna().all()
    saved = lg.config.load_config(out / "config.toml")
    assert saved.train.replicas == 3 and saved.name == "imp"
    assert store.read_json("meta.json")["sources"]["epoch1.pt"] == t["sha256"][1]
    # the suggested next command works and never retrains over the imported replicas, even with --force
    assert main(["run", str(out / "config.toml"), "--out", str(out), "--quiet", "--force"]) == 0
    assert torch.equal(store.read_tensors("replicas")["theta"], theta)
    assert sorted(p.name for p in ck.iterdir()) == ["epoch0.pt", "epoch1.pt", "epoch2.pt"]  # the user's files stay
    html = (out / "report.html").read_text()
    assert "imported" in html and "differ only in their random seed" not in html
    # importing again with --force replaces the import and still leaves the checkpoints alone
    assert main(["import", str(ck), "--config", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--force"]) == 0
    assert len(list(ck.iterdir())) == 3


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_file_modes_follow_the_umask(tmp_path, umask):
    out = tmp_path / "r"
    old = os.umask(umask)
    try:
        code = subprocess.run([sys.executable, "-m", "lossglass.cli", "run", str(_tiny(tmp_path)), "--out", str(out),
                               "--quiet", "--stages", "train,report"], capture_output=True).returncode
    finally:
        os.umask(old)
    assert code == 0
    want = 0o666 & ~umask
    for f in ("config.toml", "meta.json", "tables/replicas.parquet", "report.html", "replicas.safetensors",
              "figures/replicas_accuracy.png"):
        assert (out / f).stat().st_mode & 0o777 == want, f


def test_commands_refuse_folders_that_are_not_runs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for cmd in ("report", "info", "export"):
        assert main([cmd, str(empty)]) == 2
        assert "not a lossglass run folder" in capsys.readouterr().err
    assert not list(empty.iterdir())


def test_errors_name_the_users_input(tmp_path, capsys):
    assert main(["run", "--preset", "quickstart", "--set", "walk.step=10"]) == 2
    err = capsys.readouterr().err
    assert "--set walk.step" in err and "did you mean 'walk.steps'" in err and "preset" not in err
    assert main(["run", str(_tiny(tmp_path)), "--stages", "train,bogus"]) == 2
    assert "train, timeline, walk, connect" in capsys.readouterr().err
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train") == 0
    assert main(["export", str(out), "--format", "xlsx"]) == 2
    assert "formats: csv" in capsys.readouterr().err
    assert main(["run", "--preset", "quickstart", "--set", "data.data_dir='/nowhere'", "--set", "data.name='mnist'",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "--set data.data_dir=" in capsys.readouterr().err


def test_config_reference_is_generated_and_complete(capsys):
    from pathlib import Path

    from lossglass.config import _rows, reference

    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text() == reference(), "docs/config.md is stale: regenerate with 'lossglass config --markdown'"
    for _, key, _, _, meaning in _rows():
        assert len(meaning) > 10, f"{key} has no description"
    assert main(["config"]) == 0
    assert "walk.steps" in capsys.readouterr().out
    from lossglass.columns import reference as tables

    assert (doc.parent / "tables.md").read_text() == tables(), "docs/tables.md is stale: lossglass config --tables"
    assert "Binder" in tables() and "test error - train error" in tables()


def test_info_lists_stages_in_run_order_and_no_empty_folders_are_left(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out) == 0
    assert main(["info", str(out)]) == 0
    lines = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("stage ")]
    assert lines == ["train", "curvature", "select", "report"]
    assert not (out / "checkpoints").exists() and not (out / "tasks").exists()


def test_status_lines_without_a_terminal_and_silence_with_quiet(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(_tiny(tmp_path)), "--out", str(out), "--stages",
           "train,curvature"]
    loud = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    assert "curvature: flatness measures of 4 replicas" in loud
    quiet = subprocess.run(cmd + ["--quiet", "--force"], capture_output=True, text=True, check=True).stderr
    assert "flatness measures" not in quiet and "\r" not in quiet


def test_a_small_study_prints_no_raw_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", str(_cfg(tmp_path)), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    raw = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
           if "lossglass" in w.filename or "torch" in w.filename or "numpy" in w.filename or "scipy" in w.filename]
    assert not raw, raw


# ---------------------------------------------------------------------------- issue 19: hardening
def test_writes_never_follow_links_out_of_the_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train,report") == 0
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    png = tmp_path / "outside.png"
    png.write_bytes(b"outside")
    (out / "csv").mkdir()
    (out / "csv" / "replicas.csv").symlink_to(victim)
    (out / "figures" / "replicas_accuracy.png").unlink()
    (out / "figures" / "replicas_accuracy.png").symlink_to(png)
    assert main(["export", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    assert victim.read_text() == "precious\n" and png.read_bytes() == b"outside"
    assert not (out / "csv" / "replicas.csv").is_symlink() and not (out / "figures" / "replicas_accuracy.png").is_symlink()
    # a linked folder that leads outside is refused
    shutil.rmtree(out / "csv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "csv").symlink_to(elsewhere)
    capsys.readouterr()
    assert main(["export", str(out)]) == 2
    assert "outside the run folder" in capsys.readouterr().err and not list(elsewhere.iterdir())


def test_same_config_with_comments_needs_no_force(tmp_path):
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train") == 0
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text("# my notes\n" + text.replace("\n[", "\n\n# section\n["))
    assert main(["run", str(out / "config.toml"), "--out", str(out), "--quiet", "--stages", "train"]) == 0
    assert main(["curvature", str(out), "--quiet", "--redo", "--no-report"]) == 0


def test_code_named_by_a_foreign_config_needs_trust(tmp_path, capsys):
    cfg = tmp_path / "byo.toml"
    cfg.write_text('name = "byo"\n[data]\nfactory = "tests.byo_factories:data"\n[model]\nfactory = '
                   '"tests.byo_factories:model"\nspec = "tests.byo_factories:spec"\n[train]\nreplicas = 3\nepochs = 1\n'
                   "batch_size = 30\n[walk]\nn_walkers = 2\nsteps = 3\n")
    mine = tmp_path / "mine"
    assert _run(cfg, "--out", mine, "--stages", "train") == 0
    assert main(["walk", str(mine), "--quiet", "--no-report"]) == 0  # my own folder: trusted
    theirs = tmp_path / "theirs"
    shutil.copytree(mine, theirs)
    capsys.readouterr()
    assert main(["walk", str(theirs), "--quiet", "--redo", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "--trust-config" in err and "model.factory" in err
    assert main(["walk", str(theirs), "--quiet", "--redo", "--no-report", "--trust-config"]) == 0
    # reading commands never import code: no flag needed
    assert main(["info", str(theirs)]) == 0


def test_disk_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert _run(_tiny(tmp_path), "--out", f) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "afile" in err


def test_reads_beside_a_writer_never_see_a_torn_file(tmp_path):
    store = lg.RunStore(tmp_path / "r")
    frames = [pd.DataFrame({"x": np.arange(n * 1000, dtype=float)}) for n in (1, 40)]
    store.write_table("t", frames[0])
    store.write_tensors("w", {"a": torch.zeros(1000)})
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            store.write_table("t", frames[i % 2])
            store.write_tensors("w", {"a": torch.full((1000 * (1 + i % 2),), float(i))})
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    failures = 0
    try:
        for _ in range(1000):
            try:
                assert len(store.read_table("t")) in (1000, 40000)
                assert store.read_tensors("w")["a"].numel() in (1000, 2000)
            except Exception:  # noqa: BLE001
                failures += 1
    finally:
        stop.set()
        th.join()
    assert failures == 0


@pytest.mark.parametrize("setting,what", [("train.replicas=100000", "replicas"),
                                          ("reference.n_spins=5000", "p-spin couplings"),
                                          ("data.n_train=1000000000", "teacher data")])
def test_oversized_studies_are_refused_before_any_write(tmp_path, capsys, setting, what):
    out = tmp_path / "big"
    extra = ["--set", "reference.enabled=true"] if "reference" in setting else []
    if "replicas" in setting:  # the case: 100,000 replicas of 784-64-10 (about 20 GB of parameters alone)
        extra += ["--set", "data.name='fashion-mnist'", "--set", "model.hidden=64"]
    if "n_train" in setting:
        extra += ["--set", "data.name='teacher'"]
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--set", setting, *extra]) == 2
    err = capsys.readouterr().err
    assert "memory" in err and what in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["/abs/path", "../../x", "", "x" * 300, ".hidden"])
def test_a_name_is_a_name(tmp_path, capsys, name):
    cfg = _tiny(tmp_path)
    cfg.write_text(cfg.read_text().replace('name = "tiny"', f'name = "{name}"'))
    assert main(["run", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["stage-record", "replicas-table", "replicas-tensors"])
def test_damaged_folders_name_the_damaged_file(tmp_path, capsys, damage):
    out = tmp_path / "r"
    assert _run(_tiny(tmp_path), "--out", out, "--stages", "train") == 0
    target = {"stage-record": out / "stages" / "train.json", "replicas-table": out / "tables" / "replicas.parquet",
              "replicas-tensors": out / "replicas.safetensors"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    capsys.readouterr()
    for cmd in (["info", str(out)], ["report", str(out)], ["export", str(out)], ["walk", str(out), "--quiet"]):
        code = main(cmd)
        err = capsys.readouterr().err
        if code == 0:  # a command may cope (the report lists what it could not read), but never a traceback
            continue
        assert code == 2 and target.name in err and "damaged" in err and "Traceback" not in err, (cmd, err)
