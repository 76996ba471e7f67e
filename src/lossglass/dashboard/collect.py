"""From run folders to what the dashboard page draws: for each run its overview row, stage progress, status,
summary, panels (plotly figures from the report's protocol layers) and overlay traces, as JSON. Reads the folders
only, through bounded reads (:mod:`lossglass.store`); each run is collected on its own: a half-written folder or one
with unreadable files is a run marked "incomplete", a folder that cannot be collected at all (hostile or damaged
beyond that) is a run marked "damaged" with one line saying why, and neither ever stops the other runs."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from .._util import finite_number
from ..errors import LossglassError, check
from ..report import selection
from ..report.base import PALETTE, RunView, finite, layers
from ..stages import STAGE_ORDER

#: the report's protocol layers shown on the dashboard, in page order: (section id, heading, layer), from the stages
LAYERS = tuple((name, heading, module) for name, heading, module, shown in layers() if shown)


def _with(function: str) -> list:
    """Every stage's drawing layer (dashboard or not) that offers ``function``, in run order."""
    return [module for _, _, module, _ in layers() if hasattr(module, function)]

#: overview columns: key, heading, numeric (sorts as a number)
COLUMNS = (("name", "run", False), ("status", "status", False), ("model", "model", False), ("data", "data", False),
           ("replicas", "replicas", True), ("acc_best", "test acc. best %", True),
           ("acc_median", "test acc. median %", True), ("radius", "basin radius (≥: lower bound)", True),
           ("radius_censored", "radius censored %", True), ("barrier_aligned", "aligned barrier", True),
           ("verdict", "ultrametricity", False), ("disagree", "test cases replicas disagree on %", True),
           ("predictor", "best flatness predictor", False), ("ship", "model to ship", False))

#: the side-by-side overlays: key, title, x axis, y axis (log?), caption
OVERLAYS = (
    ("pq", "P(q) of the network's replicas", ("overlap q", False), ("P(q)", False),
     "Distribution of overlaps between the aligned replicas of each run."),
    ("perm_barriers", "Barrier against the number of permuted units k", ("number of permuted hidden units k", False),
     ("loss barrier (nats)", False), "Permutation-interpolation barrier of each run (solid: train, dashed: test)."),
    ("energy_distance", "Energy against distance from the start", ("distance from start |θ − θ₀|", False),
     ("training loss E (nats)", False), "Walks of each run (line style: the walk)."),
    ("spectral_density", "Hessian spectral density", ("Hessian eigenvalue λ", False), ("density (log scale)", True),
     "Flattest (solid) and sharpest (dashed) replica of each run."),
    ("flatness", "Flatness against the generalisation gap", ("", False), ("generalisation gap (%)", False),
     "One point per replica, coloured by run; choose the flatness measure above."),
    ("robustness", "Accuracy under input shifts", ("input shift and severity", False), ("test accuracy (%)", False),
     "Mean test accuracy of each run's replicas (solid) and merged model (dashed) on test inputs shifted in code."),
)

#: files whose change means new results (progress.json changes often and is read on its own)
_DATA_FILES = ("meta.json", "config.toml", "selection.json", "replicas.safetensors")


def looks_like_run(p: Path) -> bool:
    """A folder a study wrote into (even one killed before it finished its first file); False for one that cannot be
    inspected."""
    try:
        return p.is_dir() and any((p / f).is_file() for f in ("config.toml", "meta.json", "progress.json"))
    except OSError:
        return False


def discover(paths: list[str | Path], *, allow_empty: bool = False) -> list[Path]:
    """The run folders named by ``paths``: each is a run folder, or a folder of run folders (its sub-folders that
    look like runs, sorted by name). Sub-folders that resolve outside their parent (symbolic links elsewhere) are
    left out."""
    out: list[Path] = []
    for p in map(Path, paths):
        check(p.exists(), f"{p} does not exist")
        check(p.is_dir(), f"{p} is not a folder (give run folders, or a folder of runs)")
        if looks_like_run(p):
            out.append(p)
            continue
        root = p.resolve()
        subs = []
        try:
            children = sorted(p.iterdir())
        except OSError as e:
            raise LossglassError(f"{p}: cannot be listed ({e.strerror})") from None
        for c in children:
            try:
                inside = root in c.resolve().parents
            except (OSError, RuntimeError):  # RuntimeError: a loop of symbolic links
                inside = False
            if inside and looks_like_run(c):
                subs.append(c)
        check(bool(subs) or allow_empty, f"{p} holds no lossglass runs (no sub-folder with a config.toml or meta.json)")
        out += subs
    seen, unique = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(p)
    return unique


