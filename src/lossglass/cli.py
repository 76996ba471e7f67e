"""The command line: ``lossglass run``, one sub-command per protocol on an existing run, ``report``, ``info``,
``presets``, ``export``. Bad input prints one line naming the problem and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import LossglassError, check


def _load_run_config(run: Path, overrides: list[str]):
    from .config import load_config

    check(run.is_dir(), f"run folder {run} does not exist")
    check((run / "config.toml").is_file(), f"{run} has no config.toml: not a lossglass run folder")
    return load_config(run / "config.toml", overrides=overrides)


def cmd_run(a) -> int:
    from .config import load_config
    from .study import STAGES, Study

    check((a.config is None) != (a.preset is None), "give a CONFIG.toml or --preset NAME (exactly one)")
    if a.device:
        a.set = [*a.set, f"device={a.device!r}"]
    cfg = load_config(a.config, preset=a.preset, overrides=a.set) if a.config else load_config(preset=a.preset,
                                                                                               overrides=a.set)
    out = Path(a.out) if a.out else Path("runs") / cfg.name
    stages = STAGES if not a.stages else tuple(s.strip() for s in a.stages.split(","))
    for s in stages:
        check(s in STAGES, f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    from .executor import make_executor

    store = Study(cfg, out, progress=not a.quiet, executor=make_executor(a.executor, a.address)).run(stages, force=a.force)
    print(f"run folder: {store.path}")
    if (store.path / "report.html").exists():
        print(f"report: {store.path / 'report.html'}")
    return 0


def cmd_stage(a) -> int:
    from .study import Study

    run = Path(a.run)
    cfg = _load_run_config(run, a.set)
    from .config import to_toml

    study = Study(cfg, run, progress=not a.quiet)
    check(study.store.stage_done("train"), f"{run}: no trained replicas yet (run 'lossglass run' or 'train' first)")
    marker = run / "stages" / f"{a.command}.json"
    if a.set:  # new options for this protocol: record them, recompute this stage only
        study.store.write_text("config.toml", to_toml(cfg))
        a.redo = True
    if marker.exists() and not a.redo:
        print(f"{a.command}: already done in {run} (use --redo to recompute)")
        return 0
    if marker.exists():
        marker.unlink()
    study.discard_partial(a.command)  # results of an interrupted earlier attempt used other options
    getattr(cfg, a.command).enabled = True
    study.run((a.command, "report"))
    print(f"{a.command}: results in {run / 'tables'}")
    return 0


def cmd_report(a) -> int:
    from .report import build_report

    run = Path(a.run)
    check(run.is_dir(), f"run folder {run} does not exist")
    path = build_report(run)
    print(path)
    return 0


def cmd_info(a) -> int:
    from .store import RunStore

    store = RunStore(a.run, create=False)
    meta = store.read_json("meta.json", {}) or {}
    print(f"run folder: {store.path}")
    print(f"name: {meta.get('name')}  seed: {meta.get('seed')}  device: {meta.get('device')}")
    print(f"started: {meta.get('started')}  finished: {meta.get('finished')}")
    for k, v in store.stages().items():
        print(f"  stage {k:<10} done in {v.get('seconds', 0):.1f} s")
    if store.has_tensors("replicas"):
        th = store.read_tensors("replicas")["theta"]
        print(f"replicas: {th.shape[0]} x {th.shape[1]} parameters")
    if store.has_table("replicas"):
        t = store.read_table("replicas")
        print(f"test accuracy: median {t['test_accuracy'].median():.4f}, best {t['test_accuracy'].max():.4f}, "
              f"diverged {int(t['diverged'].sum())}")
    print("tables: " + ", ".join(store.tables()))
    return 0


def cmd_presets(a) -> int:
    from .config import preset_text, presets

    if a.show:
        sys.stdout.write(preset_text(a.show))
        return 0
    for p in presets():
        first = preset_text(p).splitlines()[0].lstrip("# ").strip()
        print(f"{p:<12} {first}")
    return 0


def cmd_export(a) -> int:
    from .store import RunStore

    store = RunStore(a.run, create=False)
    check(a.format == "csv", f"unknown export format {a.format!r}; use csv")
    out = Path(a.out) if a.out else store.path / "csv"
    out.mkdir(parents=True, exist_ok=True)
    names = store.tables()
    check(len(names) > 0, f"{store.path} holds no tables to export")
    for n in names:
        store.read_table(n).to_csv(out / f"{n}.csv", index=False)
    print(f"{len(names)} tables written to {out}")
    return 0


def cmd_train(a) -> int:
    from .config import load_config
    from .study import Study

    cfg = load_config(a.config, preset=a.preset, overrides=a.set) if a.config else load_config(preset=a.preset or "quickstart",
                                                                                               overrides=a.set)
    out = Path(a.out) if a.out else Path("runs") / cfg.name
    Study(cfg, out, progress=not a.quiet).run(("train",), force=a.force)
    print(f"replicas in {out / 'replicas.safetensors'}, table in {out / 'tables' / 'replicas.parquet'}")
    return 0


def cmd_select(a) -> int:
    from .report import build_report
    from .selection import explain, select
    from .store import RunStore
    from .study import build_problem

    run = Path(a.run)
    cfg = _load_run_config(run, [])
    store = RunStore(run, create=False)
    decision = select(store, build_problem(cfg))
    print(explain(decision))
    print(f"exported: {run / decision['exported']}")
    build_report(store)
    return 0


def cmd_import(a) -> int:
    import pandas as pd

    from .byo import import_checkpoints
    from .config import load_config
    from .study import Study

    cfg = load_config(a.config, overrides=a.set) if a.config else load_config(preset="quickstart", overrides=a.set)
    if a.model:
        cfg.model.factory = a.model
    if a.data:
        if ":" in a.data:
            cfg.data.factory = a.data
        else:
            cfg.data.name = a.data
    study = Study(cfg, Path(a.out), progress=not a.quiet)
    study.prepare(force=a.force)
    prob = study.problem
    theta, files = import_checkpoints(prob, a.folder)
    tr, te = prob.evaluate(theta, "train"), prob.evaluate(theta, "test")
    table = pd.DataFrame({"replica": range(len(files)), "source": files, "seed": cfg.seed,
                          "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                          "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                          "diverged": False, "group": 0})
    table["gap_loss"] = table["test_loss"] - table["train_loss"]
    table["gap_error"] = table["train_accuracy"] - table["test_accuracy"]
    study.store.write_tensors("replicas", {"theta": theta.cpu()}, {"n_params": prob.n_params})
    study.store.write_table("replicas", table)
    study.store.mark_done("train", {"imported": len(files), "from": str(a.folder)})
    print(f"imported {len(files)} checkpoints into {a.out}; next: lossglass run {a.out}/config.toml --out {a.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lossglass", description="Loss landscapes measured with spin-glass physics.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set walk.steps=5000 (repeatable)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="run a study (all stages) into a run folder")
    r.add_argument("config", nargs="?", help="a study config (TOML)")
    r.add_argument("--preset", help="a shipped preset instead of a file (see 'lossglass presets')")
    r.add_argument("--out", help="run folder (default runs/<name>)")
    r.add_argument("--stages", help="comma-separated subset of stages")
    r.add_argument("--force", action="store_true", help="start over in a folder that holds a different config")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default) or ray: training tasks on a Ray cluster (pip install 'lossglass[ray]')")
    r.add_argument("--address", help="Ray cluster address (HOST:PORT or auto); default: start a local instance")
    r.add_argument("--device", help="cpu, cuda or auto (overrides the config's device)")
    common(r)
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("train", help="train the replicas of a config or preset only")
    t.add_argument("config", nargs="?")
    t.add_argument("--preset")
    t.add_argument("--out")
    t.add_argument("--force", action="store_true")
    common(t)
    t.set_defaults(fn=cmd_train)

    for name, helptext in (("walk", "protocol 1: random walks / Metropolis / Langevin"),
                           ("connect", "protocol 2: permutations, barriers, paths, planes"),
                           ("replicas", "protocol 3: overlaps, P(q), tree, ultrametricity"),
                           ("curvature", "protocol 4: Hessian, flatness, Kendall tau"),
                           ("reference", "the spherical p-spin glass and a convex control")):
        s = sub.add_parser(name, help=f"{helptext}, on an existing run folder")
        s.add_argument("run", help="run folder")
        s.add_argument("--redo", action="store_true", help="recompute even if the stage is done")
        common(s)
        s.set_defaults(fn=cmd_stage)

    sel = sub.add_parser("select", help="which replica to ship: ranked by the flatness measure that predicts the gap")
    sel.add_argument("run")
    sel.set_defaults(fn=cmd_select)
    im = sub.add_parser("import", help="import a folder of checkpoints (state_dict or safetensors) as replicas")
    im.add_argument("folder", help="folder of *.pt / *.pth / *.safetensors state_dicts")
    im.add_argument("--out", required=True, help="the run folder to create")
    im.add_argument("--model", help="package.module:factory returning the nn.Module (default: the config's MLP)")
    im.add_argument("--data", help="a data set name or package.module:factory")
    im.add_argument("--config", help="a study config for the later protocols (default: the quickstart preset)")
    im.add_argument("--force", action="store_true")
    common(im)
    im.set_defaults(fn=cmd_import)

    rep = sub.add_parser("report", help="rebuild report.html from a run folder's saved data")
    rep.add_argument("run")
    rep.set_defaults(fn=cmd_report)
    i = sub.add_parser("info", help="what a run folder holds")
    i.add_argument("run")
    i.set_defaults(fn=cmd_info)
    pr = sub.add_parser("presets", help="list presets, or print one with --show NAME")
    pr.add_argument("--show", metavar="NAME")
    pr.set_defaults(fn=cmd_presets)
    e = sub.add_parser("export", help="export every table of a run folder")
    e.add_argument("run")
    e.add_argument("--format", default="csv")
    e.add_argument("--out")
    e.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except LossglassError as e:
        print(f"lossglass: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lossglass: interrupted; finished stages are saved, run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
