"""Hugging Face Hub access for checkpoints: ``hf://`` parsing, cached downloads, clear errors.

huggingface_hub is imported inside the functions that need it (it costs most of a second).
A file already in its cache for the requested revision is used without any network request;
to pick up a newer upload to a branch, pin the new revision or delete the cached entry.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import unquote

from ._constants import MODEL_TYPES
from ._errors import CheckpointError, CheckpointNotFoundError
from ._fileio import read_json_object, sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# Overall limit for one hf:// fetch (every request, retry and byte of it), in seconds.
DOWNLOAD_TIMEOUT_ENV = "SAM_DROP_IN_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 1800.0  # 30 min: vit_h's 2.5 GB at 1.4 MB/s
# A server that has not answered a single request after this long is not going to: fail early
# instead of waiting for the whole deadline (huggingface_hub alone retries for minutes).
NO_ANSWER_LIMIT = 60.0
# huggingface_hub restarts a download from byte 0 when a resume request (Range) is answered
# with the whole file; a server that does that and keeps cutting bodies short would make it
# restart forever. Give up after this many ignored Range requests in one fetch.
MAX_RANGE_IGNORED = 3

# Hub naming rules (the Hub's own, as huggingface_hub validates them): ASCII letters, digits,
# '-', '_', '.'; at most 96 characters; no leading/trailing '-' or '.'; no '--' or '..'.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class HfLocation:
    """A parsed ``hf://OWNER/REPO[@REVISION][/PATH]`` address."""

    repo_id: str
    revision: str | None
    path: str | None


def is_hf_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith("hf://")


_FORM = "expected hf://OWNER/REPO[@REVISION][/PATH/IN/REPO], e.g. hf://facebook/sam-vit-base/model.safetensors"


def _name_problem(name: str, what: str) -> str | None:
    """Why ``name`` is not a valid Hub owner or repo name, or None."""
    if not name:
        return f"the {what} name is empty"
    if len(name) > 96:
        return f"the {what} name is {len(name)} characters long (at most 96)"
    if "--" in name or ".." in name:
        return f"the {what} name {name!r} contains '--' or '..'"
    if not _NAME.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if bad:
            return f"the {what} name {name!r} contains {', '.join(map(repr, bad))}; only letters, digits, '-', '_' and '.' are allowed"
        return f"the {what} name {name!r} starts or ends with '-' or '.'"
    if what == "repo" and name.endswith(".git"):
        return f"the repo name {name!r} ends with '.git'"
    return None


def _revision_problem(revision: str) -> str | None:
    """Why ``revision`` (URL-decoded) cannot be a branch, tag or commit, or None (git's ref rules)."""
    if not revision:
        return "the revision after '@' is empty"
    bad = sorted({c for c in revision if c in "@~^:?*[\\" or c.isspace() or not c.isprintable()})
    if bad:
        return f"the revision {revision!r} contains {', '.join(map(repr, bad))}, which no branch, tag or commit has"
    if ".." in revision or "//" in revision or revision.startswith(("/", ".")) or revision.endswith(("/", ".", ".lock")):
        return f"the revision {revision!r} is not a valid branch, tag or commit name"
    return None


def parse_hf_uri(uri: str) -> HfLocation:
    """Split an ``hf://`` address into repo id, revision and path.

    Follows huggingface_hub's HfFileSystem convention: ``hf://OWNER/REPO@REV/PATH``,
    with a revision that contains ``/`` (``refs/pr/1``) URL-encoded (``refs%2Fpr%2F1``).
    Only model repos are supported (an optional leading ``models/`` is accepted). The
    address is checked against the Hub's naming rules before anything is requested.

    Arguments:
      uri (str): the address.

    Returns:
      (HfLocation): repo_id "OWNER/REPO", revision (str | None), path in repo (str | None).

    Raises:
      ValueError: the address is malformed (the message says which part and why) or names a
        dataset/space repo.
    """
    if not uri.startswith("hf://"):
        raise ValueError(f"not an hf:// address: {uri!r}")

    def bad(why: str) -> ValueError:
        return ValueError(f"malformed Hub address {uri!r}: {why}; {_FORM}")

    rest = uri[len("hf://"):]
    if rest != rest.strip():
        raise bad("it starts or ends with whitespace")
    if any(not c.isprintable() for c in rest):
        raise bad("it contains a control character (newline, tab, NUL, ...)")
    if "\\" in rest:
        raise bad("it contains a backslash; separate the parts with '/'")
    if rest.endswith("/"):
        rest = rest[:-1]  # a trailing slash after a repo or folder name is harmless
    parts = rest.split("/")
    if not rest or len(parts) < 2:
        raise bad("it names no OWNER/REPO")
    if "" in parts:
        raise bad("it contains an empty part ('//' or a leading '/')")
    if parts[0] in ("datasets", "spaces"):
        raise ValueError(
            f"{uri!r} names a {parts[0][:-1]} repo; checkpoints are loaded from model repos "
            "(hf://OWNER/REPO[@REVISION]/FILE)"
        )
    if parts[0] == "models":
        parts = parts[1:]
        if len(parts) < 2:
            raise bad("it names no OWNER/REPO after 'models/'")
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
        why = _revision_problem(revision)
        if why:
            raise bad(why)
    if "@" in owner:
        raise bad("'@REVISION' belongs after the repo name, not the owner")
    for name, what in ((owner, "owner"), (repo, "repo")):
        why = _name_problem(name, what)
        if why:
            raise bad(why)
    rel = parts[2:]
    if any(p in (".", "..") for p in rel):
        raise bad("the path in the repo contains a '.' or '..' part; name the file by its path from the repo root")
    return HfLocation(f"{owner}/{repo}", revision, "/".join(rel) or None)


