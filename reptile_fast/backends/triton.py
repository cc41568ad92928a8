"""Backend "triton": every task's whole inner loop in one fused Triton kernel launch.

Runs models that ``reptile_fast.mlp_spec.extract_mlp_spec`` recognises (chains of ``nn.Linear``
with bias and tanh / relu / sigmoid / identity: reptile_fast's ``MLP``, a plain ``nn.Sequential``,
the seed's ``MLP``) with 1 to 5 Linear layers and feature sizes up to 256, float32, inner SGD,
loss "mse" or "cross_entropy", algorithm "reptile".  The kernels are in
``reptile_fast.kernels.mlp_inner_loop`` (v1) and ``reptile_fast.kernels.mlp_meta_step_v2`` (v2);
this module only checks, picks the kernel, dispatches and names results.

On a CUDA device it is what ``backend="auto"`` picks for such models.  On the CPU it runs only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernel module is imported),
which is for tests: ``auto_candidate`` keeps "auto" from picking it there.

Options (``Reptile`` builds backends by name, so each also has a process-wide default):
    kernel: "auto" (default), "v1" (``kernels/mlp_inner_loop.py``: any supported model and inner
        batch) or "v2" (``kernels/mlp_meta_step_v2.py``: persistent grid, narrow layers without
        ``tl.dot`` padding, bounded-error tanh / sigmoid / softmax; feature sizes <= 64, inner
        batch <= 32, else ``UnsupportedModelError``).  On an H200 v2 ran faster than v1 at every
        meta-batch T >= 256 in every precision, and at T = 1 in ieee and tf32x3
        (bench/results/gpu-h200-2026-12-04/defaults-w4-pps2), so "auto" runs v2 where it can
        run the model and v1 where it cannot: resolved from the model's feature sizes in
        ``check_supported`` and again from the inner batch size in ``check_batch_size`` (v1
        beyond 32 points, v2 again within them); a plan passed to ``meta_step`` / ``adapt``
        runs on the kernel its own minibatch size picks (v1 for more than 32 points).
        ``fused=True`` pins v2 (a demand: models v2 cannot run are refused), and so do launch
        fields only ``V2Config`` has; fields only ``LaunchConfig`` has pin v1.  ``kernel`` is the
        kernel that runs the model ("auto" until resolved), ``kernel_option`` what was asked
        for, ``last_kernel`` the one that ran the last ``inner_loop`` call.  Default:
        ``$REPTILE_FAST_TRITON_KERNEL`` ("auto", "v1" or "v2") or ``DEFAULT_KERNEL``.
    precision: ``tl.dot`` input precision, "ieee" (default; matches the reference up to
        summation order), "tf32x3" (tensor cores, three tf32 products per product: near-fp32
        accuracy) or "tf32" (tensor cores; inputs rounded to a 10-bit mantissa, so ~1e-3
        relative error per product; bench/gpu_check.py records both errors on a GPU).
        Default: ``$REPTILE_FAST_TRITON_PRECISION`` or ``DEFAULT_PRECISION``.
    cuda_graphs: replay a captured CUDA graph per input shape instead of launching (for small
        meta-batches, where launch overhead dominates).  Default: off, or
        ``$REPTILE_FAST_TRITON_CUDA_GRAPHS=1``.  Ignored off CUDA.  With ``fused``, a whole
        chunk of meta-steps (inner loops, outer updates, finiteness guard) is one graph.
    chunk: with ``fused`` and ``cuda_graphs``: meta-steps per graph replay and per draw of
        tasks and plans (default ``DEFAULT_GRAPH_CHUNK``).
    launch: launch overrides for tuning: ``LaunchConfig`` fields (``mode``, ``num_warps``, tile
        sizes, …) for v1, ``V2Config`` fields (``num_warps``, ``programs_per_sm``, ``max_programs``,
        ``preload``, ``accumulate``, ``stream``, ``flat``, ``transpose``, ``max_registers``) for v2.  Under "auto", fields of one kernel only
        pin it; the shared ones (``num_warps``, ``max_programs``) must suit both kernels.
    validate: check plan indices and class labels are in range (one device sync per call).
        ``Reptile`` turns it off unless its ``backend_options`` set it: the trainer checks plans
        and labels where they enter (``compat.InputChecker``, ``loop.Sampler.checked``).
    fused: with kernel "v2" (or "auto", which it then pins to v2), ``make_stepper`` gives the
        training loop ``TritonFusedStepper`` (inner loops and outer update fused; ``Reptile``
        picks it when this is set).  Default: off, or ``$REPTILE_FAST_TRITON_FUSED=1`` (how the
        CLI jobs opt in), a preference that applies only where the fused stepper runs: kernel v2
        (named, or resolved by "auto" for the model and inner batch size; a plan of more points
        runs eagerly), no outer optimizer, no cross-process reducer; elsewhere the eager stepper runs.

``TritonFusedStepper`` runs whole meta-steps through kernel v2's fused outer update (a
``steppers.Stepper``: ``chunk``, ``name``, ``run``, ``check``).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from ..core import NONFINITE_HINT, NonFiniteError
from ..losses import loss_name
from ..mlp_spec import MLPSpec, cached_mlp_spec
from ..steppers import Stepper
from ..tasks.base import TaskBatch
from ..validation import check_bool, check_int
from .base import Backend, InnerConfig, InnerResult, UnsupportedModelError

__all__ = ["TritonBackend", "TritonFusedStepper", "DEFAULT_PRECISION", "DEFAULT_KERNEL", "PRECISION_ENV",
           "KERNEL_ENV", "CUDA_GRAPHS_ENV", "FUSED_ENV", "DEFAULT_GRAPH_CHUNK", "GRAPH_MAX_TASKS"]

PRECISIONS = ("ieee", "tf32x3", "tf32")
KERNELS = ("auto", "v1", "v2")
#: kernel of ``TritonBackend()`` when neither the argument nor the environment says otherwise:
#: "auto" runs v2 where it can run the model and inner batch size, v1 elsewhere
DEFAULT_KERNEL = "auto"
KERNEL_ENV = "REPTILE_FAST_TRITON_KERNEL"
#: ``tl.dot`` input precision of ``TritonBackend()`` when neither the argument nor the
#: environment variable says otherwise.
DEFAULT_PRECISION = "ieee"
PRECISION_ENV = "REPTILE_FAST_TRITON_PRECISION"
CUDA_GRAPHS_ENV = "REPTILE_FAST_TRITON_CUDA_GRAPHS"
FUSED_ENV = "REPTILE_FAST_TRITON_FUSED"
_GRAPH_CACHE_SIZE = 8
#: meta-steps per CUDA-graph replay of the fused stepper (and per draw of tasks and plans): the
#: seed's 30000 meta-steps of meta-batch 1 are 300 replays
DEFAULT_GRAPH_CHUNK = 100
#: at most this many tasks (meta-steps x meta-batch) in one replay's static buffers
GRAPH_MAX_TASKS = 1 << 16


def _kernels():
    """The kernel module, imported on first use (it imports triton)."""
    return importlib.import_module("reptile_fast.kernels.mlp_inner_loop")


def _kernels_v2():
    """Kernel v2's module, imported on first use."""
    return importlib.import_module("reptile_fast.kernels.mlp_meta_step_v2")


