"""What every ``sam-drop-in`` command shares: the error type and exit statuses, reading images,
writing outputs, the model options, device resolution, model loading, progress and the summary.

The model code, PIL and tqdm are imported inside the functions that use them, so building the
parser costs little beyond ``import sam_drop_in``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .._quantized_header import describe_quantized
from .._constants import MODEL_TYPES, REGISTRY_KEYS, normalize_model_type
from .._errors import CheckpointError, InputError
from .._fileio import atomic_write, json_default

PROG = "sam-drop-in"
RANDOM = "random"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line, user-facing error; ``code`` is the exit status (2 bad input, 1 failed work)."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ImageFailed(Exception):
    """One input image could not be processed; the run reports it and goes on with the others."""


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def warn(message: str) -> None:
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(paths: Sequence[str]) -> List[Path]:
    """Files named on the command line, with folders replaced by their image files.

    A folder contributes its (non-hidden) files whose suffix Pillow knows, sorted by name, not
    searched recursively (as upstream's scripts/amg.py). One file named by several paths
    (``img.png``, ``x/../img.png``, a symlink) is processed once, under the first name given.

    Raises:
      CliError: a path does not exist, a folder has no images, or two different files would
        write to the same output name.
    """
    out: Dict[Path, Path] = {}  # resolved file -> the path the user gave (first one wins)
    suffixes = None
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise CliError(f"no such file or directory: '{raw}'")
        if p.is_dir():
            if suffixes is None:
                from PIL import Image

                suffixes = {ext.lower() for ext in Image.registered_extensions()}
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                           and f.suffix.lower() in suffixes)
            if not found:
                raise CliError(f"directory '{raw}' contains no image files")
        else:
            found = [p]
        for f in found:
            out.setdefault(f.resolve(), f)
    seen: Dict[str, Path] = {}
    for p in out.values():
        if p.stem in seen:
            raise CliError(f"'{seen[p.stem]}' and '{p}' would both write output '{p.stem}'; "
                           "rename one or run them separately")
        seen[p.stem] = p
    return list(out.values())


def read_image(path: Path):
    """Decode an image file to HxWx3 uint8 RGB (EXIF orientation applied, as OpenCV does).

    Raises:
      ImageFailed: the file is not a readable image; the message names it.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except UnidentifiedImageError:
        raise ImageFailed(f"cannot read '{path}' as an image (not an image format Pillow knows)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageFailed(f"cannot read '{path}' as an image ({one_line(exc)})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageFailed(f"cannot read '{path}' as an image (empty image)")
    return np.ascontiguousarray(rgb)


def on_image(path: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``: the model's work on one input image. An image the model cannot
    take (too thin to resize, for one: InputError or ValueError) fails that image only."""
    try:
        return fn(*args, **kwargs)
    except (InputError, ValueError) as exc:
        raise ImageFailed(f"cannot segment '{path}': {one_line(exc)}") from None


def report_failure(message: str) -> None:
    from tqdm.auto import tqdm

    # tqdm.write keeps an active progress bar intact.
    tqdm.write(f"{PROG}: error: {one_line(message).rstrip('.')}; skipped", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Outputs (each file appears whole or not at all)


def write_json(obj: Any, path: Path, indent: Optional[int] = None) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, default=json_default, indent=indent)

    atomic_write(path, write)


def save_png(picture, path: Path) -> None:
    """Save a PIL image, or an HxW boolean mask as a 0/255 single-channel PNG (as upstream's
    ``cv2.imwrite(mask * 255)``)."""
    import numpy as np
    from PIL import Image

    if not isinstance(picture, Image.Image):
        picture = Image.fromarray(np.asarray(picture, dtype=np.uint8) * 255, mode="L")
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def clear_numbered_pngs(folder: Path, prefix: str = "") -> None:
    # A rerun into the same folder must not leave masks of an earlier run beside the new ones.
    for f in folder.glob(f"{prefix}*.png"):
        if f.stem[len(prefix):].isdigit():
            f.unlink()


# ---------------------------------------------------------------------------------------------
# Model


def add_model_options(p: argparse.ArgumentParser, output_default: Optional[str] = None) -> None:
    """--model-type, --checkpoint, --device; with ``output_default`` also --output,
    --no-overlay and --quiet (the image commands)."""
    g = p.add_argument_group("model and output")
    g.add_argument("--model-type", choices=REGISTRY_KEYS, default=None,
                   help="Model type (default: the checkpoint's own type; vit_t without --checkpoint).")
    g.add_argument("--checkpoint", default=None,
                   help="Weights: a local .pt/.pth/.safetensors file or hf://OWNER/REPO[@REV]/FILE. Default: the "
                        "manifest's checkpoint for the model type (downloaded once, then cached). 'random' builds "
                        "the model with random weights (meaningless masks; for trying the command and for tests).")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto).")
    if output_default is not None:
        g.add_argument("--output", default=output_default, help=f"Output folder (default: {output_default}).")
        g.add_argument("--no-overlay", action="store_true", help="Do not write overlay pictures.")
        g.add_argument("--quiet", "-q", action="store_true", help="No progress bars.")


def require(module: str, extra: str, why: str) -> None:
    """CliError (status 2) naming the extra to install when an optional package is missing."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise CliError(f"{why} needs the '{module}' package: pip install 'sam-drop-in[{extra}]'") from None


def resolve_device(name: str):
    """``torch.device`` for ``--device`` ("auto": cuda, else mps, else cpu); CliError when the
    name is unknown or the device is not on this machine."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CliError(f"unknown --device {name!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not mps_ok:
        raise CliError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def checkpoint_source(source: str) -> str:
    """``source`` (a local file or an ``hf://`` address) for ``convert`` and ``info``; CliError for
    a local file that does not exist. Quiets huggingface_hub's logging (see below)."""
    if not source.startswith("hf://") and not os.path.exists(source):
        raise CliError(f"no such file: '{source}'")
    quiet_hub_logging()
    return source


def quiet_hub_logging() -> None:
    # huggingface_hub logs every connection retry as a warning; the CLI reports the outcome
    # as one line instead.
    try:
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass


def load_model(model_type: Optional[str], checkpoint: Optional[str], device_name: str = "auto"):
    """Build and load the model for a command.

    Arguments:
      model_type (str or None): vit_t / vit_b / vit_l / vit_h / default; None means the
        checkpoint's own type (vit_t when no checkpoint is given).
      checkpoint (str or None): local path, ``hf://`` address, ``"random"`` (random weights,
        with a warning) or None (the manifest's default for the model type).
      device_name (str): torch device name or "auto".

    Returns:
      (tuple): (Sam in eval mode on the device, model type str, checkpoint description str).

    Raises:
      CliError: the checkpoint cannot be had, does not fit the model, or holds another model
        type (exit status 2).
    """
    requested = normalize_model_type(model_type)
    if requested is not None and requested not in MODEL_TYPES:
        raise CliError(f"unknown --model-type {model_type!r}; expected one of {', '.join(REGISTRY_KEYS)}")
    device = resolve_device(device_name)

    from ..build_sam import sam_model_registry

    if checkpoint == RANDOM:
        mt = requested or "vit_t"
        warn(f"--checkpoint random: the {mt} model has RANDOM weights and its masks are MEANINGLESS; "
             "use this only to try the command or in tests")
        return sam_model_registry[mt]().eval().to(device), mt, "random weights"

    from .. import checkpoint as ckpt_mod
    from .._layouts import detect_model_type

    defaulted = checkpoint is None
    if defaulted:
        checkpoint = ckpt_mod.default_checkpoint(requested or "vit_t")
    quiet_hub_logging()
    try:
        # A quantised model file (sam-drop-in quantize) names its type and the registry builds it
        # whole; float weights are read once, to learn their type, and loaded from that read.
        quantized = describe_quantized(ckpt_mod.resolve(checkpoint)[0])
        state_dict = None if quantized else ckpt_mod.load_state_dict(checkpoint)
        found = quantized["model_type"] if quantized else detect_model_type(state_dict)
        if requested is not None and found != requested:
            raise CliError(f"checkpoint '{checkpoint}' holds a {found} model but --model-type is {model_type}; "
                           f"pass --model-type {found} (or leave --model-type out: it is read from the checkpoint)")
        sam = sam_model_registry[found](checkpoint=checkpoint if quantized else None)
        if state_dict is not None:
            ckpt_mod.load_into(sam, state_dict)
    except CheckpointError as exc:
        if defaulted:
            raise CliError(
                f"no --checkpoint given, and the default {requested or 'vit_t'} checkpoint {checkpoint} could not be "
                f"loaded (not in the local Hugging Face cache and not downloadable now: {one_line(exc)[:200]}); "
                "pass --checkpoint PATH to a local .pt/.pth/.safetensors file (or --checkpoint random to try the "
                "command with meaningless random weights)"
            ) from None
        raise CliError(str(exc)) from None
    return sam.eval().to(device), found, str(checkpoint)


# ---------------------------------------------------------------------------------------------
# Progress and summary


def show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def progress(items: Sequence, args: argparse.Namespace, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="image", disable=not show_progress(args), file=sys.stderr)


def summary(command: str, n_images: int, n_failed: int, n_masks: int, seconds: float, output: Path) -> None:
    failed = f" ({n_failed} failed)" if n_failed else ""
    print(f"{command}: {n_images} image{'s' if n_images != 1 else ''}{failed}, {n_masks} mask"
          f"{'s' if n_masks != 1 else ''}, {seconds:.1f} s -> {output}")


def env_debug() -> bool:
    return os.environ.get("SAM_DROP_IN_DEBUG", "") not in ("", "0")
