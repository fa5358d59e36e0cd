"""Everything mode, side by side: sam_drop_in's generators against mobile_sam's, vit_t, same weights.

    python benchmarks/bench_amg.py            # full run (several minutes per reference run)
    python benchmarks/bench_amg.py --quick    # smaller grids and image
    python benchmarks/bench_amg.py --only zero --threads 2 --busy-core   # thresholds 0, quiet and busy
    python benchmarks/bench_amg.py --only defaults --threads 2 --modes fp32,bf16   # bf16 target

Each run happens in its own child process, one after another, so its peak resident memory
(VmHWM, which sees torch's allocations, unlike tracemalloc) is its own. Times are wall-clock of
``generate`` only (model building and weight loading excluded); the image embedding is part of
it, as in real use. Machines are noisy: read the ratios. --busy-core runs each chosen workload twice, quiet and then
with a busy-loop process pinned to the last core (started and stopped here, and ending by itself
after --busy-seconds); --threads sets torch's intra-op threads in every child.

Workloads:
- "defaults": upstream's default arguments (32x32 grid; 16x16 with --quick). Random weights
  never pass the default IoU threshold and their logits stay below 1, so the weights are made
  confident deterministically (mask logits scaled x1000, IoU head shifted +0.85): masks survive
  the default filters, and the hierarchical mode's high_score_thresh=8.5 is reachable.
- "thresholds 0": pred_iou_thresh=0, stability_score_thresh=0 and box_nms_thresh=1.0, plain
  random weights: every mask is upsampled, scored, boxed, RLE-encoded and kept (random-weight
  masks are near-identical, so the default NMS would leave one record and the agreement check
  would see almost nothing) (16x16; 8x8 with --quick).
- --modes fp32,bf16 (or bf16+compile, ...): ours also in these precision modes
  (``precision.optimize``; MobileSAM stays fp32) on the chosen workloads, each against MobileSAM
  fp32 in the same run, and each reduced mode's records against ours in fp32 as the mean mask IoU
  of ``sam_drop_in.testing.records_iou`` (issue #13's bf16 target: defaults 32x32 at 1024x768,
  >= 8x MobileSAM fp32, IoU >= 0.9). "+compile" variants time a second ``generate`` after a
  first one that compiles (its time is printed too).
- "hierarchical": our SamHierarchicalMaskGenerator against our full-grid generator, defaults,
  confident weights; it reports how many full-grid masks the hierarchical output recovers
  (a mask with IoU >= 0.9).
"""

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
import warnings
from typing import Any, Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import busy_core, vmhwm_mib  # noqa: E402  (benchmarks/_common.py)


def _image(quick: bool) -> np.ndarray:
    from PIL import Image
    import skimage.data

    size = (512, 384) if quick else (1024, 768)
    return np.asarray(Image.fromarray(skimage.data.coffee()).resize(size, Image.BILINEAR))


def _state_dict(confident: bool):
    import torch
    import mobile_sam

    torch.manual_seed(0)
    sd = mobile_sam.sam_model_registry["vit_t"]().state_dict()
    if confident:
        for i in range(4):
            for p in ("weight", "bias"):
                key = f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.{p}"
                sd[key] = sd[key] * 1000.0
        key = "mask_decoder.iou_prediction_head.layers.2.bias"
        sd[key] = sd[key] + 0.85
    return sd


