import json

import pytest
import torch

from gemma2 import Gemma2Config, Gemma2ForCausalLM

# Gemma 2 report (arXiv:2408.00118), Table 2: non-embedding parameters.
REPORT_NON_EMBEDDING = {"2b": 2_024_517_888, "9b": 8_324_201_984, "27b": 26_047_480_320}


@pytest.mark.parametrize("name", ["2b", "9b", "27b"])
def test_preset_parameter_counts_match_report(name):
    cfg = Gemma2Config.from_name(name)
    with torch.device("meta"):
        model = Gemma2ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total - 256000 * cfg.hidden_size == REPORT_NON_EMBEDDING[name]


@pytest.mark.parametrize(
    "name, D, layers, heads, kv, hd, F, scalar",
    [
        ("2b", 2304, 26, 8, 4, 256, 9216, 256),
        ("9b", 3584, 42, 16, 8, 256, 14336, 256),  # not 224 (an old converter's bug)
        ("27b", 4608, 46, 32, 16, 128, 36864, 144),
    ],
)
def test_presets_pin_published_values(name, D, layers, heads, kv, hd, F, scalar):
    cfg = Gemma2Config.from_name(name)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (D, layers, heads)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (kv, hd, F)
    assert cfg.query_pre_attn_scalar == scalar
    # One public port swapped the two softcaps: pin them.
    assert cfg.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0
    assert cfg.sliding_window == 4096 and cfg.max_position_embeddings == 8192
    assert cfg.vocab_size == 256000 and cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0
    assert [cfg.is_local(i) for i in range(4)] == [True, False, True, False]  # layer 0 is local


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        Gemma2Config.from_name("7b")


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_key_value_heads", 3),  # 8 heads not divisible by 3
        ("head_dim", 255),
        ("sliding_window", 0),
        ("hidden_size", 0),
        ("attn_logit_softcapping", 0.0),
        ("query_pre_attn_scalar", -1),
    ],
)
def test_impossible_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        Gemma2Config.from_name("2b").replace(**{field: value})


HF4_CONFIG = {  # the published google/gemma-2-2b config.json (transformers 4.x spelling)
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 107], "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000,
}  # fmt: skip


def test_from_json_transformers_4x(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF4_CONFIG))
    cfg = Gemma2Config.from_json(tmp_path / "config.json")
    assert cfg == Gemma2Config.from_name("2b").replace(eos_token_id=(1, 107))


def test_from_json_transformers_5x(tmp_path):
    raw = {k: v for k, v in HF4_CONFIG.items() if k != "rope_theta"}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    raw["layer_types"] = ["sliding_attention", "full_attention"] * 13
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert Gemma2Config.from_json(tmp_path / "config.json").rope_theta == 10000.0


def test_from_json_rejects_inverted_layer_types(tmp_path):
    raw = HF4_CONFIG | {"layer_types": ["full_attention", "sliding_attention"] * 13}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="layer_types"):
        Gemma2Config.from_json(tmp_path / "config.json")


def test_from_json_names_what_is_wrong(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in HF4_CONFIG.items() if k != "num_hidden_layers"}))
    with pytest.raises(ValueError, match=r"missing keys \['num_hidden_layers'\]"):
        Gemma2Config.from_json(path)
    path.write_text(json.dumps([HF4_CONFIG]))
    with pytest.raises(ValueError, match="a config is a JSON object of fields, got a list"):
        Gemma2Config.from_json(path)
    with pytest.raises(FileNotFoundError, match="nope.json: no such config file"):
        Gemma2Config.from_json(tmp_path / "nope.json")
    # What Gemma 2 never has, and this model would silently not compute: an untied head, RoPE scaling.
    path.write_text(json.dumps(HF4_CONFIG | {"tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="tie_word_embeddings is false .* loads only tied models"):
        Gemma2Config.from_json(path)
    path.write_text(json.dumps(HF4_CONFIG | {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope_scaling .* is not supported"):
        Gemma2Config.from_json(path)
    path.write_text(json.dumps(HF4_CONFIG | {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}))
    with pytest.raises(ValueError, match="rope_parameters .* is not supported"):  # 5.x's spelling, beside rope_theta
        Gemma2Config.from_json(path)
    for none in (None, {"rope_type": "default"}, {"type": "default"}):  # what tools write for no scaling
        path.write_text(json.dumps(HF4_CONFIG | {"rope_scaling": none, "tie_word_embeddings": True}))
        assert Gemma2Config.from_json(path) == Gemma2Config.from_hf_dict(HF4_CONFIG)


def test_several_eos_ids_as_a_list_are_a_tuple():
    """As JSON spells them: the config stays hashable and eos_ids is the ids."""
    cfg = Gemma2Config(eos_token_id=[1, 107])
    assert cfg.eos_token_id == cfg.eos_ids == (1, 107) and hash(cfg) == hash(cfg.replace(eos_token_id=(1, 107)))


def test_json_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = Gemma2Config.from_name("9b").replace(eos_token_id=(1, 107))
    cfg.to_json(tmp_path / "config.json")
    assert Gemma2Config.from_json(tmp_path / "config.json") == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "gemma2"
    assert (hf.hidden_size, hf.num_hidden_layers, hf.head_dim) == (3584, 42, 256)
    assert hf.query_pre_attn_scalar == 256 and hf.sliding_window == 4096
    assert hf.attn_logit_softcapping == 50.0 and hf.final_logit_softcapping == 30.0
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"]
