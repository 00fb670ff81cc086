"""Writing files so that a crash, a full disk or a bad argument never destroys what was there.

Everything the project writes goes through here: a new file or directory is built under a
temporary sibling name (same directory, so the final rename never crosses a filesystem), fsynced,
then renamed over the destination in one step. A reader sees the old version or the new one,
never half of either; a failure removes the temporary and leaves the destination untouched.

- `atomic_file(path)`: yields a temporary path to write; on success it replaces `path` (or, with
  `replace=False`, takes its name only if nothing has it by then).
- `write_text_atomic(path, text)`: the same for a string.
- `atomic_directory(path, keep=...)`: yields a temporary directory to fill; on success it replaces
  `path` (an existing directory is swapped out in one step where the OS allows, see `_exchange`).
  The entries of the old directory named in `keep` (files the write does not own: a tokenizer, a
  README, someone else's shards) are carried into the new one as hard links, so nothing that the
  write did not produce is ever deleted.
- `publish_directory(tmp, path, keep=...)`: the same last step for a directory several processes
  filled, or one that outlived the process that started it (`drop_kept_links` first removes the
  links a publish of it killed before its swap had made).
- `claim(path, directory=...)`: a fresh temporary sibling of `path`, created exclusively.
- `fsync(path)`: make a file's bytes, or a directory's entries, durable.
- `process_alive(pid)`: whether a process exists (is a temporary's or a lock's writer still at work?).
- `followed(path)`: where a write of `path` lands (the target of a symbolic link).

Temporary names are `.tmp-new-NAME-PID-N` (a version being written) and `.tmp-old-NAME-PID-N` (a
previous version being swapped out), each created exclusively by the call that uses it
(never a name that already exists), so a cleanup only ever removes what this module made:
`remove_stale_temporaries` clears what a killed process left behind, and puts back a directory's
previous version if the process died between the two renames of a swap. Files get the usual
permissions (0666 less the umask), whatever mode the library that wrote them chose (safetensors
creates its files 0600). A destination that is a symbolic link is written where it points (the
link stays a link), beside its target.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
_TEMPORARY = re.compile(r"\.tmp-(?P<kind>new|old)-(?P<name>.+)-(?P<pid>\d+)-\d+")


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _default_mode() -> int:
    """0666 less the process's umask: the mode `open()` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _finish(path: Path, mode: int) -> None:
    """Give a written file the usual permissions and make it durable."""
    os.chmod(path, mode)
    fsync(path)


def _finish_tree(root: Path) -> None:
    mode = _default_mode()
    for p in sorted(root.rglob("*"), reverse=True):  # children before their directory
        if p.is_symlink():
            continue
        _finish(p, mode) if p.is_file() else fsync(p)
    fsync(root)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put `src` at `dst` without copying bytes where the filesystem allows (hard links)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:  # no hard links here (some network and FUSE filesystems)
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(str(src), str(dst))


def claim(path: Path, *, directory: bool, old: bool = False) -> Path:
    """A sibling of `path` named `.tmp-{new,old}-NAME-PID-N` that did not exist, created here (an
    empty file or directory, exclusively): whatever this module later removes is its own."""
    for n in itertools.count():
        tmp = path.with_name(f"{TMP_PREFIX}{'old' if old else 'new'}-{path.name}-{os.getpid()}-{n}")
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return tmp
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


@contextmanager
def atomic_file(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for the caller to write; then fsync it and rename it
    over `path`. On an exception the temporary is removed and `path` keeps its old content.
    replace=False: a file at `path` is never replaced, also one made while the caller wrote
    (`_publish_new`)."""
    path = followed(path)
    tmp = claim(path, directory=False)
    try:
        yield tmp
        _finish(tmp, _default_mode())
        os.replace(tmp, path) if replace else _publish_new(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the file `tmp` the name `path` only where nothing has that name: a hard link, which
    never replaces (without hard links, an empty file created exclusively claims the name first);
    FileExistsError naming `path` otherwise."""
    try:
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem (some network and FUSE ones)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.replace(tmp, path)
            return
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "it exists (made while this ran?) and was kept; nothing was written "
                              "there", str(path)) from None  # fmt: skip
    tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str, *, replace: bool = True) -> None:
    with atomic_file(path, replace=replace) as tmp:
        tmp.write_text(text)


