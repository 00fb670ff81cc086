"""What every command-line script shares: a user error is one line on stderr and exit status 2.

User errors are the library's ValueError (CheckpointError included) and every OSError a user can
cause (a missing path, a read-only or full disk, a file where a directory should be): their messages
name the fix, and no write in this project leaves a half-written file behind (see gemma2.files),
which the full-disk message says. Ctrl-C ends a script with one line and exit status 130 (the
shell's code for SIGINT), also when a library it interrupted re-raised it as another exception;
`on_interrupt` may add what the user needs to know (where to resume), after a full disk too.
Anything else is a bug and keeps its traceback. SIGTERM (`kill`, a scheduler ending the job) unwinds
the same way (`Terminated`: every cleanup runs, a run's lock is released) and ends with status 143;
a training loop first saves a checkpoint (gemma2.preemption). With GEMMA2_TRACEBACK=1 in the
environment a user error prints its traceback above the line too (for a failure deep inside a
compiler, which may surface as a ValueError). `device_arg` checks a --device before any work;
`add_threads_option` and `set_threads` give every script the same --threads.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as the shell reports a process Ctrl-C ended
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds as from Ctrl-C."""


def _terminate(signum: int, frame) -> None:
    raise Terminated()


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: what failed, on which path, and for a full disk that what was
    there before is intact."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e)
    line = f"{where}: {what}" if where else what
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device ({line}); nothing was half-written: the previous files and "
                "checkpoints are intact. Free some space and run the command again")  # fmt: skip
    if e.errno == errno.EROFS:
        return f"{line}: the filesystem is read-only; write the output somewhere else"
    return line


def run_cli(main: Callable[[], int | None], on_interrupt: Callable[[], str] | None = None) -> NoReturn:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main()
    except BaseException as e:
        interrupt = _interrupt_in(e)
        if interrupt is not None:
            extra = on_interrupt() if on_interrupt is not None else ""
            what = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
            print(f"{what}{'; ' + extra if extra else ''}", file=sys.stderr)
            sys.exit(EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED)
        if not isinstance(e, (ValueError, OSError)):
            raise  # a bug (or SystemExit): its traceback is kept
        if os.environ.get("GEMMA2_TRACEBACK") == "1":
            traceback.print_exc()
        line = str(e) if isinstance(e, ValueError) else describe_os_error(e)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if full and on_interrupt is not None and (extra := on_interrupt()):
            line += "; " + extra
        print(f"error: {line}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    finally:
        signal.signal(signal.SIGTERM, previous)  # the caller's again (a test that calls main, say)
    sys.exit(code or 0)


def _interrupt_in(e: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C's, or SIGTERM's `Terminated`) that `e` is or was raised while
    unwinding from, else None: torch's distributed checkpoint wraps it in a CheckpointException
    (`failures`: rank -> (exception, traceback)), and torch.save's zip writer, interrupted
    mid-file, raises a RuntimeError in its cleanup."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        failures = getattr(e, "failures", None)  # DCP's: rank -> (exception, traceback)
        wrapped = [f[0] for f in failures.values() if isinstance(f, tuple) and f] if isinstance(failures, dict) else []
        for inner in map(_interrupt_in, wrapped):
            if inner is not None:
                return inner
        e = e.__cause__ or e.__context__
    return None


def device_arg(name: str) -> torch.device:
    """A --device value as a torch.device, refused (ValueError) when this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads N, applied by `set_threads`."""
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core); 1 is faster when other "
                        "programs keep the cores busy (every op then waits for its slowest thread)")  # fmt: skip


def set_threads(threads: int | None) -> None:
    """Use `threads` CPU threads (None: torch's choice); refused (ValueError) below 1."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads {threads}: pass 1 or more, or leave it out for torch's choice")
    torch.set_num_threads(threads)


def check_json_flag(path: str | None, overwrite: bool) -> None:
    """--json PATH and --overwrite, as the scripts that write a figures file take them: a new file
    in an existing directory, or an existing one only with --overwrite (checked before any work)."""
    if overwrite and not path:
        raise ValueError("--overwrite replaces an existing --json file: pass --json PATH, or drop --overwrite")
    if path:
        out = Path(path)
        if out.is_dir():
            raise ValueError(f"--json {out} is a directory; pass a file path")
        if out.exists() and not overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it, or another --json path")
        if not out.parent.is_dir():
            raise ValueError(f"--json {out}: the directory {out.parent} does not exist")
