"""The whole Reptile meta-step of a plain MLP as one compiled CPU program: small meta-batches fast.

At the seed's setting (meta-batch 1, an MLP of ~4K parameters, 5 inner steps of 10 points) a
meta-step is ~150 tiny tensor ops; eager PyTorch pays a few microseconds of dispatch for each,
so the seed's loop spends ~1.4 ms per iteration on overhead, not arithmetic.  Here every task's
SGD inner loop (forward, the loss's gradient and the backward pass written out by hand with
autograd's formulas) and the outer update ``φ ← φ + ε · mean_i(φ̃_i − φ)`` for a whole chunk of
meta-steps is one call into compiled code with no Python in between.

Modes (``MetaStepProgram.mode``), tried in this order from the requested one, each falling back
with a warning:
    "native" the chunk as a small C function generated for this shape, compiled once by the system
             C compiler and cached on disk across processes (``reptile_fast.native_step``): about
             1 s to compile on a machine's first run, milliseconds to load after;
    "scan"   ``fused_inner_loop`` + a ``scan`` over the chunk under ``torch.compile`` (inductor's
             C++ backend): 10–25 s to compile in every new process (inductor does not cache the
             ``scan`` across processes);
    "step"   one ``torch.compile``d call per meta-step (when scan is unavailable or fails);
    "eager"  the same maths without compilation (``mlp_batched.mlp_inner_loop``: no C compiler).
``DEFAULT_MODE`` is "native".

Programs are cached per (layer sizes, activations, loss, inner lr, inner steps, tasks per
meta-step, minibatch size, dtype, mode); compilation happens on first use (``prepare``, which can
report a long compile through its ``progress`` callback) and its time is kept in
``compile_seconds``, apart from the per-iteration time.  Everything runs on one CPU thread: at
these sizes OpenMP fork/join costs more than it saves (measured: several times slower with two
threads on the 2-core machine).

``reptile_fast.steppers.CompiledStepper`` runs these programs in the training loop (backend
"compiled" of ``Reptile``, the CLI's sine job and ``reptile_fast.reptile`` at meta-batch 1).
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends.mlp_batched import mlp_inner_loop, stack_mlp_params
from .mlp_math import ACTIVATIONS, loss_and_grad
from .mlp_spec import MLPSpec
from .validation import out_of_memory_message

__all__ = ["MetaStepProgram", "get_program", "fused_inner_loop", "eager_inner_loop", "MODES",
           "DEFAULT_MODE"]

MODES = ("native", "scan", "step", "eager")
#: the mode programs start from (falling back along ``MODES``)
DEFAULT_MODE = "native"

# cpp_wrapper: the generated program's glue is C++ rather than Python (measured in "step" mode:
# 136 -> 89 µs per call).  cpp.threads = 1: see the module docstring.
_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "cpp.threads": 1}

_PROGRAMS: Dict[tuple, "MetaStepProgram"] = {}


@contextlib.contextmanager
def single_thread():
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count after."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _inductor_options(cpp_wrapper: bool = True) -> dict:
    """The options this torch's inductor knows (older versions lack some); ``cpp_wrapper=False``
    drops the C++ glue (torch 2.11's inductor cannot generate it for the scan's while_loop)."""
    try:
        import torch._inductor.config as cfg
    except Exception:  # noqa: BLE001 - no inductor at all: compile will fail and fall back
        return {}
    out = {}
    for key, value in _INDUCTOR_OPTIONS.items():
        obj = cfg
        for part in key.split(".")[:-1]:
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, key.split(".")[-1]):
            out[key] = value
    if not cpp_wrapper:
        out.pop("cpp_wrapper", None)
    return out


# ---------------------------------------------------------------------- the inner loop, for the compiler
# Written for inductor rather than for eager PyTorch: every matrix product is a broadcast
# multiply + sum, which inductor fuses with its neighbours into a few C++ loops.  The eager-tuned
# ``mlp_batched.mlp_inner_loop`` (BLAS bmm, ``out=`` into flat buffers) compiles to 20 separate
# BLAS calls per meta-step and runs slower under torch.compile (the comparison is in
# bench/results/dropin_cpu.json, "meta_step_program_variants"); the eager fallback uses it.  The derivative formulas are the
# ones autograd uses (aten's *_backward kernels), so both agree with the reference to a few ulps.

def _linear(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``h [T, B, i]``, ``W [T, o, i]``, ``b [T, o]`` → ``h Wᵀ + b``: ``[T, B, o]``."""
    return (h.unsqueeze(2) * W.unsqueeze(1)).sum(-1) + b.unsqueeze(1)


