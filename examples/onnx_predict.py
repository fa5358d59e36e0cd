"""Segment a photograph with ONNX Runtime only (no PyTorch at prediction time).

Step 1, once, where sam-drop-in and torch are installed (writes the two ONNX files):

    sam-drop-in export-onnx --checkpoint hf://dhkim2810/MobileSAM/mobile_sam.pt --model-type vit_t \
        --output decoder.onnx --encoder-output encoder.onnx

Step 2, anywhere with numpy, pillow and onnxruntime:

    python examples/onnx_predict.py --encoder encoder.onnx --decoder decoder.onnx

Without --encoder/--decoder this script runs step 1 itself first (needs torch), from
--checkpoint or, if none is given, from random weights (the masks are then meaningless, but
every step runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def export_if_needed(args) -> tuple[str, str]:
    if args.encoder and args.decoder:
        return args.encoder, args.decoder
    from sam_drop_in import sam_model_registry
    from sam_drop_in.onnx_export import export_decoder, export_encoder

    if args.checkpoint is None:
        print("No --checkpoint: exporting a randomly initialised vit_t (masks will be noise).")
    model = sam_model_registry["vit_t"](checkpoint=args.checkpoint)
    folder = tempfile.mkdtemp(prefix="sam_drop_in_onnx_")
    encoder, decoder = os.path.join(folder, "encoder.onnx"), os.path.join(folder, "decoder.onnx")
    export_encoder(model, encoder)
    export_decoder(model, decoder)
    print(f"Exported {encoder} and {decoder}")
    return encoder, decoder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", help="encoder ONNX file (from export-onnx --encoder-output)")
    parser.add_argument("--decoder", help="decoder ONNX file (from export-onnx --output)")
    parser.add_argument("--checkpoint", default=None, help="vit_t checkpoint, used only when exporting here")
    parser.add_argument("--image", default=str(HERE / "images" / "chelsea.jpg"))
    parser.add_argument("--out", default="onnx_mask.png", help="where to write the mask overlay")
    args = parser.parse_args(argv)

    encoder, decoder = export_if_needed(args)
    from sam_drop_in.onnx_predictor import SamOnnxPredictor

    image = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = image.shape[:2]
    predictor = SamOnnxPredictor(encoder, decoder)
    predictor.set_image(image)

    # One foreground click in the middle: three candidate masks, keep the best scored.
    masks, scores, _ = predictor.predict(point_coords=np.array([[w // 2, h // 2]]), point_labels=np.array([1]))
    best = int(np.argmax(scores))
    print(f"point prompt: masks {masks.shape} {masks.dtype}, scores {np.round(scores, 3).tolist()}, best {best}")
    # A box (XYXY pixels) around the centre, single mask.
    box = np.array([w // 4, h // 4, 3 * w // 4, 3 * h // 4])
    box_mask, box_score, _ = predictor.predict(box=box, multimask_output=False)
    print(f"box prompt: mask {box_mask.shape}, score {float(box_score[0]):.3f}, area {int(box_mask.sum())} px")

    overlay = image.astype(np.float32)
    overlay[masks[best]] = 0.5 * overlay[masks[best]] + 0.5 * np.array([30, 144, 255])
    Image.fromarray(overlay.astype(np.uint8)).save(args.out)
    print(f"overlay written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
