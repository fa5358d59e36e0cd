"""Fixtures of the compatibility suite.

The suite runs the same behavioural assertions against segment_anything (the contract),
mobile_sam (the vit_t reference) and sam_drop_in, and compares outputs on identical weights.
"""

import importlib
import warnings

import pytest

# The helpers live in sam_drop_in.testing; imported here for this file's fixtures.
from sam_drop_in.testing import load_image, perturbed_state_dict, small_sam

warnings.filterwarnings("ignore", module="timm")
warnings.filterwarnings("ignore", message=".*Overwriting tiny_vit.*")

IMPLEMENTATIONS = ["segment_anything", "mobile_sam", "sam_drop_in"]


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
