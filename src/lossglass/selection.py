"""Which model to ship: rank a run's replicas by the flatness measure that best predicts the generalisation
gap on that very run (Kendall tau from the curvature stage, with its bootstrap interval), report the spread
of test accuracy, and export the chosen replica as a standalone safetensors state_dict."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import check
from .store import RunStore


def select(store: RunStore, problem=None, strategy: str | None = None) -> dict:
    """Write ``tables/selection.parquet``, ``selection.json`` and ``selected/replica-K.safetensors``; return the
    decision. The measure is the one with the largest positive Kendall tau with the gap (train - test
    accuracy); ``confident`` says whether its 95% interval excludes 0. Flatter (lower measure; higher local
    entropy) ranks first; diverged replicas are excluded."""
    check(store.has_table("flatness") and store.has_table("kendall"),
          f"{store.path}: no curvature results (run 'lossglass curvature {store.path}' first)")
    flat, tau = store.read_table("flatness"), store.read_table("kendall")
    tau = tau[(tau["target"] == "gap_error") & np.isfinite(tau["kendall_tau"])]
    check(len(tau) > 0, f"{store.path}: no finite Kendall tau with the gap to choose a measure from")
    best = tau.sort_values("kendall_tau", ascending=False).iloc[0]
    measure = str(best["measure"])
    ok = flat[~flat["diverged"]] if "diverged" in flat else flat
    sign = -1 if measure == "local_entropy" else 1
    ranked = ok.assign(score=sign * ok[measure]).sort_values("score").reset_index(drop=True)
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    chosen = ranked.iloc[0]
    acc = ok["test_accuracy"]
    decision = {"measure": measure, "kendall_tau": float(best["kendall_tau"]), "ci_low": float(best["ci_low"]),
                "ci_high": float(best["ci_high"]), "confident": bool(best["ci_low"] > 0),
                "replica": int(chosen["replica"]), "chosen_test_accuracy": float(chosen["test_accuracy"]),
                "test_accuracy_median": float(acc.median()), "test_accuracy_min": float(acc.min()),
                "test_accuracy_max": float(acc.max()), "test_accuracy_std": float(acc.std()),
                "chosen_accuracy_percentile": float((acc <= chosen["test_accuracy"]).mean() * 100)}
    store.write_table("selection", ranked[["rank", "replica", measure, "test_accuracy", "gap_error"]])
    if problem is not None:
        from .byo import export_state

        theta = store.read_tensors("replicas")["theta"]
        row = int(np.flatnonzero(store.read_table("replicas")["replica"].to_numpy() == decision["replica"])[0])
        rel = f"selected/replica-{decision['replica']}.safetensors"
        export_state(problem, theta[row], rel, {"measure": measure, "kendall_tau": decision["kendall_tau"]}, store=store)
        decision["exported"] = rel
    store.write_json("selection.json", decision)
    return decision


def explain(d: dict) -> str:
    """One paragraph: which model, why, and how sure."""
    conf = ("its 95% interval excludes zero, so on this run flatter replicas reliably generalise better"
            if d["confident"] else "but its 95% interval includes zero: on this run no flatness measure reliably "
            "predicts the gap, so the choice is close to a coin toss among similar replicas")
    return (f"Ship replica {d['replica']} (test accuracy {d['chosen_test_accuracy'] * 100:.2f}%, percentile "
            f"{d['chosen_accuracy_percentile']:.0f} of the run; median {d['test_accuracy_median'] * 100:.2f}%, range "
            f"{d['test_accuracy_min'] * 100:.2f}–{d['test_accuracy_max'] * 100:.2f}%). It ranks first (flattest) by "
            f"{d['measure']}, the measure that best predicts the generalisation gap here (Kendall τ = "
            f"{d['kendall_tau']:.2f}, 95% CI [{d['ci_low']:.2f}, {d['ci_high']:.2f}]); {conf}.")


def selection_frame(store: RunStore) -> pd.DataFrame | None:
    return store.read_table("selection") if store.has_table("selection") else None
