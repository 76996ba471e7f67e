"""The run directory: one folder per study. Every write is atomic (a temporary file in the same folder, fsync,
rename, fsync of the folder), so a run killed at any point, even by a power cut, leaves only whole files, and a
restarted run skips the stages already done.

Layout::

    config.toml            the resolved config
    meta.json              versions, seed, device, threads, start/end times, stage timings, input fingerprints
    replicas.safetensors   theta (K, P) of the trained replicas (no pickles)
    tables/NAME.parquet    every table (pandas.read_parquet)
    tensors/NAME.safetensors
    stages/NAME.json       a stage's completion record (what resume looks at) with the fingerprint of its inputs
    figures/NAME.png|svg   figures, made from the saved data
    report.html
    .lossglass/manifest    every file lossglass wrote here (``--force`` deletes these and nothing else)

Opening a folder from someone else is safe for reading: writes never follow a symbolic link out of the folder
(a link in the final component is replaced, a linked folder is refused), reads parse bytes read once (no torn
reads beside a writer), and nothing here imports code. Commands that build the model from the folder's
``config.toml`` may import code it names (``model.factory``, ``data.factory``, ``model.spec``): they ask for
``--trust-config`` unless this user wrote that config here (:meth:`RunStore.is_trusted`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import LossglassError, check

#: Stages in the order a study runs them (``info`` and the report list them in this order).
STAGE_ORDER = ("train", "timeline", "walk", "connect", "replicas", "curvature", "select", "reference", "report")
_UMASK = os.umask(0)
os.umask(_UMASK)
MANIFEST = ".lossglass/manifest"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers only ever see the old file or the whole new one: a temporary file
    in the same folder, flushed and fsynced, renamed over the target (a symbolic link there is replaced, not
    followed), then the folder fsynced so the rename survives a power cut. The file mode follows the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lossglass" / "trust-key"


def _user_key() -> bytes:
    """A random key private to this user (created 0600 on first use): run folders this user's lossglass wrote are
    signed with it, so a folder from elsewhere is recognised as such."""
    p = _key_file()
    try:
        key = p.read_bytes()
        if len(key) >= 32:
            return key
    except OSError:
        pass
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


class RunStore:
    """A run folder: tables (Parquet), tensors (safetensors), JSON records, stage markers and the manifest of what
    lossglass wrote. ``stage`` (set by the study) tags every file written, so a redone stage can remove its own."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True, stage: str | None = None):
        self.path = Path(path)
        self.stage = stage
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise LossglassError(f"{self.path} exists and is not a folder") from None
            except OSError as e:
                raise LossglassError(f"cannot create the run folder {self.path}: {e.strerror}") from None
        else:
            check(self.path.is_dir(), f"run folder {self.path} does not exist")
        self._root = self.path.resolve()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def is_run(self) -> bool:
        """Whether this folder holds a lossglass run (a config and a meta record)."""
        return (self.path / "config.toml").is_file() and (self.path / "meta.json").is_file()

    def require_run(self) -> RunStore:
        check(self.is_run(), f"{self.path} is not a lossglass run folder (no config.toml and meta.json)")
        return self

    # paths -----------------------------------------------------------------
    def resolve(self, name: str | os.PathLike) -> Path:
        """The path of ``name`` inside the folder; refuses absolute names, '..', and folders that resolve outside
        the run folder (a symbolic link to elsewhere)."""
        rel = Path(name)
        check(not rel.is_absolute() and ".." not in rel.parts and str(rel) not in ("", "."),
              f"refusing to use {name!r}: not a plain name inside the run folder")
        p = self.path / rel
        parent = p.parent.resolve()
        check(parent == self._root or self._root in parent.parents,
              f"refusing to write {p}: {p.parent} resolves to {parent}, outside the run folder {self._root}")
        return p

    # raw bytes -----------------------------------------------------------------
    def write_bytes(self, name: str | os.PathLike, data: bytes) -> Path:
        """Atomically write ``data`` to ``name`` (inside the folder) and record it in the manifest."""
        p = self.resolve(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p = self.resolve(name)  # the folder may have been created just now: check again where it resolves
        self.claim(name)
        atomic_write_bytes(p, data)
        return p

    def read_bytes(self, name: str | os.PathLike) -> bytes:
        p = self.path / name
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise LossglassError(f"{self.path}: no {name} (expected {p})") from None
        except OSError as e:
            raise LossglassError(f"{p}: cannot be read ({e.strerror})") from None

    def claim(self, name: str | os.PathLike) -> None:
        """Record that lossglass writes ``name`` (tagged with the current stage) in the manifest, an append-only file
        (one line per file, safe for several processes; opened without following a link)."""
        rel = str(Path(name))
        m = self.resolve(MANIFEST)
        m.parent.mkdir(exist_ok=True)
        fd = os.open(m, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            os.write(fd, f"{self.stage or '-'}\t{rel}\n".encode())
        finally:
            os.close(fd)

    def owned(self) -> dict[str, str]:
        """``{relative path: stage}`` of every file lossglass wrote here (the manifest; stage '-' when none)."""
        p = self.path / MANIFEST
        if not p.is_file() or p.is_symlink():
            return {}
        out: dict[str, str] = {}
        for line in p.read_text(errors="replace").splitlines():
            stage, _, rel = line.partition("\t")
            if rel:
                out[rel] = stage
        return out

    def remove_owned(self, stages: set[str] | None = None, *, keep: set[str] = frozenset()) -> int:
        """Delete the files lossglass wrote here (all, or those of ``stages``), except ``keep``; nothing else is
        touched: a user's own files in the folder stay. Emptied folders that lossglass made are removed too.
        Returns the number of files deleted."""
        owned = self.owned()
        gone, left = 0, {}
        for rel, stage in owned.items():
            if rel in keep or (stages is not None and stage not in stages):
                left[rel] = stage
                continue
            p = self.path / rel
            try:
                inside = self._root in p.parent.resolve().parents or p.parent.resolve() == self._root
            except OSError:
                inside = False
            if inside and (p.is_file() or p.is_symlink()):
                p.unlink()
                gone += 1
        self._rewrite_manifest(left)
        for d in ("tasks", "checkpoints", "figures", "tables", "tensors", "selected", "csv", "stages"):
            q = self.path / d
            if q.is_dir() and not q.is_symlink() and not any(q.iterdir()):
                q.rmdir()
        return gone

    def _rewrite_manifest(self, entries: dict[str, str]) -> None:
        text = "".join(f"{s}\t{r}\n" for r, s in entries.items())
        atomic_write_bytes(self.resolve(MANIFEST), text.encode())

    # JSON ----------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode())

    def read_json(self, name: str, default: Any = None) -> Any:
        p = self.path / name
        if not p.exists():
            return default
        try:
            return json.loads(self.read_bytes(name))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LossglassError(f"{p} is damaged (not valid JSON: {e}); delete it and run the stage again, "
                                 "or start over with --force") from None

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    # tables --------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / "tables" / f"{name}.parquet"

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        buf = io.BytesIO()
        df.reset_index(drop=True).to_parquet(buf, index=False)
        return self.write_bytes(f"tables/{name}.parquet", buf.getvalue())

    def read_table(self, name: str) -> pd.DataFrame:
        p = self.table_path(name)
        check(p.exists(), f"{self.path}: no table {name!r} (expected {p})")
        data = self.read_bytes(f"tables/{name}.parquet")  # read once, parse from memory: no torn reads
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - any parse failure is a damaged file
            raise LossglassError(f"{p} is damaged ({type(e).__name__}: {e}); run its stage again (--redo) or "
                                 "start over with --force") from None

    def has_table(self, name: str) -> bool:
        return self.table_path(name).exists()

    def tables(self) -> list[str]:
        d = self.path / "tables"
        return sorted(p.stem for p in d.glob("*.parquet")) if d.is_dir() else []

    # tensors -------------------------------------------------------------
    def tensor_path(self, name: str) -> Path:
        return self.path / self._tensor_rel(name)

    @staticmethod
    def _tensor_rel(name: str) -> str:
        return "replicas.safetensors" if name == "replicas" else f"tensors/{name}.safetensors"

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        data = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)
        return self.write_bytes(self._tensor_rel(name), data)

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        p = self.tensor_path(name)
        check(p.exists(), f"{self.path}: no tensors {name!r} (expected {p})")
        return load_tensors_bytes(self.read_bytes(self._tensor_rel(name)), p)

    def has_tensors(self, name: str) -> bool:
        return self.tensor_path(name).exists()

    # stages --------------------------------------------------------------
    def stage_done(self, name: str) -> bool:
        return (self.path / "stages" / f"{name}.json").exists()

    def mark_done(self, name: str, info: dict | None = None) -> None:
        self.write_json(f"stages/{name}.json", {"stage": name, "finished": time.time(), **(info or {})})

    def stage_record(self, name: str) -> dict | None:
        return self.read_json(f"stages/{name}.json")

    def stages(self) -> dict[str, dict]:
        """Completion records in run order (a damaged record raises an error naming its file)."""
        d = self.path / "stages"
        if not d.is_dir():
            return {}
        names = [p.stem for p in d.glob("*.json")]
        order = {s: i for i, s in enumerate(STAGE_ORDER)}
        names.sort(key=lambda s: (order.get(s, len(order)), s))
        return {n: self.read_json(f"stages/{n}.json") for n in names}

    def figure_dir(self) -> Path:
        return self.resolve("figures/x").parent

    # trust -----------------------------------------------------------------
    def mark_trusted(self) -> None:
        """Sign this folder's config.toml with this user's key: later commands here may import the code it names."""
        self.write_bytes(".lossglass/trust", self._signature().encode())

    def is_trusted(self) -> bool:
        """Whether this user's lossglass wrote the current config.toml here (its signature matches)."""
        p = self.path / ".lossglass" / "trust"
        if not p.is_file() or p.is_symlink() or not (self.path / "config.toml").is_file():
            return False
        return hmac.compare_digest(p.read_text(errors="replace").strip(), self._signature())

    def _signature(self) -> str:
        cfg = (self.path / "config.toml").read_bytes() if (self.path / "config.toml").is_file() else b""
        return hmac.new(_user_key(), str(self._root).encode() + b"\0" + cfg, hashlib.sha256).hexdigest()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """safetensors bytes with the metadata in sorted key order. safetensors keeps the metadata in a hash map, whose
    order changes from process to process, so two files with the same tensors and metadata differed in their header:
    the header is rewritten with sorted metadata (same tensors, same offsets, padded to 8 bytes as the format asks)."""
    import json
    import struct

    from safetensors.torch import save

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    data = save(tensors, metadata=meta or None)
    if len(meta) < 2:
        return data
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


def load_tensors_bytes(data: bytes, source: Path | str) -> dict[str, torch.Tensor]:
    """Parse a safetensors file from bytes already read (one read: no torn reads), naming the file if damaged."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise LossglassError(f"{source} is damaged ({type(e).__name__}: {e}); run its stage again or start over "
                             "with --force") from None


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
