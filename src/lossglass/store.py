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
    .lossglass/manifest    every file lossglass wrote here, each line signed (``--force`` deletes these and nothing else)
    .lossglass/trust       this user's signature of config.toml
    .lossglass/lock        held (``flock``) by the one process writing here

One writer per folder: a study, an import, ``report``, ``select`` and ``export`` into the folder hold an exclusive
``flock`` on ``.lossglass/lock`` (:meth:`RunStore.writer`) while they write; a second writer stops with one line
naming the holder's process id, and a lock left by a killed process does not block (the kernel drops it). Readers
(``info``, the report views, the dashboard) never take it.

The manifest records, for each file written through the store, its stage, path, size and SHA-256, and every line is
signed with this user's key (HMAC-SHA256 of the folder, stage, path, size and hash): a planted line does not verify,
and ``--force`` or a redone stage deletes a file only when its line verifies and its size and hash still match (a
file the user replaced stays). Files claimed before someone else writes them (checkpoints) carry a signed claim
without a hash.

Opening a folder from someone else is safe for reading: writes never follow a symbolic link out of the folder
(a link in the final component is replaced, a linked folder is refused); reads open only regular files inside the
folder (no link in the last component, no folder that resolves outside), are bounded in size
(:data:`READ_LIMITS`) and, for JSON and TOML, in nesting depth (:data:`MAX_DEPTH`), parse bytes read once (no torn
reads beside a writer), and turn any parse failure into a :class:`LossglassError` naming the file; nothing here
imports code. Commands that build the model from the folder's ``config.toml`` may import code it names
(``model.factory``, ``data.factory``, ``model.spec``): they ask for ``--trust-config`` unless this user wrote that
config here (:meth:`RunStore.is_trusted`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .errors import LossglassError, check

_UMASK = os.umask(0)
os.umask(_UMASK)
MANIFEST = ".lossglass/manifest"
LOCK = ".lossglass/lock"
TRUST = ".lossglass/trust"

#: the most bytes read from one file of a run folder, by suffix (a foreign folder cannot make a reader allocate more);
#: tables are also bounded in their decoded size (:data:`TABLE_DECODED_LIMIT`)
READ_LIMITS = {".json": 64 << 20, ".toml": 1 << 20, ".parquet": 512 << 20, ".safetensors": 64 << 30,
               ".html": 512 << 20, "": 512 << 20}
#: the most bytes a table may decode to (Parquet compresses: a small file may describe a huge table)
TABLE_DECODED_LIMIT = 1 << 30
#: the deepest nesting of lists and tables a JSON or TOML record of a run folder may have
MAX_DEPTH = 64
#: the largest safetensors header (the format's own limit)
SAFETENSORS_HEADER_LIMIT = 100 << 20
#: the names ``atomic_write_bytes`` gives its temporary files (``tempfile.mkstemp``: 8 characters of
#: ``[a-z0-9_]``); only these are swept after a killed write
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
#: the folders lossglass writes into (temporary files are swept there, empty ones removed, deepest first)
WRITTEN_FOLDERS = ("tables/tasks", "tensors/tasks", "tasks", "checkpoints", "figures", "tables", "tensors", "selected",
                   "csv", "stages", ".lossglass")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


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


# ------------------------------------------------------------------------------------------------ bounded reads
def read_limit(name: str | os.PathLike) -> int:
    """The most bytes read from a run folder's file called ``name`` (:data:`READ_LIMITS` by suffix)."""
    return READ_LIMITS.get(Path(name).suffix.lower(), READ_LIMITS[""])


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, *, follow: bool = False) -> Iterator[tuple[int, os.stat_result]]:
    """Open ``path`` for reading only if it is a regular file (not a FIFO, device or folder; not a symbolic link
    unless ``follow``); yields the descriptor and its ``fstat``. Failures are one :class:`LossglassError` naming it."""
    flags = os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | (0 if follow else _O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LossglassError(f"{path} is a symbolic link; files of a run folder are read only when they are "
                                 "plain files inside it") from None
        raise LossglassError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        check(stat.S_ISREG(st.st_mode), f"{path} is not a plain file; not read")
        yield fd, st
    finally:
        os.close(fd)


def read_file(path: str | os.PathLike, limit: int, *, follow: bool = False) -> bytes:
    """The bytes of the regular file ``path``, refused (one line naming it) when larger than ``limit``."""
    with open_regular(path, follow=follow) as (fd, st):
        if st.st_size > limit:
            raise LossglassError(f"{path} is too large to read ({st.st_size:,} bytes; at most {limit:,} are read from "
                                 "a file of this kind)")
        chunks, left = [], limit + 1
        while left > 0:
            try:
                b = os.read(fd, min(left, 1 << 24))
            except OSError as e:
                raise LossglassError(f"{path}: cannot be read ({e.strerror})") from None
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        data = b"".join(chunks)
    if len(data) > limit:
        raise LossglassError(f"{path} is too large to read (more than {limit:,} bytes)")
    return data


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of lists and dicts in ``obj`` (iterative: any depth is measured without recursion), counted
    up to ``limit + 1``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        deepest = max(deepest, d)
        if d > limit:
            return d
        stack.extend((c, d + 1) for c in children)
    return deepest


def parse_json(data: bytes, source: str | os.PathLike, kind: type | tuple[type, ...] | None = None) -> Any:
    """JSON from bytes already read: any parse failure (bad syntax or encoding, numbers too long, nesting deeper
    than :data:`MAX_DEPTH`) or a value that is not of ``kind`` is one :class:`LossglassError` naming ``source``."""
    try:
        obj = json.loads(data)
    except RecursionError:
        raise LossglassError(f"{source} is damaged (nested too deeply to read)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, integers too long to convert
        raise LossglassError(f"{source} is damaged (not valid JSON: {e}); delete it and run the stage again, "
                             "or start over with --force") from None
    if nesting_depth(obj) > MAX_DEPTH:
        raise LossglassError(f"{source} is damaged (nested more than {MAX_DEPTH} levels deep)")
    if kind is not None and not isinstance(obj, kind):
        want = {dict: "a JSON object", list: "a JSON list"}.get(kind, getattr(kind, "__name__", str(kind)))
        raise LossglassError(f"{source} is damaged ({want} expected, found a {_json_type(obj)})")
    return obj


def _json_type(obj: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


def parse_table(data: bytes, source: str | os.PathLike) -> pd.DataFrame:
    """A DataFrame from Parquet bytes already read, bounded in what it decodes to: the footer's row and column
    counts first, then the decoded record batches one by one (at most :data:`TABLE_DECODED_LIMIT` bytes), before
    ``pandas.read_parquet`` parses it. Any failure is one :class:`LossglassError` naming ``source``."""
    import pyarrow.parquet as pq

    limit = TABLE_DECODED_LIMIT
    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        md = pf.metadata
        if md.num_rows * max(md.num_columns, 1) > limit // 8:
            raise LossglassError(f"{source} is too large to read ({md.num_rows:,} rows of {md.num_columns} columns)")
        deep = [f.name for f in pf.schema_arrow if _type_depth(f.type) > 4]
        if deep:
            raise LossglassError(f"{source} is damaged (column {deep[0]!r} is nested too deeply)")
        decoded = 0
        for batch in pf.iter_batches(batch_size=1 << 16):
            decoded += batch.nbytes
            if decoded > limit:
                raise LossglassError(f"{source} is too large to read (it decodes to more than {limit:,} bytes)")
        return pd.read_parquet(io.BytesIO(data))
    except LossglassError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a damaged file
        raise LossglassError(f"{source} is damaged ({type(e).__name__}: {_one_line(e)}); run its stage again (--redo) "
                             "or start over with --force") from None


def _type_depth(t) -> int:
    import pyarrow as pa

    depth, stack = 0, [(t, 1)]
    while stack:
        u, d = stack.pop()
        depth = max(depth, d)
        if d > 16:
            break
        if pa.types.is_struct(u):
            stack.extend((u.field(i).type, d + 1) for i in range(u.num_fields))
        elif pa.types.is_list(u) or pa.types.is_large_list(u) or pa.types.is_fixed_size_list(u):
            stack.append((u.value_type, d + 1))
        elif pa.types.is_map(u):
            stack.extend(((u.key_type, d + 1), (u.item_type, d + 1)))
        elif pa.types.is_dictionary(u):
            stack.append((u.value_type, d))
    return depth


def _one_line(e: BaseException, n: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n] + "..."


def parse_safetensors_header(head: bytes, size: int, source: str | os.PathLike) -> dict[str, dict]:
    """The tensors a safetensors file declares (``{name: {"dtype", "shape", "data_offsets"}}``) from its first bytes
    (8-byte little-endian header length N, then N bytes of JSON), checked against the file's ``size``: shapes of
    non-negative integers, offsets inside the data. One :class:`LossglassError` naming ``source`` when damaged."""
    check(len(head) >= 8, f"{source} is damaged (shorter than a safetensors header)")
    n = struct.unpack("<Q", head[:8])[0]
    check(0 < n <= SAFETENSORS_HEADER_LIMIT and 8 + n <= size,
          f"{source} is damaged (its header claims {n:,} bytes; the file has {size:,})")
    check(len(head) >= 8 + n, f"{source} is damaged (truncated header)")
    header = parse_json(head[8:8 + n], source, dict)
    data_size = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(t, dict) and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in t["shape"])
              and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in t["data_offsets"])
              and 0 <= t["data_offsets"][0] <= t["data_offsets"][1] <= data_size)
        check(ok, f"{source} is damaged (tensor {str(name)[:60]!r} has no valid dtype, shape and offsets inside the "
              "file)")
        out[str(name)] = t
    return out


