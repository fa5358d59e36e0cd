"""``sam-drop-in convert``: any supported checkpoint to a segment_anything-layout safetensors
folder (model.safetensors, config.json, README.md), optionally uploaded to the Hub."""

from __future__ import annotations

import argparse

from .._constants import REGISTRY_KEYS
from . import _common as c


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint to segment_anything-layout safetensors",
        description="Convert any supported checkpoint (segment_anything, MobileSAM, TinySAM or transformers "
                    "layout; safetensors or pickle) into a folder DST with model.safetensors, config.json and a "
                    "model card README.md.",
    )
    p.add_argument("src", help="Local file or hf://OWNER/REPO[@REV]/FILE.")
    p.add_argument("dst", help="Output folder.")
    p.add_argument("--model-type", choices=REGISTRY_KEYS, default=None, help="Require this model type.")
    p.add_argument("--push-to-hub", metavar="OWNER/REPO", default=None, help="Upload the folder to this Hub repo.")
    p.add_argument("--private", action="store_true", help="Create the Hub repo as private.")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import convert

    # CheckpointError (unreadable, another model type): status 2, from main.
    written = convert(c.checkpoint_source(args.src), args.dst, model_type=args.model_type, push_to_hub=args.push_to_hub,
                      private=args.private or None)
    print(f"wrote {written} (+ config.json, README.md)" + (f"; uploaded to {args.push_to_hub}" if args.push_to_hub else ""))
    return c.EXIT_OK
