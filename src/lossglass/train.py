"""Ensemble training: K replicas trained together, one vectorised forward/backward per step.

Each replica has its own initialisation and its own order of mini-batches, both drawn from the seed
mixed from ``(seed, replica_id)``, so replica k is the same network whether it is trained among 16 or
1,024 replicas. A replica whose loss or parameters become NaN/inf is frozen at its state at the start of that epoch and
flagged ``diverged``; the others go on.
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

OPTIMIZERS = ("sgd", "adam")
METHODS = ("sgd", "sam", "langevin", "replicated")


@dataclass
class Replicas:
    """K trained networks: ``theta`` is ``(K, P)``; ``table`` has one row per replica."""

    theta: torch.Tensor
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def __getitem__(self, idx) -> Replicas:
        idx = torch.as_tensor(idx).reshape(-1)
        return Replicas(self.theta[idx], self.table.iloc[idx.tolist()].reset_index(drop=True))

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
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for i, g in enumerate(gens):
        tensors[f"rng.{i}"] = g.get_state()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def train(problem: Problem, n_replicas: int, *, epochs: int = 5, batch_size: int = 128, lr=0.05,
          optimizer: str = "sgd", method: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          seed: int = 0, replica_ids=None, theta0: torch.Tensor | None = None, rho: float = 0.05,
          temperature: float = 1e-5, gamma: tuple[float, float] = (1e-3, 1.0), lr_schedule: str = "constant",
          checkpoint: str | os.PathLike | None = None, progress: bool = True, evaluate: bool = True) -> Replicas:
    """Train K replicas of ``problem`` by mini-batch gradient descent, all in one vectorised loop.

    Update for replica a with gradient g_a of the mini-batch loss (+ weight_decay * theta_a):
      - ``optimizer="sgd"``: v <- momentum v + g; theta <- theta - lr v.
      - ``optimizer="adam"``: Kingma & Ba with (0.9, 0.999, 1e-8).
    ``method`` changes g_a:
      - ``"sgd"``: plain.
      - ``"sam"`` (Foret et al. 2021): g evaluated at theta + rho g / |g| (ascent step inside the rho-ball).
      - ``"langevin"``: after the step add sqrt(2 lr T) xi, xi ~ N(0, I) (``temperature`` = T).
      - ``"replicated"`` (Baldassi et al. 2016/2020): g += gamma (theta_a - mean_b theta_b), with gamma
        growing geometrically from gamma[0] to gamma[1] over training (replicas are coupled by design).
    ``lr`` may be one number or one per replica. ``checkpoint`` is a file where the full state is written
    atomically after every epoch; training started again with the same file resumes from it.
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
    k, dev, dt = n_replicas, problem.device, problem.dtype
    ids = list(range(k)) if replica_ids is None else [int(i) for i in replica_ids]
    check(len(ids) == k, f"replica_ids has {len(ids)} entries for {k} replicas")
    lrs = _as_per_replica(lr, k, "lr").to(dev, dt)
    check(bool((lrs > 0).all()), f"lr must be > 0, got {lr}")
    theta = problem.init(k, seed, ids=ids) if theta0 is None else theta0.detach().to(dev, dt).clone()
    check(theta.shape == (k, problem.n_params), f"theta0 must have shape ({k}, {problem.n_params})")
    check_finite(theta, "theta0")

    is_fn = isinstance(problem, FunctionProblem)
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
    alive = torch.ones(k, dtype=torch.bool, device=dev)
    diverged_at = torch.full((k,), -1, dtype=torch.long)
    start_epoch, step = 0, 0
    total_steps = epochs * steps_per_epoch

    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        from safetensors.torch import load_file

        st = load_file(str(ckpt))
        if st["theta"].shape == theta.shape:
            theta, buf1, buf2 = st["theta"].to(dev, dt), st["buf1"].to(dev, dt), st["buf2"].to(dev, dt)
            alive, diverged_at = st["alive"].to(dev).bool(), st["diverged_at"].long()
            start_epoch, step = int(st["epoch"]), int(st["step"])
            for i, g in enumerate(batch_gens + noise_gens):
                g.set_state(st[f"rng.{i}"])

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
            loss, g = problem.batch_loss_and_grad(theta, xb, yb, alive)
            alive = freeze(alive & ~torch.isfinite(loss), alive, safe)
            frozen = not bool(alive.all())
            if method == "sam":
                eps = rho * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                _, g = problem.batch_loss_and_grad(theta + eps, xb, yb, alive)
            if frozen:  # NaN rows can leak into a dead replica's gradient through its own weights
                g[~alive] = 0
            if weight_decay:
                g = g.add(theta, alpha=weight_decay)
            if method == "replicated":
                gam = gamma[0] * (gamma[1] / gamma[0]) ** frac
                centre = theta[alive].mean(0, keepdim=True) if alive.any() else theta.mean(0, keepdim=True)
                g = g + gam * (theta - centre) * alive.unsqueeze(1)
            lr_t = (lrs * scale).unsqueeze(1)
            if optimizer == "sgd":
                buf1.mul_(momentum).add_(g)
                theta.addcmul_(buf1, lr_t, value=-1)
            else:
                buf1.mul_(0.9).add_(g, alpha=0.1)
                buf2.mul_(0.999).addcmul_(g, g, value=0.001)
                t = step + 1
                denom = (buf2 / (1 - 0.999**t)).sqrt_().add_(1e-8)
                theta.addcdiv_(buf1 * (lr_t / (1 - 0.9**t)), denom, value=-1)
            if method == "langevin":
                noise = randn_per(noise_gens, problem.n_params, dev, dt)
                theta.add_(noise * ((2 * lr_t * temperature).sqrt() * alive.unsqueeze(1)))
            projected = problem.project(theta)
            if projected is not theta:
                theta = torch.where(alive.unsqueeze(1), projected, theta)
            step += 1
            bar.update(1)
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss[alive].mean().item():.4f}" if alive.any() else "all diverged")
        alive = freeze(alive & ~torch.isfinite(theta).all(1), alive, safe)  # the epoch's last step can overflow
        if ckpt is not None:
            _save_checkpoint(ckpt, {"theta": theta, "buf1": buf1, "buf2": buf2, "alive": alive.to(torch.uint8),
                                    "diverged_at": diverged_at, "epoch": torch.tensor(epoch + 1),
                                    "step": torch.tensor(step)}, batch_gens + noise_gens)
    bar.close()
    return Replicas(theta.detach(), _table(problem, theta, ids, seed, dict(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, method=method, momentum=momentum,
        weight_decay=weight_decay), lrs, alive, diverged_at, evaluate))


def _table(problem, theta, ids, seed, hp, lrs, alive, diverged_at, evaluate=True) -> pd.DataFrame:
    if evaluate:
        tr = problem.evaluate(theta, "train")
        te = tr if isinstance(problem, FunctionProblem) else problem.evaluate(theta, "test")
    else:
        nan = torch.full((theta.shape[0],), float("nan"))
        tr = te = {"loss": nan, "accuracy": nan}
    df = pd.DataFrame({"replica": ids, "seed": seed, **{k: v for k, v in hp.items()}, "lr": lrs.cpu().numpy(),
                       "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                       "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                       "diverged": (~alive).cpu().numpy(), "diverged_at_step": diverged_at.numpy()})
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
