"""The ``paper`` preset at full size, estimated: each stage's time on this machine from measured per-unit costs
(a training step of one task, a walk step, a plane point, one alignment, one replica's flatness measures, ...)
multiplied by the counts the preset asks for. Nothing here runs the preset itself (hours on 2 cores); every number
is an extrapolation and is labelled as such. Also: how the work divides into Ray tasks at 64, 1,024 and 16,384
replicas, and where the driver (the stages that run in the driver today: replicas and curvature) becomes the
bottleneck.

The unit costs the CLI's estimate uses (``lossglass.resources.UNIT_COSTS``, stated for a reference machine and scaled
by the measured matmul rate) are this script's measurements normalised by the work each stands for; the script prints
them beside the table's (``units``: measured here / the table scaled to here) and each stage's estimate from the table
(what ``lossglass run --dry-run`` prints) beside the same formula with the units measured now. ``--write`` prints the
table's entries from this run's measurement, to paste into ``resources.py``."""

from __future__ import annotations

import math
import sys
import time

from common import fmnist, matmul_gflops

import lossglass as lg
from lossglass.protocols import curvature as K
from lossglass.protocols import replicas as R

try:  # tomllib is 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _preset() -> dict:
    from importlib.resources import files

    return tomllib.loads(files("lossglass").joinpath("presets/paper.toml").read_text())


def measure(quick: bool = False) -> dict:
    """Per-unit costs (seconds) on this machine for the paper's 784-128-10 network."""
    cfg = _preset()
    hidden = cfg["model"]["hidden"]
    full = fmnist(n_train=None, n_test=None)
    n_val = cfg["data"].get("n_val", 0)
    n_train = len(full.y_train) - n_val
    u: dict = {"n_train": n_train, "n_test": len(full.y_test), "n_val": n_val, "hidden": hidden}
    mlp = lg.models.mlp(784, hidden, 10)
    # training: one task of train.chunk (64) replicas, a fraction of an epoch
    steps = 8 if quick else 24
    b = cfg["train"]["batch_size"]
    sub = lg.datasets.Dataset(full.name, full.x_train[:b * steps], full.y_train[:b * steps], full.x_test[:100],
                              full.y_test[:100], 10)
    p_sub = lg.Problem(mlp, sub, device="cpu")
    chunk = 64
    lg.train(p_sub, chunk, epochs=1, batch_size=b, lr=0.05, progress=False, evaluate=False)  # warm-up
    u["train_step_64"] = min(_t(lambda: lg.train(p_sub, chunk, epochs=1, batch_size=b, lr=0.05, progress=False,
                                                 evaluate=False)) for _ in range(2)) / steps
    # evaluation: 64 replicas on 10,000 images (the final evaluation, stop criteria, paths scale with it)
    p10 = lg.Problem(mlp, fmnist(n_train=10000, n_test=100), device="cpu")
    th = p10.init(64, 0)
    p10.evaluate(th)
    u["eval_64x10k"] = min(_t(lambda: p10.evaluate(th)) for _ in range(2))
    # walk steps: 32 walkers, energy on 10,000 images (walk.n_data)
    theta0 = th[0]
    ws = 3 if quick else 6
    lg.random_walk(p10, theta0, n_walkers=32, steps=2, step_size=1e-3, temperature=1e-3, progress=False)
    u["metropolis_step_32"] = _t(lambda: lg.random_walk(p10, theta0, n_walkers=32, steps=ws, step_size=1e-3,
                                                        temperature=1e-3, record_every=ws, progress=False)) / ws
    u["langevin_step_32"] = _t(lambda: lg.langevin(p10, theta0, temperature=1e-3, lr=0.01, steps=ws, n_walkers=32,
                                                   record_every=ws, progress=False)) / ws
    # connect: plane points and path points on the full training set (+ test), one alignment, a Bezier step
    pf = lg.Problem(mlp, full, device="cpu")
    tf = pf.init(2, 0)
    lg.plane(pf, tf[0], steps=5)
    t11 = _t(lambda: lg.plane(pf, tf[0], steps=11))
    t5 = _t(lambda: lg.plane(pf, tf[0], steps=5))
    u["plane_point"] = (t11 - t5) / (121 - 25)
    u["plane_fixed"] = max(t5 - 25 * u["plane_point"], 0.0)
    u["path_25"] = _t(lambda: lg.interpolate(pf, tf[0], tf[1], n_points=25))
    u["align"] = _t(lambda: lg.align(pf, tf[0], tf[1], method="weight"))
    bs = 5 if quick else 20
    u["bezier_step"] = _t(lambda: lg.bezier_path(p10, th[0], th[1], steps=bs, n_points=2, progress=False)) / bs
    # width experiment: a training step of 8 replicas at each width
    u["width_step_8"] = {}
    for w in cfg["connect"]["widths"]:
        pw = lg.Problem(lg.models.mlp(784, w, 10), sub, device="cpu")
        lg.train(pw, 8, epochs=1, batch_size=b, lr=0.05, progress=False, evaluate=False)
        u["width_step_8"][w] = _t(lambda pw=pw: lg.train(pw, 8, epochs=1, batch_size=b, lr=0.05, progress=False,
                                                         evaluate=False)) / steps
    # replicas stage (driver): alignment of 8 replicas to their mean, and the 8 x 8 overlaps
    reps = lg.Replicas(p10.init(8, 1))
    u["overlaps_aligned_8"] = _t(lambda: R.overlaps(p10, reps, align=True))
    u["overlaps_raw_64"] = _t(lambda: R.overlaps(p10, lg.Replicas(th), align=False))
    # curvature stage (driver): every flatness measure of one replica on 10,000 images, the preset's settings
    c = cfg["curvature"]
    one = lg.train(p10, 1, epochs=1, batch_size=128, lr=0.05, progress=False)
    if quick:
        u["flatness_1"] = _t(lambda: K.flatness_table(p10, one, top_k=1, tol=1e-3, trace_probes=6, n_samples=4))
    else:
        u["flatness_1"] = _t(lambda: K.flatness_table(p10, one, top_k=c["top_k"], tol=c["tol"],
                                                      trace_probes=c["trace_probes"], n_samples=c["n_samples"]))
    u["matmul_gflops"] = matmul_gflops()
    return u


