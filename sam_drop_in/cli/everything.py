"""``sam-drop-in everything``: automatic mask generation with segment_anything's
scripts/amg.py options and output layout, plus TinySAM's hierarchical mode and an overlay."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Dict, List

from .._errors import InputError
from .._fileio import atomic_write
from .._validation import AMG_OPTIONS
from . import _common as c
from ._common import CliError

# segment_anything's scripts/amg.py writes exactly this header (and no trailing newline).
METADATA_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "everything", help="every object in the image (automatic mask generation)",
        description="Automatic mask generation with segment_anything's scripts/amg.py options and output layout: "
                    "OUTPUT/NAME/{0,1,...}.png plus OUTPUT/NAME/metadata.csv, or OUTPUT/NAME.json (COCO RLE) with "
                    "--convert-to-rle; plus OUTPUT/NAME.overlay.png with every mask. An image that cannot be read "
                    "or segmented is reported and skipped; the exit status is then 1.",
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
    for name, typ, _, help_text in AMG_OPTIONS:
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)
    c.add_model_options(p, "sam_output/everything")


def _amg_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The generator's keyword arguments for the options given; CliError (naming the flag)
    for a value outside its range."""
    out = {}
    for key, typ, (low, high, high_included), _ in AMG_OPTIONS:
        flag = "--" + key.replace("_", "-")
        value = getattr(args, key)
        if value is None:
            continue
        ok = math.isfinite(value) and value >= low
        if high is not None:
            ok = ok and (value <= high if high_included else value < high)
        if not ok:
            kind = "a whole number" if typ is int else "a number"
            span = f">= {low}" if high is None else f"in [{low}, {high}{']' if high_included else ')'}"
            raise CliError(f"{flag} must be {kind} {span}, got {value:g}")
        out[key] = value
    if args.high_score_thresh is not None:
        if not args.hierarchical:
            raise CliError("--high-score-thresh applies to --hierarchical only")
        if not math.isfinite(args.high_score_thresh):
            raise CliError(f"--high-score-thresh must be a finite number, got {args.high_score_thresh:g}")
        out["high_score_thresh"] = args.high_score_thresh
    return out


def write_masks_to_folder(records: List[Dict[str, Any]], folder: Path) -> None:
    """Upstream scripts/amg.py's folder layout: ``{i}.png`` per mask (0/255) and metadata.csv.

    Arguments:
      records (list of dict): generator records with binary (HxW bool) segmentations.
      folder (Path): created if missing; earlier ``{i}.png`` files in it are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    c.clear_numbered_pngs(folder)
    rows = [METADATA_HEADER]
    for i, rec in enumerate(records):
        c.save_png(rec["segmentation"], folder / f"{i}.png")
        row = [i, rec["area"], *rec["bbox"], *rec["point_coords"][0], rec["predicted_iou"],
               rec["stability_score"], *rec["crop_box"]]
        rows.append(",".join(map(str, row)))
    text = "\n".join(rows)
    atomic_write(folder / "metadata.csv", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    amg_kwargs = _amg_kwargs(args)
    if args.hierarchical and args.crop_n_layers:
        raise CliError("--hierarchical works on the whole image; leave out --crop-n-layers")
    inputs = c.expand_inputs(list(args.images) + list(args.input or []))
    if not inputs:
        raise CliError("everything needs at least one IMAGE or directory")
    if args.convert_to_rle:
        c.require("pycocotools", "amg", "--convert-to-rle")
    if args.min_mask_region_area:
        c.require("cv2", "amg", "--min-mask-region-area")
    out_root = Path(args.output)

    sam, _, _ = c.load_model(args.model_type, args.checkpoint, args.device)
    from .. import _viz

    if args.hierarchical:
        from ..hierarchical_mask_generator import SamHierarchicalMaskGenerator as Generator
    else:
        from ..automatic_mask_generator import SamAutomaticMaskGenerator as Generator
    output_mode = "coco_rle" if args.convert_to_rle else "binary_mask"
    try:
        generator = Generator(sam, output_mode=output_mode, progress=c.show_progress(args), **amg_kwargs)
    except (InputError, ValueError, TypeError) as exc:
        raise CliError(str(exc)) from None

    out_root.mkdir(parents=True, exist_ok=True)
    n_masks = n_failed = 0
    for path in c.progress(inputs, args, "everything"):
        try:
            image = c.read_image(path)
            records = c.on_image(path, generator.generate, image)
        except c.ImageFailed as exc:
            c.report_failure(str(exc))
            n_failed += 1
            continue
        if args.convert_to_rle:
            c.write_json(records, out_root / f"{path.stem}.json")
            if not args.no_overlay:
                from pycocotools import mask as mask_utils

                masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
        else:
            write_masks_to_folder(records, out_root / path.stem)
            masks = [r["segmentation"] for r in records]
        if not args.no_overlay:
            caption = f"{len(records)} masks" + (" (hierarchical)" if args.hierarchical else "")
            c.save_png(_viz.everything_overlay(image, masks, caption=caption), out_root / f"{path.stem}.overlay.png")
        n_masks += len(records)
    c.summary("everything", len(inputs), n_failed, n_masks, time.perf_counter() - t0, out_root)
    return c.EXIT_FAILED if n_failed else c.EXIT_OK
