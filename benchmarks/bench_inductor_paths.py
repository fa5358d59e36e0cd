"""Two Inductor routes for the bf16 vit_t encoder that the floor gap (issue #13) points at, each
against what the library runs today, in one process:

- ``--part attention``: each stage's window attention (the encoder's own shapes, with its
  per-head bias) as ``torch.compile``-d ``flex_attention`` (Inductor's C++ flex-attention
  template on CPU, the bias as a ``score_mod``) against ``scaled_dot_product_attention`` with
  the bias as its mask (the fused path's call). Prints compile time, the fastest of ``--reps``
  calls of each, alternating, and each one's largest difference to float32 SDPA.
- ``--part encoder``: the whole bf16 encoder compiled with Inductor freezing (what
  ``optimize(sam, "bf16", compile=True)`` does on CPU) against the same with ``max_autotune``
  and Inductor's C++ GEMM templates offered (``max_autotune_gemm_backends="CPP,ATEN"``), and the
  eager fused path. Prints compile times, the fastest and median of ``--reps`` calls, the cosine
  of each to eager, and how many template kernels the autotuned code holds.

Run it quiet (nothing else on the machine); every figure is a ratio within this one run, and the
bf16 matmul rate is printed for scale.

    python benchmarks/bench_inductor_paths.py --threads 2 --part attention
    python benchmarks/bench_inductor_paths.py --threads 2 --part encoder   # compiles: minutes

Needs a C++ compiler (Inductor on CPU). On a CPU without native bf16 the figures describe
emulation.
"""

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import matmul_rate  # noqa: E402
from bench_bf16_parts import attention_shapes, fastest  # noqa: E402


def bf16_encoder():
    from sam_drop_in import sam_model_registry
    from sam_drop_in.precision import optimize

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimize(sam_model_registry["vit_t"](), "bf16").image_encoder


def part_attention(reps: int) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    for stage, windows, heads, tokens, key_dim, value_dim, blocks in attention_shapes(bf16_encoder()):
        q, k = (torch.randn(windows, heads, tokens, key_dim, generator=g).bfloat16() for _ in range(2))
        v = torch.randn(windows, heads, tokens, value_dim, generator=g).bfloat16()
        bias = torch.randn(1, heads, tokens, tokens, generator=g).bfloat16()
        table = bias[0].float()
        scale = key_dim ** -0.5

        def score_mod(score, b, h, qi, ki):
            return score + table[h, qi, ki]

        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        t0 = time.perf_counter()
        got_flex = flex(q, k, v, score_mod=score_mod, scale=scale)
        compile_s = time.perf_counter() - t0
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # noqa: E731
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=scale)
        t_sdpa, t_flex = float("inf"), float("inf")
        for _ in range(reps):  # alternating, so a slow minute hits both
            t_sdpa = min(t_sdpa, fastest(sdpa, 1, warm=1))
            t_flex = min(t_flex, fastest(lambda: flex(q, k, v, score_mod=score_mod, scale=scale), 1, warm=1))
        err = lambda y: float((y.float() - want).abs().max())  # noqa: E731
        print(f"stage {stage} ({windows} windows x {heads} heads x {tokens} tokens, {blocks} blocks): "
              f"SDPA {t_sdpa * 1e3:.2f} ms, flex_attention {t_flex * 1e3:.2f} ms ({t_flex / t_sdpa:.2f}x; "
              f"compiled in {compile_s:.1f} s); max |diff| to float32 SDPA: SDPA {err(sdpa()):.4f}, flex {err(got_flex):.4f}")


def part_encoder(reps: int) -> None:
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    enc = bf16_encoder()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1)).bfloat16()
    routes = {"freezing": dict(freezing=True),
              "freezing + max_autotune (CPP,ATEN GEMMs)": dict(freezing=True, max_autotune=True,
                                                               max_autotune_gemm_backends="CPP,ATEN")}
    with torch.no_grad():
        want = enc(x).float()
        calls = {"eager (fused path)": lambda: enc(x)}
        for name, options in routes.items():
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(enc)
            t0 = time.perf_counter()
            with inductor_config.patch(**options):
                got = compiled(x)
            cos = float(F.cosine_similarity(got.float().flatten(), want.flatten(), dim=0))
            # Inductor's counters: AMX micro-GEMMs generated as autotuning candidates, and C++
            # template kernels in the code it kept (a candidate that loses leaves none). Each
            # autotuned product's contest is printed by Inductor itself above this line.
            ind = counters["inductor"]
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s; cosine to eager {cos:.6f}; "
                  f"AMX GEMM template candidates {ind['cpp_micro_gemm_amx_counter']}, "
                  f"template kernels kept {ind['cpp_templated_kernel_counter']}")

            def call(compiled=compiled, options=options):
                with inductor_config.patch(**options):
                    return compiled(x)

            calls[name] = call
        times = {name: [] for name in calls}
        for _ in range(reps):  # alternating
            for name, fn in calls.items():
                times[name].append(fastest(fn, 1, warm=0))
        rate = matmul_rate(torch.bfloat16, "cpu")
        for name, ts in times.items():
            print(f"{name}: fastest {min(ts) * 1e3:.1f} ms, median {statistics.median(ts) * 1e3:.1f} ms")
        print(f"bf16 matmul rate after the runs: {rate / 1e9:.0f} GFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--part", choices=("attention", "encoder"), default="attention")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from sam_drop_in.precision import cpu_has_native_bf16

    print(f"threads {torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    (part_attention if args.part == "attention" else part_encoder)(args.reps)


if __name__ == "__main__":
    main()