def estimate(u: dict, cfg: dict | None = None) -> list[dict]:
    """Stage times (seconds, on one machine like this one) for the paper preset, from the unit costs ``u``."""
    cfg = cfg or _preset()
    tr, wk, cn, rp, cv = cfg["train"], cfg["walk"], cfg["connect"], cfg["replicas"], cfg["curvature"]
    steps_epoch = u["n_train"] // tr["batch_size"]
    n_steps = tr["epochs"] * steps_epoch
    k = tr["replicas"]
    eval_rs = u["eval_64x10k"] / (64 * 10000)  # one replica, one image
    n_eval = u["n_train"] + u["n_test"] + u["n_val"]
    rows = []
    train = (k / 64) * n_steps * u["train_step_64"] + k * n_eval * eval_rs
    rows.append({"stage": "train", "estimate_s": train, "how": f"{k} replicas x {n_steps:,} steps "
                 f"({tr['epochs']} epochs x {steps_epoch}) at {u['train_step_64'] * 1e3:.1f} ms per step of 64 replicas"
                 ", + final evaluation", "ray_tasks": f"{math.ceil(k / 64)} (train.chunk = 64)"})
    n_walks = len(wk["temperatures"])
    walk = n_walks * wk["steps"] * u["metropolis_step_32"] + wk.get("langevin_steps", 0) * u["langevin_step_32"]
    walk += (n_walks * wk["steps"] + wk.get("langevin_steps", 0)) / wk["record_every"] * 32 * u["n_test"] * eval_rs
    rows.append({"stage": "walk", "estimate_s": walk, "how": f"{n_walks} walks x {wk['steps']} steps x 32 walkers at "
                 f"{u['metropolis_step_32'] * 1e3:.0f} ms/step + Langevin {wk.get('langevin_steps', 0)} steps at "
                 f"{u['langevin_step_32'] * 1e3:.0f} ms/step (energy on {wk.get('n_data', u['n_train']):,} images)",
                 "ray_tasks": f"{n_walks + (1 if wk.get('langevin_steps', 0) else 0)} (one per temperature)"})
    n_swaps = len(cn["swaps"])
    planes = 2 * (cn["plane_steps"] ** 2 * u["plane_point"] + u["plane_fixed"])
    paths = (n_swaps + 2 * cn["pairs"]) * u["path_25"] + cn["pairs"] * u["align"]
    bezier = cn["bezier_steps"] * u["bezier_step"]
    widths = sum(cn["width_replicas"] / 8 * n_steps * u["width_step_8"][w] for w in cn["widths"])
    connect = planes + paths + bezier + widths
    rows.append({"stage": "connect", "estimate_s": connect, "how": f"2 planes {cn['plane_steps']}^2 ({planes:.0f} s), "
                 f"{n_swaps + 2 * cn['pairs']} paths + {cn['pairs']} alignments ({paths:.0f} s), Bezier ({bezier:.0f} s), "
                 f"width experiment {cn['widths']} x {cn['width_replicas']} replicas x {n_steps:,} steps ({widths:.0f} s)",
                 "ray_tasks": f"{2 + cn['pairs'] + 2 + len(cn['widths'])} (one per piece; the widest width dominates)"})
    align_per = u["overlaps_aligned_8"] / 8
    replicas = k * align_per + _overlap_s(u, k)
    replicas += rp.get("basin_sweeps", 0) * u["metropolis_step_32"] * rp.get("basin_samples", 32) / 32
    rows.append({"stage": "replicas", "estimate_s": replicas, "how": f"alignment {align_per:.2f} s per replica "
                 f"(Hungarian solves), K^2 overlaps, within-basin chains {rp.get('basin_sweeps', 0)} sweeps",
                 "ray_tasks": "0 (runs in the driver)"})
    curv = k * u["flatness_1"]
    rows.append({"stage": "curvature", "estimate_s": curv, "how": f"{u['flatness_1']:.1f} s of flatness measures per "
                 f"replica (top-{cv['top_k']} Lanczos, Hutch++ {cv['trace_probes']}, sharpness, local entropy) on "
                 f"{cv.get('n_hvp_data', u['n_train']):,} images", "ray_tasks": "0 (runs in the driver)"})
    return rows