def run_id(path: Path) -> str:
    """A stable id for a run folder (from its resolved path): the page's anchors and the server's URLs use it."""
    return "r" + hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=5).hexdigest()


def version(path: Path) -> str:
    """A fingerprint of the results in a run folder (names, sizes and times of its records and tables): it changes
    when a stage writes results, not when only progress.json changes."""
    h = hashlib.blake2b(digest_size=8)
    files = [path / f for f in _DATA_FILES]
    for d in ("stages", "tables"):
        try:
            files += sorted((path / d).glob("*.json" if d == "stages" else "*.parquet"))
        except OSError:
            pass
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # 0 and -1 would address process groups
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def progress(view: RunView) -> tuple[list[dict], bool]:
    """Every stage with its state (done, running with its start time, pending, skipped, failed, interrupted), in run
    order, and whether a study is running in the folder now. From ``progress.json`` when the study wrote one (a
    'running' stage whose process is gone reads 'interrupted'), else from the completion records."""
    records = view.stages()
    prog = view.progress()
    active = bool(prog and prog.get("active")) and _alive(prog.get("pid"))
    states: dict[str, dict] = {}
    if prog and isinstance(prog.get("stages"), dict):
        for name, s in list(prog["stages"].items())[:100]:
            if isinstance(s, dict):
                states[_text(name, 60)] = {"state": _text(s.get("state"), 20) if s.get("state") is not None else None,
                                           **{k: _number(s.get(k)) for k in ("started", "finished", "seconds")}}
                if s.get("state") == "running" and not active:
                    states[_text(name, 60)]["state"] = "interrupted"
    for name, rec in records.items():
        if name not in states and isinstance(rec, dict):
            states[name] = {"state": "skipped" if rec.get("skipped") else "done", "seconds": _number(rec.get("seconds")),
                            "finished": _number(rec.get("finished"))}
    if view.config and not states:  # no plan from a study (an older folder): the stages its config asks for
        for name in STAGE_ORDER:
            if name not in states and name not in ("report",) and view.enabled(name):
                states[name] = {"state": "pending"}
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return ([{"name": n, **{k: v for k, v in s.items() if v is not None}}
             for n, s in sorted(states.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))], active)


def status(view: RunView, stages: list[dict], active: bool) -> tuple[str, list[str]]:
    """``running``, ``complete``, ``incomplete`` (stages missing), ``imported`` (checkpoints imported, no protocol run
    on them yet) or ``damaged`` (files that could not be read), with what is missing or damaged (in words)."""
    problems = list(view.missing()) if view.is_run else ["no meta.json or config.toml yet (the study is starting, or "
                                                          "this folder is not a whole run)"]
    for s in stages:
        if s.get("state") in ("failed", "interrupted"):
            problems.append(f"stage {s['name']} {s['state']}")
    problems += [p for p in view.problems if p not in problems]
    if active:
        return "running", problems
    if view.damaged:
        return "damaged", problems
    records = view.stages()
    train = records.get("train") if isinstance(records.get("train"), dict) else {}
    if problems and train.get("imported") and not (set(records) - {"train", "report"}):
        # checkpoints imported and nothing asked of them yet: not a run that failed part-way
        return "imported", [f"{train.get('imported')} checkpoints imported, not analysed yet: lossglass run "
                            f"{view.path.name}/config.toml --out {view.path.name}"]
    return ("incomplete" if problems else "complete"), problems


def _model(cfg: dict) -> str:
    m = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    if m.get("factory"):
        return str(m["factory"])
    arch = str(m.get("arch", "mlp"))
    if arch == "cnn":
        return f"cnn {m.get('channels', '')}".strip()
    hidden = m.get("hidden")
    return f"{arch} {hidden}" if hidden is not None else arch


