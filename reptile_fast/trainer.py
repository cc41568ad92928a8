"""``Reptile``: the trainer.  It owns φ (the model's parameters), the outer loop, the outer-step
schedule and validation; a backend (``reptile_fast.backends``) runs only the inner loops."""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .backends import InnerConfig, InnerResult, resolve_backend
from .losses import loss_name, resolve_loss
from .signals import DeferredSignals, TrainingInterrupted, signal_name
from .tasks.base import TaskBatch, sample_indices
from .validation import check_float, check_int

__all__ = ["Reptile", "NonFiniteError", "TrainingInterrupted"]

ALGORITHMS = ("reptile", "fomaml")
INNER_OPTIMIZERS = ("sgd", "adam")


class NonFiniteError(FloatingPointError):
    """A meta-step produced a NaN or infinite loss or update; φ was left as it was before it.

    Raised from ``fit``, it also names the last good checkpoint (``checkpoint``: its path or
    None, ``checkpoint_iteration``), which ``fit`` never overwrites with the failed state.
    """

    def __init__(self, message: str, *, iteration: Optional[int] = None,
                 checkpoint: Optional[str] = None, checkpoint_iteration: Optional[int] = None):
        super().__init__(message)
        self.iteration = iteration
        self.checkpoint = checkpoint
        self.checkpoint_iteration = checkpoint_iteration


def _positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    return check_float(name, value, allow_zero=allow_zero)


def _positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    return check_int(name, value, 0 if allow_zero else 1)


