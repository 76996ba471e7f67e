import os
import tempfile
from pathlib import Path

import pytest
import torch

import lossglass as lg

# the user key that signs run folders (trust of configs naming code) lives in a throwaway folder during tests;
# set before any test runs, so subprocesses inherit it
os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="lossglass-test-config-"))

FMNIST = Path(os.environ.get("LOSSGLASS_DATA", "/usr/share/datasets/fashion-mnist"))
HAS_FMNIST = (FMNIST / "train-images-idx3-ubyte.gz").exists() or (FMNIST / "train-images-idx3-ubyte").exists()
needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, restored afterwards: on a shared 2-core machine torch's
    threads spin against other processes and make each small op ~50x slower (measured: 2 ms instead of 45 us).
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def image_task(n_train: int, n_test: int):
    """A small 3-class task on 8x8 one-channel images (seed 0): the class counts how many of two quadrants are bright,
    so a CNN can learn it in a few epochs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:, :4].mean((1, 2)) > 0.1).long()
    return lg.datasets.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], n_classes=3)


@pytest.fixture(scope="session")
def teacher_ds():
    return lg.datasets.load("teacher", n_train=300, n_test=100, in_dim=8, width=6, n_classes=3, seed=0)


@pytest.fixture(scope="session")
def tiny(teacher_ds):
    """A tiny 8-5-3 ReLU network in float64 (dense Hessians are cheap and exact)."""
    return lg.Problem(lg.models.mlp(8, 5, 3), teacher_ds, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="session")
def deep(teacher_ds):
    return lg.Problem(lg.models.mlp(8, [7, 6], 3), teacher_ds, device="cpu", dtype=torch.float64)


@pytest.fixture(scope="session")
def fmnist():
    if not HAS_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    return lg.datasets.load("fashion-mnist", n_train=20000, n_test=5000, seed=0)
