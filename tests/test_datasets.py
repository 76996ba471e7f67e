import gzip
import pickle

import numpy as np
import pytest
import torch

import lossglass as lg
from lossglass.datasets import read_idx, write_idx

from .conftest import needs_fmnist


def _write_mnist(folder, n_train=50, n_test=20, gz=True, rows=6):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, rows, rows), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads_normalised_float32(tmp_path, gz):
    _write_mnist(tmp_path, gz=gz)
    ds = lg.datasets.load("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (50, 36) and ds.x_test.shape == (20, 36)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4
    assert ds.shape == (1, 6, 6) and ds.n_classes == 10


def test_idx_roundtrip_and_env_variable(tmp_path, monkeypatch):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), a)
    _write_mnist(tmp_path)
    monkeypatch.setenv("LOSSGLASS_DATA", str(tmp_path))
    assert len(lg.datasets.load("fashion-mnist").y_train) == 50


def test_bad_idx_files_are_named(tmp_path):
    _write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    raw = p.read_bytes()
    p.write_bytes(b"\x12\x34" + raw[2:])
    with pytest.raises(lg.LossglassError, match="train-images-idx3-ubyte: bad IDX magic"):
        lg.datasets.load("mnist", data_dir=tmp_path)
    p.write_bytes(raw[:-7])
    with pytest.raises(lg.LossglassError, match="header says shape"):
        lg.datasets.load("mnist", data_dir=tmp_path)
    p.write_bytes(raw)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(49, np.uint8))
    with pytest.raises(lg.LossglassError, match="50 images but .* 49 labels"):
        lg.datasets.load("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(50, np.uint8))
    with pytest.raises(lg.LossglassError, match="missing t10k-labels-idx1-ubyte"):
        lg.datasets.load("mnist", data_dir=tmp_path)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(lg.LossglassError, match="corrupt gzip"):
        read_idx(tmp_path / "bad.gz")


def test_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(lg.LossglassError, match="not found"):
        lg.datasets.load("mnist", data_dir=tmp_path / "nope")
    with pytest.raises(lg.LossglassError, match="unknown data set 'imagenet'"):
        lg.datasets.load("imagenet")
    _write_mnist(tmp_path)
    with pytest.raises(lg.LossglassError, match="n_train=500 but only 50"):
        lg.datasets.load("mnist", data_dir=tmp_path, n_train=500)


def _cifar_batch(path, n, rng):
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist(),
         b"batch_label": b"test"}
    path.write_bytes(pickle.dumps(d))


def test_cifar_pickles_and_malicious_pickle_refused(tmp_path):
    rng = np.random.default_rng(1)
    for i in (1, 2):
        _cifar_batch(tmp_path / f"data_batch_{i}", 30, rng)
    _cifar_batch(tmp_path / "test_batch", 10, rng)
    ds = lg.datasets.load("cifar10", data_dir=tmp_path)
    assert ds.x_train.shape == (60, 3072) and ds.x_test.shape == (10, 3072) and ds.shape == (3, 32, 32)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(lg.LossglassError, match="refusing to load builtins.print"):
        lg.datasets.load("cifar10", data_dir=tmp_path)


def test_digits_teacher_and_subsets_are_deterministic():
    d1 = lg.datasets.load("digits", n_train=200, seed=3)
    d2 = lg.datasets.load("digits", n_train=200, seed=3)
    d3 = lg.datasets.load("digits", n_train=200, seed=4)
    assert torch.equal(d1.x_train, d2.x_train) and not torch.equal(d1.x_train, d3.x_train)
    assert d1.in_dim == 64 and d1.n_classes == 10
    t1 = lg.datasets.load("teacher", n_train=100, n_test=50, seed=1, in_dim=5, width=4, n_classes=3)
    t2 = lg.datasets.load("teacher", n_train=100, n_test=50, seed=1, in_dim=5, width=4, n_classes=3)
    assert torch.equal(t1.x_train, t2.x_train) and torch.equal(t1.y_train, t2.y_train)
    assert t1.x_train.shape == (100, 5) and int(t1.y_train.max()) <= 2
    assert len(torch.unique(t1.y_train)) > 1  # the teacher is not constant
    with pytest.raises(lg.LossglassError, match="n_classes must be at least 2"):
        lg.datasets.teacher(n_classes=1)


def test_from_tensors_checks():
    x = torch.randn(10, 3)
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(lg.LossglassError, match="NaN"):
        lg.datasets.from_tensors(x * float("nan"), y, x, y)
    with pytest.raises(lg.LossglassError, match="integer class labels"):
        lg.datasets.from_tensors(x, y.float(), x, y)
    assert lg.datasets.from_tensors(x, y, x, y, n_classes=2).n_classes == 2


@needs_fmnist
def test_real_fashion_mnist_counts():
    ds = lg.datasets.load("fashion-mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert gzip  # module used by the loader for .gz files
