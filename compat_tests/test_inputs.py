"""Inputs at the edges: float images, thin images, impossible sizes, prompts that overflow float32,
point labels, and the exception types of bad prompt shapes.

Where segment_anything has a behaviour (float images, exception types, thin images) the same
assertion runs against every implementation (the ``impl`` fixture). Where it has none worth
keeping (it accepts the input, then returns NaN or raises ZeroDivisionError later), the
assertions are sam_drop_in's own and say so.
"""

import numpy as np
import pytest
import torch

import sam_drop_in
from sam_drop_in._errors import InputError

from sam_drop_in.testing import small_sam

POINT = dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))


# --- float images (issue 18, item 2) ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_float_image_gives_the_uint8_result(impl, small_model, coffee, dtype):
    # Contract: upstream converts a float image in [0, 1] to uint8 (times 255, truncated) before
    # resizing, so image / 255 gives exactly the uint8 image's pixels (v / 255 * 255 truncates
    # back to v in float16, 32 and 64) and so exactly its embedding: same kernels, same shapes.
    a = impl.SamPredictor(small_model)
    a.set_image(coffee)
    b = impl.SamPredictor(small_model)
    b.set_image((coffee / 255).astype(dtype))
    torch.testing.assert_close(b.features, a.features, rtol=0, atol=0)
    assert b.original_size == a.original_size and b.input_size == a.input_size
    resize = impl.utils.transforms.ResizeLongestSide(1024)
    np.testing.assert_array_equal(resize.apply_image((coffee / 255).astype(dtype)), resize.apply_image(coffee))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_float_image_truncates_as_upstream(dtype):
    # Values between the 1/255 steps: upstream truncates after multiplying in the image's own
    # dtype; the same arithmetic gives the same pixels (exact equality).
    from segment_anything.utils.transforms import ResizeLongestSide as Upstream

    from sam_drop_in.utils.transforms import ResizeLongestSide

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (37, 53, 3)).astype(dtype)
    image[0, :3] = [[0, 0, 0], [1, 1, 1], [0.999, 0.5, 1 / 255]]
    np.testing.assert_array_equal(ResizeLongestSide(64).apply_image(image), Upstream(64).apply_image(image))


def test_integer_image_refused_as_type_error(impl, small_model):
    # Upstream's torchvision conversion raises TypeError for int64 images; ours is a TypeError
    # too (ImageDtypeError, also an InputError) with a message saying what to pass.
    resize = impl.utils.transforms.ResizeLongestSide(1024)
    with pytest.raises(TypeError):
        resize.apply_image(np.zeros((8, 8, 3), np.int64))
    with pytest.raises(TypeError):
        impl.SamPredictor(small_model).set_image(np.zeros((8, 8, 3), np.int64))


@pytest.mark.parametrize("bad", [np.full((8, 8, 3), 200.0, np.float32), np.full((8, 8, 3), -0.5), np.full((8, 8, 3), np.nan)])
def test_float_image_outside_unit_range_refused(bad):
    # sam_drop_in only: upstream casts these to uint8 with wrap-around (garbage pixels, no error).
    from sam_drop_in.utils.transforms import ResizeLongestSide

    with pytest.raises(InputError, match=r"\[0, 1\]|NaN"):
        ResizeLongestSide(1024).apply_image(bad)


# --- thin images and impossible sizes (issue 17, item 1) -----------------------------------


def test_thin_image_refused(impl, small_model, coffee):
    # A 1x3000 image resizes to 0x1024. Upstream fails in PIL with ValueError; ours is an
    # InputError (a ValueError) naming the minimum, and the previous image stays set.
    p = impl.SamPredictor(small_model)
    p.set_image(coffee)
    features = p.features
    with pytest.raises(ValueError) as info:
        p.set_image(np.zeros((1, 3000, 3), np.uint8))
    with pytest.raises(ValueError):
        impl.utils.transforms.ResizeLongestSide(1024).apply_image(np.zeros((3000, 1, 3), np.uint8))
    if impl.__name__ == "sam_drop_in":
        assert isinstance(info.value, InputError)
        assert "at least 1 pixel after resizing" in str(info.value) and "at least 2 pixels" in str(info.value)
        assert p.is_image_set and p.features is features and p.original_size == coffee.shape[:2]


def test_thinnest_image_accepted(impl, small_model):
    # 2x3000 resizes to 1x1024: the smallest allowed, and it predicts at the original size.
    p = impl.SamPredictor(small_model)
    p.set_image(np.full((2, 3000, 3), 128, np.uint8))
    masks, scores, _ = p.predict(point_coords=np.array([[1500, 1]]), point_labels=np.array([1]))
    assert masks.shape == (3, 2, 3000) and np.all(np.isfinite(scores))


