"""gemma2.files: a failed write leaves the destination as it was; kept entries survive untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from gemma2 import files
from gemma2.files import atomic_directory, atomic_file, remove_stale_temporaries, write_text_atomic


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_a_failed_file_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_write_that_must_not_replace_keeps_a_file_made_while_it_wrote(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # as on filesystems without them: the name is claimed by an exclusive create
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(PermissionError(1, "no links")))
    target = tmp_path / "figures.json"
    with pytest.raises(FileExistsError, match="made while this ran"), atomic_file(target, replace=False) as tmp:
        tmp.write_text("new")
        target.write_text("someone else's")  # appears after the caller's own check
    assert target.read_text() == "someone else's" and os.listdir(tmp_path) == ["figures.json"]
    target.unlink()
    write_text_atomic(target, "new", replace=False)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["figures.json"] and _mode(target) == _default_mode()


def test_files_get_the_default_mode_whatever_the_writer_chose(tmp_path):
    with atomic_file(tmp_path / "a") as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors creates its files
        os.close(fd)
    with atomic_directory(tmp_path / "d") as tmp:
        os.close(os.open(tmp / "b", os.O_WRONLY | os.O_CREAT, 0o600))
    assert _mode(tmp_path / "a") == _mode(tmp_path / "d" / "b") == _default_mode()


def test_a_directory_write_works_from_a_deleted_current_directory(tmp_path, monkeypatch):
    (tmp_path / "gone").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "w").write_text("new")
    assert (tmp_path / "d" / "w").read_text() == "new"


def test_a_replaced_directory_keeps_its_permissions(tmp_path):
    for mode in (0o700, 0o750):
        (tmp_path / "d").mkdir(exist_ok=True)
        os.chmod(tmp_path / "d", mode)  # a private checkpoint directory stays private
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "w").write_text("new")
        assert _mode(tmp_path / "d") == mode and (tmp_path / "d" / "w").read_text() == "new"


def test_a_directory_write_keeps_named_entries_and_never_writes_through_them(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep.txt").write_text("user")
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("deep")
    (target / "replace.txt").write_text("old")
    (target / "drop.txt").write_text("previous save's")
    outside = tmp_path / "link-to-old"
    os.link(target / "replace.txt", outside)  # sees the old file's bytes, whatever happens
    with atomic_directory(target, keep=["keep.txt", "sub", "replace.txt"]) as tmp:
        (tmp / "replace.txt").write_text("new")  # the caller's file wins over a kept name
    assert sorted(os.listdir(target)) == ["keep.txt", "replace.txt", "sub"]
    assert (target / "keep.txt").read_text() == "user" and (target / "sub" / "x").read_text() == "deep"
    assert (target / "replace.txt").read_text() == "new" and outside.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["d", "link-to-old"]  # no temporaries left


def test_a_failed_directory_write_leaves_the_directory(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(OSError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
        raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == ["d"] and (target / "a").read_text() == "old"


def test_a_directory_write_onto_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError), atomic_directory(tmp_path / "f"):
        pass
    assert (tmp_path / "f").read_text() == "x"


def test_only_the_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp-new-out-{dead.pid}-0").mkdir()
    (tmp_path / f".tmp-new-out-{os.getpid()}-0").mkdir()
    (tmp_path / ".tmp-notes").write_text("a user's file with our prefix")
    (tmp_path / "out").mkdir()
    assert remove_stale_temporaries(tmp_path, "out") == [tmp_path / f".tmp-new-out-{dead.pid}-0"]
    assert remove_stale_temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [f".tmp-new-out-{os.getpid()}-0", ".tmp-notes", "out"]


def test_a_directory_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Killed between the two renames of a swap: the previous version is the only whole copy."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".tmp-old-ckpt-{dead.pid}-0"
    aside.mkdir()
    (aside / "weights").write_text("the only copy")
    (tmp_path / f".tmp-new-ckpt-{dead.pid}-0").mkdir()  # the new version, never put in place
    assert remove_stale_temporaries(tmp_path, "ckpt") == [tmp_path / f".tmp-new-ckpt-{dead.pid}-0"]
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "weights").read_text() == "the only copy"


def test_a_version_being_written_is_never_taken_for_a_previous_one(tmp_path):
    """A killed write of `old-model` left `.tmp-new-old-model-...`: removed, never put in place
    of `model`."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp-new-old-model-{dead.pid}-0").mkdir()
    assert remove_stale_temporaries(tmp_path) == [tmp_path / f".tmp-new-old-model-{dead.pid}-0"]
    assert os.listdir(tmp_path) == []


