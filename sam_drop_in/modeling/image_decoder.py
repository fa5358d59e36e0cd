"""One entry point for decoding prompts on one image: SamPredictor and both mask generators use it.

``ImageDecoder(model, features)`` binds a Sam's prompt encoder and mask decoder to one image
embedding. Its :meth:`~ImageDecoder.decode` equals ``prompt_encoder`` followed by
``mask_decoder(...)``; :meth:`~ImageDecoder.decode_filtered` is the generators' variant that
computes mask logits only for prompts with a mask whose predicted IoU passes a threshold.

It keeps the decoder's per-image work (``_fast_decoder.prepare`` for prompts without a mask
input) between calls, computed on first use. A predictor keeps one ImageDecoder per set image
and asks :meth:`~ImageDecoder.is_current` before reusing it: the kept work is valid while the
embedding is the same tensor, unmodified, and every parameter and buffer of the prompt encoder
and mask decoder is the same tensor, at the same storage, unmodified in place. That check reads
each tensor's ``_version`` (bumped by every in-place write: optimizer steps, ``load_state_dict``,
``mul_`` under ``no_grad``) and ``data_ptr`` (changed by ``module.to(dtype or device)``); replaced
layers (quantisation) change the list of tensors. About 100 tensors: microseconds per call.

Precision (``precision.optimize``): inputs are cast to the decoder's weight dtype and outputs
returned as float32, whichever path runs.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from . import _fast_decoder
from ._running import inside
from .mask_decoder import MaskDecoder


class ImageDecoder:
    def __init__(self, model: nn.Module, features: torch.Tensor) -> None:
        """
        Arguments:
          model (Sam): supplies ``prompt_encoder`` and ``mask_decoder``.
          features (torch.Tensor): 1xCxHxW image embedding (float32) of the image to decode on.
        """
        self.model = model
        self.features = features
        self._key = self._state()
        self._side: Optional[_fast_decoder.ImageSide] = None

    def _state(self):
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        tensors = (self.features, *pe.parameters(), *pe.buffers(), *dec.parameters(), *dec.buffers())
        return [(t, t._version, t.data_ptr()) for t in tensors]

    def is_current(self, model: nn.Module, features: torch.Tensor) -> bool:
        """Whether this decoder still holds for ``model`` and ``features`` (see the module
        docstring): same objects, and no weight or the embedding changed since it was made."""
        if model is not self.model or features is not self.features:
            return False
        now = self._state()
        return len(now) == len(self._key) and all(
            a[0] is b[0] and a[1:] == b[1:] for a, b in zip(now, self._key)
        )

    def _fast(self) -> bool:
        """The fast path, unless the decoder's own forward must run: a subclass that overrides
        it, or a compiled decoder (``precision.optimize(compile=True)``)."""
        dec = self.model.mask_decoder
        return (
            type(dec).forward is MaskDecoder.forward
            and type(dec).predict_masks is MaskDecoder.predict_masks
            and getattr(dec, "_compiled_call_impl", None) is None
            and _fast_decoder.applies(dec)
        )

    def _image_side(self, mask_input: Optional[torch.Tensor], dense: torch.Tensor, dtype: torch.dtype):
        """The prepared image side: kept when there is no mask input (the dense embedding is then
        the same learned vector for every prompt), else made for this call's masks."""
        if mask_input is None and self._side is not None:
            return self._side
        pe = self.model.prompt_encoder.get_dense_pe().to(dtype)
        side = _fast_decoder.prepare(self.model.mask_decoder, self.features.to(dtype), pe,
                                     (dense if mask_input is not None else dense[:1]).to(dtype))
        if mask_input is None:
            self._side = side
        return side

    @torch.no_grad()
    def decode(
        self,
        point_coords: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Low-resolution masks for a batch of prompts in the resized (model input) frame.

        Arguments:
          point_coords (torch.Tensor or None): BxNx2 points, (X, Y); point_labels BxN (1, 0, -1).
          boxes (torch.Tensor or None): Bx4 boxes, XYXY.
          mask_input (torch.Tensor or None): Bx1x256x256 low-resolution logits.
          multimask_output (bool): the 3 ambiguity-aware masks instead of the single one.

        Returns:
          (torch.Tensor): Bx(3 or 1)x256x256 float32 mask logits.
          (torch.Tensor): Bx(3 or 1) float32 predicted IoUs.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        dec = self.model.mask_decoder
        if not self._fast():
            # The module call, hooks and any precision casting included.
            pe = self.model.prompt_encoder.get_dense_pe()
            low, iou = dec(self.features, pe, sparse, dense, multimask_output)
            return low.float(), iou.float()
        dtype = _dtype(dec)
        with inside(dec):  # its submodules run in its dtype, uncast (see precision.optimize)
            low, iou = _fast_decoder.decode(dec, self._image_side(mask_input, dense, dtype), sparse.to(dtype))
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return low[:, mask_slice].float(), iou[:, mask_slice].float()

    @torch.no_grad()
    def decode_filtered(
        self, point_coords: torch.Tensor, point_labels: torch.Tensor, iou_thresh: float
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Multimask decoding of B prompts, keeping only masks whose predicted IoU exceeds
        ``iou_thresh`` (every mask when it is 0 or less); mask logits are computed only for
        prompts that keep at least one mask. Records equal filtering ``decode``'s output.

        Arguments:
          point_coords (torch.Tensor): BxNx2 points, (X, Y) in the resized frame.
          point_labels (torch.Tensor): BxN labels.
          iou_thresh (float): predicted-IoU threshold.

        Returns:
          (torch.Tensor): Kx256x256 float32 logits of the K kept masks, prompt-major order.
          (torch.Tensor): their K float32 predicted IoUs.
          (torch.Tensor): Bx3 bool, which masks are kept.
        """
        if not self._fast():
            low, iou = self.decode(point_coords, point_labels, multimask_output=True)
            keep = iou > iou_thresh if iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            return low[keep], iou[keep], keep
        sparse, dense = self.model.prompt_encoder(points=(point_coords, point_labels), boxes=None, masks=None)
        dec = self.model.mask_decoder
        dtype = _dtype(dec)
        with inside(dec):  # its submodules run in its dtype, uncast (see precision.optimize)
            low, iou, keep = _fast_decoder.decode_filtered(
                dec, self._image_side(None, dense, dtype), sparse.to(dtype), slice(1, None), iou_thresh
            )
        return low.float(), iou.float(), keep


def _dtype(decoder: nn.Module) -> torch.dtype:
    """The dtype the decoder computes in (its embeddings are never quantised)."""
    return decoder.iou_token.weight.dtype

