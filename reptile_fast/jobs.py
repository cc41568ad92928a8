"""The jobs the CLI runs, as plain functions (the CLI only parses arguments)."""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .backends import UnsupportedModelError
from .backends.base import functional_call
from .checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointReplacedWarning, atomic_torch_save, atomic_write_json,
                         load_checkpoint, prepare_directory, removed_if_left_empty)
from .core import NONFINITE_HINT
from .models import MLP
from .tasks import Sine
from .trainer import Reptile
from .validation import check_bool, check_float, check_int

__all__ = ["SineConfig", "run_sine", "SEED_CONFIG", "sine_config_from_checkpoint", "SINE_JOB"]

SINE_JOB = "sine"
SINE_POINTS = 50  # points per sine task (the seed's grid)


#: torch's CPU generator (mt19937) keeps the low 32 bits of a seed: a job's seed is below 2**32,
#: and derived seeds (held-out tasks, validation) wrap there, as the generator would wrap them
SEED_LIMIT = 2 ** 32


def check_seed(seed: int) -> None:
    """A job's seed: below 2**32.  torch's CPU generator keeps only a seed's low 32 bits, so seed
    2**32 + s trained what seed s trains (QA67; the limit was 2**64, where a seed failed at the
    held-out evaluation: "Overflow when unpacking long long")."""
    if seed >= SEED_LIMIT:
        # name=value: the CLI's as_flags turns it into "--seed N"
        raise ValueError(f"seed={seed} is out of range: seed must be < 2**32 (torch's CPU generator keeps "
                         f"the low 32 bits of a seed, so seed {seed} would train what seed {seed % SEED_LIMIT} "
                         f"trains)")


def check_threads(threads: int) -> None:
    """A job's ``threads``: at most the machine's CPUs.  torch starts that many OpenMP threads, and
    far more than the machine has ended in a crash (``--threads 100000``: SIGSEGV), not an error."""
    cpus = os.cpu_count() or 1
    if threads > cpus:
        raise ValueError(f"threads={threads} exceeds the {cpus} CPUs of this machine: use at most {cpus} "
                         f"(0: torch's default)")


def derived_seed(seed: int, offset: int) -> int:
    """``seed + offset`` wrapped to ``SEED_LIMIT`` (32 bits: the value torch's CPU generator takes of it anyway)."""
    return (seed + offset) % SEED_LIMIT


