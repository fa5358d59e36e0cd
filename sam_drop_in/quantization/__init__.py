"""Post-training quantisation of the image encoder (simulated, "fake-quant").

``calibrate(sam, images, "w8a8")`` returns a ``QuantizedTinyViT`` (vit_t) or a ``QuantizedViT``
(vit_b / vit_l / vit_h) whose convolutions, linears and attention products compute with
integer-exact quantised values in float32; ``save_quantized``/``load_quantized`` store it as
safetensors (with the prompt encoder and mask decoder when given a ``Sam``:
``sam_model_registry[...](checkpoint=...)`` loads such a file). See docs/quantization.md.
"""

from .calibrate import calibrate, load_calibration_images, preprocess
from .fake_quant import (
    ActQuant,
    QConv2d,
    QLinear,
    dequantize_weight,
    fake_quant_affine,
    fake_quant_twin_gelu,
    fake_quant_twin_softmax,
    quantize_weight,
)
from .io import load_quantized, load_quantized_sam, save_quantized
from .qtinysam import QTinySAM, read_qtinysam
from .recipe import RECIPES, W6A6, W8A8, QuantRecipe, get_recipe
from .tinyvit import QAttention, QuantizedTinyViT
from .vit import QPatchConv2d, QuantizedViT, QViTAttention

__all__ = [
    "ActQuant", "QAttention", "QTinySAM", "QConv2d", "QLinear", "QPatchConv2d", "QViTAttention", "QuantRecipe",
    "QuantizedTinyViT", "QuantizedViT", "RECIPES", "W6A6", "W8A8",
    "calibrate", "dequantize_weight", "fake_quant_affine", "fake_quant_twin_gelu", "fake_quant_twin_softmax",
    "get_recipe", "load_calibration_images", "load_quantized", "load_quantized_sam", "preprocess", "quantize_weight", "read_qtinysam", "save_quantized",
]
