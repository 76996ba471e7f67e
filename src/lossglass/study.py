"""A study: a validated config -> its stages in order (:mod:`lossglass.stages`) -> a run folder (:class:`RunStore`).

This module is the runner: it checks everything before the first write, claims the folder, computes each stage's
fingerprint, runs the stages that are not done (or whose inputs changed, with everything that depends on them),
records their completion and keeps ``progress.json``. What a stage does lives in its module under
:mod:`lossglass.stages`; the science it calls lives in :mod:`lossglass.protocols`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

from ._log import ensure_handler, log
from .config import StudyConfig, load_config, same_config, to_toml
from .errors import LossglassError, check
from .problem import Problem
from .stages import STAGE_ORDER, dependencies, dependents, stage
from .stages.base import StageContext
from .stages.common import (  # noqa: F401 - the names this module has always offered
    alive_replicas,
    build_dataset,
    build_problem,
    code_fingerprint,
    data_fingerprint,
    load_replicas,
    versions,
)
from .store import RunStore

#: the stages in run order (from the registry; run folders order their records by it too)
STAGES = STAGE_ORDER


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


class Terminated(KeyboardInterrupt):
    """SIGTERM received: handled as Ctrl-C (the running stage is recorded as interrupted, finished work is kept and
    the same command resumes)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a study runs in the main thread, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) instead of
    killing the process silently; the previous handler is restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM)")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not settable here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _sized_terminal() -> None:
    """Progress bars need a terminal size: a pseudo-terminal that reports 0 rows or 0 columns (a container's
    ``exec -t``, an editor's or an agent's terminal) makes tqdm draw nothing at all. Such a terminal is given the
    size ``shutil.get_terminal_size`` falls back to ($COLUMNS x $LINES, else 80 x 24), as ``stty cols 80 rows 24``
    would; a terminal with a size is left as it is."""
    import fcntl
    import shutil
    import struct
    import termios

    try:
        fd = sys.stderr.fileno()
        rows, cols = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
        if rows and cols:
            return
        size = shutil.get_terminal_size((80, 24))
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines or 24, size.columns or 80, 0, 0))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return


class _Heartbeat:
    """Without progress bars (output not a terminal, or tasks on Ray workers, whose bars the driver cannot show) and
    not quiet: one status line every ``every`` seconds while a stage runs (``<stage>: running for N s``), from a
    daemon thread in the driver, so that a long stage is never silent, whatever executor runs its tasks.
    ``LOSSGLASS_STATUS_EVERY`` sets the interval (default 30 s)."""

    def __init__(self, name: str, every: float):
        import threading

        self.name, self.every, self.t0 = name, every, time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"lossglass-status-{name}")

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            log(f"{self.name}: running for {time.time() - self.t0:.0f} s")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def status_every() -> float:
    """Seconds between status lines without progress bars (``LOSSGLASS_STATUS_EVERY``, default 30)."""
    try:
        v = float(os.environ.get("LOSSGLASS_STATUS_EVERY", "30"))
    except ValueError:
        raise LossglassError("LOSSGLASS_STATUS_EVERY must be a number of seconds") from None
    check(v > 0, "LOSSGLASS_STATUS_EVERY must be a positive number of seconds")
    return v


