"""The ways of running one meta-batch's inner loops that the benchmarks compare ("providers"),
the seeded problems they all run, and the check against the reference that precedes any timing.

Every provider has one interface::

    provider.unavailable(device) -> None | reason        # cannot run here at all (import, device)
    provider.skip_reason(point, device) -> None | reason # not at this size/device
    prepared = provider.prepare(problem)                 # untimed: build, copy inputs, compile
    out = prepared.run(i)                                # timed: inner loops on input set i % R
    prepared.to_params(out) -> {name: [T, *shape]}       # the adapted parameters, for the check

All providers see the same seeded model φ, the same tasks and the same minibatch plans
(``indices [T, steps, batch]``), so before a time means anything ``check_prepared`` runs the
provider on every input set it will be timed on and holds every task's update φ̃ − φ to a
bound derived for its precision against a float64 oracle (see "the gate" below); fp32 providers
must also match the fp32 reference backend at rtol 1e-5 / atol 1e-6.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from reptile_fast.backends import InnerConfig, UnsupportedModelError, get_backend
from reptile_fast.backends.reference import ReferenceBackend
from reptile_fast.models import MLP
from reptile_fast.tasks import Sine, TaskBatch, sample_indices

__all__ = ["bench_mode", "bench_device", "ProviderSkip", "Point", "Problem", "Prepared", "Provider",
           "CheckResult", "PROVIDERS", "provider_names", "get_provider", "make_problem", "check_prepared",
           "check_subset", "sweep_points", "SMOKE_POINTS", "RTOL", "ATOL", "TIMED_LIMITS",
           "COMPILE_POINTS", "timed_skip_reason", "UNIT_ROUNDOFF", "GATE_K", "GATE_CAP",
           "update_error_bound", "oracle_updates", "float64_updates", "Updates", "Float64Draws"]

#: The project's equivalence tolerance for fp32 results against the fp32 reference.
RTOL, ATOL = 1e-5, 1e-6

# ---------------------------------------------------------------------------------- the gate
# Before a provider is timed, its *update* Δ_i = φ̃_i − φ on every task i of every input set it
# will be timed on is compared with a float64 oracle's (``oracle_updates``):
#
#     e_i = ‖Δ_i − Δ_i^f64‖₂ / ‖Δ_i^f64‖₂   (all parameters of task i)   must be ≤ b_i.
#
# Measured on the update, not on the weights: φ̃ ≈ φ + Δ with ‖Δ‖ ~ 1 % of ‖φ‖, so a weight-level
# relative error is dominated by φ — a provider returning φ unchanged scores ~1e-2 there, but
# e_i = 1 here; one at half the learning rate scores e_i ≈ 0.5.
#
# The bound, from the rounding errors of S inner SGD steps through L linear layers.  Write the
# computed iterate as θ̂_s = θ_s + ε_s (θ_s the exact one, g_s its gradient).  One step is
#     ε_{s+1} = (I − lr·H_s)·ε_s − lr·δ_s + r_s
# with δ_s the error of the computed gradient and r_s the rounding of the stored weights, so
#     ε_S = Σ_s M_s·(r_s − lr·δ_s),   M_s = Π_{t>s} (I − lr·H_t):
#   1. storage: ‖r_s‖ ≤ u₃₂·‖θ_s‖ ≈ u₃₂·‖φ‖ per step (fp32 weights, tf32 providers too): S·u₃₂·ρ_i
#      relative to the update, ρ_i = ‖φ‖ / ‖Δ_i^f64‖;
#   2. products: each step's gradient passes through L matrix products forward and L back whose
#      inputs are rounded to the precision's unit roundoff u (fp32: 2^-24; tf32 keeps 10 mantissa
#      bits: 2^-11): ‖δ_s‖ ≤ c·L·u·‖g_s‖.  Summed over the steps that is c·L·u·Σ_s lr·‖g_s‖, i.e.
#      c·L·u·A_i relative to the update, with A_i = Σ_s lr·‖g_s‖ / ‖Δ_i‖ ≥ 1 the path ratio (the
#      length of the float64 path over the length of its chord: 1 when every step points the
#      same way; ``float64_updates`` returns Σ_s lr·‖g_s‖ as ``.path``).  Not S: the product
#      errors are relative to each step's own gradient, not to the whole update, so they do not
#      grow with the number of steps (an earlier form, K·S·(u₃₂·ρ + L·u), did: at 32 steps its
#      tf32 bound was 0.19, above the 0.1 error of a provider at 90 % of the learning rate).
#   b_i = K · (S·u₃₂·ρ_i + L·u·A_i),   K ≥ max ‖M_s‖·max(1, c)
# K is measured (bench/gate_calibration.py → bench/results/gate_calibration_cpu.json): the largest
# K any fp32 provider needed against this oracle, on the smoke shapes and the CPU sweep's sizes
# (widths 8-256, 2-32 steps, meta-batch up to 256, lr 0.02 — the benchmarks' only learning rate,
# where ‖M_s‖ stays near 1), and an fp32 loop whose matrix-product inputs are rounded to tf32
# (an emulation of the GPU's tf32 mode: to nearest, and truncated as tensor cores reading raw
# fp32 registers do).  See GATE_K for the numbers.  For the sine MLP (L = 3, ρ ≤ 520, A ≤ 8)
# that is, in fp32, b ≈ 2e-4-6e-4 at 5 steps; in tf32, b ≈ 0.02-0.05 at 5 and at 32 steps,
# against ≥ 0.1 for most tasks of a provider at 90 % of the learning rate.
#
# A bound above GATE_CAP could not tell a correct provider from one at 90 % of the learning rate
# (e ≈ 0.1 to first order), so the gate then refuses the provider at that point rather than time
# it.

#: unit roundoff of the numbers a matrix product's inputs are rounded to, per provider precision
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "tf32": 2.0 ** -11}
#: the measured constant of the bound, with its safety factor (see above).  Needed
#: (bench/results/gate_calibration_cpu.json): fp32 providers ≤ 0.50; tf32 rounded to nearest
#: ≤ 0.49; tf32 truncated ≤ 2.2 up to width 128 (0.93 at the GPU check's 1-64-64-1, 5 steps)
#: but 11.6 at width 256 (lr 0.02 is near that MLP's stability edge: coherent truncation errors
#: grow, so a truncating tf32 is refused there, as under the earlier bound); a provider at 90 %
#: of the learning rate needs ≥ 35 on its worst task at every size, so it is refused.
GATE_K = 4.0
#: the largest bound the gate accepts: half of what a provider at 90 % of the learning rate scores
#: to first order (e ≈ 0.1; measured per task 0.02-0.26, ≥ 0.1 on most tasks of a meta-batch)
GATE_CAP = 0.05

#: Providers that loop over tasks in Python are timed only up to this meta-batch in the sweeps
#: (their cost per task does not depend on the meta-batch; larger sizes only burn the budget),
#: per device type.
TIMED_LIMITS = {"cpu": {"seed": 256, "reference": 32}, "cuda": {"seed": 32, "reference": 1}}


@dataclass(frozen=True)
class Point:
    """One benchmark size: ``meta_batch`` tasks, an MLP ``in → width × depth → out``, ``steps``
    SGD steps (lr ``lr``) of ``inner_batch`` of each task's ``n_points`` points."""

    meta_batch: int
    width: int = 64
    steps: int = 5
    depth: int = 2
    inner_batch: int = 10
    n_points: int = 50
    lr: float = 0.02
    activation: str = "tanh"

    @property
    def dims(self) -> Tuple[int, ...]:
        return (1,) + (self.width,) * self.depth + (1,)

    @property
    def id(self) -> str:
        return f"T{self.meta_batch}-H{self.width}-S{self.steps}"

    def __str__(self) -> str:
        return self.id


