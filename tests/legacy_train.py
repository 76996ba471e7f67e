"""The inline training loop as it was before issue 23 (``lossglass/train.py`` at 46c4c12), frozen as the oracle of
tests/test_optim.py: the trainer composed from update rules must give the same bytes. Only what does not touch the
arithmetic is left out (argument checks, checkpoints, the progress bar, the table). Do not edit."""

from __future__ import annotations

import math

import torch

from lossglass._util import generators, randn_per


def legacy_train(problem, n_replicas: int, *, epochs: int = 5, batch_size: int = 128, lr=0.05,
                 optimizer: str = "sgd", method: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
                 seed: int = 0, replica_ids=None, theta0=None, rho: float = 0.05, temperature: float = 1e-5,
                 gamma: tuple[float, float] = (1e-3, 1.0), lr_schedule: str = "constant", stop_at_loss=None,
                 stop_at_accuracy=None, keep_at=None) -> dict:
    k, dev, dt = n_replicas, problem.device, problem.dtype
    is_fn = not problem.has_data
    stopping = stop_at_loss is not None or stop_at_accuracy is not None
    ids = list(range(k)) if replica_ids is None else [int(i) for i in replica_ids]
    lrs = torch.as_tensor(lr, dtype=torch.float64).reshape(-1).expand(k).clone().to(dev, dt)
    theta = problem.init(k, seed, ids=ids) if theta0 is None else theta0.detach().to(dev, dt).clone()
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
    kept: dict[int, torch.Tensor] = {}
    if 0 in keep and step == 0:
        kept[0] = theta.detach().cpu().clone()
    theta = theta.clone()

    def freeze(bad: torch.Tensor, alive: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        if not bad.any():
            return alive
        diverged_at[bad.cpu()] = step
        theta[bad] = safe[bad]
        buf1[bad] = 0
        buf2[bad] = 0
        return alive & ~bad

    for _epoch in range(start_epoch, epochs):
        if not bool((alive & ~done).any()):
            break
        safe = theta.clone()
        if not is_fn:
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
            all_moving = bool(moving.all())
            if not all_moving:
                g = torch.where(moving.unsqueeze(1), g, 0)
            if weight_decay and optimizer != "adamw":
                g = g.add(theta, alpha=weight_decay)
            if method == "replicated":
                gam = gamma[0] * (gamma[1] / gamma[0]) ** frac
                centre = theta[alive].mean(0, keepdim=True) if alive.any() else theta.mean(0, keepdim=True)
                g = g + gam * (theta - centre)
            if not all_moving:
                g = torch.where(moving.unsqueeze(1), g, 0)
            lr_t = (lrs * scale).unsqueeze(1)
            if optimizer == "sgd":
                torch.add(g, buf1, alpha=momentum, out=buf1)
                if method == "langevin":
                    xi = randn_per(noise_gens, problem.n_params, dev, dt)
                    amp = torch.where(lr_t > 0, (2 * (1 - momentum) * temperature / lr_t.clamp_min(1e-300)).sqrt(), 0)
                    buf1.sub_(xi * (amp * moving.unsqueeze(1)))
                theta.addcmul_(buf1, lr_t, value=-1)
            else:
                if optimizer == "adamw" and weight_decay:
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
        alive = freeze(alive & ~torch.isfinite(theta).all(1), alive, safe)
        epochs_trained[(alive & ~done).cpu()] += 1
        if stopping:
            active = alive & ~done
            reached = torch.zeros_like(active)
            if bool(active.any()):
                idx = torch.nonzero(active).flatten()
                ev = problem.evaluate(theta[idx], "train")
                ok = torch.ones(len(idx), dtype=torch.bool, device=active.device)
                if stop_at_loss is not None:
                    ok &= (ev["loss"] <= stop_at_loss).to(active.device)
                if stop_at_accuracy is not None:
                    ok &= (ev["accuracy"] >= stop_at_accuracy).to(active.device)
                reached[idx] = ok
            done = reached | done
            buf1[done] = 0
            buf2[done] = 0
    for s_ in keep:
        kept.setdefault(s_, theta.detach().cpu().clone())
    snaps = torch.stack([kept[s_] for s_ in keep]) if keep else None
    return {"theta": theta, "alive": alive, "done": done, "diverged_at": diverged_at,
            "epochs_trained": epochs_trained, "snapshots": snaps}