def _n_params(hidden: int) -> int:
    return 785 * hidden + (hidden + 1) * 10


def normalised(u: dict, quick: bool = False) -> dict[str, float]:
    """The measured units ``u`` as ``lossglass.resources.UNIT_COSTS`` states them: seconds per unit of work on this
    machine (e.g. ``train``: one step of 64 replicas / (64 x parameters x batch)); ``gemm`` and ``sk_sweep`` are not
    measured here."""
    from lossglass.config import load_config
    from lossglass.resources import curvature_passes

    cfg = _preset()
    p, b, n10, n_all = _n_params(u["hidden"]), cfg["train"]["batch_size"], 10000, u["n_train"] + u["n_val"] + u["n_test"]
    cv = load_config(preset="paper").curvature
    if quick:
        cv = cv.model_copy(update={"top_k": 1, "trace_probes": 6, "n_samples": 4})
    # an SGD step costs a + c W, W = replicas x parameters x batch: fitted (least squares) through the 64-replica
    # step of the paper's network and the 8-replica steps of the width experiment's networks
    ws = [64 * p * b] + [8 * _n_params(w) * b for w in u["width_step_8"]]
    ts = [u["train_step_64"]] + list(u["width_step_8"].values())
    mw, mt = sum(ws) / len(ws), sum(ts) / len(ts)
    slope = sum((w - mw) * (t - mt) for w, t in zip(ws, ts)) / sum((w - mw) ** 2 for w in ws)
    return {"train": slope, "train_step": max(mt - slope * mw, 0.0), "forward": u["eval_64x10k"] / (64 * p * n10),
            "metropolis": u["metropolis_step_32"] / (32 * p * n10), "langevin": u["langevin_step_32"] / (32 * p * n10),
            "plane_point": u["plane_point"] / (p * n_all), "path_point": u["path_25"] / (25 * p * n_all),
            "align": u["align"] / p, "bezier_step": u["bezier_step"] / p,
            "curvature": u["flatness_1"] / (curvature_passes(cv) * p * n10)}


