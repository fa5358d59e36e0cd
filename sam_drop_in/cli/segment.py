"""``sam-drop-in segment``: masks from point and box prompts, per image a folder with one PNG
per mask, ``scores.json`` and ``overlay.png``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import List, Tuple

from . import _common as c
from ._common import CliError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="masks from point and box prompts",
        description="Segment objects from point and box prompts. Per image writes OUTPUT/NAME/mask_I.png "
                    "(0/255), OUTPUT/NAME/scores.json and OUTPUT/NAME/overlay.png (the best mask per prompt, "
                    "the prompts and the scores). All points together with one box form one prompt; several "
                    "boxes form one prompt each (with the points added to every box). An image that cannot be "
                    "read or segmented is reported and skipped; the exit status is then 1.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="Image files or folders of images.")
    p.add_argument("--point", action="append", metavar="X,Y[,LABEL]",
                   help="A click in pixels; LABEL 1 = foreground (default), 0 = background. Repeatable.")
    p.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1",
                   help="A box in pixels (top-left, bottom-right corners). Repeatable: one prompt per box.")
    p.add_argument("--multimask", action="store_true",
                   help="Return SAM's three candidate masks per prompt instead of one.")
    c.add_model_options(p, "sam_output/segment")


def _numbers(text: str, counts: Tuple[int, ...], hint: str) -> List[float]:
    """The comma-separated finite numbers of an option value; CliError(hint) otherwise."""
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise CliError(hint) from None
    if len(values) not in counts or not all(math.isfinite(v) for v in values):
        raise CliError(hint)
    return values


def parse_point(text: str) -> Tuple[float, float, int]:
    """Parse ``X,Y`` or ``X,Y,LABEL`` (pixels; LABEL 1 = foreground, 0 = background).

    Returns:
      (tuple): (x, y, label) with x, y float pixel coordinates and label int 0 or 1.

    Raises:
      CliError: malformed value (exit status 2).
    """
    hint = (f"bad --point {text!r}: expected X,Y or X,Y,LABEL (pixel coordinates; LABEL 1 = foreground, "
            "0 = background), e.g. --point 250,180 or --point 250,180,0")
    x, y, *label = _numbers(text, (2, 3), hint)
    if label not in ([], [0], [1]):
        raise CliError(hint)
    return x, y, int(label[0]) if label else 1


def parse_box(text: str) -> Tuple[float, float, float, float]:
    """Parse ``X0,Y0,X1,Y1`` (pixels, top-left and bottom-right corners).

    Returns:
      (tuple): (x0, y0, x1, y1) floats with x0 < x1 and y0 < y1.

    Raises:
      CliError: malformed value (exit status 2).
    """
    hint = (f"bad --box {text!r}: expected X0,Y0,X1,Y1 (pixel corners, top-left then bottom-right, "
            "X0 < X1 and Y0 < Y1), e.g. --box 100,50,400,300")
    x0, y0, x1, y1 = _numbers(text, (4,), hint)
    if x0 >= x1 or y0 >= y1:
        raise CliError(hint)
    return x0, y0, x1, y1


def _check_prompts_inside(points, boxes, width: int, height: int, path: Path) -> None:
    for x, y, _ in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise c.ImageFailed(f"--point {x:g},{y:g} lies outside '{path}' ({width}x{height})")
    for x0, y0, x1, y1 in boxes:
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise c.ImageFailed(f"--box {x0:g},{y0:g},{x1:g},{y1:g} lies outside '{path}' ({width}x{height})")


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


def _write(path: Path, folder: Path, image, masks, scores, points, boxes, args, model_type: str, ckpt: str) -> int:
    """Write one image's masks, scores.json and overlay; returns the number of masks."""
    import numpy as np

    from .. import _viz

    folder.mkdir(parents=True, exist_ok=True)
    c.clear_numbered_pngs(folder, "mask_")
    records: List[dict] = []
    best_masks, best_scores = [], []
    for p in range(masks.shape[0]):
        best = int(np.argmax(scores[p]))
        for k in range(masks.shape[1]):
            i = len(records)
            m = masks[p, k]
            c.save_png(m, folder / f"mask_{i}.png")
            ys, xs = np.nonzero(m)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] \
                if len(xs) else [0, 0, 0, 0]
            records.append({"file": f"mask_{i}.png", "prompt": p, "score": float(scores[p, k]),
                            "area": int(m.sum()), "bbox": bbox, "best": k == best})
        best_masks.append(masks[p, best])
        best_scores.append(float(scores[p, best]))
    h, w = image.shape[:2]
    prompts = [{"points": [[x, y] for x, y, _ in points], "labels": [lab for _, _, lab in points],
                "box": list(b) if b is not None else None}
               for b in (boxes if boxes else [None])]
    c.write_json({"image": str(path), "width": w, "height": h, "model_type": model_type, "checkpoint": ckpt,
                  "multimask": bool(args.multimask), "prompts": prompts, "masks": records},
                 folder / "scores.json", indent=2)
    if not args.no_overlay:
        overlay = _viz.prompt_overlay(image, best_masks, best_scores, points=[(x, y) for x, y, _ in points],
                                      labels=[lab for _, _, lab in points], boxes=boxes)
        c.save_png(overlay, folder / "overlay.png")
    return len(records)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    points = [parse_point(p) for p in args.point or []]
    boxes = [parse_box(b) for b in args.box or []]
    if not points and not boxes:
        raise CliError("segment needs at least one prompt: --point X,Y[,LABEL] and/or --box X0,Y0,X1,Y1")
    inputs = c.expand_inputs(args.images)
    out_root = Path(args.output)

    sam, model_type, ckpt_desc = c.load_model(args.model_type, args.checkpoint, args.device)
    from ..predictor import SamPredictor

    predictor = SamPredictor(sam)
    n_masks = n_failed = 0
    for path in c.progress(inputs, args, "segment"):
        try:
            image = c.read_image(path)
            _check_prompts_inside(points, boxes, image.shape[1], image.shape[0], path)
            c.on_image(path, predictor.set_image, image)
        except c.ImageFailed as exc:
            c.report_failure(str(exc))
            n_failed += 1
            continue
        masks, scores = _predict(predictor, image, points, boxes, args.multimask)
        n_masks += _write(path, out_root / path.stem, image, masks, scores, points, boxes, args, model_type,
                          ckpt_desc)
    c.summary("segment", len(inputs), n_failed, n_masks, time.perf_counter() - t0, out_root)
    return c.EXIT_FAILED if n_failed else c.EXIT_OK
