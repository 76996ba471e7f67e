"""Which model to ship, decided honestly: the validation split chooses, the test split only grades.

Strategies (each a rule applied to a pool of replicas, using validation accuracy and one flatness measure declared in
advance, ``select.measure``; lower = flatter, local entropy negated):

- ``best-val``: the highest validation accuracy;
- ``flattest``: the flattest by the declared measure;
- ``flattest-within-1se``: the flattest among the replicas whose validation accuracy is within one standard error
  sqrt(p (1 - p) / n_val) of the best (flatness as the tie-breaker within the noise of validation);
- ``random``: the floor;
- ``merged``: one model from many: every replica aligned to the barycentre of the aligned set (weight matching, as
  Ainsworth et al.'s MergeMany), averaged, BatchNorm statistics recomputed; graded beside the single replicas.

Each strategy's expected test accuracy is estimated by resampling the pool: ``n_resamples`` random sub-pools of
``pool`` replicas, the strategy applied to each, its pick graded on the test split. Its uncertainty comes from a
bootstrap over replicas (the whole resampling repeated on pools drawn with replacement); the gain of a flatness
rule over ``best-val`` is the paired difference on the same sub-pools, with the same bootstrap interval. No measure
is chosen on the replicas it ranks. Replicas coupled by design (replicated SGD) are not independent: no interval is
printed for pools that contain them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import LossglassError, check, choice
from .store import RunStore

STRATEGIES = ("best-val", "flattest", "flattest-within-1se", "random")
FLAT_HIGHER_IS_FLATTER = ("local_entropy",)


def _flatness(values: np.ndarray, measure: str) -> np.ndarray:
    """The declared measure oriented so that lower = flatter (NaN last)."""
    v = np.asarray(values, float) * (-1 if measure in FLAT_HIGHER_IS_FLATTER else 1)
    return np.where(np.isfinite(v), v, np.inf)


def picks(val: np.ndarray, flat: np.ndarray, se: float, pools: np.ndarray, rng: np.random.Generator) -> dict:
    """The index each strategy picks in every sub-pool. ``pools`` is ``(..., m)`` of replica indices; returns
    ``{strategy: (...) indices}``. Vectorised over sub-pools (and bootstrap draws); ties go to the first."""
    v, f = val[pools], flat[pools]
    best = v.max(-1, keepdims=True)
    near = np.where(v >= best - se, f, np.inf)
    take = lambda a: np.take_along_axis(pools, a[..., None], -1)[..., 0]  # noqa: E731
    return {"best-val": take(v.argmax(-1)), "flattest": take(f.argmin(-1)), "flattest-within-1se": take(near.argmin(-1)),
            "random": take(rng.integers(0, pools.shape[-1], size=pools.shape[:-1]))}


def _subpools(k: int, m: int, n: int, rng: np.random.Generator, lead: tuple = ()) -> np.ndarray:
    """``lead + (n, m)`` random sub-pools of m distinct indices out of k (a random key per item, argsorted)."""
    keys = rng.random(lead + (n, k))
    return np.argpartition(keys, m - 1, axis=-1)[..., :m] if m < k else np.broadcast_to(np.arange(k), lead + (n, k))


def evaluate_strategies(val, test, flat, *, n_val: int, pool: int | None = None, n_resamples: int = 2000,
                        n_boot: int = 200, seed: int = 0, measure: str = "measure") -> pd.DataFrame:
    """Expected test accuracy of each strategy when choosing from ``pool`` replicas (default: half, at least 3),
    with a 95% bootstrap interval over replicas, and each flatness rule's gain over ``best-val``.

    ``val``, ``test``: accuracies per replica; ``flat``: the declared measure, lower = flatter (see ``_flatness``).
    Columns: strategy, expected_test_accuracy, ci_low, ci_high, gain_vs_best_val, gain_ci_low, gain_ci_high,
    pool, n_resamples."""
    val, test, flat = (np.asarray(a, float) for a in (val, test, flat))
    k = len(val)
    check(k >= 3, f"model selection needs at least 3 replicas, got {k}")
    check(bool(np.isfinite(val).all()), "validation accuracies hold NaN: no validation split (set data.n_val)")
    m = int(pool or max(3, k // 2))
    check(2 <= m <= k, f"select.pool must be between 2 and the {k} replicas, got {m}")
    p = float(np.clip(val.max(), 1 / max(n_val, 1), 1 - 1 / max(n_val, 1)))
    se = float(np.sqrt(p * (1 - p) / max(n_val, 1)))
    rng = np.random.default_rng(seed)
    pools = _subpools(k, m, n_resamples, rng)
    main = {s: test[i].mean() for s, i in picks(val, flat, se, pools, rng).items()}
    # bootstrap over replicas: pools of k replicas drawn with replacement, the resampling repeated inside each
    boot_idx = rng.integers(0, k, size=(n_boot, k))
    sub = _subpools(k, m, max(200, n_resamples // 10), rng, lead=(n_boot,))
    pools_b = np.take_along_axis(boot_idx[:, None, :], sub, -1)  # (B, n, m) replica indices
    got = picks(val, flat, se, pools_b, rng)
    boot = {s: test[i].mean(-1) for s, i in got.items()}  # (B,)
    rows = []
    for s in STRATEGIES:
        lo, hi = np.percentile(boot[s], [2.5, 97.5])
        gain = boot[s] - boot["best-val"]
        glo, ghi = np.percentile(gain, [2.5, 97.5])
        rows.append({"strategy": s, "expected_test_accuracy": float(main[s]), "ci_low": float(lo), "ci_high": float(hi),
                     "gain_vs_best_val": float(main[s] - main["best-val"]), "gain_ci_low": float(glo),
                     "gain_ci_high": float(ghi), "pool": m, "n_resamples": n_resamples, "measure": measure,
                     "val_se": se})
    return pd.DataFrame(rows)


def verdict(table: pd.DataFrame, strategy: str = "flattest-within-1se") -> str:
    """Did flatness add anything over validation accuracy? ``helped``, ``hurt`` or ``nothing detectable`` from the
    95% interval of the gain of ``strategy`` over ``best-val``."""
    row = table.set_index("strategy").loc[strategy]
    if row["gain_ci_low"] > 0:
        return "helped"
    if row["gain_ci_high"] < 0:
        return "hurt"
    return "nothing detectable"


def select(store: RunStore, problem=None, strategy: str | None = None, *, measure: str | None = None,
           pool: int | None = None, n_resamples: int | None = None, merged: bool = True) -> dict:
    """Apply the strategies to a run's replicas, write ``tables/selection.parquet`` (one row per strategy, plus the
    pool's median and best and the merged model) and ``selection.json``, export the chosen model as a safetensors
    state_dict (``selected/``), and return the decision. Settings default to the run's ``[select]`` config."""
    from .config import load_config

    cfg = load_config(store.path / "config.toml")
    sc = cfg.select
    strategy = strategy or sc.strategy
    choice("selection strategy", strategy, (*STRATEGIES, "merged"))
    measure = measure or sc.measure
    check(store.has_table("replicas"), f"{store.path}: no replicas")
    reps = store.read_table("replicas")
    flat_tab = store.read_table("flatness") if store.has_table("flatness") else None
    n_val = int(cfg.data.n_val)
    if "val_accuracy" not in reps or n_val == 0:
        raise LossglassError("no validation split: set data.n_val (samples carved out of the training set) so that "
                             "the validation split chooses and the test split only grades")
    ok = reps[~reps["diverged"].astype(bool)].reset_index(drop=True) if "diverged" in reps else reps
    # replicas coupled by design (replicated SGD) are not independent draws: their spread is not seed-to-seed
    # variability, so the resampling (which assumes independent replicas) uses the others when there are enough
    coupled_mask = (ok["method"] == "replicated").to_numpy() if "method" in ok else np.zeros(len(ok), bool)
    n_coupled = int(coupled_mask.sum())
    if n_coupled and (~coupled_mask).sum() >= 3:
        ok = ok[~coupled_mask].reset_index(drop=True)
    check(len(ok) >= 3, f"model selection needs at least 3 replicas that did not diverge, got {len(ok)}")
    if flat_tab is not None:
        check(measure in flat_tab, f"select.measure = {measure!r} is not a column of the flatness table "
              f"(choose one of: {', '.join(c for c in flat_tab.columns if c not in reps.columns)})")
        fl = flat_tab.set_index("replica")[measure].reindex(ok["replica"]).to_numpy()
    else:
        check(strategy in ("best-val", "random", "merged"), f"strategy {strategy!r} needs the curvature stage's flatness "
              "measures (enable [curvature])")
        fl = np.zeros(len(ok))
    flat = _flatness(fl, measure)
    table = evaluate_strategies(ok["val_accuracy"], ok["test_accuracy"], flat, n_val=n_val, pool=pool or sc.pool,
                                n_resamples=n_resamples or sc.n_resamples, seed=cfg.seed, measure=measure)
    coupled = bool("method" in ok and (ok["method"] == "replicated").any())
    # the full pool's picks (what is exported), and reference rows
    rng = np.random.default_rng(cfg.seed)
    full = picks(ok["val_accuracy"].to_numpy(float), flat, float(table["val_se"].iloc[0]),
                 np.arange(len(ok))[None, :], rng)
    table["picked_replica"] = [int(ok["replica"].iloc[int(full[s][0])]) for s in table["strategy"]]
    table["picked_val_accuracy"] = [float(ok["val_accuracy"].iloc[int(full[s][0])]) for s in table["strategy"]]
    table["picked_test_accuracy"] = [float(ok["test_accuracy"].iloc[int(full[s][0])]) for s in table["strategy"]]
    extra = [{"strategy": "pool median", "expected_test_accuracy": float(ok["test_accuracy"].median())},
             {"strategy": "pool best (oracle, not a strategy)", "expected_test_accuracy": float(ok["test_accuracy"].max())}]
    merged_row = None
    if merged and problem is not None:
        merged_row = _merged(store, problem, ok)
        if merged_row is not None:
            extra.append(merged_row)
    if coupled:
        for c in ("ci_low", "ci_high", "gain_ci_low", "gain_ci_high"):
            table[c] = np.nan  # no independence, no interval
    table = pd.concat([table, pd.DataFrame(extra)], ignore_index=True)
    table["coupled"] = coupled
    store.write_table("selection", table)
    row = table.set_index("strategy")
    if strategy == "merged":
        check(merged_row is not None, "the merged model needs the model's permutation spec and the problem; it could not "
              "be built on this run")
        chosen = {"replica": None, "source": "merged (aligned average of all replicas)",
                  "val_accuracy": merged_row["picked_val_accuracy"], "test_accuracy": merged_row["picked_test_accuracy"]}
    else:
        rid = int(row.loc[strategy, "picked_replica"])
        src = ok.set_index("replica")["source"].get(rid, "trained") if "source" in ok else "trained"
        chosen = {"replica": rid, "source": str(src), "val_accuracy": float(row.loc[strategy, "picked_val_accuracy"]),
                  "test_accuracy": float(row.loc[strategy, "picked_test_accuracy"])}
    flat_rule = strategy if strategy in ("flattest", "flattest-within-1se") else "flattest-within-1se"
    decision = {"strategy": strategy, "measure": measure, "coupled": coupled, **chosen, "flat_rule": flat_rule,
                "excluded_coupled": n_coupled if not coupled else 0,
                "verdict": None if coupled or flat_tab is None else verdict(table.iloc[:len(STRATEGIES)], flat_rule),
                "expected": {s: float(row.loc[s, "expected_test_accuracy"]) for s in STRATEGIES},
                "gain": {s: [float(row.loc[s, c]) for c in ("gain_vs_best_val", "gain_ci_low", "gain_ci_high")]
                         for s in ("flattest", "flattest-within-1se")},
                "pool": int(row.loc["best-val", "pool"]), "n_resamples": int(row.loc["best-val", "n_resamples"]),
                "test_accuracy_median": float(ok["test_accuracy"].median()),
                "test_accuracy_max": float(ok["test_accuracy"].max()), "n_replicas": len(ok), "n_val": n_val}
    if problem is not None:
        decision["exported"] = _export(store, problem, decision, ok)
    store.write_json("selection.json", decision)
    return decision


