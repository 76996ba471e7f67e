"""Where the replicas disagree (tables ``examples*`` and ``examples.json``, written by the examples stage): the
misjudged test cases shown (images, or token sequences), the per-cluster confusion matrices, churn beside the aligned
overlap and barrier, robustness of each cluster and of the merged model under input shifts, whether flatness predicts
robustness, and the cost of picking the wrong replica in words. It reads what the stage saved and never recomputes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc, finite, go_figure, text

CAPTION_TOP = ("Each tile: a test example, its index in the test split, its true class, the class most replicas "
               "predict and the share of replicas that get it wrong (e); for the cases the clusters disagree on, the "
               "largest minus the smallest cluster error rate (spread).")


def record(view: RunView) -> dict | None:
    d = view.json("examples.json")
    return d if isinstance(d, dict) and "disagreement" in d else None


def _top(view: RunView) -> tuple[pd.DataFrame | None, np.ndarray | None, tuple[int, ...]]:
    """The saved top examples (table), their inputs and the input shape (() when not saved)."""
    t = view.table("examples_top")
    if t is None or not view.store.has_tensors("examples_top"):
        return t, None, ()
    try:
        got = view.store.read_tensors("examples_top")
        x = got["x"].numpy()
        shape = tuple(int(v) for v in got["shape"].tolist()) if "shape" in got else ()
    except Exception as e:  # noqa: BLE001 - a damaged file is noted, the tables still show
        view.problems.append(f"tensors/examples_top unreadable ({e})")
        return t, None, ()
    return t, x, shape


def _is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def examples_mpl(rows: pd.DataFrame, x: np.ndarray, shape: tuple[int, ...], title: str):
    """A grid of the examples' images with their index, true class, majority vote and error share."""
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(8, max(n, 1))
    nr = int(np.ceil(n / cols))
    fig, axes = plt.subplots(nr, cols, figsize=(1.35 * cols, 1.6 * nr + 0.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, r), xi in zip(axes.ravel(), rows.iterrows(), x):
        img = xi.reshape(shape)
        img = img[0] if shape[0] == 1 else np.transpose(img, (1, 2, 0))
        if img.ndim == 3:
            img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
        ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None)
        extra = f" spread={r['cluster_spread']:.2f}" if r.get("kind") == "clusters disagree" else ""
        ax.set_title(f"#{int(r['example'])} y={int(r['label'])}→{int(r['majority'])}\ne={r['error_share']:.2f}{extra}",
                     fontsize=7)
    fig.tight_layout()
    return fig


def tokens_table(rows: pd.DataFrame, x: np.ndarray | None) -> pd.DataFrame:
    """The examples as token sequences (for sequence data)."""
    out = rows[["kind", "rank", "example", "label", "majority", "error_share", "vote_entropy", "cluster_spread"]].copy()
    if x is not None:
        out["tokens"] = [" ".join(str(int(round(v))) for v in xi) for xi in x]
    return out


def confusion_mpl(conf: pd.DataFrame):
    """One confusion matrix per cluster (rows: true class, columns: predicted; each row sums to 1)."""
    import matplotlib.pyplot as plt

    m = int(conf["cluster"].max()) + 1
    c = int(conf["true"].max()) + 1
    fig, axes = plt.subplots(1, m, figsize=(2.6 * m + 0.6, 2.8), squeeze=False)
    for j, ax in enumerate(axes[0]):
        g = conf[conf["cluster"] == j]
        mat = np.zeros((c, c))
        mat[g["true"].to_numpy(int), g["predicted"].to_numpy(int)] = g["share"].to_numpy(float)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"cluster {j}", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true" if j == 0 else "")
        ax.grid(False)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of the true class")
    return fig


