"""TinyViT inference in pieces (stage-0 strips, token groups, in-place GELU) against the same
model computed whole: bit-for-bit equal, since every output value comes from the same inputs
through the same kernels. Parity with MobileSAM itself is in compat_tests/test_parity.py."""

import pytest
import torch

from compat_tests.conftest import perturbed_state_dict
from sam_drop_in.build_sam import _build
from sam_drop_in.modeling import tiny_vit


@pytest.mark.parametrize("image_size,strip_bytes", [(1024, None), (512, 1)])
def test_pieces_equal_whole_image(monkeypatch, image_size, strip_bytes):
    """Default pieces at SAM's size; the smallest strips (many, uneven last one) at another."""
    model = _build("vit_t", image_size=image_size).eval()
    model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=2))
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    if strip_bytes is not None:
        monkeypatch.setattr(tiny_vit, "_STRIP_BYTES", strip_bytes)
        monkeypatch.setattr(tiny_vit, "_MLP_TOKENS", 1000)
    with torch.no_grad():
        pieces = model.image_encoder(x)
        monkeypatch.setattr(tiny_vit, "_STRIP_BYTES", 1 << 40)
        monkeypatch.setattr(tiny_vit, "_MLP_TOKENS", 1 << 30)
        whole = model.image_encoder(x)
    assert torch.equal(pieces, whole)


def test_training_and_gradients_take_the_whole_path():
    """With gradients recorded nothing is overwritten in place: backward works."""
    model = _build("vit_t", image_size=256)
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    model.image_encoder.eval()
    model.image_encoder(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
