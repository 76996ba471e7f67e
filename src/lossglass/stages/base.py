"""What a stage is, what a task is, and the two contexts they run in.

A **stage** is one question asked of a run (train, walk, connect, ...): a module in this package holding one
:class:`Stage` subclass that declares its name, its config section, what its results depend on (config sections and
earlier stages: the fingerprint), the tables it writes, its CLI sub-command and report section, and how it runs:
either as independent **tasks** (typed, picklable dataclasses that an executor may send to another process or
machine) whose outputs it gathers, or in the driver alone.

A **task** runs in a :class:`TaskContext` (the config, the inputs the driver shipped, a path for its checkpoints)
and returns a :class:`TaskOutput`: named files as bytes. Only the driver writes the run folder: it writes each
output through the store as the task finishes (so a finished task is never recomputed after an interruption), then
the stage gathers them. The task code never opens the run folder for its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
import torch

from ..checkpoint import previous
from ..errors import check
from ..store import json_bytes, safetensors_bytes, table_bytes

if TYPE_CHECKING:
    from ..config import StudyConfig
    from ..problem import Problem
    from ..resources import Estimate, Sizes
    from ..store import RunStore
    from ..train import Replicas


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """safetensors bytes of CPU copies of ``tensors`` (metadata in sorted order)."""
    return safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


@dataclass
class TaskOutput:
    """What a task returns: files (paths relative to the run folder) and their bytes, in the order they are written.
    Bytes travel through any executor (a Ray object, a pickle) and need no shared disk."""

    files: list[tuple[str, bytes]] = field(default_factory=list)
    #: the torch device the task computed on (set by :func:`run_task`; not a file)
    device: str = ""

    def table(self, name: str, df: pd.DataFrame) -> TaskOutput:
        self.files.append((f"tables/{name}.parquet", table_bytes(df)))
        return self

    def tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> TaskOutput:
        self.files.append((f"tensors/{name}.safetensors", tensor_bytes(tensors, metadata)))
        return self

    def json(self, name: str, obj: Any) -> TaskOutput:
        self.files.append((f"{name}.json", json_bytes(obj)))
        return self


# ------------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """One independent piece of a stage. Subclasses are frozen dataclasses (picklable, hashable) with a
    :meth:`key` that names them within the stage, the files they produce (:meth:`outputs`), whether they keep a
    checkpoint, and :meth:`run`."""

    stage: ClassVar[str] = ""
    #: a task that checkpoints its state mid-way (training, walks): the driver reserves the file for it
    checkpoints: ClassVar[bool] = False

    def key(self) -> str:
        raise NotImplementedError  # every concrete task names itself

    def name(self, tag: str) -> str:
        """``tasks/STAGE-TAG-KEY``: the name its outputs are stored under (TAG: the stage's fingerprint prefix, so a
        result of other inputs is never reused)."""
        return f"tasks/{self.stage}-{tag}-{self.key()}"

    def outputs(self, name: str) -> list[str]:
        """The files (relative to the run folder) a finished task has written; all present = nothing to do."""
        raise NotImplementedError

    def run(self, ctx: TaskContext) -> TaskOutput:
        raise NotImplementedError


@dataclass
class TaskEnv:
    """What every task of one stage run shares, shipped once to wherever tasks run: the config (as JSON), the
    stage's fingerprint prefix, whether to draw progress bars, the inputs the driver read from the run folder, and
    the run folder's path (used only for checkpoints, see :meth:`TaskContext.checkpoint`)."""

    cfg_json: str
    tag: str
    progress: bool
    run_path: str
    inputs: dict[str, Any] = field(default_factory=dict)
    #: a checkpoint relay (:class:`lossglass.executor.CheckpointRelay` handle) when tasks run where the run folder
    #: cannot be written (Ray): checkpoints then go to node-local scratch and their bytes to the driver; None: the
    #: task checkpoints into the run folder itself (the local executor)
    relay: Any = None


class TaskContext:
    """Where a task runs: the validated config, the problem built from it (once per task), the shipped inputs and
    the checkpoint path. Built by the executor from a :class:`TaskEnv` and a task."""

    def __init__(self, env: TaskEnv, task: Task):
        from ..config import StudyConfig

        self.env, self.task = env, task
        self.cfg: StudyConfig = StudyConfig.model_validate_json(env.cfg_json)
        self.progress = env.progress
        self.name = task.name(env.tag)
        self._problem: Problem | None = None
        self._shipper = None

    @property
    def problem(self) -> Problem:
        """The study's problem, built from the config in this process."""
        if self._problem is None:
            from .common import build_problem

            self._problem = build_problem(self.cfg)
        return self._problem

    @property
    def device(self) -> str:
        """The device the task's problem ran on ("cpu" when the task built none)."""
        return str(self._problem.device) if self._problem is not None else "cpu"

    def input(self, key: str) -> Any:
        check(key in self.env.inputs, f"task {self.name} needs the input {key!r}, which its stage did not ship")
        return self.env.inputs[key]

    def checkpoint(self) -> Path:
        """The file this task checkpoints to.

        Local executor (no relay): the file in the run folder that the driver reserved in its manifest. With a
        relay (Ray, no shared disk needed): a file in node-local scratch, first filled with the newest checkpoint
        the driver holds for this task (a retried task resumes from it, on any node), and watched: each new version
        the task writes is shipped to the driver, which writes it into the run folder (see
        :class:`lossglass.executor.CheckpointRelay`)."""
        rel = checkpoint_name(self.env.tag, self.task)
        if self.env.relay is None:
            from ..store import RunStore

            path = RunStore(self.env.run_path, create=False).resolve(rel)
            path.parent.mkdir(exist_ok=True)
            return path
        if self._shipper is None:
            from ..relay import CheckpointShipper

            self._shipper = CheckpointShipper(self.env.relay, rel)
        return self._shipper.path

    def close(self, failed: bool = False) -> None:
        """Stop shipping checkpoints (``failed``: after shipping the newest, for the retry) and remove this task's
        node-local scratch (nothing to do without a relay)."""
        if self._shipper is not None:
            self._shipper.close(ship=failed)
            self._shipper = None


