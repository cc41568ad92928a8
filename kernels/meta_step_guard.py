"""Accept or skip one fused meta-step on the device: φ ← new only if everything is finite.

The trainer's rule (``reptile_fast.core.OuterUpdate``) is that a meta-step whose inner loss or
new parameters hold a NaN or an inf is skipped, and so is every later one until the host next
reads the flag; the host then raises ``NonFiniteError`` naming the first bad meta-step.  With
torch ops that rule costs ~8 small kernels per meta-step (isfinite, all, and, where, copies);
inside a CUDA graph replaying thousands of meta-steps each node counts, so here it is one launch
of one program:

    pass 1  finite = isfinite(loss) and all(isfinite(new))      (reads new once)
    pass 2  φ ← new where finite and healthy                    (reads new again, writes φ)
    flags   first_bad ← iteration if healthy and not finite;  healthy ← healthy and finite
            losses[k] ← loss (the training loop's per-meta-step loss, read later)

One program on purpose: the decision needs every element of ``new`` before any element of φ is
written, and a single program sees them all without a grid-wide barrier.  The models this runs
for (kernel v2: feature sizes <= 64, at most five layers) have at most ~17k parameters, two
passes of which are a few microseconds.  No host synchronisation, no allocation: it can be
captured in a CUDA graph; ``iteration`` is read from a device tensor so a replay can move it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from reptile_fast.validation import check_device

# v1's input checks: one copy for every launcher
from .mlp_inner_loop import _check_tensor, _launch_device, _overlaps, _overlaps_any
from .special_functions import COMPILE_OPTIONS

__all__ = ["accept_step", "check_state", "new_state", "compile_for_target", "BLOCK"]

#: elements per pass-iteration of the one program (4 warps x 8 per thread)
BLOCK = 1024


@triton.jit
def _is_bad(v):
    """1 where v is NaN or ±inf, else 0 (int32): NaN != NaN, and |±inf| is the only value equal
    to inf."""
    return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)


@triton.jit
def _accept_kernel(
    # φ [n] f32 (updated in place), the meta-step's new φ [n] f32, its mean inner loss [1] f32
    phi_ptr, new_ptr, loss_ptr,
    # state [2] i64 (healthy 0/1, first bad iteration or 0), this meta-step's number [1] i64,
    # where to write its loss [1] f32
    state_ptr, iteration_ptr, loss_out_ptr,
    n,
    BLOCK: tl.constexpr,
):
    one = tl.arange(0, 1)
    loss = tl.load(loss_ptr + one)
    n_bad = tl.sum(_is_bad(loss), axis=0)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        v = tl.load(new_ptr + start + cols, mask=start + cols < n, other=0.0)
        n_bad += tl.sum(_is_bad(v), axis=0)
    healthy = tl.load(state_ptr + one)  # [1] i64
    first_bad = tl.load(state_ptr + 1 + one)
    iteration = tl.load(iteration_ptr + one)
    finite = n_bad == 0
    accept = finite & (healthy != 0)  # [1]
    # the [1] decision as a [BLOCK] vector, compared as a vector: Triton 3.9's interpreter gives a
    # scalar comparison int32 data, which a store then refuses as a mask
    accept_cols = (tl.zeros([BLOCK], dtype=tl.int32) + tl.sum(accept.to(tl.int32), axis=0)) > 0
    for start in range(0, n, BLOCK):
        ok = start + cols < n
        v = tl.load(new_ptr + start + cols, mask=ok, other=0.0)
        tl.store(phi_ptr + start + cols, v, mask=ok & accept_cols)  # writes nothing if skipped
    # WAR: every thread's reads of the state above before one thread rewrites it below (a thread
    # that read it late saw the new flags; harmless for these values, but a race all the same)
    tl.debug_barrier()
    newly_bad = (healthy != 0) & (n_bad > 0)
    tl.store(state_ptr + 1 + one, tl.where(newly_bad, iteration, first_bad))
    tl.store(state_ptr + one, tl.where(accept, 1, 0).to(tl.int64))
    tl.store(loss_out_ptr + one, loss)


def new_state(device) -> torch.Tensor:
    """A fresh guard state: int64 ``[2]`` = (healthy = 1, first bad iteration = 0)."""
    # an unknown name failed inside torch (a RuntimeError listing every device type)
    device = None if device is None else check_device(device)
    return torch.tensor([1, 0], dtype=torch.int64, device=device)


def check_state(phi: torch.Tensor, state: torch.Tensor, iteration: torch.Tensor, loss_out: torch.Tensor) -> None:
    """TypeError/ValueError unless φ is a contiguous float32 vector and ``state`` (int64 [2]),
    ``iteration`` (int64, 1 element) and ``loss_out`` (float32, 1 element) are on its device."""
    if not isinstance(phi, torch.Tensor):
        raise TypeError(f"params_flat (phi) must be a torch.Tensor, got {type(phi).__name__}")
    device = phi.device
    _check_tensor("phi", phi, torch.float32, 1, device)
    if not phi.is_contiguous():
        raise ValueError("phi must be contiguous (it is updated in place)")
    for name, t, dtype in (("state", state, torch.int64), ("iteration", iteration, torch.int64),
                           ("loss_out", loss_out, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != device or t.layout != torch.strided:
            got = (f"{t.dtype} {t.layout} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__)
            raise TypeError(f"{name} must be a {dtype} tensor on {device} (dense), got {got}")
    if iteration.numel() != 1 or loss_out.numel() != 1 or state.shape != (2,):
        raise ValueError(f"iteration and loss_out hold one element and state two, got "
                         f"{iteration.numel()}, {loss_out.numel()}, {tuple(state.shape)}")
    if _overlaps(loss_out, phi):
        # the loss is written after φ: it would overwrite a parameter, silently
        raise ValueError("loss_out must not overlap phi")
    # state is read and rewritten, loss_out written, beside φ: one written buffer over another (or
    # over the iteration number, read) corrupts it silently
    if _overlaps_any(state, (phi, loss_out, iteration)):
        raise ValueError("state must not overlap phi, loss_out or iteration")
    if _overlaps(loss_out, iteration):
        raise ValueError("loss_out must not overlap iteration")
    if not state.is_contiguous():
        # the kernel reads and writes state[1] at state's address + 1 element
        raise ValueError(f"state must be contiguous, got stride {state.stride()}")


def accept_step(phi: torch.Tensor, new: torch.Tensor, loss: torch.Tensor, state: torch.Tensor,
                iteration: torch.Tensor, loss_out: torch.Tensor) -> None:
    """φ ← new if ``loss`` and ``new`` are finite and no earlier step since the last reset was bad.

    Args:
        phi: float32 ``[n]`` contiguous, updated in place (must not alias ``new``).
        new: float32 ``[n]``: the meta-step's φ + ε·mean(φ̃ − φ).
        loss: float32, 1 element: the meta-step's mean inner loss.
        state: int64 ``[2]`` (``new_state``): healthy flag, first bad iteration (0: none).
        iteration: int64, 1 element: this meta-step's 1-based number.
        loss_out: float32, 1 element: receives ``loss`` (e.g. a slot of a per-chunk loss buffer).

    One launch of one program; no host synchronisation (CUDA-graph capturable).
    """
    check_state(phi, state, iteration, loss_out)
    _check_tensor("new", new, torch.float32, 1, phi.device)
    if new.shape != phi.shape or not new.is_contiguous():
        raise ValueError(f"phi and new must be contiguous and of one shape, got {tuple(phi.shape)} and "
                         f"{tuple(new.shape)}")
    if _overlaps(new, phi):
        raise ValueError("new must not alias or overlap phi (pass 2 reads new while writing phi)")
    if _overlaps_any(new, (loss_out, state)):
        # other threads may still read new in pass 2 when the loss and the flags are written
        raise ValueError("loss_out and state must not overlap new")
    if not isinstance(loss, torch.Tensor) or loss.dtype != torch.float32 or loss.device != phi.device \
            or loss.layout != torch.strided or loss.numel() != 1:
        # (a sparse one reached the launch: "Cannot access storage of SparseTensorImpl")
        raise TypeError(f"loss must be a one-element dense torch.float32 tensor on {phi.device}")
    with _launch_device(phi.device):
        _accept_kernel[(1,)](phi, new, loss, state, iteration, loss_out, phi.numel(), BLOCK=BLOCK,
                             num_warps=4, **COMPILE_OPTIONS)


def compile_for_target(arch: int = 90):
    """Compile the guard ahead of time for CUDA ``sm_<arch>`` (no GPU needed; the module must be
    imported without ``TRITON_INTERPRET=1``).  Returns Triton's ``CompiledKernel``."""
    from triton.backends.compiler import GPUTarget

    signature = {"phi_ptr": "*fp32", "new_ptr": "*fp32", "loss_ptr": "*fp32", "state_ptr": "*i64",
                 "iteration_ptr": "*i64", "loss_out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    source = triton.compiler.ASTSource(_accept_kernel, signature, constexprs={"BLOCK": BLOCK})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, **COMPILE_OPTIONS})
