"""Live mode: the dashboard served from a local HTTP server (the standard library's ``http.server``) on 127.0.0.1.

The page polls ``api/state`` (each run's stage progress from ``progress.json`` and a fingerprint of its results)
every 1.5 s and fetches ``api/data`` again when a stage has written new results, so the page follows a running
study without a reload. Runs that appear in the folder later are picked up.

Routes: ``/`` (the page), ``/plotly.min.js`` (plotly's bundled copy), ``/api/state``, ``/api/data`` and
``/files/RUN_ID/PATH`` (a file of a run folder, e.g. its ``report.html``). Only GET; only requests addressed to
this host name (no DNS rebinding); no file outside a run folder (``..``, absolute paths and symbolic links that
resolve elsewhere are refused); files from run folders are sandboxed (their scripts cannot reach this origin), sent
in chunks and only up to :data:`FILE_LIMIT` bytes. Each run is collected and serialised on its own: a folder that
cannot be read is one run marked "damaged", and every endpoint keeps answering for the others.
"""

from __future__ import annotations

import json
import mimetypes
import os
import stat
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import LossglassError
from .collect import collect_run, damaged_run, discover, page_data, run_id, run_state, version
from .page import page_json, plotly_js, render

#: the largest file of a run folder the server sends (report.html with its figures is a few MB)
FILE_LIMIT = 256 << 20
_CHUNK = 1 << 20


