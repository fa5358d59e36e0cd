"""``sam-drop-in quantize``: calibrate a model's image encoder on a few images (simulated W8A8 or
W6A6, sam_drop_in.quantization) and write one safetensors file that
``sam_model_registry[...](checkpoint=...)`` loads back as the quantised model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import _common as c
from ._common import CliError

_BITS_TO_RECIPE = {8: "w8a8", 6: "w6a6"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", help="post-training quantisation of the image encoder (W8A8/W6A6) into one file",
        description="Calibrate the image encoder's quantisation on a few images (per-channel weight scales and "
                    "per-tensor activation ranges searched by output MSE; see docs/quantization.md) and write the "
                    "quantised encoder with the float prompt encoder and mask decoder to one safetensors file. "
                    "Load it with sam_model_registry[MODEL_TYPE](checkpoint=FILE) or --checkpoint FILE.",
    )
    c.add_model_options(p)
    p.add_argument("--calib", nargs="+", metavar="DIR_OR_IMAGE", default=None,
                   help="Calibration images: folders (their image files) and/or image files; a handful of "
                        "photographs like the ones the model will see.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, choices=sorted(_BITS_TO_RECIPE), default=None,
                   help="Weight and activation bits: 8 (w8a8, the default; with --from-qtinysam: the released "
                        "file's bits) or 6 (w6a6).")
    g.add_argument("--recipe", choices=sorted(_BITS_TO_RECIPE.values()), default=None,
                   help="Recipe name, the same as --bits: w8a8 or w6a6.")
    p.add_argument("--search-rows", type=int, default=None, metavar="N",
                   help="Calibration rows kept per layer for the search (default 4096). Fewer is faster and "
                        "rougher.")
    p.add_argument("--from-qtinysam", metavar="FILE", default=None,
                   help="Take the float weights from TinySAM's released Q-TinySAM file (read safely: no code in "
                        "it runs) instead of --checkpoint; the released intervals are kept in the output's "
                        "metadata, the quantisation is calibrated on --calib. See docs/quantization.md.")
    p.add_argument("--output", required=True, metavar="FILE", help="The quantised model file (.safetensors).")
    p.add_argument("--quiet", "-q", action="store_true", help="No progress output.")


def _recipe(args: argparse.Namespace, released_name=None):
    """The recipe asked for (--bits/--recipe), else the released file's bits, else w8a8."""
    import dataclasses

    from ..quantization import get_recipe

    name = args.recipe or (_BITS_TO_RECIPE[args.bits] if args.bits else None) or released_name or "w8a8"
    recipe = get_recipe(name)
    if args.search_rows is not None:
        recipe = dataclasses.replace(recipe, max_search_rows=args.search_rows)
    return recipe


def _output(raw: str) -> Path:
    out = Path(raw)
    if out.is_dir():
        raise CliError(f"--output '{raw}' is a directory; give a file name such as '{raw.rstrip('/')}/model_w8a8.safetensors'")
    if not out.parent.is_dir():
        raise CliError(f"--output '{raw}': folder '{out.parent}' does not exist; create it first")
    return out


def _calibration_images(paths):
    if not paths:
        raise CliError("--calib is required: a folder of images (or image files) to calibrate on")
    arrays = []
    for path in c.expand_inputs(paths):
        try:
            arrays.append(c.read_image(path))
        except c.ImageFailed as exc:
            # Every calibration image counts: stop rather than calibrate on fewer than asked.
            raise CliError(f"{exc}; remove it from the calibration images") from None
    return arrays


def _model(args: argparse.Namespace):
    """(float Sam, model type, description of the weights' source, the QTinySAM read or None)."""
    if args.from_qtinysam is None:
        return (*c.load_model(args.model_type, args.checkpoint, args.device), None)
    if args.checkpoint is not None:
        raise CliError("--from-qtinysam and --checkpoint both name the weights; give one")
    from ..build_sam import sam_model_registry
    from ..quantization.qtinysam import read_qtinysam

    if not Path(args.from_qtinysam).is_file():
        raise CliError(f"no such file: '{args.from_qtinysam}'")
    released = read_qtinysam(args.from_qtinysam)  # UnsafeCheckpointError/CheckpointError: status 2
    if args.model_type not in (None, "vit_t"):
        raise CliError(f"Q-TinySAM is a vit_t model; --model-type is {args.model_type}")
    sam = sam_model_registry["vit_t"]()
    released.load_into(sam)
    return sam.eval().to(c.resolve_device(args.device)), "vit_t", f"Q-TinySAM {args.from_qtinysam}", released


def run(args: argparse.Namespace) -> int:
    if args.search_rows is not None and args.search_rows < 1:
        raise CliError(f"--search-rows must be at least 1, got {args.search_rows}")
    out = _output(args.output)
    arrays = _calibration_images(args.calib)
    sam, model_type, source, released = _model(args)
    if hasattr(sam.image_encoder, "recipe"):
        raise CliError(f"'{args.checkpoint}' is already quantised ({sam.image_encoder.recipe.name}); pass the float "
                       "checkpoint it was made from")
    recipe = _recipe(args, released.recipe_name() if released is not None else None)
    extra = released.metadata() if released is not None else None

    from ..quantization import calibrate, save_quantized

    started = time.perf_counter()
    if not args.quiet:
        print(f"quantize: calibrating {model_type} ({source}) as {recipe.name} on {len(arrays)} image"
              f"{'s' if len(arrays) != 1 else ''}...", flush=True)
    try:
        sam.image_encoder = calibrate(sam, arrays, recipe)
    except TypeError as exc:  # an encoder the quantisation does not know
        raise CliError(f"cannot quantise the {model_type} image encoder: {exc}") from None
    if released is not None:
        # The released parameters our format expresses replace the calibrated ones.
        applied = released.apply_to(sam.image_encoder)
        extra["qtinysam_applied"] = json.dumps(applied, sort_keys=True)
        if not args.quiet:
            used = sum(v.startswith("applied") for v in applied.values())
            print(f"quantize: Q-TinySAM's released parameters applied to {used} of its {len(applied)} quantised layers "
                  "(the rest calibrated; see the file's qtinysam_applied metadata)", flush=True)
    save_quantized(sam, out, extra_metadata=extra)  # atomic: the old file or the whole new one
    size = out.stat().st_size
    print(f"quantize: {model_type} {recipe.name}, {len(arrays)} calibration image{'s' if len(arrays) != 1 else ''}, "
          f"{time.perf_counter() - started:.1f} s -> {out} ({size / 2**20:.1f} MiB)")
    return c.EXIT_OK