def _guard():
    """The fused stepper's accept-or-skip kernel, imported on first use."""
    return importlib.import_module("reptile_fast.kernels.meta_step_guard")


class _GraphedLaunch:
    """One kernel launch captured in a CUDA graph for fixed shapes.

    Inputs are copied into static buffers before each replay and outputs cloned after it, so
    results never alias the next call's.
    """

    def __init__(self, run, inputs):
        self.inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run(*self.inputs)  # compiles the kernel outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        captured = []
        self.graph = _CudaGraph(lambda: captured.append(run(*self.inputs)))  # (a failed capture: the stream put back)
        self.outputs = captured[0]

    def __call__(self, inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def _on(device: torch.device):
    """The device's context on CUDA (Triton launches on the current device, not the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _v2_config(launch: dict):
    try:
        return _kernels_v2().V2Config(**launch)
    except TypeError as exc:
        raise TypeError(f"launch options for kernel v2 are V2Config fields (num_warps, programs_per_sm, "
                        f"max_programs, preload, accumulate, stream, flat, transpose, max_registers): {exc}") from None


def _check_launch(kernel: str, launch: dict) -> None:
    """TypeError/ValueError for launch overrides the kernel's config would refuse at launch time.
    (Nothing to check, nothing imported: the kernel module reads TRITON_INTERPRET when imported.)"""
    if not launch:
        return
    if kernel == "v2":
        _v2_config(launch)
        return
    k = _kernels()
    fields = set(k.LaunchConfig.__dataclass_fields__)
    unknown = sorted(set(launch) - fields)
    if unknown:
        raise TypeError(f"launch options for kernel v1 are LaunchConfig fields ({', '.join(sorted(fields))}), "
                        f"got {unknown}")
    # mode and num_warps are chosen per model when absent: check the given values with stand-ins
    k.LaunchConfig(**{"mode": "tiled", "num_warps": 4, **launch})


def _launch_fields():
    """(v1's ``LaunchConfig`` fields, v2's ``V2Config`` fields)."""
    return set(_kernels().LaunchConfig.__dataclass_fields__), set(_kernels_v2().V2Config.__dataclass_fields__)


def _launch_kernel(launch: dict) -> Optional[str]:
    """Under kernel "auto": the kernel that ``launch`` pins — "v1" when it names ``LaunchConfig``
    fields v2 lacks (``mode``, tile sizes, ...), "v2" when it names ``V2Config`` fields v1 lacks
    (``programs_per_sm``, ``preload``, ...), None for none or only shared ones (``num_warps``,
    ``max_programs``).  TypeError for a field of neither, or fields of both kernels."""
    if not launch:
        return None
    v1, v2 = _launch_fields()
    unknown = sorted(set(launch) - v1 - v2)
    if unknown:
        raise TypeError(f"launch options are LaunchConfig fields for kernel v1 ({', '.join(sorted(v1))}) or "
                        f"V2Config fields for kernel v2 ({', '.join(sorted(v2))}), got {unknown}")
    only_v1, only_v2 = sorted(set(launch) - v2), sorted(set(launch) - v1)
    if only_v1 and only_v2:
        raise TypeError(f"launch names fields of kernel v1 only ({only_v1}) and of kernel v2 only ({only_v2}): "
                        f"one launch config runs one kernel")
    return "v1" if only_v1 else "v2" if only_v2 else None


def _check_launch_both(launch: dict) -> None:
    """Launch fields both kernels have, under kernel "auto" (either may run): valid for both."""
    for kernel in ("v1", "v2"):
        try:
            _check_launch(kernel, launch)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (kernel {kernel}'s launch: under kernel 'auto' either kernel may run, so "
                            f"fields both have must suit both; or name the kernel)") from None


def _env_flag(name: str) -> bool:
    """An opt-in environment variable: "1" on, "0" or unset off; anything else ("yes", "true") is a
    ValueError naming it (it meant off silently: the user asked for a mode and ran another)."""
    value = os.environ.get(name, "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"${name} must be 1 (on) or 0 (off), got {value!r}")
    return value == "1"


class TritonBackend(Backend):
    """The fused Triton inner loop (see the module docstring for options)."""

    name = "triton"

    def __init__(self, precision: Optional[str] = None, *, kernel: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None, launch: Optional[dict] = None, validate: bool = True,
                 fused: Optional[bool] = None, chunk: Optional[int] = None):
        if kernel is None:
            kernel = os.environ.get(KERNEL_ENV, DEFAULT_KERNEL)
        if kernel not in KERNELS:
            raise ValueError(f"triton kernel must be one of {KERNELS} (argument or ${KERNEL_ENV}), got {kernel!r}")
        #: the kernel asked for (argument, else ``$REPTILE_FAST_TRITON_KERNEL``, else "auto");
        #: ``kernel`` is the one that runs the model
        self.kernel_option = kernel
        #: fused was an argument (a demand) rather than the environment's preference, which
        #: applies only where the fused stepper can run (kernel v2, no outer optimizer, no reducer)
        self.fused_explicit = fused is not None
        if fused is not None:
            fused = check_bool("fused", fused)  # numpy's bool too
        if fused and kernel == "v1":
            raise ValueError(f"fused=True (the whole meta-step in kernel v2) needs kernel='v2' (argument or "
                             f"${KERNEL_ENV}=v2)")
        self._fused_arg = fused
        # the environment's preference (read, and a bad value refused, only when no argument says)
        self._fused_pref = _env_flag(FUSED_ENV) if fused is None else False
        if precision is None:
            precision = os.environ.get(PRECISION_ENV, DEFAULT_PRECISION)
        if precision not in PRECISIONS:
            raise ValueError(f"triton precision must be one of {PRECISIONS} (argument or "
                             f"${PRECISION_ENV}), got {precision!r}")
        if cuda_graphs is None:
            cuda_graphs = _env_flag(CUDA_GRAPHS_ENV)
        # True/False only: bool("no") is True, so a string meant the opposite silently
        cuda_graphs = check_bool("cuda_graphs", cuda_graphs)
        validate = check_bool("validate", validate)
        if launch is not None and not isinstance(launch, dict):
            raise TypeError(f"launch must be a dict of LaunchConfig fields, got {type(launch).__name__}")
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self.launch = dict(launch or {})
        # A named kernel is the kernel.  Under "auto", fused=True (a demand: only v2 runs it) or
        # launch fields of one kernel only pin that kernel; otherwise it is resolved per model.
        if kernel != "auto":
            pinned: Optional[str] = kernel
        elif fused:
            pinned = "v2"
        else:
            pinned = _launch_kernel(self.launch)
        self._pinned = pinned
        #: auto's kernel for the model and inner batch size last checked (None until then)
        self._resolved: Optional[str] = None
        self._batch_size: Optional[int] = None
        #: the kernel that ran the last ``inner_loop`` call (a per-call plan of more points than
        #: v2 takes runs on v1 under "auto"); None before the first
        self.last_kernel: Optional[str] = None
        # a misspelt or out-of-range launch field fails here, not at the first meta-step
        if pinned is not None:
            try:
                _check_launch(pinned, self.launch)
            except TypeError as exc:
                if kernel != "auto" or not fused:
                    raise
                raise TypeError(f"{exc} (fused=True runs kernel v2)") from None
        else:
            _check_launch_both(self.launch)
        if chunk is not None:
            if not (fused or (fused is None and self._fused_pref and pinned != "v1")):
                raise ValueError("chunk (meta-steps per CUDA-graph replay) needs fused=True")
            chunk = check_int("chunk", chunk)
        self.chunk = chunk
        self.validate = validate
        self._graphs: "OrderedDict[tuple, _GraphedLaunch]" = OrderedDict()
        #: why inner_loop stopped capturing CUDA graphs (a failed capture), or None
        self.graph_fallback_reason: Optional[str] = None

    @property
    def kernel(self) -> str:
        """The kernel that runs the model: "v1" or "v2".  A named kernel (``kernel_option`` "v1" /
        "v2") from the start; under "auto" the one pinned by ``fused=True`` or by launch fields,
        else the one resolved for the model (``check_supported``) and inner batch size
        (``check_batch_size``): "v2" where kernel v2 runs them, else "v1" — and "auto" until then."""
        return self._pinned or self._resolved or "auto"

    @property
    def fused(self) -> bool:
        """Whether ``make_stepper`` gives the fused stepper: ``fused`` as passed, else the
        environment's preference where the kernel is v2 (named, pinned or resolved)."""
        if self._fused_arg is not None:
            return self._fused_arg
        return self._fused_pref and self.kernel == "v2"

    def _kernel_for(self, dims, batch_size: int) -> str:
        """The kernel for an MLP of feature sizes ``dims`` and minibatches of ``batch_size``
        points: the named or pinned one, else v2 where it runs them, else v1."""
        if self._pinned is not None:
            return self._pinned
        return "v2" if _kernels_v2().supports_v2(dims, batch_size) else "v1"

    def _checked_kernel(self, dims, batch_size: int) -> str:
        """``_kernel_for``, checked: ``UnsupportedModelError`` where that kernel cannot run it
        (named or pinned v2 beyond its limits; v1 with a launch no GPU block can run)."""
        kernel = self._kernel_for(dims, batch_size)
        if kernel == "v2":
            reason = _kernels_v2().unsupported_reason(dims, batch_size)
            if reason:
                raise UnsupportedModelError(f"backend 'triton': {reason}")
        else:
            self._check_v1_launch(dims, batch_size)
        return kernel

    def make_stepper(self, model: nn.Module, config: InnerConfig, outer_optimizer=None) -> "TritonFusedStepper":
        """The fused meta-step stepper for ``model`` (``fused=True``): kernel v2's inner loops and
        outer update in two launches.  ``UnsupportedModelError`` when it cannot run them (an outer
        optimizer, a model or setting outside kernel v2)."""
        if outer_optimizer is not None:
            raise UnsupportedModelError("backend 'triton' with fused=True applies the interpolation update; "
                                        "an outer_optimizer needs the eager stepper (fused=False)")
        return TritonFusedStepper(model, config, precision=self.precision, launch=self.launch,
                                  validate=self.validate, cuda_graphs=self.cuda_graphs, chunk=self.chunk)

    # ------------------------------------------------------------------ support
    def auto_candidate(self, device) -> bool:
        """Whether ``backend="auto"`` may pick this backend on ``device``: CUDA only (the CPU
        interpreter is for tests and far slower than the torch backend)."""
        return torch.device(device).type == "cuda"

    def _spec(self, model: nn.Module) -> MLPSpec:
        try:
            return cached_mlp_spec(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"backend 'triton': {exc}") from None

    def check_supported(self, model: nn.Module, device, config: InnerConfig) -> None:
        device = torch.device(device)
        try:
            importlib.import_module("triton")
        except ImportError:
            raise UnsupportedModelError("backend 'triton' needs the triton package "
                                        "(pip install 'reptile_fast[triton]')") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UnsupportedModelError(f"backend 'triton': device {device} but CUDA is not available")
            if device.index is None:
                # "cuda" is the current device; parameters always report theirs as "cuda:N"
                device = torch.device("cuda", torch.cuda.current_device())
        elif device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                raise UnsupportedModelError("backend 'triton' needs a CUDA device; on the CPU it runs "
                                            "only under the Triton interpreter (TRITON_INTERPRET=1)")
            if not _kernels().INTERPRETED:
                raise UnsupportedModelError("backend 'triton' on the CPU: reptile_fast.kernels.mlp_inner_loop "
                                            "was imported before TRITON_INTERPRET=1 was set")
        else:
            raise UnsupportedModelError(f"backend 'triton' runs on CUDA devices, got device {device}")
        spec = self._spec(model)
        k = _kernels()
        if spec.n_layers > k.MAX_LAYERS:
            raise UnsupportedModelError(f"backend 'triton' supports at most {k.MAX_LAYERS} Linear layers "
                                        f"({k.MAX_LAYERS - 1} hidden), the model has {spec.n_layers}")
        if max(spec.dims) > k.MAX_FEATURES:
            raise UnsupportedModelError(f"backend 'triton' supports feature sizes up to {k.MAX_FEATURES}, "
                                        f"the model has {list(spec.dims)}")
        # (the inner batch size comes with check_batch_size: until then the last one checked, or 1)
        kernel = self._checked_kernel(spec.dims, self._batch_size or 1)
        for n, p in model.named_parameters():
            if p.dtype != torch.float32:
                raise UnsupportedModelError(f"backend 'triton' supports float32 parameters only, "
                                            f"'{n}' is {p.dtype}")
            if p.device != device:
                raise UnsupportedModelError(f"backend 'triton': parameter '{n}' is on {p.device}, not {device}")
        self._check_config(config)
        self._resolved = kernel

    def check_batch_size(self, model: nn.Module, batch_size: int) -> None:
        """``Backend.check_batch_size``; under kernel "auto" it also resolves the kernel for the new
        size (v1 beyond kernel v2's 32 points, v2 again within them) instead of refusing it."""
        self._resolved = self._checked_kernel(self._spec(model).dims, batch_size)
        self._batch_size = batch_size

    def check_plan_size(self, model: nn.Module, batch_size: int) -> None:
        """``check_batch_size`` for one call's plan, changing nothing (under "auto" such a plan
        runs on the kernel its own size picks)."""
        self._checked_kernel(self._spec(model).dims, batch_size)

    def _check_v1_launch(self, dims, batch_size: int) -> None:
        """UnsupportedModelError when ``launch`` forces kernel v1 into a launch no GPU block can
        run: the registers variant on tiles it cannot hold, or tiled blocks / stages whose shared
        memory exceeds a block's (``mlp_inner_loop.launch_unsupported_reason``)."""
        if not self.launch:
            return  # the defaults fit (16 x 64 x 32 tiles at 1 stage; registers only for small models)
        k = _kernels()
        config = k.choose_launch_config(dims, batch_size, **self.launch)
        reason = k.launch_unsupported_reason(dims, batch_size, config, self.precision)
        if reason:
            raise UnsupportedModelError(f"backend 'triton': launch={self.launch!r}: {reason}")

    @staticmethod
    def _check_config(config: InnerConfig) -> str:
        if config.optimizer != "sgd":
            raise UnsupportedModelError(f"backend 'triton' supports inner_optimizer='sgd' only, "
                                        f"got {config.optimizer!r}")
        name = loss_name(config.loss)
        if name is None:
            raise UnsupportedModelError("backend 'triton' supports loss 'mse' or 'cross_entropy', "
                                        "not a custom loss callable")
        if config.algorithm != "reptile":
            raise UnsupportedModelError(f"backend 'triton' supports algorithm='reptile' only, "
                                        f"got {config.algorithm!r}")
        if config.grad_weights is not None:
            raise UnsupportedModelError("backend 'triton' does not support inner_grad_weights")
        return name

    # ------------------------------------------------------------------ inner loop
    def _check_data(self, spec: MLPSpec, tasks: TaskBatch, indices: torch.Tensor, loss: str) -> None:
        x, y = tasks.x, tasks.y
        if x.dim() != 3 or x.shape[2] != spec.dims[0]:
            raise ValueError(f"backend 'triton' needs inputs [tasks, points, {spec.dims[0]}], "
                             f"got {tuple(x.shape)}")
        if loss == "mse" and (tasks.is_classification or tuple(y.shape[2:]) != (spec.dims[-1],)):
            raise ValueError(f"loss 'mse' needs float targets [tasks, points, {spec.dims[-1]}], "
                             f"got {y.dtype} {tuple(y.shape)}")
        if loss == "cross_entropy" and not tasks.is_classification:
            raise ValueError(f"loss 'cross_entropy' needs long class labels [tasks, points], got {y.dtype}")
        # the other backends' plan rules and errors (a TypeError for an int32 plan, a ValueError for
        # a plan of 0 rows, which this backend ran as no inner step); the values are checked below,
        # with the labels, in one host read
        self.check_plan(tasks, indices, values=False)
        if self.validate:
            # the launchers' own check (one sync for plan and labels), on every row of the plan
            _kernels()._check_values(indices, indices.shape[1], tasks.n_points, y, loss, spec.dims[-1])

    def inner_loop(self, model: nn.Module, tasks: TaskBatch, indices: torch.Tensor,
                   config: InnerConfig) -> InnerResult:
        """Every task's inner loop in one launch; see ``Backend.inner_loop``.

        Returns adapted parameters ``[T, *shape]`` (views into one flat ``[T, row]`` buffer) in
        ``model.named_parameters()`` order and losses ``[T, steps]``.
        """
        loss = self._check_config(config)
        spec = self._spec(model)
        self._check_data(spec, tasks, indices, loss)
        k = _kernels()
        steps = config.train_steps(indices.shape[1])
        named = dict(model.named_parameters())
        layer_names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
        params = [named[n].detach() for n in layer_names]
        # a named or pinned kernel; under "auto" the one this plan's minibatch size picks (a plan
        # of more points than v2 takes runs on v1, like an inner batch size beyond them)
        kernel = self._checked_kernel(spec.dims, indices.shape[2])
        if kernel == "v2":
            k2 = _kernels_v2()
            launch = _v2_config(self.launch)

            def run(x, y, idx, *phi):
                return k2.inner_loop(x, y, idx, k2.flat_params(phi), spec.dims, spec.activations, lr=config.lr,
                                     loss=loss, steps=steps, precision=self.precision, config=launch,
                                     check_values=False)  # _check_data checked them (validate)
            split = k2.unflatten_params
        else:
            launch = k.choose_launch_config(spec.dims, indices.shape[2], **self.launch)

            def run(x, y, idx, *phi):
                return k.mlp_inner_loop(x, y, idx, phi, spec.activations, lr=config.lr, loss=loss,
                                        steps=steps, precision=self.precision, config=launch,
                                        check_values=False)  # _check_data checked them (validate)
            split = k.split_params

        inputs = (tasks.x, tasks.y, indices, *params)
        with _on(tasks.x.device):
            if (self.cuda_graphs and self.graph_fallback_reason is None and tasks.x.is_cuda
                    and torch.cuda.is_available()):
                flat, losses = self._graphed(run, inputs, (kernel, spec, loss, config.lr, steps, launch, self.precision))
            else:
                flat, losses = run(*inputs)
        self.last_kernel = kernel
        by_name = dict(zip(layer_names, split(flat, spec.dims)))
        return InnerResult(params={n: by_name[n] for n in named}, losses=losses)

    def _graphed(self, run, inputs, settings):
        key = settings + tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        graphed = self._graphs.get(key)
        if graphed is None:
            try:
                graphed = _GraphedLaunch(run, inputs)
            except Exception as exc:  # noqa: BLE001 - any capture failure: warn, launch plainly from now on
                self.graph_fallback_reason = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"backend 'triton': capturing the inner-loop launch in a CUDA graph failed "
                              f"({self.graph_fallback_reason}); running the same launch without graphs",
                              RuntimeWarning, stacklevel=4)
                return run(*inputs)
            self._graphs[key] = graphed
            if len(self._graphs) > _GRAPH_CACHE_SIZE:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return graphed(inputs)