def _check_float(name: str, value, *, allow_zero: bool = False) -> None:
    check_float(name, value, allow_zero=allow_zero)


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
    checkpoint_every: int = 1000  # meta-steps between checkpoints in --out; 0: only at the end / on a signal
    # CPU threads for the run (0: torch's default).  The sine job's ops are tiny: one thread
    # avoids OpenMP fork/join costs that dominate them and is robust on a busy machine.
    threads: int = 1
    # draw task j of meta-step t from (seed, t, j), as every run under torchrun does: a run in one
    # process then trains what N processes train (default: one generator, the other backends' draws)
    indexed_tasks: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("iterations", 1), ("meta_batch_size", 1), ("inner_steps", 1),
                              ("inner_batch_size", 1), ("hidden_dim", 1), ("seed", 0),
                              ("eval_tasks", 1), ("eval_steps", 1), ("checkpoint_every", 0),
                              ("threads", 0)):
            setattr(self, name, check_int(name, getattr(self, name), minimum))  # numpy ints as ints
        check_seed(self.seed)
        for name in ("outer_lr", "inner_lr"):
            _check_float(name, getattr(self, name))
            setattr(self, name, float(getattr(self, name)))  # plain floats: checkpoints store them
        if self.outer_lr_final is not None:
            _check_float("outer_lr_final", self.outer_lr_final, allow_zero=True)
            self.outer_lr_final = float(self.outer_lr_final)
        if self.inner_batch_size > SINE_POINTS:
            raise ValueError(f"inner_batch_size {self.inner_batch_size} exceeds the {SINE_POINTS} points of a sine task")
        for name in ("backend", "device"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
            # numpy's str_ (and a str-valued Enum) as the plain str it equals (QA47)
            setattr(self, name, str.__str__(getattr(self, name)))
        self.indexed_tasks = check_bool("indexed_tasks", self.indexed_tasks)


SEED_CONFIG = SineConfig()


def available_memory() -> Optional[int]:
    """Bytes this process can still fill on Linux: ``MemAvailable`` + ``SwapFree``, capped by a
    cgroup v2 limit; None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        avail = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read().strip())
        if limit != "max":
            try:  # page cache the kernel reclaims before it kills: not in use
                with open("/sys/fs/cgroup/memory.stat") as f:
                    stat = dict(line.split() for line in f if len(line.split()) == 2)
                used -= int(stat.get("inactive_file", 0))
            except (OSError, ValueError):
                pass
            avail = min(avail, int(limit) - max(used, 0))
    except (OSError, ValueError):
        pass
    return avail


def free_memory_for(device: torch.device) -> Optional[int]:
    """The bytes a job's memory checks compare with: the machine's free memory for a CPU run
    (``available_memory``), None where it is unknown or the device is a GPU (whose allocation fails
    at once, with the message the CLI reports)."""
    return available_memory() if device.type == "cpu" else None


def check_sine_memory(config: SineConfig, device: torch.device, world_size: int = 1) -> None:
    """``MemoryError`` before training when the meta-batch's draws or the held-out evaluation
    cannot fit.

    Their tensors are allocated lazily by Linux: a large ``--eval-tasks`` got its memory, trained,
    and was then killed by the kernel's out-of-memory killer while filling it in (exit 137, no
    message, nothing written: QA46); so was a ``--meta-batch-size`` whose draws each fit in RAM
    but not together (QA77: 10**8 tasks, killed while drawing).  The estimates are lower bounds —
    a meta-step's tasks (x and y) and plans for this process's share of the meta-batch, which every
    backend draws at once; the held-out tasks' points and one adapted copy of the parameters per
    task, which evaluation holds all at once — so a refusal is right."""
    avail = free_memory_for(device)
    if avail is None:
        return
    share = config.meta_batch_size // max(int(world_size), 1)
    train_need = share * (4 * 2 * SINE_POINTS + 8 * config.inner_steps * config.inner_batch_size)
    if train_need > avail:
        raise MemoryError(f"a meta-step's draws need at least {train_need / 2**30:.1f} GiB ({share} tasks), more "
                          f"than the {avail / 2**30:.1f} GiB this machine has free")
    h = config.hidden_dim
    params = (1 * h + h) + (h * h + h) + (h * 1 + 1)
    # ... and its plan (int64 [tasks, --eval-steps, batch]): a huge --eval-steps was reported as an
    # --inner-steps problem by the plan's own size check (QA82)
    need = config.eval_tasks * (4 * (params + 2 * SINE_POINTS) + 8 * config.eval_steps * config.inner_batch_size)
    if need > avail:
        raise MemoryError(f"the held-out evaluation needs at least {need / 2**30:.1f} GiB ({config.eval_tasks} "
                          f"tasks, {config.eval_steps} steps each), more than the {avail / 2**30:.1f} GiB this "
                          f"machine has free")


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (its agent sets ``TORCHELASTIC_RUN_ID``; a
    ``WORLD_SIZE`` alone may be a cluster's or a container's).  A new job run there draws tasks by
    global index whatever the number of processes, so ``--nproc_per_node 1`` and ``2`` train the
    same model (QA46: one process drew from a generator, two by index)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def uses_indexed_tasks(config, context, checkpoint=None) -> bool:
    """A job's draws: by global index across processes, with ``config.indexed_tasks``, or, for a new
    run, under torchrun; a resumed run alone draws as its checkpoint did (a one-generator run goes
    on from its generator, also under a one-process torchrun)."""
    if context.is_distributed or config.indexed_tasks:
        return True
    if checkpoint is not None:
        return (checkpoint["extra"].get("sampler") or {}).get("kind") == "indexed"
    return launched_by_torchrun()


def sine_config_from_checkpoint(ckpt: Mapping[str, Any], source="checkpoint") -> SineConfig:
    """The ``SineConfig`` stored in a checkpoint dict written by ``run_sine``.

    Raises ``ValueError`` naming ``source`` when the checkpoint is not a sine job's.
    """
    extra = ckpt.get("extra", {})
    if extra.get("job") != SINE_JOB or not isinstance(extra.get("job_config"), Mapping):
        job = extra.get("job")
        hint = (f"it is a {job} job's: continue it with reptile-fast {job} --resume DIR" if isinstance(job, str)
                and job.isidentifier() else "resume it from Python with Reptile.fit(..., resume_from=...)")
        raise ValueError(f"{source} was not written by the sine job (no sine configuration in it); {hint}")
    saved = dict(extra["job_config"])
    known = {f.name for f in fields(SineConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{source} holds sine settings this version does not know: {unknown}")
    return SineConfig(**saved)


def replaced_run_note(out: Path, resume, main: bool, log=None) -> None:
    """Say so when this run's saves will replace another run's in ``out``: a new run into a folder
    that holds a checkpoint, or a resumed run writing into another run's folder (``--resume A
    --out B``; a resume replaced B's checkpoint, model and metrics silently before QA45)."""
    from .checkpoint import resolve_checkpoint_path

    if not main or not (out / CHECKPOINT_NAME).exists():
        return
    if resume is None:
        message = (f"note: {out} already holds a checkpoint; this new run replaces it (the old one is kept "
                   f"as the previous checkpoint until the next save). Use --resume {shlex.quote(str(out))} to continue it.")
    else:
        resumed = Path(resolve_checkpoint_path(resume)).resolve()
        source = resumed.parent
        # this run's own checkpoints, not any file kept in its folder (QA72: another run's copy kept
        # as out/a_step3.pt replaced out's run without a word)
        if resumed in ((out / CHECKPOINT_NAME).resolve(), (out / PREVIOUS_NAME).resolve()):
            return
        message = (f"note: {out} already holds a checkpoint of another run; this resumed run (from {source}) "
                   f"replaces it and that run's outputs (its checkpoint is kept as the previous one until the "
                   f"next save). Use --resume {shlex.quote(str(out))} to continue that run instead, or another --out.")
    (log or (lambda m: print(m, file=sys.stderr)))(message)


