import pytest
import torch

from conftest import tiny_training_config
from gemma2 import Gemma2Config, save_model
from gemma2.student import init_weights, load_student


def test_init_weights_are_the_documented_distribution():
    model = init_weights(load_student("tiny", seed=1), seed=0)
    vectors = [p for p in model.parameters() if p.dim() == 1]
    matrices = [p for p in model.parameters() if p.dim() > 1]
    assert vectors and all(bool((p == 0).all()) for p in vectors)  # norm offsets: scale exactly 1
    values = torch.cat([p.flatten() for p in matrices])
    assert abs(values.std().item() - 0.02) < 0.001 and abs(values.mean().item()) < 0.001
    again = init_weights(load_student("tiny"), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_load_student_from_preset_config_json_or_checkpoint(tmp_path):
    assert load_student("tiny", vocab_size=100).config == Gemma2Config.from_name("tiny").replace(vocab_size=100)
    cfg = tiny_training_config()
    cfg.to_json(tmp_path / "student.json")
    assert load_student(tmp_path / "student.json").config == cfg
    trained = load_student(tmp_path / "student.json", seed=3)
    save_model(trained, tmp_path / "ckpt")
    back = load_student(tmp_path / "ckpt", vocab_size=999)  # a checkpoint keeps its own vocabulary
    assert back.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), back.parameters()))
    with pytest.raises(ValueError, match="neither a checkpoint directory, a config.json nor a preset"):
        load_student("nonesuch")
