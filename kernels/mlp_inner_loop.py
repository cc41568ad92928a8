"""Fused Triton kernel: the whole SGD inner loop of every task of a Linear/activation MLP.

Program ``p`` runs the inner loops of its tasks (task ``p`` with one task per program): it loads
φ, and for each inner step gathers that step's minibatch through the plan's indices, runs the
forward pass through the Linear + activation layers, the loss gradient (MSE, mean over
``batch * out`` elements exactly as ``F.mse_loss``; softmax cross-entropy, mean over the batch, for
long class labels), the backward pass and the SGD update, all without leaving the kernel.  It
writes the task's adapted parameters φ̃ (the trainer does the outer update) and the minibatch
loss of every step.  No atomics: every output element has exactly one writer, so results do not
depend on scheduling.

Two variants of the same arithmetic, picked per model by ``choose_launch_config``:

* ``"registers"`` (small models: every padded size <= 64, padded batch x width <= 16 x 64, e.g.
  the seed's 1-64-64-1 with batch 10): each layer is one whole padded tile; the weights stay in
  registers across all inner steps and activations never leave the chip.  Feature sizes are
  padded to a power of two >= 16 (``tl.dot``'s minimum), the batch to ``BLOCK_B`` >= 16; padded
  rows and columns are masked out of the loss and the gradients, so padded weights stay zero.
* ``"tiled"`` (everything else, up to 256 features and any batch): registers cannot hold a
  256 x 256 weight tile (256 KiB), and fp32 dots lower to FMA loops that keep (rows + columns
  per thread) x K operands in registers, so the working copy of a task's weights lives in its
  own row of the output buffer and activations / gradients in a small per-program scratch
  buffer; every GEMM streams 16 x 64 x 32 tiles through ``tl.dot``.  These buffers are private
  to one program and small, so they mostly stay in L1/L2; the price is a CTA barrier between
  phases and the cache round trips.  The grid is capped (8 programs per SM) and each program
  loops over tasks, which bounds the scratch.

Register use (ptxas for sm_90a, compile only, Triton 3.8 and 3.6): 1-64-64-1 / batch 10 in the
registers variant: 229-255 registers, no spills at 8 warps (4 warps spill ~1 KB); tiled 2-256-256-3
at 4 warps: 128-168 registers, no spills (bench/results/triton-compile-sm90-v1-*-session24.json).
Speed is measured by ``bench/bench_triton_kernel.py``.

exp, log, tanh, sigmoid and every division inside the kernels come from
``special_functions.py`` (fp32 FMA arithmetic and ``tl.math.div_rn``): on NVIDIA ``tl.exp``,
``tl.log`` and ``/`` lower to approximate instructions, so the same accuracy bound
(``special_functions.ACCURACY``) holds on a GPU and under the interpreter.

Arithmetic is fp32 with fp32 accumulation.  ``tl.dot`` uses ``input_precision="ieee"`` by default
(results equal the reference up to summation order); ``"tf32"`` is an option for speed.  The
Triton interpreter (``TRITON_INTERPRET=1``, how CI runs this file) computes every dot in fp32,
i.e. it ignores "tf32".

Only long-stable Triton features are used (``tl.dot(input_precision=)``, constexpr branches,
masks, ``tl.debug_barrier``); it compiles with Triton 3.6 and 3.9.  (Triton 3.6's *interpreter*
cannot run it with numpy >= 2.4: its scalar ``__index__`` rejects 1-element arrays; 3.9's can.)
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# activation name -> the kernel's compile-time code: the one table of MLP maths
from reptile_fast.mlp_math import ACTIVATION_CODES
from reptile_fast.validation import check_bool

# exp / log / tanh / sigmoid in fp32 FMA arithmetic: the same error bound on a GPU as under the
# interpreter (tl.exp, tl.log and "/" lower to approximate instructions on NVIDIA)
from .special_functions import COMPILE_OPTIONS, _exp, _log, _sigmoid, _tanh

__all__ = [
    "ACTIVATION_CODES", "LOSS_CODES", "MAX_LAYERS", "MAX_FEATURES", "INTERPRETED", "LaunchConfig",
    "padded", "param_layout", "n_flat_params", "choose_launch_config", "registers_unsupported_reason",
    "SHARED_MEMORY_LIMIT", "tiled_shared_bytes", "launch_unsupported_reason",
    "split_params",
    "mlp_inner_loop", "compile_for_target",
]

#: loss name -> the kernel's compile-time code
LOSS_CODES = {"mse": 0, "cross_entropy": 1}
#: at most 5 Linear layers (4 hidden layers)
MAX_LAYERS = 5
#: every feature size (input, hidden, output/classes) at most this
MAX_FEATURES = 256
#: ``tl.dot`` needs every dimension >= 16
MIN_BLOCK = 16
#: @triton.jit reads TRITON_INTERPRET when this module is imported: True means the kernels below
#: run on CPU tensors through the interpreter (and False that they need a GPU).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) for ACT in ACTIVATION_CODES (0 identity, 1 tanh, 2 relu, 3 sigmoid)."""
    if ACT == 1:
        z = _tanh(z)
    elif ACT == 2:
        z = tl.where(z <= 0.0, 0.0, z)  # NaN stays NaN, as in torch (tl.maximum returned the 0)
    elif ACT == 3:
        z = _sigmoid(z)
    return z


@triton.jit
def _activation_grad(g, a, ACT: tl.constexpr):
    """dL/dz from dL/da and the activation's output a = act(z), written as torch's backward is."""
    if ACT == 1:
        g = g * (1.0 - a * a)
    elif ACT == 2:
        g = tl.where(a <= 0.0, 0.0, g)  # torch's threshold_backward: a NaN output passes the gradient on
    elif ACT == 3:
        g = g * (1.0 - a) * a
    return g


@triton.jit
def _loss_tile(out, y_ptr, point, row_ok, grad_scale,
               LOSS: tl.constexpr, D_OUT: tl.constexpr, P_OUT: tl.constexpr):
    """Loss gradient and summed loss of one tile of batch rows.

    Args:
        out: ``[BM, P_OUT]`` network outputs (padded columns are ignored).
        y_ptr: targets of the whole batch, ``[T * N, D_OUT]`` floats or ``[T * N]`` labels.
        point: ``[BM]`` int64 global point index ``t * N + idx`` of each row.
        row_ok: ``[BM]`` which rows are real (padded rows give zero loss and gradient).
        grad_scale: 2 / (batch * D_OUT) for MSE (torch's mse_loss backward), 1 / batch for CE.

    Returns:
        ``(g [BM, P_OUT], s)``: dL/d out, and the un-normalised loss sum over the tile's rows.
    """
    cols = tl.arange(0, P_OUT)
    col_ok = cols < D_OUT
    ok = row_ok[:, None] & col_ok[None, :]
    if LOSS == 0:
        target = tl.load(y_ptr + point[:, None] * D_OUT + cols[None, :], mask=ok, other=0.0)
        diff = tl.where(ok, out - target, 0.0)
        s = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        g = grad_scale * diff
    else:
        label = tl.load(y_ptr + point, mask=row_ok, other=0)
        z = tl.where(col_ok[None, :], out, float("-inf"))
        z_max = tl.max(z, axis=1)
        e = _exp(z - z_max[:, None])
        e_sum = tl.sum(e, axis=1)
        is_label = cols[None, :] == label[:, None]
        z_label = tl.sum(tl.where(is_label, out, 0.0), axis=1)
        row_loss = z_max + _log(e_sum) - z_label  # e_sum >= 1: the max's own term is e^0
        s = tl.sum(tl.where(row_ok, row_loss, 0.0), axis=0)
        p = tl.math.div_rn(e, e_sum[:, None])
        g = tl.where(ok, (p - tl.where(is_label, 1.0, 0.0)) * grad_scale, 0.0)
    return g, s


