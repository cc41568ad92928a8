"""The trainer's hyper-parameters as checked properties, assignable between fits.

``Reptile`` inherits them.  Before, a new ``trainer.inner_lr`` was silently ignored (it had been
copied into the inner loop's config) and a new ``inner_steps`` crashed the compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .validation import check_float, check_int

__all__ = ["HyperParameters"]


class HyperParameters:
    """``inner_lr``, ``inner_steps``, ``inner_batch_size``, ``minibatches``, ``outer_lr``,
    ``outer_lr_final``, ``total_iterations``; and, read-only, ``loss`` and ``outer_optimizer``.

    Checked as the constructor checks them, and followed by every stepper: a new inner setting
    goes through ``self._set_config`` (the subclass rebuilds the compiled and fused programs,
    which bake the inner loop in).  During ``fit`` (``self._fitting``) only the outer step may
    change: the sampler and the stepper were built at its start.
    """

    @property
    def inner_lr(self) -> float:
        """The inner loop's learning rate (``config.lr``)."""
        return self.config.lr

    @inner_lr.setter
    def inner_lr(self, value) -> None:
        self._not_fitting("inner_lr")
        value = self._checked_inner_lr(value)
        if value != self.config.lr:
            self._set_config(dataclasses.replace(self.config, lr=value))

    def _checked_inner_lr(self, value) -> float:
        """``check_float``, and within the model's dtype: the inner step multiplies gradients in
        that dtype, and torch refused 1e300 there deep inside ("cannot be converted to type float
        without overflow")."""
        import torch

        value = check_float("inner_lr", value)
        top = torch.finfo(self.dtype).max
        if value > top:
            raise ValueError(f"inner_lr must be at most {top:.4g} (the largest {self.dtype} the model's inner "
                             f"steps can multiply by), got {value}")
        return self._nonzero_in_dtype("inner_lr", value)

    def _nonzero_in_dtype(self, name: str, value: float) -> float:
        """``value``, refused when it is 0 in the dtype the steps multiply by it in (the parameters'
        dtype, at least float32: torch computes float16 steps in float32): ``outer_lr=1e-46`` trained
        nothing in float32, silently (QA46)."""
        import torch

        dtype = torch.promote_types(self.dtype, torch.float32)
        if float(torch.tensor(value, dtype=dtype)) == 0.0:
            tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
            raise ValueError(f"{name}={value!r} is 0 in {dtype} (below {tiny:.3g}), so the steps would not "
                             f"move the parameters; use a larger rate")
        return value

    @property
    def inner_steps(self) -> int:
        """Inner steps per task and meta-step."""
        return self._inner_steps

    @inner_steps.setter
    def inner_steps(self, value) -> None:
        self._not_fitting("inner_steps")
        value = check_int("inner_steps", value)
        weights = self.config.grad_weights
        if weights is not None and len(weights) != value:
            raise ValueError(f"inner_steps={value}, but inner_grad_weights has {len(weights)} entries (one per "
                             f"inner step): build a new Reptile with both")
        if value != self._inner_steps:
            self._set_config(self.config)  # first: it may report a pending non-finite step
            self._inner_steps = value

    @property
    def inner_batch_size(self) -> int:
        """Points per inner minibatch."""
        return self._inner_batch_size

    @inner_batch_size.setter
    def inner_batch_size(self, value) -> None:
        self._not_fitting("inner_batch_size")
        value = check_int("inner_batch_size", value)
        if getattr(self, "backend", None) is not None:  # not yet while the trainer is built
            self._follow_batch_size(value)
        self._inner_batch_size = value

    @property
    def outer_lr(self) -> float:
        """ε, the outer step (the start of the schedule when ``outer_lr_final`` is set)."""
        return self._outer_lr

    @outer_lr.setter
    def outer_lr(self, value) -> None:
        value = self._nonzero_in_dtype("outer_lr", check_float("outer_lr", value))
        if getattr(self, "_outer_optimizer", None) is not None:
            # accepted and ignored before, yet recorded in hparams() and checkpoints (QA46)
            raise ValueError("outer_lr is the interpolation step ε, which the outer_optimizer replaces: set "
                             "the optimizer's lr (its param_groups, or a torch.optim.lr_scheduler) instead")
        self._outer_lr = value

    @property
    def minibatches(self) -> str:
        """How every plan this trainer draws picks its minibatches (``tasks.MINIBATCHES``):
        "fresh" (each step's drawn anew, as the seed) or "epochs" (each task's points shuffled and
        read in order, as the official supervised-reptile code)."""
        return self._minibatches

    @minibatches.setter
    def minibatches(self, value) -> None:
        from .tasks.base import check_minibatches

        self._not_fitting("minibatches")
        self._minibatches = check_minibatches(value)

    @property
    def outer_lr_final(self) -> Optional[float]:
        """ε at the end of ``fit``'s schedule (None: constant ε)."""
        return self._outer_lr_final

    @outer_lr_final.setter
    def outer_lr_final(self, value) -> None:
        if value is not None:
            value = check_float("outer_lr_final", value, allow_zero=True)
            if self.outer_optimizer is not None:
                raise ValueError("outer_lr_final anneals the interpolation step; with outer_optimizer "
                                 "use a torch.optim.lr_scheduler instead")
        self._outer_lr_final = value

    @property
    def total_iterations(self) -> Optional[int]:
        """The total meta-steps of the last ``fit`` (the length of ``outer_lr_final``'s schedule;
        saved in checkpoints, restored with them), or None before any ``fit``.  Settable between
        fits (``outer_lr_at`` and ``meta_step`` follow it); a running ``fit`` anneals over its own
        ``iterations`` and refuses a change."""
        return self._total_iterations

    @total_iterations.setter
    def total_iterations(self, value) -> None:
        if getattr(self, "_fitting", False):
            # fit anneals over its own ``iterations``: a change from a callback was ignored by the
            # running fit, yet saved in its checkpoints (a resume then warned of a total it never used)
            raise ValueError("total_iterations cannot change while fit runs (it anneals outer_lr to "
                             "outer_lr_final over its iterations argument); pass the new total as fit's "
                             "iterations instead")
        # checked as a checkpoint's is at load: a 0 set by hand was saved, then refused at resume
        self._total_iterations = None if value is None else check_int("total_iterations", value)

    # Fixed at construction: the inner loop's config, the steppers and the input checks are built
    # around them.  A plain attribute was assigned silently and ignored by training, yet recorded in
    # hparams() and checkpoints (QA45).
    @property
    def loss(self):
        """The inner loss given to the constructor ("mse", "cross_entropy" or a callable)."""
        return self._loss

    @loss.setter
    def loss(self, value) -> None:
        raise AttributeError("loss is fixed when the Reptile is built (the inner loop and its input checks are "
                             "made for it); build a new Reptile(model, loss=...) to train with another loss")

    @property
    def outer_optimizer(self):
        """The ``torch.optim`` optimizer given to the constructor, or None (the interpolation update)."""
        return self._outer_optimizer

    @outer_optimizer.setter
    def outer_optimizer(self, value) -> None:
        raise AttributeError("outer_optimizer is fixed when the Reptile is built (the outer update is made for "
                             "it); build a new Reptile(model, outer_optimizer=...), or change the optimizer's "
                             "param_groups (e.g. its lr, or with a torch.optim.lr_scheduler)")

    def _not_fitting(self, name: str) -> None:
        # fit builds its sampler (plan rows, minibatch size) and stepper (the compiled program bakes
        # the inner loop in) at its start: a change from a callback would be ignored for the rest of it
        if getattr(self, "_fitting", False):
            raise ValueError(f"{name} cannot change while fit runs (its sampler and stepper are built at its "
                             f"start); set it between fits (outer_lr and outer_lr_final may change at any time)")
