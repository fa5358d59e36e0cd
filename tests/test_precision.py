"""sam_drop_in.precision (optimize, the float32 boundary of reduced precision) and sam_drop_in.batch.

Every mode runs on every machine: bf16 and fp16 go through every public entry point (predictor,
predict_torch with boxes, mask inputs and several prompts, both mask generators, batched
embedding) on the vit_t architecture built for 256-pixel inputs, which keeps emulated bf16 (CPUs
without AVX-512 BF16 / AMX) and CPU fp16 cheap. The public ``optimize`` refuses fp16 off CUDA (it
would only be slow there); the tests reach the same code through ``precision.reduce_precision``.

Agreement with fp32 is measured on perturbed random weights: mean IoU of the multimask masks for
9 points and 8 boxes on a photograph (examples/images/coffee.jpg), and of the automatic mask
generator's records. Random weights put many logits near the threshold, so agreement is lower
than with a trained checkpoint: IOU_MIN is a lower bound. Measured here (AVX-512/AMX, and with
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 emulating an AVX2 machine): prompts bf16 0.992,
fp16 0.999; benchmarks/bench_precision.py measures the real 1024-pixel vit_t.

Run with ``--device cuda`` (benchmarks/gpu_check.py) to check the same on a GPU.
"""

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sam_drop_in
from sam_drop_in.testing import (
    load_image, mean_iou, model_in_mode, perturbed_state_dict, predict_quality_masks, records_iou, small_sam,
)
from sam_drop_in import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator, SamPredictor
from sam_drop_in.batch import ImageEmbedding, embed_images, set_embedding
from sam_drop_in.build_sam import build_sam_sized
from sam_drop_in.modeling._fast_decoder import ImageSide
from sam_drop_in.modeling.image_decoder import ImageDecoder
from sam_drop_in.precision import MODES, _Boundary, _cast, entry_points, optimize


IOU_MIN = 0.9
SIZE = 256  # model input size: 16x16 image embedding, 64x64 low-res logits
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
PACKAGE = Path(sam_drop_in.__file__).resolve().parent


@pytest.fixture(scope="module")
def coffee():
    return load_image("coffee.jpg")  # 400x600


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return perturbed_state_dict(build_sam_sized("vit_t", image_size=SIZE).state_dict(), seed=1)


def _model(sd, mode, device="cpu"):
    """vit_t at SIZE with weights ``sd`` on ``device`` in ``mode``; fp16 also on CPU."""
    m = build_sam_sized("vit_t", image_size=SIZE)
    m.load_state_dict(sd)
    return model_in_mode(m, mode, device)


@pytest.fixture(scope="module")
def fp32_quality(sd, coffee, device):
    return predict_quality_masks(SamPredictor(_model(sd, "fp32", device)), coffee)


@pytest.fixture(scope="module", params=["bf16", "fp16"])
def reduced(request, sd, device):
    """(mode, predictor) with a reduced-precision model, shared by the tests of this module."""
    return request.param, SamPredictor(_model(sd, request.param, device))


# -- the mechanism --------------------------------------------------------------------------


def test_every_entry_point_is_covered(sd):
    """Every module of the encoder and decoder has its forward and public methods behind the
    float32 boundary, and every method that the package's callers invoke on the decoder (found
    in the source, so a new caller or fast path is checked too) is one of them."""
    m = _model(sd, "bf16")
    for part in (m.image_encoder, m.mask_decoder):
        for module in part.modules():
            for name in entry_points(module):
                assert isinstance(module.__dict__.get(name), _Boundary), (type(module).__name__, name)
    decoder = m.mask_decoder
    called = set()
    for path in PACKAGE.rglob("*.py"):
        called |= set(re.findall(r"\b(?:mask_)?decoder\.(\w+)\(", path.read_text()))
    # Attributes of the decoder, less nn.Module's own API (train, register_forward_hook, ...).
    called = {n for n in called if hasattr(decoder, n) and (n == "forward" or not hasattr(torch.nn.Module, n))}
    assert called, "found no decoder call in the package: the pattern above is out of date"
    for name in sorted(called):
        attr = getattr(decoder, name)
        boundary = attr.__dict__.get("forward") if isinstance(attr, torch.nn.Module) else attr
        assert isinstance(boundary, _Boundary), f"mask_decoder.{name} is called by the package but not cast"


