"""Argument checks shared by the API, the jobs and the drop-in: one wording for every message."""
from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Mapping
from numbers import Integral, Real

__all__ = ["check_int", "check_float", "check_device", "check_meta_model", "check_inner_options", "argparse_number",
           "check_loadable", "check_optimizer_storable"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``; TypeError/ValueError naming ``name`` otherwise.

    Any integral number is taken (``numpy.int64`` from ``np.arange``, say) and returned as an
    ``int``, so callers must use the returned value: a numpy integer stored in a checkpoint would
    not load under ``weights_only``.  Booleans are refused (``True`` is not a count).
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is True or False (numpy's bool too); a string such as "no" is truthy, so
    it would silently mean yes."""
    # numpy's bool is ``numpy.bool_`` (named "bool" since numpy 2), not a subclass of bool
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(name: str, value, choices) -> str:
    """``value`` as the plain str among ``choices`` it equals (numpy's str_ and a str-valued Enum
    compare equal to it, but a checkpoint cannot hold them); TypeError for a non-string, ValueError
    for another string, each naming ``name`` and the choices."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return choices[list(choices).index(value)]


def check_float(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); TypeError/ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_device(device, *, what: str = "device", allowed=None, job: str = "this", check_index: bool = True):
    """``device`` (a ``torch.device``, a name such as "cuda:1", or an index) as a ``torch.device``.

    TypeError for another kind of object; ValueError naming ``what`` for an unknown name, a type
    outside ``allowed`` (e.g. ``("cpu", "cuda")``: "``job`` runs on cpu or cuda"; None allows any)
    or a device this machine does not have (``check_index=False``: the type only, where the index is
    chosen later, as torchrun's LOCAL_RANK does).  The one check behind every device argument: torch's
    own errors come later and from deep inside (a RuntimeError listing every device type it knows).
    """
    import torch

    if not isinstance(device, torch.device):
        if isinstance(device, bool) or not isinstance(device, (str, Integral)):
            raise TypeError(f"{what} must be a torch.device or a name such as 'cpu' or 'cuda', got "
                            f"{type(device).__name__}")
        try:
            device = torch.device(device if isinstance(device, str) else int(device))
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{what}: unknown device {device!r} (a torch.device or a name such as 'cpu', "
                             f"'cuda' or 'cuda:1')") from None
    if allowed is not None and device.type not in allowed:
        raise ValueError(f"{what} {device}: {job} runs on {' or '.join(allowed)}")
    problem = device_unavailable(device if check_index else torch.device(device.type))
    if problem:
        raise ValueError(f"{what} {device}: {problem}")
    return device


def device_unavailable(device) -> str:
    """Why tensors cannot be made on ``device`` ("" if they can)."""
    import torch

    if device.type in ("cpu", "meta"):
        return ""
    if device.type == "cuda":  # asked each time: cheap, and tests may pretend either way
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s) visible"
        return ""
    return _probe(str(device))


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> str:
    """For other device types (mps, xpu, ...): make an empty tensor there, once per name (a
    sampler asks on every draw)."""
    import torch

    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as exc:
        return f"not available on this machine ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return ""


def check_arity(name: str, fn, call: str, n_args: int) -> None:
    """TypeError naming ``name`` when ``fn`` cannot be called with ``n_args`` positional arguments
    (else Python's own TypeError comes at the first call, deep in the loop, naming no argument).
    Callables whose signature Python cannot read (some builtins) are taken as they are."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*range(n_args))
    except TypeError as exc:
        raise TypeError(f"{name} is called as {call}, but {getattr(fn, '__qualname__', type(fn).__name__)}"
                        f"{sig} cannot take that: {exc}") from None


def check_materialised(param) -> None:
    """ValueError for a model on the meta device (parameters without data)."""
    if param.device.type == "meta":
        raise ValueError("model is on the meta device (parameters without data): materialise it first, "
                         "e.g. model.to_empty(device='cpu') and initialise its parameters")


def check_meta_model(model):
    """``(params, device, dtype)`` of a model Reptile can meta-learn; TypeError/ValueError naming
    what is wrong (not a module, no parameters, several devices or dtypes, frozen or non-finite
    parameters)."""
    import torch
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    scripted = next((f"submodule '{n}'" if n else "the model" for n, m in model.named_modules()
                     if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        # torch.func (functional_call, vmap) cannot swap a TorchScript module's tensors: the input check
        # failed with "'OrderedDictWrapper' object has no attribute 'update'" from inside torch
        raise TypeError(f"{scripted} is a TorchScript module (torch.jit.script / torch.jit.trace); Reptile needs "
                        f"the Python nn.Module: pass the module before scripting it")
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to meta-learn")
    devices = {p.device for p in params}
    dtypes = {p.dtype for p in params}
    if len(devices) != 1:
        raise ValueError(f"model parameters must all be on one device, found {sorted(map(str, devices))}")
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise TypeError(f"model parameters must share one floating-point dtype, found {dtypes}")
    check_materialised(params[0])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        # torch.optim skips them in the seed's loop while batched paths would train them:
        # rather than two answers, refuse.
        raise ValueError(f"model has frozen parameters (requires_grad=False): {frozen}; "
                         f"Reptile meta-learns every parameter — remove them or unfreeze them")
    views = _parameter_views(model, params)
    if views:
        # functional_call swaps the parameters, not a tensor computed from one when the model was
        # built; a task's deep copy would detach it (QA52): the tied use would train other maths
        raise ValueError(f"{views} hold a view of a parameter outside the parameters and buffers (e.g. "
                         f"self.w = self.layer.weight.t() in __init__): the inner loop's copies of the "
                         f"parameters would not reach it; compute it in forward (self.layer.weight.t())")
    sparse = [n or "the model" for n, m in model.named_modules()
              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    if sparse:
        # sparse gradients: vmap, torch.optim's Adam and the outer update's means cannot take them
        # (QA50: errors from inside torch); dense ones are the same values
        raise ValueError(f"{sparse}: an nn.Embedding/EmbeddingBag with sparse=True (sparse gradients) is not "
                         f"supported; build it with sparse=False (the same gradients, dense)")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"model parameter {name} contains NaN or infinite values")
    return params, params[0].device, params[0].dtype


@functools.lru_cache(maxsize=1)
def _module_internals() -> frozenset:
    import torch.nn as nn

    return frozenset(vars(nn.Module()))


def attribute_tensors(model):
    """``(name, tensor)`` for every tensor a module of ``model`` holds outside its parameters and
    buffers: plain attributes, and the values of the dicts, lists and tuples among them
    (``self.acts["h"] = h``, the forward-hook pattern), a few levels deep."""
    import torch

    def walk(name, value, depth):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            yield name, value
        elif depth < 4 and isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{name}[{k!r}]", v, depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                yield from walk(f"{name}[{k}]", v, depth + 1)

    internal = _module_internals()
    for prefix, m in model.named_modules():
        for key, value in vars(m).items():
            if key in internal:  # nn.Module's own bookkeeping (parameters, buffers, hooks)
                continue
            yield from walk(f"{prefix}.{key}" if prefix else key, value, 0)


def _parameter_views(model, params) -> list:
    """Names of the tensors a module holds outside its parameters and buffers that share storage
    with a parameter (a view such as ``self.enc.weight.view(...)`` kept as an attribute)."""
    def storage(t):
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, sparse)
            return None

    owned = {storage(p) for p in params} - {None, 0}
    return [name for name, t in attribute_tensors(model) if storage(t) in owned]


def _real_number(w) -> float:
    """``w`` as a float if it is a real number (Python, NumPy or a 0-dim real tensor), else TypeError."""
    import torch

    if isinstance(w, torch.Tensor):
        if w.dim() != 0 or w.dtype == torch.bool or w.is_complex():
            raise TypeError
        return float(w)
    if isinstance(w, bool) or not isinstance(w, Real):
        raise TypeError
    return float(w)


def check_inner_options(*, inner_steps: int, algorithm: str, inner_optimizer: str, inner_grad_weights,
                        adam_betas, algorithms, optimizers):
    """``(grad_weights tuple or None, betas tuple)`` after checking the inner loop's options."""
    if inner_optimizer not in optimizers:
        raise ValueError(f"inner_optimizer must be one of {optimizers}, got {inner_optimizer!r}")
    if algorithm not in algorithms:
        raise ValueError(f"algorithm must be one of {algorithms}, got {algorithm!r}")
    weights = None
    if inner_grad_weights is not None:
        if algorithm != "reptile":
            raise ValueError("inner_grad_weights defines its own outer direction; use it with algorithm='reptile'")
        try:
            if isinstance(inner_grad_weights, (str, bytes)):  # "12345" would read as five weights
                raise TypeError
            weights = tuple(_real_number(w) for w in inner_grad_weights)
        except (TypeError, ValueError):
            # (True read as 1.0, and a [k, 1] tensor's rows as numbers, before)
            raise TypeError("inner_grad_weights must be a sequence of numbers (real numbers, not bools; a "
                            "tensor must be 1-D)") from None
        if len(weights) != inner_steps:
            raise ValueError(f"inner_grad_weights must have inner_steps={inner_steps} entries, got {len(weights)}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError("inner_grad_weights must be finite")
    try:
        if isinstance(adam_betas, (str, bytes, Mapping)):  # "09" read as (0.0, 9.0), a dict as its keys (QA76)
            raise TypeError
        betas = tuple(_real_number(b) for b in adam_betas)
    except (TypeError, ValueError):
        raise TypeError("adam_betas must be a pair of numbers (real numbers, not bools or strings)") from None
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
    if inner_optimizer != "adam" and betas != (0.0, 0.999):
        # unused, yet recorded in hparams() and checkpoints as if they shaped the run (QA68)
        raise ValueError(f"adam_betas={betas} apply to inner_optimizer='adam'; with inner_optimizer="
                         f"{inner_optimizer!r} leave them at their default (0.0, 0.999)")
    return weights, betas


def argparse_number(kind: type, *, allow_zero: bool):
    """An argparse ``type=`` converter for finite ints/floats > 0 (or >= 0 with ``allow_zero``),
    shared by the CLI's jobs."""
    import argparse

    what = ("non-negative" if allow_zero else "positive") + (" integer" if kind is int else " number")

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"expected a finite {what}, got {text}")
        return value

    return convert


_SAFE_SCALARS = (str, int, float, bool, type(None))


def check_loadable(obj, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` if ``obj`` holds something a checkpoint cannot (what
    ``torch.load(weights_only=True)`` would refuse): only tensors, dicts and lists of them, str,
    int, float, bool and None.  Exact types: subclasses (torch's TorchVersion is a str, numpy's
    float64 a float) are globals that weights_only refuses."""
    from collections import OrderedDict

    import torch

    if isinstance(obj, torch.Tensor) or type(obj) in _SAFE_SCALARS:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(k).__name__}")
            check_loadable(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_loadable(v, f"{where}[{i}]")
        return
    hint = ("" if type(obj).__module__ != "numpy" else
            " (a numpy scalar: convert it with str())" if isinstance(obj, str) else
            " (a numpy scalar: convert it with float() or int())")
    raise TypeError(f"{where} is a {type(obj).__name__}{hint}; a checkpoint holds only tensors, dicts, lists, "
                    f"strings, numbers and None (so that it loads with weights_only=True)")


def check_optimizer_storable(optimizer) -> None:
    """``check_loadable`` on an outer optimizer's hyper-parameters (its param groups without the
    parameters), for a run that writes checkpoints: ``Adam(params, lr=np.float32(1e-3))`` trains,
    but its state could not be saved, and that was found at the first checkpoint, after the
    meta-steps up to it (at the end, without ``checkpoint_every``)."""
    if optimizer is not None:
        check_loadable([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
                       "outer_optimizer.param_groups")


#: the hooks ``loop.TrainingLoop`` calls on every callback (``loop.Callback`` defines them all)
CALLBACK_HOOKS = ("on_start", "wants_read", "on_read", "on_chunk_end", "on_end", "on_abort")


def check_fit_args(task_distribution, iterations, *, meta_batch_size, generator, callback, checkpoint_dir,
                   checkpoint_every, checkpoint_extra, log_every, sampler, draw_chunks, reducer=None,
                   callbacks=(), progress=True, handle_signals=True) -> None:
    """TypeError/ValueError naming the first bad argument of ``Reptile.fit`` (paths are checked
    by ``checkpoint.prepare_checkpoint_directory``)."""
    import torch

    # the extension points: a wrong object failed deep in the loop (AttributeError, "'str' object is
    # not callable") after the checkpoint had been restored
    if sampler is not None and not callable(getattr(sampler, "draw", None)):
        raise TypeError(f"sampler must have a draw(first_iteration, m) method (a reptile_fast.loop.Sampler), "
                        f"got {type(sampler).__name__}")
    if reducer is not None and not callable(reducer):
        raise TypeError(f"reducer must be callable as reducer(deltas, losses) -> (mean_deltas, mean_loss), got "
                        f"{type(reducer).__name__}")
    if isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of reptile_fast.loop.Callback objects, got {type(callbacks).__name__}")
    for i, cb in enumerate(callbacks):
        missing = [h for h in CALLBACK_HOOKS if not callable(getattr(cb, h, None))]
        if missing:
            raise TypeError(f"callbacks[{i}] must be a reptile_fast.loop.Callback (subclass it), got "
                            f"{type(cb).__name__} without {', '.join(missing)}")

    if sampler is None and (not hasattr(task_distribution, "sample") or not callable(task_distribution.sample)):
        raise TypeError("task_distribution must have a sample(n_tasks, *, generator, device) method")
    if sampler is None and isinstance(task_distribution, type) \
            and inspect.isfunction(inspect.getattr_static(task_distribution, "sample", None)):
        # fit(Sine, ...): "Sine.sample() missing 1 required positional argument" named no argument (QA46)
        raise TypeError(f"task_distribution must be an instance, got the class {task_distribution.__name__} "
                        f"(pass {task_distribution.__name__}(...))")
    check_int("iterations", iterations)
    check_int("meta_batch_size", meta_batch_size)
    if log_every is not None:
        check_int("log_every", log_every)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if callback is not None:
        check_arity("callback", callback, "callback(iteration, metrics)", 2)
    if checkpoint_every is not None:
        check_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir: where should checkpoints go?")
    check_bool("draw_chunks", draw_chunks)
    check_bool("progress", progress)
    check_bool("handle_signals", handle_signals)
    if draw_chunks and sampler is not None:
        raise ValueError("draw_chunks is how fit's own sampler draws; a given sampler draws as it likes")
    if checkpoint_extra is not None and not isinstance(checkpoint_extra, Mapping):
        raise TypeError(f"checkpoint_extra must be a dict, got {type(checkpoint_extra).__name__}")
    if checkpoint_extra is not None and checkpoint_dir is not None:
        # found at the first checkpoint before: after checkpoint_every meta-steps, which were lost
        check_loadable({str(k): v for k, v in checkpoint_extra.items()}, "checkpoint_extra")
        check_distinct_keys(checkpoint_extra, "checkpoint_extra")


def check_distinct_keys(value: Mapping, what: str) -> None:
    """``ValueError`` when keys of ``value`` are one key as strings (``{1: "a", "1": "b"}``): a
    checkpoint stores ``str(key)``, so ``save_checkpoint`` refuses them (``fit`` and
    ``distributed_fit`` before training: QA88, QA90)."""
    if len({str(k) for k in value}) != len(value):
        raise ValueError(f"{what} has keys that are one key as strings (a checkpoint stores "
                         f"str(key)): {sorted(map(repr, value))[:6]}")


_OOM_WORDS = ("can't allocate memory", "out of memory", "cannot allocate memory")


def out_of_memory_message(exc: BaseException, hint: str) -> "str | None":
    """A one-line message for an allocation failure anywhere in ``exc``'s chain (a ``MemoryError``,
    torch's ``OutOfMemoryError`` or an allocator's RuntimeError, also wrapped by the compiled
    path's fallback); None for any other error.  ``hint`` says what to lower."""
    seen = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, MemoryError) or any(w in text.lower() for w in _OOM_WORDS):
            size = re.search(r"[Tt]ried to allocate ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", text)  # CUDA: "Tried"
            return f"out of memory{f' (tried to allocate {size.group(1)})' if size else ''}: {hint}"
        seen = seen.__cause__ or seen.__context__
    return None


def out_of_memory_or_raise(exc: BaseException, hint: str) -> str:
    """``out_of_memory_message(exc, hint)``; re-raises ``exc`` when it is not an allocation failure."""
    message = out_of_memory_message(exc, hint)
    if message is None:
        raise exc
    return message


def as_flags(message: str, names, keep=()) -> str:
    """``message`` (a library error) in a command line's words: each setting of ``names`` that the
    message names as the library spells it, ``inner_batch_size`` or ``iterations=100``, becomes the
    flag that sets it, ``--inner-batch-size`` / ``--iterations 100``.  Plain words without an
    underscore ("shots", "seed") are changed only in the ``name=value`` form, as they also occur
    in ordinary prose, and as the subject that opens the message (``check_int``'s "ways must be
    >= 2, got 1" → "--ways must be >= 2, got 1").  Paths are left as they are: the strings of ``keep`` (the command's own
    paths, e.g. its ``--out``) and every word with a ``/`` or ``\\`` in it (a folder named
    ``seed=3`` or ``inner_lr`` is not a setting)."""
    import re

    # whole words only: a path "y" must not protect the "y" inside "ways"
    protected = [rf"(?<!\w){re.escape(str(k))}(?!\w)"
                 for k in sorted({str(k) for k in keep if k}, key=len, reverse=True)]
    parts = re.split("(" + "|".join([*protected, r"[^\s'\"]*[/\\][^\s'\"]*"]) + ")", message)
    for i in range(0, len(parts), 2):  # (odd indices: the protected strings)
        part = parts[i]
        for name in sorted(names, key=len, reverse=True):  # (outer_lr_final before outer_lr)
            flag = "--" + name.replace("_", "-")
            part = re.sub(rf"(?<![\w-]){re.escape(name)}=(?=\S)", flag + " ", part)
            if "_" in name:
                part = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w=])", flag, part)
            elif i == 0:
                part = re.sub(rf"^{re.escape(name)}(?= must\b)", flag, part)
        parts[i] = part
    return "".join(parts)