def fused_inner_loop(spec: MLPSpec, params: Sequence[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                     lr: float, loss: str) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``T`` tasks' SGD inner loops from φ, functionally (the compiled path's formulation).

    Args:
        params: φ as ``[W_0, b_0, W_1, b_1, …]`` (``[d_{l+1}, d_l]`` / ``[d_{l+1}]``).
        xs: ``[S, T, B, d_0]``; ys: ``[S, T, B, d_L]`` float or ``[S, T, B]`` long labels.

    Returns:
        The adapted parameters ``[T, *shape]`` in the same order, and the losses ``[T, S]``.
    """
    T, L, acts = xs.shape[1], spec.n_layers, spec.activations
    theta = [p.unsqueeze(0).expand(T, *p.shape) for p in params]
    losses = []
    for s in range(xs.shape[0]):
        hs = [xs[s]]
        for l in range(L):
            hs.append(ACTIVATIONS[acts[l]].forward(_linear(hs[l], theta[2 * l], theta[2 * l + 1])))
        loss_s, g = loss_and_grad(loss, hs[L], ys[s])
        losses.append(loss_s)
        new = [None] * (2 * L)
        for l in range(L - 1, -1, -1):
            g = ACTIVATIONS[acts[l]].backward(g, hs[l + 1])           # dloss/dz_l  [T, B, d_{l+1}]
            gW = (g.unsqueeze(3) * hs[l].unsqueeze(2)).sum(1)  # g_lᵀ h_l    [T, d_{l+1}, d_l]
            gb = g.sum(1)
            if l > 0:
                g = (g.unsqueeze(3) * theta[2 * l].unsqueeze(1)).sum(2)  # g_l W_l [T, B, d_l]
            new[2 * l], new[2 * l + 1] = theta[2 * l] - lr * gW, theta[2 * l + 1] - lr * gb
        theta = new
    return theta, torch.stack(losses, 1)


def eager_inner_loop(spec: MLPSpec, params: Sequence[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                      lr: float, loss: str) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``fused_inner_loop``'s contract on ``mlp_batched.mlp_inner_loop`` (fastest without a compiler)."""
    names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    stacked = stack_mlp_params(spec, dict(zip(names, params)), xs.shape[1])
    out = mlp_inner_loop(spec, stacked, xs, ys, lr=lr, loss=loss, fast_tanh=False)
    return [t for pair in zip(out.params.weights, out.params.biases) for t in pair], out.losses


