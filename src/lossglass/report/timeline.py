"""The landscape over training time (table ``timeline``, written by the timeline stage at every snapshot kept by
``train.keep_at``): train and test accuracy beside lambda_max, the basin radius, the naive and aligned barrier and
the overlaps of replica pairs, against the optimiser step, as a matplotlib grid and a plotly grid.

Each curve is the median over replicas (or over pairs) at a step; the band is their range. The caption names the
step where the replicas memorise (median train accuracy first >= 0.99) and where they generalise (median test
accuracy first >= 0.9), and says what each landscape measure did between the two, from the numbers.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc

#: (column, kind of row, axis label, log scale) for each panel, in order
PANELS = (("accuracy", "replica", "accuracy (%)", False),
          ("lambda_max", "replica", "λ_max (top Hessian eigenvalue)", True),
          ("basin_radius", "replica", "basin radius (walk, ΔE = delta)", False),
          ("barrier", "pair", "barrier (nats)", False),
          ("q", "pair", "overlap q of a pair", False),
          ("weight_norm", "replica", "weight norm |θ|", False))

MEMORISED, GENERALISED = 0.99, 0.9


def timeline_data(view: RunView) -> pd.DataFrame | None:
    """One row per kept step: medians, minima and maxima of each measure over replicas (or pairs)."""
    t = view.table("timeline")
    if t is None or not len(t) or "step" not in t:
        return None
    rep, pair = t[t["kind"] == "replica"], t[t["kind"] == "pair"]
    cols = {"train_accuracy": rep, "test_accuracy": rep, "lambda_max": rep, "basin_radius": rep,
            "weight_norm": rep, "barrier_naive": pair, "barrier_aligned": pair, "q_raw": pair, "q_aligned": pair}
    out = pd.DataFrame({"step": sorted(t["step"].unique())}).set_index("step")
    for c, src in cols.items():
        if c not in src or not len(src):
            continue
        g = src.groupby("step")[c]
        out[c], out[c + "_lo"], out[c + "_hi"] = g.median(), g.min(), g.max()
    if "basin_radius_lower_bound" in rep:
        out["basin_radius_censored"] = rep.groupby("step")["basin_radius_lower_bound"].mean()
    return out.reset_index()


def _first(d: pd.DataFrame, col: str, level: float) -> int | None:
    if col not in d:
        return None
    hit = d[d[col] >= level]
    return int(hit["step"].iloc[0]) if len(hit) else None


def _at(d: pd.DataFrame, step: int, col: str) -> float:
    if col not in d:
        return math.nan
    return float(d.loc[d["step"] == step, col].iloc[0])


def caption(d: pd.DataFrame) -> str:
    """What happened, in words that follow the numbers (plain text)."""
    mem, gen = _first(d, "train_accuracy", MEMORISED), _first(d, "test_accuracy", GENERALISED)
    first, last = int(d["step"].iloc[0]), int(d["step"].iloc[-1])
    parts = [f"{len(d)} snapshots from step {first} to {last}; curves are medians over replicas (or pairs), bands "
             "their range; the x axis is log(1 + step)."]
    if mem is None:
        parts.append(f"The replicas never memorise the training set (median train accuracy stays below {MEMORISED}).")
    else:
        parts.append(f"They memorise (median train accuracy ≥ {MEMORISED}) at step {mem}, with test accuracy "
                     f"{100 * _at(d, mem, 'test_accuracy'):.1f}%.")
    if gen is None:
        parts.append(f"Test accuracy never reaches {100 * GENERALISED:.0f}% (last: "
                     f"{100 * float(d['test_accuracy'].iloc[-1]):.1f}%): no generalisation step within the run.")
    elif mem is not None and gen > mem:
        parts.append(f"Test accuracy reaches {100 * GENERALISED:.0f}% only at step {gen}, "
                     f"{gen / max(mem, 1):.1f}× later than memorisation (grokking). Between the two:")
        for col, name in (("lambda_max", "λ_max"), ("basin_radius", "the basin radius"),
                          ("barrier_aligned", "the aligned barrier"), ("weight_norm", "the weight norm")):
            a, b = _at(d, mem, col), _at(d, gen, col)
            if math.isfinite(a) and math.isfinite(b) and a != 0:
                word = "rises" if b > a * 1.1 else "falls" if b < a / 1.1 else "stays about the same"
                parts.append(f"{name} {word} ({a:.4g} → {b:.4g});")
        parts[-1] = parts[-1].rstrip(";") + "."
    else:
        parts.append(f"Test accuracy reaches {100 * GENERALISED:.0f}% at step {gen}, together with the training set: "
                     "no delayed generalisation.")
    if "basin_radius_censored" in d and (d["basin_radius_censored"] > 0).any():
        parts.append("Where a walker never rose by delta within its steps the radius is a lower bound (censored).")
    return " ".join(parts)


def _series(d: pd.DataFrame, key: str) -> list[tuple[str, str]]:
    """(column, legend label) of the curves of one panel."""
    return {"accuracy": [("train_accuracy", "train"), ("test_accuracy", "test")],
            "barrier": [("barrier_naive", "naive"), ("barrier_aligned", "aligned")],
            "q": [("q_raw", "raw"), ("q_aligned", "aligned")]}.get(key, [(key, key)])


def _scale(col: str) -> float:
    return 100.0 if col.endswith("accuracy") else 1.0


def timeline_mpl(d: pd.DataFrame):
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6), sharex=True)
    x = np.log10(1 + d["step"].to_numpy(float))
    for ax, (key, _, label, log) in zip(axes.ravel(), PANELS, strict=True):
        for i, (col, name) in enumerate(_series(d, key)):
            if col not in d or d[col].isna().all():
                continue
            s = _scale(col)
            ax.plot(x, d[col] * s, "o-", ms=3, color=PALETTE[i], label=name)
            ax.fill_between(x, d[col + "_lo"] * s, d[col + "_hi"] * s, color=PALETTE[i], alpha=0.15, lw=0)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        if len(_series(d, key)) > 1:
            ax.legend(frameon=False, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("log10(1 + step)")
    fig.tight_layout()
    return fig


def timeline_plotly(d: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=3, shared_xaxes=True, horizontal_spacing=0.08, vertical_spacing=0.12,
                        subplot_titles=[p[2] for p in PANELS])
    steps = d["step"].to_numpy()
    for k, (key, _, _, log) in enumerate(PANELS):
        r, c = k // 3 + 1, k % 3 + 1
        for i, (col, name) in enumerate(_series(d, key)):
            if col not in d or d[col].isna().all():
                continue
            s = _scale(col)
            fig.add_trace(go.Scatter(x=steps + 1, y=d[col] * s, mode="lines+markers", name=name,
                                     line={"color": PALETTE[i]}, showlegend=k in (0, 3),
                                     customdata=np.stack([steps, d[col + "_lo"] * s, d[col + "_hi"] * s], 1),
                                     hovertemplate="step %{customdata[0]}<br>" + f"{col} median " + "%{y:.4g} "
                                     "(range %{customdata[1]:.4g} to %{customdata[2]:.4g})<extra></extra>"),
                          row=r, col=c)
        fig.update_xaxes(type="log", row=r, col=c, title_text="1 + step" if r == 2 else None)
        if log:
            fig.update_yaxes(type="log", row=r, col=c)
    fig.update_layout(height=620, margin={"l": 60, "r": 20, "t": 40, "b": 50}, hovermode="closest",
                      legend={"orientation": "h", "y": 1.06, "yanchor": "bottom", "x": 0})
    fig.layout.template = None
    return fig


def summary(view: RunView) -> list[tuple[str, str, str]]:
    d = timeline_data(view)
    if d is None:
        return []
    mem, gen = _first(d, "train_accuracy", MEMORISED), _first(d, "test_accuracy", GENERALISED)
    value = f"memorised at step {mem if mem is not None else '—'}, generalised at step {gen if gen is not None else '—'}"
    return [("Over training time", value, "Steps where median train accuracy first reached 99% and median test "
             "accuracy 90% (see the timeline for what the landscape did between them).")]


def section(page: Page) -> None:
    d = timeline_data(page.view)
    if d is None:
        return
    page.h(2, "The landscape over training time", "timeline")
    page.figure("timeline", timeline_mpl(d), esc(caption(d)))
    page.df(d[[c for c in d.columns if not c.endswith(("_lo", "_hi"))]])
    for row in summary(page.view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    d = timeline_data(view)
    if d is None:
        return []
    return [Panel("timeline", "The landscape over training time", caption(d), timeline_plotly(d))]


def overview(view: RunView) -> dict:
    return {}
