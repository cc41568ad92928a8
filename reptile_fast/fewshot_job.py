"""The few-shot jobs: ``reptile-fast omniglot`` (meta-train + test) and ``reptile-fast omniglot-runs``.

``omniglot`` meta-trains the paper's Omniglot conv net with Reptile on the training alphabets
(90° rotations as extra classes), then tests N-way K-shot on the held-out alphabets of
``--test`` (alphabets seen in training are removed from it) with ``reptile_fast.fewshot``'s
protocol.  ``omniglot-runs`` adapts a trained 20-way model on the 20 official one-shot runs of
Lake et al. 2015 and reports their error rate.  Both write into an output folder like the sine job.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from .checkpoint import (CHECKPOINT_NAME, atomic_torch_save, atomic_write_json, load_checkpoint,
                         prepare_directory, removed_if_left_empty, resolve_checkpoint_path)
from .fewshot import evaluate_episodes, nearest_neighbour_predictions, score_predictions
from .jobs import (check_seed, check_threads, derived_seed, flag_words_nonfinite, library_warnings_as_notes,
                   outputs_after_training,
                   replaced_run_note, resume_hint, train_job, uses_indexed_tasks)
from .models import OmniglotConvNet
from .backends.reference import ADAM_STATES, check_adam_state
from .tasks.base import MINIBATCHES, check_minibatches
from .tasks.images import PIXELS
from .tasks.omniglot import (OFFICIAL_TRAIN_CHARACTERS, ROTATIONS, Omniglot, load_official_runs, load_omniglot_images,
                             official_character_split)
from .trainer import Reptile
from .validation import check_bool, check_choice, check_device, check_float, check_int

__all__ = ["OmniglotConfig", "omniglot_preset", "run_omniglot", "run_omniglot_runs", "add_parser",
           "run_command", "config_from_args", "load_trained", "OMNIGLOT_JOB"]

OMNIGLOT_JOB = "omniglot"
VALIDATION_NAME = "validation.json"
#: test episodes drawn and evaluated at once (bounds the evaluation's memory; up to this many tasks
#: the episodes are the ones a single draw gives)
EVAL_BLOCK = 1000


@dataclass
class OmniglotConfig:
    """The omniglot job.  Defaults: the paper's 5-way protocol (``omniglot_preset(20)`` for 20-way).

    ``shots`` lists the K of the K-shot tests (the model is trained the same way for each: on
    ``train_shots`` images per class, as the official code does with ``--train-shots 10``).
    The test: ``eval_tasks`` = 10000 episodes of ``ways`` classes, ``shots`` support and
    ``query_shots`` = 1 query image per class, adapted with ``eval_steps`` = 50 inner steps of
    ``eval_batch_size`` support images (the official ``evaluate``).  ``minibatches`` = "epochs":
    training and test minibatches read each task's shuffled images in order, as the official code.
    """

    train: List[str] = field(default_factory=list)
    test: str = ""
    ways: int = 5
    shots: List[int] = field(default_factory=lambda: [1])
    iterations: int = 100000
    meta_batch_size: int = 5
    inner_steps: int = 5
    inner_batch_size: int = 10
    inner_lr: float = 1e-3
    train_shots: int = 10
    outer_lr: float = 1.0
    outer_lr_final: float = 0.0
    eval_steps: int = 50
    eval_batch_size: int = 5
    # the official code's --eval-samples (openai/supervised-reptile args.py: 10000 test tasks, never
    # lowered by the paper's commands); the paper's confidence intervals are over that many
    eval_tasks: int = 10000
    query_shots: int = 1
    transductive: bool = False
    validate_every: int = 1000
    validation_tasks: int = 50
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    checkpoint_every: int = 1000
    threads: int = 0
    # tasks drawn by global index, as under torchrun: one process trains what N processes train
    indexed_tasks: bool = False
    # inner minibatches, training and test: "epochs" (each task's images shuffled and read in order,
    # as the official code's _mini_batches; the default since session 21: 5-way 1-shot +7.0 and +4.0
    # points over "fresh" at 800 meta-steps, seeds 0 and 1, bench/results/omniglot_minibatches_cpu*.json)
    # or "fresh" (each step's drawn anew, as the Python API's default)
    minibatches: str = "epochs"
    # the inner Adam's state: "fresh" per task (tasks batched) or "carried" from task to task as the
    # official code keeps one optimizer (tasks one after another: backend reference)
    adam_state: str = "fresh"
    # the net and the pixels: "torch" / "area" (PyTorch's layers; area-averaged images, strokes 1 on 0)
    # or "official" (TensorFlow's padding, BatchNorm ε and initialisation; nearest-neighbour
    # images, white 1 and ink 0), as the official code builds and reads them
    net: str = "torch"
    pixels: str = "area"
    # how characters are split between training and test: "alphabets" (--test's alphabets that are
    # not in --train's, the default) or "official" (--train and --test read together and split by
    # character as the official code: train_characters of them drawn by Python's random seeded
    # with split_seed, the official --seed's default 0; the rest are the test set)
    split: str = "alphabets"
    split_seed: int = 0
    train_characters: int = OFFICIAL_TRAIN_CHARACTERS

    def __post_init__(self) -> None:
        if isinstance(self.train, (str, os.PathLike)):
            self.train = [self.train]
        self.train = [str(p) for p in self.train]
        if not self.train:
            raise ValueError("train: give at least one Omniglot folder or zip to meta-train on")
        if "" in self.train:
            # Path("") is the current folder: an unset shell variable trained on whatever was there,
            # and config.json recorded "" for a later --resume to read elsewhere (QA82)
            raise ValueError("train: an empty path would read the current folder; give the Omniglot folder or zip")
        self.split = check_choice("split", self.split, SPLITS)
        if self.split != "official":
            for name, default in (("split_seed", 0), ("train_characters", OFFICIAL_TRAIN_CHARACTERS)):
                if getattr(self, name) != default:  # it would do nothing, and config.json would record it
                    raise ValueError(f"{name} {getattr(self, name)} draws the official split by character: give "
                                     f"split='official' with it, or drop it")
        if self.split == "official" and self.test in ("", None):
            self.test = ""  # --split official: --train may hold every alphabet
        elif not isinstance(self.test, (str, os.PathLike)) or not str(self.test):
            raise ValueError("test: give the Omniglot folder or zip to test on")
        self.test = str(self.test)
        if isinstance(self.shots, Integral):
            self.shots = [self.shots]
        self.shots = list(self.shots)
        if not self.shots:
            raise ValueError("shots: give at least one K")
        self.shots = [check_int("shots", k, 1) for k in self.shots]
        for name, minimum in (("ways", 2), ("iterations", 1), ("meta_batch_size", 1), ("inner_steps", 1),
                              ("inner_batch_size", 1), ("train_shots", 1), ("eval_steps", 1),
                              ("eval_batch_size", 1), ("eval_tasks", 1), ("query_shots", 1),
                              ("validate_every", 0), ("validation_tasks", 1), ("seed", 0),
                              ("checkpoint_every", 0), ("threads", 0), ("split_seed", 0),
                              ("train_characters", 1)):
            setattr(self, name, check_int(name, getattr(self, name), minimum))  # numpy ints as ints
        check_seed(self.seed)
        for name in ("inner_lr", "outer_lr"):
            setattr(self, name, check_float(name, getattr(self, name)))
        self.outer_lr_final = check_float("outer_lr_final", self.outer_lr_final, allow_zero=True)
        if self.inner_batch_size > self.ways * self.train_shots:
            raise ValueError(f"inner_batch_size {self.inner_batch_size} exceeds a training task's "
                             f"{self.ways} × {self.train_shots} images")
        if self.eval_batch_size > self.ways * min(self.shots):
            raise ValueError(f"eval_batch_size {self.eval_batch_size} exceeds the support set of "
                             f"{self.ways} × {min(self.shots)} images")
        self.transductive = check_bool("transductive", self.transductive)  # numpy's bool too, as a bool
        self.indexed_tasks = check_bool("indexed_tasks", self.indexed_tasks)
        self.minibatches = check_minibatches(self.minibatches)
        for name in ("backend", "device"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string")
            # numpy's str_ (and a str-valued Enum) as the plain str it equals (QA47)
            setattr(self, name, str.__str__(getattr(self, name)))
        if self.adam_state == "carried" and self.backend not in ("auto", "reference"):
            # in the library's words; the CLI turns adam_state=carried into --adam-state carried (QA66:
            # the flag was written out too, and then appeared twice)
            raise ValueError(f"adam_state=carried runs the tasks one after another on backend reference; got "
                             f"backend={self.backend}: leave backend as auto or give reference")
        self.adam_state = check_adam_state(self.adam_state, "adam", "reference")
        self.net = check_choice("net", self.net, NETS)
        self.pixels = check_choice("pixels", self.pixels, PIXELS)


#: ``--split``: by alphabet (the default) or the official code's split by character
SPLITS = ("alphabets", "official")


def omniglot_preset(ways: int) -> Dict[str, Any]:
    """The paper's settings for ``ways``-way Omniglot (5-way values for ways other than 20)."""
    if ways == 20:
        return dict(ways=20, inner_batch_size=20, inner_steps=10, inner_lr=5e-4, iterations=200000,
                    eval_batch_size=10)
    return dict(ways=ways, inner_batch_size=10, inner_steps=5, inner_lr=1e-3, iterations=100000,
                eval_batch_size=5)


