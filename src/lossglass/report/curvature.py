"""Protocol 4, curvature, flatness and generalisation (tables ``flatness``, ``kendall``, ``spectral_density``):
each flatness measure against the generalisation gap, and the Hessian spectral densities, each as data, a matplotlib
drawer and a plotly drawer. In the dashboard the scatter's points carry their replica id: a click highlights that
replica everywhere on the page."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc, finite, go_figure, text


def _measures() -> tuple[str, ...]:
    from ..protocols.curvature import MEASURES

    return MEASURES


@dataclass
class FlatnessData:
    """One row per replica: its id, training group, gap (in % of accuracy) and every flatness measure saved."""

    table: pd.DataFrame
    measures: list[str]
    groups: dict[int, str]  # group -> legend label

    def log_x(self, m: str) -> bool:
        """Log axis for eigenvalue-like measures spread over more than a factor 30."""
        v = self.table[m]
        return m in ("lambda_max", "hessian_trace") and bool((v > 0).all()) and v.max() / max(v.min(), 1e-12) > 30


def flatness_data(view: RunView) -> FlatnessData | None:
    f = view.table("flatness")
    if f is None or not len(f) or "gap_error" not in f:
        return None
    ms = [m for m in _measures() if m in f]
    t = f.copy()
    t["group"] = t["group"] if "group" in t else 0
    t["replica"] = t["replica"].astype(int) if "replica" in t else np.arange(len(t))
    t["gap_pct"] = t["gap_error"] * 100
    groups = {}
    for g in sorted(t["group"].unique()):
        row = t[t["group"] == g].iloc[0]
        groups[g] = (f"{row['method']}, batch {int(row['batch_size'])}" if "method" in t and "batch_size" in t
                     else f"group {g}")
    return FlatnessData(t.reset_index(drop=True), ms, groups)


def flatness_columns(d: FlatnessData) -> pd.DataFrame:
    """The flatness table without the training columns the replicas table already shows: replica, group, the gaps
    and the measures (with their standard errors and radii)."""
    t = d.table
    keep = ["replica", "group", "gap_error", "gap_loss", "test_error"]
    extra = [c for c in t.columns if any(c == m or c.startswith(m + "_") for m in d.measures)]
    extra += [c for c in ("sharpness_radius",) if c in t and c not in extra]
    return t[[c for c in keep if c in t] + extra]


def spectral_data(view: RunView) -> dict[str, pd.DataFrame]:
    """Eigenvalue density per label (flattest, sharpest), with the replica id it was measured on."""
    sd = view.table("spectral_density")
    if sd is None or not len(sd):
        return {}
    f = view.table("flatness")
    out = {}
    for lbl, g in sd.groupby("label", sort=False):
        idx = int(g["replica"].iloc[0])
        rid = int(f["replica"].iloc[idx]) if f is not None and "replica" in f and 0 <= idx < len(f) else idx
        out[f"{lbl} (replica {rid})"] = g[["eigenvalue", "density"]].reset_index(drop=True)
    return out


def declared_measure(view: RunView) -> str:
    """The flatness measure declared in advance (config ``select.measure``), the one ``lossglass select`` uses."""
    sel = view.config.get("select", {})
    return str(sel.get("measure", "sharpness_average")) if isinstance(sel, dict) else "sharpness_average"


def best_predictor(view: RunView) -> pd.Series | None:
    """The Kendall row (target: the gap) of the measure declared in advance (``select.measure``), the same measure
    ``lossglass select`` ranks by; picking the largest tau on these replicas would be a winner's curse."""
    k = view.table("kendall")
    if k is None or "target" not in k:
        return None
    kk = k[(k["target"] == "gap_error") & (k["measure"] == declared_measure(view))]
    return kk.iloc[0] if len(kk) else None


def largest_tau(view: RunView) -> pd.Series | None:
    """The measure with the largest positive tau with the gap on these replicas (exploratory: chosen on the data)."""
    k = view.table("kendall")
    if k is None or "target" not in k:
        return None
    kk = k[(k["target"] == "gap_error") & np.isfinite(k["kendall_tau"])]
    return kk.iloc[int(kk["kendall_tau"].argmax())] if len(kk) else None


