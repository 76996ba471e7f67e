"""The command line: ``lossglass run``, one sub-command per protocol on an existing run, ``report``, ``info``,
``presets``, ``config``, ``export``, ``select``, ``import``. Bad input, a damaged run folder or a failing disk
prints one line naming the problem and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import LossglassError, check

PROTOCOLS = ("walk", "connect", "replicas", "curvature", "reference")
EXPORT_FORMATS = ("csv",)


def _run_store(run: str | Path):
    from .store import RunStore

    return RunStore(run, create=False).require_run()


def _load_run_config(run: Path, *, trust: bool = False):
    """The config of an existing run folder. If it names code to import (model.factory, data.factory, model.spec)
    and this user's lossglass did not write it here, refuse unless ``trust``."""
    from .config import load_config

    store = _run_store(run)
    cfg = load_config(run / "config.toml")
    code = {k: v for k, v in (("model.factory", cfg.model.factory), ("data.factory", cfg.data.factory),
                              ("model.spec", cfg.model.spec)) if v}
    if code and not store.is_trusted():
        names = ", ".join(f"{k} = {v!r}" for k, v in code.items())
        check(trust, f"{run}/config.toml names code that this command would import and run ({names}), and it was not "
              "written by your lossglass in this folder; read it, then add --trust-config if you trust it")
    return cfg


def _stages_arg(text: str | None) -> tuple[str, ...]:
    from .study import STAGES

    if not text:
        return STAGES
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in stages:
        check(s in STAGES, f"--stages: unknown stage {s!r}; stages: {', '.join(STAGES)}")
    return stages


def cmd_run(a) -> int:
    from .config import load_config
    from .executor import make_executor
    from .study import Study

    check((a.config is None) != (a.preset is None), "give a CONFIG.toml or --preset NAME (exactly one)")
    if a.device:
        a.set = [*a.set, f"device={a.device!r}"]
    cfg = load_config(a.config, preset=a.preset, overrides=a.set) if a.config else load_config(preset=a.preset,
                                                                                               overrides=a.set)
    out = Path(a.out) if a.out else Path("runs") / cfg.name
    stages = _stages_arg(a.stages)
    store = Study(cfg, out, progress=not a.quiet, executor=make_executor(a.executor, a.address)).run(stages, force=a.force)
    print(f"run folder: {store.path}")
    if (store.path / "report.html").exists():
        print(f"report: {store.path / 'report.html'}")
    return 0


def cmd_stage(a) -> int:
    """One protocol on an existing run. ``--set`` may change only this protocol's own options (the record then
    describes the new results); options of earlier stages would need new replicas, so they are refused."""
    from .config import apply_overrides, parse_toml, validate
    from .study import Study

    run = Path(a.run)
    cfg = _load_run_config(run, trust=a.trust_config)
    for item in a.set:
        key = item.split("=", 1)[0].strip()
        check(key.split(".")[0] == a.command,
              f"--set {key}: 'lossglass {a.command}' changes only {a.command}.* options; {key} belongs to an earlier "
              f"part of the study and would need new replicas: run 'lossglass run CONFIG --out NEW_FOLDER' with it")
    if a.set:
        raw = parse_toml((run / "config.toml").read_text(), f"{run}/config.toml")
        cfg = validate(apply_overrides(raw, a.set), "--set " + " --set ".join(a.set))
    study = Study(cfg, run, progress=not a.quiet)
    check(study.store.stage_done("train"), f"{run}: no trained replicas yet (run 'lossglass run' or 'train' first)")
    getattr(cfg, a.command).enabled = True
    if study.store.stage_done(a.command) and not a.redo and not a.set:
        print(f"{a.command}: already done in {run} (use --redo to recompute)")
        return 0
    if a.redo:
        study.invalidate(a.command)
    from .study import STAGES, dependents

    # the stages that depend on this one are redone too (their results were made from the old ones)
    later = tuple(s for s in STAGES if s in dependents(a.command) and s not in (a.command, "report"))
    stages = (a.command, *later) + (() if a.no_report else ("report",))
    if not a.no_report and not a.quiet:
        print("(report.html is rebuilt afterwards, a few seconds; --no-report skips it)", file=sys.stderr)
    study.run(stages, allow=(a.command,))
    print(f"{a.command}: results in {run / 'tables'}")
    return 0


def cmd_report(a) -> int:
    from .report import build_report

    path = build_report(_run_store(a.run))
    print(path)
    return 0


def cmd_dashboard(a) -> int:
    """One interactive page of every run named (run folders, or a folder of runs): a self-contained HTML file, or
    with --serve a live page from a local server that follows running studies."""
    from .dashboard import serve, write_dashboard

    if a.serve:
        check(a.out is None, "--out writes a file; --serve serves the page instead: give one of them")
        serve(a.runs, a.port, open_browser=not a.no_open)
        return 0
    out = write_dashboard(a.runs, a.out)
    print(out)
    if not a.no_open:
        import webbrowser

        webbrowser.open(out.resolve().as_uri())
    return 0


