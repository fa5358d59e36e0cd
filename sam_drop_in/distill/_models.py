"""Model construction, image loading and preprocessing shared by the distillation tools.

Every model here is built from ``sam_drop_in.modeling`` with the same keyword arguments and
state-dict keys as ``segment_anything`` / ``mobile_sam``. At the standard 1024-pixel input the
registry builders are used as they are; a smaller ``image_size`` (for quick experiments and the
test-suite) builds the same architectures with a smaller input grid. TinyViT, the prompt encoder
and the mask decoder have no parameter whose shape depends on the input size, so a ``vit_t``
trained at any size loads strictly into ``sam_model_registry["vit_t"]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._constants import PIXEL_MEAN, PIXEL_STD, registry_model_type
from ..build_sam import build_sam_sized
from ..checkpoint import load_state_dict
from ..utils.transforms import ResizeLongestSide

DEFAULT_IMAGE_SIZE = 1024
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_head_state(checkpoint: str, model_type: str) -> Dict[str, torch.Tensor]:
    """The prompt_encoder.* and mask_decoder.* tensors of a checkpoint.

    Arguments:
      checkpoint (str): local path or ``hf://OWNER/REPO[@REV]/FILE``.
      model_type (str): registry model type the file is meant for.

    Returns:
      dict[str, Tensor]: those tensors, segment_anything keys.
    """
    sd = load_state_dict(str(checkpoint), model_type=registry_model_type(model_type))
    head = {k: v for k, v in sd.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    if not head:
        raise ValueError(f"{checkpoint} holds no prompt_encoder.*/mask_decoder.* weights.")
    return head


def load_head(sam: nn.Module, head: Dict[str, torch.Tensor], origin: object) -> nn.Module:
    """Load :func:`read_head_state`'s tensors into ``sam`` (its image encoder untouched); returns
    ``sam``. ValueError naming ``origin`` when they do not fit."""
    missing, unexpected = sam.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("image_encoder.")]
    if missing or unexpected:
        raise ValueError(f"the prompt encoder / mask decoder weights of {origin} do not fit: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return sam


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
    return build_sam_sized(model_type, image_size, None if checkpoint is None else str(checkpoint)).to(device).eval()


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


def preprocess(image: np.ndarray, image_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """SAM preprocessing of one RGB image: resize long side, normalise, pad bottom-right.

    Arguments:
      image (np.ndarray): HxWx3 uint8 RGB.
      image_size (int): model input side.

    Returns:
      (Tensor 3xSxS float32, (h, w) size after resizing, before padding).
    """
    resized = ResizeLongestSide(image_size).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous().float()
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, image_size - w, 0, image_size - h))
    return x, (int(h), int(w))

