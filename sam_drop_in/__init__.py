"""sam-drop-in: segment_anything's API with a fast TinyViT (MobileSAM / TinySAM) encoder.

Change ``from segment_anything import ...`` to ``from sam_drop_in import ...``; every other line
stays. ``sam_model_registry["vit_t"]`` adds the 5.7M-parameter encoder.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError:
    # A torch-free install (numpy, pillow, onnxruntime) can still use
    # sam_drop_in.onnx_predictor; the torch API names raise an actionable error below.
    _HAS_TORCH = False
else:
    _HAS_TORCH = True
    from .build_sam import (
        build_sam,
        build_sam_vit_b,
        build_sam_vit_h,
        build_sam_vit_l,
        build_sam_vit_t,
        sam_model_registry,
    )
    from .predictor import SamPredictor

from ._version import __version__

_TORCH_NAMES = {
    "build_sam", "build_sam_vit_h", "build_sam_vit_l", "build_sam_vit_b", "build_sam_vit_t",
    "sam_model_registry", "SamPredictor", "SamAutomaticMaskGenerator", "SamHierarchicalMaskGenerator",
}


def __getattr__(name):
    if name in _TORCH_NAMES and not _HAS_TORCH:
        raise ImportError(
            f"sam_drop_in.{name} needs PyTorch (pip install torch). Without torch, use "
            "sam_drop_in.onnx_predictor.SamOnnxPredictor with exported ONNX models."
        )
    # The generators are imported on first use so that `import sam_drop_in` stays light.
    if name == "SamAutomaticMaskGenerator":
        from .automatic_mask_generator import SamAutomaticMaskGenerator

        return SamAutomaticMaskGenerator
    if name == "SamHierarchicalMaskGenerator":
        from .hierarchical_mask_generator import SamHierarchicalMaskGenerator

        return SamHierarchicalMaskGenerator
    raise AttributeError(f"module 'sam_drop_in' has no attribute {name!r}")


__all__ = [
    "build_sam",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_b",
    "build_sam_vit_t",
    "sam_model_registry",
    "SamPredictor",
    "SamAutomaticMaskGenerator",
    "SamHierarchicalMaskGenerator",
]