@pytest.mark.parametrize("size", [(0, 0), (0, 600), (-400, 600), (400.5, 600), (1, 3000), (400,), (400, 600, 3), "ab", None])
def test_impossible_original_size_refused(ours, size):
    # sam_drop_in only: upstream accepts these, then every predict raises ZeroDivisionError or
    # maps points onto a line of zero height.
    p = ours
    before = p.features, p.original_size, p.predict(**POINT)[1]
    x = torch.zeros(1, 3, 683, 1024)
    with pytest.raises(InputError, match="original_image_size"):
        p.set_torch_image(x, size)
    assert p.features is before[0] and p.original_size == before[1]
    np.testing.assert_array_equal(p.predict(**POINT)[1], before[2])


def test_possible_original_sizes_accepted(coffee):
    p = sam_drop_in.SamPredictor(small_sam("sam_drop_in"))
    x = torch.zeros(1, 3, 683, 1024)
    for size in [(400, 600), torch.Size([400, 600]), (np.int64(400), np.int32(600)), (400.0, 600.0), [2, 3000]]:
        p.set_torch_image(x, size)
        assert p.original_size == tuple(int(s) for s in size)
        assert np.all(np.isfinite(p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))[1]))
    with pytest.raises(InputError, match="BCHW"):
        p.set_torch_image(torch.zeros(1, 3, 0, 1024), (400, 600))


# --- prompts that overflow float32 (issue 17, item 2) -----------------------------------------


@pytest.fixture(scope="module")
def ours():
    p = sam_drop_in.SamPredictor(small_sam("sam_drop_in"))
    from sam_drop_in.testing import load_image

    p.set_image(load_image("coffee.jpg"))  # 400x600: points scale by 1024/600
    return p


OVERFLOW = {
    "point_1e39": dict(point_coords=np.array([[1e39, 10]]), point_labels=np.array([1])),
    # Finite in float32, overflows once scaled to the 1024 frame.
    "point_3e38": dict(point_coords=np.array([[10, 3e38]]), point_labels=np.array([1])),
    "box_1e39": dict(box=np.array([0, 0, 1e39, 10])),
    "box_3e38": dict(box=np.array([0, 0, 3e38, 10])),
    "mask_1e39": dict(mask_input=np.full((1, 256, 256), 1e39)),
    "mask_3e38_float32": dict(mask_input=np.full((1, 256, 256), 3e38, np.float32)),
}


@pytest.mark.parametrize("name", list(OVERFLOW))
def test_float32_overflow_refused(ours, name):
    # sam_drop_in only: upstream returns NaN scores and empty masks for these.
    before = ours.predict(**POINT)[1]
    with pytest.raises(InputError, match="float32"):
        ours.predict(**OVERFLOW[name])
    np.testing.assert_array_equal(ours.predict(**POINT)[1], before)


def test_large_but_representable_prompts_accepted(ours):
    # The bound is float32 itself: 1e37 scaled by 1024/600 is finite, and so is every output.
    for kwargs in [dict(point_coords=np.array([[1e37, 10]]), point_labels=np.array([1])),
                   dict(box=np.array([0, 0, 1e37, 10])), dict(mask_input=np.full((1, 256, 256), 1e30))]:
        masks, scores, logits = ours.predict(**kwargs, return_logits=True)
        assert np.all(np.isfinite(scores)) and np.all(np.isfinite(logits)) and np.all(np.isfinite(masks))


def test_predict_torch_overflow_refused(ours):
    with pytest.raises(InputError, match="float32"):
        ours.predict_torch(torch.tensor([[[1e39, 10.0]]], dtype=torch.float64), torch.ones(1, 1))
    with pytest.raises(InputError, match="float32"):
        ours.predict_torch(None, None, boxes=torch.tensor([[0, 0, float("inf"), 10]]))
    with pytest.raises(InputError, match="mask_input"):
        ours.predict_torch(None, None, mask_input=torch.full((1, 1, 256, 256), float("nan")))


# --- point labels (issue 17, item 3) ----------------------------------------------------------


@pytest.mark.parametrize("label", [np.nan, 0.7, 5, -2, 2, 3])
def test_bad_label_refused(ours, label):
    # sam_drop_in only: upstream silently treats these as no label (2, 3, 5, NaN) or as a
    # background click (0.7). The message is the ONNX predictor's too (tests/test_onnx_inputs.py).
    with pytest.raises(InputError, match=r"point_labels must be 1 \(foreground point\), 0 \(background point\) or -1"):
        ours.predict(point_coords=np.array([[300, 200], [10, 10]]), point_labels=np.array([1, label]))
    with pytest.raises(InputError, match=r"point_labels must be 1"):
        ours.predict_torch(torch.tensor([[[300.0, 200.0]]]), torch.tensor([[label]]))


