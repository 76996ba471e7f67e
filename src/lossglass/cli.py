"""The command line: ``lossglass run``, one sub-command per protocol on an existing run, ``report``, ``info``,
``presets``, ``config``, ``export``, ``select``, ``import``. Bad input, a damaged run folder or a failing disk
prints one line naming the problem and exits with status 2.

Commands that write into a run folder (``run``, ``train``, the per-protocol commands, ``import``, ``report``,
``select``, ``export`` without ``--out``) hold its writer lock (:meth:`lossglass.store.RunStore.writer`); reading
commands (``info``, ``dashboard``) never take it. Text from a run folder never reaches the terminal raw: control
characters (terminal escapes) in anything a command prints are shown escaped (:func:`printable`)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import LossglassError, check

EXPORT_FORMATS = ("csv",)
TRUST_HELP = "allow importing code named by a config from a run folder that your lossglass did not write"
#: control characters (C0 but tab and newline, DEL, C1) and the bidirectional overrides that reorder what is shown
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every control character (terminal escape sequences start with one) written as ``\\xNN`` or
    ``\\uNNNN``; tab and newline are kept unless ``one_line``."""
    return (_CONTROL_ALL if one_line else _CONTROL).sub(_escape, text)


class _PrintableStream:
    """A text stream that escapes control characters before they reach the wrapped one (stdout of a command)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _run_store(run: str | Path):
    from .store import RunStore

    return RunStore(run, create=False).require_run()


def _load_run_config(store, *, trust: bool = False, overrides: list[str] | None = None):
    """The config of an existing run folder, from ONE read of its config.toml: those bytes are checked (if they name
    code to import, model.factory, data.factory or model.spec, this user's lossglass must have written them here,
    or ``trust``), parsed once, validated, and the ``--set`` overrides applied to the same parse."""
    from .config import apply_overrides, check_trusted, decode_config, validate

    source = f"{store.path}/config.toml"
    data = store.read_bytes("config.toml")
    raw = decode_config(data, source)
    cfg = validate(raw, source)
    check_trusted(cfg, data, source, trust=trust, folder=store.path)
    if overrides:
        cfg = validate(apply_overrides(raw, overrides), "--set " + " --set ".join(overrides))
    return cfg


def _stages_arg(text: str | None) -> tuple[str, ...]:
    from .stages import STAGE_ORDER as STAGES

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
    cfg = (load_config(a.config, overrides=a.set, trust=a.trust_config) if a.config
           else load_config(preset=a.preset, overrides=a.set))
    out = Path(a.out) if a.out else Path("runs") / cfg.name
    stages = _stages_arg(a.stages)
    if a.dry_run:  # the estimate only: nothing is loaded or written
        from .resources import describe, estimate

        print(f"{cfg.name}: estimated on this machine, nothing run\n{describe(estimate(cfg))}")
        return 0
    executor = make_executor(a.executor, a.address, ray_dashboard=a.ray_dashboard, gpus_per_task=a.gpus_per_task)
    store = Study(cfg, out, progress=not a.quiet, executor=executor).run(stages, force=a.force)
    print(f"run folder: {store.path}")
    if (store.path / "report.html").exists():
        print(f"report: {store.path / 'report.html'}")
    return 0


def cmd_stage(a) -> int:
    """One protocol on an existing run. ``--set`` may change only this protocol's own options (the record then
    describes the new results); options of earlier stages would need new replicas, so they are refused."""
    run = Path(a.run)
    for item in a.set:
        key = item.split("=", 1)[0].strip()
        check(key.split(".")[0] == a.command,
              f"--set {key}: 'lossglass {a.command}' changes only {a.command}.* options; {key} belongs to an earlier "
              f"part of the study and would need new replicas: run 'lossglass run CONFIG --out NEW_FOLDER' with it")
    store = _run_store(run)
    with store.writer():  # before the config is read: what is checked is what runs
        cfg = _load_run_config(store, trust=a.trust_config, overrides=a.set)
        return _stage(a, run, cfg)


def _stage(a, run: Path, cfg) -> int:
    from .study import Study

    study = Study(cfg, run, progress=not a.quiet)
    check(study.store.stage_done("train"), f"{run}: no trained replicas yet (run 'lossglass run' or 'train' first)")
    from .stages import stage

    section = stage(a.command).section
    if section:
        getattr(cfg, section).enabled = True
    if study.store.stage_done(a.command) and not a.redo and not a.set:
        if _skipped(study.store, a.command):
            return 1
        print(f"{a.command}: already done in {run} (use --redo to recompute)")
        return 0
    if a.redo:
        study.invalidate(a.command)
    from .stages import STAGE_ORDER, dependents

    # the stages that depend on this one are redone too (their results were made from the old ones)
    later = tuple(s for s in STAGE_ORDER if s in dependents(a.command, cfg) and s not in (a.command, "report"))
    stages = (a.command, *later) + (() if a.no_report else ("report",))
    if not a.no_report and not a.quiet:
        print("(report.html is rebuilt afterwards, a few seconds; --no-report skips it)", file=sys.stderr)
    study.run(stages, allow=(a.command,))
    if _skipped(study.store, a.command):
        return 1
    print(f"{a.command}: results in {run / 'tables'}")
    return 0


def _skipped(store, name: str) -> bool:
    """Whether stage ``name`` was skipped for a reason that leaves it without results (a permutation protocol on a
    model whose symmetry is unknown, say): said in one line on stderr, so that its command exits non-zero."""
    from .stages import stage

    why = (store.stage_record(name) or {}).get("skipped")
    if not why or not stage(name).skip_is_missing:
        return False
    print(f"lossglass: {name}: skipped, no results: {why}", file=sys.stderr)
    return True


def cmd_report(a) -> int:
    from .report import build_report

    store = _run_store(a.run)
    with store.writer():
        path = build_report(store)
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


def _short(v, n: int = 200) -> str:
    """A value from a run folder as one short line (folder text may be anything)."""
    text = printable(str(v), one_line=True)
    return text if len(text) <= n else text[:n] + "..."


def _finite(v) -> float | None:
    """``v`` as a finite float when it is a JSON number that has one (:func:`lossglass._util.finite_number`)."""
    from ._util import finite_number

    return finite_number(v)


def _numbers(table, column: str, source) -> pd.Series:  # noqa: F821 - pandas is imported lazily
    """A numeric (or boolean) column of a table read from a run folder; one line naming the file otherwise."""
    import pandas as pd

    check(column in table.columns, f"{source} is damaged (no column {column!r})")
    col = table[column]
    check(pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col),
          f"{source} is damaged (column {column!r} is not numeric: {col.dtype})")
    return col.astype(float)


def cmd_info(a) -> int:
    """What a run folder holds. It reads only: records (bounded, checked for their JSON types), the replicas'
    shape from the safetensors header alone (never the tensors), and the replicas table's two numeric columns."""
    from .stages import STAGE_ORDER

    store = _run_store(a.run)
    meta = store.read_json("meta.json", {}, kind=dict)
    print(f"run folder: {_short(store.path, 4000)}")
    print(f"name: {_short(meta.get('name'))}  seed: {_short(meta.get('seed'))}  device: {_short(meta.get('device'))}")
    print(f"started: {_short(meta.get('started'))}  finished: {_short(meta.get('finished') or 'not yet')}")
    for k, v in store.stages(STAGE_ORDER).items():  # in run order
        seconds = v.get("seconds", 0)
        if v.get("skipped"):
            what = f"skipped ({_short(v['skipped'])})"
        elif _finite(seconds) is not None:
            what = f"done in {_finite(seconds):.1f} s"
        else:
            what = "done"
        print(f"  stage {_short(k, 60):<10} {what}")
    if store.has_tensors("replicas"):
        path = store.tensor_path("replicas")
        theta = store.tensor_header("replicas").get("theta")
        check(theta is not None and len(theta["shape"]) == 2, f"{path} is damaged (no 2-D tensor 'theta')")
        print(f"replicas: {theta['shape'][0]} x {theta['shape'][1]} parameters")
    if store.has_table("replicas"):
        t = store.read_table("replicas")
        source = store.table_path("replicas")
        acc, diverged = _numbers(t, "test_accuracy", source), _numbers(t, "diverged", source)
        print(f"test accuracy: median {acc.median():.4f}, best {acc.max():.4f}, diverged {int((diverged.fillna(0) != 0).sum())}")
    print("tables: " + (", ".join(_short(n, 100) for n in store.tables()) or "none"))
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
    import contextlib

    from .store import atomic_write_bytes

    store = _run_store(a.run)
    check(a.format in EXPORT_FORMATS, f"unknown export format {a.format!r}; formats: {', '.join(EXPORT_FORMATS)}")
    names = store.tables()
    check(len(names) > 0, f"{store.path} holds no tables to export")
    with store.writer() if not a.out else contextlib.nullcontext():  # into the run folder: one writer
        for n in names:
            data = store.read_table(n).to_csv(index=False).encode()
            if a.out:  # a folder the user chose: atomic writes there, links in the final component replaced
                atomic_write_bytes(Path(a.out) / f"{n}.csv", data)
            else:
                store.write_bytes(f"csv/{n}.csv", data)
    print(f"{len(names)} tables written to {a.out or store.path / 'csv'}")
    return 0


