"""Where a study's independent work runs: in this process (``local``, the default) or as tasks on a Ray
cluster (``ray``, ``pip install lossglass[ray]``).

A task is a typed dataclass (:class:`lossglass.stages.base.Task`) run with its stage's shared
:class:`~lossglass.stages.base.TaskEnv`; it returns its files as bytes, which the driver writes atomically into the
run folder as each task finishes, so a task that finished is never recomputed (a restarted run finds its files) and
a task whose worker died is simply run again (Ray retries it). The same tasks run in the same way on either
executor, with the same thread count: the count this process has when the run starts (``LOSSGLASS_THREADS``
when set), pinned before every task, also on Ray workers, which start with ``OMP_NUM_THREADS=1``, and Ray
reserves that many CPUs for each task. A run's numerics are recorded by :func:`lossglass.numerics`.

No shared disk is needed on Ray: a task reads only what its stage shipped (:class:`~lossglass.stages.base.TaskEnv`),
returns its files as bytes, and checkpoints to node-local scratch; a thread in the task ships each new checkpoint to
a :class:`CheckpointRelay`, a Ray actor pinned to the driver's node, and the driver writes what the relay received
into the run folder (reserved in its manifest, ``NAME.prev`` kept) while it waits for tasks. When the node holding a
half-done task dies, Ray runs the task again on another node (``max_retries``); the retry fetches from the relay the
newest checkpoint shipped before the death (at most :data:`SHIP_EVERY_S` plus one checkpoint interval of work is
redone) and resumes from it, bit-identical to an uninterrupted run (the checkpoint contract of training and walks).
When the driver itself stops, the run folder holds the newest checkpoints: the next run seeds the relay with them
(the newest readable one of each task: ``NAME``, else ``NAME.prev`` when ``NAME`` is damaged,
:func:`lossglass.relay.newest_readable`).
On GPU clusters each task asks Ray for ``gpus_per_task`` GPUs (see :meth:`RayExecutor.gpus_for`); where every task
ran and on which device is written to ``placement/STAGE.json``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

from ._determinism import configure, run_pinned
from .errors import LossglassError, choice
from .relay import SHIP_EVERY_S, CheckpointRelay, CheckpointShipper  # noqa: F401 (re-exported)

EXECUTORS = ("local", "ray")



def _no_hook(*_args) -> None:
    return None


class LocalExecutor:
    name = "local"

    def run(self, env, tasks: Sequence, *, before: Callable = _no_hook, after: Callable = _no_hook,
            checkpoints: tuple[Callable, Callable] | None = None) -> None:
        """Run the tasks one after another in this process; ``before(task)`` and ``after(task, output)`` around each.
        ``checkpoints`` is ignored: tasks here checkpoint into the run folder themselves."""
        from .stages.base import run_task

        configure()
        for task in tasks:
            before(task)
            after(task, run_task(env, task))


def _placed(threads: int, env, task):
    """A Ray task's body: the task's output and where it ran (node, GPUs Ray gave it, torch device)."""
    import time

    import ray

    from .stages.base import run_task

    wall, cpu = time.perf_counter(), time.process_time()
    out = run_pinned(threads, run_task, env, task)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rt = ray.get_runtime_context()
    try:
        gpus = [str(g) for g in rt.get_accelerator_ids().get("GPU", [])]
    except Exception:  # noqa: BLE001 - older Ray
        gpus = []
    return out, {"task": task.key(), "node": rt.get_node_id(), "gpus": gpus, "device": out.device,
                 "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


class RayExecutor:
    """Tasks as Ray remote functions, retried up to ``max_retries`` times when they fail or their worker (or node)
    dies; no shared disk needed (see the module's docstring for checkpoints).

    ``gpus_per_task``: the GPUs a task asks Ray for when the study's device is not ``cpu`` and the cluster has GPUs
    (1: one task per GPU; 0.5: two per GPU, when two fit in its memory); see :meth:`gpus_for`.

    A local Ray instance (no ``address``) is started without Ray's dashboard unless ``include_dashboard``: the
    dashboard is an HTTP service that accepts jobs, the subject of Ray's remote-code-execution advisories (fixed in
    2.52 and 2.54, the floor of ``lossglass[ray]``), and a study does not need it. An existing cluster keeps its own
    settings."""

    name = "ray"
    #: the stage context hands this executor (read, write) functions for checkpoints (see :meth:`run`)
    relays_checkpoints = True

    def __init__(self, address: str | None = None, max_retries: int = 3, *, include_dashboard: bool = False,
                 gpus_per_task: float = 1.0):
        from .errors import check

        check(isinstance(gpus_per_task, (int, float)) and 0 < gpus_per_task
              and (gpus_per_task <= 1 or float(gpus_per_task).is_integer()),
              f"gpus_per_task must be a fraction of one GPU or a whole number of GPUs, got {gpus_per_task!r}")
        try:
            import ray
        except ImportError:
            raise LossglassError("the ray executor needs Ray: pip install 'lossglass[ray]'") from None
        self.ray, self.max_retries, self.gpus_per_task = ray, max_retries, gpus_per_task
        #: what the last run placed where (one dict per task, in finishing order) and its relay's statistics
        self.placements: list[dict] = []
        self.relay_stats: dict = {}
        #: the relay of the run in progress (None between runs)
        self.relay = None
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("LOSSGLASS_")}
            local = address in (None, "local")
            start = {"include_dashboard": include_dashboard} if local else {}
            try:
                ray.init(address="local" if local else address, ignore_reinit_error=True,
                         log_to_driver=False, runtime_env={"env_vars": env} if env else None, **start)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LossglassError(f"could not connect to a Ray cluster at {address!r}: {e}") from None

    def gpus_for(self, device: str) -> float:
        """GPUs one task asks for: 0 for ``device = "cpu"`` or a cluster without GPUs (``auto`` then runs on CPUs);
        ``gpus_per_task`` otherwise, so every task of a stage runs on a GPU (one device kind per stage: a stage
        that mixed CPU and GPU tasks would mix their rounding). ``cuda`` on a cluster without GPUs is an error.
        Mixed clusters work: tasks go to the GPU nodes, the CPU-only nodes host the driver's side."""
        gpus = float(self.ray.cluster_resources().get("GPU", 0))
        if device == "cpu":
            return 0.0
        if gpus <= 0:
            if device.startswith("cuda"):
                raise LossglassError(f"device {device!r} asked for but the Ray cluster has no GPUs: use cpu or auto")
            return 0.0
        if device.startswith("cuda:") and device != "cuda:0":
            raise LossglassError(f"device {device!r} on Ray: Ray gives each task its own GPU(s) as cuda:0; use cuda "
                                 "or auto")
        return float(self.gpus_per_task)

    def run(self, env, tasks: Sequence, *, before: Callable = _no_hook, after: Callable = _no_hook,
            checkpoints: tuple[Callable, Callable] | None = None) -> None:
        """Submit every task, then hand each output to ``after`` as its task finishes (in finishing order).

        ``checkpoints``: (read, write) functions of the driver for checkpoint names (``checkpoints/...``): read seeds
        the relay with the run folder's newest checkpoint of each task; write stores what tasks shipped (while
        waiting, every :data:`SHIP_EVERY_S` seconds). Without them (or without checkpointing tasks) no relay is
        made and tasks checkpoint into ``env.run_path`` (which then must be a disk the workers share)."""
        import json

        from .stages.base import checkpoint_name

        ray = self.ray
        threads = configure()["threads"]  # every task runs with the driver's thread count (see _determinism)
        self._check_cpus(threads)
        device = json.loads(env.cfg_json).get("device", "cpu")
        gpus = self.gpus_for(str(device))
        remote = ray.remote(max_retries=self.max_retries, retry_exceptions=True, num_cpus=threads,
                            num_gpus=gpus)(_placed)
        self.placements, self.relay_stats = [], {}
        ckpt = {t: checkpoint_name(env.tag, t) for t in tasks if t.checkpoints}
        write = None
        if checkpoints is not None and ckpt:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            read, write = checkpoints
            seed = {rel: data for rel in ckpt.values() if (data := read(rel)) is not None}
            here = ray.get_runtime_context().get_node_id()
            self.relay = ray.remote(num_cpus=0, max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                here, soft=False))(CheckpointRelay).remote(seed)
            env = dataclasses.replace(env, relay=self.relay)
        try:
            env_ref = ray.put(env)  # shipped once, shared by every task
            pending, done = {}, set()
            for task in tasks:
                before(task)
                pending[remote.remote(threads, env_ref, task)] = task
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=SHIP_EVERY_S if self.relay else None)
                if self.relay is not None:
                    for rel, data in ray.get(self.relay.drain.remote()).items():
                        if rel not in done:
                            write(rel, data)
                for ref in ready:
                    task = pending.pop(ref)
                    out, where = ray.get(ref)
                    done.add(ckpt.get(task))
                    self.placements.append(where)
                    after(task, out)
        finally:
            if self.relay is not None:
                try:
                    self.relay_stats = ray.get(self.relay.stats.remote())
                finally:
                    ray.kill(self.relay)
                    self.relay = None

    def _check_cpus(self, threads: int) -> None:
        try:
            cpus = [n.get("Resources", {}).get("CPU", 0) for n in self.ray.nodes() if n.get("Alive", True)]
        except Exception:  # noqa: BLE001 - an unusual cluster: let Ray schedule (or report) it
            return
        if cpus and threads > max(cpus):
            raise LossglassError(
                f"each task runs with {threads} threads (this process's count; the thread count is part of what "
                f"fixes the bits) but no Ray node has more than {int(max(cpus))} CPUs: set LOSSGLASS_THREADS="
                f"{int(max(cpus))} or less, and the same for any local run you compare with")


def make_executor(name: str = "local", address: str | None = None, *, ray_dashboard: bool = False,
                  gpus_per_task: float = 1.0):
    """The executor called ``name``; ``ray_dashboard``: start a local Ray instance with its dashboard (off by default);
    ``gpus_per_task``: see :class:`RayExecutor`."""
    choice("executor", name, EXECUTORS)
    return LocalExecutor() if name == "local" else RayExecutor(address, include_dashboard=ray_dashboard,
                                                                 gpus_per_task=gpus_per_task)


def maybe_fail_once(tag: str) -> None:
    """Fault injection for tests: with ``LOSSGLASS_FAIL_ONCE=DIR`` set, the first task to reach this point for
    ``tag`` kills its own process (as a dying worker would); the retry finds the marker and goes on."""
    folder = os.environ.get("LOSSGLASS_FAIL_ONCE")
    if not folder:
        return
    marker = os.path.join(folder, f"failed-{tag}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(17)
