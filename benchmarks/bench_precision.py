"""Agreement of reduced precision with fp32 on the real vit_t (1024-pixel input).

    python benchmarks/bench_precision.py                   # bf16 (CPU: native with AVX-512 BF16/AMX)
    python benchmarks/bench_precision.py --modes bf16 fp16 --device cuda

Prints the mean mask IoU against fp32, on perturbed random weights (no checkpoint needed), for
9 points and 8 boxes (multimask, examples/images/coffee.jpg) and for the automatic mask
generator's records (8x8 grid, thresholds 0, each fp32 record matched to the best mask of the
same point). fp16 on a CPU goes through the private path the tests use (slow, for checking only).
"""

import argparse
import time

import torch

import sam_drop_in  # noqa: E402
from sam_drop_in.testing import (  # noqa: E402
    load_image, mean_iou, model_in_mode, perturbed_state_dict, predict_quality_masks, records_iou,
)


def build(sd, mode, device):
    m = sam_drop_in.sam_model_registry["vit_t"]()
    m.load_state_dict(sd)
    return model_in_mode(m, mode, device)


def measure(model, image):
    pred = sam_drop_in.SamPredictor(model)
    t = time.perf_counter()
    masks = predict_quality_masks(pred, image)
    gen = sam_drop_in.SamAutomaticMaskGenerator(model, points_per_side=8, pred_iou_thresh=0.0,
                                                stability_score_thresh=0.0, box_nms_thresh=1.0)
    records = gen.generate(image)
    return masks, records, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["bf16"], choices=["bf16", "fp16", "int8"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    sd = perturbed_state_dict(sam_drop_in.sam_model_registry["vit_t"]().state_dict(), seed=3)
    image = load_image("coffee.jpg")
    base_masks, base_records, t = measure(build(sd, "fp32", args.device), image)
    n = base_masks.shape[0]
    print(f"vit_t 1024 px, {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"fp32: {n} prompt masks, {len(base_records)} AMG records, {t:.1f} s")
    for mode in args.modes:
        masks, records, t = measure(build(sd, mode, args.device), image)
        points, boxes = mean_iou(base_masks[:27], masks[:27]), mean_iou(base_masks[27:], masks[27:])
        print(f"{mode}: mean mask IoU vs fp32 points {points:.4f}, boxes {boxes:.4f}, "
              f"AMG records {records_iou(base_records, records):.4f} ({len(records)} records), {t:.1f} s")


if __name__ == "__main__":
    main()
