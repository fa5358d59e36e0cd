"""Fixtures of the compatibility suite.

The suite runs the same behavioural assertions against segment_anything (the contract),
mobile_sam (the vit_t reference) and sam_drop_in, and compares outputs on identical weights.
"""

import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

warnings.filterwarnings("ignore", module="timm")
warnings.filterwarnings("ignore", message=".*Overwriting tiny_vit.*")

IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"
IMPLEMENTATIONS = ["segment_anything", "mobile_sam", "sam_drop_in"]


def load_image(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


def perturbed_state_dict(state_dict, seed: int = 0):
    """Random weights that exercise every parameter and buffer.

    A fresh model has many zero or constant tensors (zero-initialised biases, relative positions,
    attention biases, BatchNorm statistics); perturbing them all makes a parity test able to
    catch a wrong key, transposition or missing term.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state_dict.items():
        if not value.is_floating_point():
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:
            out[key] = value + 0.02 * torch.randn(value.shape, generator=g)
    return out


def small_sam(module, seed: int = 0):
    """A SAM with a 1-block, 64-wide ViT encoder, built from ``module``'s own classes.

    Behavioural assertions (types, shapes, dtypes, errors) do not depend on encoder size, and this
    keeps the suite fast on two cores; numerical parity on the real configurations is tested in
    test_parity.py.
    """
    modeling = importlib.import_module(module + ".modeling")
    torch.manual_seed(seed)
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=1024, patch_size=16, embed_dim=64, depth=1, num_heads=2, mlp_ratio=2, out_chans=256,
            use_rel_pos=True, window_size=14, global_attn_indexes=(),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


_SMALL_STATE = {}


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def impl(request):
    """The implementation under test, as a module: segment_anything, mobile_sam or sam_drop_in."""
    return importlib.import_module(request.param)


@pytest.fixture(scope="session")
def small_model(impl):
    """A small SAM of ``impl`` with the same (perturbed) weights for every implementation."""
    sam = small_sam(impl.__name__)
    if "sd" not in _SMALL_STATE:
        _SMALL_STATE["sd"] = perturbed_state_dict(sam.state_dict(), seed=1)
    sam.load_state_dict(_SMALL_STATE["sd"])
    return sam.eval()


@pytest.fixture(scope="session")
def coffee():
    return load_image("coffee.jpg")  # 400x600, non-square


@pytest.fixture(scope="session")
def astronaut():
    return load_image("astronaut.jpg")  # 512x512, square


@pytest.fixture(scope="session")
def predictor(impl, small_model, coffee):
    p = impl.SamPredictor(small_model)
    p.set_image(coffee)
    return p
