"""Ensemble training: K replicas trained together, one vectorised forward/backward per step.

Each replica has its own initialisation and its own order of mini-batches, both drawn from the seed
mixed from ``(seed, replica_id)``, so replica k is the same network whether it is trained among 16 or
1,024 replicas. A replica whose loss or parameters become NaN/inf is frozen at its state at the start of that epoch and
flagged ``diverged``; with a stop criterion (``stop_at_loss`` / ``stop_at_accuracy``) a replica that reaches it is
frozen where it is (``reached_stop``); in both cases the others go on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ._util import check_finite, generators, randn_per
from .errors import check, choice
from .problem import FunctionProblem, Problem

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


def _as_per_replica(value, k: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    check(t.numel() in (1, k), f"{name} must be a number or a list of {k} values, got {t.numel()} values")
    check(bool(torch.isfinite(t).all()) and bool((t >= 0).all()), f"{name} must be finite and >= 0, got {value}")
    return t.expand(k).clone()


def _save_checkpoint(path: Path, state: dict[str, torch.Tensor], gens: list[torch.Generator]) -> None:
    """Write the training state atomically (fsynced, then renamed, then the folder fsynced); the previous
    checkpoint is kept as ``NAME.prev`` so a checkpoint damaged by a power cut still leaves the one before."""
    from safetensors.torch import save

    from .store import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for i, g in enumerate(gens):
        tensors[f"rng.{i}"] = g.get_state()
    data = save(tensors)
    if path.exists():
        os.replace(path, _prev(path))
    atomic_write_bytes(path, data)


def _prev(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _load_checkpoint(path: Path, shape: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """The newest readable checkpoint for replicas of ``shape`` (``path``, else ``NAME.prev``), or None. An empty or
    damaged file is discarded with a warning: training resumes from the one before, or starts over."""
    import warnings

    from safetensors.torch import load

    for p in (path, _prev(path)):
        if not p.exists():
            continue
        try:
            st = load(p.read_bytes())
            if tuple(st["theta"].shape) == tuple(shape):
                return st
            reason = f"it holds replicas of shape {tuple(st['theta'].shape)}"
        except Exception as e:  # noqa: BLE001 - empty, truncated or foreign file
            reason = f"it is unreadable ({type(e).__name__})"
        warnings.warn(f"discarding checkpoint {p}: {reason}; resuming from an earlier state", RuntimeWarning,
                      stacklevel=3)
        p.unlink()
    return None


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
    schedule runs over all of them.

    Stop criterion (Jiang et al. 2020 train every model to cross-entropy 0.01): with ``stop_at_loss`` and/or
    ``stop_at_accuracy``, after every epoch the replicas still training are evaluated on the whole training
    set in one batched pass, and a replica whose loss <= ``stop_at_loss`` and (if given) accuracy >=
    ``stop_at_accuracy`` is frozen: it is never updated again while the others go on; training ends when
    none is left. The table records ``epochs_trained`` per replica and ``reached_stop``.

    ``keep_at``: optimiser steps (0 = the initialisation) after which the replicas are kept, returned as
    ``Replicas.snapshots`` (a replica stopped or frozen before a kept step is kept as it is then).

    ``checkpoint`` is a file where the full state is written atomically after every epoch; training started
    again with the same file resumes from it (bit-identical to an uninterrupted run).
    ``evaluate=False`` skips the final train/test evaluation (the table's metrics are then NaN).
    """
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
    k, dev, dt = n_replicas, problem.device, problem.dtype
    is_fn = isinstance(problem, FunctionProblem)
    check(stop_at_accuracy is None or not is_fn,
          f"stop_at_accuracy needs labelled data; {problem!r} is an energy function without accuracy (use stop_at_loss)")
    stopping = stop_at_loss is not None or stop_at_accuracy is not None
    ids = list(range(k)) if replica_ids is None else [int(i) for i in replica_ids]
    check(len(ids) == k, f"replica_ids has {len(ids)} entries for {k} replicas")
    lrs = _as_per_replica(lr, k, "lr").to(dev, dt)
    check(bool((lrs > 0).all()), f"lr must be > 0, got {lr}")
    theta = problem.init(k, seed, ids=ids) if theta0 is None else theta0.detach().to(dev, dt).clone()
    check(theta.shape == (k, problem.n_params), f"theta0 must have shape ({k}, {problem.n_params})")
    check_finite(theta, "theta0")

    if is_fn:
        n_data, steps_per_epoch = 0, 1
    else:
        x_train, y_train = problem.data["train"]
        n_data = len(y_train)
        steps_per_epoch = max(1, n_data // batch_size)
    bsz = min(batch_size, n_data) if n_data else 0
    batch_gens = generators(seed, ids, stream=1)
    noise_gens = generators(seed, ids, stream=2)
    buf1 = torch.zeros_like(theta)
    buf2 = torch.zeros_like(theta)
    alive = torch.ones(k, dtype=torch.bool, device=dev)  # False: diverged
    done = torch.zeros(k, dtype=torch.bool, device=dev)  # True: reached the stop criterion, frozen
    diverged_at = torch.full((k,), -1, dtype=torch.long)
    epochs_trained = torch.zeros(k, dtype=torch.long)
    start_epoch, step = 0, 0
    total_steps = epochs * steps_per_epoch
    keep = sorted({int(s_) for s_ in (keep_at or [])})
    check(all(0 <= s_ <= total_steps for s_ in keep), f"keep_at steps must be in 0..{total_steps} (the last step of "
          f"{epochs} epochs of {steps_per_epoch} steps), got {keep}")
    kept: dict[int, torch.Tensor] = {}

    ckpt = Path(checkpoint) if checkpoint is not None else None
    st = _load_checkpoint(ckpt, theta.shape) if ckpt is not None else None
    if st is not None:
        theta, buf1, buf2 = st["theta"].to(dev, dt), st["buf1"].to(dev, dt), st["buf2"].to(dev, dt)
        alive, diverged_at = st["alive"].to(dev).bool(), st["diverged_at"].long()
        start_epoch, step = int(st["epoch"]), int(st["step"])
        done = st["done"].to(dev).bool() if "done" in st else done
        epochs_trained = st["epochs_trained"].long() if "epochs_trained" in st else torch.full((k,), start_epoch)
        for i, g in enumerate(batch_gens + noise_gens):
            g.set_state(st[f"rng.{i}"])
        kept = {int(k_.split(".")[1]): v for k_, v in st.items() if k_.startswith("kept.")}
    if 0 in keep and step == 0:
        kept[0] = theta.detach().cpu().clone()

    bar = tqdm(total=total_steps, initial=step, desc=f"train {k} replicas", disable=not progress or None,
               leave=False, unit="step")
    theta = theta.clone()

    def freeze(bad: torch.Tensor, alive: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        """Flag the ``bad`` replicas diverged at this step, restore their epoch-start state and clear their
        optimiser buffers so that nothing moves them again; returns the new ``alive`` mask."""
        if not bad.any():
            return alive
        diverged_at[bad.cpu()] = step
        theta[bad] = safe[bad]
        buf1[bad] = 0
        buf2[bad] = 0
        return alive & ~bad

    for epoch in range(start_epoch, epochs):
        if not bool((alive & ~done).any()):  # every replica stopped or diverged (also on resume)
            break
        safe = theta.clone()  # a diverging replica is restored to its state at the start of the epoch
        if not is_fn:  # per-replica order of mini-batches (RNG only: one permutation per replica)
            order = torch.stack([torch.randperm(n_data, generator=g) for g in batch_gens]).to(dev)
        for s in range(steps_per_epoch):
            frac = step / max(total_steps - 1, 1)
            scale = 0.5 * (1 + math.cos(math.pi * frac)) if lr_schedule == "cosine" else 1.0
            if is_fn:
                xb = yb = None
            else:
                idx = order[:, s * bsz:(s + 1) * bsz]
                flat = idx.reshape(-1)
                xb = x_train.index_select(0, flat).view(k, bsz, -1)
                yb = y_train.index_select(0, flat).view(k, bsz)
            moving = alive & ~done
            loss, g = problem.batch_loss_and_grad(theta, xb, yb, moving)
            alive = freeze(moving & ~torch.isfinite(loss), alive, safe)
            moving = alive & ~done
            if method == "sam":
                eps = rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                _, g = problem.batch_loss_and_grad(theta + eps, xb, yb, moving)
            all_moving = bool(moving.all())  # the common case: the masks below are the identity, skip their passes
            if not all_moving:
                g = torch.where(moving.unsqueeze(1), g, 0)  # NaN rows can leak into a dead replica's gradient
            if weight_decay and optimizer != "adamw":
                g = g.add(theta, alpha=weight_decay)
            if method == "replicated":
                gam = gamma[0] * (gamma[1] / gamma[0]) ** frac
                centre = theta[alive].mean(0, keepdim=True) if alive.any() else theta.mean(0, keepdim=True)
                g = g + gam * (theta - centre)
            if not all_moving:
                g = torch.where(moving.unsqueeze(1), g, 0)  # frozen replicas (diverged or stopped) never move
            lr_t = (lrs * scale).unsqueeze(1)
            if optimizer == "sgd":
                torch.add(g, buf1, alpha=momentum, out=buf1)  # v <- momentum v + g, one pass
                if method == "langevin":  # SGHMC: the noise goes into the velocity (see the docstring)
                    xi = randn_per(noise_gens, problem.n_params, dev, dt)
                    amp = torch.where(lr_t > 0, (2 * (1 - momentum) * temperature / lr_t.clamp_min(1e-300)).sqrt(), 0)
                    buf1.sub_(xi * (amp * moving.unsqueeze(1)))
                theta.addcmul_(buf1, lr_t, value=-1)
            else:
                if optimizer == "adamw" and weight_decay:  # decoupled decay; frozen replicas never move
                    theta.mul_(1 - lr_t * weight_decay * moving.unsqueeze(1))
                buf1.mul_(0.9).add_(g, alpha=0.1)
                buf2.mul_(0.999).addcmul_(g, g, value=0.001)
                t = step + 1
                denom = (buf2 / (1 - 0.999**t)).sqrt_().add_(1e-8)
                theta.addcdiv_(buf1 * (lr_t / (1 - 0.9**t)), denom, value=-1)
            projected = problem.project(theta)
            if projected is not theta:
                theta = torch.where(moving.unsqueeze(1), projected, theta)
            step += 1
            if step in keep:
                kept[step] = theta.detach().cpu().clone()
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss[moving].mean().item():.4f}" if moving.any() else "all stopped")
        alive = freeze(alive & ~torch.isfinite(theta).all(1), alive, safe)  # the epoch's last step can overflow
        epochs_trained[(alive & ~done).cpu()] += 1
        if stopping:
            done = _reached(problem, theta, alive & ~done, stop_at_loss, stop_at_accuracy) | done
            buf1[done] = 0  # irrelevant (a stopped replica's gradient is masked), but keeps the state clean
            buf2[done] = 0
        if ckpt is not None:
            _save_checkpoint(ckpt, {"theta": theta, "buf1": buf1, "buf2": buf2, "alive": alive.to(torch.uint8),
                                    "diverged_at": diverged_at, "epoch": torch.tensor(epoch + 1),
                                    "step": torch.tensor(step), "done": done.to(torch.uint8),
                                    "epochs_trained": epochs_trained,
                                    **{f"kept.{k_}": v for k_, v in kept.items()}}, batch_gens + noise_gens)
    bar.close()
    for s_ in keep:  # steps after every replica stopped: they stay where they are
        kept.setdefault(s_, theta.detach().cpu().clone())
    snaps = torch.stack([kept[s_] for s_ in keep]) if keep else None
    return Replicas(theta.detach(), _table(problem, theta, ids, seed, dict(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, method=method, momentum=momentum,
        weight_decay=weight_decay, stop_at_loss=math.nan if stop_at_loss is None else float(stop_at_loss),
        stop_at_accuracy=math.nan if stop_at_accuracy is None else float(stop_at_accuracy)),
        lrs, alive, diverged_at, evaluate, epochs_trained=epochs_trained, reached=(done & alive).cpu()), snaps, keep)


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
        te = tr if isinstance(problem, FunctionProblem) else problem.evaluate(theta, "test")
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
