"""Ray without a shared disk, on a local 3-node cluster (``ray.cluster_utils.Cluster``): a head (the driver's node,
no CPUs for tasks) and two 1-CPU worker nodes whose processes cannot touch the run folder (a setup hook makes every
file call on a path under it raise, in every worker process: tasks, and the checkpoint relay). A small study runs
end to end with tables equal to the local executor's; a worker node killed while it trains finishes with the same
numbers, the retried task resuming from the checkpoint it shipped; fake GPUs are placed as Ray resources."""

import json
import os
import sys
import threading
import time

import pandas as pd
import pytest
import torch

import lossglass as lg
from lossglass.study import Study

from .test_study_cli import _cfg

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

FORBIDDEN_ENV = "LOSSGLASS_TEST_DRIVER_ONLY"


def _guard():
    """Worker setup hook: any file call on a path under ``$LOSSGLASS_TEST_DRIVER_ONLY`` raises PermissionError (as
    on a node where the driver's folder does not exist). Defined here, pickled by value (see the fixture)."""
    import builtins
    import io
    import os as _os

    root = _os.environ.get("LOSSGLASS_TEST_DRIVER_ONLY")
    if not root:
        return
    roots = {_os.path.abspath(root), _os.path.realpath(root)}  # resolved before any call is wrapped

    def wrap(fn):
        def guarded(path, *a, **k):
            if isinstance(path, (str, bytes, _os.PathLike)):
                p = _os.path.abspath(_os.fsdecode(_os.fspath(path)))
                if any(p == r or p.startswith(r + _os.sep) for r in roots):
                    raise PermissionError(f"worker may not touch the driver's folder: {p}")
            return fn(path, *a, **k)
        return guarded

    for name in ("open", "stat", "lstat", "mkdir", "makedirs", "replace", "rename", "unlink", "listdir", "scandir",
                 "rmdir", "access"):
        setattr(_os, name, wrap(getattr(_os, name)))
    builtins.open = io.open = wrap(builtins.open)


@pytest.fixture(autouse=True)
def one_thread_runs(monkeypatch):
    """Every run here (local and Ray) with 1 thread: the worker nodes have 1 CPU, and the thread count fixes the bits."""
    from lossglass import _determinism as D

    before, state = torch.get_num_threads(), dict(D._state)
    monkeypatch.setenv("LOSSGLASS_THREADS", "1")
    D.configure(1)
    yield
    D._state.update(state)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import cloudpickle
    from ray.cluster_utils import Cluster

    root = tmp_path_factory.mktemp("driver-only")
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    c.add_node(num_cpus=1)  # a CPU-only node
    c.add_node(num_cpus=1, num_gpus=1)  # a node with one (fake) GPU: a mixed cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test package
    ray.init(address=c.address, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _guard, "env_vars": {FORBIDDEN_ENV: str(root)}})
    c.wait_for_nodes()
    yield c, root
    ray.shutdown()
    c.shutdown()


def _study(tmp_path, root, name, executor, stages=("train", "walk", "connect"), epochs=2, extra=()):
    from lossglass.config import load_config

    cfg = load_config(_cfg(tmp_path, epochs=epochs), overrides=["train.chunk=2", *extra])
    return Study(cfg, root / name, progress=False, executor=executor)


def test_workers_really_cannot_touch_the_run_folder(cluster):
    _, root = cluster

    @ray.remote(num_cpus=1)
    def touch(path):
        try:
            open(os.path.join(path, "x"), "wb").close()
        except PermissionError:
            return "refused"
        return "written"

    assert ray.get(touch.remote(str(root))) == "refused"
    assert not (root / "x").exists()


