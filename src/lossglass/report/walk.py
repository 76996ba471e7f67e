"""Protocol 1, random walks and Monte Carlo (tables ``walk``, ``walk_energy_distance``, ``walk_msd``,
``walk_aging``, ``walk_summary``): energy along the walks, energy against distance, mean squared displacement and
the two-time aging quantities, each as data, a matplotlib drawer and a plotly drawer."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from ..protocols.walk import radius_words
from .base import PALETTE, Page, Panel, RunView, esc, finite, fmt, go_figure, text

Series = dict[str, pd.DataFrame]  # one frame per walk run, keyed by its label


def _per_label(t: pd.DataFrame | None) -> Series:
    if t is None or not len(t) or "label" not in t:
        return {}
    return {str(label): g for label, g in t.groupby("label", sort=False)}


def energy_data(view: RunView) -> Series:
    """Mean and standard deviation of the energy over walkers, per step, per walk run."""
    out = {}
    for label, g in _per_label(view.table("walk")).items():
        out[label] = g.groupby("step")["energy"].agg(["mean", "std"]).reset_index()
    return out


def energy_distance_data(view: RunView) -> Series:
    """Energy against distance from the start, binned (the study's table), per walk run."""
    return {k: g[["distance", "energy", "std"]].reset_index(drop=True)
            for k, g in _per_label(view.table("walk_energy_distance")).items()}


def msd_data(view: RunView) -> Series:
    """Mean squared displacement against step (positive values only: log axes), per walk run."""
    return {k: g[(g["t"] > 0) & (g["msd"] > 0)][["t", "msd"]].reset_index(drop=True)
            for k, g in _per_label(view.table("walk_msd")).items()}


def aging_data(view: RunView, n_tw: int = 6) -> dict[str, dict[int, pd.DataFrame]]:
    """Per walk run, up to ``n_tw`` waiting times t_w spread over those saved, each with Delta(t_w, t_w + t) and
    1 - C_norm against the lag t (the table's columns ``Delta`` and ``C_norm``)."""
    out: dict[str, dict[int, pd.DataFrame]] = {}
    for label, g in _per_label(view.table("walk_aging")).items():
        tws = sorted(g["tw"].unique())
        chosen = tws[:: max(1, int(np.ceil(len(tws) / n_tw)))]
        out[label] = {int(tw): g[g["tw"] == tw][["t", "Delta", "C_norm"]].assign(
            decorrelation=lambda x: 1 - x["C_norm"]).reset_index(drop=True) for tw in chosen}
    return out


def summary_data(view: RunView) -> pd.DataFrame | None:
    return view.table("walk_summary")


def radii(row: pd.Series) -> list[tuple[str, float, bool, float, float, float]]:
    """``(delta, median radius, lower bound?, censored share, 95% interval low, high)`` for each loss rise delta (the
    share of walkers that never crossed; a summary written before that column existed gives 1 - the share that
    crossed, and NaN intervals)."""
    out = []
    for c in row.index:
        if str(c).startswith("radius_") and str(c).endswith("_median"):
            d = str(c)[7:-7]
            cens = row.get(f"radius_{d}_censored", 1 - row.get(f"radius_{d}_reached", float("nan")))
            out.append((d, row[c], bool(row.get(f"radius_{d}_lower_bound", False)), float(cens),
                        float(row.get(f"radius_{d}_ci_low", float("nan"))),
                        float(row.get(f"radius_{d}_ci_high", float("nan")))))
    return out


# ------------------------------------------------------------------------------------------------ matplotlib
def _mpl_per_label(series: Series, draw, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, g) in enumerate(series.items()):
        draw(ax, g, PALETTE[i % 8], label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    return fig


def energy_mpl(series: Series):
    def draw(ax, m, color, label):
        ax.plot(m["step"], m["mean"], color=color, label=label)
        ax.fill_between(m["step"], m["mean"] - m["std"], m["mean"] + m["std"], color=color, alpha=0.2)

    return _mpl_per_label(series, draw, "step", "training loss E (nats)")


def energy_distance_mpl(series: Series):
    def draw(ax, g, color, label):
        ax.errorbar(g["distance"], g["energy"], yerr=g["std"].fillna(0), color=color, label=label, marker="o", ms=3,
                    capsize=2)

    return _mpl_per_label(series, draw, "distance from start |θ − θ₀|", "training loss E (nats)")


def msd_mpl(series: Series):
    def draw(ax, g, color, label):
        ax.loglog(g["t"], g["msd"], color=color, label=label)

    return _mpl_per_label(series, draw, "step t", "MSD ⟨|θ_t − θ₀|²⟩")


def _tw_colours(n: int) -> list:
    """``n`` distinct colours, ordered (early to late waiting time), none repeated."""
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.85, max(n, 1))]