#: Tiny sizes for the CI smoke run (correctness of every provider, seconds on 2 cores).
SMOKE_POINTS = (Point(meta_batch=3, width=8, steps=2), Point(meta_batch=1, width=12, steps=3, inner_batch=7))


def sweep_points(mode: str, device_type: str) -> List[Point]:
    """The sizes a sweep times.

    - "smoke": one tiny point (exercises the timing path once; CI).
    - "full" on the CPU: meta-batch 1, 32, 256, 4096 at width 64 / 5 steps; widths 32, 128, 256
      at meta-batch 256 / 5 steps; 32 steps at meta-batch 256 / width 64 (not the full cross
      product: it would take an hour on 2 shared cores).
    - "full" on CUDA: meta-batch 1 … 16384 at width 64 and widths 32 … 256 at meta-batch 4096,
      first for 5 steps, then for 32 (in that order: the GPU check stops when its time is up).
    - "tiny" (the GPU check's CPU smoke): two tiny points.
    """
    if mode == "smoke":
        return [Point(meta_batch=4, width=16, steps=2)]
    if mode == "tiny":
        return [Point(meta_batch=1, width=16, steps=2), Point(meta_batch=4, width=16, steps=2)]
    if mode != "full":
        raise ValueError(f"sweep mode must be 'smoke', 'tiny' or 'full', got {mode!r}")
    if device_type == "cuda":
        pts = []
        for s in (5, 32):
            pts += [Point(meta_batch=t, width=64, steps=s) for t in (1, 32, 256, 4096, 16384)]
            pts += [Point(meta_batch=4096, width=w, steps=s) for w in (32, 128, 256)]
        return pts
    pts = [Point(meta_batch=t, width=64, steps=5) for t in (1, 32, 256, 4096)]
    pts += [Point(meta_batch=256, width=w, steps=5) for w in (32, 128, 256)]
    pts += [Point(meta_batch=256, width=64, steps=32)]
    return pts


