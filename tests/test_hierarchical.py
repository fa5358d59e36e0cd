"""SamHierarchicalMaskGenerator (TinySAM's two-pass everything mode)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sam_drop_in import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator
from sam_drop_in.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

skimage_data = pytest.importorskip("skimage.data")

# Random weights give logits in about [-0.3, 0.3]: thresholds scaled to that range.
KW = dict(pred_iou_thresh=0.45, stability_score_thresh=0.05, stability_score_offset=0.05, box_nms_thresh=1.0)
MASK_THRESHOLD = 0.1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2, out_chans=256,
            use_rel_pos=True, window_size=14, global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    sd["mask_decoder.iou_prediction_head.layers.2.bias"] += 0.5  # IoU predictions in about [0.1, 0.65]
    sam.load_state_dict(sd)
    sam.eval()
    sam.mask_threshold = MASK_THRESHOLD
    return sam


@pytest.fixture(scope="module")
def image():
    return np.asarray(Image.fromarray(skimage_data.chelsea()).resize((150, 100), Image.BILINEAR))


class _Counting:
    """Wraps a generator's decoder calls to count the prompts it decodes."""

    def __init__(self, gen):
        self.n = 0
        inner = gen._decode_batch

        def counted(points, im_size):
            self.n += len(points)
            return inner(points, im_size)

        gen._decode_batch = counted


def _assert_valid(records, h, w):
    for r in records:
        assert set(r) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
        m = r["segmentation"]
        assert m.shape == (h, w) and m.dtype == bool
        assert r["area"] == int(m.sum()) > 0
        ys, xs = np.nonzero(m)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert r["crop_box"] == [0, 0, w, h]
        (x, y), = r["point_coords"]
        assert 0 <= x < w and 0 <= y < h
        assert r["predicted_iou"] > KW["pred_iou_thresh"]
        assert r["stability_score"] >= KW["stability_score_thresh"]


def test_dense_points_hand_computed(model):
    gen = SamHierarchicalMaskGenerator(model, points_per_side=4)
    # 4 per side -> one sparse point at the centre of a 10x9 image: (5, 4.5); strides 10//4=2, 9//4=2.
    sparse = np.array([[5.0, 4.5]])
    covered = np.zeros((9, 10), dtype=bool)
    pts = gen._dense_points(sparse, covered, 10, 9)
    expected = [
        (3, 2.5), (3, 4.5), (3, 6.5), (5, 2.5), (5, 6.5), (7, 2.5), (7, 4.5), (7, 6.5),  # 3x3 ring
        (9, 2.5), (9, 4.5), (9, 6.5),  # x + 2 strides = 9 < 10: kept
        # y + 2 strides = 8.5 < 9: the row and the corner are kept
        (3, 8.5), (5, 8.5), (7, 8.5), (9, 8.5),
    ]
    np.testing.assert_allclose(pts, np.array(expected), rtol=0, atol=1e-12)
    # Covered pixels are skipped: covered[y, x] at the truncated point.
    covered[2, 3] = True  # (3, 2.5)
    covered[8, 9] = True  # (9, 8.5)
    pts = gen._dense_points(sparse, covered, 10, 9)
    kept = [p for p in expected if p not in {(3, 2.5), (9, 8.5)}]
    np.testing.assert_allclose(pts, np.array(kept), rtol=0, atol=1e-12)
    # On an 8x8 image the +2 column and row leave the image: 8 ring points only.
    assert len(gen._dense_points(np.array([[4.0, 4.0]]), np.zeros((8, 8), bool), 8, 8)) == 8


def test_records_valid_and_standard_format(model, image):
    gen = SamHierarchicalMaskGenerator(model, points_per_side=8, high_score_thresh=0.12, **KW)
    records = gen.hierarchical_generate(image)
    assert len(records) >= 5
    _assert_valid(records, *image.shape[:2])


def test_nothing_covered_equals_standard_generator_on_both_grids(model, image):
    """With no pixel covered, the result is the standard generator run on the dense points (in
    TinySAM's order) followed by the sparse points, with one NMS: computed here by hand."""
    h, w = image.shape[:2]
    gen = SamHierarchicalMaskGenerator(model, points_per_side=4, high_score_thresh=float("inf"), points_per_batch=256, **KW)
    counter = _Counting(gen)
    got = gen.hierarchical_generate(image)

    sparse = np.array([[w / 2, h / 2]])
    dense = gen._dense_points(sparse, np.zeros((h, w), bool), w, h)
    # 150x100, strides 37 and 25: the +2 column fits (75 + 74 < 150), the +2 row does not (50 + 50).
    assert counter.n == len(sparse) + len(dense) == 1 + 8 + 3
    scale = np.array([[w, h]])
    std = SamAutomaticMaskGenerator(
        model, points_per_side=None, point_grids=[np.concatenate([dense / scale, sparse / scale])], points_per_batch=256, **KW
    )
    expected = std.generate(image)
    assert len(expected) >= 3
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert np.array_equal(g["segmentation"], e["segmentation"])
        assert g["bbox"] == e["bbox"] and g["area"] == e["area"] and g["crop_box"] == e["crop_box"]
        np.testing.assert_allclose(g["point_coords"], e["point_coords"], rtol=0, atol=1e-9)
        assert abs(g["predicted_iou"] - e["predicted_iou"]) < 1e-4