def checkpoint_name(tag: str, task: Task) -> str:
    return f"checkpoints/{task.stage}-{tag}-{task.key()}.safetensors"


def run_task(env: TaskEnv, task: Task) -> TaskOutput:
    """Run one task (in this process or on a worker): the function every executor calls."""
    ctx = TaskContext(env, task)
    try:
        out = task.run(ctx)
    except BaseException:
        ctx.close(failed=True)
        raise
    ctx.close()
    out.device = ctx.device
    return out


# ------------------------------------------------------------------------------------------------ stages
class Stage:
    """One stage of a study. A subclass declares (class attributes):

    - ``name``: the stage's name (files, records, ``--stages``); ``position``: its place in the run order;
      ``section``: its config section (``cfg.<section>``, whose ``enabled`` switches it; None: always part of a run);
    - ``sections`` (config sections) and ``depends`` (earlier stages) its results depend on: the fingerprint;
    - ``tables``: the tables a finished stage has written (the report lists the missing ones);
    - ``command``: help text of its CLI sub-command on an existing run (None: no sub-command);
    - ``report``: (module of :mod:`lossglass.report`, heading) of its report section and dashboard layer, or None;
      ``dashboard``: whether the dashboard shows that layer; ``skip_is_missing``: whether a skip makes the run
      incomplete;

    and implements :meth:`tasks` + :meth:`gather` (independent tasks) or :meth:`run` (driver only), and
    :meth:`estimate` (its share of the resource estimate)."""

    name: ClassVar[str] = ""
    position: ClassVar[float] = 0.0
    section: ClassVar[str | None] = None
    sections: ClassVar[tuple[str, ...]] = ()
    depends: ClassVar[tuple[str, ...]] = ()
    tables: ClassVar[tuple[str, ...]] = ()
    command: ClassVar[str | None] = None
    report: ClassVar[tuple[str, str] | None] = None
    dashboard: ClassVar[bool] = True
    #: whether a skipped run of this stage leaves the run incomplete (False: the skip is advice, e.g. select)
    skip_is_missing: ClassVar[bool] = True
    #: extra column descriptions for tables only this stage writes ({table: {column: meaning}}); most tables are
    #: described in :mod:`lossglass.columns`
    columns: ClassVar[dict[str, dict[str, str]]] = {}

    def enabled(self, cfg: StudyConfig) -> bool:
        """Whether ``cfg`` switches this stage on (its section's ``enabled``): it runs when asked for by name."""
        sec = getattr(cfg, self.section, None) if self.section else None
        return bool(getattr(sec, "enabled", True))

    def wanted(self, cfg: StudyConfig) -> bool:
        """Whether a run of ``cfg`` with every stage includes this one (default: :meth:`enabled`)."""
        return self.enabled(cfg)

    def wanted_raw(self, cfg: dict) -> bool:
        """:meth:`wanted` on a raw config dict (a folder's config.toml as read, defaults from the config model)."""
        if not self.section:
            return True
        sec = cfg.get(self.section)
        if isinstance(sec, dict) and "enabled" in sec:
            return bool(sec["enabled"])
        from ..config import StudyConfig

        default = StudyConfig.model_fields[self.section].default
        return bool(getattr(default, "enabled", True))

    def needs(self, cfg: StudyConfig | None = None) -> tuple[str, ...]:
        """The earlier stages this stage's results depend on under ``cfg`` (the fingerprint, what a rerun redoes):
        ``depends``, plus what a stage adds for some configs (select on measures when select.measure is one only the
        measures stage computes). None: the declared ``depends``."""
        return self.depends

    def tasks(self, ctx: StageContext) -> list[Task]:
        return []

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        """What the tasks need from the run folder, read once by the driver and shipped with them."""
        return {}

    def gather(self, ctx: StageContext, tasks: list[Task], names: list[str]) -> dict:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> dict:
        """Run the stage and return the extra fields of its completion record (``skipped``: why it did nothing).
        Default: its tasks on the executor, then :meth:`gather`."""
        tasks = self.tasks(ctx)
        names = ctx.run_tasks(self, tasks)
        return self.gather(ctx, tasks, names)

    def estimate(self, cfg: StudyConfig, sizes: Sizes, est: Estimate) -> None:
        """Add this stage's memory, disk and time to ``est`` (see :mod:`lossglass.resources`)."""


