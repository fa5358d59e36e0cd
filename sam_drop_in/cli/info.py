"""``sam-drop-in info``: describe a checkpoint without building a model."""

from __future__ import annotations

import argparse
import json

from . import _common as c


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe a checkpoint (model type, layout, parameters, sha256)",
                              description="Describe a checkpoint without building a model.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="Local file or hf://OWNER/REPO[@REV]/FILE.")
    p.add_argument("--json", action="store_true", help="Print the description as JSON.")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import inspect_checkpoint

    info = inspect_checkpoint(c.checkpoint_source(args.checkpoint))  # CheckpointError: status 2, from main
    if args.json:
        print(json.dumps(info, indent=2))
        return c.EXIT_OK
    rows = [
        ("model type", info.get("model_type") or "unknown (not a standard SAM model)"),
        ("layout", info.get("layout")),
        ("format", info.get("format")),
        ("quantized", info.get("quantized")),
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
    return c.EXIT_OK
