"""ResizeLongestSide: the resize applied before the image encoder, and the same mapping for
prompt coordinates. The numpy methods need no torch (SamOnnxPredictor uses them on a torch-free
install); the ``*_torch`` methods take tensors, so torch is there whenever they are called."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from PIL import Image

try:
    import torch
    from torch.nn import functional as F
except ImportError:  # a torch-free install: only the numpy methods are usable
    torch = F = None

from .._validation import check_resizable, resized_size, to_uint8


class ResizeLongestSide:
    """
    Resizes images so that their longest side is ``target_length``, and maps coordinates and
    boxes accordingly. Numpy and torch variants.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """
        Resizes ``image`` so that its long side is ``target_length`` (PIL bilinear).

        Arguments:
          image (np.ndarray): HxWxC (or HxW), uint8 with values in [0, 255] or float with values
            in [0, 1]; floats are converted as segment_anything does (times 255, truncated).
            Each side must be at least 1 pixel after resizing.

        Returns:
          (np.ndarray): H'xW'xC uint8, max(H', W') == target_length.
        """
        image = to_uint8(np.asarray(image))
        check_resizable(image.shape[0], image.shape[1], self.target_length)
        new_h, new_w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        # PIL's bilinear filter (with its antialiasing on downscale) is what the SAM checkpoints
        # were used with through torchvision's PIL path; keep it for identical inputs.
        resized = Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR)
        return np.array(resized)  # writable, so torch.as_tensor can share it

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """...x2 (X, Y) pixel coordinates in an image of ``original_size`` (H, W) -> float64 copy
        in the resized frame."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)
        coords = np.array(coords, dtype=float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, ...]) -> np.ndarray:
        """Bx4 XYXY boxes -> Bx4 float64 boxes in the resized frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """BxCxHxW float tensor -> resized BxCxH'xW' (bilinear, antialiased)."""
        # H and W are axes 2 and 3 of a BCHW batch (segment_anything 1.0 read axes 0 and 1).
        target_size = self.get_preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, target_size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """...x2 (X, Y) tensor -> float32 copy in the resized frame."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)
        coords = coords.to(torch.float, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, ...]) -> torch.Tensor:
        """Bx4 XYXY tensor -> Bx4 float32 boxes in the resized frame."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> Tuple[int, int]:
        """(H, W) after resizing so that the long side is ``long_side_length`` (rounded half up)."""
        return resized_size(oldh, oldw, long_side_length)
