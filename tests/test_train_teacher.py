"""scripts/train_teacher.py end to end on a few steps: it writes a loadable model directory, never
deletes a file, refuses a non-empty --work or an existing --out before any work, and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from gemma2.checkpoint import load_model
from gemma2.generation import generate
from gemma2.tokenizer import Tokenizer

SCRIPT = Path(__file__).parents[1] / "scripts/train_teacher.py"
SMALL = ["--batch-size", "2", "--seq-len", "32", "--vocab-size", "512", "--threads", "1"]


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args], cwd=cwd, capture_output=True, text=True)


def test_train_teacher_writes_a_model_and_never_deletes(tmp_path):
    # A --work holding someone's files: refused, the files kept, nothing written anywhere.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    busy = run(tmp_path, "--steps", "2", "--work", "busy", "--out", "model")
    assert busy.returncode == 2 and busy.stderr.startswith("error: --work busy is not empty"), busy.stderr
    assert (tmp_path / "busy/notes.txt").read_text() == "mine" and not (tmp_path / "model").exists()

    first = run(tmp_path, "--steps", "2", "--work", "work", "--out", "model")
    assert first.returncode == 0, first.stderr
    model = load_model(tmp_path / "model")
    tok = Tokenizer(tmp_path / "model/tokenizer.model")
    assert tok.vocab_size == model.config.vocab_size == 512
    assert len(generate(model, torch.tensor([[tok.bos_id]]), max_new_tokens=4)[0]) == 5
    assert json.loads((tmp_path / "work/final.json").read_text())["step"] == 2
    weights = (tmp_path / "model/model.safetensors").read_bytes()
    logged = (tmp_path / "work/metrics.jsonl").read_text()

    # The same command again: the run and the model are there; both refused before any work.
    again = run(tmp_path, "--steps", "2", "--work", "work", "--out", "model")
    assert again.returncode == 2 and "--work work is not empty" in again.stderr
    again = run(tmp_path, "--steps", "3", "--work", "work", "--out", "model", "--resume")
    assert again.returncode == 2 and again.stderr.startswith("error: --out model exists; pass --overwrite")
    assert (tmp_path / "model/model.safetensors").read_bytes() == weights

    # --resume continues the run in --work; --overwrite replaces the model files, keeping others.
    (tmp_path / "model/NOTES.md").write_text("mine")
    resumed = run(tmp_path, "--steps", "3", "--work", "work", "--out", "model", "--resume", "--overwrite")
    assert resumed.returncode == 0, resumed.stderr
    now = (tmp_path / "work/metrics.jsonl").read_text()
    assert now.startswith(logged)  # continued at step 2, not started over
    assert {json.loads(line)["step"] for line in now.removeprefix(logged).splitlines()} == {3}
    assert (tmp_path / "model/model.safetensors").read_bytes() != weights
    assert (tmp_path / "model/NOTES.md").read_text() == "mine"
