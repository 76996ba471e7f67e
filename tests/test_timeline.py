"""The timeline's basin radii: straight walks with a threshold relative to the snapshot's loss, in filter-normalised
and isotropic directions, each radius with its censoring; the caption claims a change only where both agree."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.protocols import timeline as TL
from lossglass.protocols.walk import radius_words
from lossglass.report import timeline as T

pytestmark = pytest.mark.usefixtures("one_thread")


def _quadratic(center: torch.Tensor, c: float, h: torch.Tensor):
    """E = c + (theta - center)^T H (theta - center) / 2: from the start ``center`` the loss E0 = c first exceeds
    c (1 + delta) at distance r with r^2 d^T H d / (2 |d|^2) = delta c along the unit direction d / |d|."""
    def fn(t):
        x = t - center
        return c + 0.5 * ((x @ h) * x).sum(1)

    return lg.Problem.from_function(fn, center.numel(), dtype=torch.float64)


def test_straight_walks_that_never_cross_are_censored_and_said_as_lower_bounds():
    p = 12
    flat = lg.Problem.from_function(lambda t: 0 * t.sum(1) + 0.7, p, dtype=torch.float64)
    theta = torch.randn(3, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    st = TL.TimelineSettings(walkers=5, walk_steps=6, step_size=0.01, delta=0.1)
    per, pooled = TL.ray_radii(flat, theta, st)
    for k in ("", "_iso"):
        assert (per[f"basin_radius{k}_censored"] == 1.0).all() and per[f"basin_radius{k}_lower_bound"].all()
        assert np.allclose(per[f"basin_radius{k}_relative"], 1.0)  # censored at the end of the grid, s = 1
        assert np.allclose(per[f"basin_radius{k}"], theta.norm(dim=1).numpy())  # |theta| in absolute units
        assert pooled[f"pooled_radius{k}_censored"] == 1.0 and pooled[f"pooled_radius{k}_lower_bound"] is True
        assert pooled[f"pooled_radius{k}_ci_high"] == math.inf
    words = radius_words(pooled["pooled_radius_relative"], pooled["pooled_radius_lower_bound"],
                         pooled["pooled_radius_censored"])
    assert words == "≥ 1 (100% censored)"
    assert radius_words(0.0312, False, 0.25) == "0.0312 (25% censored)" and radius_words(math.nan, True, 1.0) == "—"


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_radius_on_an_isotropic_quadratic_is_the_exact_distance_for_both_kinds(c):
    # H = a I: the loss depends only on the distance r, so E0 (1 + delta) is reached at r* = sqrt(2 delta c / a) along
    # every direction, filter-normalised or isotropic; in units of |theta|: s* = r* / |center|
    p, a, delta = 20, 3.0, 0.1
    center = torch.randn(p, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 2.0
    prob = _quadratic(center, c, a * torch.eye(p, dtype=torch.float64))
    st = TL.TimelineSettings(walkers=16, walk_steps=12, step_size=0.005, delta=delta)
    s_star = math.sqrt(2 * delta * c / a) / float(center.norm())
    grid = st.grid
    j = int(np.searchsorted(grid, s_star))  # s* lies in (grid[j-1], grid[j]]
    width = (grid[j] - grid[j - 1]) / 2**TL.BISECT
    per, pooled = TL.ray_radii(prob, center.unsqueeze(0), st)
    for k in ("", "_iso"):
        s = pooled[f"pooled_radius{k}_relative"]
        assert s_star <= s <= s_star + width + 1e-12, (s, s_star, width)
        assert pooled[f"pooled_radius{k}_censored"] == 0.0 and pooled[f"pooled_radius{k}_lower_bound"] is False
        assert pooled[f"pooled_radius{k}_ci_low"] <= s <= pooled[f"pooled_radius{k}_ci_high"]
        assert per[f"basin_radius{k}"].iloc[0] == pytest.approx(s * float(center.norm()))
    assert per["delta_loss"].iloc[0] == pytest.approx(delta * c)  # the rise follows the loss: relative threshold


def test_radius_on_an_anisotropic_quadratic_follows_each_direction():
    # along the unit direction u the threshold is crossed at r(u) = sqrt(2 delta c / u^T H u): per walker, exactly
    p, c, delta = 8, 1.0, 0.2
    evals = torch.logspace(-1, 2, p, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    h = q @ torch.diag(evals) @ q.T
    center = torch.full((p,), 1.5, dtype=torch.float64)
    prob = _quadratic(center, c, h)
    st = TL.TimelineSettings(walkers=64, walk_steps=40, step_size=1e-3, delta=delta, seed=5)
    start = center.unsqueeze(0).repeat(64, 1)
    d = TL.ray_directions(prob, start, None, st.seed, 82)  # the isotropic walk's directions
    assert torch.allclose(d.norm(dim=1), start.norm(dim=1))
    u = d / d.norm(dim=1, keepdim=True)
    exact = torch.sqrt(2 * delta * c / ((u @ h) * u).sum(1)).numpy() / float(center.norm())
    thr = torch.full((64,), c * (1 + delta), dtype=torch.float64)
    s, crossed = TL.ray_crossings(prob, start, d, thr, st.grid)
    inside = exact <= 1.0
    assert (crossed == inside).all() and inside.sum() > 40
    grid = np.concatenate([[0.0], st.grid])
    j = np.searchsorted(grid, exact[inside])  # exact in (grid[j-1], grid[j]]: bisection leaves 1/2^BISECT of it
    width = (grid[j] - grid[j - 1]) / 2**TL.BISECT
    assert np.all(s[inside] >= exact[inside] - 1e-12) and np.all(s[inside] <= exact[inside] + width + 1e-12)
    assert np.all(s[~inside] == 1.0)


def _timeline(filt: tuple, iso: tuple) -> pd.DataFrame:
    """A constructed timeline: memorised at step 100, generalised at 3000; each radius a (value, lo, hi, bound)
    per step for steps 0, 100, 1000, 3000."""
    steps, train, test = [0, 100, 1000, 3000], [0.1, 1.0, 1.0, 1.0], [0.05, 0.4, 0.6, 0.97]
    rows = []
    for i, st in enumerate(steps):
        for r in (0, 1):
            row = {"step": st, "kind": "replica", "replica": r, "train_accuracy": train[i], "test_accuracy": test[i],
                   "lambda_max": 10.0, "weight_norm": 5.0}
            for k, vals in (("", filt), ("_iso", iso)):
                v, lo, hi, b = vals[i]
                row.update({f"pooled_radius{k}_relative": v, f"pooled_radius{k}_ci_low": lo,
                            f"pooled_radius{k}_ci_high": hi, f"pooled_radius{k}_lower_bound": b,
                            f"pooled_radius{k}_censored": 1.0 if b else 0.0})
            rows.append(row)
    return pd.DataFrame(rows)


class _View:
    def __init__(self, t):
        self.t = t

    def table(self, name):
        return self.t


BOUND = (1.0, 1.0, math.inf, True)  # every walker censored at s = 1


def _v(x, rel=0.1):
    return (x, x * (1 - rel), x * (1 + rel), False)


def test_caption_refuses_a_widening_claim_when_the_two_kinds_of_radii_disagree():
    # filter-normalised widens 0.02 -> 0.05 (intervals apart); isotropic narrows 0.015 -> 0.005: no claim
    text = T.caption(T.timeline_data(_View(_timeline((BOUND, _v(0.02), _v(0.04), _v(0.05)),
                                                     (BOUND, _v(0.015), _v(0.004), _v(0.005))))))
    assert "from step 100 to 3000 the two kinds of directions disagree (filter-normalised: widens, isotropic: " \
           "narrows" in text and "no claim about the basin's width" in text, text
    assert "widens in both" not in text
    # the same filter-normalised radii, the isotropic flat within noise: still no claim
    text = T.caption(T.timeline_data(_View(_timeline((BOUND, _v(0.02), _v(0.04), _v(0.05)),
                                                     (BOUND, _v(0.015), _v(0.015), _v(0.016))))))
    assert "isotropic: unresolved" in text and "widens in both" not in text, text
    # both widen beyond their intervals: the claim is made, with the numbers
    text = T.caption(T.timeline_data(_View(_timeline((BOUND, _v(0.02), _v(0.04), _v(0.05)),
                                                     (BOUND, _v(0.015), _v(0.03), _v(0.04))))))
    assert "from step 100 to 3000 the basin widens in both kinds of directions" in text, text
    assert "filter-normalised 0.02 (0% censored) → 0.05 (0% censored)" in text
    # from the start (every walker censored: a bound) to memorisation: a narrowing, said with "≥"
    assert "From step 0 to 100 the basin narrows in both kinds of directions" in text
    assert "filter-normalised ≥ 1 (100% censored) → 0.02 (0% censored)" in text


def test_a_bound_can_show_a_widening_but_never_a_narrowing():
    val = {"value": 0.02, "lo": 0.018, "hi": 0.022, "bound": False, "censored": 0.0}
    bound_hi = {"value": 0.05, "lo": 0.05, "hi": math.inf, "bound": True, "censored": 0.8}
    bound_lo = {"value": 0.01, "lo": 0.01, "hi": math.inf, "bound": True, "censored": 0.9}
    assert T.radius_change(val, bound_hi) == "widens"  # at least 0.05 after at most 0.022
    assert T.radius_change(bound_hi, val) == "narrows"  # at most 0.022 after at least 0.05
    assert T.radius_change(val, bound_lo) == "unresolved"  # "at least 0.01" says nothing against 0.02
    assert T.radius_change(bound_lo, bound_hi) == "unresolved"  # two bounds cannot be compared
    assert T.radius_change(bound_lo, val) == "unresolved"  # at least 0.01, then about 0.02: the bound may be above it


def test_snapshot_rows_on_a_small_network_without_a_run_folder(tiny):
    theta = tiny.init(4, 0)
    st = TL.TimelineSettings(n_data=200, walkers=3, walk_steps=8, step_size=0.01, pairs=2, n_points=3, seed=1)
    rows = TL.snapshot_rows(tiny, theta, np.arange(4), 7, st)
    assert list(rows.columns) == list(TL.TIMELINE_COLUMNS)
    rep, pair = rows[rows["kind"] == "replica"], rows[rows["kind"] == "pair"]
    assert len(rep) == 4 and len(pair) == 2 and (rows["step"] == 7).all() and (rows["n_data"] == 200).all()
    for k in ("", "_iso"):
        c = rep[f"basin_radius{k}_censored"]
        assert ((c >= 0) & (c <= 1)).all() and np.allclose(c * 3, np.round(c * 3))  # shares of 3 walkers
        # a replica's median is a lower bound exactly when fewer than half its walkers crossed (here: 2 of 3 censored)
        assert (rep[f"basin_radius{k}_lower_bound"].astype(bool) == (c > 0.5)).all()
        assert np.allclose(rep[f"basin_radius{k}"], rep[f"basin_radius{k}_relative"] * rep["weight_norm"])
        assert rows[f"pooled_radius{k}_relative"].nunique() == 1
    e0 = tiny.subset(200).evaluate(theta, "train")["loss"].numpy()
    assert np.allclose(rep["delta_loss"], 0.1 * e0)
    again = TL.snapshot_rows(tiny, theta, np.arange(4), 7, st)
    pd.testing.assert_frame_equal(rows, again)  # deterministic


def test_settings_refuse_what_they_cannot_measure():
    with pytest.raises(lg.LossglassError, match="unknown timeline.normalize"):
        TL.TimelineSettings(normalize="none")
    with pytest.raises(lg.LossglassError, match="step_size"):
        TL.TimelineSettings(step_size=1.5)
    with pytest.raises(lg.LossglassError, match="walk_steps"):
        TL.TimelineSettings(walk_steps=1)


def test_the_radius_rule_rarely_speaks_under_the_null_and_sees_a_doubling():
    # 16 walkers per snapshot (4 replicas x 4), lognormal radii (sigma 0.3) censored at s = 1: the same law at both
    # snapshots gives a claim (either way) in 0.4% of 4,000 simulated pairs (95% interval 0.3-0.7%), a doubled median
    # is seen as widening in 98% (one kind; 96% both kinds). Here 1,000 pairs each: <= 2% and >= 90%.
    from lossglass.protocols.walk import km_groups

    rng = np.random.default_rng(3)

    def snap(med):
        r = med * np.exp(rng.normal(0, 0.3, (1000, 16)))
        k = km_groups(np.minimum(r, 1.0), r <= 1.0)
        return [{"value": k["value"][i], "lo": k["ci_low"][i], "hi": k["ci_high"][i], "bound": k["lower_bound"][i],
                 "censored": k["censored"][i]} for i in range(1000)]

    null = [T.radius_change(a, b) for a, b in zip(snap(0.05), snap(0.05))]
    assert np.mean([m != "unresolved" for m in null]) <= 0.02
    double = [T.radius_change(a, b) for a, b in zip(snap(0.05), snap(0.1))]
    assert np.mean([m == "widens" for m in double]) >= 0.9
    assert np.mean([m == "narrows" for m in double]) == 0
