"""A trainer's state as plain data: hyper-parameters, ``state_dict`` and its checked restore.

``Reptile.hparams`` / ``state_dict`` / ``load_state_dict`` delegate here; checkpoints
(``reptile_fast.checkpoint``) store and restore this state with the RNGs.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import math
import re
import types
import warnings
from typing import Any, Dict, Mapping, Optional

import torch

from .losses import loss_name

__all__ = ["trainer_hparams", "trainer_state_dict", "load_trainer_state", "optimizer_state_problem"]


def trainer_hparams(trainer) -> Dict[str, Any]:
    """A ``Reptile``'s hyper-parameters as plain values (stored in checkpoints)."""
    loss = loss_name(trainer.loss)
    if loss is None:
        loss = f"callable:{getattr(trainer.loss, '__qualname__', type(trainer.loss).__name__)}"
    c = trainer.config
    return {
        "inner_lr": trainer.inner_lr, "inner_steps": trainer.inner_steps,
        "inner_batch_size": trainer.inner_batch_size, "minibatches": trainer.minibatches,
        "adam_state": getattr(trainer, "adam_state", "fresh"),
        "outer_lr": trainer.outer_lr,
        "outer_lr_final": trainer.outer_lr_final, "loss": loss, "inner_optimizer": c.optimizer,
        "algorithm": c.algorithm,
        "inner_grad_weights": None if c.grad_weights is None else list(c.grad_weights),
        "adam_betas": list(c.adam_betas), "backend": trainer.backend_name,
        "outer_optimizer": None if trainer.outer_optimizer is None else type(trainer.outer_optimizer).__name__,
        "model": type(trainer.model).__name__,
        "modules": model_modules(trainer.model),
        "module_settings": model_module_settings(trainer.model),
        "loss_settings": loss_settings(trainer.loss),
    }


def _plain(value, depth: int = 0) -> str:
    """A deterministic description of a loss setting: the same on every process and run (no
    memory address), so ranks and resumes compare what it computes with."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        if t.numel() <= 16:
            return f"tensor({t.tolist()!r}, dtype={t.dtype})"
        digest = hashlib.sha1(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype}, sha1={digest})"
    if isinstance(value, (tuple, list)) and depth < 2:
        return "(" + ", ".join(_plain(v, depth + 1) for v in value) + ")"
    if isinstance(value, functools.partial) and depth < 2:
        parts = [_plain(value.func, depth + 1), *(_plain(v, depth + 1) for v in value.args),
                 *(f"{k}={_plain(v, depth + 1)}" for k, v in sorted(value.keywords.items()))]
        return f"partial({', '.join(parts)})"
    name = getattr(value, "__qualname__", None)
    if isinstance(name, str) and callable(value):
        name = f"{getattr(value, '__module__', '?')}.{name}"
        code = getattr(value, "__code__", None)
        if "<" in name and isinstance(code, types.CodeType):
            # a lambda or a nested function: its name does not tell two apart, its code does (a
            # module-level function's name does: not its code, which a library upgrade changes)
            name += f"#{_code_digest(code)[:12]}"
        if isinstance(value, types.MethodType):
            name += f" of {type(value.__self__).__module__}.{type(value.__self__).__qualname__}"
        return name
    return f"<{type(value).__qualname__}>"


def _code_digest(code: types.CodeType) -> str:
    """A digest of what ``code`` computes, the same in every process: its bytecode, names and
    constants, nested code objects by their own digest (their repr holds a memory address and the
    file's path and line: ranks refused a nested function's loss as "different settings", QA73)
    and frozensets sorted (their order follows the process's string hashing)."""
    def const(c) -> str:
        if isinstance(c, types.CodeType):
            return "code:" + _code_digest(c)
        if isinstance(c, frozenset):
            return "frozenset(" + ",".join(sorted(map(const, c))) + ")"
        if isinstance(c, tuple):
            return "(" + ",".join(map(const, c)) + ")"
        return repr(c)
    parts = [code.co_code, repr(code.co_names).encode(), *(const(c).encode() for c in code.co_consts)]
    return hashlib.sha1(b"\x00".join(parts)).hexdigest()


def loss_settings(loss) -> Optional[str]:
    """What a custom inner loss computes with, beyond its name (None for a built-in loss): an
    ``nn.Module`` loss's plain attributes and buffers (a Huber loss's δ, a cross-entropy's label
    smoothing, class weights, ignored index and reduction), a ``functools.partial``'s function and
    arguments, a function's code.  ``"loss"`` names only the class or function, so a resume with
    ``HuberLoss(delta=5)`` after ``HuberLoss(delta=0.5)`` (or another lambda) warned of nothing
    (QA62).  A separate key: checkpoints written before it existed resume without a difference
    being reported."""
    if loss_name(loss) is not None:
        return None
    scripted = _scripted_settings(loss)
    if scripted is not None:
        return scripted
    if isinstance(loss, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)) \
            or not hasattr(loss, "__dict__"):
        return _plain(loss)
    # an object (an nn.Module loss, an instance of a class with __call__): its plain attributes
    settings = [f"{k}={_plain(v)}" for k, v in sorted(vars(loss).items()) if not k.startswith("_") and k != "training"]
    if isinstance(loss, torch.nn.Module):
        settings += [f"{k}={_plain(v)}" for k, v in loss.named_buffers()]
        settings += [f"{k}={_plain(v)}" for k, v in loss.named_parameters()]
    return f"{type(loss).__module__}.{type(loss).__qualname__}({', '.join(settings)})"


