"""The minibatch plan's selection as a small C function: the ``k`` smallest of each row's keys.

``sample_indices`` draws a plan as the ``batch_size`` smallest of ``n_points`` uniform keys per
(task, step), in ascending order of key: ``keys.topk(k, largest=False, sorted=True).indices``.
On the CPU that ``topk`` costs about 0.7 µs per 50-key row (3.4 µs per sine task and meta-step,
against ~23 µs for the whole compiled meta-step at meta-batch 256); this function gives the same
indices in about 0.07 µs per row by one pass over the row with a sorted buffer of ``k``
(insertion), four rows at a time (``bench/results/native_step_parts_cpu.json``).

Same indices: every key is compared exactly (no arithmetic), so the result is the ``k``
smallest in ascending order, as ``topk`` returns them.  Equal keys (probability about
``n² / 2⁵³`` per float64 row) come lowest index first; ``topk`` leaves their order unspecified.

Compiled once by ``native_build`` and cached on disk; without a C compiler (or for shapes it
does not take) ``smallest_k`` returns None and the caller uses ``topk``.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Optional

import torch

__all__ = ["smallest_k", "MAX_K"]

#: the largest ``k`` this takes (the C function is written for one ``k``, its loop over the buffer
#: unrolled: larger ``k`` use ``topk``)
MAX_K = 64

_SOURCE = r"""
#include <stdint.h>
#define K %(k)d
/* 4 rows at a time, one per lane: measured fastest here (8 lanes: 3x slower on this CPU) */
#define LANES 4
typedef double vd __attribute__((vector_size(8 * LANES)));
typedef int64_t vl __attribute__((vector_size(8 * LANES)));
/* For each row r of keys [rows, n]: out[r] = the indices of the row's K smallest keys, in
   ascending order of key (equal keys: the lower index first).  K <= n; keys finite.  LANES rows
   at a time, one row per vector lane, with no data-dependent branch (a mispredicted branch per
   key costs more than the whole insertion): each key is inserted into the sorted buffer
   best[0..K) by selects that do not depend on one another, the buffer in registers. */
void rf_smallest_k(int64_t rows, int64_t n, const double *restrict keys, int64_t *restrict out) {
    vd best[K];
    vl idx[K];
    for (int64_t r0 = 0; r0 < rows; r0 += LANES) {
        const double *row[LANES];
        for (int l = 0; l < LANES; l++)  /* past the last row: repeat it (not stored) */
            row[l] = keys + (r0 + l < rows ? r0 + l : rows - 1) * n;
        for (int i = 0; i < K; i++) {
            for (int l = 0; l < LANES; l++) best[i][l] = __builtin_inf();
            idx[i] = (vl){0} - 1;
        }
        for (int64_t j = 0; j < n; j++) {
            vd v;
            for (int l = 0; l < LANES; l++) v[l] = row[l][j];
            const vl vi = (vl){0} + j;
            /* best[i] <- v where best[i-1] <= v < best[i]; best[i-1] where v < best[i-1]: every
               i from the old buffer (i descending: in place) */
            vl below = v < best[K - 1];  /* strict: an equal key stays ahead */
#pragma GCC unroll 64
            for (int i = K - 1; i > 0; i--) {
                const vl above = v < best[i - 1];
                const vl b = (vl)best[i], p = (vl)best[i - 1], x = (vl)v;
                best[i] = (vd)((((p & above) | (x & ~above)) & below) | (b & ~below));
                idx[i] = (((idx[i - 1] & above) | (vi & ~above)) & below) | (idx[i] & ~below);
                below = above;
            }
            best[0] = (vd)(((vl)v & below) | ((vl)best[0] & ~below));
            idx[0] = (vi & below) | (idx[0] & ~below);
        }
        for (int l = 0; l < LANES && r0 + l < rows; l++)
            for (int i = 0; i < K; i++) out[(r0 + l) * K + i] = idx[i][l];
    }
}
"""

_lock = threading.Lock()
_functions = {}  # k -> the loaded C function, or None when it cannot be built (tried once per k)


def _function(k: int):
    """The C function for ``k``, compiled on first use (cached on disk), or None without a compiler."""
    if k not in _functions:
        with _lock:
            if k not in _functions:
                from .native_build import NativeCompilerError, load_library

                try:
                    lib, _, _ = load_library(_SOURCE % {"k": k}, "select", what="the plan's selection")
                except NativeCompilerError:
                    _functions[k] = None  # the caller falls back to topk: the same indices
                    return None
                fn = lib.rf_smallest_k
                fn.restype = None
                fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
                _functions[k] = fn
    return _functions[k]


def smallest_k(keys: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """Indices of the ``k`` smallest keys of every row, ascending by key: long ``[..., k]`` for
    finite float64 CPU ``keys [..., n]`` — what ``keys.topk(k, dim=-1, largest=False, sorted=True)
    .indices`` gives.  None when this function does not apply (no C compiler, another dtype or
    device, ``k`` outside ``[1, min(n, MAX_K)]``, a row with fewer than ``k`` keys below +inf):
    the caller then uses ``topk``."""
    if (keys.dtype != torch.float64 or keys.device.type != "cpu" or keys.dim() < 1
            or not 1 <= k <= min(keys.shape[-1], MAX_K)):
        return None
    fn = _function(int(k))
    if fn is None:
        return None
    keys = keys.contiguous()
    n = keys.shape[-1]
    out = torch.empty(*keys.shape[:-1], k, dtype=torch.long)
    rows = keys.numel() // n
    if rows:
        fn(rows, n, keys.data_ptr(), out.data_ptr())
        # a row with fewer than k keys below +inf (NaN or inf keys) keeps the buffer's -1 entries,
        # which would index the last point: topk's answer instead (QA45)
        if int(out.min()) < 0:
            return None
    return out
