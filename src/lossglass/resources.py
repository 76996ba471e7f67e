"""What a study will cost, estimated from its config before anything is loaded or written: memory, disk and time.

A study that cannot fit in this machine's memory or on its disk is refused with the items that make it large;
one that fits but would run for long is announced (with the estimate) so nobody waits hours without a word.
The estimates are deliberately rough (factor of ~2): they count the big arrays, and each stage's time is a count of
work units (a training step of one replica on one sample and one parameter, a walk step, a plane point, ...) times
that unit's cost. The unit costs (:data:`UNIT_COSTS`) were measured by ``benchmarks/bench_paper.py`` on the reference
machine (:data:`REFERENCE_MACHINE`) and are scaled to this machine by the ratio of matrix-multiply rates
(:func:`matmul_rate`) and by the measured overhead of a whole stage over its units (:data:`STAGE_OVERHEAD`):
t = count x cost_ref x rate_ref / rate_here x overhead. The same table gives the README's and
BENCHMARKS.md's figures, so the CLI (``lossglass run --dry-run``) and the documents state one number.
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
    #: seconds per stage (the stage whose estimate added them)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage: str = ""  # the stage adding items now
    rate: float = 0.0  # this machine's effective matmul rate (FLOP/s)

    def add(self, kind: str, what: str, amount: float) -> None:
        self.items.append((kind, what, float(amount)))
        if kind == "time" and self.stage:
            self.stage_seconds[self.stage] = self.stage_seconds.get(self.stage, 0.0) + float(amount)
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


@dataclass(frozen=True)
class Unit:
    """One unit of work and its measured cost on the reference machine: ``seconds`` per ``per``."""

    seconds: float
    per: str
    measured: str  # how bench_paper.py measures it


#: the machine the unit costs were measured on, and its effective matmul rate there (:func:`matmul_rate`, FLOP/s)
REFERENCE_MACHINE = "the 2-core x86-64 build machine, quiet"
REFERENCE_RATE = 44.0e9

#: seconds per unit of work on the reference machine (``benchmarks/bench_paper.py`` measures and prints them; its
#: ``--write`` option prints this table from a fresh measurement). The entries were measured on that machine under
#: load (load average 8-10, matmul rate 6.1 GFLOP/s) and are restated at its quiet rate (x 6.1 / 44). Each is
#: normalised by the work it stands for, so that a config of another size scales it: e.g. ``train`` is the time of
#: one SGD step divided by replicas x parameters x batch samples.
UNIT_COSTS: dict[str, Unit] = {
    "train": Unit(8.64e-11, "replica x parameter x sample of an SGD step (forward, backward, update)",
                  "64 replicas of 784-128-10, batch 128, a fraction of an epoch"),
    # bench_paper.py fits it (a + c W); the only fit so far (load average 17) gave 0.73 s, every 8-replica step
    # costing 0.66-1.06 s whatever its width: contention, not a property of the machine, so it is not used (0)
    "train_step": Unit(0.0, "SGD step of one task (train.chunk replicas), whatever its size: the fixed part",
                       "intercept of a + c W through the steps above and those of 8 replicas of 784-w-10"),
    "forward": Unit(1.04e-11, "replica x parameter x sample of an evaluation (forward pass)",
                    "64 replicas on 10,000 images"),
    "metropolis": Unit(1.17e-11, "walker x parameter x sample of a Metropolis step (energy on walk.n_data)",
                       "32 walkers, energy on 10,000 images"),
    "langevin": Unit(4.17e-11, "walker x parameter x sample of a Langevin step (gradient on walk.n_data)",
                     "32 walkers, gradient on 10,000 images"),
    "plane_point": Unit(7.58e-13, "parameter x sample (train + test) of one plane point",
                        "41^2 - 11^2 points of a plane on all of Fashion-MNIST"),
    "path_point": Unit(1.65e-12, "parameter x sample (train + test) of one point of a straight path",
                       "25 points between two replicas on all of Fashion-MNIST"),
    "align": Unit(9.8e-08, "parameter of one weight-matching alignment of two replicas",
                  "two 784-128-10 replicas"),
    "bezier_step": Unit(6.64e-07, "parameter of one Bezier-curve SGD step (4 t values on one batch of 256)",
                        "784-128-10, 20 steps"),
    "curvature": Unit(7.65e-12, "replica x parameter x sample of one Hessian-vector-product equivalent pass",
                      "one replica's flatness measures at the paper preset's settings on 10,000 images"),
    "gemm": Unit(1 / REFERENCE_RATE, "FLOP of a large matrix product (overlaps, p-spin descent)",
                 "resources.matmul_rate"),
    # not measured by bench_paper.py: 80 ns measured at N = 64 on the quiet machine (44 GFLOP/s)
    "sk_sweep": Unit(8.0e-8, "chain x site x sweep of SK parallel tempering",
                     "N = 64 spins, an earlier measurement on the quiet machine"),
}


#: a whole stage took this many times the sum of its units' costs, the same factor on every stage and config
#: measured (``bench_paper.py --measure``, one run each: 3.36 on the quickstart preset and 3.19 on a mid-size config
#: at load 13-17, 3.12 on the quickstart at load 5; this is their geometric mean). The units time the inner passes
#: alone; a stage also moves data, evaluates tables, checkpoints and runs its Python between passes. Per stage the
#: measured ratio over this factor was 0.6-1.75 (curvature lowest, training highest): the estimate's stated factor of 2.
STAGE_OVERHEAD = 3.22


def unit_cost(name: str, rate: float | None = None) -> float:
    """Seconds per unit ``name`` on this machine: UNIT_COSTS[name].seconds x REFERENCE_RATE / rate (``rate``
    defaults to :func:`matmul_rate`)."""
    if name not in UNIT_COSTS:
        raise LossglassError(f"unknown work unit {name!r}; known: {', '.join(UNIT_COSTS)}")
    return UNIT_COSTS[name].seconds * REFERENCE_RATE / (rate or matmul_rate())


def curvature_passes(cv) -> int:
    """Hessian-vector-product equivalent passes of one replica's curvature measures with settings ``cv`` (a
    ``CurvatureConfig``): ~30 Lanczos iterations per top eigenvalue, the trace probes, the sharpness and proxy
    evaluations (~40), and the local entropy's subset simulation (up to ~62 evaluations of every chain, a forward
    pass each, counted as a quarter of an HVP); the stage adds the spectral densities (2 x slq_steps HVPs)."""
    hvps = 30 * cv.top_k + cv.trace_probes + 40
    entropy = 62 * cv.entropy_chains / 4
    return int(hvps + entropy)


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

    def cost(self, unit: str, count: float) -> float:
        """Seconds of ``count`` units of work ``unit`` in a stage on this machine: count x :func:`unit_cost` x
        :data:`STAGE_OVERHEAD`."""
        return count * unit_cost(unit, self.rate) * STAGE_OVERHEAD


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
    n_tr = max(n_tr - (d.n_val or 0), 0)  # the validation samples are carved out of the training set
    p, first = _n_params(cfg, feat)
    t = cfg.train
    k = sum((g.replicas or t.replicas) for g in t.groups) if t.groups else t.replicas
    return Sizes(n_tr, n_te, feat, p, first, k, matmul_rate()), est


def estimate(cfg: StudyConfig) -> Estimate:
    """Rough memory, disk and time of every stage of ``cfg`` (user factories: only what the config says): the data,
    then each stage's own share (:meth:`lossglass.stages.base.Stage.estimate`)."""
    from .stages import REGISTRY

    size, est = sizes(cfg)
    est.rate = size.rate
    for stage in REGISTRY:
        if stage.wanted(cfg):
            est.stage = stage.name
            stage.estimate(cfg, size, est)
    est.stage = ""
    return est


def machine_line(rate: float | None = None) -> str:
    """One line naming this machine's measured rate and the reference machine the unit costs come from."""
    rate = rate or matmul_rate()
    return (f"this machine: {rate / 1e9:.0f} GFLOP/s effective float32 matmul ({os.cpu_count()} CPUs); unit costs "
            f"measured on {REFERENCE_MACHINE} at {REFERENCE_RATE / 1e9:.1f} GFLOP/s, scaled by "
            f"{REFERENCE_RATE / rate:.2f} and by {STAGE_OVERHEAD} for a whole stage over its units")


def describe(est: Estimate) -> str:
    """The estimate as lines: the machine, each stage's time, the total, peak memory and disk."""
    lines = [machine_line(est.rate or None)]
    for name, s in est.stage_seconds.items():
        lines.append(f"  {name:<11} {_duration(s):>8}")
    lines.append(f"  {'total':<11} {_duration(est.seconds):>8}")
    lines.append(f"peak memory about {_gb(est.memory)}, disk about {_gb(est.disk)}")
    return "\n".join(lines)


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
