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
- ``GET /api/models/{owner}/{repo}[/revision/{revision}]``: repo info (``HfApi.repo_info``; the
  client asks for it when a commit would change nothing, and in ``create_repo`` after a 401/403).

Upload routes (``HfApi.create_repo`` + ``HfApi.upload_folder`` with ``HF_HUB_DISABLE_XET=1``, i.e.
the legacy LFS path of ``create_commit``). When ``token`` is set, each of them except the
upload URL (which stands in for a pre-signed S3 URL) wants ``Authorization: Bearer <token>``,
else 401.

- ``POST /api/repos/create`` ``{"name", "organization", "type", "visibility"?}``: 200 ``{"url"}``;
  409 ``{"error", "url"}`` if the repo exists (with ``exist_ok=True`` the client takes that as
  success and reads ``url``).
- ``POST /api/validate-yaml`` ``{"content", "repoType"}``: README.md front matter check; 400
  ``{"errors"}`` when the ``---`` block is not closed.
- ``POST /api/models/{owner}/{repo}/preupload/{revision}`` ``{"files": [{"path", "sample", "size"}]}``:
  ``{"files": [{"path", "uploadMode": "lfs"|"regular", "shouldIgnore", "oid"}]}``; weights
  suffixes and files over 10 MiB are LFS; ``oid`` is the file's current oid on the branch
  (sha256 for LFS, git blob sha1 otherwise) so the client can skip unchanged files.
- ``POST /{owner}/{repo}.git/info/lfs/objects/batch`` (git-lfs batch API, ``operation: upload``):
  per object either no ``actions`` (already stored in this repo) or ``actions.upload.href`` (the
  PUT URL below) and ``actions.verify.href``.
- ``PUT /api/_loopback/lfs-upload/{owner}/{repo}/{sha256}``: the object's bytes (Content-Length
  body); 400 if their sha256 or size differ from what the batch announced, 403 if the batch
  did not announce it.
- ``POST /{owner}/{repo}.git/info/lfs/objects/verify`` ``{"oid", "size"}``: 200 if stored, else 404.
- ``POST /api/models/{owner}/{repo}/commit/{revision}`` (NDJSON: a ``header`` line, then ``file``
  (base64), ``lfsFile`` (oid of an object uploaded to this repo), ``deletedFile``,
  ``deletedFolder`` lines): applies them to the branch head (an empty repo's ``main`` starts
  empty) and answers ``{"commitOid", "commitUrl"}``. 412 if ``parentCommit`` is not the head.
  Committed files are then served by the download routes above.

Faults, per path in repo: ``"500"`` (every resolve answers 500), ``"truncate"``
(the blob's first GET sends half the bytes, then drops the connection; later GETs answer 500,
so the client's resume attempts fail fast), ``"hang"`` (every resolve request is read and never
answered, as from an endpoint that has stopped responding; the connection is dropped when the
server stops) and ``"norange"`` (every blob GET ignores ``Range``, promises the whole file with
200, sends half of it and drops the connection: a client that restarts on an ignored Range
never finishes). Per upload route, ``route_faults[name] = status``
makes that route answer ``status``; names: ``create``, ``preupload``, ``lfs-batch``,
``lfs-upload``, ``lfs-verify``, ``commit``.

It binds 127.0.0.1 only, serves at most ``max_requests`` requests, reads request bodies of
at most ``max_body`` bytes (413 beyond), and shuts itself down after ``lifetime`` seconds
even if a test forgets to stop it.

