from .common import LayerNorm2d, MLPBlock
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT
from .transformer import TwoWayTransformer

__all__ = [
    "Sam",
    "ImageEncoderViT",
    "TinyViT",
    "MaskDecoder",
    "PromptEncoder",
    "TwoWayTransformer",
    "LayerNorm2d",
    "MLPBlock",
]
