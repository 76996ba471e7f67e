"""The report: figures made from the saved tables (PNG + SVG in ``figures/``) and one self-contained
``report.html`` (images embedded) with a summary of findings, a section per protocol, captions, the tables
behind the figures, and the config, seed, versions and run times at the end.

Rebuilding it (``lossglass report RUN``) reads only saved data; output is byte-for-byte stable apart from
the one timestamp line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..store import RunStore  # noqa: E402

# Okabe-Ito: colour-blind-safe
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
STYLE = {"figure.dpi": 110, "savefig.dpi": 110, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
         "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
         "axes.prop_cycle": matplotlib.cycler(color=PALETTE), "svg.hashsalt": "lossglass", "image.cmap": "viridis"}
EXPECTED = {
    "train": ["replicas"],
    "walk": ["walk_summary", "walk_msd", "walk_aging", "walk_energy_distance", "walk"],
    "connect": ["perm_barriers", "pair_barriers", "paths", "plane_random", "plane_through"],
    "replicas": ["replica_summary", "pq"],
    "curvature": ["flatness", "kendall", "spectral_density"],
}


class _Report:
    def __init__(self, store: RunStore):
        self.store = store
        self.parts: list[str] = []
        self.summary: list[tuple[str, str, str]] = []
        self.missing: list[str] = []

    # ---------------------------------------------------------------- helpers
    def table(self, name: str) -> pd.DataFrame | None:
        if not self.store.has_table(name):
            return None
        try:
            return self.store.read_table(name)
        except Exception as e:  # noqa: BLE001 - a damaged table is reported, not fatal
            self.missing.append(f"table {name} unreadable ({e})")
            return None

    def figure(self, name: str, fig, caption: str) -> None:
        png, svg = io.BytesIO(), io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight", metadata={"Software": None})
        fig.savefig(svg, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        data = png.getvalue()
        # through the store: atomic (no half-written figure on a full disk), never through a link out of the folder
        self.store.write_bytes(f"figures/{name}.svg", svg.getvalue())
        self.store.write_bytes(f"figures/{name}.png", data)
        b64 = base64.b64encode(data).decode()
        self.parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                          f"<figcaption>{caption}</figcaption></figure>")

    def h(self, level: int, text: str, anchor: str | None = None) -> None:
        a = f' id="{anchor}"' if anchor else ""
        self.parts.append(f"<h{level}{a}>{html.escape(text)}</h{level}>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{text}</p>")

    def df(self, df: pd.DataFrame, max_rows: int = 40, cls: str = "sortable") -> None:
        self.parts.append(_html_table(df.head(max_rows), cls))
        if len(df) > max_rows:
            self.p(f"<em>First {max_rows} of {len(df)} rows; the full table is in the run folder.</em>")

    def add_summary(self, what: str, value: str, meaning: str) -> None:
        self.summary.append((what, value, meaning))


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "nan"
        return f"{v:.4g}"
    return html.escape(str(v))


def _html_table(df: pd.DataFrame, cls: str = "sortable") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in df.itertuples(index=False))
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


# ---------------------------------------------------------------------------- sections
def _train(r: _Report) -> None:
    t = r.table("replicas")
    r.h(2, "Replicas", "train")
    if t is None:
        r.p("No trained replicas in this run.")
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    idx = np.arange(len(t))
    ax.bar(idx - 0.2, t["train_accuracy"] * 100, 0.4, label="train")
    ax.bar(idx + 0.2, t["test_accuracy"] * 100, 0.4, label="test")
    lo = max(0, float(min(t["train_accuracy"].min(), t["test_accuracy"].min())) * 100 - 5)
    ax.set_ylim(lo, 100)
    ax.set_xlabel("replica")
    ax.set_ylabel("accuracy (%)")
    ax.legend(frameon=False)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if "source" in t and (t["source"] != "trained").any():
        origin = ("Replicas imported from checkpoints (the source file of each is in the table); how they were "
                  "trained is not known to lossglass.")
    elif "group" in t and t["group"].nunique() > 1:
        origin = ("Replicas in groups that differ in their training settings (batch size, learning rate or method) "
                  "and, within a group, in their random seed.")
    else:
        origin = ("Replicas differ only in their random seed (initialisation and mini-batch order); the spread is the "
                  "seed-to-seed variability.")
    r.figure("replicas_accuracy", fig, f"Train and test accuracy of every replica. {origin}")
    r.df(t)
    ok = t[~t["diverged"]]
    if len(ok):
        r.add_summary("Test accuracy (best / median)", f"{ok['test_accuracy'].max() * 100:.2f}% / "
                      f"{ok['test_accuracy'].median() * 100:.2f}%",
                      f"How well the {len(ok)} trained replicas classify unseen data.")


def _per_label(r: _Report, table: str, name: str, draw, xlabel: str, ylabel: str, caption: str) -> None:
    """One figure with one curve per walk run (``label``), drawn by ``draw(ax, group, colour, label)``."""
    t = r.table(table)
    if t is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, g) in enumerate(t.groupby("label", sort=False)):
        draw(ax, g, PALETTE[i % 8], label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    r.figure(name, fig, caption)


def _walk(r: _Report) -> None:
    s = r.table("walk_summary")
    if s is None:
        return
    r.h(2, "Protocol 1 — random walks and Monte Carlo", "walk")

    def energy(ax, g, color, label):
        m = g.groupby("step")["energy"].agg(["mean", "std"])
        ax.plot(m.index, m["mean"], color=color, label=label)
        ax.fill_between(m.index, m["mean"] - m["std"], m["mean"] + m["std"], color=color, alpha=0.2)

    def by_distance(ax, g, color, label):
        ax.errorbar(g["distance"], g["energy"], yerr=g["std"].fillna(0), color=color, label=label, marker="o", ms=3,
                    capsize=2)

    def msd(ax, g, color, label):
        g = g[(g["t"] > 0) & (g["msd"] > 0)]
        ax.loglog(g["t"], g["msd"], color=color, label=label)

    _per_label(r, "walk", "walk_energy", energy, "step", "training loss E (nats)",
               "Energy (mean training loss) along the walks, mean over walkers with a band of one standard deviation. "
               "A plain walk climbs as it leaves the minimum; a Metropolis walk at temperature T settles where uphill "
               "moves stop being accepted.")
    _per_label(r, "walk_energy_distance", "walk_energy_distance", by_distance, "distance from start |θ − θ₀|",
               "training loss E (nats)", "Energy against distance from the starting solution, binned over all walkers "
               "and steps (error bars: standard deviation in the bin). The distance at which the curve rises gives the "
               "size of the basin.")
    _per_label(r, "walk_msd", "walk_msd", msd, "step t", "MSD ⟨|θ_t − θ₀|²⟩",
               "Mean squared displacement on log-log axes. Free diffusion has slope 1 (MSD = σ² t P); a slope below 1 "
               "(sub-diffusion) means walkers are confined by the landscape.")
    ag = r.table("walk_aging")
    if ag is not None and len(ag):
        labels = list(ag["label"].unique())
        fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 3.3), squeeze=False)
        for ax, label in zip(axes[0], labels):
            g = ag[ag["label"] == label]
            tws = sorted(g["tw"].unique())
            for i, tw in enumerate(tws[:: max(1, len(tws) // 6)]):
                gg = g[g["tw"] == tw]
                ax.semilogx(gg["t"], gg["C"], color=PALETTE[i % 8], marker=".", label=f"t_w={tw}")
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("lag t (steps)")
            ax.set_ylabel("C(t_w, t_w+t) = θ(t_w)·θ(t_w+t)/P")
        axes[0][0].legend(frameon=False, fontsize=7)
        r.figure("walk_aging", fig, "Two-time correlation for several waiting times t_w (Baity-Jesi et al. 2018). "
                 "If the curves for different t_w lie on top of each other the dynamics is stationary; if they "
                 "shift to longer lags as t_w grows, the system ages like a glass.")
    r.df(s)
    for _, row in s.iterrows():
        deltas = [c[7:-7] for c in s.columns if c.startswith("radius_") and c.endswith("_median")]
        for d in deltas[:2]:
            med, lower = row[f"radius_{d}_median"], bool(row.get(f"radius_{d}_lower_bound", False))
            reached = row.get(f"radius_{d}_reached", float("nan"))
            value = ("≥ " if lower else "") + _fmt(med) + f" ({reached * 100:.0f}% of walkers crossed)"
            meaning = ("Kaplan–Meier median distance from the start at which the training loss first rises by "
                       f"{d} nats (walkers that never rose are kept, censored at their largest distance).")
            if lower:
                meaning += " Fewer than half the walkers crossed: the basin is at least this wide (a lower bound)."
            r.add_summary(f"Basin radius ({row['label']}, loss rise {d})", value, meaning)
        r.add_summary(f"MSD exponent ({row['label']})", _fmt(row["msd_alpha"]),
                      "1 = free diffusion; below 1 = walkers confined by the landscape.")


def _connect(r: _Report) -> None:
    perm = r.table("perm_barriers")
    if perm is None:
        return
    r.h(2, "Protocol 2 — permutations, barriers and connectivity", "connect")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(perm["k"], perm["barrier"], "o-", label="train")
    ax.plot(perm["k"], perm["barrier_test"], "s--", label="test")
    ax.set_xlabel("number of permuted hidden units k")
    ax.set_ylabel("loss barrier (nats)")
    ax.legend(frameon=False)
    r.figure("perm_barriers", fig, "Permutation-interpolation (the paper's protocol 2): the loss barrier on the "
             "straight line between a solution and a copy of it with k hidden units permuted. The copy computes "
             "the same function, so any barrier comes from the path leaving the minimum.")
    r.df(perm)
    r.add_summary("Permutation barrier (largest k)", _fmt(perm["barrier"].iloc[-1]),
                  "Loss rise midway between a network and its own permuted copy: the copies are walled off if large.")
    paths = r.table("paths")
    pairs = r.table("pair_barriers")
    if paths is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (kind, g) in enumerate(paths[paths["pair"] == 0].groupby("kind", sort=False)):
            ax.plot(g["alpha"], g["train_loss"], color=PALETTE[i], label=f"{kind} (train)")
            ax.plot(g["alpha"], g["test_loss"], color=PALETTE[i], ls="--", label=f"{kind} (test)")
        ax.set_xlabel("position along path t (A at 0, B at 1)")
        ax.set_ylabel("loss (nats)")
        ax.legend(frameon=False, fontsize=8)
        r.figure("paths", fig, "Paths between two independently trained replicas A and B: the straight line "
                 "(naive), the straight line after permuting B's hidden units to match A (aligned), and a "
                 "quadratic Bezier curve with a trained middle point. A low curve where the line is high means the "
                 "minima are connected, but not in a straight line.")
    if pairs is not None:
        r.df(pairs)
        r.add_summary("Barrier between replicas, naive → aligned",
                      f"{pairs['barrier_naive'].mean():.4g} → {pairs['barrier_aligned'].mean():.4g}",
                      "Mean loss barrier between independent solutions before and after removing the permutation "
                      "symmetry; a drop means most of the wall was only a permutation.")
    for name, title in (("plane_random", "random filter-normalised plane"), ("plane_through", "plane through A, B, aligned B")):
        pl = r.table(name)
        if pl is None:
            continue
        xs, ys = np.unique(pl["x"]), np.unique(pl["y"])
        z = pl["train_loss"].to_numpy().reshape(len(xs), len(ys))
        fig, ax = plt.subplots(figsize=(5, 4))
        zc = np.log10(np.clip(z, 1e-6, None))
        cs = ax.contourf(xs, ys, zc.T, levels=20)
        ax.contour(xs, ys, zc.T, levels=10, colors="k", linewidths=0.4)
        fig.colorbar(cs, ax=ax, label="log10 training loss")
        pts = {"centre": [0, 0]}
        if name == "plane_through":
            ptab = r.table("plane_through_points")
            pts = {} if ptab is None else {str(row.label): (row.x, row.y) for row in ptab.itertuples()}
        for lbl, (px, py) in (pts or {}).items():
            ax.plot(px, py, "w*", ms=10, mec="k")
            ax.annotate({"C": "aligned B"}.get(lbl, lbl), (px, py), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("direction 1 (units of |B − A|)" if name == "plane_through" else "direction 1 (filter-normalised)")
        ax.set_ylabel("direction 2")
        r.figure(name, fig, f"Training loss on the {title} (log colour scale, contours). Every grid point was "
                 "evaluated as one replica of a single batch.")
    wb = r.table("width_barriers")
    if wb is not None and len(wb):
        from ..protocols.connect import width_barrier_fit

        g = wb.groupby("width")[["barrier_naive", "barrier_aligned"]].mean()
        fit = width_barrier_fit(g.index, g["barrier_aligned"])
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog(g.index, g["barrier_naive"].clip(lower=1e-6), "o-", label="naive")
        ax.loglog(g.index, g["barrier_aligned"].clip(lower=1e-6), "s-", label="aligned")
        ax.set_xlabel("hidden width m")
        ax.set_ylabel("loss barrier (nats)")
        ax.legend(frameon=False)
        r.figure("width_barriers", fig, "Barrier between independent solutions against width, before and after "
                 f"alignment. Fitted aligned barrier ~ m^(-β) with β = {fit['beta']:.2f} (theory for two-layer ReLU "
                 "networks: β = 1/2, Zhan, Li & Wu 2025).")
        r.df(wb)
        r.add_summary("Width exponent β (aligned barrier ~ m^-β)", _fmt(fit["beta"]),
                      "How fast the barrier between aligned solutions vanishes as networks widen.")


def _dendrogram(ax, linkage: np.ndarray) -> None:
    from scipy.cluster.hierarchy import dendrogram

    dendrogram(linkage, ax=ax, color_threshold=0, above_threshold_color=PALETTE[0], no_labels=True)
    ax.set_ylabel("merge distance")
    ax.set_xlabel("replicas (leaf order)")


def _both(r: _Report, a: str, b: str) -> pd.DataFrame | None:
    parts = [t for t in (r.table(a), r.table(b)) if t is not None]
    return pd.concat(parts, ignore_index=True) if parts else None


def _pq_caption(s: pd.DataFrame, pq: pd.DataFrame) -> str:
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
    for label in sorted(set(pq["label"])):
        if not label.startswith("SK"):
            continue
        q = pq[pq["label"] == label]["q"].to_numpy()
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


def _replicas(r: _Report) -> None:
    s = _both(r, "replica_summary", "reference_summary")
    pq = _both(r, "pq", "reference_pq")
    if s is None:
        return
    r.h(2, "Protocol 3 — overlaps, the Parisi tree and ultrametricity", "replicas")
    if pq is not None:
        net = [lbl for lbl in dict.fromkeys(pq["label"]) if str(lbl).startswith("network")]
        ref = [lbl for lbl in dict.fromkeys(pq["label"]) if not str(lbl).startswith("network")]
        panels = [(t, labels) for t, labels in (("the network", net), ("reference systems", ref)) if labels]
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.6), squeeze=False, layout="constrained")
        for ax, (title, labels) in zip(axes[0], panels):
            for i, lbl in enumerate(labels):
                q = pq[pq["label"] == lbl]["q"]
                ax.hist(q, bins=40, density=True, histtype="step", lw=1.5, color=PALETTE[i % 8], label=lbl)
            ax.set_xlabel("overlap q")
            ax.set_ylabel("P(q)")
            ax.set_title(title)
            ax.legend(frameon=False, fontsize=7)
        r.figure("pq", fig, html.escape(_pq_caption(s, pq)))
    for _, row in s.iterrows():
        lbl = row.get("label", row["system"])
        if not isinstance(lbl, str) or not r.store.has_table(f"linkage_{lbl}"):
            continue
        lk = r.store.read_table(f"linkage_{lbl}").to_numpy()
        ov = r.store.read_table(f"overlaps_{lbl}")
        k = int(ov["a"].max()) + 1
        q = ov["q"].to_numpy().reshape(k, k)
        order = r.store.read_table(f"order_{lbl}")["leaf"].tolist()
        tri = r.table(f"triangles_{lbl}")
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
        _dendrogram(axes[0], lk)
        axes[0].set_title(f"dendrogram — {row['system']}", fontsize=9)
        im = axes[1].imshow(q[np.ix_(order, order)], cmap="viridis")
        fig.colorbar(im, ax=axes[1], label="q")
        axes[1].set_title("Parisi matrix (q in leaf order)")
        axes[1].set_xlabel("replica")
        axes[1].set_ylabel("replica")
        if tri is not None:
            axes[2].scatter(tri["d_max"], tri["d_mid"], s=3, alpha=0.4)
            lim = [float(tri[["d_mid", "d_max"]].min().min()), float(tri["d_max"].max())]
            axes[2].plot(lim, lim, "k--", lw=0.8)
            axes[2].set_xlabel("largest side d_max")
            axes[2].set_ylabel("middle side d_mid")
            axes[2].set_title("triangles")
        sentence = row.get("sentence") if isinstance(row.get("sentence"), str) else ""
        r.figure(f"tree_{lbl}", fig, f"<b>{html.escape(str(row['system']))}</b>: left, the hierarchical clustering of "
                 "replicas; middle, the overlap matrix reordered by the tree (blocks on the diagonal are clusters of "
                 "similar solutions); right, every triangle's middle side against its largest side (ultrametric sets "
                 f"lie on the diagonal). {html.escape(sentence)}")
    cols = ["system", "replicas", "q_mean", "q_var", "cophenetic", "K_mean", "K_mean_se", "null_K_mean", "null_K_std",
            "z", "p_value", "verdict", "cv", "energy_mean", "frac_abs_q_below_0_3"]
    alpha = s["alpha"].dropna().iloc[0] if "alpha" in s and s["alpha"].notna().any() else 0.01
    r.p("Side by side: the network's replicas (aligned, raw, by predictions, and equilibrium samples inside one "
        "basin), and where the study ran them, the SK spin glass in equilibrium (parallel tempering), the spherical "
        "p-spin's descent minima and a convex control. K is the Katzgraber–Hartmann index (d_max − d_mid)/σ(d) "
        "averaged over triangles (± its jackknife error); ultrametric sets have K near 0. The null has the same "
        "points' norms, spread, dimension and anisotropy but no hierarchy; z and the one-sided p-value compare K with "
        f"it, and the verdict is 'hierarchical' when p < α = {alpha:g}. Calibration: on structureless sets of many "
        "kinds (random unit vectors, unequal norms, uneven spectra, |q|-based sets; 2,410 draws) the verdict said "
        "'hierarchical' in 1.1% of them.")
    r.df(s[[c for c in cols if c in s.columns]])
    for _, row in s.iterrows():
        if "verdict" not in row or not isinstance(row["verdict"], str):
            continue
        value = f"{row['verdict']} (K = {row['K_mean']:.3f} vs null {row['null_K_mean']:.3f}, p = {row['p_value']:.2g})"
        r.add_summary(f"Ultrametricity — {row['system']}", value, str(row.get("sentence", "")))


def _curvature(r: _Report) -> None:
    f = r.table("flatness")
    if f is None:
        return
    r.h(2, "Protocol 4 — curvature, flatness and generalisation", "curvature")
    from ..protocols.curvature import MEASURES

    ms = [m for m in MEASURES if m in f]
    n = len(ms)
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False, layout="constrained")
    groups = f["group"] if "group" in f else pd.Series(0, index=f.index)

    def group_label(g) -> str:
        row = f[groups == g].iloc[0]
        if "method" in f and "batch_size" in f:
            return f"{row['method']}, batch {int(row['batch_size'])}"
        return f"group {g}"

    for ax, m in zip(axes.ravel(), ms):
        for i, g in enumerate(sorted(groups.unique())):
            sel = groups == g
            ax.scatter(f.loc[sel, m], f.loc[sel, "gap_error"] * 100, s=14, color=PALETTE[i % 8], label=group_label(g))
        ax.set_xlabel(m)
        ax.set_ylabel("generalisation gap (%)")
        if m in ("lambda_max", "hessian_trace") and (f[m] > 0).all() and f[m].max() / max(f[m].min(), 1e-12) > 30:
            ax.set_xscale("log")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes[0][0].legend(frameon=False, fontsize=7)
    r.figure("flatness_vs_gap", fig, "Each flatness measure against the generalisation gap (train accuracy − test "
             "accuracy), one point per replica, coloured by training group (batch size / method). A measure that "
             "predicts generalisation orders the points from bottom-left to top-right.")
    sd = r.table("spectral_density")
    if sd is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, (lbl, g) in enumerate(sd.groupby("label", sort=False)):
            ax.semilogy(g["eigenvalue"], g["density"].clip(lower=1e-8), color=PALETTE[i], label=f"{lbl} (replica "
                        f"{int(g['replica'].iloc[0])})")
        ax.set_xlabel("Hessian eigenvalue λ")
        ax.set_ylabel("density (log scale)")
        ax.legend(frameon=False)
        r.figure("spectral_density", fig, "Hessian eigenvalue density (stochastic Lanczos quadrature) of the flattest "
                 "and the sharpest replica (by top eigenvalue). Sharp minima have outliers far to the right.")
    k = r.table("kendall")
    if k is not None:
        r.p("Kendall's τ between each measure and the generalisation gap across replicas, with a 95% bootstrap "
            "interval (Jiang et al. 2020). Positive: sharper minima generalise worse (local entropy is negated so "
            "the sign reads the same).")
        r.df(k)
        kk = k[k["target"] == "gap_error"]
        if len(kk):
            best = kk.iloc[kk["kendall_tau"].abs().argmax()]
            r.add_summary("Best flatness predictor of the gap (Kendall τ)",
                          f"{best['measure']}: {best['kendall_tau']:.3f} [{best['ci_low']:.2f}, {best['ci_high']:.2f}]",
                          "Rank agreement between flatness and the generalisation gap; an interval that excludes 0 "
                          "is a real association on these replicas.")
    r.df(f, max_rows=40)


def _selection(r: _Report) -> None:
    d = r.store.read_json("selection.json")
    if not d:
        return
    from ..selection import explain

    r.h(2, "Which model to ship", "select")
    r.p(html.escape(explain(d)) + (f" The chosen replica is exported as <code>{html.escape(d['exported'])}</code> "
                                   "(a safetensors state_dict for your model)." if d.get("exported") else ""))
    sel = r.table("selection")
    if sel is not None:
        r.df(sel, max_rows=10)
    r.add_summary("Model to ship", f"replica {d['replica']} ({d['chosen_test_accuracy'] * 100:.2f}%)",
                  f"Flattest by {d['measure']} (τ = {d['kendall_tau']:.2f}); "
                  + ("a confident choice." if d["confident"] else "not significantly better than its peers."))


def _missing(store: RunStore) -> list[str]:
    from ..config import load_config

    out = []
    if not store.has_tensors("replicas"):
        out.append("replicas.safetensors (stage train not finished)")
    stages = store.stages()
    try:
        cfg = load_config(store.path / "config.toml")
    except Exception:  # noqa: BLE001 - a damaged config is reported, not fatal
        cfg = None
        out.append("config.toml could not be read")
    for stage, tables in EXPECTED.items():
        if stage == "train":
            continue
        if cfg is not None and not getattr(cfg, stage).enabled:
            continue
        if stage not in stages:
            out.append(f"stage {stage} not finished (tables: {', '.join(tables)})")
        elif stages[stage].get("skipped"):
            out.append(f"stage {stage} skipped: {stages[stage]['skipped']}")
    return out


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}table{border-collapse:collapse;font-size:.85em;margin:1em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}th{background:#f4f6f8;cursor:pointer}
td:first-child,th:first-child{text-align:left}figure{margin:1.2em 0}img{max-width:100%}
figcaption{font-size:.9em;color:#444;max-width:900px}.summary td:nth-child(3){text-align:left;color:#444}
.missing{background:#fff4e5;border:1px solid #f0c36d;padding:.5em 1em}footer{margin-top:3em;font-size:.85em;color:#555}"""
JS = """document.querySelectorAll('table.sortable').forEach(function(t){t.querySelectorAll('th').forEach(function(th,i){
th.addEventListener('click',function(){var b=t.tBodies[0],rows=Array.from(b.rows),asc=th.dataset.asc!=='1';
th.dataset.asc=asc?'1':'0';rows.sort(function(x,y){var a=x.cells[i].textContent,c=y.cells[i].textContent,
p=parseFloat(a),q=parseFloat(c);var r=(!isNaN(p)&&!isNaN(q))?p-q:a.localeCompare(c);return asc?r:-r;});
rows.forEach(function(r){b.appendChild(r);});});});});"""


