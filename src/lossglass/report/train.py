"""The trained replicas (table ``replicas``): accuracy of each replica, as a matplotlib and a plotly bar chart."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .base import PALETTE, Page, Panel, RunView, esc, go_figure, integer_ticks


def accuracy_data(view: RunView) -> pd.DataFrame | None:
    """One row per replica: id, train and test accuracy (in %), diverged flag and training group."""
    t = view.table("replicas")
    if t is None or not len(t):
        return None
    out = pd.DataFrame({"replica": t["replica"].astype(int) if "replica" in t else np.arange(len(t)),
                        "train": t["train_accuracy"] * 100, "test": t["test_accuracy"] * 100,
                        "diverged": t["diverged"].astype(bool) if "diverged" in t else False,
                        "group": t["group"] if "group" in t else 0})
    return out.reset_index(drop=True)


def origin(view: RunView) -> str:
    """Where the replicas come from, in one sentence chosen from the table."""
    t = view.table("replicas")
    if t is None:
        return ""
    if "source" in t and (t["source"] != "trained").any():
        return ("Replicas imported from checkpoints (the source file of each is in the table); how they were "
                "trained is not known to lossglass.")
    if "group" in t and t["group"].nunique() > 1:
        return ("Replicas in groups that differ in their training settings (batch size, learning rate or method) "
                "and, within a group, in their random seed.")
    return ("Replicas differ only in their random seed (initialisation and mini-batch order); the spread is the "
            "seed-to-seed variability.")


def _floor(d: pd.DataFrame) -> float:
    return max(0.0, float(min(d["train"].min(), d["test"].min())) - 5)


def accuracy_mpl(d: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6, 3.2))
    idx = np.arange(len(d))
    ax.bar(idx - 0.2, d["train"], 0.4, label="train")
    ax.bar(idx + 0.2, d["test"], 0.4, label="test")
    ax.set_ylim(_floor(d), 100)
    ax.set_xlabel("replica")
    ax.set_ylabel("accuracy (%)")
    ax.legend(frameon=False)
    integer_ticks(ax)
    return fig


def accuracy_plotly(d: pd.DataFrame):
    import plotly.graph_objects as go

    ids = [int(r) for r in d["replica"]]
    traces = [go.Bar(x=ids, y=d[col], name=col, marker_color=PALETTE[i], customdata=ids,
                     hovertemplate="replica %{customdata}<br>" + col + " accuracy %{y:.2f}%<extra></extra>")
              for i, col in enumerate(("train", "test"))]
    return go_figure(traces, barmode="group", xaxis={"title": {"text": "replica"}, "dtick": 1, "tickformat": "d"},
                     yaxis={"title": {"text": "accuracy (%)"}, "range": [_floor(d), 100]}, height=320)


CAPTION = "Train and test accuracy of every replica."


def summary(view: RunView) -> list[tuple[str, str, str]]:
    d = accuracy_data(view)
    ok = d[~d["diverged"]] if d is not None else []
    if not len(ok):
        return []
    return [("Test accuracy (best / median)", f"{ok['test'].max():.2f}% / {ok['test'].median():.2f}%",
             f"How well the {len(ok)} trained replicas classify unseen data.")]


def section(page: Page) -> None:
    page.h(2, "Replicas", "train")
    d = accuracy_data(page.view)
    if d is None:
        page.p("No trained replicas in this run.")
        return
    page.figure("replicas_accuracy", accuracy_mpl(d), esc(f"{CAPTION} {origin(page.view)}"))
    page.df(page.table("replicas"))
    for row in summary(page.view):
        page.add_summary(*row)


def panels(view: RunView) -> list[Panel]:
    d = accuracy_data(view)
    if d is None:
        return []
    return [Panel("replicas_accuracy", "Accuracy of every replica", f"{CAPTION} {origin(view)} Click a bar to "
                  "highlight that replica everywhere on this page.", accuracy_plotly(d), link="net")]


def overview(view: RunView) -> dict:
    """Replicas, best and median test accuracy (%) of the replicas that did not diverge."""
    d = accuracy_data(view)
    if d is None:
        return {}
    ok = d[~d["diverged"]]
    out = {"replicas": len(d)}
    if len(ok):
        out.update(acc_best=float(ok["test"].max()), acc_median=float(ok["test"].median()))
    return out