Run as a script (``python tests/_hub_server.py``) it is a worker: it reads JSON commands
from stdin, one per line, and answers one JSON line each. Tests start it with HF_ENDPOINT /
HF_HOME / HF_HUB_OFFLINE in its environment, because huggingface_hub reads those once at import.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
LFS_MIN_SIZE = 10 * 2**20  # the Hub stores bigger files in LFS whatever their name
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

    def __init__(self, lifetime: float = 120.0, max_requests: int = 400, *, token: str | None = None,
                 user: str = "me", max_body: int = 256 * 2**20):
        # repo_id -> {"refs": {name: commit}, "commits": {commit: {path: bytes}},
        #             "private": bool, "lfs": {sha256 uploaded to this repo}}
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes
        self.faults: dict[str, str] = {}  # path in repo -> "500" | "truncate"
        self.route_faults: dict[str, int] = {}  # upload route name -> HTTP status to answer
        self.token, self.user, self.max_body = token, user, max_body
        # One entry per commit received through the API: repo, revision, summary, {path: op key}.
        self.commit_log: list[dict] = []
        self._announced: dict[tuple[str, str], int] = {}  # (repo_id, sha256) -> size, from the LFS batch
        self._truncated: set[str] = set()
        self._stopping = threading.Event()  # releases "hang" handlers on stop()
        self.requests: list[tuple[str, str]] = []
        self.lifetime, self.max_requests = lifetime, max_requests
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None
        self._conns: set = set()  # open client sockets, closed on stop() (keep-alive would outlive it)

    # -- content ---------------------------------------------------------
    def create_repo(self, repo_id: str, private: bool = False) -> dict:
        return self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "private": private, "lfs": set()})

    def add_commit(self, repo_id: str, files: dict[str, bytes], branch: str = "main", tags: tuple = (),
                   parent: str | None = None) -> str:
        """Add a commit holding exactly ``files``; move ``branch`` (and tags) to it. Returns its sha."""
        h = hashlib.sha1(repo_id.encode())
        if parent:
            h.update(parent.encode())
        for p in sorted(files):
            h.update(p.encode() + hashlib.sha256(files[p]).digest())
        repo = self.create_repo(repo_id)
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

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
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


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client hanging up (the truncation faults, a client giving up, stop() closing
        # kept-alive sockets) is part of the tests; socketserver would print its traceback from
        # the handler thread, after the test that caused it, into whichever test's output is
        # open then. Anything else is printed as socketserver prints it.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


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

    def do_POST(self) -> None:
        self._route_write()

    def do_PUT(self) -> None:
        self._route_write()

    def _route(self) -> None:
        if not self._count():
            return
        parts = urlsplit(self.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", parts.path)
        if m:
            return self._revision_info(unquote(m.group(1)), unquote(m.group(2) or "main"))
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

    def _revision_info(self, repo_id: str, revision: str) -> None:
        repo, commit, err = self.owner.lookup(repo_id, revision)
        if err:
            return self._send(404, {"X-Error-Code": err})
        files = repo["commits"][commit]
        body = json.dumps({
            "id": repo_id, "sha": commit, "private": bool(repo.get("private")),
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }).encode()
        self._send(200, {"Content-Type": "application/json"}, body)

    # -- upload side -------------------------------------------------------
    def _read_body(self) -> bytes | None:
        """The request body, or None when it is chunked (the client sends Content-Length) or over ``max_body``."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        n = int(self.headers.get("Content-Length") or 0)
        return None if n > self.owner.max_body else self.rfile.read(n)

    def _json(self, status: int, obj, content_type: str = "application/json", headers: dict | None = None) -> None:
        self._send(status, {"Content-Type": content_type, **(headers or {})}, json.dumps(obj).encode())

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers=headers)

    def _route_write(self) -> None:
        if not self._count():
            self.close_connection = True  # the unread body must not be taken for the next request
            return
        body = self._read_body()
        if body is None:
            self.close_connection = True
            return self._error(413, f"request body chunked or over the loopback hub's limit ({self.owner.max_body} bytes)")
        path = urlsplit(self.path).path
        routes = [
            ("POST", r"/api/repos/create", "create", self._create_repo),
            ("POST", r"/api/validate-yaml", "validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", "preupload", self._preupload),
            ("POST", r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", "commit", self._commit),
            ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs-batch", self._lfs_batch),
            ("POST", r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", "lfs-verify", self._lfs_verify),
            ("PUT", r"/api/_loopback/lfs-upload/([^/]+/[^/]+)/([0-9a-f]{64})", "lfs-upload", self._lfs_put),
        ]
        for method, pattern, name, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and method == self.command:
                status = self.owner.route_faults.get(name)
                if status:
                    return self._error(status, f"{name} failed (injected)")
                # The upload URL stands in for a pre-signed storage URL: no Hub token there.
                token = self.owner.token
                if token and name != "lfs-upload" and self.headers.get("Authorization") != f"Bearer {token}":
                    return self._error(401, "Invalid credentials in Authorization header")
                try:
                    return fn(body, *(unquote(g) for g in m.groups()))
                except (ValueError, KeyError, TypeError) as exc:  # malformed request body
                    return self._error(400, f"bad request to {name}: {type(exc).__name__}: {exc}")
        self._error(404, "no such route")

    def _repo_or_404(self, repo_id: str):
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository Not Found for url: {self.path}", "RepoNotFound")
        return repo

    def _head(self, repo: dict, revision: str) -> tuple[dict[str, bytes] | None, str | None]:
        """Files and commit at a branch head; an empty repo's ``main`` is empty. (None, None) if unknown."""
        commit = repo["refs"].get(revision)
        if commit is not None:
            return repo["commits"][commit], commit
        if revision == "main" and not repo["refs"]:
            return {}, None
        return None, None

    def _create_repo(self, body: bytes) -> None:
        hub = self.owner
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            return self._error(400, "the loopback hub only has model repos")
        name, org = payload["name"], payload.get("organization") or hub.user
        if not re.fullmatch(r"[\w.-]+", name) or not re.fullmatch(r"[\w.-]+", org):
            return self._error(400, f"invalid repo name {org}/{name}")
        repo_id = f"{org}/{name}"
        with hub._lock:
            exists = repo_id in hub.repos
            if not exists:
                hub.create_repo(repo_id, private=payload.get("visibility") == "private")
        if exists:
            # With exist_ok=True the client reads the repo URL from this 409 answer.
            msg = "You already created this model repo"
            return self._json(409, {"error": msg, "url": f"{hub.url}/{repo_id}"}, headers={"X-Error-Message": msg})
        self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(l.strip() == "---" for l in lines[1:]):
            return self._json(400, {"errors": [{"message": "metadata block is not closed by '---'"}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        files, _ = self._head(repo, revision)
        if files is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        out = []
        for f in json.loads(body)["files"]:
            path, size = f["path"], int(f["size"])
            base64.b64decode(f["sample"], validate=True)
            lfs = path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE
            old = files.get(path)
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(old) + old).hexdigest()
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": None})

    def _lfs_batch(self, body: bytes, repo_id: str) -> None:
        hub = self.owner
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            return self._error(400, "the loopback hub's LFS batch endpoint only takes uploads")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                raise ValueError(f"oid {oid!r} is not a sha256")
            entry = {"oid": oid, "size": size}
            if oid not in repo["lfs"]:
                with hub._lock:
                    hub._announced[(repo_id, oid)] = size
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/api/_loopback/lfs-upload/{repo_id}/{oid}"},
                    "verify": {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, body: bytes, repo_id: str, oid: str) -> None:
        hub = self.owner
        size = hub._announced.get((repo_id, oid))
        if size is None:
            return self._error(403, "upload URL not issued by the LFS batch endpoint")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"uploaded object does not match oid {oid} / size {size}")
        with hub._lock:
            hub.blobs[oid] = body
            hub.repos[repo_id]["lfs"].add(oid)
        self._send(200)

    def _lfs_verify(self, body: bytes, repo_id: str) -> None:
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        obj = json.loads(body)
        oid = obj["oid"]
        if oid in repo["lfs"] and len(self.owner.blobs[oid]) == int(obj["size"]):
            return self._json(200, {})
        self._error(404, f"LFS object {oid} not found")

    def _commit(self, body: bytes, repo_id: str, revision: str) -> None:
        hub = self.owner
        if "create_pr" in urlsplit(self.path).query:
            return self._error(400, "pull requests are not supported by the loopback hub")
        repo = self._repo_or_404(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        with hub._lock:
            files, head = self._head(repo, revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if header.get("parentCommit") not in (None, head):
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(files)
            ops = {}
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise ValueError("file content must be base64")
                    files[path] = base64.b64decode(value["content"], validate=True)
                elif key == "lfsFile":
                    oid = value["oid"]
                    if value.get("algo", "sha256") != "sha256" or oid not in repo["lfs"]:
                        return self._error(422, f"LFS object {oid} for {path!r} was not uploaded to {repo_id}")
                    if "size" in value and int(value["size"]) != len(hub.blobs[oid]):
                        return self._error(422, f"size of {path!r} does not match LFS object {oid}")
                    files[path] = hub.blobs[oid]
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(prefix)}
                else:
                    raise ValueError(f"unknown commit operation {key!r}")
                ops[path] = key
            commit = hub.add_commit(repo_id, files, branch=revision, parent=head)
            hub.commit_log.append({"repo": repo_id, "revision": revision, "commit": commit,
                                   "summary": header.get("summary", ""), "ops": ops})
        self._json(200, {"success": True, "commitOid": commit, "commitUrl": f"{hub.url}/{repo_id}/commit/{commit}",
                         "hookOutput": ""})

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
        if hub.faults.get(filename) == "hang":
            hub._stopping.wait(hub.lifetime)
            self.close_connection = True
            return
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

    def _send_half(self, data: bytes, sha: str, commit: str) -> None:
        """Promise the whole file (200, full Content-Length), send half, drop the connection."""
        self.send_response(200)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _blob(self, repo_id: str, commit: str, filename: str) -> None:
        hub = self.owner
        repo, commit, err = hub.lookup(repo_id, commit)
        data = None if err else repo["commits"][commit].get(filename)
        if data is None:
            return self._send(404, {"X-Error-Code": err or "EntryNotFound"})
        sha = hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{sha}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if self.command == "GET" and hub.faults.get(filename) == "norange":
            # Range ignored: the whole file promised, half of it sent, the connection dropped.
            return self._send_half(data, sha, commit)
        if self.command == "GET" and sha in hub._truncated:
            if "Range" in self.headers or hub._truncated_sent(sha):
                return self._send(500, {"X-Error-Message": "storage error after dropped connection (injected)"})
            # Promise the whole file, send half, drop the connection.
            return self._send_half(data, sha, commit)
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

    def __init__(self, endpoint: str, hf_home: str | os.PathLike, offline: bool = False, timeout: float = 60.0,
                 token: str | None = None):
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
        if token:
            env["HF_TOKEN"] = token
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

    # Answers go to the real stdout; anything a library prints goes to stderr instead.
    answers, sys.stdout = sys.stdout, sys.stderr

    # The client retries 5xx and connection errors with 1-8 s back-off (about 23 s per
    # failing file). The requests still happen; only the waiting is skipped, to keep CI fast.
    http.time = _NoSleep()
    fd.time = _NoSleep()

    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "load":
                # "env": variables set for this call only (e.g. SAM_DROP_IN_DOWNLOAD_TIMEOUT).
                saved = {k: os.environ.get(k) for k in cmd.get("env", {})}
                os.environ.update(cmd.get("env", {}))
                start = time.monotonic()
                try:
                    kwargs = {"download_timeout": cmd["download_timeout"]} if "download_timeout" in cmd else {}
                    sd = checkpoint.load_state_dict(cmd["source"], model_type=cmd.get("model_type"), **kwargs)
                    out = {"ok": True, "n": len(sd), "digest": state_digest(sd)}
                except Exception as exc:
                    out = {"ok": False, "types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
                if not out["ok"]:
                    out["seconds"] = time.monotonic() - start  # how long the failure took
            elif op == "build":
                from sam_drop_in.build_sam import sam_model_registry

                model = sam_model_registry[cmd["model_type"]](checkpoint=cmd["checkpoint"])
                sd = model.state_dict()
                out = {"ok": True, "n": len(sd), "digest": state_digest(sd)}
            elif op == "convert":
                path = checkpoint.convert(cmd["src"], cmd["dst"], cmd.get("model_type"),
                                          push_to_hub=cmd.get("push_to_hub"), private=cmd.get("private"))
                out = {"ok": True, "path": str(path)}
            elif op == "cli":
                import contextlib
                import io

                from sam_drop_in import cli

                o, e = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
                    rc = cli.main(cmd["argv"])
                out = {"ok": True, "rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue()}
            elif op == "cached":
                from huggingface_hub import try_to_load_from_cache

                p = try_to_load_from_cache(cmd["repo"], cmd["file"], revision=cmd.get("revision"))
                out = {"ok": True, "cached": isinstance(p, str) and os.path.isfile(p)}
            else:
                out = {"ok": False, "types": [], "message": f"unknown op {op}"}
        except Exception as exc:  # report any failure back to the test
            out = {"ok": False, "types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
        answers.write(json.dumps(out) + "\n")
        answers.flush()


if __name__ == "__main__":
    _worker_main()
