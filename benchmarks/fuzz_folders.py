"""Hostile run folders through every reading surface (issue 27): ``info``, ``report``, ``dashboard`` (the static page)
and ``dashboard --serve`` (every endpoint).

One small real run is made once; each case copies it, damages the copy with a seeded mutation (random truncation, bit
flips, deep nesting, wrong JSON types, wrong table column types, huge sparse files, symbolic links to devices, loops,
other folders or outside, FIFOs, unreadable files (as root: a folder in a file's place), terminal escapes, or a
combination), and puts it through:

- ``lossglass info`` and ``lossglass report``: the exit status is 0, or 2 with exactly one ``lossglass: error:`` line;
  no traceback, no raw control character on the terminal, nothing hangs (120 s), no unbounded allocation (the
  process runs under an 8 GB address-space limit: a 10-20 GB sparse file read whole fails);
- ``lossglass dashboard`` over a folder holding the damaged copy and an intact run: exit 0, the page's data strict
  JSON (no NaN), both runs present, the intact run's status unchanged, the damaged one a known status (complete,
  incomplete, damaged, running);
- a live ``dashboard --serve`` over the same folder: ``/``, ``/api/state``, ``/api/data``, the damaged run's
  ``report.html`` and the damaged file itself answer with a status (200, 403, 404 or 413), never a dropped
  connection, and the API's JSON is strict and still holds the intact run unchanged.

A case fails when any surface does anything else. Usage::

    python benchmarks/fuzz_folders.py --cases 300 --seed 1 [--out results.json]

Seeded: the same seed makes the same folders (the timings differ). The heavy run is this script; tests/
test_hardening.py runs a few cases of it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

CONFIG = """
name = "fuzz"
seed = 3
[data]
name = "digits"
n_train = 300
n_test = 100
n_val = 60
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
entropy_chains = 20
[select]
n_resamples = 50
"""
STATUSES = {"complete", "incomplete", "damaged", "running"}
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
ESCAPES = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "\x9b31m", "\u202etxt.exe", "\x1b[6n", "\r\x1b[K"]
MUTATIONS = ("truncate", "bitflip", "nest", "wrongtype", "jsonfield", "tabletypes", "sparse", "link", "fifo",
             "folderlink", "unreadable", "escape", "combo")


#: seconds a command may take before it counts as hung (--timeout)
LIMIT = 120


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("took more than the time limit")


# ------------------------------------------------------------------------------------------------ mutations
def _files(run: Path) -> list[str]:
    out = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        if p.is_file() and not p.is_symlink() and rel != ".lossglass/lock":
            out.append(rel)
    return out


def _deep_json(rng: random.Random) -> bytes:
    depth = rng.choice([65, 100, 1000, 5000, 200_000])
    kind = rng.choice(["list", "object", "mixed"])
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"a":[' * (depth // 2) + b"1" + b"]}" * (depth // 2)


def _deep_toml(rng: random.Random) -> bytes:
    depth = rng.choice([65, 100, 1000, 5000, 200_000])
    kind = rng.choice(["array", "inline", "dotted"])
    if kind == "array":
        return b"a = " + b"[" * depth + b"]" * depth
    if kind == "inline":
        return b"a = " + b"{b = " * depth + b"1" + b"}" * depth
    return b"a" + b".a" * depth + b" = 1"


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.choice(["int", "float", "str", "list", "dict", "null", "bool", "nan", "big"] if depth < 4
                      else ["int", "str", "null", "nan"])
    return {"int": lambda: rng.randint(-10**6, 10**6), "float": lambda: rng.uniform(-1e300, 1e300),
            "str": lambda: rng.choice(["", "x", "running", "done", "\x1b[31mred", "a" * 10_000, "1.5"]),
            "list": lambda: [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            "dict": lambda: {rng.choice(["stage", "seconds", "skipped", "name", "pid", "state", "stages", "x"]):
                             _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))},
            "null": lambda: None, "bool": lambda: rng.random() < 0.5, "nan": lambda: float("nan"),
            "big": lambda: 10**rng.randint(19, 400)}[kind]()


def _set_random_field(obj, rng: random.Random):
    """Replace one value somewhere in a parsed JSON record with a value of a random (usually wrong) type."""
    node, key = obj, None
    for _ in range(rng.randint(1, 4)):
        if isinstance(node, dict) and node:
            key = rng.choice(sorted(node))
            if isinstance(node[key], (dict, list)) and rng.random() < 0.5:
                node = node[key]
                continue
            node[key] = _random_json(rng)
            return obj
        if isinstance(node, list) and node:
            i = rng.randrange(len(node))
            if isinstance(node[i], (dict, list)) and rng.random() < 0.5:
                node = node[i]
                continue
            node[i] = _random_json(rng)
            return obj
        break
    return _random_json(rng)


def _table_types(path: Path, rng: random.Random) -> None:
    import numpy as np
    import pandas as pd

    t = pd.read_parquet(path)
    what = rng.choice(["text", "nulls", "huge", "drop", "empty", "list", "objects", "inf"])
    col = rng.choice(list(t.columns)) if len(t.columns) else None
    if what == "text" and col is not None:
        t[col] = [rng.choice(["high", "\x1b[31m", "", "nan"]) for _ in range(len(t))]
    elif what == "nulls" and col is not None:
        t[col] = None
    elif what == "huge" and col is not None:
        t[col] = np.full(len(t), 2**62, dtype=np.int64)
    elif what == "drop" and col is not None:
        t = t.drop(columns=[col])
    elif what == "empty":
        t = t.iloc[0:0]
    elif what == "list" and col is not None:
        t[col] = [[1, [2, 3]] for _ in range(len(t))]
    elif what == "objects" and col is not None:
        t[col] = [{"a": 1} for _ in range(len(t))]
    elif what == "inf" and col is not None:
        t[col] = np.inf
    t.to_parquet(path, index=False)


def mutate(run: Path, rng: random.Random, elsewhere: Path, kind: str | None = None) -> str:
    """Damage ``run`` in place with one seeded mutation; returns a description."""
    kind = kind or rng.choice(MUTATIONS)
    files = _files(run)
    rel = rng.choice(files)
    p = run / rel
    if kind == "combo":
        return " + ".join(mutate(run, rng, elsewhere, rng.choice(MUTATIONS[:-1])) for _ in range(rng.randint(2, 3)))
    if kind == "truncate":
        data = p.read_bytes()
        n = rng.choice([0, 1, 8, rng.randrange(max(len(data), 1))])
        p.write_bytes(data[:n])
        return f"truncate {rel} to {n}"
    if kind == "bitflip":
        data = bytearray(p.read_bytes())
        if not data:
            return f"bitflip {rel} (empty)"
        k = rng.choice([1, 2, 8, 32])
        for _ in range(k):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
        return f"bitflip {rel} x{k}"
    if kind == "nest":
        rel = rng.choice([f for f in files if f.endswith((".json", ".toml"))] or [rel])
        p = run / rel
        p.write_bytes(_deep_toml(rng) if rel.endswith(".toml") else _deep_json(rng))
        return f"nest {rel}"
    if kind == "wrongtype":
        rel = rng.choice([f for f in files if f.endswith(".json")] or [rel])
        p = run / rel
        value = rng.choice([[1, 2], [1], "text", 1, None, True, {"seconds": "x", "skipped": [1], "stages": [1]},
                            {"stages": {"train": [1]}, "active": "yes", "pid": "x"}, _random_json(rng)])
        p.write_text(json.dumps(value))
        return f"wrongtype {rel} = {json.dumps(value)[:40]}"
    if kind == "jsonfield":
        rel = rng.choice([f for f in files if f.endswith(".json")] or [rel])
        p = run / rel
        try:
            obj = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            obj = {}
        p.write_text(json.dumps(_set_random_field(obj, rng)))
        return f"jsonfield {rel}"
    if kind == "tabletypes":
        rel = rng.choice([f for f in files if f.endswith(".parquet")] or [rel])
        p = run / rel
        try:
            _table_types(p, rng)
        except Exception:  # noqa: BLE001 - an earlier mutation broke it: write garbage instead
            p.write_bytes(b"PAR1 not a table PAR1")
        return f"tabletypes {rel}"
    if kind == "sparse":
        size = rng.choice([(2 << 30) + 1, 5 << 30, 10 << 30, 20 << 30])
        head = p.read_bytes()[:4096] if rng.random() < 0.5 else b""
        with open(p, "wb") as f:
            f.write(head)
            f.truncate(size)
        return f"sparse {rel} {size >> 20} MiB"
    if kind == "link":
        target = rng.choice(["/dev/zero", "/dev/urandom", "/etc/passwd", "/", str(p), "/nonexistent/x",
                             str(elsewhere / "meta.json"), str(elsewhere / "tables"), "../" * 20 + "etc/hostname"])
        p.unlink()
        p.symlink_to(target)
        return f"link {rel} -> {target}"
    if kind == "fifo":
        p.unlink()
        os.mkfifo(p)
        return f"fifo {rel}"
    if kind == "folderlink":
        folders = sorted({str(Path(f).parent) for f in files if "/" in f})
        d = rng.choice(folders) if folders else "tables"
        target = rng.choice([str(elsewhere / d), "/etc", "/proc/self", str(run)])
        if (run / d).is_dir() and not (run / d).is_symlink():
            shutil.rmtree(run / d)
        elif (run / d).exists() or (run / d).is_symlink():
            (run / d).unlink()
        (run / d).symlink_to(target, target_is_directory=True)
        return f"folderlink {d} -> {target}"
    if kind == "unreadable":
        if os.geteuid() != 0:
            p.chmod(0)
            return f"unreadable {rel}"
        p.unlink()  # root reads any file: a folder where the file should be instead
        p.mkdir()
        return f"unreadable {rel} (a folder in its place)"
    if kind == "escape":
        esc = rng.choice(ESCAPES)
        target = rng.choice(["meta-name", "stage-file", "table-name", "skipped"])
        if target == "meta-name":
            try:
                meta = json.loads((run / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            meta["name"] = f"run{esc}name"
            (run / "meta.json").write_text(json.dumps(meta))
        elif target == "stage-file":
            (run / "stages").mkdir(exist_ok=True)
            (run / "stages" / f"x{esc}.json").write_text('{"seconds": 1}')
        elif target == "table-name":
            (run / "tables").mkdir(exist_ok=True)
            (run / "tables" / f"t{esc}.parquet").write_bytes(b"PAR1")
        else:
            (run / "stages").mkdir(exist_ok=True)
            (run / "stages" / "curvature.json").write_text(json.dumps({"skipped": f"because{esc}"}))
        return f"escape in {target}"
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------ the surfaces
def _call(argv: list[str], limit: int | None = None) -> tuple[int | str, str, str]:
    from lossglass.cli import main

    limit = limit or LIMIT
    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code: int | str = main(argv)
    except BaseException as e:  # noqa: BLE001 - anything escaping main is a failure to report
        code = f"{type(e).__name__}: {' '.join(str(e).split())[:200]} @ {_where(e)}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, out.getvalue(), err.getvalue()


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    own = [f for f in tb if "lossglass" in f.filename] or tb
    return f"{Path(own[-1].filename).name}:{own[-1].lineno}" if own else "?"


def _cli_ok(code, out: str, err: str) -> str | None:
    """None when a command behaved (exit 0, or 2 with one error line; nothing raw on the terminal), else why not."""
    if not isinstance(code, int):
        return f"raised {code}"
    if RAW_CONTROL.search(out) or RAW_CONTROL.search(err):
        return "raw control characters reached the terminal"
    if code == 0:
        return None
    lines = err.strip().splitlines()
    if code == 2 and len(lines) == 1 and lines[0].startswith("lossglass: error:"):
        return None
    return f"exit {code}, stderr {err.strip()[:300]!r}"


def _strict(text: str):
    def no(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=no)


def _page_ok(page: Path, good: str, case: str, want_good: str) -> str | None:
    m = re.search(r'id="lg-data">(.*?)</script>', page.read_text(), re.S)
    if not m:
        return "no data in the page"
    try:
        data = _strict(m.group(1))
    except ValueError as e:
        return f"page data not strict JSON ({e})"
    return _runs_ok(data["runs"], good, case, want_good, key="folder")


def _runs_ok(runs: list, good: str, case: str, want_good: str, key: str) -> str | None:
    by = {(Path(r[key]).name if key == "folder" else r[key]): r for r in runs}
    if good not in by or case not in by:
        return f"runs missing: have {sorted(by)}"
    if by[good]["status"] != want_good:
        return f"the intact run became {by[good]['status']!r}"
    if by[case]["status"] not in STATUSES:
        return f"damaged run has status {by[case]['status']!r}"
    return None


def _get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=LIMIT)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def _serve_ok(port: int, rid: str, good_id: str, want_good: str, rel: str) -> str | None:
    from urllib.parse import quote

    for path in ("/api/state", "/api/data", "/", f"/files/{rid}/report.html", f"/files/{rid}/{quote(rel)}"):
        try:
            code, body = _get(port, path)
        except Exception as e:  # noqa: BLE001 - a dropped connection is the failure this looks for
            return f"{path}: {type(e).__name__}: {e}"
        if code not in (200, 403, 404, 413):
            return f"{path}: HTTP {code} {body[:200]!r}"
        if path.startswith("/api/"):
            try:
                runs = _strict(body.decode())["runs"]
            except (ValueError, KeyError, UnicodeDecodeError) as e:
                return f"{path}: not strict JSON ({e})"
            why = _runs_ok(runs, good_id, rid, want_good, key="id")
            if why:
                return f"{path}: {why}"
    return None


def _restore_permissions(folder: Path) -> None:
    for p in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IRUSR | stat.S_IWUSR | (stat.S_IXUSR if p.is_dir() else 0))


# ------------------------------------------------------------------------------------------------ the run
def base_run(work: Path, stages: str) -> Path:
    from lossglass.cli import main

    cfg = work / "fuzz.toml"
    cfg.write_text(CONFIG)
    out = work / "base"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--stages", stages]) == 0
    return out


def fuzz(cases: int, seed: int, work: Path, *, stages: str = "train,curvature,select,report",
         surfaces: tuple[str, ...] = ("info", "report", "dashboard", "serve"), kinds: tuple[str, ...] | None = None,
         log=print) -> dict:
    """Run ``cases`` seeded hostile folders through ``surfaces``; returns the counts and the failures. ``kinds``:
    the mutations of the cases in turn (default: each drawn at random)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = 8 << 30  # a sparse file of 10-20 GB read whole fails here instead of swapping the machine
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        return _fuzz(cases, seed, work, stages=stages, surfaces=surfaces, kinds=kinds, log=log)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _fuzz(cases: int, seed: int, work: Path, *, stages: str, surfaces: tuple[str, ...], kinds, log) -> dict:
    from lossglass.dashboard import DashboardServer
    from lossglass.dashboard.collect import collect_run, run_id

    t0 = time.time()
    base = base_run(work, stages)
    runs = work / "runs"
    runs.mkdir()
    good = runs / "good"
    shutil.copytree(base, good)
    want_good = collect_run(good, 0)["status"]
    elsewhere = work / "elsewhere"
    shutil.copytree(base, elsewhere)
    server = DashboardServer([runs], 0) if "serve" in surfaces else None
    if server is not None:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    rng = random.Random(seed)
    failures, per_surface, counts, seconds = [], {s: 0 for s in surfaces}, {}, {s: 0.0 for s in surfaces}
    setup = time.time() - t0
    try:
        for i in range(cases):
            case_rng = random.Random(rng.getrandbits(64))
            folder = runs / f"case{i:04d}"
            shutil.copytree(base, folder)
            what = mutate(folder, case_rng, elsewhere, kinds[i % len(kinds)] if kinds else None)
            kind = "combo" if " + " in what else what.split()[0]
            counts[kind] = counts.get(kind, 0) + 1
            rel = what.split()[1] if len(what.split()) > 1 else "meta.json"
            bad = {}
            for surface in surfaces:
                t = time.time()
                if surface == "info":
                    bad["info"] = _cli_ok(*_call(["info", str(folder)]))
                elif surface == "report":
                    bad["report"] = _cli_ok(*_call(["report", str(folder)]))
                elif surface == "dashboard":
                    page = work / "page.html"
                    code, out, err = _call(["dashboard", str(runs), "--out", str(page), "--no-open"])
                    why = _cli_ok(code, out, err) or (f"exit {code}" if code != 0 else None)
                    bad["dashboard"] = why or _page_ok(page, "good", folder.name, want_good)
                elif surface == "serve" and server is not None:
                    bad["serve"] = _serve_ok(server.port, run_id(folder), run_id(good), want_good, rel)
                seconds[surface] += time.time() - t
            bad = {k: v for k, v in bad.items() if v}
            for k in bad:
                per_surface[k] += 1
            if bad:
                failures.append({"case": i, "mutation": what, "failed": bad})
                log(f"case {i}: {what}: FAILED {bad}")
            elif i % 25 == 0:
                log(f"case {i}: {what}: ok ({time.time() - t0:.0f} s)")
            _restore_permissions(folder)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    n, k = cases, len(failures)
    return {"cases": n, "failing_cases": k, "failure_rate_ci95": clopper_pearson(k, n), "per_surface": per_surface,
            "mutations": counts, "surface_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "failures": failures, "seed": seed, "stages": stages, "surfaces": list(surfaces),
            "seconds": round(time.time() - t0, 1), "setup_seconds": round(setup, 1)}


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95 % interval of a binomial proportion k / n (Clopper & Pearson 1934)."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return (round(lo, 5), round(hi, 5) if not math.isnan(hi) else 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", help="write the summary (JSON) here")
    ap.add_argument("--stages", default="train,curvature,select,report", help="stages of the base run")
    ap.add_argument("--surfaces", default="info,report,dashboard,serve", help="comma-separated subset")
    ap.add_argument("--timeout", type=int, default=120, help="seconds before a command or request counts as hung")
    a = ap.parse_args()
    global LIMIT
    LIMIT = a.timeout
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lossglass-fuzz-") as tmp:
        os.environ.setdefault("XDG_CONFIG_HOME", str(Path(tmp) / "config"))
        summary = fuzz(a.cases, a.seed, Path(tmp), stages=a.stages, surfaces=tuple(a.surfaces.split(",")))
    text = json.dumps(summary, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    lo, hi = summary["failure_rate_ci95"]
    print(f"{summary['cases']} cases, {summary['failing_cases']} failing (95 % interval of the failure rate "
          f"{lo:.3f}-{hi:.3f}); per surface {summary['per_surface']}; {summary['seconds']} s")
    return 0 if summary["failing_cases"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
