"""The ``sam-drop-in`` command (also ``python -m sam_drop_in``).

Commands:
  segment IMAGE... --point X,Y[,LABEL] --box X0,Y0,X1,Y1 [--multimask]
                        masks from clicks and boxes: PNG per mask, scores.json, overlay.png
  everything IMAGE_OR_DIR...
                        every object (segment_anything's scripts/amg.py arguments and output
                        layout), optionally TinySAM's --hierarchical mode, plus an overlay
  convert SRC DST       any supported checkpoint -> segment_anything-layout safetensors folder
  export-onnx ...       ONNX decoder (and encoder) export
  info CHECKPOINT       model type, layout, parameter count, sha256
  distill ...           train your own vit_t

Exit status: 0 on success; 1 when some image failed (the others are still processed) or the
work itself failed; 2 for bad input found before any work (missing file, bad prompt syntax,
unusable checkpoint, bad option). Every error is one line on stderr; set
SAM_DROP_IN_DEBUG=1 to get the traceback instead.

``--checkpoint random`` builds the model with random weights (a loud warning says so): the
masks are meaningless, but every command runs without downloading anything, which is what
the tests and a first try need.

This module imports only the standard library at import time; torch and the models are
imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

PROG = "sam-drop-in"
RANDOM = "random"
MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h", "default")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# segment_anything's scripts/amg.py writes exactly this header (and no trailing newline).
METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


class CliError(Exception):
    """A one-line, user-facing error; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ImageReadError(Exception):
    """An input file that could not be decoded as an image (the run goes on with the others)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _err(message: str) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Prompts


def parse_point(text: str) -> Tuple[float, float, int]:
    """Parse ``X,Y`` or ``X,Y,LABEL`` (pixels; LABEL 1 = foreground, 0 = background).

    Arguments:
      text (str): the option value.

    Returns:
      (tuple): (x, y, label) with x, y float pixel coordinates and label int 0 or 1.

    Raises:
      CliError: malformed value (exit status 2).
    """
    hint = (f"bad --point {text!r}: expected X,Y or X,Y,LABEL (pixel coordinates; LABEL 1 = foreground, "
            "0 = background), e.g. --point 250,180 or --point 250,180,0")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise CliError(hint)
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError:
        raise CliError(hint) from None
    if not (math.isfinite(x) and math.isfinite(y)) or label not in (0, 1):
        raise CliError(hint)
    return x, y, label


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """Parse ``X0,Y0,X1,Y1`` (pixels, top-left and bottom-right corners).

    Arguments:
      text (str): the option value.

    Returns:
      (tuple): (x0, y0, x1, y1) floats with x0 < x1 and y0 < y1.

    Raises:
      CliError: malformed value (exit status 2).
    """
    hint = (f"bad --box {text!r}: expected X0,Y0,X1,Y1 (pixel corners, top-left then bottom-right, "
            "X0 < X1 and Y0 < Y1), e.g. --box 100,50,400,300")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 4:
        raise CliError(hint)
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise CliError(hint) from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x0 >= x1 or y0 >= y1:
        raise CliError(hint)
    return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def _image_suffixes() -> set:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def expand_inputs(paths: Sequence[str]) -> List[Path]:
    """Files named on the command line, with directories replaced by their image files.

    A directory contributes its (non-hidden) files whose suffix Pillow knows, sorted by name;
    it is not searched recursively (as upstream's scripts/amg.py).

    Raises:
      CliError: a path does not exist, a directory has no images, or two inputs would write
        to the same output name.
    """
    out: List[Path] = []
    suffixes = None
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CliError(f"no such file or directory: '{raw}'")
        if p.is_dir():
            suffixes = suffixes or _image_suffixes()
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() in suffixes)
            if not found:
                raise CliError(f"directory '{raw}' contains no image files")
            out.extend(found)
        else:
            out.append(p)
    seen: Dict[str, Path] = {}
    for p in out:
        if p.stem in seen and seen[p.stem] != p:
            raise CliError(f"'{seen[p.stem]}' and '{p}' would both write output '{p.stem}'; "
                           "rename one or run them separately")
        seen[p.stem] = p
    # The same file named twice is processed once.
    return list(dict.fromkeys(out))


def read_image(path: Path):
    """Decode an image file to HxWx3 uint8 RGB (EXIF orientation applied, as OpenCV does).

    Raises:
      ImageReadError: the file is not a readable image; the message names it.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read '{path}' as an image (not an image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read '{path}' as an image ({_one_line(exc)})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"cannot read '{path}' as an image (empty image)")
    return np.ascontiguousarray(rgb)


def _save_mask_png(mask, path: Path) -> None:
    import numpy as np
    from PIL import Image

    # 0/255 single-channel, as upstream's cv2.imwrite(mask * 255).
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L").save(path)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8")
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _write_json(obj: Any, path: Path, indent: Optional[int] = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, default=_json_default, indent=indent)
    os.replace(tmp, path)


