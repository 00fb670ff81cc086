"""A clean stop when the job is asked to end, with the work kept.

Schedulers end a job with SIGTERM (Kubernetes, SLURM at a time limit or on preemption; torchrun
passes it on to every rank), and SLURM can warn ahead of its time limit with SIGUSR1
(`--signal=USR1@120`; torchrun passes that on only when its `--signals-to-handle` lists SIGUSR1).
While the trainer's loop runs, `StopSignals` turns either into a request: the step in progress
finishes, every rank agrees after the same step (`requested`: one all-reduce of a flag, as the
signal may reach the ranks at different moments), the trainer saves a checkpoint there (or, when
the signal came during a periodic save, stops at that checkpoint) and raises `TrainingStopped`,
which names it. Before the loop (loading the models, say) SIGTERM unwinds the
process as Ctrl-C does (gemma2.cli), while a SIGUSR1 warning noted since `note_warnings` stops the
loop at its first check. Ctrl-C itself keeps its meaning: stop now, keep the last complete
checkpoint.

A stop loses no work only if it ends before the SIGKILL that follows: Kubernetes and SLURM allow
30 s by default, and so does torchrun (its `--shutdown-timeout`) whatever the scheduler allows,
while a large run's save alone can take minutes. `StopTime` adds up the slowest step, evaluation
and save measured so far and says once, naming the figures, when a stop could outlast the grace a
run declares (TrainConfig.stop_grace, `--stop-grace`).
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import torch

from .distributed import Runtime
from .files import notice
from .locks import ensure_held

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[str] = []  # the stop signals noted and not yet acted on (signals are per process)


def _note(signum: int, frame) -> None:
    _received.append(signal.Signals(signum).name)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # where Python runs signal handlers


def note_warnings() -> None:
    """From now on SIGUSR1 (SLURM's warning) is noted for the training loop instead of ending the
    process at once; a script calls this at its start."""
    if _main_thread():
        signal.signal(signal.SIGUSR1, _note)


class TrainingStopped(Exception):
    """Training stopped early, at a checkpoint, because the job was asked to end."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal_name = signal_name


class StopSignals:
    """`with StopSignals() as stop:` SIGTERM and SIGUSR1 only note that a stop was asked for (in the
    main thread; elsewhere nothing changes); the handlers before are restored on leaving, and what
    was noted is then consumed."""

    def __init__(self) -> None:
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if _main_thread():
            self._previous = {s: signal.signal(s, _note) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        _received.clear()

    @property
    def received(self) -> str | None:
        """The first stop signal this process was sent, by name (None: none)."""
        return _received[0] if _received else None

    def requested(self, rt: Runtime, lock: Path | None = None) -> bool:
        """Whether any rank was asked to stop: the same answer on every rank (`check_together`: a
        collective, so every rank must call it at the same point; lock as there)."""
        return check_together(rt, lock, asked=self.received is not None)


def check_together(rt: Runtime, lock: Path | None, asked: bool = False) -> bool:
    """One collective that every rank calls at the same point before the trainer writes: whether
    any rank `asked` to stop, and first whether the rank holding the run directory's lock (`lock`
    there, None elsewhere) still holds it (gemma2.locks.ensure_held). When that rank has lost it,
    every rank raises here, that one with ensure_held's message, so none is left waiting in a
    collective for a rank that stopped."""
    lost = None
    if lock is not None:
        try:
            ensure_held(lock)
        except ValueError as e:
            lost = e
    any_lost = lost is not None
    if rt.sharded:
        flags = rt.all_reduce(torch.tensor([float(asked), float(any_lost)], device=rt.device))
        asked, any_lost = (bool(f) for f in flags.tolist())
    if lost is not None:
        raise lost
    if any_lost:
        raise ValueError(f"rank {rt.rank}: the rank holding the run directory's lock lost it (its own message "
                         "says how); stopping with it, without writing")  # fmt: skip
    return asked


class StopTime:
    """The longest a stop could take, against the grace between the SIGTERM and the SIGKILL that
    follows it (`grace` seconds; None: not checked): the slowest step (the one in progress when the
    signal comes), evaluation (when one is due after it) and save measured so far. The first step
    and evaluation of a process are not counted: they warm up (allocator, compilation). The first
    time the sum exceeds the grace, one note on stderr (`quiet`: on other ranks, none) says so, with
    the figures and the fixes (`torchrun`: its own shutdown timeout too). A save is measured only
    once one has run: with `save_every` 0, at the end."""

    PARTS = ("step", "evaluation", "save")

    def __init__(self, grace: float | None, quiet: bool = False, torchrun: bool = False) -> None:
        self.grace, self.quiet, self.torchrun = grace, quiet, torchrun
        self.slowest = dict.fromkeys(self.PARTS, 0.0)
        self.count = dict.fromkeys(self.PARTS, 0)
        self.warned = False

    def measured(self, part: str, seconds: float) -> None:
        self.count[part] += 1
        if part != "save" and self.count[part] == 1:
            return  # a warm-up
        self.slowest[part] = max(self.slowest[part], seconds)
        total = sum(self.slowest.values())
        if self.grace is None or self.warned or total <= self.grace:
            return
        self.warned = True
        if self.quiet:
            return
        parts = ", ".join(f"{what} {s:.1f} s" for what, s in self.slowest.items() if s)
        need = math.ceil(1.2 * total)  # a fifth more than measured: steps and saves vary
        torchrun = (f"; torchrun: --shutdown-timeout {need}, and SIGUSR1 in its --signals-to-handle for SLURM's "
                    "warning") if self.torchrun else ""  # fmt: skip
        notice(f"stopping on SIGTERM could take {total:.1f} s here (the slowest {parts}), more than the "
               f"{self.grace:g} s between SIGTERM and SIGKILL that this run assumes (--stop-grace): a stop cut "
               f"short keeps only the last checkpoint. Give a stop {need} s (Kubernetes: "
               f"terminationGracePeriodSeconds: {need}; SLURM: KillWait or the partition's GraceTime, or "
               f"--signal=USR1@{need} to warn ahead of the time limit{torchrun}) and pass --stop-grace {need}; "
               "saving more often (--save-every) loses less when a stop is cut short")  # fmt: skip
