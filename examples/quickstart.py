"""Quickstart: segment an object from one click with the vit_t model.

    python examples/quickstart.py [--checkpoint PATH_OR_HF] [--image IMAGE] [--point X,Y] [--output DIR]

Writes DIR/mask.png (the best mask, white on black) and DIR/overlay.png (the mask over the
image with the click marked). Without --checkpoint the weights are random and the mask is
meaningless: the run then only shows that everything is wired up.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sam_drop_in import SamPredictor, sam_model_registry

HERE = Path(__file__).resolve().parent


def overlay(image: np.ndarray, mask: np.ndarray, point, colour=(30, 144, 255), alpha=0.5) -> Image.Image:
    """RGB image with ``mask`` (HxW bool) tinted in ``colour`` and ``point`` (x, y) marked."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    picture = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    r = max(4, min(image.shape[:2]) // 80)
    x, y = point
    draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 200, 0), outline=(255, 255, 255), width=2)
    return picture


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--checkpoint", help="vit_t weights: a local file or hf://OWNER/REPO[@REV]/FILE")
    parser.add_argument("--image", default=str(HERE / "images" / "coffee.jpg"))
    parser.add_argument("--point", default=None, help="X,Y in pixels (default: the image centre)")
    parser.add_argument("--output", default="out/quickstart")
    args = parser.parse_args(argv)

    if args.checkpoint is None:
        print("warning: no --checkpoint given: the model has RANDOM weights and the mask is meaningless. "
              "Pass --checkpoint mobile_sam.pt (or an hf:// path) for real masks.", file=sys.stderr)
    sam = sam_model_registry["vit_t"](checkpoint=args.checkpoint)
    predictor = SamPredictor(sam)

    image = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = image.shape[:2]
    point = tuple(float(v) for v in args.point.split(",")) if args.point else (w / 2, h / 2)

    t0 = time.perf_counter()
    predictor.set_image(image)
    t1 = time.perf_counter()
    masks, scores, _ = predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]))
    t2 = time.perf_counter()
    best = int(np.argmax(scores))

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray((masks[best] * 255).astype(np.uint8)).save(out / "mask.png")
    overlay(image, masks[best], point).save(out / "overlay.png")
    print(f"image {w}x{h}: set_image {t1 - t0:.2f} s, predict {1000 * (t2 - t1):.0f} ms; "
          f"best mask score {scores[best]:.3f}, {int(masks[best].sum())} pixels -> {out}/mask.png, {out}/overlay.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
