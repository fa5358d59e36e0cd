"""Model builders: ``sam_model_registry[model_type](checkpoint=...)`` as in segment_anything,
plus ``vit_t`` (MobileSAM / TinySAM TinyViT encoder)."""

import os
from functools import partial
from typing import Callable, Dict, Optional

import torch

from ._constants import PIXEL_MEAN, PIXEL_STD, REGISTRY_KEYS, normalize_model_type, registry_model_type
from ._quantized_header import quantized_format
from .checkpoint import load_into, resolve
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer
from .quantization.io import load_quantized_sam

_PROMPT_EMBED_DIM = 256
_IMAGE_SIZE = 1024
_VIT_PATCH_SIZE = 16


# What differs between the ViT variants: width, depth, heads, blocks with global attention.
_VIT_CONFIGS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
}


def build_sam_vit_h(checkpoint=None):
    return _build_sam("vit_h", checkpoint)


build_sam = build_sam_vit_h


def build_sam_vit_l(checkpoint=None):
    return _build_sam("vit_l", checkpoint)


def build_sam_vit_b(checkpoint=None):
    return _build_sam("vit_b", checkpoint)


def build_sam_vit_t(checkpoint=None):
    return _build_sam("vit_t", checkpoint)


_BUILDERS = {"vit_h": build_sam_vit_h, "vit_l": build_sam_vit_l, "vit_b": build_sam_vit_b, "vit_t": build_sam_vit_t}
# segment_anything's keys ("default" is vit_h), plus vit_t.
sam_model_registry: Dict[str, Callable[..., Sam]] = {key: _BUILDERS[normalize_model_type(key)] for key in REGISTRY_KEYS}


def build_sam_sized(model_type: str, image_size: int = _IMAGE_SIZE, checkpoint=None) -> Sam:
    """Build any registry model for a square input of ``image_size`` pixels (SAM's is 1024).

    For experiments, distillation and tests at a smaller input: no parameter of TinyViT, the
    prompt encoder or the mask decoder depends on the input size, so weights trained at one size
    load at another (the ViT's position embedding does depend on it).

    Arguments:
      model_type (str): a ``sam_model_registry`` key (default, vit_h, vit_l, vit_b, vit_t).
      image_size (int): input side in pixels, a positive multiple of 64.
      checkpoint (str | os.PathLike | None): as the registry builders; None keeps random weights.

    Returns:
      (Sam): the model in eval mode, with segment_anything's state-dict keys.
    """
    model_type = registry_model_type(model_type)
    if image_size <= 0 or image_size % 64 != 0:
        raise ValueError(f"image_size must be a positive multiple of 64, got {image_size}.")
    return _build_sam(model_type, checkpoint, image_size)


def _build_sam(model_type: str, checkpoint=None, image_size: int = _IMAGE_SIZE) -> Sam:
    # A quantised file (quantization.save_quantized) records its own architecture, recipe and
    # input size; its safetensors header alone tells it from a float checkpoint.
    if isinstance(checkpoint, (str, os.PathLike)):
        path, _ = resolve(checkpoint)
        if quantized_format(path) is not None:
            return load_quantized_sam(path, model_type=model_type)
    if model_type == "vit_t":
        encoder = TinyViT(
            img_size=image_size,
            in_chans=3,
            num_classes=1000,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    else:
        encoder = ImageEncoderViT(
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            patch_size=_VIT_PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=14,
            out_chans=_PROMPT_EMBED_DIM,
            **_VIT_CONFIGS[model_type],
        )
    return _assemble(encoder, checkpoint=checkpoint, model_type=model_type, image_size=image_size)


def _assemble(image_encoder: torch.nn.Module, checkpoint, model_type: Optional[str], image_size: int = _IMAGE_SIZE) -> Sam:
    """Wires an image encoder to SAM's prompt encoder and mask decoder, then loads weights."""
    embedding_size = image_size // _VIT_PATCH_SIZE
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=_PROMPT_EMBED_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=_PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=_PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    sam.eval()
    if checkpoint is not None:
        # Local path or hf:// path, safetensors or safe pickle, any supported layout; the loader
        # converts to this model's key layout and raises a helpful error on a mismatch.
        load_into(sam, checkpoint, model_type=model_type)
    return sam