def _tasks(what: str, data, **settings) -> Omniglot:
    """``Omniglot(data, **settings)``; its ValueError (too few classes or images) says which of the
    job's task sets, and with which settings, ``what``, cannot be drawn (the family's own words
    named neither the set nor --train-shots)."""
    try:
        return Omniglot(data, **settings)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


#: ``--net``: "torch" (``OmniglotConvNet``'s defaults) or "official" (``OmniglotConvNet.official``)
NETS = ("torch", "official")


def _net(config: OmniglotConfig) -> OmniglotConvNet:
    return OmniglotConvNet.official(config.ways) if config.net == "official" else OmniglotConvNet(config.ways)


def _trainer(config: OmniglotConfig, model) -> Reptile:
    return Reptile(model, inner_lr=config.inner_lr, inner_steps=config.inner_steps,
                   inner_batch_size=config.inner_batch_size, outer_lr=config.outer_lr,
                   outer_lr_final=config.outer_lr_final, loss="cross_entropy",
                   inner_optimizer="adam", minibatches=config.minibatches, adam_state=config.adam_state,
                   # a carried Adam state runs the tasks one after another: on backend reference
                   backend="reference" if config.adam_state == "carried" else config.backend)


def _with_threads(threads: int, fn):
    if not threads:
        return fn()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


