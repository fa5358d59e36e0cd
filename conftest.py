"""Options shared by compat_tests/ and tests/.

``--device`` (default: the environment variable SAM_DROP_IN_TEST_DEVICE, else ``cpu``) chooses
where the tests that take the ``device`` fixture run: the precision, parity and AMG tests.
``benchmarks/gpu_check.py`` runs them with ``--device cuda`` when an accelerator is available;
everything else runs on the CPU whatever the option says.
"""

import os

# README's test command runs the suite in two pytest-xdist workers, each at the default thread
# count (what users run), so the workers' OpenMP threads outnumber the cores. libgomp's default
# wait at the end of a parallel region spins, burning the core the other worker needs: on the
# 2-core machine (2026-12-01) the suite took 988 s in one process, and two spinning workers were
# slower still (half the suite in 13 min); with sleeping waits two workers took 609 s. Only the
# waiting changes: thread count, kernels and results are the same. libgomp reads this once, when
# torch loads it, so it is set before torch is imported, and only in xdist's workers (a plain
# `pytest` keeps the default).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default=os.environ.get("SAM_DROP_IN_TEST_DEVICE", "cpu"),
        help="torch device for the precision, parity and AMG tests (cpu, cuda, cuda:1); default cpu",
    )


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--device {name!r} is not a torch device ({err}); use cpu or cuda.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--device {name} was asked for but this torch has no usable CUDA device "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on the CPU instead."
            )
        # The parity tolerances are float32's: TF32 matrix products (cuDNN's default for
        # convolutions) round inputs to 10 mantissa bits and would exceed them.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif device.type != "cpu":
        raise pytest.UsageError(f"--device {name}: only cpu and cuda are supported by the test suite.")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The torch device chosen with --device (cpu unless asked otherwise)."""
    return torch.device(request.config.getoption("--device"))
