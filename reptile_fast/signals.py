"""Safe interruption: SIGINT (Ctrl-C) and SIGTERM let the current meta-step finish.

``DeferredSignals`` records the first SIGINT/SIGTERM instead of raising in the middle of an
outer update (which could leave φ half-updated); the trainer checks ``received`` after each
meta-step, writes a checkpoint and raises ``TrainingInterrupted``.  A second signal aborts at
once (plain ``KeyboardInterrupt``, no checkpoint).  Handlers are only installed in the main
thread (Python allows no other) and the previous handlers are restored on exit.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Dict, Iterable, Optional

__all__ = ["DeferredSignals", "TrainingInterrupted", "signal_name"]

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
        self.received = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            self._restore()
