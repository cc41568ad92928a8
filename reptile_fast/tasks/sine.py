"""Sine-wave regression, the seed's task family: y = a·sin(x + b) on a fixed grid."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .base import (TaskBatch, _allocated, _check_device, _check_generator, _check_positive_int, empty_keys, plan_from_keys,
                   uniform_keys)

__all__ = ["Sine"]


def _check_range(name: str, value) -> Tuple[float, float]:
    # real numbers only: float() of each item took "15" as the range (1.0, 5.0), strings, bytes and
    # bools as numbers (QA46)
    pair = None if isinstance(value, (str, bytes, bytearray)) else value
    try:
        items = list(pair)
    except TypeError:
        items = []
    if len(items) != 2 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                  for v in items):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}")
    lo, hi = (float(v) for v in items)
    # tasks are float32: a bound beyond its range became inf (amplitude), NaN (phase: sin(inf)) or
    # a RuntimeError inside torch.linspace (x_range)
    top = torch.finfo(torch.float32).max
    if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > top:
        raise ValueError(f"{name} must be finite in float32 (at most {top:.4g} in magnitude), got {value!r}")
    if hi < lo:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_real(name: str, value, dtype: torch.dtype) -> torch.Tensor:
    """``value`` (numbers, a tensor or an array) as ``dtype`` ``[T, 1]``; TypeError naming ``name``
    for anything else (torch said "new(): invalid data type 'str'" or "must be real number")."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        t = None
    # bools read as 0 / 1 and complex numbers lost their imaginary part (only torch's warning): refused
    if t is None or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers (a tensor, an array or a list), got {value!r:.80}") from None
    # converted from ``value`` itself: Python floats read as float32 first lost float64 digits
    return torch.as_tensor(value, dtype=dtype).reshape(-1, 1)


