"""Which measure predicts generalisation (tables ``measures_rank`` and ``measures_grid``, written by the measures
stage): the ranked table of measures (overall Kendall tau with the gap, granulated tau per hyperparameter axis, their
mean Psi, each with its 95% bootstrap interval over seeds, and the conditional mutual information) and one figure:
Psi and the per-axis taus of every measure with their intervals, best first.

Words follow the intervals: a measure "predicts" the gap along an axis only when the interval of its granulated tau
excludes 0."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc, go_figure, text

#: the statistics drawn, in order (column prefix, label)
STATS = (("psi", "Psi (mean granulated tau)"), ("tau", "overall tau"))


def rank_data(view: RunView) -> tuple[pd.DataFrame, list[str]] | None:
    """The ranked table and the axes it was granulated over (None when the stage did not rank)."""
    r = view.table("measures_rank")
    if r is None or not len(r) or "psi" not in r:
        return None
    axes = [c[4:] for c in r.columns if c.startswith("psi_") and not c.endswith(("_lo", "_hi"))]
    return r, axes


def _with_interval(r: pd.DataFrame, col: str, fmt: str = "+.2f") -> list[str]:
    if f"{col}_lo" not in r:  # a table written before the column had an interval
        return [format(v, fmt) if np.isfinite(v) else "nan" for v in r[col]]
    return [f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(v) else "nan"
            for v, lo, hi in zip(r[col], r[f"{col}_lo"], r[f"{col}_hi"])]


def ranked_table(r: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per measure, best Psi first: each statistic as 'value [low, high]'."""
    out = pd.DataFrame({"rank": r["rank"], "measure": r["measure"], "Psi": _with_interval(r, "psi"),
                        "tau (all networks)": _with_interval(r, "tau")})
    for a in axes:
        out[f"psi {a}"] = _with_interval(r, f"psi_{a}")
    out["CMI (|S|=2)"] = _with_interval(r, "cmi", ".3f")
    out["MI"] = r["cmi_0"].round(4)
    return out


def caption(r: pd.DataFrame, axes: list[str]) -> str:
    """What the numbers say: the top measure by Psi, and which measures' Psi intervals exclude zero."""
    n = int(r["n_networks"].iloc[0])
    pos = r[r["psi_lo"] > 0]["measure"].tolist()
    neg = r[r["psi_hi"] < 0]["measure"].tolist()
    s = [f"{len(r)} measures ranked on {n} networks over {int(r['n_cells'].iloc[0])} cells of the grid "
         f"({', '.join(axes)}); intervals are 95% bootstrap intervals over seeds."]
    top = r.iloc[0]
    s.append(f"Highest Psi: {top['measure']} ({top['psi']:+.2f} [{top['psi_lo']:+.2f}, {top['psi_hi']:+.2f}]).")
    s.append(f"Psi above 0 beyond its interval: {', '.join(pos) if pos else 'none'}; below 0: "
             f"{', '.join(neg) if neg else 'none'} (a negative Psi: the measure ranks the gap backwards).")
    return " ".join(s)


def rank_mpl(r: pd.DataFrame, axes: list[str]):
    cols = [("psi", "Psi")] + [(f"psi_{a}", a) for a in axes] + [("tau", "overall tau")]
    y = np.arange(len(r))[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(r) + 1.6))
    off = np.linspace(-0.3, 0.3, len(cols))
    for i, (c, label) in enumerate(cols):
        v = r[c].to_numpy(float)
        err = np.abs(np.stack([v - r[f"{c}_lo"].to_numpy(float), r[f"{c}_hi"].to_numpy(float) - v]))
        ax.errorbar(v, y + off[i], xerr=err, fmt="o" if c == "psi" else ".", ms=6 if c == "psi" else 4,
                    color=PALETTE[i % len(PALETTE)], label=label, lw=1.4 if c == "psi" else 0.8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, r["measure"].tolist())
    ax.set_xlabel("Kendall tau with the generalisation gap (95% bootstrap interval over seeds)")
    ax.set_xlim(-1.05, 1.05)
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def rank_plotly(r: pd.DataFrame, axes: list[str]):
    import plotly.graph_objects as go

    traces = []
    for i, (c, label) in enumerate([("psi", "Psi")] + [(f"psi_{a}", a) for a in axes] + [("tau", "overall tau")]):
        v = r[c].to_numpy(float)
        traces.append(go.Scatter(x=v, y=[text(m) for m in r["measure"]], mode="markers", name=label,
                                 marker={"color": PALETTE[i % len(PALETTE)], "size": 9 if c == "psi" else 6},
                                 error_x={"type": "data", "symmetric": False,
                                          "array": r[f"{c}_hi"].to_numpy(float) - v,
                                          "arrayminus": v - r[f"{c}_lo"].to_numpy(float)}))
    return go_figure(traces, xaxis={"title": "Kendall tau with the gap", "range": [-1.05, 1.05]},
                     yaxis={"autorange": "reversed"}, height=max(360, 24 * len(r) + 120))


def summary(view: RunView) -> list[tuple[str, str, str]]:
    d = rank_data(view)
    if d is None:
        return []
    r, _ = d
    top = r.iloc[0]
    return [("Best predictor of the gap", f"{top['measure']}: Psi {top['psi']:+.2f} [{top['psi_lo']:+.2f}, "
             f"{top['psi_hi']:+.2f}]", "Mean granulated Kendall tau over the grid's axes (Jiang et al. 2020), 95% "
             "bootstrap interval over seeds.")]


def section(page: Page) -> None:
    d = rank_data(page.view)
    if d is None:
        return
    r, axes = d
    page.h(2, "Which measure predicts generalisation", "measures")
    page.figure("measures_rank", rank_mpl(r, axes), esc(caption(r, axes)))
    page.df(ranked_table(r, axes), max_rows=60)
    for row in summary(page.view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    d = rank_data(view)
    if d is None:
        return []
    r, axes = d
    return [Panel("measures", "Which measure predicts generalisation", caption(r, axes), rank_plotly(r, axes))]


def overview(view: RunView) -> dict:
    d = rank_data(view)
    if d is None:
        return {}
    r, _ = d
    return {"best_measure": str(r["measure"].iloc[0]), "best_psi": float(r["psi"].iloc[0])}
