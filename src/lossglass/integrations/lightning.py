"""PyTorch Lightning callback that logs the flatness proxies of :class:`~lossglass.proxies.FlatnessProbe`.

>>> import lightning.pytorch as pl
>>> from lossglass.integrations.lightning import FlatnessCallback
>>> trainer = pl.Trainer(callbacks=[FlatnessCallback(every_n_steps=200)])  # doctest: +SKIP

Works with ``lightning.pytorch`` and with the older ``pytorch_lightning`` package: the callback derives from
the ``Callback`` class of each one installed, so either ``Trainer`` accepts it. Install with
``pip install 'lossglass[lightning]'``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import check
from ..proxies import FlatnessProbe
from . import MissingExtraError, check_schedule, require, to_device


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(require(name, "lightning", "lossglass.integrations.lightning").Callback)
        except MissingExtraError as e:
            missing = e
    if not bases:
        raise missing
    return tuple(bases)


def default_unpack(batch: Any) -> tuple[Any, Any]:
    """Split a training batch into ``(inputs, targets)`` for the probe: ``(x, y)`` pairs as ``x, y``; a mapping
    (Hugging Face style, with ``labels`` inside) as keyword inputs without targets, the loss then being the
    model's own ``outputs.loss``."""
    if isinstance(batch, Mapping):
        return batch, None
    check(isinstance(batch, tuple | list) and len(batch) == 2,
          f"cannot split the batch ({type(batch).__name__}{'' if not isinstance(batch, tuple | list) else f' of {len(batch)}'}) "
          "into inputs and targets: pass FlatnessCallback(unpack=lambda batch: (inputs, targets))")
    return batch[0], batch[1]


def has_forward(module: torch.nn.Module) -> bool:
    """Whether ``module``'s class (or a base below ``LightningModule`` / ``nn.Module``) defines ``forward``."""
    bases = {torch.nn.Module.forward}
    for name in ("lightning.pytorch", "pytorch_lightning"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "LightningModule"):
            bases.add(mod.LightningModule.forward)
    return type(module).forward not in bases


class FlatnessCallback(*_callback_bases()):
    r"""Every ``every_n_steps`` optimizer steps, the flatness proxies of the model on one batch, logged to the
    trainer's loggers (TensorBoard, CSV, W&B, ... whatever the ``Trainer`` was given).

    At the end of a training batch where ``trainer.global_step`` (optimizer steps done) is a multiple of
    ``every_n_steps``, a :class:`~lossglass.proxies.FlatnessProbe` runs on the LightningModule, evaluating
    ``pl_module(inputs)`` on that batch (or on the fixed ``batch`` given here, moved to the module's device), and
    logs ``{prefix}loss`` = L_B(theta), ``{prefix}lambda_batch`` (power-iteration estimate of the top eigenvalue of
    the mini-batch Hessian) and ``{prefix}perturbation_rise`` = L_B(theta + rho u) - L_B(theta). The numbers go
    to every logger in ``trainer.loggers`` at Lightning's own step for that batch (the one its ``self.log``
    metrics get), whatever ``log_every_n_steps`` is, and into ``trainer.callback_metrics`` (so
    ``ModelCheckpoint``/``EarlyStopping`` can monitor them). ``history`` keeps them too, with ``global_step``.

    Cost: about ``n_iter + 2`` forward/backward passes on one batch every ``every_n_steps`` steps, on the global
    rank 0 only (the other ranks do nothing). It does not change the training result: the probe evaluates the
    module in eval mode and restores every ``training`` flag, never writes a parameter, buffer or ``.grad``, and
    draws its random vectors from its own generator (``seed``; its state is saved in checkpoints).

    Loss: ``loss_fn(outputs, targets) -> scalar`` with ``outputs = pl_module(inputs)``; by default the
    cross-entropy of the logits. For a LightningModule whose ``forward`` returns logits and whose
    ``training_step`` computes, say, ``F.mse_loss(self(x), y)``, pass ``loss_fn=torch.nn.functional.mse_loss``;
    any ``lambda logits, y: ...`` does. Batches: ``(x, y)`` is split as ``inputs, targets``; a dict is passed as
    keyword inputs and the loss is ``outputs.loss`` (Hugging Face models inside a LightningModule); any other
    layout needs ``unpack=lambda batch: (inputs, targets)``.

    Not for sharded parameters (FSDP, DeepSpeed ZeRO-3); DDP works (the bare module is probed on rank 0)."""

    def __init__(self, every_n_steps: int = 100, n_iter: int = 5, rho: float = 0.05,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, batch: Any = None, prefix: str = "flatness/", *,
                 unpack: Callable[[Any], tuple[Any, Any]] | None = None, seed: int = 0, prog_bar: bool = False):
        check_schedule(every_n_steps, prefix)
        check(unpack is None or callable(unpack), f"unpack must be a callable batch -> (inputs, targets) (got {unpack!r})")
        self.every_n_steps, self.prefix, self.batch, self.prog_bar = every_n_steps, prefix, batch, prog_bar
        self.unpack = unpack or default_unpack
        self.probe = FlatnessProbe(loss_fn, n_iter=n_iter, rho=rho, seed=seed)
        self.history: list[dict[str, float]] = []
        self._last_step = -1
        if batch is not None:
            self.unpack(batch)  # a bad fixed batch fails here, not hundreds of steps into training

    def setup(self, trainer: Any, pl_module: Any, stage: str | None = None) -> None:
        """Before the first step: the probe evaluates ``pl_module(inputs)``, so a module without ``forward`` (only a
        ``training_step``) is refused here in one line, not with a traceback at the first probe."""
        check(has_forward(pl_module), f"FlatnessCallback evaluates pl_module(inputs), but {type(pl_module).__name__} "
              "defines no forward(): add forward(self, x) returning the outputs (training_step can call self(x))")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, prefix=self.prefix)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # once per optimizer step
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        inputs, targets = self.unpack(batch if self.batch is None else to_device(self.batch, pl_module.device))
        metrics = {self.prefix + k: v for k, v in self.probe(pl_module, inputs, targets).items()}
        self.history.append({"global_step": step, **metrics})
        log_step = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, prog_bar=self.prog_bar, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.probe.gen.get_state(), "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe.gen.set_state(state_dict["generator"])
        self._last_step = state_dict["last_step"]
