"""The golden run: one small study through every stage, and a digest of what it leaves behind.

``python tests/golden/golden_run.py OUT`` runs the study into OUT and prints the digest as JSON;
``--write`` stores it as ``tests/golden/small_run.json`` (done once, before a refactoring that must keep every byte).
tests/test_golden.py runs the same study and compares.

The digest holds, for every file of the run folder, its SHA-256 (tables, tensors, figures, the report rebuilt with
a fixed timestamp, config, manifest), the stage records without their times, meta.json's input fingerprints, and
every name the run claimed in its manifest while it ran (task results and checkpoints, which are gone at the end).
Byte equality of numbers holds on the same machine and build only; ``machine`` says which one made the digest.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

CONFIG = """
name = "golden"
seed = 1
[data]
name = "digits"
n_train = 600
n_test = 200
n_val = 100
[model]
hidden = 12
[train]
replicas = 6
epochs = 2
batch_size = 32
lr = 0.05
keep_at = [0, 8, 30]
[timeline]
n_data = 200
walkers = 2
walk_steps = 6
pairs = 1
n_points = 5
[walk]
n_walkers = 3
steps = 12
step_size = 0.01
temperatures = ["none", 0.01]
record_every = 4
langevin_steps = 6
langevin_temperature = 0.001
[connect]
swaps = [0, 2, 4]
pairs = 2
bezier_steps = 10
plane_steps = 5
widths = [4, 8]
width_replicas = 2
[curvature]
trace_probes = 6
n_samples = 4
slq_steps = 8
[select]
n_resamples = 200
[reference]
enabled = true
n_spins = 20
replicas = 6
steps = 100
sk_spins = 24
sk_replicas = 8
sk_sweeps = 200
sk_samples = 2
sk_temperatures = [0.4, 0.8, 1.2, 1.6]
[replicas]
basin_temperature = 0.01
basin_samples = 6
basin_sweeps = 20
basin_n_data = 200
"""

#: files whose bytes carry times, versions or paths: compared through the parts that do not
VOLATILE = {"meta.json", "progress.json", "report.html", ".lossglass/trust", ".lossglass/lock"}
MANIFEST = ".lossglass/manifest"
#: time fields of the stage records
TIMES = {"seconds", "finished", "started"}


def machine() -> dict:
    import numpy
    import pandas
    import pyarrow
    import torch

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                flags += line
    except OSError:
        pass
    return {"torch": torch.__version__, "numpy": numpy.__version__, "pandas": pandas.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": hashlib.sha256(flags.encode()).hexdigest()[:16], "threads": torch.get_num_threads()}


def run(out: Path) -> dict:
    import lossglass as lg
    from lossglass.report import build_report
    from lossglass.store import RunStore

    claimed: list[str] = []
    original = RunStore.claim

    def claim(self, name):
        claimed.append(f"{self.stage or '-'}\t{Path(name)}")
        return original(self, name)

    RunStore.claim = claim
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg_path = out.parent / "golden.toml"
        cfg_path.write_text(CONFIG)
        lg.run_study(str(cfg_path), out, progress=False)
    finally:
        RunStore.claim = original
    _fix_times(out)
    build_report(out, timestamp="T")
    return digest(out, claimed)


def _fix_times(out: Path) -> None:
    """Times in meta.json and the stage records set to fixed values, so the report rebuilt from them is comparable."""
    meta = json.loads((out / "meta.json").read_text())
    meta.update(started="S", finished="F", last_run_seconds=0)
    meta["stage_seconds"] = {k: 0 for k in meta.get("stage_seconds") or {}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for p in (out / "stages").glob("*.json"):
        rec = json.loads(p.read_text())
        rec.update({k: 0 for k in TIMES if k in rec})
        p.write_text(json.dumps(rec, indent=2, sort_keys=True))


def digest(out: Path, claimed: list[str]) -> dict:
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in VOLATILE - {"report.html"}:
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    # the manifest: its entries (stage, file) in order; what else a line carries (sizes, hashes, signatures made with
    # this user's key) is checked by the store's own tests
    manifest = [line.split("\t")[:2] for line in (out / MANIFEST).read_text().splitlines()]
    files.pop(MANIFEST, None)
    stages = {}
    for p in sorted((out / "stages").glob("*.json")):
        rec = json.loads(p.read_text())
        stages[p.stem] = {k: v for k, v in rec.items() if k not in TIMES}
        files.pop(f"stages/{p.name}", None)
    meta = json.loads((out / "meta.json").read_text())
    import pandas as pd

    schemas = {}
    for p in sorted((out / "tables").glob("*.parquet")):
        df = pd.read_parquet(p)
        schemas[p.stem] = {"rows": len(df), "columns": {c: str(t) for c, t in df.dtypes.items()}}
    return {"machine": machine(), "files": files, "manifest": manifest, "stages": stages, "inputs": meta.get("inputs"),
            "name": meta.get("name"), "claimed": sorted(set(claimed)), "schemas": schemas}


if __name__ == "__main__":
    import tempfile

    write = "--write" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--write"]
    out = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="golden-")) / "run"
    d = run(out)
    text = json.dumps(d, indent=1, sort_keys=True)
    if write:
        (Path(__file__).parent / "small_run.json").write_text(text + "\n")
    print(text)
