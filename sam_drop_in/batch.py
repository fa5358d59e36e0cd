"""Embed several images in batched encoder calls, then prompt each with a SamPredictor.

    from sam_drop_in.batch import embed_images, set_embedding

    embeddings = embed_images(predictor, [img1, img2, img3])   # encoder runs on batches
    for emb in embeddings:
        set_embedding(predictor, emb)                            # no encoder work
        masks, scores, logits = predictor.predict(point_coords=..., point_labels=...)

An ``ImageEmbedding`` is small (1x256x64x64 float32, 4 MB) and can be kept, cached or sent to
another process; ``set_embedding`` makes the predictor behave exactly as after ``set_image``.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ._errors import InputError
from ._validation import check_image

__all__ = ["ImageEmbedding", "embed_images", "set_embedding"]


@dataclass(frozen=True)
class ImageEmbedding:
    """The image-dependent state of a SamPredictor.

    Attributes:
      features (torch.Tensor): 1xCxHxW float32 image embedding (1x256x64x64 for SAM).
      original_size (tuple(int, int)): (H, W) of the image as given.
      input_size (tuple(int, int)): (H, W) after ResizeLongestSide, before padding.
    """

    features: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]


@torch.no_grad()
def embed_images(
    predictor, images: Sequence[np.ndarray], image_format: str = "RGB", batch_size: int = 4
) -> List[ImageEmbedding]:
    """Computes the embeddings of several images, ``batch_size`` images per encoder call.

    Every image is validated before any encoding, so a bad image raises without work done; the
    predictor's own state (its set image) is not touched.

    Arguments:
      predictor (SamPredictor): supplies the model and its ResizeLongestSide transform.
      images (sequence of np.ndarray): HxWx3 uint8 images (sizes may differ).
      image_format (str): 'RGB' or 'BGR', channel order of every image.
      batch_size (int): images per encoder call; larger needs more memory (about 0.5 GB of
        activations per vit_t image, 2-3 GB per vit_b image in fp32).

    Returns:
      (list of ImageEmbedding): one per image, in order; features float32 on the model's device.
    """
    if isinstance(images, np.ndarray):
        raise InputError("images must be a list of HxWx3 arrays, not one array; for one image use predictor.set_image.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    checked = []
    for i, image in enumerate(images):
        try:
            checked.append(check_image(image, image_format))
        except InputError as err:
            raise InputError(f"images[{i}]: {err}") from None
    model = predictor.model
    out: List[ImageEmbedding] = []
    for start in range(0, len(checked), batch_size):
        chunk = checked[start : start + batch_size]
        inputs, sizes = [], []
        for rgb in chunk:
            if model.image_format != "RGB":
                rgb = rgb[..., ::-1]
            resized = predictor.transform.apply_image(rgb)
            x = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1)
            inputs.append(model.preprocess(x))
            sizes.append((tuple(int(s) for s in rgb.shape[:2]), tuple(int(s) for s in resized.shape[:2])))
        features = model.image_encoder(torch.stack(inputs))
        for k, (orig, inp) in enumerate(sizes):
            out.append(ImageEmbedding(features[k : k + 1].float(), orig, inp))
    return out


def set_embedding(predictor, embedding: ImageEmbedding) -> None:
    """Makes ``predictor`` ready to predict on a precomputed embedding, as after ``set_image``.

    Arguments:
      predictor (SamPredictor): the predictor to set.
      embedding (ImageEmbedding): from ``embed_images`` (or built from ``get_image_embedding()``,
        ``original_size`` and ``input_size`` of a predictor with the same model).
    """
    if not isinstance(embedding, ImageEmbedding):
        raise InputError(f"embedding must be an ImageEmbedding from embed_images, got {type(embedding).__name__}.")
    feats = embedding.features
    if not (isinstance(feats, torch.Tensor) and feats.ndim == 4 and feats.shape[0] == 1):
        raise InputError(f"embedding.features must be a 1xCxHxW tensor, got shape {tuple(getattr(feats, 'shape', ()))}.")
    predictor.set_embedding(feats.to(predictor.device), embedding.original_size, embedding.input_size)
