"""Gemma 2 configuration: one dataclass, the published size presets, and config.json I/O."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def model_directory(path: str | os.PathLike) -> Path:
    """The directory of a model checkpoint, where its config.json and tokenizer.model sit: `path`
    itself, or the directory holding it (an official .ckpt file)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


@dataclass(frozen=True)
class Gemma2Config:
    vocab_size: int = 256000  # SentencePiece pieces (JAX tables are padded to 256128: slice them)
    hidden_size: int = 2304  # D, the residual stream width
    intermediate_size: int = 9216  # F, width of each MLP branch (gate and up)
    num_hidden_layers: int = 26  # even layers are local (sliding window), odd layers global
    num_attention_heads: int = 8  # H, query heads
    num_key_value_heads: int = 4  # KV heads; query head h reads KV head h // (H / KV)
    head_dim: int = 256  # never derived from D: H * head_dim != D in every published size
    query_pre_attn_scalar: float = 256  # scores are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: int = 4096  # W: a local query at position p sees keys p - W + 1 .. p
    max_position_embeddings: int = 8192  # the context length
    attn_logit_softcapping: float = 50.0  # scores -> cap * tanh(scores / cap), before the mask
    final_logit_softcapping: float = 30.0  # logits -> cap * tanh(logits / cap)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    pad_token_id: int = 0
    eos_token_id: int | tuple[int, ...] = 1  # instruction-tuned checkpoints stop on (1, 107)
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):  # as JSON spells several: a tuple keeps the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not isinstance(self.sliding_window, int) or self.sliding_window < 1:
            raise ValueError(f"sliding_window must be an integer >= 1, got {self.sliding_window!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "rms_norm_eps", "rope_theta"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    # Derived values, computed in one place.
    @property
    def eos_ids(self) -> tuple[int, ...]:
        """eos_token_id as a tuple (one id or several)."""
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def is_local(self, layer: int) -> bool:
        """Layer 0 is local (sliding window); layers then alternate local, global."""
        return layer % 2 == 0

    def replace(self, **changes: Any) -> Gemma2Config:
        return dataclasses.replace(self, **changes)

    def differences(self, other: Gemma2Config) -> list[str]:
        """`field self -> other` for each field that `other` sets differently."""
        return [f"{f.name} {getattr(self, f.name)!r} -> {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]  # fmt: skip

    # Presets.
    @classmethod
    def from_name(cls, name: str) -> Gemma2Config:
        try:
            return PRESETS[name.lower()]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # Hugging Face config.json.
    @classmethod
    def from_json(cls, path: str | Path) -> Gemma2Config:
        """Read a Hugging Face `config.json` (transformers 4.x or 5.x spelling)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config") -> Gemma2Config:
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: a config is a JSON object of fields, got a {type(raw).__name__}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "vocab_size") if k not in raw]  # fmt: skip
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        model_type = raw.get("model_type", "gemma2")
        if model_type != "gemma2":
            raise ValueError(f"{source}: model_type is {model_type!r}, expected 'gemma2'")
        act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: hidden_activation {act!r} is not Gemma 2's gelu_pytorch_tanh")
        if raw.get("tie_word_embeddings") is False:
            raise ValueError(f"{source}: tie_word_embeddings is false (a separate output head, lm_head.weight); "
                             "Gemma 2 ties its head to the embedding, and this library loads only tied models")
        # RoPE scaling: transformers 4.x's rope_scaling, 5.x's rope_parameters; Gemma 2 has none.
        for key in ("rope_scaling", "rope_parameters"):
            rope = raw.get(key) or {}
            kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
            if kind != "default":
                raise ValueError(f"{source}: {key} {raw[key]} is not supported (Gemma 2's RoPE has no scaling)")
        if "rope_theta" in raw:  # transformers 4.x
            rope_theta = raw["rope_theta"]
        else:  # transformers 5.x
            rope_theta = (raw.get("rope_parameters") or {}).get("rope_theta", cls.rope_theta)
        layer_types = raw.get("layer_types")
        n_layers = raw["num_hidden_layers"]
        if layer_types is not None:
            expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
            if list(layer_types) != expected:
                raise ValueError(
                    f"{source}: layer_types must alternate sliding/full starting with sliding "
                    f"(Gemma 2's layout), got {layer_types}"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        values.update(rope_theta=float(rope_theta))
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if raw.get(cap, 1.0) is None:
                raise ValueError(f"{source}: {cap} is null; Gemma 2 always soft-caps")
        if raw.get("sliding_window") is None and "sliding_window" in raw:
            raise ValueError(f"{source}: sliding_window is null; Gemma 2's local layers need a window")
        return cls(**values)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The config.json that transformers >= 4.46 (and 5.x) reads as Gemma2Config."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        values = dataclasses.asdict(self) | {"eos_token_id": eos}
        return values | {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": True,
            "layer_types": [
                "sliding_attention" if self.is_local(i) else "full_attention"
                for i in range(self.num_hidden_layers)
            ],
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "torch_dtype": dtype,
            "dtype": dtype,
            "use_cache": True,
        }

    def to_json(self, path: str | Path, dtype: str = "float32") -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(dtype), indent=2) + "\n")


# The published sizes (Gemma 2 report, arXiv:2408.00118, Table 1; HF config.json of
# google/gemma-2-{2b,9b,27b}). Everything not listed takes the dataclass default, which is shared
# by all three: vocab 256000, window 4096, context 8192, softcaps 50 / 30.
PRESETS: dict[str, Gemma2Config] = {
    "2b": Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       query_pre_attn_scalar=256),
    "9b": Gemma2Config(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       query_pre_attn_scalar=256),  # not 224, which some old converters carry
    "27b": Gemma2Config(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                        num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                        query_pre_attn_scalar=144),  # = D / H
    # Tiny shapes for tests and demos: same architecture, every feature exercised
    # (GQA, H * head_dim != D, a window well below the context).
    "tiny": Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                         query_pre_attn_scalar=24, sliding_window=16, max_position_embeddings=256),
}  # fmt: skip

# The demo's teacher (checkpoints/tiny-teacher, made by scripts/train_teacher.py with the
# tokenizer's vocab_size): every Gemma 2 feature at a size that trains in ~25 minutes on two CPU
# cores. Local layers see 64 keys of a 256-token context, so the sliding window matters; GQA
# (4 query heads on 2 KV heads); H * head_dim = D by coincidence only (fields are independent).
TINY_TEACHER = Gemma2Config(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
    sliding_window=64, max_position_embeddings=256,
)  # fmt: skip
