"""Calibration: run a few images through the real model, then search every quantiser."""

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .._errors import InputError
from ..utils.transforms import ResizeLongestSide
from ..modeling.image_encoder import ImageEncoderViT
from ..modeling.tiny_vit import TinyViT
from .recipe import QuantRecipe, get_recipe
from .tinyvit import QuantizedTinyViT
from .vit import QuantizedViT

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def load_calibration_images(images: Union[str, Path, Sequence[np.ndarray]]) -> list:
    """HxWx3 uint8 RGB arrays from a folder (its image files, sorted by name) or a list of arrays."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise InputError(f"calibration folder {str(folder)!r} does not exist; pass a folder of images or a list of HxWx3 uint8 arrays")
        from PIL import Image

        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"calibration folder {str(folder)!r} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
        arrays = []
        for f in files:
            with Image.open(f) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        return arrays
    arrays = list(images)
    if not arrays:
        raise InputError("no calibration images given; pass a folder or a non-empty list of HxWx3 uint8 arrays")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            desc = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise InputError(f"calibration image {i} is a {desc}; expected an HxWx3 uint8 RGB array")
    return arrays


def preprocess(sam, image: np.ndarray) -> torch.Tensor:
    """1x3xSxS encoder input as SamPredictor.set_image makes it (resize longest side, normalise, pad)."""
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(image)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    return sam.preprocess(x)


@torch.no_grad()
def calibrate(sam, images, recipe: Union[str, QuantRecipe] = "w8a8") -> Union[QuantizedTinyViT, QuantizedViT]:
    """Post-training quantisation of ``sam``'s image encoder (TinyViT or ViT), simulated in float32.

    Each calibration image runs through the float encoder (copied; ``sam`` is not changed) while
    the substituted layers record, in their own forward, every quantised input's range and a
    sample of it. Then, layer by layer on those float inputs: per-output-channel weight scales are chosen
    from ``recipe.weight_search`` by the output MSE of each channel, and the input's per-tensor
    range from ``recipe.act_search`` by the output MSE of the layer with its quantised weight
    (PTQ4ViT's search, without Hessian weighting). Attention product inputs are searched by the
    MSE of the product.

    Arguments:
      sam (Sam): a model with a ``vit_t`` (TinyViT) or ``vit_b`` / ``vit_l`` / ``vit_h``
        (ImageEncoderViT) image encoder, float32.
      images (str, Path or list of np.ndarray): a folder of images, or HxWx3 uint8 RGB arrays.
      recipe (str or QuantRecipe): "w8a8", "w6a6" or a QuantRecipe.

    Returns:
      (QuantizedTinyViT or QuantizedViT): the fake-quant encoder, by the encoder's type; use it
        as ``sam.image_encoder`` (takes and returns float32 like the original).
    """
    recipe = get_recipe(recipe)
    encoder = sam.image_encoder
    quantized_type = _quantized_type(encoder)
    arrays = load_calibration_images(images)
    if next(encoder.parameters()).dtype != torch.float32:
        raise InputError("calibrate needs a float32 model; calibrate before precision.optimize")
    qenc = quantized_type(encoder, recipe).to(sam.device)
    qenc.set_observing(True)
    for image in arrays:
        qenc(preprocess(sam, image))
    qenc.set_observing(False)
    for m in qenc.quant_modules():
        m.search(recipe)
        m.finalize()
    return qenc


def _quantized_type(encoder):
    """The fake-quant class for an image encoder, by its type (exact classes and subclasses)."""
    if isinstance(encoder, TinyViT):
        return QuantizedTinyViT
    if isinstance(encoder, ImageEncoderViT):
        return QuantizedViT
    if isinstance(encoder, (QuantizedTinyViT, QuantizedViT)):
        raise TypeError(f"the image encoder is already quantised ({type(encoder).__name__}); calibrate the float model")
    raise TypeError(f"calibrate quantises TinyViT (vit_t) and ImageEncoderViT (vit_b / vit_l / vit_h) image encoders, "
                    f"got {type(encoder).__module__}.{type(encoder).__name__}; wrappers from precision.optimize or "
                    "torch.compile are not supported: calibrate the plain float32 model")
