"""Everything mode: every object in a picture, drawn in its own colour.

    python examples/everything_overlay.py --checkpoint mobile_sam.pt
    python examples/everything_overlay.py --checkpoint mobile_sam.pt --image photo.jpg --points-per-side 32

The same SamAutomaticMaskGenerator call as segment_anything (same arguments, same records);
`progress=True` is a sam_drop_in addition. Writes OUTPUT/overlay.png and OUTPUT/masks.json
(the records' metadata, without the pixel masks).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam_drop_in import SamAutomaticMaskGenerator, sam_model_registry
from sam_drop_in._viz import everything_overlay

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="Weights (local file or hf://...); omit for random weights.")
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--image", default=str(HERE / "images" / "chelsea.jpg"))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--box-nms-thresh", type=float, default=0.7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="out/everything")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        print("warning: no --checkpoint: random weights, the masks are meaningless "
              "(lower --pred-iou-thresh and --stability-score-thresh to see any)", file=sys.stderr)
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint).to(args.device)
    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        progress=sys.stderr.isatty(),
    )
    image = np.asarray(Image.open(args.image).convert("RGB"))
    t0 = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - t0

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    everything_overlay(image, [r["segmentation"] for r in records], caption=f"{len(records)} masks").save(
        out / "overlay.png")
    meta = [{k: v for k, v in r.items() if k != "segmentation"} for r in records]
    (out / "masks.json").write_text(json.dumps(meta, indent=2))
    print(f"{len(records)} masks in {seconds:.1f} s ({args.points_per_side}x{args.points_per_side} grid) "
          f"-> {out}/overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
