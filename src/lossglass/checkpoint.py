"""Checkpoints: a dictionary of tensors and the states of random generators, in one safetensors file.

One format and one set of rules for everything that resumes mid-way (training, walks):

- written atomically (a temporary file, fsynced, renamed, the folder fsynced: :func:`lossglass.store.atomic_write_bytes`),
  so a reader sees the old file or the whole new one;
- the file it replaces is kept as ``NAME.prev``, so a file damaged by a power cut still leaves the one before;
- a file that cannot be read (empty, truncated, foreign) or that the caller does not accept (other shapes) is
  discarded with a ``RuntimeWarning`` and the one before is tried; a caller may instead raise (a walk checkpoint
  written by another walk is an error, not something to discard).

Example::

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lossglass import checkpoint
    >>> path = Path(tempfile.mkdtemp()) / "state.safetensors"
    >>> g = torch.Generator().manual_seed(0)
    >>> checkpoint.save(path, {"theta": torch.ones(2, 3)}, [g])
    >>> checkpoint.save(path, {"theta": torch.zeros(2, 3)}, [g])   # the first is kept as state.safetensors.prev
    >>> sorted(p.name for p in path.parent.iterdir())
    ['state.safetensors', 'state.safetensors.prev']
    >>> st = checkpoint.load(path, keys=("theta",))
    >>> st["theta"].sum().item(), checkpoint.restore_generators(st, [torch.Generator()])[0].initial_seed()
    (0.0, 0)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["load", "previous", "restore_generators", "save"]

RNG_PREFIX = "rng."


def previous(path: str | os.PathLike) -> Path:
    """The file a checkpoint at ``path`` keeps of the one it replaced: ``NAME.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
         gens: Sequence[torch.Generator] = ()) -> None:
    """Write ``tensors`` and the states of ``gens`` (as ``rng.0``, ``rng.1``, ...) to ``path`` atomically; an existing
    file there is first renamed to ``NAME.prev``. Tensors are copied to the CPU and made contiguous; names starting
    with ``rng.`` are reserved."""
    from safetensors.torch import save as to_bytes

    from .store import atomic_write_bytes

    path = Path(path)
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    for i, g in enumerate(gens):
        out[f"{RNG_PREFIX}{i}"] = g.get_state()
    data = to_bytes(out)
    if path.exists():
        os.replace(path, previous(path))
    atomic_write_bytes(path, data)


def load(path: str | os.PathLike, *, keys: Sequence[str] = (),
         accept: Callable[[dict[str, torch.Tensor], Path], str | None] | None = None, what: str = "checkpoint",
         stacklevel: int = 2) -> dict[str, torch.Tensor] | None:
    """The newest readable checkpoint: ``path``, else ``NAME.prev``; None when neither is there or usable.

    A file that cannot be parsed or lacks one of ``keys`` is unreadable; ``accept(tensors, file)`` may return a
    reason to refuse a readable one (e.g. "it holds replicas of shape (4, 10)") or raise. A file unreadable or refused is
    deleted with the warning "discarding {what} {file}: {reason}; resuming from an earlier state"; ``stacklevel`` is
    the warning's, counted from the caller of :func:`load`."""
    from safetensors.torch import load as from_bytes

    path = Path(path)
    for p in (path, previous(path)):
        if not p.exists():
            continue
        try:
            st = from_bytes(p.read_bytes())
            missing = [k for k in keys if k not in st]
            if missing:
                raise KeyError(missing[0])
        except Exception as e:  # noqa: BLE001 - empty, truncated or foreign file
            reason = f"it is unreadable ({type(e).__name__})"
        else:
            reason = accept(st, p) if accept is not None else None
            if reason is None:
                return st
        warnings.warn(f"discarding {what} {p}: {reason}; resuming from an earlier state", RuntimeWarning,
                      stacklevel=stacklevel + 1)
        p.unlink()
    return None


def restore_generators(tensors: Mapping[str, torch.Tensor], gens: Sequence[torch.Generator]) -> Sequence[torch.Generator]:
    """Set each of ``gens`` to the state saved with it (``rng.i``, in the order given to :func:`save`); returns
    ``gens``."""
    for i, g in enumerate(gens):
        g.set_state(tensors[f"{RNG_PREFIX}{i}"])
    return gens
