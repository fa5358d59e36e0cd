"""TinySAM's hierarchical everything mode next to the full grid: time, masks, and agreement.

    python examples/hierarchical_vs_grid.py --checkpoint mobile_sam.pt
    python examples/hierarchical_vs_grid.py --checkpoint tinysam.pth --image photo.jpg --points-per-side 32

The hierarchical generator decodes a sparse grid (points_per_side / 4 per side) first, then
only those dense-grid points that no confident mask covers yet. It takes the standard
generator's arguments, so switching is one class name. Writes OUTPUT/side_by_side.png (full
grid left, hierarchical right) and OUTPUT/summary.json: mask counts, seconds, prompts decoded,
and recall (the share of full-grid masks that a hierarchical mask matches at IoU >= 0.5).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam_drop_in import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator, sam_model_registry
from sam_drop_in._viz import everything_overlay, side_by_side

HERE = Path(__file__).resolve().parent


class PromptCounter:
    """Counts the prompts the mask decoder decodes (the cost the hierarchical mode saves),
    with a forward pre-hook on its two-way transformer, which every decoded prompt goes
    through; the model itself is untouched."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.prompts = 0
        decoder.transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        tokens = kwargs.get("point_embedding", args[2] if len(args) > 2 else None)
        self.prompts += int(tokens.shape[0])


def matched_share(reference, candidates, thresh: float = 0.5) -> float:
    """Share of reference masks that some candidate mask overlaps with IoU >= thresh."""
    if not reference:
        return 1.0
    if not candidates:
        return 0.0
    cand = np.stack([c.reshape(-1) for c in candidates]).astype(np.float32)  # K x HW
    hits = 0
    for r in reference:
        r = r.reshape(-1).astype(np.float32)
        inter = cand @ r
        union = cand.sum(1) + r.sum() - inter
        hits += bool(np.any(inter / np.maximum(union, 1) >= thresh))
    return hits / len(reference)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="Weights (local file or hf://...); omit for random weights.")
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--image", default=str(HERE / "images" / "coffee.jpg"))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="out/hierarchical")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        print("warning: no --checkpoint: random weights, the masks are meaningless", file=sys.stderr)
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint).to(args.device)
    counter = PromptCounter(sam.mask_decoder)
    image = np.asarray(Image.open(args.image).convert("RGB"))
    settings = dict(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                    stability_score_thresh=args.stability_score_thresh)

    results = {}
    for name, cls in (("grid", SamAutomaticMaskGenerator), ("hierarchical", SamHierarchicalMaskGenerator)):
        counter.prompts = 0
        t0 = time.perf_counter()
        records = cls(sam, **settings).generate(image)
        results[name] = {"records": records, "seconds": time.perf_counter() - t0, "prompts": counter.prompts}

    grid = [r["segmentation"] for r in results["grid"]["records"]]
    hier = [r["segmentation"] for r in results["hierarchical"]["records"]]
    summary = {
        name: {"masks": len(r["records"]), "seconds": round(r["seconds"], 3), "prompts_decoded": r["prompts"]}
        for name, r in results.items()
    }
    summary["recall_of_grid_masks_at_iou_0.5"] = matched_share(grid, hier)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    side_by_side([
        everything_overlay(image, grid, caption=f"grid: {len(grid)} masks, {results['grid']['prompts']} prompts"),
        everything_overlay(image, hier, caption=f"hierarchical: {len(hier)} masks, "
                                                f"{results['hierarchical']['prompts']} prompts"),
    ]).save(out / "side_by_side.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name in ("grid", "hierarchical"):
        s = summary[name]
        print(f"{name:>12}: {s['masks']} masks, {s['prompts_decoded']} prompts decoded, {s['seconds']:.2f} s")
    print(f"hierarchical finds {100 * summary['recall_of_grid_masks_at_iou_0.5']:.0f}% of the grid's masks "
          f"(IoU >= 0.5) -> {out}/side_by_side.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
