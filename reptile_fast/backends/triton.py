"""Backend "triton": every task's whole inner loop in one fused Triton kernel launch.

Runs models that ``reptile_fast.mlp_spec.extract_mlp_spec`` recognises (chains of ``nn.Linear``
with bias and tanh / relu / sigmoid / identity: reptile_fast's ``MLP``, a plain ``nn.Sequential``,
the seed's ``MLP``) with 1 to 5 Linear layers and feature sizes up to 256, float32, inner SGD,
loss "mse" or "cross_entropy", algorithm "reptile".  The kernel is in
``reptile_fast.kernels.mlp_inner_loop``; this module only checks, dispatches and names results.

On a CUDA device it is what ``backend="auto"`` picks for such models.  On the CPU it runs only
under the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernel module is imported),
which is for tests: ``auto_candidate`` keeps "auto" from picking it there.

Options (``Reptile`` builds backends by name, so each also has a process-wide default):
    kernel: "v1" (default: ``kernels/mlp_inner_loop.py``, any supported model) or "v2"
        (``kernels/mlp_meta_step_v2.py``: persistent grid, narrow layers without ``tl.dot``
        padding, bounded-error tanh / sigmoid / softmax; feature sizes <= 64, inner batch <= 32).
        v1 stays the default until a GPU measurement shows v2 faster.  Default:
        ``$REPTILE_FAST_TRITON_KERNEL`` or ``DEFAULT_KERNEL``.
    precision: ``tl.dot`` input precision, "ieee" (default; matches the reference up to
        summation order), "tf32x3" (tensor cores, three tf32 products per product: near-fp32
        accuracy) or "tf32" (tensor cores; inputs rounded to a 10-bit mantissa, so ~1e-3
        relative error per product; bench/gpu_check.py records both errors on a GPU).
        Default: ``$REPTILE_FAST_TRITON_PRECISION`` or ``DEFAULT_PRECISION``.
    cuda_graphs: replay a captured CUDA graph per input shape instead of launching (for small
        meta-batches, where launch overhead dominates).  Default: off, or
        ``$REPTILE_FAST_TRITON_CUDA_GRAPHS=1``.  Ignored off CUDA.
    launch: launch overrides for tuning: ``LaunchConfig`` fields (``mode``, ``num_warps``, tile
        sizes, …) for v1, ``V2Config`` fields (``num_warps``, ``programs_per_sm``, ``max_programs``,
        ``preload``, ``accumulate``, ``stream``) for v2.

``TritonFusedStepper`` runs whole meta-steps through kernel v2's fused outer update (the
training loop's stepper protocol: ``chunk``, ``name``, ``run``, ``check``).
    validate: check plan indices and class labels are in range (one device sync per call).
    fused: with kernel "v2", ``make_stepper`` gives the training loop ``TritonFusedStepper``
        (inner loops and outer update fused; the trainer must ask for it: see NOTES-kernel.md).
"""
from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn

from ..core import NonFiniteError
from ..losses import loss_name
from ..mlp_spec import MLPSpec, cached_mlp_spec
from ..steppers import Stepper
from ..tasks.base import TaskBatch
from .base import Backend, InnerConfig, InnerResult, UnsupportedModelError

__all__ = ["TritonBackend", "TritonFusedStepper", "DEFAULT_PRECISION", "DEFAULT_KERNEL", "PRECISION_ENV",
           "KERNEL_ENV", "CUDA_GRAPHS_ENV"]

PRECISIONS = ("ieee", "tf32x3", "tf32")
KERNELS = ("v1", "v2")
#: kernel of ``TritonBackend()`` when neither the argument nor the environment says otherwise
DEFAULT_KERNEL = "v1"
KERNEL_ENV = "REPTILE_FAST_TRITON_KERNEL"
#: ``tl.dot`` input precision of ``TritonBackend()`` when neither the argument nor the
#: environment variable says otherwise.
DEFAULT_PRECISION = "ieee"
PRECISION_ENV = "REPTILE_FAST_TRITON_PRECISION"
CUDA_GRAPHS_ENV = "REPTILE_FAST_TRITON_CUDA_GRAPHS"
_GRAPH_CACHE_SIZE = 8


def _kernels():
    """The kernel module, imported on first use (it imports triton)."""
    return importlib.import_module("reptile_fast.kernels.mlp_inner_loop")