def test_accepted_labels_match_upstream(impl, small_model, coffee):
    # -1 marks a point as padding: upstream's prompt encoder replaces its embedding by the
    # 'not a point' one; with labels 1.0 as floats and a -1 point, ours equals upstream's numbers.
    p = impl.SamPredictor(small_model)
    p.set_image(coffee)
    out = p.predict(point_coords=np.array([[300, 200], [50, 60]]), point_labels=np.array([1.0, -1.0]), return_logits=True)
    ref = _upstream_reference(small_model, coffee)
    # Same weights, same small model: float32 sums in another order at most (observed ~1e-6).
    np.testing.assert_allclose(out[1], ref[1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(out[2], ref[2], rtol=0, atol=1e-3)


_REF = {}


def _upstream_reference(small_model, coffee):
    if "ref" not in _REF:
        import segment_anything

        from .conftest import _SMALL_STATE

        model = small_sam("segment_anything")
        model.load_state_dict(_SMALL_STATE["sd"])
        p = segment_anything.SamPredictor(model.eval())
        p.set_image(coffee)
        _REF["ref"] = p.predict(point_coords=np.array([[300, 200], [50, 60]]), point_labels=np.array([1, -1]), return_logits=True)
    return _REF["ref"]


# --- exception types of bad prompt shapes (issue 18, item 5) -----------------------------------

# The type segment_anything 1.0 (with the installed torch) raises from deep inside for each.
SHAPE_ERRORS = {
    "coords_1d": (IndexError, dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1]))),
    "coords_3_columns": (RuntimeError, dict(point_coords=np.array([[1.0, 2.0, 3.0]]), point_labels=np.array([1]))),
    "count_mismatch": (IndexError, dict(point_coords=np.array([[1, 2], [3, 4]]), point_labels=np.array([1]))),
    "labels_2d": (RuntimeError, dict(point_coords=np.array([[1, 2]]), point_labels=np.array([[1]]))),
    "two_boxes": (RuntimeError, dict(box=np.array([[0, 0, 10, 10], [5, 5, 20, 20]]))),
    "box_3": (ValueError, dict(box=np.array([0, 0, 10]))),
    "mask_2d": (IndexError, dict(mask_input=np.zeros((256, 256), np.float32))),
    "mask_128": (RuntimeError, dict(mask_input=np.zeros((1, 128, 128), np.float32))),
    "mask_2_channels": (RuntimeError, dict(mask_input=np.zeros((2, 256, 256), np.float32))),
}


@pytest.mark.parametrize("name", list(SHAPE_ERRORS))
def test_prompt_shape_error_types(predictor, name):
    # The same pytest.raises for every implementation: a handler written for upstream's failure
    # (except RuntimeError / IndexError around predict) keeps catching ours.
    expected, kwargs = SHAPE_ERRORS[name]
    with pytest.raises(expected):
        predictor.predict(**kwargs)


TORCH_SHAPE_ERRORS = {
    "coords_2d": (RuntimeError, (torch.zeros(2, 2), torch.ones(2, 1))),
    "labels_mismatch": (IndexError, (torch.zeros(2, 1, 2), torch.ones(3, 1))),
    "batch_sizes_differ": (RuntimeError, (torch.zeros(2, 1, 2), torch.ones(2, 1), torch.zeros(3, 4))),
    "box_3": (RuntimeError, (None, None, torch.zeros(2, 3))),
    "mask_3d": (RuntimeError, (None, None, None, torch.zeros(2, 256, 256))),
}


@pytest.mark.parametrize("name", list(TORCH_SHAPE_ERRORS))
def test_predict_torch_shape_error_types(predictor, name):
    expected, args = TORCH_SHAPE_ERRORS[name]
    with pytest.raises(expected):
        predictor.predict_torch(*args)


def test_shape_errors_are_input_errors(ours):
    # Ours are also InputError (ValueError, AssertionError) with a message, whatever upstream's type.
    from sam_drop_in._errors import PromptShapeError

    for expected, kwargs in SHAPE_ERRORS.values():
        with pytest.raises(PromptShapeError) as info:
            ours.predict(**kwargs)
        e = info.value
        assert all(isinstance(e, t) for t in (InputError, ValueError, AssertionError, RuntimeError, IndexError))
        assert any(word in str(e) for word in ("shape", "points", "length-4")), str(e)
    # Bad values (not shapes) stay plain InputErrors: upstream does not fail on them.
    with pytest.raises(InputError) as info:
        ours.predict(point_coords=np.array([[1, 2]]), point_labels=np.array([7]))
    assert not isinstance(info.value, RuntimeError)
