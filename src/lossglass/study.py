"""A study: a validated config -> the protocols in order -> a run folder (:class:`RunStore`).

Stages: train, walk, connect, replicas, curvature, reference, report. A stage writes its tables, then its
completion record; a run started again with the same config skips finished stages and resumes training
from its last epoch checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .config import StudyConfig, load_config, same_config, to_toml
from .datasets import Dataset, load
from .errors import LossglassError, check
from .models import mlp
from .problem import Problem
from .protocols.timeline import TIMELINE_COLUMNS, TimelineSettings, snapshot_rows
from .store import STAGE_ORDER, RunStore
from .train import Replicas, train

#: the stages in run order (one list, kept in the store: run folders order their records by it too)
STAGES = STAGE_ORDER
#: what each stage's results depend on: config sections and earlier stages (a stage is redone, with everything that
#: depends on it, when the fingerprint of these inputs changes)
SECTIONS = {"train": ("seed", "device", "data", "model", "train"), "timeline": ("timeline",), "walk": ("walk",),
            "connect": ("connect", "train"),
            "replicas": ("replicas",), "curvature": ("curvature",), "select": ("select",),
            "reference": ("seed", "reference"), "report": ()}
DEPENDS = {"train": (), "timeline": ("train",), "walk": ("train",), "connect": ("train",), "replicas": ("train",),
           "curvature": ("train",),
           "select": ("train", "curvature"), "reference": (), "report": ()}


def log(msg: str) -> None:
    print(f"[lossglass] {msg}", file=sys.stderr, flush=True)


def dependents(stage: str) -> set[str]:
    """``stage`` and every stage whose results depend on it."""
    out = {stage}
    changed = True
    while changed:
        changed = False
        for s, deps in DEPENDS.items():
            if s not in out and out & set(deps):
                out.add(s)
                changed = True
    return out


def dependents_inverse(stage: str) -> set[str]:
    """``stage`` and every stage it depends on."""
    out, todo = set(), [stage]
    while todo:
        s = todo.pop()
        if s not in out:
            out.add(s)
            todo += list(DEPENDS.get(s, ()))
    return out


def build_dataset(cfg: StudyConfig) -> Dataset:
    d = cfg.data
    if d.factory:
        from .byo import dataset_from_factory

        ds = dataset_from_factory(d.factory)
    elif d.name == "modular":  # generated; its split is train_fraction of all equations
        ds = load("modular", p=d.p, op=d.op, train_fraction=d.train_fraction, seed=cfg.seed)
    else:
        ds = load(d.name, n_train=d.n_train, n_test=d.n_test, seed=cfg.seed, data_dir=d.data_dir)
    return ds.with_validation(d.n_val, cfg.seed)


def build_problem(cfg: StudyConfig, dataset: Dataset | None = None, hidden=None) -> Problem:
    ds = dataset or build_dataset(cfg)
    if cfg.model.factory and hidden is None:
        from .byo import model_from_factory

        model = model_from_factory(cfg.model.factory)
    elif cfg.model.arch == "cnn" and hidden is None:
        from .models import cnn

        check(len(ds.shape) == 3, f"model.arch = 'cnn' needs image data; {ds.name} has input shape {ds.shape}")
        model = cnn(tuple(ds.shape), cfg.model.channels, ds.n_classes, batchnorm=cfg.model.batchnorm)
    elif cfg.model.arch == "resnet" and hidden is None:
        from .models import resnet

        check(len(ds.shape) == 3, f"model.arch = 'resnet' needs image data; {ds.name} has input shape {ds.shape}")
        model = resnet(cfg.model.depth, cfg.model.width, tuple(ds.shape), ds.n_classes)
    elif cfg.model.arch == "transformer" and hidden is None:
        from .models import transformer

        check("vocab" in ds.info, f"model.arch = 'transformer' needs token data (data.name = 'modular', or a data "
              f"set whose info names its 'vocab'); {ds.name} has none")
        m = cfg.model
        model = transformer(int(ds.info["vocab"]), ds.in_dim, ds.n_classes, d_model=m.d_model, n_heads=m.n_heads,
                            n_layers=m.n_layers, d_mlp=m.d_mlp, activation=m.activation)
    else:
        model = mlp(ds.in_dim, hidden or cfg.model.hidden, ds.n_classes, cfg.model.activation)
    try:
        problem = Problem(model, ds, loss=cfg.model.loss, device=cfg.device, batchnorm=cfg.model.bn_stats,
                          memory_mb=cfg.model.memory_mb)
    except LossglassError:
        raise
    except Exception as e:  # noqa: BLE001 - a user model that fails on the data: say so in one line
        raise LossglassError(f"the model does not run on {ds.name} inputs of shape {tuple(ds.x_train.shape[1:])}: "
                             f"{type(e).__name__}: {e}") from None
    if cfg.model.spec and hidden is None:
        from .byo import resolve
        from .symmetry import PermutationSpec

        spec = resolve(cfg.model.spec, "model.spec")()
        check(isinstance(spec, PermutationSpec), f"model.spec = {cfg.model.spec!r} must return a lossglass.PermutationSpec")
        problem.spec = spec.validate(problem)
    return problem


def subset_problem(problem: Problem, n: int | None) -> Problem:
    """The same model on the first ``n`` training samples (see :meth:`Problem.subset`)."""
    return problem.subset(n)


def load_replicas(store: RunStore) -> Replicas:
    return Replicas(store.read_tensors("replicas")["theta"], store.read_table("replicas"))


def alive_replicas(store: RunStore, problem: Problem) -> Replicas:
    """The replicas that did not diverge; with ``batchnorm="fixed"``, the problem's BatchNorm statistics are
    frozen at the first of them (every protocol's reference point)."""
    rep = load_replicas(store)
    check(bool(rep.alive.any()), "every replica diverged: nothing to measure (lower train.lr)")
    rep = rep[torch.nonzero(rep.alive).flatten()]
    if problem._bn and problem.batchnorm == "fixed":
        problem.freeze_batchnorm(rep.theta[0])
    return rep


def _versions() -> dict:
    import scipy

    return {"lossglass": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def data_fingerprint(ds: Dataset) -> str:
    """BLAKE2 of the data the replicas see (both splits, values, labels, shapes, class count)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.numel() < 2**16 else memoryview(t.numpy()).cast("B"))
    h.update(str(ds.n_classes).encode())
    return h.hexdigest()


def code_fingerprint(cfg: StudyConfig) -> dict[str, str]:
    """BLAKE2 of the source file of each user factory the config names (model.factory, data.factory, model.spec)."""
    out = {}
    for key, spec in (("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory),
                      ("model.spec", cfg.model.spec)):
        if not spec:
            continue
        mod = importlib.import_module(spec.split(":")[0])
        try:
            src = Path(inspect.getsourcefile(mod) or "").read_bytes()
        except (OSError, TypeError):
            src = repr(getattr(mod, spec.split(":")[1], None)).encode()
        out[key] = hashlib.blake2b(src, digest_size=16).hexdigest()
    return out


def _section_values(cfg: StudyConfig, names) -> dict:
    dump = cfg.model_dump()
    return {n: dump[n] for n in names}


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out


class Study:
    """Runs the stages of a config into a run folder; each ``stage_*`` method can also run alone on an
    existing folder (the CLI's per-protocol sub-commands).

    Before the first write, everything is resolved and checked (data, model, device, options, memory and disk),
    so a failed start leaves the folder as it was. Each finished stage records the fingerprint of its inputs
    (config sections, data hash, source of user factories, the stages it depends on); a stage whose inputs changed
    is redone with everything that depends on it, and its old outputs are removed first."""

    def __init__(self, cfg: StudyConfig, out: str | Path, *, progress: bool = True, executor=None):
        from .executor import LocalExecutor

        self.cfg, self.progress = cfg, progress
        self.out = Path(out)
        self._store: RunStore | None = None
        self.executor = executor or LocalExecutor()
        self._problem: Problem | None = None
        self._inputs: dict | None = None

    @property
    def store(self) -> RunStore:
        if self._store is None:
            self._store = RunStore(self.out)
        return self._store

    @property
    def bars(self) -> bool:
        """Progress bars: on a terminal unless quiet (elsewhere, one log line per step of work)."""
        return bool(self.progress and sys.stderr.isatty())

    def note(self, msg: str) -> None:
        """A status line when there are no bars (not a terminal) and not quiet."""
        if self.progress and not self.bars:
            log(msg)

    @property
    def problem(self) -> Problem:
        if self._problem is None:
            self._problem = build_problem(self.cfg)
        return self._problem

    # ------------------------------------------------------------------ inputs and fingerprints
    def inputs(self) -> dict:
        """Resolve and check everything the stages need before anything is written: memory and disk, then the data,
        the model and the device (building the problem), and the user's code; returns their fingerprints."""
        if self._inputs is None:
            from .resources import check_fits

            self.estimate = check_fits(self.cfg, self.out, warn=log if self.progress else None)
            rec = self._imported_record()
            if rec is not None:
                self._inputs = {"data": data_fingerprint(self.problem.dataset), "code": code_fingerprint(self.cfg),
                                "imported": rec.get("sources_fingerprint")}
            else:
                self._inputs = {"data": data_fingerprint(self.problem.dataset), "code": code_fingerprint(self.cfg)}
        return self._inputs

    def set_imported(self, sources_fingerprint: str) -> None:
        """Mark this study's replicas as imported from checkpoints with the given sources (for the train fingerprint)."""
        self.inputs()["imported"] = sources_fingerprint

    def _imported_record(self) -> dict | None:
        p = self.out / "stages" / "train.json"
        if not p.is_file():
            return None
        rec = RunStore(self.out, create=False).stage_record("train") or {}
        return rec if rec.get("imported") else None

    def fingerprint(self, stage: str) -> str:
        """BLAKE2 of everything ``stage``'s results depend on."""
        parts = {"sections": _section_values(self.cfg, SECTIONS[stage]),
                 "deps": {d: self.fingerprint(d) for d in DEPENDS[stage]}}
        if stage == "train":
            parts["inputs"] = self.inputs()
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    # ------------------------------------------------------------------ the folder
    def prepare(self, force: bool = False, allow: tuple[str, ...] = ()) -> None:
        """Check everything, then claim the folder. A folder holding another config is refused unless ``force``
        (which deletes what lossglass wrote there, and nothing else) or unless no stage of it finished, or the
        configs differ only in the sections in ``allow`` (a per-protocol command's own section)."""
        self.inputs()
        folder = self.out
        old_cfg, finished = None, []
        if (folder / "config.toml").is_file():
            try:
                old_cfg = load_config(folder / "config.toml")
            except LossglassError:
                old_cfg = None  # a damaged or foreign config: it differs
            finished = [s for s in RunStore(folder, create=False).stages() if s != "report"]
        store = self.store
        imported = self._imported_record() is not None
        keep_stages = {"train"} if imported else set()
        if force:
            n = store.remove_owned(stages=set(STAGES) - keep_stages | {"-"})
            if n:
                log(f"--force: removed {n} files of the earlier run in {folder}"
                    + (" (kept the imported replicas)" if imported else ""))
        elif (folder / "config.toml").exists() and (old_cfg is None or not same_config(old_cfg, self.cfg)):
            changed = (_diff_keys(old_cfg.model_dump(), self.cfg.model_dump()) if old_cfg is not None
                       else ["config.toml (unreadable)"])
            sections = {k.split(".")[0] for k in changed}
            # a change is refused when it alters the inputs of a finished stage (other than the sections a
            # per-protocol command was asked to redo): the folder would no longer describe what produced it
            used = {sec for st in finished for dep in dependents_inverse(st) for sec in SECTIONS.get(dep, ())}
            if finished and (old_cfg is None or (sections & used) - set(allow)):
                raise LossglassError(
                    f"{folder} holds a run with a different config (differs in: {', '.join(changed[:6])}"
                    f"{', ...' if len(changed) > 6 else ''}); use a new --out folder, or --force to start over there")
            if not finished:
                store.remove_owned()  # an unfinished start with another config: nothing worth keeping
        store.stage = None
        store.write_text("config.toml", to_toml(self.cfg))
        store.mark_trusted()
        meta = store.read_json("meta.json", {}) or {}
        meta.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta.update({"versions": _versions(), "seed": self.cfg.seed, "device": self.cfg.device,
                     "name": self.cfg.name, "batchnorm_statistics": self.cfg.model.bn_stats,
                     "inputs": self.inputs(), "finished": None})
        from ._determinism import configure

        # one thread count per run: a resumed run keeps the count it started with (the numerics depend on it)
        old_threads = None if force else (meta.get("numerics") or {}).get("threads")
        meta["numerics"] = configure(threads=old_threads) if old_threads else configure()
        store.write_json("meta.json", meta)

    def invalidate(self, stage: str) -> None:
        """Remove the results of ``stage`` and of every stage that depends on it (files and completion records)."""
        gone = dependents(stage)
        self.store.remove_owned(stages=gone)
        for s in gone:
            self.discard_partial(s)
        for s in gone:
            p = self.store.path / "stages" / f"{s}.json"
            if p.exists():
                p.unlink()

    def discard_partial(self, stage: str | None = None) -> None:
        """Remove unfinished task results and checkpoints (of one stage, or all) that lossglass wrote."""
        owned = self.store.owned()
        keep = {r for r in owned if not {"tasks", "checkpoints"} & set(Path(r).parts[:-1])
                or (stage is not None and not Path(r).name.startswith(f"{stage}-"))}
        self.store.remove_owned(keep=keep)

    def run(self, stages=STAGES, force: bool = False, allow: tuple[str, ...] = ()) -> RunStore:
        self.prepare(force, allow)
        store = self.store
        t_all = time.time()
        todo = [n for n in stages if getattr(getattr(self.cfg, n, None), "enabled", True)]
        if stages is STAGES and not self.cfg.train.keep_at:  # no snapshots asked for: no timeline stage at all
            todo.remove("timeline")
        self._progress = {n: {"state": "done" if store.stage_done(n) and n != "report" else "pending"} for n in todo}
        self._write_progress()
        try:
            self._run_stages(todo, store)
        except BaseException as e:
            running = [n for n, v in self._progress.items() if v["state"] == "running"]
            for n in running:
                self._progress[n].update(state="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                         error=str(e)[:300])
            self._write_progress(active=False)
            raise
        self._write_progress(active=False)
        meta = store.read_json("meta.json", {})
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["stage_seconds"] = {k: v.get("seconds") for k, v in store.stages().items()}
        meta["last_run_seconds"] = time.time() - t_all
        store.write_json("meta.json", meta)
        return store

    def _write_progress(self, active: bool = True) -> None:
        """``progress.json``: every stage of this run with its state (pending, running with its start time, done,
        skipped, failed, interrupted), written atomically at every change (the dashboard's live view reads it)."""
        self.store.write_json("progress.json", {"active": active, "pid": os.getpid(), "updated": time.time(),
                                                "stages": self._progress})

    def _stage_state(self, name: str, **kw) -> None:
        self._progress.setdefault(name, {}).update(kw)
        self._write_progress()

    def _run_stages(self, stages, store: RunStore) -> None:
        for name in stages:
            fp = self.fingerprint(name)
            rec = store.stage_record(name) if store.stage_done(name) else None
            if rec is not None and rec.get("imported"):
                check(rec.get("fingerprint") == fp, f"{store.path}: the model or data differ from those the "
                      "checkpoints were imported with; import them again into a new folder")
                log(f"{name}: imported replicas, kept")
                self._stage_state(name, state="done")
                continue
            if rec is not None and name != "report":
                if rec.get("fingerprint") == fp:
                    log(f"{name}: done already, skipped")
                    self._stage_state(name, state="done")
                    continue
                log(f"{name}: its inputs changed since it ran (config, data or code); redoing it and what depends on it")
                self.invalidate(name)
            check(name != "train" or not self._imported_record(), "imported replicas are never retrained")
            log(f"{name}: running")
            t0 = time.time()
            self._stage_state(name, state="running", started=t0)
            store.stage = name
            info = getattr(self, f"stage_{name}")() or {}
            store.mark_done(name, {"seconds": time.time() - t0, "fingerprint": fp, **info})
            store.stage = None
            self._stage_state(name, state="skipped" if info.get("skipped") else "done", finished=time.time(),
                              seconds=time.time() - t0)
            if info.get("skipped"):
                log(f"{name}: skipped: {info['skipped']}")
            else:
                log(f"{name}: finished in {time.time() - t0:.1f} s")

    # ------------------------------------------------------------------ stages
    def _map(self, fn, tasks: list[tuple], what: str) -> list:
        """Run tasks on the executor; without bars, one status line per finished task (local executor)."""
        if self.executor.name != "local" or len(tasks) <= 1 or self.bars or not self.progress:
            return self.executor.map(fn, tasks)
        out = []
        for i, t in enumerate(tasks):
            out.append(fn(*t))
            self.note(f"{what}: task {i + 1}/{len(tasks)} done")
        return out

    def train_tasks(self) -> list[tuple]:
        """Independent training tasks: each group of replicas in chunks of ``train.chunk`` replica ids."""
        c = self.cfg.train
        cfg_json = self.cfg.model_dump_json()
        tag = self.fingerprint("train")[:10]
        tasks, offset = [], 0
        for gi, grp in enumerate(c.groups or [None]):
            g = grp.model_dump(exclude_none=True) if grp is not None else {}
            k = g.get("replicas", c.replicas)
            for a in range(offset, offset + k, c.chunk):
                tasks.append((cfg_json, str(self.store.path), gi, a, min(a + c.chunk, offset + k), self.bars, tag))
            offset += k
        return tasks

    def stage_train(self) -> dict:
        tasks = self.train_tasks()
        if len(tasks) > 1:
            log(f"train: {len(tasks)} tasks on the {self.executor.name} executor")
        paths = self._map(train_task, tasks, "train")
        thetas, tables, snaps = [], [], []
        for p in paths:
            t = self.store.read_tensors(p)
            thetas.append(t["theta"])
            tables.append(self.store.read_table(p))
            if "snapshots" in t:
                snaps.append((t["snapshots"], t["snapshot_steps"]))
        if snaps and all(torch.equal(st, snaps[0][1]) for _, st in snaps):
            self.store.write_tensors("snapshots", {"theta": torch.cat([sn for sn, _ in snaps], 1),
                                                   "steps": snaps[0][1]})
        elif snaps:
            log("train: the groups keep snapshots at different steps (their lengths differ): no timeline")
        theta = torch.cat(thetas)
        table = pd.concat(tables, ignore_index=True)
        table["source"] = "trained"
        self.store.write_tensors("replicas", {"theta": theta}, {"n_params": self.problem.n_params})
        self.store.write_table("replicas", table)
        self.discard_partial("train")
        log(f"train: {len(table)} replicas, median test accuracy {table['test_accuracy'].median():.4f}, "
            f"{int(table['diverged'].sum())} diverged")
        return {"replicas": len(table), "tasks": len(tasks), "executor": self.executor.name}

    def _alive(self) -> Replicas:
        return alive_replicas(self.store, self.problem)

    def stage_timeline(self) -> dict:
        """The landscape over training time: at every snapshot kept by ``train.keep_at``, the light protocols of
        :func:`timeline_task` (one task per snapshot), gathered into the table ``timeline`` (one row per step and
        replica, and per step and pair; columns :data:`TIMELINE_COLUMNS`)."""
        if not self.store.has_tensors("snapshots"):
            return {"skipped": "no snapshots: set train.keep_at (a list of steps, or 'log') to keep the replicas during "
                               "training"}
        steps = self.store.read_tensors("snapshots")["steps"].tolist()
        tag = self.fingerprint("timeline")[:10]
        tasks = [(self.cfg.model_dump_json(), str(self.store.path), i, self.bars, tag) for i in range(len(steps))]
        names = self._map(timeline_task, tasks, "timeline")
        df = pd.concat([self.store.read_table(n) for n in names], ignore_index=True)
        df = df[[c for c in TIMELINE_COLUMNS if c in df] + [c for c in df if c not in TIMELINE_COLUMNS]]
        self.store.write_table("timeline", df)
        self.discard_partial("timeline")
        return {"steps": steps}

    def _spec_missing(self) -> str | None:
        """Why the permutation protocols cannot run on this model (None when they can)."""
        from .symmetry import spec_of

        try:
            spec_of(self.problem)
        except LossglassError as e:
            return ("the model's permutation symmetry is unknown: set model.spec = 'package.module:function' in the "
                    f"config (a function returning a lossglass.PermutationSpec). Why: {e}")
        return None

    def stage_walk(self) -> dict:
        from .protocols import walk as W

        c = self.cfg.walk
        self._alive()
        n_runs = len(c.temperatures) + (1 if c.langevin_steps > 0 else 0)
        tag = self.fingerprint("walk")[:10]
        tasks = [(self.cfg.model_dump_json(), str(self.store.path), i, self.bars, tag) for i in range(n_runs)]
        names = self._map(walk_task, tasks, "walk")
        results = [_load_walk(self.store, n) for n in names]
        traces, summaries, msds, agings, evd, radii = [], [], [], [], [], []
        n_data = min(c.n_data or len(self.problem.dataset.y_train), len(self.problem.dataset.y_train))
        for i, r in enumerate(results):
            t_ = r.params.get("temperature")
            label = (f"{r.kind} T={t_:g}" if isinstance(t_, (int, float)) else "walk (every step taken)"
                     if r.kind == "walk" else r.kind)
            tab = r.table()
            tab["run"] = i
            tab["label"] = label
            traces.append(tab)
            s = W.summarize(r, c.deltas)
            s.update(run=i, label=label, n_data=n_data)
            summaries.append(s)
            t_, m_, _ = W.msd(r)
            msds.append(pd.DataFrame({"run": i, "label": label, "t": t_, "msd": m_}))
            ag = W.aging(r)
            ag["run"], ag["label"] = i, label
            agings.append(ag)
            ed = W.energy_vs_distance(r)
            ed["run"], ed["label"] = i, label
            evd.append(ed)
            br = W.basin_radius(r, c.deltas)
            br["run"], br["label"] = i, label
            radii.append(br)
        for name, parts in (("walk", traces), ("walk_msd", msds), ("walk_aging", agings),
                            ("walk_energy_distance", evd), ("walk_radius", radii)):
            self.store.write_table(name, pd.concat(parts, ignore_index=True))
        self.store.write_table("walk_summary", pd.DataFrame(summaries))
        self.discard_partial("walk")
        return {"runs": len(results), "n_data": n_data}

    def connect_tasks(self) -> list[tuple]:
        """Independent pieces of the connect stage: permutation-interpolation, each pair, the Bezier curve, each
        plane, each width of the width experiment."""
        c, k = self.cfg.connect, len(self._alive())
        parts = [("perm", 0)]
        if k >= 2:
            parts += [("pair", i) for i in range(min(c.pairs, k // 2))]
            parts += [("bezier", 0)] if c.bezier_steps > 0 else []
            parts += [("plane_through", 0)] if c.plane_steps >= 2 else []
        parts += [("plane_random", 0)] if c.plane_steps >= 2 else []
        parts += [("width", w) for w in c.widths]
        cfg_json = self.cfg.model_dump_json()
        tag = self.fingerprint("connect")[:10]
        return [(cfg_json, str(self.store.path), part, arg, self.bars, tag) for part, arg in parts]

    def stage_connect(self) -> dict:
        why = self._spec_missing()
        if why:
            return {"skipped": why}
        tasks = self.connect_tasks()
        names = self._map(connect_task, tasks, "connect")
        got: dict[str, list[pd.DataFrame]] = {}
        for (_, _, part, *_), name in zip(tasks, names):
            for suffix in ("", "-paths"):
                if self.store.has_table(name + suffix):
                    got.setdefault(part + suffix, []).append(self.store.read_table(name + suffix))
        out = {"perm": "perm_barriers", "pair": "pair_barriers", "plane_random": "plane_random",
               "plane_through": "plane_through", "width": "width_barriers"}
        for part, table in out.items():
            if part in got:
                self.store.write_table(table, pd.concat(got[part], ignore_index=True))
        paths = got.get("pair-paths", []) + got.get("bezier", [])
        if paths:
            self.store.write_table("paths", pd.concat(paths, ignore_index=True))
        pts = [n for (_, _, part, *_), n in zip(tasks, names) if part == "plane_through"]
        if pts:
            p = self.store.read_json(f"{pts[0]}.json")
            self.store.write_table("plane_through_points", pd.DataFrame(
                {"label": list(p), "x": [v[0] for v in p.values()], "y": [v[1] for v in p.values()]}))
        self.discard_partial("connect")
        if "width" in got:
            for w, g in pd.concat(got["width"]).groupby("width"):
                log(f"width {w}: aligned barrier {g['barrier_aligned'].mean():.4f}, naive {g['barrier_naive'].mean():.4f}")
        return {"tasks": len(tasks), "executor": self.executor.name}

    def stage_replicas(self) -> dict:
        from .protocols import replicas as R

        c = self.cfg.replicas
        rep = self._alive()
        check(len(rep) >= 4, f"the replicas stage needs at least 4 replicas, got {len(rep)}")
        summary, pq_rows = [], []
        why = self._spec_missing()
        kinds = [("raw", False)] if why else [("aligned", True), ("raw", False)]
        for label, al in kinds:
            self.note(f"replicas: {label} overlaps of {len(rep)} replicas")
            q = R.overlaps(self.problem, rep, align=al, kind=c.kind).numpy()
            self._replica_analysis(f"network-{label}", q, summary, pq_rows)
        if c.kind != "functions":
            q = R.overlaps(self.problem, rep, kind="functions").numpy()
            self._replica_analysis("network-functions", q, summary, pq_rows)
        if c.basin_temperature > 0:
            self._basin_samples(rep, summary, pq_rows)
        if not why:
            self.store.write_table("replica_layers",
                                   R.layer_overlaps(self.problem, R.aligned_replicas(self.problem, rep.theta)))
        self.store.write_table("replica_summary", pd.DataFrame(summary))
        self.store.write_table("pq", pd.concat(pq_rows, ignore_index=True))
        return {"note": why} if why else {}

    def _basin_samples(self, rep: Replicas, summary: list, pq_rows: list) -> None:
        """Equilibrium samples at ``basin_temperature`` drawn around one trained solution (independent Metropolis
        chains started there): the P(q) of one basin, beside the overlaps of independent solutions."""
        from .sampling import overlap_matrix, parallel_tempering

        c = self.cfg.replicas
        prob = self.problem.subset(c.basin_n_data)
        self.note(f"replicas: {c.basin_samples} within-basin chains at T = {c.basin_temperature:g}, "
                  f"{c.basin_sweeps} sweeps on {len(prob.dataset.y_train)} samples")
        res = parallel_tempering(prob, [c.basin_temperature], n_replicas=c.basin_samples, sweeps=c.basin_sweeps,
                                 seed=self.cfg.seed, start=rep.theta[0], step_size=c.basin_step_size,
                                 sample_every=max(1, c.basin_sweeps - c.basin_sweeps // 2), progress=self.bars)
        q = overlap_matrix(res, 0)
        self._replica_analysis("network-basin", q, summary, pq_rows)
        summary[-1].update(temperature=c.basin_temperature, move_acceptance=float(res.move_acceptance[0]),
                           energy_mean=float(res.energy[res.params["burn_in"]:, 0].mean()),
                           equilibrated=bool(res.equilibrated), n_data=len(prob.dataset.y_train))

    def _replica_analysis(self, label: str, q: np.ndarray, summary: list, pq_rows: list, *, symmetric: bool = False,
                          system: str | None = None, tree: bool = True, kind: str = "states") -> dict:
        """Overlaps -> distances -> tree and calibrated ultrametricity; one summary row (``system`` names it; the
        tables are saved under the file-safe ``label``). ``symmetric``: spin-flip symmetric systems (distances
        from |q|); ``kind``: what the states are, for the sentence (protocols.replicas.STATE_KINDS)."""
        from .protocols import replicas as R

        c = self.cfg.replicas
        d = R.distances_from_overlaps(q, symmetric=symmetric)
        h = R.hierarchy(d, method=c.method, max_triangles=c.max_triangles, seed=self.cfg.seed, alpha=c.alpha,
                        symmetric=symmetric, norms="unit")
        u = h.ultrametricity
        pq = R.overlap_distribution(q)
        k = q.shape[0]
        if tree:
            ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
            self.store.write_table(f"overlaps_{label}", pd.DataFrame({"a": ii.ravel(), "b": jj.ravel(), "q": q.ravel()}))
            self.store.write_table(f"linkage_{label}",
                                   pd.DataFrame(h.linkage, columns=["left", "right", "height", "size"]))
            self.store.write_table(f"order_{label}", pd.DataFrame({"leaf": h.order}))
            tri = pd.DataFrame(u.sides[:5000], columns=["d_min", "d_mid", "d_max"])
            self.store.write_table(f"triangles_{label}", tri)
        if pq_rows is not None:
            pq_rows.append(pd.DataFrame({"label": system or label, "q": pq.q}))
        row = {"system": system or label, "label": label, "replicas": k, **pq.moments, "cophenetic": h.cophenetic,
               **u.summary, "sentence": R.describe_ultrametricity(u.summary, kind=kind)}
        summary.append(row)
        return row

    def stage_curvature(self) -> dict:
        from tqdm.auto import tqdm

        from .protocols import curvature as K

        c = self.cfg.curvature
        rep = self._alive()
        prob = subset_problem(self.problem, c.n_hvp_data)
        steps = tqdm(total=3 if c.density else 2, desc="curvature", disable=not self.bars, leave=False)
        self.note(f"curvature: flatness measures of {len(rep)} replicas on {len(prob.dataset.y_train)} samples")
        df = K.flatness_table(prob, rep, rho=c.rho, top_k=c.top_k, tol=c.tol, trace_probes=c.trace_probes,
                              n_samples=c.n_samples, entropy_radius=c.entropy_radius, entropy_chains=c.entropy_chains,
                              entropy_epsilon=c.entropy_epsilon, seed=self.cfg.seed)
        steps.update(1)
        self.store.write_table("flatness", df)
        # Kendall's p-values and bootstrap intervals assume independent replicas: replicated-SGD replicas are coupled
        # by design, so they are left out of the rank correlations (and counted) when enough others remain
        coupled = df["method"].eq("replicated") if "method" in df else pd.Series(False, index=df.index)
        indep = df[~coupled] if coupled.any() and (~coupled).sum() >= 3 else df
        taus = pd.concat([K.rank_correlations(indep, target=t, seed=self.cfg.seed) for t in ("gap_error", "gap_loss",
                                                                                               "test_error")])
        taus["excluded_coupled"] = int(len(df) - len(indep))
        self.store.write_table("kendall", taus)
        # the cheap proxies against the full measures they stand for, on the same replicas
        pv = [K.rank_correlations(df, measures=[m], target=t, seed=self.cfg.seed)
              for m, t in (("proxy_lambda_batch", "lambda_max"), ("proxy_perturbation", "sharpness_average"))]
        self.store.write_table("proxy_validation", pd.concat(pv, ignore_index=True))
        steps.update(1)
        if c.density:
            self.note("curvature: spectral densities")
            rows = []
            for label, idx in (("flattest", int(df["lambda_max"].idxmin())), ("sharpest", int(df["lambda_max"].idxmax()))):
                sd = K.spectral_density(prob, rep.theta[idx], steps=c.slq_steps, seed=self.cfg.seed)
                rows.append(pd.DataFrame({"label": label, "replica": idx, "eigenvalue": sd.grid, "density": sd.density}))
            self.store.write_table("spectral_density", pd.concat(rows, ignore_index=True))
            steps.update(1)
        steps.close()
        return {"n_data": len(prob.dataset.y_train)}

    def stage_select(self) -> dict:
        """Which model to ship; never fails the study: when it cannot choose, it says why and is skipped."""
        from .selection import select

        if not self.store.has_table("flatness"):
            return {"skipped": "no curvature results (enable the curvature stage)"}
        try:
            d = select(self.store, self.problem)
        except LossglassError as e:
            return {"skipped": str(e)}
        return {"replica": d.get("replica")}

    def stage_reference(self) -> dict:
        """Known landscapes through the same replica pipeline: the SK spin glass sampled in equilibrium by parallel
        tempering (the positive control: full replica symmetry breaking below T_c = 1), the spherical p-spin's
        gradient-descent minima (threshold states: nearly orthogonal, no Gibbs sample), and a convex control
        (thermal samples of one quadratic well: one state)."""
        from .models import quadratic, spherical_pspin
        from .protocols import walk as W
        from .train import descend

        c = self.cfg.reference
        summary, pq_rows = [], []
        info: dict = {}
        if c.sk_spins:
            info.update(self._sk_control(summary, pq_rows))
        self.note(f"reference: {c.replicas} descent minima of the spherical {c.p}-spin, N = {c.n_spins}")
        ps = spherical_pspin(c.n_spins, c.p, seed=self.cfg.seed)
        s0 = ps.init(c.replicas, self.cfg.seed)
        # the gradient of the energy per spin is O(1/N) per component: the step is lr * N * grad(H/N)
        s = descend(ps, s0, steps=c.steps, lr=c.lr * c.n_spins, progress=self.bars)
        e = ps.energy(s)
        q = ((s @ s.T) / c.n_spins).double().numpy()
        # runs that ended in the same minimum are one state: keep one of each (a duplicate is a zero distance that
        # would dominate sigma(d) in the ultrametricity index)
        same = np.abs(q) > 0.999 if c.p % 2 == 0 else q > 0.999
        keep = [i for i in range(len(q)) if not any(same[i, j] for j in range(i))]
        distinct = q[np.ix_(keep, keep)]
        if len(keep) >= 4:
            row = self._replica_analysis(f"pspin{c.p}", distinct, summary, pq_rows, symmetric=c.p % 2 == 0,
                                         system=f"{c.p}-spin descent minima (threshold states)", kind="threshold")
            row.update(energy_mean=float(e.mean()), energy_min=float(e.min()), n_spins=c.n_spins,
                       descent_runs=len(q), distinct_minima=len(keep))
        # convex control: one basin, replicas = thermal samples of a quadratic well (replica symmetric)
        n = c.n_spins
        g = torch.Generator().manual_seed(self.cfg.seed)
        evals = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
        qmat, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        quad = quadratic(qmat @ torch.diag(evals) @ qmat.T)
        centre = torch.ones(n, dtype=torch.float64)
        samp = W.langevin(quad, torch.zeros(n, dtype=torch.float64), temperature=0.05, lr=0.05, steps=400,
                          n_walkers=c.replicas, seed=self.cfg.seed, progress=False)
        x = samp.theta.double() + centre
        row = self._replica_analysis("convex-control", _cosine_np(x.numpy()), summary, pq_rows,
                                     system="convex control (one well)", kind="control")
        row["energy_mean"] = float(quad.energy(samp.theta).mean())
        self.store.write_table("reference_summary", pd.DataFrame(summary))
        self.store.write_table("reference_pq", pd.concat(pq_rows, ignore_index=True))
        self.store.write_table("reference_energies", pd.DataFrame({"replica": np.arange(len(e)), "energy": e.numpy()}))
        return {"pspin_energy_mean": float(e.mean()), **info}

    def _sk_control(self, summary: list, pq_rows: list) -> dict:
        """SK by parallel tempering over ``sk_samples`` disorder samples: per sample the exchange acceptances,
        equilibration, energy and the tree of the replicas at ``sk_temperature``; P(q) pooled over the samples (the
        disorder average, what the Parisi solution describes) at that temperature and at the top of the ladder;
        the per-sample ultrametricity p-values combined by Fisher's method."""
        from ._util import seed_for
        from .models import sk
        from .protocols import replicas as R
        from .sampling import overlap_matrix, overlap_samples, parallel_tempering

        c = self.cfg.reference
        temps = c.sk_temperatures
        per, ladder = [], []
        pooled: dict[int, list] = {}
        t_low = t_high = None
        for j in range(c.sk_samples):
            self.note(f"reference: SK N = {c.sk_spins}, disorder sample {j + 1}/{c.sk_samples}, parallel tempering "
                      f"({c.sk_replicas} replicas x {len(temps)} temperatures x {c.sk_sweeps} sweeps)")
            prob = sk(c.sk_spins, seed=seed_for(self.cfg.seed, 97, j))
            burn = c.sk_sweeps // 2
            res = parallel_tempering(prob, temps, n_replicas=c.sk_replicas, sweeps=c.sk_sweeps, burn_in=burn,
                                     sample_every=max(1, (c.sk_sweeps - burn) // 8), seed=seed_for(self.cfg.seed, 98, j),
                                     progress=self.bars)
            tab = res.table()
            tab["disorder"] = j
            ladder.append(tab)
            lo, hi = res.index_of(c.sk_temperature), len(temps) - 1
            t_low, t_high = float(res.temperatures[lo]), float(res.temperatures[hi])
            for idx in (lo, hi):
                pooled.setdefault(idx, []).append(overlap_samples(res, idx).ravel())
            row = self._replica_analysis(f"sk-{j}", overlap_matrix(res, lo), summary, None, symmetric=True,
                                         system=f"SK sample {j} (T = {t_low:g}, equilibrium)", tree=j == 0,
                                         kind="equilibrium")
            qs = pooled[lo][-1]
            row.update(temperature=t_low, energy_mean=float(tab["E_mean"][lo]), disorder=j,
                       abs_q_mean=float(np.abs(qs).mean()), frac_abs_q_below_0_3=float(np.mean(np.abs(qs) < 0.3)),
                       exchange_min=float(np.nanmin(res.exchange_acceptance)),
                       exchange_max=float(np.nanmax(res.exchange_acceptance)), equilibrated=bool(res.equilibrated))
            per.append(row)
        for idx, t in ((lo, t_low), (hi, t_high)):
            q = np.concatenate(pooled[idx])
            pq_rows.append(pd.DataFrame({"label": f"SK T = {t:g} ({len(per)} disorder samples)", "q": q}))
        self.store.write_table("reference_sk_ladder", pd.concat(ladder, ignore_index=True))
        comb = R.combine_samples(per, self.cfg.replicas.alpha, name="disorder samples")
        q_lo = np.concatenate(pooled[lo])
        summary.append({"system": f"SK all samples (T = {t_low:g})", "label": "sk-all", "replicas": c.sk_replicas,
                        "q_mean": float(q_lo.mean()), "q_var": float(q_lo.var()),
                        "abs_q_mean": float(np.abs(q_lo).mean()),
                        "frac_abs_q_below_0_3": float(np.mean(np.abs(q_lo) < 0.3)),
                        "K_mean": float(np.mean([r["K_mean"] for r in per])),
                        "null_K_mean": float(np.mean([r["null_K_mean"] for r in per])),
                        "alpha": self.cfg.replicas.alpha, "temperature": t_low,
                        "energy_mean": float(np.mean([r["energy_mean"] for r in per])), **comb})
        return {"sk_verdict": comb["verdict"], "sk_p_value": comb["p_value"]}

    def stage_report(self) -> dict:
        from .report import build_report

        meta = self.store.read_json("meta.json", {})
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["stage_seconds"] = {k: v.get("seconds") for k, v in self.store.stages().items()}
        self.store.write_json("meta.json", meta)
        build_report(self.store)
        return {}


_WALK_ARRAYS = ("energy", "accuracy", "distance", "accepted", "test_loss", "test_accuracy", "snapshots", "alive",
                "start_index", "theta", "nonfinite")


#: steps between two checkpoints of a walk task's walkers
WALK_CHECKPOINT_EVERY = 50


def walk_task(cfg_json: str, out: str, index: int, progress: bool = False, tag: str = "") -> str:
    """Run the ``index``-th walk of the study (one per temperature, then Langevin) and save it (a task)."""
    from .config import StudyConfig
    from .protocols import walk as W

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out, stage="walk")
    name = f"tasks/walk-{tag}-{index}"
    if store.has_tensors(name) and (store.path / f"{name}.json").exists():
        return name
    c = cfg.walk
    full = build_problem(cfg)
    starts = alive_replicas(store, full).theta[: c.starts]
    problem = subset_problem(full, c.n_data)
    # the walkers' whole state is checkpointed every WALK_CHECKPOINT_EVERY steps: an interrupted stage resumes
    # mid-walk, bit-identical to an uninterrupted one (the file is discarded once the stage is gathered)
    ckpt_rel = f"checkpoints/walk-{tag}-{index}.safetensors"
    store.claim(ckpt_rel)
    store.claim(ckpt_rel + ".prev")
    ckpt = store.resolve(ckpt_rel)
    ckpt.parent.mkdir(exist_ok=True)
    kw = dict(n_walkers=c.n_walkers, record_every=c.record_every, seed=cfg.seed, progress=progress, checkpoint=ckpt,
              checkpoint_every=WALK_CHECKPOINT_EVERY)
    if index < len(c.temperatures):
        t = c.temperatures[index]
        r = W.random_walk(problem, starts, steps=c.steps, step_size=c.step_size,
                          temperature=None if t == "none" else float(t), normalize=c.normalize, **kw)
    else:
        r = W.langevin(problem, starts, temperature=c.langevin_temperature, lr=c.langevin_lr, steps=c.langevin_steps,
                       **kw)
    store.write_tensors(name, {k: getattr(r, k).contiguous() for k in _WALK_ARRAYS})
    store.write_json(f"{name}.json", {"kind": r.kind, "params": r.params, "test_steps": r.test_steps,
                                      "snapshot_steps": r.snapshot_steps})
    return name


def _load_walk(store: RunStore, name: str):
    from .protocols.walk import WalkResult

    t = store.read_tensors(name)
    meta = store.read_json(f"{name}.json")
    return WalkResult(meta["kind"], t["energy"], t["accuracy"], t["distance"], t["accepted"], meta["test_steps"],
                      t["test_loss"], t["test_accuracy"], meta["snapshot_steps"], t["snapshots"], t["alive"],
                      t["start_index"], t["theta"], meta["params"], nonfinite=t.get("nonfinite"))


def connect_task(cfg_json: str, out: str, part: str, arg: int, progress: bool = False, tag: str = "") -> str:
    """One independent piece of the connect stage (a task); writes its table(s) and returns their name."""
    from .config import StudyConfig
    from .protocols import connect as C
    from .symmetry import align

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out, stage="connect")
    name = f"tasks/connect-{tag}-{part}-{arg}"
    if store.has_table(name):
        return name
    c = cfg.connect
    prob = build_problem(cfg)
    theta = alive_replicas(store, prob).theta
    if part == "perm":
        df = C.permutation_barriers(prob, theta[0], swaps=[k for k in c.swaps if k != 1], n_points=c.n_points,
                                    seed=cfg.seed)
    elif part == "pair":
        pair, naive, aligned = C.pair_barriers(prob, theta[2 * arg:2 * arg + 2], pairs=1, n_points=c.n_points,
                                               method=c.align, seed=cfg.seed)
        pair[["a", "b"]] = [2 * arg, 2 * arg + 1]
        paths = []
        for kind, pr in (("naive", naive[0]), ("aligned", aligned[0])):
            t = pr.table()
            t["pair"], t["kind"] = arg, kind
            paths.append(t)
        store.write_table(name + "-paths", pd.concat(paths, ignore_index=True))
        df = pair
    elif part == "bezier":
        df = C.bezier_path(prob, theta[0], theta[1], steps=c.bezier_steps, n_points=c.n_points, seed=cfg.seed,
                           progress=progress).table()
        df["pair"], df["kind"] = 0, "bezier"
    elif part == "plane_through":
        b_al, _ = align(prob, theta[0], theta[1], method=c.align)
        pt = C.plane_through(prob, theta[0], theta[1], b_al, steps=c.plane_steps)
        store.write_json(f"{name}.json", pt.points)
        df = pt.table()
    elif part == "plane_random":
        df = C.plane(prob, theta[0], span=c.plane_span, steps=c.plane_steps, seed=cfg.seed).table()
    else:  # width: train replicas of a single-hidden-layer net of width arg, barriers between pairs
        t = cfg.train
        wprob = build_problem(cfg, prob.dataset, hidden=arg)
        wr = train(wprob, c.width_replicas, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                   momentum=t.momentum, seed=cfg.seed + 1000 + arg, progress=progress)
        ok = wr[torch.nonzero(wr.alive).flatten()]
        rows = []
        if len(ok) >= 2:
            pairs, _, _ = C.pair_barriers(wprob, ok.theta, pairs=len(ok) // 2, n_points=c.n_points, method=c.align)
            rows = [{"width": arg, "n_params": wprob.n_params, **r.to_dict(),
                     "test_accuracy": float(ok.table["test_accuracy"].mean())} for _, r in pairs.iterrows()]
        df = pd.DataFrame(rows, columns=None if rows else ["width"])
    store.write_table(name, df)
    return name


def train_task(cfg_json: str, out: str, group: int, first: int, last: int, progress: bool = False,
               tag: str = "") -> str:
    """Train replicas ``first..last-1`` of training group ``group`` and write them to the run folder (a task:
    runs in this process or on a Ray worker). Returns the result's name; an existing result is reused."""
    from .config import StudyConfig
    from .executor import maybe_fail_once

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out, stage="train")
    name = f"tasks/train-{tag}-{group}-{first}-{last}"
    if store.has_tensors(name) and store.has_table(name):
        return name
    c = cfg.train
    grp = c.groups[group].model_dump(exclude_none=True) if c.groups else {}
    problem = build_problem(cfg)
    ckpt_rel = f"checkpoints/train-{tag}-{group}-{first}-{last}.safetensors"
    store.claim(ckpt_rel)
    store.claim(ckpt_rel + ".prev")
    ckpt = store.resolve(ckpt_rel)
    ckpt.parent.mkdir(exist_ok=True)
    maybe_fail_once(f"train-{group}-{first}")
    extra = {k: getattr(c, k) for k in ("stop_at_loss", "stop_at_accuracy") if getattr(c, k) is not None}
    epochs, batch_size = grp.get("epochs", c.epochs), grp.get("batch_size", c.batch_size)
    keep = keep_steps(c.keep_at, c.keep_points, epochs * max(1, len(problem.dataset.y_train) // batch_size))
    rep = train(problem, last - first, epochs=epochs, batch_size=batch_size,
                lr=grp.get("lr", c.lr), optimizer=grp.get("optimizer", c.optimizer), method=grp.get("method", c.method),
                momentum=c.momentum, weight_decay=c.weight_decay, seed=cfg.seed, replica_ids=range(first, last),
                rho=c.rho, temperature=c.temperature, lr_schedule=c.lr_schedule, checkpoint=ckpt,
                progress=progress, keep_at=keep, **extra)
    rep.table["group"] = group
    rep.table["device"] = str(problem.device)
    kept = {} if rep.snapshots is None else {"snapshots": rep.snapshots.contiguous(),
                                             "snapshot_steps": torch.tensor(rep.snapshot_steps, dtype=torch.int64)}
    store.write_tensors(name, {"theta": rep.theta.cpu(), **kept})
    store.write_table(name, rep.table)
    return name


def keep_steps(keep_at, points: int, total: int) -> list[int]:
    """The optimiser steps whose snapshots training keeps: ``keep_at`` as given, or for ``"log"`` ``points``
    log-spaced steps from 0 (the initialisation) to ``total`` (the last step), duplicates merged."""
    if keep_at != "log":
        return sorted({int(v) for v in keep_at})
    if total < 1:
        return [0]
    grid = np.unique(np.round(np.logspace(0, np.log10(total), max(points - 1, 1))).astype(int))
    return sorted({0, *grid.tolist(), total})


def timeline_task(cfg_json: str, out: str, index: int, progress: bool = False, tag: str = "") -> str:
    """The light protocols at the ``index``-th kept snapshot (a task): loads the snapshot's live replicas and writes
    :func:`lossglass.protocols.timeline.snapshot_rows` (rows per replica and per pair) as one table; returns its
    name."""
    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out, stage="timeline")
    name = f"tasks/timeline-{tag}-{index}"
    if store.has_table(name):
        return name
    prob = build_problem(cfg)
    snaps = store.read_tensors("snapshots")
    step = int(snaps["steps"][index])
    rep = load_replicas(store)
    alive = torch.nonzero(rep.alive).flatten()
    check(len(alive) > 0, "every replica diverged: nothing to measure")
    rows = snapshot_rows(prob, snaps["theta"][index][alive], rep.table["replica"].to_numpy()[alive.numpy()], step,
                         TimelineSettings.from_config(cfg.timeline, cfg.seed))
    store.write_table(name, rows)
    return name


def _cosine_np(x: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(u @ u.T, -1, 1)


def run_study(config, out=None, *, stages=STAGES, force: bool = False, progress: bool = True,
              overrides: list[str] | None = None, executor: str = "local", address: str | None = None) -> RunStore:
    """Run a study: ``config`` is a :class:`StudyConfig`, a TOML path or a preset name; ``out`` the run folder
    (default ``runs/<name>``). Returns the :class:`RunStore`."""
    if isinstance(config, StudyConfig):
        cfg = config
    elif isinstance(config, (str, Path)) and Path(config).suffix == ".toml":
        cfg = load_config(config, overrides=overrides)
    else:
        cfg = load_config(preset=str(config), overrides=overrides)
    from .executor import make_executor

    out = Path(out) if out is not None else Path("runs") / cfg.name
    return Study(cfg, out, progress=progress, executor=make_executor(executor, address)).run(stages, force=force)
