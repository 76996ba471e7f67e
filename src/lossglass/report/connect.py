"""Protocol 2, permutations, barriers and connectivity (tables ``perm_barriers``, ``pair_barriers``, ``paths``,
``plane_random``, ``plane_through`` (+ ``_points``), ``width_barriers``): each figure as data, a matplotlib drawer
and a plotly drawer. Loss planes get a zoomable heatmap and a rotatable 3-D surface (Li et al. 2018) with the
replicas marked."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc, finite, fmt, go_figure, integer_ticks, text

#: barriers smaller than this fraction of the loss scale are rounding noise and shown as 0
NOISE = 1e-9


@dataclass
class PermData:
    """Barrier against the number of permuted units k (train and test), noise below ``NOISE * scale`` set to 0."""

    k: np.ndarray
    train: np.ndarray
    test: np.ndarray
    scale: float

    @property
    def limits(self) -> tuple[float, float]:
        """A y range that shows the barriers, or a small range of the loss scale when all of them are 0."""
        vals = np.concatenate([self.train, self.test])
        vals = vals[np.isfinite(vals)]
        lo = min(0.0, float(vals.min())) if len(vals) else 0.0
        hi = float(vals.max()) if len(vals) else 0.0
        if hi <= 0:
            hi = 0.05 * self.scale if self.scale > 0 else 1.0
        return lo - 0.05 * (hi - lo), hi * 1.1


def perm_data(view: RunView) -> PermData | None:
    t = view.table("perm_barriers")
    if t is None or not len(t):
        return None
    cols = [c for c in ("max_loss", "barrier", "barrier_test") if c in t]
    scale = float(np.nanmax(np.abs(t[cols].to_numpy(float)))) if cols else 0.0
    scale = scale if np.isfinite(scale) else 0.0

    def clean(col: str) -> np.ndarray:
        v = t[col].to_numpy(float) if col in t else np.full(len(t), np.nan)
        return np.where(np.abs(v) < NOISE * scale, 0.0, v)

    return PermData(t["k"].to_numpy(int), clean("barrier"), clean("barrier_test"), scale)


def paths_data(view: RunView) -> dict[str, pd.DataFrame]:
    """The paths of the first pair, per kind (naive, aligned, bezier): alpha, train and test loss."""
    p = view.table("paths")
    if p is None or not len(p):
        return {}
    p = p[p["pair"] == p["pair"].min()] if "pair" in p else p
    return {str(k): g[["alpha", "train_loss", "test_loss"]].reset_index(drop=True) for k, g in p.groupby("kind", sort=False)}


@dataclass
class PlaneData:
    """A loss plane: grid coordinates, train loss ``z[i_x, j_y]`` and the marked points (label -> (x, y, text))."""

    name: str
    title: str
    xs: np.ndarray
    ys: np.ndarray
    z: np.ndarray
    points: dict[str, tuple[float, float, str]]
    xlabel: str

    def z_at(self, x: float, y: float) -> float:
        """The loss at the grid point nearest (x, y) (where a marker sits on the surface)."""
        return float(self.z[int(np.abs(self.xs - x).argmin()), int(np.abs(self.ys - y).argmin())])


PLANES = (("plane_random", "random filter-normalised plane"), ("plane_through", "plane through A, B, aligned B"))


def plane_data(view: RunView, name: str) -> PlaneData | None:
    pl = view.table(name)
    if pl is None or not len(pl):
        return None
    grid = pl.pivot_table(index="x", columns="y", values="train_loss", aggfunc="first")
    ids = view.alive_ids()

    def rid(i: int) -> str:
        return f"replica {ids[i]}" if i < len(ids) else ""

    if name == "plane_through":
        ptab = view.table("plane_through_points")
        names = {"A": ("A", rid(0)), "B": ("B", rid(1)), "C": ("aligned B", rid(1))}
        pts = {} if ptab is None else {
            names.get(str(r.label), (str(r.label), ""))[0]: (float(r.x), float(r.y), names.get(str(r.label), ("", ""))[1])
            for r in ptab.itertuples()}
        xlabel = "direction 1 (units of |B − A|)"
    else:
        pts = {"centre": (0.0, 0.0, rid(0))}
        xlabel = "direction 1 (filter-normalised)"
    title = dict(PLANES)[name]
    return PlaneData(name, title, grid.index.to_numpy(float), grid.columns.to_numpy(float), grid.to_numpy(float), pts,
                     xlabel)


def width_data(view: RunView) -> tuple[pd.DataFrame, dict] | None:
    """Mean barriers per width, and the fitted exponent of the aligned barrier ~ m^(-beta): read from the table
    ``width_barrier_fit`` that the connect stage writes (made here for older folders)."""
    wb = view.table("width_barriers")
    if wb is None or not len(wb) or "barrier_aligned" not in wb:
        return None
    g = wb.groupby("width")[["barrier_naive", "barrier_aligned"]].mean()
    fit_t = view.table("width_barrier_fit")
    if fit_t is not None and len(fit_t) and "beta" in fit_t:
        fit = {"beta": float(fit_t["beta"].iloc[0]), "c": float(fit_t["c"].iloc[0]) if "c" in fit_t else float("nan")}
    else:  # run folders written before the connect stage saved its fit
        from ..stages.connect import width_fit_table

        t = width_fit_table(wb)
        fit = {"beta": float(t["beta"].iloc[0]), "c": float(t["c"].iloc[0])}
    return g, fit


# ------------------------------------------------------------------------------------------------ matplotlib
def perm_mpl(d: PermData):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(d.k, d.train, "o-", label="train")
    ax.plot(d.k, d.test, "s--", label="test")
    ax.set_ylim(*d.limits)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    integer_ticks(ax)
    ax.set_xlabel("number of permuted hidden units k")
    ax.set_ylabel("loss barrier (nats)")
    ax.legend(frameon=False)
    return fig


def paths_mpl(d: dict[str, pd.DataFrame]):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (kind, g) in enumerate(d.items()):
        ax.plot(g["alpha"], g["train_loss"], color=PALETTE[i % 8], label=f"{kind} (train)")
        ax.plot(g["alpha"], g["test_loss"], color=PALETTE[i % 8], ls="--", label=f"{kind} (test)")
    ax.set_xlabel("position along path t (A at 0, B at 1)")
    ax.set_ylabel("loss (nats)")
    ax.legend(frameon=False, fontsize=8)
    return fig


def _log10(z: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(z, 1e-6, None))


def plane_mpl(d: PlaneData):
    fig, ax = plt.subplots(figsize=(5, 4))
    zc = _log10(d.z)
    cs = ax.contourf(d.xs, d.ys, zc.T, levels=20)
    ax.contour(d.xs, d.ys, zc.T, levels=10, colors="k", linewidths=0.4)
    fig.colorbar(cs, ax=ax, label="log10 training loss")
    for lbl, (px, py, _) in d.points.items():
        ax.plot(px, py, "w*", ms=10, mec="k")
        ax.annotate(lbl, (px, py), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel(d.xlabel)
    ax.set_ylabel("direction 2")
    return fig


def width_mpl(d: tuple[pd.DataFrame, dict]):
    g, _ = d
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.loglog(g.index, g["barrier_naive"].clip(lower=1e-6), "o-", label="naive")
    ax.loglog(g.index, g["barrier_aligned"].clip(lower=1e-6), "s-", label="aligned")
    ax.set_xlabel("hidden width m")
    ax.set_ylabel("loss barrier (nats)")
    ax.legend(frameon=False)
    return fig


# ------------------------------------------------------------------------------------------------ plotly
def perm_traces(d: PermData, color: str | None = None, prefix: str = "") -> list:
    import plotly.graph_objects as go

    out = []
    for i, (what, y, dash, sym) in enumerate((("train", d.train, "solid", "circle"), ("test", d.test, "dash", "square"))):
        out.append(go.Scatter(x=d.k, y=y, mode="lines+markers", name=text(prefix + what),
                              line={"color": color or PALETTE[i], "dash": dash}, marker={"symbol": sym, "size": 7},
                              hovertemplate="k = %{x}<br>barrier = %{y:.4g} nats<extra>%{fullData.name}</extra>"))
    return out


def perm_plotly(d: PermData):
    return go_figure(perm_traces(d), xaxis={"title": {"text": "number of permuted hidden units k"}, "dtick": 1},
                     yaxis={"title": {"text": "loss barrier (nats)"}, "range": list(d.limits)})


def paths_plotly(d: dict[str, pd.DataFrame]):
    import plotly.graph_objects as go

    traces = []
    for i, (kind, g) in enumerate(d.items()):
        for split, dash in (("train", "solid"), ("test", "dash")):
            traces.append(go.Scatter(x=g["alpha"], y=g[f"{split}_loss"], mode="lines", name=f"{text(kind)} ({split})",
                                     line={"color": PALETTE[i % 8], "dash": dash},
                                     hovertemplate="t = %{x:.3f}<br>" + split + " loss = %{y:.4g}<extra>"
                                     "%{fullData.name}</extra>"))
    return go_figure(traces, xaxis={"title": {"text": "position along path t (A at 0, B at 1)"}},
                     yaxis={"title": {"text": "loss (nats)"}})


def _marks(d: PlaneData) -> tuple[list, list, list, list]:
    xs, ys, labels, hover = [], [], [], []
    for lbl, (px, py, who) in d.points.items():
        xs.append(px)
        ys.append(py)
        labels.append(text(lbl))
        hover.append(text(f"{lbl}{' (' + who + ')' if who else ''}: loss {d.z_at(px, py):.4g}"))
    return xs, ys, labels, hover


def plane_heatmap_plotly(d: PlaneData):
    import plotly.graph_objects as go

    mx, my, labels, hover = _marks(d)
    traces = [go.Heatmap(x=d.xs, y=d.ys, z=_log10(d.z).T, customdata=d.z.T, colorscale="Viridis", zsmooth="best",
                         colorbar={"title": {"text": "log10 loss"}},
                         hovertemplate="x = %{x:.3f}, y = %{y:.3f}<br>loss = %{customdata:.4g}<extra></extra>"),
              go.Contour(x=d.xs, y=d.ys, z=_log10(d.z).T, contours={"coloring": "none"}, line={"width": 0.6,
                         "color": "black"}, ncontours=10, showscale=False, hoverinfo="skip"),
              go.Scatter(x=mx, y=my, mode="markers+text", text=labels, textposition="top right", hovertext=hover,
                         hoverinfo="text", marker={"symbol": "star", "size": 14, "color": "white",
                                                   "line": {"color": "black", "width": 1}},
                         textfont={"color": "white"}, name="replicas", showlegend=False)]
    return go_figure(traces, xaxis={"title": {"text": d.xlabel}}, yaxis={"title": {"text": "direction 2"}},
                     height=420, showlegend=False)


def plane_surface_plotly(d: PlaneData):
    import plotly.graph_objects as go

    mx, my, labels, hover = _marks(d)
    mz = [d.z_at(x, y) for x, y in zip(mx, my)]
    lift = 0.04 * float(np.nanmax(d.z) - np.nanmin(d.z)) if np.isfinite(d.z).any() else 0.0
    traces = [go.Surface(x=d.xs, y=d.ys, z=d.z.T, surfacecolor=_log10(d.z).T, colorscale="Viridis",
                         colorbar={"title": {"text": "log10 loss"}}, opacity=0.95,
                         contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}, "width": 1}},
                         hovertemplate="x = %{x:.3f}, y = %{y:.3f}<br>loss = %{z:.4g}<extra></extra>"),
              go.Scatter3d(x=mx, y=my, z=[z + lift for z in mz], mode="markers+text", text=labels, hovertext=hover,
                           hoverinfo="text", textposition="top center", textfont={"size": 13, "color": "black"},
                           marker={"size": 7, "color": "#D55E00", "symbol": "diamond", "line": {"color": "black",
                                                                                                 "width": 1}},
                           name="replicas", showlegend=False)]
    fig = go_figure(traces, height=480, margin={"l": 0, "r": 0, "t": 10, "b": 0})
    fig.update_layout(scene={"xaxis": {"title": {"text": "direction 1"}}, "yaxis": {"title": {"text": "direction 2"}},
                             "zaxis": {"title": {"text": "training loss"}}, "camera": {"eye": {"x": 1.5, "y": -1.5, "z": 1.0}},
                             "aspectmode": "manual", "aspectratio": {"x": 1, "y": 1, "z": 0.7}})
    return fig


def width_plotly(d: tuple[pd.DataFrame, dict]):
    import plotly.graph_objects as go

    g, _ = d
    traces = [go.Scatter(x=g.index, y=g[c].clip(lower=1e-6), mode="lines+markers", name=n, line={"color": PALETTE[i]},
                         hovertemplate="m = %{x}<br>barrier = %{y:.4g}<extra>" + n + "</extra>")
              for i, (c, n) in enumerate((("barrier_naive", "naive"), ("barrier_aligned", "aligned")))]
    return go_figure(traces, xaxis={"title": {"text": "hidden width m"}, "type": "log"},
                     yaxis={"title": {"text": "loss barrier (nats)"}, "type": "log"})


# ------------------------------------------------------------------------------------------------ captions
PERM_CAPTION = ("Permutation-interpolation (the paper's protocol 2): the loss barrier on the straight line between a "
                "solution and a copy of it with k hidden units permuted. The copy computes the same function, so any "
                "barrier comes from the path leaving the minimum. Barriers below 10⁻⁹ of the loss scale are "
                "rounding noise and shown as 0.")
PATHS_CAPTION = ("Paths between two independently trained replicas A and B: the straight line (naive), the straight "
                 "line after permuting B's hidden units to match A (aligned), and a quadratic Bezier curve with a "
                 "trained middle point. A low curve where the line is high means the minima are connected, but not in "
                 "a straight line.")


def plane_caption(d: PlaneData) -> str:
    return (f"Training loss on the {d.title} (log colour scale, contours). Every grid point was evaluated as one "
            "replica of a single batch.")


def width_caption(fit: dict) -> str:
    return ("Barrier between independent solutions against width, before and after alignment. Fitted aligned "
            f"barrier ~ m^(-β) with β = {fit['beta']:.2f} (theory for two-layer ReLU networks: β = 1/2, Zhan, Li & "
            "Wu 2025).")


def summary(view: RunView) -> list[tuple[str, str, str]]:
    out = []
    perm = perm_data(view)
    if perm is None:
        return out
    out.append(("Permutation barrier (largest k)", fmt(float(perm.train[-1])),
                "Loss rise midway between a network and its own permuted copy: the copies are walled off if large."))
    pairs = view.table("pair_barriers")
    if pairs is not None and "barrier_aligned" in pairs:
        out.append(("Barrier between replicas, naive → aligned",
                    f"{pairs['barrier_naive'].mean():.4g} → {pairs['barrier_aligned'].mean():.4g}",
                    "Mean loss barrier between independent solutions before and after removing the permutation "
                    "symmetry; a drop means most of the wall was only a permutation."))
    w = width_data(view)
    if w is not None:
        out.append(("Width exponent β (aligned barrier ~ m^-β)", fmt(w[1]["beta"]),
                    "How fast the barrier between aligned solutions vanishes as networks widen."))
    return out


def section(page: Page) -> None:
    view = page.view
    perm = perm_data(view)
    if perm is None:
        return
    page.h(2, "Protocol 2 — permutations, barriers and connectivity", "connect")
    page.figure("perm_barriers", perm_mpl(perm), esc(PERM_CAPTION))
    page.df(view.table("perm_barriers"))
    paths = paths_data(view)
    if paths:
        page.figure("paths", paths_mpl(paths), esc(PATHS_CAPTION))
    pairs = view.table("pair_barriers")
    if pairs is not None:
        page.df(pairs)
    for name, _ in PLANES:
        d = plane_data(view, name)
        if d is not None:
            page.figure(name, plane_mpl(d), esc(plane_caption(d)))
    w = width_data(view)
    if w is not None:
        page.figure("width_barriers", width_mpl(w), esc(width_caption(w[1])))
        page.df(view.table("width_barriers"))
    for row in summary(view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    out = []
    perm = perm_data(view)
    if perm is not None:
        out.append(Panel("perm_barriers", "Permutation barriers", PERM_CAPTION, perm_plotly(perm), width="half"))
    paths = paths_data(view)
    if paths:
        out.append(Panel("paths", "Paths between two replicas", PATHS_CAPTION + " Hover for the loss along each path.",
                         paths_plotly(paths), width="half"))
    for name, _ in PLANES:
        d = plane_data(view, name)
        if d is None:
            continue
        cap = plane_caption(d)
        out.append(Panel(f"{name}_heatmap", f"Loss on the {d.title}: heatmap", cap + " Drag to zoom, double-click to "
                         "reset.", plane_heatmap_plotly(d), width="half"))
        out.append(Panel(f"{name}_surface", f"Loss on the {d.title}: 3-D surface", cap + " Drag to rotate; the "
                         "replicas are marked.", plane_surface_plotly(d), width="half"))
    w = width_data(view)
    if w is not None:
        out.append(Panel("width_barriers", "Barrier against width", width_caption(w[1]), width_plotly(w), width="half"))
    return out


def overlay_traces(view: RunView, color: str, prefix: str) -> dict[str, list]:
    d = perm_data(view)
    return {"perm_barriers": perm_traces(d, color, prefix)} if d is not None else {}


def overview(view: RunView) -> dict:
    """The mean barrier between aligned independent solutions."""
    pairs = view.table("pair_barriers")
    if pairs is None or not len(pairs) or "barrier_aligned" not in pairs:
        return {}
    v = float(pairs["barrier_aligned"].mean())
    return {"barrier_aligned": v} if finite(v) else {}