def cmd_train(a) -> int:
    from .config import load_config
    from .study import Study

    cfg = (load_config(a.config, overrides=a.set, trust=a.trust_config) if a.config
           else load_config(preset=a.preset or "quickstart", overrides=a.set))
    out = Path(a.out) if a.out else Path("runs") / cfg.name
    Study(cfg, out, progress=not a.quiet).run(("train",), force=a.force)
    print(f"replicas in {out / 'replicas.safetensors'}, table in {out / 'tables' / 'replicas.parquet'}")
    return 0


def cmd_select(a) -> int:
    from .report import build_report
    from .selection import explain, select
    from .study import build_problem

    run = Path(a.run)
    store = _run_store(run)
    with store.writer():
        cfg = _load_run_config(store, trust=a.trust_config)
        if a.trust_config and not store.is_trusted():
            store.mark_trusted()  # checked and vouched for by the user: later commands here need no flag
        decision = select(store, build_problem(cfg), strategy=a.strategy)
        print(explain(decision))
        if decision.get("exported"):
            print(f"exported: {run / decision['exported']}")
        build_report(store)
    return 0


def cmd_examples(a) -> int:
    """The misjudged test cases of a run: runs the examples stage when it has not run (or with ``--redo``), then
    prints the ``--top`` hardest cases and the cases the clusters disagree on most, or writes them as CSV."""
    import pandas as pd

    from .stages.examples import top_examples

    check(a.top >= 1, f"--top must be at least 1, got {a.top}")
    for item in a.set:
        key = item.split("=", 1)[0].strip()
        check(key.split(".")[0] == "examples", f"--set {key}: 'lossglass examples' changes only examples.* options")
    check(a.format in (None, *EXPORT_FORMATS), f"--format must be one of: {', '.join(EXPORT_FORMATS)}")
    run = Path(a.run)
    store = _run_store(run)
    if a.redo or not store.stage_done("examples") or not store.has_table("examples"):
        import contextlib

        with store.writer(), contextlib.redirect_stdout(sys.stderr):  # stdout carries the table (or the CSV) only
            cfg = _load_run_config(store, trust=a.trust_config, overrides=a.set)
            _stage(a, run, cfg)
    check(store.has_table("examples"), f"{run}: the examples stage wrote no table (see 'lossglass info {run}')")
    top = top_examples(store.read_table("examples"), a.top)
    if a.format == "csv":
        if a.out:
            Path(a.out).write_text(top.to_csv(index=False))
            print(f"wrote {a.out}")
        else:
            print(top.to_csv(index=False), end="")
        return 0
    cols = ["rank", "example", "label", "majority", "error_share", "vote_entropy", "loss_mean", "cluster_spread"]
    if "source_index" in top and (top["source_index"] >= 0).any():
        cols.insert(2, "source_index")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        for kind in ("hardest", "clusters disagree"):
            rows = top[top["kind"] == kind]
            print(f"{kind}: {len(rows)} test cases" + (" (by the share of replicas wrong, then mean loss)"
                                                        if kind == "hardest" else " (by the spread of the clusters' "
                                                        "error rates)"))
            if len(rows):
                print(rows[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    d = store.read_json("examples.json", {})
    if isinstance(d, dict) and d.get("disagreement"):
        print(d["disagreement"])
        if d.get("cost_words"):
            print(d["cost_words"])
    return 0


def cmd_import(a) -> int:
    import hashlib

    from .byo import check_as_they_are, import_checkpoints
    from .config import load_config
    from .study import Study

    cfg = (load_config(a.config, overrides=a.set, trust=a.trust_config) if a.config
           else load_config(preset="quickstart", overrides=a.set))
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
    if "bn_stats" not in cfg.model.model_fields_set and prob.batchnorm != "module" and _has_batchnorm(prob.model):
        # imported checkpoints are analysed as they are: with their own stored BatchNorm statistics (eval mode)
        cfg.model.bn_stats = "module"
        study = Study(cfg, out, progress=not a.quiet)
        prob = study.problem
    info = prob.dataset.info if isinstance(prob.dataset.info, dict) else {}
    if not cfg.data.factory and "mean" in info and not a.quiet:
        print(f"note: {cfg.data.name} inputs are scaled x -> (x/255 - {info['mean']:.4g}) / {info['std']:.4g}; "
              "checkpoints trained on other preprocessing need --data package.module:factory returning yours",
              file=sys.stderr)
    theta, files = import_checkpoints(prob, a.folder)
    own = check_as_they_are(prob, a.folder, theta, files, accept_mismatch=a.accept_mismatch,
                            warn=lambda m: print(m, file=sys.stderr))
    if not a.quiet:
        print(f"checked {len(files)} checkpoints as they are (batchnorm={prob.batchnorm!r}): their own eval-mode "
              f"training accuracy {min(own) * 100:.2f}-{max(own) * 100:.2f}%", file=sys.stderr)
    folder = Path(a.folder)
    hashes = [hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files]
    cfg.name = _import_name(cfg, out)
    cfg.train.replicas = len(files)
    cfg.train.groups = []
    study.cfg = cfg
    with study.store.writer():  # everything is checked: from here on, this process is the folder's one writer
        return _import_into(a, study, prob, theta, files, hashes, folder, out)


def _import_into(a, study, prob, theta, files, hashes, folder: Path, out: Path) -> int:
    import hashlib

    import pandas as pd

    from .store import RunStore
    from .study import versions

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
    meta.update({"imported_from": str(folder.resolve()), "sources": dict(zip(files, hashes)), "versions": versions()})
    store.write_json("meta.json", meta)
    print(f"imported {len(files)} checkpoints into {out}; next: lossglass run {out}/config.toml --out {out} "
          "(or one protocol: lossglass walk|connect|replicas|curvature " + str(out) + ")")
    return 0


def _has_batchnorm(model) -> bool:
    from .batchnorm import is_batchnorm

    return any(is_batchnorm(m) for m in model.modules())


def _import_name(cfg, out: Path) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9._-]", "-", out.resolve().name).lstrip(".-")[:100]
    return name or "import"


def parser() -> argparse.ArgumentParser:
    from .stages import REGISTRY
    from .stages import STAGE_ORDER as STAGES

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
    r.add_argument("--ray-dashboard", action="store_true",
                   help="start the local Ray instance with Ray's dashboard (off by default: a study does not need it)")
    r.add_argument("--gpus-per-task", type=float, default=1.0,
                   help="ray: GPUs each task asks for when the device is not cpu and the cluster has GPUs (1: one "
                        "task per GPU; 0.5: two per GPU)")
    r.add_argument("--device", help="cpu, cuda or auto (overrides the config's device)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the estimated time of each stage on this machine, peak memory and disk; run nothing")
    r.add_argument("--trust-config", action="store_true", help=TRUST_HELP)
    common(r)
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("train", help="train the replicas of a config or preset only")
    t.add_argument("config", nargs="?")
    t.add_argument("--preset")
    t.add_argument("--out")
    t.add_argument("--force", action="store_true")
    t.add_argument("--trust-config", action="store_true", help=TRUST_HELP)
    common(t)
    t.set_defaults(fn=cmd_train)

    def stage_options(p: argparse.ArgumentParser) -> None:
        """What every command that runs one stage on an existing run folder takes."""
        p.add_argument("run", help="run folder")
        p.add_argument("--redo", action="store_true", help="recompute even if the stage is done")
        p.add_argument("--no-report", action="store_true", help="do not rebuild report.html afterwards")
        p.add_argument("--trust-config", action="store_true", help=TRUST_HELP)
        common(p)

    for st in REGISTRY:  # one sub-command per stage that declares one
        if not st.command:
            continue
        name = st.name
        s = sub.add_parser(name, help=f"{st.command}, on an existing run folder")
        stage_options(s)
        s.set_defaults(fn=cmd_stage)

    ex = sub.add_parser("examples", help="where the replicas disagree: the misjudged test cases (runs the examples "
                        "stage on an existing run folder if needed)")
    stage_options(ex)
    ex.add_argument("--top", type=int, default=10, help="how many cases of each kind (default 10)")
    ex.add_argument("--format", default=None, help=f"print as one of: {', '.join(EXPORT_FORMATS)} (default: a table)")
    ex.add_argument("--out", help="with --format csv: the file to write (default: standard output)")
    ex.set_defaults(fn=cmd_examples)
    sel = sub.add_parser("select", help="which replica to ship: strategies graded on the untouched test split")
    sel.add_argument("run")
    sel.add_argument("--strategy", default=None, help="the strategy whose choice is exported (default: the config's)")
    sel.add_argument("--trust-config", action="store_true", help=TRUST_HELP)
    sel.set_defaults(fn=cmd_select)
    im = sub.add_parser("import", help="import a folder of checkpoints (state_dict or safetensors) as replicas")
    im.add_argument("folder", help="folder of *.pt / *.pth / *.safetensors state_dicts")
    im.add_argument("--out", required=True, help="the run folder to create")
    im.add_argument("--model", help="package.module:factory returning the nn.Module (default: the config's MLP)")
    im.add_argument("--spec", help="package.module:function returning the model's PermutationSpec")
    im.add_argument("--data", help="a data set name or package.module:factory")
    im.add_argument("--config", help="a study config for the later protocols (default: the quickstart preset)")
    im.add_argument("--force", action="store_true", help="replace an earlier import there (deletes only lossglass's files)")
    im.add_argument("--accept-mismatch", action="store_true",
                    help="analyse checkpoints whose BatchNorm statistics do not match the inputs (warn, do not refuse)")
    im.add_argument("--trust-config", action="store_true", help=TRUST_HELP)
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
    stdout = sys.stdout
    sys.stdout = _PrintableStream(stdout)  # whatever a command prints, folder text included, reaches it escaped
    try:
        from ._determinism import pin_once

        pin_once()  # every command: the thread count and OpenMP teams that fix the bits (importing pins nothing)
        return args.fn(args)
    except LossglassError as e:
        print(f"lossglass: error: {printable(str(e), one_line=True)}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file where a folder should be, a permission: one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lossglass: error: {printable(f'{e.strerror or e}{where}', one_line=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from .study import Terminated

        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"lossglass: {what}; finished work is saved, run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
