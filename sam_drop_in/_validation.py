"""Validation of images and prompts (SamPredictor, the ONNX Runtime predictor), and the table of
generator settings (the everything command, the server).

Everything here is numpy-only (no torch import) and raises :class:`InputError` with a message
that says what was wrong and what to do. Where segment_anything asserts, the message is the same
as upstream's assertion message, so code that matches on it keeps working.
"""

import math
from typing import Optional, Sequence, Tuple

import numpy as np

from ._errors import ImageDtypeError, InputError, PromptShapeError

IMAGE_FORMATS = ("RGB", "BGR")

# The generator settings of segment_anything's scripts/amg.py that the everything command and the
# server let a user set: (name, type, (low, high, high included) allowed range, help). Outside the
# range the generator crashes or silently finds nothing (0 points per side divides by zero, -1
# crop layers indexes past the crop list), so the command refuses such values before loading.
AMG_OPTIONS = (
    ("points_per_side", int, (1, None, True), "Sample a grid with this many points to a side (default 32)."),
    ("points_per_batch", int, (1, None, True), "How many points are decoded together in one batch (default 64)."),
    ("pred_iou_thresh", float, (0, 1, True), "Drop masks whose predicted IoU is below this (default 0.88)."),
    ("stability_score_thresh", float, (0, 1, True),
     "Drop masks whose stability score is below this (default 0.95)."),
    ("stability_score_offset", float, (0, None, True),
     "Logit shift used to measure the stability score (default 1.0)."),
    ("box_nms_thresh", float, (0, 1, True), "Box IoU above which a duplicate mask is dropped (default 0.7)."),
    ("crop_n_layers", int, (0, None, True), "If >0, also run on crops of the image, at this many scales (default 0)."),
    ("crop_nms_thresh", float, (0, 1, True), "Box IoU for dropping duplicate masks across crops (default 0.7)."),
    ("crop_overlap_ratio", float, (0, 1, False),
     "Overlap of the crops, a fraction of the image's short side (default 512/1500)."),
    ("crop_n_points_downscale_factor", int, (1, None, True),
     "Points per side in crop layer i are divided by this to the power i (default 1)."),
    ("min_mask_region_area", int, (0, None, True),
     "Remove islands and fill holes smaller than this many pixels (default 0; needs OpenCV)."),
)


def check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format must be in ['RGB', 'BGR'], is {image_format}.")


def check_image(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validate an image given to ``set_image`` and return it as a contiguous RGB array.

    Arguments:
      image (np.ndarray): HxWx3, dtype uint8 with values in [0, 255], or a float dtype with
        values in [0, 1] (converted as segment_anything does, see :func:`to_uint8`). Any memory
        layout.
      image_format (str): 'RGB' or 'BGR', the channel order of ``image``.

    Returns:
      (np.ndarray): HxWx3 uint8, C-contiguous, RGB channel order. A new array when the input
        had to be converted, reordered or copied; the caller's array is never modified.
    """
    check_image_format(image_format)
    if not isinstance(image, np.ndarray):
        raise InputError(
            f"image must be a numpy array of shape HxWx3 and dtype uint8, got {type(image).__name__}. "
            "Convert a PIL image with np.asarray(pil_image.convert('RGB'))."
        )
    if image.ndim == 2:
        raise InputError(
            f"image must have shape HxWx3, got a 2-D array of shape {image.shape} (grayscale?). "
            "Stack it to three channels: np.stack([image] * 3, axis=-1)."
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " Drop the alpha channel with image[..., :3]." if image.ndim == 3 and image.shape[2] == 4 else ""
        raise InputError(f"image must have shape HxWx3 (three colour channels), got {image.shape}.{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image is empty: shape {image.shape}. Pass an image with at least one pixel.")
    image = to_uint8(image)
    if image_format == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An image as uint8, converting floats in [0, 1] exactly as segment_anything 1.0 does.

    Upstream's ``ResizeLongestSide.apply_image`` goes through torchvision's ``to_pil_image``,
    which multiplies a float image by 255 in the image's own dtype and truncates towards zero
    (so a float32 value 0.999 gives 254, and float16 rounding differs from float32's). Doing the
    same arithmetic gives the same pixels, hence the same embedding, as upstream. Floats outside
    [0, 1] or non-finite have no defined result there (the cast wraps or is platform-dependent), so
    they are refused.

    Arguments:
      image (np.ndarray): any shape; uint8 (returned as is) or a float dtype with values in [0, 1].

    Returns:
      (np.ndarray): same shape, uint8.
    """
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating):
        lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(f"image of dtype {image.dtype} contains NaN or infinite values. Pass finite values in [0, 1].")
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"image of dtype {image.dtype} has values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
                "(uint8 images in [0, 255]). For floats in [0, 255] use image.round().astype(np.uint8)."
            )
        return (image * 255).astype(np.uint8)
    raise ImageDtypeError(
        f"image must have dtype uint8 with values in [0, 255] (or a float dtype with values in [0, 1]), "
        f"got {image.dtype}. Convert it, e.g. np.clip(image, 0, 255).astype(np.uint8)."
    )


