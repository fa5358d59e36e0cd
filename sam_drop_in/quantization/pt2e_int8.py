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
   channel) and uint8 activations (affine, per tensor, from observers; codes 0..127 instead of
   0..255 where the CPU's int8 products saturate: ``int8_products_saturate``); the quantiser also
   quantises the inputs of the ops around them that oneDNN can fuse (additions, pooling);
3. calibration: the calibration images, through ``SamPredictor``'s preprocessing (as the ONNX
   Runtime route uses them), run through the observed graph (the quantiser's default
   activation observer, ``HistogramObserver``, chooses each range from a histogram of the
   values to minimise the quantisation error; weights: per-channel min/max);
4. ``convert_pt2e``: quantise/dequantise pairs around every quantised op, weights folded to int8;
5. ``torch.compile`` with Inductor's freezing: the quantise/dequantise patterns are matched and
   lowered to oneDNN ``qconv``/``qlinear`` (u8 x s8 products with int32 accumulation, on
   AVX-512 VNNI / AMX-INT8 where the CPU has them, on AVX2 otherwise), the weights prepacked;
   before that, ``_clamp_narrow_ranges`` keeps every activation code within its range where that
   range is narrower than uint8's (7-bit or 6-bit codes).

From an already quantised encoder (``quantization.calibrate``'s, or one loaded from a file that
``sam-drop-in quantize`` wrote) step 3 is replaced: the exported encoder computes with that
encoder's dequantised weights and every observer is fixed to its searched parameters
(``_set_observers_from``), so the file's integer weight codes are what the int8 kernels multiply
and no image is needed; 6-bit settings run as 6-bit codes in the same int8 kernels
(``_clamp_narrow_ranges``).

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
import functools
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .._errors import InputError
from ..modeling.tiny_vit import Conv2d_BN, TinyViT
from .calibrate import load_calibration_images, preprocess

