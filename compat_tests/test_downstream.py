"""The call patterns of the projects that use segment_anything, replayed on sam_drop_in and
compared with the same code on the reference implementation (API_CONTRACT.md, 'How downstream
projects call it')."""

import numpy as np
import pytest
import torch

import mobile_sam
import sam_drop_in

from sam_drop_in.testing import load_image, perturbed_state_dict
from .test_parity import IOU_ATOL, assert_masks_match


@pytest.fixture(scope="module")
def mobile_sam_file(tmp_path_factory):
    """A vit_t state dict saved by the reference package, as users have it on disk."""
    ref = mobile_sam.sam_model_registry["vit_t"]()
    ref.load_state_dict(perturbed_state_dict(ref.state_dict(), seed=7))
    path = tmp_path_factory.mktemp("ckpt") / "mobile_sam.pt"
    torch.save(ref.state_dict(), path)
    ref.eval()
    return path, ref


@pytest.fixture(scope="module")
def image():
    return load_image("chelsea.jpg")


@pytest.fixture(scope="module")
def ref_predictor(mobile_sam_file, image):
    p = mobile_sam.SamPredictor(mobile_sam_file[1])
    p.set_image(image)
    return p


def test_grounded_sam_box_flow(mobile_sam_file, ref_predictor, image):
    # Grounded-SAM: registry + .to(device), set_image, apply_boxes_torch, predict_torch(multimask_output=False)
    path, _ = mobile_sam_file
    device = "cpu"
    predictor = sam_drop_in.SamPredictor(sam_drop_in.sam_model_registry["vit_t"](checkpoint=str(path)).to(device))
    predictor.set_image(image)
    boxes = torch.tensor([[20.0, 30.0, 250.0, 280.0], [100.0, 10.0, 440.0, 200.0]])
    out = []
    for p in (predictor, ref_predictor):
        tb = p.transform.apply_boxes_torch(boxes, image.shape[:2]).to(device)
        masks, scores, _ = p.predict_torch(point_coords=None, point_labels=None, boxes=tb, multimask_output=False)
        logits, _, _ = p.predict_torch(point_coords=None, point_labels=None, boxes=tb, multimask_output=False,
                                       return_logits=True)
        out.append((masks.cpu().numpy(), scores.cpu().numpy(), logits.cpu().numpy()))
    (m_o, s_o, _), (m_r, s_r, l_r) = out
    assert m_o.shape == (2, 1, *image.shape[:2]) and m_o.dtype == bool
    np.testing.assert_allclose(s_o, s_r, atol=IOU_ATOL)
    assert_masks_match(m_o, m_r, l_r)


def test_grounded_mobile_sam_hand_built(mobile_sam_file, ref_predictor, image):
    # Grounded-MobileSAM builds the model from the modeling classes and loads strictly.
    from sam_drop_in.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer

    path, _ = mobile_sam_file
    model = Sam(
        image_encoder=TinyViT(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                              depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
                              mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False,
                              mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    p = sam_drop_in.SamPredictor(model)
    p.set_image(image)
    box = np.array([20, 30, 250, 280])
    m_o, s_o, _ = p.predict(box=box, multimask_output=True)
    m_r, s_r, _ = ref_predictor.predict(box=box, multimask_output=True)
    l_r, _, _ = ref_predictor.predict(box=box, multimask_output=True, return_logits=True)
    np.testing.assert_allclose(s_o, s_r, atol=IOU_ATOL)
    assert_masks_match(m_o, m_r, l_r)


def test_inpaint_anything_without_eval(mobile_sam_file, ref_predictor, image):
    # Inpaint-Anything: registry with a checkpoint, .to(device), never calls eval() itself.
    path, _ = mobile_sam_file
    sam = sam_drop_in.sam_model_registry["vit_t"](checkpoint=path)
    sam.to(device="cpu")
    p = sam_drop_in.SamPredictor(sam)
    p.set_image(image)
    pts, lbl = np.array([[200, 150]]), np.array([1])
    m_o, s_o, _ = p.predict(point_coords=pts, point_labels=lbl, multimask_output=True)
    m_r, s_r, _ = ref_predictor.predict(point_coords=pts, point_labels=lbl, multimask_output=True)
    l_r, _, _ = ref_predictor.predict(point_coords=pts, point_labels=lbl, multimask_output=True, return_logits=True)
    np.testing.assert_allclose(s_o, s_r, atol=IOU_ATOL)
    assert_masks_match(m_o, m_r, l_r)


def test_segment_geospatial_positional_predict(mobile_sam_file, ref_predictor, image):
    # segment-geospatial: predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)
    path, _ = mobile_sam_file
    p = sam_drop_in.SamPredictor(sam_drop_in.sam_model_registry["vit_t"](checkpoint=path))
    p.set_image(image)
    args = (np.array([[120, 90]]), np.array([1]), np.array([50, 40, 300, 260]), None, False, True)
    lo_o, s_o, _ = p.predict(*args)
    lo_r, s_r, _ = ref_predictor.predict(*args)
    assert lo_o.dtype == np.float32 and lo_o.shape == (1, *image.shape[:2])
    np.testing.assert_allclose(s_o, s_r, atol=IOU_ATOL)
    np.testing.assert_allclose(lo_o, lo_r, atol=1e-3)


def test_segment_geospatial_generator_keywords(mobile_sam_file, image):
    # segment-geospatial passes every generator keyword by name.
    path, _ = mobile_sam_file
    sam = sam_drop_in.sam_model_registry["vit_t"](checkpoint=path)
    gen = sam_drop_in.SamAutomaticMaskGenerator(
        sam, points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
        crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, point_grids=None,
        min_mask_region_area=0, output_mode="binary_mask",
    )
    records = gen.generate(image)
    assert records, "thresholds 0 keep masks"
    keys = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
    assert all(set(r) == keys for r in records)
    assert all(r["segmentation"].shape == image.shape[:2] for r in records)
