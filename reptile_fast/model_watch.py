"""What a trainer's steppers were built for: the model's modules and hooks, its parameters and
their dtypes and devices, by identity.  ``Reptile`` compares it before each ``meta_step``/``fit``
to follow a swapped layer (its programs are rebuilt) and to refuse changes it cannot follow."""
from __future__ import annotations

import contextlib

import torch.nn as nn

from .mlp_spec import global_module_hooks

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
    """``(modules with their train/eval mode and hooks, parameter ids, (dtype, device) per
    parameter)``: about 10 µs for an MLP."""
    modules, hooks = list(model.modules()), []
    for m in modules:
        hooks.append((id(m), m.training))  # a forward may branch on the mode: programs follow it
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            hooks.append((tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(m._backward_hooks),
                          tuple(m._backward_pre_hooks)))
    # torch's global module hooks run in every module's forward: a path built without them must
    # follow them (QA46: one registered after Reptile(...) was skipped by the fused MLP paths)
    hooks.append(global_module_hooks())
    params = [p for m in modules for p in m._parameters.values() if p is not None]
    return tuple(hooks), tuple(map(id, params)), tuple((p.dtype, p.device) for p in params)


def check_followable(built_for: tuple, now: tuple) -> None:
    """ValueError if the parameters were replaced (the outer update would not reach the new ones)
    or moved/cast (checks and programs are for the old ones); a swapped parameter-free layer or a
    hook is followable: the caller rebuilds what depends on it."""
    if now[1] != built_for[1]:
        raise ValueError("the model's parameters were replaced after Reptile(...) was built (a layer "
                         "with parameters swapped in, or a parameter reassigned): the outer update "
                         "would not reach them; build a new Reptile (and outer optimizer) for the "
                         "changed model")
    if now[2] != built_for[2]:
        was, new = next((a, b) for a, b in zip(built_for[2], now[2]) if a != b)
        raise ValueError(f"the model was moved or cast after Reptile(...) was built (from {was[0]} on {was[1]} "
                         f"to {new[0]} on {new[1]}): the trainer's checks and programs are for the old "
                         f"one; build a new Reptile for the moved model")