def meta_step(inner: Callable, spec: MLPSpec, lr: float, loss: str, params: List[torch.Tensor],
               xs: torch.Tensor, ys: torch.Tensor, eps: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """One meta-step: every task's inner loop from φ (``inner``), then the interpolation update.

    Args:
        params: φ as ``[W_0, b_0, W_1, b_1, …]``; not modified.
        xs: ``[S, T, B, d_0]`` minibatch inputs of the ``S`` inner steps of ``T`` tasks.
        ys: ``[S, T, B, d_L]`` float targets, or ``[S, T, B]`` long labels.
        eps: 0-d tensor, the outer step ε.

    Returns:
        The new φ (same layout) and the inner losses ``[T, S]``.
    """
    adapted, losses = inner(spec, params, xs, ys, lr, loss)
    # The trainer's outer update: d = mean_i(φ̃_i − φ); φ + ε·d (one task: the seed's φ + ε(φ̃ − φ)).
    return [p + eps * (q - p).mean(0) for p, q in zip(params, adapted)], losses


class MetaStepProgram:
    """Meta-steps of one MLP shape and inner-loop setting, compiled once (see module docstring).

    Call it as ``program(params, xs, ys, eps)`` with a chunk of ``M`` meta-steps:

    Args:
        params: φ as ``[W_0, b_0, W_1, b_1, …]`` in the spec's layer order; not modified.
        xs: ``[M, S, T, B, d_0]`` minibatch inputs (``S`` inner steps, ``T`` tasks per meta-step).
        ys: ``[M, S, T, B, d_L]`` float targets or ``[M, S, T, B]`` long labels.
        eps: ``[M]`` outer step of each meta-step, in φ's dtype.

    Returns:
        ``(new_params, losses)``: φ after the ``M`` meta-steps, and the inner losses ``[M, T, S]``.
    """

    def __init__(self, spec: MLPSpec, *, lr: float, loss: str, steps: int, n_tasks: int,
                 batch: int, dtype: torch.dtype, mode: str = DEFAULT_MODE, inner: Optional[Callable] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.spec, self.lr, self.loss = spec, float(lr), loss
        self.steps, self.n_tasks, self.batch, self.dtype = steps, n_tasks, batch, dtype
        self.requested_mode = mode
        self.mode = mode
        self.compile_seconds = 0.0
        self.fallback_reason: Optional[str] = None
        self._fn: Optional[Callable] = None
        self._ready = False
        #: the inner-loop formulation to compile (``fused_inner_loop`` by default; benchmarks
        #: compare others with the same contract, e.g. ``eager_inner_loop``)
        self.inner = inner
        #: "native" mode: whether the compiled library came from the on-disk cache (None before)
        self.cache_hit: Optional[bool] = None

    # ---------------------------------------------------------------- building
    def _step_fn(self, mode: str):
        spec, lr, loss = self.spec, self.lr, self.loss
        inner = eager_inner_loop if mode == "eager" else (self.inner or fused_inner_loop)

        def step(params, xs, ys, eps):
            return meta_step(inner, spec, lr, loss, list(params), xs, ys, eps)
        return step

    def _build(self, mode: str, progress: Optional[Callable[[str], None]] = None,
               cpp_wrapper: bool = True) -> Callable:
        if mode == "native":
            from .native_step import NativeProgram

            native = NativeProgram(self.spec, lr=self.lr, loss=self.loss, steps=self.steps,
                                   n_tasks=self.n_tasks, batch=self.batch, dtype=self.dtype)
            native.build(progress)
            self.cache_hit = native.cache_hit
            return native
        if progress is not None and mode in ("scan", "step"):
            progress(f"compiling the meta-step with torch.compile ({mode} mode; 10-25 s, in every new process)")
        step = self._step_fn(mode)
        if mode in ("eager", "step"):
            # one Python call per meta-step, compiled or not
            one = step if mode == "eager" else torch.compile(step, fullgraph=True, dynamic=False,
                                                             options=_inductor_options(cpp_wrapper))

            def run_steps(params, xs, ys, eps):
                losses = []
                for i in range(xs.shape[0]):
                    params, l_i = one(params, xs[i], ys[i], eps[i])
                    losses.append(l_i)
                return params, torch.stack(losses)
            return run_steps
        from torch._higher_order_ops.scan import scan  # private API: absent or broken -> fallback

        def combine(carry, slices):
            x_i, y_i, eps_i = slices
            new, l_i = step(carry, x_i, y_i, eps_i)
            return new, l_i

        def chunk(params, xs, ys, eps):
            return scan(combine, list(params), (xs, ys, eps))

        compiled = torch.compile(chunk, fullgraph=True, dynamic=False, options=_inductor_options(cpp_wrapper))

        def run_scan(params, xs, ys, eps):
            if xs.shape[0] == 1:
                # torch.compile specialises sizes 0 and 1: a one-step chunk would cost a second
                # compilation, so that step runs the same formulation uncompiled.
                new, l_1 = step(params, xs[0], ys[0], eps[0])
                return new, l_1.unsqueeze(0)
            # One program for every chunk length M >= 2: only dim 0 is symbolic.
            for t in (xs, ys, eps):
                torch._dynamo.mark_dynamic(t, 0)
            return compiled(params, xs, ys, eps)
        return run_scan

    def _dummy(self, m: int):
        dims, T, S, B = self.spec.dims, self.n_tasks, self.steps, self.batch
        params = []
        for i in range(len(dims) - 1):
            params += [torch.zeros(dims[i + 1], dims[i], dtype=self.dtype),
                       torch.zeros(dims[i + 1], dtype=self.dtype)]
        xs = torch.zeros(m, S, T, B, dims[0], dtype=self.dtype)
        if self.loss == "cross_entropy":
            ys = torch.zeros(m, S, T, B, dtype=torch.long)
        else:
            ys = torch.zeros(m, S, T, B, dims[-1], dtype=self.dtype)
        return params, xs, ys, torch.zeros(m, dtype=self.dtype)

    def prepare(self, progress: Optional[Callable[[str], None]] = None) -> "MetaStepProgram":
        """Compile now (and run a 2-step dummy chunk), falling back along ``MODES`` ("native" →
        "scan" → "step" → "eager") with a warning if compilation fails.  ``compile_seconds``
        records the time; idempotent.

        Args:
            progress: optional ``progress(message)``, called before a step that takes long (a C
                compile on a machine's first run, ~1 s; a ``torch.compile``, 10–25 s) — e.g.
                ``print`` or ``tqdm.write``, so a front end never sits silent.  Loading a cached
                program says nothing.
        """
        if self._ready:
            return self
        self._check_sizes()
        order = MODES[MODES.index(self.requested_mode):]
        errors = []
        no_cxx: Optional[str] = None  # asked only when a torch.compile mode is reached (importing inductor costs seconds)
        asked = False
        for mode in order:
            if errors and progress is not None:
                # say why before the slower path starts (a torch.compile takes 10-25 s): the warning
                # below comes only after it, and "install gcc" is the fix a newcomer needs to read
                progress(f"the {order[len(errors) - 1]!r} meta-step is unavailable ({errors[-1]}); "
                         f"trying the {mode!r} path")
            if mode in ("scan", "step") and not asked:
                no_cxx, asked = _inductor_compiler_missing(), True
            if no_cxx is not None and mode in ("scan", "step"):
                # inductor's C++ backend cannot build anything here: each attempt took 4-10 s to fail
                errors.append(f"{mode}: {no_cxx}")
                continue
            t0 = time.perf_counter()
            try:
                fn = self._try_build(mode, progress)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: use the next mode
                oom = out_of_memory_message(exc, "lower meta_batch_size (tasks per call), inner_steps or the batch")
                if oom is not None:  # every mode needs the same buffers: say so, not four tracebacks
                    raise ValueError(f"{self.n_tasks} tasks x {self.steps} inner steps x {self.batch} points: "
                                     f"{oom}") from exc
                errors.append(f"{mode}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            self.compile_seconds = time.perf_counter() - t0 if mode != "eager" else 0.0
            self.mode, self._fn, self._ready = mode, fn, True
            if errors:
                self.fallback_reason = "; ".join(errors)
                warnings.warn(f"reptile_fast: the compiled meta-step is unavailable here, running the "
                              f"'{mode}' path instead ({self.fallback_reason})", RuntimeWarning, stacklevel=3)
            return self
        raise RuntimeError("no meta-step mode could run: " + "; ".join(errors))  # eager never fails

    def _check_sizes(self) -> None:
        """A ``ValueError`` naming fit's arguments when a 2-meta-step chunk's inputs hold more bytes
        than a 64-bit size: every mode failed on them with torch's "Storage size calculation
        overflowed" / "Overflow when unpacking long long", reported as a RuntimeError traceback
        (``reptile-fast sine --inner-steps 2**63``, QA82)."""
        dims, T, S, B = self.spec.dims, self.n_tasks, self.steps, self.batch
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        per_point = max(dims[0] * itemsize, 8 if self.loss == "cross_entropy" else dims[-1] * itemsize)
        if 2 * S * T * B * per_point >= 2 ** 63:
            raise ValueError(f"meta_batch_size={T} tasks x inner_steps={S} x inner_batch_size={B} points: a "
                             f"meta-step's inputs need more bytes than a 64-bit size holds; lower "
                             f"meta_batch_size, inner_steps or inner_batch_size")

    def _try_build(self, mode: str, progress) -> Callable:
        """``_build(mode)`` run once on a dummy chunk; a ``torch.compile`` mode that fails with the
        C++ wrapper is tried again without it (the same numbers: only the glue between kernels
        differs) before the caller falls back to the next mode."""
        retry = mode in ("scan", "step") and "cpp_wrapper" in _inductor_options()
        for cpp_wrapper in ((True, False) if retry else (True,)):
            try:
                fn = self._build(mode, progress, cpp_wrapper)
                with torch.no_grad(), single_thread():
                    fn(*self._dummy(2))
                return fn
            except Exception:  # noqa: BLE001 - retried without the wrapper, then reported
                if not (retry and cpp_wrapper):
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    # ---------------------------------------------------------------- running
    def __call__(self, params: Sequence[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor,
                 eps: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        self.prepare()
        params = [p.detach() for p in params]
        with torch.no_grad(), single_thread():
            try:
                new, losses = self._fn(params, xs, ys, eps)
            except Exception as exc:  # noqa: BLE001 - a compiled program failing at run time
                if self.mode == "eager" or (self.mode == "native" and isinstance(exc, (ValueError, TypeError))):
                    raise  # bad input (e.g. a class label out of range), not a compiler problem
                # e.g. a recompilation that the compiler cannot do: finish on the eager path.
                self.fallback_reason = f"{self.mode} failed at run time: {type(exc).__name__}: {exc}"
                warnings.warn(f"reptile_fast: {self.fallback_reason}; continuing on the eager path",
                              RuntimeWarning, stacklevel=2)
                self.mode, self._fn = "eager", self._build("eager")
                new, losses = self._fn(params, xs, ys, eps)
        return list(new), losses


def _inductor_compiler_missing() -> Optional[str]:
    """Why ``torch.compile``'s CPU backend (inductor, which builds C++) cannot compile here, or None.

    Asks inductor for its C++ compiler (``$CXX`` or g++, one ``--version`` call).  On a machine
    without one (a slim container image) the "scan" and "step" modes each failed only after
    tracing, 4-10 s per attempt and two attempts each; they are skipped instead.  None when this
    torch cannot say (no such function): then the modes are tried.
    """
    try:
        from torch._inductor import cpp_builder

        find = cpp_builder.get_cpp_compiler
    except (ImportError, AttributeError):
        return None
    try:
        find()
    except Exception as exc:  # noqa: BLE001 - InvalidCxxCompiler, or anything else: no compiler usable
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"no C++ compiler for torch.compile: {type(exc).__name__}: {text} (set CXX, or install g++)"
    return None


def get_program(spec: MLPSpec, *, lr: float, loss: str, steps: int, n_tasks: int, batch: int,
                dtype: torch.dtype, mode: str = DEFAULT_MODE) -> MetaStepProgram:
    """The cached ``MetaStepProgram`` for this shape and setting (built on first request)."""
    key = (spec.dims, spec.activations, float(lr), loss, steps, n_tasks, batch, dtype, mode)
    program = _PROGRAMS.get(key)
    if program is None:
        program = _PROGRAMS[key] = MetaStepProgram(spec, lr=lr, loss=loss, steps=steps,
                                                   n_tasks=n_tasks, batch=batch, dtype=dtype,
                                                   mode=mode)
    return program
