"""sam_drop_in.utils.amg against segment_anything.utils.amg: same names, same results."""

import numpy as np
import pytest
import torch

import segment_anything.utils.amg as ref
import sam_drop_in.utils.amg as ours

NAMES = [
    "MaskData", "is_box_near_crop_edge", "box_xyxy_to_xywh", "batch_iterator", "mask_to_rle_pytorch",
    "rle_to_mask", "area_from_rle", "calculate_stability_score", "build_point_grid",
    "build_all_layer_point_grids", "generate_crop_boxes", "uncrop_boxes_xyxy", "uncrop_points",
    "uncrop_masks", "remove_small_regions", "coco_encode_rle", "batched_mask_to_box",
]


def _blob_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Masks with structure (blobs, holes, islands, border contact), plus an empty and a full one."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 1, max(h // 8, 2), max(w // 8, 2), generator=g)
    up = torch.nn.functional.interpolate(low, (h, w), mode="bilinear", align_corners=False)[:, 0]
    masks = up > 0.3
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True  # a leading 1 in column-major order
    return masks


def test_same_public_names():
    for name in NAMES:
        assert hasattr(ours, name), name


@pytest.mark.parametrize("shape", [(7, 33, 20), (3, 1, 1), (0, 5, 6), (5, 64, 48)])
def test_rle_matches_upstream(shape):
    masks = _blob_masks(*shape) if shape[0] >= 3 else torch.zeros(shape, dtype=torch.bool)
    expected = ref.mask_to_rle_pytorch(masks)
    got = ours.mask_to_rle_pytorch(masks)
    assert got == expected
    for rle_e, rle_g, m in zip(expected, got, masks):
        assert all(type(c) is int for c in rle_g["counts"])
        assert np.array_equal(ours.rle_to_mask(rle_g), ref.rle_to_mask(rle_e))
        assert np.array_equal(ours.rle_to_mask(rle_g), m.numpy())
        assert ours.area_from_rle(rle_g) == ref.area_from_rle(rle_e) == int(m.sum())


def test_rle_to_mask_rejects_inconsistent_size():
    with pytest.raises(ValueError, match="RLE counts sum"):
        ours.rle_to_mask({"size": [3, 3], "counts": [2, 3]})


@pytest.mark.parametrize("shape", [(6, 40, 31), (2, 3, 17, 9), (17, 9)])
def test_batched_mask_to_box_matches_upstream(shape):
    masks = _blob_masks(int(np.prod(shape[:-2])) if len(shape) > 2 else 3, *shape[-2:])
    masks = masks.reshape(*shape[:-2], *shape[-2:]) if len(shape) > 2 else masks[2]
    expected = ref.batched_mask_to_box(masks)
    got = ours.batched_mask_to_box(masks)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    empty = torch.zeros(0, 4, 5, dtype=torch.bool)
    assert torch.equal(ours.batched_mask_to_box(empty), ref.batched_mask_to_box(empty))


def test_stability_score_matches_upstream():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 2, 30, 40, generator=g) * 3
    logits[0, 0] = -10  # empty at both thresholds: NaN upstream
    for thr, off in [(0.0, 1.0), (0.5, 0.25)]:
        e = ref.calculate_stability_score(logits, thr, off)
        o = ours.calculate_stability_score(logits, thr, off)
        assert o.dtype == e.dtype
        assert torch.equal(torch.nan_to_num(o, nan=-1), torch.nan_to_num(e, nan=-1))


@pytest.mark.parametrize("shape", [(2, 768, 1024), (160, 240), (3, 7, 13), (4, 2, 1016)])
def test_stability_score_counts_exactly(shape):
    # Contract: the same float32 scores as upstream (exact equality), on the packed-word count
    # (H*W a multiple of 8, groups of 127 words and a remainder) and on the fallback (7x13), with
    # masks that are empty, full (every byte lane at its largest partial count) or mixed, and on
    # a sliced (non-contiguous) view of the logits.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(*shape, generator=g) * 3
    if len(shape) == 3:
        logits[0] = 10.0  # every pixel above both thresholds
        logits[-1] = -10.0  # none: NaN upstream
    for x in (logits, logits[..., 1:, :]):
        e = ref.calculate_stability_score(x, 0.0, 1.0)
        o = ours.calculate_stability_score(x, 0.0, 1.0)
        assert o.dtype == e.dtype and o.shape == e.shape
        assert torch.equal(torch.nan_to_num(o, nan=-1), torch.nan_to_num(e, nan=-1))


