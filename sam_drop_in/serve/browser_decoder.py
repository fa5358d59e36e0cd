"""The ONNX decoder the page runs in onnxruntime-web: exported once per model, cached on disk.

The export has segment_anything's demo settings (``return_single_mask=True``: the best
multimask output for one click, the single-mask output otherwise; a dynamic number of points;
opset 17). The file is cached under ``<cache_root>/decoders/`` by a key of the decoder weights,
the package version and the export settings, so a restart with the same checkpoint reuses it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Optional

from .web_runtime import cache_root

EXPORT_SETTINGS = {"return_single_mask": True, "opset": 17, "gelu_approximate": False}


def onnx_missing() -> Optional[str]:
    """Why the decoder cannot be exported here (a message naming the install), or None."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        return "exporting the browser decoder needs the onnx package: pip install 'sam-drop-in[serve]'"
    return None


def decoder_key(sam: Any) -> str:
    """Hex key of what the exported file depends on: the prompt encoder's and mask decoder's
    weights (values, shapes, names), the model's image size and mask threshold, the package
    version and the export settings."""
    import numpy as np

    from .._version import __version__

    h = hashlib.sha256()
    h.update(repr((__version__, sorted(EXPORT_SETTINGS.items()), int(sam.image_encoder.img_size),
                   float(sam.mask_threshold))).encode())
    for prefix, module in (("prompt_encoder", sam.prompt_encoder), ("mask_decoder", sam.mask_decoder)):
        for name, tensor in module.state_dict().items():
            arr = tensor.detach().float().cpu().numpy()
            h.update(f"{prefix}.{name}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class DecoderCache:
    """The exported decoder of one model, made on first use (thread-safe) and kept on disk.

    Arguments:
      sam (Sam): the served model.
      root (Path or None): cache folder (default :func:`sam_drop_in.serve.web_runtime.cache_root`).
    """

    def __init__(self, sam: Any, root: Optional[Path] = None) -> None:
        self.sam = sam
        self.root = Path(root or cache_root()) / "decoders"
        self._lock = threading.Lock()
        self._path: Optional[Path] = None

    def path(self) -> Path:
        """The .onnx file, exported now if it is not cached yet.

        Raises:
          ImportError: onnx is not installed (the message names the install).
        """
        with self._lock:
            if self._path is not None and self._path.exists():
                return self._path
            missing = onnx_missing()
            if missing:
                raise ImportError(missing)
            from ..onnx_export import export_decoder

            path = self.root / f"decoder-{decoder_key(self.sam)[:24]}.onnx"
            if not path.exists():
                os.makedirs(self.root, exist_ok=True)
                # export_decoder writes atomically: a reader never sees half a file.
                export_decoder(self.sam, str(path), **EXPORT_SETTINGS)
            self._path = path
            return path

    def start(self) -> threading.Thread:
        """Export in a background thread (the server starts answering meanwhile); errors are
        reported again by the first :meth:`path` call that needs the file."""

        def work() -> None:
            try:
                self.path()
            except Exception:  # reported to the page by the request that needs the file
                pass

        thread = threading.Thread(target=work, name="sam-drop-in-decoder-export", daemon=True)
        thread.start()
        return thread


__all__ = ["DecoderCache", "decoder_key", "onnx_missing", "EXPORT_SETTINGS"]
