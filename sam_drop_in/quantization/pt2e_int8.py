"""Real int8 execution of the image encoder in PyTorch: torchao's PT2E flow with the x86
Inductor quantiser, lowered by Inductor to oneDNN's int8 kernels.

Steps (``pt2e_int8_encoder``):

1. ``torch.export`` of a copy of the float encoder at the input shape ``SamPredictor`` feeds it
   (1x3xSxS, normalised and padded); for TinyViT the copy's BatchNorms are folded into plain
   convolutions first and each MLP's residual addition is rewritten in the graph
   (``_fold_batchnorms``, ``_residual_adds_apart``: both keep every value and let Inductor run
   those layers on its int8 kernels);
2. ``prepare_pt2e`` with ``X86InductorQuantizer`` and its default static configuration: the
   convolutions (depthwise included) and linears get int8 weights (symmetric, per output
   channel) and uint8 activations (affine, per tensor, from observers); the quantiser also
   quantises the inputs of the ops around them that oneDNN can fuse (additions, pooling);
3. calibration: the calibration images, through ``SamPredictor``'s preprocessing (as the ONNX
   Runtime route uses them), run through the observed graph (observers record MinMax ranges);
4. ``convert_pt2e``: quantise/dequantise pairs around every quantised op, weights folded to int8;
5. ``torch.compile`` with Inductor's freezing: the quantise/dequantise patterns are matched and
   lowered to oneDNN ``qconv``/``qlinear`` (u8 x s8 products with int32 accumulation, on
   AVX-512 VNNI / AMX-INT8 where the CPU has them, on AVX2 otherwise), the weights prepacked.

The compile runs once, in ``pt2e_int8_encoder`` (a warm-up call on the first calibration
image), so that a failure (no C++ compiler, an unsupported torch) surfaces there and the
caller's model is left as it was. Attention products (both operands activations), softmax,
LayerNorm and GELU compute in float32, as the quantiser leaves them.

Needs the ``quant`` extra (``pip install 'sam-drop-in[quant]'``, torchao) and a C++ compiler
for Inductor. Our code uses torchao's PT2E API only, not PyTorch's deprecated quantisation
namespace.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Sequence, Union

import numpy as np
import torch
from torch import nn

from .._errors import InputError
from ..modeling.tiny_vit import Conv2d_BN, TinyViT
from .calibrate import load_calibration_images, preprocess

__all__ = ["Pt2eImageEncoder", "pt2e_int8_encoder", "torchao_available"]

_INSTALL_HINT = (
    "the PyTorch int8 route needs torchao: pip install 'sam-drop-in[quant]' (or pick the ONNX Runtime "
    "route: optimize(sam, 'int8', calibration=..., int8_runtime='onnxruntime'))"
)

Images = Union[str, Path, Sequence[np.ndarray]]


def torchao_available() -> bool:
    """Whether torchao's PT2E quantisation can be imported here.

    Returns:
      (bool): True when ``torchao.quantization.pt2e`` and its x86 Inductor quantiser import.
    """
    try:
        _torchao()
    except ImportError:
        return False
    return True


def _torchao():
    """(prepare_pt2e, convert_pt2e, x86_inductor_quantizer module), or ImportError naming the extra."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} (could not import torchao's PT2E quantisation: {e})") from e
    return prepare_pt2e, convert_pt2e, x86_inductor_quantizer


class Pt2eImageEncoder(nn.Module):
    """An image encoder whose convolutions and linears run in int8 (oneDNN through Inductor):
    the converted PT2E graph of ``pt2e_int8_encoder``, compiled with freezing.

    Arguments:
      graph (torch.fx.GraphModule): the output of ``convert_pt2e`` for a 1x3xSxS input.
      img_size (int): S.

    Attributes:
      img_size (int): the input side S, like the float encoders'.
      graph (torch.fx.GraphModule): the quantised graph (int8 weights and their scales are its
        constants; it runs correctly, but slowly, without compilation).

    Float32 Bx3xSxS in, float32 Bx256x(S/16)x(S/16) out. The graph was exported for one image,
    so a batch runs image by image (the encoder's cost is per image; one compiled shape avoids a
    recompile per batch size). The compiled function is dropped when the module is copied or
    pickled and rebuilt at the copy's first call (compiled again: tens of seconds).
    """

    def __init__(self, graph: torch.fx.GraphModule, img_size: int) -> None:
        super().__init__()
        self.graph = graph
        self.img_size = int(img_size)
        self.quantized = "int8-static-pt2e-x86-inductor"
        self._compiled = None

    def _get_compiled(self):
        if self._compiled is None:
            self._compiled = torch.compile(self.graph)
        return self._compiled

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # Freezing makes the weights constants of the compiled code: what lets Inductor fold the
        # weights' dequantisation into prepacked int8 oneDNN weights. Set for the call that
        # compiles, as the global setting (``torch.compile(options=...)`` applies it too late:
        # the weights are then traced as inputs and the prepacking meets fake tensors).
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), torch.no_grad():
            return self._get_compiled()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): Bx3xSxS float32, normalised and padded (``Sam.preprocess``), on CPU.

        Returns:
          (torch.Tensor): Bx256x(S/16)x(S/16) float32 image embeddings.
        """
        s = self.img_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"the int8 image encoder takes a Bx3x{s}x{s} tensor (Sam.preprocess output), got {shape}")
        if x.device.type != "cpu":
            raise InputError(f"the int8 image encoder runs on CPU; got a tensor on {x.device.type}")
        x = x.to(torch.float32)
        # Freezing applies under no_grad only (as set_image calls the encoder); the int8 encoder
        # is for inference, so gradients are never needed here.
        outs = [self._run(x[i : i + 1].contiguous()) for i in range(x.shape[0])]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the encoder is already compiled (with freezing) by construction.
        ``optimize(..., compile=True)`` calls this; a second, outer compile would only retrace."""

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, quantized={self.quantized!r}"

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = None  # a compiled function is tied to this object; the copy recompiles
        return state


