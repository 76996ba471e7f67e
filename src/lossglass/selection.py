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
``pool`` replicas, the strategy applied to each, its pick graded on the test split (a U-statistic: unbiased for the
expected test accuracy of the pick from ``pool`` fresh replicas). Two 95% intervals, which cover different things:

- on this test split (``split_ci_low``/``split_ci_high``, conditional): the replicas are the only random draw, the test
  images are held fixed. Delete-one jackknife over replicas, var = (K-1)/K sum_i (U_(-i) - U_(.))^2 with U_(-i) the
  estimate from the sub-pools without replica i (Efron & Stein 1981: not smaller than the variance on average), and a
  Student t quantile with n_eff - 1 degrees of freedom, n_eff = 1 / sum_i w_i^2 the effective number of replicas
  behind the estimate (w_i the share of sub-pools in which replica i is picked; Kish 1965). A rule that picks the top
  of a pool of K/2 rests on about 3 replicas whatever K is, so its interval is wide: for such rules the percentile
  bootstrap used before covered 76-90% and the jackknife with K - 1 degrees of freedom 85-91% (simulated pools with
  K = 8 to 64, benchmarks/calibrate_selection.py); this interval covers 93.8-99.5% for every rule.
- on new data (``ci_low``/``ci_high``, unconditional): also the test split's own sampling error. The test images are
  a sample; the strategy's accuracy is the mean over images of y_j = sum_i w_i c_ij (c_ij = 1 when replica i gets
  image j right), and since 0 <= y_j <= 1 with mean a, Var(y_j) <= a (1 - a): the split's standard error is at most
  sqrt(a (1 - a) / n_test) (``test_se``; exact when the replicas err on the same images, conservative otherwise). The
  half-width is the conditional one and 1.96 ``test_se`` added in quadrature. Coverage 97.5-100% in the same
  simulations (the bootstrap before: 31-71%, as it leaves this error out).

The gain of a flatness rule over ``best-val`` is the paired difference on the same sub-pools and the same test
images, with the conditional interval (jackknife, n_eff from the differences of the pick shares): the split's
shared error cancels in the difference, the rest of it (images on which the two picks disagree) is not counted, so
the verdict speaks of this run's test split. No measure is chosen on the replicas it ranks. Replicas coupled by
design (replicated SGD) are not independent: no interval is printed for pools that contain them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .errors import LossglassError, check, choice
from .store import RunStore

STRATEGIES = ("best-val", "flattest", "flattest-within-1se", "random")
#: measures where a larger value means flatter / safer (negated before "lower = flatter"); the complexity columns of
#: the measures table (lossglass.protocols.measures.COMPLEXITY) are all "larger = worse"
FLAT_HIGHER_IS_FLATTER = ("local_entropy", "margin", "pacbayes_sigma", "pacbayes_mag_sigma", "basin_radius_relative")


def _measure_table(store: RunStore) -> pd.DataFrame | None:
    """The per-replica table select.measure is looked up in: the curvature stage's ``flatness`` table, with the
    measures stage's ``measures`` table (issue 26: norms, margin, PAC-Bayes sigma, spectral measures and their
    complexity forms) joined on ``replica`` for the columns flatness lacks. None when neither exists."""
    flat = store.read_table("flatness") if store.has_table("flatness") else None
    if not store.has_table("measures"):
        return flat
    extra = store.read_table("measures")
    if flat is None:
        return extra
    new = [c for c in extra.columns if c not in flat.columns]
    return flat.merge(extra[["replica", *new]], on="replica", how="left")


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


def _jackknife(h: np.ndarray, notin: np.ndarray) -> np.ndarray:
    """Delete-one jackknife variance of the mean of ``h`` over the sub-pools: U_(-i) is the mean over the sub-pools
    without replica i, var = (K-1)/K sum_i (U_(-i) - mean U_(-i))^2. ``h`` ``(n, S)``, ``notin`` ``(n, K)`` booleans;
    returns ``(S,)``."""
    k = notin.shape[1]
    u = (notin.T.astype(float) @ h) / notin.sum(0)[:, None]  # (K, S)
    return (k - 1) / k * ((u - u.mean(0)) ** 2).sum(0)


def _t95(c: np.ndarray) -> np.ndarray:
    """The 97.5% Student t quantile for an estimate sum_i c_i t_i over K replicas: n_eff - 1 degrees of freedom with
    n_eff = (sum |c_i|)^2 / sum c_i^2 (Kish's effective sample size; K for the plain mean), at least 1. ``c`` ``(K, S)``."""
    n_eff = np.abs(c).sum(0) ** 2 / np.maximum((c**2).sum(0), 1e-300)
    return stats.t.ppf(0.975, np.maximum(n_eff - 1, 1.0))