# ------------------------------------------------------------------------------------------------ matplotlib
def flatness_mpl(d: FlatnessData):
    f, ms = d.table, d.measures
    cols = 4
    rows = max(1, (len(ms) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, layout="constrained")
    for ax, m in zip(axes.ravel(), ms):
        for i, (g, label) in enumerate(d.groups.items()):
            sel = f["group"] == g
            ax.scatter(f.loc[sel, m], f.loc[sel, "gap_pct"], s=14, color=PALETTE[i % 8], label=label)
        ax.set_xlabel(m)
        ax.set_ylabel("generalisation gap (%)")
        if d.log_x(m):
            ax.set_xscale("log")
    for ax in axes.ravel()[len(ms):]:
        ax.axis("off")
    axes[0][0].legend(frameon=False, fontsize=7)
    return fig


def spectral_mpl(d: dict[str, pd.DataFrame]):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (lbl, g) in enumerate(d.items()):
        ax.semilogy(g["eigenvalue"], g["density"].clip(lower=1e-8), color=PALETTE[i % 8], label=lbl)
    ax.set_xlabel("Hessian eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    ax.legend(frameon=False)
    return fig


# ------------------------------------------------------------------------------------------------ plotly
def flatness_traces(d: FlatnessData, m: str, color: str | None = None, prefix: str = "", legend: bool = True) -> list:
    """One scatter per training group (or one in ``color`` when overlaying runs); points carry the replica id."""
    import plotly.graph_objects as go

    out = []
    for i, (g, label) in enumerate(d.groups.items()):
        sel = d.table[d.table["group"] == g]
        name = (prefix + label if len(d.groups) > 1 else prefix.rstrip(": ")) if prefix else label
        out.append(go.Scatter(
            x=sel[m], y=sel["gap_pct"], mode="markers", customdata=[int(r) for r in sel["replica"]],
            name=text(name), legendgroup=text(name), showlegend=legend,
            marker={"size": 9, "color": color or PALETTE[i % 8], "symbol": ["circle", "square", "diamond",
                                                                            "triangle-up"][i % 4] if color else "circle",
                    "line": {"color": "white", "width": 0.5}},
            selected={"marker": {"size": 14, "color": PALETTE[3]}}, unselected={"marker": {"opacity": 0.3}},
            hovertemplate="replica %{customdata}<br>" + m + " = %{x:.4g}<br>gap = %{y:.2f}%<extra>%{fullData.name}"
                          "</extra>"))
    return out


def flatness_plotly(d: FlatnessData):
    from plotly.subplots import make_subplots

    ms = d.measures
    cols = min(4, max(1, len(ms)))
    rows = max(1, (len(ms) + cols - 1) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.07, vertical_spacing=0.16)
    for i, m in enumerate(ms):
        r, c = i // cols + 1, i % cols + 1
        for tr in flatness_traces(d, m, legend=i == 0):
            fig.add_trace(tr, row=r, col=c)
        fig.update_xaxes(title_text=m, type="log" if d.log_x(m) else None, row=r, col=c)
        fig.update_yaxes(title_text="gap (%)" if c == 1 else None, row=r, col=c)
    fig.update_layout(height=260 * rows + 60, margin={"l": 60, "r": 20, "t": 30, "b": 50}, hovermode="closest",
                      legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0})
    fig.layout.template = None
    return fig


def spectral_traces(d: dict[str, pd.DataFrame], color: str | None = None, prefix: str = "") -> list:
    import plotly.graph_objects as go

    dashes = ["solid", "dash", "dot", "dashdot"]
    return [go.Scatter(x=g["eigenvalue"], y=g["density"].clip(lower=1e-8), mode="lines", name=text(prefix + lbl),
                       line={"color": color or PALETTE[i % 8], "dash": dashes[i % 4] if color else "solid"},
                       hovertemplate="λ = %{x:.4g}<br>density = %{y:.3g}<extra>%{fullData.name}</extra>")
            for i, (lbl, g) in enumerate(d.items())]


def spectral_plotly(d: dict[str, pd.DataFrame]):
    return go_figure(spectral_traces(d), xaxis={"title": {"text": "Hessian eigenvalue λ"}},
                     yaxis={"title": {"text": "density (log scale)"}, "type": "log"})


# ------------------------------------------------------------------------------------------------ sections
FLATNESS_CAPTION = ("Each flatness measure against the generalisation gap (train accuracy − test accuracy), one point "
                    "per replica, coloured by training group (batch size / method). A measure that predicts "
                    "generalisation orders the points from bottom-left to top-right.")
SPECTRAL_CAPTION = ("Hessian eigenvalue density (stochastic Lanczos quadrature) of the flattest and the sharpest "
                    "replica (by top eigenvalue). Sharp minima have outliers far to the right.")
KENDALL_TEXT = ("Kendall's τ between each measure and the generalisation gap across replicas, with a 95% bootstrap "
                "interval (Jiang et al. 2020). Positive: sharper minima generalise worse (local entropy is negated so "
                "the sign reads the same).")


def summary(view: RunView) -> list[tuple[str, str, str]]:
    best = best_predictor(view)
    if best is None:
        return []
    lo, hi = best["ci_low"], best["ci_high"]
    if lo > 0:
        words = "sharper replicas generalise worse on this run: the interval excludes 0."
    elif hi < 0:
        words = "sharper replicas generalise better on this run, against the usual claim: the interval excludes 0."
    else:
        words = "no detectable association with the gap on this run: the interval includes 0."
    rows = [("Flatness and the gap (declared measure, Kendall τ)",
             f"{best['measure']}: {best['kendall_tau']:+.3f} [{lo:+.2f}, {hi:+.2f}]",
             f"Rank agreement of the measure declared in advance (select.measure) with the generalisation gap; {words}")]
    top = largest_tau(view)
    if top is not None and top["measure"] != best["measure"]:
        rows.append(("Largest τ on these replicas (exploratory)",
                     f"{top['measure']}: {top['kendall_tau']:+.3f} [{top['ci_low']:+.2f}, {top['ci_high']:+.2f}]",
                     "Chosen because it is the largest here, so its interval is optimistic (a winner's curse); test it "
                     "as the declared measure on new replicas before relying on it."))
    return rows


def section(page: Page) -> None:
    view = page.view
    d = flatness_data(view)
    if d is None:
        return
    page.h(2, "Protocol 4 — curvature, flatness and generalisation", "curvature")
    page.figure("flatness_vs_gap", flatness_mpl(d), esc(FLATNESS_CAPTION))
    sd = spectral_data(view)
    if sd:
        page.figure("spectral_density", spectral_mpl(sd), esc(SPECTRAL_CAPTION))
    k = view.table("kendall")
    if k is not None:
        page.p(esc(KENDALL_TEXT))
        page.df(k)
    for row in summary(view):
        page.add_summary(*row)
    page.p("Flatness measures of every replica (its training settings and accuracies are in the replicas table "
           "above).")
    page.df(flatness_columns(d), max_rows=40)


def panels(view: RunView) -> list[Panel]:
    out = []
    d = flatness_data(view)
    if d is not None and d.measures:
        out.append(Panel("flatness_vs_gap", "Flatness against the generalisation gap", FLATNESS_CAPTION + " Hover a "
                         "point for its replica; click it to highlight that replica everywhere on this page.",
                         flatness_plotly(d), link="net"))
    sd = spectral_data(view)
    if sd:
        out.append(Panel("spectral_density", "Hessian spectral density", SPECTRAL_CAPTION, spectral_plotly(sd),
                         width="half"))
    return out


def overlay_traces(view: RunView, color: str, prefix: str) -> dict:
    out: dict = {}
    d = flatness_data(view)
    if d is not None:
        out["flatness"] = {m: flatness_traces(d, m, color, prefix) for m in d.measures}
    sd = spectral_data(view)
    if sd:
        out["spectral_density"] = spectral_traces(sd, color, prefix)
    return out


def overview(view: RunView) -> dict:
    best = best_predictor(view)
    if best is None or not finite(best["kendall_tau"]):
        return {}
    tau = float(best["kendall_tau"])
    lo, hi = best.get("ci_low", np.nan), best.get("ci_high", np.nan)
    ci = f" [{lo:.2f}, {hi:.2f}]" if finite(lo) and finite(hi) else ""
    # the declared measure predicts the gap only when tau > 0 and its 95% interval excludes 0 (issue 28, item 8)
    predicts = tau > 0 and finite(lo) and lo > 0
    label = (f"{best['measure']} (τ = {tau:.2f}{ci})" if predicts
             else f"none: declared {best['measure']} has τ = {tau:.2f}{ci}")
    return {"predictor": label, "predictor_tau": tau}
