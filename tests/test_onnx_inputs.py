"""SamOnnxPredictor and SamPredictor on the same edge inputs (issue 17, items 1-3; issue 18, item 2):
the same accepted inputs, the same refusals with the same messages, and equal outputs for every
accepted kind of prompt, including the -1 padding label.

The model is the compatibility suite's 1-block ViT SAM with perturbed weights (every term
non-trivial), exported once; prompts and labels do not depend on the encoder's size.

Tolerances (float32 throughout, as tests/test_onnx.py): IoU predictions atol 1e-5, low-resolution
logits atol 2e-4 (ONNX Runtime reorders the same float32 sums; observed ~1e-6 here); binary masks
equal except where the torch logit is within 1e-3 of the threshold.
"""

import copy
import warnings

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sam_drop_in import SamPredictor  # noqa: E402
from sam_drop_in._errors import InputError  # noqa: E402
from sam_drop_in.onnx_export import export_decoder, export_encoder  # noqa: E402
from sam_drop_in.onnx_predictor import SamOnnxPredictor  # noqa: E402

from sam_drop_in.testing import load_image, perturbed_state_dict, small_sam  # noqa: E402

NEAR_THRESHOLD = 1e-3


@pytest.fixture(scope="module")
def sam():
    model = small_sam("sam_drop_in")
    model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=5))
    return model.eval()


@pytest.fixture(scope="module")
def image():
    return load_image("coffee.jpg")  # 400x600


@pytest.fixture(scope="module")
def predictors(sam, image, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_encoder(sam, str(out / "encoder.onnx"), opset=17, include_preprocessing=True)
        export_decoder(sam, str(out / "decoder.onnx"), opset=17)
    torch_p = SamPredictor(sam)
    torch_p.set_image(image)
    onnx_p = SamOnnxPredictor(out / "encoder.onnx", out / "decoder.onnx")
    onnx_p.set_image(image)
    return torch_p, onnx_p


ACCEPTED = {
    "foreground": dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1])),
    "fg_bg_float_labels": dict(point_coords=np.array([[300, 200], [50, 60]]), point_labels=np.array([1.0, 0.0])),
    "padding_label": dict(point_coords=np.array([[300, 200], [50, 60]]), point_labels=np.array([1, -1])),
    "only_padding": dict(point_coords=np.array([[50, 60]]), point_labels=np.array([-1])),
    "box": dict(box=np.array([40, 30, 400, 280])),
    "box_and_points": dict(box=np.array([40, 30, 400, 280]), point_coords=np.array([[300, 200], [10, 10]]), point_labels=np.array([0, -1])),
    "far_point": dict(point_coords=np.array([[1e37, 10]]), point_labels=np.array([1])),
    "single_mask": dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]), multimask_output=False),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_prompts_agree(predictors, name):
    torch_p, onnx_p = predictors
    ref = torch_p.predict(**ACCEPTED[name], return_logits=True)
    masks, scores, low_res = onnx_p.predict(**ACCEPTED[name])
    np.testing.assert_allclose(scores, ref[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(low_res, ref[2], rtol=0, atol=2e-4)
    mismatch = (ref[0] > 0) != masks
    assert np.all(np.abs(ref[0][mismatch]) < NEAR_THRESHOLD), f"{mismatch.sum()} mask pixels differ"


def test_mask_input_agrees(predictors):
    torch_p, onnx_p = predictors
    prompt = ACCEPTED["foreground"]
    logits = torch_p.predict(**prompt)[2]
    ref = torch_p.predict(**prompt, mask_input=logits[:1], return_logits=True)
    got = onnx_p.predict(**prompt, mask_input=logits[:1])
    np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[2], ref[2], rtol=0, atol=2e-4)


REFUSED = {
    **{f"label_{v}": dict(point_coords=np.array([[300, 200]]), point_labels=np.array([v])) for v in (np.nan, 0.7, 5, -2, 2, 3)},
    "point_1e39": dict(point_coords=np.array([[1e39, 10]]), point_labels=np.array([1])),
    "point_3e38": dict(point_coords=np.array([[3e38, 10]]), point_labels=np.array([1])),
    "box_1e39": dict(box=np.array([0, 0, 1e39, 10])),
    "mask_1e39": dict(mask_input=np.full((1, 256, 256), 1e39)),
    "mask_3e38": dict(mask_input=np.full((1, 256, 256), 3e38, np.float32)),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_prompts_same_error(predictors, name):
    torch_p, onnx_p = predictors
    errors = []
    for p in (torch_p, onnx_p):
        with pytest.raises(InputError) as info:
            p.predict(**REFUSED[name])
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])


def test_images_same_as_torch_predictor(predictors, image):
    torch_p, onnx_p = predictors
    before = onnx_p.get_image_embedding()
    # A thin image: the same InputError, and the previous image stays set.
    errors = []
    for p in (torch_p, onnx_p):
        with pytest.raises(InputError, match="at least 2 pixels") as info:
            p.set_image(np.zeros((1, 3000, 3), np.uint8))
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert onnx_p.get_image_embedding() is before and onnx_p.original_size == image.shape[:2]
    # A float image in [0, 1] gives the uint8 image's embedding (identical pixels, same session).
    fresh = copy.copy(onnx_p)  # shares the sessions, has its own lock and image state
    assert fresh.lock is not onnx_p.lock
    fresh.set_image((image / 255).astype(np.float32))
    np.testing.assert_array_equal(fresh.get_image_embedding(), before)
