"""Where the bf16 vit_t encoder's time goes against its floor (issue #13), in one process.

Prints, for the fused bf16 encoder (``optimize(sam, "bf16")``) at 1024 px on this CPU:

- the encoder's time (fastest of ``--reps``), its FLOPs, the bf16 matmul peak measured in the same
  run and the floor ratio (time / (FLOPs / peak)), as bench_speed.py does;
- the profiler's self time by kind of op (matrix products, convolutions, attention, LayerNorm,
  layout copies, the rest), per call, and what the floor ratio would be without each kind;
- each stage's window attention alone (the encoder's own shapes: windows x heads x tokens), with
  its FLOPs and rate; the same attention as batched products (baddbmm, softmax, bmm) and as
  float32 SDPA; and the rate the matrix units give the same FLOPs as two large products;
- GELU's cost inside the encoder (the encoder with every GELU skipped, alternating with the real
  one: a cost measurement, not the model's maths), and the exact-erf GELU epilogue of one linear
  layer (stage 1's MLP shape), with and without it.

Run it quiet (nothing else on the machine): every figure is a ratio within this one run.

    python benchmarks/bench_bf16_parts.py --threads 2

On a CPU without native bf16 (``precision.cpu_has_native_bf16()`` False) bf16 is emulated and
the figures describe emulation, which the script says.
"""

import argparse
import os
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import count_flops, matmul_rate  # noqa: E402

# Self-time buckets: profiler op name prefix -> kind.
KINDS = (
    ("mkldnn::_linear_pointwise", "linear (oneDNN, fused epilogues)"),
    ("aten::addmm", "linear (oneDNN, fused epilogues)"),
    ("mkldnn::_convolution_pointwise", "convolutions"),
    ("aten::mkldnn_convolution", "convolutions"),
    ("aten::_scaled_dot_product", "window attention"),
    ("aten::native_layer_norm", "LayerNorm"),
    ("aten::copy_", "layout copies, padding"),
    ("aten::fill_", "layout copies, padding"),
    ("aten::constant_pad_nd", "layout copies, padding"),
)


def fastest(fn, reps: int, warm: int = 3) -> float:
    for _ in range(warm):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kind_of(name: str) -> str:
    for prefix, kind in KINDS:
        if name.startswith(prefix):
            return kind
    return "the rest (GELU passes, views, small ops)"


