"""Flatness probes where people train: callbacks that run :class:`~lossglass.proxies.FlatnessProbe` every N
optimizer steps and log its numbers through the trainer's own logging.

* :mod:`lossglass.integrations.lightning`: ``FlatnessCallback`` for PyTorch Lightning
  (``pip install 'lossglass[lightning]'``);
* :mod:`lossglass.integrations.hf`: ``FlatnessCallback`` for the Hugging Face ``Trainer``
  (``pip install 'lossglass[hf]'``).

Each costs about ``n_iter + 2`` forward/backward passes on one batch every ``every_n_steps`` steps and leaves
the training run bit-identical: 137 ms per call on a 109k-parameter MLP with batch 128 on one CPU thread, about 23
training steps (see :class:`~lossglass.proxies.FlatnessProbe` for the measurement and for how much its numbers
vary between batches: ``lambda_batch`` by a coefficient of variation of 0.25, so average several calls). With
``every_n_steps=100`` that adds about a quarter to training time there. The callback needs the module to
define ``forward`` (Lightning: refused in one line at ``setup`` otherwise).

Importing :mod:`lossglass` or this package imports neither framework; only the
submodule you import does."""

from __future__ import annotations

import importlib
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from ..errors import LossglassError, check


class MissingExtraError(LossglassError, ImportError):
    """An optional framework (Lightning, transformers) is not installed; the message names the extra to install."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` telling to ``pip install 'lossglass[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs the '{module.split('.')[0]}' package, which is not installed: "
                                f"pip install 'lossglass[{extra}]'") from e


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested in mappings, lists and tuples) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def check_schedule(every_n_steps: int, prefix: str) -> None:
    """Validate the arguments shared by the callbacks."""
    check(isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool) and every_n_steps >= 1,
          f"every_n_steps must be an integer >= 1 (got {every_n_steps!r})")
    check(isinstance(prefix, str), f"prefix must be a string (got {prefix!r})")


@contextmanager
def frozen_rng() -> Iterator[None]:
    """Run a block without moving the global generators of Python, NumPy and torch (CPU): their states are
    saved before and put back after, whatever the block draws."""
    py = random.getstate()
    try:
        import numpy as np

        npst = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency of lossglass
        np, npst = None, None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            if np is not None:
                np.random.set_state(npst)