# ------------------------------------------------------------------------------------------------ the user's key
_KEYS: dict[str, bytes] = {}
_KEY_LOCK = threading.Lock()


def _key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lossglass" / "trust-key"


def _read_key(p: Path) -> bytes | None:
    try:
        key = read_file(p, 4096, follow=True)
    except FileNotFoundError:
        return None
    return key if len(key) >= 32 else b""


def _user_key() -> bytes:
    """A random key private to this user (0600, in a 0700 folder), made once: run folders this user's lossglass wrote
    are signed with it, so a folder from elsewhere is recognised as such. Creation is race-free: the new key is
    written whole to a temporary file, then linked into place without overwriting (``os.link`` fails when the key
    exists), so processes creating it at once all end with the first one's key."""
    p = _key_file()
    with _KEY_LOCK:
        if str(p) in _KEYS:
            return _KEYS[str(p)]
        for _ in range(5):
            key = _read_key(p)
            if key:
                _KEYS[str(p)] = key
                return key
            if key == b"":  # too short: a key cut off by an older lossglass; set aside (one process wins the rename)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(p, p.with_name(f"trust-key.damaged-{os.getpid()}"))
                continue
            _create_key(p)
        raise LossglassError(f"{p}: cannot create this user's trust key (it keeps changing or is too short)")