def followed(path: str | os.PathLike) -> Path:
    """`path`, or where it points when it is a symbolic link: the write replaces the target, not
    the link (renaming over a link would replace the link itself)."""
    path = Path(os.path.abspath(path))  # "." or "..": a name to put a temporary sibling beside
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def directory_destination(path: str | os.PathLike) -> Path:
    """Where a directory written for `path` lands (`followed`), refused before any work when it
    cannot be replaced as a whole: an existing file, or the current directory or one above it."""
    path = followed(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
    try:
        here = Path(os.getcwd())
    except FileNotFoundError:  # the current directory was deleted: the write cannot replace it
        here = None
    if here is not None and Path(os.path.realpath(path)) in (here, *here.parents):
        raise ValueError(f"{path} is or holds the current directory, and a write replaces its directory as a "
                         "whole (the shell would be left in a deleted one): name a directory of its own")  # fmt: skip
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path` for the caller to fill; then fsync it and
    put it in place of `path`. An existing `path` (a directory) is exchanged with the new one in a
    single rename where the OS supports it; elsewhere it is moved aside first, so a crash between
    the two renames leaves it, whole, under a `.tmp-` name. On an exception the temporary is
    removed and `path` is untouched.

    keep: names of entries of the existing `path` to carry over (hard-linked after the caller has
    written, so a name the caller wrote is the caller's new file, and the old file's bytes are
    never written through the link)."""
    path = directory_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = claim(path, directory=True)
    try:
        yield tmp
        publish_directory(tmp, path, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_directory(tmp: str | os.PathLike, path: str | os.PathLike, keep: Iterable[str] = ()) -> None:
    """Fsync the filled directory `tmp` and put it in place of `path` in one step, carrying over
    the entries of the old `path` named in `keep` (the second half of `atomic_directory`, for a
    directory that several processes fill, such as a training checkpoint, or that outlives its
    process, such as a teacher cache's finished shards: its writers agree on `tmp`'s name, one
    process publishes it)."""
    tmp, path = Path(tmp), Path(path)
    drop_kept_links(tmp, path)  # before _finish_tree: a kept file's mode is its owner's
    _finish_tree(tmp)
    for name in keep:  # after _finish_tree: a kept file keeps its owner's mode
        if not (tmp / name).exists() and os.path.lexists(path / name):
            _link_or_copy(path / name, tmp / name)
    _swap(tmp, path)


def drop_kept_links(tmp: Path, path: Path) -> None:
    """Remove from `tmp` the links to `path`'s entries that a publish of `tmp` killed before its
    swap made (`keep`: a directory that outlives its process, such as a teacher cache's
    NAME.partial, is published again later): only the links go, never a file's data, and the next
    publish links them again."""
    for p in list(tmp.iterdir()):
        if _links_to(p, path / p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _links_to(a: Path, b: Path) -> bool:
    """Whether `a` is a hard link of `b`, or a directory of hard links of `b`'s (as `keep` carries one)."""
    if not os.path.lexists(b):
        return False
    if a.is_dir() and not a.is_symlink():
        return b.is_dir() and not b.is_symlink() and all(_links_to(c, b / c.name) for c in a.iterdir())
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def _swap(tmp: Path, path: Path) -> None:
    """Put the finished directory `tmp` in place of `path`: exchanged in one rename where the OS
    allows, else the old one moved aside first. A replaced directory's permissions carry over (a
    private 0700 one stays private). The old version is then removed (`remove_directory`)."""
    if path.is_dir():
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    fsync(tmp)
    if not path.exists():
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        remove_directory(tmp, path)  # tmp: now the old directory
    else:
        old = claim(path, directory=True, old=True)
        os.replace(path, old)  # onto the empty directory claimed for it
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # the previous version, whole, back in its place
            raise
        remove_directory(old, path)
    fsync(path.parent)


def remove_directory(old: Path, path: Path | None = None) -> None:
    """Remove directory `old` (a swap's replaced version of `path`; default: `old` itself) under a
    `.tmp-new-` name first: killed midway, it leaves that temporary, which a cleanup removes and never
    puts back, not a half-removed directory under a name that looks whole (a checkpoint), and `old`'s
    own name (a teacher cache's NAME.partial) is free at once. Best-effort: a file still open on
    NFS does not fail the caller; the next `remove_stale_temporaries` clears what is left."""
    doomed = claim(old if path is None else path, directory=True)
    os.replace(old, doomed)  # onto the empty directory claimed for it
    shutil.rmtree(doomed, ignore_errors=True)


def is_temporary(name: str) -> bool:
    """Whether `name` is one of this module's temporaries (`.tmp-new-...` or `.tmp-old-...`)."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Clear what writes of `directory/name` (of any name, if None) left when their process was
    killed: an unfinished new version is removed; a previous version that a swap had moved aside is
    put back if its place is empty (killed between the two renames), else removed. Only names this
    module makes are touched, and only those whose process is gone. Returns what was removed."""
    directory, removed = Path(directory), []
    for p in sorted(directory.glob(f"{TMP_PREFIX}*")):
        m = _TEMPORARY.fullmatch(p.name)
        if not m or (name is not None and m["name"] != name) or process_alive(int(m["pid"])):
            continue
        original = directory / m["name"]
        if m["kind"] == "old" and not os.path.lexists(original):
            os.replace(p, original)  # the only whole copy: put it back
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (ours, or anyone's)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def notice(message: str) -> None:
    """A line on stderr about something the user should know but that stops nothing."""
    print(f"note: {message}", file=sys.stderr, flush=True)
