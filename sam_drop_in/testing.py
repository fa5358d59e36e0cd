"""Helpers for tests and benchmarks that compare sam_drop_in with the reference packages.

The project's test suites (compat_tests/, tests/) and benchmarks/ import these; they ship with
the package (like ``numpy.testing``) so that they import the same way from a test, a benchmark
script or a downstream project's own parity tests, with no ``sys.path`` edits.

    from sam_drop_in.testing import load_image, perturbed_state_dict, small_sam

torch and pillow are dependencies of the package; the reference packages (``segment_anything``,
``mobile_sam``) are needed only for ``small_sam`` of those modules.
"""

import importlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, Tuple, Union

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


def small_sam(module: str, seed: int = 0, img_size: int = 1024, depth: int = 1,
              global_attn_indexes: Tuple[int, ...] = ()) -> nn.Module:
    """
    A SAM with a 1-block, 64-wide ViT encoder (the real prompt encoder and mask decoder), built
    from ``module``'s own classes. Behavioural assertions (types, shapes, dtypes, errors) do not
    depend on encoder size, and this keeps a suite fast on two cores.

    Arguments:
      module (str): "sam_drop_in", "segment_anything" or "mobile_sam".
      seed (int): torch seed for the initial weights.
      img_size (int): the encoder's input side (a multiple of 16); the prompt encoder's grid
        follows. 512 gives the mask decoder a quarter of the image tokens: the everything-mode
        tests, which decode hundreds of prompts through upstream's decoder, use it for speed.
      depth (int), global_attn_indexes (tuple(int)): the ViT's blocks and which of them attend
        globally (the others in 14x14 windows); by default one windowed block.

    Returns:
      (Sam): in eval mode; the same state-dict keys whichever the module.
    """
    modeling = importlib.import_module(module + ".modeling")
    torch.manual_seed(seed)
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            img_size=img_size, patch_size=16, embed_dim=64, depth=depth, num_heads=2, mlp_ratio=2, out_chans=256,
            use_rel_pos=True, window_size=14, global_attn_indexes=tuple(global_attn_indexes),
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=256, image_embedding_size=(img_size // 16, img_size // 16), input_image_size=(img_size, img_size),
            mask_in_chans=16,
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


def quality_prompts(h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 3x3 grid of points and 8 boxes, in original pixels (deterministic)."""
    xs, ys = np.meshgrid(np.linspace(0.2, 0.8, 3) * w, np.linspace(0.2, 0.8, 3) * h)
    points = torch.tensor(np.stack([xs.ravel(), ys.ravel()], 1)[:, None, :], dtype=torch.float)
    rng = np.random.default_rng(0)
    lo = rng.uniform(0.05, 0.45, (8, 2)) * [w, h]
    hi = lo + rng.uniform(0.2, 0.5, (8, 2)) * [w, h]
    boxes = torch.tensor(np.concatenate([lo, np.minimum(hi, [w - 1, h - 1])], 1), dtype=torch.float)
    return points, boxes


@torch.no_grad()
def predict_quality_masks(predictor, image: np.ndarray) -> torch.Tensor:
    """All multimask masks for quality_prompts on ``image``: Mx H x W bool (M = (9 + 8) * 3)."""
    predictor.set_image(image)
    h, w = image.shape[:2]
    points, boxes = quality_prompts(h, w)
    dev = predictor.device
    pts = predictor.transform.apply_coords_torch(points, (h, w)).to(dev)
    m1, _, _ = predictor.predict_torch(pts, torch.ones(pts.shape[:2], dtype=torch.int, device=dev))
    bxs = predictor.transform.apply_boxes_torch(boxes, (h, w)).to(dev)
    m2, _, _ = predictor.predict_torch(None, None, boxes=bxs)
    return torch.cat([m1.flatten(0, 1), m2.flatten(0, 1)]).cpu()


def mean_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean IoU of paired bool masks (M x H x W); pairs empty in both count as agreeing (1)."""
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.mean())


def records_iou(ref, got) -> float:
    """Mean over ``ref``'s records (generator output dicts with binary_mask segmentations) of the best mask IoU among ``got``'s records for the same
    point (0 when the point has none): the generators' agreement, independent of order."""
    by_point = defaultdict(list)
    for r in got:
        by_point[tuple(np.round(r["point_coords"][0], 3))].append(torch.as_tensor(r["segmentation"]))
    scores = []
    for r in ref:
        cands = by_point.get(tuple(np.round(r["point_coords"][0], 3)), [])
        a = torch.as_tensor(r["segmentation"])
        scores.append(max((mean_iou(a[None], b[None]) for b in cands), default=0.0))
    return float(np.mean(scores))


def model_in_mode(model: nn.Module, mode: str, device: str = "cpu") -> nn.Module:
    """
    ``model`` moved to ``device``, in eval mode, in precision ``mode`` ("fp32", "bf16", "fp16",
    "int8"). fp16 on a CPU goes through ``precision.reduce_precision`` (``optimize`` refuses it
    there), so that tests and benchmarks run that path on any machine; the "bf16 is emulated on
    this CPU" warning is silenced.
    """
    import warnings

    from .precision import optimize, reduce_precision

    model.to(device).eval()
    if mode == "fp16" and torch.device(device).type == "cpu":
        return reduce_precision(model, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return optimize(model, mode)


def fixed_int8_graph(model: nn.Module, x: torch.Tensor, weight_scale, activation: Tuple[float, int, int, int]):
    """``model`` through torchao's PT2E flow with the x86 Inductor quantiser, every observer fixed
    instead of calibrated: the converted (quantise/dequantise) graph, to run eagerly or compile.
    For tests of what Inductor's int8 kernels compute on chosen codes (needs torchao).

    Arguments:
      model (nn.Module): float32, eval mode (convolutions and linears get quantised).
      x (torch.Tensor): an example input (export traces this shape).
      weight_scale (callable): weight tensor (out x ...) -> (per-channel scales (out,), quant_min,
        quant_max); symmetric, zero point 0.
      activation (tuple): (scale, zero_point, quant_min, quant_max) of every activation.

    Returns:
      (torch.fx.GraphModule): the output of ``convert_pt2e``.
    """
    from torchao.quantization.pt2e.observer import ObserverBase

    from .quantization.pt2e_int8 import _fixed_observer, _torchao

    prepare_pt2e, convert_pt2e, xiq = _torchao()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for node in list(observed.graph.nodes):
        old = getattr(observed, str(node.target), None) if node.op == "call_module" else None
        if not isinstance(old, ObserverBase):
            continue
        if node.args[0].op == "get_attr":
            scale, qmin, qmax = weight_scale(observed.get_parameter(node.args[0].target).detach())
            new = _fixed_observer(old, scale, torch.zeros(scale.shape, dtype=torch.int32), qmin, qmax)
        else:
            new = _fixed_observer(old, *activation)
        setattr(observed, node.target, new)
    return convert_pt2e(observed)
