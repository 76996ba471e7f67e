"""Stage ``curvature`` (protocol 4): flatness measures of every replica, their rank correlations with the
generalisation gap, the cheap proxies checked against them, and the Hessian spectral densities."""

from __future__ import annotations

import pandas as pd

from .base import Stage


class CurvatureStage(Stage):
    name = "curvature"
    position = 60
    section = "curvature"
    sections = ("curvature",)
    depends = ("train",)
    tables = ("flatness", "kendall", "spectral_density")
    command = "protocol 4: Hessian, flatness, Kendall tau"
    report = ("curvature", "Protocol 4 — curvature, flatness and generalisation")

    def run(self, ctx) -> dict:
        from tqdm.auto import tqdm

        from ..protocols import curvature as K

        c, seed = ctx.cfg.curvature, ctx.cfg.seed
        rep = ctx.alive()
        prob = ctx.problem.subset(c.n_hvp_data)
        steps = tqdm(total=3 if c.density else 2, desc="curvature", disable=not ctx.bars, leave=False)
        ctx.note(f"curvature: flatness measures of {len(rep)} replicas on {len(prob.dataset.y_train)} samples")
        df = K.flatness_table(prob, rep, rho=c.rho, top_k=c.top_k, tol=c.tol, trace_probes=c.trace_probes,
                              n_samples=c.n_samples, entropy_radius=c.entropy_radius, entropy_chains=c.entropy_chains,
                              entropy_epsilon=c.entropy_epsilon, seed=seed)
        steps.update(1)
        ctx.store.write_table("flatness", df)
        indep, left_out = K.independent_rows(df)
        taus = pd.concat([K.rank_correlations(indep, target=t, seed=seed) for t in ("gap_error", "gap_loss",
                                                                                   "test_error")])
        taus["excluded_coupled"] = left_out
        ctx.store.write_table("kendall", taus)
        # the cheap proxies against the full measures they stand for, on the same replicas
        pv = [K.rank_correlations(df, measures=[m], target=t, seed=seed)
              for m, t in (("proxy_lambda_batch", "lambda_max"), ("proxy_perturbation", "sharpness_average"))]
        ctx.store.write_table("proxy_validation", pd.concat(pv, ignore_index=True))
        steps.update(1)
        if c.density:
            ctx.note("curvature: spectral densities")
            rows = []
            for label, idx in (("flattest", int(df["lambda_max"].idxmin())), ("sharpest", int(df["lambda_max"].idxmax()))):
                sd = K.spectral_density(prob, rep.theta[idx], steps=c.slq_steps, seed=seed)
                rows.append(pd.DataFrame({"label": label, "replica": idx, "eigenvalue": sd.grid, "density": sd.density}))
            ctx.store.write_table("spectral_density", pd.concat(rows, ignore_index=True))
            steps.update(1)
        steps.close()
        return {"n_data": len(prob.dataset.y_train)}

    def estimate(self, cfg, sizes, est) -> None:
        cv, p = cfg.curvature, sizes.n_params
        if not p:
            return
        n_h = min(cv.n_hvp_data or sizes.n_train, sizes.n_train)
        from ..resources import curvature_passes

        passes = sizes.replicas * curvature_passes(cv) + (2 * cv.slq_steps if cv.density else 0)
        est.add("time", "curvature", sizes.cost("curvature", passes * p * n_h))