def test_study_without_shared_disk_equals_local(cluster, tmp_path):
    from lossglass.executor import LocalExecutor, RayExecutor

    _, root = cluster
    local = _study(tmp_path, tmp_path, "local", LocalExecutor()).run()
    ex = RayExecutor()
    remote = _study(tmp_path, root, "ray", ex).run()
    assert lg.RunStore(remote.path).stages()["train"]["executor"] == "ray"
    assert torch.equal(local.read_tensors("replicas")["theta"], remote.read_tensors("replicas")["theta"])
    tables = sorted(local.tables())
    assert tables == sorted(remote.tables()) and len(tables) > 20
    for t in tables:
        pd.testing.assert_frame_equal(local.read_table(t), remote.read_table(t), obj=t)
    placed = json.loads((root / "ray" / "placement" / "train.json").read_text())
    head = ray.get_runtime_context().get_node_id()
    assert len(placed["tasks"]) == 3 and all(p["node"] != head and p["device"] == "cpu" for p in placed["tasks"])
    for stage, least in (("curvature", 1), ("replicas", 3)):  # groups of replicas; overlap systems with their tests
        placed = json.loads((root / "ray" / "placement" / f"{stage}.json").read_text())["tasks"]
        assert len(placed) >= least and all(p["node"] != head for p in placed), stage
    assert not list((root / "ray").glob("checkpoints/*"))  # shipped checkpoints were written, then discarded


def test_fake_gpus_are_ray_resources_and_each_task_records_its_device(cluster, tmp_path):
    """Ray's fake GPU resources only (no CUDA here): with device auto every task asks for half a GPU, so all go to
    the GPU node of the mixed cluster; Ray hands each its GPU id; torch finds no CUDA and computes on the CPU, equal
    to the local run."""
    from lossglass.executor import LocalExecutor, RayExecutor

    c, root = cluster
    ex = RayExecutor(gpus_per_task=0.5)
    assert ex.gpus_for("cpu") == 0 and ex.gpus_for("auto") == 0.5 and ex.gpus_for("cuda") == 0.5
    extra = ("device='auto'",)
    local = _study(tmp_path, tmp_path, "local", LocalExecutor(), ("train",), extra=extra).run(("train",))
    remote = _study(tmp_path, root, "gpu", ex, ("train",), extra=extra).run(("train",))
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
    placed = json.loads((root / "gpu" / "placement" / "train.json").read_text())["tasks"]
    assert len(placed) == 3
    assert all(p["node"] in gpu_nodes and p["gpus"] == ["0"] and p["device"] == "cpu" for p in placed), placed
    assert torch.equal(local.read_tensors("replicas")["theta"], remote.read_tensors("replicas")["theta"])
    pd.testing.assert_frame_equal(local.read_table("replicas"), remote.read_table("replicas"))


def test_a_node_killed_mid_training_resumes_from_its_shipped_checkpoint(cluster, tmp_path):
    from lossglass.executor import LocalExecutor, RayExecutor

    c, root = cluster
    extra = ("train.replicas=4",)
    local = _study(tmp_path, tmp_path, "local", LocalExecutor(), ("train",), epochs=60, extra=extra).run(("train",))
    ex = RayExecutor()
    killed = []

    def kill_when_a_checkpoint_arrives():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            relay = ex.relay
            if relay is not None:
                try:
                    senders = ray.get(relay.stats.remote())["senders"]
                except Exception:  # noqa: BLE001 - the relay is gone: the stage ended
                    return
                nodes = {n for ns in senders.values() for n in ns}
                for node in list(c.worker_nodes):
                    if node.node_id in nodes:
                        c.remove_node(node, allow_graceful=False)
                        killed.append(node.node_id)
                        return
            time.sleep(0.05)

    th = threading.Thread(target=kill_when_a_checkpoint_arrives)
    th.start()
    remote = _study(tmp_path, root, "ray-kill", ex, ("train",), epochs=60, extra=extra).run(("train",))
    th.join()
    c.add_node(num_cpus=1)  # back to 3 nodes (Ray starts a node from the main thread only)
    assert killed, "no node was killed"
    assert ex.relay_stats["served"] >= 1, ex.relay_stats  # a retried task resumed from a shipped checkpoint
    assert torch.equal(local.read_tensors("replicas")["theta"], remote.read_tensors("replicas")["theta"])
    pd.testing.assert_frame_equal(local.read_table("replicas"), remote.read_table("replicas"))