def _clear_numbered_pngs(folder: Path, prefix: str = "") -> None:
    # A rerun into the same folder must not leave masks of an earlier run beside the new ones.
    for f in folder.glob(f"{prefix}*.png"):
        if f.stem[len(prefix):].isdigit():
            f.unlink()


# ---------------------------------------------------------------------------------------------
# Model


def _require(module: str, extra: str, why: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise CliError(f"{why} needs the '{module}' package: pip install 'sam-drop-in[{extra}]'") from None


def _resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown --device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CliError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def _quiet_hub_logging() -> None:
    # huggingface_hub logs every connection retry as a warning; the CLI reports the outcome
    # as one line instead.
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass


def load_model(model_type: Optional[str], checkpoint: Optional[str], device_name: str = "auto"):
    """Build and load the model for a CLI command.

    Arguments:
      model_type (str or None): vit_t / vit_b / vit_l / vit_h / default; None means the
        checkpoint's own type (vit_t when no checkpoint is given).
      checkpoint (str or None): local path, ``hf://`` address, ``"random"`` (random weights,
        with a warning) or None (the manifest's default for the model type).
      device_name (str): torch device name or "auto".

    Returns:
      (tuple): (Sam in eval mode on the device, model type str, checkpoint description str).

    Raises:
      CliError: the checkpoint cannot be had or holds another model type (exit status 2).
    """
    if model_type is not None and model_type not in MODEL_TYPES:
        raise CliError(f"unknown --model-type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    requested = "vit_h" if model_type == "default" else model_type
    device = _resolve_device(device_name)

    from .build_sam import sam_model_registry

    if checkpoint == RANDOM:
        mt = requested or "vit_t"
        _warn(f"--checkpoint random: the {mt} model has RANDOM weights and its masks are MEANINGLESS; "
              "use this only to try the command or in tests")
        return sam_model_registry[mt]().to(device), mt, "random weights"

    from . import checkpoint as ckpt_mod

    defaulted = checkpoint is None
    if defaulted:
        checkpoint = ckpt_mod.default_checkpoint(requested or "vit_t")
    _quiet_hub_logging()
    try:
        state_dict = ckpt_mod.load_state_dict(checkpoint)
    except ckpt_mod.CheckpointError as exc:
        if defaulted:
            raise CliError(
                f"no --checkpoint given, and the default {requested or 'vit_t'} checkpoint {checkpoint} could not be "
                f"loaded (not in the local Hugging Face cache and not downloadable now: {_one_line(exc)[:200]}); "
                "pass --checkpoint PATH to a local .pt/.pth/.safetensors file (or --checkpoint random to try the "
                "command with meaningless random weights)"
            ) from None
        raise CliError(str(exc)) from None

    from ._layouts import detect_model_type

    found = detect_model_type(state_dict)
    if requested is not None and found != requested:
        raise CliError(f"checkpoint '{checkpoint}' holds a {found} model but --model-type is {model_type}; "
                       f"pass --model-type {found} (or leave --model-type out: it is read from the checkpoint)")
    mt = requested or found
    sam = sam_model_registry[mt]()
    sam.load_state_dict(state_dict, strict=True)
    return sam.to(device), mt, str(checkpoint)


# ---------------------------------------------------------------------------------------------
# Progress and summary


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _progress(items: Sequence, args: argparse.Namespace, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image", disable=not _show_progress(args), file=sys.stderr)


def _report_failure(message: str) -> None:
    from tqdm.auto import tqdm

    # tqdm.write keeps an active progress bar intact.
    tqdm.write(f"{PROG}: error: {_one_line(message)}; skipped", file=sys.stderr)


def _summary(command: str, n_images: int, n_failed: int, n_masks: int, seconds: float, output: Path) -> None:
    failed = f" ({n_failed} failed)" if n_failed else ""
    print(f"{command}: {n_images} image{'s' if n_images != 1 else ''}{failed}, {n_masks} mask"
          f"{'s' if n_masks != 1 else ''}, {seconds:.1f} s -> {output}")


# ---------------------------------------------------------------------------------------------
# segment


def _check_prompts_inside(points, boxes, width: int, height: int, path: Path) -> None:
    for x, y, _ in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ImageReadError(f"--point {x:g},{y:g} lies outside '{path}' ({width}x{height})")
    for x0, y0, x1, y1 in boxes:
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise ImageReadError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} lies outside '{path}' ({width}x{height})")


def _predict(predictor, image, points, boxes, multimask: bool):
    """Masks (P x C x H x W bool), scores (P x C float) for P prompts: one prompt made of all
    points and at most one box, or one prompt per box (each with all the points)."""
    import numpy as np
    import torch

    pc = np.array([[x, y] for x, y, _ in points], dtype=np.float32) if points else None
    pl = np.array([lab for _, _, lab in points], dtype=np.int64) if points else None
    if len(boxes) <= 1:
        box = np.array(boxes[0], dtype=np.float32) if boxes else None
        masks, scores, _ = predictor.predict(point_coords=pc, point_labels=pl, box=box, multimask_output=multimask)
        return masks[None], scores[None]
    device = predictor.device
    hw = image.shape[:2]
    tboxes = predictor.transform.apply_boxes_torch(torch.tensor(boxes, dtype=torch.float32), hw).to(device)
    tpc = tpl = None
    if points:
        tpc = predictor.transform.apply_coords_torch(torch.from_numpy(pc), hw).to(device)
        tpc = tpc[None].expand(len(boxes), -1, -1)
        tpl = torch.from_numpy(pl).to(device)[None].expand(len(boxes), -1)
    masks, scores, _ = predictor.predict_torch(tpc, tpl, boxes=tboxes, multimask_output=multimask)
    return masks.cpu().numpy(), scores.float().cpu().numpy()


def _cmd_segment(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    points = [parse_point(p) for p in args.point or []]
    boxes = [parse_box(b) for b in args.box or []]
    if not points and not boxes:
        raise CliError("segment needs at least one prompt: --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
    inputs = expand_inputs(args.images)
    out_root = Path(args.output)

    sam, model_type, ckpt_desc = load_model(args.model_type, args.checkpoint, args.device)
    import numpy as np

    from . import _viz
    from .predictor import SamPredictor

    predictor = SamPredictor(sam)
    n_masks = n_failed = 0
    for path in _progress(inputs, args, "segment"):
        try:
            image = read_image(path)
            h, w = image.shape[:2]
            _check_prompts_inside(points, boxes, w, h, path)
        except ImageReadError as exc:
            _report_failure(str(exc))
            n_failed += 1
            continue
        predictor.set_image(image)
        masks, scores = _predict(predictor, image, points, boxes, args.multimask)

        folder = out_root / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        _clear_numbered_pngs(folder, "mask_")
        records = []
        best_masks, best_scores = [], []
        for p in range(masks.shape[0]):
            best = int(np.argmax(scores[p]))
            for k in range(masks.shape[1]):
                i = len(records)
                m = masks[p, k]
                _save_mask_png(m, folder / f"mask_{i}.png")
                ys, xs = np.nonzero(m)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] \
                    if len(xs) else [0, 0, 0, 0]
                records.append({"file": f"mask_{i}.png", "prompt": p, "score": float(scores[p, k]),
                                "area": int(m.sum()), "bbox": bbox, "best": k == best})
            best_masks.append(masks[p, best])
            best_scores.append(float(scores[p, best]))
        prompts = [{"points": [[x, y] for x, y, _ in points], "labels": [lab for _, _, lab in points],
                    "box": list(b) if b is not None else None}
                   for b in (boxes if boxes else [None])]
        _write_json({"image": str(path), "width": w, "height": h, "model_type": model_type,
                     "checkpoint": ckpt_desc, "multimask": bool(args.multimask), "prompts": prompts,
                     "masks": records}, folder / "scores.json", indent=2)
        if not args.no_overlay:
            _viz.prompt_overlay(image, best_masks, best_scores, points=[(x, y) for x, y, _ in points],
                                labels=[lab for _, _, lab in points], boxes=boxes).save(folder / "overlay.png")
        n_masks += len(records)
    _summary("segment", len(inputs), n_failed, n_masks, time.perf_counter() - t0, out_root)
    return EXIT_FAILED if n_failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# everything


AMG_OPTIONS = (
    # (flag, type, help): the AMG settings of segment_anything's scripts/amg.py. Unset options
    # keep the generator's own defaults, as upstream's script does.
    ("--points-per-side", int, "Sample a grid with this many points to a side (default 32)."),
    ("--points-per-batch", int, "How many points are decoded together in one batch (default 64)."),
    ("--pred-iou-thresh", float, "Drop masks whose predicted IoU is below this (default 0.88)."),
    ("--stability-score-thresh", float, "Drop masks whose stability score is below this (default 0.95)."),
    ("--stability-score-offset", float, "Logit shift used to measure the stability score (default 1.0)."),
    ("--box-nms-thresh", float, "Box IoU above which a duplicate mask is dropped (default 0.7)."),
    ("--crop-n-layers", int, "If >0, also run on crops of the image, at this many scales (default 0)."),
    ("--crop-nms-thresh", float, "Box IoU for dropping duplicate masks across crops (default 0.7)."),
    ("--crop-overlap-ratio", float, "Overlap of the crops, a fraction of the image's short side (default 512/1500)."),
    ("--crop-n-points-downscale-factor", int, "Points per side in crop layer i are divided by this to the power i "
                                              "(default 1)."),
    ("--min-mask-region-area", int, "Remove islands and fill holes smaller than this many pixels "
                                    "(default 0; needs OpenCV)."),
)


def _amg_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for flag, _, _ in AMG_OPTIONS:
        key = flag[2:].replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if args.hierarchical and args.high_score_thresh is not None:
        out["high_score_thresh"] = args.high_score_thresh
    return out


def write_masks_to_folder(records: List[Dict[str, Any]], folder: Path) -> None:
    """Upstream scripts/amg.py's folder layout: ``{i}.png`` per mask (0/255) and metadata.csv.

    Arguments:
      records (list of dict): generator records with binary (HxW bool) segmentations.
      folder (Path): created if missing; earlier ``{i}.png`` files in it are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _clear_numbered_pngs(folder)
    rows = [METADATA_HEADER]
    for i, rec in enumerate(records):
        _save_mask_png(rec["segmentation"], folder / f"{i}.png")
        crop_box = rec.get("crop_box")
        if crop_box is None:
            h, w = rec["segmentation"].shape
            crop_box = [0, 0, w, h]
        row = [str(i), str(rec["area"]), *[str(v) for v in rec["bbox"]],
               *[str(v) for v in rec["point_coords"][0]], str(rec["predicted_iou"]),
               str(rec["stability_score"]), *[str(v) for v in crop_box]]
        rows.append(",".join(row))
    (folder / "metadata.csv").write_text("\n".join(rows), encoding="utf-8")


def _cmd_everything(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    inputs = expand_inputs(list(args.images) + list(args.input or []))
    if not inputs:
        raise CliError("everything needs at least one IMAGE or directory")
    if args.convert_to_rle:
        _require("pycocotools", "amg", "--convert-to-rle")
    if args.min_mask_region_area:
        _require("cv2", "amg", "--min-mask-region-area")
    if args.hierarchical and args.crop_n_layers:
        raise CliError("--hierarchical works on the whole image; leave out --crop-n-layers")
    out_root = Path(args.output)

    sam, _model_type, _ = load_model(args.model_type, args.checkpoint, args.device)
    from . import _viz
    from ._errors import InputError

    if args.hierarchical:
        from .hierarchical_mask_generator import SamHierarchicalMaskGenerator as Generator
    else:
        from .automatic_mask_generator import SamAutomaticMaskGenerator as Generator
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    try:
        generator = Generator(sam, output_mode=output_mode, progress=_show_progress(args), **_amg_kwargs(args))
    except (InputError, ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None

    out_root.mkdir(parents=True, exist_ok=True)
    n_masks = n_failed = 0
    for path in _progress(inputs, args, "everything"):
        try:
            image = read_image(path)
        except ImageReadError as exc:
            _report_failure(str(exc))
            n_failed += 1
            continue
        records = generator.generate(image)
        if args.convert_to_rle:
            _write_json(records, out_root / f"{path.stem}.json")
            if not args.no_overlay:
                from pycocotools import mask as mask_utils

                masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
        else:
            write_masks_to_folder(records, out_root / path.stem)
            masks = [r["segmentation"] for r in records]
        if not args.no_overlay:
            caption = f"{len(records)} masks" + (" (hierarchical)" if args.hierarchical else "")
            _viz.everything_overlay(image, masks, caption=caption).save(out_root / f"{path.stem}.overlay.png")
        n_masks += len(records)
    _summary("everything", len(inputs), n_failed, n_masks, time.perf_counter() - t0, out_root)
    return EXIT_FAILED if n_failed else EXIT_OK


# ---------------------------------------------------------------------------------------------
# info, convert


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, inspect_checkpoint

    _quiet_hub_logging()
    if not args.checkpoint.startswith("hf://") and not os.path.exists(args.checkpoint):
        raise CliError(f"no such file: '{args.checkpoint}'")
    try:
        info = inspect_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    rows = [
        ("model type", info.get("model_type") or "unknown (not a standard SAM model)"),
        ("layout", info.get("layout")),
        ("format", info.get("format")),
        ("parameters", f"{info['num_params']:,}" if "num_params" in info else None),
        ("tensors", info.get("num_tensors")),
        ("dtype", info.get("dtype")),
        ("size", f"{info['size_bytes'] / 2**20:.1f} MiB" if "size_bytes" in info else None),
        ("sha256", info.get("sha256")),
        ("file", info.get("path")),
    ]
    for key, value in rows:
        if value is not None:
            print(f"{key + ':':<12}{value}")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, convert

    _quiet_hub_logging()
    if not args.src.startswith("hf://") and not os.path.exists(args.src):
        raise CliError(f"no such file: '{args.src}'")
    try:
        written = convert(args.src, args.dst, model_type=args.model_type, push_to_hub=args.push_to_hub,
                          private=args.private or None)
    except CheckpointError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {written} (+ config.json, README.md)" + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else ""))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser


def _add_common(p: argparse.ArgumentParser, output_default: str) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="Model type (default: the checkpoint's own type; vit_t without --checkpoint).")
    g.add_argument("--checkpoint", default=None,
                   help="Weights: a local .pt/.pth/.safetensors file or hf://OWNER/REPO[@REV]/FILE. Default: the "
                        "manifest's checkpoint for the model type (downloaded once, then cached). 'random' builds "
                        "the model with random weights (meaningless masks; for trying the command and for tests).")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto).")
    g.add_argument("--output", default=output_default, help=f"Output folder (default: {output_default}).")
    g.add_argument("--no-overlay", action="store_true", help="Do not write overlay pictures.")
    g.add_argument("--quiet", "-q", action="store_true", help="No progress bars.")


def _lazy_command(sub, name: str, help_text: str, error: BaseException) -> None:
    # A command whose module failed to import still shows in --help, and says why it cannot run.
    p = sub.add_parser(name, help=help_text, add_help=True)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def unavailable(_args: argparse.Namespace) -> int:
        raise CliError(f"'{name}' is unavailable: {type(error).__name__}: {error}", EXIT_FAILED)

    p.set_defaults(func=unavailable)


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-drop-in`` argument parser (every command has ``--help``)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment Anything from the command line: prompted masks, everything mode, checkpoints, "
                    "ONNX export and distillation. vit_t (MobileSAM/TinySAM) by default.",
        epilog="Run 'sam-drop-in COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "segment", help="masks from point and box prompts",
        description="Segment objects from point and box prompts. Per image writes OUTPUT/NAME/mask_I.png "
                    "(0/255), OUTPUT/NAME/scores.json and OUTPUT/NAME/overlay.png (the best mask per prompt, "
                    "the prompts and the scores). All points together with one box form one prompt; several "
                    "boxes form one prompt each (with the points added to every box).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="Image files or folders of images.")
    p.add_argument("--point", action="append", metavar="X,Y[,LABEL]",
                   help="A click in pixels; LABEL 1 = foreground (default), 0 = background. Repeatable.")
    p.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1",
                   help="A box in pixels (top-left, bottom-right corners). Repeatable: one prompt per box.")
    p.add_argument("--multimask", action="store_true",
                   help="Return SAM's three candidate masks per prompt instead of one.")
    _add_common(p, "sam_output/segment")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser(
        "everything", help="every object in the image (automatic mask generation)",
        description="Automatic mask generation with segment_anything's scripts/amg.py options and output layout: "
                    "OUTPUT/NAME/{0,1,...}.png plus OUTPUT/NAME/metadata.csv, or OUTPUT/NAME.json (COCO RLE) with "
                    "--convert-to-rle; plus OUTPUT/NAME.overlay.png with every mask. A bad image in a folder is "
                    "reported and skipped; the exit status is then 1.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="Image files or folders of images.")
    p.add_argument("--input", action="append", metavar="PATH",
                   help="Same as a positional IMAGE_OR_DIR (upstream scripts/amg.py spelling). Repeatable.")
    p.add_argument("--convert-to-rle", action="store_true",
                   help="Save one COCO-RLE JSON per image instead of a folder of PNGs (needs pycocotools).")
    p.add_argument("--hierarchical", action="store_true",
                   help="TinySAM's hierarchical mode: a sparse grid first, then dense points only where nothing "
                        "was found yet (about 2x fewer decoder calls).")
    p.add_argument("--high-score-thresh", type=float, default=None,
                   help="With --hierarchical: logit above which a pixel counts as covered (default 8.5).")
    g = p.add_argument_group("AMG settings (as segment_anything's scripts/amg.py)")
    for flag, typ, help_text in AMG_OPTIONS:
        g.add_argument(flag, type=typ, default=None, help=help_text)
    _add_common(p, "sam_output/everything")
    p.set_defaults(func=_cmd_everything)

    p = sub.add_parser(
        "convert", help="convert a checkpoint to segment_anything-layout safetensors",
        description="Convert any supported checkpoint (segment_anything, MobileSAM, TinySAM or transformers "
                    "layout; safetensors or pickle) into a folder DST with model.safetensors, config.json and a "
                    "model card README.md.",
    )
    p.add_argument("src", help="Local file or hf://OWNER/REPO[@REV]/FILE.")
    p.add_argument("dst", help="Output folder.")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=None, help="Require this model type.")
    p.add_argument("--push-to-hub", metavar="OWNER/REPO", default=None, help="Upload the folder to this Hub repo.")
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "info", help="describe a checkpoint (model type, layout, parameters, sha256)",
        description="Describe a checkpoint without building a model.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="Local file or hf://OWNER/REPO[@REV]/FILE.")
    p.add_argument("--json", action="store_true", help="Print the description as JSON.")
    p.set_defaults(func=_cmd_info)

    try:
        from .onnx_export import add_export_arguments, run_export
    except Exception as exc:  # keep the other commands usable while an optional module is broken
        _lazy_command(sub, "export-onnx", "export the decoder (and encoder) to ONNX", exc)
    else:
        p = sub.add_parser(
            "export-onnx", help="export the decoder (and encoder) to ONNX",
            description="Export the prompt encoder + mask decoder (and optionally the image encoder) to ONNX, "
                        "with segment_anything's scripts/export_onnx_model.py options. Needs "
                        "pip install 'sam-drop-in[onnx]'.",
        )
        add_export_arguments(p)
        p.set_defaults(func=run_export)

    try:
        from .distill.cli import register
    except Exception as exc:
        _lazy_command(sub, "distill", "train your own vit_t", exc)
    else:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``sam-drop-in`` command.

    Arguments:
      argv (sequence of str or None): arguments without the program name; default sys.argv[1:].

    Returns:
      (int): exit status: 0 success, 1 some image or the work failed, 2 bad input.
    """
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = os.environ.get("SAM_DROP_IN_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        if debug:
            raise
        _err(str(exc))
        return exc.code
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except (FileNotFoundError, ImportError) as exc:
        if debug:
            raise
        _err(f"{exc}")
        return EXIT_USAGE
    except Exception as exc:  # one line for the user; SAM_DROP_IN_DEBUG=1 shows the traceback
        if debug:
            raise
        _err(f"{type(exc).__name__}: {exc} (set SAM_DROP_IN_DEBUG=1 for the traceback)")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