__all__ = ["Pt2eImageEncoder", "int8_products_saturate", "pt2e_int8_encoder", "torchao_available"]

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

      quantized (str): how it was quantised: "int8-static-pt2e-x86-inductor" (calibrated here,
        histogram observers), or "<recipe>-pt2e-x86-inductor" (e.g. "w8a8-...", "w6a6-...": the searched scales
        of a ``quantization.calibrate`` / saved quantised model); "-a7" appended where the CPU's
        int8 products saturate and activations were held to 7 bits (``int8_products_saturate``).

    Attributes:
      img_size (int): the input side S, like the float encoders'.
      graph (torch.fx.GraphModule): the quantised graph (int8 weights and their scales are its
        constants; it runs correctly, but slowly, without compilation).

    Float32 Bx3xSxS in, float32 Bx256x(S/16)x(S/16) out. The graph was exported for one image,
    so a batch runs image by image (the encoder's cost is per image; one compiled shape avoids a
    recompile per batch size). The compiled function is dropped when the module is copied or
    pickled and rebuilt at the copy's first call (compiled again: tens of seconds).
    """

    def __init__(self, graph: torch.fx.GraphModule, img_size: int,
                 quantized: str = "int8-static-pt2e-x86-inductor") -> None:
        super().__init__()
        self.graph = graph
        self.img_size = int(img_size)
        self.quantized = quantized
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


@functools.lru_cache(maxsize=None)
def int8_products_saturate() -> bool:
    """Whether oneDNN's u8 x s8 int8 products saturate in this process (CPUs without VNNI).

    Without VNNI (AVX2 and AVX-512 machines before Cascade Lake, or oneDNN capped there with
    ``ONEDNN_MAX_CPU_ISA``) oneDNN multiplies uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds each pair of products in int16 and saturates at 32767: two codes
    of 255 x 127 (64770) come out as 32767. The answer comes from oneDNN itself: one int8 linear
    of 255s times 127s, whose exact sum is known. Measured here: exact with AVX-512 VNNI / AMX,
    saturated with oneDNN capped at AVX2 or AVX512_CORE.

    Returns:
      (bool): True when activations must stay within 7 bits (codes 0..127, whose pairs cannot
        reach 32767) for int8 products to be exact; False with VNNI / AMX.
    """
    k = 64
    try:
        x = torch.full((1, k), 255, dtype=torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(torch.full((1, k), 127, dtype=torch.int8), [1, k])
        out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, torch.ones(1), torch.zeros(1, dtype=torch.int64),
                                                 None, 1.0, 0, torch.float32, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        # No oneDNN int8 kernels in this build (a non-x86 CPU, say): nothing to adapt to here;
        # the int8 route's compile then fails with its own message.
        return False
    return float(out) != 255 * 127 * k


def _within_seven_bits(scale: float, zero_point: int, quant_min: int, quant_max: int):
    """The same float range as (scale, zero_point) on codes [quant_min, quant_max], requantised
    onto 128 codes [0, 127] (for CPUs whose int8 products saturate: ``int8_products_saturate``);
    ranges already within 128 codes are returned unchanged."""
    if quant_max - quant_min <= 127:
        return scale, zero_point, quant_min, quant_max
    lo, hi = (quant_min - zero_point) * scale, (quant_max - zero_point) * scale
    new = (hi - lo) / 127
    return new, int(round(-lo / new)), 0, 127


def _dequantized_encoder(qenc: nn.Module) -> nn.Module:
    """The float encoder that computes with ``qenc``'s weights as their integer codes times their
    scales (``q * s``): a fresh float encoder of ``qenc.arch`` (TinyViT with its BatchNorms folded,
    as the quantised convolutions hold the folded weights) loaded strictly, so a layer missing
    from either side is an error rather than a random weight. Every other tensor (LayerNorms,
    attention biases, position embeddings) is ``qenc``'s float one.
    """
    from .fake_quant import ActQuant, QuantLayer
    from .io import _encoder_module

    arch = dict(qenc.arch)
    kind = arch.get("kind", "tiny_vit")
    encoder = _encoder_module(kind).float_from_arch(arch)
    if kind == "tiny_vit":
        _fold_batchnorms(encoder)
        encoder.norm_head, encoder.head = nn.Identity(), nn.Identity()  # unused by SAM, dropped by the quantiser
    body = qenc.body
    owned = [name for name, m in body.named_modules() if isinstance(m, (QuantLayer, ActQuant))]
    state = {k: v for k, v in body.state_dict().items()
             if not any(k.startswith(name + ".") for name in owned)}
    for name, m in body.named_modules():
        if isinstance(m, QuantLayer):
            state[f"{name}.weight"] = m.weight()
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias
    encoder.load_state_dict(state, strict=True)
    return encoder


def _activation_qparams(quant: nn.Module):
    """(scale, zero_point, quant_min, quant_max) of a per-tensor affine unsigned range carrying a
    simulated activation quantiser (``fake_quant.ActQuant``) onto an int8 kernel's input.

    Uniform quantisers map exactly. A post-GELU twin uniform pair (negatives on the fine step,
    positives on the coarse one) has no int8 kernel, so it becomes one unsigned range from the
    fine range's lowest value to the coarse range's highest, on 2**b codes: for 8 bits a step of
    about half the coarse one (the negative part is small), i.e. at least as fine on the positives
    and coarser on the negatives than the simulated pair.
    """
    bits = quant.bits
    codes = 2**bits - 1
    if quant.kind == "uniform":
        return float(quant.scale), int(quant.zero_point), 0, codes
    if quant.kind != "twin_gelu":
        raise ValueError(f"an int8 kernel's input cannot take a {quant.kind} quantiser")
    top = 2 ** (bits - 1) - 1
    lo, hi = -top * float(quant.fine_scale), top * float(quant.scale)
    scale = (hi - lo) / codes
    return scale, int(round(-lo / scale)), 0, codes


def _fixed_observer(like: nn.Module, scale, zero_point, quant_min: int, quant_max: int):
    """An observer (torchao's ObserverBase) that reports the given quantisation parameters
    instead of measuring any: ``convert_pt2e`` reads dtype, qscheme (and ch_axis) from ``like``,
    the observer it replaces, so the quantiser's choices (uint8 per-tensor activations, int8
    per-channel weights) stay and only the numbers are ours."""
    return _fixed_observer_class()(like, scale, zero_point, quant_min, quant_max)


@functools.lru_cache(maxsize=None)
def _fixed_observer_class() -> type:
    """The class of ``_fixed_observer``'s observers, defined once torchao is importable."""
    from torchao.quantization.pt2e.observer import ObserverBase

    class FixedQParams(ObserverBase):
        def __init__(self, like, scale, zero_point, quant_min, quant_max):
            super().__init__(dtype=like.dtype, is_dynamic=False)
            self.qscheme = like.qscheme
            if hasattr(like, "ch_axis"):
                self.ch_axis = like.ch_axis
            self.quant_min, self.quant_max = int(quant_min), int(quant_max)
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).reshape(-1).clone())
            self.register_buffer("zero_point", torch.as_tensor(zero_point, dtype=torch.int32).reshape(-1).clone())

        def forward(self, x):
            return x

        def calculate_qparams(self):
            return self.scale, self.zero_point

    return FixedQParams