def _create_key(p: Path) -> None:
    try:
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise LossglassError(f"cannot create {p.parent} for this user's trust key ({e.strerror})") from None
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".trust-key.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)  # atomic, never overwrites: the first process to link wins
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, written whole by one process
            with contextlib.suppress(FileExistsError):
                fd2 = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW, 0o600)
                with os.fdopen(fd2, "wb") as f:
                    f.write(Path(tmp).read_bytes())
            time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    _fsync_dir(p.parent)


def _mac(*parts: str | bytes) -> str:
    msg = b"\0".join(x.encode() if isinstance(x, str) else x for x in parts)
    return hmac.new(_user_key(), msg, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------------------------ one writer
#: folders this process holds the lock of: resolved path -> [descriptor, depth] (the lock is re-entrant within a
#: process: a study run inside a command that already holds it)
_HELD: dict[str, list[int]] = {}
_HELD_LOCK = threading.Lock()


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"process id {text}" if text.isdigit() else "another process (its id not yet written)"


# ------------------------------------------------------------------------------------------------ the manifest
class _Entry:
    """The verified manifest lines of one path: its last stage and the (size, hash) of every write (None: a claim
    without a hash, e.g. a checkpoint written outside the store)."""

    __slots__ = ("stage", "records")

    def __init__(self, stage: str):
        self.stage, self.records = stage, []


def _file_digest(p: Path, size: int) -> str | None:
    """SHA-256 of the regular file ``p`` if it still has ``size`` bytes (read in chunks, no link followed)."""
    try:
        with open_regular(p) as (fd, st):
            if st.st_size != size:
                return None
            h = hashlib.sha256()
            while True:
                b = os.read(fd, 1 << 22)
                if not b:
                    break
                h.update(b)
            return h.hexdigest()
    except (OSError, LossglassError):
        return None


class RunStore:
    """A run folder: tables (Parquet), tensors (safetensors), JSON records, stage markers and the manifest of what
    lossglass wrote. ``stage`` (set by the study) tags every file written, so a redone stage can remove its own."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True, stage: str | None = None):
        self.path = Path(path)
        self.stage = stage
        #: the (size, SHA-256) of the bytes :meth:`write_bytes` is about to write, handed to :meth:`claim`
        self._digests: dict[str, tuple[int, str]] = {}
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
        """The path of ``name`` inside the folder; refuses absolute names, '..', control characters, and folders
        that resolve outside the run folder (a symbolic link to elsewhere)."""
        rel = Path(name)
        check(not rel.is_absolute() and ".." not in rel.parts and str(rel) not in ("", ".")
              and not any(c in str(rel) for c in "\t\n\r\0"),
              f"refusing to use {str(name)!r}: not a plain name inside the run folder")
        p = self.path / rel
        parent = p.parent.resolve()
        check(parent == self._root or self._root in parent.parents,
              f"refusing to use {p}: {p.parent} resolves to {parent}, outside the run folder {self._root}")
        return p

    # one writer ----------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator[RunStore]:
        """Hold this folder's writer lock while the block runs: an exclusive ``flock`` on ``.lossglass/lock`` (opened
        without following a link; the holder's process id written in it). Re-entrant within a process. A second
        writer gets one line naming the holder; a lock whose holder was killed is free (the kernel releases it)."""
        key = str(self._root)
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None:
                held[1] += 1
            else:
                _HELD[key] = [self._acquire(), 1]
        try:
            yield self
        finally:
            with _HELD_LOCK:
                held = _HELD[key]
                held[1] -= 1
                if held[1] == 0:
                    del _HELD[key]
                    os.close(held[0])  # closing the descriptor releases the flock

    def holds_lock(self) -> bool:
        """Whether this process holds the folder's writer lock."""
        return str(self._root) in _HELD

    def _acquire(self) -> int:
        import fcntl

        p = self.resolve(LOCK)
        try:
            p.parent.mkdir(exist_ok=True)
            p = self.resolve(LOCK)  # the folder may have been created just now: check again where it resolves
            fd = os.open(p, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, 0o666)
        except OSError as e:
            what = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
            raise LossglassError(f"{p} {what}: the run folder's writer lock is not usable") from None
        try:
            check(stat.S_ISREG(os.fstat(fd).st_mode), f"{p} is not a plain file: the run folder's writer lock is not "
                  "usable")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LossglassError(f"{self.path} is being written by {_lock_holder(fd)} (lossglass run, import, "
                                     "report or select): wait for it to finish, then run this again") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def sweep(self) -> int:
        """Remove what killed writes left: temporary files of :func:`atomic_write_bytes` (names matching
        :data:`TEMP_NAME` only, plain files only) in the folders lossglass writes into, then those folders if they
        are empty. Never follows a link. Returns the number of files removed."""
        gone = 0
        for d in ("", *WRITTEN_FOLDERS):
            q = self.path / d if d else self.path
            try:
                if not stat.S_ISDIR(os.lstat(q).st_mode) or (d and q.resolve() != self._root / d):
                    continue
                entries = list(os.scandir(q))
            except OSError:
                continue
            for e in entries:
                if TEMP_NAME.match(e.name) and e.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(e.path)
                        gone += 1
        for d in WRITTEN_FOLDERS:
            if d == ".lossglass":
                continue
            q = self.path / d
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(q).st_mode) and not any(os.scandir(q)):
                    q.rmdir()
        return gone

    # raw bytes -----------------------------------------------------------------
    def write_bytes(self, name: str | os.PathLike, data: bytes) -> Path:
        """Atomically write ``data`` to ``name`` (inside the folder) and record it, with its size and hash, in the
        manifest."""
        p = self.resolve(name)
        p.parent.mkdir(parents=True, exist_ok=True)
        p = self.resolve(name)  # the folder may have been created just now: check again where it resolves
        rel = str(Path(name))
        self._digests[rel] = (len(data), hashlib.sha256(data).hexdigest())
        try:
            self.claim(name)
        finally:
            self._digests.pop(rel, None)
        atomic_write_bytes(p, data)
        return p

    def _read_path(self, name: str | os.PathLike) -> Path:
        rel = Path(name)
        check(not rel.is_absolute() and ".." not in rel.parts, f"refusing to read {str(name)!r}: not a plain name "
              "inside the run folder")
        p = self.path / rel
        try:
            parent = p.parent.resolve()
        except (OSError, RuntimeError):
            raise LossglassError(f"{p}: cannot be read (its folder does not resolve)") from None
        check(parent == self._root or self._root in parent.parents,
              f"refusing to read {p}: {p.parent} resolves to {parent}, outside the run folder {self._root}")
        return p

    def read_bytes(self, name: str | os.PathLike, limit: int | None = None) -> bytes:
        """The bytes of ``name`` (a plain file inside the folder, at most ``limit`` bytes, default
        :func:`read_limit`); any failure is one line naming the file."""
        p = self._read_path(name)
        try:
            return read_file(p, read_limit(name) if limit is None else limit)
        except FileNotFoundError:
            raise LossglassError(f"{self.path}: no {name} (expected {p})") from None
        except OSError as e:
            raise LossglassError(f"{p}: cannot be read ({e.strerror})") from None

    def claim(self, name: str | os.PathLike) -> None:
        """Record that lossglass writes ``name`` (tagged with the current stage) in the manifest: an append-only file,
        one signed line per file (``stage, path, size, SHA-256, signature``; size and hash ``-`` for a file written
        outside the store, such as a checkpoint), each line one ``write`` of a descriptor opened with ``O_APPEND``
        and without following a link, so several processes may append at once."""
        rel = str(Path(name))
        self.resolve(name)  # a plain name: no tab or newline could forge a line
        size, digest = self._digests.get(rel, ("-", "-"))
        self._append_manifest(self._line(self.stage or "-", rel, str(size), digest))

    def _line(self, stage: str, rel: str, size: str, digest: str) -> str:
        sig = _mac("manifest", str(self._root), stage, rel, size, digest)
        return f"{stage}\t{rel}\t{size}\t{digest}\t{sig}\n"

    def _append_manifest(self, line: str) -> None:
        m = self.resolve(MANIFEST)
        m.parent.mkdir(exist_ok=True)
        fd = os.open(m, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o666)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def _entries(self) -> dict[str, _Entry]:
        """The manifest's lines whose signature verifies (made by this user's lossglass for this folder), by path in
        the order first written; any other line (planted, edited, from another folder or user) is ignored."""
        try:
            text = read_file(self.path / MANIFEST, 256 << 20).decode("utf-8", "replace")
        except (FileNotFoundError, LossglassError):
            return {}
        out: dict[str, _Entry] = {}
        root = str(self._root)
        for line in text.splitlines():
            f = line.split("\t")
            if len(f) != 5:
                continue
            stage, rel, size, digest, sig = f
            if not hmac.compare_digest(sig, _mac("manifest", root, stage, rel, size, digest)):
                continue
            e = out.get(rel)
            if e is None:
                e = out[rel] = _Entry(stage)
            e.stage = stage
            e.records.append(None if digest == "-" else (int(size), digest))
        return out

    def owned(self) -> dict[str, str]:
        """``{relative path: stage}`` of every file lossglass wrote here (the verified lines of the manifest; stage
        '-' when none)."""
        return {rel: e.stage for rel, e in self._entries().items()}

    def _still_ours(self, rel: str, e: _Entry) -> bool:
        """Whether the file at ``rel`` is one lossglass wrote: a plain file inside the folder whose size and hash
        match one of its signed writes (or which has a signed claim without a hash)."""
        p = self.path / rel
        try:
            parent = p.parent.resolve()
            if not (parent == self._root or self._root in parent.parents):
                return False
            st = os.lstat(p)
        except (OSError, RuntimeError):
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if any(r is None for r in e.records):
            return True
        sizes = {size for size, _ in e.records}
        if st.st_size not in sizes:
            return False
        return _file_digest(p, st.st_size) in {d for s, d in e.records if s == st.st_size}

    def remove_owned(self, stages: set[str] | None = None, *, keep: set[str] = frozenset()) -> int:
        """Delete the files lossglass wrote here (all, or those of ``stages``), except ``keep``; nothing else is
        touched: only files whose manifest line verifies and whose size and hash still match (a user's own file, or
        one the user replaced, stays). Emptied folders that lossglass made are removed too. Returns the number of
        files deleted."""
        entries = self._entries()
        gone, left = 0, {}
        for rel, e in entries.items():
            if rel in keep or (stages is not None and e.stage not in stages):
                left[rel] = e
                continue
            if self._still_ours(rel, e):
                with contextlib.suppress(FileNotFoundError):
                    (self.path / rel).unlink()
                    gone += 1
        self._rewrite_manifest(left)
        for d in WRITTEN_FOLDERS:  # deepest first: tables/tasks before tables
            q = self.path / d
            if d != ".lossglass" and q.is_dir() and not q.is_symlink() and not any(q.iterdir()):
                q.rmdir()
        return gone

    def remove_if_owned(self, name: str | os.PathLike) -> bool:
        """Delete the file ``name`` only if lossglass wrote it here and it still holds what was written (its signed
        manifest line verifies, its size and hash match); returns whether it was deleted."""
        rel = str(Path(name))
        e = self._entries().get(rel)
        if e is None or not self._still_ours(rel, e):
            return False
        with contextlib.suppress(FileNotFoundError):
            (self.path / rel).unlink()
        return True

    def _rewrite_manifest(self, entries: dict[str, _Entry]) -> None:
        """One line per kept path (where it was first written, with its last stage), for the write that matches the
        file now (or the last one), signed again."""
        lines = []
        for rel, e in entries.items():
            rec = e.records[-1]
            if rec is not None and len(e.records) > 1:
                rec = self._current_record(rel, e) or rec
            size, digest = ("-", "-") if rec is None else (str(rec[0]), rec[1])
            lines.append(self._line(e.stage, rel, size, digest))
        atomic_write_bytes(self.resolve(MANIFEST), "".join(lines).encode())

    def _current_record(self, rel: str, e: _Entry) -> tuple[int, str] | None:
        try:
            st = os.lstat(self.path / rel)
        except OSError:
            return None
        same = [r for r in e.records if r is not None and r[0] == st.st_size]
        if len({d for _, d in same}) > 1:
            digest = _file_digest(self.path / rel, st.st_size)
            same = [r for r in same if r[1] == digest]
        return same[-1] if same else None

    # JSON ----------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_bytes(name, json_bytes(obj))

    def read_json(self, name: str, default: Any = None, *, kind: type | tuple[type, ...] | None = None) -> Any:
        """The JSON record ``name`` (``default`` when absent), bounded in size and depth; ``kind``: the type it must
        have (e.g. ``dict``). A damaged record is one :class:`LossglassError` naming the file."""
        p = self.path / name
        if not os.path.lexists(p):
            return default
        return parse_json(self.read_bytes(name), p, kind)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    # tables --------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self.path / "tables" / f"{name}.parquet"

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        return self.write_bytes(f"tables/{name}.parquet", table_bytes(df))

    def read_table(self, name: str) -> pd.DataFrame:
        p = self.table_path(name)
        check(p.exists(), f"{self.path}: no table {name!r} (expected {p})")
        data = self.read_bytes(f"tables/{name}.parquet")  # read once, parse from memory: no torn reads
        return parse_table(data, p)

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

    def tensor_header(self, name: str) -> dict[str, dict]:
        """What the tensors file ``name`` declares (``{tensor: {"dtype", "shape", "data_offsets"}}``), read from its
        header only (never its data: a file of any size costs at most the header), checked against the file size."""
        p = self._read_path(self._tensor_rel(name))
        try:
            with open_regular(p) as (fd, st):
                head = os.pread(fd, 8, 0)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                if 0 < n <= SAFETENSORS_HEADER_LIMIT and 8 + n <= st.st_size:
                    head += os.pread(fd, n, 8)
                return parse_safetensors_header(head, st.st_size, p)
        except FileNotFoundError:
            raise LossglassError(f"{self.path}: no tensors {name!r} (expected {p})") from None
        except OSError as e:
            raise LossglassError(f"{p}: cannot be read ({e.strerror})") from None

    def has_tensors(self, name: str) -> bool:
        return self.tensor_path(name).exists()

    # stages --------------------------------------------------------------
    def stage_done(self, name: str) -> bool:
        return (self.path / "stages" / f"{name}.json").exists()

    def mark_done(self, name: str, info: dict | None = None) -> None:
        self.write_json(f"stages/{name}.json", {"stage": name, "finished": time.time(), **(info or {})})

    def stage_record(self, name: str) -> dict | None:
        """The completion record of stage ``name`` (None when absent); a record that is not a JSON object is damaged."""
        return self.read_json(f"stages/{name}.json", kind=dict)

    def stages(self, order: Sequence[str] = ()) -> dict[str, dict]:
        """Completion records, in ``order`` (e.g. :data:`lossglass.stages.STAGE_ORDER`, the run order), then the
        others by name; a damaged record (or one that is not a JSON object) raises an error naming its file."""
        d = self.path / "stages"
        if not d.is_dir():
            return {}
        names = [p.stem for p in d.glob("*.json")]
        order = {s: i for i, s in enumerate(order)}
        names.sort(key=lambda s: (order.get(s, len(order)), s))
        return {n: self.read_json(f"stages/{n}.json", kind=dict) for n in names}

    # trust -----------------------------------------------------------------
    def mark_trusted(self) -> None:
        """Sign this folder's config.toml with this user's key: later commands here may import the code it names."""
        self.write_bytes(TRUST, self._signature().encode())

    def is_trusted(self, config: bytes | None = None) -> bool:
        """Whether this user's lossglass wrote the config here: the trust mark is this user's signature of the
        folder and ``config`` (default: the config.toml there now; pass the bytes already read to check exactly
        those)."""
        try:
            mark = read_file(self.path / TRUST, 4096).decode("ascii", "replace").strip()
            if config is None:
                config = self.read_bytes("config.toml")
        except (FileNotFoundError, LossglassError):
            return False
        return hmac.compare_digest(mark, self._signature(config))

    def _signature(self, config: bytes | None = None) -> str:
        if config is None:
            try:
                config = self.read_bytes("config.toml")
            except LossglassError:
                config = b""
        return hmac.new(_user_key(), str(self._root).encode() + b"\0" + config, hashlib.sha256).hexdigest()


def written_by_lossglass(folder: str | os.PathLike) -> bool:
    """Whether lossglass has written into ``folder`` (it holds ``meta.json``, ``progress.json`` or ``.lossglass``):
    a config found there came from a run folder, and needs this user's signature before the code it names runs."""
    f = Path(folder)
    return any(os.path.lexists(f / n) for n in ("meta.json", "progress.json", ".lossglass"))


def table_bytes(df: pd.DataFrame) -> bytes:
    """A table as the Parquet bytes a run folder holds (index dropped)."""
    buf = io.BytesIO()
    df.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """A JSON record as a run folder holds it (indented, keys sorted)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default).encode()


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """safetensors bytes with the metadata in sorted key order. safetensors keeps the metadata in a hash map, whose
    order changes from process to process, so two files with the same tensors and metadata differed in their header:
    the header is rewritten with sorted metadata (same tensors, same offsets, padded to 8 bytes as the format asks)."""
    import json
    import struct

    from safetensors.torch import save

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    data = save(tensors, metadata=meta)
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
