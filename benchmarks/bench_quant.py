"""Agreement of the simulated (fake-quant) W8A8 / W6A6 encoder (vit_t, or a ViT) with fp32, and
(--real) the speed and agreement of the real int8 encoder in ONNX Runtime.

    python benchmarks/bench_quant.py                      # vit_t, full size (1024), w8a8 and w6a6
    python benchmarks/bench_quant.py --image-size 256 --recipes w8a8
    python benchmarks/bench_quant.py --model-type vit_b --calib-images 2 --max-search-rows 1024 --time-repeats 1
    python benchmarks/bench_quant.py --real --threads 2   # real int8 (torchao, ONNX Runtime) and bf16
    python benchmarks/bench_quant.py --real --threads 2 --runtimes torchao,bf16 --methods ""
    python benchmarks/bench_quant.py --real --threads 2 --runtimes torchao,file_w8a8,file_w6a6 --methods ""

--real times, alternating in one process (so a shared machine's load hits all alike), our
PyTorch fp32 encoder (after precision.optimize(sam, "fp32"), eager) against (--runtimes) our
bf16 eager encoder, the torchao PT2E int8 encoder (x86 Inductor quantiser, compiled with
freezing; its build time includes the compile), the same int8 kernels running a saved quantised
file's searched w8a8 / w6a6 scales (file_w8a8, file_w6a6: calibrated and saved once, loaded
through sam_model_registry; the build time is the load and compile), and the encoder exported to ONNX and run by ONNX
Runtime in fp32 and int8 (static QDQ for each --methods calibration method, and dynamic); and
reports each one's embedding cosine and mean mask IoU against our fp32 on the evaluation
photographs, and the files' sizes (torchao: the quantised graph's state dict as safetensors).

Weights: the architecture of --model-type (vit_t: MobileSAM's) with perturbed random weights
(compat_tests' perturbed_state_dict, seed 0), as in bench_speed.py; with random weights many logits sit near the threshold, so the
IoU is a lower bound for trained weights. Calibration: the first --calib-images (default three)
of the scikit-image photographs rocket, immunohistochemistry, hubble_deep_field; evaluation: the three photographs of examples/images
(disjoint). Reported per recipe: calibration time, embedding cosine (per image, mean), mean mask
IoU of every multimask mask for 9 points and 8 boxes per photograph (sam_drop_in.testing.quality_prompts),
with --amg the everything-mode records matched on the first photograph (sam_drop_in.testing.records_iou;
with --real too, for every runtime),
the saved file's size against the fp32 encoder safetensors, and the simulated encoder's time
against fp32 (the simulation runs in float32 and is slower; it is for accuracy, not speed).
"""

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load_images  # noqa: E402

from sam_drop_in.testing import mean_iou, perturbed_state_dict, predict_quality_masks, records_iou  # noqa: E402


def _amg_records(sam, image):
    """Everything-mode records with nothing filtered (as bench_precision.py), so that every grid
    point's masks can be matched between fp32 and the quantised encoder."""
    from sam_drop_in import SamAutomaticMaskGenerator

    gen = SamAutomaticMaskGenerator(sam, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                    box_nms_thresh=1.0)
    return gen.generate(image)


def _reference(model_type, image_size, calib_images, fp32=False):
    """The perturbed-weights model, the calibration and evaluation photographs, and the float
    model's masks and embeddings on the evaluation ones (what every quantised variant is
    compared against). ``fp32``: first ``precision.optimize(sam, "fp32")`` (the fast paths, as a
    user runs it), for timing against other runtimes."""
    from skimage import data

    from sam_drop_in import SamPredictor
    from sam_drop_in.build_sam import build_sam_sized
    from sam_drop_in.precision import optimize

    torch.manual_seed(0)
    sam = build_sam_sized(model_type, image_size=image_size).eval()
    sam.load_state_dict(perturbed_state_dict(sam.state_dict(), seed=0))
    if fp32:
        optimize(sam, "fp32")
    calib = [data.rocket(), data.immunohistochemistry(), data.hubble_deep_field()][:calib_images]
    evals = load_images()
    ref_pred = SamPredictor(sam)
    ref_masks, ref_emb = [], []
    for im in evals:
        ref_masks.append(predict_quality_masks(ref_pred, im))
        ref_emb.append(ref_pred.get_image_embedding().clone())
    return sam, calib, evals, ref_pred, ref_masks, ref_emb


