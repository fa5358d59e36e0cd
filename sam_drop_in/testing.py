"""Helpers for tests and benchmarks that compare sam_drop_in with the reference packages.

The project's test suites (compat_tests/, tests/) and benchmarks/ import these; they ship with
the package (like ``numpy.testing``) so that they import the same way from a test, a benchmark
script or a downstream project's own parity tests, with no ``sys.path`` edits.

    from sam_drop_in.testing import load_image, perturbed_state_dict, small_sam

torch and pillow are dependencies of the package; the reference packages (``segment_anything``,
``mobile_sam``) are needed only for ``small_sam`` of those modules.
"""

import importlib
from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

# The photographs of a source checkout (examples/images); not part of an installed wheel.
EXAMPLE_IMAGES = Path(__file__).resolve().parent.parent / "examples" / "images"


def load_image(name: Union[str, Path]) -> np.ndarray:
    """
    Reads an image as RGB.

    Arguments:
      name (str or Path): a file name in the checkout's examples/images (e.g. "coffee.jpg", 400x600)
        or a path to any image file.

    Returns:
      (np.ndarray): HxWx3 uint8 RGB.
    """
    path = Path(name) if Path(name).is_file() else EXAMPLE_IMAGES / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!s} is neither an image file nor in {EXAMPLE_IMAGES} (the example photographs are in a "
            "source checkout of sam-drop-in, not in an installed wheel)."
        )
    return np.asarray(Image.open(path).convert("RGB"))


def perturbed_state_dict(state_dict: Dict[str, torch.Tensor], seed: int = 0) -> Dict[str, torch.Tensor]:
    """
    Random weights that exercise every parameter and buffer.

    A fresh model has many zero or constant tensors (zero-initialised biases, relative positions,
    attention biases, BatchNorm statistics); perturbing them all makes a parity test able to catch
    a wrong key, transposition or missing term.

    Arguments:
      state_dict (dict(str, torch.Tensor)): a model's state dict.
      seed (int): seed of the perturbation.

    Returns:
      (dict(str, torch.Tensor)): new tensors, same keys, shapes and dtypes; integer tensors copied.
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


def small_sam(module: str, seed: int = 0) -> nn.Module:
    """
    A SAM with a 1-block, 64-wide ViT encoder (the real prompt encoder and mask decoder), built
    from ``module``'s own classes. Behavioural assertions (types, shapes, dtypes, errors) do not
    depend on encoder size, and this keeps a suite fast on two cores.

    Arguments:
      module (str): "sam_drop_in", "segment_anything" or "mobile_sam".
      seed (int): torch seed for the initial weights.

    Returns:
      (Sam): in eval mode; the same state-dict keys whichever the module.
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
