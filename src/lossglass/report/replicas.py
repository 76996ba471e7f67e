"""Protocol 3, overlaps, the Parisi tree and ultrametricity (tables ``replica_summary``, ``pq`` and, from the
reference stage, ``reference_summary``, ``reference_pq``; per system ``linkage_*``, ``overlaps_*``, ``order_*``,
``triangles_*``): P(q), and per system the dendrogram, the Parisi matrix (overlaps in leaf order) and the triangles,
each as data, a matplotlib drawer and a plotly drawer. In the dashboard the dendrogram and the Parisi matrix are
linked by replica."""

from __future__ import annotations

import html
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..protocols.replicas import verdict_label
from .base import PALETTE, Page, Panel, RunView, finite, go_figure, text


def _both(view: RunView, a: str, b: str) -> pd.DataFrame | None:
    parts = [t for t in (view.table(a), view.table(b)) if t is not None]
    return pd.concat(parts, ignore_index=True) if parts else None


def summary_table(view: RunView) -> pd.DataFrame | None:
    """The network's systems and, where the study ran them, the reference systems: one row each."""
    return _both(view, "replica_summary", "reference_summary")


def pq_data(view: RunView) -> list[tuple[str, dict[str, np.ndarray]]]:
    """P(q) samples per label, in two panels: the network's systems and the reference systems."""
    pq = _both(view, "pq", "reference_pq")
    if pq is None or not len(pq):
        return []
    labels = [str(x) for x in dict.fromkeys(pq["label"])]
    samples = {lbl: pq[pq["label"] == lbl]["q"].to_numpy(float) for lbl in labels}
    net = {k: v for k, v in samples.items() if k.startswith("network")}
    ref = {k: v for k, v in samples.items() if not k.startswith("network")}
    return [(title, d) for title, d in (("the network", net), ("reference systems", ref)) if d]


@dataclass
class TreeData:
    """One system's tree: linkage, overlap matrix, leaf order, triangles, and the id of each replica (the run's
    replica ids for the network's independent solutions; sample indices otherwise). ``link`` groups the panels
    whose replicas are the same objects."""

    label: str
    system: str
    linkage: np.ndarray
    q: np.ndarray
    order: list[int]
    triangles: pd.DataFrame | None
    ids: list[int]
    link: str
    sentence: str


def tree_data(view: RunView) -> list[TreeData]:
    s = summary_table(view)
    if s is None:
        return []
    alive = view.alive_ids()
    out = []
    for _, row in s.iterrows():
        lbl = row.get("label", row["system"])
        if not isinstance(lbl, str) or not view.store.has_table(f"linkage_{lbl}"):
            continue
        lk, ov, order = (view.table(f"{kind}_{lbl}") for kind in ("linkage", "overlaps", "order"))
        if lk is None or ov is None or order is None:
            continue
        k = int(ov["a"].max()) + 1
        q = ov["q"].to_numpy(float).reshape(k, k)
        network = lbl.startswith("network") and lbl != "network-basin" and len(alive) == k
        ids = alive if network else list(range(k))
        sentence = row.get("sentence") if isinstance(row.get("sentence"), str) else ""
        out.append(TreeData(lbl, str(row["system"]), lk[["left", "right", "height", "size"]].to_numpy(float), q,
                            [int(i) for i in order["leaf"]], view.table(f"triangles_{lbl}"), ids,
                            "net" if network else f"tree-{lbl}", sentence))
    return out


