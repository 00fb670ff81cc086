"""Loading and saving checkpoints: both layouts, both directions with transformers, every error."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_twin, left_padded, tiny_config
from gemma2 import CheckpointError, Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import hf_to_official

CFG = tiny_config()


@pytest.fixture(scope="module")
def twin():
    return hf_twin(CFG, seed=11)


@pytest.fixture(scope="module")
def inputs():
    return left_padded([40, 26], CFG.vocab_size)


def logits(model, inputs):
    with torch.no_grad():
        if isinstance(model, Gemma2ForCausalLM):
            return model(*inputs)
        return model(input_ids=inputs[0], attention_mask=inputs[1]).logits


def assert_same_logits(a, b, inputs):
    real = inputs[1].bool()
    assert (logits(a, inputs) - logits(b, inputs))[real].abs().max() <= 1e-4


def official_state(hf) -> dict:
    """The official reference's layout, built here by hand from the transformers weights."""
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    out = {"embedder.weight": state.pop("model.embed_tokens.weight"), "freqs_cis": torch.randn(256, 12)}
    for i in range(CFG.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        out[p + "qkv_proj.weight"] = torch.cat([state.pop(p + f"{n}_proj.weight") for n in "qkv"])
    return out | state


def test_transformers_sharded_save_loads_with_same_logits(twin, inputs, tmp_path):
    hf, _ = twin
    hf.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_logits(load_model(tmp_path), hf, inputs)


def test_our_save_loads_in_transformers_with_same_logits(twin, inputs, tmp_path):
    import transformers

    _, ours = twin
    save_model(ours, tmp_path, max_shard_bytes=150_000)  # sharded
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_same_logits(ours, hf, inputs)
    assert_same_logits(load_model(tmp_path), hf, inputs)


def test_single_file_save_round_trip(twin, inputs, tmp_path):
    _, ours = twin
    save_model(ours, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), loaded.state_dict().values()))


def test_official_ckpt_loads_with_same_logits(twin, inputs, tmp_path):
    hf, _ = twin
    torch.save({"model_state_dict": official_state(hf)}, tmp_path / "model.ckpt")
    assert_same_logits(load_model(tmp_path / "model.ckpt", config=CFG), hf, inputs)


def test_ckpt_in_the_format_before_torch_1_6_names_the_fix_and_the_fix_loads(twin, inputs, tmp_path):
    """torch.save's old format cannot be memory-mapped: refused with the one-line re-save, which
    then loads (not 'truncated or corrupt?')."""
    hf, _ = twin
    old = tmp_path / "old.ckpt"
    torch.save({"model_state_dict": official_state(hf)}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"old\.ckpt: saved in PyTorch's format from before 1\.6") as e:
        load_model(old, config=CFG)
    command = str(e.value).split("python -c ")[1].strip('"')
    subprocess.run([sys.executable, "-c", command], cwd=tmp_path, check=True)
    assert_same_logits(load_model(tmp_path / "old.resaved.ckpt", config=CFG), hf, inputs)


def test_official_bin_shards_load(twin, inputs, tmp_path):
    hf, _ = twin
    state = official_state(hf)
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map |= dict.fromkeys(keys, file)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_logits(load_model(tmp_path, config=CFG), hf, inputs)
    # A Hugging Face save beside them (save_model and convert_checkpoint.py refuse to write one
    # there): which weights are the model is ambiguous, refused rather than guessed.
    with pytest.raises(ValueError, match="holds official weights .* save into another directory"):
        save_model(load_model(tmp_path, config=CFG), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    save_model(load_model(tmp_path, config=CFG), tmp_path / "hf")
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match=f"{tmp_path} holds more than one set of weights .*model.safetensors, "
                                              "pytorch_model.bin.index.json"):  # fmt: skip
        load_model(tmp_path)
    done = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "scripts/convert_checkpoint.py"),
                           "--input", str(tmp_path), "--output", str(tmp_path), "--config", "tiny"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "holds official weights (pytorch_model.bin.index.json)" in done.stderr, done.stderr


