"""gemma2.locks: one writer per directory. Holders on this machine are checked by pid; a holder on
another machine (a process with another host name, here a subprocess told so) by the refreshes of
its lock, with the intervals shortened for the tests (the same code paths at other constants)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gemma2 import locks

HOST = socket.gethostname()
# Where a pid means something, read here as Linux documents it: the boot id and the pid namespace.
SPACE = f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}:{os.stat('/proc/self/ns/pid').st_ino}"


def MINE() -> str:
    return f"{os.getpid()} {HOST}#{SPACE}\n"

ROOT = Path(__file__).parents[1]
BEAT, STALE, WATCH = 0.2, 3.0, 2.0  # wide margins: the CI machine may be loaded
# A holder on "node-a": takes the lock, says so, then at each line on stdin checks that it still holds it.
HOLDER = f"""import socket, sys
from pathlib import Path
_, directory, host, space = sys.argv
socket.gethostname = lambda: host
from gemma2 import locks
if space:
    locks._pid_space = lambda: space
locks.HEARTBEAT_S, locks.STALE_S, locks.WATCH_S = {BEAT}, {STALE}, {WATCH}
lock = locks.acquire_lock(Path(directory))
print("held", flush=True)
for _ in sys.stdin:
    try:
        locks.ensure_held(lock)
        print("still held", flush=True)
    except ValueError as e:
        print(e, flush=True)
"""


@pytest.fixture
def short(monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", BEAT)
    monkeypatch.setattr(locks, "STALE_S", STALE)
    monkeypatch.setattr(locks, "WATCH_S", WATCH)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _holder_on_node_a(directory: Path, host: str = "node-a", space: str = "") -> subprocess.Popen:
    """A holder whose host name is `host` and whose pid space (if given) `space`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), host, space], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    return proc


def _ask(proc: subprocess.Popen) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline()


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, capsys):
    lock = tmp_path / ".lock"
    lock.write_text(f"{os.getppid()} {HOST}\n")  # pytest's parent: alive
    with pytest.raises(ValueError, match=f"in use by process {os.getppid()} on {HOST}"):
        locks.acquire_lock(tmp_path)
    lock.unlink()
    assert locks.acquire_lock(tmp_path) == lock and lock.read_text() == MINE()
    locks.release_lock(lock)
    assert not lock.exists()
    dead = _dead_pid()
    lock.write_text(f"{dead} {HOST}\n")
    locks.acquire_lock(tmp_path)
    assert f"left by process {dead} on {HOST}, which is gone; taking it over" in capsys.readouterr().err
    locks.release_lock(lock)


def _no_links(src, dst, *args, **kwargs):
    raise PermissionError(1, "Operation not permitted", str(src))  # as some FUSE filesystems answer link()


@pytest.mark.parametrize("links", [True, False])
def test_taking_over_a_stale_lock_never_removes_one_a_live_process_took_meanwhile(tmp_path, monkeypatch, links):
    """Two processes find the same stale lock; the other one removes it and takes the lock just
    before this one acts: this one must give that live lock back and refuse, not delete it (by a
    hard link, or where there are none by its content)."""
    if not links:
        monkeypatch.setattr(locks.os, "link", _no_links)
    lock = tmp_path / ".lock"
    lock.write_text(f"{_dead_pid()} {HOST}\n")
    live = f"{os.getppid()} {HOST}\n"  # the parent (pytest's launcher): alive
    real_rename = os.rename

    def rename(src, dst):
        os.remove(src)  # the other process took it over first ...
        with open(src, "x") as f:
            f.write(live)  # ... and holds it now
        real_rename(src, dst)

    monkeypatch.setattr(locks.os, "rename", rename)
    with pytest.raises(ValueError, match=f"in use by process {os.getppid()}"):
        locks.acquire_lock(tmp_path)
    monkeypatch.undo()
    assert lock.read_text() == live and os.listdir(tmp_path) == [".lock"]


def test_a_lock_naming_this_process_is_a_killed_predecessors(tmp_path, capsys):
    """In a container each run's processes get the same pids: a lock that names this very process
    was left by a killed one before it (this one has not taken it), and is taken over."""
    (tmp_path / ".lock").write_text(MINE())
    lock = locks.acquire_lock(tmp_path)
    assert "which is gone; taking it over" in capsys.readouterr().err
    locks.release_lock(lock)
    assert not lock.exists()


def test_a_live_holder_on_another_machine_is_refused_once_it_refreshes_its_lock(tmp_path, short, capsys):
    holder = _holder_on_node_a(tmp_path)
    try:
        begun = time.monotonic()
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on node-a .*refreshed it while this "
                                             "process watched"):  # fmt: skip
            locks.acquire_lock(tmp_path)
        assert time.monotonic() - begun < WATCH  # refused at its first refresh, not after the watch
        assert "whose pid this process cannot check; watching it for up to" in capsys.readouterr().err
        assert _ask(holder) == "still held\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_on_another_machine_killed_is_taken_over_once_its_lock_goes_stale(tmp_path, short, capsys):
    """A job requeued on another machine after a hard kill: it waits out the lock's age, then goes on."""
    holder = _holder_on_node_a(tmp_path)
    holder.kill()
    holder.wait()
    begun = time.monotonic()
    lock = locks.acquire_lock(tmp_path)
    assert time.monotonic() - begun >= WATCH  # waited for refreshes that never came
    assert lock.read_text() == MINE()
    unrefreshed = re.search(f"left by process {holder.pid} on node-a, which has not refreshed it for (\\d+) s",
                            capsys.readouterr().err)  # fmt: skip
    assert unrefreshed and int(unrefreshed[1]) >= STALE
    locks.release_lock(lock)
    assert os.listdir(tmp_path) == []  # the probe files too are gone


