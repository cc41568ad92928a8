"""Figures written by the jobs (matplotlib's object API: no global pyplot state, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_before_after", "plot_learning_curve", "save_figure"]


def save_figure(fig: Figure, path) -> Path:
    """Render ``fig`` as PNG in memory, then write it atomically (temporary file, fsync, rename),
    like every other output: a crash never leaves a truncated figure."""
    import io

    from .checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def plot_before_after(x, before, after, true, path, title: str = "") -> Path:
    """The seed's figure: predictions before / after adaptation and the true function."""
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(np.asarray(x), np.asarray(before), label="Before")
    ax.plot(np.asarray(x), np.asarray(after), label="After")
    ax.plot(np.asarray(x), np.asarray(true), label="True")
    ax.legend(fontsize=11)
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return Path(path)


def _envelope(y: np.ndarray, max_points: int):
    """``(steps, low, high)`` of ``y`` in at most ``max_points`` buckets (min and max per bucket):
    what a plot of every point would show, at a fraction of the drawing time."""
    n = len(y)
    if n <= max_points:
        steps = np.arange(1, n + 1)
        return steps, y, y
    edges = np.linspace(0, n, max_points + 1).astype(int)
    low = np.minimum.reduceat(y, edges[:-1])
    high = np.maximum.reduceat(y, edges[:-1])
    return edges[:-1] + 1, low, high


def plot_learning_curve(losses: Sequence[float], path, window: int = 100,
                        ylabel: str = "inner-loop loss", max_points: int = 2000) -> Path:
    """Per-meta-step inner loss (its min–max envelope over at most ``max_points`` buckets) and
    its moving average, log scale."""
    y = np.asarray(losses, dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, low, high = _envelope(y, max_points)
    if len(y) > max_points:
        ax.fill_between(steps, low, high, alpha=0.3, linewidth=0, label="per meta-step (min–max)")
    else:
        ax.plot(steps, y, alpha=0.3, label="per meta-step")
    w = max(1, min(window, len(y)))
    if len(y) >= w > 1:
        ma = np.convolve(y, np.ones(w) / w, mode="valid")
        stride = max(1, len(ma) // max_points)
        ax.plot(np.arange(w, len(y) + 1)[::stride], ma[::stride], label=f"moving mean ({w})")
    ax.set_xlabel("meta-step")
    ax.set_ylabel(ylabel)
    if len(y) and np.all(y > 0):
        ax.set_yscale("log")
    ax.legend()
    save_figure(fig, path)
    return Path(path)
