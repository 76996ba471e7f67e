"""Task checkpoints on a Ray cluster without a shared disk: the driver's :class:`CheckpointRelay` (an actor pinned to
the driver's node) and the worker's :class:`CheckpointShipper` (a node-local scratch file whose new versions are
shipped to the relay). Only the driver writes the run folder (:mod:`lossglass.executor` drains the relay)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

#: seconds between two looks of a task's shipper at its checkpoint file (and of the driver at the relay)
SHIP_EVERY_S = 0.2


def newest_readable(path: str | os.PathLike) -> bytes | None:
    """The bytes of the newest checkpoint at ``path`` that parses (:mod:`lossglass.checkpoint` files are safetensors):
    ``NAME``, else ``NAME.prev`` (a file damaged by a power cut or a full disk leaves the one before it, with a
    warning), None when neither is there or readable. What the driver seeds the relay with; the task still validates
    what it is given (shapes, its settings) itself."""
    import warnings

    from safetensors.torch import load as from_bytes

    from .checkpoint import previous

    for p in (Path(path), previous(path)):
        if not p.is_file():
            continue
        data = p.read_bytes()
        try:
            from_bytes(data)
        except Exception as e:  # noqa: BLE001 - empty, truncated or foreign file
            warnings.warn(f"not seeding the relay with checkpoint {p}: it is unreadable ({type(e).__name__}); "
                          "trying the one before it", RuntimeWarning, stacklevel=2)
            continue
        return data
    return None


class CheckpointRelay:
    """The driver's end of task checkpoints on Ray (a Ray actor pinned to the driver's node, no CPU reserved).

    Holds, per checkpoint name, the newest bytes a task shipped (seeded by the driver with the run folder's files
    when a stage starts); :meth:`get` hands them to a task that starts (or is retried) on any node, :meth:`drain`
    hands the ones not yet written to the driver, which writes them into the run folder. It lives as long as the
    stage's run on the executor, and dies with the driver's node (then the driver is gone too and the run folder
    holds the newest checkpoints it wrote)."""

    def __init__(self, seed: dict[str, bytes]):
        self._latest, self._new = dict(seed), {}
        self._received, self._served, self._senders = 0, 0, {}

    def get(self, rel: str) -> bytes | None:
        data = self._latest.get(rel)
        self._served += data is not None
        return data

    def put(self, rel: str, data: bytes, node: str) -> None:
        self._latest[rel] = self._new[rel] = data
        self._received += 1
        self._senders.setdefault(rel, []).append(node)

    def drain(self) -> dict[str, bytes]:
        new, self._new = self._new, {}
        return new

    def stats(self) -> dict:
        """checkpoints received, resumes served (a task given an earlier checkpoint), senders' nodes per name."""
        return {"received": self._received, "served": self._served,
                "senders": {k: list(v) for k, v in self._senders.items()}}


class CheckpointShipper:
    """The task's end (on a worker): a node-local scratch file to checkpoint to, first filled with the relay's newest
    bytes for it, and a thread that ships each new version of the file to the relay (it looks every
    :data:`SHIP_EVERY_S` seconds; a checkpoint is replaced atomically, so a version read is always whole)."""

    def __init__(self, relay, rel: str, every: float = SHIP_EVERY_S):
        import ray

        from .store import atomic_write_bytes

        self.relay, self.rel, self.every = relay, rel, every
        self.dir = Path(tempfile.mkdtemp(prefix="lossglass-ckpt-"))
        self.path = self.dir / Path(rel).name
        self.node = ray.get_runtime_context().get_node_id()
        data = ray.get(relay.get.remote(rel))
        if data is not None:
            atomic_write_bytes(self.path, data)
        self._seen = self._stamp()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lossglass-ckpt-ship", daemon=True)
        self._thread.start()

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def ship(self) -> None:
        """Send the file to the relay if it changed since the last look (and wait until the relay has it)."""
        import ray

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:  # between the rename to NAME.prev and the new file
            return
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._seen:
                return
            data = f.read()
        ray.get(self.relay.put.remote(self.rel, data, self.node))
        self._seen = stamp

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.ship()

    def close(self, ship: bool = False) -> None:
        """Stop the thread (``ship``: send a last unsent version first, e.g. when the task failed and will be
        retried) and remove the scratch folder."""
        self._stop.set()
        self._thread.join()
        if ship:
            self.ship()
        shutil.rmtree(self.dir, ignore_errors=True)
