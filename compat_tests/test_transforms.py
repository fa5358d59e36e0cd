"""ResizeLongestSide: identical results to segment_anything's (exact equality: same maths)."""

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide as Upstream

from sam_drop_in.utils.transforms import ResizeLongestSide

from sam_drop_in.testing import load_image

SIZES = [(400, 600), (600, 400), (512, 512), (7, 5), (1, 1), (1200, 1800), (3000, 17)]


@pytest.fixture(scope="module")
def photo():
    return load_image("coffee.jpg")


@pytest.mark.parametrize("size", SIZES)
def test_apply_image_identical(photo, size):
    from PIL import Image

    image = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BICUBIC))
    ours, up = ResizeLongestSide(1024).apply_image(image), Upstream(1024).apply_image(image)
    assert ours.dtype == up.dtype == np.uint8
    np.testing.assert_array_equal(ours, up)


@pytest.mark.parametrize("size", SIZES)
def test_coords_and_boxes_identical(size):
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 500, (5, 2))
    boxes = rng.uniform(0, 500, (3, 4))
    o, u = ResizeLongestSide(1024), Upstream(1024)
    np.testing.assert_array_equal(o.apply_coords(coords, size), u.apply_coords(coords, size))
    np.testing.assert_array_equal(o.apply_boxes(boxes, size), u.apply_boxes(boxes, size))
    assert o.apply_coords(coords.astype(np.int64), size).dtype == u.apply_coords(coords.astype(np.int64), size).dtype
    tc, tb = torch.tensor(coords), torch.tensor(boxes)
    torch.testing.assert_close(o.apply_coords_torch(tc, size), u.apply_coords_torch(tc, size), rtol=0, atol=0)
    torch.testing.assert_close(o.apply_boxes_torch(tb, size), u.apply_boxes_torch(tb, size), rtol=0, atol=0)
    assert o.get_preprocess_shape(*size, 1024) == u.get_preprocess_shape(*size, 1024)


def test_inputs_not_modified():
    coords = np.array([[10.0, 20.0]])
    t = torch.tensor([[10.0, 20.0]])
    ResizeLongestSide(1024).apply_coords(coords, (100, 200))
    ResizeLongestSide(1024).apply_coords_torch(t, (100, 200))
    assert coords.tolist() == [[10.0, 20.0]] and t.tolist() == [[10.0, 20.0]]


def test_apply_image_torch_reads_bchw(photo):
    # segment_anything 1.0 read H, W from axes 0 and 1 (batch and channels); the fix reads 2 and 3.
    x = torch.as_tensor(photo).permute(2, 0, 1)[None].float()
    out = ResizeLongestSide(1024).apply_image_torch(x)
    assert out.shape == (1, 3, 683, 1024)
    expected = torch.nn.functional.interpolate(x, (683, 1024), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
