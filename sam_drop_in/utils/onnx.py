"""Traceable wrappers around a ``Sam`` model for ONNX export.

``SamOnnxModel`` keeps the constructor, input names, output names and behaviour of
``segment_anything.utils.onnx.SamOnnxModel`` (prompt encoder + mask decoder + mask
post-processing in one graph). ``SamEncoderOnnxModel`` is new: the image encoder, with or
without the normalise-and-pad preprocessing inside the graph.

Both are written for the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``),
see ``sam_drop_in.onnx_export`` for why.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SamOnnxModel", "SamEncoderOnnxModel"]


def _stability_score(masks: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    # IoU between the masks thresholded at threshold+offset and threshold-offset. Counts are
    # summed as int32 (exact for any image ONNX Runtime can hold in memory) and only the ratio
    # is taken in float32, which is what the amg helper computes too.
    high = (masks > (mask_threshold + offset)).to(torch.int32).sum(dim=(-2, -1))
    low = (masks > (mask_threshold - offset)).to(torch.int32).sum(dim=(-2, -1))
    return high.to(torch.float32) / low.to(torch.float32)


class SamOnnxModel(nn.Module):
    """Prompt encoder, mask decoder and mask post-processing of a ``Sam`` as one traceable module.

    Not meant to be called in normal use: it exists to be exported with ``torch.onnx.export``
    (see ``sam_drop_in.onnx_export.export_decoder``). Works for every model type (vit_h, vit_l,
    vit_b, vit_t) because the prompt encoder and mask decoder are the same for all of them.

    Inputs of ``forward`` (names as in the exported graph, all float32):
      image_embeddings: 1x256x64x64, the image encoder's output.
      point_coords: 1xNx2, (X, Y) in the resized (long side 1024) input frame, N dynamic.
      point_labels: 1xN, 1 foreground, 0 background, 2 box top-left, 3 box bottom-right,
        -1 padding point (ignored, gets the "not a point" embedding).
      mask_input: 1x1x256x256 low-resolution mask logits from an earlier prediction.
      has_mask_input: shape 1, 1.0 to use ``mask_input``, 0.0 to ignore it.
      orig_im_size: shape 2, (H, W) of the original image.

    Outputs: ``masks`` 1xCxHxW logits at the original size, ``iou_predictions`` 1xC,
    ``low_res_masks`` 1xCx256x256 logits, where C is 4 (all mask tokens: index 0 is the
    single-mask output, 1..3 the multimask outputs) or 1 with ``return_single_mask``. With
    ``return_extra_metrics`` the outputs are ``masks, scores, stability_scores, areas,
    low_res_masks`` (areas int64).
    """

    def __init__(
        self,
        model: nn.Module,
        return_single_mask: bool,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        """
        Arguments:
          model (Sam): the model whose prompt encoder and mask decoder are wrapped (shared, not
            copied).
          return_single_mask (bool): return only the best mask: the multimask output with the
            highest score when one point was given, the single-mask output otherwise.
          use_stability_score (bool): replace the predicted IoU by the stability score of the
            low-resolution logits (offset 1.0).
          return_extra_metrics (bool): also return stability scores and areas of the upscaled
            masks.
        """
        super().__init__()
        self.mask_decoder = model.mask_decoder
        self.model = model
        self.img_size = model.image_encoder.img_size
        self.return_single_mask = return_single_mask
        self.use_stability_score = use_stability_score
        self.stability_score_offset = 1.0
        self.return_extra_metrics = return_extra_metrics

    @staticmethod
    def resize_longest_image_size(input_image_size: torch.Tensor, longest_side: int) -> torch.Tensor:
        """(H, W) after scaling so that the long side is ``longest_side``, rounded half up.

        Computed in float64, in the same order as ``ResizeLongestSide.get_preprocess_shape``
        (Python floats), so the crop always matches the size the image was resized to. Upstream
        uses float32 here, which can be one pixel off for some sizes.

        Arguments:
          input_image_size (torch.Tensor): shape 2, (H, W), any numeric dtype.
          longest_side (int): target long side.

        Returns:
          (torch.Tensor): shape 2, int64, (H, W).
        """
        size = input_image_size.to(torch.float64)
        scale = float(longest_side) / torch.max(size)
        return torch.floor(size * scale + 0.5).to(torch.int64)

    def _embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        # The prompt encoder's maths, with label masks instead of its boolean indexing so that it
        # traces, and labels 2 and 3 (box corners) given as points.
        prompt_encoder = self.model.prompt_encoder
        # Random Fourier features of the pixel centres: 1xNx256.
        embedding = prompt_encoder.pe_layer.forward_with_coords(point_coords + 0.5, (self.img_size, self.img_size))
        labels = point_labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i in range(prompt_encoder.num_point_embeddings):
            embedding = embedding + prompt_encoder.point_embeddings[i].weight * (labels == i)
        return embedding

    def _embed_masks(self, input_mask: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        prompt_encoder = self.model.prompt_encoder
        # Both branches are computed and blended so the graph has no control flow.
        mask_embedding = has_mask_input * prompt_encoder.mask_downscaling(input_mask)
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return mask_embedding + (1 - has_mask_input) * no_mask

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """Upscale low-resolution logits to the padded input, drop the padding, resize to the
        original image size (the same steps as ``Sam.postprocess_masks``).

        Arguments:
          masks (torch.Tensor): 1xCx256x256 float32 logits.
          orig_im_size (torch.Tensor): shape 2, (H, W).

        Returns:
          (torch.Tensor): 1xCxHxW float32 logits.
        """
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        # Python slicing with int(tensor) would be frozen to the example size by the tracer;
        # index_select over an arange keeps the crop size a function of the orig_im_size input.
        masks = masks.index_select(2, torch.arange(prepadded[0], device=masks.device))
        masks = masks.index_select(3, torch.arange(prepadded[1], device=masks.device))
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pick one mask without control flow: with more than two prompt points (a padded single
        click has two) the single-mask output (index 0) wins by a large bonus, otherwise the
        multimask output with the best score.

        Arguments:
          masks (torch.Tensor): 1xCx256x256 logits, C = number of mask tokens.
          iou_preds (torch.Tensor): 1xC scores.
          num_points (int): number of points given to the decoder, padding included.

        Returns:
          (torch.Tensor, torch.Tensor): 1x1x256x256 logits and 1x1 score.
        """
        num_tokens = self.model.mask_decoder.num_mask_tokens
        bonus = torch.tensor([[1000] + [0] * (num_tokens - 1)], device=iou_preds.device)
        score = iou_preds + (num_points - 2.5) * bonus
        best = torch.argmax(score, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best, :, :].unsqueeze(1), iou_preds[rows, best].unsqueeze(1)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ):
        """See the class docstring for the inputs and outputs."""
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        # predict_masks returns every mask token's output (1x4x256x256, 1x4), before the
        # single/multi selection that MaskDecoder.forward applies.
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.use_stability_score:
            scores = _stability_score(masks, self.model.mask_threshold, self.stability_score_offset)
        if self.return_single_mask:
            masks, scores = self.select_masks(masks, scores, point_coords.shape[1])

        upscaled = self.mask_postprocessing(masks, orig_im_size)
        if self.return_extra_metrics:
            stability = _stability_score(upscaled, self.model.mask_threshold, self.stability_score_offset)
            areas = (upscaled > self.model.mask_threshold).to(torch.int64).sum(dim=(-2, -1))
            return upscaled, scores, stability, areas, masks
        return upscaled, scores, masks


