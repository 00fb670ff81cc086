"""scripts/convert_checkpoint.py end to end: official .ckpt -> HF directory -> .ckpt."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_twin, tiny_config
from gemma2 import load_model, save_model

SCRIPT = Path(__file__).parents[1] / "scripts" / "convert_checkpoint.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_round_trip_through_both_layouts(tmp_path):
    cfg = tiny_config()
    _, ours = hf_twin(cfg, seed=21)
    save_model(ours, tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"sp")  # copied along, content irrelevant here
    done = run("--input", tmp_path / "hf", "--output", tmp_path / "official" / "model.ckpt",
               "--to-official", "--dtype", "float32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = torch.load(tmp_path / "official" / "model.ckpt", weights_only=True)["model_state_dict"]
    assert "embedder.weight" in raw and "model.layers.0.self_attn.qkv_proj.weight" in raw
    cfg.to_json(tmp_path / "config.json")
    done = run("--input", tmp_path / "official" / "model.ckpt", "--config", tmp_path / "config.json",
               "--output", tmp_path / "back", "--dtype", "float32")  # fmt: skip
    assert done.returncode == 0, done.stderr
    back = load_model(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), back.state_dict().values()))
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == b"sp"
    # Another tokenizer already beside the output is kept, and said to be (the same one: nothing said).
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.model").write_bytes(b"theirs")
    done = run("--input", tmp_path / "hf", "--output", tmp_path / "other" / "model.ckpt", "--to-official")
    assert done.returncode == 0 and "pass --overwrite to replace it" in done.stderr, done.stderr
    assert (tmp_path / "other" / "tokenizer.model").read_bytes() == b"theirs"
    assert "kept" not in run("--input", tmp_path / "hf", "--output", tmp_path / "official" / "again.ckpt",
                             "--to-official").stderr


def test_a_missing_input_is_named_with_its_flag(tmp_path):
    done = run("--input", tmp_path / "nope", "--output", tmp_path / "out")
    assert done.returncode == 2 and done.stderr == f"error: --input {tmp_path / 'nope'}: no such file or directory\n"
    assert not (tmp_path / "out").exists()


def test_official_input_without_config_fails_with_a_message(tmp_path):
    torch.save({"model_state_dict": {}}, tmp_path / "model.ckpt")
    done = run("--input", tmp_path / "model.ckpt", "--output", tmp_path / "out")
    assert done.returncode == 2
    assert "pass config=" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf"])
def test_max_shard_gb_is_checked_before_loading(tmp_path, size):
    done = run("--input", tmp_path / "missing", "--output", tmp_path / "out", "--max-shard-gb", size)
    assert done.returncode == 2 and done.stderr.startswith("error: --max-shard-gb must be a positive number")
