"""Fused Triton kernel v2: a persistent meta-step for small MLPs, the outer update fused in.

One launch runs every task's SGD inner loop *and* the Reptile outer update's reduction; a second,
tiny launch sums the per-program partials in a fixed order and applies φ ← φ + ε·mean_i(φ̃_i − φ).

Design (what differs from v1, ``kernels/mlp_inner_loop.py``):

* **Persistent grid.** ``n_programs = min(T, programs_per_sm × SMs)`` programs; program ``p``
  runs tasks ``p, p + n_programs, …`` (any ``T``: a task count that is not a multiple of the
  program count leaves the last round part-empty).  4 warps per program (8 when a wide x wide
  layer keeps its weights in registers: see below).
* **1-wide layers without padding.** A layer whose input or output has at most ``NARROW_MAX``
  (4) features (the sine MLP's 1 → 64 input and 64 → 1 output layers) is computed as exact fp32
  outer products / row reductions (broadcast-multiply-sum), with no ``tl.dot`` and no padding of
  the narrow side to 16.  ``tl.dot`` is used only between two wide (≥ 16, padded) feature sizes.
* **Precision** of those dots: ``"ieee"`` (exact fp32 FMA, the default), ``"tf32x3"`` (tensor
  cores, three tf32 products per product: near-fp32 accuracy) or ``"tf32"`` (one tf32 product:
  ~10-bit operand mantissas).  The narrow layers, activations, loss and updates are always fp32.
* **Minibatches loaded up front.** Each task's indices, inputs and targets for all inner steps
  are loaded into registers before its first step (when they fit: ``PRELOAD``), so no step waits
  on a dependent index → point load; a step selects its rows with a masked reduction.
* **Outer update fused.** Each program accumulates Σ(φ̃_i − φ) over its tasks (in registers for
  small models, else in its own partial row: ``V2Config.accumulate``) and the sum of its tasks'
  inner losses, and writes them once, to ``partials[p]`` /
  ``loss_partials[p]``; ``_outer_update_kernel`` then sums the ``n_programs`` rows in program
  order (deterministic: no atomics, the same order on every run for a given grid) and applies
  ``φ + ε·Σ/T``, ε read from a device tensor (so a CUDA graph can replay with a new ε).
  Per-task adapted parameters and per-step losses are written only when asked (adapt/evaluate).
* **Where the wide weights live.** By default in registers (the sine MLP's ieee meta-step, sm_90a:
  255 registers at 4 warps on Triton 3.6, 168 on 3.8, 128 at 8 warps, its products feature-major:
  ``V2Config.transpose``); with ``V2Config(stream=True)`` in a
  per-program scratch row, the products running as fp32 K-loops of rank-1 updates.  The streamed
  kernel never holds a whole ``[P_OUT, P_IN]`` tile: weights are copied, updated and written
  ``STREAM_TILE`` elements at a time (Triton 3.6 otherwise keeps one 64-bit scratch address per
  tile element live across the task loop: 255 registers), a streamed layer's input is re-read
  from the scratch in the backward pass, and ptxas is capped at ``STREAM_MAX_REGISTERS`` (128:
  4 programs of 4 warps per SM); sm_90a, 4 warps, 1-64-64-1: 128 registers, no spills, with
  Triton 3.6 and 3.8 (bench/results/triton-compile-sm90-v2-*.json).  Which is faster is a GPU
  question: the GPU check times both.
* **Accuracy-bounded special functions.** On NVIDIA, fp32 ``tl.exp`` lowers to ``ex2.approx``
  and ``/`` to ``div.full`` (both approximate).  v2's ``_exp`` is a Cody–Waite range reduction
  plus a degree-7 polynomial in plain FMA arithmetic, ``_log`` an atanh series, and divisions go
  through ``tl.math.div_rn`` (IEEE round-to-nearest), so the same error bound holds under the
  interpreter and on a GPU: see ``ACCURACY`` (checked against float64 by
  ``tests/test_kernel_mlp_meta_step_v2.py``, on CUDA too when present).

Supported models: 1–5 Linear layers (bias) with identity / tanh / relu / sigmoid, every feature
size ≤ ``MAX_FEATURES_V2`` (64), inner batch ≤ ``MAX_BATCH_V2`` (32), loss "mse" or
"cross_entropy" (long labels).  ``supports_v2`` says whether a shape fits; wider models use v1.

Public entry points: ``meta_step`` (the fused Reptile meta-step: new φ and the mean inner loss)
and ``inner_loop`` (adapted parameters and losses per task, for adapt/evaluate).  Both take φ as
one flat float32 vector in ``param_layout(dims)`` order (``torch.cat([p.reshape(-1) …])`` of
``[W_0, b_0, W_1, b_1, …]``).
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

# activation name -> compile-time code: the one table of MLP maths
from reptile_fast.mlp_math import ACTIVATION_CODES

# v1's flat parameter layout, layer loads/stores, activation derivatives (autograd's formulas: no
# special function involved) and input checks: one copy for both kernels
from .mlp_inner_loop import (_activation_grad, _check_flat_width, _check_targets, _check_int_field, _check_number, _check_tensor, _check_values, _launch_device, _overlaps, _overlaps_any, _load_layer, _store_layer,  # noqa: F401
                             n_flat_params, param_layout)
# fp32 special functions with bounded error on every device (shared with v1)
from .special_functions import ACCURACY, COMPILE_OPTIONS, _exp, _log, _sigmoid, _tanh  # noqa: F401
# the fused stepper's finiteness rule (one NaN/inf test for both kernels)
from .meta_step_guard import _is_bad, accept_step, check_state
from reptile_fast.validation import check_bool

__all__ = [
    "ACCURACY", "MAX_LAYERS", "MAX_FEATURES_V2", "MAX_BATCH_V2", "NARROW_MAX", "PRECISIONS",
    "INTERPRETED", "V2Config", "MetaStepResult", "supports_v2", "unsupported_reason", "feature_tile",
    "param_layout", "n_flat_params", "flat_params", "unflatten_params", "meta_step", "guarded_meta_step",
    "inner_loop", "compile_for_target", "grid_size", "flat_for", "transpose_for",
]

#: loss name -> compile-time code (as v1)
LOSS_CODES = {"mse": 0, "cross_entropy": 1}
MAX_LAYERS = 5
#: every feature size at most this (weights and the outer-update accumulator live in registers)
MAX_FEATURES_V2 = 64
#: inner batch at most this
MAX_BATCH_V2 = 32
#: a feature size <= NARROW_MAX is "narrow": its layers use fp32 broadcast-sums, not tl.dot
NARROW_MAX = 4
#: ``tl.dot`` input precisions v2 accepts
PRECISIONS = ("ieee", "tf32x3", "tf32")
#: Preload a task's whole plan (x, y of every step) when it needs at most this many elements
#: (16 fp32 registers per thread at 4 warps).
PRELOAD_LIMIT = 2048
#: ``V2Config(accumulate=None)`` keeps the meta-step's sums in registers up to this many padded
#: weights (1-64-1: 128), in memory beyond (1-64-64-1: 4224; sm_90a registers per setting:
#: bench/results/triton-compile-sm90-v2-*.json).
ACC_REGISTERS_LIMIT = 1024
#: A streamed layer's weights are copied, updated and written this many elements at a time (8 fp32
#: registers per thread at 4 warps), never as a whole ``[P_OUT, P_IN]`` register tile.
STREAM_TILE = 1024
#: Register cap (ptxas ``.maxnreg``) of a kernel with streamed layers: 4 programs of 4 warps per SM
STREAM_MAX_REGISTERS = 128
#: the smallest ``V2Config.max_registers`` taken (below it nearly every value would live in local memory)
MIN_REGISTER_CAP = 32
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"



@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) for ACT in ACTIVATION_CODES (0 identity, 1 tanh, 2 relu, 3 sigmoid)."""
    if ACT == 1:
        z = _tanh(z)
    elif ACT == 2:
        # NaN stays NaN, as in torch (tl.maximum(z, 0.0) returned the 0).  A select, not max with
        # propagate_nan (the same numbers): with it Triton 3.6 spilled 180 B inside the 4-64-64-5
        # cross-entropy MLP's inner step at 4 warps on sm_90a, as plain max did; with the select, none
        z = tl.where(z <= 0.0, 0.0, z)
    elif ACT == 3:
        z = _sigmoid(z)
    return z


# ----------------------------------------------------------------------------- layers


@triton.jit
def _zero_layer(ptr, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr, TILE: tl.constexpr):
    """Zero a layer's ``D_OUT * D_IN + D_OUT`` flat parameters, ``TILE`` at a time."""
    END: tl.constexpr = OFF + D_OUT * D_IN + D_OUT
    for i in range(OFF, END, TILE):
        offs = i + tl.arange(0, TILE)
        tl.store(ptr + offs, tl.zeros((TILE,), dtype=tl.float32), mask=offs < END)


@triton.jit
def _accumulate_layer(row, phi_ptr, w, b, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                      P_IN: tl.constexpr, P_OUT: tl.constexpr):
    """row[layer] += (w, b) − φ[layer]: one task's φ̃ − φ added to a program's partial row."""
    p_w, p_b = _load_layer(phi_ptr, OFF, D_IN, D_OUT, P_IN, P_OUT)
    a_w, a_b = _load_layer(row, OFF, D_IN, D_OUT, P_IN, P_OUT)
    _store_layer(row, a_w + (w - p_w), a_b + (b - p_b), OFF, D_IN, D_OUT, P_IN, P_OUT)


