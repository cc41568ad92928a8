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
