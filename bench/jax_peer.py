"""The JAX peer: the same inner loop (MLP, MSE, plain SGD, the same plan) written the way a JAX
user would — ``jit(vmap(per-task lax.scan over SGD steps))`` — for side-by-side timing.

A bench-only peer, not a project dependency: ``unavailable()`` says why it cannot run (JAX not
importable, or no JAX GPU when the problem is on CUDA) and the providers skip it.

fp32 matmuls run at ``Precision.HIGHEST``: on GPUs JAX's default for fp32 dots is TF32, which
would neither match the reference nor be a like-for-like comparison with TF32-off torch.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from reptile_fast.mlp_spec import extract_mlp_spec

__all__ = ["unavailable", "load_jax", "make_inner_loop", "prepare"]


def load_jax():
    """Import JAX without letting it grab most of the GPU's memory (torch shares the GPU)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def _jax_device(device: torch.device):
    jax = load_jax()
    platform = "gpu" if device.type == "cuda" else "cpu"
    try:
        devs = jax.devices(platform)
    except RuntimeError:
        devs = []
    return devs[0] if devs else None


def unavailable(device) -> Optional[str]:
    """None when JAX can run on ``device``'s kind of device, else the reason."""
    try:
        load_jax()
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken jaxlib install
        return f"JAX not importable: {type(exc).__name__}: {exc}"
    if _jax_device(torch.device(device)) is None:
        return f"JAX has no {torch.device(device).type} device here"
    return None


def make_inner_loop(activations, lr: float):
    """A jitted ``f(params, x, y, idx) -> adapted params`` for every task at once.

    Args (of the returned function):
        params: list of ``(W [out, in], b [out])`` per layer, shared by all tasks (φ).
        x: ``[T, N, in]``, y: ``[T, N, out]`` task points.
        idx: int32 ``[T, S, B]`` the plan; step s of task t trains on points ``idx[t, s]``.
    Returns: list of ``(W [T, out, in], b [T, out])``: every task's adapted parameters.
    """
    jax = load_jax()
    jnp = jax.numpy
    acts = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid, "identity": lambda h: h}
    fns = [acts[a] for a in activations]
    hi = jax.lax.Precision.HIGHEST

    def loss(params, xb, yb):
        h = xb
        for (w, b), act in zip(params, fns):
            h = act(jnp.matmul(h, w.T, precision=hi) + b)
        return jnp.mean((h - yb) ** 2)

    grad = jax.grad(loss)

    def one_task(params, x, y, idx):
        def step(p, ind):
            g = grad(p, x[ind], y[ind])
            return jax.tree.map(lambda a, d: a - lr * d, p, g), None

        adapted, _ = jax.lax.scan(step, params, idx)
        return adapted

    return jax.jit(jax.vmap(one_task, in_axes=(None, 0, 0, 0)))


def prepare(problem):
    """``bench.providers.Prepared`` for the JAX peer on ``problem`` (inputs copied to JAX's
    device and the function compiled here, outside any timing)."""
    from bench.providers import Prepared

    jax = load_jax()
    spec = extract_mlp_spec(problem.model)
    dev = _jax_device(problem.device)
    state = dict(problem.model.named_parameters())

    def put(t: torch.Tensor, dtype=None):
        a = t.detach().cpu().numpy()
        return jax.device_put(a if dtype is None else a.astype(dtype), dev)

    params = [(put(state[w]), put(state[b])) for w, b in zip(spec.weight_names, spec.bias_names)]
    inputs = [(put(tb.x), put(tb.y), put(plan, np.int32)) for tb, plan in zip(problem.tasks, problem.plans)]
    fn = make_inner_loop(spec.activations, problem.point.lr)
    jax.block_until_ready(fn(params, *inputs[0]))  # compile

    def run(i):
        return fn(params, *inputs[i % len(inputs)])

    def to_params(out: List[Any]) -> Dict[str, torch.Tensor]:
        res = {}
        for (w, b), wn, bn in zip(out, spec.weight_names, spec.bias_names):
            res[wn] = torch.from_numpy(np.asarray(w).copy())
            res[bn] = torch.from_numpy(np.asarray(b).copy())
        return res

    return Prepared(run, to_params, sync=jax.block_until_ready)