def _data(cfg: dict) -> str:
    d = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    name = str(d.get("factory") or d.get("name") or "")
    return f"{name} ({d['n_train']} train)" if name and d.get("n_train") else name


def _number(v: Any) -> float | None:
    """A finite number from a run folder's record, else None (NaN or a string would break the page's JSON)."""
    return finite_number(v)


def _text(v: Any, n: int = 200) -> str:
    """Folder text as a short string (the page escapes it)."""
    t = str(v)
    return t if len(t) <= n else t[:n] + "..."


def _cell(text: Any, sort: Any = None) -> dict:
    return {"t": "" if text is None else str(text), "v": sort if sort is not None else ("" if text is None else str(text))}


def overview_row(view: RunView, run_status: str) -> dict[str, dict]:
    """The run's cells of the overview table: display text and sort value (numbers sort as numbers)."""
    o: dict = {}
    for layer in _with("overview"):
        try:
            o.update(layer.overview(view))
        except Exception as e:  # noqa: BLE001 - one unreadable table leaves its cell empty
            view.problems.append(f"overview from {layer.__name__.rsplit('.', 1)[1]}: {type(e).__name__}: {e}")

    def num(key: str, digits: str) -> dict:
        v = _number(o.get(key))
        return _cell(format(v, digits), v) if v is not None and finite(v) else _cell("", None)

    # the run is its folder (two runs of one config differ there); the config's name follows when it differs
    label = view.path.name if view.name == view.path.name else f"{view.path.name} ({view.name})"
    row = {"name": _cell(_text(label)), "status": _cell(run_status), "model": _cell(_text(_model(view.config))),
           "data": _cell(_text(_data(view.config))), "replicas": _cell(o.get("replicas", ""), _number(o.get("replicas"))),
           "acc_best": num("acc_best", ".2f"), "acc_median": num("acc_median", ".2f"),
           "radius": _cell(o.get("radius_text", ""), o.get("radius")),
           "radius_censored": _cell(format(100 * o["radius_censored"], ".0f"), 100 * o["radius_censored"])
           if finite(o.get("radius_censored")) else _cell("", None), "barrier_aligned": num("barrier_aligned", ".4g"),
           "verdict": _cell(o.get("verdict", "")), "disagree": num("disagree", ".1f"),
           "predictor": _cell(o.get("predictor", ""), o.get("predictor_tau")),
           "ship": _cell(o.get("ship", ""))}
    for k, c in row.items():
        if c["v"] is None:
            row[k] = {"t": c["t"], "v": None}
    return row


def _figure_json(fig) -> dict:
    d = fig.to_plotly_json()
    d.get("layout", {}).pop("template", None)
    return d


def _panels(view: RunView, rid: str) -> list[dict]:
    sections = []
    for key, heading, layer in LAYERS:
        try:
            panels = layer.panels(view)
        except Exception as e:  # noqa: BLE001 - one broken layer must not lose the rest of the page
            view.problems.append(f"section {key} could not be drawn: {type(e).__name__}: {e}")
            continue
        if panels:
            sections.append({"id": key, "title": heading, "panels": [
                {"id": f"{rid}-{p.id}", "title": p.title, "caption": p.caption, "link": p.link, "width": p.width,
                 "fig": _figure_json(p.figure)} for p in panels]})
    return sections


def _overlays(view: RunView, rid: str, color: str, name: str) -> dict:
    out: dict = {}
    for layer in _with("overlay_traces"):
        try:
            out.update(layer.overlay_traces(view, color, f"{name}: "))
        except Exception as e:  # noqa: BLE001
            view.problems.append(f"overlay from {layer.__name__.rsplit('.', 1)[1]}: {type(e).__name__}: {e}")

    def tag(traces: list) -> list:
        for t in traces:
            t.update(meta={"run": rid}, legendgroup=rid)
        return traces

    return {k: ({m: tag(v) for m, v in t.items()} if isinstance(t, dict) else tag(t)) for k, t in out.items()}