def aging_mpl(data: dict[str, dict[int, pd.DataFrame]]):
    labels = list(data)
    fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels) + 1.2, 5.6), squeeze=False,
                             layout="constrained")
    same = len({tuple(c) for c in data.values()}) == 1
    for j, label in enumerate(labels):
        curves = data[label]
        for (tw, g), c in zip(curves.items(), _tw_colours(len(curves))):
            dl, dc = g[g["Delta"] > 0], g[g["decorrelation"] > 0]
            axes[0][j].loglog(dl["t"], dl["Delta"], color=c, marker=".", label=f"t_w = {tw}")
            axes[1][j].loglog(dc["t"], dc["decorrelation"], color=c, marker=".")
        axes[0][j].set_title(label, fontsize=9)
        axes[0][j].set_ylabel("Δ(t_w, t_w+t)")
        axes[1][j].set_ylabel("1 − C_norm(t_w, t_w+t)")
        axes[1][j].set_xlabel("lag t (steps)")
        for ax in axes[:, j]:  # lags are whole steps: plain numbers, not 2×10⁰
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if not same:  # waiting times differ between runs: a legend in each panel, inside it
            axes[0][j].legend(frameon=False, fontsize=7, loc="upper left")
    if same:  # one legend outside the panels, to the right: it never covers a neighbouring panel
        h, lab = axes[0][0].get_legend_handles_labels()
        fig.legend(h, lab, loc="outside right center", frameon=False, fontsize=8, title="waiting time")
    return fig


# ------------------------------------------------------------------------------------------------ plotly
def energy_traces(series: Series, colours: list[str] | None = None) -> list:
    import plotly.graph_objects as go

    out = []
    for i, (label, m) in enumerate(series.items()):
        c = (colours or PALETTE)[i % 8]
        lo, hi = (m["mean"] - m["std"].fillna(0)), (m["mean"] + m["std"].fillna(0))
        out.append(go.Scatter(x=np.concatenate([m["step"], m["step"][::-1]]), y=np.concatenate([hi, lo[::-1]]),
                              fill="toself", fillcolor=c, opacity=0.2, line={"width": 0}, hoverinfo="skip",
                              showlegend=False, legendgroup=text(label)))
        out.append(go.Scatter(x=m["step"], y=m["mean"], mode="lines", name=text(label), line={"color": c},
                              legendgroup=text(label), customdata=m["std"].fillna(0),
                              hovertemplate="step %{x}<br>E = %{y:.4g} ± %{customdata:.2g}<extra>%{fullData.name}</extra>"))
    return out


def energy_plotly(series: Series):
    return go_figure(energy_traces(series), xaxis={"title": {"text": "step"}},
                     yaxis={"title": {"text": "training loss E (nats)"}})


def energy_distance_traces(series: Series, color: str | None = None, prefix: str = "") -> list:
    """Energy against distance with error bars; ``color``/``prefix`` set when overlaying runs."""
    import plotly.graph_objects as go

    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    out = []
    for i, (label, g) in enumerate(series.items()):
        out.append(go.Scatter(
            x=g["distance"], y=g["energy"], mode="lines+markers", name=text(prefix + label),
            error_y={"type": "data", "array": g["std"].fillna(0).to_numpy(), "visible": True, "thickness": 1},
            line={"color": color or PALETTE[i % 8], "dash": dashes[i % 5] if color else "solid"},
            marker={"size": 5}, hovertemplate="|θ − θ₀| = %{x:.4g}<br>E = %{y:.4g}<extra>%{fullData.name}</extra>"))
    return out


