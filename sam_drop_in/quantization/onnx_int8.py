"""Real int8 execution of the image encoder through ONNX Runtime.

The float encoder is exported to ONNX (``onnx_export.export_encoder``, normalised and padded
Bx3xSxS input), then quantised by ONNX Runtime:

- with calibration images: **static** quantisation in QDQ format
  (``onnxruntime.quantization.quantize_static``); the images go through
  ``SamPredictor``'s preprocessing, activation ranges are MinMax over them (per tensor, uint8),
  weights int8 per output channel;
- without: **dynamic** quantisation (``onnx_export.quantize``: int8 weights, activation ranges
  computed per call), which needs no images.

Only the matrix products with a constant weight (the linears: attention qkv and projection, MLP
fc1 and fc2) compute in int8. The convolutions' weights are *stored* as int8 with
per-output-channel scales (``int8_conv_weights``) but dequantised in the graph, so the
convolutions compute in float32. Measured on the AMX development machine (docs/quantization.md, "Real
int8 execution"): quantising the convolutions too (ONNX Runtime's QLinearConv, depthwise
included) was slower than leaving them float and lowered agreement, and the attention products
(both operands activations) add a quantise/dequantise pair per call for no gain. Softmax,
LayerNorm, GELU and the additions stay float.

``OnnxImageEncoder`` runs the result as a drop-in ``nn.Module`` image encoder: float32
Bx3xSxS in, float32 Bx256x(S/16)x(S/16) out, ``img_size`` like the float encoders, so
``sam.image_encoder = OnnxImageEncoder.from_file("enc_int8.onnx")`` leaves ``SamPredictor`` and
the mask generators unchanged. ``precision.optimize(sam, "int8", calibration=...)`` does all of
this in one call.

Needs the ``onnx`` extra: ``pip install 'sam-drop-in[onnx]'``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .._errors import InputError
from .._fileio import atomic_write
from .calibrate import load_calibration_images, preprocess

__all__ = ["OnnxImageEncoder", "export_int8_encoder", "int8_image_encoder", "CALIBRATION_METHODS"]

_INSTALL_HINT = "real int8 execution needs ONNX Runtime and onnx: pip install 'sam-drop-in[onnx]'"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_META_PREFIX = "sam_drop_in."

Images = Union[str, Path, Sequence[np.ndarray]]


def _require(name: str):
    """Imports an optional module, or raises ImportError naming the extra to install."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} (could not import {name}: {e})") from e


def _copy_metadata(src: str, dst: str, extra: Dict[str, Any]) -> None:
    """Carries the exporter's ``sam_drop_in.*`` metadata (kind, img_size, ...) over to the
    quantised file, which ONNX Runtime's quantiser writes without it, and adds ``extra``."""
    onnx = _require("onnx")
    meta = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
    meta.update({_META_PREFIX + k: json.dumps(v) for k, v in extra.items()})
    proto = onnx.load(dst)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, dst)


