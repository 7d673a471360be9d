"""A fake Hugging Face hub on 127.0.0.1: the requests huggingface_hub makes, answered from memory.

It serves what `huggingface_hub` (2.x) asks a hub for when `HF_ENDPOINT` points at it:
- `GET /api/models/{repo}[/revision/{rev}]`: model info with the commit `sha` and `siblings`;
- `GET /api/models/{repo}/tree/{rev}`: the file listing snapshot_download reads;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: small files answered directly with `ETag`,
  `X-Repo-Commit` and `Content-Length`; weights (`*.safetensors`) like the real hub's LFS files:
  a 302 whose `Location` is another origin (`localhost` instead of `127.0.0.1`, as a CDN would
  be), carrying `X-Linked-Etag` and `X-Linked-Size`; the CDN answers `Range` requests with 206;
- errors as the hub sends them: 401 + `X-Error-Code: RepoNotFound` for an unknown repo, 404 +
  `RevisionNotFound` for an unknown revision, 404 + `EntryNotFound` for an unknown file, and for a
  gated repo, model info but 401 + `GatedRepo` on its files.

Faults for tests: `cut_once[file] = n` closes the connection after `n` bytes of that file's next
download (once); `slow = seconds` sleeps between 64 kB chunks; `trickle = seconds` sends weights
one byte every that many seconds (a stalled hub that never quite stops); `fail[file] = n` answers
the next `n` requests for that file with HTTP 503 (which huggingface_hub retries); a repo's
`info`, when set, is the model-info JSON served instead of the real one (a hub answering JSON of
the wrong shape). Every request is logged in `requests` as `(method, path, headers)`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 * 1024


@dataclass
class Repo:
    """A hub repo: its files at one commit, reachable by that commit's hash or by `branches`."""

    files: dict[str, bytes]
    gated: bool = False
    branches: tuple[str, ...] = ("main",)
    info: object = None  # when not None, the model-info JSON to serve instead of the real one

    @property
    def sha(self) -> str:
        """A 40-hex commit hash that changes with the content, as a git commit would."""
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name])
        return h.hexdigest()

    def knows(self, revision: str) -> bool:
        """Whether `revision` names this repo's commit."""
        return revision in self.branches or revision == self.sha

    @classmethod
    def from_folder(cls, folder: Path, *, gated: bool = False) -> Repo:
        """Every file directly in `folder`, as the repo's content."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        return cls(files, gated=gated)


def _is_lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".h5", ".msgpack"))


def _git_oid(data: bytes) -> str:
    """The git blob id of `data`: what the hub gives as a small file's ETag and tree `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _etag(data: bytes, lfs: bool) -> str:
    # the hub's ETag is the git blob sha1 for small files and the sha256 for LFS files
    return hashlib.sha256(data).hexdigest() if lfs else _git_oid(data)


@dataclass
class FakeHub:
    """The server's state; `start()` serves it on a free port of 127.0.0.1."""

    repos: dict[str, Repo] = field(default_factory=dict)
    cut_once: dict[str, int] = field(default_factory=dict)
    slow: float = 0.0
    trickle: float = 0.0
    fail: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The endpoint to put in HF_ENDPOINT."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn(self) -> str:
        """Where weight downloads are redirected: same server, another origin."""
        assert self._server is not None
        return f"http://localhost:{self._server.server_address[1]}"

    def add(self, repo_id: str, repo: Repo) -> Repo:
        """Serve `repo` as `repo_id`."""
        self.repos[repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        """Serve in a daemon thread until `stop()`."""
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def downloads(self, name: str) -> list[dict[str, str]]:
        """Headers of every GET of file `name` (from the hub or the CDN)."""
        return [h for m, p, h in self.requests if m == "GET" and p.endswith("/" + name)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.state.requests.append(
            (self.command, path, {k.lower(): v for k, v in self.headers.items()})
        )
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2] + "/" + parts[3], parts[4:])
        elif parts[:1] == ["cdn"] and len(parts) == 4:
            self._cdn(parts[1] + "/" + parts[2], parts[3], body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), body)
        else:
            self._send(404, b"not found", body=body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(401, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
        elif not repo.knows(revision):
            self._send(404, b"Invalid rev id", {"X-Error-Code": "RevisionNotFound"}, body)
        else:
            return repo
        return None

    def _api(self, repo_id: str, rest: list[str]) -> None:
        if len(rest) == 2 and rest[0] in ("revision", "tree"):
            revision = rest[1]
        elif not rest:
            revision = "main"
        else:
            self._send(404, b"not found")
            return
        repo = self._repo(repo_id, revision, True)
        if repo is None:
            return
        if rest[:1] == ["tree"]:
            payload: object = [
                {"type": "file", "path": n, "size": len(d), "oid": _git_oid(d)}
                for n, d in sorted(repo.files.items())
            ]
        elif repo.info is not None:
            payload = repo.info
        else:
            payload = {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "siblings": [{"rfilename": n} for n in sorted(repo.files)],
            }
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        commit = {"X-Repo-Commit": repo.sha}
        if self.state.fail.get(name, 0) > 0:
            self.state.fail[name] -= 1
            self._send(503, b"Service unavailable", commit, body)
            return
        if repo.gated:
            message = f"Access to model {repo_id} is restricted. You must be authenticated."
            self._send(401, message.encode(), {"X-Error-Code": "GatedRepo", **commit}, body)
            return
        if name not in repo.files:
            self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", **commit}, body)
            return
        data = repo.files[name]
        if not _is_lfs(name):
            self._send(200, data, {"ETag": f'"{_etag(data, False)}"', **commit}, body)
            return
        headers = {
            "Location": f"{self.state.cdn}/cdn/{repo_id}/{name}",
            "X-Linked-Etag": f'"{_etag(data, True)}"',
            "X-Linked-Size": str(len(data)),
            **commit,
        }
        self._send(302, b"", headers, body)

    def _cdn(self, repo_id: str, name: str, body: bool) -> None:
        repo = self.state.repos.get(repo_id)
        if repo is None or name not in repo.files:
            self._send(404, b"no such object", body=body)
            return
        data, start = repo.files[name], 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[len("bytes=") : -1])
        status = 206 if start else 200
        headers = {"ETag": f'"{_etag(data, True)}"', "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send_head(status, len(data) - start, headers)
        if not body:
            return
        try:
            self._send_body(data, start, self.state.cut_once.pop(name, None))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up: nothing more to send

    def _send_body(self, data: bytes, start: int, cut: int | None) -> None:
        """`data` from `start`, shaped by the faults: cut at `cut`, slow, or trickling."""
        step = 1 if self.state.trickle else CHUNK
        for offset in range(start, len(data), step):
            chunk = data[offset : offset + step]
            if cut is not None and offset + len(chunk) > cut:
                self.wfile.write(data[offset:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the network fails mid-file
                self.close_connection = True
                return
            self.wfile.write(chunk)
            if self.state.slow or self.state.trickle:
                time.sleep(self.state.slow or self.state.trickle)

    def _send(
        self, status: int, data: bytes, headers: dict[str, str] | None = None, body: bool = True
    ) -> None:
        self._send_head(status, len(data), headers or {})
        if body:
            self.wfile.write(data)

    def _send_head(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
