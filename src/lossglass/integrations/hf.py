"""Hugging Face ``transformers.Trainer`` callback that logs the flatness proxies of
:class:`~lossglass.proxies.FlatnessProbe`.

>>> from lossglass.integrations.hf import FlatnessCallback
>>> trainer = Trainer(model=model, args=args, train_dataset=train_ds)  # doctest: +SKIP
>>> FlatnessCallback(every_n_steps=200).attach(trainer)  # doctest: +SKIP
>>> trainer.train()  # doctest: +SKIP

Install with ``pip install 'lossglass[hf]'``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import check
from ..proxies import FlatnessProbe
from . import check_schedule, frozen_rng, require, to_device

_transformers = require("transformers", "hf", "lossglass.integrations.hf")


def first_batch(dataloader: Any, size: int) -> dict[str, Any]:
    """The batch made of the first ``size`` examples of the dataloader's dataset, through its own ``collate_fn``
    (padding, column removal and all): indexed directly, so no sampler is iterated and no random number drawn
    (the global Python/NumPy/torch generators are put back in case the dataset augments at random)."""
    ds = getattr(dataloader, "dataset", None)
    indexable = ds is not None and not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__getitem__") \
        and hasattr(ds, "__len__")
    check(indexable, "FlatnessCallback cannot take a probe batch from this training set (it is not an indexable dataset, "
                     "e.g. an IterableDataset): pass FlatnessCallback(batch={'input_ids': ..., 'labels': ...})")
    check(len(ds) > 0, "the training set is empty: no batch to probe")
    with frozen_rng():
        batch = dataloader.collate_fn([ds[i] for i in range(min(size, len(ds)))])
    check(isinstance(batch, Mapping), f"the data collator made a {type(batch).__name__}, not a dict of model inputs: "
                                      "pass FlatnessCallback(batch={...}) and, if needed, loss_fn")
    return dict(batch)


class FlatnessCallback(_transformers.TrainerCallback):
    r"""Every ``every_n_steps`` optimizer steps, the flatness proxies of the model on one fixed batch, logged
    through ``Trainer.log``: they land in ``trainer.state.log_history`` and in every reporter of ``report_to``
    (TensorBoard, W&B, ...), at ``state.global_step``.

    In ``on_step_end`` where ``state.global_step`` is a multiple of ``every_n_steps``, a
    :class:`~lossglass.proxies.FlatnessProbe` runs ``model(**batch)`` and logs ``{prefix}loss`` = L_B(theta),
    ``{prefix}lambda_batch`` (power-iteration estimate of the top eigenvalue of the mini-batch Hessian) and
    ``{prefix}perturbation_rise`` = L_B(theta + rho u) - L_B(theta). ``history`` keeps them too.

    The batch: ``batch`` given here (a dict of model inputs, e.g. from your tokenizer and collator; moved to the
    model's device), or else the first ``probe_size`` examples of the training set (default: the per-device
    train batch size) put through the train dataloader's own collator, once, at the start of training. A fixed
    batch makes the numbers comparable from step to step; the sampler is never iterated (that would draw from
    the global generator and, with ``accelerate``, disturb the dataloader's state). An ``IterableDataset`` needs
    ``batch``.

    The loss: by default the model's own ``outputs.loss``, which Hugging Face models return when the batch holds
    ``labels``; else ``loss_fn(outputs, batch) -> scalar`` with the model's outputs and the batch dict (e.g.
    ``lambda out, b: F.cross_entropy(out.logits, b["labels"])``).

    Logging goes through the Trainer, so the callback needs it: ``FlatnessCallback(...).attach(trainer)``, or
    ``FlatnessCallback(..., trainer=trainer)`` added with ``trainer.add_callback``. (A ``TrainerCallback`` is not
    handed the Trainer; without it the training stops at its start with a message saying so.) The Trainer's own
    logging schedule (``logging_steps``) is left as it was.

    Cost: about ``n_iter + 2`` forward/backward passes on one batch every ``every_n_steps`` steps, on the main
    process only. It does not change the training result: eval mode during the probe with every ``training``
    flag restored, no parameter, buffer or ``.grad`` written, its own random generator (``seed``)."""

    def __init__(self, every_n_steps: int = 100, n_iter: int = 5, rho: float = 0.05,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, batch: Mapping[str, Any] | None = None,
                 prefix: str = "flatness/", *, trainer: Any = None, probe_size: int | None = None, seed: int = 0):
        check_schedule(every_n_steps, prefix)
        check(batch is None or isinstance(batch, Mapping),
              f"batch must be a dict of model inputs, e.g. {{'input_ids': ..., 'labels': ...}} (got {type(batch).__name__})")
        check(probe_size is None or isinstance(probe_size, int) and probe_size >= 1,
              f"probe_size must be an integer >= 1 (got {probe_size!r})")
        self.every_n_steps, self.prefix, self.probe_size = every_n_steps, prefix, probe_size
        self.batch = None if batch is None else dict(batch)
        self.probe = FlatnessProbe(loss_fn, n_iter=n_iter, rho=rho, seed=seed)
        self.history: list[dict[str, float]] = []
        self._trainer = None
        self._last_step = -1
        if trainer is not None:
            self.attach(trainer, add=False)

    def attach(self, trainer: Any, add: bool = True) -> FlatnessCallback:
        """Log through ``trainer`` and, with ``add``, add this callback to it unless it already holds it."""
        check(callable(getattr(trainer, "log", None)) and hasattr(trainer, "callback_handler"),
              f"attach needs a transformers.Trainer (got {type(trainer).__name__})")
        self._trainer = trainer
        if add and not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        check(self._trainer is not None,
              "FlatnessCallback logs through the Trainer but was not given it: call FlatnessCallback(...).attach(trainer) "
              "(or create it with trainer=trainer) before trainer.train()")
        if self.batch is None:
            self.batch = first_batch(kwargs.get("train_dataloader"), self.probe_size or args.per_device_train_batch_size)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if step % self.every_n_steps or step == self._last_step or not state.is_world_process_zero:
            return
        self._last_step = step
        model = kwargs.get("model")
        model = self._trainer.model if model is None else model
        batch = to_device(self.batch, next(model.parameters()).device)
        stats = self.probe(model, batch, batch if self.probe.loss_fn is not None else None)
        metrics = {self.prefix + k: v for k, v in stats.items()}
        self.history.append({"step": step, **metrics})
        # Trainer.log hands the logs to every callback's on_log, and the handler clears control.should_log on the
        # way: put it back, or the Trainer's own loss log due at this very step would be dropped
        should_log = control.should_log
        self._trainer.log(dict(metrics))
        control.should_log = self._trainer.control.should_log = should_log
