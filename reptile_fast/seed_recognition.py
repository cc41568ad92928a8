"""Recognising the seed's own functions: its inner loop and its ``sample_task``, by their code.

The drop-in (``reptile_fast.reptile``) runs the fast paths only when it knows what the inner
loop computes: ``None``, ``reptile_fast.reference.perform_k_training_steps``, the seed's own
function (same bytecode), ``standard_inner_loop`` or a ``functools.partial`` of one of them
setting ``batch_size``.  The seed's ``sample_task`` is recognised too, so its tasks can be drawn
vectorised (``reptile_fast.Sine``, the same distribution).
"""
from __future__ import annotations

import dis
import functools
import inspect
import math
import numbers
import types
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["SEED_INNER_LR", "standard_inner_loop", "classify_inner_loop", "is_standard_inner_loop",
           "is_seed_sample_task", "points"]

#: the seed's inner learning rate (``torch.optim.SGD(..., lr=0.02)`` in its loop)
SEED_INNER_LR = 0.02


# ---------------------------------------------------------------------- the standard inner loop
def points(t: torch.Tensor) -> torch.Tensor:
    """The seed's ``t[ind].unsqueeze(-1)`` for 1-D data; ``[B, features]`` is used as it is."""
    return t.unsqueeze(-1) if t.dim() == 1 else t


def standard_inner_loop(model, task, k, batch_size=10):
    """The seed's ``perform_k_training_steps`` for inputs ``[N]`` or ``[N, in]`` and targets
    ``[N]``, ``[N, out]`` or integer class labels ``[N]`` (for a model with several outputs per
    point): ``k · N // batch_size`` SGD steps (lr 0.02) on ``torch.randperm(N)[:batch_size]``
    minibatches.  On 1-D data it computes the seed's function, operation for operation.  Trains
    ``model`` in place and returns its parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=SEED_INNER_LR)
    train_x, train_y, loss_fct = task
    for _ in range(k * train_x.shape[0] // batch_size):
        ind = torch.randperm(train_x.shape[0])[:batch_size]
        x_batch = points(train_x[ind])
        output = model(x_batch)
        target = train_y[ind]
        # Integer targets are class labels [B] only against several outputs per point; otherwise
        # the seed's unsqueeze (integer MSE targets: [B, 1] against [B, 1], not a [B, B] broadcast)
        if train_y.is_floating_point() or output.dim() != 2 or output.shape[-1] == 1:
            target = points(target)
        loss = loss_fct(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p for p in model.parameters()]


def _code_fingerprint(code: types.CodeType) -> tuple:
    """The instruction stream with local-variable names and nested code objects normalised: two
    functions with equal fingerprints run the same operations on the same globals."""
    kept, index = [], {}
    for ins in dis.get_instructions(code):
        index[ins.offset] = len(kept)  # (a skipped instruction: the next kept one's number)
        if ins.opname not in ("NOP", "RESUME", "CACHE", "EXTENDED_ARG"):
            kept.append(ins)
    # A jump's target as an instruction number, not a byte offset: 3.11 compiles ``torch.f(...)``
    # to LOAD_ATTR (4 cache entries) in a module that imports torch, else to LOAD_METHOD (10), so
    # the seed's loop defined where torch is imported elsewhere (a notebook cell, exec'd text) had
    # other offsets and was not recognised.
    jumps = set(dis.hasjrel) | set(dis.hasjabs)
    out = []
    for ins in kept:
        if ins.opcode in jumps:
            arg = index.get(ins.argval, ins.argval)
        elif "FAST" in ins.opname or "DEREF" in ins.opname or "CLOSURE" in ins.opname or ins.opname == "MAKE_CELL":
            arg = ins.arg  # slot number: names of locals do not matter
        elif isinstance(ins.argval, types.CodeType):
            arg = _code_fingerprint(ins.argval)
        else:
            arg = ins.argval
        # 3.11 compiles ``obj.f(...)`` to LOAD_METHOD or LOAD_ATTR depending on context; same op.
        out.append(("LOAD_ATTR" if ins.opname == "LOAD_METHOD" else ins.opname, arg))
    return (code.co_argcount, code.co_kwonlyargcount, tuple(code.co_names), tuple(out))


@functools.lru_cache(maxsize=None)
def _standard_fingerprints() -> Dict[tuple, bool]:
    """fingerprint -> whether that loop takes any data shape (True) or, like the seed's, 1-D."""
    from . import reference

    return {_code_fingerprint(reference.perform_k_training_steps.__code__): False,
            _code_fingerprint(standard_inner_loop.__code__): True}


@functools.lru_cache(maxsize=None)
def _grad_mode_wrapper_code() -> Optional[types.CodeType]:
    """The code of the wrapper torch's grad-mode decorators make (``@torch.no_grad()`` & co.)."""
    return getattr(torch.no_grad()(lambda: None), "__code__", None)


