"""Bring your own: a model or data set given as ``package.module:factory``, and a folder of checkpoints
imported as replicas (``state_dict`` files read with ``weights_only=True``, or safetensors)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

import torch
from torch import nn

from .batchnorm import is_batchnorm
from .datasets import Dataset, from_tensors, validate_dataset
from .errors import LossglassError, check


def resolve(spec: str, what: str):
    """Import ``package.module:attribute`` and return the attribute (:func:`pkgutil.resolve_name`), with a clear
    message when it fails. A module that is not importable but lies in the current folder (``mymodels.py`` or a
    package ``mymodels/``) is imported from there, as ``python -m`` would (no ``PYTHONPATH=.`` needed)."""
    check(isinstance(spec, str) and spec.count(":") == 1, f"{what} must look like 'package.module:factory', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        importlib.import_module(mod_name)
    except ImportError as e:
        top = mod_name.split(".")[0]
        here = Path.cwd()
        local = (here / f"{top}.py").is_file() or (here / top).is_dir()
        if not (isinstance(e, ModuleNotFoundError) and e.name == top and local and str(here) not in sys.path):
            hint = "" if local else f" (not on sys.path, nor {top}.py in the current folder {here})"
            raise LossglassError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e}){hint}") from None
        # found in the current folder, as 'python -m' would: that folder joins the import path (at its end, so it
        # never shadows an installed package)
        sys.path.append(str(here))
        try:
            importlib.import_module(mod_name)
        except ImportError as e2:
            raise LossglassError(f"{what} {spec!r}: cannot import module {mod_name!r} from {here} ({e2})") from None
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


def _batches(x: torch.Tensor, y: torch.Tensor, size: int = 1024):
    for i in range(0, len(x), size):
        yield x[i:i + size], y[i:i + size]


@torch.no_grad()
def module_accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The eval-mode accuracy of ``module`` on ``(x, y)``: the share of samples whose largest output is the label,
    ``mean_i [argmax_c f(x_i)_c = y_i]``, with dropout off and BatchNorm using the module's stored running
    statistics, exactly as the user's own ``model.eval()`` evaluates it."""
    was = module.training
    module.eval()
    try:
        correct = sum(int((module(xb).argmax(-1) == yb).sum()) for xb, yb in _batches(x, y))
    finally:
        module.train(was)
    return correct / max(len(y), 1)


@torch.no_grad()
def statistics_mismatch(module: nn.Module, x: torch.Tensor, factor: float = 3.0) -> str | None:
    """Whether the inputs ``x`` are preprocessed as the data the module's BatchNorm statistics were collected on.

    For every BatchNorm layer (in eval mode, earlier layers normalised by their stored statistics, as the checkpoint
    computes), the per-channel mean ``m_c`` and biased variance ``v_c`` of its input over ``x`` are compared with the
    stored running statistics ``(mu_c, s2_c)``, an exponential average over the n = ``num_batches_tracked`` training
    batches with momentum a started at (0, 1) (Ioffe & Szegedy 2015; PyTorch's update), which on these inputs would
    hold ``w + (1 - w) v_c`` and ``(1 - w) m_c`` with w = (1 - a)^n (w = 0 for a cumulative average): the median over
    channels of ``(w + (1 - w) v_c + eps) / (s2_c + eps)`` must lie within ``[1/factor, factor]`` and the median of
    ``|(1 - w) m_c - mu_c| / sqrt(s2_c + eps)`` below 1. Only the first BatchNorm layer the inputs reach is judged:
    its input depends on the data and one layer of weights, while deeper layers' stored statistics also lag the
    weights of a checkpoint taken early in training (a false alarm in 2 of 200 such checkpoints when every layer
    was judged). Inputs scaled or shifted otherwise than at training (x/255 against a
    standardisation, say) move both by large factors (a standardisation of Fashion-MNIST multiplies the first layer's
    variance by about 8). Returns a sentence naming the first layer that disagrees, or None."""
    from .batchnorm import is_batchnorm

    layers = [(n, m) for n, m in module.named_modules() if is_batchnorm(m) and m.running_var is not None]
    if not layers:
        return None
    acc: dict[str, list] = {n: [0, 0.0, 0.0] for n, _ in layers}

    called: list[str] = []

    def hook(name):
        def f(_mod, inp):
            if name not in called:
                called.append(name)
            h = inp[0].detach().double().transpose(0, 1).reshape(inp[0].shape[1], -1)  # (C, N * spatial)
            a = acc[name]
            a[0] += h.shape[1]
            a[1] = a[1] + h.sum(1)
            a[2] = a[2] + (h * h).sum(1)
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    was = module.training
    module.eval()
    try:
        for xb, _ in _batches(x, torch.zeros(len(x))):
            module(xb)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    modules = dict(layers)
    for name in called[:1]:  # the first BatchNorm the inputs reach (see the docstring)
        m = modules[name]
        n, s1, s2 = acc[name]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        rv, rm = m.running_var.double().cpu(), m.running_mean.double().cpu()
        # what the running averages would hold after the checkpoint's num_batches_tracked updates on these inputs:
        # the initial (mean 0, variance 1) keeps the weight (1 - momentum)^steps (none for a cumulative average)
        steps = int(m.num_batches_tracked) if getattr(m, "num_batches_tracked", None) is not None else 0
        w = (1 - m.momentum) ** steps if m.momentum is not None and steps > 0 else 0.0
        want_var, want_mean = w + (1 - w) * var.cpu(), (1 - w) * mean.cpu()
        ratio = float(((want_var + m.eps) / (rv + m.eps)).median())
        shift = float(((want_mean - rm).abs() / (rv + m.eps).sqrt()).median())
        if not (1 / factor <= ratio <= factor) or shift > 1.0:
            return (f"BatchNorm layer {name!r}: its stored running_var has mean {float(rv.mean()):.3g} and running_mean "
                    f"{float(rm.mean()):.3g}, but on these inputs its input has variance {float(var.mean()):.3g} "
                    f"(median ratio {ratio:.2f}) and mean {float(mean.mean()):.3g} (median shift {shift:.2f} standard "
                    "deviations): the inputs are not preprocessed as the data the checkpoint was trained on")
    return None


