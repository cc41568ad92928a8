"""Safe interruption: SIGINT (Ctrl-C) and SIGTERM let the current meta-step finish.

``DeferredSignals`` records the first SIGINT/SIGTERM instead of raising in the middle of an
outer update (which could leave φ half-updated); the trainer checks ``received`` after each
meta-step, writes a checkpoint and raises ``TrainingInterrupted``.  A second signal aborts at
once (plain ``KeyboardInterrupt``, no checkpoint).  Handlers are only installed in the main
thread (Python allows no other) and the previous handlers are restored on exit.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Dict, Iterable, Optional

__all__ = ["DeferredSignals", "TrainingInterrupted", "Terminated", "sigterm_as_interrupt", "signal_name"]

DEFAULT_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None))
                        if s is not None)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT/SIGTERM after a whole meta-step; a checkpoint was written when
    the run had a checkpoint directory (``checkpoint`` is None otherwise).

    A ``KeyboardInterrupt``, so code that already handles Ctrl-C keeps working.

    Attributes:
        signal_number: the signal received (``signal.SIGINT`` or ``signal.SIGTERM``).
        iteration: meta-steps completed (the checkpoint's iteration).
        checkpoint: path of the checkpoint written, or None.
        exit_code: ``128 + signal_number``, the shell's convention (130 for Ctrl-C).
    """

    def __init__(self, message: str, *, signal_number: int, iteration: int,
                 checkpoint: Optional[str] = None):
        super().__init__(message)
        self.signal_number = signal_number
        self.iteration = iteration
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal_number)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "training interrupted"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (a CLI job's final evaluation, say), raised as Ctrl-C raises
    ``KeyboardInterrupt``; ``exit_code`` 143, the shell's convention."""

    exit_code = 128 + int(getattr(signal, "SIGTERM", 15))


@contextlib.contextmanager
def sigterm_as_interrupt(enabled: Optional[bool] = None):
    """While the context runs, SIGTERM raises ``Terminated`` in the main thread (its default
    action killed the process without a word: a job stopped during its final evaluation printed
    no way to resume).  ``DeferredSignals`` inside the context still defers it during training
    and puts this handler back after.  Nothing is installed outside the main thread, nor when
    not ``enabled`` (default: in one process only; under torchrun with several processes a rank
    blocked in a collective runs no Python handler, and torchrun's SIGTERM must end it as before)."""
    if enabled is None:
        try:
            enabled = int(os.environ.get("WORLD_SIZE", "1")) <= 1
        except ValueError:
            enabled = True
    sigterm = getattr(signal, "SIGTERM", None)
    if not enabled or sigterm is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise Terminated(f"{signal_name(signum)} received")

    previous = signal.signal(sigterm, handler)
    try:
        yield
    finally:
        signal.signal(sigterm, previous if previous is not None else signal.SIG_DFL)


class DeferredSignals:
    """Context manager: while active, the first SIGINT/SIGTERM is recorded in ``received``.

    Args:
        signals: the signals to defer (SIGINT and SIGTERM by default).
        enabled: when False (or outside the main thread) nothing is installed and ``received``
            stays None, so the caller's loop behaves as without it.
        checkpointing: whether the caller writes a checkpoint when it stops (the message says so).
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, *, enabled: bool = True,
                 checkpointing: bool = True):
        self.signals = tuple(signals)
        self.enabled = enabled
        self.checkpointing = checkpointing  # only for the message: whether a checkpoint follows
        self.received: Optional[int] = None
        #: set by the caller that stops on ``received`` (so ``__exit__`` does not deliver it again)
        self.acted_on = False
        self.installed = False
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.received is not None:
            # Second signal: the user insists.  Stop now, without a checkpoint.
            self._restore()
            raise KeyboardInterrupt(f"second {signal_name(signum)}: stopped without writing a checkpoint")
        self.received = signum
        try:
            then = "writing a checkpoint" if self.checkpointing else "stopping (no checkpoint_dir: nothing is written)"
            sys.stderr.write(f"\n{signal_name(signum)} received: finishing the current meta-step and {then} "
                             f"(send it again to stop at once)\n")
            sys.stderr.flush()
        except (OSError, RuntimeError, ValueError):  # a closed or busy stderr must not stop the save
            pass

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            # None means the handler was not installed from Python; the default is the best guess.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def __enter__(self) -> "DeferredSignals":
        self.received, self.acted_on = None, False
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.installed:
            self._restore()
            if exc_type is None and self.received is not None and not self.acted_on:
                # Recorded after the caller's last look (fit's: after its final checkpoint) and
                # not acted on: delivered now to the handlers put back, as if it had arrived a
                # moment later, instead of being dropped (a job would have run on into its
                # evaluation, the user's Ctrl-C or SIGTERM lost: QA59).
                signal.raise_signal(self.received)
