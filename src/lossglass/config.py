"""Study configs: TOML files validated by pydantic. An unknown key, a wrong type or an out-of-range value is
reported as one line naming the key and what is expected."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from .errors import LossglassError, check


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    name: Literal["fashion-mnist", "mnist", "digits", "teacher", "cifar10"] = "fashion-mnist"
    n_train: PositiveInt | None = 10000
    n_test: PositiveInt | None = 2000
    data_dir: str | None = None
    factory: str | None = None  # package.module:function returning a Dataset, 4 tensors or 2 loaders


class ModelConfig(_Section):
    arch: Literal["mlp", "cnn"] = "mlp"
    hidden: PositiveInt | list[PositiveInt] = 64
    channels: list[PositiveInt] = [16, 32]
    batchnorm: bool = True
    # BatchNorm statistics at every evaluated point: recomputed on the training set (Garipov et al.; REPAIR),
    # those of each data chunk ("batch"), or frozen at the protocol's reference point ("fixed", eval-mode style)
    bn_stats: Literal["recompute", "batch", "fixed"] = "recompute"
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    factory: str | None = None  # package.module:function returning an nn.Module (instead of the MLP)
    spec: str | None = None  # package.module:function returning the model's PermutationSpec (user models)


class TrainGroup(_Section):
    """Overrides for one group of replicas (e.g. one batch size or one method in the flatness study)."""

    replicas: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    lr: float | None = Field(None, gt=0)
    method: Literal["sgd", "sam", "langevin", "replicated"] | None = None
    optimizer: Literal["sgd", "adam"] | None = None
    epochs: PositiveInt | None = None


class TrainConfig(_Section):
    replicas: PositiveInt = 16
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 128
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    method: Literal["sgd", "sam", "langevin", "replicated"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    rho: float = Field(0.05, gt=0)
    temperature: float = Field(1e-5, ge=0)
    chunk: PositiveInt = 64
    groups: list[TrainGroup] = []


class WalkConfig(_Section):
    enabled: bool = True
    n_walkers: PositiveInt = 8
    steps: PositiveInt = 200
    step_size: float = Field(0.01, gt=0)
    temperatures: list[float | Literal["none"]] = ["none"]
    normalize: Literal["none", "filter", "layer"] = "none"
    record_every: PositiveInt = 10
    starts: PositiveInt = 1
    deltas: list[float] = [0.01, 0.1, 0.5]
    langevin_temperature: float = Field(0.0, ge=0)
    langevin_lr: float = Field(0.01, gt=0)
    langevin_steps: int = Field(0, ge=0)

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v):
        for t in v:
            if t != "none" and t <= 0:
                raise ValueError(f"temperatures must be > 0 or 'none', got {t}")
        return v


class ConnectConfig(_Section):
    enabled: bool = True
    n_points: PositiveInt = 25
    swaps: list[int] = [0, 1, 2, 4, 8, 16, 32, 64]
    pairs: PositiveInt = 4
    align: Literal["weight", "activation"] = "weight"
    bezier_steps: int = Field(200, ge=0)
    plane_steps: int = Field(21, ge=0)
    plane_span: float = Field(1.0, gt=0)
    widths: list[PositiveInt] = []
    width_replicas: PositiveInt = 4


class ReplicasConfig(_Section):
    enabled: bool = True
    kind: Literal["weights", "activations", "functions"] = "weights"
    method: Literal["average", "complete", "single", "ward"] = "average"
    max_triangles: PositiveInt = 200000


class CurvatureConfig(_Section):
    enabled: bool = True
    top_k: PositiveInt = 1
    tol: float = Field(1e-3, gt=0, lt=1)
    trace_probes: PositiveInt = 20
    density: bool = True
    slq_steps: PositiveInt = 40
    rho: float = Field(0.05, gt=0)
    n_samples: PositiveInt = 8
    n_hvp_data: PositiveInt | None = None
    entropy_radius: float = Field(0.3, gt=0)
    entropy_epsilon: float = Field(0.05, gt=0)


class ReferenceConfig(_Section):
    enabled: bool = False
    n_spins: PositiveInt = 200
    p: Literal[2, 3] = 3
    replicas: PositiveInt = 32
    steps: PositiveInt = 2000
    lr: float = Field(0.2, gt=0)


class StudyConfig(_Section):
    name: str = "study"
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    walk: WalkConfig = WalkConfig()
    connect: ConnectConfig = ConnectConfig()
    replicas: ReplicasConfig = ReplicasConfig()
    curvature: CurvatureConfig = CurvatureConfig()
    reference: ReferenceConfig = ReferenceConfig()


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}' (remove it or check its spelling)")
        else:
            lines.append(f"{source}: {key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def validate(raw: dict[str, Any], source: str = "config") -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise LossglassError(_format_errors(e, source)) from None


def presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lossglass.presets").iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    check(name in presets(), f"unknown preset {name!r}; available: {', '.join(presets())}")
    return resources.files("lossglass.presets").joinpath(f"{name}.toml").read_text()


def parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LossglassError(f"{source}: not valid TOML ({e})") from None


def _coerce(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["walk.steps=5000", "train.lr=0.1"]`` -> nested updates (values parsed as TOML, else strings)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        check("=" in item, f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            check(isinstance(node, dict), f"--set {key}: {p} is not a section")
        node[parts[-1]] = _coerce(value.strip())
    return raw


def load_config(path: str | Path | None = None, *, preset: str | None = None,
                overrides: list[str] | None = None) -> StudyConfig:
    """A validated config from a TOML file or a preset name, with ``--set`` overrides applied."""
    check((path is None) != (preset is None), "give either a config file or --preset NAME (not both)")
    if preset is not None:
        raw, source = parse_toml(preset_text(preset), f"preset {preset}"), f"preset {preset}"
    else:
        p = Path(path)
        check(p.is_file(), f"config file {p} not found")
        raw, source = parse_toml(p.read_text(), str(p)), str(p)
    return validate(apply_overrides(raw, overrides or []), source)


def to_toml(cfg: StudyConfig) -> str:
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.model_dump()))


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d