def robustness_mpl(cl: pd.DataFrame):
    """Accuracy against severity for each input shift, one line per cluster and the merged model."""
    import matplotlib.pyplot as plt

    kinds = [k for k in dict.fromkeys(cl["corruption"]) if k != "clean"]
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(2.8 * max(len(kinds), 1) + 0.5, 2.9), squeeze=False,
                             sharey=True)
    clean = cl[cl["corruption"] == "clean"].set_index("cluster")["accuracy"]
    for ax, kind in zip(axes[0], kinds):
        g = cl[cl["corruption"] == kind]
        for i, (name, h) in enumerate(g.groupby("cluster", sort=False)):
            xs = np.r_[0.0, h["severity"].to_numpy(float)]
            ys = np.r_[clean.get(name, np.nan), h["accuracy"].to_numpy(float)] * 100
            style = dict(color="black", ls="--") if name == "merged" else dict(color=PALETTE[i % len(PALETTE)])
            ax.plot(xs, ys, marker="o", ms=3, label=f"cluster {name}" if name != "merged" else "merged", **style)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("severity")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def churn_mpl(pairs: pd.DataFrame):
    """Churn of every pair against its aligned overlap (and aligned barrier where measured)."""
    import matplotlib.pyplot as plt

    cols = [c for c in ("q_aligned", "barrier_aligned") if c in pairs and pairs[c].notna().any()]
    fig, axes = plt.subplots(1, max(len(cols), 1), figsize=(4.2 * max(len(cols), 1), 3.2), squeeze=False)
    for ax, c in zip(axes[0], cols):
        ok = pairs[c].notna()
        ax.scatter(pairs.loc[ok, c], pairs.loc[ok, "churn"] * 100, s=12)
        ax.set_xlabel({"q_aligned": "aligned overlap q", "barrier_aligned": "aligned loss barrier (nats)"}[c])
        ax.set_ylabel("churn (% of test cases)")
    fig.tight_layout()
    return fig


def _cluster_words(d: dict) -> str:
    c = d.get("clusters", {})
    n = int(c.get("clusters", 1))
    if n <= 1:
        return "The replicas stage did not run, so all replicas form one cluster here."
    if c.get("significant"):
        return (f"Clusters: the {n} top-level clusters the ultrametricity test found in the {esc(str(c.get('source')))} "
                "overlaps.")
    return (f"Clusters: the {esc(str(c.get('source')))} dendrogram cut at its largest gap into {n} groups. The "
            f"ultrametricity test found no clusters (verdict: {esc(str(c.get('verdict') or 'none'))}), so these groups "
            "are descriptive, not a finding.")


def summary(view: RunView) -> list[tuple[str, str, str]]:
    d = record(view)
    if d is None:
        return []
    lo, hi = d.get("disagree_ci", [float("nan")] * 2)
    out = [("Replicas disagree on", f"{d['disagree_share'] * 100:.1f}% of test cases",
            f"95% Wilson interval {lo * 100:.1f}-{hi * 100:.1f}%; the misjudged cases are shown in the examples section.")]
    c = d.get("cost", {})
    if finite(c.get("cases_mean")):
        out.append(("Cost of picking wrong", f"{c['cases_mean']:.0f} of {c['n_test']} test cases change",
                    f"between the chosen replica and a random other one (95% interval {c['cases_ci_low']:.0f}-"
                    f"{c['cases_ci_high']:.0f}); pool test accuracy {c['accuracy_worst'] * 100:.1f}-"
                    f"{c['accuracy_best'] * 100:.1f}%."))
    return out


def section(page: Page) -> None:
    view = page.view
    d = record(view)
    if d is None:
        return
    page.h(2, "Where the replicas disagree", "examples")
    page.p(esc(d["disagreement"]) + " " + _cluster_words(d))
    page.p(esc(d.get("cost_words", "")))
    top, x, shape = _top(view)
    if top is not None and len(top):
        for kind, title in (("hardest", "The hardest test cases (most replicas wrong)"),
                            ("clusters disagree", "The test cases the clusters of solutions disagree on most")):
            rows = top[top["kind"] == kind]
            if not len(rows):
                continue
            page.h(3, title)
            if x is not None and _is_image(shape):
                xi = x[rows.index.to_numpy()]
                page.figure(f"examples_{kind.split()[0]}", examples_mpl(rows, xi, shape, title), esc(CAPTION_TOP))
            else:
                page.df(tokens_table(rows, None if x is None else x[rows.index.to_numpy()]), max_rows=40)
    conf = page.table("examples_confusion")
    if conf is not None and len(conf):
        page.h(3, "Confusion matrix of each cluster")
        page.figure("examples_confusion", confusion_mpl(conf),
                    "Rows: true class; columns: the class the cluster's replicas predict (the share of the row). "
                    "Clusters that fail on different classes differ off the diagonal.")
    pairs = page.table("examples_churn")
    tests = page.table("examples_churn_tests")
    if pairs is not None and len(pairs):
        page.h(3, "Churn against overlap and barrier")
        page.p(esc(" ".join(d.get("churn_words", []))))
        if pairs[["q_aligned", "barrier_aligned"]].notna().any().any():
            page.figure("examples_churn", churn_mpl(pairs), "Churn: the share of test cases on which two replicas "
                        "predict different classes, one point per pair. Interval: replicas resampled (pairs that share "
                        "a replica are not independent); p-value: Mantel permutation of the replicas.")
        if tests is not None:
            page.df(tests)
    cl = page.table("examples_clusters")
    if cl is not None and len(cl):
        page.h(3, "Robustness of each cluster under input shifts")
        page.figure("examples_robustness", robustness_mpl(cl),
                    "Mean test accuracy of each cluster's replicas (and of the merged model, dashed) on test inputs "
                    "shifted in code at three seeded severities; severity 0 is the clean test split.")
        if d.get("flatness_words"):
            page.p(esc(d["flatness_words"]))
        ft = page.table("examples_flatness")
        if ft is not None and len(ft):
            page.p("Every flatness measure against the robustness drop (clean minus mean shifted accuracy). The verdict "
                   "above is for the measure declared in advance (select.measure); the other rows are exploratory: "
                   f"with {len(ft)} measures tested at 5% each, about {0.05 * len(ft):.1f} would pass by chance.")
            page.df(ft)
        page.df(cl, max_rows=60)
    for row in summary(view):
        page.add_summary(*row)