def attention_shapes(enc):
    """(stage, windows, heads, tokens, key_dim, value_dim, blocks) of each attention stage, at the
    resolution the encoder was built for (its blocks' input_resolution; 1024 px for vit_t)."""
    out = []
    for i, layer in enumerate(enc.layers):
        blocks = getattr(layer, "blocks", [])
        block = blocks[0] if len(blocks) else None
        if block is None or not hasattr(block, "attn"):
            continue
        h, w = block.input_resolution
        ws = block.window_size
        windows = -(-h // ws) * -(-w // ws)
        attn = block.attn
        out.append((i, windows, attn.num_heads, ws * ws, attn.key_dim, attn.d, len(blocks)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=9, help="encoder calls timed (the fastest is reported)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sam_drop_in import sam_model_registry
    from sam_drop_in.precision import cpu_has_native_bf16, optimize

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sam = optimize(sam_model_registry["vit_t"](), "bf16")
    enc = sam.image_encoder
    x = torch.randn(1, 3, 1024, 1024)
    print(f"threads {torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")

    with torch.no_grad():
        # The matmul peak sets the floor; on a shared machine it moves from minute to minute
        # (760-1950 GFLOP/s in bf16 on the 2-core AMX machine), so it is sampled after every timed
        # call and the fastest sample is kept, as bench_speed.py does.
        samples = [matmul_rate(torch.bfloat16, "cpu")]
        for _ in range(3):  # warm-up
            enc(x)
        t_enc = float("inf")
        for _ in range(args.reps):
            t_enc = min(t_enc, fastest(lambda: enc(x), 1, warm=0))
            samples.append(matmul_rate(torch.bfloat16, "cpu"))
        # FLOPs of the reference forward (the fused path's oneDNN ops have no FLOP formula): the
        # same work, counted the way bench_speed.py counts it.
        from sam_drop_in.modeling import _fast_tinyvit

        _fast_tinyvit.ENABLED = False
        try:
            flops = count_flops(lambda: enc(x))
        finally:
            _fast_tinyvit.ENABLED = True
        peak = max(samples)
        floor = flops / peak
        print(f"encoder {t_enc * 1e3:.1f} ms; {flops / 1e9:.1f} GFLOP; bf16 matmul peak {peak / 1e9:.0f} GFLOP/s "
              f"(samples {min(samples) / 1e9:.0f}-{peak / 1e9:.0f}); "
              f"floor {floor * 1e3:.1f} ms; ratio {t_enc / floor:.2f}x")

        from torch.profiler import profile

        calls = 3
        with profile() as prof:
            for _ in range(calls):
                enc(x)
        by_kind = defaultdict(float)
        for ev in prof.key_averages():
            by_kind[kind_of(ev.key)] += ev.self_cpu_time_total / 1e6 / calls  # seconds per encoder call
        total = sum(by_kind.values())
        print(f"\nself time per call under the profiler: {total * 1e3:.1f} ms (profiling adds overhead; read shares)")
        print(f"{'kind':45s} {'ms':>7s} {'share':>6s} {'ratio without it':>17s}")
        for kind, sec in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            without = t_enc * (1 - sec / total)
            print(f"{kind:45s} {sec * 1e3:7.1f} {sec / total:6.1%} {without / floor:16.2f}x")

        print("\nwindow attention alone (the encoder's shapes, bf16, with the bias mask):")
        for stage, windows, heads, n, d, dv, blocks in attention_shapes(enc):
            q = torch.randn(windows, heads, n, d).bfloat16()
            k = torch.randn(windows, heads, n, d).bfloat16()
            v = torch.randn(windows, heads, n, dv).bfloat16()
            bias = torch.randn(1, heads, n, n).bfloat16()
            t = fastest(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d ** -0.5), 15)
            f = 2 * windows * heads * n * n * (d + dv)
            # The same FLOPs as two large products: what the matrix units give them in one piece.
            m = int((windows * heads * n * n) ** 0.5)
            a = torch.randn(m, d).bfloat16()
            b = torch.randn(d, m).bfloat16()
            c = torch.randn(m, dv).bfloat16()
            s = a @ b
            t_big = fastest(lambda: (a @ b, s @ c), 15)
            f_big = 2 * m * m * (d + dv)
            # Other arrangements of the same attention: batched products in bf16, SDPA in float32.
            qb, kb, vb = (t_.reshape(windows * heads, n, -1) for t_ in (q, k, v))
            bb = bias.expand(windows, heads, n, n).reshape(windows * heads, n, n)
            t_bmm = fastest(lambda: torch.bmm(torch.baddbmm(bb, qb, kb.transpose(1, 2), alpha=d ** -0.5).softmax(-1), vb), 15)
            q32, k32, v32, b32 = q.float(), k.float(), v.float(), bias.float()
            t_32 = fastest(lambda: F.scaled_dot_product_attention(q32, k32, v32, attn_mask=b32, scale=d ** -0.5), 15)
            print(f"  stage {stage}: {windows} windows x {heads} heads x {n} tokens, x{blocks} blocks: "
                  f"{t * 1e3:.2f} ms per block ({f / t / 1e9:.0f} GFLOP/s; {t / (windows * heads) * 1e6:.1f} us per "
                  f"window-head); baddbmm/softmax/bmm {t_bmm * 1e3:.2f} ms; float32 SDPA {t_32 * 1e3:.2f} ms; "
                  f"the same FLOPs as two large products {f_big / t_big / 1e9:.0f} GFLOP/s")

        # GELU's share inside the encoder: the same fused encoder with every GELU skipped (wrong
        # maths, a cost measurement only), alternating with the real one in this process.
        from sam_drop_in.modeling import _fast_tinyvit

        real_conv, real_linear = _fast_tinyvit.conv, _fast_tinyvit.linear

        def conv_no_gelu(x, module, gelu=False, residual=None, padding=None):
            return real_conv(x, module, False, residual, padding)

        def linear_no_gelu(x, weight, bias, gelu=False, residual=None):
            return real_linear(x, weight, bias, False, residual)

        ab = {"with GELU": [], "without": []}
        try:
            for _ in range(args.reps):
                for key, (c, lin) in (("with GELU", (real_conv, real_linear)), ("without", (conv_no_gelu, linear_no_gelu))):
                    _fast_tinyvit.conv, _fast_tinyvit.linear = c, lin
                    ab[key].append(fastest(lambda: enc(x), 1, warm=0))
        finally:
            _fast_tinyvit.conv, _fast_tinyvit.linear = real_conv, real_linear
        gelu_ms = [(min(ab["with GELU"]) - min(ab["without"])) * 1e3,
                   (sorted(ab["with GELU"])[args.reps // 2] - sorted(ab["without"])[args.reps // 2]) * 1e3]
        print(f"\nencoder with / without its GELUs, alternating, {args.reps} calls each: "
              f"min {min(ab['with GELU']) * 1e3:.1f} / {min(ab['without']) * 1e3:.1f} ms; GELU costs "
              f"{gelu_ms[0]:.1f} ms (min) to {gelu_ms[1]:.1f} ms (median) = {gelu_ms[0] / 1e3 / floor:.2f}-"
              f"{gelu_ms[1] / 1e3 / floor:.2f}x the floor")

        m, kdim, n = 16384, 128, 512
        xs = torch.randn(m, kdim).bfloat16()
        w = torch.randn(n, kdim).bfloat16()
        bias = torch.randn(n).bfloat16()
        linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if linear is not None and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            plain = fastest(lambda: linear(xs, w, bias, "none", [], ""), 20)
            gelu = fastest(lambda: linear(xs, w, bias, "gelu", [], "none"), 20)
            tanh = fastest(lambda: linear(xs, w, bias, "gelu", [], "tanh"), 20)
            print(f"\nlinear {m}x{kdim} -> {n} (stage 1 MLP): {plain * 1e3:.2f} ms, with the erf-GELU epilogue "
                  f"{gelu * 1e3:.2f} ms: GELU {(gelu - plain) / (m * n) * 1e9:.2f} ns per element; tanh-GELU "
                  f"epilogue {tanh * 1e3:.2f} ms")
        h = torch.randn(m * n).bfloat16()
        print(f"ATen bf16 GELU on {m * n / 1e6:.1f} M elements: erf {fastest(lambda: F.gelu(h), 20) * 1e3:.2f} ms, "
              f"tanh {fastest(lambda: F.gelu(h, approximate='tanh'), 20) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
