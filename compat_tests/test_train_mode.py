"""TinyViT in training mode (BatchNorm on batch statistics) against MobileSAM and float64.

Code that builds ``Sam(image_encoder=TinyViT(...))`` by hand and never calls ``eval()``
(Grounded-MobileSAM), and anyone fine-tuning or distilling, runs the encoder in training mode.
There CPU BatchNorm computes batch statistics, and its float32 kernel for channels-last tensors is
much less accurate than the one for contiguous tensors; the encoder must therefore take the
channels-last fast layout only at inference.

Contracts (fp32 on CPU, the same weights on both sides):
- masks of the hand-built, never-eval()'d model: identical to MobileSAM's except at pixels whose
  reference logit is within NEAR_THRESHOLD of 0 (test_parity's contract); IoU predictions within
  IOU_ATOL;
- forward output, input gradient and every parameter gradient against a float64 computation of
  the same model: our error at most ACCURACY_FACTOR times MobileSAM's own float32 error (plus a
  floor of 1e-6 of the tensor's scale for tensors both compute almost exactly). The factor
  leaves room for summation-order differences between fused attention and MobileSAM's written-out
  attention and between thread counts (observed ratios up to 2.0 over all tensors, with 1 and 2
  threads); the channels-last BatchNorm error this guards against was 860x on the output
  (1.4e-2 against MobileSAM's 1.6e-5) with these weights and image.
"""

import numpy as np
import torch

import mobile_sam
import sam_drop_in

from sam_drop_in.testing import load_image, perturbed_state_dict
from .test_parity import EMB_ATOL, IOU_ATOL, assert_masks_match

ACCURACY_FACTOR = 4.0
SCALE_FLOOR = 1e-6

# Grounded-MobileSAM's keyword arguments (its TinyViT config is MobileSAM's vit_t).
VIT_T_KWARGS = dict(img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                    depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                    drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                    local_conv_size=3, layer_lr_decay=0.8)


def _hand_built(modeling):
    """Grounded-MobileSAM's model, built from ``modeling``'s classes and left in training mode."""
    return modeling.Sam(
        image_encoder=modeling.TinyViT(**VIT_T_KWARGS),
        prompt_encoder=modeling.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                              input_image_size=(1024, 1024), mask_in_chans=16),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def test_hand_built_model_in_training_mode_matches_mobile_sam():
    ref = _hand_built(mobile_sam.modeling)
    sd = perturbed_state_dict(ref.state_dict(), seed=5)
    ref.load_state_dict(sd, strict=True)
    ours = _hand_built(sam_drop_in.modeling)
    ours.load_state_dict(sd, strict=True)
    assert ours.training and ref.training  # as in Grounded-MobileSAM: eval() is never called
    image = load_image("chelsea.jpg")
    po, pr = sam_drop_in.SamPredictor(ours), mobile_sam.SamPredictor(ref)
    po.set_image(image)
    pr.set_image(image)
    torch.testing.assert_close(po.features, pr.features, rtol=0, atol=EMB_ATOL)
    box = np.array([20, 30, 250, 280])
    m_o, s_o, _ = po.predict(box=box, multimask_output=True)
    m_r, s_r, _ = pr.predict(box=box, multimask_output=True)
    l_r, _, _ = pr.predict(box=box, multimask_output=True, return_logits=True)
    np.testing.assert_allclose(s_o, s_r, rtol=0, atol=IOU_ATOL)
    assert_masks_match(m_o, m_r, l_r)


def _small_kwargs():
    # A narrow, one-block-per-stage TinyViT keeps float64 backward affordable on two cores while
    # keeping what matters here: BatchNorm over a 256x256 stem and stage 0, in training mode.
    # (MobileSAM's forward needs a 1024 input, it reshapes to a 64x64 grid, and its last merge
    # keeps the resolution only when the last width is 320.)
    return dict(VIT_T_KWARGS, embed_dims=[16, 32, 40, 320], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])


def _error(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth).abs().max().item()


def test_training_mode_forward_and_backward_as_accurate_as_mobile_sam():
    kw = _small_kwargs()
    ref = mobile_sam.modeling.TinyViT(**kw)
    sd = perturbed_state_dict(ref.state_dict(), seed=6)
    ref.load_state_dict(sd, strict=True)
    ours = sam_drop_in.modeling.TinyViT(**kw)
    ours.load_state_dict(sd, strict=True)
    truth_model = mobile_sam.modeling.TinyViT(**kw)
    truth_model.load_state_dict(sd, strict=True)
    truth_model.double()

    # A real photograph, normalised as SAM does: pixel statistics are where channels-last
    # BatchNorm loses accuracy (large means relative to the spread).
    sam = sam_drop_in.sam_model_registry["vit_t"]()
    image = torch.as_tensor(load_image("chelsea.jpg")).permute(2, 0, 1)[None].float()
    x = sam.preprocess(torch.nn.functional.interpolate(image, size=(768, 1024), mode="bilinear"))
    grad_out = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))

    results = {}
    for name, model, dtype in (("ours", ours, torch.float32), ("ref", ref, torch.float32),
                               ("truth", truth_model, torch.float64)):
        assert model.training
        inp = x.detach().to(dtype, copy=True).requires_grad_(True)
        out = model(inp)
        out.backward(grad_out.to(dtype))
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (out.detach(), inp.grad, grads)

    truth_out, truth_dx, truth_dw = results["truth"]
    checks = [("output", 0, truth_out), ("input gradient", 1, truth_dx)]
    checks += [(f"gradient of {k}", (2, k), g) for k, g in truth_dw.items()]
    assert len(checks) > 2 + 50  # every parameter took part
    for what, where, truth in checks:
        pick = (lambda r: r[where]) if isinstance(where, int) else (lambda r: r[2][where[1]])
        err_ours, err_ref = _error(pick(results["ours"]), truth), _error(pick(results["ref"]), truth)
        bound = ACCURACY_FACTOR * err_ref + SCALE_FLOOR * truth.abs().max().item()
        assert err_ours <= bound, f"{what}: ours {err_ours:.3g} from float64, MobileSAM {err_ref:.3g}"
