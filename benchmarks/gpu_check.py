"""The GPU check: run it when an accelerator is lent.

    python benchmarks/gpu_check.py            # exits 2 with a message when there is no CUDA device

Runs, on CUDA:
  1. the precision tests (bf16 and fp16 through every public entry point, agreement with fp32),
     the parity tests and the automatic-mask-generator tests, with ``--device cuda``: the tests
     that take the ``device`` fixture build their models there;
  2. the speed benchmark, ``benchmarks/bench_speed.py --device cuda`` (adds bf16/fp16 variants).

Exit status: 0 when every step passed, 1 when a step failed, 2 when there is no CUDA device.
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_precision.py", "compat_tests/test_parity.py", "compat_tests/test_amg_parity.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="CUDA device to check (default cuda)")
    parser.add_argument("--skip-bench", action="store_true", help="run the tests only")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
            f"torch.cuda.is_available() is False). Run this on a machine with an NVIDIA GPU and a CUDA "
            "build of torch; on the CPU the same tests run with `python -m pytest -q -n 2`.",
            file=sys.stderr,
        )
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}", flush=True)
    steps = [[sys.executable, "-m", "pytest", "-q", "--device", args.device, *TESTS]]
    if not args.skip_bench:
        steps.append([sys.executable, str(ROOT / "benchmarks" / "bench_speed.py"), "--device", args.device])
    failed = []
    for cmd in steps:
        print("gpu_check: $", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(cmd[2] if cmd[1] == "-m" else Path(cmd[1]).name)
    print("gpu_check:", "failed: " + ", ".join(failed) if failed else "all passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
