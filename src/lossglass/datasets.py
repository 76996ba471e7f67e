"""Data sets as float32 tensors: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickles, scikit-learn digits, a
synthetic teacher-student task, and modular arithmetic as token sequences (the grokking task). Every loader checks
what it reads and names the file and the problem."""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ._determinism import pin_once
from .errors import LossglassError, check, choice

DEFAULT_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
    "cifar10": [],
}
NAMES = ("fashion-mnist", "mnist", "digits", "teacher", "cifar10", "modular")
MODULAR_OPS = ("add", "sub", "mul", "div")


@dataclass
class Dataset:
    """A classification data set: inputs flattened to ``(N, D)`` float32, labels ``(N,)`` int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    shape: tuple[int, ...] = ()  # the shape of one input before flattening, e.g. (1, 28, 28)
    info: dict = field(default_factory=dict)
    x_val: torch.Tensor | None = None  # a validation split carved from the training data (model selection only)
    y_val: torch.Tensor | None = None

    @property
    def in_dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_val(self) -> int:
        return 0 if self.y_val is None else int(len(self.y_val))

    def with_validation(self, n_val: int, seed: int = 0) -> Dataset:
        """A copy whose training set loses ``n_val`` samples (a seeded random subset) to a validation split. The
        energy E is then the loss on the remaining training samples; the validation split chooses, the test split
        grades (and never chooses)."""
        check(isinstance(n_val, int) and n_val >= 0, f"n_val must be an int >= 0, got {n_val!r}")
        if n_val == 0:
            return self
        n = len(self.y_train)
        check(n_val < n, f"data.n_val = {n_val} leaves no training samples (the training set has {n})")
        g = torch.Generator().manual_seed(int(seed) * 1000003 + 17)
        perm = torch.randperm(n, generator=g)
        val, tr = perm[:n_val].sort().values, perm[n_val:].sort().values
        return Dataset(self.name, self.x_train[tr].contiguous(), self.y_train[tr], self.x_test, self.y_test,
                       self.n_classes, self.shape, {**self.info, "n_val": n_val, "val_seed": seed},
                       self.x_train[val].contiguous(), self.y_train[val])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
                f"classes={self.n_classes})")


# ---------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
#: Largest data file a loader will allocate (bytes); ``LOSSGLASS_MAX_FILE_GB`` overrides it.
MAX_FILE_BYTES = 8 * 2**30
#: Deflate cannot compress by more than about 1032:1, so a header declaring more is a lie (or a bomb).
_MAX_GZIP_RATIO = 1100


def _max_bytes() -> int:
    env = os.environ.get("LOSSGLASS_MAX_FILE_GB")
    if env:
        try:
            return int(float(env) * 2**30)
        except ValueError:
            raise LossglassError(f"LOSSGLASS_MAX_FILE_GB must be a number of GiB, got {env!r}") from None
    return MAX_FILE_BYTES


def _gunzip(path: Path, raw: bytes, limit: int) -> bytes:
    """Decompress ``raw`` (a gzip stream) without ever holding more than ``limit`` bytes of output."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, limit + 1)
        if len(out) <= limit and not d.eof:
            out += d.flush()
    except zlib.error as e:
        raise LossglassError(f"{path}: corrupt gzip data ({e})") from None
    check(len(out) <= limit, f"{path}: decompresses to more than the {limit} bytes its IDX header declares "
          "(trailing data, or a decompression bomb)")
    check(d.eof, f"{path}: truncated gzip data")
    return out


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw): magic ``0x0000TTNN`` with type TT and NN dimensions, big-endian
    sizes, then the data. Raises :class:`LossglassError` naming the file on any inconsistency. The size the
    header declares is checked against the file (and, for gzip, against the most deflate can compress) and
    against ``LOSSGLASS_MAX_FILE_GB`` before anything is allocated, so a corrupt or hostile file cannot
    exhaust memory."""
    path = Path(path)
    check(path.is_file(), f"{path}: file not found")
    raw = path.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    if gz:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = d.decompress(raw, 4 + 4 * 4)
        except zlib.error as e:
            raise LossglassError(f"{path}: corrupt gzip data ({e})") from None
    else:
        head = raw[:20]
    check(len(head) >= 4, f"{path}: too short to be an IDX file ({len(head)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", head[:4])
    check(zero == 0 and dtype_code in _IDX_DTYPES and 1 <= ndim <= 4,
          f"{path}: bad IDX magic number 0x{head[:4].hex()} (expected 0x000008NN for unsigned bytes)")
    check(len(head) >= 4 + 4 * ndim, f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, head[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    n = math.prod(int(v) for v in dims) * dtype.itemsize  # Python ints: no overflow
    limit = _max_bytes()
    check(n <= limit, f"{path}: header declares shape {dims} ({n} bytes), more than the limit of {limit} bytes "
          "(raise LOSSGLASS_MAX_FILE_GB if the file is genuine)")
    total = 4 + 4 * ndim + n
    if gz:
        check(total <= _MAX_GZIP_RATIO * len(raw) + 1024, f"{path}: header declares shape {dims} ({n} bytes), "
              f"more than a {len(raw)}-byte gzip file can hold: corrupt header")
        raw = _gunzip(path, raw, total)
    body = raw[4 + 4 * ndim:]
    check(len(body) == n, f"{path}: header says shape {dims} ({n} bytes of data) but the file holds {len(body)}")
    arr = np.frombuffer(body, dtype=dtype).reshape(dims)
    if arr.dtype.kind == "f":
        check(bool(np.isfinite(arr).all()), f"{path}: holds NaN or inf values")
    return arr


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in ``.gz`` (used by tests)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data += array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _check_labels(y: np.ndarray, source: str, n_classes: int = 10) -> None:
    """Class labels must be integers in 0..n_classes-1: a float, negative or out-of-range label is refused."""
    check(y.dtype.kind in "ui", f"{source}: labels must be integers, got {y.dtype}")
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        check(lo >= 0, f"{source}: negative label {lo}; labels must be 0..{n_classes - 1}")
        check(hi < n_classes, f"{source}: label {hi} out of range 0..{n_classes - 1}")


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise LossglassError(f"{folder}: missing {stem}[.gz]")


def _data_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    candidates: list[Path] = []
    if data_dir is not None:
        candidates = [Path(data_dir)]
    else:
        env = os.environ.get("LOSSGLASS_DATA")
        if env:
            candidates += [Path(env) / name, Path(env)]
        candidates += [Path(p) for p in DEFAULT_DIRS.get(name, [])]
    for c in candidates:
        if c.is_dir() and any(c.iterdir()):
            return c
    hint = {"fashion-mnist": "as root run 'apt-get install dataset-fashion-mnist', or ",
            "mnist": "", "cifar10": ""}[name]
    tried = ", ".join(str(c) for c in candidates) or "nowhere"
    raise LossglassError(f"data set {name!r} not found (looked in {tried}); {hint}put its files in a folder "
                         f"and pass --set data.data_dir=/that/folder (data_dir= in Python), or set LOSSGLASS_DATA")


def _load_idx_set(name: str, folder: Path) -> tuple[np.ndarray, ...]:
    out = []
    for split in ("train", "t10k"):
        xi = _find(folder, f"{split}-images-idx3-ubyte")
        yi = _find(folder, f"{split}-labels-idx1-ubyte")
        x, y = read_idx(xi), read_idx(yi)
        check(x.ndim == 3, f"{xi}: expected a 3-D image array (N, rows, cols), got shape {x.shape}")
        check(y.ndim == 1, f"{yi}: expected a 1-D label array, got shape {y.shape}")
        check(len(x) == len(y), f"{xi} holds {len(x)} images but {yi} holds {len(y)} labels")
        _check_labels(y, str(yi))
        out += [x, y]
    check(out[0].shape[1:] == out[2].shape[1:],
          f"{folder}: train images are {out[0].shape[1:]} but test images are {out[2].shape[1:]}")
    return tuple(out)


# ---------------------------------------------------------------- CIFAR-10 (pickles, read safely)
class _SafeUnpickler(pickle.Unpickler):
    """Only the classes a CIFAR-10 batch needs: a pickle from elsewhere cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    check(path.is_file(), f"{path}: CIFAR-10 batch file not found")
    try:
        d = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise LossglassError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    check(isinstance(d, dict), f"{path}: expected a dict, got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    check("data" in d and "labels" in d, f"{path}: missing 'data' or 'labels' (keys: {sorted(d)})")
    x = np.asarray(d["data"])
    try:
        y = np.asarray(d["labels"])
    except (TypeError, ValueError) as e:
        raise LossglassError(f"{path}: 'labels' is not an array of class numbers ({e})") from None
    check(x.ndim == 2 and x.shape[1] == 3072, f"{path}: 'data' must be (N, 3072), got {x.shape}")
    check(x.dtype.kind in "ui", f"{path}: 'data' must hold uint8 pixel values 0..255, got {x.dtype}")
    check(x.size == 0 or (int(x.min()) >= 0 and int(x.max()) <= 255),
          f"{path}: pixel values outside 0..255 (min {x.min()}, max {x.max()})")
    check(y.ndim == 1 and len(x) == len(y), f"{path}: {len(x)} images but labels of shape {y.shape}")
    _check_labels(y, str(path))
    return x.astype(np.uint8), y.astype(np.int64)


def _load_cifar(folder: Path) -> tuple[np.ndarray, ...]:
    train = [folder / f"data_batch_{i}" for i in range(1, 6)]
    present = [p for p in train if p.is_file()]
    check(len(present) > 0, f"{folder}: no CIFAR-10 data_batch_1..5 files")
    xs, ys = zip(*[_cifar_batch(p) for p in present])
    xt, yt = _cifar_batch(folder / "test_batch")
    return np.concatenate(xs), np.concatenate(ys), xt, yt


# ---------------------------------------------------------------- synthetic and bundled
def teacher(n_train: int = 2000, n_test: int = 1000, *, in_dim: int = 50, width: int = 20,
            n_classes: int = 4, seed: int = 0) -> Dataset:
    """Teacher-student data: x ~ N(0, I_D), label = argmax_c [W2 relu(W1 x / sqrt(D) + b1)]_c with a random
    teacher (W1, b1, W2 Gaussian). The same seed gives the same teacher and the same samples."""
    for k, v in dict(n_train=n_train, n_test=n_test, in_dim=in_dim, width=width, n_classes=n_classes).items():
        check(int(v) > 0, f"teacher: {k} must be positive, got {v}")
    check(n_classes >= 2, f"teacher: n_classes must be at least 2, got {n_classes}")
    g = torch.Generator().manual_seed(int(seed))
    w1 = torch.randn(width, in_dim, generator=g)
    b1 = torch.randn(width, generator=g) * 0.5
    w2 = torch.randn(n_classes, width, generator=g)
    x = torch.randn(n_train + n_test, in_dim, generator=g)
    y = (torch.relu(x @ w1.T / in_dim**0.5 + b1) @ w2.T).argmax(1)
    return Dataset("teacher", x[:n_train].contiguous(), y[:n_train].contiguous(), x[n_train:].contiguous(),
                   y[n_train:].contiguous(), n_classes, (in_dim,),
                   {"in_dim": in_dim, "width": width, "seed": seed})


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def modular(p: int = 97, op: str = "add", train_fraction: float = 0.3, *, seed: int = 0) -> Dataset:
    """Modular arithmetic (a, b) -> c = (a op b) mod p as token sequences, the algorithmic task on which Power et al.
    (2022, "Grokking") saw generalisation long after memorisation. Every equation is one sample: the input is the
    three tokens (a, b, "=") with "=" the token p (vocabulary p + 1), stored as float token ids ``(N, 3)`` (exact
    below 2^24; a model casts them to integers), the label is c in 0..p-1 (p classes). ``op``: add (a + b), sub
    (a - b), mul (a b), div (a b^(p-2) = a / b, b != 0; p must be prime). All p^2 (div: p (p - 1)) equations are
    shuffled by ``seed`` and the first ``train_fraction`` of them (rounded) form the training set, the rest the
    test set.

    Example::

        >>> ds = modular(5, "add", 0.5, seed=0)
        >>> len(ds.y_train) + len(ds.y_test), ds.n_classes, ds.info["vocab"]
        (25, 5, 6)
    """
    check(isinstance(p, int) and p >= 2, f"modular: p must be an int >= 2, got {p!r}")
    choice("modular op", op, MODULAR_OPS)
    check(op != "div" or _is_prime(p), f"modular: op 'div' needs a prime p (every b != 0 invertible), got p = {p}")
    check(isinstance(train_fraction, (int, float)) and 0 < train_fraction < 1,
          f"modular: train_fraction must be in (0, 1), got {train_fraction!r}")
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if op == "div":
        a, b = a[b > 0], b[b > 0]
        inv = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])
        c = (a * inv[b]) % p
    else:
        c = {"add": a + b, "sub": a - b, "mul": a * b}[op] % p
    x = torch.stack([a, b, torch.full_like(a, p)], 1).float()
    order = torch.randperm(len(c), generator=torch.Generator().manual_seed(int(seed)))
    n_tr = int(round(train_fraction * len(c)))
    check(0 < n_tr < len(c), f"modular: train_fraction {train_fraction} of {len(c)} equations leaves an empty split")
    tr, te = order[:n_tr].sort().values, order[n_tr:].sort().values
    return Dataset("modular", x[tr].contiguous(), c[tr].contiguous(), x[te].contiguous(), c[te].contiguous(), p, (3,),
                   {"p": p, "op": op, "train_fraction": float(train_fraction), "vocab": p + 1, "seq_len": 3,
                    "seed": int(seed)})


