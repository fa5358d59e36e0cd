import math
from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: Union[ImageEncoderViT, TinyViT, nn.Module],
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: List[float] = [123.675, 116.28, 103.53],
        pixel_std: List[float] = [58.395, 57.12, 57.375],
    ) -> None:
        """
        SAM: image encoder, prompt encoder and mask decoder.

        Arguments:
          image_encoder (nn.Module): image -> Bx256x64x64 embedding (ImageEncoderViT or TinyViT);
            must have an ``img_size`` attribute.
          prompt_encoder (PromptEncoder): encodes points, boxes and masks.
          mask_decoder (MaskDecoder): predicts masks from embeddings.
          pixel_mean (list(float)): per-channel mean of 0-255 RGB input, for normalisation.
          pixel_std (list(float)): per-channel std of 0-255 RGB input, for normalisation.
        """
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not in checkpoints (persistent=False), as upstream.
        self.register_buffer("pixel_mean", torch.Tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.Tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> Any:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """
        Predicts masks end-to-end for a batch of images and prompts; the images are encoded in
        one batched call.

        Arguments:
          batched_input (list(dict)): one dict per image with
            'image': 3xHxW tensor already transformed by ResizeLongestSide (long side 1024),
            'original_size': (H, W) before transformation,
            'point_coords' (BxNx2) and 'point_labels' (BxN), 'boxes' (Bx4), 'mask_inputs'
            (Bx1x256x256): optional prompts in the transformed frame.
          multimask_output (bool): predict 3 masks per prompt instead of 1.

        Returns:
          (list(dict)): per image 'masks' BxCxHxW bool at original size, 'iou_predictions' BxC,
            'low_res_logits' BxCx256x256.
        """
        input_images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        image_embeddings = self.image_encoder(input_images)
        image_pe = self.prompt_encoder.get_dense_pe()
        outputs = []
        for record, embedding in zip(batched_input, image_embeddings):
            points = (record["point_coords"], record["point_labels"]) if "point_coords" in record else None
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes", None), masks=record.get("mask_inputs", None)
            )
            low_res_masks, iou_predictions = self.mask_decoder(
                image_embeddings=embedding.unsqueeze(0),
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res_masks, input_size=record["image"].shape[-2:], original_size=record["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou_predictions,
                    "low_res_logits": low_res_masks,
                }
            )
        return outputs

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """
        Removes padding and upscales masks to the original image size.

        Arguments:
          masks (torch.Tensor): BxCxhxw logits from the mask decoder.
          input_size (tuple(int, int)): (H, W) of the image fed to the model, before padding.
          original_size (tuple(int, int)): (H, W) of the image before resizing.

        Returns:
          (torch.Tensor): BxCxHxW float logits, (H, W) = original_size.
        """
        size = self.image_encoder.img_size
        low = masks.shape[-1]
        input_size = tuple(int(s) for s in input_size)
        if masks.shape[-2] == low and size % low == 0:
            # Only the unpadded input region is kept, so only the low-res rows and columns that
            # reach it are upsampled. Bilinear output pixel y reads source rows floor(src) and
            # floor(src)+1, src = (y + 0.5) / f - 0.5 with f = size / low; upsampling the kept
            # block by the same integer factor f uses the same src and weights, so the values are
            # identical to upsampling everything and cropping.
            f = size // low
            keep = [min(low, max(math.floor((n - 0.5) / f - 0.5), 0) + 2) for n in input_size]
            # The kernel vectorises along a row in blocks of 16 output values: keep whole blocks
            # so that every kept value comes out of the same code path as before.
            keep[1] = low if 16 % f else min(low, -(-keep[1] * f // 16) * 16 // f)
            masks = F.interpolate(masks[..., : keep[0], : keep[1]], (keep[0] * f, keep[1] * f),
                                  mode="bilinear", align_corners=False)
        else:
            masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        original_size = tuple(int(s) for s in original_size)
        if original_size == input_size:
            return masks  # resizing to the same size is the identity (every weight 1 or 0)
        return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises pixel values and pads to a square img_size input. x: 3xHxW or Bx3xHxW."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))
