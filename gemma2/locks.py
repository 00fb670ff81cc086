"""One writer per directory, across processes and machines: `directory/.lock`.

The lock file holds "PID HOST#PID_SPACE" of its holder (the pid space: the boot and pid namespace
where the pid means something; earlier versions of this module, which wrote "PID HOST", read it as
another machine's). `acquire_lock` creates it whole, `release_lock` removes it. While it is held,
a thread of the holder refreshes the file's modification time every `HEARTBEAT_S` seconds. A
process that finds the lock taken:

- in the holder's pid space, checks the pid: refused while that process exists, the lock taken
  over (with a notice) once it is gone;
- elsewhere (another machine, or another container or boot of the same host name), where the pid
  cannot be checked (a job a scheduler requeued elsewhere after a hard kill, or a restarted
  container, which gets a new pid namespace), watches the lock: refreshed, its holder runs
  (refused, within about `HEARTBEAT_S`); unchanged for `STALE_S` since its last refresh and for at
  least `WATCH_S` of this process's own watching, its holder is gone (taken over, with a notice).
  The age before the watch is read by the filesystem's clock (a probe file's modification time;
  on NFS the server's), which only shortens the wait: filesystems that stamp times with each
  client's clock (Lustre, FUSE) let skewed clocks misjudge that age, never the watch. A lock that
  changes hands during the watch is refused: the caller's checks of the directory, made before,
  may no longer hold.

A holder stopped longer than that (SIGSTOP, a suspended job) may find its lock taken over when it
continues: `ensure_held`, called before its writes (each metrics line and checkpoint of training,
each progress record and the publish of a token file, the publish of a teacher cache), then stops
it with a message. A write already under way when it was stopped may still land. A holder whose
refreshes fail says so once (a notice). `lock_holder` never waits: a lock whose pid cannot be
checked counts as held (its callers refuse and name the file to delete). In a torchrun job rank 0
holds the lock; when it stops, torchrun ends the others.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path

from .files import claim, notice, process_alive

LOCK_FILE = ".lock"
HEARTBEAT_S = 15.0  # how often a holder refreshes its lock
STALE_S = 120.0  # a lock on another machine unrefreshed this long is its holder's that is gone ...
WATCH_S = 60.0  # ... once this process has also seen it unchanged this long (its own clock)


class _Heartbeat:
    """The thread refreshing one held lock, and when it last managed to."""

    def __init__(self, lock: Path, me: str) -> None:
        self.lock, self.me = lock, me
        self.refreshed = time.monotonic()
        self.stop = threading.Event()
        threading.Thread(target=self._run, name=f"heartbeat of {lock}", daemon=True).start()

    def _run(self) -> None:
        failing = False
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.refresh()
                failing = False
            except OSError as e:
                if not failing:  # once per run of failures
                    notice(f"cannot refresh {self.lock} ({e}); a process on another machine may take the lock over "
                           f"after {STALE_S:.0f} s")  # fmt: skip
                failing = True

    def refresh(self) -> None:
        """Touch the lock if it is still ours (the time of its filesystem: on NFS the server's)."""
        try:
            ours = self.lock.read_text() == self.me
        except FileNotFoundError:
            return  # released, taken over, or moved aside a moment: not ours to touch
        if ours:
            try:
                os.utime(self.lock)
            except FileNotFoundError:
                return
            self.refreshed = time.monotonic()


_heartbeats: dict[Path, _Heartbeat] = {}  # the locks this process holds


def acquire_lock(directory: Path) -> Path:
    """Create directory/.lock holding "pid host" and keep it refreshed; refuse when a live process
    holds it, take it over (with a notice) when its holder is gone (see the module docstring).
    Returns the lock file."""
    lock = directory / LOCK_FILE
    if lock in _heartbeats:
        if holds(lock):
            raise ValueError(f"{directory} is already locked by this process (lock file {lock})")
        _heartbeats.pop(lock).stop.set()  # a lock it lost, or one whose release failed
    me = _me()
    for _ in range(3):  # later tries follow the removal of a stale lock
        try:
            _create(lock, me)
        except FileExistsError:
            try:
                held = lock.read_text()
            except FileNotFoundError:
                continue  # released meanwhile
            holder, live = _holder(held)
            if live is None:  # its pid cannot be checked here: its refreshes tell
                live, why = _watch(lock, held, holder)
                if live:
                    raise ValueError(f"{directory} is in use by {holder} (lock file {lock}), which refreshed it "
                                     f"while this process watched; wait for it to end or write elsewhere (once "
                                     f"unrefreshed for {STALE_S:.0f} s it is taken over)")  # fmt: skip
            elif live:
                raise ValueError(f"{directory} is in use by {holder} (lock file {lock}); wait for it to end or "
                                 f"write elsewhere. If that process is gone, delete {lock}")  # fmt: skip
            else:
                why = "which is gone"
            notice(f"{lock} was left by {holder}, {why}; taking it over")
            _remove_lock(lock, held)
            continue
        _heartbeats[lock] = _Heartbeat(lock, me)
        return lock
    raise ValueError(f"{lock}: another process took the lock at the same moment; retry")


def _create(lock: Path, content: str) -> None:
    """Create `lock` holding `content`, or raise FileExistsError. Written beside it (a temporary of
    gemma2.files, made exclusively) and linked into place, so that nobody reads it empty (an empty
    lock is a torn one: its taker was killed); where there are no hard links (some FUSE
    filesystems), created exclusively and then written."""
    tmp = None
    try:
        tmp = claim(lock, directory=False)
        os.chmod(tmp, 0o644)
        tmp.write_text(content)
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError:  # no hard links (or no temporary) here
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(content)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # ours (a new holder's cleanup may have been first)


def release_lock(lock: Path) -> None:
    """Stop refreshing `lock` and remove it if this process holds it (a lock another process took
    over is left alone)."""
    beat = _heartbeats.pop(lock, None)
    if beat is not None:
        beat.stop.set()
    if holds(lock):
        _remove_lock(lock, _me())


def ensure_held(lock: Path) -> None:
    """Raise if `lock` is no longer this process's (another took it over while this one was stopped,
    or it was removed); refresh it now if the heartbeat has not lately (this process was stopped,
    and a watcher should see it run again). Called before each write into the locked directory."""
    held = _content(lock)
    if held is None:  # or moved aside a moment by a process giving it back: look again
        time.sleep(0.2)
        held = _content(lock)
    if held == _me():
        beat = _heartbeats.get(lock)
        if beat is not None and time.monotonic() - beat.refreshed > 2 * HEARTBEAT_S:
            try:
                beat.refresh()
            except OSError:
                pass  # the heartbeat says so
        return
    if held is None:
        what = "removed (by hand?)"
    else:
        what = (f"taken over by {_holder(held)[0]} (a lock left unrefreshed for {STALE_S:.0f} s, while this "
                "process was stopped or its filesystem hung, is taken over from another machine)")  # fmt: skip
    raise ValueError(
        f"{lock.parent} is no longer this process's to write: its lock {lock} was {what}; stopping without "
        "writing. To continue this work, wait for the other process to end, or write elsewhere"
    )


def holds(lock: Path) -> bool:
    """Whether this process holds `lock` (it took it, and nobody took it over or removed it since)."""
    return _content(lock) == _me()


def lock_holder(directory: Path) -> str | None:
    """"process PID on HOST" when a live process may hold directory/.lock (one whose pid cannot be
    checked here, on another machine say, always may: this call never waits to find out), else None."""
    try:
        holder, live = _holder((directory / LOCK_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return holder if live is not False else None


def _content(lock: Path) -> str | None:
    try:
        return lock.read_text()
    except FileNotFoundError:
        return None


@functools.cache
def _pid_space() -> str:
    """Where this process's pid means something: the boot and the pid namespace, as Linux names
    them ("-" where it does not). Machines may share a host name (a default one), and so may
    containers (Kubernetes' hostNetwork, docker --network host), each numbering its own pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "-"


def _me() -> str:
    return f"{os.getpid()} {socket.gethostname()}#{_pid_space()}\n"


def _holder(held: str) -> tuple[str, bool | None]:
    """Who a lock's content ("PID HOST#PID_SPACE"; of an earlier version: "PID HOST") names, and
    whether that process is alive (None: its pid cannot be checked from here)."""
    try:
        pid_text, where = held.split()
        pid = int(pid_text)
    except ValueError:
        return "a process killed as it took it", False  # torn between create and write: nobody holds it
    host, _, space = where.partition("#")
    if host != socket.gethostname():
        return f"process {pid} on {host}", None
    if space and space != _pid_space():
        return f"process {pid} on {host} (another boot, container or machine of that name)", None
    # Our own pid: a killed process's before us (a container's processes get the same pids each run).
    return f"process {pid} on {host}", pid != os.getpid() and process_alive(pid)


def _mtime(lock: Path) -> int | None:
    """The lock's modification time in ns, None if it is gone. Read through an open file: on NFS an
    open fetches the server's attributes, where a stat may answer from a cache up to a minute old."""
    try:
        with open(lock, "rb") as f:
            return os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        return None


def _age(lock: Path) -> float:
    """Seconds since the lock was last written or refreshed by the clock of its filesystem (the
    modification time of a temporary made beside it); 0 where none can be made (read-only)."""
    try:
        probe = claim(lock, directory=False)
    except OSError:
        return 0.0
    try:
        now = probe.stat().st_mtime_ns
    finally:
        probe.unlink(missing_ok=True)  # ours (a new holder's cleanup may have been first)
    written = _mtime(lock)
    return 0.0 if written is None else max(0.0, (now - written) / 1e9)


def _watch(lock: Path, held: str, holder: str) -> tuple[bool, str]:
    """Whether a lock naming a process on another machine is live (refreshed while watched), and if
    not, a few words why for the notice. Raises if it changes hands meanwhile."""
    first, age = _mtime(lock), _age(lock)
    wait = max(STALE_S - age, WATCH_S)
    notice(f"{lock} names {holder}, whose pid this process cannot check; watching it for up to {wait:.0f} s (a "
           f"running holder refreshes it every {HEARTBEAT_S:.0f} s)")  # fmt: skip
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(HEARTBEAT_S / 4, left))
        try:
            same = lock.read_text() == held
        except FileNotFoundError:
            same = False
        mtime = _mtime(lock)
        if not same or mtime is None:
            raise ValueError(f"{lock.parent}: its lock, held by {holder}, was released or taken by another process "
                             "while this one waited; run the command again")  # fmt: skip
        if mtime != first:
            return True, ""
    return False, f"which has not refreshed it for {age + wait:.0f} s (a running holder does every {HEARTBEAT_S:.0f} s)"


def _remove_lock(lock: Path, content: str) -> None:
    """Remove `lock` if it still holds `content`. Of several processes removing one lock, one moves
    it aside (a rename onto an empty temporary of gemma2.files this call made, so nothing else is
    ever replaced); a lock that another process took in the meantime is given back. Killed before
    removing it, this process leaves a temporary the next start clears, not a file that makes the
    directory look like someone else's."""
    aside = claim(lock, directory=False)
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        aside.unlink(missing_ok=True)
        return  # gone, or another process moved it first; a next try meets that process's lock
    try:
        found = aside.read_text()
    except FileNotFoundError:
        return  # cleared by the cleanup of a process that took the lock meanwhile
    if found != content:  # a live process's lock, taken since we read it: back in place
        try:
            os.link(aside, lock)  # needs no room on a full disk
        except FileExistsError:
            pass  # yet another lock is there now
        except OSError:  # no hard links here
            with suppress(FileExistsError):
                _create(lock, found)
    aside.unlink(missing_ok=True)