def compare(u: dict, quick: bool = False) -> dict:
    """Measured units against the table (both on this machine), and the paper preset's stage estimates from the
    table (the CLI's) and from the units measured now (the same formulas)."""
    from lossglass import resources as res
    from lossglass.config import load_config

    rate = res.matmul_rate()
    meas = normalised(u, quick)
    units = []
    for k, v in meas.items():
        t = res.unit_cost(k, rate)
        units.append({"unit": k, "measured_s": v, "table_s": t, "measured_over_table": v / t if t else float("nan")})
    cfg = load_config(preset="paper")
    table = res.estimate(cfg)
    saved = dict(res.UNIT_COSTS)
    try:  # the same formulas with this run's units (stated at the reference rate)
        for k, v in meas.items():
            res.UNIT_COSTS[k] = res.Unit(v * rate / res.REFERENCE_RATE, saved[k].per, saved[k].measured)
        now = res.estimate(cfg)
    finally:
        res.UNIT_COSTS.clear()
        res.UNIT_COSTS.update(saved)
    stages = [{"stage": s, "cli_estimate_s": t, "from_units_now_s": now.stage_seconds.get(s, 0.0)}
              for s, t in table.stage_seconds.items()]
    return {"rate_gflops": rate / 1e9, "machine": res.machine_line(rate), "units": units, "stages": stages,
            "cli_total_s": table.seconds, "now_total_s": now.seconds, "normalised": meas}


def _overlap_s(u: dict, k: int) -> float:
    """The K x K overlap matrices (aligned and raw weights: two Gram matrices of K vectors of P numbers, the
    matmul floor at the measured rate), or the measured 64 x 64 cost scaled by K^2 if that is larger."""
    p = 785 * u["hidden"] + (u["hidden"] + 1) * 10
    floor = 2 * 2.0 * k * k * p / (u["matmul_gflops"] * 1e9)
    return max(floor, 2 * (k / 64) ** 2 * u["overlaps_raw_64"] if k <= 64 else floor)