def main(argv=None) -> int:
    from safetensors.torch import save_file

    from sam_drop_in import SamPredictor, quantization

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-type", default="vit_t", choices=["vit_t", "vit_b", "vit_l", "vit_h"])
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--recipes", default="w8a8,w6a6")
    ap.add_argument("--calib-images", type=int, default=3, choices=[1, 2, 3])
    ap.add_argument("--max-search-rows", type=int, help="override the recipes' rows per layer kept for the search")
    ap.add_argument("--time-repeats", type=int, default=3, help="alternating fp32 / simulated encoder timings")
    ap.add_argument("--amg", action="store_true",
                    help="also AMG records matched on the first evaluation photograph (8x8 points, no filtering)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--real", action="store_true", help="only the real int8 encoder (ONNX Runtime)")
    ap.add_argument("--methods", default="minmax,percentile",
                    help="--real: ONNX Runtime static calibration methods (empty: none)")
    ap.add_argument("--runtimes", default="torchao,onnxruntime,bf16",
                    help="--real: which to time against our fp32 eager encoder: torchao (PT2E int8, "
                         "Inductor, MinMax calibration), file_w8a8 / file_w6a6 (the same int8 kernels running a "
                         "saved quantised file's searched scales), onnxruntime (fp32, each --methods, dynamic), "
                         "bf16 (our bf16 eager)")
    ap.add_argument("--threads", type=int, default=0, help="--real: intra-op threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=3, help="--real: timed repetitions of each encoder")
    args = ap.parse_args(argv)
    if args.real:
        return real_int8(args)

    sam, calib, evals, ref_pred, ref_masks, ref_emb = _reference(args.model_type, args.image_size,
                                                                 args.calib_images)
    ref_records = _amg_records(sam, evals[0]) if args.amg else None

    tmp = tempfile.mkdtemp()
    fp32_path = os.path.join(tmp, "fp32.safetensors")
    save_file({k: v.contiguous() for k, v in sam.image_encoder.state_dict().items()}, fp32_path)
    fp32_bytes = os.path.getsize(fp32_path)
    head_bytes = sum(v.numel() * 4 for k, v in sam.image_encoder.state_dict().items() if k.startswith(("head.", "norm_head.")))

    results = {"model_type": args.model_type, "image_size": args.image_size, "threads": torch.get_num_threads(),
               "calib_images": args.calib_images, "max_search_rows": args.max_search_rows, "recipes": {}}
    for name in args.recipes.split(","):
        recipe = quantization.get_recipe(name)
        if args.max_search_rows:
            recipe = dataclasses.replace(recipe, max_search_rows=args.max_search_rows)
        t0 = time.perf_counter()
        qenc = quantization.calibrate(sam, calib, recipe)
        calib_s = time.perf_counter() - t0
        qsam = copy.deepcopy(sam)
        qsam.image_encoder = qenc
        pred = SamPredictor(qsam)
        ious, coss = [], []
        for im, rm, re in zip(evals, ref_masks, ref_emb):
            m = predict_quality_masks(pred, im)
            ious.append(mean_iou(m, rm))
            coss.append(float(torch.nn.functional.cosine_similarity(pred.get_image_embedding().flatten(), re.flatten(), 0)))
        amg = round(records_iou(ref_records, _amg_records(qsam, evals[0])), 4) if args.amg else None
        qpath = os.path.join(tmp, f"{name}.safetensors")
        quantization.save_quantized(qenc, qpath)
        x = quantization.preprocess(sam, evals[0])
        times = {"fp32": [], "sim": []}
        with torch.no_grad():
            for _ in range(args.time_repeats):  # alternating, so shared-machine load hits both alike
                t = time.perf_counter(); sam.image_encoder(x); times["fp32"].append(time.perf_counter() - t)
                t = time.perf_counter(); qenc(x); times["sim"].append(time.perf_counter() - t)
        r = {
            "calibration_s": round(calib_s, 1),
            "embedding_cosine": [round(c, 5) for c in coss],
            "mean_mask_iou": round(sum(ious) / len(ious), 4),
            "mask_iou_per_image": [round(i, 4) for i in ious],
            "amg_records_iou_first_image": amg,
            "file_bytes": os.path.getsize(qpath),
            "file_ratio_vs_fp32_encoder": round(os.path.getsize(qpath) / fp32_bytes, 4),
            "file_ratio_vs_fp32_without_unused_head": round(os.path.getsize(qpath) / (fp32_bytes - head_bytes), 4),
            "sim_time_over_fp32": round(min(times["sim"]) / min(times["fp32"]), 2),
        }
        results["recipes"][name] = r
        print(name, json.dumps(r), flush=True)
    results["fp32_encoder_bytes"] = fp32_bytes
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _agreement(sam, encoder, evals, ref_masks, ref_emb, ref_records=None):
    """(embedding cosines per image, mean mask IoU per image, everything-mode records matched on
    the first image or None without ``ref_records``) of ``sam`` with ``encoder``."""
    from sam_drop_in import SamPredictor

    # The encoder swapped in and back rather than a deep copy of the model: a copy of the
    # torchao encoder would compile again.
    float_encoder = sam.image_encoder
    sam.image_encoder = encoder
    try:
        pred = SamPredictor(sam)
        ious, coss = [], []
        for im, rm, re in zip(evals, ref_masks, ref_emb):
            ious.append(mean_iou(predict_quality_masks(pred, im), rm))
            coss.append(float(torch.nn.functional.cosine_similarity(pred.get_image_embedding().flatten(), re.flatten(), 0)))
        amg = None if ref_records is None else records_iou(ref_records, _amg_records(sam, evals[0]))
    finally:
        sam.image_encoder = float_encoder
    return coss, ious, amg


def real_int8(args) -> int:
    """Our fp32 encoder, ONNX Runtime fp32 and ONNX Runtime int8: time, agreement, size."""
    import logging
    import statistics

    from safetensors.torch import save_file

    from sam_drop_in import onnx_export, quantization
    from sam_drop_in.quantization.onnx_int8 import OnnxImageEncoder, export_int8_encoder

    logging.disable(logging.WARNING)  # ONNX Runtime's quantiser logs one line per LayerNorm weight
    if args.threads:
        torch.set_num_threads(args.threads)
    # --model-type and --calib-images apply here too (vit_t and three photographs by default).
    sam, calib, evals, ref_pred, ref_masks, ref_emb = _reference(args.model_type, args.image_size,
                                                                 args.calib_images, fp32=True)

    ref_records = _amg_records(sam, evals[0]) if args.amg else None
    tmp = tempfile.mkdtemp()
    sizes = {}
    fp32_st = os.path.join(tmp, "fp32.safetensors")
    save_file({k: v.contiguous() for k, v in sam.image_encoder.state_dict().items()}, fp32_st)
    sizes["torch_fp32_safetensors"] = os.path.getsize(fp32_st)
    head = sum(v.numel() * 4 for k, v in sam.image_encoder.state_dict().items() if k.startswith(("head.", "norm_head.")))
    sizes["torch_fp32_safetensors_without_head"] = sizes["torch_fp32_safetensors"] - head

    runtimes = set(args.runtimes.split(","))
    encoders, build_s = {"torch_fp32": sam.image_encoder}, {}
    if "bf16" in runtimes:
        from sam_drop_in.precision import _reduce_precision

        bf = copy.deepcopy(sam)
        _reduce_precision(bf, torch.bfloat16)  # optimize's bf16 mode (sam is already marked fp32)
        encoders["torch_bf16"] = bf.image_encoder
    if "torchao" in runtimes:
        from sam_drop_in.quantization.pt2e_int8 import pt2e_int8_encoder

        t0 = time.perf_counter()
        encoders["torchao_int8"] = pt2e_int8_encoder(sam, calib)  # quantise, calibrate, compile
        build_s["torchao_int8"] = time.perf_counter() - t0
        qpath = os.path.join(tmp, "torchao_int8.safetensors")
        # The quantised graph's state (int8 weights, scales) as one file: its size, not a format we ship.
        save_file({k: v.contiguous() for k, v in encoders["torchao_int8"].graph.state_dict().items()}, qpath)
        sizes["torchao_int8"] = os.path.getsize(qpath)
        print(f"built torchao_int8 in {build_s['torchao_int8']:.1f} s (export, calibrate, convert, compile)", flush=True)
    for recipe in [r[len("file_"):] for r in sorted(runtimes) if r.startswith("file_")]:
        # The saved-file route: calibrate the simulated recipe once and save it (what
        # `sam-drop-in quantize` does), load the file through the registry, and build the int8
        # encoder from its scales (export, convert, compile: no calibration).
        from sam_drop_in import sam_model_registry
        from sam_drop_in.quantization.pt2e_int8 import pt2e_int8_encoder

        name = f"torchao_{recipe}_from_file"
        t0 = time.perf_counter()
        qsam = copy.deepcopy(sam)
        rec = quantization.get_recipe(recipe)
        if args.max_search_rows:
            rec = dataclasses.replace(rec, max_search_rows=args.max_search_rows)
        qsam.image_encoder = quantization.calibrate(sam, calib, rec)
        calib_s = time.perf_counter() - t0
        fpath, epath = os.path.join(tmp, f"{recipe}.safetensors"), os.path.join(tmp, f"{recipe}_encoder.safetensors")
        quantization.save_quantized(qsam, fpath)
        quantization.save_quantized(qsam.image_encoder, epath)  # encoder only: the size beside the fp32 encoder's
        sizes[name] = os.path.getsize(epath)
        del qsam
        t0 = time.perf_counter()
        loaded = sam_model_registry[args.model_type](checkpoint=fpath)
        encoders[name] = pt2e_int8_encoder(loaded)  # its scales; export, convert, compile
        build_s[name] = time.perf_counter() - t0
        build_s[f"{recipe}_calibration"] = calib_s
        print(f"built {name} in {build_s[name]:.1f} s from the file (calibration and search, once: {calib_s:.1f} s)", flush=True)
    ort_methods = [m for m in args.methods.split(",") if m] + ["dynamic"] if "onnxruntime" in runtimes else []
    if "onnxruntime" in runtimes:
        path = os.path.join(tmp, "ort_fp32.onnx")
        t0 = time.perf_counter()
        onnx_export.export_encoder(sam, path, include_preprocessing=False)
        build_s["ort_fp32"] = time.perf_counter() - t0
        encoders["ort_fp32"] = OnnxImageEncoder.from_file(path)
        sizes["ort_fp32"] = os.path.getsize(path)
    for method in ort_methods:
        name = f"ort_int8_{method}"
        path = os.path.join(tmp, name + ".onnx")
        t0 = time.perf_counter()
        export_int8_encoder(sam, path, None if method == "dynamic" else calib, method="minmax" if method == "dynamic" else method)
        build_s[name] = time.perf_counter() - t0
        encoders[name] = OnnxImageEncoder.from_file(path)
        sizes[name] = os.path.getsize(path)
        print(f"built {name} in {build_s[name]:.1f} s", flush=True)

    x = quantization.preprocess(sam, evals[0])
    times = {k: [] for k in encoders}
    with torch.inference_mode():
        for enc in encoders.values():
            enc(x)  # warm-up (ONNX Runtime builds its session at the first call)
        for _ in range(args.reps):
            for k, enc in encoders.items():
                t = time.perf_counter()
                enc(x)
                times[k].append(time.perf_counter() - t)

    base = min(times["torch_fp32"])
    results = {
        "image_size": args.image_size,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "sizes_bytes": sizes,
        "build_s": {k: round(v, 1) for k, v in build_s.items()},
        "encoders": {},
    }
    for k, enc in encoders.items():
        r = {
            "time_min_s": round(min(times[k]), 3),
            "time_median_s": round(statistics.median(times[k]), 3),
            "speedup_vs_torch_fp32": round(base / min(times[k]), 2),
        }
        if "ort_fp32" in times:
            r["speedup_vs_ort_fp32"] = round(min(times["ort_fp32"]) / min(times[k]), 2)
        if "torch_bf16" in times:
            r["speedup_vs_torch_bf16"] = round(min(times["torch_bf16"]) / min(times[k]), 2)
        if k != "torch_fp32":
            coss, ious, amg = _agreement(sam, enc, evals, ref_masks, ref_emb, ref_records)
            if amg is not None:
                r["amg_records_iou_first_image"] = round(amg, 4)
            r.update({
                "embedding_cosine": [round(c, 5) for c in coss],
                "mean_mask_iou": round(sum(ious) / len(ious), 4),
                "mask_iou_per_image": [round(i, 4) for i in ious],
            })
            if k in sizes:
                r["size_vs_fp32_safetensors"] = round(sizes[k] / sizes["torch_fp32_safetensors"], 3)
        results["encoders"][k] = r
        print(k, json.dumps(r), flush=True)
    print("sizes", json.dumps(sizes), "load average", os.getloadavg(), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
