"""One estimate (issue 28, item 4): every stage's time is a count of work units times the unit costs of
``lossglass.resources.UNIT_COSTS`` (measured on a reference machine, scaled by the matmul rate); the CLI prints it."""

import math

import pytest

from lossglass import resources as res
from lossglass.cli import main
from lossglass.config import load_config
from lossglass.errors import LossglassError


def _at(rate: float, cfg) -> res.Estimate:
    """The estimate of ``cfg`` on a machine whose matmul rate is ``rate``."""
    old = res._RATE
    res._RATE = rate
    try:
        return res.estimate(cfg)
    finally:
        res._RATE = old


def test_on_the_reference_machine_a_stage_is_its_count_times_the_table():
    """At the reference rate train's estimate is exactly S x train_step + K P N E x train + K P (N + N_test) x
    forward, S the SGD steps of all tasks (ceil(K / chunk) tasks of E ceil(N / batch) steps)."""
    cfg = load_config(preset="quickstart")
    est = _at(res.REFERENCE_RATE, cfg)
    size, _ = res.sizes(cfg)
    k, p, n, n_te, e = size.replicas, size.n_params, size.n_train, size.n_test, cfg.train.epochs
    assert p == 784 * 64 + 64 + 64 * 10 + 10
    steps = -(-k // cfg.train.chunk) * e * -(-n // cfg.train.batch_size)
    assert steps == 1 * 3 * 71  # 9,000 training samples (10,000 less 1,000 for validation) in batches of 128
    u = {name: unit.seconds for name, unit in res.UNIT_COSTS.items()}
    want = (steps * u["train_step"] + k * p * n * e * u["train"] + k * p * (n + n_te) * u["forward"]) * res.STAGE_OVERHEAD
    assert math.isclose(est.stage_seconds["train"], want, rel_tol=1e-12)
    assert math.isclose(sum(est.stage_seconds.values()), est.seconds, rel_tol=1e-12)


def test_a_machine_twice_as_fast_halves_every_stage():
    cfg = load_config(preset="paper")
    ref, fast = _at(res.REFERENCE_RATE, cfg), _at(2 * res.REFERENCE_RATE, cfg)
    assert set(ref.stage_seconds) == set(fast.stage_seconds) >= {"train", "walk", "connect", "replicas", "curvature"}
    for stage, s in ref.stage_seconds.items():
        assert math.isclose(fast.stage_seconds[stage], s / 2, rel_tol=1e-12), stage


def test_more_work_costs_more_in_proportion():
    """Doubling the walk's steps doubles its Metropolis share; doubling the replicas doubles training."""
    base = load_config(preset="quickstart")
    more = load_config(preset="quickstart", overrides=["train.replicas=32"])
    a, b = _at(res.REFERENCE_RATE, base), _at(res.REFERENCE_RATE, more)
    assert math.isclose(b.stage_seconds["train"], 2 * a.stage_seconds["train"], rel_tol=1e-12)
    longer = load_config(preset="quickstart", overrides=["walk.steps=200"])
    assert math.isclose(_at(res.REFERENCE_RATE, longer).stage_seconds["walk"], 2 * a.stage_seconds["walk"],
                        rel_tol=1e-12)


def test_an_unknown_unit_is_one_line():
    with pytest.raises(LossglassError, match="unknown work unit 'flop'; known: train"):
        res.unit_cost("flop")


def test_dry_run_names_the_machine_and_prints_each_stage(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--preset", "quickstart", "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "GFLOP/s" in text and res.REFERENCE_MACHINE in text
    est = res.estimate(load_config(preset="quickstart"))
    for stage in est.stage_seconds:
        assert f"  {stage} " in text
    assert "total" in text and not out.exists()


def _doc_rows(path: str, header: str) -> dict[str, str]:
    """First-column -> second-column cells of the Markdown table that follows the line starting with ``header``."""
    from pathlib import Path

    lines = (Path(__file__).parents[1] / path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = {}
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip().strip("*").strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize("path, header", [("README.md", "The `paper` preset"),
                                          ("BENCHMARKS.md", "## The `paper` preset at full size")])
def test_the_documents_state_the_clis_estimate_of_the_paper_preset(path, header):
    """README and BENCHMARKS.md print, per stage and in total, what the CLI estimates on the reference machine."""
    est = _at(res.REFERENCE_RATE, load_config(preset="paper"))
    rows = _doc_rows(path, header)
    for stage, s in est.stage_seconds.items():
        assert rows[stage] == res._duration(s), (path, stage, rows.get(stage))
    assert rows["total"] == res._duration(est.seconds), (path, rows.get("total"))
