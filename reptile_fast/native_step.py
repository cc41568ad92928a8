"""The whole Reptile meta-step of a plain MLP as a small C function: compiled once, cached on disk.

``MetaStepProgram``'s "native" mode (``reptile_fast.compiled_step``).  For one MLP shape and inner-
loop setting this module generates a C program (every size, the learning rate, the activations and
the loss are compile-time constants; ~1000 lines for the seed's MLP, most of it unrolled register
tiles), compiles it with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``: the
compiler inductor itself needs) into a shared library, and calls it through ``ctypes`` on the
tensors' memory.  One call runs a whole chunk of meta-steps:

    for each meta-step m:  for each task t:  θ ← φ;  S × (forward, loss gradient, backward, SGD);
                           d += θ − φ
                           φ ← φ + ε_m · d / T

The library is cached under ``cache_dir()`` (``$REPTILE_FAST_CACHE_DIR``, else
``$XDG_CACHE_HOME/reptile_fast``, else ``~/.cache/reptile_fast``; a per-user folder in the
temporary directory when that one is not writable), named by a hash of the C source, the
compiler's identity, its flags and the CPU's feature flags, so a later process loads it in
milliseconds; the first one compiles it in about 0.5 s of CPU (``torch.compile``'s ``scan`` of
the same program takes 10–25 s, in every process: inductor does not cache it across processes).
Files are written to a temporary name and renamed: concurrent processes never load a half-written
library; each ends in its own digest, checked before loading (a damaged file is compiled afresh).

Layout: every matrix is padded to whole vectors of this CPU's widest vector (``vector_bytes``) and
kept in the layout its products read (``W [out][in]``, ``Wᵀ [in][out]``, or both with the same
numbers: the SGD step updates ``W`` and copies it into ``Wᵀ`` by in-register block transposes,
cheaper than a second weight-gradient product; with AVX-512 in fp32 half of a 16 × 16 block's
interleaving is done by 16-byte loads and inserts, which need no shuffle port.  A task's last
inner step skips that copy — nothing reads its ``Wᵀ`` — and φ's ``Wᵀ`` is transposed from φ's ``W``
once per meta-step instead of being averaged: the same numbers, QA57); products are register
tiles of explicit vectors (GCC/Clang ``vector_size``) with the reduction index innermost.

Arithmetic (fp32 or fp64, the parameters' dtype): the reference's formulas in a fixed order —
``z = b + Σ_i h_i W_{oi}`` (i ascending; outputs narrower than half a vector: lane-wise partial
sums, then the lanes in order), the aten backward formulas (``tanh_backward`` ``g·(1 − y²)``,
``sigmoid_backward`` ``g·(1 − y)·y``, ``threshold_backward``, ``mse_loss_backward``
``(2/n)·(out − y)``, ``_log_softmax_backward_data``), SGD as ``p + (−lr)·g``, sums over the
minibatch in row order.  ``a·b + c`` becomes one fused multiply-add where the CPU has one
(``-ffp-contract=fast``: one rounding instead of two); nothing is reassociated (no
``-ffast-math``).  In fp32, tanh and the sigmoid's exponential are branch-free polynomials
(Cephes' ``tanhf``/``expf``, within 2 ulp) so that the compiler vectorises them (tanh is also
written out on whole vectors, operation for operation: bitwise the same on all 2^32 inputs, with
fewer instructions than GCC's masked vectorisation of the scalar function); fp64 and the
cross-entropy's exp/log use libm.  NaN/inf propagate (the callers check each chunk).  Results
agree with the reference backend within the project's rtol 1e-5 / atol 1e-6, and fp64 within
1e-10 (tests/test_native_step.py); a given CPU, compiler and flags give bitwise-repeatable results.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .mlp_spec import MLPSpec
from .native_build import (_FLAGS, NativeCompilerError, _cpu_identity, _intact, _usable_cache_dir, cache_dir,
                           find_compiler, library_key, load_library)

__all__ = ["NativeProgram", "NativeCompilerError", "find_compiler", "cache_dir", "generate_source"]

#: bump when the generated code changes meaning (it is part of every cache key anyway)
_VERSION = 1
_SUPPORTED_ACTS = ("identity", "tanh", "relu", "sigmoid")
_LOSSES = ("mse", "cross_entropy")
# ----------------------------------------------------------------------------- C source
def _lit(value: float, real: str) -> str:
    """An exact C literal of ``value`` rounded to ``real`` (hex float, then the cast rounds)."""
    return f"(({real}){float(value).hex()})"


_MATH_F32 = r"""
/* Cephes expf: |x| clamped to the finite range by comparisons (NaN passes through), 2^n by bits. */
static inline float rf_exp(float x) {
    x = x > 88.3762626647949f ? 88.3762626647949f : x;
    x = x < -87.3365478515625f ? -87.3365478515625f : x;
    /* n = round(x / ln 2) by the 1.5 * 2^23 trick (no floorf: it would not vectorise), and
       the same sum's bits give 2^n */
    union { float f; uint32_t u; } v;
    v.f = x * 1.44269504088896341f + 12582912.0f;
    float n = v.f - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    float e = p * (r * r) + r + 1.0f;
    v.u = ((v.u - 0x4B400000u) + 127u) << 23;
    return e * v.f;
}
/* Cephes tanhf: an odd polynomial below 0.625, 1 - 2/(e^{2|x|} + 1) above. */
static inline float rf_tanh(float x) {
    float a = fabsf(x);
    float z = x * x;
    float small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z
                    + 1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
    float e = rf_exp(2.0f * a);
    float big = copysignf(1.0f - 2.0f / (e + 1.0f), x);
    return a < 0.625f ? small : big;
}
static inline float rf_sigmoid(float x) { return 1.0f / (1.0f + rf_exp(-x)); }
"""

#: after ``_MATH_F32``, where ``vec``, ``VL`` and ``VZERO`` are defined (``_MATH_F32`` itself
#: compiles on its own: tests/test_review_qa24.py checks its functions against float64)
_MATH_F32_VEC = r"""
/* rf_tanh on a whole vector, operation for operation (the same expressions, so the same fused
   multiply-adds): bitwise rf_tanh in every lane (checked on all 2^32 inputs).  Written out
   because GCC's vectorisation of rf_tanh computes both branches under masks, with more
   instructions.  exp's argument 2|x| is >= 0 or NaN, so its lower clamp never applies. */