def _child(impl: str, kind: str, kwargs: Dict[str, Any], confident: bool, quick: bool, threads: int, queue,
           mode: str = "fp32") -> None:
    warnings.filterwarnings("ignore")
    sys.path.insert(0, ROOT)
    import torch

    if threads:
        torch.set_num_threads(threads)
    sd = _state_dict(confident)
    if impl == "mobile_sam":
        import mobile_sam

        model = mobile_sam.sam_model_registry["vit_t"]()
        model.load_state_dict(sd)
        model.eval()  # mobile_sam's attention-bias cache needs eval() after loading
        gen = mobile_sam.SamAutomaticMaskGenerator(model, **kwargs)
    else:
        import sam_drop_in

        from sam_drop_in.precision import optimize

        model = sam_drop_in.sam_model_registry["vit_t"]()
        model.load_state_dict(sd)
        precision, _, compiled = mode.partition("+")
        model = optimize(model, precision, compile=compiled == "compile")
        cls = sam_drop_in.SamHierarchicalMaskGenerator if kind == "hierarchical" else sam_drop_in.SamAutomaticMaskGenerator
        gen = cls(model, **kwargs)
    image = _image(quick)
    first = None
    if "+compile" in mode:  # the first call compiles; time the second
        t0 = time.perf_counter()
        with torch.no_grad():
            gen.generate(image)
        first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        records = gen.generate(image)
    seconds = time.perf_counter() - t0
    queue.put({"seconds": seconds, "peak_mib": vmhwm_mib(), "records": records, "first_call_s": first})


THREADS = 0  # set from --threads


def run(impl: str, kind: str, kwargs: Dict[str, Any], confident: bool, quick: bool, mode: str = "fp32") -> Dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(impl, kind, kwargs, confident, quick, THREADS, queue, mode))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def agreement(ref: List[Dict[str, Any]], ours: List[Dict[str, Any]]) -> str:
    if len(ref) != len(ours):
        return f"DIFFERENT: {len(ref)} vs {len(ours)} records"
    from sam_drop_in.utils.amg import rle_to_mask

    bad, notes = 0, []
    for i, (a, b) in enumerate(zip(ref, ours)):
        diffs = [k for k in ("bbox", "area", "point_coords", "crop_box") if a[k] != b[k]]
        for k in ("predicted_iou", "stability_score"):
            if not (abs(a[k] - b[k]) <= 1e-4 or (np.isnan(a[k]) and np.isnan(b[k]))):
                diffs.append(f"{k} {a[k]:.6g}/{b[k]:.6g}")
        if a["segmentation"] != b["segmentation"]:
            px = int((rle_to_mask(a["segmentation"]) != rle_to_mask(b["segmentation"])).sum())
            diffs.append(f"mask ({px} px)")
        if diffs:
            bad += 1
            if len(notes) < 3:
                notes.append(f"#{i}: " + ", ".join(diffs))
    if bad == 0:
        return f"identical ({len(ref)} records)"
    return f"{bad} of {len(ref)} records differ: " + "; ".join(notes)


