"""Where a study's independent work runs: in this process (``local``, the default) or as tasks on a Ray
cluster (``ray``, ``pip install lossglass[ray]``).

A task is a typed dataclass (:class:`lossglass.stages.base.Task`) run with its stage's shared
:class:`~lossglass.stages.base.TaskEnv`; it returns its files as bytes, which the driver writes atomically into the
run folder as each task finishes, so a task that finished is never recomputed (a restarted run finds its files) and
a task whose worker died is simply run again (Ray retries it). The same tasks run in the same way on either
executor, with the same thread count: the count this process has when the run starts (``LOSSGLASS_THREADS``
when set), pinned before every task, also on Ray workers, which start with ``OMP_NUM_THREADS=1``, and Ray
reserves that many CPUs for each task. A run's numerics are recorded by :func:`lossglass.numerics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ._determinism import configure, run_pinned
from .errors import LossglassError, choice

EXECUTORS = ("local", "ray")


def _no_hook(*_args) -> None:
    return None


class LocalExecutor:
    name = "local"

    def run(self, env, tasks: Sequence, *, before: Callable = _no_hook, after: Callable = _no_hook) -> None:
        """Run the tasks one after another in this process; ``before(task)`` and ``after(task, output)`` around each."""
        from .stages.base import run_task

        configure()
        for task in tasks:
            before(task)
            after(task, run_task(env, task))


class RayExecutor:
    """Tasks as Ray remote functions, retried up to ``max_retries`` times when they fail or their worker dies.

    A local Ray instance (no ``address``) is started without Ray's dashboard unless ``include_dashboard``: the
    dashboard is an HTTP service that accepts jobs, the subject of Ray's remote-code-execution advisories (fixed in
    2.52 and 2.54, the floor of ``lossglass[ray]``), and a study does not need it. An existing cluster keeps its own
    settings."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 3, *, include_dashboard: bool = False):
        try:
            import ray
        except ImportError:
            raise LossglassError("the ray executor needs Ray: pip install 'lossglass[ray]'") from None
        self.ray, self.max_retries = ray, max_retries
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("LOSSGLASS_")}
            local = address in (None, "local")
            start = {"include_dashboard": include_dashboard} if local else {}
            try:
                ray.init(address="local" if local else address, ignore_reinit_error=True,
                         log_to_driver=False, runtime_env={"env_vars": env} if env else None, **start)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LossglassError(f"could not connect to a Ray cluster at {address!r}: {e}") from None

    def run(self, env, tasks: Sequence, *, before: Callable = _no_hook, after: Callable = _no_hook) -> None:
        """Submit every task, then hand each output to ``after`` as its task finishes (in finishing order)."""
        from .stages.base import run_task

        threads = configure()["threads"]  # every task runs with the driver's thread count (see _determinism)
        self._check_cpus(threads)
        remote = self.ray.remote(max_retries=self.max_retries, retry_exceptions=True, num_cpus=threads)(run_pinned)
        env_ref = self.ray.put(env)  # shipped once, shared by every task
        pending = {}
        for task in tasks:
            before(task)
            pending[remote.remote(threads, run_task, env_ref, task)] = task
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in ready:
                after(pending.pop(ref), self.ray.get(ref))

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


def make_executor(name: str = "local", address: str | None = None, *, ray_dashboard: bool = False):
    """The executor called ``name``; ``ray_dashboard``: start a local Ray instance with its dashboard (off by default)."""
    choice("executor", name, EXECUTORS)
    return LocalExecutor() if name == "local" else RayExecutor(address, include_dashboard=ray_dashboard)


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