@dataclass
class StageContext:
    """The driver's view while a stage runs: the config, the run folder, the executor, progress, the problem and
    the stage fingerprints (from the study)."""

    cfg: StudyConfig
    store: RunStore
    executor: Any
    progress: bool
    bars: bool
    problem_fn: Callable[[], Problem]
    fingerprint: Callable[[str], str]
    log: Callable[[str], None]
    discard_partial: Callable[[str], None]
    #: draws report.html from the folder (the report reads the stage registry, so the runner hands it over)
    draw_report: Callable[[RunStore], str]

    #: the problem with BatchNorm statistics frozen at the first live replica (``batchnorm="fixed"``), once
    #: :meth:`alive` has run
    frozen: Problem | None = None

    @property
    def problem(self) -> Problem:
        """The study's problem (after :meth:`alive`: the one to measure the live replicas with)."""
        return self.frozen if self.frozen is not None else self.problem_fn()

    def note(self, msg: str) -> None:
        """A status line when there are no bars (not a terminal) and not quiet."""
        if self.progress and not self.bars:
            self.log(msg)

    def tag(self, stage: str) -> str:
        return self.fingerprint(stage)[:10]

    def alive(self) -> Replicas:
        """The replicas that did not diverge (and :attr:`problem` becomes the one to measure them with)."""
        from .common import alive_replicas, load_replicas

        rep, self.frozen = alive_replicas(load_replicas(self.store), self.problem_fn())
        return rep

    def run_tasks(self, stage: Stage, tasks: list[Task], what: str | None = None, bar: str | None = None) -> list[str]:
        """Run ``tasks`` on the executor; every output is written through the store as its task finishes; a task
        whose outputs are all in the folder already is not run again. Returns the tasks' names in order. With ``bar``
        (the unit's name, e.g. "piece"), tasks run here (the local executor) on a terminal show a progress bar that
        names the task running; the tasks' own bars nest below it. Without a terminal, status lines say the same."""
        tag = self.tag(stage.name)
        names = [t.name(tag) for t in tasks]
        todo = [(t, n) for t, n in zip(tasks, names) if not all((self.store.path / f).exists() for f in t.outputs(n))]
        if todo:
            env = TaskEnv(self.cfg.model_dump_json(), tag, self.bars, str(self.store.path), stage.inputs(self))
            what = what or stage.name
            done = [0]
            progress = None
            if bar and self.bars and self.executor.name == "local":
                from tqdm.auto import tqdm

                progress = tqdm(total=len(todo), desc=what, unit=bar, leave=False)

            def before(task: Task) -> None:
                if progress is not None:
                    progress.set_postfix_str(task.key(), refresh=True)
                if task.checkpoints:  # reserved in the manifest before the task writes it (--force removes it)
                    rel = checkpoint_name(tag, task)
                    self.store.claim(rel)
                    self.store.claim(str(previous(rel)))

            def after(task: Task, out: TaskOutput) -> None:
                for rel, data in out.files:
                    self.store.write_bytes(rel, data)
                done[0] += 1
                if len(todo) > 1 and self.executor.name == "local":
                    self.note(f"{what}: task {done[0]}/{len(todo)} done")
                if progress is not None:
                    progress.update(1)

            kw = {}
            if getattr(self.executor, "relays_checkpoints", False):  # tasks that cannot write the run folder
                kw["checkpoints"] = (self.read_checkpoint, self.write_checkpoint)
            try:
                self.executor.run(env, [t for t, _ in todo], before=before, after=after, **kw)
            finally:
                if progress is not None:
                    progress.close()
            placed = getattr(self.executor, "placements", None)
            if placed:  # where each task ran (Ray): node, GPUs, device
                from ..store import json_bytes

                self.store.write_bytes(f"placement/{stage.name}.json", json_bytes(
                    {"executor": self.executor.name, "tasks": sorted(placed, key=lambda p: p["task"]),
                     "checkpoints": getattr(self.executor, "relay_stats", {})}))
        return names

    def read_checkpoint(self, rel: str) -> bytes | None:
        """The bytes of the newest readable checkpoint ``rel`` in the run folder (``NAME``, else ``NAME.prev``:
        :func:`lossglass.relay.newest_readable`), None when there is none: what a task resumed elsewhere starts from
        (it validates them itself)."""
        from ..relay import newest_readable

        return newest_readable(self.store.resolve(rel))

    def write_checkpoint(self, rel: str, data: bytes) -> None:
        """Write checkpoint bytes a task shipped (``rel``: reserved in the manifest by ``before``) as
        :func:`lossglass.checkpoint.save` does: the file replaced is kept as ``NAME.prev``, the write is atomic."""
        import os

        from ..store import atomic_write_bytes

        path = self.store.resolve(rel)
        if path.exists():
            os.replace(path, previous(path))
        atomic_write_bytes(path, data)