def resized_size(h: int, w: int, target_length: int) -> Tuple[int, int]:
    """(H, W) after ResizeLongestSide scales the long side to ``target_length`` (rounded half up)."""
    scale = target_length * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def min_short_side(long_side: int, target_length: int) -> int:
    """The shortest side an image with ``long_side`` may have so that it is still at least one
    pixel after resizing the long side to ``target_length``."""
    s = max(1, math.ceil(long_side / (2.0 * target_length)))
    # The formula is the real-number bound; step to the exact one of resized_size's float maths.
    while min(resized_size(s, long_side, target_length)) < 1:
        s += 1
    while s > 1 and min(resized_size(s - 1, long_side, target_length)) >= 1:
        s -= 1
    return s


def check_resizable(h: int, w: int, target_length: int, what: str = "image") -> None:
    """Refuse an (H, W) that resizes to a side of 0 pixels (e.g. 1x3000 for a long side of 1024).

    Every side must be at least 1 pixel after resizing so that the image can be resized and
    prompts mapped onto it; that is, the short side must be at least
    ``min_short_side(long side, target_length)`` pixels (2 for a long side of 3000 and 1024).
    """
    new_h, new_w = resized_size(h, w, target_length)
    if new_h < 1 or new_w < 1:
        need = min_short_side(max(h, w), target_length)
        raise InputError(
            f"{what} of {h}x{w} pixels is too thin: scaling its long side to {target_length} makes it "
            f"{new_h}x{new_w}. Each side must be at least 1 pixel after resizing, so the short side "
            f"must be at least {need} pixels for a long side of {max(h, w)}. Pad or crop the image."
        )


def check_original_size(original_image_size: Sequence, target_length: int) -> Tuple[int, int]:
    """Validate ``set_torch_image``'s ``original_image_size``: (H, W), positive whole numbers that
    do not resize to a side of 0 pixels.

    Returns:
      (tuple(int, int)): (H, W) as Python ints.
    """
    try:
        h, w = (float(v) for v in original_image_size)  # not two values: ValueError
        ok = all(math.isfinite(v) and v >= 1 and v == int(v) for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"original_image_size must be the (H, W) of the image before resizing, two whole numbers >= 1, "
            f"got {original_image_size!r}."
        )
    check_resizable(int(h), int(w), target_length, "original_image_size")
    return int(h), int(w)


def _finite_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be numeric, got {value!r}.") from e
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values: {arr.tolist()}. Pass finite pixel coordinates.")
    return arr


# The labels a user may give a point: the prompt encoder adds a learnt embedding for 1 and 0, and
# replaces a point labelled -1 by its 'not a point' embedding (the padding it appends itself), so
# -1 makes a point count as absent. 2 and 3 mark box corners only inside the exported ONNX decoder;
# SamPredictor's prompt encoder gives them no embedding, so they would make the two disagree.
POINT_LABELS = (1, 0, -1)
LABELS_HELP = (
    "point_labels must be 1 (foreground point), 0 (background point) or -1 (padding: the point is "
    "ignored); give a box with box=, not as points labelled 2 and 3"
)

# mask_input is computed in float32 by a 2x2 convolution (a sum of four products) and a
# LayerNorm: values up to this magnitude stay finite there for any weights below 1e7, and real
# logits are within a few hundred.
MASK_INPUT_LIMIT = 1e30