def _plot_curves(losses: List[float], validation: List[dict], path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from .plots import save_figure

    fig = Figure(figsize=(9.6, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    y = np.asarray(losses, dtype=np.float64)
    if len(y):
        ax.plot(np.arange(1, len(y) + 1), y, alpha=0.3, label="per meta-step")
        w = max(1, min(100, len(y)))
        if w > 1:
            ax.plot(np.arange(w, len(y) + 1), np.convolve(y, np.ones(w) / w, mode="valid"),
                    label=f"moving mean ({w})")
        ax.legend()
    ax.set_xlabel("meta-step")
    ax.set_ylabel("inner-loop cross-entropy")
    ax2 = fig.add_subplot(1, 2, 2)
    if validation:
        it = [v["iteration"] for v in validation]
        acc = [100 * v["accuracy"] for v in validation]
        ci = [100 * (v["ci95"] or 0.0) for v in validation]
        ax2.errorbar(it, acc, yerr=ci, marker="o", capsize=3)
    ax2.set_xlabel("meta-step")
    ax2.set_ylabel("validation accuracy (%), held-out alphabets")
    fig.tight_layout()
    save_figure(fig, path)


def run_omniglot(config: OmniglotConfig, out: os.PathLike, *, progress: bool = True,
                 resume: Optional[os.PathLike] = None, log=print) -> dict:
    """Meta-train on ``config.train``, test on ``config.test``'s held-out alphabets, write ``out``.

    Writes ``metrics.json`` (``test_accuracy`` a fraction for ``shots[0]``, ``test_accuracy_ci95``,
    ``results`` per K, the pixel 1-NN baseline on the same episodes, ``train_alphabets``,
    ``test_alphabets``, ``train_seconds``), ``config.json``, ``model.pt`` (state_dict + config),
    ``learning_curve.png``, ``validation.json`` (when a validation ran: every ``validate_every``
    meta-steps) and ``checkpoint.pt`` (every
    ``checkpoint_every`` meta-steps, at the end and on SIGINT/SIGTERM; ``resume`` continues
    exactly).  Returns the metrics.
    """
    if not isinstance(config, OmniglotConfig):
        raise TypeError(f"config must be an OmniglotConfig, got {type(config).__name__}")
    check_threads(config.threads)
    problem = _check_device(config.device, "device")  # else torch's RuntimeError, from deep inside
    if problem:
        raise ValueError(problem)
    with removed_if_left_empty(out):  # a bad --train/--test path leaves no empty --out behind
        out = prepare_directory(out, "output directory")
        from .distributed import setup_from_env

        # Under torchrun (WORLD_SIZE > 1) this joins the job: gloo on the CPU, NCCL on cuda:LOCAL_RANK.
        context = setup_from_env(device=config.device)
        quiet = log if context.is_main else (lambda message: None)  # rank 0 alone reports
        try:
            return _with_threads(config.threads, lambda: _run(config, out, context.device, progress, resume,
                                                              quiet, context))
        finally:
            if not context.failed:
                context.close()


def read_validation(path: Path, start: int, log) -> List[dict]:
    """The validation points of ``path`` (``validation.json`` beside the checkpoint resumed) up to
    meta-step ``start``.  Monitoring only: a file that is damaged or not the job's (not a list of
    ``{"iteration": int, ...}``) is reported through ``log`` and the history restarts empty, so it
    never stops a resume (it failed with json's "Expecting ',' delimiter", naming no file, or a
    KeyError traceback); the training itself resumes exactly either way."""
    if not path.exists():
        return []
    try:
        points = json.loads(path.read_text())
        if not isinstance(points, list) or not all(
                isinstance(v, dict) and isinstance(v.get("iteration"), int) and not isinstance(v["iteration"], bool)
                for v in points):
            raise ValueError('not a list of {"iteration": int, ...} entries')
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log(f"note: {path} cannot be read ({exc}): the validation history before meta-step {start} is left out "
            f"(training resumes exactly all the same)")
        return []
    return [v for v in points if v["iteration"] <= start]


def _official_split_tasks(config: OmniglotConfig, log):
    """``(training tasks, {K: test tasks})`` of ``--split official``: --train and --test read
    together (the official code's one folder of all alphabets), split by character with
    ``official_character_split``; training characters with their rotations, test ones without."""
    data = load_omniglot_images(config.train + ([config.test] if config.test else []), pixels=config.pixels)
    try:
        train_chars, test_chars = official_character_split(data.characters, seed=config.split_seed,
                                                           n_train=config.train_characters)
    except ValueError as exc:
        raise ValueError(f"--split official with train_characters {config.train_characters}: {exc}") from None
    log(f"official split (split_seed {config.split_seed}): {len(train_chars)} training characters "
        f"and {len(test_chars)} test characters of {len(data.characters)}, from {len(data.alphabets)} alphabets")
    train_dist = _tasks(f"training tasks from the official split's {len(train_chars)} training characters "
                        f"(ways={config.ways}, train_shots={config.train_shots} images per class)", data,
                        ways=config.ways, shots=config.train_shots, query_shots=0, rotations=ROTATIONS,
                        characters=train_chars)
    test_sets = {k: _tasks(f"{k}-shot test tasks from the official split's {len(test_chars)} test characters "
                           f"(ways={config.ways}, shots={k}, query_shots={config.query_shots})", data,
                           ways=config.ways, shots=k, query_shots=config.query_shots, characters=test_chars)
                 for k in config.shots}
    return train_dist, test_sets


def check_omniglot_memory(config: OmniglotConfig, device: torch.device, world_size: int = 1) -> None:
    """``MemoryError`` before loading and training when one meta-step cannot fit in this machine's
    free memory (CPU): Linux hands memory out as it is filled, so a ``--meta-batch-size`` whose
    allocations each fit but not together was killed by the out-of-memory killer (exit 137, no
    message) instead of refused (QA77).  A lower bound: this process's share of the meta-batch ×
    (its images and labels + one adapted copy of the net's parameters, which every backend holds
    per task for the outer update)."""
    from .jobs import free_memory_for

    avail = free_memory_for(device)
    if avail is None:
        return
    share = config.meta_batch_size // max(int(world_size), 1)
    images = config.ways * config.train_shots
    n_params = sum(p.numel() for p in _net(config).parameters())
    need = share * (images * (4 * 28 * 28 + 8) + 4 * n_params)
    if need > avail:
        raise MemoryError(f"a meta-step needs at least {need / 2**30:.1f} GiB ({share} tasks of {images} images "
                          f"and a copy of the net's {n_params} parameters each), more than the "
                          f"{avail / 2**30:.1f} GiB this machine has free")


def _run(config: OmniglotConfig, out: Path, device, progress: bool, resume, log, context) -> dict:
    if context.is_main:
        check_omniglot_memory(config, device, context.world_size)
    t_load = time.perf_counter()
    if config.split == "official":
        train_dist, test_sets = _official_split_tasks(config, log)
        train_alphabets, test_alphabets = train_dist.alphabets, test_sets[config.shots[0]].alphabets
    else:
        train_data = load_omniglot_images(config.train, pixels=config.pixels)
        test_data = load_omniglot_images([config.test], pixels=config.pixels)
        train_alphabets = train_data.alphabets
        test_alphabets = [a for a in test_data.alphabets if a not in set(train_alphabets)]
        if not test_alphabets:
            raise ValueError(f"every alphabet of --test {config.test} is also in the training data "
                             f"({train_alphabets}): nothing is left to test on")
        log(f"train alphabets ({len(train_alphabets)}): {', '.join(train_alphabets)}")
        log(f"test alphabets ({len(test_alphabets)}, training alphabets removed): {', '.join(test_alphabets)}")
        train_dist = _tasks(f"training tasks from --train (ways={config.ways}, train_shots={config.train_shots} "
                            f"images per class)", train_data, ways=config.ways, shots=config.train_shots,
                            query_shots=0, rotations=ROTATIONS)
        test_sets = {k: _tasks(f"{k}-shot test tasks from --test's held-out alphabets (ways={config.ways}, "
                               f"shots={k}, query_shots={config.query_shots})", test_data, ways=config.ways,
                               shots=k, query_shots=config.query_shots, alphabets=test_alphabets)
                     for k in config.shots}
    load_s = time.perf_counter() - t_load

    torch.manual_seed(config.seed)
    model = _net(config).to(device)
    trainer = _trainer(config, model)

    start = 0
    validation: List[dict] = []
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved_test = ckpt.get("extra", {}).get("split_test_characters")
        now_test = ["/".join(c) for c in test_sets[config.shots[0]].characters]
        if config.split == "official" and saved_test is not None and saved_test != now_test:
            # another pool of characters shuffles into another split: the resumed run would train on
            # characters of the run's test set (QA52), which its accuracy would then count
            raise ValueError(f"the official split of --train {config.train} and --test {config.test or '(none)'} "
                             f"is not the checkpoint's run's ({len(saved_test)} test characters, now "
                             f"{len(now_test)}, {len(set(saved_test) ^ set(now_test))} of them different): "
                             f"resume with the run's --train and --test data")
        saved_trained = ckpt.get("extra", {}).get("trained_alphabets")
        if config.split != "official" and isinstance(saved_trained, list):
            # another --train on resume: the held-out alphabets are --test's minus the *new* training
            # alphabets, so an alphabet the checkpoint's run trained on could be tested on (QA80)
            seen = sorted(set(saved_trained) & set(test_alphabets))
            if seen:
                raise ValueError(f"the checkpoint's run trained on the alphabets {seen}, which --train "
                                 f"{config.train} lacks and --test {config.test} would test on as held-out "
                                 f"alphabets: resume with the run's --train, or give a --test without them")
            # metrics.json lists every alphabet the model has trained on, before the resume too
            train_alphabets = sorted(set(train_alphabets) | set(saved_trained))
        start = ckpt["trainer"]["iteration"]
        if start > config.iterations:
            raise ValueError(f"the checkpoint {resume} is at meta-step {start}, beyond iterations={config.iterations}")
        validation = read_validation(Path(resolve_checkpoint_path(resume)).parent / VALIDATION_NAME, start, log)
    indexed = uses_indexed_tasks(config, context, ckpt)  # by global index: the same run on any number of ranks
    replaced_run_note(out, resume, True, log)
    old_points = Path(out) / VALIDATION_NAME
    if resume is None and context.is_main and old_points.is_file():
        # another run's points: a new run that validated nothing listed them as its own, and a later
        # --resume of this run read them as its history (QA72); kept beside, as checkpoint.prev.pt is
        os.replace(old_points, old_points.with_name("validation.prev.json"))

    k0 = config.shots[0]

    def evaluate(dist: Omniglot, n: int, seed: int):
        """``(result, pixel 1-NN result)`` over ``n`` episodes, drawn and scored ``EVAL_BLOCK`` at a
        time from one generator (10000 20-way 5-shot episodes at once were 3.8 GB of images, and
        6 GB more for the 1-NN distances)."""
        gen = torch.Generator().manual_seed(seed)
        preds, nn_preds, labels = [], [], []
        for start in range(0, n, EVAL_BLOCK):
            episodes = dist.sample_episodes(min(EVAL_BLOCK, n - start), generator=gen, device=device)
            preds.append(evaluate_episodes(trainer, episodes, steps=config.eval_steps,
                                           batch_size=min(config.eval_batch_size, episodes.support.n_points),
                                           transductive=config.transductive, generator=gen).predictions)
            nn_preds.append(nearest_neighbour_predictions(episodes).cpu())
            labels.append(episodes.query.y.cpu())
        labels = torch.cat(labels)
        return score_predictions(torch.cat(preds), labels), score_predictions(torch.cat(nn_preds), labels)

    def callback(iteration: int, metrics: Mapping) -> None:
        if config.validate_every and iteration % config.validate_every == 0:
            # Its own generator per validation point: the training stream is untouched, so a
            # resumed run is exactly an uninterrupted one.  Monitoring only, no model selection.
            # Under torchrun every rank validates (the same φ and episodes: the same result) and
            # rank 0 alone writes: ranks waiting for rank 0's validation in the next collective
            # failed when it took longer than the timeout, as if rank 0 had hung.
            result, _ = evaluate(test_sets[k0], config.validation_tasks, derived_seed(7919 * config.seed, iteration))
            if not context.is_main:
                return
            validation.append({"iteration": iteration, **result.as_dict()})
            atomic_write_json(out / VALIDATION_NAME, validation)
            if not progress:
                log(f"meta-step {iteration}: validation {k0}-shot accuracy {100 * result.accuracy:.1f} % "
                    f"± {100 * (result.ci95 if not math.isnan(result.ci95) else 0):.1f}")

    t0 = time.perf_counter()
    extra = {"job": OMNIGLOT_JOB, "job_config": asdict(config)}
    if config.split != "official":  # what a resume must keep out of its test set (QA80)
        extra["trained_alphabets"] = list(train_alphabets)
    if config.split == "official":  # what a resume must find again (its --train/--test may have moved)
        extra["split_test_characters"] = ["/".join(c) for c in test_sets[k0].characters]
    history = train_job(trainer, train_dist, iterations=config.iterations, meta_batch_size=config.meta_batch_size,
                        seed=config.seed, indexed=indexed, context=context, progress=progress, out=out,
                        checkpoint_every=config.checkpoint_every, resume=resume, extra=extra, callback=callback)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t0
    if not context.is_main:  # rank 0 alone evaluates and writes the outputs
        return {"rank": context.rank, "world_size": context.world_size}

    results = []
    t1 = time.perf_counter()
    for k in config.shots:
        result, nn = evaluate(test_sets[k], config.eval_tasks, derived_seed(config.seed, 1_000_003 + k))
        results.append({"ways": config.ways, "shots": k, **result.as_dict(),
                        "transductive": config.transductive,
                        "nearest_neighbour_accuracy": nn.accuracy,
                        "nearest_neighbour_ci95": None if math.isnan(nn.ci95) else nn.ci95})
        held_out = "held-out characters" if config.split == "official" else "held-out alphabets"
        log(f"{config.ways}-way {k}-shot on {held_out}: {100 * result.accuracy:.2f} % "
            f"± {100 * (result.ci95 if not math.isnan(result.ci95) else 0):.2f} over {config.eval_tasks} tasks "
            f"(pixel 1-NN: {100 * nn.accuracy:.2f} %)")
    eval_s = time.perf_counter() - t1
    first = results[0]
    metrics = {
        "test_accuracy": first["accuracy"], "test_accuracy_ci95": first["ci95"],
        "ways": config.ways, "shots": k0, "results": results,
        "train_alphabets": train_alphabets, "test_alphabets": test_alphabets,
        "train_characters": train_dist.n_characters, "train_classes": train_dist.n_classes,
        "test_characters": test_sets[k0].n_characters,
        "iterations": config.iterations, "resumed_from_iteration": start,
        "minibatches": config.minibatches, "adam_state": config.adam_state, "net": config.net,
        "pixels": config.pixels, "split": config.split,
        **({"split_seed": config.split_seed,
            "test_character_names": ["/".join(c) for c in test_sets[k0].characters]}
           if config.split == "official" else {}),
        "train_seconds": train_s, "eval_seconds": eval_s, "load_seconds": load_s,
        "ms_per_iteration": 1e3 * train_s / max(config.iterations - start, 1),
        "final_inner_loss": history["loss"][-1] if history["loss"] else None,
        "backend": trainer.backend.name, "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "world_size": context.world_size, "task_sampler": "indexed" if indexed else "generator",
        "protocol": ("adapt on the support set (inner Adam, " +
                     ("starting from the Adam state training left" if config.adam_state == "carried" else
                      "fresh state per task") + f"; {config.minibatches} minibatches), predict the query set; "
                     + ("transductive: all queries of a task in one batch" if config.transductive else
                        "non-transductive: each query image in a batch with the support set") +
                     "; BatchNorm on batch statistics"),
    }
    with outputs_after_training(out, trainer.iteration, "omniglot"):
        _plot_curves(history["loss"], validation, out / "learning_curve.png")
        cfg = {**asdict(config), "world_size": context.world_size}
        atomic_torch_save({"state_dict": model.state_dict(), "config": cfg, "model": "OmniglotConvNet",
                           "ways": config.ways,
                           # --adam-state carried: the test tasks start from the Adam state training left
                           "inner_optimizer": trainer.carried_adam_state}, out / "model.pt")
        atomic_write_json(out / "config.json", cfg)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


def load_trained(model_dir: os.PathLike, device="cpu"):
    """``(config, trainer)`` from an omniglot job's output folder (its ``model.pt``)."""
    if isinstance(model_dir, (str, os.PathLike)) and os.fspath(model_dir) == "":
        # Path("") is the current folder (QA82: its model.pt was used without a word)
        raise ValueError("model: an empty path would read the current folder; give the --out folder of a "
                         "`reptile-fast omniglot` run")
    path = Path(model_dir)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the --out folder of a `reptile-fast omniglot` run")
    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: one message
        raise ValueError(f"{path} is not a readable model file: {exc}") from None
    if not isinstance(saved, dict) or saved.get("model") != "OmniglotConvNet" or "config" not in saved:
        raise ValueError(f"{path} was not written by the omniglot job")
    known = {f.name for f in fields(OmniglotConfig)}
    # a model saved before --minibatches existed was trained (and tested) on fresh minibatches
    config = OmniglotConfig(**{"minibatches": "fresh", **{k: v for k, v in saved["config"].items() if k in known}})
    model = _net(config).to(device)
    model.load_state_dict(saved["state_dict"])
    trainer = _trainer(config, model)
    if config.adam_state == "carried":
        # the Adam state training left, which every test task starts from (through the trainer's
        # checked restore: shapes and finiteness; the model's own parameters, unchanged)
        trainer.load_state_dict({**trainer.state_dict(), "inner_optimizer": saved.get("inner_optimizer")})
    return config, trainer


def run_omniglot_runs(runs: os.PathLike, model_dir: os.PathLike, out: Optional[os.PathLike] = None, *,
                      seed: int = 0, transductive: Optional[bool] = None, log=print,
                      minibatches: Optional[str] = None, threads: Optional[int] = None) -> dict:
    """Adapt a trained model on each official run's 20 training images, classify its 20 test
    images; write ``runs_metrics.json`` (``error_rate``: the mean over runs, a fraction, and
    each run's error) into ``out`` (default: ``model_dir``).  Raises ``ValueError`` for a model
    trained with another number of ways than the runs'.  ``threads``: CPU threads (default: the
    model's run's ``threads``, at most this machine's CPUs; 0: torch's default).  Raises
    ``ValueError`` for ``threads`` above this machine's CPUs."""
    seed = check_int("seed", seed, 0)
    check_seed(seed)
    if transductive is not None:
        # as a plain bool: numpy's bool would pass the evaluation and then fail runs_metrics.json's write (QA56)
        transductive = check_bool("transductive", transductive)
    if threads is not None:
        threads = check_int("threads", threads, 0)
        check_threads(threads)
    config, trainer = load_trained(model_dir)
    if threads is None:
        # the model may come from a bigger machine: its count here would oversubscribe (or, far
        # beyond the CPUs, crash inside OpenMP), so it is capped, with a note
        threads, cpus = config.threads, os.cpu_count() or 1
        if threads > cpus:
            log(f"note: the model's run used --threads {threads}; this machine has {cpus} CPUs: "
                f"running with {cpus}")
            threads = cpus
    return _with_threads(threads, lambda: _official_runs(runs, model_dir, out, config, trainer, seed=seed,
                                                         transductive=transductive, log=log,
                                                         minibatches=minibatches))


def _official_runs(runs, model_dir, out, config, trainer, *, seed, transductive, log, minibatches) -> dict:
    # checked before the evaluation, named like the omniglot job's --out
    out_dir = out if out is not None else model_dir
    # (an error up to the write, e.g. runs of other ways, leaves no empty --out behind)
    with removed_if_left_empty(out_dir):
        out_dir = prepare_directory(out_dir, "output directory")
        episodes, names = load_official_runs(runs, pixels=config.pixels)
        if config.ways != episodes.ways:
            raise ValueError(f"the model in {model_dir} was trained for {config.ways}-way tasks; the official "
                             f"runs are {episodes.ways}-way: train one with --ways {episodes.ways}")
        transductive = config.transductive if transductive is None else transductive
        minibatches = config.minibatches if minibatches is None else check_minibatches(minibatches)
        gen = torch.Generator().manual_seed(seed)
        result = evaluate_episodes(trainer, episodes, steps=config.eval_steps,
                                   batch_size=min(config.eval_batch_size, episodes.support.n_points),
                                   transductive=transductive, generator=gen, minibatches=minibatches)
        nn = score_predictions(nearest_neighbour_predictions(episodes), episodes.query.y)
        per_run = {n: 1.0 - float(a) for n, a in zip(names, result.per_task)}
        metrics = {"error_rate": 1.0 - result.accuracy, "error_rate_ci95": result.as_dict()["ci95"],
                   "per_run_error": per_run, "nearest_neighbour_error_rate": 1.0 - nn.accuracy,
                   "transductive": transductive, "minibatches": minibatches, "eval_steps": config.eval_steps,
                   "seed": seed, "adam_state": config.adam_state, "net": config.net, "pixels": config.pixels,
                   "split": config.split, "model": str(model_dir), "runs": str(runs)}
        if config.split == "official":
            # the runs' characters come from the evaluation alphabets, which the official split trains on too
            log(f"note: the model in {model_dir} was trained with --split official, on characters of every "
                f"alphabet: some of the runs' characters may have been among them, so this is not a "
                f"held-out-alphabet result")
        for n in names:
            log(f"{n}: error {100 * per_run[n]:.1f} %")
        log(f"error rate over {len(names)} runs: {100 * metrics['error_rate']:.2f} % "
            f"(pixel 1-NN: {100 * metrics['nearest_neighbour_error_rate']:.2f} %)")
        atomic_write_json(out_dir / "runs_metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------- command line
_FLAGS = ("ways", "shots", "iterations", "meta_batch_size", "inner_steps", "inner_batch_size", "inner_lr",
          "train_shots", "outer_lr", "outer_lr_final", "eval_steps", "eval_batch_size", "eval_tasks",
          "query_shots", "transductive", "validate_every", "validation_tasks", "seed", "device", "backend",
          "checkpoint_every", "threads", "indexed_tasks", "minibatches", "adam_state", "net", "pixels",
          "split", "split_seed", "train_characters")


def add_parser(subparsers) -> None:
    """Register ``omniglot`` and ``omniglot-runs`` on the CLI's subparsers."""
    import argparse

    from .backends import BACKENDS

    from .validation import argparse_number as _number

    _positive_int, _nonneg_int = _number(int, allow_zero=False), _number(int, allow_zero=True)
    _positive_float, _nonneg_float = _number(float, allow_zero=False), _number(float, allow_zero=True)

    d = OmniglotConfig(train=["-"], test="-")
    p = subparsers.add_parser(
        "omniglot", help="meta-train the paper's conv net on Omniglot and test few-shot accuracy",
        description="Meta-train on --train's alphabets (with 90° rotations), test N-way K-shot on "
                    "--test's alphabets that are not in the training data, write metrics, model, "
                    "learning curve and resumable checkpoints into --out. Defaults are the paper's "
                    "protocol for --ways 5, and for --ways 20 its 20-way settings.")
    p.add_argument("--train", action="append", metavar="PATH",
                   help="Omniglot folder or zip to meta-train on (repeatable)")
    p.add_argument("--test", metavar="PATH", help="Omniglot folder or zip to test on (with --split official: read "
                   "with --train and split by character)")
    p.add_argument("--ways", type=_positive_int, help=f"N (default {d.ways}; 20 selects the 20-way preset)")
    p.add_argument("--shots", type=_positive_int, nargs="+", help="K of the tests; several K are all "
                   "tested, the first is metrics.json's test_accuracy (default 1)")
    p.add_argument("--iterations", type=_positive_int, help="meta-steps (default 100000; 200000 at 20-way)")
    p.add_argument("--meta-batch-size", type=_positive_int, help=f"(default {d.meta_batch_size})")
    p.add_argument("--inner-steps", type=_positive_int, help="(default 5; 10 at 20-way)")
    p.add_argument("--inner-batch-size", type=_positive_int, help="(default 10; 20 at 20-way)")
    p.add_argument("--inner-lr", type=_positive_float, help="inner Adam lr, β1 = 0 (default 1e-3; 5e-4 at 20-way)")
    p.add_argument("--train-shots", type=_positive_int, help=f"images per class in training tasks (default {d.train_shots})")
    p.add_argument("--outer-lr", type=_positive_float, help=f"ε (default {d.outer_lr})")
    p.add_argument("--outer-lr-final", type=_nonneg_float, help=f"ε annealed linearly to this (default {d.outer_lr_final})")
    p.add_argument("--eval-steps", type=_positive_int, help=f"adaptation steps at test time (default {d.eval_steps})")
    p.add_argument("--eval-batch-size", type=_positive_int, help="support images per adaptation step (default 5; 10 at 20-way)")
    p.add_argument("--eval-tasks", type=_positive_int, help=f"test tasks (default {d.eval_tasks})")
    p.add_argument("--query-shots", type=_positive_int, help=f"query images per class (default {d.query_shots})")
    # --no-transductive too: a resumed transductive run can be turned back (QA60)
    p.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=None,
                   help="predict all query images of a task in one batch (default: each with the support set; "
                        "on --resume, as the run's)")
    p.add_argument("--validate-every", type=_nonneg_int, help=f"meta-steps between validations, 0 = none (default {d.validate_every})")
    p.add_argument("--validation-tasks", type=_positive_int, help=f"(default {d.validation_tasks})")
    p.add_argument("--seed", type=_nonneg_int, help=f"(default {d.seed})")
    p.add_argument("--device", help=f"cpu or cuda (default {d.device})")
    p.add_argument("--backend", choices=["auto", *sorted(BACKENDS)], help=f"(default {d.backend})")
    p.add_argument("--threads", type=_nonneg_int, help="CPU threads, 0 = torch's default (default 0)")
    p.add_argument("--checkpoint-every", type=_nonneg_int, metavar="N",
                   help=f"write OUT/checkpoint.pt every N meta-steps; 0: only at the end and on Ctrl-C/SIGTERM "
                        f"(default {d.checkpoint_every})")
    p.add_argument("--indexed-tasks", action="store_true", default=None,
                   help="draw task j of meta-step t from (seed, t, j), as under torchrun (always there): one "
                        "process then trains what N processes train (default: one random stream)")
    p.add_argument("--minibatches", choices=list(MINIBATCHES),
                   help="inner minibatches in training and test: fresh (each step's drawn anew) or epochs (each "
                        "task's images shuffled and read in order, reshuffled when used up, as the official code) "
                        f"(default {d.minibatches})")
    p.add_argument("--adam-state", choices=list(ADAM_STATES),
                   help="the inner Adam's state: fresh for every task (tasks batched), or carried from task to "
                        "task and meta-step to meta-step as the official code's one optimizer (tasks one after "
                        f"another, backend reference; the tests start from the state training left) "
                        f"(default {d.adam_state})")
    p.add_argument("--net", choices=list(NETS),
                   help="torch: the conv net with PyTorch's layers; official: TensorFlow's 'same' padding, "
                        f"BatchNorm eps 1e-3 and Glorot initialisation, as the official code (default {d.net})")
    p.add_argument("--pixels", choices=list(PIXELS),
                   help="area: images area-averaged to 28x28, strokes 1 on 0; official: nearest-neighbour, white 1 "
                        f"and ink 0, as the official code reads them; omniglot-runs reads the runs so too "
                        f"(default {d.pixels})")
    p.add_argument("--split", choices=list(SPLITS),
                   help="alphabets: train on --train's alphabets, test on --test's others; official: read --train "
                        "and --test together (--test optional) and split them by character as the official code: "
                        "--train-characters of them drawn with --split-seed for training, the rest for testing "
                        f"(default {d.split})")
    p.add_argument("--split-seed", type=_nonneg_int,
                   help=f"--split official's draw: the official code's --seed (default {d.split_seed})")
    p.add_argument("--train-characters", type=_positive_int,
                   help=f"--split official's training characters (default {d.train_characters} of all 1623)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its stored settings "
                   "(flags given as well override them, except --ways, --seed, --net, --pixels and the "
                   "split's, which must be the run's)")
    p.add_argument("--out", help="output directory (default runs/omniglot, or DIR with --resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    r = subparsers.add_parser("omniglot-runs", help="the 20 official one-shot runs' error of a trained 20-way model",
                              description="Adapt a model trained by `reptile-fast omniglot --ways 20` on each "
                                          "of the 20 official runs' training images, classify the test images, "
                                          "print and write runs_metrics.json (error_rate, a fraction).")
    r.add_argument("--runs", required=True, metavar="PATH", help="all_runs.zip or its extracted folder")
    r.add_argument("--model", required=True, metavar="DIR", help="the --out folder of an omniglot run")
    r.add_argument("--out", metavar="DIR", help="where runs_metrics.json goes (default: --model)")
    r.add_argument("--seed", type=_nonneg_int, default=0, help="draws the adaptation minibatches (default 0)")
    r.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=None,
                   help="all query images of a task in one batch, or (--no-transductive) each with the "
                        "support set (default: as the model's run)")
    r.add_argument("--threads", type=_nonneg_int, default=None,
                   help="CPU threads, 0 = torch's default (default: the model's run's --threads)")
    r.add_argument("--minibatches", choices=list(MINIBATCHES), default=None,
                   help="adaptation minibatches: fresh or epochs (default: as the model's run)")


def _err(message: str, code: int = 2) -> int:
    print(f"reptile-fast: error: {message}", file=sys.stderr)
    return code


def _check_device(name: str, what: str = "--device") -> Optional[str]:
    """What is wrong with the job's device ``name`` (None: nothing), worded for ``what``."""
    try:
        check_device(name, what=what, allowed=("cpu", "cuda"), job="the omniglot job")
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def config_from_args(args):
    """``(OmniglotConfig, out, resume)`` for parsed ``omniglot`` arguments: the preset for
    ``--ways`` (or the checkpoint's settings with ``--resume``), overridden by the flags given."""
    given = {k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None}
    if args.train is not None:
        given["train"] = args.train
    if args.test is not None:
        given["test"] = args.test
    resume = None
    if args.resume is not None:
        try:
            resume = resolve_checkpoint_path(args.resume)
            extra = load_checkpoint(resume).get("extra", {})
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"--resume {args.resume}: {exc}") from None
        if extra.get("job") != OMNIGLOT_JOB or not isinstance(extra.get("job_config"), Mapping):
            raise ValueError(f"--resume {args.resume}: not a checkpoint of the omniglot job")
        saved_ways = extra["job_config"].get("ways")
        if "ways" in given and saved_ways is not None and given["ways"] != saved_ways:
            # the classifier's shape is the number of ways: the saved model cannot take another
            raise ValueError(f"--ways {given['ways']}: the checkpoint's model was trained for {saved_ways}-way "
                             f"tasks (its classifier has {saved_ways} outputs); resume with --ways {saved_ways} "
                             f"or start a new run")
        from .distributed import is_main

        # what a run saved before these flags existed used (their defaults then)
        saved_config = {"minibatches": "fresh", "adam_state": "fresh", "net": "torch", "pixels": "area",
                        "split": "alphabets", "split_seed": 0, "train_characters": OFFICIAL_TRAIN_CHARACTERS,
                        **extra["job_config"]}
        for key, what in (("net", "the checkpoint's model is the {!r} net (its layers and parameter names)"),
                          ("pixels", "the checkpoint's run read its images with --pixels {!r}, and a resumed "
                                     "run would train and test on images read another way"),
                          *((k, "the checkpoint's run split its characters with --" + k.replace("_", "-") +
                             " {!r}, and a resumed run would train and test on other characters")
                            for k in ("split", "split_seed", "train_characters"))):
            if key in given and given[key] != saved_config[key]:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} {given[key]}: " + what.format(saved_config[key]) +
                                 f"; resume without {flag}, or start a new run with it")
        saved_seed = extra["job_config"].get("seed")
        if "seed" in given and saved_seed is not None and given["seed"] != saved_seed:
            # as in the sine job: the checkpoint's random streams continue, a new seed would only be
            # recorded (and change the validation and test episodes mid-run)
            raise ValueError(f"--seed {given['seed']}: the checkpoint's run has seed {saved_seed}, and a resumed "
                             f"run continues its random streams; drop --seed, or start a new run with it")
        for key, value in given.items():
            saved = saved_config.get(key)
            if saved != value and is_main():  # as the sine job says it: the run then differs
                print(f"note: --{key.replace('_', '-')} {value} overrides the checkpoint's {saved!r}",
                      file=sys.stderr)
        settings = {**saved_config, **given}
        shots = settings.get("shots")
        shots = [shots] if isinstance(shots, int) else shots
        if "eval_batch_size" not in given and isinstance(settings.get("eval_batch_size"), int) \
                and isinstance(settings.get("ways"), int) and shots and all(isinstance(k, int) for k in shots):
            # As for a new run: an evaluation batch size not given as a flag is capped at the
            # support set (--shots 1 after a --shots 5 run); evaluation only, training unchanged.
            settings["eval_batch_size"] = min(settings["eval_batch_size"], settings["ways"] * min(shots))
        out = args.out if args.out is not None else str(resume.parent)
    else:
        if "train" not in given or ("test" not in given and given.get("split") != "official"):
            raise ValueError("omniglot needs --train PATH and --test PATH (or --resume DIR; with --split "
                             "official, --train PATH alone: every alphabet)")
        ways = given.get("ways", 5)
        preset = omniglot_preset(ways)
        # The preset's batch sizes are capped at what a task holds (fewer ways or shots than the
        # paper's; evaluation capped it there anyway); a batch size given as a flag is checked as given.
        preset["inner_batch_size"] = min(preset["inner_batch_size"],
                                         ways * given.get("train_shots", OmniglotConfig.train_shots))
        preset["eval_batch_size"] = min(preset["eval_batch_size"], ways * min(given.get("shots", [1])))
        settings = {**preset, **given}
        out = args.out if args.out is not None else "runs/omniglot"
    return OmniglotConfig(**settings), out, resume