def export_int8_encoder(
    sam: nn.Module,
    path: Union[str, Path],
    calibration: Optional[Images] = None,
    *,
    method: str = "minmax",
    int8_conv_weights: bool = True,
    opset: int = 17,
) -> str:
    """Writes ``sam``'s image encoder as an int8 ONNX model.

    Arguments:
      sam (Sam): any model type, float32 (not modified).
      path (str or Path): destination .onnx file; written atomically (a failure leaves nothing
        there, and an existing file unchanged). Its folder must exist.
      calibration (str, Path, list of np.ndarray or None): a folder of images, or HxWx3 uint8
        RGB arrays, for static quantisation; None for dynamic quantisation (no images needed;
        activations quantised per call).
      method (str): static calibration method, "minmax" (default; measured best here),
        "percentile" or "entropy" (ONNX Runtime's histogram methods, slower to calibrate).
      int8_conv_weights (bool): also store the convolutions' weights as int8 codes with
        per-output-channel scales (dequantised in the graph; the convolutions compute in
        float32). Makes the file about 30% smaller; False keeps them float32.
      opset (int): ONNX opset of the export, >= 16.

    Returns:
      (str): ``path``. The graph's input ``x`` is float32 Bx3xSxS (normalised and padded as by
        ``Sam.preprocess``; B dynamic), its output ``image_embeddings`` float32 Bx256x(S/16)x(S/16).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {list(CALIBRATION_METHODS)}, got {method!r}.")
    arrays = None if calibration is None else load_calibration_images(calibration)
    param = next(sam.image_encoder.parameters(), None)
    if param is None or param.dtype != torch.float32:
        raise InputError(
            "export_int8_encoder needs a float32 image encoder (a model fresh from sam_model_registry); "
            "quantise before precision.optimize or any other change of precision."
        )
    _require("onnx")
    ort_quant = _require("onnxruntime.quantization")
    from .. import onnx_export

    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise InputError(f"the folder of {path!r} does not exist; create it first.")
    with tempfile.TemporaryDirectory(prefix="sam_drop_in_int8_") as tmp:
        float_path = os.path.join(tmp, "encoder_fp32.onnx")
        onnx_export.export_encoder(sam, float_path, opset=opset, include_preprocessing=False)
        if arrays is None:
            def write(dst: str) -> None:
                onnx_export.quantize(float_path, dst)  # keeps the metadata, marks it int8-dynamic
                if int8_conv_weights:
                    _store_conv_weights_int8(dst)
        else:
            with torch.no_grad():
                inputs = [preprocess(sam, a).cpu().numpy() for a in arrays]

            def write(dst: str) -> None:
                ort_quant.quantize_static(
                    float_path,
                    dst,
                    _Reader(inputs),
                    quant_format=ort_quant.QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"],
                    per_channel=True,
                    activation_type=ort_quant.QuantType.QUInt8,
                    weight_type=ort_quant.QuantType.QInt8,
                    calibrate_method=_method(ort_quant, method),
                    # Only the linears: the attention products' operands are both activations.
                    extra_options={"MatMulConstBOnly": True},
                )
                _copy_metadata(float_path, dst, {"quantized": f"int8-static-qdq-{method}", "calibration_images": len(inputs)})
                if int8_conv_weights:
                    _store_conv_weights_int8(dst)

        atomic_write(path, write)
    return path


def _store_conv_weights_int8(path: str) -> int:
    """Stores every float convolution weight of the ONNX model at ``path`` as int8 codes with a
    per-output-channel scale, dequantised in the graph (``DequantizeLinear`` on a constant);
    the convolutions themselves still compute in float32. Rewrites the file in place.

    Why: the activations of the convolutions stay float (quantising them was slower here, see
    the module docstring), but their weights are a third of the encoder's bytes; int8 codes keep
    the file near a quarter of the float one. Symmetric codes in [-127, 127], scale
    ``max|w_c| / 127`` per output channel c (zero point 0).

    Returns:
      (int): how many weights were converted.
    """
    onnx = _require("onnx")
    from onnx import helper, numpy_helper

    proto = onnx.load(path)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    produced_by_dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    new_nodes, converted = [], 0
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits and node.input[1] not in produced_by_dq:
            init = inits[node.input[1]]
            if init.data_type == onnx.TensorProto.FLOAT:
                w = numpy_helper.to_array(init).astype(np.float32)
                scale = np.abs(w.reshape(w.shape[0], -1)).max(1) / 127.0
                scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
                codes = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
                base = init.name
                graph.initializer.remove(init)
                graph.initializer.extend([
                    numpy_helper.from_array(codes, base + "_int8"),
                    numpy_helper.from_array(scale, base + "_scale"),
                    numpy_helper.from_array(np.zeros(w.shape[0], np.int8), base + "_zero_point"),
                ])
                new_nodes.append(helper.make_node(
                    "DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero_point"], [base], axis=0,
                    name=base + "_DequantizeLinear",
                ))
                del inits[base]
                converted += 1
    # Constants first: ONNX wants nodes in topological order.
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(proto, path)
    return converted


def _method(ort_quant, name: str):
    return {
        "minmax": ort_quant.CalibrationMethod.MinMax,
        "percentile": ort_quant.CalibrationMethod.Percentile,
        "entropy": ort_quant.CalibrationMethod.Entropy,
    }[name]


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed encoder inputs (a plain
    class with ``get_next``, which is all ``quantize_static`` calls)."""

    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self._it = iter([{"x": x} for x in inputs])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)

    def rewind(self) -> None:  # part of the protocol; one pass is all the calibrators need
        pass


