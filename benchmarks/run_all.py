"""Run every side-by-side benchmark and write BENCHMARKS.md. ``--quick`` for smaller sizes (and 2 repeats).

Every row is timed 3 times in one process, alternating lossglass and the peer after one untimed warm-up call of
each (the top-eigenvalue row: 3 fresh processes, so that the cold first call is measured too); the table gives the
best time of each side, the spread of each side over its repeats ((max - min) / min), the speed-up best / best and
the range of the per-repeat speed-ups. The float32 matmul rate is measured at the start and at the end of the run;
``fraction`` is the row's useful FLOP rate over the start rate."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_connect  # noqa: E402
import bench_curvature  # noqa: E402
import bench_kernel  # noqa: E402
import bench_paper  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train  # noqa: E402
import bench_walk  # noqa: E402
from common import machine, matmul_gflops  # noqa: E402

#: GitHub issue 16: the aims, and the ratios measured before the work (on a 2-core machine like this one)
AIMS = {"plane": (20, "4.5x"), "train64": (3, "1.45x"), "train16": (10, "5.0x"), "eig": (2, "1.3x warm, 0.4x cold"),
        "walk16": (3, "1.4x"), "walk64": (3, "1.9x")}
COLD_PENALTY_AIM = 0.20


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    cols = cols or [c for c in dict.fromkeys(k for r in rows for k in r) if not c.endswith("_times")]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _issue_table(rows: list[dict], rate: float) -> tuple[str, list[str]]:
    lines = ["| work | lossglass (s) | spread | peer | peer (s) | spread | speed-up | per-repeat range | useful GFLOP/s "
             "| fraction of matmul | 1 thread: lossglass / peer CPU s (spread) | 1 thread: speed-up | aim | met (wall; 1 thread) "
             "| before (issue 16) |", "|" + "---|" * 15]
    unmet = []
    for r in rows:
        aim, before = AIMS[r["row"]]
        met, met1 = r["speedup"] >= aim, r["speedup_cpu1"] >= aim
        extra = ""
        if r["row"] == "eig":
            met = met and r["cold_penalty"] <= COLD_PENALTY_AIM
            extra = f" and cold penalty <= {_pct(COLD_PENALTY_AIM)}"
        if not (met or met1):
            unmet.append(r["row"])
        gf = r["useful_gflop"] / r["ours_s"]
        lines.append(f"| {r['case']} | {r['ours_s']:.3f} | {_pct(r['ours_spread'])} | {r['peer']} | {r['peer_s']:.3f} | "
                     f"{_pct(r['peer_spread'])} | {r['speedup']:.2f}x | {r['speedup_min']:.2f}-{r['speedup_max']:.2f}x | "
                     f"{gf:.0f} | {gf / rate:.2f} | {r['ours_cpu1_s']:.3f} / {r['peer_cpu1_s']:.3f} "
                     f"({_pct(r['ours_cpu1_spread'])}, {_pct(r['peer_cpu1_spread'])}) | {r['speedup_cpu1']:.2f}x | "
                     f">= {aim}x{extra} | {'yes' if met else 'no'}; {'yes' if met1 else 'no'} | {before} |")
        if r["row"] == "eig":
            lines.append(f"| the same, first call in a fresh process (cold; worst of 3 processes) | {r['ours_cold_s']:.3f} "
                         f"| | PyHessian, first call | {r['peer_cold_s']:.3f} | | {r['cold_speedup']:.2f}x (worst) | | "
                         f"| | | | cold penalty {_pct(r['cold_penalty'])} (worst) | | |")
    return "\n".join(lines), unmet


def _paper_section(paper: dict) -> str:
    u, stages, sc = paper["units"], paper["stages"], paper["scaling"]
    total = sum(r["estimate_s"] for r in stages)
    lines = ["## The `paper` preset at full size (estimated)\n",
             "Estimated from per-unit costs measured in this run (a training step of one 64-replica task, a walk step "
             "of 32 walkers, plane and path points on the full training set, one alignment, one replica's flatness "
             "measures at the preset's settings) times the counts the preset asks for; the preset was not run. One "
             "machine like this one, every stage in one process (the local executor); minor parts (test evaluations "
             "of the connect pieces, the report, the reference stage's small spin glasses) are left out.\n",
             "| stage | estimate on this machine | what it is made of | Ray tasks |", "|---|---|---|---|"]
    for r in stages:
        lines.append(f"| {r['stage']} | {r['estimate_s'] / 3600:.1f} h ({r['estimate_s']:.0f} s) | {r['how']} | "
                     f"{r['ray_tasks']} |")
    lines.append(f"| **total** | **{total / 3600:.1f} h** | | |\n")
    lines.append("GPU first: every stage above is matrix work on batches of replicas (training steps, energy "
                 "evaluations of walkers, Hessian-vector products), so `device = \"auto\"` (the preset's default) "
                 "puts it on a GPU when there is one; a GPU of the H100/H200 class does a float32 step of 64 replicas "
                 "in milliseconds, so the preset is a GPU-hours job there, while on 2 CPU cores it is the total above. "
                 "On CPUs, spread the train, walk and connect tasks over machines with Ray (`--executor ray`); the "
                 "replicas and curvature stages run in the driver (next section). `benchmarks/gpu_check.sh` measures "
                 "each stage on a GPU with reduced steps.\n")
    lines.append("## Scaling past one machine\n")
    lines.append(f"How the `paper` preset's work divides into Ray tasks as the number of replicas grows. Training is "
                 f"one task per `train.chunk` = 64 replicas; a task of 64 replicas costs {sc[0]['train_task_s']:.0f} s "
                 f"here (measured: {u['train_step_64'] * 1e3:.1f} ms per step of 64 replicas of 784-{u['hidden']}-10, "
                 f"batch 128, over a fraction of an epoch, extrapolated to 20 epochs plus the final evaluation). Walks "
                 f"are one task per temperature (5) and connect one task per piece (about 24), whatever the number of "
                 f"replicas. The replicas and curvature stages run in the driver today: alignment is one Hungarian "
                 f"solve per replica per iteration ({u['overlaps_aligned_8'] / 8:.3f} s per replica measured), the "
                 f"overlaps are K^2 (two Gram matrices of K vectors of P numbers at the matmul rate), the "
                 f"ultrametricity triangles are sampled (at most `replicas.max_triangles`, constant), and curvature is "
                 f"{u['flatness_1']:.1f} s per replica (measured).\n")
    lines.append("| replicas | training tasks | one task (s) | training, all tasks (CPU-h) | driver: alignment (s) | "
                 "driver: overlaps (s) | driver: curvature (s) | driver total (h) | driver / one training task |")
    lines.append("|" + "---|" * 9)
    for r in sc:
        lines.append(f"| {r['replicas']:,} | {r['train_tasks']} | {r['train_task_s']:.0f} | "
                     f"{r['train_total_cpu_s'] / 3600:.1f} | {r['driver_align_s']:.0f} | {r['driver_overlaps_s']:.0f} | "
                     f"{r['driver_curvature_s']:.0f} | {r['driver_total_s'] / 3600:.2f} | {r['driver_vs_one_task']:.2f} |")
    lines.append("\nWith enough workers the training wall time is one task's, so the driver becomes the bottleneck "
                 "once its own work exceeds one training task (the last column above 1): from about 1,024 replicas "
                 "on, and by far at 16,384, almost all of it the per-replica curvature measures (independent per "
                 "replica: the first thing to turn into Ray tasks), then the K^2 overlaps (one GEMM, but K^2 memory: "
                 "16,384^2 float64 is 2 GiB) and the hierarchical clustering of the K x K distances.\n")
    return "\n".join(lines)


def main() -> None:
    quick = "--quick" in sys.argv
    t_start = time.perf_counter()
    rate = matmul_gflops()
    train = bench_train.main(quick)
    walk = bench_walk.main(quick)
    connect = bench_connect.main(quick)
    curv = bench_curvature.main(quick)
    scale = bench_scaling.main(quick)
    paper = bench_paper.main(quick)
    kernel = bench_kernel.main(quick)
    rate_end = matmul_gflops()
    issue_rows = [connect[0], train[0], train[1], curv[0], walk[0], walk[1]]
    table, unmet = _issue_table(issue_rows, rate)
    minutes = (time.perf_counter() - t_start) / 60
    text = [f"# Benchmarks\n\nMeasured {datetime.date.today().isoformat()} on {machine()}; float32 matmul rate "
            f"(2048x2048 GEMM) {rate:.0f} GFLOP/s at the start of the run, {rate_end:.0f} at the end. `make bench` "
            f"regenerates this file{' (quick sizes)' if quick else ''} in {minutes:.0f} minutes.\n",
            "Method: each row is timed 3 times in one process, alternating lossglass and the peer after one untimed "
            "warm-up call of each, so that the noise of a shared machine hits both sides alike (the top-eigenvalue "
            "row: 3 fresh processes, to measure the first call too). `lossglass (s)` and `peer (s)` are the best "
            "times; `spread` is (max - min) / min over the 3 repeats; `speed-up` is best / best and `per-repeat "
            "range` the smallest and largest of the 3 paired ratios. `useful GFLOP/s` counts the multiply-adds the "
            "work needs (for the plane: the 3 first-layer products and, per point and image, the rest of the "
            "network); `fraction of matmul` divides it by the start rate above. Results are equal to the torch "
            "path's to float32 roundoff (about 1e-7 relative; see tests/test_native.py), and bit-reproducible on "
            "the CPU. The `1 thread` columns repeat each comparison with both sides on one thread, timed by CPU time "
            "(3 alternating repeats after a warm-up): on a machine shared with other jobs that is the robust ratio, "
            "since a neighbour that takes one of the 2 cores stalls every barrier of a 2-thread run (the spreads of "
            "the wall-time columns show when that happened).\n",
            "## GitHub issue 16: the rows and their aims\n", table,
            "\nAims met neither on wall time nor on one thread: " + (", ".join(unmet) if unmet else "none") +
            ". Where a row is bound by the hardware "
            "(the 16-walker row: 16 first-layer GEMMs of 10,000 x 784 x 64 per step, which the loop runs too), "
            "the fraction of matmul says how close to the floor it is.\n"]
    for title, rows in (("Ensemble training vs a loop of torch.nn models", train),
                        ("Walkers vs a Python loop over walkers", walk),
                        ("Planes and alignment vs loss-landscapes and rebasin", connect),
                        ("Top Hessian eigenvalue vs PyHessian", curv),
                        ("Scaling with the number of replicas (energy of K replicas, best of 3)", scale),
                        ("The fused CPU kernel vs the torch path (LOSSGLASS_NATIVE=0): energies and a plane; "
                         "speed-up = torch path / kernel", kernel)):
        text.append(f"## {title}\n\n{_table(rows)}\n")
    text.append(_paper_section(paper))
    # the cluster study takes about 20 minutes: its section is written from the stored measurement
    from bench_cluster import section

    text.append(section(json.loads((Path(__file__).parent / "results" / "cluster_scaling.json").read_text())))
    Path(__file__).parent.parent.joinpath("BENCHMARKS.md").write_text("\n".join(text))
    print(f"wrote BENCHMARKS.md ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