def _kernels_v2():
    """Kernel v2's module, imported on first use."""
    return importlib.import_module("reptile_fast.kernels.mlp_meta_step_v2")


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
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = run(*self.inputs)

    def __call__(self, inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def _v2_config(launch: dict):
    try:
        return _kernels_v2().V2Config(**launch)
    except TypeError as exc:
        raise TypeError(f"launch options for kernel v2 are V2Config fields (num_warps, programs_per_sm, "
                        f"max_programs, preload, accumulate, stream): {exc}") from None


class TritonBackend(Backend):
    """The fused Triton inner loop (see the module docstring for options)."""

    name = "triton"

    def __init__(self, precision: Optional[str] = None, *, kernel: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None, launch: Optional[dict] = None, validate: bool = True,
                 fused: bool = False):
        if kernel is None:
            kernel = os.environ.get(KERNEL_ENV, DEFAULT_KERNEL)
        if kernel not in KERNELS:
            raise ValueError(f"triton kernel must be one of {KERNELS} (argument or ${KERNEL_ENV}), got {kernel!r}")
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        if fused and kernel != "v2":
            raise ValueError("fused=True (the whole meta-step in kernel v2) needs kernel='v2'")
        self.fused = fused
        if precision is None:
            precision = os.environ.get(PRECISION_ENV, DEFAULT_PRECISION)
        if precision not in PRECISIONS:
            raise ValueError(f"triton precision must be one of {PRECISIONS} (argument or "
                             f"${PRECISION_ENV}), got {precision!r}")
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "0") == "1"
        if launch is not None and not isinstance(launch, dict):
            raise TypeError(f"launch must be a dict of LaunchConfig fields, got {type(launch).__name__}")
        self.kernel = kernel
        self.precision = precision
        self.cuda_graphs = bool(cuda_graphs)
        self.launch = dict(launch or {})
        self.validate = bool(validate)
        self._graphs: "OrderedDict[tuple, _GraphedLaunch]" = OrderedDict()

    def make_stepper(self, model: nn.Module, config: InnerConfig, outer_optimizer=None) -> "TritonFusedStepper":
        """The fused meta-step stepper for ``model`` (``fused=True``): kernel v2's inner loops and
        outer update in two launches.  ``UnsupportedModelError`` when it cannot run them (an outer
        optimizer, a model or setting outside kernel v2)."""
        if outer_optimizer is not None:
            raise UnsupportedModelError("backend 'triton' with fused=True applies the interpolation update; "
                                        "an outer_optimizer needs the eager stepper (fused=False)")
        return TritonFusedStepper(model, config, precision=self.precision, launch=self.launch,
                                  validate=self.validate)

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
        if self.kernel == "v2":
            reason = _kernels_v2().unsupported_reason(spec.dims, 1)
            if reason:
                raise UnsupportedModelError(f"backend 'triton': {reason}")
        for n, p in model.named_parameters():
            if p.dtype != torch.float32:
                raise UnsupportedModelError(f"backend 'triton' supports float32 parameters only, "
                                            f"'{n}' is {p.dtype}")
            if p.device != device:
                raise UnsupportedModelError(f"backend 'triton': parameter '{n}' is on {p.device}, not {device}")
        self._check_config(config)

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
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.dim() != 3 \
                or indices.shape[0] != tasks.n_tasks:
            raise ValueError(f"indices must be a long [tasks={tasks.n_tasks}, steps, batch] tensor, got "
                             f"{getattr(indices, 'dtype', type(indices).__name__)} "
                             f"{tuple(getattr(indices, 'shape', ()))}")
        if indices.device != x.device:
            raise ValueError(f"indices are on {indices.device} but the tasks on {x.device}")
        if self.validate:
            # one sync for both checks: out-of-range values would read outside the task's rows
            bad = ((indices < 0) | (indices >= tasks.n_points)).any()
            if loss == "cross_entropy":
                bad_labels = ((y < 0) | (y >= spec.dims[-1])).any()
                flags = torch.stack([bad, bad_labels]).tolist()
            else:
                flags = [bool(bad), False]
            if flags[0]:
                raise ValueError(f"indices must lie in [0, {tasks.n_points})")
            if flags[1]:
                raise ValueError(f"class labels must lie in [0, {spec.dims[-1]}) for a model with "
                                 f"{spec.dims[-1]} outputs")

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
        if self.kernel == "v2":
            k2 = _kernels_v2()
            reason = k2.unsupported_reason(spec.dims, indices.shape[2])
            if reason:
                raise UnsupportedModelError(f"backend 'triton': {reason}")
            launch = _v2_config(self.launch)

            def run(x, y, idx, *phi):
                return k2.inner_loop(x, y, idx, k2.flat_params(phi), spec.dims, spec.activations, lr=config.lr,
                                     loss=loss, steps=steps, precision=self.precision, config=launch)
            split = k2.unflatten_params
        else:
            launch = k.choose_launch_config(spec.dims, indices.shape[2], **self.launch)

            def run(x, y, idx, *phi):
                return k.mlp_inner_loop(x, y, idx, phi, spec.activations, lr=config.lr, loss=loss,
                                        steps=steps, precision=self.precision, config=launch)
            split = k.split_params

        inputs = (tasks.x, tasks.y, indices, *params)
        if self.cuda_graphs and tasks.x.is_cuda and torch.cuda.is_available():
            flat, losses = self._graphed(run, inputs, (self.kernel, spec, loss, config.lr, steps, launch))
        else:
            flat, losses = run(*inputs)
        by_name = dict(zip(layer_names, split(flat, spec.dims)))
        return InnerResult(params={n: by_name[n] for n in named}, losses=losses)

    def _graphed(self, run, inputs, settings):
        key = settings + tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = _GraphedLaunch(run, inputs)
            self._graphs[key] = graphed
            if len(self._graphs) > _GRAPH_CACHE_SIZE:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        return graphed(inputs)