@pytest.mark.parametrize("n", [4, 7, 32])
def test_point_grids_match_upstream(n):
    assert np.array_equal(ours.build_point_grid(n), ref.build_point_grid(n))
    assert np.array_equal(ours.build_point_grid(1), ref.build_point_grid(1))
    for a, b in zip(ours.build_all_layer_point_grids(n, 2, 2), ref.build_all_layer_point_grids(n, 2, 2)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("size", [(768, 1024), (171, 256), (1000, 333), (64, 64)])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_crop_boxes_match_upstream(size, layers):
    assert ours.generate_crop_boxes(size, layers, 512 / 1500) == ref.generate_crop_boxes(size, layers, 512 / 1500)


def test_uncrop_helpers_match_upstream():
    boxes = torch.tensor([[1, 2, 30, 40], [0, 0, 5, 5]])
    crop = [10, 20, 200, 100]
    assert torch.equal(ours.uncrop_boxes_xyxy(boxes, crop), ref.uncrop_boxes_xyxy(boxes, crop))
    assert torch.equal(ours.uncrop_boxes_xyxy(boxes[None], crop), ref.uncrop_boxes_xyxy(boxes[None], crop))
    pts = torch.tensor([[1.5, 2.25], [0.0, 9.0]], dtype=torch.float64)
    assert torch.equal(ours.uncrop_points(pts, crop), ref.uncrop_points(pts, crop))
    assert torch.equal(ours.uncrop_points(pts[None], crop), ref.uncrop_points(pts[None], crop))
    masks = _blob_masks(3, 80, 190)
    assert torch.equal(ours.uncrop_masks(masks, crop, 150, 250), ref.uncrop_masks(masks, crop, 150, 250))
    assert ours.uncrop_masks(masks, [0, 0, 190, 80], 80, 190) is masks


def test_is_box_near_crop_edge_matches_upstream():
    g = torch.Generator().manual_seed(5)
    boxes = torch.randint(0, 300, (200, 4), generator=g)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
    for crop in ([0, 0, 300, 200], [100, 50, 300, 200], [20, 30, 150, 120]):
        got = ours.is_box_near_crop_edge(boxes, crop, [0, 0, 300, 200])
        assert torch.equal(got, ref.is_box_near_crop_edge(boxes, crop, [0, 0, 300, 200]))
    assert ours.is_box_near_crop_edge(boxes, [20, 30, 150, 120], [0, 0, 300, 200]).any()


def test_box_xyxy_to_xywh_does_not_modify_input():
    for box in (torch.tensor([3, 4, 10, 20]), np.array([3, 4, 10, 20])):
        out = ours.box_xyxy_to_xywh(box)
        assert list(out) == list(ref.box_xyxy_to_xywh(box)) == [3, 4, 7, 16]
        assert list(box) == [3, 4, 10, 20]


def test_batch_iterator_matches_upstream():
    a, b = np.arange(10), list(range(10, 20))
    got = [[list(x) for x in batch] for batch in ours.batch_iterator(4, a, b)]
    exp = [[list(x) for x in batch] for batch in ref.batch_iterator(4, a, b)]
    assert got == exp and len(got) == 3
    with pytest.raises(AssertionError, match="same size"):
        list(ours.batch_iterator(2, a, b[:3]))


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 30, 400, 10**6])
def test_remove_small_regions_matches_upstream(mode, area):
    pytest.importorskip("cv2")
    for m in _blob_masks(6, 60, 70, seed=11).numpy():
        got, changed = ours.remove_small_regions(m, area, mode)
        exp, exp_changed = ref.remove_small_regions(m, area, mode)
        assert changed == exp_changed
        assert np.array_equal(got, exp)


def test_coco_encode_rle_matches_upstream():
    mask_utils = pytest.importorskip("pycocotools.mask")
    masks = _blob_masks(4, 33, 21)
    for rle in ours.mask_to_rle_pytorch(masks):
        got = ours.coco_encode_rle(rle)
        assert got == ref.coco_encode_rle(rle)
        assert isinstance(got["counts"], str)
        assert np.array_equal(mask_utils.decode(got).astype(bool), ours.rle_to_mask(rle))


def test_mask_data_filter_cat_like_upstream():
    def make(mod, offset):
        return mod.MaskData(
            t=torch.arange(4) + offset,
            a=np.arange(4) + offset,
            l=[{"i": i + offset} for i in range(4)],
        )

    for keep in (torch.tensor([True, False, True, True]), torch.tensor([3, 0])):
        o, r = make(ours, 0), make(ref, 0)
        o.cat(make(ours, 10))
        r.cat(make(ref, 10))
        keep8 = torch.cat([keep, keep]) if keep.dtype == torch.bool else keep
        o.filter(keep8)
        r.filter(keep8)
        assert torch.equal(o["t"], r["t"]) and np.array_equal(o["a"], r["a"]) and o["l"] == r["l"]
        o.to_numpy()
        assert isinstance(o["t"], np.ndarray)
    empty = ours.MaskData()
    src = make(ours, 0)
    empty.cat(src)
    empty.cat(make(ours, 4))
    assert len(src["l"]) == 4  # cat never grows the source's list
    with pytest.raises(AssertionError, match="MaskData only supports"):
        ours.MaskData(x=3)
