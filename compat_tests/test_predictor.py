"""SamPredictor behaviour, asserted identically on segment_anything, mobile_sam and sam_drop_in."""

import numpy as np
import segment_anything.utils.transforms  # noqa: F401  (impl.utils.transforms attribute access)
import mobile_sam.utils.transforms  # noqa: F401
import sam_drop_in.utils.transforms  # noqa: F401
import pytest
import torch

POINTS = np.array([[300, 200], [100, 50]])
LABELS = np.array([1, 0])
BOX = np.array([50, 40, 420, 350])


def test_attributes_after_set_image(predictor, coffee):
    assert predictor.is_image_set
    assert tuple(predictor.original_size) == coffee.shape[:2]
    assert tuple(predictor.input_size) == (683, 1024)
    assert predictor.transform.target_length == 1024
    assert isinstance(predictor.device, torch.device)
    emb = predictor.get_image_embedding()
    assert isinstance(emb, torch.Tensor) and emb.shape == (1, 256, 64, 64) and emb.dtype == torch.float32


@pytest.mark.parametrize("multimask,count", [(True, 3), (False, 1)])
def test_predict_outputs(predictor, coffee, multimask, count):
    masks, scores, logits = predictor.predict(POINTS, LABELS, multimask_output=multimask)
    assert isinstance(masks, np.ndarray) and masks.dtype == bool and masks.shape == (count, *coffee.shape[:2])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (count,)
    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32 and logits.shape == (count, 256, 256)


def test_return_logits(predictor, coffee):
    binary, _, _ = predictor.predict(POINTS, LABELS)
    logits, _, _ = predictor.predict(POINTS, LABELS, return_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (3, *coffee.shape[:2])
    np.testing.assert_array_equal(logits > 0.0, binary)


def test_box_and_points_and_box(predictor, coffee):
    masks, scores, _ = predictor.predict(box=BOX, multimask_output=False)
    assert masks.shape == (1, *coffee.shape[:2]) and scores.shape == (1,)
    masks2, _, _ = predictor.predict(POINTS, LABELS, box=BOX)
    assert masks2.shape == (3, *coffee.shape[:2])


def test_mask_input_round_trip(predictor):
    _, scores, logits = predictor.predict(POINTS, LABELS)
    best = logits[np.argmax(scores)][None]
    masks, _, logits2 = predictor.predict(POINTS, LABELS, mask_input=best, multimask_output=False)
    assert masks.shape[0] == 1 and logits2.shape == (1, 256, 256)


def test_positional_call(predictor):
    # segment-geospatial passes all six arguments positionally.
    out = predictor.predict(POINTS, LABELS, BOX, None, False, False)
    assert out[0].shape[0] == 1


def test_no_prompt_at_all(predictor, coffee):
    masks, scores, _ = predictor.predict()
    assert masks.shape == (3, *coffee.shape[:2]) and scores.shape == (3,)


def test_bgr_equals_rgb_reversed(impl, small_model, coffee):
    a = impl.SamPredictor(small_model)
    a.set_image(coffee)
    b = impl.SamPredictor(small_model)
    b.set_image(np.ascontiguousarray(coffee[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)


def test_predict_torch_batched(predictor, coffee):
    boxes = torch.tensor([[10, 10, 200, 200], [100, 50, 400, 300], [0, 0, 599, 399], [5, 5, 6, 6]], dtype=torch.float)
    boxes = predictor.transform.apply_boxes_torch(boxes, coffee.shape[:2])
    masks, iou, low = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    assert masks.shape == (4, 1, *coffee.shape[:2]) and masks.dtype == torch.bool
    assert iou.shape == (4, 1) and low.shape == (4, 1, 256, 256)
    pts = predictor.transform.apply_coords_torch(torch.tensor([[[300, 200]], [[100, 50]]]), coffee.shape[:2])
    masks, iou, low = predictor.predict_torch(pts, torch.ones(2, 1, dtype=torch.int))
    assert masks.shape == (2, 3, *coffee.shape[:2]) and iou.shape == (2, 3) and low.shape == (2, 3, 256, 256)


def test_batched_equals_one_by_one(predictor, coffee):
    boxes = np.array([[10, 10, 200, 200], [100, 50, 400, 300], [0, 0, 599, 399]])
    tb = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), coffee.shape[:2])
    _, iou_b, low_b = predictor.predict_torch(None, None, boxes=tb, multimask_output=True)
    for i, box in enumerate(boxes):
        _, iou, low = predictor.predict(box=box)
        np.testing.assert_allclose(iou, iou_b[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(low, low_b[i].numpy(), atol=1e-4)


def test_errors_with_upstream_messages(impl, small_model):
    p = impl.SamPredictor(small_model)
    with pytest.raises(RuntimeError, match=r"An image must be set with \.set_image\(\.\.\.\) before mask prediction\."):
        p.predict(POINTS, LABELS)
    with pytest.raises(RuntimeError, match="An image must be set"):
        p.get_image_embedding()
    with pytest.raises(AssertionError, match=r"image_format must be in \['RGB', 'BGR'\], is HSV\."):
        p.set_image(np.zeros((8, 8, 3), np.uint8), image_format="HSV")


def test_coords_without_labels(predictor):
    with pytest.raises(AssertionError, match="point_labels must be supplied if point_coords is supplied."):
        predictor.predict(point_coords=POINTS)


def test_set_torch_image_contract(impl, small_model, coffee):
    p = impl.SamPredictor(small_model)
    x = torch.as_tensor(p.transform.apply_image(coffee)).permute(2, 0, 1)[None]
    p.set_torch_image(x, coffee.shape[:2])
    assert p.is_image_set and tuple(p.input_size) == tuple(x.shape[-2:])
    with pytest.raises(AssertionError, match="set_torch_image input must be BCHW with long side 1024"):
        p.set_torch_image(x[:, :, :500, :500], coffee.shape[:2])


def test_reset_image(predictor, impl, small_model, coffee):
    p = impl.SamPredictor(small_model)
    p.set_image(coffee)
    p.reset_image()
    assert not p.is_image_set and p.features is None
    with pytest.raises(RuntimeError):
        p.predict(POINTS, LABELS)


def test_sam_forward_batched_input(impl, small_model, coffee, astronaut):
    t = impl.utils.transforms.ResizeLongestSide(1024)
    batch = []
    for img in (coffee, astronaut):
        x = torch.as_tensor(t.apply_image(img)).permute(2, 0, 1).float()
        batch.append({
            "image": x,
            "original_size": img.shape[:2],
            "boxes": t.apply_boxes_torch(torch.tensor([[10.0, 20.0, 300.0, 200.0]]), img.shape[:2]),
        })
    out = small_model(batch, multimask_output=False)
    assert len(out) == 2
    for rec, img in zip(out, (coffee, astronaut)):
        assert rec["masks"].shape == (1, 1, *img.shape[:2]) and rec["masks"].dtype == torch.bool
        assert rec["iou_predictions"].shape == (1, 1) and rec["low_res_logits"].shape == (1, 1, 256, 256)