def _subset(n_avail: int, n: int | None, g: torch.Generator, what: str) -> torch.Tensor:
    if n is None:
        return torch.arange(n_avail)
    check(isinstance(n, int) and n > 0, f"{what} must be a positive integer, got {n!r}")
    check(n <= n_avail, f"{what}={n} but only {n_avail} samples are available")
    return torch.randperm(n_avail, generator=g)[:n].sort().values


def load(name: str, *, n_train: int | None = None, n_test: int | None = None, seed: int = 0,
         data_dir: str | os.PathLike | None = None, **kwargs) -> Dataset:
    """Load a data set by name: ``fashion-mnist``, ``mnist``, ``cifar10`` (files from ``data_dir``,
    ``$LOSSGLASS_DATA`` or the Debian folder), ``digits`` (scikit-learn's), ``teacher`` (synthetic) or ``modular``
    (modular arithmetic token sequences, generated: keywords ``p``, ``op``, ``train_fraction``, see :func:`modular`;
    ``n_train``/``n_test`` then take seeded subsets of its two splits).

    Inputs are scaled x -> (x/255 - mu)/sigma with the scalar mean and standard deviation of the training
    set, flattened and float32. ``n_train``/``n_test`` take a deterministic random subset (``seed``).
    """
    pin_once()  # the normalisation below is a full reduction: its last bits depend on the thread count
    choice("data set", name, NAMES)
    if name == "teacher":
        return teacher(n_train or 2000, n_test or 1000, seed=seed, **kwargs)
    if name == "modular":
        unknown = set(kwargs) - {"p", "op", "train_fraction"}
        check(not unknown, f"unexpected arguments for 'modular': {sorted(unknown)} (it takes p, op, train_fraction)")
        ds = modular(seed=seed, **kwargs)
        g = torch.Generator().manual_seed(int(seed) + 1)
        itr, ite = _subset(len(ds.y_train), n_train, g, "n_train"), _subset(len(ds.y_test), n_test, g, "n_test")
        return Dataset(ds.name, ds.x_train[itr], ds.y_train[itr], ds.x_test[ite], ds.y_test[ite], ds.n_classes,
                       ds.shape, ds.info)
    check(not kwargs, f"unexpected arguments for {name!r}: {sorted(kwargs)}")
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x_all, y_all = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64)
        perm = np.random.default_rng(12345).permutation(len(x_all))  # fixed split, independent of seed
        cut = int(0.8 * len(x_all))
        xtr, ytr, xte, yte = x_all[perm[:cut]], y_all[perm[:cut]], x_all[perm[cut:]], y_all[perm[cut:]]
        shape, scale = (1, 8, 8), 1.0
    elif name == "cifar10":
        xtr, ytr, xte, yte = _load_cifar(_data_dir(name, data_dir))
        shape, scale = (3, 32, 32), 255.0
    else:
        xtr, ytr, xte, yte = _load_idx_set(name, _data_dir(name, data_dir))
        shape, scale = (1, *xtr.shape[1:]), 255.0
    g = torch.Generator().manual_seed(int(seed))
    itr = _subset(len(xtr), n_train, g, "n_train")
    ite = _subset(len(xte), n_test, g, "n_test")
    xtr_t = torch.as_tensor(np.asarray(xtr, dtype=np.float32).reshape(len(xtr), -1))[itr] / scale
    xte_t = torch.as_tensor(np.asarray(xte, dtype=np.float32).reshape(len(xte), -1))[ite] / scale
    mu, sd = xtr_t.mean(), xtr_t.std().clamp_min(1e-8)
    xtr_t, xte_t = (xtr_t - mu) / sd, (xte_t - mu) / sd
    ytr_t = torch.as_tensor(np.asarray(ytr, dtype=np.int64))[itr]
    yte_t = torch.as_tensor(np.asarray(yte, dtype=np.int64))[ite]
    n_classes = int(max(ytr_t.max().item(), yte_t.max().item() if len(yte_t) else 0)) + 1
    n_classes = max(n_classes, 10) if name != "digits" else 10
    return Dataset(name, xtr_t.contiguous(), ytr_t, xte_t.contiguous(), yte_t, n_classes, shape,
                   {"mean": float(mu), "std": float(sd), "seed": seed})


