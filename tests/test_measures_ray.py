"""The measures stage on the Ray executor (a local head with 2 CPUs started and stopped here): its grid cells run as
Ray tasks and give the same tables as the local executor."""

import pandas as pd
import pytest

from lossglass.config import validate
from lossglass.study import Study

from .test_measures import TINY

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_measures_grid_on_ray_equals_the_local_run(tmp_path):
    from lossglass.executor import LocalExecutor, RayExecutor
    from lossglass.store import RunStore

    cfg = validate(TINY)
    local = Study(cfg, tmp_path / "local", progress=False, executor=LocalExecutor()).run(("train", "measures"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        remote = Study(cfg, tmp_path / "ray", progress=False, executor=RayExecutor()).run(("train", "measures"))
    finally:
        ray.shutdown()
    placed = RunStore(remote.path, create=False).read_json("placement/measures.json")
    assert placed["executor"] == "ray" and len(placed["tasks"]) == 3  # the study's replicas and 2 grid cells
    for t in ("measures", "measures_grid", "measures_layers", "measures_rank"):
        pd.testing.assert_frame_equal(local.read_table(t), remote.read_table(t))
