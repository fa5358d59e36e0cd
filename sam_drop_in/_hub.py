"""Hugging Face Hub access for checkpoints: ``hf://`` parsing, cached downloads, clear errors.

huggingface_hub is a run-time dependency, but importing it costs most of a second, so it
is imported inside the functions that need it: ``import sam_drop_in`` stays fast for
users who only load local files.

Cache policy: a file already in the huggingface_hub cache for the requested revision is
used without any network request (so a second load works offline and costs nothing).
To pick up a newer upload to a branch, pin the new revision or delete the cached entry
(``hf cache delete``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ._layouts import MODEL_TYPES

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HfLocation:
    """A parsed ``hf://OWNER/REPO[@REVISION][/PATH]`` address."""

    repo_id: str
    revision: str | None
    path: str | None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{rev}" + (f"/{self.path}" if self.path else "")


def is_hf_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith("hf://")


def parse_hf_uri(uri: str) -> HfLocation:
    """Split an ``hf://`` address into repo id, revision and path.

    Follows huggingface_hub's HfFileSystem convention: ``hf://OWNER/REPO@REV/PATH``,
    with a revision that contains ``/`` (``refs/pr/1``) URL-encoded (``refs%2Fpr%2F1``).
    Only model repos are supported (an optional leading ``models/`` is accepted).

    Arguments:
      uri (str): the address.

    Returns:
      (HfLocation): repo_id "OWNER/REPO", revision (str | None), path in repo (str | None).

    Raises:
      ValueError: the address is malformed or names a dataset/space repo.
    """
    if not uri.startswith("hf://"):
        raise ValueError(f"not an hf:// address: {uri!r}")
    rest = uri[len("hf://"):].strip("/")
    parts = [p for p in rest.split("/") if p]
    if parts and parts[0] in ("datasets", "spaces"):
        raise ValueError(
            f"{uri!r} names a {parts[0][:-1]} repo; checkpoints are loaded from model repos "
            "(hf://OWNER/REPO[@REVISION]/FILE)"
        )
    if parts and parts[0] == "models":
        parts = parts[1:]
    if len(parts) < 2:
        raise ValueError(
            f"malformed Hub address {uri!r}: expected hf://OWNER/REPO[@REVISION][/PATH/IN/REPO], "
            "e.g. hf://facebook/sam-vit-base/model.safetensors"
        )
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        revision = unquote(revision)
        if not revision:
            raise ValueError(f"malformed Hub address {uri!r}: empty revision after '@'")
    if "@" in owner or not repo:
        raise ValueError(f"malformed Hub address {uri!r}: expected hf://OWNER/REPO[@REVISION][/PATH]")
    path = "/".join(parts[2:]) or None
    return HfLocation(f"{owner}/{repo}", revision, path)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _where(loc_repo: str, filename: str, revision: str | None) -> str:
    return f"'{filename}' in repo '{loc_repo}' at revision '{revision or 'main'}'"


def _translate(exc: BaseException, repo_id: str, filename: str | None, revision: str | None) -> tuple[str, bool]:
    """Turn a huggingface_hub / network exception into (message, is_not_found)."""
    from huggingface_hub import errors as hf_errors

    what = _where(repo_id, filename, revision) if filename else f"repo '{repo_id}' at revision '{revision or 'main'}'"
    endpoint = _endpoint()
    local_hint = "or download the file yourself and pass its local path as checkpoint="
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (
            f"Hub repository '{repo_id}' was not found at {endpoint} (if it is private or gated, log in with "
            "`hf auth login` or set HF_TOKEN)",
            True,
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"revision '{revision}' does not exist in Hub repo '{repo_id}' ({endpoint})", True
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        cause = exc.__cause__
        if _offline():
            return (
                f"HF_HUB_OFFLINE is set and {what} is not in the local cache ({_cache_dir()}); "
                f"load it once with network access, {local_hint}",
                True,
            )
        if isinstance(cause, hf_errors.HfHubHTTPError) and cause.response is not None:
            return (
                f"the Hub at {endpoint} answered HTTP {cause.response.status_code} for {what}, and the file is not "
                f"in the local cache ({_cache_dir()}); try again later, {local_hint}",
                False,
            )
        return (
            f"could not reach the Hub at {endpoint} ({type(cause).__name__ if cause else 'no connection'}) "
            f"and {what} is not in the local cache ({_cache_dir()}); check the connection, set HF_HUB_OFFLINE=1 "
            f"to use files cached earlier, {local_hint}",
            False,
        )
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"file not found: {what} ({endpoint})", True
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "error"
        return (
            f"the Hub at {endpoint} answered HTTP {status} while downloading {what}; nothing was added to the "
            f"cache; try again later, {local_hint}",
            False,
        )
    # Consistency-check OSError from http_get, or the connection dropping mid-transfer.
    return (
        f"the download of {what} from {endpoint} did not complete ({type(exc).__name__}: {exc}); "
        f"the partial file was not accepted into the cache; try again, {local_hint}",
        False,
    )


def _sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _evict(snapshot_path: str) -> None:
    """Remove a cached file (its snapshot link and blob) so no later load trusts it."""
    blob = os.path.realpath(snapshot_path)
    for p in (snapshot_path, blob):
        try:
            os.remove(p)
        except OSError:
            pass


def download(repo_id: str, filename: str, revision: str | None, error_cls: type[Exception],
             not_found_cls: type[Exception]) -> str:
    """Return a local path to ``filename`` of a Hub repo, downloading it if not cached.

    Arguments:
      repo_id (str): "OWNER/REPO".
      filename (str): path inside the repo.
      revision (str | None): branch, tag or commit; None means "main".
      error_cls (type[Exception]): raised for network/server/corruption failures.
      not_found_cls (type[Exception]): raised when the repo, revision or file does not exist.

    Returns:
      (str): path of the file inside the huggingface_hub cache.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached
    try:
        path = hf_hub_download(repo_id, filename, revision=revision)
    except Exception as exc:  # huggingface_hub and httpx raise many kinds; all are translated
        message, not_found = _translate(exc, repo_id, filename, revision)
        raise (not_found_cls if not_found else error_cls)(message) from exc
    # The Hub names LFS blobs by their sha256: check a fresh download against it so that a
    # corrupt transfer never becomes a cache entry that later loads would trust.
    etag = os.path.basename(os.path.realpath(path))
    if _SHA256.match(etag):
        actual = _sha256(path)
        if actual != etag:
            _evict(path)
            raise error_cls(
                f"the download of {_where(repo_id, filename, revision)} is corrupt (sha256 {actual[:12]}..., "
                f"expected {etag[:12]}...); it was removed from the cache; try again"
            )
    return path


def _try_download(repo_id: str, filename: str, revision: str | None, error_cls, not_found_cls) -> str | None:
    """Like download(), but None when the file does not exist (or, offline, is not cached)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import _CACHED_NO_EXIST

    if try_to_load_from_cache(repo_id, filename, revision=revision) is _CACHED_NO_EXIST:
        return None
    try:
        return download(repo_id, filename, revision, error_cls, not_found_cls)
    except not_found_cls as exc:
        from huggingface_hub import errors as hf_errors

        cause = exc.__cause__
        if isinstance(cause, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError)):
            raise
        return None


