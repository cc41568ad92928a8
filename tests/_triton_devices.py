"""The devices the Triton tests run on: the CPU under the interpreter, and CUDA where present."""
import pytest
import torch

from reptile_fast.kernels import mlp_inner_loop as K

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not K.INTERPRETED,
                                                 reason="CPU runs need TRITON_INTERPRET=1 at import")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")]),
]


#: fp32 paths that differ only in summation order (the project's tolerance)
RTOL, ATOL = 1e-5, 1e-6


def assert_same_across_configs(got, want, device, what):
    """One kernel's outputs under two launch configurations (``preload``, ``num_warps``, programs)
    on the same inputs.

    Under the interpreter every op is NumPy's on whole arrays whatever the configuration, so the
    bits must match.  Compiled, each configuration is a different kernel: Triton chooses its
    register layouts, and with them the order in which a row reduction adds its terms (the
    TTGIR's ``tt.reduce`` layouts differ between ``preload=True`` and ``False``:
    ``bench/results/triton-reduction-layouts-sm90-triton3.6.json``), so on a GPU the same sums
    may round differently: within fp32 summation-order rounding, not bit for bit (an H200 gave
    different bits for ``preload=False``: ``bench/results/gpu-h200-2026-12-04-s16/pytest-gpu/``)."""
    if device == "cpu":
        same = torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert same, f"{what}: not bitwise equal under the interpreter"
    else:
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, equal_nan=True,
                                   msg=lambda m: f"{what}: beyond fp32 summation-order rounding\n{m}")