def _fold_batchnorms(encoder: nn.Module) -> int:
    """Replace, in place, every ``tiny_vit.Conv2d_BN`` of ``encoder`` (a copy) by its
    ``fuse()``d plain ``nn.Conv2d`` (BatchNorm folded into weight and bias); returns how many.

    Why: at inference ``Conv2d_BN`` folds its BatchNorm into the weight inside its forward, so the
    exported graph convolves with a *computed* weight. The quantiser still marks it, but the
    weight's quantisation then stays in the graph, Inductor does not match the int8 convolution
    pattern, and the convolution runs in float32 on dequantised weights: measured on vit_t, 75 of
    its 81 convolutions were float32 ``mkldnn_convolution`` calls (37% of the int8 encoder's time).
    With the folded weight as a parameter they become oneDNN int8 convolutions. Same values as
    ``Conv2d_BN.forward`` at inference (the same folding formula, computed once).
    """
    count = 0
    for parent in list(encoder.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d_BN):
                setattr(parent, name, child.fuse())
                count += 1
    return count


def _residual_adds_apart(graph_module: torch.fx.GraphModule, encoder: nn.Module) -> int:
    """Rewrite, in the exported graph of a TinyViT, each ``residual + mlp.fc2(h)`` as
    ``residual - (-fc2(h))``; returns how many were rewritten (0 for other encoders).

    Why: Inductor fuses an addition that follows an int8 linear into the linear (oneDNN's binary
    post-op). After fc2 the residual is the local convolution's output seen as tokens, a
    transposed view, and for a transposed post-op operand oneDNN has only its reference int8
    matmul (``ref_int8`` with ``binary_add:f32:3:ba`` in ONEDNN_VERBOSE): 1-4 s per fc2 call at
    256 px on the AMX machine instead of a fraction of a millisecond. A contiguous copy of the
    residual inserted in the graph did not change the layout Inductor passed on; a subtraction
    of the negated output is not matched by the fusion, so fc2 runs as a plain int8 linear (the
    fast kernel) and the negation and subtraction become one elementwise pass. Same value: x - (-y)
    equals x + y exactly in floating point.
    """
    if not isinstance(encoder, TinyViT):
        return 0
    weights = {f"{name}.weight" for name, m in encoder.named_modules()
               if name.endswith("mlp.fc2") and isinstance(m, nn.Linear)}
    graph, aten, count = graph_module.graph, torch.ops.aten, 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target == aten.linear.default
                and getattr(node.args[1], "target", None) in weights):
            continue
        out = node
        while len(out.users) == 1 and next(iter(out.users)).target == aten.dropout.default:  # identity in eval
            out = next(iter(out.users))
        for add in [u for u in out.users if u.target == aten.add.Tensor and len(u.args) == 2 and not u.kwargs]:
            other = add.args[0] if add.args[1] is out else add.args[1]
            with graph.inserting_before(add):
                sub = graph.call_function(aten.sub.Tensor, (other, graph.call_function(aten.neg.default, (out,))))
            add.replace_all_uses_with(sub)
            graph.erase_node(add)
            count += 1
    graph.lint()
    graph_module.recompile()
    return count


@torch.no_grad()
def pt2e_int8_encoder(sam: nn.Module, calibration: Images, *, warm_up: bool = True) -> Pt2eImageEncoder:
    """``sam``'s image encoder statically quantised to int8 with torchao's PT2E flow and the x86
    Inductor quantiser, compiled and ready to run on CPU (see the module docstring).

    Arguments:
      sam (Sam): any model type, float32, on CPU (not modified; its encoder is copied).
      calibration (str, Path or list of np.ndarray): a folder of images or HxWx3 uint8 RGB
        arrays (a handful of photographs like the ones you will segment); their activation
        ranges (MinMax) set the int8 scales.
      warm_up (bool): compile now (one call on the first calibration image) rather than at the
        first use, so a compile failure surfaces here. Tests that only check the graph pass False.

    Returns:
      (Pt2eImageEncoder): use it as ``sam.image_encoder``.

    Raises ImportError (naming the ``quant`` extra) without torchao; InputError for a model that
    is not float32 on CPU, or bad calibration images; RuntimeError (with what to do) when
    Inductor cannot compile the quantised encoder.
    """
    arrays = load_calibration_images(calibration)
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    param = next(sam.image_encoder.parameters(), None)
    if param is None or param.dtype != torch.float32 or param.device.type != "cpu":
        raise InputError(
            "the int8 encoder is built from a float32 image encoder on CPU (a model fresh from "
            "sam_model_registry); quantise before any other change of precision or device."
        )
    inputs = [preprocess(sam, a) for a in arrays]
    encoder = copy.deepcopy(sam.image_encoder).eval()
    _fold_batchnorms(encoder)
    exported = torch.export.export(encoder, (inputs[0],)).module()
    _residual_adds_apart(exported, encoder)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(exported, quantizer)
    for x in inputs:
        observed(x)
    result = Pt2eImageEncoder(convert_pt2e(observed), sam.image_encoder.img_size)
    if warm_up:
        try:
            result(inputs[0])
        except Exception as e:  # Inductor's failures come as several types (C++ build, lowering)
            raise RuntimeError(
                "Inductor could not compile the int8 encoder (it needs a C++ compiler, e.g. g++, on PATH): "
                f"{type(e).__name__}: {e}. Install one, or use optimize(sam, 'int8', calibration=..., "
                "int8_runtime='onnxruntime')."
            ) from e
    return result