def _cached_repo_files(repo_id: str, revision: str | None) -> list[str]:
    """Files of a repo snapshot present in the local cache (for offline listing)."""
    folder = Path(_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    commit = rev
    ref = folder / "refs" / rev
    if ref.is_file():
        commit = ref.read_text().strip()
    snap = folder / "snapshots" / commit
    if not snap.is_dir():
        return []
    return sorted(str(p.relative_to(snap)).replace(os.sep, "/") for p in snap.rglob("*") if p.is_file())


def list_weight_files(repo_id: str, revision: str | None, error_cls, not_found_cls) -> list[str]:
    """Weight files (by suffix) in a Hub repo; from the local cache when offline."""
    if _offline():
        files = _cached_repo_files(repo_id, revision)
    else:
        from huggingface_hub import HfApi

        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception as exc:
            files = _cached_repo_files(repo_id, revision)
            if not files:
                message, not_found = _translate(exc, repo_id, None, revision)
                raise (not_found_cls if not_found else error_cls)(message) from exc
    return [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)]


def resolve_repo(repo_id: str, revision: str | None, error_cls, not_found_cls) -> tuple[str, dict]:
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
    config: dict = {}
    cfg_path = _try_download(repo_id, "config.json", revision, error_cls, not_found_cls)
    if cfg_path is not None:
        try:
            with open(cfg_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {}
        # Only our own config names a file; a transformers config.json does not.
        if isinstance(raw, dict) and isinstance(raw.get("weights"), str):
            config = raw
            if config.get("model_type") not in (None, *MODEL_TYPES):
                config = {}
    if config:
        return download(repo_id, config["weights"], revision, error_cls, not_found_cls), config
    path = _try_download(repo_id, "model.safetensors", revision, error_cls, not_found_cls)
    if path is not None:
        return path, config
    candidates = list_weight_files(repo_id, revision, error_cls, not_found_cls)
    if len(candidates) == 1:
        return download(repo_id, candidates[0], revision, error_cls, not_found_cls), config
    where = f"Hub repo '{repo_id}' at revision '{revision or 'main'}'"
    if not candidates:
        raise not_found_cls(
            f"{where} has no config.json naming its weights, no model.safetensors and no other weights file "
            f"({', '.join(WEIGHT_SUFFIXES)})" + (" in the local cache (HF_HUB_OFFLINE is set)" if _offline() else "")
        )
    raise error_cls(
        f"{where} holds several weights files ({', '.join(candidates[:10])}); name one: "
        f"hf://{repo_id}{'@' + revision if revision else ''}/{candidates[0]}"
    )


def fetch(source: str, error_cls: type[Exception], not_found_cls: type[Exception]) -> tuple[str, dict, HfLocation]:
    """Resolve an ``hf://`` address to a local file.

    Returns:
      (tuple[str, dict, HfLocation]): local path, sam-drop-in config (may be empty), parsed address.
    """
    try:
        loc = parse_hf_uri(source)
    except ValueError as exc:
        raise error_cls(str(exc)) from None
    if loc.path is None:
        path, config = resolve_repo(loc.repo_id, loc.revision, error_cls, not_found_cls)
    else:
        path, config = download(loc.repo_id, loc.path, loc.revision, error_cls, not_found_cls), {}
    return path, config, loc


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
