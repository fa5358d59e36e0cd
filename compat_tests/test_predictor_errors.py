"""Bad input to sam_drop_in's predictor: a clear error, and nothing lost.

segment_anything fails on these deep inside the model or not at all; these assertions are ours.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

import sam_drop_in
from sam_drop_in._errors import InputError

from sam_drop_in.testing import small_sam

POINTS = np.array([[300, 200]])
LABELS = np.array([1])


@pytest.fixture(scope="module")
def image():
    from sam_drop_in.testing import load_image

    return load_image("coffee.jpg")


@pytest.fixture(scope="module")
def model():
    return small_sam("sam_drop_in")


@pytest.fixture()
def predictor(model, image):
    p = sam_drop_in.SamPredictor(model)
    p.set_image(image)
    return p


def _snapshot(p):
    return p.features, p.original_size, p.input_size, p.predict(POINTS, LABELS)[1]


def _assert_unchanged(p, before):
    features, original_size, input_size, scores = before
    assert p.is_image_set and p.features is features
    assert p.original_size == original_size and p.input_size == input_size
    np.testing.assert_array_equal(p.predict(POINTS, LABELS)[1], scores)


BAD_IMAGES = {
    "grayscale_2d": (np.zeros((32, 48), np.uint8), r"2-D array .*np\.stack"),
    "rgba": (np.zeros((32, 48, 4), np.uint8), r"HxWx3.*alpha"),
    # Floats in [0, 1] are accepted as upstream does (test_inputs.py); outside, upstream's cast wraps.
    "float_0_255": (np.full((32, 48, 3), 200.0, np.float32), r"must be in \[0, 1\].*round\(\)\.astype"),
    "float_nan": (np.full((32, 48, 3), np.nan, np.float32), r"NaN"),
    "int64": (np.zeros((32, 48, 3), np.int64), r"uint8.*got int64"),
    "empty": (np.zeros((0, 48, 3), np.uint8), r"empty"),
    "not_an_array": ([[1, 2, 3]], r"numpy array"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_refused_and_state_kept(predictor, name):
    bad, message = BAD_IMAGES[name]
    before = _snapshot(predictor)
    with pytest.raises(InputError, match=message) as info:
        predictor.set_image(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)
    _assert_unchanged(predictor, before)


def test_bad_format_keeps_state(predictor, image):
    before = _snapshot(predictor)
    with pytest.raises(ValueError, match=r"image_format must be in \['RGB', 'BGR'\], is rgb\."):
        predictor.set_image(image, image_format="rgb")
    _assert_unchanged(predictor, before)


def test_encoder_failure_keeps_state(image):
    # Its own model, and the child module swapped and restored by hand: monkeypatch.setattr on
    # an nn.Module child deletes it on undo (pytest 9 sees it as absent from __dict__), which
    # would break every later test sharing the model.
    predictor = sam_drop_in.SamPredictor(small_sam("sam_drop_in"))
    predictor.set_image(image)
    before = _snapshot(predictor)
    encoder = predictor.model.image_encoder
    predictor.model.image_encoder = _Failing(encoder)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            predictor.set_image(image[:100])
    finally:
        predictor.model.image_encoder = encoder
    _assert_unchanged(predictor, before)


class _Failing(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.img_size = inner.img_size

    def forward(self, x):
        raise RuntimeError("simulated out of memory")


def test_non_contiguous_image_is_accepted(model, image):
    a = sam_drop_in.SamPredictor(model)
    a.set_image(np.ascontiguousarray(image[::2, ::2]))
    b = sam_drop_in.SamPredictor(model)
    b.set_image(image[::2, ::2])  # a strided view
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    fortran = np.asfortranarray(image)
    c = sam_drop_in.SamPredictor(model)
    c.set_image(fortran)
    assert c.original_size == image.shape[:2]


def test_bgr_input_equals_rgb(model, image):
    a = sam_drop_in.SamPredictor(model)
    a.set_image(image)
    b = sam_drop_in.SamPredictor(model)
    b.set_image(image[..., ::-1], image_format="BGR")  # a reversed view, not a copy
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)


BAD_PROMPTS = {
    "labels_without_coords": (dict(point_labels=np.array([1])), "point_labels was supplied without point_coords"),
    "coords_shape": (dict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1])), r"Nx2"),
    "count_mismatch": (dict(point_coords=np.array([[1, 2], [3, 4]]), point_labels=np.array([1])), "2 points but point_labels has 1"),
    "nan_coords": (dict(point_coords=np.array([[np.nan, 2.0]]), point_labels=np.array([1])), "NaN or infinite"),
    "inf_box": (dict(box=np.array([0, 0, np.inf, 10])), "NaN or infinite"),
    "box_shape": (dict(box=np.array([[0, 0, 10, 10], [5, 5, 20, 20]])), "length-4"),
    "mask_input_shape": (dict(mask_input=np.zeros((256, 256), np.float32)), r"1x256x256"),
    "string_labels": (dict(point_coords=np.array([[1, 2]]), point_labels=np.array(["fg"])), "integers"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompt(predictor, name):
    kwargs, message = BAD_PROMPTS[name]
    before = _snapshot(predictor)
    with pytest.raises(InputError, match=message):
        predictor.predict(**kwargs)
    _assert_unchanged(predictor, before)


def test_bad_torch_prompts(predictor):
    with pytest.raises(InputError, match="BxNx2"):
        predictor.predict_torch(torch.zeros(2, 2), torch.ones(2, 1))
    with pytest.raises(InputError, match="BxN matching"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(3, 1))
    with pytest.raises(InputError, match="batch sizes differ"):
        predictor.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=torch.zeros(3, 4))


def test_errors_survive_python_O():
    code = (
        "import numpy as np, sam_drop_in\n"
        "from sam_drop_in.testing import small_sam\n"
        "p = sam_drop_in.SamPredictor(small_sam('sam_drop_in'))\n"
        "try:\n    p.set_image(np.zeros((4, 4, 3), np.uint8), image_format='XYZ')\n"
        "except AssertionError as e:\n    print('raised', type(e).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert "raised InputError" in out.stdout, out.stderr