class Study:
    """Runs the stages of a config into a run folder; a stage can also run alone on an existing folder (the CLI's
    per-protocol sub-commands: ``Study(cfg, folder).run(("walk", "report"))``).

    Before the first write, everything is resolved and checked (data, model, device, options, memory and disk),
    so a failed start leaves the folder as it was. Each finished stage records the fingerprint of its inputs
    (config sections, data hash, source of user factories, the stages it depends on); a stage whose inputs changed
    is redone with everything that depends on it, and its old outputs are removed first."""

    def __init__(self, cfg: StudyConfig, out: str | Path, *, progress: bool = True, executor=None):
        from .executor import LocalExecutor

        ensure_handler()
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

    def fingerprint(self, name: str) -> str:
        """BLAKE2 of everything stage ``name``'s results depend on: its config sections, the fingerprints of the stages
        it depends on, and for training the data, the user's code and imported checkpoints."""
        st = stage(name)
        parts = {"sections": _section_values(self.cfg, st.sections), "deps": {d: self.fingerprint(d) for d in st.needs(self.cfg)}}
        if name == "train":
            parts["inputs"] = self.inputs()
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    # ------------------------------------------------------------------ the folder
    def prepare(self, force: bool = False, allow: tuple[str, ...] = ()) -> None:
        """Check everything, then claim the folder. A folder holding another config is refused unless ``force``
        (which deletes what lossglass wrote there, and nothing else) or unless no stage of it finished, or the
        configs differ only in the sections in ``allow`` (a per-protocol command's own section).

        The folder's writer lock is held from here on (:meth:`RunStore.writer`; :meth:`run` holds it until its last
        stage), and what killed writes left there (temporary files, empty folders) is swept first. The config was
        checked where it was read (:func:`lossglass.config.load_config` refuses code named by a config from a run
        folder this user's lossglass did not write): only then is the folder marked trusted."""
        self.inputs()
        with self.store.writer():
            self._prepare(force, allow)

    def _prepare(self, force: bool, allow: tuple[str, ...]) -> None:
        folder = self.out
        store = self.store
        store.sweep()
        old_cfg, finished = None, []
        if (folder / "config.toml").is_file():
            try:  # compared only, nothing imported: the trust check belongs to whoever loaded self.cfg
                old_cfg = load_config(folder / "config.toml", trust=True)
            except LossglassError:
                old_cfg = None  # a damaged or foreign config: it differs
            finished = [s for s in RunStore(folder, create=False).stages(STAGE_ORDER) if s != "report"]
        imported = self._imported_record() is not None
        keep_stages = {"train"} if imported else set()
        if force:
            n = store.remove_owned(stages=set(STAGE_ORDER) - keep_stages | {"-"})
            store.sweep()
            if n:
                log(f"--force: removed {n} files of the earlier run in {folder}"
                    + (" (kept the imported replicas)" if imported else ""))
        elif (folder / "config.toml").exists() and (old_cfg is None or not same_config(old_cfg, self.cfg)):
            changed = (_diff_keys(old_cfg.model_dump(), self.cfg.model_dump()) if old_cfg is not None
                       else ["config.toml (unreadable)"])
            sections = {k.split(".")[0] for k in changed}
            # a change is refused when it alters the inputs of a finished stage (other than the sections a
            # per-protocol command was asked to redo): the folder would no longer describe what produced it
            used = {sec for st in finished for dep in dependencies(st, self.cfg) for sec in stage(dep).sections}
            if finished and (old_cfg is None or (sections & used) - set(allow)):
                raise LossglassError(
                    f"{folder} holds a run with a different config (differs in: {', '.join(changed[:6])}"
                    f"{', ...' if len(changed) > 6 else ''}); use a new --out folder, or --force to start over there")
            if not finished:
                store.remove_owned()  # an unfinished start with another config: nothing worth keeping
        store.stage = None
        store.write_text("config.toml", to_toml(self.cfg))
        store.mark_trusted()
        meta = store.read_json("meta.json", {}, kind=dict)
        meta.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta.update({"versions": versions(), "seed": self.cfg.seed, "device": self.cfg.device,
                     "name": self.cfg.name, "batchnorm_statistics": self.cfg.model.bn_stats,
                     "inputs": self.inputs(), "finished": None})
        from ._determinism import configure

        # one thread count per run: a resumed run keeps the count it started with (the numerics depend on it)
        numerics = meta.get("numerics")
        old_threads = None if force or not isinstance(numerics, dict) else numerics.get("threads")
        old_threads = old_threads if isinstance(old_threads, int) and not isinstance(old_threads, bool) else None
        meta["numerics"] = configure(threads=old_threads) if old_threads else configure()
        store.write_json("meta.json", meta)

    def invalidate(self, stage: str) -> None:
        """Remove the results of ``stage`` and of every stage that depends on it (files and completion records)."""
        gone = dependents(stage, self.cfg)
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

    def context(self) -> StageContext:
        """What a stage sees of this study while it runs."""
        from .report import build_report

        return StageContext(cfg=self.cfg, store=self.store, executor=self.executor, progress=self.progress,
                            bars=self.bars, problem_fn=lambda: self.problem, fingerprint=self.fingerprint, log=log,
                            discard_partial=self.discard_partial, draw_report=build_report)

    def run(self, stages=STAGES, force: bool = False, allow: tuple[str, ...] = ()) -> RunStore:
        """Prepare the folder and run ``stages``, holding the folder's writer lock throughout (a second writer stops
        with one line naming this process)."""
        from ._determinism import pin_once

        pin_once()  # the thread count, before the data are loaded (their normalisation is a reduction); prepare() fixes it
        self.inputs()  # checked before the folder is touched (the lock file is a write)
        with self.store.writer(), _sigterm_as_interrupt():
            return self._run(stages, force, allow)

    def _run(self, stages, force: bool, allow: tuple[str, ...]) -> RunStore:
        self.prepare(force, allow)
        store = self.store
        t_all = time.time()
        # every stage: those the config wants (the timeline only with snapshots); named ones: those switched on
        todo = [n for n in stages if (stage(n).wanted(self.cfg) if stages is STAGES else stage(n).enabled(self.cfg))]
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
        meta["stage_seconds"] = {k: v.get("seconds") for k, v in store.stages(STAGE_ORDER).items()}
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
            if self.bars:
                _sized_terminal()
            # status lines where no bar can be seen: not a terminal, or tasks on other processes (Ray workers)
            remote = getattr(self.executor, "name", "local") != "local"
            beat = (_Heartbeat(name, status_every()) if self.progress and (not self.bars or remote)
                    else contextlib.nullcontext())
            with beat:
                info = stage(name).run(self.context()) or {}
            store.mark_done(name, {"seconds": time.time() - t0, "fingerprint": fp, **info})
            store.stage = None
            self._stage_state(name, state="skipped" if info.get("skipped") else "done", finished=time.time(),
                              seconds=time.time() - t0)
            if info.get("skipped"):
                log(f"{name}: skipped: {info['skipped']}")
            else:
                log(f"{name}: finished in {time.time() - t0:.1f} s")


def run_study(config, out=None, *, stages=STAGES, force: bool = False, progress: bool = True,
              overrides: list[str] | None = None, executor: str = "local", address: str | None = None,
              trust_config: bool = False) -> RunStore:
    """Run a study: ``config`` is a :class:`StudyConfig`, a TOML path or a preset name; ``out`` the run folder
    (default ``runs/<name>``). Returns the :class:`RunStore`. A TOML file from a run folder this user's lossglass did
    not write is refused when it names code to import, unless ``trust_config`` (see
    :func:`lossglass.config.check_trusted`)."""
    if isinstance(config, StudyConfig):
        cfg = config
    elif isinstance(config, (str, Path)) and Path(config).suffix == ".toml":
        cfg = load_config(config, overrides=overrides, trust=trust_config)
    else:
        cfg = load_config(preset=str(config), overrides=overrides)
    from .executor import make_executor

    out = Path(out) if out is not None else Path("runs") / cfg.name
    return Study(cfg, out, progress=progress, executor=make_executor(executor, address)).run(stages, force=force)
