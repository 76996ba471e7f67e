"""Issue 28: what a newcomer meets (SIGTERM handled like Ctrl-C, progress visible on a terminal)."""

import json
import os
import signal
import subprocess
import sys
import time

from .test_study_cli import _cfg


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    """SIGTERM mid-training: one line on stderr, exit 143, progress.json inactive with the stage 'interrupted',
    the training checkpoint kept (the same command resumes from it)."""
    cfg = _cfg(tmp_path, epochs=2000)  # far longer than the test waits: it is always terminated mid-stage
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--quiet", "--stages", "train", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(out.glob("checkpoints/train-*.safetensors")) and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("lossglass: terminated (SIGTERM); finished work is saved, run the same "
                                            "command again to resume")
    assert "Traceback" not in err
    progress = json.loads((out / "progress.json").read_text())
    assert progress["active"] is False and progress["stages"]["train"]["state"] == "interrupted"
    assert list(out.glob("checkpoints/train-*.safetensors"))  # what resumes the stage


def _on_a_pty(cmd, env, sized: bool):
    """Run ``cmd`` with stdin, stdout and stderr on a pseudo-terminal (of 24 x 100, or of the size 0 x 0 that some
    container and editor terminals report); return its exit code and everything it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    if sized:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(), out.decode("utf-8", "replace")


def test_a_stage_shows_a_progress_bar_on_a_terminal_even_one_without_a_size(tmp_path):
    """On a pseudo-terminal that reports 0 x 0 (where tqdm alone draws nothing) the training stage draws its bar."""
    cfg = _cfg(tmp_path, epochs=3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--stages", "train", "--out", str(tmp_path / "r")]
    rc, text = _on_a_pty(cmd, env, sized=False)
    assert rc == 0, text
    assert "train 6 replicas:" in text and "%|" in text and "step/s" in text, text[-2000:]


def test_without_a_terminal_a_long_stage_prints_status_lines(tmp_path):
    """Not a terminal (a log file, CI): no bar, but a status line every LOSSGLASS_STATUS_EVERY seconds."""
    cfg = _cfg(tmp_path, epochs=10)
    env = dict(os.environ, OMP_NUM_THREADS="1", LOSSGLASS_STATUS_EVERY="0.2")
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--stages", "train", "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "train: running for" in done.stderr and "%|" not in done.stderr


def test_a_factory_in_the_current_folder_is_found(tmp_path, monkeypatch):
    import lossglass as lg
    from lossglass.byo import model_from_factory

    (tmp_path / "mymodels_issue28.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodels_issue28", raising=False)
    assert model_from_factory("mymodels_issue28:make").in_features == 3
    assert sys.path[-1] == str(tmp_path)  # appended: never shadows an installed module
    import pytest

    with pytest.raises(lg.LossglassError, match="nor nowhere_issue28.py in the current folder"):
        model_from_factory("nowhere_issue28:make")


def test_the_permutation_spec_example_in_the_docs_runs():
    """docs/permutation-spec.md: its code blocks run as written and the permutation leaves the function unchanged."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "permutation-spec.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    ns: dict = {}
    exec(compile("\n".join(blocks), "docs/permutation-spec.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert ns["problem"].spec.sizes(ns["problem"]) == {"channels": 6}


def test_overview_words_follow_the_numbers(tmp_path):
    """The 'best flatness predictor' cell names a measure only when its tau is positive with an interval above 0;
    the 'run' cell is the folder (with the config's name when it differs); the select sentence is a sentence."""
    import pandas as pd

    from lossglass.config import load_config
    from lossglass.dashboard.collect import overview_row
    from lossglass.report.base import RunView
    from lossglass.report.curvature import overview
    from lossglass.report.selection import summary
    from lossglass.study import Study

    from .test_run_folder import _tiny

    study = Study(load_config(_tiny(tmp_path)), tmp_path / "ctrlc", progress=False)
    study.prepare()
    measure = study.cfg.select.measure

    def cell(tau, lo, hi):
        study.store.write_table("kendall", pd.DataFrame({"measure": [measure], "target": ["gap_error"],
                                                         "kendall_tau": [tau], "ci_low": [lo], "ci_high": [hi]}))
        return overview(RunView(study.out))["predictor"]

    assert cell(-0.33, -0.6, 0.1).startswith(f"none: declared {measure} has τ = -0.33 [-0.60, 0.10]")
    assert cell(0.30, -0.05, 0.6).startswith("none:")  # positive, but its interval includes 0
    assert cell(0.50, 0.20, 0.70) == f"{measure} (τ = 0.50 [0.20, 0.70])"
    view = RunView(study.out)
    assert overview_row(view, "complete")["name"]["t"] == f"ctrlc ({view.name})" != view.name
    study.store.write_json("selection.json", {"strategy": "best-val", "replica": 0, "verdict": "nothing detectable",
                                              "val_accuracy": 0.9, "test_accuracy": 0.9, "measure": measure})
    words = summary(RunView(study.out))
    assert words and "flatness added nothing detectable over validation accuracy on this run's test split" in words[0][2]


def test_an_imported_run_not_yet_analysed_reads_imported_not_incomplete(tmp_path):
    from lossglass.cli import main
    from lossglass.dashboard.collect import progress, status
    from lossglass.report.base import RunView

    x = tmp_path / "ck"
    x.mkdir()
    import torch

    from .byo_factories import Net

    for i in range(2):
        torch.manual_seed(i)
        torch.save(Net().state_dict(), x / f"c{i}.pt")
    out = tmp_path / "byo"
    assert main(["import", str(x), "--model", "tests.byo_factories:model", "--data", "tests.byo_factories:data",
                 "--out", str(out), "--set", "data.n_val=0", "--quiet"]) == 0
    view = RunView(out)
    state, why = status(view, *progress(view))
    assert state == "imported" and "2 checkpoints imported, not analysed yet" in why[0]


def test_the_report_tree_names_its_replicas_with_whole_ticks():
    """The dendrogram's leaves carry the replica ids and the Parisi matrix's ticks are those ids in leaf order
    (not fractional positions)."""
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    from lossglass.report.replicas import TreeData, tree_mpl

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 30))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = np.clip(x @ x.T, -1, 1)
    link = linkage(squareform(np.sqrt(np.clip(2 * (1 - q), 0, None)), checks=False), "average")
    order = [int(i) for i in leaves_list(link)]
    ids = [3, 7, 8, 11, 20]
    fig = tree_mpl(TreeData("net", "network", link, q, order, None, ids, "net", ""))
    dendro, parisi = fig.axes[0], fig.axes[1]
    want = [str(ids[i]) for i in order]
    assert [t.get_text() for t in dendro.get_xticklabels()] == want
    assert [t.get_text() for t in parisi.get_xticklabels()] == want
    assert [t.get_text() for t in parisi.get_yticklabels()] == want
    assert list(parisi.get_xticks()) == list(range(5))
    plt.close(fig)


