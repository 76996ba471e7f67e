"""The dashboard: every run of a folder in one interactive page (issue 15).

``lossglass dashboard RUN [RUN ...] | RUNS_DIR`` writes one self-contained HTML file that works offline (plotly.js
from plotly's Python package embedded once, the runs' data as JSON): an overview table of all runs (sortable,
filterable, a row opens the run), each run's figures drawn with plotly by the report's protocol layers
(:mod:`lossglass.report.walk`, ``.connect``, ``.replicas``, ``.curvature``: the same data as the static report),
loss planes as a heatmap and a rotatable 3-D surface with the replicas marked, replicas linked across panels by a
click, and a side-by-side view that overlays chosen runs on shared axes. ``--serve`` serves the same page from
127.0.0.1 and follows running studies live (:mod:`.server`).

The dashboard reads run folders only and computes no physics; a damaged or half-written folder shows as an
"incomplete" run.

Example::

    from lossglass.dashboard import write_dashboard
    path = write_dashboard(["runs/"], out="runs/dashboard.html")
"""

from __future__ import annotations

from pathlib import Path

from ..errors import check
from ..store import atomic_write_bytes
from .collect import collect_run, discover, page_data
from .page import page_json, render
from .server import DashboardServer, serve


def default_out(paths: list[str | Path]) -> Path:
    """Where the file goes without ``--out``: inside RUNS_DIR when one folder of runs is given, else
    ``dashboard.html`` in the current folder."""
    if len(paths) == 1 and Path(paths[0]).is_dir() and not (Path(paths[0]) / "config.toml").is_file() \
            and not (Path(paths[0]) / "meta.json").is_file():
        return Path(paths[0]) / "dashboard.html"
    return Path("dashboard.html")


def dashboard_html(paths: list[str | Path]) -> str:
    """The self-contained page for the runs named by ``paths`` (run folders, or folders of runs)."""
    runs = discover(paths)
    return render(page_json(page_data([collect_run(p, i) for i, p in enumerate(runs)], live=False)))


def write_dashboard(paths: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the dashboard of ``paths`` to ``out`` (atomically; a link there is replaced, not followed); returns the
    path written."""
    check(len(paths) > 0, "give at least one run folder or a folder of runs")
    out = Path(out) if out is not None else default_out(paths)
    check(not out.is_dir(), f"--out {out} is a folder; give a file name, e.g. {out / 'dashboard.html'}")
    atomic_write_bytes(out, dashboard_html(paths).encode())
    return out


__all__ = ["DashboardServer", "collect_run", "dashboard_html", "discover", "serve", "write_dashboard"]
