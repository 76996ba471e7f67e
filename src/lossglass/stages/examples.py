"""Stage ``examples``: where the replicas disagree. Per-example errors, vote entropy and loss spread over the replicas
and per cluster of solutions (the replica protocol's dendrogram), churn between replicas beside their aligned overlap
and barrier, per-cluster confusion matrices, robustness of every replica, cluster and the merged model under seeded
input shifts, flatness against robustness, and the cost of picking the wrong replica (:mod:`lossglass.protocols.
examples`). Runs after select (it grades the chosen replica); its inputs are forward passes over the test split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .base import Stage

#: the replica protocol's systems whose dendrogram gives the clusters, in order of preference
CLUSTER_SOURCES = ("network-aligned", "network-raw", "network-functions")


def replica_clusters(store, k: int) -> tuple[np.ndarray, dict]:
    """Cluster labels of the K live replicas from the replica stage's dendrogram (:data:`CLUSTER_SOURCES`): cut at
    the test's top-level clusters when the ultrametricity test found clusters, else at the dendrogram's largest gap
    (descriptive: ``significant`` False). One cluster when the replica stage did not run."""
    from ..protocols.examples import clusters_from_linkage, largest_gap_clusters

    summ = store.read_table("replica_summary") if store.has_table("replica_summary") else None
    for label in CLUSTER_SOURCES:
        if summ is None or not store.has_table(f"linkage_{label}") or label not in set(summ["label"]):
            continue
        z = store.read_table(f"linkage_{label}")[["left", "right", "height", "size"]].to_numpy(float)
        if len(z) + 1 != k:
            continue
        row = summ.set_index("label").loc[label]
        found = str(row.get("verdict", "")) in ("clusters", "nested") and int(row.get("top_clusters", 0) or 0) >= 2
        m = int(row["top_clusters"]) if found else largest_gap_clusters(z)
        lab = clusters_from_linkage(z, m)
        return lab, {"source": label, "significant": bool(found), "clusters": int(lab.max()) + 1,
                     "verdict": str(row.get("verdict", ""))}
    return np.zeros(k, int), {"source": "none (the replicas stage did not run)", "significant": False, "clusters": 1,
                              "verdict": ""}


def _pair_matrix(df: pd.DataFrame | None, column: str, k: int) -> np.ndarray | None:
    """A symmetric ``(K, K)`` matrix from rows (a, b, column); NaN where a pair is absent."""
    if df is None or column not in df or not len(df):
        return None
    out = np.full((k, k), np.nan)
    a, b = df["a"].to_numpy(int), df["b"].to_numpy(int)
    ok = (a < k) & (b < k) & (a != b)
    out[a[ok], b[ok]] = out[b[ok], a[ok]] = df[column].to_numpy(float)[ok]
    return out


#: the per-example table's columns
_EXAMPLE_COLUMNS = {
    "example": "index of the example in the test split (for a data factory: in the test set it returned)",
    "source_index": "index of the example in the data set's own test set (a data factory's test set in the order it "
                    "returned it; a named data set's file when it records its test subset; -1: unknown)",
    "label": "true class", "majority": "the class most replicas predict",
    "error_share": "share of replicas that misclassify the example",
    "vote_entropy": "entropy of the replicas' votes over classes (nats; 0: unanimous)",
    "disagree": "not every replica predicts the same class",
    "loss_mean": "mean loss over the replicas (nats for cross-entropy)",
    "loss_std": "standard deviation of the loss over the replicas",
    "cluster_spread": "largest minus smallest error rate of the clusters of solutions on the example",
    "error_cluster_*": "share of the replicas of cluster * (the replica protocol's dendrogram) that "
                       "misclassify the example"}


class ExamplesStage(Stage):
    name = "examples"
    position = 75
    section = "examples"
    sections = ("examples",)
    depends = ("train", "connect", "replicas", "curvature", "select")
    tables = ("examples", "examples_churn", "examples_robustness")
    command = None  # its CLI command (lossglass examples RUN [--top N] [--format csv]) is written in cli.py
    report = ("examples", "Where the replicas disagree — misjudged cases, clusters and robustness")
    skip_is_missing = False
    columns = {
        "examples": _EXAMPLE_COLUMNS,
        "examples_top": {**_EXAMPLE_COLUMNS, "rank": "rank within its kind (0: first)",
                         "kind": "'hardest' (most replicas wrong) or 'clusters disagree' (largest cluster spread)"},
        "examples_confusion": {
            "cluster": "cluster of solutions", "true": "true class", "predicted": "predicted class",
            "count": "(replica, example) pairs of the cluster with this true and predicted class",
            "share": "rate at which the cluster's replicas predict this class for an example of the true class"},
        "examples_churn": {
            "a": "replica index a (among the live replicas)", "b": "replica index b",
            "churn": "share of test examples on which a and b predict different classes",
            "q_aligned": "aligned weight overlap of a and b (replicas stage; NaN: not measured)",
            "barrier_aligned": "aligned loss barrier between a and b (connect stage's pairs, or with examples."
                               "barrier_pairs > 0 this stage's own on barrier_n_data training samples; NaN: not "
                               "measured)"},
        "examples_churn_tests": {
            "versus": "the pair quantity churn is ranked against",
            "kendall_tau": "Kendall tau-b of churn with it over the pairs (positive: more disagreement where larger)",
            "ci_low": "2.5% bootstrap quantile (replicas resampled)", "ci_high": "97.5% bootstrap quantile",
            "p_value": "two-sided Mantel permutation p-value (replicas relabelled)",
            "pairs": "pairs with both values", "replicas": "replicas in those pairs",
            "verdict": "'positive', 'negative' or 'nothing detectable' (interval excludes 0 and p < 0.05)"},
        "examples_robustness": {
            "model": "'replica' or 'merged' (the aligned average, select stage)",
            "replica": "replica id (-1: the merged model)", "cluster": "cluster of solutions (-1: the merged model)",
            "corruption": "'clean' or the input shift (noise, blur, contrast, shift, rotate, tokens)",
            "severity": "the shift's strength (noise: std in units of the inputs' spread; blur: pixels; contrast: "
                        "share of the contrast removed; shift: pixels; rotate: degrees; tokens: share replaced)",
            "accuracy": "test accuracy on the shifted inputs", "loss": "mean test loss on the shifted inputs"},
        "examples_clusters": {
            "cluster": "cluster of solutions ('merged': the aligned average)",
            "corruption": "'clean' or the input shift", "severity": "the shift's strength (see examples_robustness)",
            "replicas": "replicas in the cluster", "accuracy": "mean test accuracy of its replicas",
            "ci_low": "95% Student t interval of that mean over the cluster's replicas (this test split held fixed; "
                      "NaN for one replica)", "ci_high": "upper end of that interval",
            "accuracy_min": "worst replica of the cluster", "accuracy_max": "best replica of the cluster"},
        "examples_flatness": {
            "measure": "flatness measure (curvature stage)",
            "target": "robust_drop: clean minus mean shifted test accuracy of each replica",
            "kendall_tau": "Kendall tau-b (positive: sharper replicas lose more under the shifts)",
            "ci_low": "2.5% percentile bootstrap", "ci_high": "97.5% percentile bootstrap",
            "p_value": "scipy two-sided p-value", "n": "replicas",
            "verdict": "'positive', 'negative' or 'nothing detectable'"},
    }

    def run(self, ctx) -> dict:
        import torch

        from ..protocols import examples as X

        c, seed, store = ctx.cfg.examples, ctx.cfg.seed, ctx.store
        rep = ctx.alive()
        problem = ctx.problem
        ds = problem.dataset
        if len(ds.y_test) == 0:
            return {"skipped": "no test examples"}
        k = len(rep)
        ids = rep.table["replica"].to_numpy(int) if "replica" in rep.table else np.arange(k)
        ctx.note(f"examples: predictions of {k} replicas on {len(ds.y_test)} test examples")
        clean = problem.predictions(rep.theta, "test")
        y = problem.data["test"][1].cpu()
        labels, cinfo = replica_clusters(store, k)
        table = X.per_example(clean["prediction"], clean["loss"], y, labels, ds.n_classes)
        table.insert(1, "source_index", source_index(ctx.cfg, ds))
        store.write_table("examples", table)
        top = top_examples(table, c.top)
        store.write_table("examples_top", top)
        pick = torch.as_tensor(top["example"].to_numpy().copy())
        store.write_tensors("examples_top", {"x": problem.data["test"][0][pick].cpu(),
                                             "shape": torch.tensor([int(v) for v in ds.shape], dtype=torch.int64)})
        store.write_table("examples_confusion", X.confusion(clean["prediction"], y, labels, ds.n_classes))
        ch = X.churn(clean["prediction"])
        q, q_source = None, "none"
        for label in ("network-aligned", "network-raw"):  # raw only when the permutation symmetry is unknown
            if store.has_table(f"overlaps_{label}"):
                ov = store.read_table(f"overlaps_{label}")
                q, q_source = _pair_matrix(ov.rename(columns={"q": "q_aligned"}), "q_aligned", k), label
                break
        if c.barrier_pairs > 0:
            bar, bar_source = own_barriers(ctx, rep.theta, c.barrier_pairs, c.barrier_n_data), "examples"
        else:
            bar = _pair_matrix(store.read_table("pair_barriers") if store.has_table("pair_barriers") else None,
                               "barrier_aligned", k)
            bar_source = "connect" if bar is not None else "none"
        cr = X.churn_table(ch, overlap=q, barrier=bar, seed=seed, n_boot=c.n_boot, n_perm=c.n_boot)
        store.write_table("examples_churn", cr.pairs)
        store.write_table("examples_churn_tests", cr.correlations)
        # robustness: every replica and the merged model on each shifted copy of the test inputs
        plan = X.corruption_plan(tuple(ds.shape), ds.info)
        if c.corruptions:
            plan = {kk: v for kk, v in plan.items() if kk in c.corruptions}
        x = problem.data["test"][0].cpu()
        merged = store.read_tensors("merged")["theta"] if store.has_tensors("merged") else None
        theta = rep.theta if merged is None else torch.cat([rep.theta.cpu(), merged.reshape(1, -1).to(rep.theta.dtype)])
        runs = [("clean", 0.0)] + [(kind, float(s)) for kind, sev in plan.items() for s in sev]
        ctx.note(f"examples: robustness under {len(runs) - 1} input shifts")
        rows = []
        vocab = ds.info.get("vocab")
        for kind, s in runs:
            xc = x if kind == "clean" else X.corrupt(x, kind, s, shape=tuple(ds.shape), vocab=vocab, seed=seed)
            out = problem.predictions(theta, x=xc, y=y)
            acc = (out["prediction"] == y[None]).double().mean(1).numpy()
            loss = out["loss"].double().mean(1).numpy()
            rows.append(pd.DataFrame({"model": ["replica"] * k + (["merged"] if merged is not None else []),
                                      "replica": np.r_[ids, [-1] if merged is not None else []].astype(int),
                                      "cluster": np.r_[labels, [-1] if merged is not None else []].astype(int),
                                      "corruption": kind, "severity": s, "accuracy": acc, "loss": loss}))
        robust = pd.concat(rows, ignore_index=True)
        store.write_table("examples_robustness", robust)
        store.write_table("examples_clusters", cluster_accuracy(robust))
        per = robust[robust["model"] == "replica"]
        cl = per[per["corruption"] == "clean"].set_index("replica")["accuracy"]
        sh = per[per["corruption"] != "clean"].groupby("replica")["accuracy"].mean()
        rob = pd.DataFrame({"replica": cl.index, "robust_drop": (cl - sh.reindex(cl.index)).to_numpy()})
        flat_taus = None
        if store.has_table("flatness"):
            flat_taus = X.flatness_robustness(store.read_table("flatness"), rob, seed=seed, n_boot=c.n_boot)
            store.write_table("examples_flatness", flat_taus)
        # the cost of picking wrong
        words, share, lo, hi = X.disagreement_words(table)
        sel = store.read_json("selection.json", {})
        picked = sel.get("replica") if isinstance(sel, dict) else None
        chosen = int(np.flatnonzero(ids == int(picked))[0]) if picked is not None and int(picked) in set(ids) else None
        test_acc = (clean["prediction"] == y[None]).double().mean(1).numpy()
        # replicas coupled by design (replicated SGD) are not independent draws: left out of the pool, as select does
        free = ~(rep.table["method"].eq("replicated").to_numpy()) if "method" in rep.table else np.ones(k, bool)
        if free.sum() < 3 or (chosen is not None and not free[chosen]):
            free = np.ones(k, bool)
        sub = np.flatnonzero(free)
        pick = int(np.flatnonzero(sub == chosen)[0]) if chosen is not None else int(np.argmax(test_acc[sub]))
        cost = X.pick_cost(ch[np.ix_(sub, sub)], test_acc[sub], pick, len(y))
        cost["excluded_coupled"] = int(k - len(sub))
        measure = ctx.cfg.select.measure
        summary = {"replicas": k, "n_test": len(y), "disagree_share": share, "disagree_ci": [lo, hi],
                   "disagreement": words, "clusters": cinfo, "cost": cost,
                   "cost_strategy": sel.get("strategy") if chosen is not None else None,
                   "cost_words": X.cost_words(cost, sel.get("strategy") if chosen is not None else "best test accuracy "
                                              "(no select stage: an oracle, for scale only)"),
                   "churn_words": [X.churn_words(r, {"q_aligned": "aligned weight overlap" if q_source != "network-raw"
                                                     else "weight overlap (not aligned: the symmetry is unknown)",
                                                     "barrier_aligned": "aligned loss barrier"}[r["versus"]])
                                   for r in cr.correlations.to_dict("records")],
                   "barrier_source": bar_source, "overlap_source": q_source, "flatness_measure": measure,
                   "flatness_words": X.flatness_words(flat_taus, measure) if flat_taus is not None else None,
                   "corruptions": {kk: list(v) for kk, v in plan.items()}}
        store.write_json("examples.json", summary)
        return {"replicas": k, "clusters": cinfo["clusters"]}

    def estimate(self, cfg, sizes, est) -> None:
        p = sizes.n_params
        if not p:
            return
        passes = 16  # clean + 5 shifts x 3 severities
        est.add("time", "examples (forward passes over the test split)",
                sizes.cost("forward", (sizes.replicas + 1) * passes * p * sizes.n_test))
        c = cfg.examples
        if c.barrier_pairs:
            n_b = min(c.barrier_n_data or sizes.n_train, sizes.n_train)
            est.add("time", f"examples ({c.barrier_pairs} pair barriers)",
                    sizes.cost("path_point", c.barrier_pairs * 2 * cfg.connect.n_points * p * (n_b + sizes.n_test))
                    + sizes.cost("align", c.barrier_pairs * p))


def source_index(cfg, ds) -> np.ndarray:
    """Each test example's index in the data set's own test set: the user's data factory returns its test set in
    order (the identity); a named data set that records the indices of its test subset (``info["test_index"]``) gives
    those; otherwise -1 (unknown)."""
    n = len(ds.y_test)
    if "test_index" in ds.info:
        idx = np.asarray(ds.info["test_index"], dtype=np.int64).ravel()
        if len(idx) == n:
            return idx
    if cfg.data.factory:
        return np.arange(n)
    return np.full(n, -1, dtype=np.int64)


def own_barriers(ctx, theta, n_pairs: int, n_data: int | None):
    """Aligned loss barriers of ``n_pairs`` seeded random replica pairs (every pair when there are fewer), on the first
    ``n_data`` training samples, with the connect stage's path resolution and alignment method
    (:func:`lossglass.protocols.connect.pair_barriers`); a ``(K, K)`` matrix, NaN where not measured. None when the
    model's permutation symmetry is unknown."""
    from .._util import seed_for
    from ..protocols.connect import pair_barriers
    from .common import spec_missing

    problem = ctx.problem
    if spec_missing(problem):
        return None
    k = theta.shape[0]
    iu = np.triu_indices(k, 1)
    rng = np.random.default_rng(seed_for(ctx.cfg.seed, 253))
    pick = np.sort(rng.permutation(len(iu[0]))[:n_pairs])
    a, b = iu[0][pick], iu[1][pick]
    order = np.stack([a, b], 1).ravel()
    ctx.note(f"examples: aligned barriers of {len(pick)} replica pairs")
    cc = ctx.cfg.connect
    df, _, _ = pair_barriers(problem.subset(n_data), theta[order], pairs=len(pick), n_points=cc.n_points,
                             method=cc.align, seed=ctx.cfg.seed)
    out = np.full((k, k), np.nan)
    out[a, b] = out[b, a] = df["barrier_aligned"].to_numpy(float)
    return out


