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


def _idx_bytes(array: np.ndarray, code: int, dims=None) -> bytes:
    """Raw IDX bytes with any type code (big-endian data), optionally with a lying header."""
    import struct

    dims = array.shape if dims is None else dims
    dt = {0x08: ">u1", 0x09: ">i1", 0x0D: ">f4"}[code]
    return struct.pack(">HBB", 0, code, len(dims)) + struct.pack(">" + "I" * len(dims), *dims) + array.astype(dt).tobytes()


@pytest.mark.parametrize("case", ["corrupt-gzip", "float-labels", "nan-labels", "negative-labels", "nan-images",
                                  "overflowing-dims", "gzip-bomb", "lying-gzip-header"])
def test_malformed_idx_gives_one_line_naming_the_file(tmp_path, case, capsys):
    from lossglass.cli import main

    _write_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    images = tmp_path / "train-images-idx3-ubyte"
    y = np.random.default_rng(0).integers(0, 10, 50)
    target, match = labels, None
    if case == "corrupt-gzip":
        labels.unlink()
        target = tmp_path / "train-labels-idx1-ubyte.gz"
        good = gzip.compress(_idx_bytes(y, 0x08))
        target.write_bytes(good[:12] + bytes(b ^ 0x5A for b in good[12:30]) + good[30:])
        match = "corrupt gzip|truncated gzip"
    elif case == "float-labels":
        labels.write_bytes(_idx_bytes(y.astype(np.float32), 0x0D))
        match = "labels must be integers"
    elif case == "nan-labels":
        labels.write_bytes(_idx_bytes(np.where(y > 4, np.nan, y).astype(np.float32), 0x0D))
        match = "NaN"
    elif case == "negative-labels":
        labels.write_bytes(_idx_bytes(y.astype(np.int8) - 1, 0x09))
        match = "negative label -1"
    elif case == "nan-images":
        x = np.random.default_rng(0).uniform(0, 255, (50, 6, 6)).astype(np.float32)
        x[3, 2, 2] = np.nan
        target = images
        images.write_bytes(_idx_bytes(x, 0x0D))
        match = "NaN"
    elif case == "overflowing-dims":
        target = images
        images.write_bytes(_idx_bytes(np.zeros(8, np.uint8), 0x08, dims=(2**32 - 1, 2**32 - 1, 2**32 - 1)))
        match = "more than the limit"
    elif case == "gzip-bomb":  # 100 MB of zeros behind a header that declares 50 x 6 x 6 images
        target = tmp_path / "train-images-idx3-ubyte.gz"
        images.unlink()
        target.write_bytes(gzip.compress(_idx_bytes(np.zeros(50 * 36, np.uint8), 0x08, dims=(50, 6, 6))
                                         + bytes(100 * 2**20), compresslevel=1))
        match = "decompresses to more"
    else:  # a small gzip whose header claims 60,000 x 280 x 280 images
        target = tmp_path / "train-images-idx3-ubyte.gz"
        images.unlink()
        target.write_bytes(gzip.compress(_idx_bytes(np.zeros(36, np.uint8), 0x08, dims=(60000, 280, 280))))
        match = "more than a .*gzip file can hold"
    with pytest.raises(lg.LossglassError, match=match) as e:
        lg.datasets.load("mnist", data_dir=tmp_path)
    assert target.name in str(e.value)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[data]\nname = "mnist"\ndata_dir = "{tmp_path}"\nn_train = 20\nn_test = 10\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--quiet", "--stages", "train"]) == 2
    err = capsys.readouterr().err
    assert target.name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_gzip_bomb_is_refused_without_allocating_it(tmp_path):
    import resource

    target = tmp_path / "bomb.gz"
    target.write_bytes(gzip.compress(_idx_bytes(np.zeros(36, np.uint8), 0x08, dims=(1, 6, 6)) + bytes(400 * 2**20),
                                     compresslevel=1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(lg.LossglassError, match="decompresses to more"):
        read_idx(target)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB reading a 400 MB bomb"


@pytest.mark.parametrize("case", ["label-1000", "float-nan-data", "float-labels"])
def test_malformed_cifar_batches(tmp_path, case):
    rng = np.random.default_rng(2)
    for name, n in (("data_batch_1", 20), ("test_batch", 10)):
        _cifar_batch(tmp_path / name, n, rng)
    d = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, 20).tolist()}
    if case == "label-1000":
        d[b"labels"][4] = 1000
        match = "label 1000 out of range 0..9"
    elif case == "float-nan-data":
        x = d[b"data"].astype(np.float64)
        x[0, 0] = np.nan
        d[b"data"] = x
        match = "uint8 pixel values"
    else:
        d[b"labels"] = [float(v) + 0.5 for v in d[b"labels"]]
        match = "labels must be integers"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(d))
    with pytest.raises(lg.LossglassError, match=match) as e:
        lg.datasets.load("cifar10", data_dir=tmp_path)
    assert "data_batch_1" in str(e.value)


def test_datasets_from_factories_are_validated():
    x = torch.randn(10, 3)
    y = torch.arange(10) % 3
    good = lg.datasets.Dataset("mine", x, y, x, y, 3)
    assert lg.datasets.validate_dataset(good) is good
    bad_x = x.clone()
    bad_x[2, 1] = float("nan")
    for ds, match in ((lg.datasets.Dataset("m", bad_x, y, x, y, 3), "x_train holds NaN"),
                      (lg.datasets.Dataset("m", x, y - 1, x, y, 3), "outside 0..2"),
                      (lg.datasets.Dataset("m", x, y, x, y + 5, 3), "y_test has labels in 5..7"),
                      (lg.datasets.Dataset("m", x, y.float(), x, y, 3), "int64 class labels"),
                      (lg.datasets.Dataset("m", x, y, x[:, :2], y, 3), "3 features but test inputs 2")):
        with pytest.raises(lg.LossglassError, match=match):
            lg.datasets.validate_dataset(ds, "data factory 'pkg:f'")
    with pytest.raises(lg.LossglassError, match="negative|outside"):
        lg.datasets.from_tensors(x, y - 1, x, y)
