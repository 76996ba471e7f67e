"""Bring your own: a model or data set given as ``package.module:factory``, and a folder of checkpoints
imported as replicas (``state_dict`` files read with ``weights_only=True``, or safetensors)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import torch
from torch import nn

from .batchnorm import is_batchnorm
from .datasets import Dataset, from_tensors, validate_dataset
from .errors import LossglassError, check


def resolve(spec: str, what: str):
    """Import ``package.module:attribute`` and return the attribute (:func:`pkgutil.resolve_name`), with a clear
    message when it fails."""
    check(isinstance(spec, str) and spec.count(":") == 1, f"{what} must look like 'package.module:factory', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        importlib.import_module(mod_name)
    except ImportError as e:
        raise LossglassError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e})") from None
    try:
        return pkgutil.resolve_name(spec)
    except AttributeError:
        raise LossglassError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None


def model_from_factory(spec: str, **kwargs) -> nn.Module:
    model = resolve(spec, "model factory")(**kwargs)
    check(isinstance(model, nn.Module), f"model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _materialise(loader, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in loader:
        check(isinstance(batch, (tuple, list)) and len(batch) >= 2, f"{what}: each batch must be (inputs, labels)")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    check(len(xs) > 0, f"{what} is empty")
    return torch.cat(xs), torch.cat(ys)


def dataset_from_factory(spec: str) -> Dataset:
    """The factory returns a :class:`Dataset`, a tuple ``(x_train, y_train, x_test, y_test)`` of tensors, or a pair
    of iterables of ``(inputs, labels)`` batches (e.g. two ``DataLoader``s: train, test)."""
    try:
        out = resolve(spec, "data factory")()
    except LossglassError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code failed: say where, not a traceback from inside it
        raise LossglassError(f"data factory {spec!r} raised {type(e).__name__}: {e}") from None
    if isinstance(out, Dataset):
        return validate_dataset(out, f"data factory {spec!r}")
    check(isinstance(out, (tuple, list)), f"data factory {spec!r} returned {type(out).__name__}; expected a Dataset, "
          "(x_train, y_train, x_test, y_test) or (train_loader, test_loader)")
    if len(out) == 4:
        return from_tensors(*out, name=spec)
    check(len(out) == 2, f"data factory {spec!r} returned {len(out)} items; expected 4 tensors or 2 loaders")
    (xtr, ytr), (xte, yte) = _materialise(out[0], "train loader"), _materialise(out[1], "test loader")
    return from_tensors(xtr, ytr, xte, yte, name=spec)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file or a torch file read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any failure is a bad file
            raise LossglassError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise LossglassError(f"{path}: cannot be read as a weights-only state_dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    check(isinstance(obj, dict), f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    return obj


def import_checkpoints(problem, folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """Every checkpoint in ``folder`` (``*.pt``, ``*.pth``, ``*.safetensors``, sorted by name) as a row of a
    ``(K, P)`` replica tensor. Missing or unexpected keys, wrong shapes or non-float dtypes are refused with
    the file and the tensor named.

    Buffers: with BatchNorm in module mode (``problem.batchnorm == "module"``: the model's own stored statistics, eval
    mode) each checkpoint's running statistics are folded into its BatchNorm affine parameters
    (:meth:`~lossglass.problem.Problem.fold_statistics`), so every replica computes exactly what the checkpointed module
    computes in eval mode. In the other modes the statistics are recomputed at every point and stored ones are not
    used. Other buffers are constants shared by all replicas: a checkpoint whose value differs from the model's is
    refused."""
    folder = Path(folder)
    check(folder.is_dir(), f"checkpoint folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
    check(len(files) > 0, f"{folder}: no .pt, .pth or .safetensors checkpoints")
    rows = []
    expected = {p.name: p.shape for p in problem.params}
    buffers = set(problem.buffers)
    stats = {n for n, m in problem.model.named_modules() if is_batchnorm(m)}
    stats = {f"{n}.{b}" if n else b for n in stats for b in ("running_mean", "running_var", "num_batches_tracked")}
    for f in files:
        sd = load_state(f)
        missing = [k for k in expected if k not in sd]
        extra = [k for k in sd if k not in expected and k not in buffers]
        check(not missing, f"{f}: missing tensor(s) {missing}")
        check(not extra, f"{f}: unexpected tensor(s) {extra} (not parameters of the model)")
        for name, shape in expected.items():
            t = sd[name]
            check(isinstance(t, torch.Tensor), f"{f}: {name!r} is not a tensor")
            check(tuple(t.shape) == shape, f"{f}: tensor {name!r} has shape {tuple(t.shape)}, the model expects {shape}")
            check(torch.is_floating_point(t), f"{f}: tensor {name!r} has dtype {t.dtype}, expected a floating dtype")
            check(bool(torch.isfinite(t).all()), f"{f}: tensor {name!r} holds NaN or inf")
        for name in buffers - stats:
            if name in sd:
                t, ref = sd[name], problem.buffers[name]
                check(isinstance(t, torch.Tensor) and t.shape == ref.shape and torch.equal(t.to(ref), ref),
                      f"{f}: buffer {name!r} differs from the model's; lossglass shares buffers other than BatchNorm "
                      "statistics among all replicas")
        params = problem.fold_statistics({k: sd[k] for k in expected}, sd, str(f))
        rows.append(problem.flatten(params))
    return torch.stack(rows), [f.name for f in files]


def export_state(problem, theta: torch.Tensor, path: str | Path, metadata: dict | None = None, *, store=None) -> Path:
    """Write one replica as a standalone safetensors ``state_dict`` loadable into the user's model
    (``load_state_dict(strict=True)``; BatchNorm running statistics included). With ``store``, ``path`` is relative to
    the run folder and the write goes through it (atomic, recorded, never through a link out of the folder)."""
    from .store import safetensors_bytes

    module = problem.to_module(theta.reshape(-1))  # includes BatchNorm statistics at theta
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    data = safetensors_bytes(sd, metadata)
    if store is not None:
        return store.write_bytes(path, data)
    from .store import atomic_write_bytes

    atomic_write_bytes(Path(path), data)
    return Path(path)