def check_as_they_are(problem, folder: str | Path, theta: torch.Tensor, files: list[str], *,
                      accept_mismatch: bool = False, warn=None) -> list[float]:
    """Checks imported checkpoints before any analysis, so they are analysed as they are:

    1. preprocessing: with BatchNorm, the inputs lossglass feeds must match the statistics stored in each checkpoint
       (:func:`statistics_mismatch`); otherwise a :class:`LossglassError` names the layer and the mismatch;
    2. accuracy: each checkpoint, loaded into the user's own class (``load_state_dict``, eval mode), is evaluated on
       the training split (:func:`module_accuracy`) and compared with lossglass's accuracy of its replica
       (:meth:`~lossglass.problem.Problem.evaluate`). They agree to within one sample in module mode (the stored
       statistics, folded); in another BatchNorm mode (recomputed statistics) they differ and the difference is named.

    ``accept_mismatch``: warn (through ``warn``) instead of refusing. Returns the checkpoints' own eval-mode training
    accuracies."""
    import copy

    folder = Path(folder)
    x, y = problem.data["train"]
    mine = problem.evaluate(theta.to(problem.device, problem.dtype), "train")["accuracy"].cpu().tolist()
    own = []
    tol = 1.5 / max(len(y), 1)
    for i, name in enumerate(files):
        m = copy.deepcopy(problem.model)
        sd = load_state(folder / name)
        m.load_state_dict({k: v.to(problem.dtype) if torch.is_floating_point(v) else v for k, v in sd.items()},
                          strict=False)
        m.to(problem.device, problem.dtype)
        why = statistics_mismatch(m, x)
        if why is not None:
            msg = (f"{name}: {why}. lossglass's named data sets are scaled x -> (x/255 - mean)/std "
                   "(help(lossglass.datasets.load)); give your own preprocessing with --data package.module:factory "
                   "(returning your tensors or loaders), or --accept-mismatch to analyse them anyway")
            if not accept_mismatch:
                raise LossglassError(msg)
            if warn is not None:
                warn("warning: " + msg)
        own.append(module_accuracy(m, x, y))
        if abs(own[-1] - mine[i]) > tol and warn is not None:
            warn(f"warning: {name}: its own eval-mode training accuracy is {own[-1] * 100:.2f}%, lossglass measures "
                 f"{mine[i] * 100:.2f}% with batchnorm={problem.batchnorm!r} (the BatchNorm statistics differ); "
                 "model.bn_stats = 'module' analyses the checkpoints with their own statistics")
    return own


def export_state(problem, theta: torch.Tensor, path: str | Path, metadata: dict | None = None, *, store=None) -> Path:
    """Write one replica as a standalone safetensors ``state_dict`` loadable into the user's model
    (``load_state_dict(strict=True)``; BatchNorm running statistics included). With ``store``, ``path`` is relative to
    the run folder and the write goes through it (atomic, recorded, never through a link out of the folder)."""
    from .store import safetensors_bytes

    module = problem.to_module(theta.reshape(-1))  # includes BatchNorm statistics at theta
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    verify_export(problem, theta, sd, str(path))
    data = safetensors_bytes(sd, metadata)
    if store is not None:
        return store.write_bytes(path, data)
    from .store import atomic_write_bytes

    atomic_write_bytes(Path(path), data)
    return Path(path)


def verify_export(problem, theta: torch.Tensor, state: dict[str, torch.Tensor], what: str = "the export") -> float:
    """Load ``state`` into a fresh copy of the user's class (``load_state_dict(strict=True)``), evaluate it in eval mode
    on the test split (:func:`module_accuracy`) and compare with lossglass's test accuracy of ``theta``; a difference
    of more than one sample is refused (the file would not be the model lossglass measured). Logs and returns the
    accuracy."""
    import copy

    from ._log import log

    m = copy.deepcopy(problem.model)
    m.load_state_dict({k: v.to(problem.device) for k, v in state.items()}, strict=True)
    x, y = problem.data["test"]
    own = module_accuracy(m, x, y)
    ref = float(problem.evaluate(theta.reshape(1, -1).to(problem.device, problem.dtype), "test")["accuracy"][0])
    check(abs(own - ref) <= 1.5 / max(len(y), 1),
          f"{what}: loaded into {type(m).__name__} (eval mode) it scores {own * 100:.2f}% on the test split, but "
          f"lossglass measured {ref * 100:.2f}% (batchnorm={problem.batchnorm!r}); not exported")
    log(f"{what}: checked: loaded into {type(m).__name__} (strict, eval mode), test accuracy {own * 100:.2f}% "
        f"(lossglass: {ref * 100:.2f}%)")
    return own