def test_boundary_casts_only_from_outside(sd):
    """From outside: float32 in, float32 out; inside, reduced precision. Both decoder routes:
    the module call (a hooked transformer takes the reference path) and ImageDecoder's fast path."""
    m = _model(sd, "bf16")
    dec, pe = m.mask_decoder, m.prompt_encoder
    emb = torch.randn(1, 256, 16, 16)
    points = (torch.rand(2, 1, 2) * SIZE, torch.ones(2, 1, dtype=torch.int))
    seen = []
    handle = dec.transformer.register_forward_hook(lambda mod, args, out: seen.append(out[0].dtype))
    try:
        sparse, dense = pe(points=points, boxes=None, masks=None)
        low, iou = dec(emb, pe.get_dense_pe(), sparse, dense, True)
    finally:
        handle.remove()
    assert seen == [torch.bfloat16]  # the transformer, called by the decoder, stays in bf16
    assert low.dtype == iou.dtype == torch.float32 and low.shape == (2, 3, 64, 64)
    fast_low, fast_iou = ImageDecoder(m, emb).decode(*points, multimask_output=True)
    assert fast_low.dtype == fast_iou.dtype == torch.float32 and fast_low.shape == (2, 3, 64, 64)
    # Contract: the same bf16 mathematics in another arrangement (fast vs module path): bf16
    # round-off of O(1) logits, well inside 0.1.
    torch.testing.assert_close(fast_low, low, rtol=0, atol=0.1)
    # A failing call leaves nothing marked as running: the next call is cast again.
    with pytest.raises(ValueError, match="image_embeddings has batch 3"):
        dec(emb.expand(3, -1, -1, -1), pe.get_dense_pe(), sparse, dense, True)
    assert dec.iou_prediction_head(torch.randn(2, 256)).dtype == torch.float32


def test_cast_keeps_containers_and_shared_batches():
    x = torch.randn(1, 4)
    side = ImageSide(keys=x, first=None, biases=[x, x], final_bias=x, grid=(1, 4))
    got = _cast({"a": (side, [x]), "n": 3, "i": torch.ones(2, dtype=torch.int)}, torch.bfloat16)
    assert type(got["a"][0]) is ImageSide and got["a"][0].first is None
    assert got["a"][0].keys.dtype == got["a"][0].biases[1].dtype == got["a"][1][0].dtype == torch.bfloat16
    assert got["n"] == 3 and got["i"].dtype == torch.int
    shared = _cast(x.expand(5, 4), torch.float16)
    assert shared.shape == (5, 4) and shared.stride(0) == 0  # still one row, expanded


def test_reduced_model_copies_and_keeps_its_state_dict(sd):
    m = _model(sd, "bf16")
    assert set(m.state_dict()) == set(sd)  # the boundary adds no state
    twin = copy.deepcopy(m)
    assert twin.mask_decoder.__dict__["forward"].module is twin.mask_decoder
    p, q = SamPredictor(m), SamPredictor(twin)
    image = load_image("astronaut.jpg")[::4, ::4].copy()
    p.set_image(image)
    q.set_image(image)
    # The same kernels on the same shapes: bit-identical.
    assert torch.equal(p.features, q.features)


# -- every public entry point, in every reduced precision ------------------------------------


def test_predictor_entry_points(reduced, coffee):
    mode, pred = reduced
    pred.set_image(coffee)
    emb = pred.get_image_embedding()
    assert emb.dtype == torch.float32 and emb.shape == (1, 256, 16, 16) and torch.isfinite(emb).all()
    masks, scores, logits = pred.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    assert masks.dtype == np.bool_ and masks.shape == (3, 400, 600)
    assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
    assert logits.dtype == np.float32 and logits.shape == (3, 64, 64)
    raw, s1, _ = pred.predict(box=np.array([50, 40, 400, 300]), multimask_output=False, return_logits=True)
    assert raw.dtype == np.float32 and raw.shape == (1, 400, 600) and s1.dtype == np.float32
    dev = pred.device
    boxes = pred.transform.apply_boxes_torch(torch.tensor([[10.0, 10, 500, 300]] * 5), coffee.shape[:2]).to(dev)
    m, s, lo = pred.predict_torch(None, None, boxes=boxes)
    assert m.dtype == torch.bool and m.shape == (5, 3, 400, 600)
    assert s.dtype == lo.dtype == torch.float32 and lo.shape == (5, 3, 64, 64)
    # Several prompts of two points each, with a mask input per prompt.
    pts = pred.transform.apply_coords_torch(torch.rand(4, 2, 2, generator=torch.Generator().manual_seed(0)) * 400,
                                            coffee.shape[:2]).to(dev)
    labels = torch.tensor([[1, 0]] * 4, dtype=torch.int, device=dev)
    m, s, lo2 = pred.predict_torch(pts, labels, mask_input=lo[:4, :1], multimask_output=False, return_logits=True)
    assert m.dtype == torch.float32 and m.shape == (4, 1, 400, 600) and s.shape == (4, 1)
    assert torch.isfinite(lo2).all()