def _merged(store: RunStore, problem, ok: pd.DataFrame) -> dict | None:
    """The aligned average of the replicas, graded on validation and test (BatchNorm statistics recomputed at the
    average when the model has them); None when the model's permutation symmetry is unknown."""
    from .protocols.replicas import aligned_replicas
    from .symmetry import spec_of

    try:
        spec_of(problem)
    except LossglassError:
        return None
    theta = _thetas(store, ok)
    avg = aligned_replicas(problem, theta.to(problem.device, problem.dtype)).mean(0)
    ev = {s: problem.evaluate(avg, s) for s in ("val", "test") if s in problem.data}
    store.write_tensors("merged", {"theta": avg.cpu()})
    return {"strategy": "merged", "expected_test_accuracy": float(ev["test"]["accuracy"]),
            "picked_val_accuracy": float(ev["val"]["accuracy"]) if "val" in ev else float("nan"),
            "picked_test_accuracy": float(ev["test"]["accuracy"]),
            "merged_val_loss": float(ev["val"]["loss"]) if "val" in ev else float("nan")}


def _thetas(store: RunStore, ok: pd.DataFrame):
    theta = store.read_tensors("replicas")["theta"]
    rows = store.read_table("replicas")["replica"].to_numpy()
    index = {int(r): i for i, r in enumerate(rows)}
    return theta[[index[int(r)] for r in ok["replica"]]]


