"""``reptile-fast`` / ``python -m reptile_fast``: the command line."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import List, Optional

from .backends import BACKENDS
from .validation import argparse_number as _number
from .validation import check_device

__all__ = ["main", "build_parser"]

_positive_int = _number(int, allow_zero=False)
_nonneg_int = _number(int, allow_zero=True)
_positive_float = _number(float, allow_zero=False)
_nonneg_float = _number(float, allow_zero=True)


#: sine flags that set a ``SineConfig`` field (argparse dest == field name).
CONFIG_FLAGS = ("iterations", "meta_batch_size", "outer_lr", "outer_lr_final", "inner_lr", "inner_steps",
                "inner_batch_size", "backend", "device", "seed", "eval_tasks", "eval_steps",
                "checkpoint_every", "hidden_dim", "threads", "indexed_tasks")


def _version_string() -> str:
    """reptile_fast's version with the torch and Triton it runs on (no heavy imports)."""
    from importlib import metadata

    from . import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    return f"reptile-fast {__version__} (torch {installed('torch')}, triton {installed('triton')})"


def build_parser() -> argparse.ArgumentParser:
    from .jobs import SineConfig

    d = SineConfig()
    parser = argparse.ArgumentParser(prog="reptile-fast", description="Fast Reptile meta-learning.")
    parser.add_argument("--version", action="version", version=_version_string())
    sub = parser.add_subparsers(dest="command", required=True)
    sine = sub.add_parser("sine", help="meta-train the seed's MLP on sine-wave regression",
                          description="Meta-train the seed's MLP on sine tasks and write the figure, "
                                      "learning curve, model, metrics and resumable checkpoints into --out. "
                                      "Ctrl-C / SIGTERM finish the current meta-step, write "
                                      "OUT/checkpoint.pt and exit; --resume OUT continues exactly.")
    # Defaults are None so that main() can tell which flags were given (they override a
    # checkpoint's settings with --resume); the values come from SineConfig, in one place.
    sine.add_argument("--iterations", type=_positive_int, help=f"meta-steps (default {d.iterations})")
    sine.add_argument("--meta-batch-size", type=_positive_int,
                      help=f"tasks per meta-step (default {d.meta_batch_size})")
    sine.add_argument("--outer-lr", type=_positive_float, help=f"ε, the outer step (default {d.outer_lr})")
    sine.add_argument("--outer-lr-final", type=_nonneg_float,
                      help="anneal ε linearly to this value (default: no annealing)")
    sine.add_argument("--inner-lr", type=_positive_float, help=f"(default {d.inner_lr})")
    sine.add_argument("--inner-steps", type=_positive_int, help=f"(default {d.inner_steps})")
    sine.add_argument("--inner-batch-size", type=_positive_int, help=f"(default {d.inner_batch_size})")
    sine.add_argument("--hidden-dim", type=_positive_int, help=f"MLP width (default {d.hidden_dim}, the seed's)")
    sine.add_argument("--backend", choices=["auto", "compiled", *sorted(BACKENDS)],
                      help=f"(default {d.backend}; auto = the compiled path on the CPU, else the fastest backend)")
    sine.add_argument("--device", help=f"cpu or cuda (default {d.device})")
    sine.add_argument("--threads", type=_nonneg_int,
                      help=f"CPU threads, 0 = torch's default (default {d.threads}: the job's ops are tiny)")
    sine.add_argument("--seed", type=_nonneg_int, help=f"(default {d.seed})")
    sine.add_argument("--eval-tasks", type=_positive_int,
                      help=f"held-out tasks for the post-adaptation MSE (default {d.eval_tasks})")
    sine.add_argument("--eval-steps", type=_positive_int,
                      help=f"adaptation steps per held-out task (default {d.eval_steps}, the seed's demo)")
    sine.add_argument("--checkpoint-every", type=_nonneg_int, metavar="N",
                      help=f"write OUT/checkpoint.pt every N meta-steps; 0: only at the end and on "
                           f"Ctrl-C/SIGTERM (default {d.checkpoint_every})")
    sine.add_argument("--indexed-tasks", action="store_true", default=None,
                      help="draw task j of meta-step t from (seed, t, j), as under torchrun (always there): one "
                           "process then trains what N processes train (default: one random stream, the "
                           "compiled path's)")
    sine.add_argument("--resume", metavar="DIR",
                      help="continue the run whose checkpoint is in DIR (its --out, or a checkpoint "
                           "file) with the settings stored in it; flags given as well override them")
    sine.add_argument("--out", help="output directory (default runs/sine, or DIR with --resume)")
    sine.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # --- few-shot jobs (issue 13): `omniglot`, `omniglot-runs` ---
    from .fewshot_job import add_parser as add_fewshot_parsers
    add_fewshot_parsers(sub)
    # --- end few-shot jobs ---
    return parser


def _error(message: str, code: int = 2) -> int:
    print(f"reptile-fast: error: {message}", file=sys.stderr)
    return code


