from typing import Any, Dict, List, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .._constants import PIXEL_MEAN, PIXEL_STD
from . import _fast_postprocess
from .common import eager_inference
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
        pixel_mean: List[float] = list(PIXEL_MEAN),
        pixel_std: List[float] = list(PIXEL_STD),
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
        if eager_inference():  # same values, less work: only the kept region is upsampled
            return _fast_postprocess.postprocess_masks(masks, self.image_encoder.img_size, input_size, original_size)
        masks = F.interpolate(
            masks, (self.image_encoder.img_size, self.image_encoder.img_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        masks = F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
        return masks

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalises pixel values and pads to a square img_size input. x: 3xHxW or Bx3xHxW."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_encoder.img_size
        return F.pad(x, (0, size - w, 0, size - h))