def _set_observers_from(observed: torch.fx.GraphModule, qenc: nn.Module, seven_bits: bool = False) -> Dict[str, int]:
    """Replace every observer ``prepare_pt2e`` put in ``observed`` (the graph of
    ``_dequantized_encoder(qenc)``) by one fixed to ``qenc``'s parameters; returns the counts.

    A weight observer (its input is a ``get_attr`` of ``<layer>.weight``) gets the layer's
    per-channel weight scales and the recipe's signed range ([-2**(b-1), 2**(b-1)-1]), so that
    ``convert_pt2e`` recovers the layer's integer codes exactly. An activation observer feeds one
    convolution or linear, whose weight names the layer; it gets that layer's input quantiser
    (``_activation_qparams``), requantised onto 7 bits with ``seven_bits`` (``_within_seven_bits``).
    Anything else (an observer with no such layer) is an error: its range would be a guess.
    """
    from torchao.quantization.pt2e.observer import ObserverBase

    from .fake_quant import QuantLayer

    layers = {name: m for name, m in qenc.body.named_modules() if isinstance(m, QuantLayer)}
    products = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)

    def layer_of(weight_node) -> nn.Module:
        if weight_node.op == "call_module":  # the weight's own observer
            weight_node = weight_node.args[0]
        name = str(weight_node.target).rpartition(".")[0] if weight_node.op == "get_attr" else None
        if name not in layers:
            raise RuntimeError(f"the int8 graph has a quantised layer ({weight_node}) that the quantised "
                               "encoder does not quantise; recalibrate with a recipe that quantises every "
                               "convolution and linear")
        return layers[name]

    counts = {"weights": 0, "activations": 0}
    for node in list(observed.graph.nodes):
        if node.op != "call_module" or not isinstance(getattr(observed, node.target), ObserverBase):
            continue
        old, src = getattr(observed, node.target), node.args[0]
        if src.op == "get_attr":
            layer = layer_of(src)
            n = 2 ** (layer.bits - 1)
            new = _fixed_observer(old, layer.weight_scale, torch.zeros(layer.weight_scale.shape, dtype=torch.int32), -n, n - 1)
            counts["weights"] += 1
        else:
            users = [u for u in node.users if u.target in products and u.args[0] is node]
            if len(users) != 1:
                raise RuntimeError(f"an activation quantised in the int8 graph ({src}) does not feed exactly one "
                                   "convolution or linear; its range cannot be taken from the quantised encoder")
            quant = layer_of(users[0].args[1]).input_quant
            if quant is None:
                raise RuntimeError(f"the layer fed by {src} has no input quantiser in the quantised encoder")
            qparams = _activation_qparams(quant)
            new = _fixed_observer(old, *(_within_seven_bits(*qparams) if seven_bits else qparams))
            counts["activations"] += 1
        setattr(observed, node.target, new)
    return counts


def _clamp_narrow_ranges(graph_module: torch.fx.GraphModule) -> int:
    """Before each activation quantisation to fewer codes than its dtype has (6-bit codes in
    uint8: [0, 63]), clamp the float input to the range's ends; returns how many clamps.

    Why: Inductor fuses an activation's quantisation into the int8 operation that produces it and
    then saturates to the dtype's limits ([0, 255]), ignoring the quantisation's own range; the
    clamp keeps every code in [quant_min, quant_max] as the simulated model computes it. (It also
    keeps that producer's output in float32, costing one elementwise pass; 8-bit ranges get none.)
    """
    graph, count = graph_module.graph, 0
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    full = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
    for node in list(graph.nodes):
        if node.target != quantize:
            continue
        x, scale, zp, qmin, qmax, dtype = node.args[:6]
        if full.get(dtype) == (qmin, qmax):
            continue
        with graph.inserting_before(node):
            clamped = graph.call_function(torch.ops.aten.clamp.default, (x, (qmin - zp) * scale, (qmax - zp) * scale))
        node.replace_input_with(x, clamped)
        count += 1
    graph.lint()
    graph_module.recompile()
    return count


def _compile_now(result: Pt2eImageEncoder, x: torch.Tensor) -> None:
    """Run ``result`` once so that Inductor compiles now; its failure becomes a RuntimeError that
    says what to do."""
    try:
        result(x)
    except Exception as e:  # Inductor's failures come as several types (C++ build, lowering)
        raise RuntimeError(
            "Inductor could not compile the int8 encoder (it needs a C++ compiler, e.g. g++, on PATH): "
            f"{type(e).__name__}: {e}. Install one, or use optimize(sam, 'int8', calibration=..., "
            "int8_runtime='onnxruntime') on the float model."
        ) from e


