"""A study: a validated config -> the protocols in order -> a run folder (:class:`RunStore`).

Stages: train, walk, connect, replicas, curvature, reference, report. A stage writes its tables, then its
completion record; a run started again with the same config skips finished stages and resumes training
from its last epoch checkpoint.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .config import StudyConfig, load_config, to_toml
from .datasets import Dataset, load
from .errors import LossglassError, check
from .models import mlp
from .problem import Problem
from .store import RunStore
from .train import Replicas, train

STAGES = ("train", "walk", "connect", "replicas", "curvature", "reference", "report")


def log(msg: str) -> None:
    print(f"[lossglass] {msg}", file=sys.stderr, flush=True)


def build_dataset(cfg: StudyConfig) -> Dataset:
    d = cfg.data
    if d.factory:
        from .byo import dataset_from_factory

        return dataset_from_factory(d.factory)
    return load(d.name, n_train=d.n_train, n_test=d.n_test, seed=cfg.seed, data_dir=d.data_dir)


def build_problem(cfg: StudyConfig, dataset: Dataset | None = None, hidden=None) -> Problem:
    ds = dataset or build_dataset(cfg)
    if cfg.model.factory and hidden is None:
        from .byo import model_from_factory

        model = model_from_factory(cfg.model.factory)
    elif cfg.model.arch == "cnn" and hidden is None:
        from .models import cnn

        check(len(ds.shape) == 3, f"a CNN needs image data; {ds.name} has input shape {ds.shape}")
        model = cnn(tuple(ds.shape), cfg.model.channels, ds.n_classes, batchnorm=cfg.model.batchnorm)
    else:
        model = mlp(ds.in_dim, hidden or cfg.model.hidden, ds.n_classes, cfg.model.activation)
    problem = Problem(model, ds, loss=cfg.model.loss, device=cfg.device, batchnorm=cfg.model.bn_stats)
    if cfg.model.spec and hidden is None:
        from .byo import resolve
        from .symmetry import PermutationSpec

        spec = resolve(cfg.model.spec, "permutation spec factory")()
        check(isinstance(spec, PermutationSpec), f"{cfg.model.spec} must return a lossglass.PermutationSpec")
        problem.spec = spec.validate(problem)
    return problem


def subset_problem(problem: Problem, n: int | None) -> Problem:
    """The same model on the first ``n`` training samples (curvature on a subset keeps cost bounded)."""
    if n is None or n >= len(problem.dataset.y_train):
        return problem
    ds = problem.dataset
    sub = Dataset(ds.name, ds.x_train[:n], ds.y_train[:n], ds.x_test, ds.y_test, ds.n_classes, ds.shape, ds.info)
    return Problem(problem.model, sub, loss=problem.loss_name, device=str(problem.device), dtype=problem.dtype)


def load_replicas(store: RunStore) -> Replicas:
    return Replicas(store.read_tensors("replicas")["theta"], store.read_table("replicas"))


def alive_replicas(store: RunStore, problem: Problem) -> Replicas:
    """The replicas that did not diverge; with ``batchnorm="fixed"``, the problem's BatchNorm statistics are
    frozen at the first of them (every protocol's reference point)."""
    rep = load_replicas(store)
    check(bool(rep.alive.any()), "every replica diverged: nothing to measure (lower train.lr)")
    rep = rep[torch.nonzero(rep.alive).flatten()]
    if problem._bn and problem.batchnorm == "fixed":
        problem.freeze_batchnorm(rep.theta[0])
    return rep


def _versions() -> dict:
    import scipy

    return {"lossglass": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


class Study:
    """Runs the stages of a config into a run folder; each ``stage_*`` method can also run alone on an
    existing folder (the CLI's per-protocol sub-commands)."""

    def __init__(self, cfg: StudyConfig, out: str | Path, *, progress: bool = True, executor=None):
        from .executor import LocalExecutor

        self.cfg, self.progress = cfg, progress
        self.store = RunStore(out)
        self.executor = executor or LocalExecutor()
        self._problem: Problem | None = None

    @property
    def problem(self) -> Problem:
        if self._problem is None:
            self._problem = build_problem(self.cfg)
        return self._problem

    def prepare(self, force: bool = False) -> None:
        text = to_toml(self.cfg)
        old = self.store.path / "config.toml"
        if old.exists() and old.read_text() != text and not force:
            raise LossglassError(f"{self.store.path} holds a run with a different config; use a new --out folder, "
                                 "or --force to start over there")
        if old.exists() and old.read_text() != text and force:
            for p in (self.store.path / "stages").glob("*.json"):
                p.unlink()
            self.discard_partial()
        self.store.write_text("config.toml", text)
        meta = self.store.read_json("meta.json", {}) or {}
        meta.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta.update({"versions": _versions(), "seed": self.cfg.seed, "device": self.cfg.device,
                     "name": self.cfg.name, "batchnorm_statistics": self.cfg.model.bn_stats})
        self.store.write_json("meta.json", meta)

    def discard_partial(self, stage: str | None = None) -> None:
        """Remove unfinished task results and checkpoints (of one stage, or all): they belong to another config."""
        for folder, pattern in (("tasks", f"{stage}-*" if stage else "*"), ("checkpoints", f"{stage}-*" if stage else "*")):
            for p in (self.store.path / folder).glob(pattern):
                p.unlink()

    def run(self, stages=STAGES, force: bool = False) -> RunStore:
        self.prepare(force)
        t_all = time.time()
        for name in stages:
            section = getattr(self.cfg, name, None)
            if section is not None and hasattr(section, "enabled") and not section.enabled:
                continue
            if name != "report" and self.store.stage_done(name):
                log(f"{name}: done already, skipped")
                continue
            log(f"{name}: running")
            t0 = time.time()
            info = getattr(self, f"stage_{name}")() or {}
            self.store.mark_done(name, {"seconds": time.time() - t0, **info})
            log(f"{name}: finished in {time.time() - t0:.1f} s")
        meta = self.store.read_json("meta.json", {})
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["stage_seconds"] = {k: v.get("seconds") for k, v in self.store.stages().items()}
        meta["last_run_seconds"] = time.time() - t_all
        self.store.write_json("meta.json", meta)
        return self.store

    # ------------------------------------------------------------------ stages
    def train_tasks(self) -> list[tuple]:
        """Independent training tasks: each group of replicas in chunks of ``train.chunk`` replica ids."""
        c = self.cfg.train
        cfg_json = self.cfg.model_dump_json()
        tasks, offset = [], 0
        for gi, grp in enumerate(c.groups or [None]):
            g = grp.model_dump(exclude_none=True) if grp is not None else {}
            k = g.get("replicas", c.replicas)
            for a in range(offset, offset + k, c.chunk):
                tasks.append((cfg_json, str(self.store.path), gi, a, min(a + c.chunk, offset + k)))
            offset += k
        return tasks

    def stage_train(self) -> dict:
        tasks = self.train_tasks()
        if len(tasks) > 1:
            log(f"train: {len(tasks)} tasks on the {self.executor.name} executor")
        paths = self.executor.map(train_task, tasks)
        thetas, tables = [], []
        for p in paths:
            t = self.store.read_tensors(p)
            thetas.append(t["theta"])
            tables.append(self.store.read_table(p))
        theta = torch.cat(thetas)
        table = pd.concat(tables, ignore_index=True)
        self.store.write_tensors("replicas", {"theta": theta}, {"n_params": self.problem.n_params})
        self.store.write_table("replicas", table)
        for p in paths:
            self.store.tensor_path(p).unlink(missing_ok=True)
            self.store.table_path(p).unlink(missing_ok=True)
        log(f"train: {len(table)} replicas, median test accuracy {table['test_accuracy'].median():.4f}, "
            f"{int(table['diverged'].sum())} diverged")
        return {"replicas": len(table), "tasks": len(tasks), "executor": self.executor.name}

    def _alive(self) -> Replicas:
        return alive_replicas(self.store, self.problem)

    def stage_walk(self) -> dict:
        from .protocols import walk as W

        c = self.cfg.walk
        self._alive()
        n_runs = len(c.temperatures) + (1 if c.langevin_steps > 0 else 0)
        tasks = [(self.cfg.model_dump_json(), str(self.store.path), i) for i in range(n_runs)]
        names = self.executor.map(walk_task, tasks)
        results = [_load_walk(self.store, n) for n in names]
        for n in names:
            self.store.tensor_path(n).unlink(missing_ok=True)
            (self.store.path / f"{n}.json").unlink(missing_ok=True)
        traces, summaries, msds, agings, evd, radii = [], [], [], [], [], []
        for i, r in enumerate(results):
            label = f"{r.kind} T={r.params.get('temperature')}"
            tab = r.table()
            tab["run"] = i
            tab["label"] = label
            traces.append(tab)
            s = W.summarize(r, c.deltas)
            s.update(run=i, label=label)
            summaries.append(s)
            t_, m_, _ = W.msd(r)
            msds.append(pd.DataFrame({"run": i, "label": label, "t": t_, "msd": m_}))
            ag = W.aging(r)
            ag["run"], ag["label"] = i, label
            agings.append(ag)
            ed = W.energy_vs_distance(r)
            ed["run"], ed["label"] = i, label
            evd.append(ed)
            br = W.basin_radius(r, c.deltas)
            br["run"], br["label"] = i, label
            radii.append(br)
        for name, parts in (("walk", traces), ("walk_msd", msds), ("walk_aging", agings),
                            ("walk_energy_distance", evd), ("walk_radius", radii)):
            self.store.write_table(name, pd.concat(parts, ignore_index=True))
        self.store.write_table("walk_summary", pd.DataFrame(summaries))
        return {"runs": len(results)}

    def connect_tasks(self) -> list[tuple]:
        """Independent pieces of the connect stage: permutation-interpolation, each pair, the Bezier curve, each
        plane, each width of the width experiment."""
        c, k = self.cfg.connect, len(self._alive())
        parts = [("perm", 0)]
        if k >= 2:
            parts += [("pair", i) for i in range(min(c.pairs, k // 2))]
            parts += [("bezier", 0)] if c.bezier_steps > 0 else []
            parts += [("plane_through", 0)] if c.plane_steps >= 2 else []
        parts += [("plane_random", 0)] if c.plane_steps >= 2 else []
        parts += [("width", w) for w in c.widths]
        cfg_json = self.cfg.model_dump_json()
        return [(cfg_json, str(self.store.path), part, arg) for part, arg in parts]

    def stage_connect(self) -> dict:
        tasks = self.connect_tasks()
        names = self.executor.map(connect_task, tasks)
        got: dict[str, list[pd.DataFrame]] = {}
        for (_, _, part, _), name in zip(tasks, names):
            for suffix in ("", "-paths"):
                if self.store.has_table(name + suffix):
                    got.setdefault(part + suffix, []).append(self.store.read_table(name + suffix))
        out = {"perm": "perm_barriers", "pair": "pair_barriers", "plane_random": "plane_random",
               "plane_through": "plane_through", "width": "width_barriers"}
        for part, table in out.items():
            if part in got:
                self.store.write_table(table, pd.concat(got[part], ignore_index=True))
        paths = got.get("pair-paths", []) + got.get("bezier", [])
        if paths:
            self.store.write_table("paths", pd.concat(paths, ignore_index=True))
        pts = [n for (_, _, part, _), n in zip(tasks, names) if part == "plane_through"]
        if pts:
            self.store.write_json("plane_through_points.json", self.store.read_json(f"{pts[0]}.json"))
        for n in names:
            for suffix in ("", "-paths"):
                self.store.table_path(n + suffix).unlink(missing_ok=True)
            (self.store.path / f"{n}.json").unlink(missing_ok=True)
        if "width" in got:
            for w, g in pd.concat(got["width"]).groupby("width"):
                log(f"width {w}: aligned barrier {g['barrier_aligned'].mean():.4f}, naive {g['barrier_naive'].mean():.4f}")
        return {"tasks": len(tasks), "executor": self.executor.name}

    def stage_replicas(self) -> dict:
        from .protocols import replicas as R

        c = self.cfg.replicas
        rep = self._alive()
        check(len(rep) >= 3, f"the replicas stage needs at least 3 replicas, got {len(rep)}")
        summary, pq_rows = [], []
        for label, al in (("aligned", True), ("raw", False)):
            q = R.overlaps(self.problem, rep, align=al, kind=c.kind).numpy()
            self._replica_analysis(f"network-{label}", q, summary, pq_rows)
        if c.kind != "functions":
            q = R.overlaps(self.problem, rep, kind="functions").numpy()
            self._replica_analysis("network-functions", q, summary, pq_rows)
        self.store.write_table("replica_layers",
                               R.layer_overlaps(self.problem, R.aligned_replicas(self.problem, rep.theta)))
        self._write_replica_tables(summary, pq_rows)
        return {}

    def _replica_analysis(self, label: str, q: np.ndarray, summary: list, pq_rows: list) -> None:
        from .protocols import replicas as R

        c = self.cfg.replicas
        d = R.distances_from_overlaps(q)
        h = R.hierarchy(d, method=c.method, max_triangles=c.max_triangles, seed=self.cfg.seed)
        u = h.ultrametricity
        pq = R.overlap_distribution(q)
        k = q.shape[0]
        ii, jj = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        self.store.write_table(f"overlaps_{label}", pd.DataFrame({"a": ii.ravel(), "b": jj.ravel(), "q": q.ravel()}))
        self.store.write_table(f"linkage_{label}", pd.DataFrame(h.linkage, columns=["left", "right", "height", "size"]))
        self.store.write_json(f"order_{label}.json", h.order)
        tri = pd.DataFrame(u.sides[:5000], columns=["d_min", "d_mid", "d_max"])
        self.store.write_table(f"triangles_{label}", tri)
        pq_rows.append(pd.DataFrame({"label": label, "q": pq.q}))
        summary.append({"system": label, "replicas": k, **pq.moments, "cophenetic": h.cophenetic, **u.summary})

    def _write_replica_tables(self, summary, pq_rows) -> None:
        name = "replica_summary"
        old = self.store.read_table(name) if self.store.has_table(name) else pd.DataFrame()
        new = pd.DataFrame(summary)
        if len(old):
            old = old[~old["system"].isin(new["system"])]
        self.store.write_table(name, pd.concat([old, new], ignore_index=True))
        oldq = self.store.read_table("pq") if self.store.has_table("pq") else pd.DataFrame()
        newq = pd.concat(pq_rows, ignore_index=True)
        if len(oldq):
            oldq = oldq[~oldq["label"].isin(newq["label"])]
        self.store.write_table("pq", pd.concat([oldq, newq], ignore_index=True))

    def stage_curvature(self) -> dict:
        from .protocols import curvature as K

        c = self.cfg.curvature
        rep = self._alive()
        prob = subset_problem(self.problem, c.n_hvp_data)
        df = K.flatness_table(prob, rep, rho=c.rho, top_k=c.top_k, tol=c.tol, trace_probes=c.trace_probes,
                              n_samples=c.n_samples, entropy_radius=c.entropy_radius,
                              entropy_epsilon=c.entropy_epsilon, seed=self.cfg.seed)
        self.store.write_table("flatness", df)
        taus = pd.concat([K.rank_correlations(df, target=t, seed=self.cfg.seed) for t in ("gap_error", "gap_loss",
                                                                                            "test_error")])
        self.store.write_table("kendall", taus)
        # the cheap proxies against the full measures they stand for, on the same replicas
        pv = [K.rank_correlations(df, measures=[m], target=t, seed=self.cfg.seed)
              for m, t in (("proxy_lambda_batch", "lambda_max"), ("proxy_perturbation", "sharpness_average"))]
        self.store.write_table("proxy_validation", pd.concat(pv, ignore_index=True))
        if c.density:
            rows = []
            for label, idx in (("flattest", int(df["lambda_max"].idxmin())), ("sharpest", int(df["lambda_max"].idxmax()))):
                sd = K.spectral_density(prob, rep.theta[idx], steps=c.slq_steps, seed=self.cfg.seed)
                rows.append(pd.DataFrame({"label": label, "replica": idx, "eigenvalue": sd.grid, "density": sd.density}))
            self.store.write_table("spectral_density", pd.concat(rows, ignore_index=True))
        if len(df) >= 3:
            from .selection import select

            select(self.store, self.problem)
        return {}

    def stage_reference(self) -> dict:
        """The spherical p-spin glass and a convex control through the same replica pipeline."""
        from .models import quadratic, spherical_pspin
        from .protocols import walk as W
        from .train import descend

        c = self.cfg.reference
        ps = spherical_pspin(c.n_spins, c.p, seed=self.cfg.seed)
        s0 = ps.init(c.replicas, self.cfg.seed)
        # the gradient of the energy per spin is O(1/N) per component: the step is lr * N * grad(H/N)
        s = descend(ps, s0, steps=c.steps, lr=c.lr * c.n_spins, progress=self.progress)
        e = ps.energy(s)
        q = ((s @ s.T) / c.n_spins).double().numpy()
        summary, pq_rows = [], []
        self._replica_analysis(f"{c.p}-spin", q, summary, pq_rows)
        summary[-1]["energy_mean"] = float(e.mean())
        summary[-1]["energy_min"] = float(e.min())
        # convex control: one basin, replicas = thermal samples of a quadratic well (replica symmetric)
        n = c.n_spins
        g = torch.Generator().manual_seed(self.cfg.seed)
        evals = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
        qmat, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        quad = quadratic(qmat @ torch.diag(evals) @ qmat.T)
        centre = torch.ones(n, dtype=torch.float64)
        samp = W.langevin(quad, torch.zeros(n, dtype=torch.float64), temperature=0.05, lr=0.05, steps=400,
                          n_walkers=c.replicas, seed=self.cfg.seed, progress=False)
        x = samp.theta.double() + centre
        qc = _cosine_np(x.numpy())
        self._replica_analysis("convex-control", qc, summary, pq_rows)
        summary[-1]["energy_mean"] = float(quad.energy(samp.theta).mean())
        self._write_replica_tables(summary, pq_rows)
        self.store.write_table("reference_energies", pd.DataFrame({"replica": np.arange(len(e)), "energy": e.numpy()}))
        return {"pspin_energy_mean": float(e.mean())}

    def stage_report(self) -> dict:
        from .report import build_report

        build_report(self.store)
        return {}


_WALK_ARRAYS = ("energy", "accuracy", "distance", "accepted", "test_loss", "test_accuracy", "snapshots", "alive",
                "start_index", "theta")


def walk_task(cfg_json: str, out: str, index: int) -> str:
    """Run the ``index``-th walk of the study (one per temperature, then Langevin) and save it (a task)."""
    from .config import StudyConfig
    from .protocols import walk as W

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out)
    name = f"tasks/walk-{index}"
    if store.has_tensors(name) and (store.path / f"{name}.json").exists():
        return name
    c = cfg.walk
    problem = build_problem(cfg)
    starts = alive_replicas(store, problem).theta[: c.starts]
    if index < len(c.temperatures):
        t = c.temperatures[index]
        r = W.random_walk(problem, starts, n_walkers=c.n_walkers, steps=c.steps, step_size=c.step_size,
                          temperature=None if t == "none" else float(t), normalize=c.normalize,
                          record_every=c.record_every, seed=cfg.seed, progress=False)
    else:
        r = W.langevin(problem, starts, temperature=c.langevin_temperature, lr=c.langevin_lr, steps=c.langevin_steps,
                       n_walkers=c.n_walkers, record_every=c.record_every, seed=cfg.seed, progress=False)
    store.write_tensors(name, {k: getattr(r, k).contiguous() for k in _WALK_ARRAYS})
    store.write_json(f"{name}.json", {"kind": r.kind, "params": r.params, "test_steps": r.test_steps,
                                      "snapshot_steps": r.snapshot_steps})
    return name


def _load_walk(store: RunStore, name: str):
    from .protocols.walk import WalkResult

    t = store.read_tensors(name)
    meta = store.read_json(f"{name}.json")
    return WalkResult(meta["kind"], t["energy"], t["accuracy"], t["distance"], t["accepted"], meta["test_steps"],
                      t["test_loss"], t["test_accuracy"], meta["snapshot_steps"], t["snapshots"], t["alive"],
                      t["start_index"], t["theta"], meta["params"])


def connect_task(cfg_json: str, out: str, part: str, arg: int) -> str:
    """One independent piece of the connect stage (a task); writes its table(s) and returns their name."""
    from .config import StudyConfig
    from .protocols import connect as C
    from .symmetry import align

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out)
    name = f"tasks/connect-{part}-{arg}"
    if store.has_table(name):
        return name
    c = cfg.connect
    prob = build_problem(cfg)
    theta = alive_replicas(store, prob).theta
    if part == "perm":
        df = C.permutation_barriers(prob, theta[0], swaps=[k for k in c.swaps if k != 1], n_points=c.n_points,
                                    seed=cfg.seed)
    elif part == "pair":
        pair, naive, aligned = C.pair_barriers(prob, theta[2 * arg:2 * arg + 2], pairs=1, n_points=c.n_points,
                                               method=c.align, seed=cfg.seed)
        pair[["a", "b"]] = [2 * arg, 2 * arg + 1]
        paths = []
        for kind, pr in (("naive", naive[0]), ("aligned", aligned[0])):
            t = pr.table()
            t["pair"], t["kind"] = arg, kind
            paths.append(t)
        store.write_table(name + "-paths", pd.concat(paths, ignore_index=True))
        df = pair
    elif part == "bezier":
        df = C.bezier_path(prob, theta[0], theta[1], steps=c.bezier_steps, n_points=c.n_points, seed=cfg.seed,
                           progress=False).table()
        df["pair"], df["kind"] = 0, "bezier"
    elif part == "plane_through":
        b_al, _ = align(prob, theta[0], theta[1], method=c.align)
        pt = C.plane_through(prob, theta[0], theta[1], b_al, steps=c.plane_steps)
        store.write_json(f"{name}.json", pt.points)
        df = pt.table()
    elif part == "plane_random":
        df = C.plane(prob, theta[0], span=c.plane_span, steps=c.plane_steps, seed=cfg.seed).table()
    else:  # width: train replicas of a single-hidden-layer net of width arg, barriers between pairs
        t = cfg.train
        wprob = build_problem(cfg, prob.dataset, hidden=arg)
        wr = train(wprob, c.width_replicas, epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer,
                   momentum=t.momentum, seed=cfg.seed + 1000 + arg, progress=False)
        ok = wr[torch.nonzero(wr.alive).flatten()]
        rows = []
        if len(ok) >= 2:
            pairs, _, _ = C.pair_barriers(wprob, ok.theta, pairs=len(ok) // 2, n_points=c.n_points, method=c.align)
            rows = [{"width": arg, "n_params": wprob.n_params, **r.to_dict(),
                     "test_accuracy": float(ok.table["test_accuracy"].mean())} for _, r in pairs.iterrows()]
        df = pd.DataFrame(rows, columns=None if rows else ["width"])
    store.write_table(name, df)
    return name


def train_task(cfg_json: str, out: str, group: int, first: int, last: int) -> str:
    """Train replicas ``first..last-1`` of training group ``group`` and write them to the run folder (a task:
    runs in this process or on a Ray worker). Returns the result's name; an existing result is reused."""
    from .config import StudyConfig
    from .executor import maybe_fail_once

    cfg = StudyConfig.model_validate_json(cfg_json)
    store = RunStore(out)
    name = f"tasks/train-{group}-{first}-{last}"
    if store.has_tensors(name) and store.has_table(name):
        return name
    c = cfg.train
    grp = c.groups[group].model_dump(exclude_none=True) if c.groups else {}
    problem = build_problem(cfg)
    ckdir = store.path / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    ckpt = ckdir / f"train-{group}-{first}-{last}.safetensors"
    maybe_fail_once(f"train-{group}-{first}")
    rep = train(problem, last - first, epochs=grp.get("epochs", c.epochs), batch_size=grp.get("batch_size", c.batch_size),
                lr=grp.get("lr", c.lr), optimizer=grp.get("optimizer", c.optimizer), method=grp.get("method", c.method),
                momentum=c.momentum, weight_decay=c.weight_decay, seed=cfg.seed, replica_ids=range(first, last),
                rho=c.rho, temperature=c.temperature, lr_schedule=c.lr_schedule, checkpoint=ckpt,
                progress=False)
    rep.table["group"] = group
    rep.table["device"] = str(problem.device)
    store.write_tensors(name, {"theta": rep.theta.cpu()})
    store.write_table(name, rep.table)
    ckpt.unlink(missing_ok=True)
    return name


def _cosine_np(x: np.ndarray) -> np.ndarray:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.clip(u @ u.T, -1, 1)


def run_study(config, out=None, *, stages=STAGES, force: bool = False, progress: bool = True,
              overrides: list[str] | None = None, executor: str = "local", address: str | None = None) -> RunStore:
    """Run a study: ``config`` is a :class:`StudyConfig`, a TOML path or a preset name; ``out`` the run folder
    (default ``runs/<name>``). Returns the :class:`RunStore`."""
    if isinstance(config, StudyConfig):
        cfg = config
    elif isinstance(config, (str, Path)) and Path(config).suffix == ".toml":
        cfg = load_config(config, overrides=overrides)
    else:
        cfg = load_config(preset=str(config), overrides=overrides)
    from .executor import make_executor

    out = Path(out) if out is not None else Path("runs") / cfg.name
    return Study(cfg, out, progress=progress, executor=make_executor(executor, address)).run(stages, force=force)
