"""Real int8 execution of the image encoder (sam_drop_in.quantization.onnx_int8) and the
quantised modes of precision.optimize.

The model is ``small_sam`` (a 1-block, 64-wide ViT encoder at 1024 px, the real prompt encoder
and mask decoder) with perturbed random weights, calibrated on one photograph: the whole module
runs in seconds on two cores. Agreement is measured against the same model in fp32 on a
different photograph; random weights put many logits near the threshold, so the bounds are
lower bounds for trained weights. benchmarks/bench_quant.py --real measures the real vit_t.
"""

import copy
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from sam_drop_in import SamPredictor
from sam_drop_in._errors import InputError
from sam_drop_in.precision import optimize
from sam_drop_in.quantization.onnx_int8 import OnnxImageEncoder, export_int8_encoder
from sam_drop_in.testing import load_image, mean_iou, perturbed_state_dict, predict_quality_masks, small_sam

onnx = pytest.importorskip("onnx")  # the onnx extra; the compat extra (the suite's) includes it


@pytest.fixture(scope="module")
def sd():
    return perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)


def _model(sd):
    m = small_sam("sam_drop_in")
    m.load_state_dict(sd)
    return m


@pytest.fixture(scope="module")
def calib():
    return [load_image("astronaut.jpg")]  # calibration and evaluation photographs differ


@pytest.fixture(scope="module")
def coffee():
    return load_image("coffee.jpg")


@pytest.fixture(scope="module")
def fp32(sd, coffee):
    """(embedding, quality masks) of the float model on the evaluation photograph."""
    pred = SamPredictor(optimize(_model(sd), "fp32"))
    masks = predict_quality_masks(pred, coffee)
    return pred.get_image_embedding().clone(), masks


@pytest.fixture(scope="module")
def static_int8(sd, calib):
    return optimize(_model(sd), "int8", calibration=calib, int8_runtime="onnxruntime")


def _op_types(encoder: OnnxImageEncoder):
    return {n.op_type for n in onnx.load_from_string(encoder._model).graph.node}


def _int8_initializers(encoder: OnnxImageEncoder):
    graph = onnx.load_from_string(encoder._model).graph
    return [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]


@pytest.mark.parametrize("calibrated", [True, False])
def test_int8_encoder_is_real_and_agrees(calibrated, sd, calib, coffee, fp32, static_int8):
    m = static_int8 if calibrated else optimize(_model(sd), "int8")
    enc = m.image_encoder
    assert isinstance(enc, OnnxImageEncoder) and enc.img_size == 1024
    # Really int8: the graph holds int8 weights and integer kernels' quantisation nodes.
    ops = _op_types(enc)
    if calibrated:
        assert enc.quantized == "int8-static-qdq-minmax"
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and len(_int8_initializers(enc)) >= 4
    else:
        assert enc.quantized == "int8-dynamic"
        assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    # Convolution weights are stored as int8 codes, dequantised in the graph.
    graph = onnx.load_from_string(enc._model).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[1] in dq_out for n in convs)
    # The mask decoder stays float32, untouched.
    assert all(p.dtype == torch.float32 for p in m.mask_decoder.parameters())
    pred = SamPredictor(m)
    masks = predict_quality_masks(pred, coffee)
    emb = pred.get_image_embedding()
    assert emb.dtype == torch.float32 and emb.shape == (1, 256, 64, 64)
    _, scores, logits = pred.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    assert scores.dtype == np.float32 and logits.dtype == np.float32
    cos = float(torch.nn.functional.cosine_similarity(emb.flatten(), fp32[0].flatten(), 0))
    iou = mean_iou(fp32[1], masks)
    # Contract: int8 linears (8-bit weights and activations) keep the embedding within cosine
    # 0.998 of fp32 and the masks at mean IoU >= 0.95 (measured on the AMX machine, 1 and 2
    # threads: static 0.99987 / 0.995, dynamic 0.99992 / 0.996, convolution weights stored in
    # int8 included; margin for CPUs whose int8 kernels differ). Not equal to fp32: the
    # rounding is real.
    assert cos >= 0.998, f"embedding cosine {cos:.5f}"
    assert iou >= 0.95, f"mean mask IoU {iou:.4f}"
    assert cos < 1.0
    print(f"int8 calibrated={calibrated}: embedding cosine {cos:.5f}, mean mask IoU {iou:.4f}")


def test_encoder_module_checks_input_and_copies(static_int8):
    enc = static_int8.image_encoder
    with pytest.raises(InputError, match="Bx3x1024x1024"):
        enc(torch.zeros(1, 3, 512, 512))
    with pytest.raises(InputError, match="Bx3x1024x1024"):
        enc(np.zeros((1, 3, 1024, 1024), np.float32))
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    out = enc(x)
    assert out.shape == (2, 256, 64, 64) and out.dtype == torch.float32
    # Batch rows are independent: the same values one image at a time (same kernels, same shapes
    # per row up to ONNX Runtime's blocking; bounded, not exact).
    torch.testing.assert_close(out[1:], enc(x[1:]), rtol=1e-4, atol=1e-4)
    # Copies and pickles carry the model bytes and build their own session: the same model on
    # the same input and thread count, so the same kernels, bit for bit.
    one = enc(x[:1])
    for other in (copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):
        assert torch.equal(other(x[:1]), one)
    assert enc.state_dict() == {}


