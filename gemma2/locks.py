"""One writer per directory, across processes and machines: `directory/.lock`.

The lock file holds "PID HOST" of its holder and is created exclusively; `acquire_lock` takes it,
`release_lock` removes it. While it is held, a thread of the holder refreshes the file's
modification time every `HEARTBEAT_S` seconds. A process that finds the lock taken:

- on the holder's machine, checks the pid: refused while that process exists, the lock taken over
  (with a notice) once it is gone;
- on another machine, which cannot check the pid (a job a scheduler requeued elsewhere after a
  hard kill, say), reads the lock's age by the filesystem's own clock (the modification time of a
  probe file made beside it, so the machines' clocks need not agree). A lock unrefreshed for
  `STALE_S` seconds is taken over at once; a younger one is watched until it is refreshed (its
  holder runs: refused, within about `HEARTBEAT_S`) or reaches that age (taken over).

A holder stopped for longer than `STALE_S` (SIGSTOP, a suspended job, a hung filesystem) may find
its lock taken over when it continues: `ensure_held` before each save or publish then stops it
with a message, so that it never writes over the new holder's work.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from .files import TMP_PREFIX, notice, process_alive

LOCK_FILE = ".lock"
HEARTBEAT_S = 15.0  # how often a holder refreshes its lock
STALE_S = 120.0  # a lock on another machine unrefreshed this long is its holder's that is gone

_heartbeats: dict[Path, threading.Event] = {}  # the locks this process holds -> their thread's stop


def acquire_lock(directory: Path) -> Path:
    """Create directory/.lock holding "pid host" and keep it refreshed; refuse when a live process
    holds it, take it over (with a notice) when its holder is gone (see the module docstring).
    Returns the lock file."""
    lock = directory / LOCK_FILE
    me = _me()
    for _ in range(3):  # later tries follow the removal of a stale lock
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                held = lock.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            holder, live = _holder(held)
            if live is None:  # on another machine: its refreshes tell
                seen = _watch(lock, held, holder)
                if seen is None:
                    continue  # released or taken by another meanwhile: look again
                live, why = seen
            else:
                why = "" if live else ", which is gone"
            if live:
                raise ValueError(f"{directory} is in use by {holder} (lock file {lock}{why}); wait for it to end "
                                 f"or write elsewhere. If that process is gone, delete {lock}")  # fmt: skip
            notice(f"{lock} was left by {holder}{why}; taking it over")
            _remove_stale_lock(lock, held)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        _start_heartbeat(lock, me)
        return lock
    raise ValueError(f"{lock}: another process took the lock at the same moment; retry")


def release_lock(lock: Path) -> None:
    """Stop refreshing `lock` and remove it if this process holds it (a lock another process took
    over is left alone)."""
    stop = _heartbeats.pop(lock, None)
    if stop is not None:
        stop.set()
    try:
        if lock.read_text() == _me():
            lock.unlink()
    except FileNotFoundError:
        pass


def ensure_held(lock: Path) -> None:
    """Raise if `lock` is no longer this process's: another took it over while this one was stopped
    for longer than STALE_S. Called before a save or a publish, which would write over its work."""
    try:
        held = lock.read_text()
    except FileNotFoundError:
        held = None
    if held != _me():
        holder = "nobody now" if held is None else _holder(held)[0]
        raise ValueError(
            f"{lock.parent} is no longer this process's to write: its lock {lock} was taken over (it names "
            f"{holder}) while this process was stopped or its filesystem hung for over {STALE_S:.0f} s; "
            "stopping without writing. The other process goes on there; to continue this work, wait for it to "
            "end, or write elsewhere"
        )


def lock_holder(directory: Path) -> str | None:
    """"process PID on HOST" when a live process holds directory/.lock (one on another machine: a
    lock refreshed within STALE_S), else None. Never waits."""
    lock = directory / LOCK_FILE
    try:
        holder, live = _holder(lock.read_text())
        if live is None:
            live = _age(lock) < STALE_S
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return holder if live else None


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def _holder(held: str) -> tuple[str, bool | None]:
    """Who a lock's content names, and whether that process is alive (None: on another machine,
    it cannot be checked from here)."""
    try:
        pid_text, host = held.split()
        pid = int(pid_text)
    except ValueError:
        return "a process killed as it took it", False  # torn between create and write: nobody holds it
    if host != socket.gethostname():
        return f"process {pid} on {host}", None
    # Our own pid: a killed process's before us (a container's processes get the same pids each run).
    return f"process {pid} on {host}", pid != os.getpid() and process_alive(pid)


def _start_heartbeat(lock: Path, me: str) -> None:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                if lock.read_text() != me:
                    return  # released, or taken over: ensure_held says so at the next save
                os.utime(lock)  # the time of the lock's filesystem (NFS: the server's)
            except FileNotFoundError:
                return
            except OSError:
                pass  # a passing filesystem error: the next beat tries again

    _heartbeats[lock] = stop
    threading.Thread(target=beat, name=f"heartbeat of {lock}", daemon=True).start()


def _mtime(lock: Path) -> int | None:
    """The lock's modification time in ns, None if it is gone. Read through an open file: on NFS an
    open fetches the server's attributes, where a stat may answer from a cache up to a minute old."""
    try:
        with open(lock, "rb") as f:
            return os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None