typedef int32_t rf_ivec __attribute__((vector_size(sizeof(vec))));
typedef uint32_t rf_uvec __attribute__((vector_size(sizeof(vec))));
#if defined(__AVX512F__) && VL == 16
#define RF_MIN(c, t) _mm512_min_ps(c, t)  /* c < t ? c : t (t when NaN), as t > c ? c : t */
#define RF_SEL_LT(a, c, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, c, _CMP_LT_OQ), y, x)
#define RF_COPYSIGN(m, s) ((vec)_mm512_ternarylogic_epi32((__m512i)(m), (__m512i)(s), _mm512_set1_epi32(0x7fffffff), 0xe4))
#else
static inline vec rf_vsel(rf_ivec m, vec a, vec b) { return (vec)((m & (rf_ivec)a) | (~m & (rf_ivec)b)); }
#define RF_MIN(c, t) rf_vsel((t) > (c), c, t)
#define RF_SEL_LT(a, c, x, y) rf_vsel((a) < (c), x, y)
#define RF_COPYSIGN(m, s) ((vec)(((rf_ivec)(m) & 0x7fffffff) | ((rf_ivec)(s) & (int32_t)0x80000000)))
#endif
static inline vec rf_vtanh(vec x) {
    const vec a = (vec)((rf_ivec)x & 0x7fffffff);
    const vec z = x * x;
    const vec small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z
                        + 1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
    vec t = 2.0f * a;
    t = RF_MIN(VZERO + 88.3762626647949f, t);
    const vec vf = t * 1.44269504088896341f + 12582912.0f;
    const vec n = vf - 12582912.0f;
    vec r = t - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec p = VZERO + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    const vec e = p * (r * r) + r + 1.0f;
    const vec scale = (vec)((((rf_uvec)vf - 0x4B400000u) + 127u) << 23);
    const vec big = RF_COPYSIGN(1.0f - 2.0f / (e * scale + 1.0f), x);
    return RF_SEL_LT(a, VZERO + 0.625f, small, big);
}
"""

_MATH_F64 = r"""
static inline double rf_tanh(double x) { return tanh(x); }
static inline double rf_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
"""


def _act(name: str, v: str) -> str:
    return {"identity": v, "tanh": f"rf_tanh({v})", "relu": f"({v} <= 0 ? 0 : {v})",  # NaN stays NaN
            "sigmoid": f"rf_sigmoid({v})"}[name]


def _act_backward(name: str, g: str, y: str) -> str:
    """dloss/dz from dloss/dy and y = act(z), as aten's *_backward kernels write them."""
    return {"identity": g, "tanh": f"{g} * (1 - {y} * {y})", "relu": f"({y} <= 0 ? 0 : {g})",
            "sigmoid": f"{g} * (1 - {y}) * {y}"}[name]


def vector_bytes() -> int:
    """The widest vector this CPU has (bytes): 64 with AVX-512, 32 with AVX, else 16."""
    ident = _cpu_identity()
    if " avx512f" in ident:
        return 64
    if " avx" in ident:
        return 32
    return 16


class _Emitter:
    """Collects C lines with indentation."""

    def __init__(self):
        self.lines: List[str] = []
        self.depth = 0

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def open(self, line: str) -> None:
        self(line + " {")
        self.depth += 1

    def close(self) -> None:
        self.depth -= 1
        self("}")