def robustness_traces(view: RunView, color: str | None = None, prefix: str = "") -> list:
    """Mean accuracy of the replicas under each shift (x: shift and severity), one trace; the merged model dashed."""
    r = view.table("examples_robustness")
    if r is None or not len(r):
        return []
    r = r.assign(shift=[f"{k} {s:g}" if k != "clean" else "clean" for k, s in zip(r["corruption"], r["severity"])])
    out = []
    for model, dash in (("replica", "solid"), ("merged", "dash")):
        g = r[r["model"] == model].groupby("shift", sort=False)["accuracy"].mean()
        if len(g):
            out.append({"type": "scatter", "mode": "lines+markers", "x": list(g.index), "y": list(g.to_numpy() * 100),
                        "name": text(prefix + ("replicas (mean)" if model == "replica" else "merged model")),
                        "line": {"dash": dash, **({"color": color} if color else {})}})
    return out


def panels(view: RunView) -> list[Panel]:
    d = record(view)
    if d is None:
        return []
    out = []
    pairs = view.table("examples_churn")
    if pairs is not None and "q_aligned" in pairs and pairs["q_aligned"].notna().any():
        ok = pairs["q_aligned"].notna()
        tr = [{"type": "scatter", "mode": "markers", "x": list(pairs.loc[ok, "q_aligned"]),
               "y": list(pairs.loc[ok, "churn"] * 100), "name": "pairs",
               "text": [f"replicas {a}, {b}" for a, b in zip(pairs.loc[ok, "a"], pairs.loc[ok, "b"])]}]
        out.append(Panel("examples_churn", "Churn against the aligned overlap", " ".join(d.get("churn_words", [])),
                         go_figure(tr, xaxis={"title": {"text": "aligned overlap q"}},
                                   yaxis={"title": {"text": "churn (% of test cases)"}}), width="half"))
    cl = view.table("examples_clusters")
    if cl is not None and len(cl):
        tr = []
        for i, (name, g) in enumerate(cl.groupby("cluster", sort=False)):
            xs = [f"{k} {s:g}" if k != "clean" else "clean" for k, s in zip(g["corruption"], g["severity"])]
            tr.append({"type": "scatter", "mode": "lines+markers", "x": xs, "y": list(g["accuracy"] * 100),
                       "name": text("merged" if name == "merged" else f"cluster {name}"),
                       "line": {"dash": "dash"} if name == "merged" else {"color": PALETTE[i % len(PALETTE)]}})
        out.append(Panel("examples_robustness", "Accuracy of each cluster under input shifts",
                         d.get("flatness_words") or "Mean test accuracy of each cluster's replicas on shifted inputs.",
                         go_figure(tr, yaxis={"title": {"text": "test accuracy (%)"}}), width="half"))
    ex = view.table("examples")
    if ex is not None and len(ex):
        tr = [{"type": "histogram", "x": list(ex["error_share"]), "nbinsx": 20, "name": "test cases"}]
        out.append(Panel("examples_errors", "Share of replicas wrong, per test case", d["disagreement"] + " "
                         + d.get("cost_words", ""), go_figure(tr, xaxis={"title": {"text": "share of replicas wrong"}},
                                                              yaxis={"title": {"text": "test cases"}, "type": "log"})))
    return out


def overlay_traces(view: RunView, color: str, prefix: str) -> dict:
    tr = robustness_traces(view, color, prefix)
    return {"robustness": tr} if tr else {}


def overview(view: RunView) -> dict:
    d = record(view)
    if d is None:
        return {}
    return {"disagree": float(d["disagree_share"]) * 100}
