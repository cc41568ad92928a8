"""Recognise models that are a plain chain of ``nn.Linear`` layers and elementwise activations.

The fast paths (the batched-matmul torch path, the fused Triton kernel, the compiled drop-in) run
such models with hand-written forward/backward code; this module tells them whether a model is
one, and how it is laid out.  It traces the model with ``torch.fx``, so reptile_fast's ``MLP``, a
plain ``nn.Sequential`` and a user's module wrapping one (like the seed's ``MLP``) all qualify.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends.base import UnsupportedModelError
from .mlp_math import ACTIVATION_NAMES

__all__ = ["MLPSpec", "extract_mlp_spec", "cached_mlp_spec", "ACTIVATION_NAMES"]

_MODULE_ACTS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Identity: "identity"}
_FUNCTION_ACTS = {torch.tanh: "tanh", torch.relu: "relu", F.relu: "relu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid", F.tanh: "tanh"}
_METHOD_ACTS = {"tanh": "tanh", "relu": "relu", "sigmoid": "sigmoid"}


class _OwnThreadTracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, seen only by the thread that traces.  ``trace`` replaces
    ``nn.Module.__call__`` and ``__getattr__`` process-wide while it runs: a module called in
    another thread meanwhile (another trainer's training, or its own check) raised NameError
    "module is not installed as a submodule" or got this trace's proxies, and two traces in two
    threads put the methods back in the wrong order, leaving every later module call in the
    process broken (QA89).  Other threads' calls here go to the module as without a trace;
    ``_TRACE_LOCK`` keeps two traces from overlapping."""

    def __init__(self):
        super().__init__()
        self._thread = threading.get_ident()

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


#: one fx trace at a time in this process (see ``_OwnThreadTracer``)
_TRACE_LOCK = threading.RLock()


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, safe while other threads run modules or trace."""
    with _TRACE_LOCK:
        tracer = _OwnThreadTracer()
        graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


@dataclass(frozen=True)
class MLPSpec:
    """A chain ``x → Linear_0 → act_0 → Linear_1 → act_1 → … → Linear_{L-1} → act_{L-1}``.

    Attributes:
        dims: ``(in_features, hidden_1, …, out_features)``, length ``L + 1``.
        activations: ``L`` names from ``ACTIVATION_NAMES``; the last is usually "identity".
        weight_names, bias_names: the ``L`` parameter names, as in ``model.named_parameters()``.
    """

    dims: Tuple[int, ...]
    activations: Tuple[str, ...]
    weight_names: Tuple[str, ...]
    bias_names: Tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return len(self.dims) - 1

    @property
    def n_hidden(self) -> int:
        return self.n_layers - 1

    @property
    def n_params(self) -> int:
        return sum(self.dims[i] * self.dims[i + 1] + self.dims[i + 1] for i in range(self.n_layers))


def extract_mlp_spec(model: nn.Module) -> MLPSpec:
    """The model's ``MLPSpec``; raises ``UnsupportedModelError`` naming what does not fit."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_no_hooks(model)
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        # a Linear/activation chain has no state; and tracing runs the forward on the real
        # buffers (an in-place update would land in the model) — refuse before tracing, naming
        # the first layer that is not Linear/activation as the trace would
        for name, mod in model.named_modules():
            if not mod._modules and type(mod) is not nn.Linear and type(mod) not in _MODULE_ACTS:
                raise UnsupportedModelError(f"layer '{name}' ({type(mod).__name__}) is not supported; only "
                                            f"nn.Linear and {sorted(ACTIVATION_NAMES)} activations")
        raise UnsupportedModelError(f"{type(model).__name__} has buffers {buffers}; a plain Linear/activation "
                                    f"chain has none")
    if type(model) is nn.Linear:
        # fx keeps a root leaf module's own forward (F.linear on get_attr nodes), not a call_module
        if model.bias is None:
            raise UnsupportedModelError("nn.Linear has no bias; only Linear layers with bias are supported")
        return MLPSpec((model.in_features, model.out_features), ("identity",), ("weight",), ("bias",))
    try:
        gm = _trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not a plain chain"
        raise UnsupportedModelError(f"{type(model).__name__} cannot be traced as a Linear/activation chain: {exc}") from None
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"{type(model).__name__}.forward must take exactly one input tensor")
    current = placeholders[0]
    dims: list[int] = []
    acts: list[str] = []
    weights: list[str] = []
    biases: list[str] = []

    def set_activation(name: str, node) -> None:
        if not weights:
            raise UnsupportedModelError(f"activation '{node.target}' before the first nn.Linear is not supported")
        if acts[-1] != "identity" and name != "identity":
            raise UnsupportedModelError(f"two activations in a row ({acts[-1]}, {name}) are not supported")
        if name != "identity":
            acts[-1] = name

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedModelError(f"{type(model).__name__} does not return the chain's last output")
            break
        if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not current or node.kwargs and \
                node.op != "call_function":
            raise UnsupportedModelError(f"{type(model).__name__} is not a single chain of layers (at '{node.name}')")
        if node.op == "call_module":
            mod = modules[node.target]
            if type(mod) is nn.Linear:
                if mod.bias is None:
                    raise UnsupportedModelError(f"nn.Linear '{node.target}' has no bias; only Linear layers with bias are supported")
                if dims and dims[-1] != mod.in_features:
                    raise UnsupportedModelError(f"nn.Linear '{node.target}' expects {mod.in_features} inputs, gets {dims[-1]}")
                if not dims:
                    dims.append(mod.in_features)
                dims.append(mod.out_features)
                acts.append("identity")
                weights.append(f"{node.target}.weight")
                biases.append(f"{node.target}.bias")
            elif type(mod) in _MODULE_ACTS:
                set_activation(_MODULE_ACTS[type(mod)], node)
            else:
                raise UnsupportedModelError(f"layer '{node.target}' ({type(mod).__name__}) is not supported; only "
                                            f"nn.Linear and {sorted(ACTIVATION_NAMES)} activations")
        elif node.op == "call_function" and node.target in _FUNCTION_ACTS and len(node.args) == 1:
            set_activation(_FUNCTION_ACTS[node.target], node)
        elif node.op == "call_method" and node.target in _METHOD_ACTS and len(node.args) == 1:
            set_activation(_METHOD_ACTS[node.target], node)
        else:
            target = getattr(node.target, "__name__", node.target)
            raise UnsupportedModelError(f"operation '{target}' in {type(model).__name__}.forward is not supported; "
                                        f"only nn.Linear and {sorted(ACTIVATION_NAMES)} activations")
        current = node
    if not weights:
        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layer")
    used = set(weights) | set(biases)
    names = [n for n, _ in model.named_parameters()]
    if set(names) != used or len(used) != 2 * len(weights):
        extra = sorted(set(names) - used)
        raise UnsupportedModelError(f"{type(model).__name__} has parameters outside the Linear chain or shared "
                                    f"between layers: {extra or 'shared weights'}")
    spec = MLPSpec(tuple(dims), tuple(acts), tuple(weights), tuple(biases))
    _check_autograd_agrees(model, spec)
    return spec