def evaluate_strategies(val, test, flat, *, n_val: int, n_test: int | None = None, pool: int | None = None,
                        n_resamples: int = 2000, seed: int = 0, measure: str = "measure") -> pd.DataFrame:
    """Expected test accuracy of each strategy when choosing from ``pool`` replicas (default: half, at least 3),
    with two 95% intervals (on new data, and on this test split; see the module docstring) and each flatness rule's
    gain over ``best-val`` with its interval on this test split.

    ``val``, ``test``: accuracies per replica; ``flat``: the declared measure, lower = flatter (see ``_flatness``);
    ``n_test``: test images behind ``test`` (None: the interval on new data is NaN). With ``pool`` equal to the
    number of replicas no sub-pool leaves a replica out and every interval is NaN.
    Columns: strategy, expected_test_accuracy, ci_low, ci_high, split_ci_low, split_ci_high, test_se,
    effective_replicas, gain_vs_best_val, gain_ci_low, gain_ci_high, pool, n_resamples, measure, val_se, n_test."""
    val, test, flat = (np.asarray(a, float) for a in (val, test, flat))
    k = len(val)
    check(k >= 3, f"model selection needs at least 3 replicas, got {k}")
    check(bool(np.isfinite(val).all()), "validation accuracies hold NaN: no validation split (set data.n_val)")
    check(n_test is None or int(n_test) >= 1, f"n_test must be a positive number of test images, got {n_test!r}")
    m = int(pool or max(3, k // 2))
    check(2 <= m <= k, f"select.pool must be between 2 and the {k} replicas, got {m}")
    p = float(np.clip(val.max(), 1 / max(n_val, 1), 1 - 1 / max(n_val, 1)))
    se = float(np.sqrt(p * (1 - p) / max(n_val, 1)))
    rng = np.random.default_rng(seed)
    pools = _subpools(k, m, n_resamples, rng)
    got = picks(val, flat, se, pools, rng)
    h = np.stack([test[got[s]] for s in STRATEGIES], 1)  # (n, S): the pick's test accuracy in every sub-pool
    est = h.mean(0)
    share = np.stack([np.bincount(got[s], minlength=k) for s in STRATEGIES], 1) / n_resamples  # (K, S)
    notin = np.ones((n_resamples, k), bool)
    np.put_along_axis(notin, pools, False, 1)
    if m < k and bool(notin.any(0).all()):
        gain_h = h - h[:, [0]]
        hw = _t95(share) * np.sqrt(_jackknife(h, notin))
        ghw = _t95(share - share[:, [0]]) * np.sqrt(_jackknife(gain_h, notin))
    else:  # every sub-pool is the whole pool: nothing varies the replicas
        hw = ghw = np.full(len(STRATEGIES), np.nan)
    test_se = np.sqrt(est * (1 - est) / n_test) if n_test else np.full(len(STRATEGIES), np.nan)
    hw_new = np.sqrt(hw**2 + (stats.norm.ppf(0.975) * test_se) ** 2)
    gain = est - est[0]
    rows = []
    for j, s in enumerate(STRATEGIES):
        rows.append({"strategy": s, "expected_test_accuracy": float(est[j]), "ci_low": float(est[j] - hw_new[j]),
                     "ci_high": float(est[j] + hw_new[j]), "split_ci_low": float(est[j] - hw[j]),
                     "split_ci_high": float(est[j] + hw[j]), "test_se": float(test_se[j]),
                     "effective_replicas": float(1 / (share[:, j] ** 2).sum()), "gain_vs_best_val": float(gain[j]),
                     "gain_ci_low": float(gain[j] - ghw[j]) if j else 0.0, "gain_ci_high": float(gain[j] + ghw[j]) if j else 0.0,
                     "pool": m, "n_resamples": n_resamples, "measure": measure, "val_se": se,
                     "n_test": int(n_test) if n_test else np.nan})
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
    flat_tab = _measure_table(store)
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
        check(measure in flat_tab, f"select.measure = {measure!r} is not a column of the flatness or measures table "
              f"(choose one of: {', '.join(c for c in flat_tab.columns if c not in reps.columns)})")
        fl = flat_tab.set_index("replica")[measure].reindex(ok["replica"]).to_numpy()
    else:
        check(strategy in ("best-val", "random", "merged"), f"strategy {strategy!r} needs the curvature stage's flatness "
              "measures (enable [curvature])")
        fl = np.zeros(len(ok))
    flat = _flatness(fl, measure)
    n_test = _n_test(problem, cfg)
    table = evaluate_strategies(ok["val_accuracy"], ok["test_accuracy"], flat, n_val=n_val, n_test=n_test,
                                pool=pool or sc.pool, n_resamples=n_resamples or sc.n_resamples, seed=cfg.seed,
                                measure=measure)
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
        for c in ("ci_low", "ci_high", "split_ci_low", "split_ci_high", "gain_ci_low", "gain_ci_high"):
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
                "interval": {s: [float(row.loc[s, c]) for c in ("ci_low", "ci_high")] for s in STRATEGIES},
                "split_interval": {s: [float(row.loc[s, c]) for c in ("split_ci_low", "split_ci_high")]
                                   for s in STRATEGIES},
                "effective_replicas": {s: float(row.loc[s, "effective_replicas"]) for s in STRATEGIES},
                "n_test": n_test,
                "gain": {s: [float(row.loc[s, c]) for c in ("gain_vs_best_val", "gain_ci_low", "gain_ci_high")]
                         for s in ("flattest", "flattest-within-1se")},
                "pool": int(row.loc["best-val", "pool"]), "n_resamples": int(row.loc["best-val", "n_resamples"]),
                "test_accuracy_median": float(ok["test_accuracy"].median()),
                "test_accuracy_max": float(ok["test_accuracy"].max()), "n_replicas": len(ok), "n_val": n_val}
    if problem is not None:
        decision["exported"] = _export(store, problem, decision, ok)
    store.write_json("selection.json", decision)
    return decision


def _n_test(problem, cfg) -> int | None:
    """Test images behind the stored test accuracies: the problem's test split when it is loaded, else the config's
    ``data.n_test`` (None when neither says: the whole test set of a dataset not loaded here)."""
    data = getattr(problem, "data", None)
    if isinstance(data, dict) and "test" in data:
        return int(len(data["test"][1]))
    return int(cfg.data.n_test) if cfg.data.n_test else None


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
    if not d["coupled"] and d["strategy"] in STRATEGIES and "interval" in d:
        s.append(_interval_words(d, d["strategy"]))
    rule = d.get("flat_rule", "flattest-within-1se")
    g, lo, hi = d["gain"][rule]
    how = "flatness alone" if rule == "flattest" else "flatness as the tie-breaker"
    if d["coupled"]:
        s.append("These replicas are coupled by design (replicated SGD), so no interval that assumes independent "
                 "replicas is given.")
    elif d.get("verdict") is None:
        s.append("No flatness measures on this run, so flatness could not be compared with validation accuracy.")
    else:
        iv = (f"95% interval on this test split {lo * 100:+.2f} to {hi * 100:+.2f}: the same test images grade both, so "
              "the gain is conditional on them" if np.isfinite(lo) else "no interval: every sub-pool is the whole pool")
        if d["verdict"] == "helped":
            s.append(f"Flatness helped on this run: {how} gains {g * 100:+.2f} points over validation accuracy alone "
                     f"({iv}).")
        elif d["verdict"] == "hurt":
            s.append(f"Flatness hurt on this run: {how} loses {g * 100:+.2f} points against validation accuracy alone "
                     f"({iv}).")
        else:
            s.append(f"Flatness added nothing detectable over validation accuracy on this run ({how}): "
                     f"{g * 100:+.2f} points ({iv}).")
    return " ".join(s)


def _interval_words(d: dict, strategy: str) -> str:
    """The two 95% intervals of one strategy's expected test accuracy, each named by what it covers."""
    lo, hi = d["interval"][strategy]
    slo, shi = d["split_interval"][strategy]
    n_eff = d.get("effective_replicas", {}).get(strategy, float("nan"))
    if not np.isfinite(slo):
        return ("No interval: every sub-pool is the whole pool, so nothing resamples the replicas (set select.pool below "
                "the number of replicas).")
    split = (f"{slo * 100:.2f}% to {shi * 100:.2f}% on this test split (the replicas resampled, the test images held "
             f"fixed; the estimate rests on about {n_eff:.1f} replicas)")
    if not np.isfinite(lo):
        return (f"For the shipped rule, the 95% interval of the expected test accuracy is {split}; on new data it is "
                "wider by the test split's own sampling error, not given here because the number of test images is "
                "unknown.")
    a = d["expected"][strategy]
    half = 1.96 * float(np.sqrt(a * (1 - a) / d["n_test"])) * 100
    return (f"For the shipped rule, the 95% interval of the expected test accuracy on new data is {lo * 100:.2f}% to "
            f"{hi * 100:.2f}% (the replicas and the test split's own sampling error, a half-width of up to {half:.2f} "
            f"points with {d['n_test']} test images); {split}.")


def selection_frame(store: RunStore) -> pd.DataFrame | None:
    return store.read_table("selection") if store.has_table("selection") else None
