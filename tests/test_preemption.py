"""A scheduler's SIGTERM (or SLURM's SIGUSR1) during training: the step in progress finishes, every
rank stops after the same step (the signal reaches one rank here), a checkpoint is saved there and
TrainingStopped names it. The command line's side (exit status, the resume) is in test_faults.py.
A run directory's lock lost by the rank holding it (taken over from another machine while it was
stopped) stops every rank at the same check, without writing."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gemma2.trainer as trainer
from conftest import tiny_training_config
from gemma2 import Gemma2ForCausalLM
from gemma2.data import Datasets, PackedSequences
from gemma2.preemption import StopTime, TrainingStopped, note_warnings
from gemma2.student import init_weights
from gemma2.train_state import latest_checkpoint
from gemma2.trainer import TrainConfig, train

WORLD = 2


def _sigterm(tmp: str) -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # handled at once: the flag is set before the step's work


def _lock_taken_over(tmp: str) -> None:
    (Path(tmp) / "run" / ".lock").write_text("4242 node-b#elsewhere\n")  # as a takeover from another machine


def _run(rank: int, tmp: str, acting_rank: int, act, during: str = "step") -> None:
    """Two ranks train 6 steps into tmp/run; `act(tmp)` runs on acting_rank at the start of step 3
    (during "step"), or in the evaluation after step 2 (during "evaluation": one every 2 steps)."""
    torch.set_num_threads(1)
    # A rank left waiting in a collective errs after a minute, not gloo's 30 (a failing test, not a hung one).
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))  # fmt: skip
    lr_at = trainer.lr_at

    def lr_acting(step: int, cfg: TrainConfig) -> float:  # the start of each step
        if step == 2 and rank == acting_rank:
            act(tmp)
        return lr_at(step, cfg)

    evaluate, evaluations = trainer._evaluate, []

    def evaluate_acting(*args, **kwargs) -> dict:
        evaluations.append(evaluate(*args, **kwargs))
        if len(evaluations) == 2 and rank == acting_rank:  # after step 2 (the first is at step 0)
            act(tmp)
        return evaluations[-1]

    if during == "step":
        trainer.lr_at = lr_acting
    else:
        trainer._evaluate = evaluate_acting
    tokens = np.random.default_rng(0).integers(3, 96, size=2000).astype(np.int32)
    heldout = PackedSequences(tokens[:200], 16) if during == "evaluation" else None
    data = Datasets(PackedSequences(tokens, 16), heldout)
    student = init_weights(Gemma2ForCausalLM(tiny_training_config(vocab_size=96, max_position_embeddings=32)), seed=2)
    cfg = TrainConfig(out_dir=str(Path(tmp) / "run"), steps=6, batch_size=2, lr=1e-2, warmup=1, alpha=0.0,
                      eval_every=2 if heldout else 0, save_every=0)  # fmt: skip
    try:
        train(cfg, student, data, progress=False)
        result = {"finished": True}
    except TrainingStopped as e:
        result = {"message": str(e), "signal": e.signal_name}
    except ValueError as e:
        result = {"error": str(e)}
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(result))
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step_at_a_checkpoint(tmp_path):
    mp.spawn(_run, args=(str(tmp_path), 1, _sigterm), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    saved = tmp_path / "run" / "step-000003"
    assert results[1] == {"message": f"stopped by SIGTERM after step 3 of 6; saved {saved}: continue with the same "
                                     "command and --resume", "signal": "SIGTERM"}  # fmt: skip
    assert results[0]["message"].startswith("stopped by a stop signal (on another rank) after step 3 of 6")
    assert latest_checkpoint(tmp_path / "run") == saved  # the only one: save_every 0 saves only at the end
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in logged] == [1, 2, 3]
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("during, logged", [("step", [1, 2]), ("evaluation", [0, 1])])
def test_a_lock_lost_by_the_rank_holding_it_stops_every_rank_at_the_same_check(tmp_path, during, logged):
    """Rank 0 holds the lock; taken over (during step 3, or during the evaluation after step 2),
    rank 0 raises with the lock's message and rank 1 with its own, both before the next metrics
    line or any checkpoint (rank 1 would otherwise wait in a collective for a rank that had
    stopped, and err when the test's one-minute timeout ends it)."""
    mp.spawn(_run, args=(str(tmp_path), 0, _lock_taken_over, during), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    run = tmp_path / "run"
    assert results[0]["error"].startswith(f"{run} is no longer this process's to write: its lock {run / '.lock'} was "
                                          "taken over by process 4242 on node-b")  # fmt: skip
    assert results[1]["error"] == ("rank 1: the rank holding the run directory's lock lost it (its own message says "
                                   "how); stopping with it, without writing")  # fmt: skip
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == logged
    assert latest_checkpoint(run) is None
    assert (run / ".lock").read_text() == "4242 node-b#elsewhere\n"  # the new holder's, left alone


def test_a_warning_before_the_loop_stops_it_at_its_first_check(tmp_path):
    """SLURM's SIGUSR1 while the models load is not lost (nor fatal): one step, a checkpoint, a stop."""
    before = signal.getsignal(signal.SIGUSR1)
    try:
        note_warnings()
        os.kill(os.getpid(), signal.SIGUSR1)
        tokens = np.random.default_rng(0).integers(3, 96, size=2000).astype(np.int32)
        student = init_weights(Gemma2ForCausalLM(tiny_training_config(vocab_size=96, max_position_embeddings=32)), 2)
        cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=6, batch_size=2, lr=1e-2, warmup=1, alpha=0.0,
                          eval_every=0, save_every=0)  # fmt: skip
        with pytest.raises(TrainingStopped, match="stopped by SIGUSR1 after step 1 of 6; saved .*step-000001"):
            train(cfg, student, Datasets(PackedSequences(tokens, 16), None), progress=False)
        assert latest_checkpoint(tmp_path / "run").name == "step-000001"
        # Acted on, the warning is gone: the resumed run trains to the end.
        student = init_weights(Gemma2ForCausalLM(tiny_training_config(vocab_size=96, max_position_embeddings=32)), 2)
        metrics = train(cfg, student, Datasets(PackedSequences(tokens, 16), None), resume=True, progress=False)
        assert [m["step"] for m in metrics] == [2, 3, 4, 5, 6]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_stop_that_could_outlast_the_grace_is_noted_once_with_its_figures(capsys):
    """The slowest step, evaluation and save (not a process's first step and evaluation: warm-ups)
    add up to the longest stop; the first time that sum passes the grace, one note names the
    figures and the settings that fix it."""
    stop_time = StopTime(10.0)
    for part, seconds in (("step", 9.0), ("step", 4.0), ("evaluation", 20.0), ("evaluation", 3.0), ("step", 2.0)):
        stop_time.measured(part, seconds)  # 4 + 3 = 7 s at most: within
    assert capsys.readouterr().err == ""
    stop_time.measured("save", 5.0)  # 4 + 3 + 5 = 12 s > 10: 1.2 x 12 = 14.4 -> 15 s asked for
    err = capsys.readouterr().err
    assert err.startswith("note: stopping on SIGTERM could take 12.0 s here (the slowest step 4.0 s, evaluation "
                          "3.0 s, save 5.0 s), more than the 10 s between SIGTERM and SIGKILL")
    assert "--signal=USR1@15" in err and "terminationGracePeriodSeconds: 15" in err and "--stop-grace 15" in err
    assert "--shutdown-timeout" not in err
    stop_time.measured("save", 50.0)
    assert capsys.readouterr().err == ""  # once
    for quiet in (StopTime(10.0, quiet=True), StopTime(None)):  # another rank; no grace declared
        quiet.measured("save", 50.0)
    assert capsys.readouterr().err == ""
    StopTime(10.0, torchrun=True).measured("save", 50.0)  # torchrun's own timeout: 1.2 x 50 = 60
    assert "torchrun: --shutdown-timeout 60, and SIGUSR1 in its --signals-to-handle" in capsys.readouterr().err


def _tiny_run(tmp_path: Path, **settings) -> tuple[TrainConfig, Gemma2ForCausalLM, Datasets]:
    tokens = np.random.default_rng(0).integers(3, 96, size=2000).astype(np.int32)
    student = init_weights(Gemma2ForCausalLM(tiny_training_config(vocab_size=96, max_position_embeddings=32)), 2)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), batch_size=2, lr=1e-2, warmup=1, alpha=0.0,
                      **{"steps": 6, "eval_every": 0, "save_every": 0} | settings)  # fmt: skip
    return cfg, student, Datasets(PackedSequences(tokens, 16), PackedSequences(tokens[:200], 16))


