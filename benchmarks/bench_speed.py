"""Speed side by side: sam_drop_in against mobile_sam (vit_t) and segment_anything (vit_b).

    python benchmarks/bench_speed.py --quick                 # vit_t, few repetitions
    python benchmarks/bench_speed.py                          # vit_t and vit_b
    python benchmarks/bench_speed.py --device cuda            # on a GPU (adds fp16)
    python benchmarks/bench_speed.py --models vit_t --modes fp32,int8 --json out.json
    python benchmarks/bench_speed.py --quick --threads 2 --busy-core   # quiet and one core busy
    python benchmarks/bench_speed.py --quick --compile                 # adds torch.compile variants
    python benchmarks/bench_speed.py --quick --modes fp32,bf16 --ab-fused   # bf16 encoder fused vs reference

Same random (perturbed) weights and the same photograph for every implementation. In each
repetition every variant (reference, ours in each mode) runs once, one after another, so load
on a shared machine hits all of them alike; the table gives medians and ratios. Floors are the
FLOPs counted with FlopCounterMode divided by the matmul rate (2048^3) measured in this run.
Peak memory is VmHWM of a child process that builds one variant, sets an image and predicts
16 boxes (CUDA: max_memory_allocated). Quality is the mean IoU of every multimask mask (9 points
and 8 boxes on each of 3 photographs) against ours in fp32; with random weights many logits sit
near the threshold, so it is a lower bound for trained weights. bf16 is only measured where the
hardware computes it natively (CUDA, AVX-512 BF16/AMX CPUs) unless --modes names it; its floors
use the bf16 matmul rate measured in the same run.

--busy-core times everything twice, quiet and then with a busy-loop process pinned to the last
core this process may use (started and stopped by the benchmark, and ending by itself after
--busy-seconds whatever happens): what a laptop or shared server does to a 2-thread run.
--ab-fused times the bf16 encoder with its fused CPU path (modeling/_fast_tinyvit.py), with that
path's stage 0 on the whole feature map instead of strips, and with the reference forward,
alternating, and reports the ratios.
--compile adds "<mode>+compile" variants (torch.compile of the encoder and decoder through
precision.optimize) and reports each one's first-call (compile) time.
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    REFERENCE,
    build_ours,
    build_pair,
    busy_core,
    count_flops,
    load_images,
    matmul_rate,
    median,
    timed,
    vmhwm_mib,
)
from sam_drop_in.testing import mean_iou, predict_quality_masks  # noqa: E402

# Targets (issue #13): x faster than the reference in fp32, quiet and with the other core busy;
# bf16 encoder time at most this many times its floor on hardware with native bf16.
TARGETS = {
    "quiet": {"vit_t": {"set_image": 1.8, "predict_1pt": 1.5, "predict_16box": 2.0}, "vit_b": {"set_image": 1.3}},
    "busy": {"vit_t": {"set_image": 1.3}},
}
TARGET_X_BF16_FLOOR = {"vit_t": {"encoder": 3.0}}


def _predict_workloads(pred, image):
    h, w = image.shape[:2]
    pt = dict(point_coords=np.array([[w * 0.5, h * 0.5]]), point_labels=np.array([1]))
    box = dict(box=np.array([w * 0.2, h * 0.25, w * 0.6, h * 0.9]))
    rng = np.random.default_rng(0)
    lo = rng.uniform(0, 0.4, (16, 2)) * [w, h]
    boxes16 = torch.tensor(np.concatenate([lo, lo + 0.5 * np.array([w, h])], 1), dtype=torch.float)
    boxes16 = pred.transform.apply_boxes_torch(boxes16, (h, w)).to(pred.device)
    return {
        "predict_1pt": lambda: pred.predict(**pt),
        "predict_1box": lambda: pred.predict(**box),
        "predict_16box": lambda: pred.predict_torch(None, None, boxes=boxes16),
    }


def _make_variant(model_type, mode, sd, device, compile_=False):
    from sam_drop_in.precision import optimize

    return optimize(build_ours(model_type, sd, device), mode=mode, compile=compile_)


def memory_child(model_type: str, variant: str, device: str) -> Dict:
    """Runs in a child process: build one variant, set an image, predict 16 boxes."""
    import importlib

    from sam_drop_in.testing import perturbed_state_dict

    image = load_images()[0]
    ref_mod = importlib.import_module(REFERENCE[model_type])
    torch.manual_seed(0)
    if variant == "reference":
        model = ref_mod.sam_model_registry[model_type]()
        model.load_state_dict(perturbed_state_dict(model.state_dict(), seed=0))
        model.eval()
        model = model.to(device)
        pred = ref_mod.SamPredictor(model)
    else:
        import sam_drop_in

        ref = ref_mod.sam_model_registry[model_type]()
        sd = perturbed_state_dict(ref.state_dict(), seed=0)
        del ref
        model = _make_variant(model_type, variant, sd, device)
        pred = sam_drop_in.SamPredictor(model)
    base = vmhwm_mib()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        pred.set_image(image)
        _predict_workloads(pred, image)["predict_16box"]()
    out = {"vmhwm_mib": vmhwm_mib(), "vmhwm_before_mib": base}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_memory(model_type, variant, device) -> Dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", model_type, variant, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def bench_model(model_type: str, modes: List[str], args) -> Dict:
    import importlib

    import sam_drop_in
    from sam_drop_in.batch import embed_images

    device = args.device
    ref_mod = importlib.import_module(REFERENCE[model_type])
    ours, ref, sd = build_pair(model_type, device)
    images = load_images()
    image = images[0]
    variants = {"reference": ref_mod.SamPredictor(ref), "fp32": sam_drop_in.SamPredictor(ours)}
    for mode in modes:
        if mode != "fp32":
            variants[mode] = sam_drop_in.SamPredictor(_make_variant(model_type, mode, sd, device))
    compile_s = {}
    if args.compile:
        for mode in [m for m in ("fp32", "bf16", "fp16") if m in modes]:
            name = f"{mode}+compile"
            variants[name] = sam_drop_in.SamPredictor(_make_variant(model_type, mode, sd, device, True))
            compile_s[name] = timed(lambda: variants[name].set_image(image), device)  # compiles

    for pred in variants.values():
        # Inference only; FlopCounterMode's module hooks also trip over parameters needing grad.
        pred.model.requires_grad_(False)
    reps = args.reps or (1 if model_type == "vit_b" and args.quick else 3 if args.quick else 7)
    pred_reps = 3 if args.quick else 10
    enc_input = {}
    for name, pred in variants.items():  # warm-up, and the encoder input each variant sees
        pred.set_image(image)
        enc_input[name] = pred.model.preprocess(
            torch.as_tensor(pred.transform.apply_image(image), device=device).permute(2, 0, 1)[None].float()
        )
    loads = ["quiet", "busy"] if args.busy_core else ["quiet"]
    times = {load: {name: {} for name in variants} for load in loads}
    # The matmul rate sets the floors and must be the hardware's peak. On the shared AMX machine
    # the bf16 rate moved between 760 and 1950 GFLOP/s from one minute to the next (2026-12-01),
    # so it is sampled after every quiet repetition and once at the end, and the fastest is kept.
    rate_dtypes = {"fp32": torch.float32}
    if "bf16" in modes:
        rate_dtypes["bf16"] = torch.bfloat16
    elif "fp16" in modes:
        rate_dtypes["fp16"] = torch.float16
    rate_samples = {k: [] for k in rate_dtypes}

    def sample_rates():
        for k, dt in rate_dtypes.items():
            rate_samples[k].append(matmul_rate(dt, device))

    for load in loads:
        with busy_core(args.busy_seconds) if load == "busy" else contextlib.nullcontext():
            for _ in range(reps):
                for name, pred in variants.items():
                    times[load][name].setdefault("set_image", []).append(timed(lambda: pred.set_image(image), device))
                    enc = pred.model.image_encoder
                    times[load][name].setdefault("encoder", []).append(timed(lambda: enc(enc_input[name]), device))
                if load == "quiet":
                    sample_rates()
            for _ in range(pred_reps):
                for name, pred in variants.items():
                    pred.set_image(image) if not pred.is_image_set else None
                    for wl, fn in _predict_workloads(pred, image).items():
                        times[load][name].setdefault(wl, []).append(timed(fn, device))

    # FLOPs of our fp32 computation (the work that has to be done), and the floors.
    fp32 = variants["fp32"]
    flops = {"encoder": count_flops(lambda: fp32.model.image_encoder(enc_input["fp32"]))}
    flops["set_image"] = flops["encoder"]
    for wl, fn in _predict_workloads(fp32, image).items():
        flops[wl] = count_flops(fn)
    sample_rates()
    rates = {k: max(v) for k, v in rate_samples.items()}
    print("matmul GFLOP/s samples: " + "; ".join(f"{k} {min(v) / 1e9:.0f}-{max(v) / 1e9:.0f} (peak kept)"
                                                 for k, v in rate_samples.items()))

    # Agreement of each reduced-precision mode with fp32 on real photographs.
    quality = {}
    reduced = [m for m in variants if m not in ("reference", "fp32")]
    if reduced:
        base_masks = [predict_quality_masks(fp32, im) for im in images]
        for m in reduced:
            quality[m] = float(np.mean([mean_iou(b, predict_quality_masks(variants[m], im))
                                        for b, im in zip(base_masks, images)]))

    # Batched encoding: 4 images in one encoder call against 4 set_image calls (fp32).
    batch = {}
    if not args.no_batch:
        four = (images * 2)[:4]
        seq = timed(lambda: [fp32.set_image(im) for im in four], device)
        bat = timed(lambda: embed_images(fp32, four, batch_size=4), device)
        batch = {"images": 4, "sequential_s_per_image": seq / 4, "batched_s_per_image": bat / 4,
                 "speedup": seq / bat}

    memory = {}
    if not args.no_memory:
        for name in ["reference", "fp32"] + [m for m in modes if m != "fp32"]:
            memory[name] = measure_memory(model_type, name, device)

    rows = []
    for load in loads:
        for wl in ("set_image", "encoder", "predict_1pt", "predict_1box", "predict_16box"):
            ref_t = median(times[load]["reference"][wl])
            for name in variants:
                t = median(times[load][name][wl])
                mode = name.split("+")[0]
                rate_key = mode if mode in rates else "fp32"  # int8 and the reference: fp32 floor
                floor = flops[wl] / rates[rate_key]
                rows.append({
                    "model": model_type, "load": load, "workload": wl, "variant": name, "median_s": t,
                    "runs": len(times[load][name][wl]), "gflop": flops[wl] / 1e9, "floor_s": floor,
                    "floor_dtype": rate_key, "x_faster_than_ref": ref_t / t, "x_floor": t / floor,
                    "target_x_faster": TARGETS[load].get(model_type, {}).get(wl) if name == "fp32" else None,
                    "target_x_floor": (TARGET_X_BF16_FLOOR.get(model_type, {}).get(wl)
                                       if rate_key == "bf16" and load == "quiet" else None),
                })
    fused_ab = {}
    if args.ab_fused and "bf16" in variants and device == "cpu":
        fused_ab = ab_fused_encoder(variants["bf16"].model.image_encoder, enc_input["bf16"], reps)
    return {"rows": rows, "rates_gflops": {k: v / 1e9 for k, v in rates.items()}, "quality_mean_iou": quality,
            "batched_encoding": batch, "peak_memory": memory, "compile_first_call_s": compile_s,
            "bf16_fused_ab": fused_ab}


def ab_fused_encoder(encoder, x, reps: int) -> Dict:
    """The bf16 encoder with its fused CPU path (modeling/_fast_tinyvit.py), the same path with
    stage 0 on the whole feature map instead of strips (its STRIP_BYTES made huge), and the
    reference forward, alternating call by call in this process: medians and their ratios."""
    from sam_drop_in.modeling import _fast_tinyvit

    strip_bytes = _fast_tinyvit.STRIP_BYTES
    variants = (("reference", False, strip_bytes), ("fused_whole", True, 1 << 40), ("fused", True, strip_bytes))
    times = {name: [] for name, *_ in variants}
    try:
        for _ in range(max(reps, 3)):
            for name, on, size in variants:
                _fast_tinyvit.ENABLED, _fast_tinyvit.STRIP_BYTES = on, size
                times[name].append(timed(lambda: encoder(x), "cpu"))
    finally:
        _fast_tinyvit.ENABLED, _fast_tinyvit.STRIP_BYTES = True, strip_bytes
    med = {k: median(v) for k, v in times.items()}
    return {"fused_s": med["fused"], "reference_s": med["reference"], "x_faster": med["reference"] / med["fused"],
            "fused_whole_s": med["fused_whole"], "strips_x_faster": med["fused_whole"] / med["fused"],
            "runs": len(times["fused"])}


def print_report(res: Dict) -> None:
    for model_type, r in res["models"].items():
        print(f"\n== {model_type} vs {REFERENCE[model_type]}  (matmul GFLOP/s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["rates_gflops"].items()) + ")")
        print(f"{'load':<6}{'workload':<14}{'variant':<14}{'median s':>10}{'GFLOP':>8}{'floor s':>9}{'x floor':>9}"
              f"{'ref/ours':>10}{'target':>12}")
        for row in r["rows"]:
            tgt = (f">={row['target_x_faster']}x ref" if row["target_x_faster"]
                   else f"<={row['target_x_floor']}x fl" if row["target_x_floor"] else "")
            print(f"{row['load']:<6}{row['workload']:<14}{row['variant']:<14}{row['median_s']:>10.4f}{row['gflop']:>8.2f}"
                  f"{row['floor_s']:>9.4f}{row['x_floor']:>9.2f}{row['x_faster_than_ref']:>10.2f}{tgt:>12}")
        if r.get("bf16_fused_ab"):
            a = r["bf16_fused_ab"]
            print(f"bf16 encoder, fused path vs reference forward (alternating, {a['runs']} each): "
                  f"{a['fused_s']:.4f} s vs {a['reference_s']:.4f} s, {a['x_faster']:.2f}x; stage 0 in strips vs "
                  f"whole: {a['fused_s']:.4f} s vs {a['fused_whole_s']:.4f} s, {a['strips_x_faster']:.2f}x")
        for name, sec in r["compile_first_call_s"].items():
            print(f"{name}: first set_image (compiles) {sec:.1f} s")
        if r["quality_mean_iou"]:
            print("mean mask IoU vs fp32 (3 photographs, 51 masks each, random weights): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r["quality_mean_iou"].items()))
        if r["batched_encoding"]:
            b = r["batched_encoding"]
            print(f"batched encoding, {b['images']} images: {b['sequential_s_per_image']:.3f} s/image sequential, "
                  f"{b['batched_s_per_image']:.3f} s/image batched, speed-up {b['speedup']:.2f}x")
        for name, m in r["peak_memory"].items():
            extra = f", cuda peak {m['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in m else ""
            print(f"peak memory {name}: " + (f"VmHWM {m['vmhwm_mib']:.0f} MiB (after build {m['vmhwm_before_mib']:.0f})"
                                              + extra if "vmhwm_mib" in m else m.get("error", "?")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (vit_t only unless --models)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--models", default=None, help="comma list of vit_t, vit_b (default: both; --quick: vit_t)")
    parser.add_argument("--modes", default=None,
                        help="comma list of fp32,int8,bf16,fp16 (default: what this hardware runs natively)")
    parser.add_argument("--reps", type=int, default=0, help="encoder repetitions (default 3 quick, 7 full)")
    parser.add_argument("--compile", action="store_true",
                        help="also time each float mode with torch.compile (encoder and decoder)")
    parser.add_argument("--ab-fused", action="store_true",
                        help="also time the bf16 encoder's fused CPU path against its reference forward")
    parser.add_argument("--busy-core", action="store_true",
                        help="time quiet and then with a pinned busy loop on the last core")
    parser.add_argument("--busy-seconds", type=float, default=1800.0,
                        help="upper bound on the busy loop's life (it is stopped when timing ends)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-batch", action="store_true", help="skip the batched-encoding measurement")
    parser.add_argument("--json", default=None, help="write the results here (default benchmarks/speed_results.json)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--_memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        print(json.dumps(memory_child(*args._memory_child, args.device)))
        return
    from sam_drop_in.precision import cpu_has_native_bf16

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False.")
    if args.modes:
        modes = args.modes.split(",")
    else:
        modes = ["fp32", "bf16", "fp16"] if cuda else ["fp32", "int8"] + (["bf16"] if cpu_has_native_bf16() else [])
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    models = args.models.split(",") if args.models else (["vit_t"] if args.quick else ["vit_t", "vit_b"])
    started = time.time()
    res = {
        "conditions": {
            "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "native_bf16_cpu": cpu_has_native_bf16(),
            "loadavg_start": os.getloadavg(), "quick": args.quick, "modes": modes,
            "busy_core": args.busy_core, "compile": args.compile,
            "cuda_name": torch.cuda.get_device_name() if cuda else None,
        },
        "models": {},
    }
    for m in models:
        res["models"][m] = bench_model(m, modes, args)
    res["conditions"]["loadavg_end"] = os.getloadavg()
    res["conditions"]["wall_s"] = time.time() - started
    print_report(res)
    print(f"\nconditions: {res['conditions']}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "speed_results.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