def _gemm(w: _Emitter, *, R: int, K: int, NV: int, VL: int, a, brow, init, epi, budget: int) -> None:
    """Emit ``acc[r][c] = init(r, c) + Σ_k a(r, k) · row_k[c]`` for ``r < R`` and vectors ``c < NV``,
    then ``epi(r, c, acc)``: register tiles of ``rb × cb`` accumulators, the k loop innermost (so
    every accumulator sums over k = 0, 1, … in order).

    ``a(r, k)`` is a C expression of a scalar (``r``, ``k`` C expressions), ``brow(k)`` a pointer
    to an aligned padded row, ``init(r, c)`` a vec expression or None (zeros), ``epi`` emits the
    statements that consume ``acc``.
    """
    for c0 in range(0, NV, 4):
        cb = min(4, NV - c0)
        rb = max(1, min(R, budget // cb))
        full = R - R % rb

        def tile(r0: str, rows: int) -> None:
            for j in range(rows):
                for c in range(cb):
                    ini = init(f"({r0} + {j})", c0 + c)
                    w(f"vec acc{j}_{c} = {ini if ini is not None else 'VZERO'};")
            w.open(f"for (int k = 0; k < {K}; k++)")
            w(f"const real *restrict br = {brow('k')};")
            for c in range(cb):
                w(f"const vec w{c} = LD(br + {(c0 + c) * VL});")
            for j in range(rows):
                w(f"const vec s{j} = splat({a(f'({r0} + {j})', 'k')});")
                for c in range(cb):
                    w(f"acc{j}_{c} += s{j} * w{c};")
            w.close()
            for j in range(rows):
                for c in range(cb):
                    epi(f"({r0} + {j})", c0 + c, f"acc{j}_{c}")

        if full:
            w.open(f"for (int r0 = 0; r0 < {full}; r0 += {rb})")
            tile("r0", rb)
            w.close()
        if R % rb:
            w.open("")
            tile(str(full), R % rb)
            w.close()


def _emit_transpose_avx512_f32(w: _Emitter) -> None:
    """Inside ``transpose``'s block loop: a whole 16 × 16 fp32 block (all its rows inside the matrix)
    with AVX-512, where two of the four interleaving rounds are loads: register ``y[p][v]`` gathers
    the 4-float column group ``p`` of rows ``v, v + 4, v + 8, v + 12`` (one 16-byte load and three
    inserts from memory, which may run on either vector port), then a 4 × 4 transpose inside every
    128-bit lane (the only shuffles: half of the generic version's, which all need port 5).  The
    same numbers moved: the results are bitwise those of the generic version."""
    w("#if defined(__AVX512F__)")
    w.open("if (bo * 16 + 16 <= rows)")
    w("const float *restrict s0 = src + (bo * 16) * ss + bi * 16;")
    for p in range(4):
        for v in range(4):
            w(f"__m512 y{p}_{v} = _mm512_castps128_ps512(_mm_load_ps(s0 + {v} * ss + {4 * p}));")
            for q in range(1, 4):
                w(f"y{p}_{v} = _mm512_insertf32x4(y{p}_{v}, _mm_load_ps(s0 + {4 * q + v} * ss + {4 * p}), {q});")
        w(f"const __m512 t{p}_0 = _mm512_unpacklo_ps(y{p}_0, y{p}_1), t{p}_1 = _mm512_unpackhi_ps(y{p}_0, y{p}_1);")
        w(f"const __m512 t{p}_2 = _mm512_unpacklo_ps(y{p}_2, y{p}_3), t{p}_3 = _mm512_unpackhi_ps(y{p}_2, y{p}_3);")
        for u, (f, a, b) in enumerate((("lo", 0, 2), ("hi", 0, 2), ("lo", 1, 3), ("hi", 1, 3))):
            c = 4 * p + u
            w(f"if (bi * 16 + {c} < cols) _mm512_store_ps(dst + (bi * 16 + {c}) * ds + bo * 16, _mm512_castpd_ps("
              f"_mm512_unpack{f}_pd(_mm512_castps_pd(t{p}_{a}), _mm512_castps_pd(t{p}_{b}))));")
    w("continue;")
    w.close()
    w("#endif")


def _emit_transpose(w: _Emitter, VL: int, size: int) -> None:
    """Emit ``transpose(src, ss, rows, nbi, dst, ds, cols, nbo)``: ``dst[i][o] = src[o][i]`` for ``o <
    rows``, ``i < cols`` (``ss``, ``ds`` row strides; ``nbi``, ``nbo`` blocks of VL along i and o),
    by VL × VL blocks in registers: log2(VL) rounds of interleaving row j with row j + VL/2
    (lanes of the low halves, then of the high halves).  Rows past ``rows`` are read as zeros,
    so dst's pad lanes stay 0; dst rows past ``cols`` are not written."""
    half = VL // 2
    lo = [k // 2 + (VL if k % 2 else 0) for k in range(VL)]
    hi = [half + k // 2 + (VL if k % 2 else 0) for k in range(VL)]
    ity = "int32_t" if size == 4 else "int64_t"
    w("#if defined(__clang__) || __GNUC__ >= 12")
    w("#define ZIP(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)")
    w("#else")
    w(f"typedef {ity} ivec __attribute__((vector_size(sizeof(vec))));")
    w("#define ZIP(x, y, ...) __builtin_shuffle(x, y, (ivec){__VA_ARGS__})")
    w("#endif")
    w.open("static inline void transpose(const real *restrict src, int ss, int rows, int nbi, "
           "real *restrict dst, int ds, int cols, int nbo)")
    w.open("for (int bo = 0; bo < nbo; bo++) for (int bi = 0; bi < nbi; bi++)")
    if VL == 16 and size == 4:
        _emit_transpose_avx512_f32(w)
    n_rounds = VL.bit_length() - 1
    for j in range(VL):
        w(f"vec r0_{j} = bo * VL + {j} < rows ? LD(src + (bo * VL + {j}) * ss + bi * VL) : VZERO;")
    for k in range(n_rounds):  # unrolled: the VL rows stay in registers
        for j in range(half):
            w(f"vec r{k + 1}_{2 * j} = ZIP(r{k}_{j}, r{k}_{j + half}, {', '.join(map(str, lo))});")
            w(f"vec r{k + 1}_{2 * j + 1} = ZIP(r{k}_{j}, r{k}_{j + half}, {', '.join(map(str, hi))});")
    for j in range(VL):
        w(f"if (bi * VL + {j} < cols) ST(dst + (bi * VL + {j}) * ds + bo * VL, r{n_rounds}_{j});")
    w.close()
    w.close()


def generate_source(spec: MLPSpec, *, lr: float, loss: str, steps: int, n_tasks: int, batch: int,
                    dtype: torch.dtype, vec_bytes: Optional[int] = None, transpose: bool = True) -> str:
    """The C program for one shape and setting (see the module docstring).

    Its entry point ``int rf_meta_steps(int64_t M, const real *xs, const void *ys, const real *eps,
    real *phi, real *losses)``: ``xs [M, S, T, B, d_0]``, ``ys [M, S, T, B, d_L]`` (real) or
    ``[M, S, T, B]`` (int64 labels), ``eps [M]``, ``phi`` the flat parameters ``W_0, b_0, W_1, …``
    (torch's layout; updated in place), ``losses [M, T, S]``.  Returns 0; −1 when out of memory;
    1 + the flat row of a label out of range (nothing after it is computed).

    Inside, every matrix lives padded to whole vectors of ``vec_bytes`` (default: this CPU's
    widest, ``vector_bytes()``), in the layouts its products read: ``WT [in][out]`` for a layer
    whose forward pass is a product over its inputs, ``W [out][in]`` for the backward product
    ``g W`` and for narrow outputs (fewer than half a vector: the forward is then a dot product
    summed lane-wise, then over the lanes in order).  Where both layouts are kept, the SGD step
    updates ``W`` and ``WT ← Wᵀ`` by block transposes, so they hold identical numbers
    (``transpose=False`` applies the gradient to each layout instead: the same numbers, one more
    product; kept for the tests and benchmarks that compare the two).  Pad lanes stay 0.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the native meta-step runs float32 or float64, got {dtype}")
    if loss not in _LOSSES:
        raise ValueError(f"the native meta-step supports losses {_LOSSES}, got {loss!r}")
    for act in spec.activations:
        if act not in _SUPPORTED_ACTS:
            raise ValueError(f"the native meta-step supports activations {_SUPPORTED_ACTS}, got {act!r}")
    real = "float" if dtype == torch.float32 else "double"
    size = 4 if real == "float" else 8
    if vec_bytes is not None and vec_bytes not in (16, 32, 64):
        raise ValueError(f"vec_bytes must be 16, 32 or 64 (or None: this CPU's widest), got {vec_bytes!r}")
    VB = int(vec_bytes or vector_bytes())
    VL = VB // size
    budget = 24 if VB == 64 else 12  # accumulators per tile: 32 vector registers with AVX-512, else 16
    dims, acts, L = spec.dims, spec.activations, spec.n_layers
    S, T, B = int(steps), int(n_tasks), int(batch)
    D0, DL = dims[0], dims[-1]

    def pad(d: int) -> int:
        return -(-d // VL) * VL

    P = [pad(d) for d in dims]
    narrow = [dims[l + 1] * 2 < VL for l in range(L)]          # forward as a dot product
    has_W = [narrow[l] or l > 0 for l in range(L)]              # [out][in_pad] layout kept
    has_WT = [not narrow[l] for l in range(L)]                  # [in][out_pad] layout kept
    # flat offsets of W_l, b_l in torch's layout
    offs, off = [], 0
    for l in range(L):
        offs.append((off, off + dims[l] * dims[l + 1]))
        off += dims[l] * dims[l + 1] + dims[l + 1]
    # the padded state: per layer W (if kept), WT (if kept), bias; one block of NS elements
    state, pos = {}, 0
    for l in range(L):
        if has_W[l]:
            state[f"W{l}"] = pos
            pos += dims[l + 1] * P[l]
        if has_WT[l]:
            state[f"WT{l}"] = pos
            pos += dims[l] * P[l + 1]
        state[f"b{l}"] = pos
        pos += P[l + 1]
    NS = pos
    maxp = max(P)
    # layers whose Wᵀ is W's block transpose: within a task the last inner step need not copy W
    # into Wᵀ (nothing reads it before the next task starts from PHI); DS and the outer update skip
    # those Wᵀ blocks and PHI's Wᵀ is transposed from PHI's W once per meta-step instead (the
    # elementwise operations on W and on Wᵀ are the same on the same numbers: the same bits)
    tw = [l for l in range(L) if transpose and has_W[l] and has_WT[l]]
    skip = sorted((state[f"WT{l}"], state[f"WT{l}"] + dims[l] * P[l + 1]) for l in tw)
    ranges, start = [], 0
    for a, b in skip:
        if a > start:
            ranges.append((start, a))
        start = b
    if start < NS:
        ranges.append((start, NS))

    def over_state(body: str) -> None:
        """``body`` (a statement on index ``k``) for every vector of the state outside ``skip``."""
        for a, b in ranges:
            w(f"for (int k = {a}; k < {b}; k += VL) {body}")
    neg_lr = _lit(-lr, real)

    w = _Emitter()
    w(f"/* reptile_fast native meta-step v{_VERSION}: dims={dims} acts={acts} loss={loss} lr={lr!r} "
      f"S={S} T={T} B={B} {real}, {VB}-byte vectors */")
    w("#include <math.h>\n#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>")
    w("#if defined(__AVX512F__)\n#include <immintrin.h>\n#endif")
    w(f"typedef {real} real;")
    w(f"typedef real vec __attribute__((vector_size({VB})));")
    w(f"#define VL {VL}")
    w("#define LD(p) (*(const vec *)(p))")
    w("#define ST(p, v) (*(vec *)(p) = (v))")
    w("#define VZERO ((vec){0})")
    w("static inline vec splat(real s) { return (vec){" + ", ".join(["s"] * VL) + "}; }")
    if transpose and any(has_W[l] and has_WT[l] for l in range(L)):
        _emit_transpose(w, VL, size)
    w(_MATH_F32 + _MATH_F32_VEC if real == "float" else _MATH_F64)
    w.open("int rf_meta_steps(int64_t M, const real *restrict xs, const void *restrict ys_,"
           " const real *restrict eps, real *restrict phi, real *restrict losses)")
    # work memory (one allocation per call: concurrent calls never share it), aligned to VB
    parts = [("PHI", NS), ("TH", NS), ("DS", NS)]
    parts += [(f"H{l}", B * P[l]) for l in range(L + 1)]
    parts += [("GA", B * maxp), ("GB", B * maxp)]
    total = sum(n for _, n in parts)
    w(f"char *raw = (char *)calloc(1, sizeof(real) * {total} + {VB});")
    w("if (!raw) return -1;")
    w(f"real *restrict work = (real *)(raw + ({VB} - (uintptr_t)raw % {VB}));")
    pos = 0
    for name, n in parts:
        w(f"real *restrict {name} = work + {pos};")
        pos += n
    w("real *G = GA, *GH = GB;")
    if loss == "mse":
        w("const real *restrict ys = (const real *)ys_;")
    else:
        w("const int64_t *restrict ys = (const int64_t *)ys_;")
    # phi (torch layout) -> PHI (padded layouts)
    for l in range(L):
        I, O = dims[l], dims[l + 1]
        Wo, bo = offs[l]
        if has_W[l]:
            w(f"for (int o = 0; o < {O}; o++) for (int i = 0; i < {I}; i++) "
              f"PHI[{state[f'W{l}']} + o * {P[l]} + i] = phi[{Wo} + o * {I} + i];")
        if has_WT[l]:
            w(f"for (int o = 0; o < {O}; o++) for (int i = 0; i < {I}; i++) "
              f"PHI[{state[f'WT{l}']} + i * {P[l + 1]} + o] = phi[{Wo} + o * {I} + i];")
        w(f"for (int o = 0; o < {O}; o++) PHI[{state[f'b{l}']} + o] = phi[{bo} + o];")
    w.open("for (int64_t m = 0; m < M; m++)")
    over_state("ST(DS + k, VZERO);")
    w.open(f"for (int t = 0; t < {T}; t++)")
    w(f"for (int k = 0; k < {NS}; k += VL) ST(TH + k, LD(PHI + k));")
    w.open(f"for (int s = 0; s < {S}; s++)")
    w(f"const int64_t row = ((m * {S} + s) * {T} + t) * {B};")
    w(f"for (int b = 0; b < {B}; b++) for (int i = 0; i < {D0}; i++) H0[b * {P[0]} + i] = xs[(row + b) * {D0} + i];")
    # ---- forward
    for l in range(L):
        I, O = dims[l], dims[l + 1]
        Hin, Hout = f"H{l}", f"H{l + 1}"
        if narrow[l]:
            Wp = f"(TH + {state[f'W{l}']})"
            w.open(f"for (int b = 0; b < {B}; b++)")
            w.open(f"for (int o = 0; o < {O}; o++)")
            w("vec acc = VZERO;")
            w(f"for (int c = 0; c < {P[l]}; c += VL) acc += LD({Hin} + b * {P[l]} + c) * LD({Wp} + o * {P[l]} + c);")
            w("real sum = acc[0];")
            w("for (int k = 1; k < VL; k++) sum += acc[k];")
            w(f"const real z = sum + TH[{state[f'b{l}']} + o];")
            w(f"{Hout}[b * {P[l + 1]} + o] = {_act(acts[l], 'z')};")
            w.close()
            w.close()
        else:
            WT, bias = state[f"WT{l}"], state[f"b{l}"]
            _gemm(w, R=B, K=I, NV=P[l + 1] // VL, VL=VL, budget=budget,
                  a=lambda r, k, Hin=Hin, l=l: f"{Hin}[{r} * {P[l]} + {k}]",
                  brow=lambda k, WT=WT, l=l: f"TH + {WT} + {k} * {P[l + 1]}",
                  init=lambda r, c, bias=bias: f"LD(TH + {bias + c * VL})",
                  epi=lambda r, c, acc, Hout=Hout, l=l: w(f"ST({Hout} + {r} * {P[l + 1]} + {c * VL}, {acc});"))
            if acts[l] == "tanh" and real == "float":
                w(f"for (int k = 0; k < {B * P[l + 1]}; k += VL) ST({Hout} + k, rf_vtanh(LD({Hout} + k)));")
            elif acts[l] != "identity":
                w(f"for (int k = 0; k < {B * P[l + 1]}; k++) {Hout}[k] = {_act(acts[l], f'{Hout}[k]')};")
                if acts[l] == "sigmoid" and O % VL:
                    w(f"for (int b = 0; b < {B}; b++) for (int o = {O}; o < {P[l + 1]}; o++) {Hout}[b * {P[l + 1]} + o] = 0;")
    # ---- loss and dloss/dout into G (row stride maxp); pads of G rows are 0
    out, Pl = f"H{L}", P[L]
    w("real lsum = 0;")
    if loss == "mse":
        n = B * DL
        w(f"const real *restrict y = ys + row * {DL};")
        w.open(f"for (int b = 0; b < {B}; b++)")
        w(f"for (int k = 0; k < {maxp}; k++) G[b * {maxp} + k] = 0;")
        w.open(f"for (int o = 0; o < {DL}; o++)")
        w(f"const real d = {out}[b * {Pl} + o] - y[b * {DL} + o];")
        w("lsum += d * d;")
        w(f"G[b * {maxp} + o] = d * {_lit(2.0 / n, real)};")
        w.close()
        w.close()
        w(f"losses[(m * {T} + t) * {S} + s] = lsum / {n};")
    else:
        C = DL
        exp_, log_ = ("expf", "logf") if real == "float" else ("exp", "log")
        w("const int64_t *restrict y = ys + row;")
        w.open(f"for (int b = 0; b < {B}; b++)")
        w("const int64_t lab = y[b];")
        w(f"if (lab < 0 || lab >= {C}) {{ free(raw); return (int)(1 + (row + b) % 2000000000); }}")
        w(f"const real *restrict zr = {out} + b * {Pl};")
        w(f"for (int k = 0; k < {maxp}; k++) G[b * {maxp} + k] = 0;")
        w(f"real mx = zr[0]; for (int k = 1; k < {C}; k++) mx = zr[k] > mx ? zr[k] : mx;")
        w(f"real se = 0; for (int k = 0; k < {C}; k++) se += {exp_}(zr[k] - mx);")
        w(f"const real lse = {log_}(se);")
        w(f"for (int k = 0; k < {C}; k++) {{ const real lp = zr[k] - mx - lse; "
          f"G[b * {maxp} + k] = (k == lab ? {_lit(-1.0 / B, real)} : 0) + {exp_}(lp) * {_lit(1.0 / B, real)}; "
          f"if (k == lab) lsum -= lp; }}")
        w.close()
        w(f"losses[(m * {T} + t) * {S} + s] = lsum / {B};")
    if acts[L - 1] != "identity":
        w(f"for (int b = 0; b < {B}; b++) for (int o = 0; o < {DL}; o++) "
          f"G[b * {maxp} + o] = {_act_backward(acts[L - 1], f'G[b * {maxp} + o]', f'{out}[b * {Pl} + o]')};")
    # ---- backward + SGD, last layer first (each layer's g W uses its pre-update W)
    for l in range(L - 1, -1, -1):
        I, O = dims[l], dims[l + 1]
        Hin = f"H{l}"
        if l > 0:
            Wl = state[f"W{l}"]
            _gemm(w, R=B, K=O, NV=P[l] // VL, VL=VL, budget=budget,
                  a=lambda r, k: f"G[{r} * {maxp} + {k}]",
                  brow=lambda k, Wl=Wl, l=l: f"TH + {Wl} + {k} * {P[l]}",
                  init=lambda r, c: None,
                  epi=lambda r, c, acc: w(f"ST(GH + {r} * {maxp} + {c * VL}, {acc});"))
            if acts[l - 1] != "identity":
                w(f"for (int b = 0; b < {B}; b++) for (int i = 0; i < {P[l]}; i++) GH[b * {maxp} + i] = "
                  f"{_act_backward(acts[l - 1], f'GH[b * {maxp} + i]', f'{Hin}[b * {P[l]} + i]')};")
        if has_W[l]:
            # W[o][:] += (−lr) Σ_b G[b][o] H[b][:]
            Wl = state[f"W{l}"]
            _gemm(w, R=O, K=B, NV=P[l] // VL, VL=VL, budget=budget,
                  a=lambda r, k: f"G[{k} * {maxp} + {r}]",
                  brow=lambda k, Hin=Hin, l=l: f"{Hin} + {k} * {P[l]}",
                  init=lambda r, c: None,
                  epi=lambda r, c, acc, Wl=Wl, l=l: w(
                      f"ST(TH + {Wl} + {r} * {P[l]} + {c * VL}, LD(TH + {Wl} + {r} * {P[l]} + {c * VL}) "
                      f"+ splat({neg_lr}) * {acc});"))
        if has_WT[l] and has_W[l] and transpose:
            # WT ← Wᵀ: the same numbers as applying the gradient to WT, for a third of a product
            if S > 1:
                w(f"if (s < {S - 1}) transpose(TH + {state[f'W{l}']}, {P[l]}, {O}, {P[l] // VL}, "
                  f"TH + {state[f'WT{l}']}, {P[l + 1]}, {I}, {P[l + 1] // VL});")
        elif has_WT[l]:
            # WT[i][:] += (−lr) Σ_b H[b][i] G[b][:]
            WTl = state[f"WT{l}"]
            _gemm(w, R=I, K=B, NV=P[l + 1] // VL, VL=VL, budget=budget,
                  a=lambda r, k, Hin=Hin, l=l: f"{Hin}[{k} * {P[l]} + {r}]",
                  brow=lambda k: f"G + {k} * {maxp}",
                  init=lambda r, c: None,
                  epi=lambda r, c, acc, WTl=WTl, l=l: w(
                      f"ST(TH + {WTl} + {r} * {P[l + 1]} + {c * VL}, LD(TH + {WTl} + {r} * {P[l + 1]} + {c * VL}) "
                      f"+ splat({neg_lr}) * {acc});"))
        # b += (−lr) Σ_b G[b][:]
        bl = state[f"b{l}"]
        w.open(f"for (int c = 0; c < {P[l + 1]}; c += VL)")
        w("vec acc = VZERO;")
        w(f"for (int b = 0; b < {B}; b++) acc += LD(G + b * {maxp} + c);")
        w(f"ST(TH + {bl} + c, LD(TH + {bl} + c) + splat({neg_lr}) * acc);")
        w.close()
        if l > 0:
            w("{ real *tmp = G; G = GH; GH = tmp; }")
    w.close()  # steps
    over_state("ST(DS + k, LD(DS + k) + (LD(TH + k) - LD(PHI + k)));")
    w.close()  # tasks
    if T == 1:
        over_state("ST(PHI + k, LD(PHI + k) + splat(eps[m]) * LD(DS + k));")
    else:
        over_state(f"ST(PHI + k, LD(PHI + k) + splat(eps[m]) * (LD(DS + k) / splat({T})));")
    for l in tw:
        I, O = dims[l], dims[l + 1]
        w(f"transpose(PHI + {state[f'W{l}']}, {P[l]}, {O}, {P[l] // VL}, PHI + {state[f'WT{l}']}, {P[l + 1]}, {I}, {P[l + 1] // VL});")
    w.close()  # meta-steps
    # PHI -> phi (torch layout), from the layout each layer keeps
    for l in range(L):
        I, O = dims[l], dims[l + 1]
        Wo, bo = offs[l]
        if has_W[l]:
            w(f"for (int o = 0; o < {O}; o++) for (int i = 0; i < {I}; i++) "
              f"phi[{Wo} + o * {I} + i] = PHI[{state[f'W{l}']} + o * {P[l]} + i];")
        else:
            w(f"for (int o = 0; o < {O}; o++) for (int i = 0; i < {I}; i++) "
              f"phi[{Wo} + o * {I} + i] = PHI[{state[f'WT{l}']} + i * {P[l + 1]} + o];")
        w(f"for (int o = 0; o < {O}; o++) phi[{bo} + o] = PHI[{state[f'b{l}']} + o];")
    w("free(raw);")
    w("return 0;")
    w.close()
    return "\n".join(w.lines) + "\n"


# ----------------------------------------------------------------------------- the program
class NativeProgram:
    """The compiled C meta-step for one shape and setting (see the module docstring).

    ``build(progress)`` compiles (or loads from the on-disk cache); calling it runs chunks of
    meta-steps with ``MetaStepProgram``'s contract.  ``vec_bytes``: the vector width the program
    is written for (None: this CPU's widest; a narrower one runs anywhere, e.g. in tests);
    ``transpose``: see ``generate_source`` (False only to compare).
    """

    def __init__(self, spec: MLPSpec, *, lr: float, loss: str, steps: int, n_tasks: int, batch: int,
                 dtype: torch.dtype, vec_bytes: Optional[int] = None, transpose: bool = True):
        self.spec, self.lr, self.loss = spec, float(lr), loss
        self.steps, self.n_tasks, self.batch, self.dtype = int(steps), int(n_tasks), int(batch), dtype
        self.source = generate_source(spec, lr=lr, loss=loss, steps=steps, n_tasks=n_tasks, batch=batch,
                                      dtype=dtype, vec_bytes=vec_bytes, transpose=transpose)
        self.library: Optional[Path] = None
        self.cache_hit: Optional[bool] = None
        self._fn = None

    def _key(self, cc: str, flags: Sequence[str]) -> str:
        return library_key(self.source, cc, flags)

    def cached_library(self) -> Optional[Path]:
        """The cached library for this program, if one was compiled before (no compiling here)."""
        cc = find_compiler()
        if cc is None:
            return None
        path = _usable_cache_dir() / f"meta_step_{self._key(cc, _FLAGS)}.so"
        return path if _intact(path) else None

    def build(self, progress: Optional[Callable[[str], None]] = None) -> "NativeProgram":
        """Load the cached library or compile it (``progress(message)`` is told before a compile)."""
        if self._fn is not None:
            return self
        lib, path, hit = load_library(self.source, "meta_step", progress=progress,
                                      what="the meta-step program")
        fn = lib.rf_meta_steps
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 5
        self._lib, self._fn, self.library, self.cache_hit = lib, fn, path, hit
        return self

    def __call__(self, params: Sequence[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                 eps: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """``MetaStepProgram``'s contract: φ ``[W_0, b_0, …]``, ``xs [M, S, T, B, d_0]``, ``ys [M, S, T, B,
        d_L]`` (or long ``[M, S, T, B]``), ``eps [M]`` → (new φ, losses ``[M, T, S]``)."""
        self.build()
        spec, S, T, B = self.spec, self.steps, self.n_tasks, self.batch
        M = xs.shape[0]
        want_x = (M, S, T, B, spec.dims[0])
        if tuple(xs.shape) != want_x or xs.dtype != self.dtype or xs.device.type != "cpu":
            raise ValueError(f"xs must be a CPU {self.dtype} tensor of shape {want_x}, got "
                             f"{xs.dtype} {tuple(xs.shape)} on {xs.device}")
        if self.loss == "cross_entropy":
            want_y, y_dtype = (M, S, T, B), torch.long
        else:
            want_y, y_dtype = (M, S, T, B, spec.dims[-1]), self.dtype
        if tuple(ys.shape) != want_y or ys.dtype != y_dtype:
            raise ValueError(f"ys must be a {y_dtype} tensor of shape {want_y}, got {ys.dtype} {tuple(ys.shape)}")
        if tuple(eps.shape) != (M,):
            raise ValueError(f"eps must have shape ({M},), got {tuple(eps.shape)}")
        shapes = []
        for l in range(spec.n_layers):
            shapes += [(spec.dims[l + 1], spec.dims[l]), (spec.dims[l + 1],)]
        if len(params) != len(shapes) or any(tuple(p.shape) != s for p, s in zip(params, shapes)):
            raise ValueError(f"params must have shapes {shapes}, got {[tuple(p.shape) for p in params]}")
        # everything the C program reads through a pointer: dense CPU memory (a meta tensor's
        # data_ptr() is 0, and the program crashed the interpreter: QA45)
        for name, t in (("xs", xs), ("ys", ys), ("eps", eps), *((f"params[{i}]", p) for i, p in enumerate(params))):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.layout != torch.strided:
                raise ValueError(f"{name} must be a dense CPU tensor, got "
                                 f"{type(t).__name__ if not isinstance(t, torch.Tensor) else f'{t.layout} on {t.device}'}")
        flat = torch.cat([p.detach().reshape(-1).to(self.dtype) for p in params])
        xs = xs.contiguous()
        ys = ys.contiguous()
        eps = eps.detach().to(self.dtype).contiguous()
        losses = torch.empty(M, T, S, dtype=self.dtype)
        if M:
            rc = self._fn(M, xs.data_ptr(), ys.data_ptr(), eps.data_ptr(), flat.data_ptr(), losses.data_ptr())
            if rc < 0:
                raise MemoryError("the native meta-step could not allocate its work memory")
            if rc != 0:
                raise ValueError(f"a class label in ys is outside [0, {spec.dims[-1]}) "
                                 f"(near flat row {rc - 1} of ys)")
        new, off = [], 0
        for s in shapes:
            n = 1
            for d in s:
                n *= d
            new.append(flat[off:off + n].view(s))
            off += n
        return new, losses