class Sine:
    """Sine tasks ``y = a·sin(x + b)``, ``a ~ U[amplitude]``, ``b ~ U[phase]``.

    Every task uses the same grid ``x = linspace(*x_range, n_points)``, as the seed does.

    Args:
        amplitude: (low, high) of the uniform amplitude; the seed's is (0.1, 5.0).
        phase: (low, high) of the uniform phase; the seed's is (0, 2π).
        n_points: points on the grid (the seed's 50).
        x_range: the grid's ends (the seed's (-5, 5)).
        dtype: the tasks' floating dtype, the model's (the seed's float32).  float64 tasks are
            computed in float64 from the same draws (a float64 model's oracle); float16 and
            bfloat16 ones are the float32 tasks rounded once.
    """

    def __init__(self, amplitude=(0.1, 5.0), phase=(0.0, 2 * math.pi), n_points: int = 50,
                 x_range=(-5.0, 5.0), dtype: torch.dtype = torch.float32):
        if dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(map(str, _DTYPES))}, got {dtype!r}")
        self.dtype = dtype
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.n_points = _check_positive_int("n_points", n_points)
        self.x_range = _check_range("x_range", x_range)
        # the grid made once here: a count too large for memory is a ValueError naming n_points, not
        # torch's "Storage size calculation overflowed" / allocator error (QA67)
        grid = _allocated("n_points", (self.n_points,), self.grid)
        if not bool(torch.isfinite(grid).all()):  # (-3e38, 3e38): the grid's step overflows
            raise ValueError(f"x_range {x_range!r} is too wide for a {self.dtype} grid of {self.n_points} points")
        top = torch.finfo(dtype).max
        if max(map(abs, self.amplitude)) > top:  # float16's 65504: y would be inf
            raise ValueError(f"amplitude must be at most {top:.6g} in magnitude for {dtype} tasks, got {amplitude!r}")

    def __repr__(self) -> str:
        dtype = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return (f"Sine(amplitude={self.amplitude}, phase={self.phase}, n_points={self.n_points}, "
                f"x_range={self.x_range}{dtype})")

    def grid(self, device=None) -> torch.Tensor:
        """The shared inputs, ``[n_points]`` in the tasks' dtype."""
        device = _check_device(device)  # an unknown name failed inside torch (a RuntimeError)
        return torch.linspace(self.x_range[0], self.x_range[1], self.n_points, device=device,
                              dtype=self._compute_dtype()).to(self.dtype)

    def _compute_dtype(self) -> torch.dtype:
        """float64 tasks are computed in float64; every other dtype as the seed computes (float32)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def sample_params(self, n_tasks: int, *, generator: Optional[torch.Generator] = None):
        """Amplitudes and phases, float64 ``[n_tasks]`` each, drawn on the generator's device."""
        n_tasks = _check_positive_int("n_tasks", n_tasks)
        dev = _check_generator(generator)
        return self._params(uniform_keys("2 x n_tasks", 2, n_tasks, generator=generator, device=dev))

    def _params(self, u: torch.Tensor):
        """Amplitudes and phases from uniforms ``u [2, T]`` (float64)."""
        a = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[0]
        b = self.phase[0] + (self.phase[1] - self.phase[0]) * u[1]
        return a, b

    def make(self, amplitude: torch.Tensor, phase: torch.Tensor, device=None) -> TaskBatch:
        """Tasks with the given amplitudes and phases (``[T]`` each), as the seed computes them:
        ``float32(a) * sin(grid + float32(b))`` (in float64 for ``dtype=torch.float64``; rounded to
        float16/bfloat16 after).  Validated (they are the caller's numbers)."""
        return self._make(amplitude, phase, device, trusted=False)

    def _make(self, amplitude, phase, device, *, trusted: bool) -> TaskBatch:
        real = self._compute_dtype()
        a, b = (_as_real(name, v, real) for name, v in (("amplitude", amplitude), ("phase", phase)))
        if a.shape != b.shape:
            raise ValueError(f"amplitude and phase must have the same length, got {a.shape[0]} and {b.shape[0]}")
        device = _check_device(device)  # a bad or unavailable one failed inside torch (QA45)
        a, b = a.to(device), b.to(device)
        x = torch.linspace(self.x_range[0], self.x_range[1], self.n_points, device=device, dtype=real).unsqueeze(0)
        y = a * torch.sin(x + b)
        xs, ys = x.expand(a.shape[0], -1).unsqueeze(-1).contiguous(), y.unsqueeze(-1)
        if self.dtype != real:
            xs, ys = xs.to(self.dtype), ys.to(self.dtype)
        return TaskBatch.trusted(xs, ys) if trusted else TaskBatch(xs, ys)

    def sample_steps(self, n_steps: int, n_tasks: int, plan_rows: int, batch_size: int, *,
                     generator: Optional[torch.Generator] = None, device=None) -> Tuple[TaskBatch, torch.Tensor]:
        """``n_steps`` meta-steps' tasks and plans in one go — the numbers of ``n_steps`` rounds of
        ``sample(n_tasks)`` then ``sample_indices(n_tasks, plan_rows, n_points, batch_size)``
        with the same generator: only the random draws run round by round (two ``torch.rand``
        calls each, in that order), the tasks and the plans' selection are computed once for all
        rounds.  Returns tasks ``[n_steps · n_tasks, ...]`` and long plans ``[n_steps · n_tasks,
        plan_rows, batch_size]``, meta-step-major (``loop.StreamSampler``'s chunks)."""
        n_steps = _check_positive_int("n_steps", n_steps)
        n_tasks = _check_positive_int("n_tasks", n_tasks)
        plan_rows = _check_positive_int("plan_rows", plan_rows)
        batch_size = _check_positive_int("batch_size", batch_size)
        if batch_size > self.n_points:
            # fit draws this way on the compiled path: say which setting it is there too
            raise ValueError(f"batch_size ({batch_size}; a trainer's inner_batch_size) must not exceed n_points "
                             f"({self.n_points}): a minibatch holds distinct points")
        device = _check_device(device)
        dev = _check_generator(generator)
        params = []
        # the rounds' plan keys go straight into one buffer (a torch.cat of them cost ~5 % of a
        # compiled meta-step at meta-batch 256)
        # (one size per name: the error for a buffer too large names each, not n_steps·n_tasks as one)
        keys = empty_keys("n_steps x n_tasks x plan_rows x n_points", n_steps, n_tasks, plan_rows, self.n_points,
                          device=dev)
        for i in range(n_steps):  # the generator's numbers in the order the rounds consume them
            params.append(uniform_keys("2 x n_tasks", 2, n_tasks, generator=generator, device=dev))
            uniform_keys("n_tasks x plan_rows x n_points", n_tasks, plan_rows, self.n_points,
                         generator=generator, device=dev, out=keys[i])
        a, b = self._params(torch.stack(params, dim=1).reshape(2, n_steps * n_tasks))
        device = device if device is not None else dev
        plans = plan_from_keys(keys.view(n_steps * n_tasks, plan_rows, self.n_points), batch_size).to(device)
        return self._make(a, b, device, trusted=True), plans

    def sample(self, n_tasks: int, *, generator: Optional[torch.Generator] = None,
               device=None) -> TaskBatch:
        """``n_tasks`` tasks: x ``[T, n_points, 1]`` (the grid), y ``[T, n_points, 1]``, in ``dtype``."""
        device = _check_device(device)
        a, b = self.sample_params(n_tasks, generator=generator)
        # drawn from finite ranges: nothing to validate (no host read in a training loop)
        return self._make(a, b, device if device is not None else a.device, trusted=True)