@torch.no_grad()
def pt2e_int8_encoder(sam: nn.Module, calibration: Optional[Images] = None, *, warm_up: bool = True) -> Pt2eImageEncoder:
    """``sam``'s image encoder statically quantised to int8 with torchao's PT2E flow and the x86
    Inductor quantiser, compiled and ready to run on CPU (see the module docstring).

    Two sources of the quantisation parameters:

    - a float model and ``calibration`` images: ranges observed on the images (histograms);
    - a model whose image encoder is already quantised (``quantization.calibrate``, or a file
      saved by ``save_quantized`` / ``sam-drop-in quantize`` and loaded through
      ``sam_model_registry``), without images: its searched parameters are executed, each
      layer's integer weight codes and scales exactly (w8a8, or w6a6 with 6-bit codes in the int8
      kernels), each input quantiser's scale and zero point (a post-GELU twin uniform pair becomes
      one range: ``_activation_qparams``). No calibration runs: the encoder is exported, converted
      and compiled (tens of seconds). The attention products, which the simulated model also
      quantises, compute in float32 here.

    Arguments:
      sam (Sam): any model type, on CPU (not modified; its encoder is copied): float32, or with a
        quantised encoder (QuantizedTinyViT / QuantizedViT whose recipe quantises every
        convolution and linear).
      calibration (str, Path, list of np.ndarray or None): a float model's calibration images, a
        folder of images or HxWx3 uint8 RGB arrays (a handful of photographs like the ones you
        will segment); must be None for a quantised encoder (its scales are already chosen).
      warm_up (bool): compile now (one call) rather than at the first use, so a compile failure
        surfaces here. Tests that only check the graph pass False.

    Returns:
      (Pt2eImageEncoder): use it as ``sam.image_encoder``.

    Raises ImportError (naming the ``quant`` extra) without torchao; InputError for a float model
    that is not float32 on CPU, a float model without calibration images, a quantised one with
    them, a quantised encoder whose recipe leaves convolutions or linears float, or bad
    calibration images; RuntimeError (with what to do) when Inductor cannot compile the quantised
    encoder.
    """
    from .io import _is_quantized_encoder  # the one test of "a simulated quantised encoder"

    qenc = sam.image_encoder if _is_quantized_encoder(sam.image_encoder) else None
    if qenc is not None:
        if calibration is not None:
            raise InputError(
                "this model's image encoder is already quantised (its scales were searched at calibration); "
                "build the int8 encoder without calibration images, or pass a float model to calibrate anew."
            )
        missing = {"conv", "linear"} - set(qenc.recipe.layers)
        if missing:
            raise InputError(f"the quantised encoder's recipe {qenc.recipe.name!r} leaves the {sorted(missing)} layers "
                             "float, so some int8 scales are missing; calibrate with a recipe that quantises them.")
        if any(getattr(m, "float_weight", None) is not None for m in qenc.quant_modules()):
            raise InputError("the quantised encoder is not calibrated yet; run quantization.calibrate first.")
    elif calibration is None:
        raise InputError(
            "static int8 quantisation needs calibration images for a float model: pass "
            "calibration='a_folder_of_images/' or a list of HxWx3 uint8 arrays, or a model with a quantised "
            "encoder (loaded from a file written by `sam-drop-in quantize`)."
        )
    arrays = load_calibration_images(calibration) if qenc is None else []
    prepare_pt2e, convert_pt2e, xiq = _torchao()
    param = next(sam.image_encoder.parameters(), None) if qenc is None else next(qenc.buffers(), None)
    if param is None or param.device.type != "cpu" or (qenc is None and param.dtype != torch.float32):
        raise InputError(
            "the int8 encoder is built from a float32 image encoder on CPU (a model fresh from "
            "sam_model_registry); quantise before any other change of precision or device."
        )
    size = sam.image_encoder.img_size
    inputs = [preprocess(sam, a) for a in arrays] or [torch.zeros(1, 3, size, size)]
    if qenc is None:
        encoder = copy.deepcopy(sam.image_encoder).eval()
        _fold_batchnorms(encoder)
    else:
        encoder = _dequantized_encoder(qenc)
    exported = torch.export.export(encoder, (inputs[0],)).module()
    _residual_adds_apart(exported, encoder)
    # Without VNNI int8 products saturate unless activations stay within 7 bits (PyTorch's
    # reduce_range); _clamp_narrow_ranges then keeps the fused requantisations at 127 too.
    seven_bits = int8_products_saturate()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=seven_bits))
    observed = prepare_pt2e(exported, quantizer)
    if qenc is None:
        for x in inputs:
            observed(x)
        label = "int8-static-pt2e-x86-inductor"
    else:
        _set_observers_from(observed, qenc, seven_bits)
        label = f"{qenc.recipe.name}-pt2e-x86-inductor"
    if seven_bits and (qenc is None or qenc.recipe.act_bits > 7):  # 6-bit codes were within 7 bits already
        label += "-a7"
    graph = convert_pt2e(observed)
    _clamp_narrow_ranges(graph)
    result = Pt2eImageEncoder(graph, size, quantized=label)
    if warm_up:
        _compile_now(result, inputs[0])
    return result