def _export(store: RunStore, problem, decision: dict, ok: pd.DataFrame) -> str:
    from .byo import export_state

    meta = {"strategy": decision["strategy"], "measure": decision["measure"], "source": decision["source"]}
    if decision["replica"] is None:
        theta, rel = store.read_tensors("merged")["theta"], "selected/merged.safetensors"
    else:
        theta = _thetas(store, ok[ok["replica"] == decision["replica"]])[0]
        rel = f"selected/replica-{decision['replica']}.safetensors"
    for old in (store.path / "selected").glob("*.safetensors") if (store.path / "selected").is_dir() else []:
        if old.name != rel.split("/")[1] and str(old.relative_to(store.path)) in store.owned():
            old.unlink()
    export_state(problem, theta, rel, meta, store=store)
    return rel


_NAMES = {"best-val": "the best validation accuracy", "flattest": "the flattest by {m}",
          "flattest-within-1se": "the flattest by {m} among the replicas within one standard error of the best "
          "validation accuracy", "random": "a random replica", "merged": "the aligned average of all replicas"}


def explain(d: dict) -> str:
    """Plain words: which model, by which rule, its validation and test accuracy, and whether flatness added anything
    over validation accuracy on this run (with the interval)."""
    rule = _NAMES[d["strategy"]].format(m=d["measure"])
    what = f"replica {d['replica']}" if d["replica"] is not None else "the merged model"
    if d.get("source") not in (None, "trained") and d["replica"] is not None:
        what += f" (from {d['source']})"
    s = [f"Ship {what}: {rule} (rule and measure declared in advance). Validation accuracy "
         f"{d['val_accuracy'] * 100:.2f}%, test accuracy {d['test_accuracy'] * 100:.2f}% (the test split only grades; "
         f"pool of {d['n_replicas']} replicas: median {d['test_accuracy_median'] * 100:.2f}%, best "
         f"{d['test_accuracy_max'] * 100:.2f}%)."]
    if d.get("excluded_coupled"):
        s.append(f"The {d['excluded_coupled']} replicas trained with replicated SGD are coupled by design, so they were "
                 "left out of the choice (its intervals assume independent replicas).")
    e = d["expected"]
    s.append(f"Choosing from random sub-pools of {d['pool']} replicas ({d['n_resamples']} draws), the expected test "
             f"accuracy is {e['best-val'] * 100:.2f}% by validation accuracy alone, "
             f"{e['flattest-within-1se'] * 100:.2f}% with flatness as the tie-breaker, {e['flattest'] * 100:.2f}% by "
             f"flatness alone and {e['random'] * 100:.2f}% at random.")
    rule = d.get("flat_rule", "flattest-within-1se")
    g, lo, hi = d["gain"][rule]
    how = "flatness alone" if rule == "flattest" else "flatness as the tie-breaker"
    if d["coupled"]:
        s.append("These replicas are coupled by design (replicated SGD), so no interval that assumes independent "
                 "replicas is given.")
    elif d.get("verdict") is None:
        s.append("No flatness measures on this run, so flatness could not be compared with validation accuracy.")
    elif d["verdict"] == "helped":
        s.append(f"Flatness helped on this run: {how} gains {g * 100:+.2f} points over validation accuracy alone "
                 f"(95% interval {lo * 100:+.2f} to {hi * 100:+.2f}).")
    elif d["verdict"] == "hurt":
        s.append(f"Flatness hurt on this run: {how} loses {g * 100:+.2f} points against validation accuracy alone "
                 f"(95% interval {lo * 100:+.2f} to {hi * 100:+.2f}).")
    else:
        s.append(f"Flatness added nothing detectable over validation accuracy on this run ({how}): {g * 100:+.2f} points "
                 f"(95% interval {lo * 100:+.2f} to {hi * 100:+.2f}).")
    return " ".join(s)


def selection_frame(store: RunStore) -> pd.DataFrame | None:
    return store.read_table("selection") if store.has_table("selection") else None
