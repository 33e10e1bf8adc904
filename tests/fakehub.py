"""A fake Hugging Face hub on localhost, for tests that download models.

`FakeHub` serves the few routes `huggingface_hub` uses to look at a model repo and fetch its
files, in the shape the real hub answers them (status codes, `X-Error-Code` headers, the CDN
redirect with `X-Repo-Commit` / `X-Linked-Etag` / `X-Linked-Size`):

    GET  /api/models/{repo_id}[/revision/{rev}]      model info (every file listed as LFS)
    HEAD|GET /{repo_id}/resolve/{rev}/{filename}     302 to the CDN copy of the file
    HEAD|GET /cdn/{sha256}                           the bytes, with Range support

The CDN is a second listener on its own port (`hub.cdn_url`): `huggingface_hub` follows a
redirect that stays on the endpoint's origin, and would then miss the resolve headers.

Point `HF_ENDPOINT` at `hub.url` (before `huggingface_hub` is imported: it reads it once) or pass
`endpoint=hub.url`. Faults (`fail`, `fail_download`, `fail_api`, `drop_after`, `stall`, `corrupt`,
`throttle`, `claim_size`) let tests exercise retries, resumes, timeouts, integrity checks and
answers that are not the JSON they should be. `hub.requests` logs every
request; header names in the log are lower-cased.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_DATE = "2024-01-01T00:00:00.000Z"
_INVERT = bytes(range(255, -1, -1))


@dataclass
class RequestLog:
    method: str
    path: str  # the request target as sent, query included
    headers: dict[str, str]  # names lower-cased
    status: int
    range_start: int | None
    body_bytes: int  # grows while a body is being written


@dataclass
class _Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool
    token: str | None


@dataclass
class _Fault:
    kind: str  # fail, fail_bytes, api, drop, stall (used up by `times`); corrupt, throttle,
    # claim, no_range (kept)
    times: int | None
    value: int = 0  # the status, byte count, bytes per second or size
    seconds: float = 0.0
    body: bytes | None = None  # a failure's body, in place of the hub's JSON error


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a bug in the fake: show it


class FakeHub:
    """A local hub with repos added by `add_repo`; starts serving at once, stops on `close`."""

    def __init__(self) -> None:
        self.requests: list[RequestLog] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, tuple[bytes, list[str]]] = {}  # sha256 -> content, file names
        self._faults: list[tuple[str, _Fault]] = []  # (file name, fault), oldest first
        self._servers = [_Server(self), _Server(self)]
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()  # ends stalls and throttled sends early
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        commit: str | None = None,
        gated: bool = False,
        token: str | None = None,
    ) -> str:
        """Add (or replace) a repo; returns its commit sha. A `token` without `gated` makes it
        private. A gated repo's info is public, its files need a token (`token`, or any)."""
        commit = commit or secrets.token_hex(20)
        with self._lock:
            self._repos[repo_id] = _Repo(dict(files), commit, gated, token)
            for name, data in files.items():
                names = self._blobs.setdefault(hashlib.sha256(data).hexdigest(), (data, []))[1]
                names.append(name)
        return commit

    def fail(
        self, filename: str, status: int, *, times: int | None = None, body: bytes | None = None
    ) -> None:
        """The file's next request (its resolve HEAD, or the GET of its bytes) answers `status`;
        `body` (sent as JSON, e.g. malformed) replaces the hub's `{"error": ...}`."""
        self._add(filename, _Fault("fail", times, status, body=body))

    def fail_download(
        self, filename: str, status: int, *, times: int | None = None, body: bytes | None = None
    ) -> None:
        """Like `fail`, for the GET of the file's bytes only: its metadata is answered."""
        self._add(filename, _Fault("fail_bytes", times, status, body=body))

    def fail_api(
        self, repo_id: str, status: int, *, times: int | None = None, body: bytes | None = None
    ) -> None:
        """The repo's model-info call (`/api/models/...`) answers `status`; with `body`, that
        instead of the hub's JSON error (a 200 with malformed JSON: `status=200, body=...`)."""
        self._add(repo_id, _Fault("api", times, status, body=body))

    def drop_after(self, filename: str, nbytes: int, *, times: int | None = 1) -> None:
        self._add(filename, _Fault("drop", times, nbytes))

    def stall(
        self, filename: str, *, after: int = 0, seconds: float = 30.0, times: int | None = None
    ) -> None:
        self._add(filename, _Fault("stall", times, after, seconds))

    def corrupt(self, filename: str) -> None:
        """Serve every byte inverted; the metadata still gives the true sha256 and size."""
        self._add(filename, _Fault("corrupt", None))

    def throttle(self, filename: str, bytes_per_second: int) -> None:
        self._add(filename, _Fault("throttle", None, bytes_per_second))

    def ignore_range(self, filename: str) -> None:
        """Answer every GET with the whole file (200), as a server without Range support does."""
        self._add(filename, _Fault("no_range", None))

    def claim_size(self, filename: str, size: int) -> None:
        """Make the metadata (X-Linked-Size, model info) claim `size`; the body is unchanged."""
        self._add(filename, _Fault("claim", None, size))

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def gets(self, filename: str) -> list[RequestLog]:
        """GET requests for the file's content (its CDN URL); same content, same URL."""
        with self._lock:
            paths = {f"/cdn/{sha}" for sha, (_, names) in self._blobs.items() if filename in names}
            return [r for r in self.requests if r.method == "GET" and r.path in paths]

    def bytes_sent(self, filename: str) -> int:
        return sum(r.body_bytes for r in self.gets(filename))

    def _add(self, filename: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.append((filename, fault))

    def _take(self, names: list[str], *kinds: str) -> _Fault | None:
        """The oldest fault of those kinds for any of the names, using up one of its `times`.
        A fault for "x.gguf" also matches "sub/x.gguf"."""
        with self._lock:
            for key, fault in self._faults:
                if fault.kind in kinds and any(n == key or n.endswith("/" + key) for n in names):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove((key, fault))
                    return fault
        return None

    def _sibling(self, name: str, data: bytes) -> dict[str, Any]:
        claim = self._take([name], "claim")
        size = len(data) if claim is None else claim.value
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        sha = hashlib.sha256(data).hexdigest()
        lfs = {"sha256": sha, "size": size, "pointerSize": 134}
        return {"rfilename": name, "size": size, "blobId": blob, "lfs": lfs}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> FakeHub:
        return cast(_Server, self.server).hub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _other(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply(404, {}, b'{"error":"Not Found"}')

    do_POST = do_PUT = do_DELETE = do_PATCH = _other

    def _start(self, status: int, headers: dict[str, str], length: int) -> RequestLog:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        match = _RANGE.match(self.headers.get("Range", ""))
        headers = {k.lower(): v for k, v in self.headers.items()}
        start = int(match.group(1)) if match else None
        log = RequestLog(self.command, self.path, headers, status, start, 0)
        with self.hub._lock:
            self.hub.requests.append(log)
        return log

    def _reply(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        if body:
            headers = {"Content-Type": "application/json", **headers}
        self._start(status, headers, len(body))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, **extra: str) -> None:
        headers = {"X-Error-Message": message, **extra}
        if code:
            headers["X-Error-Code"] = code
        self._reply(status, headers, json.dumps({"error": message}).encode())

    def _injected(self, fault: _Fault) -> None:
        if fault.body is None:
            return self._error(fault.value, None, f"Injected {fault.value}")
        return self._reply(fault.value, {}, fault.body)

    def _route(self) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        if len(parts) == 2 and parts[0] == "cdn":
            return self._cdn(parts[1])
        api = parts[2:] if parts[:2] == ["api", "models"] else []
        if 1 <= len(api) <= 2:
            return self._model_info("/".join(api), "main")
        if 3 <= len(api) <= 4 and api[-2] == "revision":
            return self._model_info("/".join(api[:-2]), api[-1])
        if "resolve" in parts[1:-2]:
            i = parts.index("resolve", 1)
            return self._resolve("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :]))
        return self._error(404, None, "Not Found")

    def _repo(self, repo_id: str, rev: str, *, files: bool) -> _Repo | None:
        """The repo if this request may see it at that revision; else sends the error."""
        repo = self.hub._repos.get(repo_id)
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if repo is None or (not repo.gated and repo.token not in (None, token)):
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        if files and repo.gated and (token is None or repo.token not in (None, token)):
            message = f"Access to model {repo_id} is restricted. You must be authenticated."
            self._error(401, "GatedRepo", message)
            return None
        return repo

    def _model_info(self, repo_id: str, rev: str) -> None:
        fault = self.hub._take([repo_id], "api")
        if fault is not None:
            return self._injected(fault)
        repo = self._repo(repo_id, rev, files=False)
        if repo is None:
            return
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": repo.token is not None and not repo.gated,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": ["gguf"],
            "library_name": "gguf",
            "lastModified": _DATE,
            "createdAt": _DATE,
            "siblings": [self.hub._sibling(n, d) for n, d in sorted(repo.files.items())],
        }
        return self._reply(200, {}, json.dumps(info).encode())

    def _resolve(self, repo_id: str, rev: str, filename: str) -> None:
        fault = self.hub._take([filename], "fail")
        if fault is not None:
            return self._injected(fault)
        repo = self._repo(repo_id, rev, files=True)
        if repo is None:
            return
        if filename not in repo.files:
            message = f"{filename} does not exist on {rev}"
            return self._error(404, "EntryNotFound", message, **{"X-Repo-Commit": repo.commit})
        sibling = self.hub._sibling(filename, repo.files[filename])
        headers = {
            "Location": f"{self.hub.cdn_url}/cdn/{sibling['lfs']['sha256']}",
            "X-Repo-Commit": repo.commit,
            "X-Linked-Etag": f'"{sibling["lfs"]["sha256"]}"',
            "X-Linked-Size": str(sibling["size"]),
            "ETag": f'"{sibling["blobId"]}"',
        }
        self._reply(302, headers)

    def _cdn(self, sha: str) -> None:
        data, names = self.hub._blobs.get(sha, (b"", []))
        if not names:
            return self._error(404, None, "Not Found")
        fault = self.hub._take(names, "fail", "fail_bytes")
        if fault is not None:
            return self._injected(fault)
        if self.hub._take(names, "corrupt") is not None:
            data = data.translate(_INVERT)
        total, status = len(data), 200
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{sha}"',
            "Accept-Ranges": "bytes",
        }
        match = _RANGE.match(self.headers.get("Range", ""))
        if match and self.hub._take(names, "no_range") is None:
            start = int(match.group(1))
            end = min(int(match.group(2) or total - 1), total - 1)
            if start >= total or start > end:
                return self._reply(416, {"Content-Range": f"bytes */{total}"})
            status, data = 206, data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        log = self._start(status, headers, len(data))
        if self.command == "HEAD":
            return None
        throttle = self.hub._take(names, "throttle")
        cut = self.hub._take(names, "drop", "stall")
        self._send_body(data, log, cut, throttle.value if throttle else None)
        return None

    def _send_body(self, body: bytes, log: RequestLog, cut: _Fault | None, bps: int | None) -> None:
        """Write the body, slowly if `bps`; with `cut`, only its first bytes, then hang up."""
        view = memoryview(body)
        limit = len(body) if cut is None else min(cut.value, len(body))
        chunk = max(1, bps // 20) if bps else 1 << 16
        try:
            while log.body_bytes < limit and not self.hub._stop.is_set():
                piece = view[log.body_bytes : log.body_bytes + min(chunk, limit - log.body_bytes)]
                self.wfile.write(piece)
                log.body_bytes += len(piece)
                if bps:
                    self.hub._stop.wait(len(piece) / bps)
            if cut is not None:
                self.hub._stop.wait(cut.seconds)
            if cut is not None or log.body_bytes < len(body):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees a short body
        except OSError:  # the client went away
            self.close_connection = True


def write_user_entry(
    key: str,
    repo: str,
    *,
    model: tuple[str, bytes] | None = None,
    mmproj: tuple[str, bytes] | None = None,
    model_sha: str | None = None,
    mmproj_size: bool = True,
    revision: str = "main",
    chat_format: str = "gguf",
    aliases: tuple[str, ...] = (),
) -> None:
    """A user models.toml ($LLAVA_HOME) with one entry for a served repo: pinned like the
    shipped ones when ``model``/``mmproj`` (file name, bytes) are given (``model_sha`` pins a
    wrong digest on purpose), else leaving the files to the repo's listing."""
    import os
    from pathlib import Path

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    lines = [
        f"[models.{key}]",
        'name = "Colour oracle"',
        *([f"aliases = {json.dumps(list(aliases))}"] if aliases else []),
        'description = "Answers with the colour of the image."',
        f'repo = "{repo}"',
        f'revision = "{revision}"',
        'license = "mit"',
        'parameters = "1M"',
        "context_length = 512",
        f'chat_format = "{chat_format}"',
        'default_quant = "F16"',
    ]
    if model is not None:
        name, data = model
        lines += [f"[models.{key}.quants.F16]", f'file = "{name}"', f"size = {len(data)}",
                  f'sha256 = "{model_sha or sha(data)}"']  # fmt: skip
    if mmproj is not None:
        name, data = mmproj
        size = [f"size = {len(data)}"] if mmproj_size else []
        lines += [f"[models.{key}.mmproj]", f'file = "{name}"', *size, f'sha256 = "{sha(data)}"']
    home = Path(os.environ["LLAVA_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text("\n".join(lines) + "\n")