def _scripted_settings(loss) -> Optional[str]:
    """A TorchScript loss's settings, or None for any other loss: scripting folds a module's
    constants (a Huber loss's δ) into its code and keeps its attributes out of ``vars()``, so
    ``HuberLoss(delta=5)`` and ``HuberLoss(delta=0.5)`` scripted read alike (QA73).  Described by
    each (sub)module's forward code, the plain attributes that code reads, and its tensors; the same
    in every process (TorchScript's per-process class-name mangling is left out)."""
    jit = torch.jit
    if isinstance(loss, jit.ScriptFunction):
        return f"torch.jit.ScriptFunction {loss.qualified_name}(code sha1={_script_code_digest(loss.code)})"
    if not isinstance(loss, jit.ScriptModule):
        return None
    parts = []
    for name, module in loss.named_modules():
        codes = _script_method_codes(module)
        if not codes:  # a submodule without compiled methods
            continue
        read = set()
        for code in codes:
            reader = re.match(r"\s*def \w+\(\s*(\w+)", code)
            if reader:
                read |= set(re.findall(rf"\b{reader.group(1)}\.(\w+)", code))
        # (its own buffers and parameters are listed below; a plain tensor attribute is not: QA90)
        own = {k for k, _ in module.named_buffers(recurse=False)} | \
            {k for k, _ in module.named_parameters(recurse=False)}
        values = [f"{a}={_plain(getattr(module, a))}" for a in sorted(read)
                  if a not in own and not isinstance(getattr(module, a, None), torch.nn.Module)]
        parts.append(f"{name or '.'}:{_script_code_digest(''.join(codes))}({', '.join(values)})")
    parts += [f"{k}={_plain(v)}" for k, v in loss.named_buffers()]
    parts += [f"{k}={_plain(v)}" for k, v in loss.named_parameters()]
    return f"torch.jit.ScriptModule {loss.original_name}({'; '.join(parts)})"


def _script_method_codes(module) -> list:
    """The code of every compiled method of a ScriptModule, ``forward`` first: a forward that calls
    a helper method (``self._loss(a, b)``) shows only the call, the constants and attributes the
    loss computes with are in the helper's code (QA90)."""
    try:
        names = sorted(module._c._method_names(), key=lambda n: (n != "forward", n))
        return [module._c._get_method(n).code for n in names]
    except (AttributeError, RuntimeError):
        return []


