"""A loopback stand-in for the Hugging Face Hub, and a worker process that talks to it.

The server answers the routes the real ``huggingface_hub`` client (2.x, httpx-based)
calls to download files and list a repo:

- ``HEAD|GET /{owner}/{repo}/resolve/{revision}/{path}``
  small files: 200 with ``ETag`` (git blob sha1), ``X-Repo-Commit``, ``Content-Length``;
  weights (LFS) files: 302 to ``/api/resolve-cache/models/{owner}/{repo}/{commit}/{path}`` with
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; unknown repo /
  revision / file: 404 with ``X-Error-Code`` ``RepoNotFound`` / ``RevisionNotFound`` /
  ``EntryNotFound``.
- ``HEAD|GET /api/resolve-cache/models/{owner}/{repo}/{commit}/{path}``: the file, with
  ``X-Repo-Commit``, ``ETag`` (sha256) and ``Content-Length``, honouring ``Range: bytes=N-``
  (206). The client follows this same-host redirect for its metadata HEAD and downloads from it.
- ``GET /api/models/{owner}/{repo}/tree/{revision}``: JSON list of files (``HfApi.list_repo_files``).

Faults, per path in repo: ``"500"`` (every resolve answers 500) and ``"truncate"``
(the blob's first GET sends half the bytes, then drops the connection; later GETs answer 500,
so the client's resume attempts fail fast).

It binds 127.0.0.1 only, serves at most ``max_requests`` requests and shuts itself down
after ``lifetime`` seconds even if a test forgets to stop it.

Run as a script (``python tests/_hub_server.py``) it is a worker: it reads JSON commands
from stdin, one per line, and answers one JSON line each. Tests start it with HF_ENDPOINT /
HF_HOME / HF_HUB_OFFLINE in its environment, because huggingface_hub reads those once at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
REPO_ROOT = Path(__file__).resolve().parents[1]


def state_digest(sd) -> str:
    """sha256 over sorted names, dtypes, shapes and bytes of a state dict."""
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


class FakeHub:
    """Repos, commits and blobs served over HTTP on 127.0.0.1."""

    def __init__(self, lifetime: float = 120.0, max_requests: int = 400):
        self.repos: dict[str, dict] = {}  # repo_id -> {"refs": {name: commit}, "commits": {commit: {path: bytes}}}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self.faults: dict[str, str] = {}  # path in repo -> "500" | "truncate"
        self._truncated: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.lifetime, self.max_requests = lifetime, max_requests
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None
        self._conns: set = set()  # open client sockets, closed on stop() (keep-alive would outlive it)

    # -- content ---------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", tags: tuple = ()) -> str:
        """Add a commit holding exactly ``files``; move ``branch`` (and tags) to it. Returns its sha."""
        h = hashlib.sha1(repo_id.encode())
        for p in sorted(files):
            h.update(p.encode() + hashlib.sha256(files[p]).digest())
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        commit = h.hexdigest()
        repo["commits"][commit] = dict(files)
        for ref in (branch, *tags):
            repo["refs"][ref] = commit
        for data in files.values():
            self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    # -- lifecycle -------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            if self._timer is not None:
                self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        import socket

        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- lookup ----------------------------------------------------------
    def lookup(self, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            return None, None, "RepoNotFound"
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            return repo, None, "RevisionNotFound"
        return repo, commit, None


class _Handler(BaseHTTPRequestHandler):
    owner: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, headers: dict | None = None, body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _count(self) -> bool:
        hub = self.owner
        with hub._lock:
            hub.requests.append((self.command, self.path))
            over = len(hub.requests) > hub.max_requests
        if over:
            self._send(503, {"X-Error-Message": "loopback hub request limit reached"})
            threading.Thread(target=hub.stop, daemon=True).start()
        return not over

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        if not self._count():
            return
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", parts.path)
        if m:
            return self._tree(unquote(m.group(1)), unquote(m.group(2)))
        m = re.fullmatch(r"/api/resolve-cache/models/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", parts.path)
        if m:
            return self._blob(unquote(m.group(1)), m.group(2), unquote(m.group(3)))
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", parts.path)
        if m:
            return self._resolve(unquote(m.group(1)), unquote(m.group(2)), unquote(m.group(3)))
        self._send(404, {"X-Error-Message": "no such route"})

    def _tree(self, repo_id: str, revision: str) -> None:
        repo, commit, err = self.owner.lookup(repo_id, revision)
        if err:
            return self._send(404, {"X-Error-Code": err})
        files = repo["commits"][commit]
        body = json.dumps([
            {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
            for p, d in sorted(files.items())
        ]).encode()
        self._send(200, {"Content-Type": "application/json"}, body)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        hub = self.owner
        repo, commit, err = hub.lookup(repo_id, revision)
        if err:
            return self._send(404, {"X-Error-Code": err, "X-Error-Message": err})
        if hub.faults.get(filename) == "500":
            return self._send(500, {"X-Error-Message": "internal error (injected)"})
        data = repo["commits"][commit].get(filename)
        if data is None:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        if filename.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            if hub.faults.get(filename) == "truncate":
                hub.faults.pop(filename)
                hub._truncated.add(sha)
            return self._send(302, {
                "Location": f"/api/resolve-cache/models/{repo_id}/{commit}/{quote(filename)}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": len(data),
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            })
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": commit}
        self._send(200, headers, data)

    def _blob(self, repo_id: str, commit: str, filename: str) -> None:
        hub = self.owner
        repo, commit, err = hub.lookup(repo_id, commit)
        data = None if err else repo["commits"][commit].get(filename)
        if data is None:
            return self._send(404, {"X-Error-Code": err or "EntryNotFound"})
        sha = hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{sha}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if self.command == "GET" and sha in hub._truncated:
            if "Range" in self.headers or hub._truncated_sent(sha):
                return self._send(500, {"X-Error-Message": "storage error after dropped connection (injected)"})
            # Promise the whole file, send half, drop the connection.
            self.send_response(200)
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, headers, data[start:end + 1])
        self._send(200, headers, data)


def _truncated_sent(self: FakeHub, sha: str) -> bool:
    key = "_sent_" + sha
    with self._lock:
        sent = getattr(self, key, False)
        setattr(self, key, True)
    return sent


FakeHub._truncated_sent = _truncated_sent  # type: ignore[attr-defined]


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A Python subprocess with its own HF_* environment that loads checkpoints on request."""

    def __init__(self, endpoint: str, hf_home: str | os.PathLike, offline: bool = False, timeout: float = 60.0):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update({
            "HF_ENDPOINT": endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HUB_DOWNLOAD_TIMEOUT": "5",
            "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1",
        })
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        self.timeout = timeout
        self.hf_home = str(hf_home)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, cwd=str(REPO_ROOT), text=True,
        )

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(self.timeout)
        if not result or not result[0]:
            self.close()
            raise RuntimeError(f"worker gave no answer to {cmd}")
        return json.loads(result[0])

    def close(self) -> None:
        # The worker holds no state worth a clean exit; killing it avoids torch's slow teardown.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class _NoSleep:
    """Stands in for the ``time`` module inside huggingface_hub's HTTP helpers."""

    def __getattr__(self, name):
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(_seconds: float) -> None:
        pass


def _worker_main() -> None:
    import huggingface_hub.file_download as fd
    import huggingface_hub.utils._http as http

    from sam_drop_in import checkpoint

    # The client retries 5xx and connection errors with 1-8 s back-off (about 23 s per
    # failing file). The requests still happen; only the waiting is skipped, to keep CI fast.
    http.time = _NoSleep()
    fd.time = _NoSleep()

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "load":
                sd = checkpoint.load_state_dict(cmd["source"], model_type=cmd.get("model_type"))
                out = {"ok": True, "n": len(sd), "digest": state_digest(sd)}
            elif op == "cached":
                from huggingface_hub import try_to_load_from_cache

                p = try_to_load_from_cache(cmd["repo"], cmd["file"], revision=cmd.get("revision"))
                out = {"ok": True, "cached": isinstance(p, str) and os.path.isfile(p)}
            else:
                out = {"ok": False, "types": [], "message": f"unknown op {op}"}
        except Exception as exc:  # report any failure back to the test
            out = {"ok": False, "types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _worker_main()