class SamEncoderOnnxModel(nn.Module):
    """The image encoder of a ``Sam``, optionally with its preprocessing, for ONNX export.

    Input contract with ``include_preprocessing=True`` (graph input ``input_image``):
      float32 array of shape HxWx3, RGB, values 0..255 (not normalised), already resized so
      that max(H, W) == 1024 (``img_size``) with ``ResizeLongestSide(1024).apply_image``, i.e.
      a PIL bilinear resize of the uint8 image, then cast to float32. H and W are dynamic.
      The graph normalises with the model's ``pixel_mean`` / ``pixel_std`` and zero-pads
      bottom/right to 1024x1024, exactly as ``Sam.preprocess``.

    Input contract with ``include_preprocessing=False`` (graph input ``x``): float32 Bx3x1024x1024,
    already normalised and padded (the output of ``Sam.preprocess``); B is dynamic.

    Output ``image_embeddings``: float32 Bx256x64x64 (B = 1 with preprocessing).
    """

    def __init__(self, model: nn.Module, include_preprocessing: bool = True) -> None:
        """
        Arguments:
          model (Sam): the model whose image encoder is wrapped (shared, not copied).
          include_preprocessing (bool): put normalisation and padding inside the graph.
        """
        super().__init__()
        self.image_encoder = model.image_encoder
        self.img_size = model.image_encoder.img_size
        self.include_preprocessing = include_preprocessing
        # Copies, so the exported constants do not depend on the model's device or later edits.
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone().float().reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone().float().reshape(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): HxWx3 float32 RGB image (with preprocessing) or Bx3x1024x1024
            normalised, padded batch (without); see the class docstring.

        Returns:
          (torch.Tensor): Bx256x64x64 float32 image embeddings.
        """
        if self.include_preprocessing:
            x = x.permute(2, 0, 1).unsqueeze(0)  # HxWx3 -> 1x3xHxW
            x = (x - self.pixel_mean) / self.pixel_std
            h, w = x.shape[-2:]
            x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return self.image_encoder(x)