def _script_code_digest(code: str) -> str:
    # TorchScript renames a class compiled again in one process (``___torch_mangle_3``)
    return hashlib.sha1(re.sub(r"___torch_mangle_\d+\.", "", code).encode()).hexdigest()[:16]


def model_modules(model) -> list:
    """``["name:Class", ...]`` for every submodule (the root is ``""``): the architecture beyond the
    parameters' names and shapes, e.g. an MLP's activation, which a resume into a model with the
    same parameters but another activation would otherwise change without a word."""
    return [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]


def model_module_settings(model) -> list:
    """``["name:settings", ...]`` for every submodule whose ``extra_repr()`` says something (a
    BatchNorm's ε and momentum, a LeakyReLU's slope, a Dropout's p): settings that are no parameter,
    so the ranks of a distributed run compared none of them (QA53: BatchNorm ε 1e-5 on one rank,
    1e-3 on another trained without a word).  A separate key: checkpoints written before it existed
    resume without a difference being reported."""
    out = []
    for name, m in model.named_modules():
        try:
            settings = m.extra_repr()
        except Exception:  # noqa: BLE001 - a user module's extra_repr failing must not stop a checkpoint
            settings = f"<extra_repr failed in {type(m).__name__}>"
        if settings:
            out.append(f"{name}:{settings}")
    return out


def _config_difference(key: str, saved, now) -> str:
    """One line for a hyper-parameter that differs; for the module list, the first module that does."""
    if key in ("modules", "module_settings") and isinstance(saved, list):
        n = min(len(saved), len(now))
        k = next((i for i in range(n) if saved[i] != now[i]), n)
        return f"{key}: saved {saved[k] if k < len(saved) else None!r}, now {now[k] if k < len(now) else None!r}"
    return f"{key}: saved {saved!r}, now {now!r}"


def trainer_state_dict(trainer) -> Dict[str, Any]:
    """Everything of the trainer a resumed run needs (the RNGs are the checkpoint's job).

    Returns ``{"model": model.state_dict() (parameters and buffers), "outer_optimizer":
    its state_dict or None, "iteration", "total_iterations", "config": hparams(), "meta_batch_size":
    the last ``fit``'s, or None, "draw_chunk": the chunk size its ``draw_chunks`` draws depended on,
    or None, "inner_optimizer": the carried inner Adam's state_dict (``adam_state="carried"``) or
    None}``.  Like
    ``nn.Module.state_dict`` the tensors are references: save or deep-copy to snapshot.
    """
    return {
        "model": trainer.model.state_dict(),
        "outer_optimizer": None if trainer.outer_optimizer is None else trainer.outer_optimizer.state_dict(),
        "iteration": trainer.iteration,
        "total_iterations": trainer.total_iterations,
        "config": trainer_hparams(trainer),
        "meta_batch_size": getattr(trainer, "meta_batch_size", None),
        "draw_chunk": getattr(trainer, "draw_chunk", None),
        # adam_state="carried": the inner Adam's state the next task starts from
        "inner_optimizer": getattr(trainer, "carried_adam_state", None),
    }


