"""What checkpoints cost: one save / load of the sine job's checkpoint, and fit() with and without
periodic checkpoints (interleaved repeats, medians, so machine noise hits both alike).

    python bench/checkpoint_overhead.py [--iterations 300] [--every 100] [--repeats 5]

Writes bench/results/checkpoint_overhead_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.env import machine_stamp  # noqa: E402
from reptile_fast import MLP, Reptile, Sine  # noqa: E402
from reptile_fast.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def fit_seconds(iterations, every, directory):
    """Seconds of one fit, and its final parameters (checked before any time is kept)."""
    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="reference")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    trainer.fit(Sine(), iterations, generator=gen, progress=False,
                checkpoint_dir=directory if every else None, checkpoint_every=every or None)
    return time.perf_counter() - t0, [p.detach().clone() for p in trainer.model.parameters()]


def check_same_training(plain, checkpointed) -> None:
    """Checkpointing must not change what is trained: the two fits end bitwise equal."""
    if len(plain) != len(checkpointed) or not all(torch.equal(a, b) for a, b in zip(plain, checkpointed)):
        raise SystemExit("checkpoint_overhead: the checkpointed fit ended with other parameters than the plain "
                         "one; nothing is timed")


def check_round_trip(trainer, loaded, history_length: int) -> None:
    """A load must give back what was saved (the trainer's parameters and the whole history)."""
    saved = trainer.model.state_dict()
    model = loaded["trainer"]["model"]
    if set(model) != set(saved) or not all(torch.equal(model[k], saved[k]) for k in saved) \
            or len(loaded.get("history", {}).get("loss", [])) != history_length:
        raise SystemExit("checkpoint_overhead: a loaded checkpoint differs from what was saved; nothing is timed")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--history", type=int, default=30000, help="loss-history length stored")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trainer = Reptile(MLP(), backend="reference")
        gen = torch.Generator().manual_seed(0)
        history = {"loss": [0.1] * args.history}
        saves, loads = [], []
        for _ in range(20):
            t0 = time.perf_counter()
            path = save_checkpoint(tmp / "s", trainer, generator=gen, history=history)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loaded = load_checkpoint(tmp / "s")
            loads.append(time.perf_counter() - t0)
            check_round_trip(trainer, loaded, args.history)
        size = path.stat().st_size

        plain, with_ckpt = [], []
        for r in range(args.repeats):
            seconds, params_plain = fit_seconds(args.iterations, 0, None)
            plain.append(seconds)
            seconds, params_ckpt = fit_seconds(args.iterations, args.every, tmp / f"fit{r}")
            with_ckpt.append(seconds)
            check_same_training(params_plain, params_ckpt)

    result = {
        "what": "checkpoint save/load of the seed MLP (1-64-64-1) with a loss history, and fit() "
                "with vs without periodic checkpoints (reference backend)",
        "checkpoint_bytes": size,
        "history_length": args.history,
        "save_ms_median": 1e3 * statistics.median(saves),
        "load_ms_median": 1e3 * statistics.median(loads),
        "fit_iterations": args.iterations,
        "checkpoint_every": args.every,
        "fit_s_plain_median": statistics.median(plain),
        "fit_s_checkpointed_median": statistics.median(with_ckpt),
        "fit_ratio_checkpointed_over_plain": statistics.median(w / p for w, p in zip(with_ckpt, plain)),
        "machine": machine_stamp(),
    }
    out = Path(__file__).resolve().parent / "results" / "checkpoint_overhead_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
