"""Grounded-SAM style: boxes from a detector (or a JSON file) -> one mask per box, in one batch.

    python examples/grounded_sam_boxes.py --checkpoint mobile_sam.pt
    python examples/grounded_sam_boxes.py --checkpoint mobile_sam.pt --boxes my_boxes.json --image photo.jpg
    python examples/grounded_sam_boxes.py --checkpoint mobile_sam.pt \
        --detector IDEA-Research/grounding-dino-tiny --labels "astronaut,helmet,flag"

This is the call sequence of Grounded-SAM (and its many copies): every box goes through
`predictor.transform.apply_boxes_torch` and all of them through one `predict_torch` call.
With sam_drop_in that batch is the fast path: the image embedding is not copied per box.

Boxes come from a zero-shot detector when `--detector MODEL` is given (any Hugging Face
model the `transformers` "zero-shot-object-detection" pipeline accepts, e.g. Grounding DINO
or OWL-ViT; needs `pip install transformers` and the model download), otherwise from a JSON
file: {"boxes": [{"label": str, "score": float, "box": [x0, y0, x1, y1]}, ...]} in pixels
(`astronaut_boxes.json` beside this script, for `images/astronaut.jpg`).

Writes OUTPUT/overlay.png (masks, boxes and labels), OUTPUT/mask_I.png and OUTPUT/masks.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sam_drop_in import SamPredictor, sam_model_registry
from sam_drop_in._viz import draw_label, draw_prompts, overlay_masks, palette

HERE = Path(__file__).resolve().parent


def boxes_from_json(path: Path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    items = data["boxes"] if isinstance(data, dict) else data
    labels = [str(b.get("label", f"box {i}")) for i, b in enumerate(items)]
    boxes = np.array([b["box"] for b in items], dtype=np.float32).reshape(-1, 4)
    return boxes, labels


def boxes_from_detector(model_id: str, image: Image.Image, labels: str, threshold: float):
    try:
        from transformers import pipeline
    except ImportError:
        raise SystemExit("--detector needs transformers: pip install transformers (or use --boxes FILE.json)")
    detector = pipeline("zero-shot-object-detection", model=model_id)
    found = detector(image, candidate_labels=[s.strip() for s in labels.split(",") if s.strip()], threshold=threshold)
    boxes = np.array([[d["box"]["xmin"], d["box"]["ymin"], d["box"]["xmax"], d["box"]["ymax"]] for d in found],
                     dtype=np.float32).reshape(-1, 4)
    return boxes, [f"{d['label']} {d['score']:.2f}" for d in found]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="Weights (local file or hf://...); omit for random weights.")
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--image", default=str(HERE / "images" / "astronaut.jpg"))
    parser.add_argument("--boxes", default=str(HERE / "astronaut_boxes.json"), help="JSON file of XYXY pixel boxes.")
    parser.add_argument("--detector", default=None, help="Hugging Face zero-shot detector id (optional).")
    parser.add_argument("--labels", default="person", help="Comma-separated text prompts for --detector.")
    parser.add_argument("--box-threshold", type=float, default=0.3, help="Detector score threshold.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="out/grounded")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        print("warning: no --checkpoint: random weights, the masks are meaningless", file=sys.stderr)
    sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint).to(args.device)
    predictor = SamPredictor(sam)

    pil_image = Image.open(args.image).convert("RGB")
    image = np.asarray(pil_image)
    if args.detector:
        boxes, labels = boxes_from_detector(args.detector, pil_image, args.labels, args.box_threshold)
    else:
        boxes, labels = boxes_from_json(Path(args.boxes))
    if len(boxes) == 0:
        print("no boxes: nothing to segment", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    predictor.set_image(image)
    t1 = time.perf_counter()
    # Grounded-SAM's three lines: boxes to the model's input frame, one batched decoder call.
    transformed = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes), image.shape[:2]).to(args.device)
    masks, scores, _ = predictor.predict_torch(
        point_coords=None, point_labels=None, boxes=transformed, multimask_output=False
    )
    masks = masks.cpu().numpy()[:, 0]  # B x H x W bool
    scores = scores.cpu().numpy()[:, 0]
    t2 = time.perf_counter()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (m, s, lab, b) in enumerate(zip(masks, scores, labels, boxes)):
        Image.fromarray(m.astype(np.uint8) * 255).save(out / f"mask_{i}.png")
        records.append({"label": lab, "box": [float(v) for v in b], "score": float(s), "area": int(m.sum()),
                        "file": f"mask_{i}.png"})
    (out / "masks.json").write_text(json.dumps(records, indent=2))

    picture = Image.fromarray(overlay_masks(image, list(masks)))
    draw_prompts(picture, boxes=boxes)
    colours = palette(len(masks))
    size = max(12, min(picture.size) // 32)
    for i, (lab, s, b) in enumerate(zip(labels, scores, boxes)):
        draw_label(picture, (b[0], b[1]), f"{lab} {s:.2f}", size, colour=colours[i])
    picture.save(out / "overlay.png")

    print(f"{len(boxes)} boxes from {args.detector or args.boxes}: set_image {t1 - t0:.2f} s, "
          f"predict_torch (one batch) {1000 * (t2 - t1):.0f} ms -> {out}/overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