class _Chunk(NamedTuple):
    """The tensors one chunk program reads and writes: ``m`` meta-steps of ``T`` tasks."""

    x: torch.Tensor        # [m·T, N, D0] f32
    y: torch.Tensor        # [m·T, N, D_L] f32 or [m·T, N] i64
    plans: torch.Tensor    # [m·T, R, B] i64
    eps: torch.Tensor      # [m] f32: each meta-step's ε
    iters: torch.Tensor    # [m] i64: each meta-step's 1-based number
    losses: torch.Tensor   # [m] f32: each meta-step's mean inner loss (written)
    phi: torch.Tensor      # [n_params] f32: φ, flat (scratch: gathered from the model, written back)
    new: torch.Tensor      # [n_params] f32: a meta-step's proposed φ (scratch)


class _CudaGraph:
    """``body()`` captured once in a CUDA graph; ``replay()`` runs it again on the current stream."""

    def __init__(self, body: Callable[[], None]):
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        # Captured on a stream of the current device (the launches': callers are inside
        # ``_on(device)``).  torch.cuda.graph's own capture stream is one per process, made on the
        # device current at the first capture, and entering it makes that device current: a later
        # capture for another device (cuda:1 after cuda:0) recorded nothing, ran the body eagerly
        # on the tensors' device, and every replay of the empty graph did nothing.
        capture_stream = torch.cuda.Stream(torch.cuda.current_device())
        try:
            with torch.cuda.graph(self.graph, stream=capture_stream):
                body()
        except BaseException:
            # an invalidated capture can leave its capture stream current (torch's __exit__ ends
            # the capture before restoring the stream): put the caller's stream back, drain
            torch.cuda.set_stream(stream)
            torch.cuda.synchronize()
            raise

    def replay(self) -> None:
        self.graph.replay()


