"""fp32 special functions with a bounded error on every device, for both fused kernels.

On NVIDIA GPUs fp32 ``tl.exp`` lowers to ``ex2.approx``, ``tl.log`` to ``lg2.approx`` and ``/``
to ``div.full`` (all approximate), while the Triton interpreter computes them in NumPy: the same
kernel then has different accuracy on the two.  These are written in plain fp32 FMA arithmetic
(and ``tl.math.div_rn``, IEEE round-to-nearest division), so one error bound (``ACCURACY``) holds
under the interpreter and on a GPU; ``tests/test_kernel_mlp_meta_step_v2.py`` checks it against
float64, on CUDA too when present.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACCURACY", "COMPILE_OPTIONS"]

#: Error bounds of the special functions, relative to the float64 value, in units of
#: 2^-23 (fp32's ulp at 1): asserted against float64 by the tests on every device they run on.
#:   exp:     |x| <= 87 (finite, normal result)
#:   tanh:    all finite x (odd Taylor series to x^15 for |x| < 0.4, else (1 - e^{-2|x|}) / (1 + e^{-2|x|}))
#:   sigmoid: x >= -80 (beyond, the result is < 2e-35 and its absolute error < 1e-38)
#:   log:     x >= 1 (the softmax's sum of exponentials; absolute error in units of 2^-23 · max(1, |log x|))
#: Why: the polynomials' truncation errors are < 0.1 ulp; each exp rounds the reduced argument,
#: ~7 Horner steps (≈ 1 ulp together) and the scaling (0.5); tanh's (1 - e) / (1 + e) with
#: e <= e^-0.8 adds <= 0.82·err(e) + 1.5 ulp; sigmoid <= err(e) + 1 ulp.  Measured maxima over ~46k
#: points under the interpreter: 0.72, 1.25, 1.07, 0.72; the bounds leave room for a GPU's FMA
#: contraction, which changes the roundings (the GPU check records the measured maxima there).
ACCURACY = {"exp": 2.0, "tanh": 3.0, "sigmoid": 3.0, "log": 2.0}

#: Compile options every launch of the fused kernels passes (and ``compile_for_target`` compiles
#: with).  FMA contraction stays on, as Triton 3.6-3.8 default to and as ``ACCURACY`` and the
#: sm_90a records (bench/results/triton-compile-*) assume: Triton 3.9 warns when it is left unset
#: and 3.10 turns it off by default, which would change every kernel's roundings silently.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@triton.jit
def _exp(x):
    """e^x in fp32 arithmetic only (no ex2.approx): Cody–Waite reduction x = k ln2 + r,
    |r| <= ln2 / 2, degree-7 Taylor polynomial (truncation < 6e-9 relative), scaled by 2^k built
    from exponent bits.  NaN stays NaN, overflow gives inf, x < -104 gives 0."""
    xc = tl.minimum(tl.maximum(x, -104.0), 89.0)
    k = tl.floor(xc * 1.4426950408889634 + 0.5)
    # ln2 = 0.693145751953125 (exact in 16 bits, so k * hi is exact for |k| <= 150) + 1.4286e-6
    r = xc - k * 0.693145751953125
    r = r - k * 1.428606765330187e-06
    p = 1.9841269841269841e-04  # 1/5040
    p = p * r + 1.3888888888888889e-03  # 1/720
    p = p * r + 8.3333333333333333e-03  # 1/120
    p = p * r + 4.1666666666666667e-02  # 1/24
    p = p * r + 1.6666666666666667e-01  # 1/6
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # 2^k as two normal powers of two (k in [-150, 128]): p * 2^k1 is exact, one rounding after
    ki = k.to(tl.int32)
    k1 = ki >> 1
    k2 = ki - k1
    s1 = ((k1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((k2 + 127) << 23).to(tl.float32, bitcast=True)
    y = p * s1 * s2
    return tl.where(x != x, x, y)


@triton.jit
def _log(x):
    """ln x for x >= 1 (finite), fp32 arithmetic only: x = 2^k m, m in [1/√2, √2),
    ln m = 2 atanh((m - 1) / (m + 1)) by its odd series to s^15 (|s| <= 0.172: truncation < 1e-13)."""
    bits = x.to(tl.int32, bitcast=True)
    k = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > 1.4142135623730951
    m = tl.where(big, m * 0.5, m)
    k = tl.where(big, k + 1, k)
    s = tl.math.div_rn(m - 1.0, m + 1.0)
    s2 = s * s
    p = 0.06666666666666667
    p = p * s2 + 0.07692307692307693
    p = p * s2 + 0.09090909090909091
    p = p * s2 + 0.1111111111111111
    p = p * s2 + 0.14285714285714285
    p = p * s2 + 0.2
    p = p * s2 + 0.3333333333333333
    log_m = 2.0 * s + (2.0 * s) * (s2 * p)
    kf = k.to(tl.float32)
    y = kf * 0.693145751953125 + (kf * 1.428606765330187e-06 + log_m)
    return tl.where(x != x, x, y)


@triton.jit
def _tanh(x):
    """tanh with a bounded error (``ACCURACY["tanh"]``); NaN stays NaN.

    |x| >= 0.4 as 1 - 2 (e / (1 + e)), e = e^{-2|x|}, the last step one fma (2q is exact).
    (1 - e) / (1 + e), the former form, rounds 1 ± e to 1 once e is below half an ulp: it reached
    1.0 from |x| = 8.66, where tanh rounds to 1 only from 9.01, and 1 - y², the gradient, went to
    0 there.  Interpreter (``python -m bench.tanh_accuracy``): over every float32 in [0.4, 1) max
    error 1.60 x 2^-23 at 0.4155 (the former form 1.34), mean 0.33 (0.39); on [0.4, 10] mean 0.14
    (0.26).
    As many operations as the former form; written as ``1 - div_rn(2e, 1 + e)`` instead (the same
    numbers) Triton 3.6 spilled inside the sine MLP's inner step on sm_90a (15 / 13 LDL / STL per
    step, against none; an ad-hoc compile, not recorded)."""
    ax = tl.abs(x)
    e = _exp(-2.0 * ax)
    big = tl.fma(-2.0, tl.math.div_rn(e, 1.0 + e), 1.0)
    x2 = x * x
    p = -1.4558343870513183e-03  # -929569/638512875
    p = p * x2 + 3.5921280365724810e-03  # 21844/6081075
    p = p * x2 - 8.8632355299021966e-03  # -1382/155925
    p = p * x2 + 2.1869488536155203e-02  # 62/2835
    p = p * x2 - 5.3968253968253968e-02  # -17/315
    p = p * x2 + 1.3333333333333333e-01  # 2/15
    p = p * x2 - 3.3333333333333333e-01  # -1/3
    small = x + x * x2 * p
    return tl.where(ax < 0.4, small, tl.where(x < 0.0, -big, big))


@triton.jit
def _sigmoid(x):
    """1 / (1 + e^{-x}) with ``_exp`` and an IEEE division (``ACCURACY["sigmoid"]``)."""
    return tl.math.div_rn(1.0, 1.0 + _exp(-x))
