"""What every column of every table in a run folder means (units and signs included). ``docs/tables.md`` is
generated from this registry (``lossglass config --tables``), and a test checks that every column a study writes is
described here, so the documentation cannot drift from the data."""

from __future__ import annotations

import fnmatch

_REPLICA = {
    "replica": "replica id (its seeds are mixed from (seed, replica))",
    "seed": "the study seed (NA for imported checkpoints)",
    "epochs": "epochs asked for (the maximum when a stop criterion is set)",
    "batch_size": "mini-batch size", "optimizer": "sgd or adam", "method": "sgd, sam, langevin or replicated",
    "momentum": "heavy-ball momentum", "weight_decay": "L2 weight decay", "lr": "learning rate",
    "stop_at_loss": "stop criterion on the training loss (NaN: none)",
    "stop_at_accuracy": "stop criterion on the training accuracy (NaN: none)",
    "train_loss": "mean training loss E (nats for cross-entropy) on the training split",
    "train_accuracy": "accuracy on the training split (fraction)",
    "val_loss": "mean loss on the validation split (carved from the training data; chooses models)",
    "val_accuracy": "accuracy on the validation split (fraction)",
    "test_loss": "mean loss on the test split (grades, never chooses)", "test_accuracy": "accuracy on the test split",
    "diverged": "the replica hit NaN/inf and was frozen at its last good state",
    "diverged_at_step": "training step of the divergence (-1: none)",
    "epochs_trained": "epochs the replica actually trained (fewer when it reached the stop criterion)",
    "reached_stop": "the replica reached the stop criterion",
    "gap_loss": "test loss - train loss (positive: worse on unseen data)",
    "gap_error": "generalisation gap = train accuracy - test accuracy = test error - train error (positive: worse on "
                 "unseen data)",
    "group": "training group index ([[train.groups]])", "device": "where it was trained",
    "source": "'trained', or the checkpoint file it was imported from", "sha256": "SHA-256 of the imported checkpoint",
}