def check_point_prompts(
    point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray]
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate point prompts in original-image pixels.

    Arguments:
      point_coords (np.ndarray or None): Nx2, (X, Y) in pixels of the original image.
      point_labels (np.ndarray or None): N, each 1 (foreground), 0 (background) or -1 (padding:
        the point is ignored, as the prompt encoder's own padding point is). Any numeric dtype
        holding those whole values.

    Returns:
      (np.ndarray, np.ndarray) or (None, None): coords as Nx2 float64, labels as N int64.
    """
    if point_coords is None:
        if point_labels is not None:
            raise InputError(
                "point_labels was supplied without point_coords. Pass point_coords (Nx2, X,Y in pixels) "
                "as well, or drop point_labels."
            )
        return None, None
    if point_labels is None:
        raise InputError("point_labels must be supplied if point_coords is supplied.")
    coords = _finite_array(point_coords, "point_coords")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PromptShapeError(f"point_coords must have shape Nx2 (X, Y in pixels), got {coords.shape}.")
    labels = np.asarray(point_labels)
    if labels.ndim != 1:
        raise PromptShapeError(f"point_labels must have shape N, got {labels.shape}.")
    if labels.shape[0] != coords.shape[0]:
        raise PromptShapeError(
            f"point_coords has {coords.shape[0]} points but point_labels has {labels.shape[0]} labels; "
            "give one label per point."
        )
    if labels.size and not np.issubdtype(labels.dtype, np.number):
        raise InputError(f"point_labels must be integers (1 foreground, 0 background), got dtype {labels.dtype}.")
    ok = np.isin(labels, POINT_LABELS)  # refuses NaN, fractions, 2, 3, ...
    if not np.all(ok):
        raise InputError(f"{LABELS_HELP}; got {np.unique(labels[~ok]).tolist()}.")
    return coords, labels.astype(np.int64)


def to_float32(value: np.ndarray, name: str) -> np.ndarray:
    """``value`` as float32, the precision the model computes prompts in; refused if a finite
    float64 value overflows there (e.g. a coordinate of 1e39, or 3e38 scaled up to the resized
    frame), which would make the predicted scores NaN and the masks empty.

    Returns:
      (np.ndarray): float32, same shape.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.asarray(value).astype(np.float32)
    if not np.all(np.isfinite(out)):
        big = np.asarray(value)[~np.isfinite(out)]
        raise InputError(
            f"{name} has values too large for float32, the precision the model computes in "
            f"(largest {np.finfo(np.float32).max:.3g}), after scaling to the resized image: {big.tolist()[:4]}. "
            "Pass coordinates in pixels of the image."
        )
    return out


def check_box(box: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Validate a box prompt: 4 numbers XYXY in original-image pixels (shape 4 or 1x4)."""
    if box is None:
        return None
    arr = _finite_array(box, "box")
    if arr.size != 4 or arr.ndim > 2:
        raise PromptShapeError(
            f"box must be a length-4 array in XYXY pixel format, got shape {arr.shape}. "
            "For several boxes, call predict_torch with a Bx4 tensor (see the README)."
        )
    return arr.reshape(4)


def check_mask_input(mask_input: Optional[np.ndarray], size: int = 256) -> Optional[np.ndarray]:
    """Validate a low-resolution mask prompt: 1xHxW logits with H = W = ``size`` (256 for SAM),
    magnitudes at most ``MASK_INPUT_LIMIT``.

    Returns:
      (np.ndarray): 1xHxW float32.
    """
    if mask_input is None:
        return None
    arr = _finite_array(mask_input, "mask_input")
    if arr.shape != (1, size, size):
        raise PromptShapeError(
            f"mask_input must have shape 1x{size}x{size} (low-resolution logits, e.g. the third "
            f"output of a previous predict call, one of its masks: logits[i:i+1]), got {arr.shape}."
        )
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32)
    check_mask_magnitude(float(np.abs(arr).max()))
    return arr


def check_mask_magnitude(largest: float) -> None:
    """Refuse mask_input values whose magnitude overflows float32 inside the mask encoder."""
    # Compared in float32, where the model holds the values (float32(1e30) is a little above 1e30).
    if not largest <= float(np.float32(MASK_INPUT_LIMIT)):
        raise InputError(
            f"mask_input has values of magnitude {largest:.3g}; mask logits must be finite and at most "
            f"{MASK_INPUT_LIMIT:g} in magnitude (larger ones overflow float32 in the mask encoder). "
            "Pass logits such as a previous predict call's third output."
        )