def _is_grad_mode_wrapper_code(code) -> bool:
    """Whether ``code`` is that wrapper's code.  torch 2.15 names each wrapper's code after its
    context manager (``code.replace(co_name="enable_grad")``, for stack traces): a copy per
    decorated function, equal to the reference wrapper's but for the names, so the names are
    set alike before comparing (torch <= 2.14: the one code object itself)."""
    ref = _grad_mode_wrapper_code()
    if not isinstance(code, types.CodeType) or ref is None:
        return False
    if code is ref:
        return True
    names = {"co_name": ref.co_name}
    if hasattr(ref, "co_qualname"):
        names["co_qualname"] = ref.co_qualname
    return code.co_filename == ref.co_filename and code.replace(**names) == ref


def _unwrap_grad_mode(fn, *, enabling_only: bool = False):
    """``fn`` seen through torch's own grad-mode decorators (the seed's ``sample_task`` is
    ``@torch.no_grad()``), and through nothing else: any other wrapper -- a ``functools.wraps``
    decorator of the user's -- may change what the function computes, so it stays in place and
    the function is not recognised (``inspect.unwrap`` recognised such wrappers as the seed's).
    ``enabling_only``: only through decorators that turn gradients on (``torch.enable_grad()``,
    ``torch.set_grad_enabled(True)``), the ones an inner loop's maths is the same under."""
    grad_modes = (torch.no_grad, torch.enable_grad, torch.inference_mode, torch.set_grad_enabled)
    while _is_grad_mode_wrapper_code(getattr(fn, "__code__", None)) and hasattr(fn, "__wrapped__"):
        try:
            mode = getattr(inspect.getclosurevars(fn).nonlocals.get("ctx_factory"), "__self__", None)
        except (TypeError, ValueError):
            return fn
        if not isinstance(mode, grad_modes):
            return fn
        if enabling_only and not (isinstance(mode, torch.enable_grad)
                                  or (isinstance(mode, torch.set_grad_enabled) and getattr(mode, "mode", None) is True)):
            return fn
        fn = fn.__wrapped__
    return fn


def classify_inner_loop(fn) -> Tuple[Optional[int], bool]:
    """``(batch_size, any_shape)`` for a standard inner loop; ``(None, False)`` otherwise."""
    if fn is None:
        return 10, True
    keywords = {}
    if isinstance(fn, functools.partial):
        if fn.args or set(fn.keywords) - {"batch_size"}:
            return None, False
        keywords, fn = fn.keywords, fn.func
    # no unwrapping but through a decorator that turns gradients on: any other wrapper
    # (functools.wraps) may call the seed's loop with other arguments, or without gradients
    fn = _unwrap_grad_mode(fn, enabling_only=True)
    code = getattr(fn, "__code__", None)
    any_shape = _standard_fingerprints().get(_code_fingerprint(code)) if isinstance(code, types.CodeType) else None
    if any_shape is None or fn.__globals__.get("torch") is not torch:
        return None, False
    batch = keywords.get("batch_size", (fn.__defaults__ or (None,))[-1])
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        return None, False
    batch = int(batch)  # numpy's integers too (the seed's loop slices with them alike)
    return batch, any_shape


def is_standard_inner_loop(fn) -> Optional[int]:
    """The minibatch size if ``fn`` is the standard inner loop (None, the reference's, the seed's
    or another function with the same code, ``standard_inner_loop``, or a ``functools.partial``
    of one of them that only sets ``batch_size``); None otherwise."""
    return classify_inner_loop(fn)[0]


# The seed's sample_task, as its text reads (the seed program lives outside this package):
# recognising it lets the fast paths draw the same tasks vectorised (``Sine``), ~40 µs per
# iteration less than calling it.
_SEED_SAMPLE_TASK_SOURCE = """
def sample_task():
    a = torch.rand(1).item() * 4.9 + .1  # Sample a in [0.1, 5.0]
    b = torch.rand(1).item() * 2 * np.pi  # Sample b in [0, 2pi]
    x = torch.linspace(-5, 5, 50)
    y = a * torch.sin(x + b)
    loss_fct = nn.MSELoss()
    return x, y, loss_fct
"""


@functools.lru_cache(maxsize=None)
def _seed_sample_task_fingerprints() -> Dict[tuple, str]:
    """fingerprint -> the global name its π comes from ("np" in the seed, "math" in reference)."""
    from . import reference

    module = compile(_SEED_SAMPLE_TASK_SOURCE, "<seed sample_task>", "exec")
    seed_code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    return {_code_fingerprint(seed_code): "np",
            _code_fingerprint(_unwrap_grad_mode(reference.sample_task).__code__): "math"}


def is_seed_sample_task(fn) -> bool:
    """Whether ``fn`` is the seed's ``sample_task`` (its code, with ``torch``, ``nn`` and ``np`` /
    ``math`` bound to the real modules): sine tasks a·sin(x + b), a ~ U[0.1, 5], b ~ U[0, 2π],
    x = linspace(−5, 5, 50), MSE."""
    fn = _unwrap_grad_mode(fn)
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or code.co_argcount or code.co_kwonlyargcount:
        return False
    pi_module = _seed_sample_task_fingerprints().get(_code_fingerprint(code))
    if pi_module is None:
        return False
    import numpy

    expected = {"torch": torch, "nn": nn, pi_module: numpy if pi_module == "np" else math}
    return all(fn.__globals__.get(name) is module for name, module in expected.items())
