"""WeightWatcher (Martin & Mahoney 2021) beside lossglass's spectral measures, on the networks of a measures run.

WeightWatcher is a peer, never a dependency: it lives in its own environment (benchmarks/requirements.txt), e.g.

    python3 -m venv /tmp/wwenv && /tmp/wwenv/bin/pip install -c constraints.txt torch==2.13.0 weightwatcher
    python benchmarks/bench_measures_ww.py RUN_FOLDER --ww-python /tmp/wwenv/bin/python [--out ww.json]

RUN_FOLDER is a run of ``lossglass run --preset measures`` (or any config with [measures] enabled and measures.widths
set: one-hidden-layer MLPs). This script (in lossglass's environment) writes every grid network's weights as a
state_dict, runs itself in WeightWatcher's environment on them (``analyze()`` with its defaults: power-law fit by the
``powerlaw`` package, layers with >= 8 eigenvalues), and compares per layer: WeightWatcher's alpha against ours (in
units of the fit's standard error (alpha - 1) / sqrt(n_tail), and whether both chose the same xmin), alpha_weighted
against our alpha_hat, stable rank; then how well WeightWatcher's network averages predict the gap, next to ours
(Kendall tau with the gap over the same usable networks, and the granulated Psi through the same statistics).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def worker(folder: str) -> None:
    """In WeightWatcher's environment: analyze every state_dict in ``folder``, write ww.csv."""
    import pandas as pd
    import torch
    import weightwatcher as ww
    from safetensors.torch import load_file

    rows = []
    for f in sorted(Path(folder).glob("net-*.safetensors")):
        sd = load_file(str(f))
        w1, w2 = sd["0.weight"], sd["2.weight"]
        model = torch.nn.Sequential(torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.ReLU(),
                                    torch.nn.Linear(w2.shape[1], w2.shape[0]))
        model.load_state_dict(sd)
        det = ww.WeightWatcher(model=model).analyze()
        det["net"] = int(f.stem.split("-")[1])
        rows.append(det)
    pd.concat(rows, ignore_index=True).to_csv(Path(folder) / "ww.csv", index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder with the measures stage's grid")
    ap.add_argument("--ww-python", required=True, help="python of an environment with weightwatcher installed")
    ap.add_argument("--out", default=None, help="write the comparison as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.run)
        return

    import numpy as np
    import pandas as pd
    import torch
    from safetensors.torch import save_file
    from scipy.stats import kendalltau

    from lossglass.protocols import measures as M
    from lossglass.stages.measures import AXES
    from lossglass.store import RunStore

    store = RunStore(args.run, create=False)
    grid = store.read_table("measures_grid")
    ours = store.read_table("measures_layers")
    ours = ours[ours["source"] == "grid"]
    with tempfile.TemporaryDirectory() as tmp:
        for task, g in grid.groupby("task", sort=True):  # one file per grid task
            theta = store.read_tensors(task)["theta"]
            w = int(g["width"].iloc[0])
            d_in = (theta.shape[1] - 10 - 11 * w) // w  # P = w (d_in + 1) + 10 (w + 1)
            for i, rid in enumerate(g["replica"]):
                t = theta[i]
                p1 = w * d_in
                sd = {"0.weight": t[:p1].reshape(w, d_in), "0.bias": t[p1:p1 + w],
                      "2.weight": t[p1 + w:p1 + w + 10 * w].reshape(10, w), "2.bias": t[p1 + w + 10 * w:]}
                save_file({k: v.contiguous() for k, v in sd.items()}, f"{tmp}/net-{int(rid)}.safetensors")
        subprocess.run([args.ww_python, __file__, tmp, "--ww-python", args.ww_python, "--worker"], check=True)
        wwd = pd.read_csv(f"{tmp}/ww.csv")
    wwd["layer"] = wwd["longname"].astype(str) + ".weight"  # WeightWatcher names a Sequential's Linear by its index
    # our fit with WeightWatcher's KS convention on the same eigenvalues (the stage's table uses Clauset et al.'s)
    lower = []
    for task, g in grid.groupby("task", sort=True):
        theta = store.read_tensors(task)["theta"].double()
        w = int(g["width"].iloc[0])
        d_in = (theta.shape[1] - 10 - 11 * w) // w
        p1 = w * d_in
        for name, sl, shape in (("0.weight", slice(0, p1), (w, d_in)), ("2.weight", slice(p1 + w, p1 + 11 * w), (10, w))):
            ev = torch.linalg.svdvals(theta[:, sl].reshape(len(theta), *shape)).square()
            f = M.fit_power_law(ev, ks="lower")
            lower.append(pd.DataFrame({"replica": g["replica"].to_numpy(), "layer": name,
                                       "alpha_lower": f.alpha.numpy(), "xmin_lower": f.xmin.numpy()}))
    ours = ours.merge(pd.concat(lower), on=["replica", "layer"], how="left")
    both = ours.merge(wwd, left_on=["replica", "layer"], right_on=["net", "layer"], suffixes=("", "_ww"))
    both = both[np.isfinite(both["alpha"]) & np.isfinite(both["alpha_ww"])]
    both["z"] = (both["alpha"] - both["alpha_ww"]) / both["alpha_sigma"]
    per_layer = both.groupby("layer").agg(
        n=("z", "size"), alpha_ours=("alpha", "median"), alpha_ww=("alpha_ww", "median"),
        median_abs_diff=("alpha", lambda s: float(np.median(np.abs(s - both.loc[s.index, "alpha_ww"])))),
        within_1_se=("z", lambda z: float((z.abs() <= 1).mean())), within_2_se=("z", lambda z: float((z.abs() <= 2).mean())),
        same_xmin=("xmin", lambda s: float(np.isclose(s, both.loc[s.index, "xmin_ww"], rtol=1e-4).mean())),
        alpha_ww_convention=("alpha_lower", "median"),
        ww_convention_max_abs_diff=("alpha_lower", lambda s: float(np.max(np.abs(s - both.loc[s.index, "alpha_ww"])))),
        stable_rank_rel_diff=("stable_rank", lambda s: float(np.median(np.abs(s / both.loc[s.index, "stable_rank_ww"]
                                                                                 - 1)))))
    print(per_layer.to_string())
    # predictive power of WeightWatcher's network averages, on the same networks and statistics as ours
    net = wwd.groupby("net").agg(ww_pkg_alpha=("alpha", "mean"), ww_pkg_alpha_weighted=("alpha_weighted", "mean"))
    g = grid.merge(net, left_on="replica", right_index=True, how="left")
    axes = [a for a in AXES if g[a].nunique() > 1]
    cols = ["ww_alpha", "ww_alpha_hat", "ww_pkg_alpha", "ww_pkg_alpha_weighted"]
    rank = M.rank_measures(g, cols, axes, n_boot=1000, usable="usable")
    show = ["measure", "tau", "tau_lo", "tau_hi", "psi", "psi_lo", "psi_hi", *[f"psi_{a}" for a in axes], "cmi"]
    print(rank[show].to_string())
    u = g[g["usable"]]
    agree = kendalltau(u["ww_alpha"], u["ww_pkg_alpha"]).statistic
    print(f"Kendall tau between our network alpha and WeightWatcher's, over {len(u)} networks: {agree:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"per_layer": per_layer.reset_index().to_dict("records"),
                                              "rank": rank[show].to_dict("records"), "tau_ours_vs_ww": agree},
                                             indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