def build_report(store: RunStore | str, *, timestamp: str | None = None) -> str:
    """Write ``figures/`` and ``report.html`` from what the run folder holds; returns the HTML path.
    Missing stages are listed at the top, never a crash."""
    store = (store if isinstance(store, RunStore) else RunStore(store, create=False)).require_run()
    with matplotlib.rc_context(STYLE):
        r = _Report(store)
        r.missing += _missing(store)
        for section in (_train, _walk, _connect, _replicas, _curvature, _selection):
            try:
                section(r)
            except Exception as e:  # noqa: BLE001 - one broken section must not lose the rest of the report
                r.missing.append(f"section {section.__name__[1:]} could not be drawn: {type(e).__name__}: {e}")
    meta = store.read_json("meta.json", {}) or {}
    cfg = (store.path / "config.toml").read_text() if (store.path / "config.toml").exists() else "(no config)"
    title = f"lossglass report — {meta.get('name', store.path.name)}"
    summary = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                      for a, b, c in r.summary)
    missing = ""
    if r.missing:
        missing = ('<div class="missing"><b>This run is incomplete.</b> Missing:<ul>'
                   + "".join(f"<li>{html.escape(m)}</li>" for m in r.missing) + "</ul></div>")
    stage_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v.get('seconds', float('nan')))}</td></tr>"
                         for k, v in store.stages().items() if k != "report")
    stamp = timestamp or time.strftime("%Y-%m-%d %H:%M:%S")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
{missing}
<h2 id="summary">Summary</h2>
<table class="summary"><thead><tr><th>finding</th><th>value</th><th>what it means</th></tr></thead>
<tbody>{summary}</tbody></table>
{''.join(r.parts)}
<h2 id="provenance">Config, seed, versions, run time</h2>
<p>Seed {html.escape(str(meta.get('seed')))}, device {html.escape(str(meta.get('device')))},
started {html.escape(str(meta.get('started')))}, finished {html.escape(str(meta.get('finished')))}.
BatchNorm statistics at evaluated points: {html.escape(str(meta.get('batchnorm_statistics', 'recompute')))}
(applies to networks with BatchNorm only).</p>
<table><thead><tr><th>stage</th><th>seconds</th></tr></thead><tbody>{stage_rows}</tbody></table>
<pre>{html.escape(json.dumps(meta.get('versions', {}), indent=1, sort_keys=True))}</pre>
<pre>{html.escape(cfg)}</pre>
<footer>Report generated {stamp} by lossglass from the saved data in this folder.</footer>
<script>{JS}</script>
</body></html>
"""
    path = store.write_text("report.html", doc)
    return str(path)
