"""ONNX Runtime vs PyTorch: image encoder and prompt decoder, side by side in one run.

    python benchmarks/bench_onnx.py                      # vit_t, random weights, astronaut.jpg
    python benchmarks/bench_onnx.py --model-type vit_b --repeats 2 --int8
    python benchmarks/bench_onnx.py --checkpoint hf://dhkim2810/MobileSAM/mobile_sam.pt

Times are medians over --repeats runs after one warm-up, for SamPredictor.set_image /
SamOnnxPredictor.set_image (resize + encoder) and .predict (one point, three masks, upscaled to
the original size). The machine is shared and noisy: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sam_drop_in import SamPredictor, sam_model_registry  # noqa: E402
from sam_drop_in.onnx_export import export_decoder, export_encoder, quantize  # noqa: E402
from sam_drop_in.onnx_predictor import SamOnnxPredictor  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-run allocations, lazy kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_t")
    parser.add_argument("--checkpoint", default=None, help="Default: random weights (timing does not depend on them).")
    parser.add_argument("--image", default=str(REPO / "examples" / "images" / "astronaut.jpg"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads (default: library defaults).")
    parser.add_argument("--int8", action="store_true", help="Also time the int8 dynamically quantised models.")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import onnxruntime as ort

    sess_options = None
    if args.threads:
        torch.set_num_threads(args.threads)
        sess_options = ort.SessionOptions()
        sess_options.intra_op_num_threads = args.threads

    image = np.asarray(Image.open(args.image).convert("RGB"))
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w // 2, h // 2]]), point_labels=np.array([1]))
    torch.manual_seed(0)
    model = sam_model_registry[args.model_type](checkpoint=args.checkpoint)

    with tempfile.TemporaryDirectory() as tmp:
        enc, dec = f"{tmp}/encoder.onnx", f"{tmp}/decoder.onnx"
        t = time.perf_counter()
        export_encoder(model, enc)
        export_decoder(model, dec)
        print(f"export ({args.model_type}, opset 17): {time.perf_counter() - t:.1f} s")

        torch_p = SamPredictor(model)
        onnx_p = SamOnnxPredictor(enc, dec, sess_options=sess_options)
        rows = [
            ("encoder (set_image)", median_time(lambda: torch_p.set_image(image), args.repeats),
             median_time(lambda: onnx_p.set_image(image), args.repeats)),
            ("decoder (predict, 1 point)", median_time(lambda: torch_p.predict(**point), args.repeats * 5),
             median_time(lambda: onnx_p.predict(**point), args.repeats * 5)),
        ]
        emb_err = float(np.abs(onnx_p.features - torch_p.features.numpy()).max())
        m_t = torch_p.predict(**point)[0]
        m_o = onnx_p.predict(**point)[0]
        agree = float((m_t == m_o).mean())
        if args.int8:
            quantize(enc, f"{tmp}/encoder_int8.onnx")
            quantize(dec, f"{tmp}/decoder_int8.onnx")
            q_p = SamOnnxPredictor(f"{tmp}/encoder_int8.onnx", f"{tmp}/decoder_int8.onnx", sess_options=sess_options)
            q_enc = median_time(lambda: q_p.set_image(image), args.repeats)
            q_dec = median_time(lambda: q_p.predict(**point), args.repeats * 5)
            m_q = q_p.predict(**point)[0]
            iou = np.logical_and(m_q, m_o).sum((1, 2)) / np.maximum(np.logical_or(m_q, m_o).sum((1, 2)), 1)

    print(f"model {args.model_type}, image {Path(args.image).name} {w}x{h}, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, torch threads {torch.get_num_threads()}")
    print(f"{'step':<28}{'PyTorch':>12}{'ORT fp32':>12}{'torch/ORT':>11}" + (f"{'ORT int8':>12}{'torch/int8':>12}" if args.int8 else ""))
    for i, (name, t_torch, t_ort) in enumerate(rows):
        line = f"{name:<28}{t_torch * 1e3:>10.1f}ms{t_ort * 1e3:>10.1f}ms{t_torch / t_ort:>10.2f}x"
        if args.int8:
            tq = (q_enc, q_dec)[i]
            line += f"{tq * 1e3:>10.1f}ms{t_torch / tq:>11.2f}x"
        print(line)
    print(f"embedding max |ORT - torch|: {emb_err:.2e}; fp32 masks pixel agreement: {agree:.6f}")
    if args.int8:
        print(f"int8 vs fp32 ORT mask IoU (3 masks): {np.round(iou, 4).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
