"""Export a ``Sam`` model's decoder and image encoder to ONNX, and quantise the result to int8.

Exporter: the TorchScript one (``dynamo=False``; its DeprecationWarning is silenced). The dynamo
exporter cannot be used: the decoder's crop size is computed from the *values* of the
``orig_im_size`` input, which ``torch.export`` treats as data-dependent shapes.

Every file carries ``sam_drop_in.*`` metadata (kind, image size, pixel mean/std, export flags)
that ``SamOnnxPredictor`` reads, and is written atomically. Needs ``pip install sam-drop-in[onnx]``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch import nn

from .onnx_predictor import METADATA_PREFIX, session_metadata
from .utils.onnx import SamEncoderOnnxModel, SamOnnxModel

__all__ = [
    "export_decoder",
    "export_encoder",
    "quantize",
    "quantization_agreement",
    "DECODER_INPUT_NAMES",
    "DECODER_OUTPUT_NAMES",
]

DECODER_INPUT_NAMES = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
DECODER_OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]
DECODER_EXTRA_OUTPUT_NAMES = ["masks", "iou_predictions", "stability_scores", "areas", "low_res_masks"]
MIN_OPSET = 16  # tested range: 16 and 17 (Resize, LayerNormalization at 17, GELU via Erf)

_INSTALL_HINT = "ONNX export needs the onnx extra: pip install 'sam-drop-in[onnx]'"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} (could not import {module}: {e})") from e


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET} (16 and 17 are tested), got {opset!r}.")


@contextlib.contextmanager
def _export_ready(model: nn.Module) -> Iterator[nn.Module]:
    """Yield a float32 CPU model in eval mode; restore the caller's model state afterwards."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        # Exported weights must be float32 whatever the caller runs in; copy rather than move
        # so the caller's model stays where it is.
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    # Remember every module's flag: the exporter restores the *wrapper's* mode recursively,
    # which would otherwise leave e.g. BatchNorm layers of the caller's model in training mode.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    with warnings.catch_warnings():
        # The tracer warns about every Python-level shape comparison and the legacy exporter
        # about its own deprecation; neither is actionable for the user of this function.
        for category in (torch.jit.TracerWarning, DeprecationWarning, UserWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        yield


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary file path in the destination folder; move it (and any external-data
    files written beside it) into place only if the block succeeds."""
    path = os.fspath(path)
    dest_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(dest_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".sam_drop_in_export_", dir=dest_dir)
    try:
        tmp_path = os.path.join(tmp_dir, os.path.basename(path))
        yield tmp_path
        # External data first, the model file last, so a reader never sees a model whose data
        # is missing.
        for name in sorted(os.listdir(tmp_dir)):
            if name != os.path.basename(path):
                os.replace(os.path.join(tmp_dir, name), os.path.join(dest_dir, name))
        os.replace(tmp_path, os.path.abspath(path))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _consolidate_external_data(path: str) -> None:
    """Models over ONNX's 2 GB protobuf limit (vit_h, vit_l encoders) are written by the exporter
    with one external file per tensor; gather them into a single ``<name>.data`` file."""
    folder, name = os.path.split(path)
    extra = [f for f in os.listdir(folder) if f != name]
    if not extra:
        return
    onnx = _require("onnx")
    proto = onnx.load(path, load_external_data=True)
    for f in extra:
        os.remove(os.path.join(folder, f))
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=name + ".data", size_threshold=1024)


def _set_metadata(path: str, metadata: Dict[str, Any]) -> None:
    onnx = _require("onnx")
    _consolidate_external_data(path)
    proto = onnx.load(path, load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = json.dumps(value)
    proto.producer_name = "sam_drop_in"
    onnx.save(proto, path)


def _make_session(path: str):
    return _require("onnxruntime").InferenceSession(path, providers=["CPUExecutionProvider"])


def _decoder_example_inputs(model: nn.Module) -> Dict[str, torch.Tensor]:
    embed_dim = model.prompt_encoder.embed_dim
    embed_h, embed_w = model.prompt_encoder.image_embedding_size
    gen = torch.Generator().manual_seed(0)
    return {
        "image_embeddings": torch.randn(1, embed_dim, embed_h, embed_w, generator=gen),
        "point_coords": torch.randint(0, model.image_encoder.img_size, (1, 5, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, 5), generator=gen).float(),
        "mask_input": torch.randn(1, 1, 4 * embed_h, 4 * embed_w, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def _export(wrapper: nn.Module, inputs: Dict[str, torch.Tensor], output_names, dynamic_axes, path: str, opset: int,
            metadata: Dict[str, Any], check_run: bool = False) -> None:
    """torch.onnx.export (TorchScript exporter) into a temporary file, metadata, then into place."""
    with _atomic_output(path) as tmp, _quiet_export():
        torch.onnx.export(wrapper, tuple(inputs.values()), tmp, dynamo=False, export_params=True, opset_version=opset,
                          do_constant_folding=True, input_names=list(inputs), output_names=output_names,
                          dynamic_axes=dynamic_axes)
        _set_metadata(tmp, {**metadata, "opset": int(opset)})
        if check_run:
            # Refuse to publish a file ONNX Runtime cannot run (when it is installed).
            try:
                session = _make_session(tmp)
            except ImportError:
                return
            session.run(None, {k: v.numpy() for k, v in inputs.items()})


def _report(path: str, opset: int, quantize_out: Optional[str], **extra: Any) -> Dict[str, Any]:
    report: Dict[str, Any] = {"path": os.fspath(path), "opset": opset, **extra, "quantized_path": None}
    if quantize_out is not None:
        quantize(path, quantize_out)
        report["quantized_path"] = os.fspath(quantize_out)
        report["agreement"] = quantization_agreement(path, quantize_out)
    return report


def export_decoder(
    model: nn.Module,
    path: str,
    opset: int = 17,
    return_single_mask: bool = False,
    gelu_approximate: bool = False,
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    quantize_out: Optional[str] = None,
) -> Dict[str, Any]:
    """Export the prompt encoder + mask decoder (``SamOnnxModel``) to an ONNX file, with
    upstream's inputs and outputs (``SamOnnxModel``'s docstring gives their shapes and meaning).

    Arguments:
      model (Sam): any model type (vit_h, vit_l, vit_b, vit_t); not modified.
      path (str): destination .onnx file (written atomically).
      opset (int): ONNX opset, >= 16.
      return_single_mask (bool): output only the best mask (see ``SamOnnxModel``). The ONNX
        predictor needs this False.
      gelu_approximate (bool): use the tanh approximation of GELU (for runtimes without Erf).
      use_stability_score (bool): output stability scores instead of predicted IoU.
      return_extra_metrics (bool): also output stability scores and areas.
      quantize_out (str or None): also write an int8 dynamically quantised copy here.

    Returns:
      (dict): ``path``, ``opset``, ``quantized_path`` and, when quantised, ``agreement`` (see
        ``quantization_agreement``).
    """
    _check_opset(opset)
    _require("onnx")
    with _export_ready(model) as model:
        wrapper = SamOnnxModel(model, return_single_mask=return_single_mask, use_stability_score=use_stability_score,
                               return_extra_metrics=return_extra_metrics).eval()
        gelus = [m for m in wrapper.modules() if isinstance(m, nn.GELU)]
        saved = [m.approximate for m in gelus]
        if gelu_approximate:
            for m in gelus:
                m.approximate = "tanh"
        try:
            inputs = _decoder_example_inputs(model)
            output_names = DECODER_EXTRA_OUTPUT_NAMES if return_extra_metrics else DECODER_OUTPUT_NAMES
            metadata = {
                "kind": "decoder",
                "img_size": int(model.image_encoder.img_size),
                "mask_threshold": float(model.mask_threshold),
                "return_single_mask": bool(return_single_mask),
                "use_stability_score": bool(use_stability_score),
                "return_extra_metrics": bool(return_extra_metrics),
                "gelu_approximate": bool(gelu_approximate),
                "num_mask_tokens": int(model.mask_decoder.num_mask_tokens),
            }
            axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
            _export(wrapper, inputs, output_names, axes, path, opset, metadata, check_run=True)
        finally:
            for m, approx in zip(gelus, saved):
                m.approximate = approx
    return _report(path, opset, quantize_out)


def export_encoder(
    model: nn.Module,
    path: str,
    opset: int = 17,
    include_preprocessing: bool = True,
    quantize_out: Optional[str] = None,
) -> Dict[str, Any]:
    """Export the image encoder (``SamEncoderOnnxModel``, whose docstring gives the graph's input
    and output) to an ONNX file. Encoders over ONNX's 2 GB protobuf limit (vit_h, vit_l) get
    their weights in one external-data file beside ``path``.

    Arguments:
      model (Sam): any model type; not modified.
      path (str): destination .onnx file (written atomically).
      opset (int): ONNX opset, >= 16.
      include_preprocessing (bool): put normalisation and padding in the graph.
      quantize_out (str or None): also write an int8 dynamically quantised copy here.

    Returns:
      (dict): ``path``, ``opset``, ``include_preprocessing``, ``quantized_path`` and, when
        quantised, ``agreement`` (see ``quantization_agreement``).
    """
    _check_opset(opset)
    _require("onnx")
    with _export_ready(model) as model:
        wrapper = SamEncoderOnnxModel(model, include_preprocessing=include_preprocessing).eval()
        size = model.image_encoder.img_size
        if include_preprocessing:
            # A non-square example so neither padding amount is traced as zero.
            example = torch.rand(size * 3 // 4, size, 3) * 255
            name, axes = "input_image", {"input_image": {0: "height", 1: "width"}}
        else:
            example = torch.randn(1, 3, size, size)
            name, axes = "x", {"x": {0: "batch"}, "image_embeddings": {0: "batch"}}
        metadata = {
            "kind": "encoder",
            "img_size": int(size),
            "include_preprocessing": bool(include_preprocessing),
            "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],
            "pixel_std": [float(v) for v in model.pixel_std.flatten()],
        }
        _export(wrapper, {name: example}, ["image_embeddings"], axes, path, opset, metadata)
    return _report(path, opset, quantize_out, include_preprocessing=include_preprocessing)


def quantize(model_path: str, output_path: str) -> str:
    """Int8 dynamic quantisation (weights QUInt8, activations quantised at run time) with
    ``onnxruntime.quantization.quantize_dynamic``, the settings of upstream's export script.

    Only MatMul and Gemm are quantised: ONNX Runtime's CPU ConvInteger kernel is slower than its
    float convolution, so quantising the convolutions would cost speed for no size worth having.

    Arguments:
      model_path (str): a float32 model written by ``export_decoder`` or ``export_encoder``.
      output_path (str): destination (written atomically; metadata is carried over).

    Returns:
      (str): ``output_path``.
    """
    onnx = _require("onnx")
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} (onnxruntime.quantization: {e})") from e
    metadata = {
        p.key[len(METADATA_PREFIX):]: json.loads(p.value)
        for p in onnx.load(model_path, load_external_data=False).metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }
    with _atomic_output(output_path) as tmp, _quiet_export():
        quantize_dynamic(model_input=model_path, model_output=tmp, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=False, reduce_range=False, weight_type=QuantType.QUInt8)
        metadata["quantized"] = "int8-dynamic"
        _set_metadata(tmp, metadata)
    return os.fspath(output_path)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def quantization_agreement(float_path: str, quant_path: str, seed: int = 0) -> Dict[str, float]:
    """Compare a float model with its int8 copy on fixed inputs (seeded noise, not a photograph).

    For a decoder: 9 single-point prompts on a 3x3 grid of a random-normal embedding;
    reports ``mask_iou_mean`` / ``mask_iou_min`` (IoU of the low-resolution masks thresholded at
    0) and ``score_max_abs_diff``. For an encoder: an 768x1024 noise image (or its normalised
    1x3x1024x1024 equivalent); reports ``embedding_rel_l2`` (||q - f|| / ||f||) and
    ``embedding_cosine``. Use the tests / benchmark for agreement on real photographs.

    Arguments:
      float_path (str): float32 ONNX model.
      quant_path (str): its quantised copy.
      seed (int): seed of the inputs.

    Returns:
      (dict[str, float]): the figures above.
    """
    f_sess, q_sess = _make_session(float_path), _make_session(quant_path)
    meta = session_metadata(f_sess)
    rng = np.random.default_rng(seed)
    if meta.get("kind") == "encoder":
        size = int(meta.get("img_size", 1024))
        inp = f_sess.get_inputs()[0]
        if meta.get("include_preprocessing", False):
            x = (rng.random((size * 3 // 4, size, 3)) * 255).astype(np.float32)
        else:
            x = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        f = f_sess.run(None, {inp.name: x})[0].astype(np.float64)
        q = q_sess.run(None, {inp.name: x})[0].astype(np.float64)
        return {
            "embedding_rel_l2": float(np.linalg.norm(q - f) / np.linalg.norm(f)),
            "embedding_cosine": float((q * f).sum() / (np.linalg.norm(q) * np.linalg.norm(f))),
        }
    emb_shape = [d if isinstance(d, int) else 1 for d in f_sess.get_inputs()[0].shape]
    embedding = rng.standard_normal(emb_shape).astype(np.float32)
    size = int(meta.get("img_size", 1024))
    ious, diffs = [], []
    for y in np.linspace(size * 0.2, size * 0.8, 3):
        for x in np.linspace(size * 0.2, size * 0.8, 3):
            feeds = {
                "image_embeddings": embedding,
                "point_coords": np.array([[[x, y], [0.0, 0.0]]], np.float32),
                "point_labels": np.array([[1.0, -1.0]], np.float32),
                "mask_input": np.zeros((1, 1, 4 * emb_shape[2], 4 * emb_shape[3]), np.float32),
                "has_mask_input": np.zeros(1, np.float32),
                # Only the low-resolution masks are compared: keep the upscaled output small.
                "orig_im_size": np.array([256, 256], np.float32),
            }
            f_out = dict(zip([o.name for o in f_sess.get_outputs()], f_sess.run(None, feeds)))
            q_out = dict(zip([o.name for o in q_sess.get_outputs()], q_sess.run(None, feeds)))
            for fm, qm in zip(f_out["low_res_masks"][0], q_out["low_res_masks"][0]):
                ious.append(_mask_iou(fm > 0, qm > 0))
            diffs.append(float(np.abs(f_out["iou_predictions"] - q_out["iou_predictions"]).max()))
    return {
        "mask_iou_mean": float(np.mean(ious)),
        "mask_iou_min": float(np.min(ious)),
        "score_max_abs_diff": float(max(diffs)),
    }