def _hf_constants():
    # Read at each call: huggingface_hub reads its environment variables (endpoint, cache,
    # offline mode) into this module, and tests change them.
    from huggingface_hub import constants

    return constants


def _offline() -> bool:
    return bool(_hf_constants().is_offline_mode())


def _where(loc_repo: str, filename: str, revision: str | None) -> str:
    return f"'{filename}' in repo '{loc_repo}' at revision '{revision or 'main'}'"


def _hub_error(exc: BaseException, repo_id: str, filename: str | None, revision: str | None) -> CheckpointError:
    """Turn a huggingface_hub / network exception into our error (CheckpointNotFoundError for what
    does not exist, CheckpointError for the rest), with a message that says what to do."""
    from huggingface_hub import errors as hf_errors

    what = _where(repo_id, filename, revision) if filename else f"repo '{repo_id}' at revision '{revision or 'main'}'"
    endpoint, cache = _hf_constants().ENDPOINT, _hf_constants().HF_HUB_CACHE
    local_hint = "or download the file yourself and pass its local path as checkpoint="
    if isinstance(exc, hf_errors.HFValidationError) or (type(exc) is ValueError and "filename" in str(exc)):
        # parse_hf_uri applies the Hub's rules first; this is a rule huggingface_hub added since.
        return CheckpointError(f"huggingface_hub refused the address of {what}: {exc}; correct the hf:// address")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return CheckpointNotFoundError(
            f"Hub repository '{repo_id}' was not found at {endpoint} (if it is private or gated, log in with "
            "`hf auth login` or set HF_TOKEN)"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return CheckpointNotFoundError(f"revision '{revision}' does not exist in Hub repo '{repo_id}' ({endpoint})")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        cause = exc.__cause__
        if _offline():
            return CheckpointNotFoundError(
                f"HF_HUB_OFFLINE is set and {what} is not in the local cache ({cache}); "
                f"load it once with network access, {local_hint}"
            )
        if isinstance(cause, hf_errors.HfHubHTTPError) and cause.response is not None:
            return CheckpointError(
                f"the Hub at {endpoint} answered HTTP {cause.response.status_code} for {what}, and the file is not "
                f"in the local cache ({cache}); try again later, {local_hint}"
            )
        return CheckpointError(
            f"could not reach the Hub at {endpoint} ({type(cause).__name__ if cause else 'no connection'}) "
            f"and {what} is not in the local cache ({cache}); check the connection, set HF_HUB_OFFLINE=1 "
            f"to use files cached earlier, {local_hint}"
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return CheckpointNotFoundError(f"file not found: {what} ({endpoint})")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "error"
        return CheckpointError(
            f"the Hub at {endpoint} answered HTTP {status} while downloading {what}; nothing was added to the "
            f"cache; try again later, {local_hint}"
        )
    # Consistency-check OSError from http_get, or the connection dropping mid-transfer.
    return CheckpointError(
        f"the download of {what} from {endpoint} did not complete ({type(exc).__name__}: {exc}); "
        f"the partial file was not accepted into the cache; try again, {local_hint}"
    )


def download_timeout(value: float | None = None) -> float:
    """The overall limit, in seconds, for one ``hf://`` fetch.

    Arguments:
      value (float | None): the caller's limit; None reads ``SAM_DROP_IN_DOWNLOAD_TIMEOUT``,
        and without it the default (:data:`DEFAULT_DOWNLOAD_TIMEOUT`, 1800 s).

    Returns:
      (float): seconds, > 0 (``inf`` means no limit).

    Raises:
      CheckpointError: the value (argument or environment variable) is not a positive number.
    """
    origin = "download_timeout"
    if value is None:
        raw = os.environ.get(DOWNLOAD_TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_DOWNLOAD_TIMEOUT
        origin, value = f"{DOWNLOAD_TIMEOUT_ENV}={raw!r}", raw
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > 0:  # also catches NaN
        raise CheckpointError(
            f"{origin} must be a positive number of seconds (e.g. 600, or inf for no limit), got {value!r}"
        )
    return seconds


class _Stopped(Exception):
    """Raised inside huggingface_hub's request loop (by our HTTP hooks) to end a fetch."""


class _Budget:
    """Time and restart budget of one fetch, shared by the caller and the fetching thread."""

    def __init__(self, limit: float):
        self.limit = limit
        self.start = time.monotonic()
        self.answered = False  # set by the first HTTP response of the fetch
        self.range_ignored = 0
        self.stopped: str | None = None  # why the fetch was abandoned (set once)

    def left(self) -> float:
        """Seconds until the deadline that applies now (the no-answer one until a server answers)."""
        limit = self.limit if self.answered else min(self.limit, NO_ANSWER_LIMIT)
        return self.start + limit - time.monotonic()

    def check(self) -> float:
        """Seconds left; raises _Stopped when the fetch was abandoned or is past its deadline."""
        left = self.left()
        if self.stopped is None and left <= 0:
            self.stopped = self.timeout_reason()
        if self.stopped is not None:
            raise _Stopped(self.stopped)
        return left

    def timeout_reason(self) -> str:
        if self.answered:
            return f"it did not finish within {self.limit:g} s"
        return f"the server did not answer within {min(self.limit, NO_ANSWER_LIMIT):g} s"


_local = threading.local()  # .budget: the _Budget of the fetch running on this thread


def _on_request(request) -> None:
    """httpx request hook: stop an abandoned fetch, and let no request outlive the deadline."""
    budget = getattr(_local, "budget", None)
    if budget is None:
        return
    left = max(budget.check(), 0.001)
    timeout = dict(request.extensions.get("timeout") or {})
    for key in ("connect", "read", "write", "pool"):
        current = timeout.get(key)
        timeout[key] = left if current is None else min(current, left)
    request.extensions["timeout"] = timeout


def _on_response(response) -> None:
    """httpx response hook: note the first answer, count ignored Range requests, bound the body."""
    budget = getattr(_local, "budget", None)
    if budget is None:
        return
    budget.answered = True
    if response.status_code == 200 and "range" in response.request.headers:
        budget.range_ignored += 1
        if budget.range_ignored >= MAX_RANGE_IGNORED:
            budget.stopped = (
                f"the server answered {budget.range_ignored} requests to resume a cut-off transfer "
                f"(HTTP Range) with the whole file again, and cut it short each time; the download was "
                f"stopped instead of restarting again"
            )
            raise _Stopped(budget.stopped)
    wrapper = _deadline_stream_class(type(response.stream))
    if wrapper is not None:
        response.stream = wrapper(response.stream, budget)


_STREAM_CLASSES: dict[type, type | None] = {}


def _deadline_stream_class(stream_type: type) -> type | None:
    """A subclass of the response stream's SyncByteStream base (httpx's or httpx2's) that checks
    the budget between chunks; None without such a base (then only the caller's wait is bounded)."""
    if stream_type not in _STREAM_CLASSES:
        base = next((c for c in stream_type.__mro__ if c.__name__ == "SyncByteStream"), None)
        cls = None
        if base is not None:
            def __init__(self, inner, budget):
                self._inner, self._budget = inner, budget

            def __iter__(self):
                for chunk in self._inner:
                    self._budget.check()
                    yield chunk

            def close(self):
                self._inner.close()

            cls = type("_DeadlineStream", (base,), {"__init__": __init__, "__iter__": __iter__, "close": close})
        _STREAM_CLASSES[stream_type] = cls
    return _STREAM_CLASSES[stream_type]


def _install_hooks() -> None:
    """Add our hooks (which act only on threads running a bounded fetch) to huggingface_hub's
    shared HTTP client; idempotent, and run before every download as the client is replaced
    after a connection error."""
    try:
        from huggingface_hub import get_session
    except ImportError:  # huggingface_hub < 1.0 (requests): only the caller's wait is bounded
        return
    client = get_session()
    hooks = getattr(client, "event_hooks", None)
    if not isinstance(hooks, dict):
        return
    request_hooks, response_hooks = list(hooks.get("request", [])), list(hooks.get("response", []))
    if _on_request in request_hooks and _on_response in response_hooks:
        return
    client.event_hooks = {
        "request": request_hooks + ([] if _on_request in request_hooks else [_on_request]),
        "response": response_hooks + ([] if _on_response in response_hooks else [_on_response]),
    }


_T = TypeVar("_T")


def _bounded(fn: Callable[[], _T], limit: float, uri: str) -> _T:
    """Run ``fn`` (a whole fetch) on a helper thread and wait at most ``limit`` seconds for it,
    even where no HTTP hook can act (name resolution, back-off sleeps). Once the caller gives up,
    the hooks stop the helper at its next request or body chunk."""
    budget = _Budget(limit)
    done = threading.Event()
    outcome: dict = {}

    def run() -> None:
        _local.budget = budget
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc
        finally:
            _local.budget = None
            done.set()

    threading.Thread(target=run, name="sam-drop-in-hub-fetch", daemon=True).start()
    try:
        while not done.is_set():
            left = budget.left()
            if left <= 0:
                break
            done.wait(left)
    finally:
        if not done.is_set() and budget.stopped is None:
            budget.stopped = budget.timeout_reason()  # also on KeyboardInterrupt: stop the helper
    error = outcome.get("error")
    if not done.is_set() or isinstance(error, _Stopped) or (error is not None and budget.left() <= 0):
        # Past the deadline, whatever the helper last saw (the clamped timeout of its request,
        # say) is a symptom: the deadline is the cause.
        if budget.stopped is None:
            budget.stopped = budget.timeout_reason()
        raise CheckpointError(
            f"fetching {uri!r} from the Hub at {_hf_constants().ENDPOINT} failed: {budget.stopped}. The limit for "
            f"one checkpoint is {budget.limit:g} s; raise it with download_timeout= or the {DOWNLOAD_TIMEOUT_ENV} "
            "environment variable (seconds) for a slow connection, try again later, or download the file yourself "
            "and pass its local path as checkpoint="
        ) from (error if isinstance(error, Exception) else None)
    if error is not None:
        raise error
    return outcome["value"]


def download(repo_id: str, filename: str, revision: str | None) -> str:
    """Return a local path to ``filename`` of a Hub repo, downloading it if not cached.

    Arguments:
      repo_id (str): "OWNER/REPO".
      filename (str): path inside the repo.
      revision (str | None): branch, tag or commit; None means "main".

    Returns:
      (str): path of the file inside the huggingface_hub cache.

    Raises:
      CheckpointNotFoundError: the repo, revision or file does not exist.
      CheckpointError: network, server or corruption failures.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
        _install_hooks()
        path = hf_hub_download(repo_id, filename, revision=revision)
    except _Stopped:
        raise
    except Exception as exc:  # huggingface_hub and httpx raise many kinds; all are translated
        raise _hub_error(exc, repo_id, filename, revision) from exc
    # The Hub names LFS blobs by their sha256: check a fresh download against it so that a
    # corrupt transfer never becomes a cache entry that later loads would trust.
    etag = os.path.basename(os.path.realpath(path))
    if _SHA256.match(etag):
        actual = sha256_file(path)
        if actual != etag:
            for p in (path, os.path.realpath(path)):  # the snapshot link and its blob: no later load trusts them
                with contextlib.suppress(OSError):
                    os.remove(p)
            raise CheckpointError(
                f"the download of {_where(repo_id, filename, revision)} is corrupt (sha256 {actual[:12]}..., "
                f"expected {etag[:12]}...); it was removed from the cache; try again"
            )
    return path


def _try_download(repo_id: str, filename: str, revision: str | None) -> str | None:
    """Like download(), but None when the file does not exist (or, offline, is not cached)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    try:
        known_missing = try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST
    except Exception as exc:
        raise _hub_error(exc, repo_id, filename, revision) from exc
    if known_missing:
        return None
    try:
        return download(repo_id, filename, revision)
    except CheckpointNotFoundError as exc:
        if isinstance(exc.__cause__, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)):
            raise
        return None


def _cached_repo_files(repo_id: str, revision: str | None) -> list[str]:
    """Files of a repo snapshot present in the local cache (for offline listing)."""
    folder = Path(_hf_constants().HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    ref = folder / "refs" / rev  # a branch or tag names its commit here; a commit is its own folder
    snap = folder / "snapshots" / (ref.read_text().strip() if ref.is_file() else rev)
    if not snap.is_dir():
        return []
    return sorted(str(p.relative_to(snap)).replace(os.sep, "/") for p in snap.rglob("*") if p.is_file())


def list_weight_files(repo_id: str, revision: str | None) -> list[str]:
    """Weight files (by suffix) in a Hub repo; from the local cache when offline."""
    if _offline():
        files = _cached_repo_files(repo_id, revision)
    else:
        from huggingface_hub import HfApi

        try:
            _install_hooks()
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except _Stopped:
            raise
        except Exception as exc:
            files = _cached_repo_files(repo_id, revision)
            if not files:
                raise _hub_error(exc, repo_id, None, revision) from exc
    return [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)]


def resolve_repo(repo_id: str, revision: str | None) -> tuple[str, dict]:
    """Pick the weights file of a repo given as ``hf://OWNER/REPO[@REV]``.

    Order: a ``config.json`` written by sam-drop-in's ``convert`` (it names the file),
    else ``model.safetensors``, else the only weights file in the repo, else an error
    listing the candidates.

    Arguments:
      repo_id (str): "OWNER/REPO".
      revision (str | None): branch, tag or commit.

    Returns:
      (tuple[str, dict]): local path of the weights file, and the sam-drop-in config
      (empty dict when the repo has none).
    """
    cfg_path = _try_download(repo_id, "config.json", revision)
    config = {} if cfg_path is None else read_json_object(cfg_path)
    # Only our own config names a file; a transformers config.json does not.
    if not isinstance(config.get("weights"), str) or config.get("model_type") not in (None, *MODEL_TYPES):
        config = {}
    if config:
        return download(repo_id, config["weights"], revision), config
    path = _try_download(repo_id, "model.safetensors", revision)
    if path is not None:
        return path, config
    candidates = list_weight_files(repo_id, revision)
    if len(candidates) == 1:
        return download(repo_id, candidates[0], revision), config
    where = f"Hub repo '{repo_id}' at revision '{revision or 'main'}'"
    if not candidates:
        raise CheckpointNotFoundError(
            f"{where} has no config.json naming its weights, no model.safetensors and no other weights file "
            f"({', '.join(WEIGHT_SUFFIXES)})" + (" in the local cache (HF_HUB_OFFLINE is set)" if _offline() else "")
        )
    raise CheckpointError(
        f"{where} holds several weights files ({', '.join(candidates[:10])}); name one: "
        f"hf://{repo_id}{'@' + revision if revision else ''}/{candidates[0]}"
    )


def fetch(source: str, timeout: float | None = None) -> tuple[str, dict]:
    """Resolve an ``hf://`` address to a local file, within an overall deadline.

    Arguments:
      source (str): ``hf://OWNER/REPO[@REVISION][/PATH]``.
      timeout (float | None): seconds for the whole fetch (every request, retry and byte);
        None: :func:`download_timeout`'s default or environment variable.

    Returns:
      (tuple[str, dict]): local path, and the sam-drop-in config (may be empty).

    Raises:
      CheckpointNotFoundError: the repo, revision or file does not exist.
      CheckpointError: a malformed address, a network/server failure, a corrupt transfer, or the
        deadline passed (a server that does not answer, or a transfer that never completes).
    """
    try:
        loc = parse_hf_uri(source)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    limit = download_timeout(timeout)

    def run() -> tuple[str, dict]:
        if loc.path is None:
            return resolve_repo(loc.repo_id, loc.revision)
        return download(loc.repo_id, loc.path, loc.revision), {}

    return _bounded(run, limit, source)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                commit_message: str = "Upload sam-drop-in checkpoint") -> str:
    """Upload a converted checkpoint folder to a Hub model repo (created if needed).

    Returns:
      (str): URL of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def push_error_message(exc: BaseException, folder: str | os.PathLike, repo_id: str) -> str:
    """Explain a failed :func:`push_folder`: what failed, the HTTP status, and what to do.

    huggingface_hub wraps some failures (an LFS upload raises ``RuntimeError("Error while
    uploading ...")`` from the HTTP error), so the whole cause chain is reported.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    detail = " <- ".join(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0]}" for c in chain)
    codes = [getattr(getattr(c, "response", None), "status_code", None) for c in chain]
    status = next((c for c in codes if c is not None), None)
    if status in (401, 403):
        hint = ("the Hub refused the credentials: log in with `hf auth login` (or set HF_TOKEN) using a token "
                f"with write access to {repo_id!r}")
    else:
        hint = "the Hub failed or could not be reached"
    return (
        f"converted to {os.fspath(folder)!r}, but uploading to Hub repo {repo_id!r} failed "
        f"({f'HTTP {status}, ' if status is not None else ''}{detail}); {hint}. The converted folder is complete: "
        f"upload it alone with `hf upload {repo_id} {os.fspath(folder)}` or run the conversion again"
    )