class RunsSource:
    """The runs the server shows: rediscovered at each request (a new study appears), each run's collected data
    cached by its results fingerprint (rebuilt only when a stage has written something)."""

    def __init__(self, paths: list[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._cache: dict[str, tuple[tuple, str]] = {}
        #: run id -> (results version, True when its collection found damaged files)
        self._damaged: dict[str, tuple[str, bool]] = {}
        self._lock = threading.Lock()

    def runs(self) -> list[Path]:
        try:
            return discover(self.paths, allow_empty=True)
        except (LossglassError, OSError):
            return []

    def folder(self, rid: str) -> Path | None:
        """The run folder with id ``rid`` (None when no current run has it)."""
        for p in self.runs():
            if run_id(p) == rid:
                return p
        return None

    def state(self) -> dict:
        """Each run's cheap state; a run whose last collection (of the same results) found damaged files stays marked
        "damaged" (the poll reads only the records, not every table)."""
        runs = [run_state(p) for p in self.runs()]
        for r in runs:
            seen = self._damaged.get(r["id"])
            if seen and seen[1] and seen[0] == r["version"] and r["status"] in ("complete", "incomplete"):
                r["status"] = "damaged"
        return {"now": time.time(), "runs": runs}

    def _run_json(self, p: Path, i: int) -> str:
        from plotly.io.json import to_json_plotly

        rid = run_id(p)
        key = (i, version(p))
        hit = self._cache.get(rid)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            run = collect_run(p, i, files_url=f"files/{rid}")
            s = to_json_plotly(run)
        except Exception as e:  # noqa: BLE001 - a run that does not serialise is marked; the others are sent
            run = damaged_run(p, i, e)
            s = to_json_plotly(run)
        self._cache[rid] = (key, s)
        self._damaged[rid] = (key[1], run.get("status") == "damaged")
        return s

    def data_json(self, *, with_template: bool) -> str:
        """The page data: the shared part, then each run's (cached) JSON spliced in."""
        with self._lock:
            paths = self.runs()
            runs = [self._run_json(p, i) for i, p in enumerate(paths)]
            current = {run_id(p) for p in paths}
            for rid in [r for r in self._cache if r not in current]:  # runs that went away: forget them
                self._cache.pop(rid, None)
                self._damaged.pop(rid, None)
        head = page_data([], live=True)
        del head["runs"]
        text = page_json(head) if with_template else json.dumps(head)
        return text[:-1] + ',"runs":[' + ",".join(runs) + "]}"


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "lossglass-dashboard"
    sys_version = ""

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, code: int, why: str) -> None:
        self._send(code, f"{code} {HTTPStatus(code).phrase}: {why}\n".encode(), "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        host = (self.headers.get("Host") or "").lower()
        if host not in self.server.hosts:
            return self._error(403, "this server answers only requests addressed to " + self.server.url)
        path = urlsplit(self.path).path
        src = self.server.source
        try:
            if path in ("/", "/index.html"):
                page = render(src.data_json(with_template=True), title="lossglass dashboard (live)",
                              plotly_src="plotly.min.js")
                return self._send(200, page.encode(), "text/html; charset=utf-8")
            if path == "/plotly.min.js":
                return self._send(200, self.server.plotly, "text/javascript; charset=utf-8",
                                  {"Cache-Control": "max-age=86400"})
            if path == "/api/state":
                return self._send(200, json.dumps(src.state()).encode(), "application/json")
            if path == "/api/data":
                return self._send(200, src.data_json(with_template=False).encode(), "application/json")
            if path.startswith("/files/"):
                return self._file(path[len("/files/"):])
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as e:  # noqa: BLE001 - the request fails with one line; the server keeps serving
            self.close_connection = True
            try:
                return self._error(500, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            except OSError:
                return None
        return self._error(404, "no such page")

    def _file(self, rest: str) -> None:
        rid, _, rel = rest.partition("/")
        folder = self.server.source.folder(unquote(rid))
        if folder is None:
            return self._error(404, "no such run")
        parts = unquote(rel).split("/")
        if not rel or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            return self._error(403, "not a plain path inside the run folder")
        root = folder.resolve()
        try:
            real = folder.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            return self._error(404, "no such file")
        if root not in real.parents or not real.is_file():
            return self._error(403, "outside the run folder")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)  # no link followed: what was checked above is what is sent
        except OSError:
            return self._error(404, "no such file")
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._error(403, "not a plain file")
            if st.st_size > FILE_LIMIT:
                return self._error(413, f"the file has {st.st_size:,} bytes; at most {FILE_LIMIT:,} are served")
            ctype = mimetypes.guess_type(real.name)[0] or "application/octet-stream"
            if ctype.startswith("text/"):
                ctype += "; charset=utf-8"
            # a run folder's own pages run in a sandbox: an opaque origin that cannot read this server's data
            self._stream(f, st.st_size, ctype, {"Content-Security-Policy": "sandbox allow-scripts"})

    def _stream(self, f, size: int, ctype: str, extra: dict) -> None:
        """Send ``size`` bytes of the open file ``f`` in chunks (never the whole file in memory); a file that shrank
        meanwhile ends the connection early (the client sees a short body, never other bytes)."""
        self.send_response(200)
        for k, v in {"Content-Type": ctype, "Content-Length": str(size), "X-Content-Type-Options": "nosniff",
                     "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", **extra}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        left = size
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                self.close_connection = True
                return
            self.wfile.write(chunk)
            left -= len(chunk)


class DashboardServer(ThreadingHTTPServer):
    """The live dashboard's HTTP server, bound to 127.0.0.1 only."""

    daemon_threads = True

    def __init__(self, paths: list[str | Path], port: int = 0, *, verbose: bool = False):
        discover(paths, allow_empty=True)  # the folders exist (runs may appear in them later)
        self.source = RunsSource(paths)
        self.verbose = verbose
        self.plotly = plotly_js().encode()
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as e:
            raise LossglassError(f"cannot serve on 127.0.0.1:{port} ({e.strerror}); choose another --port") from None
        self.port = self.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.hosts = {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}


def serve(paths: list[str | Path], port: int = 8765, *, open_browser: bool = True, verbose: bool = False) -> None:
    """Serve the live dashboard of ``paths`` until interrupted (Ctrl-C)."""
    server = DashboardServer(paths, port, verbose=verbose)
    print(f"lossglass dashboard: {server.url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        print("lossglass dashboard: stopped", file=sys.stderr)
    finally:
        server.server_close()