def test_agreement_with_fp32(reduced, coffee, fp32_quality):
    mode, pred = reduced
    iou = mean_iou(fp32_quality, predict_quality_masks(pred, coffee))
    print(f"{mode} prompts mean mask IoU vs fp32: {iou:.4f}")
    assert iou >= IOU_MIN, f"{mode} agrees with fp32 at mean IoU {iou:.3f}"


GENERATORS = {
    # Thresholds 0 and NMS at 1.0 keep every mask: every record is compared, not a filtered few.
    "automatic": lambda m: SamAutomaticMaskGenerator(m, points_per_side=6, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.0, box_nms_thresh=1.0),
    # high_score_thresh beyond any logit: nothing is covered, so the dense pass runs everywhere.
    "hierarchical": lambda m: SamHierarchicalMaskGenerator(m, points_per_side=8, pred_iou_thresh=0.0,
                                                           high_score_thresh=1e9, stability_score_thresh=0.0,
                                                           box_nms_thresh=1.0),
}


@pytest.fixture(scope="module")
def small_image(coffee):
    return np.ascontiguousarray(coffee[::2, ::2])  # 200x300


@pytest.fixture(scope="module")
def fp32_records(sd, small_image, device):
    model = _model(sd, "fp32", device)
    return {name: make(model).generate(small_image) if name == "automatic" else make(model).hierarchical_generate(small_image)
            for name, make in GENERATORS.items()}


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_mask_generators(reduced, kind, small_image, fp32_records):
    mode, pred = reduced
    gen = GENERATORS[kind](pred.model)
    records = gen.generate(small_image) if kind == "automatic" else gen.hierarchical_generate(small_image)
    assert len(records) >= 0.5 * len(fp32_records[kind]) > 0
    for r in records:
        assert r["segmentation"].dtype == np.bool_ and r["segmentation"].shape == small_image.shape[:2]
        assert isinstance(r["predicted_iou"], float) and np.isfinite(r["predicted_iou"])
        assert isinstance(r["stability_score"], float)
    iou = records_iou(fp32_records[kind], records)
    print(f"{mode} {kind} records mean mask IoU vs fp32: {iou:.4f}")
    assert iou >= IOU_MIN, f"{mode} {kind} generator agrees with fp32 at mean IoU {iou:.3f}"


def test_embed_images_and_set_embedding(reduced, coffee):
    mode, pred = reduced
    images = [coffee, load_image("astronaut.jpg")[::2, ::2]]
    embs = embed_images(pred, images, batch_size=2)
    prompt = dict(point_coords=np.array([[120.0, 100.0]]), point_labels=np.array([1]))
    eps = torch.finfo(REDUCED[mode]).eps
    for emb, image in zip(embs, images):
        assert emb.features.dtype == torch.float32 and emb.features.shape == (1, 256, 16, 16)
        pred.set_image(image)
        ref_feats, ref_masks = pred.features, pred.predict(**prompt)[0]
        # Contract: the same model and image encoded alone and in a batch of two differ only by
        # summation order (other GEMM blockings) followed by rounding to the reduced type at
        # every layer, i.e. a few of its ulps at the values' magnitude. Measured: bf16 1 ulp
        # (3 with emulated bf16), fp16 1 ulp of the largest value; bound 8.
        tol = 8 * eps * float(ref_feats.abs().max())
        torch.testing.assert_close(emb.features, ref_feats, rtol=0, atol=tol)
        set_embedding(pred, emb)
        masks = pred.predict(**prompt)[0]
        assert masks.shape == ref_masks.shape
        assert mean_iou(torch.as_tensor(masks)[None], torch.as_tensor(ref_masks)[None]) >= IOU_MIN


# -- int8, errors, batch (fp32) --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sd():
    return perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)


def _small(sd, mode="fp32"):
    m = small_sam("sam_drop_in")
    m.load_state_dict(sd)
    return optimize(m, mode)


@pytest.fixture(scope="module")
def small_fp32_masks(small_sd, coffee):
    return predict_quality_masks(SamPredictor(_small(small_sd)), coffee)


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_cpu_modes_keep_api_dtypes_and_agree(mode, small_sd, coffee, small_fp32_masks):
    """fp32 and int8 (the encoder in ONNX Runtime, CPU-only; dynamic without calibration
    images) on the 1024-pixel small ViT. tests/test_quant_real.py tests the calibrated int8."""
    base = small_fp32_masks
    pred = SamPredictor(_small(small_sd, mode))
    pred.set_image(coffee)
    assert pred.get_image_embedding().dtype == torch.float32 and pred.get_image_embedding().shape == (1, 256, 64, 64)
    masks, scores, logits = pred.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    assert masks.dtype == np.bool_ and masks.shape == (3, 400, 600)
    assert scores.dtype == np.float32 and logits.dtype == np.float32 and logits.shape == (3, 256, 256)
    iou = mean_iou(base, predict_quality_masks(pred, coffee))
    if mode == "fp32":
        assert iou == 1.0  # the same model on the same inputs: the same kernels, bit for bit
    else:
        assert iou >= IOU_MIN, f"{mode} agrees with fp32 at mean IoU {iou:.3f}"


