"""Figures made from a run folder's saved tables, for two readers: the static ``report.html`` (matplotlib, PNG +
SVG in ``figures/``) and the interactive dashboard (plotly, :mod:`lossglass.dashboard`).

One small layer per protocol offers, for each figure, the data it needs (read from the tables), a matplotlib drawer
and a plotly drawer, plus the report section and the dashboard panels built from them:

- :mod:`.train` — accuracy of every replica;
- :mod:`.timeline` — the landscape over training time (snapshots kept by ``train.keep_at``);
- :mod:`.walk` — protocol 1: energy along walks, energy against distance, MSD, aging;
- :mod:`.connect` — protocol 2: permutation barriers, paths, loss planes (heatmap and 3-D surface), width;
- :mod:`.replicas` — protocol 3: P(q), dendrogram, Parisi matrix, triangles;
- :mod:`.curvature` — protocol 4: flatness against the gap, spectral densities;
- :mod:`.selection` — which model to ship (``selection.json``);
- :mod:`.base` — the read-only :class:`RunView` of a run folder, palette, escaping, tables;
- :mod:`.static` — ``build_report``: the static report.

None of them computes physics: they read what the study saved.
"""

from .base import RunView
from .static import build_report

__all__ = ["RunView", "build_report"]