def run_command(args) -> int:
    """Run ``omniglot`` or ``omniglot-runs`` from parsed arguments; returns the exit status."""
    from .distributed import DistributedError, is_main
    from .signals import TrainingInterrupted, sigterm_as_interrupt
    from .trainer import NonFiniteError
    from .validation import as_flags, out_of_memory_message, out_of_memory_or_raise

    flags = [f.name for f in fields(OmniglotConfig)]
    # the command's paths are left as they are in errors worded with flags (as_flags)
    paths = [getattr(args, k, None) for k in ("out", "resume", "test", "runs", "model")]
    paths += list(getattr(args, "train", None) or [])
    main_rank = is_main()  # under torchrun, rank 0 alone prints
    log = (lambda m: print(m, file=sys.stderr)) if main_rank else (lambda m: None)  # noqa: E731 - stdout: JSON
    if args.command == "omniglot-runs":
        try:
            metrics = run_omniglot_runs(args.runs, args.model, args.out, seed=args.seed,
                                        transductive=args.transductive, log=log,
                                        minibatches=args.minibatches, threads=args.threads)
        except (OSError, ValueError, TypeError) as exc:
            return _err(as_flags(str(exc), ("seed", "threads"), keep=paths))
        print(json.dumps(metrics, indent=2))
        return 0
    try:
        config, out, resume = config_from_args(args)
    except (OSError, ValueError, TypeError) as exc:
        return _err(as_flags(str(exc), flags, keep=paths))
    problem = _check_device(config.device)
    if problem:
        return _err(problem)
    oom_hint = (f"--meta-batch-size {config.meta_batch_size} with --inner-steps {config.inner_steps} and "
                f"--inner-batch-size {config.inner_batch_size} (training), or --eval-steps {config.eval_steps} "
                f"with --eval-batch-size {config.eval_batch_size} (validation and the final evaluation) does "
                f"not fit in this machine's memory; lower the one that is too large")
    try:
        with sigterm_as_interrupt(), library_warnings_as_notes(main_rank):
            # (SIGTERM after training, in the evaluation or the outputs: a message, exit 143)
            metrics = run_omniglot(config, out, progress=not args.no_progress, resume=resume, log=log)
    except TrainingInterrupted as exc:
        log(f"reptile-fast: stopped after meta-step {exc.iteration}; checkpoint written to {exc.checkpoint}.\n"
            f"Resume with: reptile-fast omniglot --resume {shlex.quote(str(out))}")
        return exc.exit_code
    except DistributedError as exc:
        return _err(f"{exc}{resume_hint(out)}", 4)
    except KeyboardInterrupt as exc:
        # a second Ctrl-C (stop at once) or one during the final evaluation: a traceback and death by
        # signal before, where the sine job says this; SIGTERM there (Terminated) exits 143
        return _err(f"interrupted without writing a new checkpoint; the last one in {out} (if any) is "
                    f"intact: continue with reptile-fast omniglot --resume {shlex.quote(str(out))}", getattr(exc, "exit_code", 130))
    except NonFiniteError as exc:
        return _err(flag_words_nonfinite(exc), 3) if main_rank else 3
    except (OSError, ValueError, TypeError) as exc:
        # the library's out-of-memory ValueErrors name its arguments: here the flags are what to lower
        return _err(isinstance(exc, ValueError) and out_of_memory_message(exc, oom_hint)
                    or as_flags(str(exc), flags, keep=paths))
    except (MemoryError, RuntimeError) as exc:
        return _err(out_of_memory_or_raise(exc, oom_hint))
    if not main_rank:
        return 0
    print(json.dumps(metrics, indent=2))
    written = [n for n in ("metrics.json", "config.json", "model.pt", "learning_curve.png", VALIDATION_NAME,
                           CHECKPOINT_NAME) if (Path(out) / n).is_file()]  # validation.json: only if one ran
    log(f"wrote {', '.join(written)} to {out}")
    return 0
