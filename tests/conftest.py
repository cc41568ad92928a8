"""Test setup: the Triton interpreter on machines without CUDA, TF32 off, fixed seeds."""
import os
from pathlib import Path

import pytest
import torch

# Must happen before any Triton kernel module is imported: @triton.jit reads it at decoration.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Correctness tests compare fp32 results to the last float: no TF32 anywhere.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# ... and fp32 products in fp32 on every device: "medium" ran them in bf16 on CPUs with bf16 matrix
# units (QA71), a setting a user's environment could leave on
torch.set_float32_matmul_precision("highest")



#: what a run on a CUDA machine without TRITON_INTERPRET=1 must be told: the kernels compile for the
#: GPU there, so tests that launch a Triton kernel on CPU tensors (most of the suite's kernel
#: tests, written for the interpreter) fail with "needs a CUDA device, or TRITON_INTERPRET=1"
CUDA_RUN_NOTE = ("CUDA present and TRITON_INTERPRET is not 1: Triton kernels compile for the GPU. "
                 "The CUDA cases: python -m pytest -q -m gpu; everything else (the CPU suite, kernels "
                 "under the interpreter): CUDA_VISIBLE_DEVICES= python -m pytest -q")


def pytest_report_header(config):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return CUDA_RUN_NOTE


def pytest_configure(config):
    # Triton 3.6's interpreter breaks on loops with runtime bounds under NumPy >= 2.4
    # (triton-lang/triton#9171): every kernel test would fail with a cryptic TypeError.
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    version = lambda text: tuple(int(p) for p in text.split(".")[:2] if p.isdigit())  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"Triton {triton.__version__}'s interpreter cannot run with NumPy "
                                f"{numpy.__version__} (triton-lang/triton#9171): install 'numpy<2.4' "
                                f"or Triton >= 3.8 to run the kernel tests on a CPU")


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SEED_PROGRAM = SHARED / "seed" / "seed_program.py"
OMNIGLOT = SHARED / "data" / "omniglot"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests' tensors are tiny: with 2+ threads on a busy 2-core CI box their time goes to
    # OpenMP hand-offs (measured: test_trainer + test_cli 269 s with 2 threads, 20 s with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _threads_restored():
    # a test that sets torch's thread count (the jobs' --threads, a bench script's main) leaves the
    # next test the session's one thread
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def seed_module():
    """The user's seed program, imported from ../shared (skipped where it is absent)."""
    if not SEED_PROGRAM.exists():
        pytest.skip("../shared/seed/seed_program.py is not present")
    import importlib.util

    spec = importlib.util.spec_from_file_location("seed_program", SEED_PROGRAM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its __main__ block does not run
    return module
