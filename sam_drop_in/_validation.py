"""Validation of images and prompts, shared by SamPredictor and the ONNX Runtime predictor.

Everything here is numpy-only (no torch import) and raises :class:`InputError` with a message
that says what was wrong and what to do. Where segment_anything asserts, the message is the same
as upstream's assertion message, so code that matches on it keeps working.
"""

from typing import Optional, Tuple

import numpy as np

from ._errors import InputError

IMAGE_FORMATS = ("RGB", "BGR")


def check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format must be in ['RGB', 'BGR'], is {image_format}.")


def check_image(image: np.ndarray, image_format: str = "RGB") -> np.ndarray:
    """Validate an image given to ``set_image`` and return it as a contiguous RGB array.

    Arguments:
      image (np.ndarray): HxWx3, dtype uint8, values in [0, 255]. Any memory layout.
      image_format (str): 'RGB' or 'BGR', the channel order of ``image``.

    Returns:
      (np.ndarray): HxWx3 uint8, C-contiguous, RGB channel order. A new array when the input
        had to be reordered or copied; the caller's array is never modified.
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
    if image.dtype != np.uint8:
        raise InputError(
            f"image must have dtype uint8 with values in [0, 255], got {image.dtype}. "
            "For floats in [0, 1] use (image * 255).round().astype(np.uint8)."
        )
    if image_format == "BGR":
        image = image[..., ::-1]
    return np.ascontiguousarray(image)


def _finite_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be numeric, got {value!r}.") from e
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values: {arr.tolist()}. Pass finite pixel coordinates.")
    return arr


def check_point_prompts(
    point_coords: Optional[np.ndarray], point_labels: Optional[np.ndarray]
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate point prompts in original-image pixels.

    Arguments:
      point_coords (np.ndarray or None): Nx2, (X, Y) in pixels of the original image.
      point_labels (np.ndarray or None): N, 1 foreground, 0 background (-1 padding is accepted).

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
        raise InputError(f"point_coords must have shape Nx2 (X, Y in pixels), got {coords.shape}.")
    labels = np.asarray(point_labels)
    if labels.ndim != 1:
        raise InputError(f"point_labels must have shape N, got {labels.shape}.")
    if labels.shape[0] != coords.shape[0]:
        raise InputError(
            f"point_coords has {coords.shape[0]} points but point_labels has {labels.shape[0]} labels; "
            "give one label per point."
        )
    if labels.size and not np.issubdtype(labels.dtype, np.number):
        raise InputError(f"point_labels must be integers (1 foreground, 0 background), got dtype {labels.dtype}.")
    return coords, labels.astype(np.int64)


def check_box(box: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Validate a box prompt: 4 numbers XYXY in original-image pixels (shape 4 or 1x4)."""
    if box is None:
        return None
    arr = _finite_array(box, "box")
    if arr.size != 4 or arr.ndim > 2:
        raise InputError(
            f"box must be a length-4 array in XYXY pixel format, got shape {arr.shape}. "
            "For several boxes, call predict_torch with a Bx4 tensor (see the README)."
        )
    return arr.reshape(4)


def check_mask_input(mask_input: Optional[np.ndarray], size: int = 256) -> Optional[np.ndarray]:
    """Validate a low-resolution mask prompt: 1xHxW logits with H = W = ``size`` (256 for SAM)."""
    if mask_input is None:
        return None
    arr = _finite_array(mask_input, "mask_input")
    if arr.shape != (1, size, size):
        raise InputError(
            f"mask_input must have shape 1x{size}x{size} (low-resolution logits, e.g. the third "
            f"output of a previous predict call, one of its masks: logits[i:i+1]), got {arr.shape}."
        )
    return arr
