"""The one-import migration: the same code against segment_anything, MobileSAM and sam_drop_in.

    python examples/migrate_from_segment_anything.py --impl sam_drop_in --checkpoint mobile_sam.pt
    python examples/migrate_from_segment_anything.py --impl sam_drop_in,mobile_sam --checkpoint mobile_sam.pt
    python examples/migrate_from_segment_anything.py --impl sam_drop_in,segment_anything \
        --model-type vit_b --checkpoint sam_vit_b_01ec64.pth

Everything in `segment()` below is ordinary segment_anything code. The only line that changes
between implementations is the import in `import_impl()`:

    from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
    from sam_drop_in import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

With two or more implementations and one checkpoint, the script runs each in turn and prints
how far their results agree (mask IoU, score difference, number of everything-mode masks).
segment_anything has no vit_t: compare vit_t with MobileSAM's `mobile_sam` package, which
shares segment_anything's API. The checkpoint must be a file the reference can read
(a .pt/.pth state dict; sam_drop_in also reads .safetensors and hf:// addresses). Without
--checkpoint every implementation gets its own random weights, and there is nothing to compare.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def import_impl(name: str):
    """The single line a migration changes, made switchable for the side-by-side run."""
    module = importlib.import_module(name)  # "segment_anything", "mobile_sam" or "sam_drop_in"
    return module.sam_model_registry, module.SamPredictor, module.SamAutomaticMaskGenerator


def segment(impl: str, args) -> dict:
    sam_model_registry, SamPredictor, SamAutomaticMaskGenerator = import_impl(impl)

    # ---- from here on: unchanged segment_anything code --------------------------------------
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
    sam.to(device=args.device)
    # MobileSAM's reference rebuilds an attention-bias cache only when the train/eval mode
    # changes and loads the weights after its builder called eval(): a second eval() makes its
    # outputs right. It does nothing to segment_anything or sam_drop_in.
    sam.eval()
    predictor = SamPredictor(sam)

    image = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = image.shape[:2]
    t0 = time.perf_counter()
    predictor.set_image(image)
    t_encode = time.perf_counter() - t0

    point = np.array([[w * 0.5, h * 0.5]])
    masks, scores, logits = predictor.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    box = np.array([w * 0.2, h * 0.2, w * 0.8, h * 0.8])
    box_masks, box_scores, _ = predictor.predict(box=box, multimask_output=False)

    records, t_everything = [], 0.0
    if args.points_per_side > 0:
        generator = SamAutomaticMaskGenerator(
            sam,
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
        )
        t0 = time.perf_counter()
        records = generator.generate(image)
        t_everything = time.perf_counter() - t0
    # ---- end of the unchanged code -----------------------------------------------------------

    return {
        "masks": masks, "scores": scores, "box_mask": box_masks[0], "box_score": float(box_scores[0]),
        "records": records, "encode_s": t_encode, "everything_s": t_everything,
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="sam_drop_in",
                        help="Comma-separated: sam_drop_in, segment_anything, mobile_sam (default: sam_drop_in).")
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--checkpoint", default=None, help="Weights file (omit for random weights).")
    parser.add_argument("--image", default=str(HERE / "images" / "astronaut.jpg"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--points-per-side", type=int, default=16,
                        help="Grid of the everything-mode run (0 skips it).")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--output", default="out/migrate", help="Folder for summary.json and masks.")
    args = parser.parse_args(argv)

    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    for name in impls:
        if name == "segment_anything" and args.model_type == "vit_t":
            parser.error("segment_anything has no vit_t; use --impl mobile_sam for the vit_t reference, "
                         "or --model-type vit_b/vit_l/vit_h with a SAM checkpoint")
        try:
            importlib.import_module(name)
        except ImportError:
            parser.error(f"cannot import {name!r}: pip install 'sam-drop-in[compat]' for the reference packages")
    if args.checkpoint is None:
        print("warning: no --checkpoint: random weights, meaningless masks; with several --impl values "
              "each gets different random weights", file=sys.stderr)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in impls:
        r = segment(name, args)
        results[name] = r
        best = int(np.argmax(r["scores"]))
        Image.fromarray(r["masks"][best].astype(np.uint8) * 255).save(out / f"{name}_point_mask.png")
        print(f"{name:>17}: encode {r['encode_s']:.2f} s, everything {r['everything_s']:.2f} s "
              f"({len(r['records'])} masks), point scores {', '.join(f'{v:.3f}' for v in r['scores'])}, "
              f"box score {r['box_score']:.3f}")

    summary = {"impls": impls, "model_type": args.model_type, "checkpoint": args.checkpoint,
               "timings": {n: {"encode_s": r["encode_s"], "everything_s": r["everything_s"]} for n, r in results.items()},
               "num_everything_masks": {n: len(r["records"]) for n, r in results.items()}}
    if len(impls) > 1:
        ref = results[impls[0]]
        summary["agreement"] = {}
        for name in impls[1:]:
            r = results[name]
            agree = {
                "point_mask_iou_min": min(iou(a, b) for a, b in zip(ref["masks"], r["masks"])),
                "point_score_max_abs_diff": float(np.max(np.abs(ref["scores"] - r["scores"]))),
                "box_mask_iou": iou(ref["box_mask"], r["box_mask"]),
            }
            summary["agreement"][f"{impls[0]} vs {name}"] = agree
            print(f"{impls[0]} vs {name}: point-mask IoU >= {agree['point_mask_iou_min']:.4f}, "
                  f"score diff <= {agree['point_score_max_abs_diff']:.2e}, box-mask IoU {agree['box_mask_iou']:.4f}, "
                  f"everything masks {len(ref['records'])} vs {len(r['records'])}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