@triton.jit
def _forward(a, w, b, ACT: tl.constexpr, D_OUT: tl.constexpr, P_IN: tl.constexpr, P_OUT: tl.constexpr,
             DOT: tl.constexpr, FLAT: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """act(a @ w.T + b): ``[BB, P_IN] -> [BB, P_OUT]``; padded columns are exactly 0.

    DOT: ``tl.dot`` (both sides wide); else a broadcast-multiply-sum in fp32 over a
    ``[BB, P_OUT, P_IN]`` product -- or, with FLAT, a 1-wide side in 2-D: a 1-wide input as the
    outer product ``a [BB, 1] * w.T [1, P_OUT]``, a 1-wide output as the row reduction
    ``Σ_i a[:, i] w[0, i]``.  The 3-D product's layouts cost shared-memory round trips and
    barriers every step (sm_90a, Triton 3.6: 32 of the 1-64-1 MLP's inner step's barriers come
    from its two 1-wide layers).  FLAT as ``flat_for`` decides (where a ``tl.dot`` fixes the
    step's layouts: without one, Triton carried the selected minibatch rows' layout -- each row's
    64 units in one thread, 8 copies -- through the whole step; 1-64-1: 8x the FMAs and 4 KB of
    spill).  A sum over a 1-long axis is its one term, so the numbers do not change.

    TRANS (``transpose_for``): the ``tl.dot`` feature-major, ``(w @ a.T).T``, the backward's input
    gradient ``(w.T @ g.T).T`` likewise.  Each sum is the same sum over the same k in the same
    order (Triton's fp32 FMA dot runs k ascending per output), but the dot's output is then
    ``[P_OUT, BB]``, whose layout splits the feature axis across warps: each warp reads a 16-row
    slice of ``w`` instead of all of it, and at 4 warps the step no longer spills (sine MLP, sm_90a,
    ieee: bench/results/triton-transposed-dots-sm90-*.json)."""
    if DOT and TRANS:
        z = tl.trans(tl.dot(w, tl.trans(a), input_precision=PRECISION))
    elif DOT:
        z = tl.dot(a, tl.trans(w), input_precision=PRECISION)
    elif FLAT and P_IN == 1:
        z = a * tl.trans(w)
    elif FLAT and P_OUT == 1:
        z = tl.sum(a * w, axis=1, keep_dims=True)
    else:
        z = tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    h = _activation(z + b[None, :], ACT)
    if ACT == 3:
        if D_OUT < P_OUT:  # sigmoid(0) = 0.5: zero the padded units so they add nothing downstream
            h = tl.where(tl.arange(0, P_OUT)[None, :] < D_OUT, h, 0.0)
    return h


@triton.jit
def _backward(g, a_in, a_out, w, b, lr, ACT: tl.constexpr, INPUT_GRAD: tl.constexpr,
              P_IN: tl.constexpr, P_OUT: tl.constexpr, DOT: tl.constexpr, FLAT: tl.constexpr,
              TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """Backward through ``a_out = act(a_in @ w.T + b)`` and the SGD step on ``w, b``.

    ``g``: dL/d a_out ``[BB, P_OUT]`` (zero on padded rows).  Returns ``(dL/d a_in`` before the
    previous layer's activation, ``[BB, P_IN]`` (g itself when not INPUT_GRAD), ``w - lr dW,
    b - lr db)``; dL/d a_in uses w before its update, as autograd does."""
    g = _activation_grad(g, a_out, ACT)
    # with FLAT, 1-wide sides in 2-D, as in ``_forward``
    if DOT:
        grad_w = tl.dot(tl.trans(g), a_in, input_precision=PRECISION)
    elif FLAT and P_IN == 1:
        grad_w = tl.trans(tl.sum(g * a_in, axis=0, keep_dims=True))
    elif FLAT and P_OUT == 1:
        grad_w = tl.sum(g * a_in, axis=0, keep_dims=True)
    else:
        grad_w = tl.sum(g[:, :, None] * a_in[:, None, :], axis=0)
    grad_b = tl.sum(g, axis=0)
    if INPUT_GRAD:
        if DOT and TRANS:
            g_in = tl.trans(tl.dot(tl.trans(w), tl.trans(g), input_precision=PRECISION))
        elif DOT:
            g_in = tl.dot(g, w, input_precision=PRECISION)
        elif FLAT and P_OUT == 1:
            g_in = g * w
        elif FLAT and P_IN == 1:
            g_in = tl.sum(g * tl.trans(w), axis=1, keep_dims=True)
        else:
            # reduced over the last axis on purpose: Triton (3.6) rewrites sum(a[:, :, None] *
            # b[None, :, :], axis=1) into a tl.dot with the default (tf32) precision
            g_in = tl.sum(g[:, None, :] * tl.trans(w)[None, :, :], axis=2)
    else:
        g_in = g
    return g_in, w - lr * grad_w, b - lr * grad_b


# ----------------------------------------------------------------------------- streamed wide layers
# With ``V2Config(stream=True)`` a wide x wide layer keeps its weights in the program's own scratch
# row (global memory, private, L1/L2-resident) instead of registers, and its three products run
# as fp32 K-loops of rank-1 updates (exact fp32, any ``precision``): registers hold only the
# [BB, P] accumulators, so 4 warps fit without spills.  Activations / gradients feeding the loops
# go through the scratch too, with a CTA barrier between the writes and the reads.
@triton.jit
def _layer_init(phi_ptr, w_scr, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                P_IN: tl.constexpr, P_OUT: tl.constexpr, S: tl.constexpr, TILE: tl.constexpr):
    """(w, b) of a layer from φ: w in registers, or (S) copied to the scratch ``[P_OUT, P_IN]``
    (zero-padded), ``TILE`` elements at a time, with a ``[1, 1]`` placeholder returned."""
    if S:
        CH: tl.constexpr = min(P_OUT, max(1, TILE // P_IN))
        cols = tl.arange(0, P_IN)
        for c in range(0, P_OUT, CH):
            r = c + tl.arange(0, CH)
            w = tl.load(phi_ptr + OFF + r[:, None] * D_IN + cols[None, :],
                        mask=(r[:, None] < D_OUT) & (cols[None, :] < D_IN), other=0.0)
            tl.store(w_scr + r[:, None] * P_IN + cols[None, :], w)
        rows = tl.arange(0, P_OUT)
        b = tl.load(phi_ptr + OFF + D_OUT * D_IN + rows, mask=rows < D_OUT, other=0.0)
        w = tl.zeros((1, 1), dtype=tl.float32)
    else:
        w, b = _load_layer(phi_ptr, OFF, D_IN, D_OUT, P_IN, P_OUT)
    return w, b


@triton.jit
def _layer_final(w, w_scr, P_IN: tl.constexpr, P_OUT: tl.constexpr, S: tl.constexpr):
    """The layer's current weights as a register tile ``[P_OUT, P_IN]``."""
    if S:
        rows = tl.arange(0, P_OUT)
        cols = tl.arange(0, P_IN)
        w = tl.load(w_scr + rows[:, None] * P_IN + cols[None, :])
    return w


@triton.jit
def _layer_write(row, phi_ptr, w, b, w_scr, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                 P_IN: tl.constexpr, P_OUT: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr,
                 TILE: tl.constexpr):
    """A task's adapted layer into a flat row: stored (ACC False) or, ACC, ``row += (w, b) − φ``
    (``_accumulate_layer``).  A streamed layer (S) goes from its scratch ``TILE`` elements at a
    time, never whole in registers."""
    if S:
        CH: tl.constexpr = min(P_OUT, max(1, TILE // P_IN))
        cols = tl.arange(0, P_IN)
        for c in range(0, P_OUT, CH):
            r = c + tl.arange(0, CH)
            m = (r[:, None] < D_OUT) & (cols[None, :] < D_IN)
            flat = OFF + r[:, None] * D_IN + cols[None, :]
            w_c = tl.load(w_scr + r[:, None] * P_IN + cols[None, :])
            if ACC:
                p_w = tl.load(phi_ptr + flat, mask=m, other=0.0)
                a_w = tl.load(row + flat, mask=m, other=0.0)
                w_c = a_w + (w_c - p_w)
            tl.store(row + flat, w_c, mask=m)
        rows = tl.arange(0, P_OUT)
        b_ok = rows < D_OUT
        if ACC:
            p_b = tl.load(phi_ptr + OFF + D_OUT * D_IN + rows, mask=b_ok, other=0.0)
            a_b = tl.load(row + OFF + D_OUT * D_IN + rows, mask=b_ok, other=0.0)
            b = a_b + (b - p_b)
        tl.store(row + OFF + D_OUT * D_IN + rows, b, mask=b_ok)
    elif ACC:
        _accumulate_layer(row, phi_ptr, w, b, OFF, D_IN, D_OUT, P_IN, P_OUT)
    else:
        _store_layer(row, w, b, OFF, D_IN, D_OUT, P_IN, P_OUT)


@triton.jit
def _layer_forward(a, w, b, w_scr, a_scr, ACT: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                   P_IN: tl.constexpr, P_OUT: tl.constexpr, DOT: tl.constexpr, S: tl.constexpr,
                   FLAT: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr):
    if S:
        rows = tl.arange(0, BLOCK_B)
        cin = tl.arange(0, P_IN)
        cout = tl.arange(0, P_OUT)
        # WAR: the previous step's reads of this input (the backward pass of the layer below,
        # ``_stashed``, which has no barrier of its own when that layer is not streamed) before
        # other threads overwrite it
        tl.debug_barrier()
        tl.store(a_scr + rows[:, None] * P_IN + cin[None, :], a)
        tl.debug_barrier()
        z = tl.zeros((BLOCK_B, P_OUT), dtype=tl.float32)
        for k in range(0, D_IN):
            a_k = tl.load(a_scr + rows * P_IN + k)
            w_k = tl.load(w_scr + cout * P_IN + k)
            z += a_k[:, None] * w_k[None, :]
        h = _activation(z + b[None, :], ACT)
        if ACT == 3:
            if D_OUT < P_OUT:
                h = tl.where(cout[None, :] < D_OUT, h, 0.0)
    else:
        h = _forward(a, w, b, ACT, D_OUT, P_IN, P_OUT, DOT, FLAT, TRANS, PRECISION)
    return h


@triton.jit
def _layer_backward(g, a_in, a_out, w, b, lr, batch, w_scr, a_scr, g_scr, ACT: tl.constexpr,
                    INPUT_GRAD: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                    P_IN: tl.constexpr, P_OUT: tl.constexpr, DOT: tl.constexpr, S: tl.constexpr,
                    FLAT: tl.constexpr, TRANS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, TILE: tl.constexpr):
    if S:
        rows = tl.arange(0, BLOCK_B)
        cin = tl.arange(0, P_IN)
        cout = tl.arange(0, P_OUT)
        g = _activation_grad(g, a_out, ACT)
        tl.store(g_scr + rows[:, None] * P_OUT + cout[None, :], g)
        grad_b = tl.sum(g, axis=0)
        tl.debug_barrier()
        if INPUT_GRAD:
            g_in = tl.zeros((BLOCK_B, P_IN), dtype=tl.float32)
            for o in range(0, D_OUT):
                g_o = tl.load(g_scr + rows * P_OUT + o)
                w_o = tl.load(w_scr + o * P_IN + cin)
                g_in += g_o[:, None] * w_o[None, :]
            tl.debug_barrier()  # every read of W above before W is rewritten below
        else:
            g_in = g
        # W -= lr dW, TILE elements of W at a time (never the whole dW in registers):
        # dW = Σ over the real batch rows of g[r]^T a[r] (a_scr still holds this step's input)
        CH: tl.constexpr = min(P_OUT, max(1, TILE // P_IN))
        for c in range(0, P_OUT, CH):
            co = c + tl.arange(0, CH)
            grad_w = tl.zeros((CH, P_IN), dtype=tl.float32)
            for r in range(0, batch):
                g_r = tl.load(g_scr + r * P_OUT + co)
                a_r = tl.load(a_scr + r * P_IN + cin)
                grad_w += g_r[:, None] * a_r[None, :]
            w_ptrs = w_scr + co[:, None] * P_IN + cin[None, :]
            tl.store(w_ptrs, tl.load(w_ptrs) - lr * grad_w)
        tl.debug_barrier()  # the new W and the reads of g_scr before the next use
        b = b - lr * grad_b
    else:
        g_in, w, b = _backward(g, a_in, a_out, w, b, lr, ACT, INPUT_GRAD, P_IN, P_OUT, DOT, FLAT, TRANS, PRECISION)
    return g_in, w, b


@triton.jit
def _stashed(a, a_scr, P: tl.constexpr, S: tl.constexpr, BLOCK_B: tl.constexpr):
    """A streamed layer's input activation ``[BB, P]`` re-read from its scratch (S), where its
    forward pass stored it, rather than kept in registers across the K-loops; else ``a``."""
    if S:
        rows = tl.arange(0, BLOCK_B)
        cols = tl.arange(0, P)
        a = tl.load(a_scr + rows[:, None] * P + cols[None, :])
    return a


@triton.jit
def _loss_tile(out, target, label, row_ok, grad_scale, LOSS: tl.constexpr, D_OUT: tl.constexpr,
               P_OUT: tl.constexpr):
    """dL/d out ``[BB, P_OUT]`` and the un-normalised loss sum of one minibatch.

    ``target``: ``[BB, P_OUT]`` float targets (MSE); ``label``: ``[BB]`` int64 labels (CE).
    grad_scale: 2 / (batch * D_OUT) for MSE (torch's mse_loss backward), 1 / batch for CE."""
    cols = tl.arange(0, P_OUT)
    col_ok = cols < D_OUT
    ok = row_ok[:, None] & col_ok[None, :]
    if LOSS == 0:
        diff = tl.where(ok, out - target, 0.0)
        s = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        g = grad_scale * diff
    else:
        z = tl.where(col_ok[None, :], out, float("-inf"))
        z_max = tl.max(z, axis=1)
        e = _exp(z - z_max[:, None])
        e_sum = tl.sum(e, axis=1)
        is_label = cols[None, :] == label[:, None]
        z_label = tl.sum(tl.where(is_label, out, 0.0), axis=1)
        row_loss = z_max + _log(e_sum) - z_label
        s = tl.sum(tl.where(row_ok, row_loss, 0.0), axis=0)
        p = tl.math.div_rn(e, e_sum[:, None])
        g = tl.where(ok, (p - tl.where(is_label, 1.0, 0.0)) * grad_scale, 0.0)
    return g, s


@triton.jit
def _minibatch(x_task, y_task, idx, ok, D0: tl.constexpr, P0: tl.constexpr, DL: tl.constexpr,
               PL: tl.constexpr, LOSS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The inputs ``[BB, P0]``, float targets ``[BB, PL]`` (MSE; zeros for CE) and labels ``[BB]``
    (CE; the row numbers for MSE) of the task's points ``idx [BB]`` (int32 point numbers within the
    task; ``x_task``, ``y_task``: the task's first point); rows not ``ok`` (a step past the last) are
    zero and never read."""
    rows = tl.arange(0, BLOCK_B)
    c0 = tl.arange(0, P0)
    cl = tl.arange(0, PL)
    a0 = tl.load(x_task + idx[:, None] * D0 + c0[None, :], mask=ok[:, None] & (c0[None, :] < D0), other=0.0)
    if LOSS == 0:
        target = tl.load(y_task + idx[:, None] * DL + cl[None, :], mask=ok[:, None] & (cl[None, :] < DL),
                         other=0.0)
        label = rows
    else:
        target = tl.zeros((BLOCK_B, PL), dtype=tl.float32)
        label = tl.load(y_task + idx, mask=ok, other=0)
    return a0, target, label


@triton.jit
def _select_step(all_steps, s, S_P: tl.constexpr):
    """Row ``s`` of a ``[S_P, BB, C]`` register tensor (masked sum: exact).  The other rows count as
    -0.0, not +0.0: x + (-0.0) is x for every x, a -0.0 input included (+0.0 turned it into +0.0)."""
    sel = tl.arange(0, S_P)[:, None, None] == s
    return tl.sum(tl.where(sel, all_steps, -0.0), axis=0)


@triton.jit
def _select_step_int(all_steps, s, S_P: tl.constexpr):
    sel = tl.arange(0, S_P)[:, None] == s
    return tl.sum(tl.where(sel, all_steps, 0), axis=0)


# ----------------------------------------------------------------------------- the fused finish
@triton.jit
def _write_guard(state_ptr, loss_out_ptr, healthy, first_bad, iteration, n_bad, accept, loss):
    """The guard's state after a meta-step (``meta_step_guard``'s rule): ``[healthy, first bad]`` —
    the step's number recorded as the first bad one if the state was healthy and the step is not
    finite, healthy only if accepted — and the mean loss into its slot.  All ``[1]`` tensors."""
    one = tl.arange(0, 1)
    tl.store(state_ptr + 1 + one, tl.where((healthy != 0) & (n_bad > 0), iteration, first_bad))
    tl.store(state_ptr + one, tl.where(accept, 1, 0).to(tl.int64))
    tl.store(loss_out_ptr + one, loss)


@triton.jit
def _accept_from_partials(phi_ptr, part_row, loss_sum, eps_ptr, state_ptr, iter_ptr, loss_out_ptr,
                          n_params, n_tasks_f, n_losses_f, BLOCK: tl.constexpr):
    """With one program: φ ← φ + ε·Σ/T from this program's partial row, under the guard's rule
    (``meta_step_guard``: only if the mean loss and every new parameter are finite and the state
    is healthy), in place.  The same expressions as ``_outer_update_kernel`` (a zero-started
    sum, ``φ + ε·div_rn(acc, T)``), so the result is bitwise that of the three-launch path."""
    one = tl.arange(0, 1)
    cols = tl.arange(0, BLOCK)
    eps = tl.load(eps_ptr + one)
    loss = tl.math.div_rn(tl.zeros((1,), dtype=tl.float32) + loss_sum, n_losses_f)
    n_bad = tl.sum(_is_bad(loss), axis=0)
    for start in range(0, n_params, BLOCK):
        ok = start + cols < n_params
        acc = tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(part_row + start + cols, mask=ok, other=0.0)
        phi = tl.load(phi_ptr + start + cols, mask=ok, other=0.0)
        n_bad += tl.sum(_is_bad(phi + eps * tl.math.div_rn(acc, n_tasks_f)), axis=0)
    healthy = tl.load(state_ptr + one)
    first_bad = tl.load(state_ptr + 1 + one)
    iteration = tl.load(iter_ptr + one)
    accept = (n_bad == 0) & (healthy != 0)  # [1]
    # compared as a [BLOCK] vector: Triton 3.9's interpreter gives a scalar comparison int32 data,
    # which a store then refuses as a mask
    take = (tl.zeros((BLOCK,), dtype=tl.int32) + tl.sum(accept.to(tl.int32), axis=0)) > 0
    tl.debug_barrier()  # every read of φ above before the writes below
    for start in range(0, n_params, BLOCK):
        ok = start + cols < n_params
        acc = tl.zeros((BLOCK,), dtype=tl.float32) + tl.load(part_row + start + cols, mask=ok, other=0.0)
        phi = tl.load(phi_ptr + start + cols, mask=ok, other=0.0)
        tl.store(phi_ptr + start + cols, phi + eps * tl.math.div_rn(acc, n_tasks_f), mask=ok & take)
    _write_guard(state_ptr, loss_out_ptr, healthy, first_bad, iteration, n_bad, accept, loss)


@triton.jit
def _one_task_update(w, b, p_w, p_b, eps, n_bad):
    """A layer's proposed φ after a one-task meta-step, ``φ + ε·(0 + (φ̃ − φ))``, and ``n_bad``
    plus its non-finite count.  Bitwise what ``_accept_from_partials`` computes from the partial
    row for T = 1: that row is a zero-started sum ``0 + (φ̃ − φ)`` (``_accumulate_layer`` onto
    ``_zero_layer``'s zeros), read into another zero-started sum (0 + that: the same value), and
    divided by T = 1 (exact in IEEE arithmetic, signed zeros and infinities included).  Padded
    tile entries are 0 (φ̃'s padding never moves): finite, and never stored."""
    new_w = p_w + eps * (0.0 + (w - p_w))
    new_b = p_b + eps * (0.0 + (b - p_b))
    n_bad += tl.sum(tl.sum(_is_bad(new_w), axis=1), axis=0) + tl.sum(_is_bad(new_b), axis=0)
    return new_w, new_b, n_bad


# ----------------------------------------------------------------------------- the meta-step kernel
@triton.jit
def _meta_step_kernel(
    # inputs: x [T, N, D0] f32, y [T, N, D_L] f32 or [T, N] i64, plan [T, R, batch] i64, phi [n_params] f32
    x_ptr, y_ptr, idx_ptr, phi_ptr,
    # outputs: partial sums [n_programs, part_stride] f32 of Σ(φ̃ − φ), loss sums [n_programs] f32,
    # adapted parameters [T, out_stride] f32 (WRITE_ADAPTED), losses [T, STEPS] f32 (WRITE_LOSSES)
    part_ptr, loss_part_ptr, out_ptr, loss_ptr,
    # stream=True: per-program scratch [n_programs, scr_stride] f32 (weights of the streamed layers
    # at WOFF_l, their inputs at AOFF_l, one gradient tile at GOFF)
    scr_ptr, scr_stride,
    # FINALIZE (one program runs every task): ε [1] f32, the guard's state [2] i64, this
    # meta-step's number [1] i64 and its loss slot [1] f32 (kernels/meta_step_guard.py's rule)
    eps_ptr, state_ptr, iter_ptr, loss_out_ptr,
    # sizes (elements)
    n_tasks, n_points, batch, idx_stride, part_stride, out_stride, n_programs, n_params,
    # inner loop; T and T · steps as floats (FINALIZE's means)
    lr, grad_scale, loss_count, n_tasks_f, n_losses_f,
    # model: layer count, feature sizes D0..D5, tile sizes P0..P5, activations, dot per layer
    N_LAYERS: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    D5: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
    P5: tl.constexpr,
    ACT0: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr,
    ACT4: tl.constexpr,
    DOT0: tl.constexpr, DOT1: tl.constexpr, DOT2: tl.constexpr, DOT3: tl.constexpr,
    DOT4: tl.constexpr,
    # output size and tile, loss, padded batch, inner steps (and their power of two), plan
    # preloading, dot precision
    DL: tl.constexpr, PL: tl.constexpr, LOSS: tl.constexpr, BLOCK_B: tl.constexpr,
    STEPS: tl.constexpr, S_P: tl.constexpr,
    PRELOAD: tl.constexpr, PRECISION: tl.constexpr,
    # 1-wide layers in 2-D (``_forward``; ``flat_for`` decides); wide x wide products feature-major
    # (``_forward``; ``transpose_for`` decides)
    FLAT: tl.constexpr, TRANS: tl.constexpr,
    # streamed layers (S_l = DOT_l and stream) and their scratch offsets
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, S3: tl.constexpr, S4: tl.constexpr,
    WOFF0: tl.constexpr, WOFF1: tl.constexpr, WOFF2: tl.constexpr, WOFF3: tl.constexpr,
    WOFF4: tl.constexpr, AOFF0: tl.constexpr, AOFF1: tl.constexpr, AOFF2: tl.constexpr,
    AOFF3: tl.constexpr, AOFF4: tl.constexpr, GOFF: tl.constexpr, TILE: tl.constexpr,
    # what to write
    ACCUMULATE: tl.constexpr, WRITE_ADAPTED: tl.constexpr, WRITE_LOSSES: tl.constexpr,
    FINALIZE: tl.constexpr, ONE_TASK: tl.constexpr,
):
    OFF1: tl.constexpr = D1 * D0 + D1
    OFF2: tl.constexpr = OFF1 + D2 * D1 + D2
    OFF3: tl.constexpr = OFF2 + D3 * D2 + D3
    OFF4: tl.constexpr = OFF3 + D4 * D3 + D4
    # int64 program id: task offsets t * (N * D0), t * out_stride overflow int32 for large T
    pid = tl.program_id(0).to(tl.int64)
    scr = scr_ptr + pid * scr_stride
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    # Rows past the batch (the padding up to BLOCK_B) repeat the minibatch's first point, their
    # loss gradient masked to 0: finite wherever the real rows are.  Zero inputs there could
    # overflow (a bias chain alone reaching inf) and 0 x inf made NaN in the weight gradients.
    row_src = tl.where(row_ok, rows, 0)
    all_rows = rows < BLOCK_B
    c0 = tl.arange(0, P0)
    cl = tl.arange(0, PL)
    steps_r = tl.arange(0, S_P)
    plan_ok = (steps_r[:, None] < STEPS) & all_rows[None, :]
    # Σ(φ̃ − φ) over this program's tasks, layer by layer: in registers (ACCUMULATE == 1) or in
    # this program's own partial row (ACCUMULATE == 2: no registers, a cached read-modify-write
    # per task); and Σ of their inner losses
    part_row = part_ptr + pid * part_stride
    if ACCUMULATE == 2:
        _zero_layer(part_row, 0, D0, D1, TILE)
        if N_LAYERS > 1:
            _zero_layer(part_row, OFF1, D1, D2, TILE)
        if N_LAYERS > 2:
            _zero_layer(part_row, OFF2, D2, D3, TILE)
        if N_LAYERS > 3:
            _zero_layer(part_row, OFF3, D3, D4, TILE)
        if N_LAYERS > 4:
            _zero_layer(part_row, OFF4, D4, D5, TILE)
        tl.debug_barrier()
    acc_w0 = tl.zeros((P1, P0), dtype=tl.float32)
    acc_b0 = tl.zeros((P1,), dtype=tl.float32)
    if N_LAYERS > 1:
        acc_w1 = tl.zeros((P2, P1), dtype=tl.float32)
        acc_b1 = tl.zeros((P2,), dtype=tl.float32)
    if N_LAYERS > 2:
        acc_w2 = tl.zeros((P3, P2), dtype=tl.float32)
        acc_b2 = tl.zeros((P3,), dtype=tl.float32)
    if N_LAYERS > 3:
        acc_w3 = tl.zeros((P4, P3), dtype=tl.float32)
        acc_b3 = tl.zeros((P4,), dtype=tl.float32)
    if N_LAYERS > 4:
        acc_w4 = tl.zeros((P5, P4), dtype=tl.float32)
        acc_b4 = tl.zeros((P5,), dtype=tl.float32)
    loss_acc = tl.zeros((1,), dtype=tl.float32)
    for t in range(pid, n_tasks, n_programs):
        point0 = t * n_points
        plan_row = idx_ptr + t * idx_stride
        if PRELOAD == 1:
            # the whole plan of this task: indices [S_P, BB], inputs [S_P, BB, P0], targets
            idx_all = tl.load(plan_row + steps_r[:, None] * batch + row_src[None, :], mask=plan_ok, other=0)
            pt_all = point0 + idx_all
            x_all = tl.load(x_ptr + pt_all[:, :, None] * D0 + c0[None, None, :],
                            mask=plan_ok[:, :, None] & (c0[None, None, :] < D0), other=0.0)
            if LOSS == 0:
                y_all = tl.load(y_ptr + pt_all[:, :, None] * DL + cl[None, None, :],
                                mask=plan_ok[:, :, None] & (cl[None, None, :] < DL), other=0.0)
            else:
                lab_all = tl.load(y_ptr + pt_all, mask=plan_ok, other=0)
        if PRELOAD == 2:
            # prefetch: step 0's minibatch now, step 1's indices; each step then loads the next
            # step's points and the indices of the one after (their latency hidden behind a step)
            # (indices as int32 offsets from the task's first point: the launcher checked them
            # against n_points, an int32; fewer registers carried across the step than int64)
            x_task = x_ptr + point0 * D0
            y_task = y_ptr + point0 * DL if LOSS == 0 else y_ptr + point0
            idx_n = tl.load(plan_row + row_src, mask=all_rows & (STEPS > 0), other=0).to(tl.int32)
            a0_n, target_n, label_n = _minibatch(x_task, y_task, idx_n, all_rows & (STEPS > 0),
                                                 D0, P0, DL, PL, LOSS, BLOCK_B)
            idx_n = tl.load(plan_row + batch + row_src, mask=all_rows & (STEPS > 1), other=0).to(tl.int32)
        w0, b0 = _layer_init(phi_ptr, scr + WOFF0, 0, D0, D1, P0, P1, S0, TILE)
        if N_LAYERS > 1:
            w1, b1 = _layer_init(phi_ptr, scr + WOFF1, OFF1, D1, D2, P1, P2, S1, TILE)
        if N_LAYERS > 2:
            w2, b2 = _layer_init(phi_ptr, scr + WOFF2, OFF2, D2, D3, P2, P3, S2, TILE)
        if N_LAYERS > 3:
            w3, b3 = _layer_init(phi_ptr, scr + WOFF3, OFF3, D3, D4, P3, P4, S3, TILE)
        if N_LAYERS > 4:
            w4, b4 = _layer_init(phi_ptr, scr + WOFF4, OFF4, D4, D5, P4, P5, S4, TILE)
        if S0 or S1 or S2 or S3 or S4:
            tl.debug_barrier()  # the copies of φ before the first read of the scratch
        for s in range(0, STEPS):
            # this step's minibatch
            if PRELOAD == 2:
                a0 = a0_n
                target = target_n
                label = label_n
                a0_n, target_n, label_n = _minibatch(x_task, y_task, idx_n, all_rows & (s + 1 < STEPS),
                                                     D0, P0, DL, PL, LOSS, BLOCK_B)
                idx_n = tl.load(plan_row + (s + 2) * batch + row_src, mask=all_rows & (s + 2 < STEPS),
                                other=0).to(tl.int32)
            elif PRELOAD == 1:
                a0 = _select_step(x_all, s, S_P)
                if LOSS == 0:
                    target = _select_step(y_all, s, S_P)
                    label = rows
                else:
                    target = tl.zeros((BLOCK_B, PL), dtype=tl.float32)
                    label = _select_step_int(lab_all, s, S_P)
            else:
                idx = tl.load(plan_row + s * batch + row_src)
                point = point0 + idx
                a0 = tl.load(x_ptr + point[:, None] * D0 + c0[None, :],
                             mask=all_rows[:, None] & (c0[None, :] < D0), other=0.0)
                if LOSS == 0:
                    target = tl.load(y_ptr + point[:, None] * DL + cl[None, :],
                                     mask=all_rows[:, None] & (cl[None, :] < DL), other=0.0)
                    label = rows
                else:
                    target = tl.zeros((BLOCK_B, PL), dtype=tl.float32)
                    label = tl.load(y_ptr + point)
            # forward; a_l is kept for the backward pass
            a1 = _layer_forward(a0, w0, b0, scr + WOFF0, scr + AOFF0, ACT0, D0, D1, P0, P1, DOT0, S0,
                                FLAT, TRANS, PRECISION, BLOCK_B)
            out = a1
            if N_LAYERS > 1:
                a2 = _layer_forward(a1, w1, b1, scr + WOFF1, scr + AOFF1, ACT1, D1, D2, P1, P2, DOT1, S1,
                                    FLAT, TRANS, PRECISION, BLOCK_B)
                out = a2
            if N_LAYERS > 2:
                a3 = _layer_forward(a2, w2, b2, scr + WOFF2, scr + AOFF2, ACT2, D2, D3, P2, P3, DOT2, S2,
                                    FLAT, TRANS, PRECISION, BLOCK_B)
                out = a3
            if N_LAYERS > 3:
                a4 = _layer_forward(a3, w3, b3, scr + WOFF3, scr + AOFF3, ACT3, D3, D4, P3, P4, DOT3, S3,
                                    FLAT, TRANS, PRECISION, BLOCK_B)
                out = a4
            if N_LAYERS > 4:
                a5 = _layer_forward(a4, w4, b4, scr + WOFF4, scr + AOFF4, ACT4, D4, D5, P4, P5, DOT4, S4,
                                    FLAT, TRANS, PRECISION, BLOCK_B)
                out = a5
            g, loss_sum = _loss_tile(out, target, label, row_ok, grad_scale, LOSS, DL, PL)
            step_loss = tl.math.div_rn(loss_sum, loss_count)
            loss_acc += step_loss
            if WRITE_LOSSES:
                tl.store(loss_ptr + t * STEPS + s, step_loss)
            # backward and SGD, last layer first; a streamed layer's input re-read from its scratch
            if N_LAYERS > 4:
                g, w4, b4 = _layer_backward(g, a4, a5, w4, b4, lr, batch, scr + WOFF4, scr + AOFF4, scr + GOFF,
                                            ACT4, True, D4, D5, P4, P5, DOT4, S4, FLAT, TRANS, PRECISION, BLOCK_B, TILE)
            if N_LAYERS > 3:
                g, w3, b3 = _layer_backward(g, a3, _stashed(a4, scr + AOFF4, P4, S4, BLOCK_B), w3, b3, lr, batch,
                                            scr + WOFF3, scr + AOFF3, scr + GOFF,
                                            ACT3, True, D3, D4, P3, P4, DOT3, S3, FLAT, TRANS, PRECISION, BLOCK_B, TILE)
            if N_LAYERS > 2:
                g, w2, b2 = _layer_backward(g, a2, _stashed(a3, scr + AOFF3, P3, S3, BLOCK_B), w2, b2, lr, batch,
                                            scr + WOFF2, scr + AOFF2, scr + GOFF,
                                            ACT2, True, D2, D3, P2, P3, DOT2, S2, FLAT, TRANS, PRECISION, BLOCK_B, TILE)
            if N_LAYERS > 1:
                g, w1, b1 = _layer_backward(g, a1, _stashed(a2, scr + AOFF2, P2, S2, BLOCK_B), w1, b1, lr, batch,
                                            scr + WOFF1, scr + AOFF1, scr + GOFF,
                                            ACT1, True, D1, D2, P1, P2, DOT1, S1, FLAT, TRANS, PRECISION, BLOCK_B, TILE)
            g, w0, b0 = _layer_backward(g, a0, _stashed(a1, scr + AOFF1, P1, S1, BLOCK_B), w0, b0, lr, batch,
                                        scr + WOFF0, scr + AOFF0, scr + GOFF,
                                        ACT0, False, D0, D1, P0, P1, DOT0, S0, FLAT, TRANS, PRECISION, BLOCK_B, TILE)
        if WRITE_ADAPTED:
            # a streamed layer straight from its scratch, a tile at a time
            out_row = out_ptr + t * out_stride
            _layer_write(out_row, phi_ptr, w0, b0, scr + WOFF0, 0, D0, D1, P0, P1, S0, False, TILE)
            if N_LAYERS > 1:
                _layer_write(out_row, phi_ptr, w1, b1, scr + WOFF1, OFF1, D1, D2, P1, P2, S1, False, TILE)
            if N_LAYERS > 2:
                _layer_write(out_row, phi_ptr, w2, b2, scr + WOFF2, OFF2, D2, D3, P2, P3, S2, False, TILE)
            if N_LAYERS > 3:
                _layer_write(out_row, phi_ptr, w3, b3, scr + WOFF3, OFF3, D3, D4, P3, P4, S3, False, TILE)
            if N_LAYERS > 4:
                _layer_write(out_row, phi_ptr, w4, b4, scr + WOFF4, OFF4, D4, D5, P4, P5, S4, False, TILE)
        if ONE_TASK:
            # FINALIZE of a one-task meta-batch (the seed's setting): φ̃ is in this program's
            # registers, so the update and the guard use them directly -- no partial row written,
            # re-read and summed (ACCUMULATE is 0); bitwise the three-launch path (_one_task_update).
            # Never with streamed layers (``_meta``), whose weights live in the scratch row.
            eps = tl.load(eps_ptr)
            loss_one = tl.math.div_rn(tl.zeros((1,), dtype=tl.float32) + loss_acc, n_losses_f)
            n_bad = tl.sum(_is_bad(loss_one), axis=0)
            p_w0, p_b0 = _load_layer(phi_ptr, 0, D0, D1, P0, P1)
            w0, b0, n_bad = _one_task_update(w0, b0, p_w0, p_b0, eps, n_bad)
            if N_LAYERS > 1:
                p_w1, p_b1 = _load_layer(phi_ptr, OFF1, D1, D2, P1, P2)
                w1, b1, n_bad = _one_task_update(w1, b1, p_w1, p_b1, eps, n_bad)
            if N_LAYERS > 2:
                p_w2, p_b2 = _load_layer(phi_ptr, OFF2, D2, D3, P2, P3)
                w2, b2, n_bad = _one_task_update(w2, b2, p_w2, p_b2, eps, n_bad)
            if N_LAYERS > 3:
                p_w3, p_b3 = _load_layer(phi_ptr, OFF3, D3, D4, P3, P4)
                w3, b3, n_bad = _one_task_update(w3, b3, p_w3, p_b3, eps, n_bad)
            if N_LAYERS > 4:
                p_w4, p_b4 = _load_layer(phi_ptr, OFF4, D4, D5, P4, P5)
                w4, b4, n_bad = _one_task_update(w4, b4, p_w4, p_b4, eps, n_bad)
            one = tl.arange(0, 1)
            healthy = tl.load(state_ptr + one)
            first_bad = tl.load(state_ptr + 1 + one)
            iteration = tl.load(iter_ptr + one)
            accept = (n_bad == 0) & (healthy != 0)  # [1]
            take = tl.sum(accept.to(tl.int32), axis=0) > 0
            tl.debug_barrier()  # every thread's read of φ above before any write of it below
            if take:
                _store_layer(phi_ptr, w0, b0, 0, D0, D1, P0, P1)
                if N_LAYERS > 1:
                    _store_layer(phi_ptr, w1, b1, OFF1, D1, D2, P1, P2)
                if N_LAYERS > 2:
                    _store_layer(phi_ptr, w2, b2, OFF2, D2, D3, P2, P3)
                if N_LAYERS > 3:
                    _store_layer(phi_ptr, w3, b3, OFF3, D3, D4, P3, P4)
                if N_LAYERS > 4:
                    _store_layer(phi_ptr, w4, b4, OFF4, D4, D5, P4, P5)
            _write_guard(state_ptr, loss_out_ptr, healthy, first_bad, iteration, n_bad, accept, loss_one)
        if ACCUMULATE == 1:
            # streamed layers: their weights back into registers for the sums in registers
            w0 = _layer_final(w0, scr + WOFF0, P0, P1, S0)
            if N_LAYERS > 1:
                w1 = _layer_final(w1, scr + WOFF1, P1, P2, S1)
            if N_LAYERS > 2:
                w2 = _layer_final(w2, scr + WOFF2, P2, P3, S2)
            if N_LAYERS > 3:
                w3 = _layer_final(w3, scr + WOFF3, P3, P4, S3)
            if N_LAYERS > 4:
                w4 = _layer_final(w4, scr + WOFF4, P4, P5, S4)
        if ACCUMULATE == 1:
            # φ̃ − φ with φ re-read (cached) rather than kept: it would double the weight registers
            p_w, p_b = _load_layer(phi_ptr, 0, D0, D1, P0, P1)
            acc_w0 += w0 - p_w
            acc_b0 += b0 - p_b
            if N_LAYERS > 1:
                p_w, p_b = _load_layer(phi_ptr, OFF1, D1, D2, P1, P2)
                acc_w1 += w1 - p_w
                acc_b1 += b1 - p_b
            if N_LAYERS > 2:
                p_w, p_b = _load_layer(phi_ptr, OFF2, D2, D3, P2, P3)
                acc_w2 += w2 - p_w
                acc_b2 += b2 - p_b
            if N_LAYERS > 3:
                p_w, p_b = _load_layer(phi_ptr, OFF3, D3, D4, P3, P4)
                acc_w3 += w3 - p_w
                acc_b3 += b3 - p_b
            if N_LAYERS > 4:
                p_w, p_b = _load_layer(phi_ptr, OFF4, D4, D5, P4, P5)
                acc_w4 += w4 - p_w
                acc_b4 += b4 - p_b
        elif ACCUMULATE == 2:
            _layer_write(part_row, phi_ptr, w0, b0, scr + WOFF0, 0, D0, D1, P0, P1, S0, True, TILE)
            if N_LAYERS > 1:
                _layer_write(part_row, phi_ptr, w1, b1, scr + WOFF1, OFF1, D1, D2, P1, P2, S1, True, TILE)
            if N_LAYERS > 2:
                _layer_write(part_row, phi_ptr, w2, b2, scr + WOFF2, OFF2, D2, D3, P2, P3, S2, True, TILE)
            if N_LAYERS > 3:
                _layer_write(part_row, phi_ptr, w3, b3, scr + WOFF3, OFF3, D3, D4, P3, P4, S3, True, TILE)
            if N_LAYERS > 4:
                _layer_write(part_row, phi_ptr, w4, b4, scr + WOFF4, OFF4, D4, D5, P4, P5, S4, True, TILE)
            # the next task's read-modify-write may run on other threads
            tl.debug_barrier()
        if ACCUMULATE != 2:
            if S0 or S1 or S2 or S3 or S4:
                # WAR: every read of the streamed weights (``_layer_write``, ``_layer_final``)
                # before the next task's ``_layer_init`` overwrites them (ACCUMULATE 2 has had
                # its barrier above)
                tl.debug_barrier()
    if ACCUMULATE == 1:
        # every program writes its whole partial row (zeros if it ran no task)
        _store_layer(part_row, acc_w0, acc_b0, 0, D0, D1, P0, P1)
        if N_LAYERS > 1:
            _store_layer(part_row, acc_w1, acc_b1, OFF1, D1, D2, P1, P2)
        if N_LAYERS > 2:
            _store_layer(part_row, acc_w2, acc_b2, OFF2, D2, D3, P2, P3)
        if N_LAYERS > 3:
            _store_layer(part_row, acc_w3, acc_b3, OFF3, D3, D4, P3, P4)
        if N_LAYERS > 4:
            _store_layer(part_row, acc_w4, acc_b4, OFF4, D4, D5, P4, P5)
    if ACCUMULATE > 0:
        tl.store(loss_part_ptr + pid + tl.arange(0, 1), loss_acc)
    if FINALIZE and not ONE_TASK:
        # One program ran every task: it applies the outer update and the guard itself (no
        # second and third launch).  The partial row's writes by every thread before its reads.
        tl.debug_barrier()
        _accept_from_partials(phi_ptr, part_row, loss_acc, eps_ptr, state_ptr, iter_ptr, loss_out_ptr,
                              n_params, n_tasks_f, n_losses_f, 1024)


@triton.jit
def _outer_update_kernel(phi_ptr, part_ptr, loss_part_ptr, eps_ptr, new_phi_ptr, loss_ptr,
                         n_params, part_stride, n_programs, n_tasks_f, n_losses_f,
                         BLOCK: tl.constexpr):
    """φ_new = φ + ε · (Σ_p partials[p]) / T, summed in program order; program 0 also writes the
    mean inner loss Σ_p loss_partials[p] / (T · steps).  ``eps_ptr``: a 1-element device tensor."""
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_params
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # row p at a pointer advanced by part_stride per row (64-bit address arithmetic): the offset
    # p * part_stride in int32 overflowed once n_programs * part_stride >= 2^31 (a caller's
    # partials with a wide row stride, or a grid of ~100k programs on the widest model)
    row = part_ptr + cols
    for p in range(0, n_programs):
        acc += tl.load(row, mask=ok, other=0.0)
        row += part_stride
    eps = tl.load(eps_ptr + tl.arange(0, 1))
    phi = tl.load(phi_ptr + cols, mask=ok, other=0.0)
    # the trainer's φ + ε · mean_i(φ̃_i − φ); mean = sum / T with an IEEE division, as torch's mean
    tl.store(new_phi_ptr + cols, phi + eps * tl.math.div_rn(acc, n_tasks_f), mask=ok)
    if pid == 0:
        lacc = tl.zeros((1,), dtype=tl.float32)
        for p in range(0, n_programs):
            lacc += tl.load(loss_part_ptr + p + tl.arange(0, 1))
        tl.store(loss_ptr + tl.arange(0, 1), tl.math.div_rn(lacc, n_losses_f))


# ----------------------------------------------------------------------------- host side


def flat_params(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[W_0 [D1, D0], b_0 [D1], …]`` -> one flat float32 ``[n_params]`` vector (a copy).

    TypeError unless ``params`` is a non-empty sequence of float32 tensors on one device (an int
    in the list failed with an AttributeError, an empty list inside ``torch.cat``, and a float64
    tensor among them made the whole vector float64)."""
    try:
        params = list(params) if not isinstance(params, torch.Tensor) else None  # model.parameters() too
    except TypeError:
        params = None
    if params is None:
        raise TypeError("params must be a sequence of tensors [W_0, b_0, W_1, …] (a list, or model.parameters())")
    if not params:
        raise ValueError("params must hold at least one tensor (W_0, b_0, …), got an empty sequence")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or p.dtype != torch.float32:
            raise TypeError(f"params[{i}] must be a float32 tensor, got {getattr(p, 'dtype', type(p).__name__)}")
        if p.device != params[0].device:
            raise TypeError(f"params[{i}] is on {p.device}, params[0] on {params[0].device}: one device for all")
    return torch.cat([p.detach().reshape(-1) for p in params])


def unflatten_params(flat: torch.Tensor, dims: Sequence[int]):
    """Views ``[W_0 [..., D1, D0], b_0 [..., D1], …]`` into a flat ``[..., >= n_params]`` tensor."""
    _check_flat_width(flat, dims)
    views = []
    for (w_off, b_off), d_in, d_out in zip(param_layout(dims), dims[:-1], dims[1:]):
        views.append(flat[..., w_off:b_off].unflatten(-1, (d_out, d_in)))
        views.append(flat[..., b_off:b_off + d_out])
    return views


def feature_tile(d: int) -> int:
    """Register tile of a feature size: its power of two when narrow (<= NARROW_MAX), else a power
    of two >= 16 (``tl.dot``'s minimum)."""
    p = triton.next_power_of_2(int(d))
    return p if d <= NARROW_MAX else max(16, p)


def uses_dot(dims: Sequence[int]):
    """Per layer: True when both its sides are wide (``tl.dot``), False for a narrow side."""
    return [d_in > NARROW_MAX and d_out > NARROW_MAX for d_in, d_out in zip(dims[:-1], dims[1:])]


def num_warps_for(dims: Sequence[int], config: Optional["V2Config"] = None) -> int:
    """The warps per program a launch of ``dims`` with ``config`` uses: ``config.num_warps``, else 4.

    Measured with the products batch-major (before ``V2Config.transpose``): the sine MLP's ieee
    meta-step spilled at 4 warps (255 registers, 464 B on sm_90a, Triton 3.6) and not at 8, yet 4
    warps with ``programs_per_sm`` 2 ran it 1.36-1.56x faster than 8 warps with 4 on an H200, in
    every precision, at T = 4096 and 65536: two programs per SM against one
    (bench/results/gpu-h200-2026-12-04, sweep*/); 2 warps ran slower than 4.  Feature-major (the
    ieee default since), 4 warps no longer spill inside the inner step and 8 warps need 128
    registers (two 8-warp programs fit an SM): not yet measured on a GPU, so 4 stays."""
    config = _config(config)
    return config.num_warps or 4


def flat_for(dims: Sequence[int], batch: int, steps: int, config: Optional["V2Config"] = None) -> bool:
    """Whether a launch of ``dims`` at ``batch`` points and ``steps`` inner steps with ``config`` runs
    its 1-wide layers in 2-D (``V2Config.flat``): ``config.flat``, else True where a wide x wide
    layer runs ``tl.dot`` unstreamed -- except with a preloaded plan at a padded batch above 16,
    where Triton laid the 2-D step out in the selected rows' layout (sine MLP, batch 32, 2-5
    steps, sm_90a: 1.9x the instructions and 12.8 KB of spill; bench/results/triton-flat-layers-*)."""
    config = _config(config)
    if config.flat is not None:
        return config.flat
    if not any(uses_dot(dims)) or config.stream:
        return False
    preload, block_b, _ = _plan_layout(dims, batch, steps, config)
    return not (preload == 1 and block_b > 16)


def transpose_for(dims: Sequence[int], batch: int, precision: str = "ieee",
                  config: Optional["V2Config"] = None) -> bool:
    """Whether a launch of ``dims`` at ``batch`` points in ``precision`` with ``config`` computes its
    wide x wide products feature-major (``V2Config.transpose``): ``config.transpose``, else True for
    "ieee" where a wide x wide layer runs ``tl.dot`` unstreamed at a padded batch of 16 (the
    issue's sine setting, batch 10: the step's spill gone).  Not for "tf32x3" / "tf32": there the
    feature-major dot became a warpgroup MMA with 0.8 KB of spill (tf32x3) and twice the
    instructions per step (tf32); not above 16 rows: the sine MLP at batch 32 and one step spilled
    12.9 KB (sm_90a, Triton 3.6: bench/results/triton-transposed-dots-sm90-*.json)."""
    config = _config(config)
    if config.transpose is not None:
        return config.transpose
    if precision != "ieee" or config.stream or not any(uses_dot(dims)):
        return False
    return triton.next_power_of_2(int(batch)) <= 16


def _plan_layout(dims: Sequence[int], batch: int, steps: int, config: "V2Config"):
    """(PRELOAD code, BLOCK_B, S_P) of a launch: 0 each step's rows loaded at the step, 1 the whole
    plan up front (``config.preload`` None: when it fits ``PRELOAD_LIMIT``), 2 prefetched."""
    n_layers = len(dims) - 1
    p = [feature_tile(v) for v in dims]
    block_b = triton.next_power_of_2(int(batch))
    if any(uses_dot(dims)):
        block_b = max(16, block_b)  # tl.dot's M (forward) and K (weight gradient)
    s_p = triton.next_power_of_2(max(1, int(steps)))
    preload = config.preload
    if preload is None:
        preload = s_p * block_b * (p[0] + p[n_layers]) <= PRELOAD_LIMIT
    return (2 if preload == "prefetch" else int(bool(preload))), block_b, s_p


def programs_per_sm_for(dims: Sequence[int], config: Optional["V2Config"] = None) -> int:
    """Persistent programs per SM a launch of ``dims`` with ``config`` uses: ``config.programs_per_sm``,
    else 2 for a model with a wide x wide layer that is not streamed (measured best with 4 warps on
    an H200: see ``num_warps_for``; 4 per SM was 1-14 % slower, 1 per SM 8-50 % slower), 4
    otherwise (streamed: 4 and 8 per SM were 7-10 % faster than 2 on the same H200; narrow models:
    not measured on a GPU yet, they hold few registers, so more programs fit an SM)."""
    config = _config(config)
    return config.programs_per_sm or (2 if any(uses_dot(dims)) and not config.stream else 4)


def unsupported_reason(dims: Sequence[int], batch: int) -> Optional[str]:
    """Why kernel v2 cannot run an MLP with feature sizes ``dims`` and inner batch ``batch``
    (None when it can)."""
    dims = tuple(dims)
    if not 2 <= len(dims) <= MAX_LAYERS + 1:
        return f"kernel v2 runs 1 to {MAX_LAYERS} Linear layers, got {max(len(dims) - 1, 0)} (dims {list(dims)})"
    if min(dims) < 1:
        return f"feature sizes must be at least 1, got {list(dims)}"
    if batch < 1:
        return f"the inner batch must hold at least one point, got {batch}"
    if max(dims) > MAX_FEATURES_V2:
        return f"kernel v2 supports feature sizes up to {MAX_FEATURES_V2}, got {list(dims)} (use kernel 'v1')"
    if batch > MAX_BATCH_V2:
        return f"kernel v2 supports inner batches up to {MAX_BATCH_V2}, got {batch} (use kernel 'v1')"
    return None


def supports_v2(dims: Sequence[int], batch: int) -> bool:
    """Whether kernel v2 can run this MLP shape (``unsupported_reason`` says why not)."""
    return unsupported_reason(dims, batch) is None


@dataclass(frozen=True)
class V2Config:
    """How v2 launches.

    Attributes:
        num_warps: warps per program; None: 4 (``num_warps_for``: measured on an H200; with a
            wide x wide layer 4 warps spill, and still ran faster than 8).
        programs_per_sm: persistent grid = min(T, programs_per_sm × SM count) on a GPU; None: 2
            for a model with a wide x wide layer, 4 otherwise (``programs_per_sm_for``).
        max_programs: a fixed grid cap instead (tests use it to make programs loop over tasks);
            under the interpreter the default is min(T, 8).
        preload: how a task's minibatches reach its steps: True, the whole plan loaded up front
            and each step's rows selected from it (a masked reduction across threads); False,
            each step loads its own rows (an index load, then the dependent point loads, waited
            for); "prefetch", each step loads the next step's rows and the indices of the one
            after, so their latency hides behind a step and nothing is selected across threads;
            None: True when the plan fits ``PRELOAD_LIMIT``, else False.
        accumulate: where a program sums its tasks' φ̃ − φ in a meta-step: "registers" (a second
            copy of the weights in registers) or "memory" (its own partial row, read-modified-
            written once per task, L1/L2-resident); None: "registers" while the padded weights
            are at most ``ACC_REGISTERS_LIMIT`` elements, else "memory".
        stream: wide x wide layers keep their weights in a per-program scratch row and run their
            products as fp32 K-loops (see "streamed wide layers"): at most 128 registers (no
            spills at 4 warps, sm_90a, Triton 3.6 and 3.8, by ahead-of-time compilation), extra
            L1 traffic and barriers; exact fp32 whatever ``precision`` says.  Off by default:
            on an H200 its best setting (4 warps, 4 per SM) ran the sine meta-step 1.6x slower
            than the unstreamed default's (1.66 against 1.00 ms at T = 4096, 24.2 against 14.9 ms
            at 65536; bench/results/gpu-h200-2026-12-04/sweep/), and it would silently turn
            "tf32x3" / "tf32" into fp32.
        flat: a 1-wide input or output layer (the sine MLP's) in 2-D -- an outer product, a row
            reduction -- instead of a 3-D broadcast product (``_forward``); the same numbers, ~40 %
            fewer barriers per inner step for the sine MLP (sm_90a, by ahead-of-time compilation;
            not yet timed on a GPU).  None: ``flat_for`` -- on where a wide x wide layer runs
            ``tl.dot`` (not streamed), except with a preloaded plan at a padded batch above 16;
            elsewhere Triton laid the whole 2-D step out badly (1-64-1: 8x the FMAs; the sine
            MLP at batch 32: 1.9x the instructions, 12.8 KB of spill).
        transpose: the wide x wide products feature-major, ``(w @ a.T).T`` (``_forward``): the
            same sums in the same order, another register layout -- the FMA dot's warps split the
            64 features, not the 16 batch rows, so each warp reads a slice of the weights, not all
            of them.  Sine MLP, ieee, sm_90a (Triton 3.6, by ahead-of-time compilation; not yet
            timed on a GPU): no spill inside the inner step at 4 warps (was 196 local loads and
            stores per step), 10 barriers per step (was 25), 128 registers at 8 warps (was 255).
            None: ``transpose_for`` -- on in "ieee" where a wide x wide layer runs ``tl.dot``
            unstreamed at a padded batch of at most 16 rows.
        max_registers: a per-thread register cap for ptxas (PTX ``.maxnreg``, 32..255): what
            lets more programs share an SM (65536 registers per SM: 4 programs of 4 warps at 128)
            at the cost of spilling to local memory (L1).  None: ``STREAM_MAX_REGISTERS`` when a
            layer is streamed, else no cap.  The same arithmetic either way (only where values
            live changes); ignored under the interpreter.  Sine MLP, ieee, 4 warps, sm_90a, by
            ahead-of-time compilation (``python -m bench.register_cap``): uncapped Triton 3.6
            takes 255 registers and 3.8 168, without spills inside the inner step; capped at
            128, 60 (3.6) / 81 (3.8) local loads and stores per inner step.  Not yet timed on a GPU: the GPU sweep's
            ``--max-registers`` times it.
    """

    num_warps: Optional[int] = None
    programs_per_sm: Optional[int] = None
    max_programs: Optional[int] = None
    preload: Union[None, bool, str] = None
    accumulate: Optional[str] = None
    stream: bool = False
    flat: Optional[bool] = None
    transpose: Optional[bool] = None
    max_registers: Optional[int] = None

    def __post_init__(self) -> None:
        # ints only (not bools, not 4.0): True passed as one program, 4.0 reached the launch
        for name in ("num_warps", "programs_per_sm", "max_programs"):
            v = getattr(self, name)
            if v is not None:
                _check_int_field(name, v, self)
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two in 1..16, got {self.num_warps}")
        if self.programs_per_sm is not None and (not isinstance(self.programs_per_sm, int)
                                                 or self.programs_per_sm < 1):
            raise ValueError(f"programs_per_sm must be None or an int >= 1, got {self.programs_per_sm!r}")
        if self.max_programs is not None and (not isinstance(self.max_programs, int) or self.max_programs < 1):
            raise ValueError(f"max_programs must be None or an int >= 1, got {self.max_programs!r}")
        # numpy's bools are taken as the bools they equal (and stored as bools)
        for name in ("preload", "stream", "flat", "transpose"):
            v = getattr(self, name)
            if type(v).__module__ == "numpy" and type(v).__name__ in ("bool_", "bool"):
                object.__setattr__(self, name, check_bool(name, v))
        if not (self.preload is None or isinstance(self.preload, bool) or self.preload == "prefetch"):
            raise ValueError(f"preload must be None, True, False or 'prefetch', got {self.preload!r}")
        if not isinstance(self.stream, bool):
            raise ValueError(f"stream must be True or False, got {self.stream!r}")
        if not (self.flat is None or isinstance(self.flat, bool)):
            raise ValueError(f"flat must be None, True or False, got {self.flat!r}")
        if not (self.transpose is None or isinstance(self.transpose, bool)):
            raise ValueError(f"transpose must be None, True or False, got {self.transpose!r}")
        if self.max_registers is not None:
            _check_int_field("max_registers", self.max_registers, self)
            if not MIN_REGISTER_CAP <= self.max_registers <= 255:
                raise ValueError(f"max_registers must be None or an int in {MIN_REGISTER_CAP}..255 (ptxas's "
                                 f"per-thread register cap), got {self.max_registers}")
        if self.accumulate not in (None, "registers", "memory"):
            raise ValueError(f"accumulate must be None, 'registers' or 'memory', got {self.accumulate!r}")


def _meta(dims, activations, loss, batch, steps, precision, config: V2Config,
          accumulate: bool, write_adapted: bool, write_losses: bool, finalize: bool = False,
          one_task: bool = False):
    """Compile-time arguments of ``_meta_step_kernel`` (plus num_warps / num_stages).  ``one_task``
    (with ``finalize``): the launch runs exactly one task, whose φ̃ the program updates φ with from
    its registers (no partial sums: ACCUMULATE 0); ignored when a layer is streamed."""
    n_layers = len(dims) - 1
    d = list(dims) + [1] * (MAX_LAYERS + 1 - len(dims))
    p = [feature_tile(v) for v in d]
    dots = uses_dot(dims) + [False] * (MAX_LAYERS - n_layers)
    acts = [ACTIVATION_CODES[a] for a in activations] + [0] * (MAX_LAYERS - n_layers)
    preload, block_b, s_p = _plan_layout(dims, batch, steps, config)
    streamed = [dot and config.stream for dot in dots]
    layout, _ = _scratch_layout(dims, block_b) if config.stream else ({}, 0)
    mode = config.accumulate
    if mode is None:
        weights = sum(a * b for a, b in zip(p[:n_layers], p[1:n_layers + 1]))
        mode = "registers" if weights <= ACC_REGISTERS_LIMIT else "memory"
    # not with streamed layers: their whole weight tiles in registers at once for the update would
    # break the streamed kernel's 128-register cap (Triton 3.6 spilled); they sum in the partial row
    one_task = bool(finalize and one_task and not any(streamed))
    accumulate = (1 if mode == "registers" else 2) if accumulate and not one_task else 0
    return dict(N_LAYERS=n_layers, D0=d[0], D1=d[1], D2=d[2], D3=d[3], D4=d[4], D5=d[5],
                P0=p[0], P1=p[1], P2=p[2], P3=p[3], P4=p[4], P5=p[5],
                ACT0=acts[0], ACT1=acts[1], ACT2=acts[2], ACT3=acts[3], ACT4=acts[4],
                DOT0=dots[0], DOT1=dots[1], DOT2=dots[2], DOT3=dots[3], DOT4=dots[4],
                DL=d[n_layers], PL=p[n_layers], LOSS=LOSS_CODES[loss], BLOCK_B=block_b,
                STEPS=int(steps), S_P=s_p,
                PRELOAD=preload, PRECISION=precision, FLAT=flat_for(dims, batch, steps, config),
                TRANS=transpose_for(dims, batch, precision, config),
                ACCUMULATE=accumulate,
                WRITE_ADAPTED=write_adapted, WRITE_LOSSES=write_losses, FINALIZE=finalize, ONE_TASK=one_task,
                S0=streamed[0], S1=streamed[1], S2=streamed[2], S3=streamed[3], S4=streamed[4],
                **{f"WOFF{l}": layout.get(f"w{l}", 0) for l in range(MAX_LAYERS)},
                **{f"AOFF{l}": layout.get(f"a{l}", 0) for l in range(MAX_LAYERS)}, GOFF=layout.get("g", 0),
                TILE=STREAM_TILE,
                num_warps=num_warps_for(dims, config), num_stages=1,
                **register_cap(dims, config), **COMPILE_OPTIONS)


def register_cap(dims: Sequence[int], config: Optional[V2Config] = None) -> dict:
    """The launch option capping registers per thread: ``{"maxnreg": n}``, or ``{}`` for none
    (``V2Config.max_registers``; else ``STREAM_MAX_REGISTERS`` when a wide layer is streamed)."""
    config = _config(config)
    if config.max_registers is not None:
        return {"maxnreg": config.max_registers}
    return {"maxnreg": STREAM_MAX_REGISTERS} if config.stream and any(uses_dot(dims)) else {}


def _scratch_layout(dims: Sequence[int], block_b: int):
    """Offsets (elements) in a program's scratch row of each streamed layer's weights ``w{l}``
    ``[P_OUT, P_IN]``, its input ``a{l}`` ``[BB, P_IN]`` and the gradient tile ``g``; and the row
    length (a multiple of 4: 16-byte aligned rows)."""
    p = [feature_tile(v) for v in dims]
    layout, off, widest = {}, 0, 0
    for l, dot in enumerate(uses_dot(dims)):
        if dot:
            layout[f"w{l}"] = off
            off += p[l + 1] * p[l]
            layout[f"a{l}"] = off
            off += block_b * p[l]
            widest = max(widest, p[l + 1])
    layout["g"] = off
    off += block_b * widest
    return layout, -(-max(off, 1) // 4) * 4


def _scratch(dims, meta, n_programs, device, config: V2Config):
    """The streamed layers' scratch ``[n_programs, row]`` (a 1-element dummy when not streaming)."""
    if not config.stream or not any(uses_dot(dims)):
        return torch.empty(1, device=device, dtype=torch.float32), 0
    _, row = _scratch_layout(dims, meta["BLOCK_B"])
    return torch.empty(n_programs, row, device=device, dtype=torch.float32), row


def grid_size(T: int, device: torch.device, config: Optional[V2Config] = None, dims: Sequence[int] = ()) -> int:
    """Programs of the persistent grid for ``T`` tasks of a model with feature sizes ``dims``:
    ``min(T, programs_per_sm × SMs)`` on a GPU (``programs_per_sm_for``; ``max_programs`` instead
    when set; 8 under the interpreter)."""
    config = _config(config)
    device = torch.device(device)
    if config.max_programs is not None:
        cap = config.max_programs
    elif device.type == "cuda":
        cap = programs_per_sm_for(dims, config) * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 8
    return max(1, min(T, cap))


def compile_for_target(dims: Sequence[int], activations: Sequence[str], *, loss: str = "mse",
                       batch: int = 10, steps: int = 5, precision: str = "ieee",
                       config: Optional[V2Config] = None, arch: int = 90, accumulate: bool = True,
                       write_adapted: bool = False, write_losses: bool = False, finalize: bool = False,
                       one_task: bool = False, ones: Sequence[str] = ()):
    """Compile the v2 meta-step kernel ahead of time for CUDA ``sm_<arch>`` (no GPU needed).

    ``ones``: integer arguments that are 1 at the launch being reproduced (e.g. ``n_tasks``,
    ``n_programs``, ``batch`` at meta-batch 1 / batch 1): Triton's JIT compiles an int argument
    equal to 1 as the constant 1, a different kernel from the ``i32`` one compiled otherwise.

    Needs the module imported without ``TRITON_INTERPRET=1``.  Returns Triton's ``CompiledKernel``
    (``.asm["ptx"]``, ``.metadata.shared``; run ptxas -v on the PTX for registers / spills)."""
    if INTERPRETED:
        raise RuntimeError("compile_for_target needs the kernels compiled, not interpreted: "
                           "import this module without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget

    config = _config(config)
    meta = _meta(dims, activations, loss, batch, steps, precision, config, accumulate, write_adapted,
                 write_losses, finalize, one_task)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages", "maxnreg", *COMPILE_OPTIONS) if k in meta}
    kernel = _meta_step_kernel
    pointers = {"x_ptr": "*fp32", "y_ptr": "*fp32" if loss == "mse" else "*i64", "idx_ptr": "*i64",
                "phi_ptr": "*fp32", "part_ptr": "*fp32", "loss_part_ptr": "*fp32", "out_ptr": "*fp32",
                "loss_ptr": "*fp32", "scr_ptr": "*fp32", "eps_ptr": "*fp32", "state_ptr": "*i64",
                "iter_ptr": "*i64", "loss_out_ptr": "*fp32"}
    floats = ("lr", "grad_scale", "loss_count", "n_tasks_f", "n_losses_f")
    unknown = set(ones) - set(kernel.arg_names) | (set(ones) & (set(meta) | set(pointers) | set(floats)))
    if unknown:
        raise ValueError(f"ones must name integer arguments of the kernel, got {sorted(unknown)}")
    meta.update({name: 1 for name in ones})
    signature = {name: "constexpr" if name in meta else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in kernel.arg_names}
    source = triton.compiler.ASTSource(kernel, signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# ----------------------------------------------------------------------------- validation


class _Checked(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor
    phi: torch.Tensor
    dims: Tuple[int, ...]
    activations: Tuple[str, ...]
    steps: int
    batch: int
    #: the caller's x, y, indices and φ before ``.contiguous()``: an output must not overlap them
    #: either (checked against the copies alone, an out over a strided x was accepted and wrote
    #: into the caller's tensor: QA46)
    given: Tuple[torch.Tensor, ...] = ()

    @property
    def data(self) -> Tuple[torch.Tensor, ...]:
        """x, y and indices as the kernel reads them and as the caller holds them."""
        return (self.x, self.y, self.indices, *self.given[:3])

    @property
    def phis(self) -> Tuple[torch.Tensor, ...]:
        return (self.phi, *self.given[3:])


def _check_inputs(x, y, indices, phi, dims, activations, lr, loss, steps, precision,
                  check_values: bool = True) -> _Checked:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    device = x.device
    _check_tensor("x", x, torch.float32, 3, device)
    T, N, D0 = x.shape
    if T < 1 or N < 1:
        raise ValueError(f"x needs at least one task and one point, got shape {tuple(x.shape)}")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"tensors are on {device}: kernel v2 needs a CUDA device, or "
                         f"TRITON_INTERPRET=1 set before reptile_fast.kernels.mlp_meta_step_v2 is imported")
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence of feature sizes, got {dims!r}") from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        # int(8.7) would run an 8-wide layer silently; numpy integers are ints
        raise TypeError(f"dims must be ints (feature sizes), got {list(dims)}")
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"dims must hold >= 2 positive feature sizes, got {list(dims)}")
    if dims[0] != D0:
        raise ValueError(f"dims[0] = {dims[0]} but x has {D0} input features")
    try:
        activations = tuple(activations) if not isinstance(activations, str) else (activations,)
    except TypeError:
        raise TypeError(f"activations must be a sequence of names, got {activations!r}") from None
    if len(activations) != len(dims) - 1:
        raise ValueError(f"need one activation per layer ({len(dims) - 1}), got {len(activations)}")
    for a in activations:
        if not isinstance(a, str) or a not in ACTIVATION_CODES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {a!r}")
    if not isinstance(loss, str) or loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {sorted(LOSS_CODES)}, got {loss!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_number("lr", lr)
    _check_tensor("params_flat", phi, torch.float32, 1, device)
    if phi.shape[0] != n_flat_params(dims):
        raise ValueError(f"params_flat must hold {n_flat_params(dims)} parameters for dims {list(dims)}, "
                         f"got {phi.shape[0]}")
    _check_targets(y, loss, T, N, dims[-1], device)
    _check_tensor("indices", indices, torch.int64, 3, device)
    if indices.shape[0] != T or indices.shape[2] < 1:
        raise ValueError(f"indices must have shape [T={T}, steps, batch>=1], got {tuple(indices.shape)}")
    R, B = indices.shape[1], indices.shape[2]
    steps = R if steps is None else steps
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 0 <= steps <= R:
        raise ValueError(f"steps must be an int in [0, {R}] (the plan's rows), got {steps!r}")
    steps = int(steps)  # a numpy integer too
    reason = unsupported_reason(dims, B)
    if reason:
        raise ValueError(reason)
    if N * max(D0, dims[-1]) >= 2 ** 31 or R * B >= 2 ** 31:
        raise ValueError("one task's points or plan exceed 2^31 elements")
    # True or False only: check_values='no' is truthy and meant a host sync the caller refused
    if check_bool("check_values", check_values):
        _check_values(indices, steps, N, y, loss, dims[-1])
    return _Checked(x.contiguous(), y.contiguous(), indices.contiguous(), phi.contiguous(), dims,
                    activations, steps, B, (x, y, indices, phi))


def _config(config) -> "V2Config":
    """``config`` or the default ``V2Config()``; TypeError for anything else (a dict of fields
    failed with an AttributeError deep in the launcher)."""
    if config is None:
        return V2Config()
    if not isinstance(config, V2Config):
        raise TypeError(f"config must be a V2Config (or None), got {type(config).__name__}")
    return config


def _eps_tensor(eps, device) -> torch.Tensor:
    """ε as a 1-element float32 tensor on ``device`` (a device tensor is used as it is)."""
    if isinstance(eps, torch.Tensor):
        if eps.layout != torch.strided or eps.dtype != torch.float32 or eps.numel() != 1 or eps.device != device:
            raise ValueError(f"eps as a tensor must be one dense float32 element on {device}, got "
                             f"{eps.dtype} {tuple(eps.shape)} ({eps.layout}) on {eps.device}")
        return eps.reshape(1)
    try:
        value = _check_number("eps", eps)
    except ValueError as exc:
        raise ValueError(f"{exc} (or a float32 tensor of one element on the device)") from None
    return torch.full((1,), value, device=device, dtype=torch.float32)


def _scalars(loss: str, batch: int, d_out: int):
    if loss == "mse":
        return 2.0 / (batch * d_out), float(batch * d_out)
    return 1.0 / batch, float(batch)


# ----------------------------------------------------------------------------- public functions
class MetaStepResult(NamedTuple):
    """What ``meta_step`` returns.

    Attributes:
        params: float32 ``[n_params]``: φ + ε · mean_i(φ̃_i − φ), flat (``unflatten_params``).
        loss: float32 0-dim tensor: the mean inner minibatch loss over tasks and steps (the
            trainer's ``meta_step()["loss"]``), on the device: reading it syncs.
        task_losses: float32 ``[T, steps]`` per-step losses when ``task_losses=True``, else None.
    """

    params: torch.Tensor
    loss: torch.Tensor
    task_losses: Optional[torch.Tensor]


def meta_step(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, params_flat: torch.Tensor,
              dims: Sequence[int], activations: Sequence[str], *, lr: float,
              eps: Union[float, torch.Tensor], loss: str = "mse", steps: Optional[int] = None,
              precision: str = "ieee", config: Optional[V2Config] = None,
              out: Optional[torch.Tensor] = None, task_losses: bool = False,
              partials: Optional[torch.Tensor] = None, check_values: bool = True) -> MetaStepResult:
    """One fused Reptile meta-step: every task's SGD inner loop, then φ ← φ + ε·mean_i(φ̃_i − φ).

    Two launches, no host synchronisation and no allocation-size that depends on data, so it can
    be captured in a CUDA graph (pass ε as a device tensor to change it between replays).

    Args:
        x: float32 ``[T, N, D0]`` inputs of ``T`` tasks with ``N`` points each.
        y: float32 ``[T, N, D_L]`` targets ("mse") or int64 ``[T, N]`` labels ("cross_entropy").
        indices: int64 ``[T, R, B]`` minibatch plan, values in ``[0, N)``.
        params_flat: float32 ``[n_params]`` φ, flat in ``param_layout(dims)`` order.
        dims: feature sizes ``(D0, D1, …, D_L)``; activations: ``L`` names (``ACTIVATION_CODES``).
        lr: inner SGD learning rate; eps: outer step size ε, a float or a 1-element float32
            tensor on x's device (not inside ``out`` or ``partials``: both are written first).
        loss: "mse" (mean over ``B · D_L``) or "cross_entropy" (mean over ``B``).
        steps: inner steps ``<= R`` (default ``R``).
        precision: "ieee" (default), "tf32x3" or "tf32" for the wide layers' ``tl.dot``.
        config: ``V2Config`` (warps, grid).
        out: optional float32 ``[n_params]`` for the new φ (may not alias ``params_flat``).
        task_losses: also return the ``[T, steps]`` per-step losses.
        partials: optional float32 ``[n_programs, >= n_params]`` scratch for the per-program sums.
        check_values: check that the plan's indices lie in ``[0, N)`` and labels in ``[0, D_L)``
            (one device sync; skipped during CUDA-graph capture).  ``TritonBackend`` checks where
            data enters and passes False, which keeps a meta-step free of host synchronisation.

    Returns:
        ``MetaStepResult(params, loss, task_losses)``.
    """
    c = _check_inputs(x, y, indices, params_flat, dims, activations, lr, loss, steps, precision, check_values)
    # True or False only: task_losses='no' is truthy and returned the losses
    task_losses = check_bool("task_losses", task_losses)
    config = _config(config)
    device = x.device
    T = x.shape[0]
    n_params = n_flat_params(c.dims)
    n_programs = grid_size(T, device, config, c.dims)
    eps_t = _eps_tensor(eps, device)
    if out is None:
        out = torch.empty(n_params, device=device, dtype=torch.float32)
    else:
        _check_tensor("out", out, torch.float32, 1, device)
        if out.shape[0] != n_params or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous [{n_params}] tensor, got {tuple(out.shape)}")
        if _overlaps_any(out, c.phis):
            raise ValueError("out must not alias or overlap params_flat (the update reads φ while writing)")
        # the README's rule for every caller buffer: the inputs are never written (a later meta-step
        # or the caller would read the new φ as its data)
        if _overlaps_any(out, c.data):
            raise ValueError("out must not overlap x, y or indices")
    part_stride = -(-n_params // 4) * 4
    if partials is None:
        partials = torch.empty(n_programs, part_stride, device=device, dtype=torch.float32)
    else:
        _check_tensor("partials", partials, torch.float32, 2, device)
        if partials.shape[0] != n_programs or partials.shape[1] < n_params or partials.stride(1) != 1 \
                or (n_programs > 1 and partials.stride(0) < n_params):
            raise ValueError(f"partials must be a row-contiguous [{n_programs}, >={n_params}] buffer with rows "
                             f"that do not overlap, got shape {tuple(partials.shape)} stride {partials.stride()}")
        # each program writes its row while others read φ, and the second launch reads the rows
        # while writing out: an overlap gives wrong sums or a corrupted φ, silently
        if _overlaps_any(partials, (*c.phis, out, *c.data)):
            raise ValueError("partials must not overlap params_flat, out, x, y or indices")
        part_stride = partials.stride(0)
    # ε is read by every program of the second launch, after the first wrote the partials and while
    # other programs write out: ε inside either buffer gave a silently wrong step size
    if isinstance(eps, torch.Tensor) and _overlaps_any(eps_t, (out, partials)):
        raise ValueError("eps must not overlap out or partials (they are written before or while ε is read)")
    loss_part = torch.empty(n_programs, device=device, dtype=torch.float32)
    losses = torch.empty(T, c.steps, device=device, dtype=torch.float32) if task_losses else loss_part
    mean_loss = torch.empty(1, device=device, dtype=torch.float32)
    grad_scale, loss_count = _scalars(loss, c.batch, c.dims[-1])
    meta = _meta(c.dims, c.activations, loss, c.batch, c.steps, precision, config, True, False, task_losses)
    scratch, scr_stride = _scratch(c.dims, meta, n_programs, device, config)
    n_losses = float(T * max(c.steps, 1)) if c.steps else float("nan")
    with _launch_device(device):  # Triton launches on the current device, not the tensors'
        # (the FINALIZE pointers are not read: placeholders of their types)
        _meta_step_kernel[(n_programs,)](
            c.x, c.y, c.indices, c.phi, partials, loss_part, partials, losses, scratch, scr_stride,
            eps_t, c.indices, c.indices, mean_loss,
            T, x.shape[1], c.batch, c.indices.shape[1] * c.batch, part_stride, 0, n_programs, n_params,
            float(lr), grad_scale, loss_count, float(T), n_losses, **meta)
        block = 1024
        _outer_update_kernel[(triton.cdiv(n_params, block),)](
            c.phi, partials, loss_part, eps_t, out, mean_loss, n_params, part_stride, n_programs,
            float(T), n_losses, BLOCK=block, num_warps=4, **COMPILE_OPTIONS)
    return MetaStepResult(out, mean_loss.reshape(()), losses if task_losses else None)


def guarded_meta_step(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, params_flat: torch.Tensor,
                      dims: Sequence[int], activations: Sequence[str], *, lr: float,
                      eps: Union[float, torch.Tensor], state: torch.Tensor, iteration: torch.Tensor,
                      loss_out: torch.Tensor, loss: str = "mse", steps: Optional[int] = None,
                      precision: str = "ieee", config: Optional[V2Config] = None,
                      scratch: Optional[torch.Tensor] = None, check_values: bool = True) -> None:
    """One meta-step applied to φ in place under the fused stepper's rule
    (``kernels/meta_step_guard.py``): φ ← φ + ε·mean_i(φ̃_i − φ) only if the mean loss and
    every new parameter are finite and ``state`` is healthy; else φ stays and ``state`` records
    ``iteration`` as the first bad meta-step.  The mean loss goes to ``loss_out``.

    With one program (``T = 1``, or ``config.max_programs = 1``) it is **one launch**: the program
    that ran every task applies the update and the guard itself; otherwise ``meta_step`` (two
    launches) + ``accept_step`` (one).  Both give bitwise the same φ, loss and state.  No host
    synchronisation (CUDA-graph capturable).

    Args as ``meta_step``, plus ``state`` int64 ``[2]`` (``meta_step_guard.new_state``),
    ``iteration`` int64 (1 element), ``loss_out`` float32 (1 element), and ``scratch``: optional
    float32 ``[n_params]`` for the proposed φ of the multi-program path.  ``params_flat`` must
    be contiguous and, like ``state``, lie outside ``x``, ``y`` and ``indices`` (both are updated in
    place); ε outside ``scratch``.  ``check_values`` as in ``meta_step``: pass False
    for a launch without host synchronisation.
    """
    check_state(params_flat, state, iteration, loss_out)
    c = _check_inputs(x, y, indices, params_flat, dims, activations, lr, loss, steps, precision, check_values)
    if c.steps == 0:
        # the mean loss of no inner steps is NaN, which the guard would record as a bad meta-step
        raise ValueError("guarded_meta_step needs steps >= 1: a meta-step without inner steps has no mean "
                         "loss, and the guard would record it as non-finite (use meta_step)")
    config = _config(config)
    device = x.device
    T = x.shape[0]
    n_params = n_flat_params(c.dims)
    # loss_out is written, and scratch (the proposed φ) is written then read while φ is written:
    # neither may overlap an input or each other (check_state has checked loss_out against φ)
    if _overlaps_any(loss_out, (*c.data, state, iteration)):
        raise ValueError("loss_out must not overlap x, y, indices, state or iteration")
    # φ and the state are rewritten in place: over the data they would overwrite the caller's
    # inputs (the README's rule for every written buffer), silently
    if _overlaps_any(params_flat, c.data):
        raise ValueError("params_flat must not overlap x, y or indices (it is updated in place)")
    if _overlaps_any(state, c.data):
        raise ValueError("state must not overlap x, y or indices (it is rewritten)")
    if scratch is not None:
        _check_tensor("scratch", scratch, torch.float32, 1, device)
        if scratch.shape[0] != n_params or not scratch.is_contiguous():
            raise ValueError(f"scratch must be a contiguous [{n_params}] tensor, got {tuple(scratch.shape)}")
        if _overlaps_any(scratch, (params_flat, *c.data, state, iteration, loss_out)):
            raise ValueError("scratch must not overlap params_flat, x, y, indices, state, iteration or loss_out")
        if isinstance(eps, torch.Tensor) and _overlaps(scratch, eps):
            # the three-launch path writes the proposed φ there before its update reads ε
            raise ValueError("eps must not overlap scratch (the proposed φ is written before ε is read)")
    n_programs = grid_size(T, device, config, c.dims)
    if n_programs > 1:
        res = meta_step(x, y, indices, params_flat, dims, activations, lr=lr, eps=eps, loss=loss, steps=steps,
                        precision=precision, config=config, out=scratch, check_values=False)
        accept_step(params_flat, res.params, res.loss, state, iteration, loss_out)
        return
    eps_t = _eps_tensor(eps, device)
    part_stride = -(-n_params // 4) * 4
    partials = torch.empty(1, part_stride, device=device, dtype=torch.float32)
    loss_part = torch.empty(1, device=device, dtype=torch.float32)
    grad_scale, loss_count = _scalars(loss, c.batch, c.dims[-1])
    n_losses = float(T * max(c.steps, 1)) if c.steps else float("nan")
    # one task (the seed's meta-batch): the update straight from the program's registers
    meta = _meta(c.dims, c.activations, loss, c.batch, c.steps, precision, config, True, False, False,
                 finalize=True, one_task=T == 1)
    scr, scr_stride = _scratch(c.dims, meta, 1, device, config)
    with _launch_device(device):  # Triton launches on the current device, not the tensors'
        _meta_step_kernel[(1,)](
            c.x, c.y, c.indices, params_flat, partials, loss_part, partials, loss_part, scr, scr_stride,
            eps_t, state, iteration, loss_out,
            T, x.shape[1], c.batch, c.indices.shape[1] * c.batch, part_stride, 0, 1, n_params,
            float(lr), grad_scale, loss_count, float(T), n_losses, **meta)


def inner_loop(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor, params_flat: torch.Tensor,
               dims: Sequence[int], activations: Sequence[str], *, lr: float, loss: str = "mse",
               steps: Optional[int] = None, precision: str = "ieee", config: Optional[V2Config] = None,
               out: Optional[torch.Tensor] = None, out_losses: Optional[torch.Tensor] = None,
               check_values: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every task's SGD inner loop in one launch (adapt / evaluate): no outer update.

    Arguments as ``meta_step`` (``check_values`` included).  ``out``: optional row-contiguous
    float32 ``[T, >= n_params]``;
    ``out_losses``: optional contiguous float32 ``[T, steps]`` (tests fill both with NaN).

    Returns:
        ``(adapted, losses)``: float32 ``[T, row_stride]`` flat adapted parameters
        (``unflatten_params(adapted, dims)`` gives per-layer views) and ``[T, steps]`` losses.
    """
    c = _check_inputs(x, y, indices, params_flat, dims, activations, lr, loss, steps, precision, check_values)
    config = _config(config)
    device = x.device
    T = x.shape[0]
    n_params = n_flat_params(c.dims)
    row_stride = -(-n_params // 4) * 4
    if out is None:
        out = torch.empty(T, row_stride, device=device, dtype=torch.float32)
    else:
        _check_tensor("out", out, torch.float32, 2, device)
        if out.shape[0] != T or out.shape[1] < n_params or out.stride(1) != 1 or (T > 1 and out.stride(0) < n_params):
            raise ValueError(f"out must be a row-contiguous [T={T}, >={n_params}] buffer with rows that do not "
                             f"overlap, got shape {tuple(out.shape)} stride {out.stride()}")
        row_stride = out.stride(0)
        if _overlaps_any(out, (*c.phis, *c.data)):
            raise ValueError("out must not overlap params_flat, x, y or indices (programs read them while "
                             "others write their rows)")
    if out_losses is None:
        out_losses = torch.empty(T, c.steps, device=device, dtype=torch.float32)
    else:
        _check_tensor("out_losses", out_losses, torch.float32, 2, device)
        if tuple(out_losses.shape) != (T, c.steps) or not out_losses.is_contiguous():
            raise ValueError(f"out_losses must be a contiguous [{T}, {c.steps}] tensor, got {tuple(out_losses.shape)}")
        if _overlaps_any(out_losses, (out, *c.phis, *c.data)):
            raise ValueError("out_losses must not overlap out, params_flat, x, y or indices")
    n_programs = grid_size(T, device, config, c.dims)
    grad_scale, loss_count = _scalars(loss, c.batch, c.dims[-1])
    meta = _meta(c.dims, c.activations, loss, c.batch, c.steps, precision, config, False, True, True)
    scratch, scr_stride = _scratch(c.dims, meta, n_programs, device, config)
    with _launch_device(device):  # Triton launches on the current device, not the tensors'
        _meta_step_kernel[(n_programs,)](
            c.x, c.y, c.indices, c.phi, out, out_losses, out, out_losses, scratch, scr_stride,
            out_losses, c.indices, c.indices, out_losses,  # FINALIZE's pointers: unused placeholders
            T, x.shape[1], c.batch, c.indices.shape[1] * c.batch, 0, row_stride, n_programs, n_params,
            float(lr), grad_scale, loss_count, float(T), float(T * max(c.steps, 1)), **meta)
    return out, out_losses