def test_writes_through_a_symbolic_link_replace_its_target(tmp_path):
    """checkpoints/x -> /bigdisk/x: the new version is written at the target, the link stays."""
    (tmp_path / "big").mkdir()
    (tmp_path / "big/model").mkdir()
    (tmp_path / "big/model/weights").write_text("old")
    (tmp_path / "big/model/NOTES").write_text("mine")
    (tmp_path / "big/tok").write_text("old")
    (tmp_path / "model").symlink_to(tmp_path / "big/model")
    (tmp_path / "tok").symlink_to(tmp_path / "big/tok")
    with atomic_directory(tmp_path / "model", keep=["NOTES"]) as tmp:
        (tmp / "weights").write_text("new")
    write_text_atomic(tmp_path / "tok", "new")
    assert (tmp_path / "model").is_symlink() and (tmp_path / "tok").is_symlink()
    assert (tmp_path / "big/model/weights").read_text() == "new" and (tmp_path / "big/tok").read_text() == "new"
    assert (tmp_path / "big/model/NOTES").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["big", "model", "tok"]
    assert sorted(os.listdir(tmp_path / "big")) == ["model", "tok"]


def test_a_write_never_touches_a_file_already_at_its_temporary_name(tmp_path):
    """The temporary names are claimed exclusively: one that exists (another writer's, a user's)
    is skipped, never truncated or removed."""
    for n in range(2):
        (tmp_path / f".tmp-new-f.txt-{os.getpid()}-{n}").write_text(f"not ours {n}")
    (tmp_path / f".tmp-new-f.txt-{os.getpid()}").write_text("not ours")  # the names before claiming
    (tmp_path / f".tmp-new-d-{os.getpid()}-0").mkdir()
    (tmp_path / f".tmp-new-d-{os.getpid()}-0" / "x").write_text("not ours")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f.txt") as tmp:
        raise RuntimeError("failed")
    write_text_atomic(tmp_path / "f.txt", "new")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "y").write_text("new")
    for n in range(2):
        assert (tmp_path / f".tmp-new-f.txt-{os.getpid()}-{n}").read_text() == f"not ours {n}"
    assert (tmp_path / f".tmp-new-f.txt-{os.getpid()}").read_text() == "not ours"
    assert (tmp_path / f".tmp-new-d-{os.getpid()}-0" / "x").read_text() == "not ours"
    assert (tmp_path / "f.txt").read_text() == "new" and os.listdir(tmp_path / "d") == ["y"]


def test_a_swap_without_rename_exchange_replaces_the_directory(tmp_path, monkeypatch):
    """Filesystems without renameat2's exchange: the old version is moved aside, then removed."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights").write_text("old")
    with atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_text("new")
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "weights").read_text() == "new"


def test_a_swap_that_fails_after_moving_the_old_version_aside_puts_it_back(tmp_path, monkeypatch):
    """The second rename of the fallback swap fails: the previous version, the only whole copy, is
    back under its own name at once (not left for a later cleanup)."""
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-new-ckpt-"):  # the new version going into place
            raise OSError(5, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights").write_text("the only copy")
    with pytest.raises(OSError, match="Input/output"), atomic_directory(tmp_path / "ckpt") as tmp:
        (tmp / "weights").write_text("new")
    assert os.listdir(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "weights").read_text() == "the only copy"


@pytest.mark.parametrize("exchange", [True, False])
def test_publishing_frees_the_filled_directorys_name_at_once_and_survives_a_failed_cleanup(tmp_path, monkeypatch,
                                                                                        exchange):  # fmt: skip
    """publish_directory of a directory under a name of its own (a teacher cache's `NAME.partial`,
    which a later write reuses): the swapped-out old version is removed under a temporary's name,
    never left under that name, and a failure to remove it (a file still open on NFS) does not fail
    the write; the next cleanup clears it once this process is gone, and never puts the half-removed
    old version back in place of a destination deleted since (a rotated-away checkpoint)."""
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "old").write_text("old")
    (tmp_path / "cache.partial").mkdir()
    (tmp_path / "cache.partial" / "new").write_text("new")
    monkeypatch.setattr(files.shutil, "rmtree", lambda path, ignore_errors=False: None)  # removes nothing
    files.publish_directory(tmp_path / "cache.partial", tmp_path / "cache")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "cache") == ["new"] and not (tmp_path / "cache.partial").exists()
    [left] = [p for p in tmp_path.iterdir() if p.name != "cache"]
    assert left.name.startswith(".tmp-") and os.listdir(left) == ["old"]
    shutil.rmtree(tmp_path / "cache")  # deleted since (rotated away)
    monkeypatch.setattr(files, "process_alive", lambda pid: False)  # as the next process sees it
    remove_stale_temporaries(tmp_path)
    assert os.listdir(tmp_path) == []


def test_publishing_never_changes_the_mode_of_a_kept_file_linked_before(tmp_path):
    """A publish killed after it linked the kept files leaves links to the user's files in the
    directory it fills; publishing it again must not chmod them (the user's own inodes)."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "cache" / "run.sh", 0o700)
    (tmp_path / "cache.partial").mkdir()
    (tmp_path / "cache.partial" / "shard").write_text("new")
    os.link(tmp_path / "cache" / "run.sh", tmp_path / "cache.partial" / "run.sh")  # the killed publish's link
    files.publish_directory(tmp_path / "cache.partial", tmp_path / "cache", keep=["run.sh"])
    assert _mode(tmp_path / "cache" / "run.sh") == 0o700 and _mode(tmp_path / "cache" / "shard") == _default_mode()
