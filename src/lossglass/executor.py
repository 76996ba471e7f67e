"""Where a study's independent work runs: in this process (``local``, the default) or as tasks on a Ray
cluster (``ray``, ``pip install lossglass[ray]``).

A task is a module-level function and its arguments; it writes its result atomically into the run folder
and returns the path, so a task that finished is never recomputed (a restarted run finds its file) and a
task whose worker died is simply run again (Ray retries it). The same tasks run in the same way on either
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


class LocalExecutor:
    name = "local"

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> list:
        configure()
        return [fn(*t) for t in tasks]


class RayExecutor:
    """Tasks as Ray remote functions, retried up to ``max_retries`` times when they fail or their worker dies."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise LossglassError("the ray executor needs Ray: pip install 'lossglass[ray]'") from None
        self.ray, self.max_retries = ray, max_retries
        if not ray.is_initialized():
            env = {k: v for k, v in os.environ.items() if k.startswith("LOSSGLASS_")}
            try:
                ray.init(address=None if address in (None, "local") else address, ignore_reinit_error=True,
                         log_to_driver=False, runtime_env={"env_vars": env} if env else None)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise LossglassError(f"could not connect to a Ray cluster at {address!r}: {e}") from None

    def map(self, fn: Callable, tasks: Sequence[tuple]) -> list:
        threads = configure()["threads"]  # every task runs with the driver's thread count (see _determinism)
        self._check_cpus(threads)
        remote = self.ray.remote(max_retries=self.max_retries, retry_exceptions=True, num_cpus=threads)(run_pinned)
        return self.ray.get([remote.remote(threads, fn, *t) for t in tasks])

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


def make_executor(name: str = "local", address: str | None = None):
    choice("executor", name, EXECUTORS)
    return LocalExecutor() if name == "local" else RayExecutor(address)


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
