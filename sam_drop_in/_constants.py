"""Facts that several modules need, each stated once. A leaf module: it imports nothing heavy,
so the ONNX Runtime predictor (no torch) and the CLI can read it too."""

from typing import Optional

# Image encoders this package builds, in registry order. "default" is upstream's alias for vit_h.
MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t")
MODEL_TYPE_ALIASES = {"default": "vit_h"}
# Every key of sam_model_registry (the aliases included), as users type them.
REGISTRY_KEYS = ("default",) + MODEL_TYPES

# segment_anything normalises 0-255 RGB input with these (non-persistent buffers of Sam).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def normalize_model_type(model_type: Optional[str]) -> Optional[str]:
    """Resolve an alias ("default" -> "vit_h"); None and unknown names are returned unchanged
    (the caller decides whether None means "detect" and how to word an unknown name)."""
    if model_type is None:
        return None
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def registry_model_type(key: str) -> str:
    """The model type of a ``sam_model_registry`` key; ValueError naming the keys otherwise."""
    if key not in REGISTRY_KEYS:
        raise ValueError(f"Unknown model type {key!r}: choose one of {', '.join(REGISTRY_KEYS)}.")
    return MODEL_TYPE_ALIASES.get(key, key)
