"""sam_drop_in.precision.optimize and sam_drop_in.batch.

Agreement with fp32 is the mean IoU of multimask masks for 9 points and 8 boxes on real
photographs (examples/images), with perturbed random weights. Random weights put many logits
near the threshold, so agreement is lower than with a trained checkpoint: these bounds are
lower bounds. Measured here: int8 on vit_t about 0.95+, bf16 on the small encoder about 0.99.
"""

import os
import sys
import warnings

import numpy as np
import pytest
import torch

import sam_drop_in
from compat_tests.conftest import load_image, perturbed_state_dict, small_sam
from sam_drop_in.batch import ImageEmbedding, embed_images, set_embedding
from sam_drop_in.precision import MODES, cpu_has_native_bf16, optimize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from _common import mean_iou, predict_quality_masks  # noqa: E402

IOU_MIN = 0.9


@pytest.fixture(scope="module")
def coffee():
    return load_image("coffee.jpg")


@pytest.fixture(scope="module")
def small_sd():
    return perturbed_state_dict(small_sam("sam_drop_in").state_dict(), seed=1)


def _small(sd, mode="fp32"):
    m = small_sam("sam_drop_in")
    m.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no native bf16" on such CPUs
        return optimize(m, mode)


@pytest.fixture(scope="module")
def small_fp32_masks(small_sd, coffee):
    return predict_quality_masks(sam_drop_in.SamPredictor(_small(small_sd)), coffee)


BF16_SLOW = "bf16 is emulated on this CPU (no AVX-512 BF16/AMX), ~30x slower than fp32: over the test-time budget"


@pytest.mark.parametrize("mode", ["fp32", "int8",
                                  pytest.param("bf16", marks=pytest.mark.skipif(not cpu_has_native_bf16(), reason=BF16_SLOW))])
def test_modes_keep_api_dtypes_and_agree(mode, small_sd, coffee, small_fp32_masks):
    pred = sam_drop_in.SamPredictor(_small(small_sd, mode))
    pred.set_image(coffee)
    assert pred.get_image_embedding().dtype == torch.float32
    assert pred.get_image_embedding().shape == (1, 256, 64, 64)
    masks, scores, logits = pred.predict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    assert masks.dtype == np.bool_ and masks.shape == (3, 400, 600)
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert logits.dtype == np.float32 and logits.shape == (3, 256, 256)
    raw, _, _ = pred.predict(box=np.array([50, 40, 400, 300]), multimask_output=False, return_logits=True)
    assert raw.dtype == np.float32 and raw.shape == (1, 400, 600)
    boxes = pred.transform.apply_boxes_torch(torch.tensor([[10.0, 10, 500, 300]] * 5), coffee.shape[:2])
    m, s, lo = pred.predict_torch(None, None, boxes=boxes)
    assert m.dtype == torch.bool and m.shape == (5, 3, 400, 600)
    assert s.dtype == torch.float32 and lo.dtype == torch.float32
    iou = mean_iou(small_fp32_masks, predict_quality_masks(pred, coffee))
    if mode == "fp32":
        assert iou == 1.0
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
    assert set(MODES) == {"fp32", "bf16", "fp16", "int8"}


def test_int8_quantises_linear_layers(small_sd):
    m = _small(small_sd, "int8")
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for part in (m.image_encoder, m.mask_decoder):
        mods = list(part.modules())
        assert not any(type(mod) is torch.nn.Linear for mod in mods)
        assert any(isinstance(mod, DynamicLinear) for mod in mods)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason=BF16_SLOW)
def test_vit_t_bf16_agrees_with_fp32(vit_t_sd, coffee):
    _vit_t_agreement(vit_t_sd, coffee, "bf16")


@pytest.fixture(scope="module")
def vit_t_sd():
    return perturbed_state_dict(sam_drop_in.sam_model_registry["vit_t"]().state_dict(), seed=3)


def _vit_t_agreement(sd, image, mode):
    def build(mode):
        m = sam_drop_in.sam_model_registry["vit_t"]()
        m.load_state_dict(sd)
        return optimize(m, mode)

    base = predict_quality_masks(sam_drop_in.SamPredictor(build("fp32")), image)
    iou = mean_iou(base, predict_quality_masks(sam_drop_in.SamPredictor(build(mode)), image))
    assert iou >= IOU_MIN, f"vit_t {mode} agrees with fp32 at mean IoU {iou:.3f}"


def test_vit_t_int8_agrees_with_fp32(vit_t_sd, coffee):
    _vit_t_agreement(vit_t_sd, coffee, "int8")


def test_embed_images_then_set_embedding_matches_set_image(small_sd, coffee):
    astronaut = load_image("astronaut.jpg")
    pred = sam_drop_in.SamPredictor(_small(small_sd))
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
    pred = sam_drop_in.SamPredictor(_small(small_sd))
    pred.set_image(coffee)
    before = pred.features
    with pytest.raises(ValueError, match=r"images\[1\]"):
        embed_images(pred, [coffee, coffee[..., 0]])
    with pytest.raises(ValueError, match="list of HxWx3"):
        embed_images(pred, coffee)
    with pytest.raises(ValueError, match="ImageEmbedding"):
        set_embedding(pred, before)
    assert pred.features is before and pred.is_image_set