def from_tensors(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 n_classes: int | None = None, name: str = "custom") -> Dataset:
    """Wrap user tensors as a :class:`Dataset`, checking shapes, dtypes, finiteness and the label range."""
    xs = []
    for what, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        check(x.ndim >= 2, f"{name}: x_{what} must have shape (N, ...), got {tuple(x.shape)}")
        check(y.ndim == 1 and len(y) == len(x), f"{name}: y_{what} must have shape ({len(x)},), got {tuple(y.shape)}")
        check(not torch.is_floating_point(y) and not torch.is_complex(y) and y.dtype != torch.bool,
              f"{name}: y_{what} must hold integer class labels, got {y.dtype}")
        check(torch.is_floating_point(x) or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64),
              f"{name}: x_{what} must be a real-valued tensor, got {x.dtype}")
        x = x.reshape(len(x), -1).float()
        check(bool(torch.isfinite(x).all()), f"{name}: x_{what} holds NaN or inf values")
        xs += [x.contiguous(), y.long()]
    check(len(xs[0]) > 0, f"{name}: the training set is empty")
    check(xs[0].shape[1] == xs[2].shape[1], f"{name}: train inputs have {xs[0].shape[1]} features but test inputs "
          f"{xs[2].shape[1]}")
    top = int(max(xs[1].max(), xs[3].max() if len(xs[3]) else 0))
    k = n_classes or top + 1
    ds = Dataset(name, *xs, n_classes=k, shape=tuple(torch.as_tensor(x_train).shape[1:]))
    return validate_dataset(ds, name)