def cmd_info(a) -> int:
    store = _run_store(a.run)
    meta = store.read_json("meta.json", {}) or {}
    print(f"run folder: {store.path}")
    print(f"name: {meta.get('name')}  seed: {meta.get('seed')}  device: {meta.get('device')}")
    print(f"started: {meta.get('started')}  finished: {meta.get('finished') or 'not yet'}")
    for k, v in store.stages().items():  # in run order
        what = f"skipped ({v['skipped']})" if v.get("skipped") else f"done in {v.get('seconds', 0):.1f} s"
        print(f"  stage {k:<10} {what}")
    if store.has_tensors("replicas"):
        th = store.read_tensors("replicas")["theta"]
        print(f"replicas: {th.shape[0]} x {th.shape[1]} parameters")
    if store.has_table("replicas"):
        t = store.read_table("replicas")
        print(f"test accuracy: median {t['test_accuracy'].median():.4f}, best {t['test_accuracy'].max():.4f}, "
              f"diverged {int(t['diverged'].sum())}")
    print("tables: " + (", ".join(store.tables()) or "none"))
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


def cmd_config(a) -> int:
    from .config import reference

    if a.tables:
        from .columns import reference as tables

        sys.stdout.write(tables())
        return 0
    sys.stdout.write(reference(markdown=a.markdown))
    return 0


def cmd_export(a) -> int:
    from .store import atomic_write_bytes

    store = _run_store(a.run)
    check(a.format in EXPORT_FORMATS, f"unknown export format {a.format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    names = store.tables()
    check(len(names) > 0, f"{store.path} holds no tables to export")
    for n in names:
        data = store.read_table(n).to_csv(index=False).encode()
        if a.out:  # a folder the user chose: atomic writes there, links in the final component replaced, not followed
            atomic_write_bytes(Path(a.out) / f"{n}.csv", data)
        else:
            store.write_bytes(f"csv/{n}.csv", data)
    print(f"{len(names)} tables written to {a.out or store.path / 'csv'}")
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
    from .study import build_problem

    run = Path(a.run)
    cfg = _load_run_config(run, trust=a.trust_config)
    store = _run_store(run)
    decision = select(store, build_problem(cfg), strategy=a.strategy)
    print(explain(decision))
    if decision.get("exported"):
        print(f"exported: {run / decision['exported']}")
    build_report(store)
    return 0


def cmd_import(a) -> int:
    import hashlib

    import pandas as pd

    from .byo import import_checkpoints
    from .config import load_config
    from .store import RunStore
    from .study import Study, _versions

    cfg = load_config(a.config, overrides=a.set) if a.config else load_config(preset="quickstart", overrides=a.set)
    out = Path(a.out)
    if a.model:
        cfg.model.factory = a.model
    if a.spec:
        cfg.model.spec = a.spec
    if a.data:
        if ":" in a.data:
            cfg.data.factory = a.data
        else:
            cfg.data.name = a.data
    # everything is checked before the folder is touched: data, model, every checkpoint
    study = Study(cfg, out, progress=not a.quiet)
    prob = study.problem
    theta, files = import_checkpoints(prob, a.folder)
    folder = Path(a.folder)
    hashes = [hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files]
    cfg.name = _import_name(cfg, out)
    cfg.train.replicas = len(files)
    cfg.train.groups = []
    study.cfg = cfg
    if a.force and (out / "config.toml").exists():
        n = RunStore(out).remove_owned()
        print(f"--force: removed {n} files lossglass wrote in {out} (nothing else)", file=sys.stderr)
    study.prepare()
    sources_fp = hashlib.blake2b("".join(hashes).encode(), digest_size=16).hexdigest()
    study.set_imported(sources_fp)
    tr, te = prob.evaluate(theta, "train"), prob.evaluate(theta, "test")
    table = pd.DataFrame({"replica": range(len(files)), "source": files, "sha256": hashes, "seed": pd.NA,
                          "train_loss": tr["loss"].cpu().numpy(), "train_accuracy": tr["accuracy"].cpu().numpy(),
                          "test_loss": te["loss"].cpu().numpy(), "test_accuracy": te["accuracy"].cpu().numpy(),
                          "diverged": False, "group": 0})
    if "val" in prob.data:
        va = prob.evaluate(theta, "val")
        table["val_loss"], table["val_accuracy"] = va["loss"].cpu().numpy(), va["accuracy"].cpu().numpy()
    table["gap_loss"] = table["test_loss"] - table["train_loss"]
    table["gap_error"] = table["train_accuracy"] - table["test_accuracy"]
    store = study.store
    store.stage = "train"
    store.write_tensors("replicas", {"theta": theta.cpu()}, {"n_params": prob.n_params})
    store.write_table("replicas", table)
    store.mark_done("train", {"imported": len(files), "from": str(folder.resolve()), "sources_fingerprint": sources_fp,
                              "fingerprint": study.fingerprint("train")})
    store.stage = None
    meta = store.read_json("meta.json", {})
    meta.update({"imported_from": str(folder.resolve()), "sources": dict(zip(files, hashes)), "versions": _versions()})
    store.write_json("meta.json", meta)
    print(f"imported {len(files)} checkpoints into {out}; next: lossglass run {out}/config.toml --out {out} "
          "(or one protocol: lossglass walk|connect|replicas|curvature " + str(out) + ")")
    return 0


def _import_name(cfg, out: Path) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9._-]", "-", out.resolve().name).lstrip(".-")[:100]
    return name or "import"