def test_everything_covered_skips_dense_pass(model, image):
    gen = SamHierarchicalMaskGenerator(model, points_per_side=8, high_score_thresh=-float("inf"), **KW)
    counter = _Counting(gen)
    got = gen.hierarchical_generate(image)
    assert counter.n == 4  # only the 2x2 sparse grid
    expected = SamAutomaticMaskGenerator(model, points_per_side=2, **KW).generate(image)
    assert len(expected) >= 1
    assert [r["bbox"] for r in got] == [r["bbox"] for r in expected]
    assert all(np.array_equal(a["segmentation"], b["segmentation"]) for a, b in zip(got, expected))


def test_partly_covered_decodes_fewer_points(model, image):
    """Coverage computed independently from the sparse pass's logits predicts exactly which dense
    points the generator decodes; high_score_thresh is chosen so that about half are covered."""
    from sam_drop_in import SamPredictor
    from sam_drop_in.utils.amg import calculate_stability_score

    h, w = image.shape[:2]
    sparse_pts = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]) * np.array([[w, h]])
    predictor = SamPredictor(model)
    predictor.set_image(image)
    pts = torch.as_tensor(predictor.transform.apply_coords(sparse_pts, (h, w)))[:, None]
    logits, iou, _ = predictor.predict_torch(pts, torch.ones(4, 1, dtype=torch.int), return_logits=True)
    logits, iou = logits.flatten(0, 1), iou.flatten()
    stab = calculate_stability_score(logits, MASK_THRESHOLD, KW["stability_score_offset"])
    keep = (iou > KW["pred_iou_thresh"]) & (stab >= KW["stability_score_thresh"])
    assert keep.any()
    best = logits[keep].max(0).values.numpy()  # HxW: the highest kept logit at each pixel

    gen = SamHierarchicalMaskGenerator(model, points_per_side=8, **KW)
    all_dense = gen._dense_points(sparse_pts, np.zeros((h, w), bool), w, h)
    at_points = np.sort(best[all_dense[:, 1].astype(int), all_dense[:, 0].astype(int)])
    high = float((at_points[len(at_points) // 2 - 1] + at_points[len(at_points) // 2]) / 2)
    covered = best > high

    gen.high_score_thresh = high
    counter = _Counting(gen)
    gen.generate(image)  # generate() is the hierarchical mode too
    decoded = gen._dense_points(sparse_pts, covered, w, h)
    assert 0 < len(decoded) < len(all_dense)
    assert counter.n == 4 + len(decoded)
    skipped = {tuple(p) for p in all_dense} - {tuple(p) for p in decoded}
    assert skipped and all(covered[int(y), int(x)] for x, y in skipped)


def test_rle_output_and_small_regions(model, image):
    pytest.importorskip("cv2")
    mask_utils = pytest.importorskip("pycocotools.mask")
    base = SamHierarchicalMaskGenerator(model, points_per_side=4, high_score_thresh=0.2, **KW).generate(image)
    coco = SamHierarchicalMaskGenerator(model, points_per_side=4, high_score_thresh=0.2, output_mode="coco_rle", **KW).generate(image)
    assert len(coco) == len(base) >= 1
    for b, c in zip(base, coco):
        assert np.array_equal(mask_utils.decode(c["segmentation"]).astype(bool), b["segmentation"])
    cleaned = SamHierarchicalMaskGenerator(model, points_per_side=4, high_score_thresh=0.2, min_mask_region_area=50, **KW).generate(image)
    assert len(cleaned) >= 1
    assert all(r["area"] == int(r["segmentation"].sum()) for r in cleaned)


def test_arguments(model):
    import inspect

    params = list(inspect.signature(SamHierarchicalMaskGenerator.__init__).parameters)
    assert params[:5] == ["self", "model", "points_per_side", "points_per_batch", "pred_iou_thresh"]
    assert params[5] == "high_score_thresh"
    assert inspect.signature(SamHierarchicalMaskGenerator.__init__).parameters["high_score_thresh"].default == 8.5
    gen = SamHierarchicalMaskGenerator(model)
    assert gen.high_score_thresh == 8.5 and gen.points_per_side == 32
    with pytest.raises(ValueError, match="crop_n_layers must be 0"):
        SamHierarchicalMaskGenerator(model, crop_n_layers=1)
    with pytest.raises(ValueError, match="needs points_per_side"):
        SamHierarchicalMaskGenerator(model, points_per_side=None, point_grids=[np.zeros((1, 2))])
    with pytest.raises(ValueError, match="at least 4"):
        SamHierarchicalMaskGenerator(model, points_per_side=3)