def carried_state_problem(model, saved) -> Optional[str]:
    """What makes ``saved`` unfit as the carried inner Adam state of ``model`` (None: nothing):
    a ``torch.optim.Adam`` ``state_dict()`` over the model's parameters, in their order, with
    finite moments of each parameter's shape."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) \
            or not isinstance(saved.get("param_groups"), (list, tuple)):
        return "it is not a torch.optim.Adam state_dict() (a dict with 'state' and 'param_groups')"
    params = [p for _, p in model.named_parameters()]
    ids = [i for g in saved["param_groups"] if isinstance(g, Mapping) for i in g.get("params", ())]
    if len(ids) != len(params):
        return f"it holds the state of {len(ids)} parameters, the model has {len(params)}"
    for position, (key, p) in enumerate(zip(ids, params)):
        entries = saved["state"].get(key)
        if entries is None:  # (Adam keeps no state for a parameter no loss has reached)
            continue
        if not isinstance(entries, Mapping):
            return f"the state of parameter {position} is a {type(entries).__name__}, not a dict"
        step = entries.get("step")
        if isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point():
            step = float(step)
        elif isinstance(step, torch.Tensor) and step.numel() == 1 and not step.dtype == torch.bool:
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
            return (f"its 'step' of parameter {position} is {entries.get('step')!r}: Adam's step count must be "
                    f"a finite number >= 0")
        for name in ("exp_avg", "exp_avg_sq"):
            v = entries.get(name)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape) or not v.is_floating_point():
                return (f"its {name!r} of parameter {position} is not a floating-point tensor of the parameter's "
                        f"shape {tuple(p.shape)}")
            if not bool(torch.isfinite(v).all()):
                return f"its {name!r} of parameter {position} is not finite"
    return None


def optimizer_state_problem(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> Optional[str]:
    """What makes ``saved`` (an ``optimizer.state_dict()``) unfit for ``optimizer``'s parameters,
    or None.  torch's ``load_state_dict`` pairs the saved per-parameter states with the
    parameters by position and checks only the counts: a state of another shape (parameters
    listed in another order) loaded without a word, and the first outer step failed inside torch
    ("output with shape [1] doesn't match the broadcast shape [8, 1]") after the trainer had been
    restored; a NaN/inf moment made every meta-step non-finite.

    For ``torch.optim``'s own optimizers (another optimizer's state may hold other shapes, e.g. a
    preconditioner matrix, or use inf): a per-parameter state tensor with dimensions must have the
    parameter's number of dimensions, each of its sizes the parameter's or 1 (Adafactor keeps
    ``[rows, 1]`` / ``[1, cols]`` factors), and floating-point ones must be finite.
    """
    if not type(optimizer).__module__.startswith("torch.optim"):
        return None
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping) \
            or not all(isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        return None  # malformed at the top: torch's own load_state_dict names it
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(ids) != len(params):
        return None  # torch's load_state_dict refuses other counts, naming them
    for position, (key, p) in enumerate(zip(ids, params)):
        entries = state.get(key)
        if not isinstance(entries, Mapping):
            continue
        for name, v in entries.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                continue
            if v.dim() != p.dim() or any(s not in (1, n) for s, n in zip(v.shape, p.shape)):
                return (f"the state {name!r} of parameter {position} (in the optimizer's order) has shape "
                        f"{tuple(v.shape)}, the parameter's is {tuple(p.shape)}: build the outer optimizer over "
                        f"the model's parameters in the same order as the run that wrote it")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"the state {name!r} of parameter {position} (in the optimizer's order) holds NaN or inf values"
    return None


def load_trainer_state(trainer, state: Mapping[str, Any]) -> None:
    """Restore ``state_dict()``'s output.  Checks everything before changing anything.

    Raises ``ValueError`` naming the entry for a model with other keys, shapes or dtypes,
    non-finite parameters, or an outer optimizer present on one side only.  Hyper-parameters
    that differ from this trainer's give a warning (the run then differs from the original).
    """
    if getattr(trainer, "_fitting", False):
        # fit's loop counts its own meta-steps and anneals over its own total: φ rewound under it
        # was saved with the loop's count (and total_iterations, refused mid-fit, after the rest)
        raise ValueError("load_state_dict cannot run while fit runs (its loop keeps its own meta-step count "
                         "and schedule); load between fits, or continue a run with fit(..., resume_from=...)")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from Reptile.state_dict(), got {type(state).__name__}")
    missing = [k for k in ("model", "outer_optimizer", "iteration", "total_iterations") if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing}: not a Reptile.state_dict()")
    model_state = state["model"]
    if not isinstance(model_state, Mapping):
        raise TypeError(f"state['model'] must be a dict of tensors, got {type(model_state).__name__}")
    own = trainer.model.state_dict()
    absent = sorted(set(own) - set(model_state))
    unexpected = sorted(set(model_state) - set(own))
    if absent or unexpected:
        raise ValueError(f"the saved model does not match this model: missing {absent}, unexpected {unexpected}")
    for k, v in model_state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"saved model entry {k} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"saved model entry {k} has shape {tuple(v.shape)}, this model's is {tuple(own[k].shape)}")
        if v.dtype != own[k].dtype:
            raise ValueError(f"saved model entry {k} has dtype {v.dtype}, this model's is {own[k].dtype}")
        if v.device.type == "meta":  # reading it failed inside torch ("item() cannot be called on meta tensors")
            raise ValueError(f"saved model entry {k} is on the meta device (a tensor without data)")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"saved model entry {k} contains NaN or infinite values")
    opt_state = state["outer_optimizer"]
    if (opt_state is None) != (trainer.outer_optimizer is None):
        raise ValueError("the saved state has " + ("no " if opt_state is None else "an ") +
                         "outer_optimizer state but this trainer has " +
                         ("one" if trainer.outer_optimizer is not None else "none") +
                         ": build the trainer with the same outer_optimizer")
    saved_config = state.get("config")
    if saved_config is not None and not isinstance(saved_config, Mapping):
        raise TypeError(f"state['config'] must be a dict (Reptile.hparams()) or absent, got "
                        f"{type(saved_config).__name__}")
    saved_class = saved_config.get("outer_optimizer") if isinstance(saved_config, Mapping) else None
    mine_class = None if trainer.outer_optimizer is None else type(trainer.outer_optimizer).__name__
    if opt_state is not None and isinstance(saved_class, str) and saved_class != mine_class:
        # torch's load_state_dict takes another class's state without a word (it checks only the
        # parameter counts); the first step then failed deep inside (SGD: KeyError 'momentum'), or
        # ran with the other class's hyper-parameters (Adam's state in AdamW)
        raise ValueError(f"the saved outer_optimizer state is {saved_class} state, but this trainer's outer "
                         f"optimizer is {mine_class}: build the trainer with the checkpoint's optimizer class "
                         f"({saved_class})")
    iteration = state["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"state['iteration'] must be an int >= 0, got {iteration!r}")
    total = state["total_iterations"]
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ValueError(f"state['total_iterations'] must be None or an int >= 1, got {total!r}")
    if isinstance(saved_config, Mapping):
        mine = trainer_hparams(trainer)
        # checkpoints written before minibatches / adam_state existed drew every plan "fresh" and
        # gave every task a fresh Adam
        saved_config = {"minibatches": "fresh", "adam_state": "fresh", **saved_config}
        diffs = [_config_difference(k, saved_config[k], mine[k]) for k in sorted(mine)
                 if k in saved_config and k != "backend" and saved_config[k] != mine[k]]
        if diffs:
            warnings.warn("resuming with different hyper-parameters (" + "; ".join(diffs) +
                          "): the run will not match an uninterrupted one", stacklevel=2)
    carried = getattr(trainer, "_carried", None)
    inner_state = state.get("inner_optimizer")
    if carried is not None and inner_state is not None:
        problem = carried_state_problem(trainer.model, inner_state)
        if problem is not None:
            raise ValueError(f"state['inner_optimizer'] (the carried inner Adam state) does not fit this model: "
                             f"{problem}")
    if opt_state is not None:
        problem = optimizer_state_problem(trainer.outer_optimizer, opt_state)
        if problem is not None:
            raise ValueError(f"the saved outer_optimizer state does not fit this optimizer's parameters: {problem}")
        backup = trainer.outer_optimizer.state_dict()
        try:
            trainer.outer_optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            trainer.outer_optimizer.load_state_dict(backup)
            raise ValueError(f"the saved outer_optimizer state does not fit this optimizer: {exc}") from None
    with torch.no_grad():
        trainer.model.load_state_dict(model_state, strict=True)
    if carried is not None:
        # (a copy: the caller's dict stays theirs; None where the run had none, a "fresh" run's)
        carried.state = None if inner_state is None else copy.deepcopy(dict(inner_state))
    trainer.iteration = iteration
    trainer.total_iterations = total