# ----------------------------------------------------------------------------- "registers" variant
@triton.jit
def _load_layer(ptr, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                P_IN: tl.constexpr, P_OUT: tl.constexpr):
    """Weight ``[P_OUT, P_IN]`` and bias ``[P_OUT]`` of one layer, zero-padded, from a flat row."""
    rows = tl.arange(0, P_OUT)
    cols = tl.arange(0, P_IN)
    w = tl.load(ptr + OFF + rows[:, None] * D_IN + cols[None, :],
                mask=(rows[:, None] < D_OUT) & (cols[None, :] < D_IN), other=0.0)
    b = tl.load(ptr + OFF + D_OUT * D_IN + rows, mask=rows < D_OUT, other=0.0)
    return w, b


@triton.jit
def _store_layer(ptr, w, b, OFF: tl.constexpr, D_IN: tl.constexpr, D_OUT: tl.constexpr,
                 P_IN: tl.constexpr, P_OUT: tl.constexpr):
    rows = tl.arange(0, P_OUT)
    cols = tl.arange(0, P_IN)
    tl.store(ptr + OFF + rows[:, None] * D_IN + cols[None, :], w,
             mask=(rows[:, None] < D_OUT) & (cols[None, :] < D_IN))
    tl.store(ptr + OFF + D_OUT * D_IN + rows, b, mask=rows < D_OUT)


@triton.jit
def _dense(a, w, b, ACT: tl.constexpr, D_OUT: tl.constexpr, P_OUT: tl.constexpr,
           PRECISION: tl.constexpr):
    """act(a @ w.T + b): ``[BB, P_IN] -> [BB, P_OUT]``; padded columns are exactly 0."""
    z = tl.dot(a, tl.trans(w), input_precision=PRECISION) + b[None, :]
    h = _activation(z, ACT)
    if ACT == 3:
        if D_OUT < P_OUT:  # sigmoid(0) = 0.5: zero the padded units so they add nothing downstream
            h = tl.where(tl.arange(0, P_OUT)[None, :] < D_OUT, h, 0.0)
    return h


