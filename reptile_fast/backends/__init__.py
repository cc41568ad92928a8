"""Inner-loop backends behind one protocol, and how ``backend="auto"`` picks one.

Each backend lives in its own module and is imported only when asked for (no import-time side
effects, and Triton is never imported on a machine that does not use it).
"""
from __future__ import annotations

import importlib

import torch

from .base import Backend, InnerConfig, InnerResult, UnsupportedModelError

__all__ = ["Backend", "InnerConfig", "InnerResult", "UnsupportedModelError", "BACKENDS",
           "get_backend", "resolve_backend"]

#: backend name -> "module:Class"
BACKENDS = {
    "reference": "reptile_fast.backends.reference:ReferenceBackend",
    "torch": "reptile_fast.backends.torch_func:TorchBackend",
    "triton": "reptile_fast.backends.triton:TritonBackend",
}

#: tried in this order by ``backend="auto"``; the first that supports the model wins.
AUTO_ORDER = ("triton", "torch", "reference")


def get_backend(name: str, **options) -> Backend:
    """A fresh instance of the backend called ``name``, constructed with ``options``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "compiled":
        raise ValueError("backend 'compiled' is the trainer's whole-meta-step program, not an inner-loop "
                         "backend: pass it to Reptile(..., backend='compiled')")
    if name not in BACKENDS:
        # the names Reptile(backend=...) takes ("compiled" was missing from this list, so Reptile's
        # own error hid one of its choices)
        raise ValueError(f"unknown backend {name!r}; choose one of {['auto', 'compiled', *sorted(BACKENDS)]}")
    module, cls = BACKENDS[name].split(":")
    backend_cls = getattr(importlib.import_module(module), cls)
    import inspect

    params = inspect.signature(backend_cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in options if k not in params)
        if unknown:
            raise TypeError(f"backend {name!r} does not accept options {unknown}; it takes "
                            f"{sorted(params) or 'none'}")
    try:
        return backend_cls(**options)
    except TypeError as exc:
        # a known option with a bad value: the constructor's own message names it
        raise TypeError(f"backend {name!r}, options {sorted(options)}: {exc}") from None


def resolve_backend(name: str, model, device: torch.device, config: InnerConfig,
                    options: dict | None = None, batch_size: int | None = None) -> Backend:
    """The backend for ``name``; for "auto", the fastest registered one that supports the model.

    A named backend that cannot run the model raises ``UnsupportedModelError`` saying why.
    ``options`` go to the named backend's constructor (not allowed with "auto").  With
    ``batch_size``, the inner minibatch size is checked too.
    """
    if name != "auto":
        backend = get_backend(name, **(options or {}))
        backend.check_supported(model, device, config)
        if batch_size is not None:
            backend.check_batch_size(model, batch_size)
        return backend
    if options:
        raise ValueError("backend_options need a named backend, not 'auto'")
    for candidate in AUTO_ORDER:
        if candidate not in BACKENDS:
            continue
        try:
            backend = get_backend(candidate)
            if not backend.auto_candidate(device):
                continue
            backend.check_supported(model, device, config)
            if batch_size is not None:
                backend.check_batch_size(model, batch_size)
        except (UnsupportedModelError, ImportError):
            continue
        return backend
    raise UnsupportedModelError("no backend supports this model")  # reference supports all