def parser() -> argparse.ArgumentParser:
    from .study import STAGES

    p = argparse.ArgumentParser(prog="lossglass", description="Loss landscapes measured with spin-glass physics.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set walk.steps=5000 (repeatable; see 'lossglass config')")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or status lines")

    r = sub.add_parser("run", help="run a study (all stages) into a run folder")
    r.add_argument("config", nargs="?", help="a study config (TOML)")
    r.add_argument("--preset", help="a shipped preset instead of a file (see 'lossglass presets')")
    r.add_argument("--out", help="run folder (default runs/<name>)")
    r.add_argument("--stages", help=f"comma-separated subset of: {', '.join(STAGES)}")
    r.add_argument("--force", action="store_true",
                   help="start over in a folder that holds a different config (deletes only files lossglass wrote)")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local (default) or ray: tasks on a Ray cluster (pip install 'lossglass[ray]')")
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
                           ("reference", "the SK and spherical p-spin glasses and a convex control")):
        s = sub.add_parser(name, help=f"{helptext}, on an existing run folder")
        s.add_argument("run", help="run folder")
        s.add_argument("--redo", action="store_true", help="recompute even if the stage is done")
        s.add_argument("--no-report", action="store_true", help="do not rebuild report.html afterwards")
        s.add_argument("--trust-config", action="store_true",
                       help="allow importing code named by a run folder's config that you did not write")
        common(s)
        s.set_defaults(fn=cmd_stage)

    sel = sub.add_parser("select", help="which replica to ship: strategies graded on the untouched test split")
    sel.add_argument("run")
    sel.add_argument("--strategy", default=None, help="the strategy whose choice is exported (default: the config's)")
    sel.add_argument("--trust-config", action="store_true",
                     help="allow importing code named by a run folder's config that you did not write")
    sel.set_defaults(fn=cmd_select)
    im = sub.add_parser("import", help="import a folder of checkpoints (state_dict or safetensors) as replicas")
    im.add_argument("folder", help="folder of *.pt / *.pth / *.safetensors state_dicts")
    im.add_argument("--out", required=True, help="the run folder to create")
    im.add_argument("--model", help="package.module:factory returning the nn.Module (default: the config's MLP)")
    im.add_argument("--spec", help="package.module:function returning the model's PermutationSpec")
    im.add_argument("--data", help="a data set name or package.module:factory")
    im.add_argument("--config", help="a study config for the later protocols (default: the quickstart preset)")
    im.add_argument("--force", action="store_true", help="replace an earlier import there (deletes only lossglass's files)")
    common(im)
    im.set_defaults(fn=cmd_import)

    rep = sub.add_parser("report", help="rebuild report.html from a run folder's saved data")
    rep.add_argument("run")
    rep.set_defaults(fn=cmd_report)
    db = sub.add_parser("dashboard", help="one interactive page of many runs (an offline HTML file, or --serve live)")
    db.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or a folder of runs")
    db.add_argument("--out", help="the HTML file to write (default RUNS_DIR/dashboard.html or ./dashboard.html)")
    db.add_argument("--no-open", action="store_true", help="do not open a browser; print the file's path (or the URL)")
    db.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 and follow running studies live")
    db.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; 0: any free port)")
    db.set_defaults(fn=cmd_dashboard)
    i = sub.add_parser("info", help="what a run folder holds")
    i.add_argument("run")
    i.set_defaults(fn=cmd_info)
    pr = sub.add_parser("presets", help="list presets, or print one with --show NAME")
    pr.add_argument("--show", metavar="NAME")
    pr.set_defaults(fn=cmd_presets)
    cf = sub.add_parser("config", help="every config key: meaning, unit, default, allowed values")
    cf.add_argument("--markdown", action="store_true", help="as docs/config.md")
    cf.add_argument("--tables", action="store_true", help="every table's columns instead (docs/tables.md)")
    cf.set_defaults(fn=cmd_config)
    e = sub.add_parser("export", help="export every table of a run folder")
    e.add_argument("run")
    e.add_argument("--format", default="csv", help=f"one of: {', '.join(EXPORT_FORMATS)}")
    e.add_argument("--out", help="folder for the files (default RUN/csv)")
    e.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except LossglassError as e:
        print(f"lossglass: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file where a folder should be, a permission: one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lossglass: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lossglass: interrupted; finished work is saved, run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