@triton.jit
def _backward_layer(g, a_in, a_out, w, b, lr, ACT: tl.constexpr, INPUT_GRAD: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Backward through ``a_out = act(a_in @ w.T + b)`` and the SGD step on ``w, b``.

    ``g``: dL/d a_out ``[BB, P_OUT]``.  Returns ``(dL/d a_in [BB, P_IN] (g itself when not
    INPUT_GRAD), w - lr dW, b - lr db)``; dL/d a_in uses w before its update, as autograd does.
    """
    g = _activation_grad(g, a_out, ACT)
    grad_w = tl.dot(tl.trans(g), a_in, input_precision=PRECISION)
    grad_b = tl.sum(g, axis=0)
    if INPUT_GRAD:
        g_in = tl.dot(g, w, input_precision=PRECISION)
    else:
        g_in = g
    return g_in, w - lr * grad_w, b - lr * grad_b


@triton.jit
def _inner_loop_registers_kernel(
    # inputs: x [T, N, D0] f32, y [T, N, D_L] f32 or [T, N] i64, plan [T, R, batch] i64, phi [n_params] f32
    x_ptr, y_ptr, idx_ptr, phi_ptr,
    # outputs: adapted parameters [T, out_stride] f32 (flat, layer by layer W then b), losses [T, n_steps] f32
    out_ptr, loss_ptr,
    # sizes (elements)
    n_tasks, n_points, batch, n_steps, idx_stride, out_stride, tasks_per_program,
    # inner loop
    lr, grad_scale, loss_count,
    # model: layer count, feature sizes D0..D5, their padded sizes P0..P5, activations ACT0..ACT4
    N_LAYERS: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    D5: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, P3: tl.constexpr, P4: tl.constexpr,
    P5: tl.constexpr,
    ACT0: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr,
    ACT4: tl.constexpr,
    # loss code, padded batch, tl.dot input precision
    LOSS: tl.constexpr, BLOCK_B: tl.constexpr, PRECISION: tl.constexpr,
):
    # Flat offsets of each layer's weight (its bias follows it) in a parameter row.
    OFF1: tl.constexpr = D1 * D0 + D1
    OFF2: tl.constexpr = OFF1 + D2 * D1 + D2
    OFF3: tl.constexpr = OFF2 + D3 * D2 + D3
    OFF4: tl.constexpr = OFF3 + D4 * D3 + D4
    # int64 program id: task offsets t * (N * D0) etc. overflow int32 beyond ~2^31 elements,
    # i.e. a few hundred thousand tasks of the seed's size.
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    row_ok = rows < batch
    # Rows past the batch (the padding up to BLOCK_B) repeat the minibatch's first point, their
    # loss gradient masked to 0: finite wherever the real rows are.  Zero inputs there could
    # overflow (a bias chain alone reaching inf) and 0 x inf made NaN in the weight gradients.
    row_src = tl.where(row_ok, rows, 0)
    c0 = tl.arange(0, P0)
    x_ok = (rows[:, None] < BLOCK_B) & (c0[None, :] < D0)
    for i in range(0, tasks_per_program):
        t = pid * tasks_per_program + i
        if t < n_tasks:
            # φ -> registers; padded entries are 0 and stay 0 (their gradients are masked to 0)
            w0, b0 = _load_layer(phi_ptr, 0, D0, D1, P0, P1)
            if N_LAYERS > 1:
                w1, b1 = _load_layer(phi_ptr, OFF1, D1, D2, P1, P2)
            if N_LAYERS > 2:
                w2, b2 = _load_layer(phi_ptr, OFF2, D2, D3, P2, P3)
            if N_LAYERS > 3:
                w3, b3 = _load_layer(phi_ptr, OFF3, D3, D4, P3, P4)
            if N_LAYERS > 4:
                w4, b4 = _load_layer(phi_ptr, OFF4, D4, D5, P4, P5)
            for s in range(0, n_steps):
                # gather this step's minibatch through the plan
                idx = tl.load(idx_ptr + t * idx_stride + s * batch + row_src)
                point = t * n_points + idx
                a0 = tl.load(x_ptr + point[:, None] * D0 + c0[None, :], mask=x_ok, other=0.0)
                # forward; a_l is kept for the backward pass
                a1 = _dense(a0, w0, b0, ACT0, D1, P1, PRECISION)
                out = a1
                if N_LAYERS > 1:
                    a2 = _dense(a1, w1, b1, ACT1, D2, P2, PRECISION)
                    out = a2
                if N_LAYERS > 2:
                    a3 = _dense(a2, w2, b2, ACT2, D3, P3, PRECISION)
                    out = a3
                if N_LAYERS > 3:
                    a4 = _dense(a3, w3, b3, ACT3, D4, P4, PRECISION)
                    out = a4
                if N_LAYERS > 4:
                    a5 = _dense(a4, w4, b4, ACT4, D5, P5, PRECISION)
                    out = a5
                # loss and dL/d out
                if N_LAYERS == 1:
                    g, loss_sum = _loss_tile(out, y_ptr, point, row_ok, grad_scale, LOSS, D1, P1)
                elif N_LAYERS == 2:
                    g, loss_sum = _loss_tile(out, y_ptr, point, row_ok, grad_scale, LOSS, D2, P2)
                elif N_LAYERS == 3:
                    g, loss_sum = _loss_tile(out, y_ptr, point, row_ok, grad_scale, LOSS, D3, P3)
                elif N_LAYERS == 4:
                    g, loss_sum = _loss_tile(out, y_ptr, point, row_ok, grad_scale, LOSS, D4, P4)
                else:
                    g, loss_sum = _loss_tile(out, y_ptr, point, row_ok, grad_scale, LOSS, D5, P5)
                tl.store(loss_ptr + t * n_steps + s, tl.math.div_rn(loss_sum, loss_count))
                # backward and SGD, last layer first
                if N_LAYERS > 4:
                    g, w4, b4 = _backward_layer(g, a4, a5, w4, b4, lr, ACT4, True, PRECISION)
                if N_LAYERS > 3:
                    g, w3, b3 = _backward_layer(g, a3, a4, w3, b3, lr, ACT3, True, PRECISION)
                if N_LAYERS > 2:
                    g, w2, b2 = _backward_layer(g, a2, a3, w2, b2, lr, ACT2, True, PRECISION)
                if N_LAYERS > 1:
                    g, w1, b1 = _backward_layer(g, a1, a2, w1, b1, lr, ACT1, True, PRECISION)
                g, w0, b0 = _backward_layer(g, a0, a1, w0, b0, lr, ACT0, False, PRECISION)
            # φ̃ -> this task's output row
            out_row = out_ptr + t * out_stride
            _store_layer(out_row, w0, b0, 0, D0, D1, P0, P1)
            if N_LAYERS > 1:
                _store_layer(out_row, w1, b1, OFF1, D1, D2, P1, P2)
            if N_LAYERS > 2:
                _store_layer(out_row, w2, b2, OFF2, D2, D3, P2, P3)
            if N_LAYERS > 3:
                _store_layer(out_row, w3, b3, OFF3, D3, D4, P3, P4)
            if N_LAYERS > 4:
                _store_layer(out_row, w4, b4, OFF4, D4, D5, P4, P5)


# ----------------------------------------------------------------------------- "tiled" variant
@triton.jit
def _mm_tile(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, m0, n0, M, N, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             PRECISION: tl.constexpr):
    """``C[m0:m0+BM, n0:n0+BN]`` of ``C = A @ B`` (A ``[M, K]``, B ``[K, N]``, any strides), fp32."""
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tiled_forward_layer(a_ptr, w_ptr, h_ptr, batch, ACT: tl.constexpr, D_IN: tl.constexpr,
                         D_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """h ``[batch, D_OUT]`` = act(a ``[batch, D_IN]`` @ W.T + b); W at w_ptr, b right after it."""
    for m0 in range(0, batch, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        for n0 in range(0, D_OUT, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            # W.T as the B operand: element (k, n) is W[n, k]
            z = _mm_tile(a_ptr, D_IN, 1, w_ptr, 1, D_IN, m0, n0, batch, D_OUT, D_IN,
                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            bias = tl.load(w_ptr + D_OUT * D_IN + rn, mask=rn < D_OUT, other=0.0)
            h = _activation(z + bias[None, :], ACT)
            tl.store(h_ptr + rm[:, None] * D_OUT + rn[None, :], h,
                     mask=(rm[:, None] < batch) & (rn[None, :] < D_OUT))


@triton.jit
def _tiled_backward_layer(g_ptr, g_in_ptr, a_ptr, w_ptr, batch, lr, ACT_IN: tl.constexpr,
                          D_IN: tl.constexpr, D_OUT: tl.constexpr, INPUT_GRAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Backward through one layer and its SGD step, all through global memory.

    ``g_ptr``: dL/dz of this layer ``[batch, D_OUT]``; ``a_ptr``: its input ``[batch, D_IN]``
    (the previous layer's activation ACT_IN).  Writes dL/dz of the previous layer to ``g_in_ptr``
    when INPUT_GRAD, then W -= lr g.T @ a and b -= lr Σ_rows g in place.
    """
    if INPUT_GRAD:
        for m0 in range(0, batch, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            for n0 in range(0, D_IN, BLOCK_N):
                rn = n0 + tl.arange(0, BLOCK_N)
                ok = (rm[:, None] < batch) & (rn[None, :] < D_IN)
                # g @ W, W [D_OUT, D_IN] as the B operand
                g_in = _mm_tile(g_ptr, D_OUT, 1, w_ptr, D_IN, 1, m0, n0, batch, D_IN, D_OUT,
                                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                a = tl.load(a_ptr + rm[:, None] * D_IN + rn[None, :], mask=ok, other=0.0)
                g_in = _activation_grad(g_in, a, ACT_IN)
                tl.store(g_in_ptr + rm[:, None] * D_IN + rn[None, :], g_in, mask=ok)
        # every read of W above must finish before any thread updates W below
        tl.debug_barrier()
    for m0 in range(0, D_OUT, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        for n0 in range(0, D_IN, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            ok = (rm[:, None] < D_OUT) & (rn[None, :] < D_IN)
            # dW = g.T @ a: g.T [D_OUT, batch] as the A operand, a [batch, D_IN] as B
            grad_w = _mm_tile(g_ptr, 1, D_OUT, a_ptr, D_IN, 1, m0, n0, D_OUT, D_IN, batch,
                              BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            w_ptrs = w_ptr + rm[:, None] * D_IN + rn[None, :]
            w = tl.load(w_ptrs, mask=ok, other=0.0)
            tl.store(w_ptrs, w - lr * grad_w, mask=ok)
        grad_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, batch, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(g_ptr + rk[:, None] * D_OUT + rm[None, :],
                        mask=(rk[:, None] < batch) & (rm[None, :] < D_OUT), other=0.0)
            grad_b += tl.sum(g, axis=0)
        b_ptrs = w_ptr + D_OUT * D_IN + rm
        b = tl.load(b_ptrs, mask=rm < D_OUT, other=0.0)
        tl.store(b_ptrs, b - lr * grad_b, mask=rm < D_OUT)
    # W, b and g are reused by the next phase, possibly by other threads
    tl.debug_barrier()


@triton.jit
def _tiled_gather(x_ptr, plan, a0_ptr, point0, batch, D0: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """A_0 ``[batch, D0]`` = rows ``point0 + plan[:batch]`` of x ``[T * N, D0]``."""
    for m0 in range(0, batch, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        point = point0 + tl.load(plan + rm, mask=rm < batch, other=0)
        for n0 in range(0, D0, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            ok = (rm[:, None] < batch) & (rn[None, :] < D0)
            v = tl.load(x_ptr + point[:, None] * D0 + rn[None, :], mask=ok, other=0.0)
            tl.store(a0_ptr + rm[:, None] * D0 + rn[None, :], v, mask=ok)


@triton.jit
def _tiled_loss(h_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale, LOSS: tl.constexpr,
                ACT: tl.constexpr, D_OUT: tl.constexpr, P_OUT: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """Un-normalised minibatch loss; writes dL/dz of the last layer ``[batch, D_OUT]`` to g_ptr.

    ``h_ptr``: the network's output ``[batch, D_OUT]`` (after the last activation ACT).
    """
    cols = tl.arange(0, P_OUT)
    total = 0.0
    for m0 in range(0, batch, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        row_ok = rm < batch
        ok = row_ok[:, None] & (cols[None, :] < D_OUT)
        h = tl.load(h_ptr + rm[:, None] * D_OUT + cols[None, :], mask=ok, other=0.0)
        point = point0 + tl.load(plan + rm, mask=row_ok, other=0)
        g, part = _loss_tile(h, y_ptr, point, row_ok, grad_scale, LOSS, D_OUT, P_OUT)
        g = _activation_grad(g, h, ACT)
        tl.store(g_ptr + rm[:, None] * D_OUT + cols[None, :], g, mask=ok)
        total += part
    return total


@triton.jit
def _inner_loop_tiled_kernel(
    # inputs: x [T, N, D0] f32, y [T, N, D_L] f32 or [T, N] i64, plan [T, R, batch] i64, phi [n_params] f32
    x_ptr, y_ptr, idx_ptr, phi_ptr,
    # outputs: adapted parameters [T, out_stride] f32 (also the working copy), losses [T, n_steps] f32
    out_ptr, loss_ptr,
    # per-program scratch [n_programs, scratch_stride] f32: activations A_0..A_5, two dL/dz buffers
    scratch_ptr, scratch_stride,
    # sizes (elements); program p runs tasks p, p + n_programs, … (tasks_per_program of them)
    n_tasks, n_points, batch, n_steps, idx_stride, out_stride, n_params, n_programs,
    tasks_per_program,
    # inner loop
    lr, grad_scale, loss_count,
    # model: layer count, feature sizes D0..D5 (1 for absent layers), activations ACT0..ACT4
    N_LAYERS: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    D5: tl.constexpr,
    ACT0: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr, ACT3: tl.constexpr,
    ACT4: tl.constexpr,
    # loss code, widest layer, output width padded to a power of two, tile sizes, tl.dot precision
    LOSS: tl.constexpr, D_MAX: tl.constexpr, P_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COPY_BLOCK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    OFF1: tl.constexpr = D1 * D0 + D1
    OFF2: tl.constexpr = OFF1 + D2 * D1 + D2
    OFF3: tl.constexpr = OFF2 + D3 * D2 + D3
    OFF4: tl.constexpr = OFF3 + D4 * D3 + D4
    # int64 program id: see the registers kernel (t * out_stride etc. overflow int32 otherwise)
    pid = tl.program_id(0).to(tl.int64)
    # scratch of this program: A_0 (gathered inputs) … A_5, then two dL/dz buffers used in turn;
    # the launcher sizes scratch_stride the same way
    a0_ptr = scratch_ptr + pid * scratch_stride
    a1_ptr = a0_ptr + batch * D0
    a2_ptr = a1_ptr + batch * D1
    a3_ptr = a2_ptr + batch * D2
    a4_ptr = a3_ptr + batch * D3
    a5_ptr = a4_ptr + batch * D4
    g_ptr = a5_ptr + batch * D5
    g_other_ptr = g_ptr + batch * D_MAX
    for i in range(0, tasks_per_program):
        t = pid + i * n_programs
        if t < n_tasks:
            row = out_ptr + t * out_stride
            point0 = t * n_points
            # working copy of φ: this task's output row
            for off in range(0, n_params, COPY_BLOCK):
                cols = off + tl.arange(0, COPY_BLOCK)
                v = tl.load(phi_ptr + cols, mask=cols < n_params, other=0.0)
                tl.store(row + cols, v, mask=cols < n_params)
            tl.debug_barrier()
            for s in range(0, n_steps):
                plan = idx_ptr + t * idx_stride + s * batch
                _tiled_gather(x_ptr, plan, a0_ptr, point0, batch, D0, BLOCK_M, BLOCK_N)
                tl.debug_barrier()
                # forward, layer by layer through the scratch
                _tiled_forward_layer(a0_ptr, row, a1_ptr, batch, ACT0, D0, D1,
                                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                tl.debug_barrier()
                if N_LAYERS > 1:
                    _tiled_forward_layer(a1_ptr, row + OFF1, a2_ptr, batch, ACT1, D1, D2,
                                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    tl.debug_barrier()
                if N_LAYERS > 2:
                    _tiled_forward_layer(a2_ptr, row + OFF2, a3_ptr, batch, ACT2, D2, D3,
                                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    tl.debug_barrier()
                if N_LAYERS > 3:
                    _tiled_forward_layer(a3_ptr, row + OFF3, a4_ptr, batch, ACT3, D3, D4,
                                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    tl.debug_barrier()
                if N_LAYERS > 4:
                    _tiled_forward_layer(a4_ptr, row + OFF4, a5_ptr, batch, ACT4, D4, D5,
                                         BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    tl.debug_barrier()
                # loss, and dL/dz of the last layer into g
                if N_LAYERS == 1:
                    loss = _tiled_loss(a1_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale,
                                       LOSS, ACT0, D1, P_OUT, BLOCK_M)
                elif N_LAYERS == 2:
                    loss = _tiled_loss(a2_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale,
                                       LOSS, ACT1, D2, P_OUT, BLOCK_M)
                elif N_LAYERS == 3:
                    loss = _tiled_loss(a3_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale,
                                       LOSS, ACT2, D3, P_OUT, BLOCK_M)
                elif N_LAYERS == 4:
                    loss = _tiled_loss(a4_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale,
                                       LOSS, ACT3, D4, P_OUT, BLOCK_M)
                else:
                    loss = _tiled_loss(a5_ptr, y_ptr, plan, g_ptr, point0, batch, grad_scale,
                                       LOSS, ACT4, D5, P_OUT, BLOCK_M)
                tl.store(loss_ptr + t * n_steps + s, tl.math.div_rn(loss, loss_count))
                tl.debug_barrier()
                # backward and SGD, last layer first; dL/dz alternates between the two buffers
                g_cur = g_ptr
                g_nxt = g_other_ptr
                if N_LAYERS > 4:
                    _tiled_backward_layer(g_cur, g_nxt, a4_ptr, row + OFF4, batch, lr, ACT3,
                                          D4, D5, True, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    g_cur, g_nxt = g_nxt, g_cur
                if N_LAYERS > 3:
                    _tiled_backward_layer(g_cur, g_nxt, a3_ptr, row + OFF3, batch, lr, ACT2,
                                          D3, D4, True, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    g_cur, g_nxt = g_nxt, g_cur
                if N_LAYERS > 2:
                    _tiled_backward_layer(g_cur, g_nxt, a2_ptr, row + OFF2, batch, lr, ACT1,
                                          D2, D3, True, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    g_cur, g_nxt = g_nxt, g_cur
                if N_LAYERS > 1:
                    _tiled_backward_layer(g_cur, g_nxt, a1_ptr, row + OFF1, batch, lr, ACT0,
                                          D1, D2, True, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                    g_cur, g_nxt = g_nxt, g_cur
                _tiled_backward_layer(g_cur, g_nxt, a0_ptr, row, batch, lr, 0, D0, D1,
                                      False, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)


# ----------------------------------------------------------------------------- host side
def padded(n: int) -> int:
    """``n`` rounded up to a power of two >= 16: a tile side ``tl.dot`` accepts."""
    return max(MIN_BLOCK, triton.next_power_of_2(int(n)))


def param_layout(dims: Sequence[int]) -> List[Tuple[int, int]]:
    """``(weight_offset, bias_offset)`` of each layer in a flat parameter row.

    A row holds ``W_0 [D1, D0], b_0 [D1], W_1 [D2, D1], b_1 [D2], …`` back to back (row-major),
    the order of ``torch.cat([p.reshape(-1) for p in params])``.
    """
    offsets, off = [], 0
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        offsets.append((off, off + d_out * d_in))
        off += d_out * d_in + d_out
    return offsets


def n_flat_params(dims: Sequence[int]) -> int:
    """Number of parameters of the MLP with feature sizes ``dims``."""
    return sum(d_out * d_in + d_out for d_in, d_out in zip(dims[:-1], dims[1:]))


def _check_flat_width(flat, dims: Sequence[int]) -> None:
    """A flat parameter buffer holds at least the MLP's parameters (a shorter one gave a
    truncated last bias, or a torch shape error)."""
    if not isinstance(flat, torch.Tensor) or flat.dim() < 1:
        raise TypeError(f"flat must be a tensor [..., n_params], got {type(flat).__name__}")
    try:
        dims = list(dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence of feature sizes, got {dims!r}") from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise TypeError(f"dims must be positive ints (feature sizes), got {list(dims)}")
    dims = [int(d) for d in dims]
    if flat.shape[-1] < n_flat_params(dims):
        raise ValueError(f"flat has {flat.shape[-1]} values per row but dims {list(dims)} need "
                         f"{n_flat_params(dims)}")


def split_params(flat: torch.Tensor, dims: Sequence[int]) -> List[torch.Tensor]:
    """Views ``[W_0 [..., D1, D0], b_0 [..., D1], …]`` into a flat ``[..., >= n_params]`` buffer
    (``[T, n_params]`` rows as the kernel writes them, or one row ``[n_params]``)."""
    _check_flat_width(flat, dims)
    views = []
    for (w_off, b_off), d_in, d_out in zip(param_layout(dims), dims[:-1], dims[1:]):
        # (``flat[:, ...]`` raised a bare IndexError on one 1-D row, which the width check accepts)
        views.append(flat[..., w_off:b_off].unflatten(-1, (d_out, d_in)))
        views.append(flat[..., b_off:b_off + d_out])
    return views


def _check_int_field(name: str, v, owner=None) -> None:
    """TypeError unless ``v`` is an integer (not a bool, not a float with an integral value).
    NumPy integers are taken (as ``dims`` and ``steps`` are) and stored on ``owner`` (a frozen
    config dataclass) as a Python int."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if owner is not None and type(v) is not int:
        object.__setattr__(owner, name, int(v))


@dataclass(frozen=True)
class LaunchConfig:
    """How ``mlp_inner_loop`` launches.

    Attributes:
        mode: "registers" (weights stay in registers across steps) or "tiled" (weights and
            activations stream through global memory in tiles).
        num_warps: warps per program.
        num_stages: software-pipelining depth of the tiled variant's K loops (1 = none: the
            least register pressure; these loops are short).  The registers variant always
            compiles with 1 (it has no K loop; extra stages only buffered its gathers).
        block_b: padded batch of the registers variant (a power of two >= 16).
        block_m, block_n, block_k: tile sizes of the tiled variant (powers of two >= 16).
        tasks_per_program: registers variant: tasks each program runs one after the other.
        max_programs: tiled variant: grid cap (each program loops over tasks and owns a scratch
            slot); None means 8 programs per SM on a GPU, one per task under the interpreter.
    """

    mode: str
    num_warps: int
    num_stages: int = 1
    block_b: int = 16
    block_m: int = 16
    block_n: int = 64
    block_k: int = 32
    tasks_per_program: int = 1
    max_programs: Optional[int] = None

    def __post_init__(self) -> None:
        if self.mode not in ("registers", "tiled"):
            raise ValueError(f"mode must be 'registers' or 'tiled', got {self.mode!r}")
        # ints only: 4.0 == 4 passed the range checks and reached the launch (a float grid, a
        # float warp count); True == 1 likewise
        for name in ("num_warps", "num_stages", "block_b", "block_m", "block_n", "block_k", "tasks_per_program"):
            _check_int_field(name, getattr(self, name), self)
        if self.max_programs is not None:
            _check_int_field("max_programs", self.max_programs, self)
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two in 1..32, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        for name in ("block_b", "block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < MIN_BLOCK or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {v}")
        if self.tasks_per_program < 1:
            raise ValueError(f"tasks_per_program must be >= 1, got {self.tasks_per_program}")
        if self.max_programs is not None and self.max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {self.max_programs}")


#: The registers variant is used while padded batch x widest padded layer <= _REGISTERS_TILE_LIMIT
#: and the padded weights <= _REGISTERS_WEIGHT_LIMIT elements.  fp32 "ieee" dots lower to FMA
#: loops whose operands, (rows + columns per thread) x K, live in registers next to the weights.
#: Compiled for sm_90a (ptxas -v, Triton 3.6 and 3.9, no GPU; bench/results/triton-compile-*):
#: 1-64-64-1 at batch 10 (16 x 64, 6144 weights) takes 242-254 registers and no spills at 8 warps;
#: batch 20 (32 x 64), any 128-wide layer, or four 64-wide hidden layers (14336 weights) spill.
#: Tuning on a GPU is issue 7's.
_REGISTERS_TILE_LIMIT = 16 * 64
_REGISTERS_WEIGHT_LIMIT = 8192
#: What a *forced* registers variant (``mode="registers"``) can run at all: its largest padded
#: tile (a layer's ``[P_OUT, P_IN]`` weights or the ``[BLOCK_B, widest]`` activations) at most
#: this many elements.  Each ``tl.dot`` stages its operands in shared memory, and a CUDA block may
#: use at most 227 KB of it on H100/H200 (sm_90); the interpreter has no such limit.  Compiled
#: for sm_90a (Triton 3.8, no GPU; the README's "Backend triton" section): tiles of 128 x 256 take 140-148 KB, 512 x 64
#: 200 KB; 256 x 256 weights 280 KB and 256 x 256 activations 311 KB, which no launch can get.
_REGISTERS_MAX_TILE = 128 * 256


def registers_unsupported_reason(dims: Sequence[int], block_b: int) -> Optional[str]:
    """Why the registers variant cannot run feature sizes ``dims`` at padded batch ``block_b``
    on a GPU (None when it can): a tile beyond ``_REGISTERS_MAX_TILE`` elements."""
    pad = [padded(d) for d in dims]
    tiles = [(o, i) for i, o in zip(pad[:-1], pad[1:])] + [(block_b, max(pad))]
    rows, cols = max(tiles, key=lambda t: t[0] * t[1])
    if rows * cols > _REGISTERS_MAX_TILE:
        return (f"the 'registers' variant keeps whole padded tiles on chip: a {rows} x {cols} tile exceeds its limit "
                f"of {_REGISTERS_MAX_TILE} elements (its dots' shared memory would exceed a GPU block's 227 KB); "
                f"use mode 'tiled' (the default for this model)")
    return None


#: Shared memory one CUDA block may use on sm_90 (H100 / H200): 227 KB, the opt-in maximum Triton
#: launches with.  A kernel that needs more fails at its launch with Triton's ``OutOfResources``.
SHARED_MEMORY_LIMIT = 232_448
#: ieee (fp32 FMA) dots: the layout-conversion scratch next to the staged operands was at most
#: 2 KB per warp over the record grid (8 KB at 4 warps, 32 KB at 32) and never above the
#: accumulator tile; the estimate allows twice that per warp.
_FMA_SCRATCH_PER_WARP = 4096


def tiled_shared_bytes(config: LaunchConfig, precision: str = "ieee") -> int:
    """Estimate, from above, of the shared memory (bytes) of the tiled variant's kernel on sm_90a.

    Every GEMM of the tiled kernel is a K loop of ``tl.dot`` on ``[BLOCK_M, BLOCK_K] x [BLOCK_K,
    BLOCK_N]`` fp32 tiles, and every one has the same tile shape, so the kernel needs what one
    such loop needs (loops that are not live together reuse the memory):

    * the dot's operands staged in shared memory, ``(BM·BK + BK·BN) x 4`` bytes per buffer, with
      ``num_stages`` buffers where the operands feed tensor cores and the loads are pipelined
      (``"tf32x3"``; ``"tf32"`` on Hopper's wgmma: ``BLOCK_M`` a multiple of 64 at >= 4 warps),
      else ``max(1, num_stages - 1)`` (fp32 FMA dots, ``"tf32"`` on mma.sync);
    * layout-conversion scratch: at most the accumulator tile ``BM·BN x 4`` (for "ieee" also at
      most ``_FMA_SCRATCH_PER_WARP`` per warp); for "tf32x3" on wgmma at least its B operand
      ``BK·BN x 4`` once more.

    Checked against Triton 3.8's allocation for sm_90a over block sizes 16-256, stages 1-4,
    warps 1-32 and every precision (``bench/results/triton-shared-sm90-triton3.8.json``, made by
    ``python -m bench.triton_shared``): never below the compiler's number, and at most one operand
    buffer plus one accumulator tile above it (the README's "Backend triton" section).
    """
    bm, bn, bk, stages = config.block_m, config.block_n, config.block_k, config.num_stages
    operands = (bm * bk + bk * bn) * 4
    accumulator = bm * bn * 4
    if precision == "ieee":
        return max(1, stages - 1) * operands + min(accumulator, _FMA_SCRATCH_PER_WARP * config.num_warps)
    wgmma = bm % 64 == 0 and config.num_warps >= 4
    if precision == "tf32x3":
        return stages * operands + (max(accumulator, bk * bn * 4) if wgmma else accumulator)
    return (stages if wgmma else max(1, stages - 1)) * operands + accumulator


def launch_unsupported_reason(dims: Sequence[int], batch: int, config: LaunchConfig,
                              precision: str = "ieee") -> Optional[str]:
    """Why ``config`` cannot launch on an sm_90 GPU for feature sizes ``dims`` at inner batch
    ``batch`` (None when it can): the registers variant's tiles (``registers_unsupported_reason``)
    or the tiled variant's shared memory (``tiled_shared_bytes`` above ``SHARED_MEMORY_LIMIT``).
    The interpreter has no such limits, so this is checked on every device."""
    if config.mode == "registers":
        return registers_unsupported_reason(dims, max(config.block_b, padded(batch)))
    need = tiled_shared_bytes(config, precision)
    if need > SHARED_MEMORY_LIMIT:
        return (f"the 'tiled' variant's blocks block_m={config.block_m} x block_n={config.block_n} x "
                f"block_k={config.block_k} at num_stages={config.num_stages} (num_warps={config.num_warps}, "
                f"precision {precision!r}) need about {need:,} bytes of shared memory, over the "
                f"{SHARED_MEMORY_LIMIT:,} a GPU block may use (227 KB, sm_90): use smaller block sizes or "
                f"num_stages (the defaults are 16 x 64 x 32 at 1 stage)")
    return None


def choose_launch_config(dims: Sequence[int], batch: int, *, mode: Optional[str] = None,
                         num_warps: Optional[int] = None, **overrides) -> LaunchConfig:
    """The default launch for an MLP with feature sizes ``dims`` and inner batch ``batch``.

    "registers" when every padded size is <= 64, padded batch x widest padded layer <=
    ``_REGISTERS_TILE_LIMIT`` and the padded weights fit ``_REGISTERS_WEIGHT_LIMIT`` (the seed's
    1-64-64-1 with batch 10: 8 warps); "tiled" otherwise
    (4 warps, 16 x 64 x 32 tiles).  ``mode``, ``num_warps`` and any ``LaunchConfig`` field
    (``num_stages``, ``block_*``, ``tasks_per_program``, ``max_programs``) override it.
    """
    block_b = padded(batch)
    widest = max(padded(d) for d in dims)
    pad = [padded(d) for d in dims]
    weights = sum(i * o for i, o in zip(pad[:-1], pad[1:]))
    fits = widest <= 64 and block_b * widest <= _REGISTERS_TILE_LIMIT and weights <= _REGISTERS_WEIGHT_LIMIT
    if mode is None:
        mode = "registers" if fits else "tiled"
    if num_warps is None:
        num_warps = 8 if mode == "registers" and block_b * widest >= _REGISTERS_TILE_LIMIT else 4
    fields = dict(mode=mode, num_warps=num_warps, block_b=block_b, block_m=16,
                  block_n=min(64, widest), block_k=min(32, widest))
    fields.update(overrides)
    return LaunchConfig(**fields)


def _padded_dims(dims: Sequence[int]) -> List[int]:
    """``dims`` extended to MAX_LAYERS + 1 sizes: absent layers get size 1 (and identity)."""
    return list(dims) + [1] * (MAX_LAYERS + 1 - len(dims))


def _kernel_and_meta(dims: Sequence[int], activations: Sequence[str], loss: str, batch: int,
                     precision: str, config: LaunchConfig):
    """The kernel for ``config.mode`` and its compile-time arguments (plus num_warps/stages)."""
    d = _padded_dims(dims)
    acts = [ACTIVATION_CODES[a] for a in activations] + [0] * (MAX_LAYERS - len(activations))
    meta = dict(N_LAYERS=len(dims) - 1, D0=d[0], D1=d[1], D2=d[2], D3=d[3], D4=d[4], D5=d[5],
                ACT0=acts[0], ACT1=acts[1], ACT2=acts[2], ACT3=acts[3], ACT4=acts[4],
                LOSS=LOSS_CODES[loss], PRECISION=precision, num_warps=config.num_warps,
                num_stages=config.num_stages, **COMPILE_OPTIONS)
    if config.mode == "registers":
        # num_stages is the tiled variant's K-loop pipelining; here Triton would pipeline the step
        # loop's gather into extra shared buffers: 1-64-1 at batch 512 (a tile within
        # _REGISTERS_MAX_TILE) needs 233,472 B at 2 stages, over a block's 232,448 (sm_90a)
        meta["num_stages"] = 1
        p = [padded(v) for v in d]
        meta.update(P0=p[0], P1=p[1], P2=p[2], P3=p[3], P4=p[4], P5=p[5],
                    BLOCK_B=max(config.block_b, padded(batch)))
        return _inner_loop_registers_kernel, meta
    meta.update(D_MAX=max(d), P_OUT=padded(dims[-1]), BLOCK_M=config.block_m,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, COPY_BLOCK=1024)
    return _inner_loop_tiled_kernel, meta


def compile_for_target(dims: Sequence[int], activations: Sequence[str], *, loss: str = "mse",
                       batch: int = 10, precision: str = "ieee",
                       config: Optional[LaunchConfig] = None, arch: int = 90):
    """Compile the kernel ahead of time for CUDA ``sm_<arch>`` without a GPU.

    For checking that a configuration compiles (on this Triton version) and how many registers
    it needs (run ptxas -v on ``.asm["ptx"]``).  Needs the JIT kernels, i.e. this module
    imported without ``TRITON_INTERPRET=1``.  Returns Triton's ``CompiledKernel``.
    """
    if INTERPRETED:
        raise RuntimeError("compile_for_target needs the kernels compiled, not interpreted: "
                           "import this module without TRITON_INTERPRET=1")
    from triton.backends.compiler import GPUTarget

    config = config or choose_launch_config(dims, batch)
    kernel, meta = _kernel_and_meta(dims, activations, loss, batch, precision, config)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages", *COMPILE_OPTIONS)}
    pointers = {"x_ptr": "*fp32", "y_ptr": "*fp32" if loss == "mse" else "*i64", "idx_ptr": "*i64",
                "phi_ptr": "*fp32", "out_ptr": "*fp32", "loss_ptr": "*fp32", "scratch_ptr": "*fp32"}
    floats = ("lr", "grad_scale", "loss_count")
    signature = {name: "constexpr" if name in meta else pointers.get(name, "fp32" if name in floats else "i32")
                 for name in kernel.arg_names}
    source = triton.compiler.ASTSource(kernel, signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


#: the largest finite float32: the kernels take their scalars as fp32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_number(name: str, v) -> float:
    """``v`` as a Python float if it is a finite real number (numpy scalars included) that float32
    holds (the kernels take it as fp32: a larger one would run as inf)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        try:
            finite = math.isfinite(v)
        except OverflowError:  # an int beyond float64 (10**400)
            finite = False
        if not finite:
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        if abs(float(v)) > FLOAT32_MAX:
            raise ValueError(f"{name} must be at most {FLOAT32_MAX:.4g} in magnitude (the kernel takes it as "
                             f"float32), got {v!r}")
        return float(v)
    raise ValueError(f"{name} must be a finite number, got {v!r}")


def _check_values(indices: torch.Tensor, steps: int, n_points: int, y: torch.Tensor, loss: str,
                  n_classes: int) -> None:
    """Plan indices in ``[0, N)`` and class labels in ``[0, D_L)``, with one device sync.

    An out-of-range value would make a program read outside its task's rows (an illegal access on
    a GPU, a crash or garbage under the interpreter).  Skipped while a CUDA graph is captured:
    what a replay will read is not known then, and a sync is not allowed.
    """
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    plan = indices[:, :steps]
    flags = [((plan < 0) | (plan >= n_points)).any()] if plan.numel() else []
    if loss == "cross_entropy":
        flags.append(((y < 0) | (y >= n_classes)).any())
    if not flags:
        return
    bad = torch.stack(flags).tolist()
    if bad[0] and plan.numel():
        raise ValueError(f"indices must lie in [0, {n_points}) (the tasks' points); the plan has values "
                         f"outside it")
    if bad[-1] and loss == "cross_entropy":
        raise ValueError(f"class labels must lie in [0, {n_classes}) for a model with {n_classes} outputs")


def _launch_device(device: torch.device):
    """The context every launcher launches in: ``torch.cuda.device(device)`` on CUDA, else a
    no-op.  Triton launches on the *current* CUDA device and its current stream, not on the
    tensors' device: tensors on cuda:1 from a process whose current device is cuda:0 ran on GPU 0
    (an illegal address, or a race with cuda:1's stream)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_tensor(name: str, t, dtype: torch.dtype, dim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        # a sparse tensor failed in .contiguous() with "unsupported memory format option"
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: the kernel needs its values (a CUDA device, or the CPU "
                         f"under TRITON_INTERPRET=1)")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like x")


def _check_targets(y, loss: str, T: int, N: int, d_out: int, device: torch.device) -> None:
    """y: float32 ``[T, N, d_out]`` for "mse", int64 labels ``[T, N]`` for "cross_entropy"; a
    dtype of the other loss's kind names the ``loss=`` that takes it."""
    want = torch.float32 if loss == "mse" else torch.int64
    if isinstance(y, torch.Tensor) and y.dtype != want:
        other = ("int64 class labels need loss='cross_entropy'" if loss == "mse" and not y.is_floating_point()
                 else "float targets need loss='mse'" if loss != "mse" and y.is_floating_point() else None)
        raise TypeError(f"y must be {want} for loss {loss!r}, got {y.dtype}" + (f" ({other})" if other else ""))
    if loss == "mse":
        _check_tensor("y", y, torch.float32, 3, device)
        if tuple(y.shape) != (T, N, d_out):
            raise ValueError(f"y must have shape {(T, N, d_out)} for loss 'mse', got {tuple(y.shape)}")
    else:
        _check_tensor("y", y, torch.int64, 2, device)
        if tuple(y.shape) != (T, N):
            raise ValueError(f"y must be class labels of shape {(T, N)} for loss 'cross_entropy', "
                             f"got {tuple(y.shape)}")


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The byte range ``[lo, hi)`` that a non-empty tensor's elements lie in (strides >= 0)."""
    lo = t.data_ptr()
    if t.is_contiguous():  # the common case, without a Python loop over dims (launchers check ~20 pairs)
        return lo, lo + t.numel() * t.element_size()
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return lo, lo + extent * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of ``a`` and ``b`` intersects (non-negative strides): a partial overlap
    races on the GPU as an exact alias does, so output checks use this, not ``data_ptr`` equality."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _overlaps_any(a: torch.Tensor, others) -> bool:
    """Whether ``a``'s memory intersects any of ``others`` (``_overlaps`` with ``a``'s span taken once)."""
    if a.numel() == 0:
        return False
    a0, a1 = _span(a)
    for b in others:
        if b.numel() and b.device == a.device:
            b0, b1 = _span(b)
            if a0 < b1 and b0 < a1:
                return True
    return False


def mlp_inner_loop(x: torch.Tensor, y: torch.Tensor, indices: torch.Tensor,
                   params: Sequence[torch.Tensor], activations: Sequence[str], *, lr: float,
                   loss: str = "mse", steps: Optional[int] = None, precision: str = "ieee",
                   config: Optional[LaunchConfig] = None, out: Optional[torch.Tensor] = None,
                   out_losses: Optional[torch.Tensor] = None,
                   scratch_fill: Optional[float] = None,
                   check_values: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run every task's SGD inner loop of an MLP in one kernel launch.

    Task ``i`` starts from ``params`` (φ) and takes ``steps`` SGD steps of learning rate ``lr``;
    step ``s`` uses points ``indices[i, s]`` of the task.

    Args:
        x: float32 ``[T, N, D0]`` inputs of ``T`` tasks with ``N`` points each.
        y: float32 ``[T, N, D_L]`` regression targets (loss "mse") or int64 ``[T, N]`` class
            labels in ``[0, D_L)`` (loss "cross_entropy").
        indices: int64 ``[T, R, B]`` minibatch plan, values in ``[0, N)``.
        params: φ as ``[W_0 [D1, D0], b_0 [D1], …, W_{L-1}, b_{L-1}]``, float32, 1 <= L <= 5.
        activations: ``L`` names from ``ACTIVATION_CODES``; layer l computes act_l(a W_l^T + b_l).
        lr: SGD learning rate.
        loss: "mse" (mean over ``B * D_L`` elements) or "cross_entropy" (mean over ``B`` rows).
        steps: inner steps, ``<= R`` (default ``R``).
        precision: ``tl.dot`` input precision, "ieee" (default), "tf32x3" or "tf32".
        config: launch settings; ``choose_launch_config`` by default.
        out, out_losses: optional preallocated outputs (shapes as returned; tests fill them with
            NaN to catch unwritten elements).
        scratch_fill: tiled variant only: fill the scratch with this value first (tests use NaN).
        check_values: check that the plan's indices lie in ``[0, N)`` and labels in ``[0, D_L)``
            (one device sync; skipped during CUDA-graph capture).  ``TritonBackend`` checks where
            data enters and passes False.

    Returns:
        ``(adapted, losses)``: float32 ``[T, row_stride]`` flat adapted parameters (row layout
        ``param_layout(dims)``, ``row_stride >= n_params``; ``split_params`` gives per-layer
        views) and float32 ``[T, steps]`` minibatch losses before each step's update.
    """
    # -- check the inputs
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    device = x.device
    _check_tensor("x", x, torch.float32, 3, device)
    T, N, D0 = x.shape
    if T < 1 or N < 1:
        raise ValueError(f"x needs at least one task and one point, got shape {tuple(x.shape)}")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"tensors are on {device}: the kernel needs a CUDA device, or "
                         f"TRITON_INTERPRET=1 set before reptile_fast.kernels.mlp_inner_loop is imported")
    # list(None) said only "'NoneType' object is not iterable"; a string would be split into letters
    for name, seq in (("params", params), ("activations", activations)):
        if isinstance(seq, (str, bytes, torch.Tensor)) or not hasattr(seq, "__iter__"):
            raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")
    params = list(params)
    activations = list(activations)
    n_layers = len(params) // 2
    if len(params) % 2 or not 1 <= n_layers <= MAX_LAYERS:
        raise ValueError(f"params must be [W_0, b_0, …] for 1 to {MAX_LAYERS} layers, got {len(params)} tensors")
    if len(activations) != n_layers:
        raise ValueError(f"need one activation per layer ({n_layers}), got {len(activations)}")
    for a in activations:
        if not isinstance(a, str) or a not in ACTIVATION_CODES:
            raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {a!r}")
    dims = [D0]
    for l in range(n_layers):
        w, b = params[2 * l], params[2 * l + 1]
        _check_tensor(f"params[{2 * l}] (weight of layer {l})", w, torch.float32, 2, device)
        _check_tensor(f"params[{2 * l + 1}] (bias of layer {l})", b, torch.float32, 1, device)
        if w.shape[1] != dims[-1] or b.shape[0] != w.shape[0]:
            raise ValueError(f"layer {l}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not "
                             f"follow {dims[-1]} input features")
        dims.append(w.shape[0])
    if max(dims) > MAX_FEATURES:
        raise ValueError(f"feature sizes {dims} exceed the kernel's limit of {MAX_FEATURES}")
    if dims[-1] < 1:  # MSE's 2 / (batch * outputs) divided by zero (a bare ZeroDivisionError)
        raise ValueError(f"the last layer has 0 output features (dims {dims}): there is no loss to train on")
    if not isinstance(loss, str) or loss not in LOSS_CODES:
        raise ValueError(f"loss must be one of {sorted(LOSS_CODES)}, got {loss!r}")
    _check_targets(y, loss, T, N, dims[-1], device)
    _check_tensor("indices", indices, torch.int64, 3, device)
    if indices.shape[0] != T or indices.shape[2] < 1:
        raise ValueError(f"indices must have shape [T={T}, steps, batch>=1], got {tuple(indices.shape)}")
    R, B = indices.shape[1], indices.shape[2]
    steps = R if steps is None else steps
    # an int, as in kernel v2: int(1.5) would run 1 step silently
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or not 0 <= steps <= R:
        raise ValueError(f"steps must lie in [0, {R}] (the plan's rows) and be an int, got {steps!r}")
    steps = int(steps)  # a numpy integer too
    if precision not in ("ieee", "tf32x3", "tf32"):
        raise ValueError(f"precision must be 'ieee', 'tf32x3' or 'tf32', got {precision!r}")
    lr = _check_number("lr", lr)
    if N * max(D0, dims[-1]) >= 2 ** 31 or R * B >= 2 ** 31:
        raise ValueError("one task's points or plan exceed 2^31 elements")
    # True or False only: check_values='no' is truthy and meant a host sync the caller refused
    if check_bool("check_values", check_values):
        _check_values(indices, steps, N, y, loss, dims[-1])
    if config is None:
        config = choose_launch_config(dims, B)
    elif not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig (or None), got {type(config).__name__}")
    reason = launch_unsupported_reason(dims, B, config, precision)
    if reason:
        raise ValueError(reason)
    given = (x, y, indices, *params)  # the caller's: outputs must not overlap them either (QA46)
    x, y, indices = x.contiguous(), y.contiguous(), indices.contiguous()
    n_params = n_flat_params(dims)
    # -- allocate
    row_stride = -(-n_params // 4) * 4  # 16-byte aligned rows
    if out is None:
        out = torch.empty(T, row_stride, device=device, dtype=torch.float32)
    else:
        _check_tensor("out", out, torch.float32, 2, device)
        if out.shape[0] != T or out.shape[1] < n_params or out.stride(1) != 1 or (T > 1 and out.stride(0) < n_params):
            raise ValueError(f"out must be a row-contiguous [T={T}, >={n_params}] buffer with rows that do not "
                             f"overlap, got shape {tuple(out.shape)} stride {out.stride()}")
        # the tiled variant keeps each task's working weights in its out row while other programs
        # read x, y and the plan: an overlap corrupts them silently
        if _overlaps_any(out, (x, y, indices, *given)):
            raise ValueError("out must not overlap x, y, indices or params (programs read them while others write "
                             "their rows)")
        row_stride = out.stride(0)
    if out_losses is None:
        out_losses = torch.empty(T, steps, device=device, dtype=torch.float32)
    else:
        _check_tensor("out_losses", out_losses, torch.float32, 2, device)
        if tuple(out_losses.shape) != (T, steps) or not out_losses.is_contiguous():
            raise ValueError(f"out_losses must be a contiguous [{T}, {steps}] tensor, got {tuple(out_losses.shape)}")
        if _overlaps_any(out_losses, (out, x, y, indices, *given)):
            raise ValueError("out_losses must not overlap out, x, y, indices or params")
    phi = torch.cat([p.detach().reshape(-1) for p in params])
    if loss == "mse":
        grad_scale, loss_count = 2.0 / (B * dims[-1]), float(B * dims[-1])
    else:
        grad_scale, loss_count = 1.0 / B, float(B)
    kernel, meta = _kernel_and_meta(dims, activations, loss, B, precision, config)
    # -- launch (on the tensors' device: Triton launches on the current one)
    with _launch_device(device):
        if config.mode == "registers":
            grid = (triton.cdiv(T, config.tasks_per_program),)
            kernel[grid](
                x, y, indices, phi, out, out_losses,
                T, N, B, steps, R * B, row_stride, config.tasks_per_program,
                float(lr), grad_scale, loss_count, **meta)
        else:
            max_programs = config.max_programs
            if max_programs is None:
                max_programs = (8 * torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else T)
            n_programs = min(T, max_programs)
            scratch_stride = B * (sum(_padded_dims(dims)) + 2 * max(dims))
            if scratch_stride >= 2 ** 31:
                raise ValueError(f"inner batch {B} is too large: one program's scratch would exceed 2^31 elements")
            if scratch_fill is None:
                scratch = torch.empty(n_programs, scratch_stride, device=device, dtype=torch.float32)
            else:
                scratch = torch.full((n_programs, scratch_stride), scratch_fill, device=device,
                                     dtype=torch.float32)
            kernel[(n_programs,)](
                x, y, indices, phi, out, out_losses, scratch, scratch_stride,
                T, N, B, steps, R * B, row_stride, n_params, n_programs, triton.cdiv(T, n_programs),
                float(lr), grad_scale, loss_count, **meta)
    return out, out_losses