@pytest.mark.parametrize("slow, grace", [("save", 1.5), ("evaluation", 1.5), ("save", 30.0)])
def test_the_trainer_times_its_evaluations_and_saves_against_the_grace(tmp_path, monkeypatch, capsys, slow, grace):
    """A save or an evaluation slowed to 1.6 s passes a grace of 1.5 s (an evaluation from the
    second on: the first, at step 0 here, warms up), and the note gives its figure; 30 s is not."""
    name = {"save": "save_checkpoint", "evaluation": "_evaluate"}[slow]
    original = getattr(trainer, name)

    def slowed(*args, **kwargs):
        time.sleep(1.6)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, name, slowed)
    every = {"save": "save_every", "evaluation": "eval_every"}[slow]
    # One step: its evaluation is the process's second (the step-0 one warms up), its save the first.
    cfg, student, data = _tiny_run(tmp_path, steps=1, stop_grace=grace, **{every: 1})
    train(cfg, student, data, progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "stopping on SIGTERM" in line]
    assert len(notes) == (grace < 1.6)
    if notes:
        figure = re.search(rf"could take [\d.]+ s here \(the slowest (step [\d.]+ s, )?{slow} ([\d.]+) s\)", notes[0])
        assert figure and 1.6 <= float(figure[2]) < 10, notes[0]


def test_a_signal_during_a_periodic_save_stops_at_that_checkpoint(tmp_path, monkeypatch):
    """Not one step and another save later: the stop's cost is one save, as StopTime counts it."""
    save = trainer.save_checkpoint

    def signalled_save(out, step, *args, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # noted by StopSignals while the checkpoint is written
        return save(out, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", signalled_save)
    cfg, student, data = _tiny_run(tmp_path, save_every=2)
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM after step 2 of 6; saved .*step-000002"):
        train(cfg, student, data, progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step-000002"
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
