"""A clean stop when the job is asked to end, with the work kept.

Schedulers end a job with SIGTERM (Kubernetes, SLURM at a time limit or on preemption; torchrun
passes it on to every rank), and SLURM can warn ahead with SIGUSR1 (`--signal=USR1@120`). While
the trainer's loop runs, `StopSignals` turns either into a request: the step in progress finishes,
every rank agrees after the same step (`requested`: one all-reduce of a flag, as the signal may
reach the ranks at different moments), the trainer saves a checkpoint there and raises
`TrainingStopped`, which names it. Outside the loop (loading, say) SIGTERM unwinds the process as
Ctrl-C does (gemma2.cli). Ctrl-C itself keeps its meaning: stop now, keep the last complete
checkpoint.
"""

from __future__ import annotations

import signal
import threading

import torch

from .distributed import Runtime

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """Training stopped early, at a checkpoint, because the job was asked to end."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class StopSignals:
    """`with StopSignals() as stop:` SIGTERM and SIGUSR1 only note that a stop was asked for (in the
    main thread; elsewhere nothing changes); the handlers before are restored on leaving."""

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _note(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def requested(self, rt: Runtime) -> bool:
        """Whether any rank was asked to stop: the same answer on every rank (a collective, so
        every rank must call it at the same point)."""
        if not rt.sharded:
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=rt.device)
        return bool(rt.all_reduce(flag).item())