def _run_sine_command(parser: argparse.ArgumentParser, args) -> int:
    import dataclasses
    from pathlib import Path

    from .checkpoint import load_checkpoint, resolve_checkpoint_path
    from .distributed import DistributedError, is_main
    from .jobs import SineConfig, flag_words_nonfinite, library_warnings_as_notes, run_sine, sine_config_from_checkpoint
    from .signals import TrainingInterrupted, sigterm_as_interrupt
    from .trainer import NonFiniteError
    from .validation import as_flags, out_of_memory_message, out_of_memory_or_raise

    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    paths = (args.out, args.resume)  # left as they are in errors worded with flags (as_flags)
    resume = None
    if args.resume is not None:
        try:
            resume = resolve_checkpoint_path(args.resume)
            base = sine_config_from_checkpoint(load_checkpoint(resume), f"checkpoint {resume}")
        except (OSError, ValueError, TypeError) as exc:
            return _error(f"--resume {args.resume}: {exc}")
        if "hidden_dim" in given and given["hidden_dim"] != base.hidden_dim:
            # the saved model's shape: a resumed run cannot change it (QA51: a note said it overrode
            # it, then the checkpoint failed to load, in the library's words)
            return _error(f"--hidden-dim {given['hidden_dim']}: the checkpoint's model is {base.hidden_dim} wide "
                          f"(its weights' shapes); resume without --hidden-dim, or start a new run with it")
        if "seed" in given and given["seed"] != base.seed:
            # the checkpoint's random streams continue: a new seed was announced and recorded in
            # config.json, yet trained nothing differently (the held-out evaluation alone used it)
            return _error(f"--seed {given['seed']}: the checkpoint's run has seed {base.seed}, and a resumed run "
                          f"continues its random streams; drop --seed, or start a new run with it")
        for key, value in given.items():
            if getattr(base, key) != value and is_main():
                print(f"note: --{key.replace('_', '-')} {value} overrides the checkpoint's "
                      f"{getattr(base, key)!r}", file=sys.stderr)
        settings = {**dataclasses.asdict(base), **given}
        out = args.out if args.out is not None else str(Path(args.resume) if Path(args.resume).is_dir()
                                                           else resume.parent)
    else:
        settings = given
        out = args.out if args.out is not None else "runs/sine"
    try:
        config = SineConfig(**settings)
    except (ValueError, TypeError) as exc:
        parser.error(as_flags(str(exc), CONFIG_FLAGS, keep=paths))
    try:
        check_device(config.device, what="--device", allowed=("cpu", "cuda"), job="the sine job")
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    main_rank = is_main()  # rank 0 of a torchrun job (or the only process) prints the results
    # the three sizes a run allocates by (a huge --hidden-dim or --eval-tasks used to be blamed on
    # --meta-batch-size 1)
    oom_hint = (f"--meta-batch-size {config.meta_batch_size} with --hidden-dim {config.hidden_dim} and "
                f"--inner-steps {config.inner_steps} (training) or --eval-tasks {config.eval_tasks} with "
                f"--eval-steps {config.eval_steps} (the held-out evaluation) does not fit in this "
                f"machine's memory; lower the one that is too large")
    try:
        with sigterm_as_interrupt(), library_warnings_as_notes(main_rank):
            # (SIGTERM after training, in the evaluation or the outputs: a message, exit 143)
            metrics = run_sine(config, out, progress=not args.no_progress, resume=resume)
    except TrainingInterrupted as exc:
        if main_rank:
            print(f"reptile-fast: {exc.__class__.__name__}: stopped after meta-step {exc.iteration}; "
                  f"checkpoint written to {exc.checkpoint}.\nResume with: reptile-fast sine --resume {shlex.quote(str(out))}"
                  + (" (under torchrun with any number of processes, or alone)"
                     if "WORLD_SIZE" in os.environ else ""), file=sys.stderr)
        return exc.exit_code
    except DistributedError as exc:
        from .jobs import resume_hint

        return _error(f"{exc}{resume_hint(out)}", 4)
    except KeyboardInterrupt as exc:  # (Terminated too: SIGTERM, exit 143)
        return _error(f"interrupted without writing a new checkpoint; the last one in {out} (if any) is "
                      f"intact: continue with reptile-fast sine --resume {shlex.quote(str(out))}", getattr(exc, "exit_code", 130))
    except NonFiniteError as exc:
        if not main_rank:  # every rank stops at the same meta-step; rank 0 reports it and its checkpoint
            return 3
        hint = (f"the last good checkpoint ({exc.checkpoint}, meta-step {exc.checkpoint_iteration}) was kept; "
                f"continue from it with lower learning rates: reptile-fast sine --resume {shlex.quote(str(out))} "
                f"--inner-lr ... --outer-lr ..." if exc.checkpoint else "no checkpoint had been written yet")
        print(f"reptile-fast: error: {flag_words_nonfinite(exc.__cause__ or exc)}\n{hint}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError) as exc:
        # the library's out-of-memory ValueErrors name its arguments: here the flag is what to lower
        return _error(isinstance(exc, ValueError) and out_of_memory_message(exc, oom_hint)
                      or as_flags(str(exc), CONFIG_FLAGS, keep=paths))
    except (MemoryError, RuntimeError) as exc:
        return _error(out_of_memory_or_raise(exc, oom_hint))
    if not main_rank:
        return 0
    print(json.dumps(metrics, indent=2))
    print(f"wrote figure.png, learning_curve.png, model.pt, config.json, metrics.json, checkpoint.pt to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input (a meta-batch that does
    not fit in memory included), 3 non-finite training,
    4 another process of a torchrun job died or hung, 128 + signal number when interrupted with a
    checkpoint written).  Under torchrun every process runs this; rank 0 alone prints and writes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sine":
        return _run_sine_command(parser, args)
    # --- few-shot jobs (issue 13) ---
    if args.command in ("omniglot", "omniglot-runs"):
        from .fewshot_job import run_command as run_fewshot_command
        return run_fewshot_command(args)
    # --- end few-shot jobs ---
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