class _Replay:
    """A captured chunk program and the static buffers it reads (filled before every replay)."""

    def __init__(self, chunk: _Chunk, graph):
        self.chunk, self.graph = chunk, graph


class TritonFusedStepper(Stepper):
    """Whole Reptile meta-steps on the device: per meta-step kernel v2's fused launch (every
    task's inner loop + the per-program sums), its outer update (φ + ε·mean, summed in a fixed
    order) and a one-program guard (``kernels/meta_step_guard.py``: φ ← new only if finite) —
    three launches, or one when a single program runs the meta-batch (meta-batch 1: the kernel
    applies the update and the guard itself; ``mlp_meta_step_v2.guarded_meta_step``) — and with
    ``cuda_graphs`` a whole chunk of meta-steps replayed as one CUDA graph.

    A ``reptile_fast.steppers.Stepper`` (``chunk``, ``name``, ``run``, ``check``), like the eager
    stepper with ``backend.inner_loop`` + ``core.OuterUpdate``, for models kernel v2 runs
    (``TritonBackend(kernel="v2").check_supported``) with plain Reptile and the interpolation
    update (no outer optimizer, no cross-process reducer: the per-program sums are reduced inside
    the launch).  Reads nothing on the host per meta-step (with ``validate``: one sync per
    ``run`` to check plan indices and labels): a non-finite meta-step leaves φ unchanged, as do
    the ones after it, until ``check`` raises ``NonFiniteError`` naming it.

    CUDA graphs (``cuda_graphs=True``, CUDA only): ``chunk`` meta-steps (default
    ``DEFAULT_GRAPH_CHUNK``; at most ``GRAPH_MAX_TASKS`` tasks in all) form one program — φ
    gathered from the model, ``chunk`` guarded meta-steps, φ written back — that
    is captured once per shape and replayed; the training loop draws a chunk's tasks and plans at
    once (on the device, like backend "compiled" draws its chunks) and ``run`` copies them, the
    ε values and the meta-step numbers into the graph's static buffers before each replay.  The
    first chunk of a shape runs un-captured (it compiles the kernels) and is then captured.  A
    failed capture warns once and the stepper carries on without graphs (same results).
    Shorter runs (``meta_step``, a last partial chunk) run the same program un-captured: every
    path launches the same kernels on the same values, so graphed and plain runs are bitwise equal.

    Args:
        model: the meta-model (φ, updated in place), on CUDA (or the CPU under the interpreter).
        config: the inner loop (SGD, "mse" / "cross_entropy", algorithm "reptile").
        precision, launch, validate: as ``TritonBackend``.
        cuda_graphs: replay chunks as CUDA graphs (ignored off CUDA).
        chunk: meta-steps per ``run`` / per draw (default ``DEFAULT_GRAPH_CHUNK`` with graphs, else 1).
    """

    name = "triton-fused"

    def __init__(self, model: nn.Module, config: InnerConfig, *, precision: Optional[str] = None,
                 launch: Optional[dict] = None, validate: bool = True, cuda_graphs: bool = False,
                 chunk: Optional[int] = None, _capture: Optional[Callable] = None):
        self.backend = TritonBackend(precision, kernel="v2", launch=launch, validate=validate)
        device = next(model.parameters()).device
        self.backend.check_supported(model, device, config)
        self.loss = self.backend._check_config(config)
        self.spec = self.backend._spec(model)
        self.model, self.config, self.device = model, config, device
        names = [n for pair in zip(self.spec.weight_names, self.spec.bias_names) for n in pair]
        self.live = [model.get_parameter(n) for n in names]
        self.launch = _v2_config(self.backend.launch)
        cuda_graphs = check_bool("cuda_graphs", cuda_graphs)
        # _capture(body) -> object with replay(): tests put an un-captured stand-in here to run
        # the replay bookkeeping on the CPU; on CUDA it is a real graph
        self._capture = _capture or (_CudaGraph if device.type == "cuda" else None)
        self.cuda_graphs = cuda_graphs and self._capture is not None
        if chunk is not None:
            chunk = check_int("chunk", chunk)
        self.default_chunk = chunk or (DEFAULT_GRAPH_CHUNK if self.cuda_graphs else 1)
        self.chunk = self.default_chunk
        #: why graphs were turned off after a failed capture (None while they work)
        self.graph_fallback_reason: Optional[str] = None
        #: chunks captured or replayed since the last ``set_chunk`` (``mode`` says "graphs" only then)
        self.graphed_chunks = 0
        self._graphs: "OrderedDict[tuple, _Replay]" = OrderedDict()
        self._state = _guard().new_state(device)
        self._n_params = _kernels_v2().n_flat_params(self.spec.dims)

    def takes_batch(self, batch_size: int) -> bool:
        """Whether kernel v2 runs plans of ``batch_size`` points for this model."""
        return _kernels_v2().supports_v2(self.spec.dims, batch_size)

    def set_chunk(self, n_tasks: int, every: Optional[int] = None) -> "TritonFusedStepper":
        """Meta-steps per ``run`` for meta-batches of ``n_tasks``: the default, capped so that a
        graph's buffers hold at most ``GRAPH_MAX_TASKS`` tasks, and made a divisor of ``every``
        (e.g. ``checkpoint_every``) so chunk boundaries fall on its multiples."""
        chunk = max(1, min(self.default_chunk, GRAPH_MAX_TASKS // max(n_tasks, 1)))
        if every:
            chunk = next(d for d in range(min(chunk, every), 0, -1) if every % d == 0)
        self.chunk = chunk
        self.graphed_chunks = 0
        return self

    # ------------------------------------------------------------------ the chunk program
    def _program(self, c: _Chunk, T: int) -> None:
        """``len(c.eps)`` meta-steps on ``c``'s tasks: φ from the model, 1 or 3 launches per
        meta-step, φ back into the model.  No host read, no data-dependent allocation
        (graph-capturable)."""
        k2 = _kernels_v2()
        torch.cat([p.detach().reshape(-1) for p in self.live], out=c.phi)
        steps = self.config.train_steps(c.plans.shape[1])
        for k in range(c.eps.shape[0]):
            rows = slice(k * T, (k + 1) * T)
            # one launch when one program runs the meta-batch (T = 1: the seed's setting), else three
            k2.guarded_meta_step(c.x[rows], c.y[rows], c.plans[rows], c.phi, self.spec.dims, self.spec.activations,
                                 lr=self.config.lr, eps=c.eps[k:k + 1], state=self._state, iteration=c.iters[k:k + 1],
                                 loss_out=c.losses[k:k + 1], loss=self.loss, steps=steps,
                                 precision=self.backend.precision, config=self.launch, scratch=c.new,
                                 check_values=False)  # checked where drawn; no sync inside a capture
        with torch.no_grad():
            torch._foreach_copy_(self.live, [v.view_as(p) for v, p in
                                             zip(k2.unflatten_params(c.phi, self.spec.dims), self.live)])

    def _host_values(self, eps, first_iteration: int):
        """ε ``[m]`` and meta-step numbers ``[m]`` on the device, without waiting for it (pinned
        host memory and an asynchronous copy on CUDA)."""
        eps_t = torch.tensor([float(e) for e in eps], dtype=torch.float32)
        if self.device.type == "cuda":
            eps_t = eps_t.pin_memory().to(self.device, non_blocking=True)
        iters = torch.arange(first_iteration, first_iteration + len(eps), dtype=torch.int64, device=self.device)
        return eps_t, iters

    def run(self, tasks: TaskBatch, plans: torch.Tensor, eps, first_iteration: int) -> torch.Tensor:
        """``m = len(eps)`` meta-steps on ``m · T`` tasks (meta-step-major) and plans ``[m · T, R, B]``;
        returns their mean inner losses ``[m]`` on the device (not read)."""
        m = len(eps)
        if m < 1 or tasks.n_tasks % m:
            raise ValueError(f"run needs m >= 1 meta-steps of equal meta-batches, got {tasks.n_tasks} tasks "
                             f"for {m} meta-steps")
        T = tasks.n_tasks // m
        self.backend._check_data(self.spec, tasks, plans, self.loss)
        reason = _kernels_v2().unsupported_reason(self.spec.dims, plans.shape[2])
        if reason:
            raise UnsupportedModelError(f"backend 'triton': {reason}")
        with _on(self.device):
            eps_t, iters = self._host_values(eps, first_iteration)
            if self.cuda_graphs and m == self.chunk and m > 1:
                return self._replay(tasks, plans, eps_t, iters, T)
            c = _Chunk(tasks.x.contiguous(), tasks.y.contiguous(), plans.contiguous(), eps_t, iters,
                       *self._buffers(m))
            self._program(c, T)
            return c.losses

    def _buffers(self, m: int):
        """Fresh ``losses [m]``, ``phi`` and ``new`` ``[n_params]`` (float32, on the device)."""
        return [torch.empty(n, device=self.device, dtype=torch.float32) for n in (m, self._n_params, self._n_params)]

    def _replay(self, tasks: TaskBatch, plans: torch.Tensor, eps_t, iters, T: int) -> torch.Tensor:
        key = (T, tuple(tasks.x.shape), tuple(tasks.y.shape), tasks.y.dtype, tuple(plans.shape))
        replay = self._graphs.get(key)
        if replay is not None:
            self._graphs.move_to_end(key)
            c = replay.chunk
            for static, value in ((c.x, tasks.x), (c.y, tasks.y), (c.plans, plans), (c.eps, eps_t), (c.iters, iters)):
                static.copy_(value)
            replay.graph.replay()
            self.graphed_chunks += 1
            return c.losses.clone()  # the next replay rewrites the static buffer
        c = _Chunk(tasks.x.contiguous().clone(), tasks.y.contiguous().clone(), plans.contiguous().clone(),
                   eps_t.clone(), iters.clone(), *self._buffers(len(eps_t)))
        # The first chunk of a shape runs plainly (compiling the kernels: nothing may compile
        # during a capture), on a side stream as torch's graph warm-up asks; then the capture.
        self._side_stream(lambda: self._program(c, T))
        losses = c.losses.clone()
        try:
            graph = self._capture(lambda: self._program(c, T))
        except Exception as exc:  # noqa: BLE001 - any capture failure: warn and run without graphs
            self.cuda_graphs = False
            self.graph_fallback_reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"backend 'triton' (fused): capturing the meta-step chunk in a CUDA graph failed "
                          f"({self.graph_fallback_reason}); running the same launches without graphs",
                          RuntimeWarning, stacklevel=3)
            return losses
        self._graphs[key] = _Replay(c, graph)
        self.graphed_chunks += 1
        if len(self._graphs) > _GRAPH_CACHE_SIZE:
            self._graphs.popitem(last=False)
        return losses

    def _side_stream(self, fn) -> None:
        if self.device.type != "cuda":
            fn()
            return
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    # ------------------------------------------------------------------ protocol
    @property
    def mode(self) -> str:
        """"graphs" when chunks were captured or replayed as CUDA graphs since the last
        ``set_chunk`` (a fit's start), else "launches" (graphs off, failed, or no full chunk:
        e.g. a ``checkpoint_every`` whose divisors are all 1, or fewer meta-steps than a chunk)."""
        return "graphs" if self.cuda_graphs and self.graphed_chunks else "launches"

    @property
    def fallback_reason(self) -> Optional[str]:
        return self.graph_fallback_reason

    @property
    def reducer(self):
        """Always None: the fused meta-step reduces over one process's tasks inside the launch."""
        return None

    @reducer.setter
    def reducer(self, value) -> None:
        if value is not None:
            raise UnsupportedModelError("the fused Triton stepper reduces within one process; a reducer "
                                        "(e.g. across processes) needs the eager stepper")

    def check(self) -> None:
        """Raise ``NonFiniteError`` (and re-arm) if a meta-step since the last check was not finite:
        one read of the device's flags."""
        healthy, bad = self._state.tolist()
        if not healthy:
            self._state.copy_(_guard().new_state(self.device))
            raise NonFiniteError(f"meta-step {bad}: non-finite inner loss or update (NaN/inf); the parameters "
                                 f"were left as they were before that step. {NONFINITE_HINT}", iteration=bad)