def scaling(u: dict) -> list[dict]:
    """How the paper preset's work divides at 64, 1,024 and 16,384 replicas, and the driver's share."""
    cfg = _preset()
    tr = cfg["train"]
    n_steps = tr["epochs"] * (u["n_train"] // tr["batch_size"])
    eval_rs = u["eval_64x10k"] / (64 * 10000)
    task = n_steps * u["train_step_64"] + 64 * (u["n_train"] + u["n_test"] + u["n_val"]) * eval_rs
    align_per = u["overlaps_aligned_8"] / 8
    rows = []
    for k in (64, 1024, 16384):
        n_tasks = math.ceil(k / 64)
        overl = _overlap_s(u, k)
        driver = k * align_per + overl + k * u["flatness_1"]
        rows.append({"replicas": k, "train_tasks": n_tasks, "train_task_s": task, "train_total_cpu_s": n_tasks * task,
                     "driver_align_s": k * align_per, "driver_overlaps_s": overl, "driver_curvature_s": k * u["flatness_1"],
                     "driver_total_s": driver, "driver_vs_one_task": driver / task})
    return rows


def check_run(folder: str) -> list[dict]:
    """A finished run's stage times (``stages/NAME.json``) against the CLI's estimate of its config on this machine
    (the matmul rate measured now): one row per stage, actual / estimated."""
    import json
    from pathlib import Path

    from lossglass import resources as res
    from lossglass.config import decode_config, validate

    path = Path(folder)
    cfg = validate(decode_config((path / "config.toml").read_bytes(), str(path)), str(path))
    est = res.estimate(cfg)
    rows = []
    for stage, s in est.stage_seconds.items():
        rec = path / "stages" / f"{stage}.json"
        actual = json.loads(rec.read_text()).get("seconds") if rec.is_file() else None
        rows.append({"stage": stage, "estimate_s": s, "actual_s": actual,
                     "actual_over_estimate": actual / s if actual and s else None})
    print(res.machine_line(est.rate))
    for r in rows:
        a = f"{r['actual_s']:.1f}" if r["actual_s"] is not None else "not run"
        q = f"{r['actual_over_estimate']:.2f}" if r["actual_over_estimate"] else "-"
        print(f"{r['stage']:<11} estimate {r['estimate_s']:8.1f} s  actual {a:>8} s  actual/estimate {q}")
    return rows


def measure_run(config: str, out: str, overrides: list[str] | None = None) -> list[dict]:
    """Run ``config`` (a TOML file or a preset name) stage by stage into ``out`` and compare each stage's time with
    the CLI's estimate, the matmul rate measured just before and just after the stage (their geometric mean scales
    the table: on a shared machine the rate drifts with the load, and a rate from another moment would compare the
    estimate with a different machine)."""
    import json
    from pathlib import Path

    from lossglass import resources as res
    from lossglass.config import load_config
    from lossglass.study import Study

    cfg = (load_config(config, overrides=overrides) if config.endswith(".toml")
           else load_config(preset=config, overrides=overrides))
    rows = []
    for stage in list(res.estimate(cfg).stage_seconds):
        res._RATE = None
        before = res.matmul_rate()
        Study(cfg, out, progress=False).run((stage,))
        res._RATE = None
        after = res.matmul_rate()
        res._RATE = math.sqrt(before * after)
        est = res.estimate(cfg).stage_seconds[stage]
        actual = json.loads((Path(out) / "stages" / f"{stage}.json").read_text())["seconds"]
        rows.append({"stage": stage, "rate_before_gflops": before / 1e9, "rate_after_gflops": after / 1e9,
                     "estimate_s": est, "actual_s": actual, "actual_over_estimate": actual / est})
        print(f"{stage:<11} rate {before / 1e9:5.1f} -> {after / 1e9:5.1f} GFLOP/s  estimate {est:8.1f} s  actual "
              f"{actual:8.1f} s  actual/estimate {actual / est:.2f}", flush=True)
    res._RATE = None
    return rows


def main(quick: bool = False, write: bool = False, units: str | None = None) -> dict:
    import json

    if units:  # units saved by an earlier run (its first output line)
        u = json.loads(open(units).read())
        u["width_step_8"] = {int(k): v for k, v in u["width_step_8"].items()}
    else:
        u = measure(quick)
    print(json.dumps(u), flush=True)
    out = {"units": u, "stages": estimate(u), "scaling": scaling(u), "compare": compare(u, quick)}
    for r in out["stages"]:
        print(r)
    for r in out["scaling"]:
        print(r)
    c = out["compare"]
    print(c["machine"])
    for r in c["units"]:
        print(f"unit {r['unit']:<12} measured {r['measured_s']:.3e} s, table {r['table_s']:.3e} s, "
              f"ratio {r['measured_over_table']:.2f}")
    for r in c["stages"]:
        print(f"stage {r['stage']:<11} CLI estimate {r['cli_estimate_s']:8.0f} s, from units measured now "
              f"{r['from_units_now_s']:8.0f} s")
    print(f"total: CLI estimate {c['cli_total_s']:.0f} s, from units measured now {c['now_total_s']:.0f} s")
    if write:
        print(f"REFERENCE_RATE = {c['rate_gflops']:.1f}e9")
        for k, v in c["normalised"].items():
            print(f"{k}: {v:.2e}")
    return out


if __name__ == "__main__":
    if "--run" in sys.argv:  # python bench_paper.py --run FOLDER: a finished run against the CLI's estimate
        check_run(sys.argv[sys.argv.index("--run") + 1])
    elif "--measure" in sys.argv:  # python bench_paper.py --measure CONFIG_OR_PRESET OUT [KEY=VALUE ...]
        i = sys.argv.index("--measure")
        measure_run(sys.argv[i + 1], sys.argv[i + 2], sys.argv[i + 3:])
    else:
        main("--quick" in sys.argv, "--write" in sys.argv,
             sys.argv[sys.argv.index("--units") + 1] if "--units" in sys.argv else None)