def _check_autograd_agrees(model: nn.Module, spec: MLPSpec) -> None:
    """``UnsupportedModelError`` unless autograd through the model's own forward gives the chain's
    output and gradients.  ``torch.fx`` records the layers but not how autograd sees them: a
    ``with torch.no_grad():`` around a layer (a frozen trunk), a reentrant
    ``torch.utils.checkpoint``, a custom ``autograd.Function`` traced through; the hand-written
    paths then trained parameters that the reference (eager autograd) leaves alone, silently.
    One forward and backward on two random points, on copies of the parameters (once per model:
    ``cached_mlp_spec``)."""
    from .backends.base import functional_call
    from .mlp_math import ACTIVATIONS

    named = dict(model.named_parameters())
    first = named[spec.weight_names[0]]
    if not isinstance(first, torch.Tensor) or first.device.type == "meta":
        return  # no data to run on (the trainer refuses a meta model; tests fake parameters)
    names = list(named)
    # under a caller's inference_mode too (x made inside: an inference tensor cannot be saved for backward)
    with torch.inference_mode(False), torch.enable_grad():
        g = torch.Generator().manual_seed(0)
        x, r = (torch.randn(2, d, generator=g, dtype=torch.float64).to(first.device, first.dtype)
                for d in (spec.dims[0], spec.dims[-1]))
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in named.items()}
        try:
            out = functional_call(model, leaves, (x,))
        except Exception as exc:  # noqa: BLE001 - any failure means "not this chain"
            raise UnsupportedModelError(f"{type(model).__name__} traced as a Linear/activation chain, but its "
                                        f"forward failed on two points: {exc}") from None
        h = x
        for w, b, act in zip(spec.weight_names, spec.bias_names, spec.activations):
            h = ACTIVATIONS[act].forward(torch.nn.functional.linear(h, leaves[w], leaves[b]))
        if not isinstance(out, torch.Tensor) or out.shape != h.shape:
            raise UnsupportedModelError(f"{type(model).__name__} traced as a Linear/activation chain, but its forward "
                                        f"returns {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}, "
                                        f"not the chain's {tuple(h.shape)}")
        chain = torch.autograd.grad((h * r).sum(), [leaves[n] for n in names])
        own = (torch.autograd.grad((out * r).sum(), [leaves[n] for n in names], allow_unused=True)
               if out.requires_grad else [None] * len(names))
    rtol = 1e-2 if first.dtype in (torch.float16, torch.bfloat16) else 1e-4

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        # the same operations on both sides: equal up to rounding (values are compared where finite:
        # a model whose parameters overflow is refused elsewhere, by name)
        a, b = a.detach(), b.detach()
        if not bool(torch.isfinite(b).all()):
            return True
        if b.numel() == 0:  # a 0-wide layer's gradient (max() of an empty tensor raised: QA45)
            return a.shape == b.shape
        return torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))

    if not close(out, h):
        raise UnsupportedModelError(f"{type(model).__name__} traced as a Linear/activation chain, but its forward "
                                    f"computes something else")
    for n, a, b in zip(names, own, chain):
        if a is None or not close(a, b):
            raise UnsupportedModelError(
                f"{type(model).__name__} traced as a Linear/activation chain, but autograd gives parameter "
                f"'{n}' {'no gradient' if a is None else 'another gradient'} through its forward (torch.no_grad, "
                f"a reentrant torch.utils.checkpoint or a custom autograd.Function in forward?): the hand-written "
                f"MLP paths do not run it")


