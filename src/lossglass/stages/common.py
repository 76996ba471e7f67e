"""What several stages share: the data set and the problem a config describes, the replicas a run folder holds, and
the fingerprints of a run's inputs."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import StudyConfig
from ..datasets import Dataset, load
from ..errors import LossglassError, check
from ..models import mlp
from ..problem import Problem
from ..store import RunStore
from ..train import Replicas


def build_dataset(cfg: StudyConfig) -> Dataset:
    """The data set of ``cfg`` (a named one, a user's factory, or modular arithmetic), with its validation split."""
    d = cfg.data
    if d.factory:
        from ..byo import dataset_from_factory

        ds = dataset_from_factory(d.factory)
    elif d.name == "modular":  # generated; its split is train_fraction of all equations
        ds = load("modular", p=d.p, op=d.op, train_fraction=d.train_fraction, seed=cfg.seed)
    else:
        ds = load(d.name, n_train=d.n_train, n_test=d.n_test, seed=cfg.seed, data_dir=d.data_dir)
    return ds.with_validation(d.n_val, cfg.seed)


def build_problem(cfg: StudyConfig, dataset: Dataset | None = None, hidden=None) -> Problem:
    """The :class:`Problem` of ``cfg``: its model (an MLP, CNN, ResNet, transformer or a user's factory) on its data
    set. ``hidden``: a single-hidden-layer MLP of that width instead (the width experiment)."""
    ds = dataset or build_dataset(cfg)
    if cfg.model.factory and hidden is None:
        from ..byo import model_from_factory

        model = model_from_factory(cfg.model.factory)
    elif cfg.model.arch == "cnn" and hidden is None:
        from ..models import cnn

        check(len(ds.shape) == 3, f"model.arch = 'cnn' needs image data; {ds.name} has input shape {ds.shape}")
        model = cnn(tuple(ds.shape), cfg.model.channels, ds.n_classes, batchnorm=cfg.model.batchnorm)
    elif cfg.model.arch == "resnet" and hidden is None:
        from ..models import resnet

        check(len(ds.shape) == 3, f"model.arch = 'resnet' needs image data; {ds.name} has input shape {ds.shape}")
        model = resnet(cfg.model.depth, cfg.model.width, tuple(ds.shape), ds.n_classes)
    elif cfg.model.arch == "transformer" and hidden is None:
        from ..models import transformer

        check("vocab" in ds.info, f"model.arch = 'transformer' needs token data (data.name = 'modular', or a data "
              f"set whose info names its 'vocab'); {ds.name} has none")
        m = cfg.model
        model = transformer(int(ds.info["vocab"]), ds.in_dim, ds.n_classes, d_model=m.d_model, n_heads=m.n_heads,
                            n_layers=m.n_layers, d_mlp=m.d_mlp, activation=m.activation)
    else:
        model = mlp(ds.in_dim, hidden or cfg.model.hidden, ds.n_classes, cfg.model.activation)
    try:
        problem = Problem(model, ds, loss=cfg.model.loss, device=cfg.device, batchnorm=cfg.model.bn_stats,
                          memory_mb=cfg.model.memory_mb)
    except LossglassError:
        raise
    except Exception as e:  # noqa: BLE001 - a user model that fails on the data: say so in one line
        raise LossglassError(f"the model does not run on {ds.name} inputs of shape {tuple(ds.x_train.shape[1:])}: "
                             f"{type(e).__name__}: {e}") from None
    if cfg.model.spec and hidden is None:
        from ..byo import resolve
        from ..symmetry import PermutationSpec

        spec = resolve(cfg.model.spec, "model.spec")()
        check(isinstance(spec, PermutationSpec), f"model.spec = {cfg.model.spec!r} must return a lossglass.PermutationSpec")
        problem.spec = spec.validate(problem)
    return problem


def load_replicas(store: RunStore) -> Replicas:
    """The trained (or imported) replicas of a run folder: theta and their table."""
    return Replicas(store.read_tensors("replicas")["theta"], store.read_table("replicas"))


def alive_replicas(replicas: Replicas, problem: Problem) -> tuple[Replicas, Problem]:
    """The replicas that did not diverge, and the problem to measure them with: with ``batchnorm="fixed"``, a copy
    whose BatchNorm statistics are frozen at the first of them (every protocol's reference point)."""
    check(bool(replicas.alive.any()), "every replica diverged: nothing to measure (lower train.lr)")
    rep = replicas[torch.nonzero(replicas.alive).flatten()]
    if problem.batchnorm == "fixed":
        problem = problem.with_frozen_batchnorm(rep.theta[0])
    return rep, problem


def versions() -> dict:
    """Versions of lossglass and of what its numbers depend on (recorded in meta.json)."""
    import scipy

    from .._version import __version__

    return {"lossglass": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def data_fingerprint(ds: Dataset) -> str:
    """BLAKE2 of the data the replicas see (both splits, values, labels, shapes, class count)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes() if t.numel() < 2**16 else memoryview(t.numpy()).cast("B"))
    h.update(str(ds.n_classes).encode())
    return h.hexdigest()


def code_fingerprint(cfg: StudyConfig) -> dict[str, str]:
    """BLAKE2 of the source file of each user factory the config names (model.factory, data.factory, model.spec)."""
    out = {}
    for key, spec in (("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory),
                      ("model.spec", cfg.model.spec)):
        if not spec:
            continue
        mod = importlib.import_module(spec.split(":")[0])
        try:
            src = Path(inspect.getsourcefile(mod) or "").read_bytes()
        except (OSError, TypeError):
            src = repr(getattr(mod, spec.split(":")[1], None)).encode()
        out[key] = hashlib.blake2b(src, digest_size=16).hexdigest()
    return out


def spec_missing(problem: Problem) -> str | None:
    """Why the permutation protocols cannot run on this model (None when they can)."""
    from ..symmetry import spec_of

    try:
        spec_of(problem)
    except LossglassError as e:
        return ("the model's permutation symmetry is unknown: set model.spec = 'package.module:function' in the "
                f"config (a function returning a lossglass.PermutationSpec). Why: {e}")
    return None