def test_import_with_a_named_data_set_states_its_preprocessing(tmp_path, capsys):
    import torch

    from lossglass.cli import main
    from lossglass.study import build_problem, load_config

    cfg = _cfg(tmp_path)
    prob = build_problem(load_config(cfg))
    folder = tmp_path / "ck"
    folder.mkdir()
    for i, th in enumerate(prob.init(2, 0)):
        torch.save(prob.to_module(th).state_dict(), folder / f"r{i}.pt")
    assert main(["import", str(folder), "--config", str(cfg), "--out", str(tmp_path / "imp")]) == 0
    err = capsys.readouterr().err
    assert "note: digits inputs are scaled x -> (x/255 - " in err and "--data package.module:factory" in err
    assert "checked 2 checkpoints as they are (batchnorm='recompute')" in err  # no BatchNorm: the mode is moot


def test_connect_shows_a_bar_over_its_pieces_on_a_terminal(tmp_path):
    """connect's pieces (planes, pairs, widths) run under one bar on a terminal, naming the piece; the width pieces'
    training bars nest below it."""
    cfg = _cfg(tmp_path, epochs=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TQDM_DISABLE", None)
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--stages", "train,connect", "--out",
           str(tmp_path / "r")]
    rc, text = _on_a_pty(cmd, env, sized=True)
    assert rc == 0, text
    assert "connect:" in text and "piece" in text and "%|" in text, text[-2000:]
    for piece in ("plane_random-0", "plane_through-0", "width-8"):
        assert piece in text, (piece, text[-2000:])


def test_without_a_terminal_connect_prints_a_line_per_piece(tmp_path):
    """Not a terminal: no bar over connect's pieces, a status line as each finishes."""
    cfg = _cfg(tmp_path, epochs=1)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lossglass.cli", "run", str(cfg), "--stages", "train,connect", "--out",
           str(tmp_path / "r")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "connect: task 1/" in done.stderr and "piece" not in done.stderr and "%|" not in done.stderr