def test_export_writes_atomically(sd, calib, tmp_path, monkeypatch):
    dst = tmp_path / "enc_int8.onnx"
    path = export_int8_encoder(_model(sd), dst, calib)
    enc = OnnxImageEncoder.from_file(path)
    assert enc.quantized == "int8-static-qdq-minmax"
    before = dst.read_bytes()

    import onnxruntime.quantization as oq

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(oq, "quantize_static", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_int8_encoder(_model(sd), dst, calib)
    # A failed write leaves the old file whole and no temporary file beside it.
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["enc_int8.onnx"]
    with pytest.raises(RuntimeError, match="disk full"):
        export_int8_encoder(_model(sd), tmp_path / "new.onnx", calib)
    assert sorted(os.listdir(tmp_path)) == ["enc_int8.onnx"]


def test_bad_inputs_raise_clearly(sd, tmp_path):
    m = _model(sd)
    with pytest.raises(InputError, match="no calibration images"):
        export_int8_encoder(m, tmp_path / "a.onnx", [])
    with pytest.raises(InputError, match="HxWx3 uint8"):
        export_int8_encoder(m, tmp_path / "a.onnx", [np.zeros((64, 64), np.uint8)])
    with pytest.raises(InputError, match="HxWx3 uint8"):
        export_int8_encoder(m, tmp_path / "a.onnx", [np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(InputError, match="does not exist"):
        export_int8_encoder(m, tmp_path / "a.onnx", tmp_path / "missing")
    with pytest.raises(InputError, match="folder of"):
        export_int8_encoder(m, tmp_path / "no" / "a.onnx", None)
    with pytest.raises(ValueError, match="method must be one of"):
        export_int8_encoder(m, tmp_path / "a.onnx", None, method="kl")
    with pytest.raises(InputError, match="float32 image encoder"):
        export_int8_encoder(copy.deepcopy(m).to(torch.bfloat16), tmp_path / "a.onnx", None)
    assert os.listdir(tmp_path) == []


def test_missing_onnxruntime_names_the_extra(sd, tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import onnxruntime` raise ImportError, as when the
    # package is not installed.
    for name in ("onnxruntime", "onnxruntime.quantization"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install 'sam-drop-in\[onnx\]'"):
        export_int8_encoder(_model(sd), tmp_path / "a.onnx", None)
    with pytest.raises(ImportError, match=r"sam-drop-in\[onnx\]"):
        optimize(_model(sd), "int8")
    assert os.listdir(tmp_path) == []


def test_mode_errors(sd, coffee):
    for mode in ("w8a8", "w6a6"):
        with pytest.raises(ValueError, match="needs images: pass calibration="):
            optimize(_model(sd), mode)
    with pytest.raises(ValueError, match="not by mode='fp32'"):
        optimize(_model(sd), "fp32", calibration=[coffee])
    with pytest.raises(TypeError):
        optimize(_model(sd), "int8", False, [coffee])  # calibration is keyword-only
    with pytest.raises(InputError, match="no calibration images"):
        optimize(_model(sd), "int8", calibration=[])


def test_wrong_onnx_model_is_refused(sd, tmp_path):
    from sam_drop_in import onnx_export

    path = tmp_path / "with_pre.onnx"
    onnx_export.export_encoder(_model(sd), path, include_preprocessing=True)
    with pytest.raises(InputError, match="exported without preprocessing"):
        OnnxImageEncoder.from_file(path)


def test_w8a8_mode_is_the_calibrated_simulated_encoder(coffee):
    from sam_drop_in.build_sam import build_sam_sized
    from sam_drop_in.quantization import QuantizedTinyViT

    # vit_t at 256 px (16x16 embedding) keeps the calibration search to seconds.
    m = build_sam_sized("vit_t", image_size=256)
    m.load_state_dict(perturbed_state_dict(m.state_dict(), seed=1))
    ref = SamPredictor(copy.deepcopy(m))
    ref.set_image(coffee)
    optimize(m, "w8a8", calibration=[load_image("astronaut.jpg")])
    assert isinstance(m.image_encoder, QuantizedTinyViT) and m.image_encoder.recipe.name == "w8a8"
    pred = SamPredictor(m)
    pred.set_image(coffee)
    emb = pred.get_image_embedding()
    assert emb.dtype == torch.float32 and emb.shape == (1, 256, 16, 16)
    cos = float(torch.nn.functional.cosine_similarity(emb.flatten(), ref.get_image_embedding().flatten(), 0))
    # Contract (docs/quantization.md, 256 px): w8a8 keeps the embedding within cosine 0.999 of
    # fp32 (measured 0.9997); it is simulated, so it is not fp32 either.
    assert 0.999 <= cos < 1.0, f"embedding cosine {cos:.5f}"
