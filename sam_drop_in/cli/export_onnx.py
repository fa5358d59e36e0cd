"""``sam-drop-in export-onnx``: the prompt encoder + mask decoder (and optionally the image
encoder) to ONNX, with the options of segment_anything's scripts/export_onnx_model.py."""

from __future__ import annotations

import argparse

from .._constants import REGISTRY_KEYS
from . import _common as c
from ._common import CliError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-onnx", help="export the decoder (and encoder) to ONNX",
        description="Export the prompt encoder + mask decoder (and optionally the image encoder) to ONNX, "
                    "with segment_anything's scripts/export_onnx_model.py options. Needs "
                    "pip install 'sam-drop-in[onnx]'.",
    )
    p.add_argument("--checkpoint", required=True,
                   help="Weights: a local file, hf://OWNER/REPO[@REVISION]/PATH, or 'random' (random weights, "
                        "meaningless masks; for trying the command and for tests).")
    p.add_argument("--output", required=True,
                   help="Where to write the decoder (prompt encoder + mask decoder) ONNX model.")
    p.add_argument("--model-type", required=True, choices=REGISTRY_KEYS, help="The checkpoint's model type.")
    p.add_argument("--return-single-mask", action="store_true",
                   help="Output only the best mask instead of all four; faster for large images. "
                        "The ONNX predictor needs the default (all masks).")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version, >= 16 (16 and 17 are tested).")
    p.add_argument("--quantize-out", default=None,
                   help="Also write an int8 dynamically quantised decoder here (onnxruntime quantize_dynamic).")
    p.add_argument("--gelu-approximate", action="store_true",
                   help="Use the tanh approximation of GELU, for runtimes without a fast Erf.")
    p.add_argument("--use-stability-score", action="store_true",
                   help="Output the stability score of the low-resolution masks (offset 1.0) "
                        "instead of the predicted IoU.")
    p.add_argument("--return-extra-metrics", action="store_true",
                   help="Output (masks, scores, stability_scores, areas, low_res_masks).")
    p.add_argument("--encoder-output", default=None, help="Also export the image encoder to this ONNX file.")
    p.add_argument("--encoder-without-preprocessing", action="store_true",
                   help="Encoder input is a normalised, padded Bx3x1024x1024 tensor instead of "
                        "an HxWx3 RGB float image resized to long side 1024.")
    p.add_argument("--quantize-encoder-out", default=None,
                   help="Also write an int8 dynamically quantised encoder here (needs --encoder-output).")


def run(args: argparse.Namespace) -> int:
    if args.quantize_encoder_out and not args.encoder_output:
        raise CliError("--quantize-encoder-out needs --encoder-output")
    for module in ("onnx", "onnxruntime"):
        c.require(module, "onnx", "export-onnx")
    from ..onnx_export import MIN_OPSET, export_decoder, export_encoder

    if args.opset < MIN_OPSET:
        raise CliError(f"--opset must be >= {MIN_OPSET} (16 and 17 are tested), got {args.opset}")
    # The export runs on a float32 CPU copy whatever the device; build the model there.
    model, model_type, described = c.load_model(args.model_type, args.checkpoint, "cpu")
    print(f"Exporting the {model_type} decoder ({described}) to {args.output} (opset {args.opset})...")
    report = export_decoder(model, args.output, opset=args.opset, return_single_mask=args.return_single_mask,
                            gelu_approximate=args.gelu_approximate, use_stability_score=args.use_stability_score,
                            return_extra_metrics=args.return_extra_metrics, quantize_out=args.quantize_out)
    if report.get("agreement"):
        print(f"Quantised decoder written to {args.quantize_out}; agreement with float: {report['agreement']}")
    if args.encoder_output:
        print(f"Exporting the encoder to {args.encoder_output}...")
        report = export_encoder(model, args.encoder_output, opset=args.opset,
                                include_preprocessing=not args.encoder_without_preprocessing,
                                quantize_out=args.quantize_encoder_out)
        if report.get("agreement"):
            print(f"Quantised encoder written to {args.quantize_encoder_out}; agreement with float: "
                  f"{report['agreement']}")
    print("Done.")
    return c.EXIT_OK