def top_examples(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` hardest test examples (most replicas wrong, then highest mean loss) and the ``n`` the clusters disagree
    on most (largest spread of the clusters' error rates, then vote entropy; only examples with a spread), with
    ``kind`` ("hardest" or "clusters disagree") and ``rank``."""
    hard = table.sort_values(["error_share", "loss_mean", "example"], ascending=[False, False, True]).head(n)
    disp = table[table["cluster_spread"] > 0].sort_values(["cluster_spread", "vote_entropy", "example"],
                                                          ascending=[False, False, True]).head(n)
    out = []
    for kind, d in (("hardest", hard), ("clusters disagree", disp)):
        d = d.copy()
        d.insert(0, "rank", np.arange(len(d)))
        d.insert(0, "kind", kind)
        out.append(d)
    return pd.concat(out, ignore_index=True)


def cluster_accuracy(robust: pd.DataFrame) -> pd.DataFrame:
    """Per cluster (and the merged model) and per shift: the mean, worst and best test accuracy of its replicas."""
    r = robust.copy()
    r["cluster"] = np.where(r["model"] == "merged", "merged", r["cluster"].astype(str))
    g = r.groupby(["cluster", "corruption", "severity"], sort=False)["accuracy"]
    out = g.agg(accuracy="mean", accuracy_min="min", accuracy_max="max", replicas="count",
                sd=lambda v: v.std(ddof=1) if len(v) > 1 else np.nan).reset_index()
    from scipy import stats

    hw = stats.t.ppf(0.975, np.maximum(out["replicas"] - 1, 1)) * out["sd"] / np.sqrt(out["replicas"])
    out["ci_low"], out["ci_high"] = (out["accuracy"] - hw).clip(lower=0), (out["accuracy"] + hw).clip(upper=1)
    return out[["cluster", "corruption", "severity", "replicas", "accuracy", "ci_low", "ci_high", "accuracy_min",
                "accuracy_max"]]
