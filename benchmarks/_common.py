"""Helpers shared by the speed benchmark: identical weights for ours and the reference, real
photographs, FLOP counting, matmul rate, peak memory, mask agreement."""

import contextlib
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch

warnings.filterwarnings("ignore", module="timm")
warnings.filterwarnings("ignore", message=".*Overwriting tiny_vit.*")

REFERENCE = {"vit_t": "mobile_sam", "vit_b": "segment_anything"}
IMAGE_NAMES = ("coffee.jpg", "astronaut.jpg", "chelsea.jpg")


def load_images() -> List[np.ndarray]:
    from sam_drop_in.testing import load_image

    return [load_image(n) for n in IMAGE_NAMES]


def build_pair(model_type: str, device: str = "cpu", seed: int = 0):
    """(ours, reference) with the same perturbed random weights, both in eval mode."""
    import importlib

    import sam_drop_in
    from sam_drop_in.testing import perturbed_state_dict

    ref_mod = importlib.import_module(REFERENCE[model_type])
    torch.manual_seed(seed)
    ref = ref_mod.sam_model_registry[model_type]()
    sd = perturbed_state_dict(ref.state_dict(), seed=seed)
    ref.load_state_dict(sd)
    ref.eval()  # MobileSAM's attention-bias cache is stale until eval() runs after loading
    ours = sam_drop_in.sam_model_registry[model_type]()
    ours.load_state_dict(sd)
    return ours.to(device), ref.to(device), sd


def build_ours(model_type: str, sd, device: str = "cpu"):
    import sam_drop_in

    m = sam_drop_in.sam_model_registry[model_type]()
    m.load_state_dict(sd)
    return m.to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 10) -> float:
    """Peak FLOP/s of an n x n x n matrix product: the fastest of ``reps`` after three warm-ups.

    The fastest, not the median: this rate sets the floors, which must be what the hardware can
    do. On the shared AMX machine the median of 5 varied 650-1900 GFLOP/s in bf16 between runs
    (matrix units shared or throttled at times), which made floors up to 3x too lenient."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(reps)]
    return 2 * n**3 / min(times)


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    # FlopCounterMode has no formula for the CPU flash kernel: QK^T and PV, 2 FLOPs per MAC.
    *batch, l, e = q_shape
    s, ev = k_shape[-2], v_shape[-1]
    return 2 * int(np.prod(batch)) * l * s * (e + ev)


def count_flops(fn: Callable[[], object]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def vmhwm_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# A busy loop in its own process, pinned to one core, that ends by itself after ``seconds`` even
# if the benchmark dies without stopping it.
_BUSY_LOOP = "import os, sys, time\nos.sched_setaffinity(0, {int(sys.argv[1])})\nend = time.monotonic() + float(sys.argv[2])\nwhile time.monotonic() < end:\n    pass\n"


@contextlib.contextmanager
def busy_core(seconds: float, core: Optional[int] = None) -> Iterator[Optional[int]]:
    """Keeps one core busy with a pinned busy-loop process while the block runs.

    Arguments:
      seconds (float): upper bound on the loop's life; it stops earlier when the block ends.
      core (int or None): the core to load; default the highest-numbered core this process may
        use (the "other" core on a 2-core machine, where torch's second thread also runs).

    Yields:
      (int or None): the loaded core, or None where affinity cannot be set (not Linux, or one
        core only), in which case nothing is started.
    """
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    cores = sorted(os.sched_getaffinity(0))
    if core is None:
        if len(cores) < 2:
            yield None
            return
        core = cores[-1]
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(core), str(seconds)])
    try:
        time.sleep(0.2)  # let it start and settle on its core
        yield core
    finally:
        proc.terminate()
        proc.wait()