def _age(lock: Path) -> float:
    """Seconds since the lock was last written or refreshed, by the clock of its filesystem: the
    modification time of a probe file made beside it (a temporary name of gemma2.files, cleared
    if a kill leaves it), which the machines' clocks do not enter. Where no file can be made there
    (a read-only directory), by this machine's clock."""
    probe = lock.with_name(f"{TMP_PREFIX}new-{lock.name}-{os.getpid()}-1")
    try:
        probe.unlink(missing_ok=True)  # a killed predecessor's with our pid (a container's)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        now = time.time_ns()
    else:
        try:
            now = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
            probe.unlink()
    written = _mtime(lock)
    return 0.0 if written is None else max(0.0, (now - written) / 1e9)


def _watch(lock: Path, held: str, holder: str) -> tuple[bool, str] | None:
    """Whether a lock naming a process on another machine is live, and a few words why for the
    message: refreshed within STALE_S (watched until it is refreshed or reaches that age). None if
    it was released or replaced meanwhile."""
    first, age = _mtime(lock), _age(lock)
    if age < STALE_S:
        notice(f"{lock} names {holder}, which this machine cannot check; waiting up to {STALE_S - age:.0f} s "
               f"for its refresh (every {HEARTBEAT_S:.0f} s while it runs)")  # fmt: skip
        deadline = time.monotonic() + STALE_S - age
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(HEARTBEAT_S / 4, left))
            try:
                if lock.read_text() != held:
                    return None
            except FileNotFoundError:
                return None
            if _mtime(lock) != first:
                return True, ", refreshed while its holder runs"
        age = STALE_S
    return False, f", which has not refreshed it for {age:.0f} s (a holder does every {HEARTBEAT_S:.0f} s)"


def _remove_stale_lock(lock: Path, stale: str) -> None:
    """Remove `lock` if it still holds `stale`. Of several processes taking over one stale lock, one
    moves it aside (a rename); a lock that another process took in the meantime is given back.
    The name aside is a temporary of gemma2.files: killed before removing it, this process leaves
    a file the next start clears, not one that makes the directory look like someone else's."""
    aside = lock.with_name(f"{TMP_PREFIX}new-{lock.name}-{os.getpid()}-0")  # removed at cleanup, never put back
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another process moved it first; the next try meets that process's lock
    if aside.read_text() != stale:  # a live process's new lock, taken since we read it
        try:
            os.link(aside, lock)  # back in place, unless yet another lock is there now
        except FileExistsError:
            pass
    aside.unlink()
