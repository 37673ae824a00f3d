"""Stop a run on a scheduler's signal without losing its work (the 1,000-run study of arXiv 2602.06883 runs on
shared clusters, where jobs are preempted and cut at their time limit).

SLURM (``scancel``, preemption, the ``--signal`` warning before the time limit), Kubernetes and ``torchrun``
end a job with SIGTERM, or SIGUSR1 / SIGUSR2 sent ahead of time, and a SIGKILL some seconds later. While
:class:`StopSignals` is active those signals only set a flag: the training loop finishes the update under way,
writes a step checkpoint, records the run as stopped and raises :class:`~vitef.errors.RunStopped`; the entry point
exits with ``128 + signal``. Launching the run again resumes it from that checkpoint, exactly as an uninterrupted
run would have gone on.

A signal outside the training loop (building the model, loading data, the final test) keeps its default action:
there is nothing to save that the last checkpoint does not hold. A second signal changes nothing (a scheduler may
send several); SIGKILL is the way to end a run at once. DataLoader workers ignore the signals
(:func:`ignore_stop_signals`): a scheduler signals every process of the job, and a worker killed under the loop
would fail the update that the checkpoint is waiting for; the workers end with their process.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

# SIGTERM: scancel, preemption, Kubernetes, torchrun's forwarding, a sweep being stopped. SIGUSR1 / SIGUSR2: sent
# ahead of a time limit (``sbatch --signal=USR1@120``; submitit's own warning signal is USR2).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopSignals:
    """While active (``with StopSignals() as stop:``), :data:`STOP_SIGNALS` set :attr:`signum` instead of ending
    the process; the caller polls :attr:`requested` at points where it can stop cleanly.

    Only signals whose action is the default are taken over, and only from the main thread (Python runs handlers
    there): a caller that handles a signal itself (a sweep running apps in its own process) keeps it. The previous
    handlers are back on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            logger.warning("%s received: stopping after the update under way (a checkpoint is saved)", self.name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.signals:
            if signal.getsignal(sig) == signal.SIG_DFL:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: ignore :data:`STOP_SIGNALS` (see the module docstring)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
