"""What every command-line script shares: a user error is one line on stderr and exit status 2.

User errors are the library's ValueError (CheckpointError included) and every OSError a user can
cause (a missing path, a read-only or full disk, a file where a directory should be): their
messages name the fix, and no write in this project leaves a half-written file behind (see
gemma2.files), which the full-disk message says. Ctrl-C ends a script with one line and exit status
130 (the shell's code for SIGINT), also when a library it interrupted re-raised it as another
exception; `on_interrupt` may add what the user needs to know (where to resume). Anything else is
a bug and keeps its traceback. With GEMMA2_TRACEBACK=1 in the environment a user error prints its
traceback above the line too (for a failure deep inside a compiler, which may surface as a
ValueError). `device_arg` checks a --device before any work.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
    try:
        code = main()
    except BaseException as e:
        if _from_ctrl_c(e):
            extra = on_interrupt() if on_interrupt is not None else ""
            print(f"interrupted{'; ' + extra if extra else ''}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        if not isinstance(e, (ValueError, OSError)):
            raise  # a bug (or SystemExit): its traceback is kept
        if os.environ.get("GEMMA2_TRACEBACK") == "1":
            traceback.print_exc()
        print(f"error: {e if isinstance(e, ValueError) else describe_os_error(e)}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(code or 0)


def _from_ctrl_c(e: BaseException | None) -> bool:
    """Whether `e` is Ctrl-C's KeyboardInterrupt or was raised while unwinding from one: torch's
    distributed checkpoint wraps it in a CheckpointException (`failures`: rank -> (exception,
    traceback)), and torch.save's zip writer, interrupted mid-file, raises a RuntimeError in its
    cleanup."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return True
        failures = getattr(e, "failures", None)  # DCP's: rank -> (exception, traceback)
        wrapped = [f[0] for f in failures.values() if isinstance(f, tuple) and f] if isinstance(failures, dict) else []
        if any(_from_ctrl_c(w) for w in wrapped):
            return True
        e = e.__cause__ or e.__context__
    return False


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