_SUMMARY = {
    "system": "what the overlaps compare", "label": "file-safe name of the system's tables (overlaps_LABEL, ...)",
    "replicas": "number of replicas / states compared",
    "q_mean": "mean overlap q over pairs a < b", "q_var": "variance of q over pairs", "q_min": "smallest q",
    "q_max": "largest q", "q_skew": "skewness of P(q)", "q_kurtosis": "excess kurtosis of P(q)",
    "q4_over_q2sq": "<q^4>/<q^2>^2, a Binder-like shape ratio of P(q) (3 for a Gaussian centred at 0, 1 for a "
                    "single sharp peak away from 0)",
    "pairs": "number of pairs a < b", "cophenetic": "Pearson correlation of the distances with the dendrogram's "
    "merge heights (1: a tree describes them exactly)",
    "points": "points in the ultrametricity test", "triangles": "triangles tested (a seeded sample beyond the limit)",
    "K_mean": "mean Katzgraber-Hartmann index K = (d_max - d_mid)/sigma(d) over triangles (0: ultrametric)",
    "K_mean_se": "jackknife (leave-one-point-out) standard error of K_mean", "K_median": "median K over triangles",
    "subdominant_distance": "|d - d_sub| / |d| with d_sub the subdominant ultrametric (single linkage)",
    "null": "name of the null model (same overlap law, norms and Gram spectrum, replicas mixed: no clusters)",
    "D_eff": "participation ratio of the null's spectrum (its effective dimension)",
    "null_exponent": "power-law exponent of the null's spectrum", "null_dimensions": "dimensions of the null",
    "null_K_mean": "mean K of the null draws", "null_K_std": "standard deviation of K over the null draws",
    "z": "(K_mean - null_K_mean) / null_K_std (negative: more ultrametric than the null)",
    "p_value": "one-sided p-value of K being this low under the null ((1 + #null <= observed)/(n_null + 1); for the "
               "'SK all samples' row: Fisher's combination over disorder samples)",
    "alpha": "significance level of the verdict", "n_null": "null draws",
    "cv": "coefficient of variation of the distances (spread / mean)",
    "trivial": "distances nearly equal (cv below 0.05): trivially ultrametric",
    "symmetric": "distances from |q| (spin-flip symmetric systems)",
    "verdict": "'nested' (clusters within clusters, p < alpha at two or more levels), 'clusters' (one level), "
               "'no evidence', 'trivial' (nearly equal distances) or 'cannot tell' (no calibrated null)",
    "sentence": "the verdict in words, chosen from the numbers",
    "norms": "how the null reads the distances: 'unit' (chords of normalised overlaps), 'fitted' (general distances, "
             "both a fitted origin and the centroid tried) or 'folded |q|'",
    "levels": "nested levels of clusters found (1: one level, as one-step RSB; 2 or more: clusters within clusters, "
              "as a Parisi tree; 0: none)",
    "levels_complete": "False when the level below the last one found could not be tested (clusters too small): "
                       "levels is then a lower bound",
    "top_clusters": "number of top-level clusters", "within_p": "Fisher-combined p-value of structure within the "
    "top-level clusters (the level-2 test; NaN when not tested)",
    "level_p_values": "p-value of each level's test, top level first ('p1, p2, ...')",
    "verdict_reason": "why the verdict is what it is (for 'cannot tell': why no calibrated null exists)",
    "duplicates": "replicas that coincide with another (d = 0: the same state sampled twice), counted once",
    "temperature": "temperature of the samples (units of the energy: loss for networks, H for SK)",
    "move_acceptance": "fraction of accepted Metropolis moves", "energy_mean": "mean energy of the samples or minima",
    "equilibrated": "the sampler's equilibration checks passed (energy and q halves agree, R_hat < 1.1, P(q) "
                    "symmetric for SK, at least one round trip of the ladder)",
    "n_data": "training samples the energy used", "disorder": "disorder sample index (SK couplings)",
    "abs_q_mean": "<|q|>", "frac_abs_q_below_0_3": "fraction of |q| below 0.3 (weight near q = 0)",
    "exchange_min": "smallest replica-exchange acceptance along the ladder", "exchange_max": "largest one",
    "energy_min": "lowest energy reached", "n_spins": "number of spins N",
    "descent_runs": "gradient-descent runs of the p-spin", "distinct_minima": "distinct minima among them (|q| < 0.999)",
}

_WALK_SUMMARY = {
    "kind": "walk (every step taken), metropolis or langevin", "walkers": "number of walkers", "steps": "steps walked",
    "acceptance": "fraction of proposals accepted", "msd_alpha": "exponent of MSD ~ t^alpha (1: free diffusion)",
    "energy_start": "mean energy at the start", "energy_end": "mean energy at the end (finite values)",
    "stopped_walkers": "walkers stopped by a non-finite state", "nonfinite": "non-finite proposals (all walkers)",
    "nonfinite_walkers": "walkers with at least one", "nonfinite_end": "walkers whose last energy is not finite",
    "distance_max": "largest distance from the start reached", "radius_*_median": "Kaplan-Meier median distance at which "
    "E first exceeds E0 + delta (walkers that never do are censored, not dropped)",
    "radius_*_lower_bound": "fewer than half crossed: the median is only a lower bound",
    "radius_*_iqr": "Kaplan-Meier interquartile range (NaN when a quartile is not estimable)",
    "radius_*_censored": "share of the walkers that never crossed (censored at their reach)",
    "radius_*_ci_low": "95% interval of the KM median over walkers (Brookmeyer-Crowley, log-log band), low end",
    "radius_*_ci_high": "its high end (inf: the walks do not bound the radius from above)",
    "normalize": "step normalisation",
    "step_size": "step size sigma", "temperature": "Metropolis temperature (NaN: every step taken)",
    "run": "walk run index", "label": "walk run label", "n_data": "training samples the walk's energy used",
    "lr": "Langevin step",
}

