"""What a study will cost, estimated from its config before anything is loaded or written: memory, disk and time.

A study that cannot fit in this machine's memory or on its disk is refused with the items that make it large;
one that fits but would run for long is announced (with the estimate) so nobody waits hours without a word.
The estimates are deliberately rough (factor of ~2): they count the big arrays and the matrix-multiply work.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import StudyConfig
from .errors import LossglassError

# full sizes of the named data sets: (train, test, features)
_SIZES = {"fashion-mnist": (60000, 10000, 784), "mnist": (60000, 10000, 784), "cifar10": (50000, 10000, 3072),
          "digits": (1437, 360, 64), "teacher": (2000, 1000, 50)}
_IMAGE = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "digits": (1, 8, 8)}
_CLASSES = 10


@dataclass
class Estimate:
    """Peak memory (bytes), disk (bytes) and time (seconds) of a study, with the items behind each number."""

    memory: float = 0.0
    disk: float = 0.0
    seconds: float = 0.0
    items: list[tuple[str, str, float]] = field(default_factory=list)  # (kind, what, amount)

    def add(self, kind: str, what: str, amount: float) -> None:
        self.items.append((kind, what, float(amount)))
        if kind == "memory":
            self.memory = max(self.memory, amount)
        elif kind == "disk":
            self.disk += amount
        else:
            self.seconds += amount

    def largest(self, kind: str, n: int = 3) -> list[tuple[str, float]]:
        rows = sorted(((w, a) for k, w, a in self.items if k == kind), key=lambda r: -r[1])
        return rows[:n]


def _gb(x: float) -> str:
    return f"{x / 2**30:.1f} GB" if x >= 2**30 else f"{x / 2**20:.0f} MB"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


_RATE: float | None = None


def matmul_rate() -> float:
    """Effective float32 FLOP/s of this machine for the work lossglass does: half the rate of a 768^3 GEMM (the
    batched passes reach 50-75% of it), measured once per process in about 0.1 s, best of three."""
    global _RATE
    if _RATE is None:
        import torch

        a = torch.randn(768, 768)
        a @ a
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ a
            a @ a
            best = min(best, time.perf_counter() - t0)
        _RATE = max(2 * 2 * 768**3 / best / 2, 1e9)
    return _RATE


def _n_params(cfg: StudyConfig, features: int) -> tuple[int, int]:
    """(P, parameters of the first layer) of the configured network (0, 0 for a user's own model)."""
    m = cfg.model
    if m.factory:
        return 0, 0
    if m.arch == "cnn":
        c, h, w = _IMAGE.get(cfg.data.name, (1, int(math.isqrt(features)), int(math.isqrt(features))))
        p, first = 0, 0
        for ch in m.channels:
            n = ch * (c * 9 + 1) + (2 * ch if m.batchnorm else 0)
            first = first or n
            p += n
            c, h, w = ch, h // 2, w // 2
        return p + c * h * w * _CLASSES + _CLASSES, first
    widths = [m.hidden] if isinstance(m.hidden, int) else list(m.hidden)
    dims = [features, *widths, _CLASSES]
    sizes = [a * b + b for a, b in zip(dims[:-1], dims[1:])]
    return sum(sizes), sizes[0]


@dataclass
class Sizes:
    """What the per-stage estimates share: data sizes, parameter counts, replicas and the machine's rate."""

    n_train: int
    n_test: int
    features: int
    n_params: int  # 0 for a user's own model (unknown before it is built)
    first_layer: int
    replicas: int
    rate: float
    classes: int = _CLASSES


def sizes(cfg: StudyConfig) -> tuple[Sizes, Estimate]:
    """The sizes of ``cfg``'s study and an estimate holding its data's memory."""
    est = Estimate()
    d = cfg.data
    full_tr, full_te, feat = _SIZES.get(d.name, (0, 0, 0))
    if d.factory:
        n_tr = n_te = feat = 0
    elif d.name == "teacher":
        n_tr, n_te = d.n_train or full_tr, d.n_test or full_te
        est.add("memory", f"teacher data ({n_tr + n_te:,} samples x {feat})", (n_tr + n_te) * feat * 4 * 3)
    else:
        n_tr, n_te = min(d.n_train or full_tr, full_tr), min(d.n_test or full_te, full_te)
        est.add("memory", f"{d.name} data", (full_tr + full_te) * feat * 5 + (n_tr + n_te) * feat * 4)
    p, first = _n_params(cfg, feat)
    t = cfg.train
    k = sum((g.replicas or t.replicas) for g in t.groups) if t.groups else t.replicas
    return Sizes(n_tr, n_te, feat, p, first, k, matmul_rate()), est


def estimate(cfg: StudyConfig) -> Estimate:
    """Rough memory, disk and time of every stage of ``cfg`` (user factories: only what the config says): the data,
    then each stage's own share (:meth:`lossglass.stages.base.Stage.estimate`)."""
    from .stages import REGISTRY

    size, est = sizes(cfg)
    for stage in REGISTRY:
        if stage.wanted(cfg):
            stage.estimate(cfg, size, est)
    return est


def check_fits(cfg: StudyConfig, out: str | os.PathLike, *, warn=None) -> Estimate:
    """Refuse a study that cannot fit in memory or on disk (naming what is large); announce a long one via ``warn``."""
    import psutil

    est = estimate(cfg)
    avail = psutil.virtual_memory().available
    if est.memory > 0.9 * avail:
        big = "; ".join(f"{w}: {_gb(a)}" for w, a in est.largest("memory"))
        raise LossglassError(f"this study needs about {_gb(est.memory)} of memory, more than the {_gb(avail)} available "
                             f"({big}); reduce these settings")
    probe = Path(out).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if est.disk > 0.9 * free:
        big = "; ".join(f"{w}: {_gb(a)}" for w, a in est.largest("disk"))
        raise LossglassError(f"this study writes about {_gb(est.disk)}, more than the {_gb(free)} free on {probe} ({big})")
    if warn is not None and est.seconds > 1800:
        big = ", ".join(f"{w} ~{_duration(a)}" for w, a in est.largest("time"))
        warn(f"large study: about {_duration(est.seconds)} of computing on this machine ({big}); every stage saves its "
             "progress, Ctrl-C and the same command resume it")
    return est