def bench_mode() -> str:
    """The sweep mode from ``REPTILE_BENCH``: "smoke" (default; CI) or "full"."""
    mode = os.environ.get("REPTILE_BENCH", "smoke") or "smoke"
    if mode not in ("smoke", "full"):
        raise ValueError(f"REPTILE_BENCH must be 'smoke' or 'full', got {mode!r}")
    return mode


def bench_device() -> torch.device:
    """``REPTILE_BENCH_DEVICE`` if set (cpu, cuda or cuda:N; a ``ValueError`` naming the variable
    otherwise, or for CUDA on a machine without it), else CUDA when present, else the CPU."""
    name = os.environ.get("REPTILE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"REPTILE_BENCH_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"REPTILE_BENCH_DEVICE must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"REPTILE_BENCH_DEVICE={name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"REPTILE_BENCH_DEVICE={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A seeded benchmark problem on one device.

    Attributes:
        point: the size.
        model: the meta-model (φ), reptile_fast ``MLP`` with ``point.dims``, on ``device``.
        tasks: ``R`` rotations of sine tasks, each ``TaskBatch`` x, y ``[T, n_points, 1]``.
        plans: ``R`` plans, long ``[T, steps, inner_batch]``; rotation 0 is the one checked.
        config: the inner-loop settings (SGD, MSE, ``point.lr``).
    """

    point: Point
    device: torch.device
    model: nn.Module
    tasks: List[TaskBatch]
    plans: List[torch.Tensor]
    config: InnerConfig
    _oracle: Dict[Any, Dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def rotations(self) -> int:
        return len(self.tasks)


def make_problem(point: Point, device, *, rotations: int = 1, seed: int = 0, gen_device=None) -> Problem:
    """The problem every provider runs at ``point``: model, tasks and plans drawn from ``seed``.

    Tasks and plans are drawn on ``gen_device`` (default the CPU, so every device sees the same
    numbers; the GPU check draws its large meta-batches on the GPU) and moved to ``device``.
    The model is initialised from ``seed`` on the CPU; the global RNG is left as it was."""
    device = torch.device(device)
    if rotations < 1:
        raise ValueError(f"rotations must be >= 1, got {rotations}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(1, point.width, 1, depth=point.depth, activation=point.activation)
    model = model.to(device)
    g = torch.Generator(device=gen_device or "cpu").manual_seed(seed + 1)
    sine = Sine(n_points=point.n_points)
    tasks, plans = [], []
    for _ in range(rotations):
        tasks.append(sine.sample(point.meta_batch, generator=g).to(device))
        plans.append(sample_indices(point.meta_batch, point.steps, point.n_points, point.inner_batch,
                                    generator=g).to(device))
    return Problem(point, device, model, tasks, plans, InnerConfig(lr=point.lr, loss="mse"))


# ---------------------------------------------------------------------------------- providers
@dataclass
class Prepared:
    """A provider ready to run a problem.

    Attributes:
        run: ``run(i)`` runs every task's inner loop on input set ``i % R`` and returns the raw
            output (asynchronously on a GPU).
        to_params: raw output -> ``{name: [T, *shape]}`` torch tensors (any device).
        sync: for outputs outside torch's CUDA stream (JAX): ``sync(out)`` waits for them; None
            means torch's stream (CUDA events time it).
    """

    run: Callable[[int], Any]
    to_params: Callable[[Any], Dict[str, torch.Tensor]]
    sync: Optional[Callable[[Any], None]] = None


class ProviderSkip(Exception):
    """``prepare`` found the provider cannot run here (e.g. torch.compile has no compiler)."""


class Provider:
    """One way of running a meta-batch of inner loops (see the module docstring)."""

    name: str = "?"
    #: the precision of its matrix products' inputs ("fp32" or "tf32"), which sets its bound
    #: against the float64 oracle (``update_error_bound``).
    precision: str = "fp32"
    #: False: never timed on the CPU (the Triton interpreter).
    timed_on_cpu: bool = True

    @property
    def exact(self) -> bool:
        """fp32 providers are also held to RTOL/ATOL against the fp32 reference."""
        return self.precision == "fp32"

    def unavailable(self, device: torch.device) -> Optional[str]:
        return None

    def skip_reason(self, point: Point, device: torch.device) -> Optional[str]:
        return None

    def prepare(self, problem: Problem) -> Prepared:
        raise NotImplementedError


def _stack(per_task: List[List[torch.Tensor]], names: Sequence[str]) -> Dict[str, torch.Tensor]:
    return {n: torch.stack([task[j] for task in per_task]) for j, n in enumerate(names)}


class SeedProvider(Provider):
    """The seed's loop: per task a deep copy of the model, ``torch.optim.SGD`` and
    ``nn.MSELoss``, one backward per step — fed the plan's minibatches instead of randperm."""

    name = "seed"

    def prepare(self, problem: Problem) -> Prepared:
        model, lr = problem.model, problem.point.lr
        names = [n for n, _ in model.named_parameters()]
        loss_fct = nn.MSELoss()

        def run(i):
            tasks, plan = problem.tasks[i % problem.rotations], problem.plans[i % problem.rotations]
            out = []
            for t in range(tasks.n_tasks):
                m = copy.deepcopy(model)
                opt = torch.optim.SGD(m.parameters(), lr=lr)
                x, y = tasks.x[t], tasks.y[t]
                for s in range(plan.shape[1]):
                    ind = plan[t, s]
                    loss = loss_fct(m(x[ind]), y[ind])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                out.append([p.detach() for p in m.parameters()])
            return out

        return Prepared(run, lambda out: _stack(out, names))


class BackendProvider(Provider):
    """A registered reptile_fast backend (``reference``, ``torch``, ``triton``), optionally
    constructed with keyword options (``options``) that select one of its paths."""

    def __init__(self, name: str, backend: str, options: Optional[Dict[str, Any]] = None,
                 precision: str = "fp32", timed_on_cpu: bool = True):
        if precision not in UNIT_ROUNDOFF:
            raise ValueError(f"precision must be one of {sorted(UNIT_ROUNDOFF)}, got {precision!r}")
        self.name, self.backend, self.options = name, backend, dict(options or {})
        self.precision, self.timed_on_cpu = precision, timed_on_cpu
        self._instance = None

    def _make(self):
        if self.backend == "reference":
            return ReferenceBackend()
        if not self.options:
            return get_backend(self.backend)
        cls = type(get_backend(self.backend))
        params = inspect.signature(cls).parameters
        unknown = [k for k in self.options if k not in params]
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise UnsupportedModelError(f"{cls.__name__} takes no option {unknown}")
        return cls(**self.options)

    def backend_instance(self):
        if self._instance is None:
            self._instance = self._make()
            if "validate" not in self.options:
                # timed as Reptile runs it: the plans are sample_indices' (in range by
                # construction), so no per-call read of their values (a device sync on a GPU)
                self._instance.validate = False
        return self._instance

    def unavailable(self, device: torch.device) -> Optional[str]:
        if self.backend == "triton":
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                return "triton needs CUDA or TRITON_INTERPRET=1 (set before the kernel is imported)"
            try:
                importlib.import_module("triton")
            except ImportError as exc:
                return f"triton not importable: {exc}"
        try:
            self.backend_instance()
        except (ImportError, AttributeError) as exc:
            return f"backend {self.backend!r} not importable yet: {type(exc).__name__}: {exc}"
        except (UnsupportedModelError, TypeError, ValueError) as exc:
            return f"backend {self.backend!r} cannot be built with {self.options}: {exc}"
        return None

    def skip_reason(self, point: Point, device: torch.device) -> Optional[str]:
        backend = self.backend_instance()
        model = MLP(1, point.width, 1, depth=point.depth, activation=point.activation).to(device)
        try:
            backend.check_supported(model, device, InnerConfig(lr=point.lr, loss="mse"))
        except UnsupportedModelError as exc:
            return f"{self.name} does not support {point}: {exc}"
        return None

    def prepare(self, problem: Problem) -> Prepared:
        backend = self.backend_instance()

        def run(i):
            r = i % problem.rotations
            return backend.inner_loop(problem.model, problem.tasks[r], problem.plans[r], problem.config)

        return Prepared(run, lambda out: out.params)


class JaxProvider(Provider):
    """The same inner loop in JAX (``bench.jax_peer``): jit(vmap(lax.scan(SGD step)))."""

    name = "jax"

    def unavailable(self, device: torch.device) -> Optional[str]:
        from bench import jax_peer

        return jax_peer.unavailable(device)

    def prepare(self, problem: Problem) -> Prepared:
        from bench import jax_peer

        return jax_peer.prepare(problem)


class TorchCompileProvider(Provider):
    """The batched-MLP inner loop under ``torch.compile`` (inductor, static shapes, full graph):
    ``reptile_fast.compiled_step.fused_inner_loop`` (the compiled drop-in's formulation: batched
    forward, hand-written backward, SGD) plus the plan's gather, compiled as one function.
    Compiling takes 10-30 s per shape, so the sweeps time it only at ``COMPILE_POINTS``."""

    name = "torch-compile"

    def unavailable(self, device: torch.device) -> Optional[str]:
        try:
            mod = importlib.import_module("reptile_fast.compiled_step")
        except ImportError as exc:
            return f"reptile_fast.compiled_step not importable yet: {exc}"
        if not hasattr(mod, "fused_inner_loop"):
            return "reptile_fast.compiled_step has no fused_inner_loop"
        if not hasattr(torch, "compile"):
            return "torch.compile is not available in this torch"
        return None

    def prepare(self, problem: Problem) -> Prepared:
        from reptile_fast.compiled_step import fused_inner_loop
        from reptile_fast.mlp_spec import extract_mlp_spec

        spec = extract_mlp_spec(problem.model)
        named = dict(problem.model.named_parameters())
        names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
        phi = [named[n].detach() for n in names]
        lr = problem.point.lr

        def inner(x, y, idx, *phi):
            # x, y [T, N, 1]; idx [T, S, B] -> minibatches [S, T, B, 1], step-major
            rows = torch.arange(x.shape[0], device=x.device).view(1, -1, 1)
            plan = idx.transpose(0, 1)
            adapted, _ = fused_inner_loop(spec, phi, x[rows, plan], y[rows, plan], lr, "mse")
            return adapted

        # Every prepare compiles the same code object: reset, or dynamo would hit its recompile
        # limit after a few sizes and silently run eagerly.
        torch._dynamo.reset()
        compiled = torch.compile(inner, dynamic=False, fullgraph=True)

        def run(i):
            r = i % problem.rotations
            return compiled(problem.tasks[r].x, problem.tasks[r].y, problem.plans[r], *phi)

        try:
            run(0)  # compile here, untimed
        except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler for inductor on this machine
            raise ProviderSkip(f"torch.compile failed here: {type(exc).__name__}: {str(exc)[:300]}") from exc
        return Prepared(run, lambda out: dict(zip(names, out)))


#: torch-compile is timed only here (compiling costs 10-60 s per shape): the sine MLP's size,
#: meta-batches 32, 256, 4096 on the CPU; 4096 on CUDA (the GPU check's budget is 5 minutes).
COMPILE_POINTS = {"cpu": {(t, 64, 5) for t in (32, 256, 4096)}, "cuda": {(4096, 64, 5)}}


class _CudaOnly(BackendProvider):
    def unavailable(self, device):
        if device.type != "cuda":
            return f"{self.name} applies only on CUDA"
        return super().unavailable(device)


def _build_providers() -> Dict[str, Provider]:
    provs: Dict[str, Provider] = {
        "seed": SeedProvider(),
        "reference": BackendProvider("reference", "reference"),
        "torch": BackendProvider("torch", "torch"),
    }
    # TorchBackend(fast_mlp=False): the generic torch.func vmap(grad(functional_call)) path.
    provs["torch-vmap"] = BackendProvider("torch-vmap", "torch", {"fast_mlp": False})
    provs["torch-compile"] = TorchCompileProvider()
    provs["triton"] = BackendProvider("triton", "triton", timed_on_cpu=False)
    # Kernel launches replayed from a captured CUDA graph (small meta-batches are launch-bound).
    provs["triton-graphs"] = _CudaOnly("triton-graphs", "triton", {"cuda_graphs": True})
    # tf32 dot inputs: not exact by design; gated against float64 with tf32's unit roundoff.
    provs["triton-tf32"] = BackendProvider("triton-tf32", "triton", {"precision": "tf32"}, precision="tf32",
                                           timed_on_cpu=False)
    provs["jax"] = JaxProvider()
    return provs


_PROVIDERS: Optional[Dict[str, Provider]] = None


def _providers() -> Dict[str, Provider]:
    global _PROVIDERS
    if _PROVIDERS is None:
        _PROVIDERS = _build_providers()
    return _PROVIDERS


#: Every provider's name, in table order.
PROVIDERS = ("seed", "reference", "torch-vmap", "torch", "torch-compile", "triton", "triton-graphs",
             "triton-tf32", "jax")


def provider_names() -> Tuple[str, ...]:
    return PROVIDERS


def get_provider(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose one of {PROVIDERS}")
    return _providers()[name]


def timed_skip_reason(name: str, point: Point, device: torch.device, mode: str) -> Optional[str]:
    """Why a sweep does not time ``name`` at ``point`` (None: it does).  Correctness checks are
    not affected.  Only "full" sweeps leave sizes out."""
    provider = get_provider(name)
    if device.type == "cpu" and not provider.timed_on_cpu:
        return f"{name} runs on the CPU only under the Triton interpreter: never timed"
    if mode != "full":
        if name == "torch-compile":
            return "smoke run: torch-compile is checked once in test_provider_matches_reference (compiling takes 10-25 s)"
        return None
    limit = TIMED_LIMITS[device.type].get(name)
    if limit is not None and point.meta_batch > limit:
        return f"{name} is timed up to meta-batch {limit} (its cost per task does not depend on the meta-batch)"
    if name == "torch-compile" and (point.meta_batch, point.width, point.steps) not in COMPILE_POINTS[device.type]:
        return f"torch-compile is timed only at {sorted(COMPILE_POINTS[device.type])} (compiling costs 10-30 s per shape)"
    return None


# ---------------------------------------------------------------------------------- checking
@dataclass
class CheckResult:
    """Outcome of the check that precedes any timing.

    Attributes:
        ok: passed: on every task of every input set the update is within its bound of the
            float64 oracle's (``update_margin <= 1``); fp32 providers also match the fp32
            reference at RTOL/ATOL on the checked subset, and ``compare_to``'s full output.
        max_abs_err: largest |provider − fp32 reference| over the subset of input set 0.
        rel_err_f64: ‖provider − float64 oracle‖ / ‖oracle‖ over the subset of input set 0
            (adapted weights, all parameters; for the record, not the gate).
        ref_rel_err_f64: the same for the fp32 reference itself (what fp32 rounding gives).
        tasks_checked: tasks per input set compared with the float64 oracle (all of them).
        message: why it failed ("" when ok).
        update_rel_err: the largest e_i = ‖Δ_i − Δ_i^f64‖ / ‖Δ_i^f64‖ over all tasks and input sets.
        update_bound: the bound b_i of the task where e_i / b_i is largest.
        update_margin: max_i e_i / b_i (the gate passes at <= 1).
        rotations_checked: input sets checked (all that the timing cycles through).
    """

    ok: bool
    max_abs_err: float
    rel_err_f64: float
    ref_rel_err_f64: float
    tasks_checked: int
    message: str = ""
    update_rel_err: float = float("nan")
    update_bound: float = float("nan")
    update_margin: float = float("nan")
    rotations_checked: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return dict(ok=self.ok, max_abs_err=self.max_abs_err, rel_err_f64=self.rel_err_f64,
                    ref_rel_err_f64=self.ref_rel_err_f64, tasks_checked=self.tasks_checked,
                    message=self.message, update_rel_err=self.update_rel_err,
                    update_bound=self.update_bound, update_margin=self.update_margin,
                    rotations_checked=self.rotations_checked)


def check_subset(n_tasks: int, k: int = 16) -> torch.Tensor:
    """Indices of at most ``k`` tasks spread over ``range(n_tasks)`` (first and last included):
    the tasks also compared with the per-task fp32 reference (too slow to run on all of 16384;
    every task is compared with the batched float64 oracle)."""
    if n_tasks <= k:
        return torch.arange(n_tasks)
    return torch.unique(torch.linspace(0, n_tasks - 1, k).round().long())


def oracle_params(problem: Problem, subset: torch.Tensor, dtype: torch.dtype, rotation: int = 0) -> Dict[str, torch.Tensor]:
    """The reference backend's adapted parameters for input set ``rotation``'s tasks ``subset``,
    computed in ``dtype``: float32 on the problem's device (the reference the tests compare
    with), float64 on the CPU.  Returned on the CPU; cached per problem."""
    key = (tuple(subset.tolist()), dtype, rotation)
    if key not in problem._oracle:
        device = problem.device if dtype == torch.float32 else torch.device("cpu")
        model = copy.deepcopy(problem.model).to(device=device, dtype=dtype)
        sel = subset.to(problem.device)
        tasks = problem.tasks[rotation][sel].to(device, dtype=dtype)
        plan = problem.plans[rotation][sel].to(device)
        res = ReferenceBackend().inner_loop(model, tasks, plan, problem.config)
        problem._oracle[key] = {k: v.detach().cpu() for k, v in res.params.items()}
    return problem._oracle[key]


class Updates(dict):
    """``{name: [T, *shape]}`` float64 updates Δ_i (``float64_updates``), with ``path``: float64
    ``[T]``, Σ_s lr·‖g_s‖ of each task's steps."""

    def __init__(self, updates, path: torch.Tensor):
        super().__init__(updates)
        self.path = path


def float64_updates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: torch.Tensor, lr: float, *,
                    chunk: int = 4096) -> Dict[str, torch.Tensor]:
    """Every task's update Δ_i = φ̃_i − φ of plain SGD on the MSE of the plan's minibatches, in
    float64: the benchmark gate's oracle.

    Written here with torch.func (``vmap`` over tasks of ``grad`` of ``functional_call``) so that
    it shares no code with any provider; tests/test_bench_gates.py checks it against the
    reference backend run in float64.

    Args:
        model: the MLP φ (any device/dtype; a float64 copy is used, ``model`` is not changed).
        x: ``[T, N, in]``; y: ``[T, N, out]``; plan: long ``[T, steps, batch]`` (same device).
        lr: the inner SGD learning rate.
        chunk: tasks per vmap call.

    Returns ``{name: [T, *shape]}`` float64 on the CPU (an ``Updates`` dict), with ``.path``:
    float64 ``[T]``, Σ_s lr·‖g_s‖ over each task's steps (all parameters): the length of the
    path whose chord is ‖Δ_i‖, for the bound's path ratio A_i (``update_error_bound``).
    """
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(model).to(device=x.device, dtype=torch.float64)
    phi = {n: p.detach() for n, p in model.named_parameters()}

    def loss(params, xb, yb):
        return torch.nn.functional.mse_loss(functional_call(model, params, (xb,)), yb)

    step_grad = grad(loss)

    def one_task(xt, yt, pt):
        params, path = phi, 0.0
        for s in range(pt.shape[0]):
            g = step_grad(params, xt[pt[s]], yt[pt[s]])
            path = path + lr * torch.sqrt(sum((v * v).sum() for v in g.values()))
            params = {n: params[n] - lr * g[n] for n in params}
        return {n: params[n] - phi[n] for n in params}, path

    parts, paths = [], []
    for lo in range(0, x.shape[0], chunk):
        hi = min(lo + chunk, x.shape[0])
        with torch.no_grad():
            out, path = vmap(one_task)(x[lo:hi].to(torch.float64), y[lo:hi].to(torch.float64), plan[lo:hi])
        parts.append({n: v.cpu() for n, v in out.items()})
        paths.append(path.cpu())
    return Updates({n: torch.cat([p[n] for p in parts]) for n in phi}, path=torch.cat(paths))


def oracle_updates(problem: Problem, rotation: int = 0, *, chunk: int = 4096) -> Dict[str, torch.Tensor]:
    """The float64 oracle (``float64_updates``): every task's update Δ_i = φ̃_i − φ for input set
    ``rotation``, on the problem's device in chunks of ``chunk`` tasks.  Returns
    ``{name: [T, *shape]}`` float64 on the CPU; cached per problem and input set.
    """
    key = ("update", rotation)
    if key in problem._oracle:
        return problem._oracle[key]
    if problem.config.loss != "mse" or problem.config.optimizer != "sgd":
        raise ValueError("the oracle covers SGD on MSE, the benchmark problems' inner loop")
    tasks, plan = problem.tasks[rotation], problem.plans[rotation]
    problem._oracle[key] = float64_updates(problem.model, tasks.x, tasks.y, plan, problem.config.lr, chunk=chunk)
    return problem._oracle[key]


def update_error_bound(point: Point, precision: str, rho: torch.Tensor,
                       path_ratio: Optional[torch.Tensor] = None) -> torch.Tensor:
    """b_i = GATE_K · (S·u₃₂·ρ_i + L·u·A_i): the largest relative error of task i's update against
    float64 that a correct provider of ``precision`` may have (derivation above ``GATE_K``).

    Args:
        point: the size (S = ``point.steps``, L = ``len(point.dims) - 1`` linear layers).
        precision: "fp32" or "tf32".
        rho: ``[T]`` ‖φ‖ / ‖Δ_i^f64‖ per task.
        path_ratio: ``[T]`` A_i = Σ_s lr·‖g_s‖ / ‖Δ_i^f64‖ (``float64_updates(...).path`` over the
            update's norm, ≥ 1).  None: S, the bound of a caller without the oracle's path
            (the earlier form K·S·(u₃₂·ρ + L·u); looser than the derived one from ~5 steps on).
    """
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(f"precision must be one of {sorted(UNIT_ROUNDOFF)}, got {precision!r}")
    layers = len(point.dims) - 1
    spread = point.steps if path_ratio is None else path_ratio
    return GATE_K * (point.steps * UNIT_ROUNDOFF["fp32"] * rho + layers * UNIT_ROUNDOFF[precision] * spread)


def _flat(params: Dict[str, torch.Tensor], names: Sequence[str], dtype=torch.float64) -> torch.Tensor:
    return torch.cat([params[n].reshape(params[n].shape[0], -1).to(dtype) for n in names], dim=1)


def _fail(message: str, rotations: int = 0) -> CheckResult:
    nan = float("nan")
    return CheckResult(False, nan, nan, nan, 0, message, rotations_checked=rotations)


def check_prepared(provider: Provider, prepared: Prepared, problem: Problem, *,
                   compare_to: Optional[Dict[str, torch.Tensor]] = None, k: int = 16) -> Tuple[CheckResult, Dict[str, torch.Tensor]]:
    """Run ``prepared`` on every input set the timing will cycle through and check it (before
    any timing).

    1. The gate: on every task of every input set, the update φ̃_i − φ is within
       ``update_error_bound`` of the float64 oracle's (``oracle_updates``).
    2. fp32 providers: the adapted parameters of ``check_subset``'s tasks of every input set
       within RTOL/ATOL of the fp32 reference backend (the project's equivalence standard).
    3. ``compare_to``: another provider's full output for input set 0 (e.g. backend torch's,
       already checked), compared at RTOL/ATOL on every task.

    Returns the result and the provider's parameters for input set 0 (CPU), which can serve as
    ``compare_to`` for the next provider.
    """
    names = [n for n, _ in problem.model.named_parameters()]
    T, R = problem.point.meta_batch, problem.rotations
    phi = {n: p.detach().to("cpu", torch.float64) for n, p in problem.model.named_parameters()}
    phi_norm = float(torch.cat([v.reshape(-1) for v in phi.values()]).norm())
    subset = check_subset(T, k)
    first: Dict[str, torch.Tensor] = {}
    worst = dict(margin=-1.0, err=float("nan"), bound=float("nan"))
    max_abs = 0.0
    for r in range(R):
        out = prepared.to_params(prepared.run(r))
        missing = [n for n in names if n not in out]
        if missing:
            return _fail(f"output lacks parameters {missing}", r), first
        # Copies, taken before the next run: an output may live in a buffer the next call reuses.
        params = {n: torch.as_tensor(out[n]).detach().to("cpu").clone() for n in names}
        for n, p in problem.model.named_parameters():
            if tuple(params[n].shape) != (T, *p.shape):
                return _fail(f"{n} has shape {tuple(params[n].shape)}, expected {(T, *p.shape)}", r), params
        if r == 0:
            first = params
        if not all(bool(torch.isfinite(params[n]).all()) for n in names):
            return _fail(f"non-finite values in the adapted parameters (input set {r})", r), first
        # 1. the gate on the update, every task
        oracle = oracle_updates(problem, r)
        mine = _flat({n: params[n].to(torch.float64) - phi[n] for n in names}, names)
        ref = _flat(oracle, names)
        ref_norm = ref.norm(dim=1)
        err = (mine - ref).norm(dim=1) / ref_norm
        bound = update_error_bound(problem.point, provider.precision, phi_norm / ref_norm,
                                   oracle.path / ref_norm)
        margin = err / bound
        i = int(torch.nan_to_num(margin, nan=float("inf")).argmax())
        if not float(margin[i]) <= worst["margin"]:
            worst = dict(margin=float(margin[i]), err=float(err[i]), bound=float(bound[i]))
        loose = (bound > GATE_CAP) | ~torch.isfinite(bound)
        if bool(loose.any()):
            j = int(loose.nonzero()[0])
            return _fail(f"cannot be verified at {problem.point}: task {j}'s {provider.precision} bound "
                         f"{float(bound[j]):.3g} exceeds {GATE_CAP} (a provider at 90 % of the learning rate "
                         f"could pass)", r), first
        bad = ~(err <= bound)
        if bool(bad.any()):
            where = [n for n in names if not float((params[n][i].double() - phi[n] - oracle[n][i]).norm())
                     <= float(bound[i] * ref_norm[i])]
            res = CheckResult(False, float("nan"), float("nan"), float("nan"), T,
                              f"its update φ̃ − φ differs from the float64 oracle's on {int(bad.sum())} of {T} "
                              f"tasks of input set {r} (task {i}: rel err {float(err[i]):.3g} > bound "
                              f"{float(bound[i]):.3g} for {provider.precision}, {problem.point.steps} steps; "
                              f"in {where})",
                              update_rel_err=float(err[i]), update_bound=float(bound[i]),
                              update_margin=float(margin[i]), rotations_checked=r + 1)
            return res, first
        # 2. fp32 providers: the fp32 reference on the subset, at the project's tolerance
        ref32 = oracle_params(problem, subset, torch.float32, r)
        sub = {n: params[n][subset] for n in names}
        max_abs = max(max_abs, float((_flat(sub, names) - _flat(ref32, names)).abs().max()))
        if provider.exact:
            off = [n for n in names if not torch.allclose(sub[n], ref32[n], rtol=RTOL, atol=ATOL)]
            if off:
                return _fail(f"differs from the fp32 reference beyond rtol {RTOL}/atol {ATOL} in {off} "
                             f"on input set {r} (max |diff| {max_abs:.3g})", r + 1), first
    # for the record: weight-level relative errors on input set 0's subset
    o = _flat({n: phi[n] + oracle_updates(problem, 0)[n][subset] for n in names}, names)
    a = _flat({n: first[n][subset] for n in names}, names)
    r32 = _flat(oracle_params(problem, subset, torch.float32, 0), names)
    rel64, ref_rel64 = float((a - o).norm() / o.norm()), float((r32 - o).norm() / o.norm())
    msg = ""
    if provider.exact and compare_to is not None:
        off = [n for n in names if not torch.allclose(first[n], compare_to[n].to(first[n].dtype), rtol=RTOL, atol=ATOL)]
        if off:
            worst_diff = max(float((first[n] - compare_to[n]).abs().max()) for n in off)
            msg = f"differs from the checked torch output on some of all {T} tasks in {off} (max |diff| {worst_diff:.3g})"
    return CheckResult(not msg, max_abs, rel64, ref_rel64, T, msg, update_rel_err=worst["err"],
                       update_bound=worst["bound"], update_margin=worst["margin"], rotations_checked=R), first


class Float64Draws:
    """A ``loop.Sampler``'s draws with their tasks in float64 (the same plans): the inputs of a
    float64 oracle run through ``Reptile.fit(sampler=...)`` (the fit checks of bench.gpu_check
    and bench.native_meta_batch)."""

    def __init__(self, draws):
        self.draws = draws

    def draw(self, first_iteration, m):
        from reptile_fast.tasks.base import TaskBatch

        tasks, plans = self.draws.draw(first_iteration, m)
        return TaskBatch.trusted(tasks.x.double(), tasks.y.double()), plans