def test_a_lock_on_another_machine_long_unrefreshed_is_taken_over_after_the_shortest_watch(tmp_path, short, capsys):
    lock = tmp_path / ".lock"
    lock.write_text("4242 node-a\n")
    os.utime(lock, (time.time() - 3600,) * 2)
    begun = time.monotonic()
    assert locks.acquire_lock(tmp_path) == lock and lock.read_text() == MINE()
    assert WATCH <= time.monotonic() - begun < STALE  # the filesystem's age shortened the wait
    assert re.search(r"left by process 4242 on node-a, which has not refreshed it for 360\d s", capsys.readouterr().err)
    locks.release_lock(lock)


def test_the_watch_is_never_shorter_than_watch_s_whatever_the_clocks_say(tmp_path, short, capsys):
    """Clocks of machines that stamp their own times (Lustre, FUSE) may make a live lock look an
    hour old: its holder's refresh during the shortest watch still counts."""
    holder = _holder_on_node_a(tmp_path)
    try:
        os.utime(tmp_path / ".lock", (time.time() - 3600,) * 2)  # as a clock an hour behind would stamp it
        with pytest.raises(ValueError, match="refreshed it while this process watched"):
            locks.acquire_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_that_changes_hands_while_watched_is_refused_for_a_fresh_look(tmp_path, short):
    """Released (or taken by a third process) during the watch: the caller's checks of the directory,
    made before it, may no longer hold, so the command is to be run again."""
    lock = tmp_path / ".lock"
    lock.write_text("4242 node-a\n")
    threading.Timer(0.3, lock.unlink).start()
    begun = time.monotonic()
    with pytest.raises(ValueError, match="was released or taken by another process while this one waited; run the "
                                         "command again"):  # fmt: skip
        locks.acquire_lock(tmp_path)
    assert time.monotonic() - begun < WATCH
    assert locks.acquire_lock(tmp_path) == lock  # the command again
    locks.release_lock(lock)


def test_a_holder_stopped_past_the_stale_age_stops_before_writing(tmp_path, short, capsys):
    """A holder suspended (SIGSTOP) longer than STALE_S loses its lock to a process on this machine,
    and on waking learns so from ensure_held: its message names the new holder."""
    holder = _holder_on_node_a(tmp_path)
    try:
        holder.send_signal(signal.SIGSTOP)
        lock = locks.acquire_lock(tmp_path)
        assert "which has not refreshed it for" in capsys.readouterr().err
        holder.send_signal(signal.SIGCONT)
        answer = _ask(holder)
        assert "is no longer this process's to write" in answer and f"taken over by process {os.getpid()} on {HOST}" in answer
        time.sleep(3 * BEAT)  # its heartbeat, awake again, leaves our lock alone
        assert lock.read_text() == MINE()
        locks.release_lock(lock)
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_woken_before_a_takeover_refreshes_its_lock_at_its_next_check(tmp_path, short):
    """Stopped for a while but not taken over (Ctrl-Z, then fg): it goes on, and its first check
    refreshes the lock at once, before its heartbeat would."""
    lock = locks.acquire_lock(tmp_path)
    locks._heartbeats[lock].refreshed -= 10 * BEAT  # as if this process had been stopped
    os.utime(lock, (0, 0))
    locks.ensure_held(lock)
    assert time.time() - lock.stat().st_mtime < 60
    locks.release_lock(lock)


def test_the_heartbeat_refreshes_the_lock_until_it_is_released(tmp_path, short):
    lock = locks.acquire_lock(tmp_path)
    os.utime(lock, (0, 0))
    time.sleep(3 * BEAT)
    assert time.time() - lock.stat().st_mtime < 60
    moved = tmp_path / "aside"
    os.rename(lock, moved)  # a moment without the lock (another process's give-back, say) ...
    time.sleep(2 * BEAT)
    os.rename(moved, lock)
    os.utime(lock, (0, 0))
    time.sleep(3 * BEAT)
    assert time.time() - lock.stat().st_mtime < 60  # ... does not end the heartbeat
    locks.release_lock(lock)
    time.sleep(2 * BEAT)
    assert not lock.exists() and not [t for t in threading.enumerate() if t.name == f"heartbeat of {lock}"]


