"""onnxruntime-web for the page's browser decoder: fetched with npm, verified, cached per user.

The page of ``sam-drop-in serve`` can decode prompts in the browser with the exported ONNX
decoder, as segment_anything's demo does. That needs onnxruntime-web's JavaScript and its
WebAssembly binary (~14 MB), which are not shipped inside this package: ``fetch()`` gets the
pinned release with the npm client (``npm pack``), checks the tarball against the sha512 pinned
here, and extracts the two files the page loads into a per-user cache folder
(``$XDG_CACHE_HOME/sam_drop_in/`` or ``~/.cache/sam_drop_in/``), atomically: the folder either
holds a complete, verified copy or does not exist.

Nothing here needs the web framework; ``sam-drop-in serve --fetch-web-runtime`` calls
:func:`fetch`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

from .._errors import WebRuntimeError

PACKAGE = "onnxruntime-web"
VERSION = "1.30.0"
# The npm "integrity" of onnxruntime-web-1.30.0.tgz (sha512, base64), pinned: a tarball with
# any other hash is refused, whatever npm says about it.
INTEGRITY = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
# The ES-module bundle (WebAssembly glue inside it, so no second script is fetched) and the
# SIMD WebAssembly binary it loads; both are served by the app under /ort/.
FILES = ("dist/ort.wasm.bundle.min.mjs", "dist/ort-wasm-simd-threaded.wasm")
MANIFEST = "manifest.json"
NPM_TIMEOUT_S = 600


def cache_root() -> Path:
    """The package's per-user cache folder: ``$XDG_CACHE_HOME/sam_drop_in`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sam_drop_in"


def runtime_dir(root: Optional[Path] = None, version: str = VERSION) -> Path:
    """Where the given onnxruntime-web version is (or would be) extracted."""
    return Path(root or cache_root()) / f"{PACKAGE}-{version}"


def _integrity(path: Path) -> str:
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha512-" + base64.b64encode(h.digest()).decode("ascii")


def installed(root: Optional[Path] = None, version: str = VERSION) -> Optional[Path]:
    """The folder holding a complete copy of ``version`` (every file of the manifest, at its
    recorded size), or None.

    Arguments:
      root (Path or None): the cache folder (default :func:`cache_root`).
      version (str): onnxruntime-web version.

    Returns:
      (Path or None): the folder; the page's files are directly inside it (basenames of FILES).
    """
    folder = runtime_dir(root, version)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: Dict[str, int] = manifest["files"]
        if manifest.get("version") != version or not files:
            return None
        for name, size in files.items():
            if (folder / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder


def fetch(
    root: Optional[Path] = None,
    *,
    npm: Optional[str] = None,
    version: str = VERSION,
    integrity: str = INTEGRITY,
    log: Callable[[str], None] = lambda message: None,
) -> Path:
    """Get onnxruntime-web with the npm client, verify it, extract the page's files to the cache.

    Does nothing (returns the folder) when a complete copy is already there.

    Arguments:
      root (Path or None): the cache folder (default :func:`cache_root`).
      npm (str or None): the npm executable (default: ``npm`` on PATH).
      version (str): onnxruntime-web version to fetch (the pinned one by default).
      integrity (str): the tarball's expected npm integrity string, ``sha512-<base64>``.
      log (callable): receives one line per step (what is being fetched, where it went).

    Returns:
      (Path): the folder with the files (basenames of FILES) and a manifest.

    Raises:
      WebRuntimeError: npm not found, npm failed, no tarball, a hash other than ``integrity``,
        or files missing from the tarball; nothing is left in the cache then.
    """
    done = installed(root, version)
    if done is not None:
        return done
    npm = npm or shutil.which("npm")
    if npm is None:
        raise WebRuntimeError(
            f"the browser decoder needs {PACKAGE} {version}, fetched with npm, and npm is not installed "
            "(install Node.js and npm, e.g. apt-get install npm, then run sam-drop-in serve --fetch-web-runtime); "
            "decoding stays on the server"
        )
    final = runtime_dir(root, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}@{version}"
    log(f"fetching {spec} with {npm} pack (about 33 MB) ...")
    # Work in a temporary folder beside the destination: the final rename stays on one file
    # system, and a failure at any step removes everything with the folder.
    with tempfile.TemporaryDirectory(prefix=f".{PACKAGE}-", dir=final.parent) as tmp:
        work = Path(tmp)
        try:
            proc = subprocess.run(
                [npm, "pack", spec, "--pack-destination", str(work), "--ignore-scripts", "--silent"],
                cwd=work, capture_output=True, text=True, timeout=NPM_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WebRuntimeError(f"npm pack {spec} could not run ({exc}); decoding stays on the server") from None
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
            raise WebRuntimeError(f"npm pack {spec} failed (exit {proc.returncode}: {detail}); "
                                  "decoding stays on the server")
        tarballs = sorted(work.glob("*.tgz"))
        if len(tarballs) != 1:
            raise WebRuntimeError(f"npm pack {spec} left {len(tarballs)} tarballs, expected one; "
                                  "decoding stays on the server")
        got = _integrity(tarballs[0])
        if got != integrity:
            raise WebRuntimeError(
                f"{tarballs[0].name} has hash {got}, not the pinned {integrity}: refused (nothing extracted); "
                "decoding stays on the server"
            )
        stage = work / "stage"
        stage.mkdir()
        sizes: Dict[str, int] = {}
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for name in FILES:
                try:
                    member = tar.getmember(f"package/{name}")
                except KeyError:
                    raise WebRuntimeError(f"{tarballs[0].name} has no {name}; decoding stays on the server") from None
                if not member.isfile():
                    raise WebRuntimeError(f"{name} in {tarballs[0].name} is not a regular file; refused")
                src = tar.extractfile(member)
                dst = stage / Path(name).name
                with open(dst, "wb") as out:
                    shutil.copyfileobj(src, out)
                sizes[dst.name] = dst.stat().st_size
        (stage / MANIFEST).write_text(json.dumps({"package": PACKAGE, "version": version, "integrity": integrity,
                                                  "files": sizes}, indent=1))
        # Replace an incomplete leftover (a copy another process finished meanwhile is kept).
        if installed(root, version) is None:
            if final.exists():
                shutil.rmtree(final)
            os.replace(stage, final)
    log(f"{spec} verified ({integrity[:20]}...) and extracted to {final}")
    return final


__all__ = ["PACKAGE", "VERSION", "INTEGRITY", "FILES", "cache_root", "runtime_dir", "installed", "fetch"]
