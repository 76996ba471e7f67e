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