def test_bad_modes_raise_clearly(small_sd):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        optimize(small_sam("sam_drop_in"), "fp16")
    with pytest.raises(ValueError, match="mode must be one of"):
        optimize(small_sam("sam_drop_in"), "int4")
    with pytest.raises(ValueError, match="expects a SAM model"):
        optimize(torch.nn.Linear(2, 2), "int8")
    m = optimize(small_sam("sam_drop_in"), "int8")
    assert optimize(m, "int8") is m  # same choice again: nothing to do
    with pytest.raises(ValueError, match="already optimised"):
        optimize(m, "fp32")
    assert set(MODES) == {"fp32", "bf16", "fp16", "int8", "w8a8", "w6a6"}


def test_int8_replaces_the_encoder_only(small_sd):
    """int8 runs the image encoder as an int8 ONNX model (integer matrix products on int8
    weights); the mask decoder stays the float32 one, every parameter unchanged."""
    import onnx

    from sam_drop_in.quantization.onnx_int8 import OnnxImageEncoder

    ref = _small(small_sd)
    m = _small(small_sd, "int8")
    assert isinstance(m.image_encoder, OnnxImageEncoder) and m.image_encoder.quantized == "int8-dynamic"
    graph = onnx.load_from_string(m.image_encoder._model).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}
    assert any(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in graph.initializer)
    for (name, p), (ref_name, ref_p) in zip(m.mask_decoder.named_parameters(), ref.mask_decoder.named_parameters()):
        assert name == ref_name and p.dtype == torch.float32 and torch.equal(p, ref_p)


def test_no_deprecated_quantization_api():
    """torch.ao.quantization (deprecated in torch 2.14) is used nowhere in the package."""
    hits = [str(p) for p in PACKAGE.rglob("*.py") if "torch.ao" in p.read_text(encoding="utf-8")]
    assert hits == []


def test_vit_t_int8_agrees_with_fp32(coffee):
    sd = perturbed_state_dict(sam_drop_in.sam_model_registry["vit_t"]().state_dict(), seed=3)

    def build(mode):
        m = sam_drop_in.sam_model_registry["vit_t"]()
        m.load_state_dict(sd)
        return optimize(m, mode)

    base = predict_quality_masks(SamPredictor(build("fp32")), coffee)
    iou = mean_iou(base, predict_quality_masks(SamPredictor(build("int8")), coffee))
    assert iou >= IOU_MIN, f"vit_t int8 agrees with fp32 at mean IoU {iou:.3f}"


def test_embed_images_then_set_embedding_matches_set_image(small_sd, coffee):
    astronaut = load_image("astronaut.jpg")
    pred = SamPredictor(_small(small_sd))
    embs = embed_images(pred, [coffee, astronaut], batch_size=2)
    assert [type(e) for e in embs] == [ImageEmbedding] * 2
    prompt = dict(point_coords=np.array([[120.0, 100.0]]), point_labels=np.array([1]))
    for emb, image in zip(embs, [coffee, astronaut]):
        pred.set_image(image)
        ref_feats, ref_out = pred.features, pred.predict(**prompt, return_logits=True)
        ref_sizes = (pred.original_size, pred.input_size)
        pred.reset_image()
        set_embedding(pred, emb)
        assert pred.is_image_set and (pred.original_size, pred.input_size) == ref_sizes
        # Batched and single GEMMs may sum in a different order: rounding-level differences.
        torch.testing.assert_close(pred.features, ref_feats, rtol=0, atol=1e-5)
        out = pred.predict(**prompt, return_logits=True)
        np.testing.assert_allclose(out[0], ref_out[0], rtol=0, atol=1e-4)
        np.testing.assert_allclose(out[1], ref_out[1], rtol=0, atol=1e-5)


def test_embed_images_rejects_bad_input_before_work(small_sd, coffee):
    pred = SamPredictor(_small(small_sd))
    pred.set_image(coffee)
    before = pred.features
    with pytest.raises(ValueError, match=r"images\[1\]"):
        embed_images(pred, [coffee, coffee[..., 0]])
    with pytest.raises(ValueError, match="list of HxWx3"):
        embed_images(pred, coffee)
    with pytest.raises(ValueError, match="ImageEmbedding"):
        set_embedding(pred, before)
    assert pred.features is before and pred.is_image_set
