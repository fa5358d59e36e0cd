"""The fused bf16 inference path of the TinyViT encoder (modeling/_fast_tinyvit.py) against the
reference forward of modeling/tiny_vit.py.

Contracts:
- float32, function by function (the fused functions run on float32 too, and oneDNN's float32
  primitives run on every x86 CPU): the same sums in another order, so the reordering bound of
  tests/test_encoder.py applies, ``K * eps * max|value|`` with K the longest reduction (the MLP's
  hidden width). A wrong window, a missing residual or bias, GELU in the wrong place or a stale
  weight is O(0.1-1) away.
- bfloat16, whole encoder: neither path equals the other (the fused kernels round to bf16 once
  per kernel, the reference after every step); both approximate the float32 encoder. The fused
  path must be no farther from it (relative L2) than 1.5x the reference bf16 path, and have
  cosine >= 0.999 to the reference bf16 output.
Both branches run on every CPU: oneDNN's fused primitives (where it runs bf16) and plain
PyTorch ops (``USE_ONEDNN = False``); on CPUs without native bf16 the model is kept small.
"""

import pytest
import torch

from sam_drop_in.modeling import _fast_tinyvit
from sam_drop_in.modeling.tiny_vit import TinyViT
from sam_drop_in.testing import perturbed_state_dict

EPS = torch.finfo(torch.float32).eps


def _model(seed=0, img_size=64, window_sizes=(5, 5, 3, 3)):
    # Every kind of block: MBConv, merges with stride 2 and 1, windows that need padding (16x16
    # tokens in windows of 5) and windows covering the whole grid (4x4 tokens, window 4 below),
    # and the neck. Perturbed weights: BatchNorm statistics and attention biases are not trivial.
    torch.manual_seed(seed)
    enc = TinyViT(img_size=img_size, num_classes=0, embed_dims=[16, 32, 48, 64], depths=[1, 1, 2, 1],
                  num_heads=[1, 2, 2, 2], window_sizes=list(window_sizes), drop_path_rate=0.0).eval()
    enc.load_state_dict(perturbed_state_dict(enc.state_dict(), seed=seed))
    return enc.requires_grad_(False)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _close_fp32(got, want, k):
    torch.testing.assert_close(got, want, rtol=0, atol=k * EPS * float(want.abs().max()))


@pytest.fixture(params=[True, False], ids=["onednn", "plain"])
def onednn(request, monkeypatch):
    monkeypatch.setattr(_fast_tinyvit, "USE_ONEDNN", request.param)
    return request.param


