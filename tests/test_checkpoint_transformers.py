"""transformers' SamModel layout: its own forward pass is the oracle for the key mapping."""

from __future__ import annotations

import pytest
import torch

from sam_drop_in import checkpoint as ck


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # segment_anything's vit_b encoder, in transformers' terms.
    vision = transformers.SamVisionConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]
    )
    model = transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())).eval()
    folder = tmp_path_factory.mktemp("hf_sam")
    model.save_pretrained(folder)
    return model, folder / "model.safetensors"


def _target_vit_b(path):
    """sam_drop_in's builder when present (it calls load_state_dict), else segment_anything's model."""
    try:
        from sam_drop_in.build_sam import sam_model_registry

        return sam_model_registry["vit_b"](checkpoint=str(path))
    except ImportError:
        sa = pytest.importorskip("segment_anything")
        model = sa.sam_model_registry["vit_b"]()
        ck.load_into(model, path, "vit_b")
        return model.eval()


def test_transformers_layout_keys_match_segment_anything(hf_checkpoint):
    sa = pytest.importorskip("segment_anything")
    _, path = hf_checkpoint
    info = ck.inspect_checkpoint(path)
    assert (info["model_type"], info["layout"], info["format"]) == ("vit_b", "transformers", "safetensors")
    sd = ck.load_state_dict(path, "vit_b")
    with torch.device("meta"):
        expected = sa.sam_model_registry["vit_b"]().state_dict()
    assert sd.keys() == expected.keys()
    assert all(sd[k].shape == expected[k].shape for k in sd)
    with pytest.raises(ck.CheckpointError, match=r"this is a vit_b checkpoint.*sam_model_registry\['vit_b'\]"):
        ck.load_state_dict(path, "vit_t")


def test_transformers_sam_same_masks_and_scores(hf_checkpoint):
    """Random SamModel saved by save_pretrained -> our vit_b: same embeddings, masks, IoU scores."""
    skimage_data = pytest.importorskip("skimage.data")
    from segment_anything.utils.transforms import ResizeLongestSide

    hf, path = hf_checkpoint
    ours = _target_vit_b(path)
    image = skimage_data.astronaut()  # 512x512 RGB uint8
    transform = ResizeLongestSide(1024)
    x = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None].float()
    pixels = ours.preprocess(x)  # 1x3x1024x1024, normalised and padded

    coords = torch.tensor([[[220.0, 180.0]], [[260.0, 300.0]], [[120.0, 420.0]]])  # (prompts, 1 point, xy) in the 512 image
    labels = torch.ones(3, 1, dtype=torch.long)
    coords_1024 = torch.as_tensor(transform.apply_coords(coords.numpy(), image.shape[:2]))
    with torch.inference_mode():
        emb = ours.image_encoder(pixels)
        emb_hf = hf.get_image_embeddings(pixels)
        sparse, dense = ours.prompt_encoder(points=(coords_1024, labels), boxes=None, masks=None)
        low_res, iou = ours.mask_decoder(image_embeddings=emb, image_pe=ours.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=True)
        out = hf(image_embeddings=emb_hf, input_points=coords_1024[None], input_labels=labels[None],
                 multimask_output=True)
    # Same maths in a different order of float operations: compare relative to the scale.
    def close(a, b, rtol):
        return (a - b).abs().max().item() <= rtol * b.abs().max().item()

    assert close(emb, emb_hf, 1e-4)
    assert low_res.shape == out.pred_masks[0].shape == (3, 3, 256, 256)
    assert close(low_res, out.pred_masks[0], 1e-3)
    assert close(iou, out.iou_scores[0], 1e-3)
    # Binary masks agree except where a logit sits within noise of the threshold.
    disagree = ((low_res > 0) != (out.pred_masks[0] > 0)).float().mean().item()
    assert disagree < 1e-4
