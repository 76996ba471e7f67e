"""The run directory: one folder per study, every write atomic (write a temporary file, then rename), so a
run killed at any point leaves only whole files, and a restarted run skips the stages already done.

Layout::

    config.toml            the resolved config
    meta.json              versions, seed, device, start/end times, stage timings
    replicas.safetensors   theta (K, P) of the trained replicas (no pickles: safe to open)
    tables/NAME.parquet    every table (pandas.read_parquet)
    tensors/NAME.safetensors
    stages/NAME.json       a stage's completion record (what resume looks at)
    figures/NAME.png|svg   figures, made from the saved data
    report.html
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import LossglassError, check


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class RunStore:
    """A run folder: tables (Parquet), tensors (safetensors), JSON records and stage markers."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = Path(path)
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            check(self.path.is_dir(), f"run folder {self.path} does not exist")

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # JSON ----------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        atomic_write_bytes(p, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())
        return p

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LossglassError(f"{p}: corrupt JSON ({e})") from None

    def write_text(self, name: str, text: str) -> Path:
        p = self.path / name
        atomic_write_bytes(p, text.encode())
        return p

    # tables --------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / "tables" / f"{name}.parquet"

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        import io

        buf = io.BytesIO()
        df.reset_index(drop=True).to_parquet(buf, index=False)
        p = self.table_path(name)
        atomic_write_bytes(p, buf.getvalue())
        return p

    def read_table(self, name: str) -> pd.DataFrame:
        p = self.table_path(name)
        check(p.exists(), f"{self.path}: no table {name!r} (expected {p})")
        return pd.read_parquet(p)

    def has_table(self, name: str) -> bool:
        return self.table_path(name).exists()

    def tables(self) -> list[str]:
        d = self.path / "tables"
        return sorted(p.stem for p in d.glob("*.parquet")) if d.is_dir() else []

    # tensors -------------------------------------------------------------
    def tensor_path(self, name: str) -> Path:
        return self.path / ("replicas.safetensors" if name == "replicas" else f"tensors/{name}.safetensors")

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        from safetensors.torch import save

        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                    metadata={k: str(v) for k, v in (metadata or {}).items()})
        p = self.tensor_path(name)
        atomic_write_bytes(p, data)
        return p

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.tensor_path(name)
        check(p.exists(), f"{self.path}: no tensors {name!r} (expected {p})")
        return load_file(str(p))

    def has_tensors(self, name: str) -> bool:
        return self.tensor_path(name).exists()

    # stages --------------------------------------------------------------
    def stage_done(self, name: str) -> bool:
        return (self.path / "stages" / f"{name}.json").exists()

    def mark_done(self, name: str, info: dict | None = None) -> None:
        self.write_json(f"stages/{name}.json", {"stage": name, "finished": time.time(), **(info or {})})

    def stages(self) -> dict[str, dict]:
        d = self.path / "stages"
        return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}

    def figure_dir(self) -> Path:
        d = self.path / "figures"
        d.mkdir(parents=True, exist_ok=True)
        return d


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