def test_ensure_held_names_who_holds_the_lock_now(tmp_path):
    lock = locks.acquire_lock(tmp_path)
    locks.ensure_held(lock)
    lock.write_text("4242 node-b\n")
    with pytest.raises(ValueError, match="was taken over by process 4242 on node-b"):
        locks.ensure_held(lock)
    locks.release_lock(lock)
    assert lock.read_text() == "4242 node-b\n"  # not ours: left alone
    lock.unlink()
    with pytest.raises(ValueError, match="its lock .* was removed"):
        locks.ensure_held(lock)


def test_lock_holder_counts_a_lock_on_another_machine_as_held(tmp_path):
    """It never waits, so a lock it cannot check is someone's (the demo then refuses to remove a run)."""
    lock = tmp_path / ".lock"
    lock.write_text("4242 node-a\n")
    os.utime(lock, (time.time() - 3600,) * 2)
    assert locks.lock_holder(tmp_path) == "process 4242 on node-a"
    lock.write_text(f"{_dead_pid()} {HOST}\n")
    assert locks.lock_holder(tmp_path) is None
    lock.write_text(f"{os.getppid()} {HOST}\n")
    assert locks.lock_holder(tmp_path) == f"process {os.getppid()} on {HOST}"
    assert locks.lock_holder(tmp_path / "nothing") is None


def test_a_lock_where_no_probe_can_be_made_is_watched_for_the_whole_stale_age(tmp_path, short, monkeypatch, capsys):
    """A directory where no probe file can be made (read-only; permissions bind no root, so the
    refusal is simulated, for the probe only: the takeover itself then needs a writable directory):
    the lock's age is unknown, so it counts as just refreshed."""
    lock = tmp_path / ".lock"
    lock.write_text("4242 node-a\n")
    os.utime(lock, (time.time() - 3600,) * 2)
    real_open, real_age = os.open, locks._age

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    def age_where_nothing_can_be_made(lock):
        with monkeypatch.context() as m:
            m.setattr(locks.os, "open", read_only)
            return real_age(lock)

    monkeypatch.setattr(locks, "_age", age_where_nothing_can_be_made)
    begun = time.monotonic()
    assert locks.acquire_lock(tmp_path) == lock
    assert time.monotonic() - begun >= STALE
    assert "watching it for up to 3 s" in capsys.readouterr().err
    monkeypatch.undo()
    locks.release_lock(lock)


def test_a_process_cannot_take_a_lock_it_holds(tmp_path):
    lock = locks.acquire_lock(tmp_path)
    with pytest.raises(ValueError, match="already locked by this process"):
        locks.acquire_lock(tmp_path)
    assert locks.holds(lock)
    locks.release_lock(lock)


def test_without_hard_links_a_lock_is_created_exclusively(tmp_path, monkeypatch):
    monkeypatch.setattr(locks.os, "link", _no_links)
    lock = locks.acquire_lock(tmp_path)
    assert lock.read_text() == MINE() and os.listdir(tmp_path) == [".lock"]
    locks.release_lock(lock)
    assert os.listdir(tmp_path) == []


def test_a_lock_moved_aside_a_moment_is_still_held(tmp_path):
    """Another process giving back a lock it moved aside (`_remove_lock`) leaves it missing for a
    moment: ensure_held looks again before saying it was removed."""
    lock = locks.acquire_lock(tmp_path)
    aside = tmp_path / "aside"
    os.rename(lock, aside)
    threading.Timer(0.05, os.rename, (aside, lock)).start()
    locks.ensure_held(lock)
    locks.release_lock(lock)


def test_a_holder_in_another_container_of_the_same_host_name_is_watched_not_pid_checked(tmp_path, short, capsys):
    """Containers sharing the node's host name (hostNetwork) each number their own pids: this
    process cannot check the other's, so it watches the lock as it would another machine's."""
    holder = _holder_on_node_a(tmp_path, HOST, "another-container")
    try:
        assert (tmp_path / ".lock").read_text() == f"{holder.pid} {HOST}#another-container\n"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on {HOST} \\(another boot, "
                                             "container or machine of that name\\).*refreshed it while"):  # fmt: skip
            locks.acquire_lock(tmp_path)
        assert _ask(holder) == "still held\n"
    finally:
        holder.kill()
        holder.wait()
    lock = locks.acquire_lock(tmp_path)  # killed: taken over once stale
    assert "which has not refreshed it for" in capsys.readouterr().err
    locks.release_lock(lock)


def test_a_lock_written_now_is_another_machines_to_an_earlier_version(tmp_path):
    """Earlier versions parsed "PID HOST" and pid-checked a lock of their own host name: the pid
    space rides in the host field, so they refuse this lock instead of reading it as torn."""
    lock = locks.acquire_lock(tmp_path)
    pid_text, host = lock.read_text().split()  # an earlier version's parse
    assert int(pid_text) == os.getpid() and host != socket.gethostname()
    locks.release_lock(lock)


def test_a_lock_this_process_lost_can_be_taken_again(tmp_path):
    """A lock whose release failed, or that was removed: its heartbeat is dropped, not a refusal."""
    lock = locks.acquire_lock(tmp_path)
    lock.unlink()
    assert locks.acquire_lock(tmp_path) == lock and locks.holds(lock)
    locks.release_lock(lock)
    assert not lock.exists()
