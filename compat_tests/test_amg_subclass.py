"""Subclasses of SamAutomaticMaskGenerator that override upstream's private methods, record types,
and option validation.

Downstream projects subclass the generator (CNOS overrides _generate_masks and calls
_process_crop and MaskData itself; others override _process_batch, _process_crop or
postprocess_small_regions). The same subclass code is written once against a package's own names
(``_subclasses(package)``) and run on segment_anything's and sam_drop_in's generators.

Contract: both generators drive the same model, segment_anything's, so every decision is made on
the same floats and results must be identical (exact equality, no tolerance): the same records
with the same Python types, the same MaskData columns and dtypes, the same calls in the same
order with the same arguments. Our own model differs from upstream's by float rounding only;
test_amg_parity.py covers it with its stated tolerance.
"""

import importlib

import numpy as np
import pytest
import torch

import sam_drop_in
import segment_anything
from sam_drop_in._errors import InputError

from sam_drop_in.testing import perturbed_state_dict, small_sam
from .test_amg_parity import AMG_IMG_SIZE, MANY, MASK_THRESHOLD, _amg_state_dict, _photo

PACKAGES = ("segment_anything", "sam_drop_in")
KW = dict(MANY, points_per_side=6, points_per_batch=8)
CROPS = dict(KW, crop_n_layers=1, crop_nms_thresh=1.0, crop_n_points_downscale_factor=2)


@pytest.fixture(scope="module")
def ref_model():
    ref = small_sam("segment_anything", img_size=AMG_IMG_SIZE)
    ref.load_state_dict(_amg_state_dict(ref.state_dict()))
    ref.eval()
    ref.mask_threshold = MASK_THRESHOLD
    return ref


@pytest.fixture(scope="module")
def confident_model():
    """Logits scaled x1000 and IoUs shifted: masks pass upstream's default thresholds."""
    ref = small_sam("segment_anything", img_size=AMG_IMG_SIZE)
    sd = perturbed_state_dict(ref.state_dict(), seed=1)
    for i in range(4):
        for p in ("weight", "bias"):
            key = f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.{p}"
            sd[key] = sd[key] * 1000.0
    sd["mask_decoder.iou_prediction_head.layers.2.bias"] = sd["mask_decoder.iou_prediction_head.layers.2.bias"] + 0.85
    ref.load_state_dict(sd)
    return ref.eval()


@pytest.fixture(scope="module")
def image():
    return _photo("coffee", (240, 160))


def _subclasses(package: str):
    """Subclass code as a downstream project writes it, against ``package``'s names only."""
    pkg = importlib.import_module(package)
    amg = importlib.import_module(package + ".utils.amg")
    from torchvision.ops.boxes import batched_nms, box_area

    base = pkg.SamAutomaticMaskGenerator

    class CnosStyle(base):
        """Its own _generate_masks (crops, cross-crop NMS, then masks of at least min_area pixels as
        a tensor), calling _process_crop and MaskData, and its own entry point."""

        min_area = 400

        def _generate_masks(self, image):
            orig_size = image.shape[:2]
            crop_boxes, layer_idxs = amg.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
            data = amg.MaskData()
            for crop_box, layer_idx in zip(crop_boxes, layer_idxs):
                crop_data = self._process_crop(image, crop_box, layer_idx, orig_size)
                data.cat(crop_data)
            if len(crop_boxes) > 1:
                scores = 1 / box_area(data["crop_boxes"])
                keep = batched_nms(data["boxes"].float(), scores, torch.zeros_like(scores), iou_threshold=self.crop_nms_thresh)
                data.filter(keep)
            data.filter(torch.as_tensor([amg.area_from_rle(r) >= self.min_area for r in data["rles"]], dtype=torch.bool))
            data["masks"] = torch.from_numpy(np.array([amg.rle_to_mask(r) for r in data["rles"]]))
            data.to_numpy()
            return data

        @torch.no_grad()
        def generate_masks(self, image):
            data = self._generate_masks(image)
            return {"masks": data["masks"], "boxes": data["boxes"], "scores": data["iou_preds"]}

    class LeftHalfTagged(base):
        """_process_batch override: decodes only the points in the left half of the crop and tags
        every kept mask with its batch number (a new MaskData column)."""

        def _process_batch(self, points, im_size, crop_box, orig_size):
            keep = points[:, 0] < im_size[1] / 2
            data = super()._process_batch(points[keep], im_size, crop_box, orig_size)
            self.n_batches = getattr(self, "n_batches", 0) + 1
            data["batch"] = torch.full((len(data["rles"]),), self.n_batches)
            return data

    class TopCrop(base):
        """_process_crop override: keeps the three best masks of each crop."""

        def _process_crop(self, image, crop_box, crop_layer_idx, orig_size):
            data = super()._process_crop(image, crop_box, crop_layer_idx, orig_size)
            data.filter(torch.argsort(data["iou_preds"], descending=True)[:3])
            return data

    class DropSmall(base):
        """postprocess_small_regions override: drops masks under min_area instead of editing them."""

        @staticmethod
        def postprocess_small_regions(mask_data, min_area, nms_thresh):
            mask_data.filter(torch.as_tensor([amg.area_from_rle(r) >= min_area for r in mask_data["rles"]], dtype=torch.bool))
            return mask_data

    calls = []

    class Logged(base):
        """Every private method overridden to log its arguments and delegate to the base class."""

        def _generate_masks(self, image):
            calls.append(("_generate_masks", image.shape))
            return super()._generate_masks(image)

        def _process_crop(self, image, crop_box, crop_layer_idx, orig_size):
            calls.append(("_process_crop", image.shape, list(crop_box), crop_layer_idx, tuple(orig_size)))
            return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)

        def _process_batch(self, points, im_size, crop_box, orig_size):
            calls.append(("_process_batch", points.tolist(), tuple(im_size), list(crop_box), tuple(orig_size)))
            return super()._process_batch(points, im_size, crop_box, orig_size)

        @staticmethod
        def postprocess_small_regions(mask_data, min_area, nms_thresh):
            calls.append(("postprocess_small_regions", len(mask_data["rles"]), min_area, nms_thresh))
            return base.postprocess_small_regions(mask_data, min_area, nms_thresh)

    return dict(CnosStyle=CnosStyle, LeftHalfTagged=LeftHalfTagged, TopCrop=TopCrop, DropSmall=DropSmall,
                Logged=Logged, calls=calls)


