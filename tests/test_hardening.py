"""Hardening, round 2 (issue 27): one test per item, each failing on the code before its fix. Item 3 (the kernel
cache) is tested in tests/test_native.py."""

from __future__ import annotations

import fcntl
import http.client
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
import tomllib

import lossglass as lg
from lossglass.cli import main
from lossglass.errors import LossglassError

from .test_run_folder import _tiny

ROOT = Path(__file__).resolve().parent.parent


def _train(tmp_path: Path, name: str = "r") -> Path:
    out = tmp_path / name
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--stages", "train"]) == 0
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One trained tiny run (copied by the tests that damage or plant things in it)."""
    return _train(tmp_path_factory.mktemp("base"))


def _copy(base: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(base, dst)
    return dst


def _one_line_error(err: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("lossglass: error:") and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ 1. foreign configs
def test_a_foreign_config_runs_no_code_through_any_command(base_run, tmp_path, capsys, monkeypatch):
    mark = tmp_path / "the-evil-module-ran"
    mod = f"evilmod_{os.getpid()}_{time.monotonic_ns()}"
    (tmp_path / f"{mod}.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n"
        "def make():\n    import torch.nn as nn\n    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    theirs = _copy(base_run, tmp_path, "theirs")
    cfg = theirs / "config.toml"
    cfg.write_text(cfg.read_text().replace("[model]\n", f'[model]\nfactory = "{mod}:make"\n'))
    capsys.readouterr()
    for argv in (["run", str(cfg), "--out", str(theirs), "--stages", "report"],
                 ["train", str(cfg), "--out", str(tmp_path / "other")],
                 ["walk", str(theirs), "--no-report"], ["curvature", str(theirs), "--redo"], ["select", str(theirs)],
                 ["import", str(tmp_path), "--config", str(cfg), "--out", str(tmp_path / "imp")]):
        assert main([*argv, "--quiet"] if argv[0] != "select" else argv) == 2, argv
        err = capsys.readouterr().err
        assert _one_line_error(err) and "--trust-config" in err and mod in err, (argv, err)
    with pytest.raises(LossglassError, match="--trust-config"):
        lg.run_study(cfg, theirs, stages=("report",), progress=False)
    assert not mark.exists(), "a foreign config's code ran"
    assert not lg.RunStore(theirs, create=False).is_trusted(), "a refused folder was marked trusted"
    # the user vouches for it: the code runs, and only then is the folder marked trusted
    assert main(["run", str(cfg), "--out", str(theirs), "--stages", "report", "--quiet", "--trust-config"]) == 0
    assert mark.exists() and lg.RunStore(theirs, create=False).is_trusted()


# ------------------------------------------------------------------------------------------------ 2. one writer
_HOLD = """
import sys, time
from lossglass.store import RunStore
cm = RunStore(sys.argv[1], create=False).writer()
cm.__enter__()
print("held", flush=True)
time.sleep(120)
"""


def _checkpoints(run: Path, tmp_path: Path, n: int = 2) -> Path:
    import torch

    theta = lg.RunStore(run, create=False).read_tensors("replicas")["theta"][:n]
    prob = lg.study.build_problem(lg.config.load_config(_tiny(tmp_path)))
    ck = tmp_path / "ck"
    ck.mkdir()
    for i in range(n):
        torch.save(prob.to_module(theta[i]).state_dict(), ck / f"c{i}.pt")
    return ck


def test_one_writer_per_folder_and_a_killed_holder_does_not_block(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path)
    ck = _checkpoints(base_run, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        for argv in (["run", str(_tiny(tmp_path)), "--out", str(out), "--force", "--quiet", "--set", "seed=1"],
                     ["curvature", str(out), "--quiet"], ["report", str(out)], ["select", str(out)],
                     ["export", str(out)],
                     ["import", str(ck), "--config", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--force"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert _one_line_error(err) and f"process id {holder.pid}" in err, (argv, err)
        assert main(["info", str(out)]) == 0  # readers never take the lock
        assert main(["export", str(out), "--out", str(tmp_path / "csv")]) == 0  # exporting elsewhere only reads
        assert lg.config.load_config(out / "config.toml").seed == 2  # the folder was not touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0, capsys.readouterr().err  # the kernel released the killed holder's lock
    manifest = (out / ".lossglass" / "manifest").read_text()
    assert ".lossglass/lock" not in manifest and ".lossglass/lock" not in lg.RunStore(out, create=False).owned()


class _LockProbe:
    """An executor that runs the tasks locally after checking that the study holds its folder's lock."""

    name = "local"

    def __init__(self, folder: Path):
        self.folder, self.held = folder, []

    def run(self, env, tasks, *, before, after):
        fd = os.open(self.folder / ".lossglass" / "lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.held.append(False)
        except BlockingIOError:
            self.held.append(True)
        finally:
            os.close(fd)
        lg.executor.LocalExecutor().run(env, tasks, before=before, after=after)


def test_a_study_holds_the_lock_while_its_stages_run(tmp_path):
    out = tmp_path / "r"
    probe = _LockProbe(out)
    cfg = lg.config.load_config(_tiny(tmp_path))
    lg.study.Study(cfg, out, progress=False, executor=probe).run(("train",))
    assert probe.held == [True]
    fd = os.open(out / ".lossglass" / "lock", os.O_RDWR)  # and released at the end
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


# ------------------------------------------------------------------------------------------------ 4. hostile records
DEEP = b"[" * 200_000 + b"]" * 200_000


def _replicas_with_text_accuracy(path: Path) -> None:
    t = pd.read_parquet(path)
    t["test_accuracy"] = "high"
    t.to_parquet(path, index=False)


def _replicas_with_infinite_divergence(path: Path) -> None:
    t = pd.read_parquet(path)
    t["diverged"] = float("inf")
    t.to_parquet(path, index=False)


HOSTILE = {
    "meta-list": ("meta.json", lambda p: p.write_bytes(b"[1]")),
    "meta-deep": ("meta.json", lambda p: p.write_bytes(DEEP)),
    "meta-long-number": ("meta.json", lambda p: p.write_bytes(b"9" * 100_000)),
    "stage-list": ("stages/train.json", lambda p: p.write_bytes(b"[1, 2]")),
    "stage-deep": ("stages/train.json", lambda p: p.write_bytes(b'{"a": ' * 100_000 + b"1" + b"}" * 100_000)),
    "stage-seconds-text": ("stages/train.json", lambda p: p.write_text('{"seconds": "soon"}')),
    "stage-seconds-huge": ("stages/train.json", lambda p: p.write_text('{"seconds": 1' + "0" * 400 + "}")),
    "table-inf-divergence": ("tables/replicas.parquet", _replicas_with_infinite_divergence),
    "config-deep": ("config.toml", lambda p: p.write_bytes(b"a = " + b"[" * 200_000 + b"]" * 200_000)),
    "config-deep-tables": ("config.toml", lambda p: p.write_bytes(b"a" + b".a" * 100_000 + b" = 1")),
    "table-text-accuracy": ("tables/replicas.parquet", _replicas_with_text_accuracy),
    "tensors-bad-header": ("replicas.safetensors", lambda p: p.write_bytes(b"\xff" * 8 + b"{}")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_records_are_one_line_naming_the_file(base_run, tmp_path, capsys, case):
    name, damage = HOSTILE[case]
    out = _copy(base_run, tmp_path)
    damage(out / name)
    capsys.readouterr()
    code = main(["info", str(out)])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2 and _one_line_error(err) and Path(name).name in err, (case, err)
    # the report copes (listing what it could not read) or says why in one line
    code = main(["report", str(out)])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and _one_line_error(err)), (case, err)
    from lossglass.dashboard.collect import collect_run

    run = collect_run(out, 0)
    assert run["status"] in ("damaged", "incomplete") and run["problems"], (case, run["status"])


def _no_constant(name: str):
    raise ValueError(f"{name} in JSON")


def _get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, body


def test_one_hostile_folder_is_marked_damaged_and_the_others_load(base_run, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _copy(base_run, runs, "good")
    bad = _copy(base_run, runs, "bad")
    (bad / "meta.json").write_bytes(DEEP)
    (bad / "stages" / "train.json").write_bytes(b"[1, 2]")
    bad2 = _copy(base_run, runs, "bad2")
    (bad2 / "progress.json").write_text('{"active": true, "pid": 0, "updated": NaN, "stages": {"train": '
                                        '{"state": "running", "started": Infinity}}}')
    _replicas_with_text_accuracy(bad2 / "tables" / "replicas.parquet")
    capsys.readouterr()
    page = tmp_path / "d.html"
    assert main(["dashboard", str(runs), "--out", str(page), "--no-open"]) == 0, capsys.readouterr().err
    text = re.search(r'id="lg-data">(.*?)</script>', page.read_text(), re.S).group(1)
    data = json.loads(text, parse_constant=_no_constant)  # strict JSON: a browser's JSON.parse takes no NaN
    status = {Path(r["folder"]).name: r["status"] for r in data["runs"]}
    # the good run is a train-only run (incomplete: the other stages never ran), the bad one is marked damaged
    assert status == {"good": "incomplete", "bad": "damaged", "bad2": "incomplete"}, status
    from lossglass.dashboard import DashboardServer
    from lossglass.dashboard.collect import run_id

    server = DashboardServer([runs], 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for path in ("/api/state", "/api/data", "/", f"/files/{run_id(bad)}/meta.json",
                     f"/files/{run_id(runs / 'good')}/config.toml"):
            code, body = _get(server.port, path)
            assert code == 200, (path, code, body[:200])
            if path.startswith("/api/"):
                got = {r["id"]: r["status"] for r in json.loads(body, parse_constant=_no_constant)["runs"]}
                assert got[run_id(runs / "good")] == "incomplete" and got[run_id(bad)] == "damaged", (path, got)
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ 5. bounded reads
def _sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


_INFO_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a 10 GB allocation fails; torch itself fits
from lossglass.cli import main
sys.exit(main(["info", sys.argv[1]]))
"""


def test_info_reads_only_the_safetensors_header(base_run, tmp_path):
    out = _copy(base_run, tmp_path)
    p = out / "replicas.safetensors"
    head = p.read_bytes()
    n = int.from_bytes(head[:8], "little")
    header = json.loads(head[8:8 + n])
    k, params = header["theta"]["shape"]
    size = 10 << 30  # 10 GB, sparse: a header that describes it truthfully
    header["theta"]["shape"] = [k, (size - 8 - 4096) // (4 * k)]
    header["theta"]["data_offsets"] = [0, 4 * k * header["theta"]["shape"][1]]
    text = json.dumps(header).encode()
    text += b" " * (4096 - 8 - len(text))
    _sparse(p, size, (4096 - 8).to_bytes(8, "little") + text)
    # few malloc arenas and one thread: each thread's arena reserves address space, which the limit counts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "LOSSGLASS_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _INFO_LIMITED, str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"replicas: {k} x {header['theta']['shape'][1]} parameters" in r.stdout
    # a 10 GB (sparse) record is refused in one line, never read
    _sparse(out / "meta.json", size)
    r = subprocess.run([sys.executable, "-c", _INFO_LIMITED, str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2 and _one_line_error(r.stderr) and "too large" in r.stderr, r.stderr[-2000:]


def test_the_dashboard_streams_files_with_a_size_cap(base_run, tmp_path):
    from lossglass.dashboard import DashboardServer
    from lossglass.dashboard import server as srv
    from lossglass.dashboard.collect import run_id

    out = _copy(base_run, tmp_path)
    payload = os.urandom(1 << 20)
    (out / "big.bin").write_bytes(payload * 48)  # 48 MiB, under the cap
    _sparse(out / "huge.bin", srv.FILE_LIMIT + 1)
    server = DashboardServer([out], 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rid = run_id(out)
        tracemalloc.start()
        code, body = _get(server.port, f"/files/{rid}/big.bin")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert code == 200 and len(body) == 48 << 20 and body[:1 << 20] == payload
        # what was traced: the client's copy of the body (48 MiB) plus the server's chunks, never a second whole copy
        assert peak < (48 << 20) + (16 << 20), peak
        code, body = _get(server.port, f"/files/{rid}/huge.bin")
        assert code == 413 and b"at most" in body
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ 6. the manifest
def test_a_planted_manifest_deletes_none_of_the_users_files(tmp_path, capsys):
    out = _train(tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "mydata").mkdir()
    (out / "mydata" / "important.csv").write_text("a,b\n1,2\n")
    manifest = out / ".lossglass" / "manifest"
    lines = manifest.read_text().splitlines()
    assert all(len(ln.split("\t")) == 5 for ln in lines)  # stage, path, size, hash, signature
    forged = next(ln for ln in lines if "\ttables/replicas.parquet\t" in ln).split("\t")
    with manifest.open("a") as f:
        f.write("train\tnotes.txt\n")  # the planted entries (old format: no signature)
        f.write("train\tmydata/important.csv\n")
        f.write("\t".join(["train", "notes.txt", *forged[2:]]) + "\n")  # a real signature moved to another path
        f.write("\t".join(["train", "mydata/important.csv", "8", "0" * 64, "0" * 64]) + "\n")
    assert "notes.txt" not in lg.RunStore(out, create=False).owned()
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--stages", "train", "--force",
                 "--set", "seed=5"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "mydata" / "important.csv").exists()
    # a file lossglass wrote but the user then replaced is not lossglass's any more: --force keeps it
    store = lg.RunStore(out, create=False)
    store.stage = "train"
    store.write_bytes("summary.txt", b"lossglass wrote this")
    (out / "summary.txt").write_text("the user's own text now")
    store.write_bytes("other.txt", b"lossglass wrote this too")
    assert store.remove_owned(stages={"train"}) >= 1
    assert (out / "summary.txt").read_text() == "the user's own text now" and not (out / "other.txt").exists()
    # the manifest's entries stay in order (stage, path first: what tests/test_golden.py compares)
    entries = [ln.split("\t")[:2] for ln in manifest.read_text().splitlines()]
    assert entries[0] == ["-", "config.toml"] and entries[1] == ["-", ".lossglass/trust"]


def test_a_manifest_copied_to_another_folder_owns_nothing_there(base_run, tmp_path):
    mine = lg.RunStore(base_run, create=False)
    assert "replicas.safetensors" in mine.owned()
    copy = _copy(base_run, tmp_path)
    assert lg.RunStore(copy, create=False).owned() == {}  # lines are signed for the folder they were written in


# ------------------------------------------------------------------------------------------------ 7. the trust key
def _race(barrier, base: str, trials: int, q) -> None:
    from lossglass import store

    real_open = os.open

    def slow_open(path, *a, **k):  # a slow file system (a network home folder): every open of the key takes 2 ms
        if "trust-key" in str(path):
            time.sleep(0.002)
        return real_open(path, *a, **k)

    os.open = slow_open
    for t in range(trials):
        os.environ["XDG_CONFIG_HOME"] = os.path.join(base, f"trial-{t}")
        getattr(store, "_KEYS", {}).clear()  # no key cached in this process: each trial creates or reads it
        barrier.wait()
        q.put((t, store._user_key().hex()))


def test_processes_creating_the_trust_key_at_once_end_with_one_key(tmp_path):
    ctx, n, trials = mp.get_context("fork"), 4, 25
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(barrier, str(tmp_path), trials, q)) for _ in range(n)]
    for p in procs:
        p.start()
    got: dict[int, set[str]] = {}
    for _ in range(n * trials):
        t, key = q.get(timeout=120)
        got.setdefault(t, set()).add(key)
    for p in procs:
        p.join(timeout=60)
    split = [t for t, keys in got.items() if len(keys) != 1]
    assert not split, f"{len(split)} of {trials} trials ended with more than one key"
    for t in range(trials):
        key = tmp_path / f"trial-{t}" / "lossglass" / "trust-key"
        assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o077 == 0
        assert not list(key.parent.glob(".trust-key.*"))  # no temporary file left


# ------------------------------------------------------------------------------------------------ 8. killed writes
def test_temp_files_of_killed_writes_and_empty_folders_are_swept(tmp_path):
    out = _train(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".keep.abcdefgh.tmp").write_text("not in the run folder")
    planted = [out / ".meta.json.k2j4h5g6.tmp", out / "tables" / ".walk.parquet.a1b2c3d4.tmp",
               out / "stages" / ".walk.json.zz__99aa.tmp"]
    (out / "tables" / "tasks").mkdir(exist_ok=True)
    planted.append(out / "tables" / "tasks" / ".walk-abc-0.parquet.q1w2e3r4.tmp")
    for p in planted:
        p.write_bytes(b"half a file")
    (out / "checkpoints").mkdir()
    (out / "tensors").mkdir()
    (out / "tensors" / "tasks").symlink_to(outside, target_is_directory=True)  # never followed
    (out / ".link.abcdefgh.tmp").symlink_to(outside / ".keep.abcdefgh.tmp")  # a link, not a temp file
    (out / ".notes.tmp").write_text("the user's")  # not the pattern
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--stages", "train"]) == 0  # a resume
    assert not any(p.exists() for p in planted)
    assert not (out / "tables" / "tasks").exists() and not (out / "checkpoints").exists()
    assert (outside / ".keep.abcdefgh.tmp").exists() and (out / ".notes.tmp").exists()
    assert (out / ".link.abcdefgh.tmp").is_symlink()
    # and on --force (the linked folder removed first: a write through it is refused, as it always was)
    (out / "tensors" / "tasks").unlink()
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / ".x.png.abcdefgh.tmp").write_bytes(b"")
    assert main(["run", str(_tiny(tmp_path)), "--out", str(out), "--quiet", "--stages", "train", "--force"]) == 0
    assert not (out / "figures").exists()


# ------------------------------------------------------------------------------------------------ 9. terminal escapes
def test_terminal_escapes_from_a_folder_never_reach_the_terminal(base_run, tmp_path, capsys):
    out = _copy(base_run, tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    meta["name"] = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil"
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "stages" / "\x1b[31mred.json").write_text('{"skipped": "\\u001b[5mblink"}')
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", printed), repr(printed)
    assert "\\x1b]0;pwned" in printed and "\\x1b[31mred" in printed and "\\u202e" in printed
    (out / "stages" / "\x1b[31mred.json").write_text("not json")
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[31mred.json" in err and _one_line_error(err)


# ------------------------------------------------------------------------------------------------ 10. one read
def test_a_protocol_command_checks_and_parses_one_read_of_the_config(tmp_path, monkeypatch):
    cfg = tmp_path / "byo.toml"
    cfg.write_text('name = "byo"\n[data]\nfactory = "tests.byo_factories:data"\n[model]\nfactory = '
                   '"tests.byo_factories:model"\nspec = "tests.byo_factories:spec"\n[train]\nreplicas = 3\nepochs = 1\n'
                   "batch_size = 30\n[walk]\nn_walkers = 2\nsteps = 3\n")
    out = tmp_path / "mine"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--stages", "train"]) == 0
    reads: list[str] = []
    real_open, real_read_bytes, real_read_text = os.open, Path.read_bytes, Path.read_text

    def count(p):
        if str(p).endswith("config.toml"):
            reads.append(str(p))

    monkeypatch.setattr(os, "open", lambda p, *a, **k: (count(p), real_open(p, *a, **k))[1])
    monkeypatch.setattr(Path, "read_bytes", lambda self: (count(self), real_read_bytes(self))[1])
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (count(self), real_read_text(self, *a, **k))[1])

    class Stop(Exception):
        pass

    def stop(self, cfg, *a, **k):
        raise Stop(cfg.walk.steps)

    monkeypatch.setattr(lg.study.Study, "__init__", stop)  # the config is final when the study is made
    with pytest.raises(Stop, match="7"):
        main(["walk", str(out), "--quiet", "--set", "walk.steps=7"])
    assert len(reads) == 1, reads


# ------------------------------------------------------------------------------------------------ 11. dependencies
def test_dependency_floors_exclude_the_advised_releases_and_ray_starts_without_its_dashboard(monkeypatch):
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    # the last release each advisory affects (issue 27, and the advisories found when checking it)
    advised = {"ray": ["2.51.2", "2.53.0", "2.54.1"], "torch": ["2.7.1"], "transformers": ["4.47.1", "5.2.0"],
               "lightning": ["2.3.2", "2.6.3", "2.6.5"]}
    for r in reqs:
        for bad in advised.get(r.name, []):
            assert Version(bad) not in r.specifier, f"{r} admits {r.name} {bad}"
    assert {r.name for r in reqs} >= set(advised)
    seen = {}

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            seen.update(kw)

    monkeypatch.setitem(sys.modules, "ray", FakeRay)
    lg.executor.RayExecutor()
    assert seen.get("include_dashboard") is False
    lg.executor.RayExecutor(include_dashboard=True)
    assert seen.get("include_dashboard") is True


# ------------------------------------------------------------------------------------------------ the fuzz, small
def test_hostile_folders_of_every_kind_through_every_reading_surface(tmp_path, monkeypatch):
    """benchmarks/fuzz_folders.py, one case of each mutation (truncation, bit flips, nesting, wrong JSON and table
    types, huge sparse files, links, FIFOs, unreadable files, terminal escapes, a combination) through info, report,
    the static dashboard and every endpoint of the live one: none may give anything but one line or a marked run."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fuzz_folders

    summary = fuzz_folders.fuzz(len(fuzz_folders.MUTATIONS), 7, tmp_path, stages="train,report",
                                kinds=fuzz_folders.MUTATIONS, log=lambda *_: None)
    assert summary["cases"] == len(fuzz_folders.MUTATIONS) and summary["failures"] == [], summary["failures"]