class TritonFusedStepper(Stepper):
    """Whole Reptile meta-steps in two launches: kernel v2's inner loops with the outer update fused
    (``reptile_fast.kernels.mlp_meta_step_v2.meta_step``).

    A ``reptile_fast.steppers.Stepper`` (``chunk``, ``name``, ``run``, ``check``), like the eager
    stepper with ``backend.inner_loop`` + ``core.OuterUpdate``, for models kernel v2 runs
    (``TritonBackend(kernel="v2").check_supported``) with plain Reptile and the interpolation
    update (no outer optimizer, no cross-process reducer: the per-program sums are reduced inside
    the launch).  Reads nothing on the host per meta-step (except
    with ``validate``: one sync to check plan indices and labels): a non-finite meta-step leaves
    φ unchanged, as do the ones after it, until ``check`` raises ``NonFiniteError``.

    Args:
        model: the meta-model (φ, updated in place), on CUDA (or the CPU under the interpreter).
        config: the inner loop (SGD, "mse" / "cross_entropy", algorithm "reptile").
        precision, launch, validate: as ``TritonBackend``.
    """

    chunk = 1
    name = "triton-fused"

    def __init__(self, model: nn.Module, config: InnerConfig, *, precision: Optional[str] = None,
                 launch: Optional[dict] = None, validate: bool = True):
        self.backend = TritonBackend(precision, kernel="v2", launch=launch, validate=validate)
        device = next(model.parameters()).device
        self.backend.check_supported(model, device, config)
        self.loss = self.backend._check_config(config)
        self.spec = self.backend._spec(model)
        self.model, self.config = model, config
        names = [n for pair in zip(self.spec.weight_names, self.spec.bias_names) for n in pair]
        self.live = [model.get_parameter(n) for n in names]
        self.launch = _v2_config(self.backend.launch)
        self._healthy = torch.ones((), dtype=torch.bool, device=device)
        self._first_bad = torch.zeros((), dtype=torch.long, device=device)

    @torch.no_grad()
    def step(self, tasks: TaskBatch, plan: torch.Tensor, eps, iteration: int) -> torch.Tensor:
        """One meta-step on ``T`` tasks with plan ``[T, R, B]`` and outer step ``eps`` (float or
        a 1-element float32 device tensor); returns the mean inner loss (0-dim, on the device)."""
        k2 = _kernels_v2()
        self.backend._check_data(self.spec, tasks, plan, self.loss)
        reason = k2.unsupported_reason(self.spec.dims, plan.shape[2])
        if reason:
            raise UnsupportedModelError(f"backend 'triton': {reason}")
        phi = k2.flat_params(self.live)
        res = k2.meta_step(tasks.x, tasks.y, plan, phi, self.spec.dims, self.spec.activations,
                           lr=self.config.lr, eps=eps, loss=self.loss,
                           steps=self.config.train_steps(plan.shape[1]), precision=self.backend.precision,
                           config=self.launch)
        finite = torch.isfinite(res.loss) & torch.isfinite(res.params).all()
        ok = finite & self._healthy
        new = torch.where(ok, res.params, phi)
        torch._foreach_copy_(self.live, [v.view_as(p) for v, p in zip(k2.unflatten_params(new, self.spec.dims),
                                                                      self.live)])
        first = self._healthy & ~finite
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, iteration), self._first_bad)
        self._healthy = self._healthy & finite
        return res.loss

    @property
    def reducer(self):
        """Always None: the fused meta-step reduces over one process's tasks inside the launch."""
        return None

    @reducer.setter
    def reducer(self, value) -> None:
        if value is not None:
            raise UnsupportedModelError("the fused Triton stepper reduces within one process; a reducer "
                                        "(e.g. across processes) needs the eager stepper")

    def run(self, tasks: TaskBatch, plans: torch.Tensor, eps, first_iteration: int) -> torch.Tensor:
        """``m = len(eps)`` meta-steps on ``m · T`` tasks (meta-step-major) and plans ``[m · T, R, B]``;
        returns their mean inner losses ``[m]`` on the device."""
        m = len(eps)
        T = tasks.n_tasks // m
        return torch.stack([self.step(tasks[k * T:(k + 1) * T], plans[k * T:(k + 1) * T], eps[k],
                                      first_iteration + k) for k in range(m)])

    def check(self) -> None:
        """Raise ``NonFiniteError`` (and re-arm) if a meta-step since the last check was not finite."""
        bad = int(self._first_bad)
        if bad:
            self._healthy.fill_(True)
            self._first_bad.zero_()
            raise NonFiniteError(f"meta-step {bad}: non-finite inner loss or update (NaN/inf); the parameters "
                                 f"were left as they were before that step. Lower inner_lr/outer_lr or check the data.")