def recovered(full: List[Dict[str, Any]], hier: List[Dict[str, Any]], thresh: float = 0.9) -> int:
    from sam_drop_in.utils.amg import rle_to_mask

    if not full or not hier:
        return 0
    h_masks = np.stack([rle_to_mask(r["segmentation"]).ravel() for r in hier]).astype(np.float32)
    count = 0
    for r in full:
        m = rle_to_mask(r["segmentation"]).ravel().astype(np.float32)
        inter = h_masks @ m
        union = h_masks.sum(1) + m.sum() - inter
        count += bool((inter / np.maximum(union, 1) >= thresh).any())
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16x16 / 8x8 grids and a 512x384 image")
    parser.add_argument(
        "--only", choices=["defaults", "zero", "hierarchical"], action="append",
        help="run only these workloads (repeatable); hierarchical also runs our full grid to compare",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--busy-core", action="store_true", help="also run every workload with the last core busy")
    parser.add_argument("--busy-seconds", type=float, default=3600.0, help="upper bound on the busy loop's life")
    parser.add_argument("--modes", default="fp32",
                        help="comma list of our precision modes for defaults/zero (fp32, bf16, int8, bf16+compile, ...)")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if "fp32" not in args.modes:
        args.modes.insert(0, "fp32")  # the reference for the reduced modes' agreement
    global THREADS
    THREADS = args.threads
    for load in (["quiet", "busy"] if args.busy_core else ["quiet"]):
        print(f"\n##### {load}" + (" (busy loop pinned to the last core)" if load == "busy" else ""))
        with busy_core(args.busy_seconds) if load == "busy" else contextlib.nullcontext():
            _workloads(args)


def _binary_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    from sam_drop_in.utils.amg import rle_to_mask

    return [dict(r, segmentation=rle_to_mask(r["segmentation"])) for r in records]


def _our_modes(modes: List[str], kw: Dict[str, Any], confident: bool, quick: bool, ref: Dict[str, Any], line) -> Dict[str, Any]:
    """Ours in each precision mode against MobileSAM fp32 (``ref``); returns our fp32 run."""
    from sam_drop_in.testing import records_iou

    runs = {}
    for mode in modes:
        runs[mode] = r = run("sam_drop_in", "amg", kw, confident, quick, mode)
        line(f"sam_drop_in SamAutomaticMaskGenerator {mode}", r)
        if r.get("first_call_s") is not None:
            print(f"    first generate (compiles) {r['first_call_s']:.1f} s")
        if mode == "fp32":
            note = f"records {agreement(ref['records'], r['records'])}"
        else:
            base = _binary_records(runs["fp32"]["records"])
            note = f"mean mask IoU to our fp32 {records_iou(base, _binary_records(r['records'])):.4f}"
        print(f"  {mode}: x{ref['seconds'] / r['seconds']:.2f} faster than mobile_sam fp32, {note}", flush=True)
    return runs["fp32"]


def _workloads(args) -> None:
    q = args.quick
    only = set(args.only or ["defaults", "zero", "hierarchical"])
    rle = {"output_mode": "uncompressed_rle"}  # records travel between processes; masks compared as RLE
    side_default = 16 if q else 32
    side_zero = 8 if q else 16

    rows = []

    def line(name, r):
        rows.append((name, r["seconds"], r["peak_mib"], len(r["records"])))
        print(f"  {name:<42s} {r['seconds']:8.1f} s  peak {r['peak_mib']:7.0f} MiB  {len(r['records']):5d} masks", flush=True)

    print(f"image {'512x384' if q else '1024x768'} (skimage coffee), vit_t, torch threads "
          f"{args.threads or 'default'}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    kw = dict(points_per_side=side_default, **rle)
    our_d = None
    if "defaults" in only:
        print(f"\n[defaults] points_per_side={side_default}, confident weights")
        ref_d = run("mobile_sam", "amg", kw, True, q)
        line("mobile_sam SamAutomaticMaskGenerator", ref_d)
        our_d = _our_modes(args.modes, kw, True, q, ref_d, line)

    if "zero" in only:
        print(f"\n[thresholds 0] points_per_side={side_zero}, pred_iou_thresh=0, stability_score_thresh=0, "
              "box_nms_thresh=1, random weights")
        kw0 = dict(points_per_side=side_zero, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, **rle)
        ref_0 = run("mobile_sam", "amg", kw0, False, q)
        line("mobile_sam SamAutomaticMaskGenerator", ref_0)
        _our_modes(args.modes, kw0, False, q, ref_0, line)

    if "hierarchical" not in only:
        return
    print(f"\n[hierarchical] points_per_side={side_default}, defaults, confident weights")
    if our_d is None:
        our_d = run("sam_drop_in", "amg", kw, True, q)
        line("sam_drop_in SamAutomaticMaskGenerator", our_d)
    our_h = run("sam_drop_in", "hierarchical", kw, True, q)
    line("sam_drop_in SamHierarchicalMaskGenerator", our_h)
    print(
        f"  x{our_d['seconds'] / our_h['seconds']:.2f} faster than our full grid; recovers "
        f"{recovered(our_d['records'], our_h['records'])} of {len(our_d['records'])} full-grid masks (IoU >= 0.9)"
    )


if __name__ == "__main__":
    main()
