"""gemma2.run_dir: what a run owns, the resume comparison, robust reading of its files."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma2 import files, locks
from gemma2 import run_dir as R
from gemma2.trainer import TrainConfig

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_takeover_killed_midway_leaves_a_temporary_the_next_start_clears(tmp_path, monkeypatch):
    """Killed between moving the stale lock aside and removing it: what is left is a temporary of
    gemma2.files, which does not make the directory look foreign and is cleared once its process is gone."""
    lock = tmp_path / ".lock"
    stale = f"{_dead_pid()} {HOST}\n"
    lock.write_text(stale)
    real_unlink = R.Path.unlink

    def killed(self, *args, **kwargs):
        if self.read_text() == stale:  # the stale lock, moved aside
            raise KeyboardInterrupt("killed")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(R.Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        locks.acquire_lock(tmp_path)
    monkeypatch.undo()
    [left] = os.listdir(tmp_path)
    assert left.startswith(".tmp-") and R._non_empty_foreign(tmp_path) == []
    monkeypatch.setattr(files, "process_alive", lambda pid: False)  # as the next process sees it
    R._remove_temporaries(tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_run_whose_lock_was_taken_over_saves_nothing(tmp_path):
    """Run.saving checks the lock first (gemma2.locks.ensure_held): a holder whose lock was taken
    over while it was stopped writes no checkpoint."""
    lock = locks.acquire_lock(tmp_path)
    run = R.Run(tmp_path, "id", None, "fp", {}, {}, lock=lock)
    with run.saving(torch.nn.Linear(2, 2)):
        pass
    lock.write_text("4242 node-b\n")
    with pytest.raises(ValueError, match="taken over by process 4242 on node-b"):
        with run.saving(torch.nn.Linear(2, 2)):
            pytest.fail("saved under a lock taken over")
    locks.release_lock(lock)


def _checkpoint(out, step: int, run_id: str | None, state: str | None = None):
    path = out / f"step-{step:06d}"
    path.mkdir(parents=True)
    record = {"step": step} | ({"run": {"id": run_id}} if run_id else {})
    (path / R.STATE_FILE).write_text(state if state is not None else json.dumps(record))
    return path


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step, "mine")
    _checkpoint(tmp_path, 4, "another run")
    _checkpoint(tmp_path, 0, None)  # a legacy or hand-made one: no run id
    (tmp_path / "step-old").mkdir()
    (tmp_path / "step-0000005").mkdir()  # seven digits: not ours
    R.rotate(tmp_path, "mine", keep_last=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-000000", "step-0000005", "step-000003", "step-000004", "step-old"]
    R.rotate(tmp_path, None, keep_last=1)  # without a run id nothing is anyone's to delete
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_a_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """A kill inside the deletion (here: rmtree fails after removing one file) leaves a temporary
    the next start clears, and every step-XXXXXX whole. (Deleting in place once left a step dir
    without its weights: tests/test_faults.py's kill-and-resume run failed on it.)"""
    for step in (1, 2):
        _checkpoint(tmp_path, step, "mine")
        (tmp_path / f"step-{step:06d}" / "model.safetensors").write_bytes(b"weights")

    def killed(path, *args, **kwargs):
        next(Path(path).glob("*")).unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(R.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        R.rotate(tmp_path, "mine", keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in R.step_dirs(tmp_path)] == ["step-000002"]
    assert sorted(p.name for p in (tmp_path / "step-000002").iterdir()) == ["model.safetensors", R.STATE_FILE]
    R._remove_temporaries(tmp_path)  # what the next start does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_the_latest_complete_checkpoint_skips_a_corrupt_state(tmp_path, capsys):
    _checkpoint(tmp_path, 2, "r")
    _checkpoint(tmp_path, 4, "r", state='{"step": 4, "da')
    (tmp_path / "step-old").mkdir()
    ckpt, state = R.latest_complete(tmp_path)
    assert ckpt.name == "step-000002" and state["step"] == 2
    assert f"{tmp_path / 'step-000004' / R.STATE_FILE} is corrupt" in capsys.readouterr().err
    assert R.latest_complete(tmp_path / "missing") is None


def test_metrics_are_strict_json_and_a_torn_line_is_dropped(tmp_path, capsys):
    line = R.json_line({"step": 1, "loss": float("nan"), "kd": float("inf"), "ce": 2.5})
    record = json.loads(line, parse_constant=lambda c: pytest.fail(c))
    assert record == {"step": 1, "loss": None, "kd": None, "ce": 2.5, "nonfinite": ["loss", "kd"]}
    file = tmp_path / "metrics.jsonl"
    file.write_text(line + R.json_line({"step": 2, "loss": 1.0}) + '{"step": 3, "lo')
    assert [m["step"] for m in R.read_metrics(file)] == [1, 2]
    assert f"{file}:3 is not a complete metrics record" in capsys.readouterr().err


def _state(cfg: TrainConfig, step: int = 4, fingerprint: str = "abc") -> dict:
    return {"step": step, "config": dataclasses.asdict(cfg), "run": {"id": "r", "train_fingerprint": fingerprint}}


def test_resume_allows_the_safe_changes_and_prints_them(tmp_path, capsys):
    old = TrainConfig(out_dir=str(tmp_path), steps=4, save_every=2, keep_last=1)
    new = dataclasses.replace(old, steps=8, save_every=4, eval_every=5, keep_last=None)
    R.check_resume(new, _state(old), "abc", tmp_path)
    err = capsys.readouterr().err
    for change in ("steps: 4 -> 8", "save_every: 2 -> 4", "eval_every: 100 -> 5", "keep_last: 1 -> None"):
        assert change in err


def test_resume_refuses_every_other_change_listing_them(tmp_path):
    old = TrainConfig(out_dir=str(tmp_path), steps=4)
    meaning = dict(batch_size=4, grad_accum=2, lr=1e-3, min_lr=1e-5, warmup=5, weight_decay=0.0, betas=(0.8, 0.9),
                   grad_clip=0.5, alpha=0.5, objective="jsd", temperature=2.0, beta=0.3, chunk_size=64, dtype="fp32",
                   seed=3, lmbda=0.5, seq_kd=True, max_new_tokens=8, gen_temperature=0.5, prompt_len=4,
                   group_by_length=16)  # fmt: skip
    safe = set(R.SAFE_TO_CHANGE)
    assert set(meaning) | safe == {f.name for f in dataclasses.fields(TrainConfig)}  # every field is classified
    for name, value in meaning.items():
        with pytest.raises(ValueError, match=f"cannot resume from .*{name} \\(checkpoint: "):
            R.check_resume(dataclasses.replace(old, **{name: value}), _state(old), "abc", tmp_path)
    with pytest.raises(ValueError, match=r"the training tokens .*fingerprint abc -> xyz"):
        R.check_resume(old, _state(old), "xyz", tmp_path)
    with pytest.raises(ValueError, match=r"steps \(checkpoint: 4, now: 3\)"):
        R.check_resume(dataclasses.replace(old, steps=3), _state(old), "abc", tmp_path)


def test_resume_may_split_the_same_global_batch_otherwise(tmp_path, capsys):
    """Two ranks of 2 sequences -> one process of 2 x 2 micro-batches, or of 4: the same steps."""
    old = TrainConfig(out_dir=str(tmp_path), batch_size=2)
    state = _state(old) | {"world_size": 2}
    R.check_resume(dataclasses.replace(old, grad_accum=2), state, "abc", tmp_path, world=1)
    R.check_resume(dataclasses.replace(old, batch_size=4), state, "abc", tmp_path, world=1)
    assert "batch_size: 2 -> 4 (the global batch stays 4)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the global batch, batch_size x grad_accum x ranks, would go from 4 to 8"):
        R.check_resume(dataclasses.replace(old, batch_size=4), state, "abc", tmp_path, world=2)


def test_resume_accepts_the_same_tokenizer_under_another_path(tmp_path, capsys):
    ckpt = tmp_path / "step-000004"
    ckpt.mkdir()
    (ckpt / "tokenizer.model").write_bytes(b"tok")
    (tmp_path / "a.model").write_bytes(b"tok")
    (tmp_path / "b.model").write_bytes(b"other")
    old = TrainConfig(out_dir=str(tmp_path), tokenizer_file="/gone/tokenizer.model")
    R.check_resume(dataclasses.replace(old, tokenizer_file=str(tmp_path / "a.model")), _state(old), "abc", ckpt)
    assert "tokenizer_file" not in capsys.readouterr().err
    R.check_resume(dataclasses.replace(old, tokenizer_file=str(tmp_path / "b.model")), _state(old), "abc", ckpt)
    assert "tokenizer_file: /gone/tokenizer.model ->" in capsys.readouterr().err  # the tokens' fingerprint decides