TABLES: dict[str, dict[str, str]] = {
    "replicas": _REPLICA,
    "flatness": {**_REPLICA, "lambda_max": "largest Hessian eigenvalue (Lanczos; Riemannian on a sphere)",
                 "hessian_trace": "trace of the Hessian (Hutch++)", "hessian_trace_se": "its standard error",
                 "sharpness_radius": "absolute radius R = rho |theta| of the sharpness perturbations",
                 "sharpness_average": "E_u[E(theta + R u)] - E(theta), u random filter-normalised unit directions",
                 "sharpness_worst": "max over |u| <= R of E(theta + u) - E(theta) (projected ascent)",
                 "sharpness_keskar": "Keskar et al.: 100 (max over the box |u_i| <= rho(|theta_i| + 1) of the rise) / "
                                     "(1 + E)",
                 "local_entropy": "log of the fraction of the ball |theta' - theta| <= r where E <= E0 + epsilon "
                                  "(subset simulation; higher = flatter; NaN: below the estimator's resolution)",
                 "local_entropy_se": "its standard error", "local_entropy_radius": "the ball radius r (absolute)",
                 "weight_norm": "|theta|", "proxy_lambda_batch": "top Hessian eigenvalue of one mini-batch (power "
                 "iteration): the cheap proxy", "proxy_perturbation": "loss rise under one filter-normalised "
                 "perturbation: the cheap proxy", "test_error": "1 - test accuracy"},
    "kendall": {"measure": "flatness measure", "target": "gap_error, gap_loss or test_error",
                "kendall_tau": "Kendall's tau across replicas (positive: sharper -> larger target; local entropy "
                               "negated)", "ci_low": "95% bootstrap interval, low", "ci_high": "95% bootstrap interval, high",
                "p_value": "two-sided p-value (assumes independent replicas)", "n": "replicas with finite values",
                "excluded_coupled": "replicated-SGD replicas left out (coupled by design, not independent)"},
    "proxy_validation": {"measure": "proxy", "target": "the full measure it stands for",
                         "kendall_tau": "rank agreement of proxy and full measure", "ci_low": "95% interval, low",
                         "ci_high": "95% interval, high", "p_value": "two-sided p-value", "n": "replicas"},
    "spectral_density": {"label": "flattest or sharpest replica", "replica": "its row", "eigenvalue": "Hessian "
                         "eigenvalue lambda", "density": "spectral density at lambda (integrates to 1)"},
    "selection": {"strategy": "selection rule (or a reference row: pool median, pool best, merged)",
                  "expected_test_accuracy": "expected test accuracy when choosing from random sub-pools",
                  "ci_low": "95% interval on new data (replicas and the test split's own sampling error), low",
                  "ci_high": "high",
                  "split_ci_low": "95% interval on this test split (replicas resampled, test images fixed), low",
                  "split_ci_high": "high",
                  "test_se": "the test split's standard error, at most sqrt(a (1 - a) / n_test)",
                  "effective_replicas": "replicas the estimate rests on, 1 / sum of squared pick shares",
                  "n_test": "test images behind the test accuracies",
                  "gain_vs_best_val": "expected gain over choosing by validation accuracy alone",
                  "gain_ci_low": "95% interval of the gain on this test split, low", "gain_ci_high": "high",
                  "pool": "sub-pool size",
                  "n_resamples": "sub-pools drawn", "measure": "the declared flatness measure",
                  "val_se": "standard error of validation accuracy (the 1-SE window)",
                  "picked_replica": "the replica the rule picks from the whole pool",
                  "picked_val_accuracy": "its validation accuracy", "picked_test_accuracy": "its test accuracy",
                  "merged_val_loss": "validation loss of the merged model",
                  "coupled": "replicas coupled by design (replicated SGD): no intervals"},
    "replica_summary": _SUMMARY, "reference_summary": _SUMMARY,
    "pq": {"label": "system", "q": "one overlap value (pair a < b)"},
    "reference_pq": {"label": "system (SK: pooled over disorder samples and stored sweeps)", "q": "one overlap value"},
    "overlaps_*": {"a": "replica a", "b": "replica b", "q": "overlap q_ab"},
    "linkage_*": {"left": "merged cluster", "right": "merged cluster", "height": "merge distance",
                  "size": "points in the new cluster"},
    "order_*": {"leaf": "replica index in dendrogram leaf order"},
    "triangles_*": {"d_min": "smallest side", "d_mid": "middle side", "d_max": "largest side"},
    "replica_layers": {"parameter": "parameter tensor", "q_mean": "mean overlap of that tensor over pairs",
                       "q_std": "its spread"},
    "reference_energies": {"replica": "p-spin descent run", "energy": "energy per spin H/N at its minimum"},
    "reference_sk_ladder": {"T": "temperature (units of H, T_c = 1)", "E_mean": "mean energy per spin after burn-in",
                            "E_se": "its standard error", "move_acceptance": "single-spin-flip acceptance",
                            "exchange_acceptance": "swap acceptance with the next temperature",
                            "E_first": "mean energy, first half after burn-in", "E_first_se": "its error",
                            "E_second": "mean energy, second half", "E_second_se": "its error",
                            "drift_z": "(second - first) / error", "R_hat": "Gelman-Rubin R across replicas",
                            "equilibrated": "every check of the row passed (energy_ok, q_halves_ok, q_symmetric, "
                            "ladder_ok)", "q2": "<q^2>",
                            "drift_limit": "largest |drift_z| allowed (two-sided 1%, Bonferroni over temperatures)",
                            "energy_ok": "energy halves agree (|drift_z| <= drift_limit) and R_hat < 1.1",
                            "absq_first": "<|q|> over replica pairs, first half of the stored samples",
                            "absq_second": "<|q|>, second half", "absq_z": "(second - first) / jackknife error over "
                            "replicas", "q2_first": "<q^2>, first half", "q2_second": "<q^2>, second half",
                            "q2_z": "(second - first) / jackknife error", "small_q_first": "share of pairs with "
                            "|q| < 0.3, first half", "small_q_second": "the same, second half",
                            "small_q_z": "(second - first) / jackknife error",
                            "absq_R_hat": "Gelman-Rubin R of |q| with the replica pairs as chains",
                            "q_mean": "signed <q> over the run (0 when P(q) is symmetric under q -> -q)",
                            "q_mean_z": "q_mean / jackknife error", "q3_mean": "<q^3> over the run",
                            "q3_z": "q3_mean / jackknife error", "q_R_hat": "Gelman-Rubin R of the signed q about 0 "
                            "with the replica pairs as chains", "start_overlap": "mean overlap of each replica with "
                            "its given start (NaN: random starts)", "start_z": "start_overlap / its error over replicas",
                            "q_z_limit": "largest |z| allowed for the q tests (two-sided 1% of Student's t, R - 1 "
                            "degrees of freedom, Bonferroni over tests and temperatures)",
                            "q_tested": "the q checks could run (at least 3 replicas and 2 stored samples)",
                            "q_halves_ok": "the q halves agree (three |z| <= q_z_limit) and absq_R_hat < 1.1",
                            "q_symmetric": "q_mean_z, q3_z and start_z at most q_z_limit (one-sided: memory of a common "
                            "state makes them positive) and q_R_hat < 1.1",
                            "round_trip_time": "sweeps per round trip T_1 -> T_M -> T_1 of one configuration",
                            "ladder_ok": "burn-in and measured run each at least one round-trip time",
                            "E_identity": "-(beta/2)(1 - <q^2>), equal to E on average over disorder",
                            "disorder": "disorder sample"},
    "walk": {"step": "step t", "walker": "walker", "start": "index of its starting replica",
             "energy": "energy E (training loss) after step t", "train_accuracy": "training accuracy",
             "distance": "|theta_t - theta_0|", "accepted": "the step was accepted", "test_loss": "test loss (every "
             "record_every steps)", "test_accuracy": "test accuracy", "normalize": "step normalisation",
             "step_size": "sigma", "temperature": "Metropolis T (NaN: every step)", "kind": "walk kind",
             "run": "walk run", "label": "walk run label", "lr": "Langevin step"},
    "walk_summary": _WALK_SUMMARY,
    "timeline": {
        "step": "optimiser step of the snapshot", "kind": "'replica' (one replica) or 'pair' (a replica pair)",
        "replica": "replica id (-1 on pair rows)", "a": "replica a of the pair (-1 on replica rows)", "b": "replica b",
        "train_loss": "training loss (full training split)", "train_accuracy": "training accuracy",
        "test_loss": "test loss", "test_accuracy": "test accuracy", "weight_norm": "|theta|",
        "lambda_max": "largest Hessian eigenvalue on the first n_data training samples (Lanczos)",
        "basin_radius": "Kaplan-Meier median over the replica's walkers of the filter-normalised walk of the distance "
                        "at which E first exceeds E0 (1 + delta) (absolute units; a lower bound where flagged)",
        "basin_radius_relative": "basin_radius / |theta|",
        "basin_radius_lower_bound": "fewer than half the replica's walkers crossed: basin_radius is only a lower bound",
        "basin_radius_censored": "share of the replica's walkers that never crossed",
        "basin_radius_iso": "the same for the isotropic walk (step sigma mean|theta| / sqrt(P) per coordinate)",
        "basin_radius_iso_relative": "basin_radius_iso / |theta|",
        "basin_radius_iso_lower_bound": "basin_radius_iso is only a lower bound",
        "basin_radius_iso_censored": "share of the replica's isotropic walkers that never crossed",
        "pooled_radius_relative": "the snapshot's KM median over every walker (all replicas) of radius / |theta|, "
                                  "filter-normalised walk (a lower bound where flagged)",
        "pooled_radius_ci_low": "its 95% interval over walkers, low end",
        "pooled_radius_ci_high": "high end (inf: not bounded by the walks)",
        "pooled_radius_lower_bound": "the pooled median was not reached: a lower bound",
        "pooled_radius_censored": "share of all the snapshot's filter-normalised walkers that never crossed",
        "pooled_radius_iso_relative": "the same for the isotropic walk",
        "pooled_radius_iso_ci_low": "its 95% interval, low end", "pooled_radius_iso_ci_high": "high end",
        "pooled_radius_iso_lower_bound": "a lower bound", "pooled_radius_iso_censored": "share of isotropic walkers "
        "that never crossed",
        "reach_relative": "largest distance / |theta| any filter-normalised walker reached (a censored radius is at "
                          "least its walker's reach)",
        "reach_iso_relative": "the same for the isotropic walk",
        "barrier_naive": "training-loss barrier on the straight path a-b", "barrier_aligned": "after aligning b to a",
        "barrier_test_naive": "test-loss barrier, naive", "barrier_test_aligned": "test-loss barrier, aligned",
        "q_raw": "cosine overlap of the pair", "q_aligned": "after alignment",
        "q_raw_mean": "mean raw overlap over all pairs of the snapshot", "q_aligned_mean": "mean aligned overlap",
        "n_data": "training samples the curvature and the walks used",
        "delta": "loss rise that defines the radius, as a fraction of the start loss E0",
        "delta_loss": "that rise in loss units, delta |E0| (E0 on the n_data samples)",
        "step_size": "sigma: expected step length of both walks in units of |theta|",
        "step_size_iso": "the isotropic walk's per-coordinate step, sigma mean|theta| / sqrt(P)"},
    "walk_msd": {"run": "walk run", "label": "label", "t": "step", "msd": "<|theta_t - theta_0|^2> over live walkers"},
    "walk_aging": {"tw": "waiting time t_w", "t": "lag t", "C": "<theta(t_w) . theta(t_w + t)> / P",
                   "Delta": "<|theta(t_w + t) - theta(t_w)|^2> / P", "C_norm": "C normalised by the norms",
                   "C_se": "standard error of C", "Delta_se": "standard error of Delta", "walkers": "live walkers",
                   "run": "walk run", "label": "label"},
    "walk_energy_distance": {"distance": "mean distance in the bin", "energy": "mean energy in the bin",
                             "std": "energy spread in the bin", "count": "finite energies in the bin",
                             "nonfinite": "non-finite energies in the bin", "run": "walk run", "label": "label"},
    "walk_radius": {"delta": "loss rise delta", "walker": "walker", "radius": "distance at the first crossing (NaN: "
                    "censored)", "step": "step of the crossing (-1: none)", "censored": "never crossed",
                    "censor_distance": "largest distance reached (where it is censored)",
                    "threshold": "the energy E0 + delta that counts as crossing", "run": "walk run",
                    "label": "label"},
    "perm_barriers": {"k": "hidden units permuted", "barrier": "training-loss barrier on the straight path to the "
                      "permuted copy (max of E minus the linear baseline)", "barrier_test": "the same on the test loss",
                      "distance": "|theta - permuted theta|", "max_loss": "largest training loss on the path"},
    "pair_barriers": {"a": "replica A", "b": "replica B", "barrier_naive": "barrier on the straight path A-B",
                      "barrier_aligned": "barrier after permuting B to match A", "barrier_test_naive": "test-loss "
                      "barrier, naive", "barrier_test_aligned": "test-loss barrier, aligned", "distance_naive": "|B - A|",
                      "distance_aligned": "|aligned B - A|"},
    "paths": {"alpha": "position t along the path (A at 0, B at 1)", "train_loss": "training loss",
              "train_accuracy": "training accuracy", "test_loss": "test loss", "test_accuracy": "test accuracy",
              "kind": "naive, aligned or bezier", "pair": "pair index"},
    "plane_random": {"x": "coordinate along direction 1 (filter-normalised)", "y": "along direction 2",
                     "train_loss": "training loss", "train_accuracy": "training accuracy", "test_loss": "test loss",
                     "test_accuracy": "test accuracy"},
    "plane_through": {"x": "coordinate along B - A (units of |B - A|)", "y": "along the orthogonal direction",
                      "train_loss": "training loss", "train_accuracy": "training accuracy", "test_loss": "test loss",
                      "test_accuracy": "test accuracy"},
    "plane_through_points": {"label": "A, B or C (aligned B)", "x": "plane coordinate", "y": "plane coordinate"},
    "width_barriers": {"width": "hidden width m", "n_params": "parameters P", "a": "replica A", "b": "replica B",
                       "barrier_naive": "naive barrier", "barrier_aligned": "aligned barrier",
                       "barrier_test_naive": "naive test barrier", "barrier_test_aligned": "aligned test barrier",
                       "distance_naive": "|B - A|", "distance_aligned": "|aligned B - A|",
                       "test_accuracy": "mean test accuracy of the width's replicas"},
    "width_barrier_fit": {"beta": "fitted exponent of the mean aligned barrier ~ c m^(-beta) (NaN with fewer than 2 "
                          "positive barriers; theory for two-layer ReLU networks: 1/2)", "c": "fitted prefactor c",
                          "n_widths": "widths with a positive aligned barrier used by the fit",
                          "width_min": "smallest width", "width_max": "largest width"},
}


def all_tables() -> dict[str, dict[str, str]]:
    """The tables described here, then those a stage describes itself (:attr:`lossglass.stages.base.Stage.columns`:
    a new stage's tables need no edit here)."""
    from .stages import REGISTRY

    out = dict(TABLES)
    for st in REGISTRY:
        for name, cols in st.columns.items():
            out[name] = {**out.get(name, {}), **cols}
    return out


def describe(table: str, column: str) -> str | None:
    """The description of ``column`` in ``table`` (table names like ``overlaps_network-aligned`` match patterns)."""
    for name, cols in all_tables().items():
        if fnmatch.fnmatch(table, name):
            for pat, text in cols.items():
                if fnmatch.fnmatch(column, pat):
                    return text
    return None


def reference() -> str:
    """docs/tables.md: every table and column."""
    lines = ["# lossglass tables", "", "Generated from `lossglass/columns.py` (`lossglass config --tables`). Every table "
             "is `RUN/tables/NAME.parquet` (`pandas.read_parquet`); `*` stands for a system label.", ""]
    for name, cols in all_tables().items():
        lines += [f"## `{name}`", "", "| column | meaning |", "|---|---|"]
        lines += [f"| `{c}` | {t.replace('|', '/')} |" for c, t in cols.items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
