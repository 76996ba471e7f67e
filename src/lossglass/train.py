"""Ensemble training: K replicas trained together, one vectorised forward/backward per step.

Each replica has its own initialisation and its own order of mini-batches, both drawn from the seed
mixed from ``(seed, replica_id)``, so replica k is the same network whether it is trained among 16 or
1,024 replicas. A replica whose loss or parameters become NaN/inf is frozen at its state at the start of that epoch and
flagged ``diverged``; with a stop criterion (``stop_at_loss`` / ``stop_at_accuracy``) a replica that reaches it is
frozen where it is (``reached_stop``); in both cases the others go on.

:func:`train` is a driver: it builds a chain of update rules (:mod:`lossglass.optim`) from its arguments, keeps
everything that must survive an interruption in one :class:`TrainState`, and checkpoints it with
:mod:`lossglass.checkpoint`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt_io
from . import optim
from ._determinism import pin_once
from ._util import check_finite, generators
from .errors import check, choice
from .problem import Problem

OPTIMIZERS = ("sgd", "adam", "adamw")
METHODS = ("sgd", "sam", "langevin", "replicated")


@dataclass
class Replicas:
    """K trained networks: ``theta`` is ``(K, P)``; ``table`` has one row per replica. ``snapshots`` ``(S, K, P)``
    holds the replicas after each of ``snapshot_steps`` optimiser steps (``train(..., keep_at=...)``; step 0 is the
    initialisation), or is None."""

    theta: torch.Tensor
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    snapshots: torch.Tensor | None = None
    snapshot_steps: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def __getitem__(self, idx) -> Replicas:
        idx = torch.as_tensor(idx).reshape(-1)
        snaps = None if self.snapshots is None else self.snapshots[:, idx]
        return Replicas(self.theta[idx], self.table.iloc[idx.tolist()].reset_index(drop=True), snaps,
                        list(self.snapshot_steps))

    @property
    def alive(self) -> torch.Tensor:
        """Mask of replicas that did not diverge."""
        if "diverged" not in self.table:
            return torch.ones(len(self), dtype=torch.bool)
        return torch.as_tensor(~self.table["diverged"].to_numpy(bool))


@dataclass
class TrainState:
    """Everything training carries from one epoch to the next, and all a checkpoint holds.

    ``theta`` ``(K, P)``; ``rules``: the state of the update rules (:func:`lossglass.optim.chain`'s dict);
    ``batch_gens`` / ``noise_gens``: one generator per replica for its order of mini-batches and its SGHMC noise;
    ``alive`` (False once diverged) and ``done`` (True once the stop criterion is reached), ``(K,)`` bool on the
    parameters' device; ``diverged_at`` (the step, or -1) and ``epochs_trained``, ``(K,)`` int64 on the CPU;
    ``epoch`` / ``step``: epochs and optimiser steps completed; ``kept``: the snapshots taken so far, by step.

    :meth:`save` and :meth:`load` round-trip it bit for bit (tensors, counters, generator states)."""

    theta: torch.Tensor
    rules: dict[str, torch.Tensor]
    batch_gens: list[torch.Generator]
    noise_gens: list[torch.Generator]
    alive: torch.Tensor
    done: torch.Tensor
    diverged_at: torch.Tensor
    epochs_trained: torch.Tensor
    epoch: int = 0
    step: int = 0
    kept: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, theta: torch.Tensor, rule: optim.Rule, batch_gens: list[torch.Generator],
              noise_gens: list[torch.Generator]) -> TrainState:
        """The state before the first step: the rules' initial state, every replica alive and training."""
        k, dev = theta.shape[0], theta.device
        return cls(theta, rule.init(theta), batch_gens, noise_gens, torch.ones(k, dtype=torch.bool, device=dev),
                   torch.zeros(k, dtype=torch.bool, device=dev), torch.full((k,), -1, dtype=torch.long),
                   torch.zeros(k, dtype=torch.long))

    @property
    def moving(self) -> torch.Tensor:
        """The replicas that still train: not diverged, not stopped."""
        return self.alive & ~self.done

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as named tensors (the generators' states are added by :meth:`save`)."""
        return {"theta": self.theta, **{f"rules.{k}": v for k, v in self.rules.items()},
                "alive": self.alive.to(torch.uint8), "diverged_at": self.diverged_at,
                "epoch": torch.tensor(self.epoch), "step": torch.tensor(self.step), "done": self.done.to(torch.uint8),
                "epochs_trained": self.epochs_trained, **{f"kept.{s}": v for s, v in self.kept.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Checkpoint the state to ``path`` (atomically, the previous file kept as ``NAME.prev``)."""
        ckpt_io.save(path, self.tensors(), self.batch_gens + self.noise_gens)

    def load(self, path: str | os.PathLike) -> bool:
        """Replace this state by the newest usable checkpoint at ``path`` (else ``NAME.prev``); False when there is
        none. A checkpoint of other replicas (another shape) is discarded with a warning, as is a damaged one. The
        generators are set in place, so rules that hold them draw on from the saved states.

        Checkpoints written before the update rules were composed (``buf1``/``buf2``) are read too: their buffers are
        the rules' buffers in chain order (velocity; or Adam's mu, nu)."""
        shape = tuple(self.theta.shape)

        def legacy(st) -> bool:  # written by the inline trainer: its one stateful optimiser kept buf1 (and buf2)
            return "buf1" in st and not any(k.startswith("rules.") for k in st)

        def accept(st, file):
            got = tuple(st["theta"].shape)
            if got != shape:
                return f"it holds replicas of shape {got}"
            if not legacy(st) and any(f"rules.{k}" not in st for k in self.rules):
                return "it was written by other update rules"
            return None

        st = ckpt_io.load(path, keys=("theta", "alive", "diverged_at", "epoch", "step"), accept=accept, stacklevel=3)
        if st is None:
            return False
        dev, dt = self.theta.device, self.theta.dtype
        if legacy(st):
            saved = dict(zip(self.rules, (st["buf1"], st["buf2"])))
        else:
            saved = {k: st[f"rules.{k}"] for k in self.rules}
        self.theta = st["theta"].to(dev, dt).clone()
        self.rules = {k: v.to(dev, dt) for k, v in saved.items()}
        self.alive, self.diverged_at = st["alive"].to(dev).bool(), st["diverged_at"].long()
        self.epoch, self.step = int(st["epoch"]), int(st["step"])
        self.done = st["done"].to(dev).bool() if "done" in st else self.done
        self.epochs_trained = (st["epochs_trained"].long() if "epochs_trained" in st
                               else torch.full_like(self.epochs_trained, self.epoch))
        ckpt_io.restore_generators(st, self.batch_gens + self.noise_gens)
        self.kept = {int(k.split(".")[1]): v for k, v in st.items() if k.startswith("kept.")}
        return True

    def freeze(self, bad: torch.Tensor, safe: torch.Tensor) -> None:
        """Flag the ``bad`` replicas diverged at this step, restore them to ``safe`` (their state at the start of the
        epoch) and clear their optimiser buffers, so that nothing moves them again."""
        if not bad.any():
            return
        self.diverged_at[bad.cpu()] = self.step
        self.theta[bad] = safe[bad]
        optim.zero_rows(self.rules, bad)
        self.alive = self.alive & ~bad


def _as_per_replica(value, k: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    check(t.numel() in (1, k), f"{name} must be a number or a list of {k} values, got {t.numel()} values")
    check(bool(torch.isfinite(t).all()) and bool((t >= 0).all()), f"{name} must be finite and >= 0, got {value}")
    return t.expand(k).clone()


def update_rule(optimizer: str = "sgd", method: str = "sgd", *, momentum: float = 0.9, weight_decay: float = 0.0,
                temperature: float = 1e-5, gamma: tuple[float, float] = (1e-3, 1.0),
                noise_gens: list[torch.Generator] | None = None) -> optim.Rule:
    """The chain of update rules :func:`train` runs for ``optimizer`` and ``method`` (SAM wraps the gradient and
    is not part of it):

    - weight decay: ``adamw`` decays outside the gradient (:func:`~lossglass.optim.decoupled_weight_decay`), the
      others through it (:func:`~lossglass.optim.add_decayed_weights`: the energy is E + lambda |theta|^2 / 2);
    - ``"replicated"`` adds the coupling (:func:`~lossglass.optim.replicated`) after the decay;
    - ``"sgd"`` is heavy-ball :func:`~lossglass.optim.momentum` (a buffer even at momentum 0), or
      :func:`~lossglass.optim.sghmc` at ``temperature`` for ``"langevin"``; ``"adam"`` / ``"adamw"`` use
      (0.9, 0.999, 1e-8).

    >>> update_rule("sgd", "replicated", weight_decay=1e-4).name
    'chain(add_decayed_weights, replicated, momentum)'
    """
    rules = []
    if weight_decay and optimizer != "adamw":
        rules.append(optim.add_decayed_weights(weight_decay))
    if method == "replicated":
        rules.append(optim.replicated(gamma))
    if optimizer == "sgd":
        rules.append(optim.sghmc(temperature, noise_gens, momentum) if method == "langevin" else optim.momentum(momentum))
    elif optimizer == "adam":
        rules.append(optim.adam())
    else:
        rules.append(optim.adamw(weight_decay))
    return optim.chain(*rules)


def train(problem: Problem, n_replicas: int, *, epochs: int = 5, batch_size: int = 128, lr=0.05,
          optimizer: str = "sgd", method: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          seed: int = 0, replica_ids=None, theta0: torch.Tensor | None = None, rho: float = 0.05,
          temperature: float = 1e-5, gamma: tuple[float, float] = (1e-3, 1.0), lr_schedule: str = "constant",
          stop_at_loss: float | None = None, stop_at_accuracy: float | None = None,
          checkpoint: str | os.PathLike | None = None, progress: bool = True, evaluate: bool = True,
          keep_at=None) -> Replicas:
    """Train K replicas of ``problem`` by mini-batch gradient descent, all in one vectorised loop.

    Update for replica a with gradient g_a of the mini-batch loss (+ weight_decay * theta_a, so the energy
    minimised, and sampled by ``"langevin"``, is E(theta) + weight_decay/2 |theta|^2):
      - ``optimizer="sgd"``: v <- momentum v + g; theta <- theta - lr v.
      - ``optimizer="adam"``: Kingma & Ba with (0.9, 0.999, 1e-8).
      - ``optimizer="adamw"``: Adam with decoupled weight decay (Loshchilov & Hutter 2019): g has no decay term and
        theta <- theta - lr weight_decay theta before the Adam step (the optimiser of the grokking experiments,
        Power et al. 2022).
    ``method`` changes g_a:
      - ``"sgd"``: plain.
      - ``"sam"`` (Foret et al. 2021): g evaluated at theta + rho g / |g| (ascent step inside the rho-ball).
      - ``"langevin"``: samples exp(-E/T), T = ``temperature`` in the units of E. With momentum beta this is
        SGHMC (Chen et al. 2014, sec. 3.3): heavy-ball SGD has friction (1 - beta)/lr, so the velocity
        p = -lr v needs noise of variance 2 (1 - beta) lr T per step; in the buffer's units
        v <- beta v + g - sqrt(2 (1 - beta) T / lr) xi, xi ~ N(0, I), then theta <- theta - lr v.
        momentum=0 is SGLD, theta <- theta - lr g + sqrt(2 lr T) xi (Welling & Teh 2011). For
        E = 1/2 theta^T H theta this gives equipartition <E> = P T / 2 up to an O(lr lambda) step bias.
        The mini-batch gradient noise is not subtracted (Chen et al.'s B-hat = 0): it adds its own,
        anisotropic temperature of order lr Var(g_batch) / (2 (1 - beta)); T is exact only for a full
        gradient (a FunctionProblem, or batch_size >= the training set). With lr_schedule="cosine" the
        noise follows lr_t (none at lr_t = 0). Adam has no correct noise scaling here and is refused.
      - ``"replicated"`` (Baldassi et al. 2016/2020): g += gamma (theta_a - mean_b theta_b), with gamma
        growing geometrically from gamma[0] to gamma[1] over training (replicas are coupled by design; the
        centre is the mean of the non-diverged replicas, stopped ones included).
    ``lr`` may be one number or one per replica. ``epochs`` is the maximum number of epochs; the cosine
    schedule runs over all of them. The update is the chain of rules :func:`update_rule` builds
    (:mod:`lossglass.optim`); SAM wraps the gradient (:func:`lossglass.optim.sam`).

    Stop criterion (Jiang et al. 2020 train every model to cross-entropy 0.01): with ``stop_at_loss`` and/or
    ``stop_at_accuracy``, after every epoch the replicas still training are evaluated on the whole training
    set in one batched pass, and a replica whose loss <= ``stop_at_loss`` and (if given) accuracy >=
    ``stop_at_accuracy`` is frozen: it is never updated again while the others go on; training ends when
    none is left. The table records ``epochs_trained`` per replica and ``reached_stop``.

    ``keep_at``: optimiser steps (0 = the initialisation) after which the replicas are kept, returned as
    ``Replicas.snapshots`` (a replica stopped or frozen before a kept step is kept as it is then).

    ``checkpoint`` is a file where the full state (:class:`TrainState`) is written atomically after every epoch;
    training started again with the same file resumes from it (bit-identical to an uninterrupted run).
    ``evaluate=False`` skips the final train/test evaluation (the table's metrics are then NaN).
    """
    pin_once()  # the thread count and OpenMP teams that fix the bits (lossglass._determinism)
    _check_arguments(problem, n_replicas, epochs, batch_size, optimizer, method, lr_schedule, momentum, weight_decay,
                     rho, temperature, stop_at_loss, stop_at_accuracy)
    k, dev, dt = n_replicas, problem.device, problem.dtype
    ids = list(range(k)) if replica_ids is None else [int(i) for i in replica_ids]
    check(len(ids) == k, f"replica_ids has {len(ids)} entries for {k} replicas")
    lrs = _as_per_replica(lr, k, "lr").to(dev, dt)
    check(bool((lrs > 0).all()), f"lr must be > 0, got {lr}")
    theta = problem.init(k, seed, ids=ids) if theta0 is None else theta0.detach().to(dev, dt).clone()
    check(theta.shape == (k, problem.n_params), f"theta0 must have shape ({k}, {problem.n_params})")
    check_finite(theta, "theta0")
    per_epoch = _steps_per_epoch(problem, batch_size)
    total_steps = epochs * per_epoch
    keep = sorted({int(s_) for s_ in (keep_at or [])})
    check(all(0 <= s_ <= total_steps for s_ in keep), f"keep_at steps must be in 0..{total_steps} (the last step of "
          f"{epochs} epochs of {per_epoch} steps), got {keep}")

    noise_gens = generators(seed, ids, stream=2)
    rule = update_rule(optimizer, method, momentum=momentum, weight_decay=weight_decay, temperature=temperature,
                       gamma=gamma, noise_gens=noise_gens)
    sam = optim.sam(rho) if method == "sam" else None
    state = TrainState.start(theta, rule, generators(seed, ids, stream=1), noise_gens)
    if checkpoint is not None:
        state.load(checkpoint)
    if 0 in keep and state.step == 0:
        state.kept[0] = state.theta.detach().cpu().clone()
    bar = tqdm(total=total_steps, initial=state.step, desc=f"train {k} replicas", disable=not progress or None,
               leave=False, unit="step")
    state.theta = state.theta.clone()
    for epoch in range(state.epoch, epochs):
        if not bool(state.moving.any()):  # every replica stopped or diverged (also on resume)
            break
        safe = state.theta.clone()  # a diverging replica is restored to its state at the start of the epoch
        for s, (xb, yb) in enumerate(_batches(problem, state.batch_gens, batch_size, k)):
            frac = state.step / max(total_steps - 1, 1)
            scale = 0.5 * (1 + math.cos(math.pi * frac)) if lr_schedule == "cosine" else 1.0
            loss = _step(problem, rule, sam, state, (lrs * scale).unsqueeze(1), frac, xb, yb, safe)
            if state.step in keep:
                state.kept[state.step] = state.theta.detach().cpu().clone()
            bar.update(1)
            if s % 20 == 0:
                moving = state.moving
                bar.set_postfix(loss=f"{loss[moving].mean().item():.4f}" if moving.any() else "all stopped")
        _end_epoch(problem, state, safe, stop_at_loss, stop_at_accuracy)
        state.epoch = epoch + 1
        if checkpoint is not None:
            state.save(checkpoint)
    bar.close()
    theta = state.theta
    for s_ in keep:  # steps after every replica stopped: they stay where they are
        state.kept.setdefault(s_, theta.detach().cpu().clone())
    snaps = torch.stack([state.kept[s_] for s_ in keep]) if keep else None
    return Replicas(theta.detach(), _table(problem, theta, ids, seed, dict(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, method=method, momentum=momentum,
        weight_decay=weight_decay, stop_at_loss=math.nan if stop_at_loss is None else float(stop_at_loss),
        stop_at_accuracy=math.nan if stop_at_accuracy is None else float(stop_at_accuracy)),
        lrs, state.alive, state.diverged_at, evaluate, epochs_trained=state.epochs_trained,
        reached=(state.done & state.alive).cpu()), snaps, keep)


def _check_arguments(problem, n_replicas, epochs, batch_size, optimizer, method, lr_schedule, momentum, weight_decay,
                     rho, temperature, stop_at_loss, stop_at_accuracy) -> None:
    check(isinstance(n_replicas, int) and n_replicas > 0, f"n_replicas must be a positive int, got {n_replicas!r}")
    check(isinstance(epochs, int) and epochs > 0, f"epochs must be a positive int, got {epochs!r}")
    check(isinstance(batch_size, int) and batch_size > 0, f"batch_size must be a positive int, got {batch_size!r}")
    choice("optimizer", optimizer, OPTIMIZERS)
    choice("method", method, METHODS)
    choice("lr_schedule", lr_schedule, ("constant", "cosine"))
    check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
    check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
    check(rho > 0 and temperature >= 0, f"rho must be > 0 and temperature >= 0 (got {rho}, {temperature})")
    check(not (method == "langevin" and optimizer in ("adam", "adamw")),
          "method='langevin' needs optimizer='sgd': Adam's preconditioner has no correct noise scaling, so it would "
          "sample at a wrong, parameter-dependent temperature (use sgd with any momentum: SGHMC)")
    check(stop_at_loss is None or (isinstance(stop_at_loss, (int, float)) and math.isfinite(stop_at_loss)),
          f"stop_at_loss must be None or a finite number, got {stop_at_loss!r}")
    check(stop_at_accuracy is None or (isinstance(stop_at_accuracy, (int, float)) and 0 <= stop_at_accuracy <= 1),
          f"stop_at_accuracy must be None or a number in [0, 1], got {stop_at_accuracy!r}")
    check(stop_at_accuracy is None or problem.has_data,
          f"stop_at_accuracy needs labelled data; {problem!r} is an energy function without accuracy (use stop_at_loss)")


def _steps_per_epoch(problem: Problem, batch_size: int) -> int:
    """Mini-batches per epoch (the last partial one is dropped); an energy function takes one full-gradient step."""
    return max(1, len(problem.data["train"][1]) // batch_size) if problem.has_data else 1


def _batches(problem: Problem, gens: list[torch.Generator], batch_size: int, k: int):
    """One epoch of mini-batches ``(x (K, B, ...), y (K, B))``, replica k in its own order (one permutation of the
    training set per replica, drawn from ``gens[k]`` when the epoch starts); an energy function has one step without
    data, ``(None, None)``."""
    if not problem.has_data:
        yield None, None
        return
    x, y = problem.data["train"]
    n = len(y)
    bsz = min(batch_size, n)
    order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(problem.device)
    for s in range(_steps_per_epoch(problem, batch_size)):
        flat = order[:, s * bsz:(s + 1) * bsz].reshape(-1)
        yield x.index_select(0, flat).view(k, bsz, -1), y.index_select(0, flat).view(k, bsz)


def _step(problem: Problem, rule: optim.Rule, sam, state: TrainState, lr: torch.Tensor, progress: float, xb, yb,
          safe: torch.Tensor) -> torch.Tensor:
    """One optimiser step of every moving replica on its mini-batch (a replica whose loss is not finite is frozen
    first); ``state`` is updated in place. Returns the mini-batch losses."""
    moving = state.moving
    loss, g = problem.batch_loss_and_grad(state.theta, xb, yb, moving)
    state.freeze(moving & ~torch.isfinite(loss), safe)
    moving = state.moving
    if sam is not None:
        g = sam(lambda th: problem.batch_loss_and_grad(th, xb, yb, moving)[1], state.theta, g)
    ctx = optim.Context(lr=lr, count=state.step, progress=progress, moving=moving, alive=state.alive)
    if not ctx.all_moving:
        g = torch.where(moving.unsqueeze(1), g, 0)  # NaN rows can leak into a dead replica's gradient
    step, state.rules = rule.update(g, state.rules, state.theta, ctx)
    step.apply(state.theta)
    projected = problem.project(state.theta)
    if projected is not state.theta:
        state.theta = torch.where(moving.unsqueeze(1), projected, state.theta)
    state.step += 1
    return loss


def _end_epoch(problem: Problem, state: TrainState, safe: torch.Tensor, stop_at_loss: float | None,
               stop_at_accuracy: float | None) -> None:
    """After an epoch: freeze replicas whose parameters overflowed on its last step, count the epoch for those still
    training, and stop those that reached the stop criterion (if any)."""
    state.freeze(state.alive & ~torch.isfinite(state.theta).all(1), safe)
    state.epochs_trained[state.moving.cpu()] += 1
    if stop_at_loss is not None or stop_at_accuracy is not None:
        state.done = _reached(problem, state.theta, state.moving, stop_at_loss, stop_at_accuracy) | state.done
        optim.zero_rows(state.rules, state.done)  # irrelevant (a stopped replica's gradient is masked): clean


def _reached(problem: Problem, theta: torch.Tensor, active: torch.Tensor, stop_at_loss: float | None,
             stop_at_accuracy: float | None) -> torch.Tensor:
    """Mask of the ``active`` replicas whose full training-set loss <= ``stop_at_loss`` and accuracy >=
    ``stop_at_accuracy`` (each criterion only if given), from one batched evaluation of those replicas."""
    out = torch.zeros_like(active)
    if not bool(active.any()):
        return out
    idx = torch.nonzero(active).flatten()
    ev = problem.evaluate(theta[idx], "train")
    ok = torch.ones(len(idx), dtype=torch.bool, device=active.device)
    if stop_at_loss is not None:
        ok &= (ev["loss"] <= stop_at_loss).to(active.device)
    if stop_at_accuracy is not None:
        ok &= (ev["accuracy"] >= stop_at_accuracy).to(active.device)
    out[idx] = ok
    return out


def _table(problem, theta, ids, seed, hp, lrs, alive, diverged_at, evaluate=True, epochs_trained=None,
           reached=None) -> pd.DataFrame:
    if evaluate:
        tr = problem.evaluate(theta, "train")
        te = problem.evaluate(theta, "test") if problem.has_data else tr
    nan = torch.full((theta.shape[0],), float("nan"))
    if not evaluate:
        tr = te = {"loss": nan, "accuracy": nan}
    df = pd.DataFrame({"replica": ids, "seed": seed, **{k: v for k, v in hp.items()}, "lr": lrs.cpu().numpy(),
                       "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                       "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                       "diverged": (~alive).cpu().numpy(), "diverged_at_step": diverged_at.numpy()})
    k = theta.shape[0]
    df["epochs_trained"] = (epochs_trained if epochs_trained is not None else torch.full((k,), hp["epochs"])).numpy()
    df["reached_stop"] = (reached if reached is not None else torch.zeros(k, dtype=torch.bool)).numpy()
    if "val" in getattr(problem, "data", {}):
        va = problem.evaluate(theta, "val") if evaluate else {"loss": nan, "accuracy": nan}
        df["val_loss"], df["val_accuracy"] = va["loss"].cpu().numpy(), va["accuracy"].cpu().numpy()
    df["gap_loss"] = df["test_loss"] - df["train_loss"]
    df["gap_error"] = df["train_accuracy"] - df["test_accuracy"]
    return df


def descend(problem: Problem, theta: torch.Tensor, *, steps: int = 1000, lr: float = 0.1,
            tol: float = 1e-10, progress: bool = False) -> torch.Tensor:
    """Full-batch gradient descent theta <- P(theta - lr grad E), P the problem's projection (the sphere for
    p-spin), for all replicas at once, until every replica's energy changes by less than ``tol``."""
    check(steps > 0 and lr > 0, f"steps and lr must be positive (got {steps}, {lr})")
    theta = problem.project(theta.detach().clone())
    prev = None
    for _ in tqdm(range(steps), desc="descend", disable=not progress or None, leave=False):
        e, g = problem.energy_and_grad(theta)
        theta = problem.project(theta - lr * g)
        if prev is not None and bool(((prev - e).abs() < tol).all()):
            break
        prev = e
    return theta