def global_module_hooks() -> tuple:
    """The keys of torch's global module hooks (``nn.modules.module.register_module_forward_hook``
    and its kin), which every module's forward and backward run: ``()`` when there are none."""
    from torch.nn.modules import module as M

    names = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
             "_global_backward_hooks")
    return tuple((n, tuple(getattr(M, n))) for n in names if getattr(M, n, None))


def _check_no_hooks(model: nn.Module, modules=None) -> None:
    # Hand-written forward/backward code would silently skip what a hook does; torch's global
    # module hooks too (registered after Reptile(...) they were skipped silently: QA46).
    registered = global_module_hooks()
    if registered:
        raise UnsupportedModelError(f"global module hooks are registered ({', '.join(n for n, _ in registered)} "
                                    f"in torch.nn.modules.module), which the fused MLP paths would not run")
    for m in model.modules() if modules is None else modules:
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None) \
                or getattr(m, "_backward_pre_hooks", None):
            name = next(n for n, x in model.named_modules() if x is m)
            raise UnsupportedModelError(f"module '{name or type(model).__name__}' has hooks, which the "
                                        f"fused MLP paths would not run")


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()

_SCALARS = (str, int, float, bool, type(None))


def module_attributes(modules) -> tuple:
    """The plain attributes of ``modules`` a forward may compute with, as hashable tokens: numbers
    and strings by value, functions (``self.act = torch.tanh``) and other callables by identity.
    A traced MLP holds them as constants (fx records ``self.act(x)`` as a call of torch.tanh), so
    a change must re-trace it (QA61: ``model.act = torch.relu`` after a first meta-step kept the
    fused paths on tanh while backend reference trained ReLU).  Tensors and other objects are
    left out: a forward that stores its output on ``self`` must not rebuild programs every call."""
    out = []
    for m in modules:
        for k, v in m.__dict__.items():
            if k[0] == "_" or k == "training":  # a Module's own state: ~20 entries, all "_"
                continue
            if isinstance(v, _SCALARS):
                out.append((id(m), k, type(v), v))
            elif callable(v) and not isinstance(v, (nn.Module, torch.Tensor)):
                out.append((id(m), k, id(v)))
    return tuple(out)


def cached_mlp_spec(model: nn.Module) -> MLPSpec:
    """``extract_mlp_spec`` cached per model (fx tracing costs about a millisecond).

    The cache is keyed on the identity and train/eval mode of every submodule, every parameter's
    name and shape and the modules' plain attributes (``module_attributes``), so a layer swapped
    in place (``model.network[1] = nn.ReLU()``), an activation function reassigned
    (``model.act = torch.relu``) or a forward branching on ``self.training`` after
    ``model.eval()`` is re-traced; hooks are checked on every call because they can be added at
    any time.
    """
    # the trace follows Python branches on ``self.training``: a mode switch is re-traced too.
    # Built from the modules' own dicts: named_parameters() made this key ~4x dearer, and the
    # torch backend asks for it every meta-step (a parameter slot is (its module, its name)).
    modules = list(model.modules())
    key = (tuple((id(m), m.training) for m in modules),
           tuple((id(m), n, tuple(p.shape)) for m in modules for n, p in m._parameters.items() if p is not None),
           module_attributes(modules))
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        _check_no_hooks(model, modules)
        if isinstance(hit[1], UnsupportedModelError):
            raise UnsupportedModelError(str(hit[1]))
        return hit[1]
    try:
        spec = extract_mlp_spec(model)
    except UnsupportedModelError as exc:
        if "has hooks" not in str(exc):
            _CACHE[model] = (key, exc)
        raise
    _CACHE[model] = (key, spec)
    return spec
