"""The native program's tanh on whole vectors (``native_step._MATH_F32_VEC``) is bitwise its scalar
tanh (``_MATH_F32``'s ``rf_tanh``, checked against float64 in tests/test_review_qa24.py) in every
lane: at this CPU's vector width (AVX-512's own branch where the CPU has it) and at 32 and 16
bytes, on 2^22 random bit patterns (NaNs, infinities, subnormals included) and the branch edges."""
from __future__ import annotations

import ctypes

import pytest
import torch

from reptile_fast import native_build, native_step

pytestmark = pytest.mark.skipif(native_build.find_compiler() is None, reason="no C compiler")


def _both_tanhs(vec_bytes: int):
    VL = vec_bytes // 4
    source = ("#include <math.h>\n#include <stdint.h>\n#if defined(__AVX512F__)\n#include <immintrin.h>\n#endif\n"
              f"typedef float vec __attribute__((vector_size({vec_bytes})));\n#define VL {VL}\n"
              "#define VZERO ((vec){0})\n" + native_step._MATH_F32 + native_step._MATH_F32_VEC +
              "void rf_eval(const float *x, float *scalar, float *vector, int64_t n) {\n"
              "    for (int64_t i = 0; i < n; i++) scalar[i] = rf_tanh(x[i]);\n"
              "    for (int64_t i = 0; i + VL <= n; i += VL) {\n"
              "        vec v; memcpy(&v, x + i, sizeof v); v = rf_vtanh(v); memcpy(vector + i, &v, sizeof v);\n"
              "    }\n}\n")
    source = "#include <string.h>\n" + source
    lib, _, _ = native_build.load_library(source, "vector_tanh", what="the vector tanh check")
    fn = lib.rf_eval
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]

    def run(x):
        scalar, vector = torch.empty_like(x), torch.empty_like(x)
        fn(x.data_ptr(), scalar.data_ptr(), vector.data_ptr(), x.numel())
        return scalar, vector

    return run


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 22,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, 0.625, -0.625, 0.62499994, -0.62499994, 44.18813, 44.18814, 1e-45,
                          -1e-45, 1e-38, 88.0, -88.0, float("inf"), float("-inf"), float("nan")])
    dense = torch.linspace(-12.0, 12.0, 1 << 16)
    x = torch.cat([bits.view(torch.float32), edges, dense])
    return x[: x.numel() // 16 * 16].contiguous()


@pytest.mark.parametrize("vec_bytes", sorted({native_step.vector_bytes(), 32, 16}, reverse=True))
def test_vector_tanh_is_the_scalar_tanh_bit_for_bit(vec_bytes):
    x = _inputs()
    scalar, vector = _both_tanhs(vec_bytes)(x)
    same = scalar.view(torch.int32) == vector.view(torch.int32)
    # a NaN's payload may differ between the two ways of passing it through: NaN stays NaN
    same |= torch.isnan(scalar) & torch.isnan(vector)
    bad = (~same).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} lanes differ at {vec_bytes}-byte vectors, e.g. x = "
                              f"{x[bad[:5]].tolist()}: scalar {scalar[bad[:5]].tolist()}, vector {vector[bad[:5]].tolist()}")