# ------------------------------------------------------------------------------------------------ captions
def pq_caption(s: pd.DataFrame, pq: list[tuple[str, dict[str, np.ndarray]]]) -> str:
    """What the P(q) panels show, in words chosen from the numbers."""
    parts = []
    rows = {str(x["system"]): x for _, x in s.iterrows()}
    ind = rows.get("network-aligned") if "network-aligned" in rows else rows.get("network-raw")
    basin = rows.get("network-basin")
    if ind is not None:
        parts.append(f"Independent solutions ({ind['system']}): q = {ind['q_mean']:.3f} ± {np.sqrt(ind['q_var']):.3f} "
                     f"over {int(ind['pairs'])} pairs")
    if basin is not None:
        eq = basin.get("equilibrated")
        state = ("" if eq is None or (isinstance(eq, float) and np.isnan(eq)) else
                 " (equilibrated)" if bool(eq) else " (not yet equilibrated: the chains were still drifting, so this q "
                 "is an upper bound on the basin's equilibrium overlap; raise replicas.basin_sweeps)")
        parts.append(f"samples at T = {basin.get('temperature', float('nan')):g} started inside one basin{state}: "
                     f"q = {basin['q_mean']:.4f} ± {np.sqrt(basin['q_var']):.4f}")
        if ind is not None:
            gap = basin["q_mean"] - ind["q_mean"]
            parts.append("so independent solutions are much further apart than the thermal fluctuations of one basin "
                         "(they sit in different basins)" if gap > 3 * np.sqrt(max(ind["q_var"], 1e-30))
                         else "comparable to the spread between independent solutions (one broad basin)")
    samples = {k: v for _, d in pq for k, v in d.items()}
    for label in sorted(samples):
        if not label.startswith("SK"):
            continue
        q = samples[label]
        t = float(label.split("=")[1].split("(")[0])
        low = np.mean(np.abs(q) < 0.3)
        if t < 1:
            parts.append(f"{label}, below T_c = 1: |q| spreads over [0, {np.percentile(np.abs(q), 99):.2f}] with "
                         f"{low * 100:.0f}% of |q| below 0.3 (weight between the peaks at ±q_EA: full replica "
                         "symmetry breaking)" if low > 0.02 else f"{label}: two peaks at ±{np.abs(q).mean():.2f} "
                         f"and only {low * 100:.1f}% of |q| below 0.3")
        else:
            parts.append(f"{label}, above T_c: one peak at {q.mean():+.3f} of sd {q.std():.3f} (a paramagnet)")
    for _, x in s.iterrows():
        if "threshold" in str(x["system"]):
            same = ""
            runs, distinct = x.get("descent_runs"), x.get("distinct_minima")
            if runs is not None and np.isfinite(runs) and distinct < runs:
                same = (f" over {int(distinct)} distinct minima ({int(runs - distinct)} of {int(runs)} descent runs "
                        "ended in a minimum another run had found, and were counted once)")
            parts.append(f"{x['system']}: q = {x['q_mean']:+.3f} ± {np.sqrt(x['q_var']):.3f}{same}; minima reached "
                         "by gradient descent, not equilibrium states: they say nothing about replica symmetry")
        if "convex" in str(x["system"]):
            parts.append(f"{x['system']}: one narrow peak at q = {x['q_mean']:.3f} (sd {np.sqrt(x['q_var']):.3f})")
    return "Distribution of overlaps P(q) between pairs of replicas. " + "; ".join(parts) + "."


TREE_CAPTION = ("left, the hierarchical clustering of replicas; middle, the overlap matrix reordered by the tree (blocks "
                "on the diagonal are clusters of similar solutions); right, every triangle's middle side against its "
                "largest side (ultrametric sets lie on the diagonal).")


def method_text(s: pd.DataFrame) -> str:
    """How the table of systems and the verdicts read (with the significance level the study used)."""
    alpha = s["alpha"].dropna().iloc[0] if "alpha" in s and s["alpha"].notna().any() else 0.01
    return ("Side by side: the network's replicas (aligned, raw, by predictions, and equilibrium samples inside one "
            "basin), and where the study ran them, the SK spin glass in equilibrium (parallel tempering), the spherical "
            "p-spin's descent minima and a convex control. K is the Katzgraber–Hartmann index (d_max − d_mid)/σ(d) "
            "averaged over triangles (± its jackknife error); ultrametric sets have K near 0. The null keeps "
            "everything that is not clusters: the same replicas mixed by a random rotation of replica space (same Gram "
            "spectrum: dimension, anisotropy), their overlaps mapped onto the data's own P(q) (tails included), each "
            "replica's overlap scale and norm; z and the one-sided p-value compare K with it at "
            f"α = {alpha:g}. Verdicts: 'clusters (one level)' when K is significantly below the null and the top-level "
            "clusters hold no structure of their own (as one-step RSB), 'nested (k levels)' when the same test finds "
            "clusters within the clusters k − 1 times (as a Parisi tree), 'at least' when the next level down had "
            "clusters too small to test, 'no evidence', 'trivial' (nearly equal distances) and 'cannot tell' (no "
            "calibrated null: fewer than 6 distinct replicas, or distances of no Euclidean configuration); replicas "
            "that coincide (the same state twice) are counted once. "
            "Descent minima of the p-spin are threshold states, not equilibrium states: whatever their verdict, it says "
            "nothing about replica symmetry breaking. Calibration (benchmarks/calibrate_ultrametric.py): on "
            "structureless sets with heavy-tailed overlaps (Student-t and Cauchy coordinates), lognormal norms, points "
            "on a great circle, anisotropic directions and random Ising states, K = 16–64, the false-positive rate is "
            "at or below α.")


