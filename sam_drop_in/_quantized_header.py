"""Recognising a quantised model file from its safetensors header alone (a leaf module).

The loaders (``checkpoint``, ``build_sam``, the CLI) must tell a file written by
``quantization.save_quantized`` from a float checkpoint before they read it, without importing
the ``quantization`` package (which sits above them); so the format names and the header-only
readers live here, and ``quantization.io`` re-exports them.
"""

import json
import os
import struct
from typing import Dict, Optional

FORMAT = "sam_drop_in.quantized"  # a whole model: quantised encoder + float prompt encoder/decoder
ENCODER_FORMAT = "sam_drop_in.quantized_encoder"  # the encoder alone (the first version's only kind)
FORMATS = (FORMAT, ENCODER_FORMAT)
FORMAT_VERSION = "1"

# ViT width and depth -> model type (segment_anything's three encoders).
_VIT_TYPES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
_HEADER_LIMIT = 100 << 20  # a safetensors header larger than this is not one we wrote


def read_metadata(path) -> Optional[Dict[str, str]]:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no tensor is
    loaded); None when ``path`` is not a readable safetensors file.

    Arguments:
      path (str or Path): a local file.

    Returns:
      (dict(str, str) or None): the metadata (empty dict when the file has none).
    """
    try:
        with open(os.fspath(path), "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size < 2 or size > _HEADER_LIMIT:
                return None
            raw = f.read(size)
    except (OSError, TypeError, ValueError):
        return None
    if len(raw) != size or not raw.startswith(b"{"):
        return None
    try:
        header = json.loads(raw)
    except ValueError:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def quantized_format(path) -> Optional[str]:
    """``FORMAT`` or ``ENCODER_FORMAT`` for a quantised file written by ``save_quantized``, else None."""
    meta = read_metadata(path)
    fmt = meta.get("format") if meta else None
    return fmt if fmt in FORMATS else None


def encoder_kind(arch: Dict) -> str:
    """The quantised encoder's kind ("tiny_vit" or "vit") from its architecture JSON; files
    written before the key existed hold a TinyViT."""
    return arch.get("kind", "tiny_vit")


def model_type_of(arch: Dict) -> Optional[str]:
    """The registry model type ("vit_t", "vit_b", ...) an encoder architecture belongs to, or None."""
    if encoder_kind(arch) == "tiny_vit":
        return "vit_t"
    width = arch.get("embed_dim", arch.get("encoder_embed_dim"))
    depth = arch.get("depth", arch.get("encoder_depth"))
    return _VIT_TYPES.get((width, depth))


def describe_quantized(path) -> Optional[Dict]:
    """A short description of a quantised file from its metadata (for ``sam-drop-in info``);
    None when ``path`` is not one.

    Returns:
      (dict or None): ``format`` (str), ``contents`` ("model" or "image encoder"),
      ``model_type`` (str or None), ``recipe`` (str, the recipe's name), ``weight_bits``,
      ``act_bits`` (int), ``encoder_kind`` (str).
    """
    meta = read_metadata(path)
    if not meta or meta.get("format") not in FORMATS:
        return None
    try:
        recipe = json.loads(meta.get("recipe", "{}"))
        arch = json.loads(meta.get("architecture", "{}"))
    except ValueError:
        recipe, arch = {}, {}
    return {
        "format": meta["format"],
        "contents": "model" if meta["format"] == FORMAT else "image encoder",
        "model_type": meta.get("model_type") or model_type_of(arch),
        "recipe": recipe.get("name"),
        "weight_bits": recipe.get("weight_bits"),
        "act_bits": recipe.get("act_bits"),
        "encoder_kind": encoder_kind(arch),
    }
