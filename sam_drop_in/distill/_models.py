"""Model construction, image loading and preprocessing shared by the distillation tools.

Every model here is built from ``sam_drop_in.modeling`` with the same keyword arguments and
state-dict keys as ``segment_anything`` / ``mobile_sam``. At the standard 1024-pixel input the
registry builders are used as they are; a smaller ``image_size`` (for quick experiments and the
test-suite) builds the same architectures with a smaller input grid. TinyViT, the prompt encoder
and the mask decoder have no parameter whose shape depends on the input size, so a ``vit_t``
trained at any size loads strictly into ``sam_model_registry["vit_t"]``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

DEFAULT_IMAGE_SIZE = 1024
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

MODEL_TYPES = ("default", "vit_h", "vit_l", "vit_b", "vit_t")


def _canonical_type(model_type: str) -> str:
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}."
        )
    return "vit_h" if model_type == "default" else model_type


def build_tinyvit(image_size: int = DEFAULT_IMAGE_SIZE) -> nn.Module:
    """Build the MobileSAM/TinySAM TinyViT image encoder (random weights).

    Arguments:
      image_size (int): square input side in pixels, a multiple of 64.

    Returns:
      nn.Module: TinyViT whose output is Bx256x(image_size/16)x(image_size/16).
    """
    return build_sam_sized("vit_t", image_size).image_encoder


def build_sam_sized(model_type: str, image_size: int = DEFAULT_IMAGE_SIZE, checkpoint: Optional[str] = None) -> nn.Module:
    """Build a SAM model of ``model_type`` for a square input of ``image_size``.

    Arguments:
      model_type (str): one of default, vit_h, vit_l, vit_b, vit_t.
      image_size (int): input side in pixels; 1024 is the published size. Must be a multiple of 64.
      checkpoint (str or None): local or ``hf://`` weights, loaded strictly; None keeps random
        weights. A mismatch (e.g. a ViT position embedding trained at another size) raises
        CheckpointError, a ValueError naming the keys or shapes.

    Returns:
      Sam: the model in eval mode, same state-dict keys as segment_anything's.
    """
    from sam_drop_in.build_sam import _build

    model_type = _canonical_type(model_type)
    if image_size % 64 != 0 or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of 64, got {image_size}.")
    return _build(model_type, checkpoint=None if checkpoint is None else str(checkpoint), image_size=image_size)


def read_state_dict(checkpoint: str, model_type: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint (local path or ``hf://``) as a segment_anything-layout state dict.

    Arguments:
      checkpoint (str): path or ``hf://OWNER/REPO[@REV]/FILE``.
      model_type (str): registry model type the file is meant for.

    Returns:
      dict[str, Tensor]: state dict in segment_anything layout.
    """
    from sam_drop_in.checkpoint import load_state_dict

    return load_state_dict(str(checkpoint), model_type=_canonical_type(model_type))


def load_sam(
    model_type: str,
    checkpoint: Optional[str] = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    device: str = "cpu",
) -> nn.Module:
    """Build a SAM model and load its weights strictly.

    At 1024 pixels this equals ``sam_model_registry[model_type](checkpoint=checkpoint)``.

    Arguments:
      model_type (str): registry model type.
      checkpoint (str or None): local path or ``hf://`` path; None keeps random weights.
      image_size (int): input side in pixels.
      device (str): torch device.

    Returns:
      Sam: in eval mode on ``device``.
    """
    sam = build_sam_sized(model_type, image_size, checkpoint)
    sam.to(device)
    sam.eval()
    return sam


def encoder_forward(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run an image encoder on a preprocessed batch.

    Arguments:
      encoder (nn.Module): ImageEncoderViT or TinyViT.
      x (Tensor): Bx3xSxS float32, normalised and padded.

    Returns:
      Tensor: Bx256x(S/16)x(S/16) image embeddings.
    """
    # sam_drop_in's encoders take any square size that is a multiple of 64.
    return encoder(x)


def list_images(root: str) -> list:
    """Image files below ``root`` (recursive), as sorted POSIX paths relative to ``root``.

    Arguments:
      root (str): folder.

    Returns:
      list[str]: relative paths with extensions in IMAGE_EXTENSIONS, sorted.
    """
    rootp = Path(root)
    if not rootp.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist or is not a folder.")
    out = []
    for dirpath, _, files in os.walk(rootp):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(Path(dirpath, f).relative_to(rootp).as_posix())
    out.sort()
    return out


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_rgb(path: str) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB.

    Arguments:
      path (str): image file.

    Returns:
      np.ndarray: HxWx3 uint8, RGB.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise ValueError(f"Cannot read image {path}: {exc}. Remove or replace the file.") from exc


def resize_longest_side(image: np.ndarray, target: int) -> np.ndarray:
    """Resize HxWx3 uint8 so its long side is ``target`` (the SAM predictor's resize).

    Arguments:
      image (np.ndarray): HxWx3 uint8.
      target (int): long side in pixels.

    Returns:
      np.ndarray: H'xW'x3 uint8.
    """
    from sam_drop_in.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(target).apply_image(image)


_PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
_PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


def preprocess(image: np.ndarray, image_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """SAM preprocessing of one RGB image: resize long side, normalise, pad bottom-right.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      image_size (int): model input side.

    Returns:
      (Tensor 3xSxS float32, (h, w) size after resizing, before padding).
    """
    resized = resize_longest_side(image, image_size)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous().float()
    x = (x - _PIXEL_MEAN) / _PIXEL_STD
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, image_size - w, 0, image_size - h))
    return x, (int(h), int(w))


def transform_coords(coords: np.ndarray, original_size: Sequence[int], image_size: int) -> np.ndarray:
    """Map Nx2 (x, y) pixel coordinates of the original image to model input coordinates."""
    h, w = original_size
    scale = image_size * 1.0 / max(h, w)
    out = np.asarray(coords, dtype=np.float64).copy()
    out[..., 0] = out[..., 0] * (int(w * scale + 0.5) / w)
    out[..., 1] = out[..., 1] * (int(h * scale + 0.5) / h)
    return out