# ------------------------------------------------------------------------------------------------ matplotlib
def pq_mpl(panels: list[tuple[str, dict[str, np.ndarray]]]):
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False, layout="constrained")
    for ax, (title, samples) in zip(axes[0], panels):
        for i, (lbl, q) in enumerate(samples.items()):
            ax.hist(q, bins=40, density=True, histtype="step", lw=1.5, color=PALETTE[i % 8], label=lbl)
        ax.set_xlabel("overlap q")
        ax.set_ylabel("P(q)")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7)
    return fig


#: up to this many replicas, the dendrogram's leaves and the Parisi matrix's ticks name every replica
_LABELLED = 40


def _dendrogram_mpl(ax, linkage: np.ndarray, ids=None) -> None:
    from scipy.cluster.hierarchy import dendrogram

    n = len(linkage) + 1
    labels = [str(i) for i in ids] if ids is not None and len(ids) == n and n <= _LABELLED else None
    dendrogram(linkage, ax=ax, color_threshold=0, above_threshold_color=PALETTE[0], no_labels=labels is None,
               labels=labels, leaf_font_size=7)
    ax.set_ylabel("merge distance")
    ax.set_xlabel("replica (leaf order)")


def _replica_ticks(ax, ids_in_order) -> None:
    """Integer ticks on both axes of a replica-by-replica image: each replica's id when there are few, else whole
    positions only (never fractional replicas)."""
    from matplotlib.ticker import MaxNLocator

    n = len(ids_in_order)
    if n <= _LABELLED:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_ticks(range(n), [str(i) for i in ids_in_order], fontsize=7 if n > 16 else 9)
        ax.tick_params(axis="x", labelrotation=90 if n > 16 else 0)
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))


def tree_mpl(d: TreeData):
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    _dendrogram_mpl(axes[0], d.linkage, d.ids)
    axes[0].set_title(f"dendrogram — {d.system}", fontsize=9)
    im = axes[1].imshow(d.q[np.ix_(d.order, d.order)], cmap="viridis")
    _replica_ticks(axes[1], [d.ids[i] for i in d.order])
    fig.colorbar(im, ax=axes[1], label="q")
    axes[1].set_title("Parisi matrix (q in leaf order)")
    axes[1].set_xlabel("replica")
    axes[1].set_ylabel("replica")
    tri = d.triangles
    if tri is not None and len(tri):
        axes[2].scatter(tri["d_max"], tri["d_mid"], s=3, alpha=0.4)
        lim = [float(tri[["d_mid", "d_max"]].min().min()), float(tri["d_max"].max())]
        axes[2].plot(lim, lim, "k--", lw=0.8)
        axes[2].set_xlabel("largest side d_max")
        axes[2].set_ylabel("middle side d_mid")
        axes[2].set_title("triangles")
    return fig


# ------------------------------------------------------------------------------------------------ plotly
def pq_traces(samples: dict[str, np.ndarray], color: str | None = None, prefix: str = "") -> list:
    """P(q) as step histograms (40 bins, density), hover giving q and P(q). A peak more than 10 times taller than
    every other curve (samples inside one basin) starts hidden (its legend entry shows it), so it does not flatten
    the others."""
    import plotly.graph_objects as go

    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    hists = {}
    for lbl, q in samples.items():
        q = q[np.isfinite(q)]
        if len(q):
            hists[lbl] = np.histogram(q, bins=40, density=True)
    peaks = {lbl: float(h[0].max()) for lbl, h in hists.items()}
    out = []
    for i, (lbl, (dens, edges)) in enumerate(hists.items()):
        others = [v for k, v in peaks.items() if k != lbl]
        tall = bool(others) and peaks[lbl] > 10 * max(others)
        x = np.concatenate([[edges[0]], (edges[:-1] + edges[1:]) / 2, [edges[-1]]])
        y = np.concatenate([[0.0], dens, [0.0]])
        out.append(go.Scatter(x=x, y=y, mode="lines", line={"shape": "hvh", "width": 1.8, "color": color or PALETTE[i % 8],
                                                             "dash": dashes[i % 5] if color else "solid"},
                              name=text(prefix + lbl) + (" (narrow peak: click to show)" if tall else ""),
                              visible="legendonly" if tall else True,
                              hovertemplate="q = %{x:.3f}<br>P(q) = %{y:.3g}<extra>%{fullData.name}</extra>"))
    return out