def validate_dataset(ds: Dataset, source: str = "dataset") -> Dataset:
    """Check a :class:`Dataset` from anywhere (a user factory included): float inputs ``(N, D)`` with the same D in
    both splits and no NaN/inf, int64 labels ``(N,)`` in 0..n_classes-1, at least 2 classes. Returns it."""
    check(isinstance(ds, Dataset), f"{source}: expected a lossglass Dataset, got {type(ds).__name__}")
    check(isinstance(ds.n_classes, int) and ds.n_classes >= 2, f"{source}: n_classes must be an int >= 2, got "
          f"{ds.n_classes!r}")
    for what in ("train", "test"):
        x, y = getattr(ds, f"x_{what}"), getattr(ds, f"y_{what}")
        check(isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), f"{source}: x_{what}/y_{what} must be tensors")
        check(x.ndim == 2, f"{source}: x_{what} must be flat (N, D), got shape {tuple(x.shape)}")
        check(torch.is_floating_point(x), f"{source}: x_{what} must be floating point, got {x.dtype}")
        check(y.ndim == 1 and len(y) == len(x), f"{source}: y_{what} must have shape ({len(x)},), got {tuple(y.shape)}")
        check(y.dtype == torch.int64, f"{source}: y_{what} must be int64 class labels, got {y.dtype}")
        check(bool(torch.isfinite(x).all()), f"{source}: x_{what} holds NaN or inf values")
        if len(y):
            lo, hi = int(y.min()), int(y.max())
            check(lo >= 0 and hi < ds.n_classes, f"{source}: y_{what} has labels in {lo}..{hi}, outside "
                  f"0..{ds.n_classes - 1} (n_classes = {ds.n_classes})")
    check(len(ds.x_train) > 0, f"{source}: the training set is empty")
    check(ds.x_train.shape[1] == ds.x_test.shape[1],
          f"{source}: train inputs have {ds.x_train.shape[1]} features but test inputs {ds.x_test.shape[1]}")
    if ds.shape:
        check(math.prod(ds.shape) == ds.x_train.shape[1],
              f"{source}: shape {tuple(ds.shape)} does not match {ds.x_train.shape[1]} features per input")
    return ds