def collect_run(path: str | Path, index: int, *, files_url: str | None = None) -> dict:
    """Everything the page shows of one run, JSON-ready (plotly objects are serialised by the caller).
    ``files_url``: where the page finds the run's own files (its report.html); a file URI when None."""
    path = Path(path)
    rid, color = run_id(path), PALETTE[index % len(PALETTE)]
    base = {"id": rid, "index": index, "color": color, "folder": str(path), "version": version(path),
            "name": path.name, "status": "incomplete", "problems": [], "stages": [], "active": False,
            "row": {k: _cell("") for k, _, _ in COLUMNS}, "summary": [], "sections": [], "overlays": {}, "ship": None,
            "report": None}
    try:
        view = RunView(path)
        stages, active = progress(view)
        name = view.name
        sections = _panels(view, rid) if view.is_run else []
        overlays = _overlays(view, rid, color, name) if view.is_run else {}
        summary = []
        for layer in _with("summary"):
            try:
                summary += [list(r) for r in layer.summary(view)]
            except Exception as e:  # noqa: BLE001
                view.problems.append(f"summary from {layer.__name__.rsplit('.', 1)[1]}: {type(e).__name__}: {e}")
        try:
            ship = selection.dashboard(view)
        except Exception as e:  # noqa: BLE001
            view.problems.append(f"selection: {type(e).__name__}: {e}")
            ship = None
        run_status, problems = status(view, stages, active)
        row = overview_row(view, run_status)
        problems += [p for p in view.problems if p not in problems]
        if problems and run_status == "complete":
            run_status = "incomplete"
            row["status"] = _cell(run_status)
        report = None
        if (path / "report.html").is_file():
            report = (f"{files_url}/report.html" if files_url else (path / "report.html").resolve().as_uri())
        base.update(name=_text(name), status=run_status, problems=[_text(p, 1000) for p in problems[:50]],
                    stages=stages, active=active, row=row, summary=summary, sections=sections, overlays=overlays,
                    ship=ship, report=report, meta={k: _text(view.meta.get(k)) for k in ("started", "finished", "seed",
                                                                                           "device")
                                                    if view.meta.get(k) is not None})
        from plotly.io.json import to_json_plotly

        # what came from the folder's records must serialise (figures come from plotly, which checked them)
        to_json_plotly({k: v for k, v in base.items() if k not in ("sections", "overlays")})
    except Exception as e:  # noqa: BLE001 - one run that cannot be collected is marked, the others still load
        return damaged_run(path, index, e)
    return base


def _why(e: BaseException) -> str:
    if isinstance(e, LossglassError):
        return " ".join(str(e).split())[:500]
    return f"could not be read ({type(e).__name__}: {' '.join(str(e).split())[:300]})"


def damaged_run(path: str | Path, index: int, error: BaseException) -> dict:
    """The page's entry for a run folder that could not be collected: marked "damaged", with one line saying why."""
    path = Path(path)
    rid, color = run_id(path), PALETTE[index % len(PALETTE)]
    row = {k: _cell("") for k, _, _ in COLUMNS}
    row["name"], row["status"] = _cell(path.name), _cell("damaged")
    return {"id": rid, "index": index, "color": color, "folder": str(path), "version": version(path),
            "name": path.name, "status": "damaged", "problems": [f"{path.name}: {_why(error)}"], "stages": [],
            "active": False, "row": row, "summary": [], "sections": [], "overlays": {}, "ship": None, "report": None}


def run_state(path: str | Path) -> dict:
    """The cheap part, polled by the live page: id, results version, status and stage progress."""
    path = Path(path)
    rid = run_id(path)
    try:
        view = RunView(path)
        stages, active = progress(view)
        run_status, _ = status(view, stages, active)
        return {"id": rid, "version": version(path), "status": run_status, "stages": stages, "active": active}
    except Exception as e:  # noqa: BLE001 - one run that cannot be read is marked, the others are still polled
        return {"id": rid, "version": version(path), "status": "damaged", "stages": [], "active": False,
                "problems": [f"{path.name}: {_why(e)}"]}


def page_data(runs: list[dict], *, live: bool) -> dict:
    """The page's data apart from the runs: columns, overlay kinds, the clock, and the mode."""
    return {"now": time.time(), "live": live, "columns": [{"key": k, "label": lbl, "numeric": n} for k, lbl, n in COLUMNS],
            "overlays": [{"key": k, "title": t, "x": x[0], "xlog": x[1], "y": y[0], "ylog": y[1], "caption": c}
                         for k, t, x, y, c in OVERLAYS], "runs": runs}