def pq_plotly(samples: dict[str, np.ndarray]):
    return go_figure(pq_traces(samples), xaxis={"title": {"text": "overlap q"}}, yaxis={"title": {"text": "P(q)"}},
                     legend={"font": {"size": 10}, "orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
                     margin={"l": 60, "r": 20, "t": 60, "b": 50})


def dendrogram_plotly(d: TreeData):
    """The tree from the saved linkage (scipy lays it out; nothing is clustered here), leaves marked by replica."""
    import plotly.graph_objects as go
    from scipy.cluster.hierarchy import dendrogram

    dd = dendrogram(d.linkage, no_plot=True)
    xs, ys = [], []
    for xi, yi in zip(dd["icoord"], dd["dcoord"]):
        xs += [*xi, None]
        ys += [*yi, None]
    leaves = [d.ids[i] for i in dd["leaves"]]
    pos = [5 + 10 * i for i in range(len(leaves))]
    traces = [go.Scatter(x=xs, y=ys, mode="lines", line={"color": PALETTE[0], "width": 1.2}, hoverinfo="skip",
                         showlegend=False),
              go.Scatter(x=pos, y=[0.0] * len(pos), mode="markers", customdata=leaves, marker={"size": 9,
                         "color": PALETTE[1], "line": {"color": "black", "width": 0.5}}, showlegend=False,
                         hovertemplate="replica %{customdata}<extra></extra>", name="leaves",
                         selected={"marker": {"size": 14, "color": PALETTE[3]}}, unselected={"marker": {"opacity": 0.35}})]
    return go_figure(traces, xaxis={"tickvals": pos, "ticktext": [str(i) for i in leaves], "title": {"text": "replica"},
                                    "showgrid": False}, yaxis={"title": {"text": "merge distance"}}, height=380)


def parisi_plotly(d: TreeData):
    import plotly.graph_objects as go

    cats = [str(d.ids[i]) for i in d.order]
    z = d.q[np.ix_(d.order, d.order)]
    trace = go.Heatmap(z=z, x=cats, y=cats, colorscale="Viridis", colorbar={"title": {"text": "q"}},
                       meta={"replica_axes": True},
                       hovertemplate="replica %{y} · replica %{x}<br>q = %{z:.4f}<extra></extra>")
    return go_figure([trace], xaxis={"type": "category", "title": {"text": "replica (leaf order)"}},
                     yaxis={"type": "category", "autorange": "reversed", "title": {"text": "replica"},
                            "scaleanchor": "x"}, height=380)


def triangles_plotly(d: TreeData):
    import plotly.graph_objects as go

    tri = d.triangles
    lo, hi = float(tri[["d_mid", "d_max"]].min().min()), float(tri["d_max"].max())
    traces = [go.Scatter(x=tri["d_max"], y=tri["d_mid"], mode="markers", marker={"size": 4, "opacity": 0.5,
                           "color": PALETTE[0]}, name="triangles", showlegend=False,
                           hovertemplate="d_max = %{x:.4f}<br>d_mid = %{y:.4f}<extra></extra>"),
              go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"color": "black", "dash": "dash", "width": 1},
                         hoverinfo="skip", showlegend=False)]
    return go_figure(traces, xaxis={"title": {"text": "largest side d_max"}},
                     yaxis={"title": {"text": "middle side d_mid"}}, height=380)


