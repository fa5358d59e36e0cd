"""Sam.postprocess_masks at inference: upsample only the low-resolution region that is kept.

What it computes differently: upstream upsamples the whole padded square (256 -> 1024 per side),
crops the unpadded input region and resizes that to the original size. Here only the low-res
rows and columns that reach the kept region are upsampled, and the final resize is skipped when
it would be the identity. Bilinear output pixel y reads source rows floor(src) and floor(src)+1,
src = (y + 0.5) / f - 0.5 with f = img_size / low; upsampling the kept block by the same integer
factor f uses the same src and weights, so every kept value is the same. PyTorch's CPU bilinear
kernel vectorises along a row in blocks of 16 output values, so whole blocks are kept and every
value comes out of the same code path: the results are bit-identical.

When it is chosen: eager inference without gradients (``common.eager_inference()``), where the
sizes are Python integers known when the code runs (a traced graph would bake them in).

Proven equal (bit for bit, ``torch.equal``) to upsampling everything, over many input and original
sizes, by tests/test_decoder.py::test_postprocess_is_bit_identical_to_upsampling_everything.
"""

import math
from typing import Tuple

import torch
from torch.nn import functional as F


def postprocess_masks(
    masks: torch.Tensor, img_size: int, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
) -> torch.Tensor:
    """``Sam.postprocess_masks`` for a model whose encoder input is ``img_size`` square."""
    low = masks.shape[-1]
    input_size = tuple(int(s) for s in input_size)
    if masks.shape[-2] == low and img_size % low == 0:
        f = img_size // low
        keep = [min(low, max(math.floor((n - 0.5) / f - 0.5), 0) + 2) for n in input_size]
        keep[1] = low if 16 % f else min(low, -(-keep[1] * f // 16) * 16 // f)  # whole 16-value blocks
        masks = F.interpolate(masks[..., : keep[0], : keep[1]], (keep[0] * f, keep[1] * f),
                              mode="bilinear", align_corners=False)
    else:
        masks = F.interpolate(masks, (img_size, img_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    original_size = tuple(int(s) for s in original_size)
    if original_size == input_size:
        return masks  # resizing to the same size is the identity (every weight 1 or 0)
    return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