def resume_hint(out) -> str:
    """The "--resume OUT" line after a failed distributed job, only where OUT holds a checkpoint
    (a job that failed to start has none, and --resume OUT would then fail)."""
    from pathlib import Path

    if not (Path(out) / CHECKPOINT_NAME).is_file():
        return f"\nNo checkpoint was written to {out}: start the job again."
    return f"\nContinue from the last checkpoint with --resume {shlex.quote(str(out))}"


@contextlib.contextmanager
def outputs_after_training(out, iteration: int, command: str):
    """Writing a finished run's outputs: an ``OSError`` (a full disk, an unwritable file) says, in
    its own kind and errno, that the training is safe in the checkpoint and how to write the
    outputs without training again (it named only the file before: QA72)."""
    try:
        yield
    except OSError as exc:
        # (its text without the "[Errno N]" prefix, which the new error's str() puts back)
        what = str(exc) if exc.errno is None or exc.strerror is None else \
            exc.strerror + (f": {exc.filename!r}" if exc.filename is not None else "")
        message = (f"{what} — the training finished: {Path(out) / CHECKPOINT_NAME} holds meta-step {iteration}; "
                   f"once the problem is fixed, `reptile-fast {command} --resume {shlex.quote(str(out))}` writes "
                   f"the outputs without training again")
        # (an error without errno, e.g. Pillow's "encoder error -2 when writing image file", read
        # "[Errno None] ..." as OSError(None, message): QA90)
        raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc


def flag_words_nonfinite(exc) -> str:
    """A non-finite meta-step's message with its hint in the CLI's words (``--inner-lr`` /
    ``--outer-lr``; ``as_flags`` leaves "inner_lr/outer_lr" alone, as it reads like a path)."""
    return str(exc).replace(NONFINITE_HINT, "Lower --inner-lr / --outer-lr or check the data.")