def energy_distance_plotly(series: Series):
    return go_figure(energy_distance_traces(series), xaxis={"title": {"text": "distance from start |θ − θ₀|"}},
                     yaxis={"title": {"text": "training loss E (nats)"}})


def msd_plotly(series: Series):
    import plotly.graph_objects as go

    traces = [go.Scatter(x=g["t"], y=g["msd"], mode="lines+markers", name=text(label), marker={"size": 4},
                         line={"color": PALETTE[i % 8]}, hovertemplate="t = %{x}<br>MSD = %{y:.4g}<extra>%{fullData.name}"
                         "</extra>") for i, (label, g) in enumerate(series.items())]
    return go_figure(traces, xaxis={"title": {"text": "step t"}, "type": "log"},
                     yaxis={"title": {"text": "MSD ⟨|θ_t − θ₀|²⟩"}, "type": "log"})


def aging_plotly(data: dict[str, dict[int, pd.DataFrame]]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    labels = list(data)
    # one colour per waiting time across all panels (none repeated), one legend entry each
    tws = sorted({tw for curves in data.values() for tw in curves})
    colour = {tw: matplotlib.colors.to_hex(c) for tw, c in zip(tws, _tw_colours(len(tws)))}
    shown: set[int] = set()
    fig = make_subplots(rows=2, cols=len(labels), subplot_titles=[text(x) for x in labels], shared_xaxes=True,
                        vertical_spacing=0.08, horizontal_spacing=0.06)
    for j, label in enumerate(labels, start=1):
        for tw, g in data[label].items():
            for row, col, what in ((1, "Delta", "Δ"), (2, "decorrelation", "1 − C_norm")):
                gg = g[g[col] > 0]
                fig.add_trace(go.Scatter(x=gg["t"], y=gg[col], mode="lines+markers", marker={"size": 4},
                                         line={"color": colour[tw]}, name=f"t_w = {tw}", legendgroup=f"tw{tw}",
                                         showlegend=tw not in shown,
                                         hovertemplate=f"t_w = {tw}, lag %{{x}}<br>{what} = %{{y:.4g}}<extra></extra>"),
                              row=row, col=j)
                shown.add(tw)
        for row in (1, 2):
            fig.update_yaxes(type="log", row=row, col=j)
            fig.update_xaxes(type="log", row=row, col=j)
        fig.update_xaxes(title_text="lag t (steps)", row=2, col=j)
    fig.update_yaxes(title_text="Δ(t_w, t_w+t)", row=1, col=1)
    fig.update_yaxes(title_text="1 − C_norm", row=2, col=1)
    fig.update_layout(height=560, margin={"l": 60, "r": 20, "t": 40, "b": 50}, hovermode="closest",
                      legend={"title": {"text": "waiting time"}})
    fig.layout.template = None
    return fig


# ------------------------------------------------------------------------------------------------ captions
CAPTIONS = {
    "walk_energy": "Energy (mean training loss) along the walks, mean over walkers with a band of one standard "
                   "deviation. A plain walk climbs as it leaves the minimum; a Metropolis walk at temperature T "
                   "settles where uphill moves stop being accepted.",
    "walk_energy_distance": "Energy against distance from the starting solution, binned over all walkers and steps "
                            "(error bars: standard deviation in the bin). The distance at which the curve rises "
                            "gives the size of the basin.",
    "walk_msd": "Mean squared displacement on log-log axes. Free diffusion has slope 1 (MSD = σ² t P); a slope "
                "below 1 (sub-diffusion) means walkers are confined by the landscape.",
    "walk_aging": "Two-time quantities for several waiting times t_w (Baity-Jesi et al. 2018): top, the mean squared "
                  "distance Δ(t_w, t_w+t) = ⟨|θ(t_w+t) − θ(t_w)|²⟩/P; bottom, the decorrelation 1 − C_norm of the "
                  "normalised overlap θ(t_w)·θ(t_w+t)/(|θ(t_w)||θ(t_w+t)|). (The raw correlation θ·θ/P stays at "
                  "|θ|²/P near a trained minimum and hides the motion.) If the curves for different t_w lie on top "
                  "of each other the dynamics is stationary; if they shift to longer lags as t_w grows, the system "
                  "ages like a glass.",
}
TITLES = {"walk_energy": "Energy along the walks", "walk_energy_distance": "Energy against distance from the start",
          "walk_msd": "Mean squared displacement", "walk_aging": "Aging: two-time quantities"}


def _figures(view: RunView):
    """(name, data, matplotlib drawer, plotly drawer) of each figure this run has data for."""
    for name, data_fn, mpl, ply in (("walk_energy", energy_data, energy_mpl, energy_plotly),
                                    ("walk_energy_distance", energy_distance_data, energy_distance_mpl,
                                     energy_distance_plotly),
                                    ("walk_msd", msd_data, msd_mpl, msd_plotly),
                                    ("walk_aging", aging_data, aging_mpl, aging_plotly)):
        d = data_fn(view)
        if d:
            yield name, d, mpl, ply


def summary(view: RunView) -> list[tuple[str, str, str]]:
    s = summary_data(view)
    out = []
    if s is None:
        return out
    for _, row in s.iterrows():
        for d, med, lower, cens, lo, hi in radii(row)[:2]:
            value = radius_words(float(med), lower, cens, digits=4)
            if not lower and finite(lo):
                value += f", 95% interval {lo:.3g} to " + (f"{hi:.3g}" if finite(hi) else "∞ (too few crossings to "
                                                               "bound it above)")
            meaning = ("Kaplan–Meier median distance from the start at which the training loss first rises by "
                       f"{d} nats (walkers that never rose are kept, censored at their largest distance; the share "
                       "censored is given).")
            if lower:
                meaning += (" Fewer than half the walkers crossed: the basin is at least this wide (a lower bound, not "
                            "a measured radius).")
            out.append((f"Basin radius ({row['label']}, loss rise {d})", value, meaning))
        out.append((f"MSD exponent ({row['label']})", fmt(row["msd_alpha"]),
                    "1 = free diffusion; below 1 = walkers confined by the landscape."))
    return out


def section(page: Page) -> None:
    s = summary_data(page.view)
    if s is None:
        return
    page.h(2, "Protocol 1 — random walks and Monte Carlo", "walk")
    for name, d, mpl, _ in _figures(page.view):
        page.figure(name, mpl(d), esc(CAPTIONS[name]))
    page.df(s)
    for row in summary(page.view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    return [Panel(name, TITLES[name], CAPTIONS[name], ply(d), width="full" if name == "walk_aging" else "half")
            for name, d, _, ply in _figures(view)]


def overlay_traces(view: RunView, color: str, prefix: str) -> dict[str, list]:
    d = energy_distance_data(view)
    return {"energy_distance": energy_distance_traces(d, color, prefix)} if d else {}


def overview(view: RunView) -> dict:
    """The basin radius of the first walk run at the smallest loss rise: value, whether a lower bound, the share of
    walkers censored, and the words ("≥ 0.5 (100% censored, ΔE 0.01)")."""
    s = summary_data(view)
    if s is None or not len(s):
        return {}
    rs = radii(s.iloc[0])
    if not rs or not finite(rs[0][1]):
        return {}
    d, med, lower, cens, _, _ = rs[0]
    words = radius_words(float(med), lower, cens)
    return {"radius": float(med), "radius_lower_bound": lower, "radius_censored": cens,
            "radius_text": words[:-1] + f", ΔE {d})" if words.endswith(")") else words + f" (ΔE {d})"}
