"""Run every side-by-side benchmark and write BENCHMARKS.md (ratios, machine, date). ``--quick`` for smaller sizes."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import bench_connect  # noqa: E402
import bench_curvature  # noqa: E402
import bench_scaling  # noqa: E402
import bench_train  # noqa: E402
import bench_walk  # noqa: E402
from common import machine, matmul_gflops  # noqa: E402


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main() -> None:
    quick = "--quick" in sys.argv
    rate = matmul_gflops()
    sections = [("Ensemble training vs a loop of torch.nn models", bench_train.main(quick)),
                ("Walkers vs a Python loop over walkers", bench_walk.main(quick)),
                ("Planes and alignment vs loss-landscapes and rebasin", bench_connect.main(quick)),
                ("Top Hessian eigenvalue vs PyHessian", bench_curvature.main(quick)),
                ("Scaling with the number of replicas", bench_scaling.main(quick))]
    text = [f"# Benchmarks\n\nMeasured {datetime.date.today().isoformat()} on {machine()}; float32 matmul rate "
            f"(2048x2048 GEMM) {rate:.0f} GFLOP/s. `make bench` regenerates this file{' (quick sizes)' if quick else ''}. "
            "Times are the best of repeated runs in one process; `speedup` = peer or loop time / lossglass time; "
            "`fraction_of_matmul` = useful FLOP rate / the GEMM rate above.\n"]
    for title, rows in sections:
        text.append(f"## {title}\n\n{_table(rows)}\n")
    Path(__file__).parent.parent.joinpath("BENCHMARKS.md").write_text("\n".join(text))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
