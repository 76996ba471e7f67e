"""The landscape over training time (table ``timeline``, written by the timeline stage at every snapshot kept by
``train.keep_at``): train and test accuracy beside lambda_max, the basin radius, the naive and aligned barrier and
the overlaps of replica pairs, against the optimiser step, as a matplotlib grid and a plotly grid.

Each curve is the median over replicas (or over pairs) at a step; the band is their range. The basin radius is the
snapshot's Kaplan-Meier median over all walkers (relative to |theta|, at a loss rise delta E0) of the two walks,
filter-normalised and isotropic, with its 95% interval over walkers as the band; a median that was not reached is a
lower bound (hollow upward triangle, "≥" in words). The caption names the step where the replicas memorise (median
train accuracy first >= 0.99) and where they generalise (median test accuracy first >= 0.9), and says what each
landscape measure did between them, from the numbers: the basin is said to widen or narrow only when both kinds of
walk say so beyond their intervals and censoring (a lower bound can show a widening, never a narrowing).
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..protocols.walk import radius_words
from .base import PALETTE, Page, Panel, RunView, esc

#: (column, kind of row, axis label, log scale) for each panel, in order
PANELS = (("accuracy", "replica", "accuracy (%)", False),
          ("lambda_max", "replica", "λ_max (top Hessian eigenvalue)", True),
          ("radius", "replica", "basin radius / |θ| (loss rise δ·E0)", True),
          ("barrier", "pair", "barrier (nats)", False),
          ("q", "pair", "overlap q of a pair", False),
          ("weight_norm", "replica", "weight norm |θ|", False))

MEMORISED, GENERALISED = 0.99, 0.9
#: the two kinds of walk in the table: (column infix, name in ``timeline_data``, words)
RADII = (("", "radius", "filter-normalised"), ("_iso", "radius_iso", "isotropic"))


def timeline_data(view: RunView) -> pd.DataFrame | None:
    """One row per kept step: medians, minima and maxima of each measure over replicas (or pairs); for each kind of
    walk the snapshot's pooled radius (``radius``, ``radius_iso``: KM median / |theta|) with ``_ci_low``/``_ci_high``
    (also as ``_lo``/``_hi``, the band), ``_lower_bound`` and ``_censored`` (share of walkers that never crossed)."""
    t = view.table("timeline")
    if t is None or not len(t) or "step" not in t:
        return None
    rep, pair = t[t["kind"] == "replica"], t[t["kind"] == "pair"]
    cols = {"train_accuracy": rep, "test_accuracy": rep, "lambda_max": rep, "weight_norm": rep,
            "barrier_naive": pair, "barrier_aligned": pair, "q_raw": pair, "q_aligned": pair}
    out = pd.DataFrame({"step": sorted(t["step"].unique())}).set_index("step")
    for c, src in cols.items():
        if c not in src or not len(src):
            continue
        g = src.groupby("step")[c]
        out[c], out[c + "_lo"], out[c + "_hi"] = g.median(), g.min(), g.max()
    first = t.groupby("step").first()
    for infix, name, _ in RADII:
        base = f"pooled_radius{infix}"
        if f"{base}_relative" not in first:
            continue  # a table written before the radii carried their censoring: no radius is shown
        out[name] = first[f"{base}_relative"].astype(float)
        out[name + "_ci_low"] = first[f"{base}_ci_low"].astype(float)
        out[name + "_ci_high"] = first[f"{base}_ci_high"].astype(float)
        out[name + "_lower_bound"] = first[f"{base}_lower_bound"].astype(bool)
        out[name + "_censored"] = first[f"{base}_censored"].astype(float)
        out[name + "_lo"], out[name + "_hi"] = out[name + "_ci_low"], out[name + "_ci_high"]
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


def _radius(d: pd.DataFrame, step: int, name: str) -> dict:
    row = d.loc[d["step"] == step].iloc[0]
    return {"value": float(row[name]), "lo": float(row[name + "_ci_low"]), "hi": float(row[name + "_ci_high"]),
            "bound": bool(row[name + "_lower_bound"]), "censored": float(row[name + "_censored"])}


def radius_change(a: dict, b: dict) -> str:
    """How the radius moved from ``a`` to ``b`` (each: value, lo/hi of its 95% interval, bound, censored):
    "widens" when b's interval lies above a's (b.lo > a.hi; a lower bound at a has hi = inf, so it cannot), "narrows"
    when below (b.hi < a.lo; a lower bound at b cannot), else "unresolved" (the intervals overlap: the walks cannot
    tell). Values are never compared as measured where one is a bound: only its interval is used."""
    if not all(math.isfinite(x["value"]) for x in (a, b)):
        return "unresolved"
    if b["lo"] > a["hi"]:
        return "widens"
    if b["hi"] < a["lo"]:
        return "narrows"
    return "unresolved"


def radius_sentence(d: pd.DataFrame, s0: int, s1: int) -> str | None:
    """What the basin radius did from step ``s0`` to ``s1``, in words: a widening or narrowing only when both kinds of
    walk agree beyond their intervals and censoring; otherwise each kind's numbers and why no claim is made."""
    if not all(name in d for _, name, _ in RADII):
        return None
    moves, said = [], []
    for _, name, words in RADII:
        a, b = _radius(d, s0, name), _radius(d, s1, name)
        moves.append(radius_change(a, b))
        said.append(f"{words} {radius_words(a['value'], a['bound'], a['censored'])} → "
                    f"{radius_words(b['value'], b['bound'], b['censored'])}")
    nums = "; ".join(said)
    if moves[0] == moves[1] and moves[0] != "unresolved":
        return (f"from step {s0} to {s1} the basin {moves[0]} in both kinds of directions (radius / |θ|, {nums}; 95% "
                "intervals apart).")
    if moves[0] == moves[1]:
        return (f"from step {s0} to {s1} the basin radius shows no change the walks can resolve (radius / |θ|, {nums}; "
                "95% intervals overlap or a bound cannot tell).")
    detail = ", ".join(f"{w}: {m}" for (_, _, w), m in zip(RADII, moves))
    return (f"from step {s0} to {s1} the two kinds of directions disagree ({detail}; radius / |θ|, {nums}): no claim "
            "about the basin's width.")


