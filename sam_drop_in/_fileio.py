"""File writing and hashing used by the loaders, the CLI, ONNX export and distillation.

One place for two facts: a file the package writes is never seen half-written (a temporary file
in the same folder, then an atomic ``os.replace``), and a file's identity is its SHA-256.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: PathLike) -> dict:
    """The JSON object in a file; an empty dict when the file is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def json_default(obj: object) -> object:
    """``json.dump``'s ``default=``: numpy scalars and arrays as Python values, bytes (COCO RLE
    counts) as UTF-8 text; TypeError for anything else."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8")
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def atomic_write(dst: PathLike, write: Callable[[str], None]) -> None:
    """Create or replace ``dst`` so that readers see the old file or the whole new one.

    Arguments:
      dst (str | os.PathLike): the file to write; its folder must exist.
      write (callable): ``write(tmp_path)`` writes the full content to ``tmp_path`` (a file in
        ``dst``'s folder, so the final rename never crosses file systems).

    The new file gets the permissions an ordinary ``open(dst, "w")`` would (0666 less the
    umask), not mkstemp's 0600. On any error the temporary file is removed and the error raised.
    """
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
