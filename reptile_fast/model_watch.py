"""What a trainer's steppers were built for: the model's modules and hooks, its parameters and
their dtypes and devices, by identity.  ``Reptile`` compares it before each ``meta_step``/``fit``
to follow a swapped layer (its programs are rebuilt) and to refuse changes it cannot follow."""
from __future__ import annotations

import contextlib

import torch.nn as nn

from .mlp_spec import global_module_hooks, module_attributes

__all__ = ["structure_key", "check_followable", "modes_kept"]


@contextlib.contextmanager
def modes_kept(model: nn.Module):
    """Put back every submodule's own train/eval mode on exit (``model.train(m)`` would set them
    all alike: a train-mode model may hold a BatchNorm frozen in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def structure_key(model: nn.Module) -> tuple:
    """``(modules with their train/eval mode, hooks and plain attributes, parameter ids,
    (dtype, device) per parameter, parameter names, requires_grad per parameter)``: about 20 µs
    for an MLP."""
    named = list(model.named_modules())
    modules, hooks = [m for _, m in named], []
    for m in modules:
        hooks.append((id(m), m.training))  # a forward may branch on the mode: programs follow it
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            hooks.append((tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                          tuple(m._backward_pre_hooks)))
    # torch's global module hooks run in every module's forward: a path built without them must
    # follow them (QA46: one registered after Reptile(...) was skipped by the fused MLP paths)
    hooks.append(global_module_hooks())
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    # names: torch.nn.utils.prune renames "weight" to "weight_orig", the same Parameter object
    # (QA50: a KeyError in the outer update); requires_grad: a parameter frozen after construction
    # (QA50: backend reference left it, the batched backends trained it)
    names = tuple(f"{prefix}.{k}" if prefix else k for prefix, m in named
                  for k, p in m._parameters.items() if p is not None)
    # a forward's plain attributes (an activation held as ``self.act = torch.tanh``): programs
    # traced with the old ones are rebuilt (QA61)
    hooks.append(module_attributes(modules))
    return (tuple(hooks), tuple(map(id, params)), tuple((p.dtype, p.device) for p in params), names,
            tuple(p.requires_grad for p in params))


def check_followable(built_for: tuple, now: tuple) -> None:
    """ValueError if the parameters were replaced (the outer update would not reach the new ones)
    or moved/cast (checks and programs are for the old ones); a swapped parameter-free layer or a
    hook is followable: the caller rebuilds what depends on it."""
    if now[1] != built_for[1]:
        raise ValueError("the model's parameters were replaced after Reptile(...) was built (a layer "
                         "with parameters swapped in, or a parameter reassigned): the outer update "
                         "would not reach them; build a new Reptile (and outer optimizer) for the "
                         "changed model")
    if now[3] != built_for[3]:
        was, new = next((a, b) for a, b in zip(built_for[3], now[3]) if a != b)
        raise ValueError(f"the model's parameter {was!r} was renamed {new!r} after Reptile(...) was built "
                         f"(torch.nn.utils.prune, say): its checks, programs and outer update are for the "
                         f"old names; build a new Reptile for the changed model")
    if now[4] != built_for[4]:
        changed = [n for n, a, b in zip(now[3], built_for[4], now[4]) if a != b]
        raise ValueError(f"requires_grad of the model's parameters {changed} changed after Reptile(...) was "
                         f"built: Reptile meta-learns every parameter (the seed's loop would skip a frozen "
                         f"one while the batched backends train it, so a model with frozen parameters is "
                         f"refused); set requires_grad=True again, or remove them and build a new Reptile")
    if now[2] != built_for[2]:
        was, new = next((a, b) for a, b in zip(built_for[2], now[2]) if a != b)
        raise ValueError(f"the model was moved or cast after Reptile(...) was built (from {was[0]} on {was[1]} "
                         f"to {new[0]} on {new[1]}): the trainer's checks and programs are for the old "
                         f"one; build a new Reptile for the moved model")