@contextlib.contextmanager
def library_warnings_as_notes(is_main: bool = True):
    """Within a CLI command: the library's own warnings (a resume whose flags make it differ from
    an uninterrupted run) printed as the job's other notes are, ``note: ...`` on one line, by rank
    0 alone — they followed the job's own note as a Python ``UserWarning`` with a file and line.
    Other modules' warnings keep Python's display, and Python callers of ``run_sine`` /
    ``run_omniglot`` keep the warnings themselves (``warnings.catch_warnings(record=True)``,
    ``pytest.warns``): only the command line swaps the display."""
    default_show = warnings.showwarning

    def as_note(message, category, filename, lineno, file=None, line=None):
        if os.path.basename(os.path.dirname(str(filename))) != "reptile_fast":
            return default_show(message, category, filename, lineno, file, line)
        if is_main:
            print(f"note: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = as_note  # (catch_warnings puts the default back)
        yield


def train_job(trainer, task_distribution, *, iterations: int, meta_batch_size: int, seed: int, indexed: bool,
              context, progress: bool, out, checkpoint_every: int, resume, extra: Mapping[str, Any],
              callback=None) -> dict:
    """A CLI job's training: ``Reptile.fit`` with a generator seeded by ``seed``, or, across
    processes (``indexed``), ``distributed_fit``: task j of meta-step t drawn from (seed, t, j),
    the same run whatever the number of processes.  Checkpoints go to ``out`` every
    ``checkpoint_every`` meta-steps (0: at the end and on signals only)."""
    common = dict(meta_batch_size=meta_batch_size, progress=progress, callback=callback, checkpoint_dir=out,
                  checkpoint_every=checkpoint_every or None, resume_from=resume, checkpoint_extra=extra)
    with warnings.catch_warnings():
        # the job printed its own note for a checkpoint it replaces (the only one: not once per rank)
        warnings.simplefilter("ignore", CheckpointReplacedWarning)
        if indexed:
            from .distributed import distributed_fit

            return distributed_fit(trainer, task_distribution, iterations, seed=seed, context=context, **common)
        # On the CPU every meta-step's tasks and plans are drawn as every backend draws them (Reptile.fit's
        # default), so the job's model does not depend on --checkpoint-every or on the backend's chunking,
        # and extending a finished run with --resume is exact; at meta-batch 1 the compiled path then
        # runs 31.4k instead of 37.5k tasks/s (bench/results/native_meta_batch_cpu.json).  The fused CUDA-graph
        # stepper draws a chunk at once: per-step draws would be launches between its graph replays.
        return trainer.fit(task_distribution, iterations, generator=torch.Generator().manual_seed(seed),
                           draw_chunks=trainer.device.type == "cuda", **common)


def run_sine(config: SineConfig, out: os.PathLike, *, progress: bool = True,
             resume: Optional[os.PathLike] = None) -> dict:
    """Meta-train the seed's MLP on sine tasks, evaluate on held-out tasks, write everything to ``out``.

    Writes ``figure.png`` (before / after / true on a held-out task, the seed's figure),
    ``learning_curve.png``, ``model.pt`` (state_dict + config), ``config.json`` and ``metrics.json``.
    During training ``out/checkpoint.pt`` is written every ``config.checkpoint_every`` meta-steps,
    at the end and on SIGINT/SIGTERM (``reptile_fast.checkpoint``).  ``resume``: a checkpoint
    file or directory to continue from (exactly: the result equals an uninterrupted run's).
    Returns the metrics.
    """
    if not isinstance(config, SineConfig):
        raise TypeError(f"config must be a SineConfig, got {type(config).__name__}")
    check_threads(config.threads)
    from .distributed import setup_from_env

    # Under torchrun (WORLD_SIZE > 1) this joins the job: gloo on the CPU, NCCL on cuda:LOCAL_RANK.
    with removed_if_left_empty(out):  # a bad --resume leaves no empty --out behind
        context = setup_from_env(device=config.device)
        try:
            return _run_sine_ranked(config, out, context, progress=progress, resume=resume)
        finally:
            if not context.failed:
                context.close()


def _run_sine_ranked(config: SineConfig, out, context, *, progress: bool, resume) -> dict:
    out = prepare_directory(out, "output directory")
    start_iteration = 0
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        start_iteration = ckpt["trainer"]["iteration"]
        if start_iteration > config.iterations:
            raise ValueError(f"the checkpoint {resume} is at meta-step {start_iteration}, beyond "
                             f"iterations={config.iterations}")
    # A run that drew tasks by global index (torchrun) continues that way, with any number of processes.
    indexed = uses_indexed_tasks(config, context, ckpt)
    replaced_run_note(out, resume, context.is_main)
    if context.is_main:  # rank 0 alone evaluates
        check_sine_memory(config, context.device, context.world_size)
    if indexed and config.backend == "compiled":
        raise ValueError("--backend compiled runs one process drawing from one random stream; under torchrun "
                         "(or with --indexed-tasks, or resuming such a run) use --backend auto, torch or reference")
    device = context.device
    if config.threads:
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            return _run_sine(config, out, device, start_iteration, progress=progress, resume=resume,
                             context=context, indexed=indexed)
        finally:
            torch.set_num_threads(previous_threads)
    return _run_sine(config, out, device, start_iteration, progress=progress, resume=resume,
                     context=context, indexed=indexed)


def _run_sine(config: SineConfig, out, device: torch.device, start_iteration: int, *, progress: bool,
              resume, context, indexed: bool) -> dict:
    torch.manual_seed(config.seed)
    model = MLP(1, config.hidden_dim, 1).to(device)
    kwargs = dict(inner_lr=config.inner_lr, inner_steps=config.inner_steps, inner_batch_size=config.inner_batch_size,
                  outer_lr=config.outer_lr, outer_lr_final=config.outer_lr_final, loss="mse")
    trainer = None
    # On the CPU "auto" runs the compiled whole-meta-step path (backend "compiled"): 1.75x (meta-
    # batch 1024) to 32x (meta-batch 1) backend torch (bench/results/native_meta_batch_cpu.json).
    if config.backend == "auto" and device.type == "cpu" and not indexed:
        try:
            trainer = Reptile(model, backend="compiled", **kwargs)
        except UnsupportedModelError:
            trainer = None
    if trainer is None:
        trainer = Reptile(model, backend=config.backend, **kwargs)
    dist = Sine(n_points=SINE_POINTS)
    t0 = time.perf_counter()
    extra = {"job": SINE_JOB, "job_config": asdict(config)}
    history = train_job(trainer, dist, iterations=config.iterations, meta_batch_size=config.meta_batch_size,
                        seed=config.seed, indexed=indexed, context=context, progress=progress, out=out,
                        checkpoint_every=config.checkpoint_every, resume=resume, extra=extra)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    if not context.is_main:  # rank 0 alone evaluates and writes the outputs
        return {"rank": context.rank, "world_size": context.world_size}

    # Held-out tasks from a separate stream, adapted as the seed's demo does (160 SGD steps).
    eval_gen = torch.Generator().manual_seed(derived_seed(config.seed, 1_000_003))
    held_out = dist.sample(config.eval_tasks, generator=eval_gen, device=device)
    if progress:
        print(f"reptile_fast: evaluating on {config.eval_tasks} held-out tasks ({config.eval_steps} adaptation "
              f"steps each)...", file=sys.stderr, flush=True)
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
        # after compilation (the fit's own timing)
        "ms_per_iteration": trainer.last_fit_stats["ms_per_iteration"],
        "resumed_from_iteration": start_iteration,
        "backend": trainer.last_fit_stats["stepper"],
        "mode": trainer.last_fit_stats["mode"],
        "fallback_reason": trainer.last_fit_stats["fallback_reason"],
        "compile_seconds": trainer.last_fit_stats["compile_seconds"],
        "final_inner_loss": history["loss"][-1] if history["loss"] else math.nan,
        "torch": torch.__version__,
        "world_size": context.world_size,
        "task_sampler": "indexed" if indexed else "generator",
    }

    # The seed's figure on the first held-out task.
    from .plots import plot_before_after, plot_learning_curve

    demo = held_out[0]
    adapted = trainer.adapt(demo, config.eval_steps, generator=eval_gen).params
    with torch.no_grad():
        xg = demo.x[0]
        before = model(xg)
        after = functional_call(model, {k: v[0] for k, v in adapted.items()}, (xg,))
    with outputs_after_training(out, trainer.iteration, "sine"):
        plot_before_after(xg.squeeze(-1).cpu(), before.squeeze(-1).cpu(), after.squeeze(-1).cpu(),
                          demo.y[0].squeeze(-1).cpu(), out / "figure.png",
                          title=f"Reptile on a held-out sine task ({config.iterations} meta-steps)")
        plot_learning_curve(history["loss"], out / "learning_curve.png")
        cfg = {**asdict(config), "world_size": context.world_size}
        atomic_torch_save({"state_dict": model.state_dict(), "config": cfg}, out / "model.pt")
        atomic_write_json(out / "config.json", cfg)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics
