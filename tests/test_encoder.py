"""Inference in pieces (TinyViT stage-0 strips, token row groups, in-place GELU; the ViT's global
attention a few query rows at a time) against the same model computed whole. Parity with
MobileSAM and segment_anything themselves is in compat_tests/test_parity.py.

Contract: every output value is computed from the same inputs by the same operations, but not
by the same kernel calls. A strip or row group is a matrix product or convolution of another
shape, and oneDNN / ATen choose blocking, vector width and the split between threads by shape,
ISA and thread count, so the float32 sums inside may be added in another order. (On an
AVX-512/AMX machine the pieces happened to be bit-identical with one thread and differed with two;
emulating AVX2 the pattern changed again.) Reordering a float32 sum of K terms changes it by at
most about K * eps * sum|terms| (eps = 2**-23); after the LayerNorms the encoder's values are
O(1), so the pieces must agree to ``K * eps * max|value|`` with K the longest reduction in the
encoder. That is about 1e-4 relative: 100x above the differences seen (max 16-19 eps * max|value|,
i.e. ~4e-6), and 1000x below what a wrong strip boundary or a missing term does (O(0.1-1)).
"""

import pytest
import torch

from sam_drop_in.testing import perturbed_state_dict
from sam_drop_in.build_sam import build_sam_sized
from sam_drop_in.modeling import common, tiny_vit

EPS = torch.finfo(torch.float32).eps


def _reordering_tolerance(whole: torch.Tensor, k: int) -> float:
    return k * EPS * float(whole.abs().max())


class _Spy:
    """Records each call's arguments, then calls the real function."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("image_size,strip_bytes", [(1024, None), (512, 1)])
def test_pieces_equal_whole_image(monkeypatch, image_size, strip_bytes):
    """Default pieces at SAM's size; the smallest strips (many, uneven last one) at another."""
    torch.manual_seed(0)
    model = build_sam_sized("vit_t", image_size=image_size).eval()
    model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=2))
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(common, "PIECES_MAX_THREADS", 1 << 10)  # pieces at any thread count
    strips, groups = _Spy(tiny_vit.in_strips), _Spy(common.in_row_groups)
    monkeypatch.setattr(tiny_vit, "in_strips", strips)
    monkeypatch.setattr(common, "in_row_groups", groups)
    if strip_bytes is not None:
        monkeypatch.setattr(common, "STRIP_BYTES", strip_bytes)
        monkeypatch.setattr(common, "ROW_GROUP", 1000)
    with torch.no_grad():
        pieces = model.image_encoder(x)
        # The piecewise paths really ran, each on more than one piece: strips of fewer rows than
        # the feature map has (MBConv blocks and the first merge), groups of fewer tokens.
        assert strips.calls and all(rows < x_.shape[2] for (x_, rows, *_), _ in strips.calls)
        assert groups.calls and all(x_.numel() > common.ROW_GROUP * x_.shape[-1] for (_, x_, *_), _ in groups.calls)
        strips.calls.clear()
        groups.calls.clear()
        monkeypatch.setattr(common, "STRIP_BYTES", 1 << 40)
        monkeypatch.setattr(common, "ROW_GROUP", 1 << 30)
        whole = model.image_encoder(x)
        assert not strips.calls and not groups.calls  # and the reference really is whole
    # Longest reduction: the last stage's MLP output layer, 4 * 320 = 1280 terms.
    k = max(m.in_features for m in model.image_encoder.modules() if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(pieces, whole, rtol=0, atol=_reordering_tolerance(whole, k))


def test_training_and_gradients_take_the_whole_path():
    """With gradients recorded nothing is overwritten in place: backward works."""
    model = build_sam_sized("vit_t", image_size=256)
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    model.image_encoder.eval()
    model.image_encoder(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_vit_global_attention_in_row_pieces_equals_whole(monkeypatch):
    """ImageEncoderViT's global attention with relative positions, a few query rows at a time
    (inference), against the whole bias at once. Same contract as above; the longest reduction
    is the attention's sum over its 4096 keys."""
    from sam_drop_in.modeling import ImageEncoderViT, image_encoder

    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
                          out_chans=32, use_rel_pos=True, rel_pos_zero_init=False, window_size=14,
                          global_attn_indexes=(1,)).eval()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    calls = []
    real = image_encoder.decomposed_rel_pos_bias
    monkeypatch.setattr(image_encoder, "decomposed_rel_pos_bias", lambda *a, **k: calls.append(k.get("rows")) or real(*a, **k))
    with torch.no_grad():
        pieces = enc(x)
        assert any(r is not None for r in calls)  # the global block really went by rows
        calls.clear()
        monkeypatch.setattr(image_encoder, "_WHOLE_BIAS_BYTES", 1 << 40)
        monkeypatch.setattr(common, "ROW_GROUP", 1 << 30)
        whole = enc(x)
        assert calls and all(r is None for r in calls)  # the reference took the whole bias
    torch.testing.assert_close(pieces, whole, rtol=0, atol=_reordering_tolerance(whole, 64 * 64))