@torch.no_grad()
@pytest.mark.parametrize("window", [5, 4])
def test_fp32_functions_equal_reference(onednn, window):
    enc = _model(window_sizes=(5, 5, window, window))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    k = 4 * 64  # longest reduction: the last stage's MLP hidden width
    x = x.contiguous(memory_format=torch.channels_last)

    want = enc.patch_embed(x)
    got = _fast_tinyvit.patch_embed(enc.patch_embed, x)
    _close_fp32(got, want, k)

    mb = enc.layers[0].blocks[0]
    _close_fp32(_fast_tinyvit.mbconv(mb, want), mb(want), k)
    tokens = enc.layers[0].downsample(want)  # BxCxHxW in, tokens out
    _close_fp32(_fast_tinyvit.patch_merging(enc.layers[0].downsample, want), tokens, k)
    for layer in enc.layers[1:]:
        for block in layer.blocks:
            _close_fp32(_fast_tinyvit.tinyvit_block(block, tokens), block(tokens), k)
            tokens = block(tokens)
        if layer.downsample is not None:
            _close_fp32(_fast_tinyvit.patch_merging(layer.downsample, tokens), layer.downsample(tokens), k)
            tokens = layer.downsample(tokens)
    grid = tokens.view(2, 4, 4, -1).permute(0, 3, 1, 2)  # the last stage's 4x4 tokens, channels-last
    assert _fast_tinyvit.is_sam_neck(enc.neck)
    got, want = _fast_tinyvit.neck(enc.neck, grid), enc.neck(grid)
    assert got.is_contiguous()
    _close_fp32(got, want, k)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage0_strips_equal_whole(onednn, monkeypatch, dtype):
    """The fused MBConv and first merge in strips of rows (_fast_tinyvit.STRIP_BYTES) against the
    same fused functions on the whole feature map. Contract: every output value is
    computed from the same inputs by the same operations, but by kernel calls of other shapes,
    which may add a sum's terms in another order: float32 within the reordering bound
    (K = the hidden width); bf16 (one rounding per kernel) within 2 bf16 steps of the largest
    value, as a different fp32 sum can round to the neighbouring bf16 value and the next kernel
    carries that on. Strips of 8 rows of a 32x32 map: first, middle and last strips (border rows
    padded) and the stride-2 merge."""
    from sam_drop_in.modeling import common

    enc = _model(img_size=128).to(dtype)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    stem = _fast_tinyvit.patch_embed(enc.patch_embed, x.contiguous(memory_format=torch.channels_last))
    mb, merge = enc.layers[0].blocks[0], enc.layers[0].downsample
    spy = []
    monkeypatch.setattr(_fast_tinyvit, "in_strips", lambda *a, **k: spy.append(a[1]) or common.in_strips(*a, **k))
    monkeypatch.setattr(_fast_tinyvit, "STRIP_BYTES", 1)  # the smallest strips, MIN_STRIP_ROWS rows
    strips = (_fast_tinyvit.mbconv(mb, stem), _fast_tinyvit.patch_merging(merge, stem))
    assert spy == [common.MIN_STRIP_ROWS] * 2 and stem.shape[2] == 32
    monkeypatch.setattr(_fast_tinyvit, "STRIP_BYTES", 1 << 40)
    whole = (_fast_tinyvit.mbconv(mb, stem), _fast_tinyvit.patch_merging(merge, stem))
    assert len(spy) == 2
    for got, want in zip(strips, whole):
        assert got.shape == want.shape and got.dtype == want.dtype
        if dtype == torch.float32:
            _close_fp32(got, want, k=4 * 16)
        else:
            atol = 2 * 2.0**-8 * float(want.float().abs().max())
            torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
    assert strips[0].is_contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def test_bf16_encoder_no_farther_from_fp32_than_reference_bf16(onednn, monkeypatch):
    enc32 = _model()
    enc16 = _model().to(torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want32 = enc32(x)
    fused = enc16(x.bfloat16())
    monkeypatch.setattr(_fast_tinyvit, "ENABLED", False)
    reference = enc16(x.bfloat16())
    assert fused.shape == reference.shape == (2, 256, 4, 4) and fused.dtype == torch.bfloat16
    ref_err, fused_err = _rel(reference, want32), _rel(fused, want32)
    assert fused_err <= 1.5 * ref_err, (fused_err, ref_err)
    cos = torch.nn.functional.cosine_similarity(fused.float().flatten(), reference.float().flatten(), dim=0)
    assert cos >= 0.999, float(cos)


def test_fused_path_only_at_bf16_eager_inference(monkeypatch):
    """Gradients, training mode and float32 run the reference forward itself: bit-identical
    to it (the same kernels on the same shapes)."""
    calls = []
    real = _fast_tinyvit.tinyvit_block
    monkeypatch.setattr(_fast_tinyvit, "tinyvit_block", lambda *a: calls.append(1) or real(*a))
    enc16 = _model().to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64).bfloat16()
    with torch.enable_grad():
        grad_out = enc16(x)
    assert not calls
    with torch.no_grad():
        enc16(x)
    assert calls, "the fused path was not taken at bf16 inference"
    calls.clear()
    with torch.no_grad():
        _model()(x.float())
        _model().to(torch.bfloat16).train()(x)  # a separate model: training updates BatchNorm statistics
    assert not calls
    monkeypatch.setattr(_fast_tinyvit, "ENABLED", False)
    with torch.enable_grad():
        torch.testing.assert_close(enc16(x), grad_out, rtol=0, atol=0)


@torch.no_grad()
def test_cached_weights_follow_load_state_dict():
    """The folded convolutions and the gathered attention-bias tables are kept between calls;
    loading other weights must be seen at the next call, not the old cached values."""
    enc = _model(seed=0).to(torch.bfloat16)
    other = _model(seed=1).to(torch.bfloat16)
    x = torch.randn(1, 3, 64, 64).bfloat16()
    enc(x)  # fills the caches with seed-0 weights
    enc.load_state_dict(other.state_dict())
    torch.testing.assert_close(enc(x), other(x), rtol=0, atol=0)
    # New tensor objects (assign=True) at version 0: seen as well.
    third = _model(seed=2).to(torch.bfloat16)
    enc.load_state_dict({k: v.clone() for k, v in third.state_dict().items()}, assign=True)
    torch.testing.assert_close(enc(x), third(x), rtol=0, atol=0)