class Reptile:
    """Reptile meta-training of ``model`` in place (Nichol, Achiam, Schulman 2018).

    One meta-step: every task in the meta-batch starts from φ (the model's parameters) and takes
    ``inner_steps`` optimizer steps on minibatches of ``inner_batch_size`` of its points, giving
    φ̃_i; then ``φ ← φ + ε · mean_i(φ̃_i − φ)``.  With one task, SGD and the defaults this is
    exactly one iteration of the seed's ``reptile()``.

    Args:
        model: any ``nn.Module``; updated in place.  Its buffers (e.g. BatchNorm running
            statistics) are not meta-learned: as in the seed, each task trains a copy.
        inner_lr, inner_steps, inner_batch_size: the inner loop (seed: 0.02, 5, 10).
        outer_lr: ε, the interpolation step (seed: 0.1).
        outer_lr_final: if set, ε anneals linearly from ``outer_lr`` to this over ``fit``'s
            iterations (the paper's schedule).
        loss: "mse", "cross_entropy" or a callable ``(prediction, target) -> scalar``.
        backend: "auto", "reference", or any registered backend ("torch", "triton").
        inner_optimizer: "sgd" or "adam" (β1 = 0 by default, fresh state per task).
        algorithm: "reptile" or "fomaml" (meta-gradient on a final, separate minibatch).
        inner_grad_weights: ``(w_1, …, w_k)``, k = inner_steps: the outer direction becomes
            Σ w_i g_i of the inner gradients (paper §6.2).
        outer_optimizer: a ``torch.optim.Optimizer`` over the model's parameters, fed the mean
            pseudo-gradient (φ − φ̃ for Reptile) instead of the interpolation update.
        backend_options: keyword arguments for the named backend's constructor, e.g.
            ``{"precision": "tf32"}`` for "triton" (not allowed with "auto").
    """

    def __init__(self, model: nn.Module, *, inner_lr: float = 0.02, inner_steps: int = 5,
                 inner_batch_size: int = 10, outer_lr: float = 0.1,
                 outer_lr_final: Optional[float] = None, loss: Union[str, Callable] = "mse",
                 backend: str = "auto", inner_optimizer: str = "sgd", algorithm: str = "reptile",
                 inner_grad_weights: Optional[Sequence[float]] = None,
                 outer_optimizer: Optional[torch.optim.Optimizer] = None,
                 adam_betas=(0.0, 0.999), backend_options: Optional[dict] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to meta-learn")
        devices = {p.device for p in params}
        dtypes = {p.dtype for p in params}
        if len(devices) != 1:
            raise ValueError(f"model parameters must all be on one device, found {sorted(map(str, devices))}")
        if len(dtypes) != 1 or not params[0].is_floating_point():
            raise TypeError(f"model parameters must share one floating-point dtype, found {dtypes}")
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            # torch.optim skips them in the seed's loop while batched paths would train them:
            # rather than two answers, refuse.
            raise ValueError(f"model has frozen parameters (requires_grad=False): {frozen}; "
                             f"Reptile meta-learns every parameter — remove them or unfreeze them")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                    raise ValueError(f"model parameter {name} contains NaN or infinite values")
        self.model = model
        self.device = params[0].device
        self.dtype = params[0].dtype
        self.inner_lr = _positive_float("inner_lr", inner_lr)
        self.inner_steps = _positive_int("inner_steps", inner_steps)
        self.inner_batch_size = _positive_int("inner_batch_size", inner_batch_size)
        self.outer_lr = _positive_float("outer_lr", outer_lr)
        self.outer_lr_final = (None if outer_lr_final is None
                               else _positive_float("outer_lr_final", outer_lr_final, allow_zero=True))
        resolve_loss(loss)
        self.loss = loss
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if inner_grad_weights is not None:
            if algorithm != "reptile":
                raise ValueError("inner_grad_weights defines its own outer direction; use it with algorithm='reptile'")
            try:
                weights = tuple(float(w) for w in inner_grad_weights)
            except (TypeError, ValueError):
                raise TypeError("inner_grad_weights must be a sequence of numbers") from None
            if len(weights) != self.inner_steps:
                raise ValueError(f"inner_grad_weights must have inner_steps={self.inner_steps} entries, "
                                 f"got {len(weights)}")
            if not all(math.isfinite(w) for w in weights):
                raise ValueError("inner_grad_weights must be finite")
            inner_grad_weights = weights
        try:
            betas = tuple(float(b) for b in adam_betas)
        except (TypeError, ValueError):
            raise TypeError("adam_betas must be a pair of numbers") from None
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {adam_betas!r}")
        if outer_optimizer is not None:
            if not isinstance(outer_optimizer, torch.optim.Optimizer):
                raise TypeError(f"outer_optimizer must be a torch.optim.Optimizer, got {type(outer_optimizer).__name__}")
            opt_params = {id(p) for g in outer_optimizer.param_groups for p in g["params"]}
            if opt_params != {id(p) for p in params}:
                raise ValueError("outer_optimizer must optimise exactly the model's parameters")
            if outer_lr_final is not None:
                raise ValueError("outer_lr_final anneals the interpolation step; with outer_optimizer "
                                 "use a torch.optim.lr_scheduler instead")
        self.outer_optimizer = outer_optimizer
        self.config = InnerConfig(lr=self.inner_lr, optimizer=inner_optimizer, loss=loss,
                                  algorithm=algorithm, grad_weights=inner_grad_weights,
                                  adam_betas=betas)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        self.backend_name = backend
        if backend_options is not None and not isinstance(backend_options, dict):
            raise TypeError(f"backend_options must be a dict, got {type(backend_options).__name__}")
        self.backend = resolve_backend(backend, model, self.device, self.config, backend_options)
        self.iteration = 0
        self.total_iterations: Optional[int] = None
        self.last_compiled_stats: Optional[dict] = None  # fit(compiled=True)'s timing
        self._checked_shapes: set = set()

    # ------------------------------------------------------------------ validation
    def _check_tasks(self, tasks: TaskBatch, min_points: int) -> None:
        if not isinstance(tasks, TaskBatch):
            raise TypeError(f"tasks must be a reptile_fast.TaskBatch, got {type(tasks).__name__}")
        if tasks.device != self.device:
            raise ValueError(f"tasks are on {tasks.device} but the model is on {self.device}")
        if tasks.x.dtype != self.dtype:
            raise TypeError(f"tasks.x dtype {tasks.x.dtype} differs from the model's {self.dtype}")
        if tasks.n_points < min_points:
            raise ValueError(f"inner_batch_size ({min_points}) exceeds the tasks' points ({tasks.n_points})")
        name = loss_name(self.loss)
        if name == "mse" and tasks.is_classification:
            raise TypeError("loss 'mse' needs float targets [tasks, points, out]; got class labels")
        if name == "cross_entropy" and not tasks.is_classification:
            raise TypeError("loss 'cross_entropy' needs long class labels [tasks, points]; got float targets")
        key = (tuple(tasks.x.shape[2:]), tuple(tasks.y.shape[2:]), tasks.y.dtype,
               int(tasks.y.max()) if tasks.is_classification else None)
        if key in self._checked_shapes:
            return
        # One forward on a single point to catch shape mismatches that torch would broadcast
        # silently (MSE of [B, 1] against [B, 3]) or report from deep inside a layer.
        with torch.no_grad():
            probe_x = tasks.x[0, :2]
            was_training = self.model.training
            try:
                self.model.eval()
                out = self.model(probe_x)
            except Exception as exc:  # noqa: BLE001 - re-raised with the shapes that caused it
                raise ValueError(f"the model cannot take task inputs of shape {tuple(tasks.x.shape[2:])} "
                                 f"per point: {exc}") from exc
            finally:
                self.model.train(was_training)
        if name == "mse" and tuple(out.shape) != tuple(tasks.y[0, :2].shape):
            raise ValueError(f"model output per point {tuple(out.shape[1:])} does not match targets "
                             f"{tuple(tasks.y.shape[2:])}")
        if name == "cross_entropy":
            if out.dim() != 2:
                raise ValueError(f"cross_entropy needs logits [batch, classes]; the model gives {tuple(out.shape)}")
            if key[3] >= out.shape[1]:
                raise ValueError(f"class label {key[3]} out of range for a model with {out.shape[1]} outputs")
        if name is None:  # a callable loss: it must give one floating-point number per minibatch
            try:
                with torch.no_grad():
                    value = resolve_loss(self.loss)(out, tasks.y[0, :2])
            except Exception as exc:  # noqa: BLE001 - re-raised naming the loss
                raise ValueError(f"the loss callable failed on a model output {tuple(out.shape)} and targets "
                                 f"{tuple(tasks.y[0, :2].shape)}: {exc}") from exc
            if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.is_floating_point():
                raise TypeError("the loss callable must return a 0-dim floating-point tensor (the mean loss), got "
                                + (f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                                   else type(value).__name__))
        self._checked_shapes.add(key)

    def _plan_rows(self, steps: int) -> int:
        return steps + 1 if self.config.algorithm == "fomaml" else steps

    def _check_indices(self, indices: torch.Tensor, tasks: TaskBatch, rows: int) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype != torch.long:
            raise TypeError(f"indices must be torch.long, got {indices.dtype}")
        if indices.dim() != 3 or indices.shape[0] != tasks.n_tasks or indices.shape[1] != rows \
                or indices.shape[2] < 1:
            raise ValueError(f"indices must have shape [tasks={tasks.n_tasks}, steps={rows}, batch], "
                             f"got {tuple(indices.shape)}")
        if indices.device != self.device:
            raise ValueError(f"indices are on {indices.device} but the model is on {self.device}")
        if int(indices.min()) < 0 or int(indices.max()) >= tasks.n_points:
            raise ValueError(f"indices must lie in [0, {tasks.n_points}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return indices

    # ------------------------------------------------------------------ schedule
    def outer_lr_at(self, iteration: int, total: Optional[int] = None) -> float:
        """ε at ``iteration`` of ``total``: linear from ``outer_lr`` to ``outer_lr_final``."""
        total = total if total is not None else self.total_iterations
        if self.outer_lr_final is None or not total:
            return self.outer_lr
        frac = min(max(iteration / total, 0.0), 1.0)
        return frac * self.outer_lr_final + (1 - frac) * self.outer_lr

    # ------------------------------------------------------------------ training
    def meta_step(self, tasks: TaskBatch, indices: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None,
                  outer_lr: Optional[float] = None) -> Dict[str, float]:
        """One outer update whose meta-batch is ``tasks``.

        Args:
            tasks: ``T`` tasks on the model's device.
            indices: long ``[T, inner_steps, B]`` minibatch plan (``inner_steps + 1`` rows for
                FOMAML); drawn with ``sample_indices`` from ``generator`` when None.
            outer_lr: ε for this step; by default the schedule's value.

        Returns:
            ``{"loss": mean inner-loop minibatch loss, "outer_lr": ε, "iteration": i}``.
        """
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        rows = self._plan_rows(self.inner_steps)
        if indices is None:
            indices = sample_indices(tasks.n_tasks, rows, tasks.n_points, self.inner_batch_size,
                                     generator=generator, device=self.device)
        else:
            self._check_indices(indices, tasks, rows)
        eps = self.outer_lr_at(self.iteration) if outer_lr is None else _positive_float("outer_lr", outer_lr)
        result = self.backend.inner_loop(self.model, tasks, indices, self.config)
        self._outer_update(result, eps)
        self.iteration += 1
        return {"loss": float(result.losses.mean()), "outer_lr": eps, "iteration": self.iteration}

    @torch.no_grad()
    def _outer_update(self, result: InnerResult, eps: float) -> None:
        named = list(self.model.named_parameters())
        # The mean pseudo-gradient per parameter.  For Reptile the update is written as the seed
        # writes it, φ + ε·(φ̃ − φ), so that one task reproduces the seed bit for bit.
        if result.meta_grads is None:
            # mean_i(φ̃_i − φ), as compiled_step and the drop-in compute it; one task: the seed's φ̃ − φ
            deltas = [(result.params[n] - p).mean(0) for n, p in named]
        else:
            deltas = [-result.meta_grads[n].mean(0) for n, _ in named]
        finite = torch.stack([torch.isfinite(d).all() for d in deltas]).all() & torch.isfinite(result.losses).all()
        if not bool(finite):
            raise NonFiniteError(
                f"meta-step {self.iteration + 1}: non-finite inner loss or update (NaN/inf); the "
                f"parameters were left as they were before this step. Lower inner_lr/outer_lr or check the data.",
                iteration=self.iteration + 1)
        if self.outer_optimizer is not None:
            for (_, p), d in zip(named, deltas):
                p.grad = -d
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
        else:
            # φ += ε·d in one call: a Ctrl-C (handled between Python bytecodes) cannot land
            # half-way through the parameters.  Same arithmetic as the seed's p += ε·(φ̃ − φ).
            torch._foreach_add_([p for _, p in named], torch._foreach_mul(deltas, eps))

    def fit(self, task_distribution, iterations: int, *, meta_batch_size: int = 1,
            generator: Optional[torch.Generator] = None, progress: bool = True,
            callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
            checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
            checkpoint_every: Optional[int] = None,
            resume_from: Optional[Union[str, os.PathLike]] = None,
            checkpoint_extra: Optional[Mapping[str, Any]] = None,
            handle_signals: bool = True, compiled: bool = False) -> Dict[str, list]:
        """Meta-train for ``iterations`` meta-steps of ``meta_batch_size`` tasks each.

        Tasks come from ``task_distribution.sample(meta_batch_size, generator=..., device=...)``
        and plans from ``sample_indices`` with the same generator (the global RNG when None).
        ``callback(iteration, metrics)`` runs after every meta-step.  Continues from
        ``self.iteration`` (so a restored trainer resumes).  Returns ``{"loss": [...]}``: this
        call's losses, preceded by the checkpoint's when resuming.

        Checkpoints and exact resume:
            checkpoint_dir: write ``checkpoint_dir/checkpoint.pt`` (``reptile_fast.checkpoint``)
                at the end, on SIGINT/SIGTERM, and every ``checkpoint_every`` meta-steps if set.
            resume_from: a checkpoint file or directory: restore φ, the outer optimizer, the
                iteration, the loss history and every RNG (``generator``'s included) first, so
                that the run ends with exactly the parameters of an uninterrupted one.  Pass the
                same kind of ``generator`` as the original run (its state is overwritten).
            checkpoint_extra: the caller's data stored in every checkpoint (``"extra"``).
            handle_signals: with ``checkpoint_dir``, SIGINT/SIGTERM (main thread only) finish the
                current meta-step, write a checkpoint and raise ``TrainingInterrupted`` (a
                ``KeyboardInterrupt``); the previous handlers are restored afterwards.

        A non-finite meta-step raises ``NonFiniteError`` naming it; φ and the last checkpoint are
        left as they were (the failed state is never written).

        compiled: run the meta-steps on the compiled CPU path (``reptile_fast.compiled_step``):
            the same maths, in chunks of ``checkpoint_every`` (else 500) meta-steps per compiled
            call, with tasks and plans drawn a chunk at a time (another order than the default
            loop's, from the same distributions).  Checkpoints and signals are honoured at chunk
            ends; ``callback`` is called once per chunk with ``{"loss", "iteration"}``.  Raises
            ``UnsupportedModelError`` when the model/config/device is outside that path.
        """
        from .checkpoint import (CHECKPOINT_NAME, prepare_directory, remove_stale_temporaries,
                                 resolve_checkpoint_path, restore_checkpoint, save_checkpoint)

        if not hasattr(task_distribution, "sample") or not callable(task_distribution.sample):
            raise TypeError("task_distribution must have a sample(n_tasks, *, generator, device) method")
        _positive_int("iterations", iterations)
        _positive_int("meta_batch_size", meta_batch_size)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if checkpoint_every is not None:
            _positive_int("checkpoint_every", checkpoint_every)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir: where should checkpoints go?")
        if checkpoint_extra is not None and not isinstance(checkpoint_extra, Mapping):
            raise TypeError(f"checkpoint_extra must be a dict, got {type(checkpoint_extra).__name__}")
        # Paths are checked before anything changes, so a typo costs nothing.
        ckpt_dir = None if checkpoint_dir is None else prepare_directory(checkpoint_dir, "checkpoint_dir")
        if ckpt_dir is not None:
            remove_stale_temporaries(ckpt_dir)  # left by a run killed in the middle of a save
        history: Dict[str, list] = {"loss": []}
        last_saved: Optional[int] = None
        last_path: Optional[str] = None
        if resume_from is not None:
            ckpt = restore_checkpoint(self, resume_from, generator=generator)
            history["loss"] = [float(v) for v in ckpt["history"].get("loss", torch.zeros(0)).tolist()]
            saved_total = ckpt["trainer"]["total_iterations"]
            if self.outer_lr_final is not None and saved_total is not None and saved_total != iterations:
                warnings.warn(f"the checkpoint's run annealed the outer step over {saved_total} iterations, "
                              f"this fit over {iterations}: the result will differ from an uninterrupted run",
                              stacklevel=2)
            if ckpt_dir is not None:
                latest = ckpt_dir / CHECKPOINT_NAME
                if latest.exists() and latest.resolve() == resolve_checkpoint_path(resume_from).resolve():
                    last_saved, last_path = self.iteration, str(latest)
        self.total_iterations = iterations

        def save() -> None:
            nonlocal last_saved, last_path
            try:
                self._check_finite_parameters()  # never write a bad state over a good one
            except NonFiniteError as exc:
                raise self._non_finite_from_fit(exc, last_path, last_saved, ckpt_dir) from exc
            last_path = str(save_checkpoint(ckpt_dir, self, generator=generator, history=history,
                                            extra=checkpoint_extra))
            last_saved = self.iteration

        start = self.iteration
        if resume_from is None and start >= iterations:
            raise ValueError(f"iterations={iterations} is the total number of meta-steps, and this trainer has "
                             f"already taken {start}; pass a larger total to train further")
        if compiled:
            from .compiled_step import DEFAULT_CHUNK, check_compiled_supported, compiled_fit

            check_compiled_supported(self)
            prior = list(history["loss"])

            class _Stop(Exception):
                pass

            with DeferredSignals(enabled=handle_signals and ckpt_dir is not None) as signals:
                def on_chunk(iteration: int, losses: list) -> None:
                    history["loss"] = prior + losses
                    if callback is not None:
                        callback(iteration, {"loss": losses[-1], "iteration": iteration})
                    if checkpoint_every is not None and iteration % checkpoint_every == 0:
                        save()
                    if signals.received is not None:
                        raise _Stop

                try:
                    stats = compiled_fit(self, task_distribution, iterations, meta_batch_size=meta_batch_size,
                                         generator=generator, progress=progress,
                                         chunk_size=checkpoint_every or DEFAULT_CHUNK, callback=on_chunk)
                    self.last_compiled_stats = stats
                except _Stop:
                    pass
                except NonFiniteError as exc:
                    raise self._non_finite_from_fit(exc, last_path, last_saved, ckpt_dir) from exc
                self._finish_fit(signals, save, ckpt_dir, last_saved_fn=lambda: last_saved,
                                 last_path_fn=lambda: last_path, iterations=iterations)
            return history
        with DeferredSignals(enabled=handle_signals and ckpt_dir is not None) as signals:
            for _ in tqdm(range(start, iterations), disable=not progress, desc="meta-train",
                          initial=start, total=max(iterations, start)):
                tasks = task_distribution.sample(meta_batch_size, generator=generator, device=self.device)
                try:
                    metrics = self.meta_step(tasks, generator=generator)
                except NonFiniteError as exc:
                    raise self._non_finite_from_fit(exc, last_path, last_saved, ckpt_dir) from exc
                history["loss"].append(metrics["loss"])
                if callback is not None:
                    callback(self.iteration, metrics)
                if checkpoint_every is not None and self.iteration % checkpoint_every == 0:
                    save()
                if signals.received is not None:
                    break
            self._finish_fit(signals, save, ckpt_dir, last_saved_fn=lambda: last_saved,
                             last_path_fn=lambda: last_path, iterations=iterations)
        return history

    def _finish_fit(self, signals, save, ckpt_dir, *, last_saved_fn, last_path_fn, iterations) -> None:
        """The end of ``fit``: the final checkpoint, then ``TrainingInterrupted`` if a signal came."""
        if ckpt_dir is not None and last_saved_fn() != self.iteration:
            save()
        if signals.received is not None:
            name = signal_name(signals.received)
            raise TrainingInterrupted(
                f"training interrupted by {name} after meta-step {self.iteration} of {iterations}; "
                f"checkpoint written to {last_path_fn()}. Resume with "
                f"Reptile.fit(..., resume_from={str(ckpt_dir)!r}) "
                f"(or `reptile-fast sine --resume {ckpt_dir}` for the CLI's job)",
                signal_number=signals.received, iteration=self.iteration, checkpoint=last_path_fn())

    def _non_finite_from_fit(self, exc: NonFiniteError, last_path, last_saved, ckpt_dir) -> NonFiniteError:
        if ckpt_dir is None:
            where = "No checkpoint_dir was given, so no checkpoint exists."
        elif last_path is None:
            where = f"No checkpoint had been written to {ckpt_dir} yet in this run."
        else:
            where = (f"The last good checkpoint, {last_path} (meta-step {last_saved}), was kept; "
                     f"resume from it with fit(..., resume_from={str(ckpt_dir)!r}) after lowering "
                     f"inner_lr/outer_lr.")
        return NonFiniteError(f"{exc} {where}", iteration=exc.iteration, checkpoint=last_path,
                              checkpoint_iteration=last_saved)

    def _check_finite_parameters(self) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if not bool(torch.isfinite(p).all()):
                    raise NonFiniteError(f"after meta-step {self.iteration}: parameter {name} holds NaN/inf; "
                                         f"no checkpoint was written", iteration=self.iteration)

    # ------------------------------------------------------------------ state
    def hparams(self) -> Dict[str, Any]:
        """The trainer's hyper-parameters as plain values (stored in checkpoints)."""
        loss = loss_name(self.loss)
        if loss is None:
            loss = f"callable:{getattr(self.loss, '__qualname__', type(self.loss).__name__)}"
        c = self.config
        return {
            "inner_lr": self.inner_lr, "inner_steps": self.inner_steps,
            "inner_batch_size": self.inner_batch_size, "outer_lr": self.outer_lr,
            "outer_lr_final": self.outer_lr_final, "loss": loss, "inner_optimizer": c.optimizer,
            "algorithm": c.algorithm,
            "inner_grad_weights": None if c.grad_weights is None else list(c.grad_weights),
            "adam_betas": list(c.adam_betas), "backend": self.backend_name,
            "outer_optimizer": None if self.outer_optimizer is None else type(self.outer_optimizer).__name__,
            "model": type(self.model).__name__,
        }

    def state_dict(self) -> Dict[str, Any]:
        """Everything of the trainer a resumed run needs (the RNGs are the checkpoint's job).

        Returns ``{"model": model.state_dict() (parameters and buffers), "outer_optimizer":
        its state_dict or None, "iteration", "total_iterations", "config": hparams()}``.  Like
        ``nn.Module.state_dict`` the tensors are references: save or deep-copy to snapshot.
        """
        return {
            "model": self.model.state_dict(),
            "outer_optimizer": None if self.outer_optimizer is None else self.outer_optimizer.state_dict(),
            "iteration": self.iteration,
            "total_iterations": self.total_iterations,
            "config": self.hparams(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output.  Checks everything before changing anything.

        Raises ``ValueError`` naming the entry for a model with other keys, shapes or dtypes,
        non-finite parameters, or an outer optimizer present on one side only.  Hyper-parameters
        that differ from this trainer's give a warning (the run then differs from the original).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from Reptile.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("model", "outer_optimizer", "iteration", "total_iterations") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}: not a Reptile.state_dict()")
        model_state = state["model"]
        if not isinstance(model_state, Mapping):
            raise TypeError(f"state['model'] must be a dict of tensors, got {type(model_state).__name__}")
        own = self.model.state_dict()
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
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"saved model entry {k} contains NaN or infinite values")
        opt_state = state["outer_optimizer"]
        if (opt_state is None) != (self.outer_optimizer is None):
            raise ValueError("the saved state has " + ("no " if opt_state is None else "an ") +
                             "outer_optimizer state but this trainer has " +
                             ("one" if self.outer_optimizer is not None else "none") +
                             ": build the trainer with the same outer_optimizer")
        iteration = state["iteration"]
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"state['iteration'] must be an int >= 0, got {iteration!r}")
        total = state["total_iterations"]
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"state['total_iterations'] must be None or an int >= 1, got {total!r}")
        saved_config = state.get("config")
        if isinstance(saved_config, Mapping):
            mine = self.hparams()
            diffs = [f"{k}: saved {saved_config[k]!r}, now {mine[k]!r}" for k in sorted(mine)
                     if k in saved_config and k != "backend" and saved_config[k] != mine[k]]
            if diffs:
                warnings.warn("resuming with different hyper-parameters (" + "; ".join(diffs) +
                              "): the run will not match an uninterrupted one", stacklevel=2)
        if opt_state is not None:
            backup = self.outer_optimizer.state_dict()
            try:
                self.outer_optimizer.load_state_dict(opt_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as exc:
                self.outer_optimizer.load_state_dict(backup)
                raise ValueError(f"the saved outer_optimizer state does not fit this optimizer: {exc}") from None
        with torch.no_grad():
            self.model.load_state_dict(model_state, strict=True)
        self.iteration = iteration
        self.total_iterations = total

    # ------------------------------------------------------------------ adaptation
    def _adapt_config(self) -> InnerConfig:
        return InnerConfig(lr=self.config.lr, optimizer=self.config.optimizer, loss=self.config.loss,
                           adam_betas=self.config.adam_betas, adam_eps=self.config.adam_eps)

    def adapt(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
              generator: Optional[torch.Generator] = None) -> InnerResult:
        """Fine-tune a copy of φ on each task for ``steps`` inner steps; the model is unchanged.

        Returns the ``InnerResult``: adapted parameters ``[T, *shape]`` and losses ``[T, steps]``.
        """
        _positive_int("steps", steps)
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        if indices is None:
            indices = sample_indices(tasks.n_tasks, steps, tasks.n_points, self.inner_batch_size,
                                     generator=generator, device=self.device)
        else:
            self._check_indices(indices, tasks, steps)
        return self.backend.inner_loop(self.model, tasks, indices, self._adapt_config())

    def evaluate(self, tasks: TaskBatch, steps: int, indices: Optional[torch.Tensor] = None, *,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-task loss on all of each task's points after ``steps`` adaptation steps: ``[T]``.

        ``steps=0`` gives the loss at φ.  The seed's demo adapts with 32 epochs of 50 points in
        batches of 10, i.e. ``steps=160``.
        """
        _positive_int("steps", steps, allow_zero=True)
        self._check_tasks(tasks, self.inner_batch_size if indices is None else 1)
        if steps == 0:
            params = {n: p.detach().unsqueeze(0).expand(tasks.n_tasks, *p.shape)
                      for n, p in self.model.named_parameters()}
        else:
            params = self.adapt(tasks, steps, indices, generator=generator).params
        return self.backend.evaluate(self.model, params, tasks, self._adapt_config())