class OnnxImageEncoder(nn.Module):
    """An image encoder that runs an ONNX model (the int8 one from ``export_int8_encoder``) in
    ONNX Runtime on CPU.

    Arguments:
      model (bytes): the serialised ONNX model (``OnnxImageEncoder.from_file`` reads one).
      num_threads (int or None): ONNX Runtime's intra-op threads; None follows
        ``torch.get_num_threads()`` at the first call (so ``OMP_NUM_THREADS`` and
        ``torch.set_num_threads`` apply as for the float encoder).

    Attributes:
      img_size (int): the input side S the model was exported for.

    The session is created at the first call, and dropped when the module is copied or pickled
    (the model bytes travel, the copy makes its own session). The module has no parameters; its
    state dict is empty, so keep the float checkpoint for saving.
    """

    def __init__(self, model: bytes, num_threads: Optional[int] = None) -> None:
        super().__init__()
        onnx = _require("onnx")
        proto = onnx.load_from_string(model)
        meta = {p.key[len(_META_PREFIX):]: json.loads(p.value) for p in proto.metadata_props if p.key.startswith(_META_PREFIX)}
        if meta.get("kind") != "encoder" or meta.get("include_preprocessing", True):
            raise InputError(
                "OnnxImageEncoder needs an image-encoder model exported without preprocessing (input x, "
                "Bx3xSxS); write one with sam_drop_in.quantization.onnx_int8.export_int8_encoder."
            )
        self.img_size = int(meta["img_size"])
        self.quantized = meta.get("quantized")
        self.num_threads = num_threads
        self._model = model
        self._session = None

    @classmethod
    def from_file(cls, path: Union[str, Path], num_threads: Optional[int] = None) -> "OnnxImageEncoder":
        """Reads an encoder written by ``export_int8_encoder`` (or ``onnx_export.export_encoder``
        with ``include_preprocessing=False``)."""
        with open(path, "rb") as f:
            return cls(f.read(), num_threads=num_threads)

    def _get_session(self):
        if self._session is None:
            ort = _require("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.num_threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            # ONNX Runtime's workers otherwise spin after each call, taking the cores from the
            # PyTorch mask decoder that runs next.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(self._model, options, providers=["CPUExecutionProvider"])
        return self._session

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): Bx3xSxS float32, normalised and padded (``Sam.preprocess``), on CPU.

        Returns:
          (torch.Tensor): Bx256x(S/16)x(S/16) float32 image embeddings, on x's device.
        """
        s = self.img_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"the int8 image encoder takes a Bx3x{s}x{s} tensor (Sam.preprocess output), got {shape}")
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self._get_session().run(None, {"x": feed})[0]
        return torch.from_numpy(out).to(x.device)

    def extra_repr(self) -> str:
        return f"img_size={self.img_size}, quantized={self.quantized!r}, bytes={len(self._model)}"

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # an InferenceSession is neither copyable nor picklable
        return state


def int8_image_encoder(
    sam: nn.Module, calibration: Optional[Images] = None, *, method: str = "minmax", num_threads: Optional[int] = None
) -> OnnxImageEncoder:
    """``sam``'s image encoder quantised to int8 and ready to run (see ``export_int8_encoder``
    for the arguments); nothing is left on disk.

    Returns:
      (OnnxImageEncoder): use it as ``sam.image_encoder``.
    """
    with tempfile.TemporaryDirectory(prefix="sam_drop_in_int8_") as tmp:
        path = export_int8_encoder(sam, os.path.join(tmp, "encoder_int8.onnx"), calibration, method=method)
        return OnnxImageEncoder.from_file(path, num_threads=num_threads)