def caption(d: pd.DataFrame) -> str:
    """What happened, in words that follow the numbers (plain text)."""
    mem, gen = _first(d, "train_accuracy", MEMORISED), _first(d, "test_accuracy", GENERALISED)
    first, last = int(d["step"].iloc[0]), int(d["step"].iloc[-1])
    parts = [f"{len(d)} snapshots from step {first} to {last}; curves are medians over replicas (or pairs), bands "
             "their range (basin radius: 95% interval over walkers); the x axis is log(1 + step)."]
    if mem is None:
        parts.append(f"The replicas never memorise the training set (median train accuracy stays below {MEMORISED}).")
    else:
        parts.append(f"They memorise (median train accuracy ≥ {MEMORISED}) at step {mem}, with test accuracy "
                     f"{100 * _at(d, mem, 'test_accuracy'):.1f}%.")
        early = radius_sentence(d, first, mem) if mem > first else None
        if early:
            parts.append(early[0].upper() + early[1:])
    if gen is None:
        parts.append(f"Test accuracy never reaches {100 * GENERALISED:.0f}% (last: "
                     f"{100 * float(d['test_accuracy'].iloc[-1]):.1f}%): no generalisation step within the run.")
    elif mem is not None and gen > mem:
        parts.append(f"Test accuracy reaches {100 * GENERALISED:.0f}% only at step {gen}, "
                     f"{gen / max(mem, 1):.1f}× later than memorisation (grokking). Between the two:")
        for col, name in (("lambda_max", "λ_max"), ("barrier_aligned", "the aligned barrier"),
                          ("weight_norm", "the weight norm")):
            a, b = _at(d, mem, col), _at(d, gen, col)
            if math.isfinite(a) and math.isfinite(b) and a != 0:
                word = "rises" if b > a * 1.1 else "falls" if b < a / 1.1 else "stays about the same"
                parts.append(f"{name} {word} ({a:.4g} → {b:.4g});")
        late = radius_sentence(d, mem, gen)
        if late:
            parts.append(late)
        parts[-1] = parts[-1].rstrip(";.") + "."
    else:
        parts.append(f"Test accuracy reaches {100 * GENERALISED:.0f}% at step {gen}, together with the training set: "
                     "no delayed generalisation.")
    if any(name in d for _, name, _ in RADII):
        parts.append("Basin radius: the Kaplan–Meier median over every walker of a snapshot of the distance, over "
                     "|θ|, at which the training loss first exceeds E0 (1 + δ); '≥' marks a lower bound (fewer than "
                     "half the walkers crossed within their reach), never a measured value.")
    return " ".join(parts)


def _series(d: pd.DataFrame, key: str) -> list[tuple[str, str]]:
    """(column, legend label) of the curves of one panel."""
    return {"accuracy": [("train_accuracy", "train"), ("test_accuracy", "test")],
            "barrier": [("barrier_naive", "naive"), ("barrier_aligned", "aligned")],
            "q": [("q_raw", "raw"), ("q_aligned", "aligned")],
            "radius": [(name, words) for _, name, words in RADII]}.get(key, [(key, key)])


def _band(d: pd.DataFrame, col: str, s: float) -> tuple[np.ndarray, np.ndarray]:
    """The band's edges; an open end (an interval without an upper limit) is left undrawn."""
    lo, hi = d[col + "_lo"].to_numpy(float) * s, d[col + "_hi"].to_numpy(float) * s
    return np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan)


def _bounds(d: pd.DataFrame, col: str) -> np.ndarray:
    """Rows whose value is only a lower bound (drawn as hollow upward triangles)."""
    b = col + "_lower_bound"
    return d[b].to_numpy(bool) if b in d else np.zeros(len(d), bool)


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
            ax.fill_between(x, *_band(d, col, s), color=PALETTE[i], alpha=0.15, lw=0)
            bound = _bounds(d, col)
            if bound.any():
                ax.plot(x[bound], d[col].to_numpy(float)[bound] * s, "^", ms=7, mfc="none", color=PALETTE[i],
                        label=f"{name}: ≥ (lower bound)")
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
            if key == "radius":  # the snapshot's KM median with its interval; bounds say so
                bound = _bounds(d, col)
                words = [f"{name}: {radius_words(v, b, cz)}, 95% interval {lo:.3g} to {hi:.3g}" for v, b, cz, lo, hi
                         in zip(d[col], bound, d[col + "_censored"], d[col + "_ci_low"], d[col + "_ci_high"])]
                fig.add_trace(go.Scatter(x=steps + 1, y=d[col], mode="lines+markers", name=name, text=words,
                                         line={"color": PALETTE[i]}, showlegend=True, legendgroup="radius",
                                         marker={"symbol": np.where(bound, "triangle-up-open", "circle").tolist(),
                                                 "size": np.where(bound, 10, 6).tolist()},
                                         hovertemplate="step %{x}<br>%{text}<extra></extra>"), row=r, col=c)
                continue
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