def _types(value):
    """The nested Python types of a record value (element by element), for exact comparison."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_types(v) for v in value])
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape)
    return type(value).__name__


def _assert_identical_records(expected, got):
    """Same count and order, equal values, identical Python types down to list elements."""
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert _types(g) == _types(e), (i, _types(g), _types(e))
        for key in e:
            if isinstance(e[key], np.ndarray):
                assert np.array_equal(g[key], e[key]), (i, key)
            elif isinstance(e[key], float) and np.isnan(e[key]):
                assert np.isnan(g[key]), (i, key)
            else:
                assert g[key] == e[key], (i, key)


def _assert_identical_mask_data(expected, got):
    """Same columns; tensors/arrays of the same type, dtype and values; equal lists."""
    assert sorted(k for k, _ in got.items()) == sorted(k for k, _ in expected.items())
    for key, e in expected.items():
        g = got[key]
        assert type(g) is type(e), key
        if isinstance(e, list):
            assert g == e, key
        else:
            assert g.dtype == e.dtype and tuple(g.shape) == tuple(e.shape), (key, g.dtype, e.dtype, g.shape, e.shape)
            assert np.array_equal(np.asarray(g), np.asarray(e), equal_nan=True), key


def _run_both(cls_name, model, kw, call):
    out = []
    for package in PACKAGES:
        classes = _subclasses(package)
        out.append(call(classes[cls_name](model, **kw)))
    return out


def _plain(package, model, kw, image):
    return importlib.import_module(package).SamAutomaticMaskGenerator(model, **kw).generate(image)


def _median_area(package, model, kw, image):
    return int(np.median([r["area"] for r in _plain(package, model, kw, image)]))


def test_cnos_style_generate_masks_override(ref_model, image):
    min_area = _median_area("segment_anything", ref_model, CROPS, image)

    def run(gen):
        gen.min_area = min_area
        return gen.generate_masks(image)

    expected, got = _run_both("CnosStyle", ref_model, CROPS, run)
    assert 1 <= len(expected["masks"]) < len(_plain("segment_anything", ref_model, CROPS, image))  # the override acted
    for key in ("masks", "boxes", "scores"):
        assert type(got[key]) is type(expected[key]) and got[key].dtype == expected[key].dtype, key
        assert np.array_equal(got[key], expected[key]), key


def test_process_batch_override_drops_points_and_adds_a_column(ref_model, image):
    # Batches of 9: every batch of the 6x6 and 3x3 grids has points in the left half.
    for kw in (dict(KW, points_per_batch=9), dict(CROPS, points_per_batch=9)):
        expected, got = _run_both("LeftHalfTagged", ref_model, kw, lambda g: (g.generate(image), g._generate_masks(image)))
        assert 1 <= len(expected[0]) < len(_plain("segment_anything", ref_model, kw, image))
        assert all(r["point_coords"][0][0] < r["crop_box"][0] + r["crop_box"][2] / 2 for r in expected[0])
        _assert_identical_records(expected[0], got[0])
        assert "batch" in got[1] and len(got[1]["batch"]) == len(got[1]["rles"])
        _assert_identical_mask_data(expected[1], got[1])


def test_process_crop_override(ref_model, image):
    expected, got = _run_both("TopCrop", ref_model, CROPS, lambda g: g.generate(image))
    assert 1 <= len(expected) <= 3 * 5
    _assert_identical_records(expected, got)


def test_postprocess_small_regions_override(ref_model):
    pytest.importorskip("cv2")
    image = _photo("chelsea", (200, 150))
    kw = dict(KW, points_per_side=8)
    min_area = _median_area("segment_anything", ref_model, kw, image)
    kw["min_mask_region_area"] = min_area
    expected, got = _run_both("DropSmall", ref_model, kw, lambda g: g.generate(image))
    assert 1 <= len(expected) < len(_plain("segment_anything", ref_model, dict(kw, min_mask_region_area=0), image))
    assert all(r["area"] >= min_area for r in expected)
    _assert_identical_records(expected, got)


@pytest.mark.parametrize("extra", [dict(), dict(crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=50)])
def test_methods_called_in_upstream_order_with_upstream_arguments(ref_model, image, extra):
    if extra.get("min_mask_region_area"):
        pytest.importorskip("cv2")
    kw = dict(KW, points_per_batch=7, **extra)  # a short last batch in every crop
    logs, records = [], []
    for package in PACKAGES:
        classes = _subclasses(package)
        records.append(classes["Logged"](ref_model, **kw).generate(image))
        logs.append(classes["calls"])
    assert logs[1] == logs[0]
    assert len([c for c in logs[0] if c[0] == "_process_batch"]) >= 6
    _assert_identical_records(*records)


def test_process_batch_returns_upstream_columns(ref_model, image):
    """_process_batch itself, called as a subclass calls it: same columns, dtypes and values,
    including a batch where nothing passes (upstream then returns float32 boxes)."""
    h, w = image.shape[:2]
    points = np.array([[20.5, 30.5], [120.0, 80.0], [200.25, 140.75], [60.0, 100.0]])
    for kw in (KW, dict(KW, pred_iou_thresh=1.0)):
        out = []
        for package in PACKAGES:
            gen = importlib.import_module(package).SamAutomaticMaskGenerator(ref_model, **kw)
            gen.predictor.set_image(image)
            out.append(gen._process_batch(points, (h, w), [0, 0, w, h], (h, w)))
        _assert_identical_mask_data(*out)
    assert out[0]["boxes"].dtype == torch.float32 and len(out[0]["rles"]) == 0


# -- record types (issue #18 item 4) -------------------------------------------------------------

TYPE_CASES = {
    # upstream's defaults (a 6x6 grid to stay small); every batch keeps masks: int boxes
    "defaults": ("confident", dict(points_per_side=6)),
    # batches of 4 where some keep nothing: float32 boxes upstream, so float bbox in every record
    "empty batches": ("confident", dict(points_per_side=8, points_per_batch=4, box_nms_thresh=1.0, pred_iou_thresh=0.9)),
    # crops whose masks all touch the crop edge: float crop boxes
    "crops keep nothing": ("ref", CROPS),
    "thresholds keep nothing": ("ref", dict(KW, pred_iou_thresh=1.0)),
    "uncompressed_rle": ("ref", dict(KW, output_mode="uncompressed_rle")),
    "coco_rle": ("ref", dict(CROPS, output_mode="coco_rle")),
    "min_mask_region_area": ("ref", dict(KW, min_mask_region_area=200, crop_nms_thresh=1.0)),
}


@pytest.mark.parametrize("case", list(TYPE_CASES))
def test_record_types_match_upstream(case, ref_model, confident_model, image):
    which, kw = TYPE_CASES[case]
    if kw.get("output_mode") == "coco_rle":
        pytest.importorskip("pycocotools")
    if kw.get("min_mask_region_area"):
        pytest.importorskip("cv2")
    model = ref_model if which == "ref" else confident_model
    expected = segment_anything.SamAutomaticMaskGenerator(model, **kw).generate(image)
    got = sam_drop_in.SamAutomaticMaskGenerator(model, **kw).generate(image)
    _assert_identical_records(expected, got)
    bbox_types = {type(v) for r in expected for v in r["bbox"]}
    crop_types = {type(v) for r in expected for v in r["crop_box"]}
    if case == "thresholds keep nothing":
        assert expected == []
    else:
        assert expected
    if case == "empty batches":
        assert bbox_types == {float}
    if case == "crops keep nothing":
        assert crop_types == {float}
    if case == "defaults":
        assert bbox_types == crop_types == {int}


# -- option validation (issue #17 item 7) --------------------------------------------------------

BAD_OPTIONS = [
    (dict(points_per_side=0), "points_per_side"),
    (dict(points_per_side=-4), "points_per_side"),
    (dict(points_per_side=4, crop_n_layers=3, crop_n_points_downscale_factor=2), "crop layer 3 would get no points"),
    (dict(crop_n_layers=-1), "crop_n_layers"),
    (dict(crop_n_layers=1.5), "crop_n_layers"),
    (dict(points_per_batch=0), "points_per_batch"),
    (dict(points_per_batch=-64), "points_per_batch"),
    (dict(points_per_batch=8.0), "points_per_batch"),
    (dict(pred_iou_thresh=88), "pred_iou_thresh"),
    (dict(pred_iou_thresh=-0.1), "pred_iou_thresh"),
    (dict(stability_score_thresh=float("nan")), "stability_score_thresh"),
    (dict(stability_score_thresh=1.5), "stability_score_thresh"),
    (dict(stability_score_offset=-1.0), "stability_score_offset"),
    (dict(box_nms_thresh=1.5), "box_nms_thresh"),
    (dict(crop_nms_thresh=-0.5), "crop_nms_thresh"),
    (dict(crop_overlap_ratio=1.0), "crop_overlap_ratio"),
    (dict(crop_n_points_downscale_factor=0), "crop_n_points_downscale_factor"),
    (dict(crop_n_points_downscale_factor=0.5, crop_n_layers=1), "crop_n_points_downscale_factor"),
    (dict(min_mask_region_area=-1), "min_mask_region_area"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), "one grid per crop layer"),
    (dict(points_per_side=None, point_grids=[np.zeros((0, 2))]), r"point_grids\[0\]"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), r"point_grids\[0\]"),
    (dict(decode_batch_size=0), "decode_batch_size"),
]


@pytest.mark.parametrize("kw,message", BAD_OPTIONS)
def test_bad_options_raise_input_error_in_the_constructor(kw, message, ref_model):
    # InputError is a ValueError and an AssertionError: handlers written for upstream's asserts
    # (points_per_side/point_grids, output_mode) and for ValueError both catch it.
    with pytest.raises(InputError, match=message) as info:
        sam_drop_in.SamAutomaticMaskGenerator(ref_model, **kw)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AssertionError)


@pytest.mark.parametrize("kw", [dict(points_per_side=0), dict(crop_n_layers=-1), dict(points_per_batch=0)])
def test_upstream_fails_later_on_the_same_options(kw, ref_model, image):
    # The options refused above are not valid upstream either: it fails in the constructor or
    # in generate with ZeroDivisionError / IndexError / ValueError, never with records.
    with pytest.raises((ZeroDivisionError, IndexError, ValueError)):
        segment_anything.SamAutomaticMaskGenerator(ref_model, **kw).generate(image)


def test_options_upstream_accepts_still_accepted(ref_model):
    # Float counts that upstream's int() casts accept, zero thresholds (filters off), numpy scalars.
    for kw in (
        dict(points_per_side=8.0),
        dict(pred_iou_thresh=0, stability_score_thresh=0.0, box_nms_thresh=1.0, crop_overlap_ratio=0.0),
        dict(points_per_side=np.int64(4), points_per_batch=np.int32(16), pred_iou_thresh=np.float32(0.5)),
        dict(crop_n_layers=2, crop_n_points_downscale_factor=2, points_per_side=4),
        dict(points_per_side=None, point_grids=[np.full((3, 2), 0.5), np.full((1, 2), 0.5)], crop_n_layers=1),
    ):
        sam_drop_in.SamAutomaticMaskGenerator(ref_model, **kw)
        segment_anything.SamAutomaticMaskGenerator(ref_model, **kw)
