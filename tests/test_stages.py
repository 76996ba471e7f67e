"""The stage registry is the one list of stages: the run order, dependencies, CLI sub-commands, report sections,
dashboard layers, column descriptions and resource estimates all come from it, and a new stage is one module."""

import os
import subprocess
import sys
import textwrap

import pytest

from lossglass import stages
from lossglass.stages import REGISTRY, STAGE_ORDER, dependencies, dependents, stage


def test_run_order_and_dependencies_come_from_the_registry():
    assert STAGE_ORDER == ("train", "timeline", "walk", "connect", "replicas", "curvature", "measures", "select",
                           "examples", "reference", "report")
    for i, st in enumerate(REGISTRY):
        assert all(STAGE_ORDER.index(d) < i for d in st.depends), f"{st.name} depends on a later stage"
    assert dependents("train") == {"train", "timeline", "walk", "connect", "replicas", "curvature", "measures",
                                   "select", "examples"}
    assert dependencies("select") == {"select", "train", "curvature"}
    with pytest.raises(Exception, match="unknown stage 'walks'"):
        stage("walks")


def test_cli_report_dashboard_and_columns_follow_the_registry():
    from lossglass.cli import parser
    from lossglass.columns import all_tables, describe
    from lossglass.dashboard.collect import LAYERS
    from lossglass.report.static import sections

    sub = next(a for a in parser()._actions if a.dest == "command")
    commands = {st.name for st in REGISTRY if st.command}
    assert commands == {"walk", "connect", "replicas", "curvature", "measures", "reference"}
    assert commands <= set(sub.choices)
    assert [n for n, _ in sections()] == [st.report[0] for st in REGISTRY if st.report]
    assert [k for k, _, _ in LAYERS] == [st.report[0] for st in REGISTRY if st.report and st.dashboard]
    documented = all_tables()
    for st in REGISTRY:
        for t in st.tables:
            assert any(__import__("fnmatch").fnmatch(t, pat) for pat in documented), f"{st.name}: table {t} undocumented"
    assert describe("walk_radius", "censored") is not None


def test_resource_estimate_is_the_sum_of_the_stages_shares():
    from lossglass.config import load_config
    from lossglass.resources import estimate

    cfg = load_config(preset="quickstart")
    est = estimate(cfg)
    whats = [w for k, w, _ in est.items if k == "time"]
    assert whats[0].startswith("train") and any(w.startswith("walk") for w in whats)
    cfg.walk.enabled = False
    assert not any(w.startswith("walk") for k, w, _ in estimate(cfg).items if k == "time")


TOY = '''
"""A toy stage, the whole of it in this one file: the norm of every replica, computed in tasks of 2 replicas."""
from dataclasses import dataclass

import pandas as pd

from lossglass.stages.base import Stage, Task, TaskOutput


@dataclass(frozen=True)
class NormTask(Task):
    first: int
    stage = "toy"

    def key(self):
        return str(self.first)

    def outputs(self, name):
        return [f"tables/{name}.parquet"]

    def run(self, ctx):
        theta = ctx.input("replicas").theta[self.first:self.first + 2]
        df = pd.DataFrame({"replica": range(self.first, self.first + len(theta)), "norm": theta.norm(dim=1).numpy()})
        return TaskOutput().table(ctx.name, df)


class ToyStage(Stage):
    name = "toy"
    position = 65
    depends = ("train",)
    tables = ("toy",)
    command = "a toy stage: replica norms"
    columns = {"toy": {"replica": "replica id", "norm": "|theta|"}}

    def inputs(self, ctx):
        from lossglass.stages.common import load_replicas

        return {"replicas": load_replicas(ctx.store)}

    def run(self, ctx):
        k = len(ctx.alive())
        names = ctx.run_tasks(self, [NormTask(i) for i in range(0, k, 2)])
        ctx.store.write_table("toy", pd.concat([ctx.store.read_table(n) for n in names], ignore_index=True))
        ctx.discard_partial("toy")
        return {"tasks": len(names)}

    def estimate(self, cfg, sizes, est):
        est.add("time", "toy norms", 0.001)
'''


def test_a_new_stage_is_one_module(tmp_path):
    (tmp_path / "toy_stage.py").write_text(textwrap.dedent(TOY))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('name = "toy"\n[data]\nname = "digits"\nn_train = 200\nn_test = 50\n[model]\nhidden = 6\n'
                   "[train]\nreplicas = 5\nepochs = 1\nbatch_size = 50\n")
    env = {**os.environ, "LOSSGLASS_STAGES": "toy_stage",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "lossglass.cli", *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout + out.stderr

    run = tmp_path / "run"
    assert "toy" in cli("--help")
    log = cli("run", str(cfg), "--out", str(run), "--stages", "train,toy,report")
    assert "toy: finished" in log
    import pandas as pd

    toy = pd.read_parquet(run / "tables" / "toy.parquet")
    assert list(toy["replica"]) == [0, 1, 2, 3, 4] and (toy["norm"] > 0).all()
    assert not (run / "tables" / "tasks").exists()  # its task results were gathered and discarded
    assert "stage toy" in cli("info", str(run))
    assert "## `toy`" in cli("config", "--tables")
    assert "toy: finished" in cli("toy", str(run), "--redo", "--no-report")
    assert stages.stage("train").name == "train"  # this process: no toy stage
