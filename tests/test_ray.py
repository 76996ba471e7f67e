"""The Ray executor: a local head with 2 CPUs started and stopped here; results equal the local executor's."""

import os

import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.study import Study

from .test_study_cli import _cfg

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_head():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"LOSSGLASS_FAIL_ONCE": os.environ.get("LOSSGLASS_FAIL_ONCE", "")}})
    yield
    ray.shutdown()


def _run(tmp_path, name, executor):
    from lossglass.config import load_config

    cfg = load_config(_cfg(tmp_path, epochs=2), overrides=["train.chunk=2"])
    return Study(cfg, tmp_path / name, progress=False, executor=executor).run(("train", "walk", "connect"))


@pytest.mark.slow
def test_ray_run_equals_local_run_and_survives_a_dying_worker(tmp_path, ray_head, monkeypatch):
    from lossglass.executor import LocalExecutor, RayExecutor

    local = _run(tmp_path, "local", LocalExecutor())
    marker_dir = tmp_path / "faults"
    marker_dir.mkdir()
    # the first training task kills its worker process once; Ray retries it on a fresh worker
    ray.shutdown()
    monkeypatch.setenv("LOSSGLASS_FAIL_ONCE", str(marker_dir))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"LOSSGLASS_FAIL_ONCE": str(marker_dir)}})
    remote = _run(tmp_path, "ray", RayExecutor())
    assert (marker_dir / "failed-train-0-0").exists(), "the injected failure did not happen"
    assert lg.RunStore(remote.path).stages()["train"]["tasks"] == 3
    assert lg.RunStore(remote.path).stages()["train"]["executor"] == "ray"
    a, b = local.read_tensors("replicas")["theta"], remote.read_tensors("replicas")["theta"]
    assert torch.equal(a, b)
    pd.testing.assert_frame_equal(local.read_table("replicas"), remote.read_table("replicas"))
    for table in ("walk", "perm_barriers", "pair_barriers", "paths", "plane_random", "plane_through", "width_barriers"):
        pd.testing.assert_frame_equal(local.read_table(table), remote.read_table(table))
    assert lg.RunStore(remote.path).stages()["connect"]["tasks"] == 8  # perm, 2 pairs, bezier, 2 planes, 2 widths


@pytest.mark.slow
def test_finished_tasks_are_not_recomputed(tmp_path):
    from lossglass.config import load_config
    from lossglass.executor import LocalExecutor
    from lossglass.stages import stage
    from lossglass.stages.train import TrainChunk

    cfg = load_config(_cfg(tmp_path, epochs=1), overrides=["train.chunk=3"])
    study = Study(cfg, tmp_path / "run", progress=False, executor=LocalExecutor())
    study.prepare()
    ctx, train = study.context(), stage("train")
    tasks = train.tasks(ctx)
    assert tasks == [TrainChunk(0, 0, 3), TrainChunk(0, 3, 6)]
    [name] = ctx.run_tasks(train, tasks[:1])
    path = study.store.tensor_path(name)
    stamp = path.stat().st_mtime_ns
    assert ctx.run_tasks(train, tasks[:1]) == [name] and path.stat().st_mtime_ns == stamp
    study.run(("train",))
    assert study.store.read_tensors("replicas")["theta"].shape[0] == 6
    assert not path.exists()  # task files are gathered, then removed


def test_gpus_are_asked_for_only_when_the_device_may_use_them_and_the_cluster_has_them():
    from types import SimpleNamespace

    from lossglass.errors import LossglassError
    from lossglass.executor import RayExecutor

    ex = RayExecutor.__new__(RayExecutor)  # no Ray started: gpus_for reads the cluster's resources only
    ex.gpus_per_task = 0.25
    ex.ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0, "GPU": 2.0})
    assert (ex.gpus_for("cpu"), ex.gpus_for("auto"), ex.gpus_for("cuda"), ex.gpus_for("cuda:0")) == (0, .25, .25, .25)
    with pytest.raises(LossglassError, match="cuda:0"):
        ex.gpus_for("cuda:1")
    ex.ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0})
    assert ex.gpus_for("auto") == 0 and ex.gpus_for("cpu") == 0
    with pytest.raises(LossglassError, match="no GPUs"):
        ex.gpus_for("cuda")
    for bad in (0, -1, 1.5, "1"):
        with pytest.raises(LossglassError, match="gpus_per_task"):
            RayExecutor(gpus_per_task=bad)


def test_relay_seed_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path):
    from safetensors.torch import load as from_bytes

    from lossglass import checkpoint
    from lossglass.relay import newest_readable

    path = tmp_path / "checkpoints" / "train-0.safetensors"
    assert newest_readable(path) is None  # nothing there yet
    checkpoint.save(path, {"theta": torch.zeros(2, 3)})
    checkpoint.save(path, {"theta": torch.ones(2, 3)})  # the first is kept as NAME.prev
    assert torch.equal(from_bytes(newest_readable(path))["theta"], torch.ones(2, 3))  # intact: the newest
    path.write_bytes(path.read_bytes()[:40])  # a power cut mid-write
    with pytest.warns(RuntimeWarning, match="unreadable"):
        data = newest_readable(path)
    assert torch.equal(from_bytes(data)["theta"], torch.zeros(2, 3))  # the one before it
    checkpoint.previous(path).write_bytes(b"")  # both damaged: nothing to seed with
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert newest_readable(path) is None
