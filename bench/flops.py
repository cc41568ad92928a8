"""FLOP counts of an MLP inner loop, the device's measured fp32 limit, and a device-aware timer.

FLOP convention (used for every FLOP/s figure in bench/results/): a multiply-add is 2 FLOP; every
elementwise operation (bias add, activation, its derivative, the loss, the SGD update) counts 1
FLOP per element and per arithmetic operation, a tanh counts 1.  Gathering the minibatch and
copying weights count 0.  Per inner step of one task with layer sizes ``d_0 … d_L`` and batch B:

- forward: Σ_l 2·B·d_l·d_{l+1} (matmul) + B·d_{l+1} (bias) + B·d_{l+1} (activation, hidden only);
- loss (MSE): 3·B·d_L (difference, square, sum) + 1 (mean);
  loss (cross-entropy over C = d_L classes, a stable log-softmax): B·(4·C + 3) + 1 (per point:
  max, shift, exp and sum over the C logits, one log, the target's shifted logit minus it, the
  sum over points; then the mean);
- backward: dL/dout (MSE: 2·B·d_L; cross-entropy: B·(2·C + 1): softmax = exp / sum, minus the
  one-hot target at one entry, times 1/B) + Σ_l [2·B·d_l·d_{l+1} (dW) + B·d_{l+1} (db) +
  2·B·d_l·d_{l+1} (dx, not for the first layer) + 3·B·d_{l+1} (activation derivative, hidden only)];
- update (SGD): 2 per parameter.

For the sine MLP (1-64-64-1, B = 10) that is about 0.26 MFLOP per step (DESIGN.md's cost model).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["LOSSES", "inner_step_flops", "inner_loop_flops", "measure_matmul_peak", "measure_bmm_rate",
           "time_calls", "synchronize"]


def _check_dims(dims: Sequence[int]) -> tuple:
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"dims must be at least two positive layer sizes, got {dims}")
    return dims


#: the losses ``inner_step_flops`` counts
LOSSES = ("mse", "cross_entropy")


def inner_step_flops(dims: Sequence[int], batch: int, loss: str = "mse") -> Dict[str, int]:
    """FLOP of one SGD inner step of one task: ``{"forward", "loss", "backward", "update",
    "total", "matmul"}`` for an MLP with layer sizes ``dims = (d_0, …, d_L)``, minibatch
    ``batch`` and ``loss`` "mse" or "cross_entropy" (over ``d_L`` classes); "matmul" is the part
    of forward + backward spent in matrix products (what ``torch.utils.flop_counter`` counts)."""
    dims = _check_dims(dims)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    B, L = int(batch), len(dims) - 1
    fwd = bwd = mm = 0
    for l in range(L):
        i, o = dims[l], dims[l + 1]
        hidden = l < L - 1
        fwd += 2 * B * i * o + B * o + (B * o if hidden else 0)
        bwd += 2 * B * i * o + B * o + (2 * B * i * o if l > 0 else 0) + (3 * B * o if hidden else 0)
        mm += 2 * B * i * o * (3 if l > 0 else 2)
    C = dims[-1]
    if loss == "mse":
        loss_flops = 3 * B * C + 1
        bwd += 2 * B * C
    else:
        loss_flops = B * (4 * C + 3) + 1
        bwd += B * (2 * C + 1)
    n_params = sum(dims[l] * dims[l + 1] + dims[l + 1] for l in range(L))
    update = 2 * n_params
    return {"forward": fwd, "loss": loss_flops, "backward": bwd, "update": update,
            "total": fwd + loss_flops + bwd + update, "matmul": mm}


def inner_loop_flops(dims: Sequence[int], batch: int, steps: int, n_tasks: int = 1, loss: str = "mse") -> int:
    """FLOP of ``n_tasks`` tasks' inner loops of ``steps`` SGD steps each (``loss`` as in
    ``inner_step_flops``)."""
    if steps < 1 or n_tasks < 1:
        raise ValueError(f"steps and n_tasks must be >= 1, got {steps}, {n_tasks}")
    return inner_step_flops(dims, batch, loss)["total"] * int(steps) * int(n_tasks)


def synchronize(device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[int], object], device, *, sync: Optional[Callable[[object], None]] = None,
               min_time: float = 0.2, max_calls: int = 10_000, repeats: int = 5,
               warmup: int = 2, max_time: float = 5.0) -> Dict[str, float]:
    """Seconds per call of ``fn(i)`` (``i`` = call number, used to rotate inputs).

    Warm-up calls first; then ``repeats`` timed batches of ``n`` back-to-back calls each, ``n``
    chosen so a batch lasts about ``min_time / repeats``; for slow functions the repeats drop
    (to no fewer than 2) so that the timed calls last about ``max_time``.  On CUDA each batch is bracketed by
    CUDA events on the current stream (``sync`` not needed); for work outside torch's stream
    (JAX) pass ``sync(out)`` (e.g. ``block_until_ready``) and the host clock is used.  Returns
    ``{"median", "min", "max", "calls_per_repeat", "repeats"}``.
    """
    device = torch.device(device)
    use_events = device.type == "cuda" and sync is None
    counter = [0]

    def call():
        out = fn(counter[0])
        counter[0] += 1
        return out

    def finish(out):
        if sync is not None:
            sync(out)
        else:
            synchronize(device)

    out = None
    for _ in range(max(warmup, 1)):
        out = call()
    finish(out)
    t0 = time.perf_counter()
    finish(call())
    single = max(time.perf_counter() - t0, 1e-7)
    repeats = max(2, min(repeats, int(max_time / single)))
    n = int(min(max_calls, max(1, (min_time / repeats) / single)))
    per_call = []
    for _ in range(repeats):
        if use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # on ``device``'s stream: the current device's would time nothing of a cuda:1 call (QA83)
            stream = torch.cuda.current_stream(device)
            start.record(stream)
            for _ in range(n):
                call()
            end.record(stream)
            end.synchronize()
            per_call.append(start.elapsed_time(end) / 1e3 / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                out = call()
            finish(out)
            per_call.append((time.perf_counter() - t0) / n)
    return {"median": statistics.median(per_call), "min": min(per_call), "max": max(per_call),
            "calls_per_repeat": n, "repeats": repeats}


def measure_matmul_peak(device, n: Optional[int] = None, min_time: float = 0.3) -> Dict[str, float]:
    """The device's fp32 matrix-multiply rate: a square ``[n, n] @ [n, n]`` product with TF32 off.

    ``n`` defaults to 8192 on CUDA and 1024 on the CPU.  Inputs are random (never zeros) and two
    operand sets alternate.  The rate is the best of the timed repeats (the limit the device can
    reach; on a shared CPU the median mostly measures the neighbours).  Returns
    ``{"flops_per_s", "n", "seconds"}``.
    """
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        sets = [(torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device))
                for _ in range(2)]
        out = torch.empty(n, n, device=device)

        def run(i):
            a, b = sets[i % 2]
            return torch.mm(a, b, out=out)

        t = time_calls(run, device, min_time=min_time, repeats=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"flops_per_s": 2.0 * n ** 3 / t["min"], "n": n, "seconds": t["min"]}


def measure_bmm_rate(device, n_tasks: int = 256, batch: int = 10, width: int = 64,
                     min_time: float = 0.2) -> Dict[str, float]:
    """fp32 rate of the inner loop's own batched product ``[T, B, H] @ [T, H, H]`` (TF32 off):
    the realistic ceiling for a batched MLP inner loop of these sizes (best of the repeats).
    Returns ``{"flops_per_s", "shape"}``."""
    device = torch.device(device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        sets = [(torch.randn(n_tasks, batch, width, generator=g).to(device),
                 torch.randn(n_tasks, width, width, generator=g).to(device)) for _ in range(2)]

        def run(i):
            a, b = sets[i % 2]
            return torch.bmm(a, b)

        t = time_calls(run, device, min_time=min_time, repeats=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return {"flops_per_s": 2.0 * n_tasks * batch * width * width / t["min"],
            "shape": f"[{n_tasks},{batch},{width}]x[{n_tasks},{width},{width}]"}