def test_hf_to_official_inverts_loading(twin):
    hf, ours = twin
    expected = official_state(hf)
    expected.pop("freqs_cis")
    got = hf_to_official(ours.state_dict())
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_load_in_bfloat16(twin, inputs, tmp_path):
    _, ours = twin
    save_model(ours, tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_float16_is_refused(tmp_path):
    """Regression: Gemma 2 overflows in fp16."""
    with pytest.raises(ValueError, match="bfloat16"):
        load_model(tmp_path, dtype=torch.float16)


# Every key is checked.


@pytest.fixture
def saved(twin, tmp_path):
    _, ours = twin
    save_model(ours, tmp_path)
    return tmp_path


def rewrite(directory, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_an_error(saved):
    """Regression: strict=False loading left weights silently at their initial values."""
    rewrite(saved, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        load_model(saved)


def test_unexpected_tensor_is_an_error(saved):
    rewrite(saved, lambda s: s.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*unexpected tensor 'model.layers.9"):
        load_model(saved)


def test_misshaped_tensor_is_an_error(saved):
    rewrite(saved, lambda s: s.update({"model.norm.weight": torch.zeros(63)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(63,\).*\(64,\)"):
        load_model(saved)


def test_config_that_does_not_match_tensors_is_an_error(saved):
    with pytest.raises(CheckpointError, match="config does not match"):
        load_model(saved, config=CFG.replace(intermediate_size=128))


def test_truncated_file_is_an_error(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model(saved)


def test_corrupt_ckpt_is_an_error(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="model.ckpt.*truncated or corrupt"):
        load_model(tmp_path / "model.ckpt", config=CFG)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model_state_dict": {"x": Evil()}}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="model.ckpt"):
        load_model(tmp_path / "model.ckpt", config=CFG)


def test_missing_shard_listed_in_index_is_an_error(twin, tmp_path):
    _, ours = twin
    save_model(ours, tmp_path, max_shard_bytes=150_000)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path)


def test_no_config_is_an_error_that_names_the_fix(twin, tmp_path):
    hf, _ = twin
    torch.save({"model_state_dict": official_state(hf)}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="pass config="):
        load_model(tmp_path / "model.ckpt")


def test_library_never_imports_transformers():
    import pathlib

    import gemma2

    for file in pathlib.Path(gemma2.__file__).parent.glob("*.py"):
        for line in file.read_text().splitlines():
            assert not line.strip().startswith(("import transformers", "from transformers")), file


def test_a_config_or_tokenizer_file_given_as_the_checkpoint_names_its_directory():
    teacher = Path(__file__).parents[1] / "checkpoints" / "tiny-teacher"
    for name in ("config.json", "tokenizer.model"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a weights file .*; pass its directory, {teacher}$"):
            load_model(teacher / name)


def test_a_copy_of_the_tied_head_is_dropped_and_any_other_head_refused(twin, inputs, tmp_path):
    """lm_head.weight beside the embedding (some exporters write it): a copy loads as the model
    without it; a head of its own (one entry off, or the embedding rounded to bf16), or of another
    shape, is refused rather than silently replaced by the embedding."""
    from safetensors.torch import save_file

    hf, ours = twin
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    for name, head in (("copy", embed.clone()), ("copy-bf16", embed.bfloat16()), ("own", embed.clone()),
                       ("shape", embed[:-1].clone())):  # fmt: skip
        if name == "own":
            head[7, 3] += 0.5
        (tmp_path / name).mkdir()
        save_file(state | {"lm_head.weight": head}, tmp_path / name / "model.safetensors")
        ours.config.to_json(tmp_path / name / "config.json")
    assert_same_logits(load_model(tmp_path / "copy"), hf, inputs)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_model(tmp_path / "copy-bf16")  # rounded to bf16: not the embedding any more
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight: .* its own"):
        load_model(tmp_path / "own")
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \(299, 64\)"):
        load_model(tmp_path / "shape")
