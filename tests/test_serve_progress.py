"""Everything mode's progress (serve/progress.py): counting generators give the same records as
the generators they extend, and count every decoded batch against a total fixed up front."""

import pytest

from sam_drop_in.hierarchical_mask_generator import SamHierarchicalMaskGenerator
from sam_drop_in.serve.progress import EverythingProgress, counting_generator

from sam_drop_in.testing import small_sam

from _serve_support import sample_image


class Recording(EverythingProgress):
    def __init__(self):
        super().__init__()
        self.history = []

    def set(self, **kwargs):
        super().set(**kwargs)
        self.history.append(self.snapshot())


@pytest.fixture(scope="module")
def sam():
    # A 1-block encoder: what is counted is the generators' crops and batches, not the encoder.
    return small_sam("sam_drop_in")


def _same_records(got, ref):
    # Contract: the same generator code decodes the same batches in the same order: identical.
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["segmentation"] == r["segmentation"] and g["bbox"] == r["bbox"]
        assert g["predicted_iou"] == r["predicted_iou"] and g["point_coords"] == r["point_coords"]


@pytest.mark.parametrize("hierarchical, options, expected_total", [
    # one crop layer: 1 + 4 crops, 2x2 points on each (crop_n_points_downscale_factor 1), batches of 3
    (False, {"points_per_side": 2, "crop_n_layers": 1, "points_per_batch": 3}, 5 * 2),
    (True, {"points_per_side": 8, "points_per_batch": 3}, None),
])
def test_counting_generators_same_records_and_full_count(sam, hierarchical, options, expected_total):
    img = sample_image(96, 128)
    options = dict(options, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="coco_rle")
    state = Recording()
    got = counting_generator(hierarchical, sam, state, **options).generate(img)
    if hierarchical:
        # The hierarchical counter re-batches the points itself; the automatic one only
        # observes (its records against the plain generator: test_serve_api's everything test).
        _same_records(got, SamHierarchicalMaskGenerator(sam, **options).generate(img))

    final = state.snapshot()
    assert final["done"] == final["total"] > 0 and final["fraction"] == 1.0
    if expected_total is not None:
        assert final["total"] == expected_total
    else:
        # Hierarchical: 2x2 sparse points (2 batches of 3), then the dense pass's real count
        # replaces its upper bound of 15 per sparse point (20 batches).
        assert state.history[0]["total"] == 2 + 20
        assert final["total"] <= 22
        assert any("dense" in h["stage"] for h in state.history)
    fractions = [h["fraction"] for h in state.history]
    assert fractions == sorted(fractions), "the fraction went backwards"
    assert all(h["done"] <= h["total"] for h in state.history)