# ------------------------------------------------------------------------------------------------ sections
def summary(view: RunView) -> list[tuple[str, str, str]]:
    s = summary_table(view)
    out = []
    if s is None:
        return out
    for _, row in s.iterrows():
        if "verdict" not in row or not isinstance(row["verdict"], str):
            continue
        p = row.get("p_value")
        stats = (f"K = {row['K_mean']:.3f} vs null {row['null_K_mean']:.3f}, p = {p:.2g}" if finite(p)
                 else f"K = {row['K_mean']:.3f}")
        value = f"{verdict_label(row.to_dict())} ({stats})"
        if "threshold" in str(row["system"]):
            value += "; descent endpoints, not equilibrium states: no reading as replica symmetry breaking"
        out.append((f"Ultrametricity — {row['system']}", value, str(row.get("sentence", ""))))
    return out


COLUMNS = ["system", "replicas", "q_mean", "q_var", "cophenetic", "K_mean", "K_mean_se", "null_K_mean", "null_K_std",
           "z", "p_value", "verdict", "levels", "top_clusters", "within_p", "cv", "energy_mean", "frac_abs_q_below_0_3"]


def section(page: Page) -> None:
    view = page.view
    s = summary_table(view)
    if s is None:
        return
    page.h(2, "Protocol 3 — overlaps, the Parisi tree and ultrametricity", "replicas")
    pq = pq_data(view)
    if pq:
        page.figure("pq", pq_mpl(pq), html.escape(pq_caption(s, pq)))
    for d in tree_data(view):
        page.figure(f"tree_{d.label}", tree_mpl(d), f"<b>{html.escape(d.system)}</b>: {TREE_CAPTION} "
                    f"{html.escape(d.sentence)}")
    page.p(html.escape(method_text(s)))
    page.df(s[[c for c in COLUMNS if c in s.columns]])
    for row in summary(view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    out = []
    s = summary_table(view)
    if s is None:
        return out
    pq = pq_data(view)
    caption = pq_caption(s, pq) if pq else ""
    for i, (title, samples) in enumerate(pq):
        out.append(Panel(f"pq_{i}", f"P(q): {title}", caption if i == 0 else "Overlap distributions of the reference "
                         "systems, for comparison with the network's.", pq_plotly(samples), width="half"))
    for d in tree_data(view):
        link = d.link
        cap = (f"{d.system}: the dendrogram (hierarchical clustering of the replicas) and the Parisi matrix (overlaps "
               "in leaf order; blocks on the diagonal are clusters of similar solutions), linked by replica: click a "
               f"leaf or a cell to highlight its replicas in both. {d.sentence}")
        out.append(Panel(f"dendrogram_{d.label}", f"Dendrogram — {d.system}", cap, dendrogram_plotly(d), link=link,
                         width="half"))
        out.append(Panel(f"parisi_{d.label}", f"Parisi matrix — {d.system}", "Overlap q of every pair of replicas, rows "
                         "and columns in the tree's leaf order. Hover a cell for its pair and q.", parisi_plotly(d),
                         link=link, width="half"))
        if d.triangles is not None and len(d.triangles):
            out.append(Panel(f"triangles_{d.label}", f"Triangles — {d.system}", "Every triangle's middle side against "
                             "its largest side: ultrametric sets lie on the diagonal.", triangles_plotly(d), width="half"))
    return out


def overlay_traces(view: RunView, color: str, prefix: str) -> dict[str, list]:
    """The network's P(q) (aligned, else raw, else the first network system)."""
    pq = dict(pq_data(view))
    net = pq.get("the network", {})
    for want in ("network-aligned", "network-raw"):
        if want in net:
            return {"pq": pq_traces({want: net[want]}, color, prefix)}
    if net:
        k = next(iter(net))
        return {"pq": pq_traces({k: net[k]}, color, prefix)}
    return {}


def overview(view: RunView) -> dict:
    """The ultrametricity verdict of the network's independent solutions (aligned, else raw)."""
    s = view.table("replica_summary")
    if s is None or "verdict" not in s:
        return {}
    rows = {str(x["system"]): x for _, x in s.iterrows()}
    for want in ("network-aligned", "network-raw", "network-functions"):
        r = rows.get(want)
        if r is not None and isinstance(r["verdict"], str):
            p = r.get("p_value")
            return {"verdict": verdict_label(r.to_dict()) + (f" (p = {p:.2g})" if finite(p) else "")}
    return {}
