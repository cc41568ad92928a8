"""The jobs the CLI runs, as plain functions (the CLI only parses arguments)."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import atomic_torch_save, atomic_write_json
from .models import MLP
from .tasks import Sine
from .trainer import Reptile

__all__ = ["SineConfig", "run_sine", "SEED_CONFIG"]


@dataclass
class SineConfig:
    """The sine job.  The defaults are the seed's experiment (see README for the faster preset)."""

    iterations: int = 30000
    meta_batch_size: int = 1
    outer_lr: float = 0.1
    outer_lr_final: Optional[float] = None
    inner_lr: float = 0.02
    inner_steps: int = 5
    inner_batch_size: int = 10
    hidden_dim: int = 64
    backend: str = "auto"
    seed: int = 0
    eval_tasks: int = 200
    eval_steps: int = 160  # the seed's demo: perform_k_training_steps(model, task, 32)
    device: str = "cpu"


SEED_CONFIG = SineConfig()


def run_sine(config: SineConfig, out: os.PathLike, *, progress: bool = True) -> dict:
    """Meta-train the seed's MLP on sine tasks, evaluate on held-out tasks, write everything to ``out``.

    Writes ``figure.png`` (before / after / true on a held-out task, the seed's figure),
    ``learning_curve.png``, ``model.pt`` (state_dict + config), ``config.json`` and ``metrics.json``.
    Returns the metrics.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output directory {out} is not writable")
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = MLP(1, config.hidden_dim, 1).to(device)
    trainer = Reptile(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                      inner_batch_size=config.inner_batch_size, outer_lr=config.outer_lr,
                      outer_lr_final=config.outer_lr_final, loss="mse", backend=config.backend)
    dist = Sine()
    gen = torch.Generator().manual_seed(config.seed)
    t0 = time.perf_counter()
    history = trainer.fit(dist, config.iterations, meta_batch_size=config.meta_batch_size,
                          generator=gen, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0

    # Held-out tasks from a separate stream, adapted as the seed's demo does (160 SGD steps).
    eval_gen = torch.Generator().manual_seed(config.seed + 1_000_003)
    held_out = dist.sample(config.eval_tasks, generator=eval_gen, device=device)
    t1 = time.perf_counter()
    post = trainer.evaluate(held_out, config.eval_steps, generator=eval_gen)
    pre = trainer.evaluate(held_out, 0)
    eval_s = time.perf_counter() - t1

    metrics = {
        "post_adaptation_mse": float(post.mean()),
        "post_adaptation_mse_std": float(post.std()) if post.numel() > 1 else 0.0,
        "pre_adaptation_mse": float(pre.mean()),
        "eval_tasks": config.eval_tasks,
        "eval_steps": config.eval_steps,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "ms_per_iteration": 1e3 * train_s / max(config.iterations, 1),
        "backend": trainer.backend.name,
        "final_inner_loss": history["loss"][-1] if history["loss"] else math.nan,
        "torch": torch.__version__,
    }

    # The seed's figure on the first held-out task.
    from .plots import plot_before_after, plot_learning_curve

    demo = held_out[0]
    adapted = trainer.adapt(demo, config.eval_steps, generator=eval_gen).params
    with torch.no_grad():
        xg = demo.x[0]
        before = model(xg)
        after = torch.func.functional_call(model, {k: v[0] for k, v in adapted.items()}, (xg,))
    plot_before_after(xg.squeeze(-1).cpu(), before.squeeze(-1).cpu(), after.squeeze(-1).cpu(),
                      demo.y[0].squeeze(-1).cpu(), out / "figure.png",
                      title=f"Reptile on a held-out sine task ({config.iterations} meta-steps)")
    plot_learning_curve(history["loss"], out / "learning_curve.png")
    cfg = asdict(config)
    atomic_torch_save({"state_dict": model.state_dict(), "config": cfg}, out / "model.pt")
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
