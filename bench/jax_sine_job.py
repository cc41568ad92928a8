"""The main job's experiment written plainly in JAX: the yardstick of ``bench/main_job_wall.py``.

The seed's experiment as ``reptile-fast sine`` runs it — 30000 meta-steps of one sine task each
(MLP 1-64-64-1 tanh, 5 inner SGD steps of 10 points at lr 0.02, ε = 0.1), then the post-adaptation
MSE over 200 held-out tasks adapted as the seed's demo does (160 SGD steps of 10 points) — the way a
JAX user would write it: ``jit`` of a ``lax.scan`` over chunks of 500 meta-steps (tasks and
minibatch plans drawn with numpy on the host, chunk by chunk), ``jax.grad`` for the inner loop,
``vmap`` over the held-out tasks.  It writes ``metrics.json`` and ``params.npz`` (no figures).

    python bench/jax_sine_job.py --out /tmp/jax_job       # with an interpreter that has JAX

Standalone (imports neither torch nor reptile_fast), so its wall time is JAX's own.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

T_START = time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", type=int, default=30000)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tasks", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=160)
    args = p.parse_args(argv)
    if args.iterations % args.chunk:
        p.error("--iterations must be a multiple of --chunk")

    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_platforms", "cpu")
    t_import = time.perf_counter() - T_START
    N, S, B, LR, EPS, HID = 50, 5, 10, 0.02, 0.1, 64
    grid = jnp.linspace(-5.0, 5.0, N, dtype=jnp.float32)

    def init(key):
        # torch.nn.Linear's default: U(−1/√fan_in, 1/√fan_in) for weights and biases
        params = []
        for d_in, d_out in ((1, HID), (HID, HID), (HID, 1)):
            key, kw, kb = jax.random.split(key, 3)
            bound = 1.0 / math.sqrt(d_in)
            params.append((jax.random.uniform(kw, (d_out, d_in), minval=-bound, maxval=bound),
                           jax.random.uniform(kb, (d_out,), minval=-bound, maxval=bound)))
        return params

    def forward(params, x):  # x [n, 1]
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w.T + b
            if i < len(params) - 1:
                h = jnp.tanh(h)
        return h

    def mse(params, x, y):
        return jnp.mean((forward(params, x) - y) ** 2)

    grad = jax.grad(mse)

    rng = np.random.default_rng(args.seed)

    def draw(n, steps):
        """``n`` tasks on the grid and their minibatch plans (numpy, on the host): y ``[n, N, 1]``,
        plans int32 ``[n, steps, B]`` (per step B distinct points: the seed's randperm(N)[:B])."""
        a = rng.uniform(0.1, 5.0, (n, 1)).astype(np.float32)
        b = rng.uniform(0.0, 2 * math.pi, (n, 1)).astype(np.float32)
        y = (a * np.sin(np.asarray(grid)[None] + b))[..., None]
        plans = np.argsort(rng.random((n, steps, N)), axis=2)[:, :, :B].astype(np.int32)
        return jnp.asarray(y), jnp.asarray(plans)

    x = grid[:, None]

    def adapt(params, y, idx):
        def step(p, ind):
            g = grad(p, x[ind], y[ind])
            return jax.tree.map(lambda a, d: a - LR * d, p, g), None
        return jax.lax.scan(step, params, idx)[0]

    @jax.jit
    def chunk(params, ys, plans):
        def meta_step(phi, task):
            new = adapt(phi, *task)
            return jax.tree.map(lambda p, q: p + EPS * (q - p), phi, new), None
        return jax.lax.scan(meta_step, params, (ys, plans))[0]

    @jax.jit
    def evaluate(params, ys, plans):
        adapted = jax.vmap(adapt, in_axes=(None, 0, 0))(params, ys, plans)
        return jax.vmap(lambda p, y: mse(p, x, y))(adapted, ys)

    key = jax.random.PRNGKey(args.seed)
    params = init(key)
    t0 = time.perf_counter()
    ys, plans = draw(args.chunk, S)
    compiled = chunk.lower(params, ys, plans).compile()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.iterations // args.chunk):
        if i:
            ys, plans = draw(args.chunk, S)
        params = compiled(params, ys, plans)
    jax.block_until_ready(params)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ys, plans = draw(args.eval_tasks, args.eval_steps)
    evaluate_c = evaluate.lower(params, ys, plans).compile()
    t_eval_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    post = np.asarray(evaluate_c(params, ys, plans))
    t_eval = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "params.npz"),
             **{f"{n}{i}": np.asarray(a) for i, (w, b) in enumerate(params) for n, a in (("w", w), ("b", b))})
    metrics = {"post_adaptation_mse": float(post.mean()), "eval_tasks": args.eval_tasks,
               "eval_steps": args.eval_steps, "import_seconds": t_import, "compile_seconds": t_compile,
               "train_seconds": t_train, "eval_compile_seconds": t_eval_compile, "eval_seconds": t_eval,
               "ms_per_iteration": 1e3 * t_train / args.iterations, "jax": jax.__version__,
               "wall_seconds_in_process": time.perf_counter() - T_START}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
