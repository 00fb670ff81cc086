"""Reading and writing Gemma 2 checkpoints.

Two layouts on disk:
- Hugging Face: `config.json` + `model.safetensors`, or shards listed by
  `model.safetensors.index.json`. Our module names are the Hugging Face names, so no renaming.
- The official PyTorch reference: one `.ckpt` (a dict with `model_state_dict`), or `.bin` shards
  listed by `pytorch_model.bin.index.json`. Same names except `embedder.weight` and one fused
  `qkv_proj` per layer (rows q, k, v); its shape comes from a preset or config the caller names.

Loading builds the model on the `meta` device and assigns each tensor once, converted to the target
dtype as it is read, so the peak memory stays close to the size of the weights. Every key is
checked: missing, unexpected and mis-shaped tensors are errors, never silently left at init.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from .config import Gemma2Config
from .dtypes import to_dtype
from .model import Gemma2ForCausalLM

HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
OFFICIAL_INDEX = "pytorch_model.bin.index.json"
EMBED = "model.embed_tokens.weight"
OFFICIAL_EMBED = "embedder.weight"
SKIPPED = ("freqs_cis",)  # the official reference stores its RoPE table; we recompute it


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the model it claims to be."""


# Official <-> Hugging Face names: pure functions over an explicit map.


def official_to_hf(name: str, tensor: Tensor, config: Gemma2Config) -> Iterator[tuple[str, Tensor]]:
    """One official tensor -> the Hugging Face tensors it holds (the fused qkv becomes three)."""
    if name == OFFICIAL_EMBED:
        yield EMBED, tensor
    elif name.endswith(".self_attn.qkv_proj.weight"):
        prefix = name.removesuffix("qkv_proj.weight")
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q_rows + 2 * kv_rows:
            raise CheckpointError(
                f"{name} has {tensor.shape[0]} rows; the config expects (H + 2 KV) * head_dim = "
                f"{q_rows + 2 * kv_rows}: the config does not match this checkpoint"
            )
        q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
        yield prefix + "q_proj.weight", q
        yield prefix + "k_proj.weight", k
        yield prefix + "v_proj.weight", v
    else:
        yield name, tensor


def hf_to_official(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face state dict -> the official reference's names (fused qkv, embedder)."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == EMBED:
            out[OFFICIAL_EMBED] = tensor
        elif name.endswith(".self_attn.q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            parts = [state[prefix + p + "_proj.weight"] for p in "qkv"]
            out[prefix + "qkv_proj.weight"] = torch.cat(parts)
        elif not name.endswith((".self_attn.k_proj.weight", ".self_attn.v_proj.weight")):
            out[name] = tensor
    return out


# Reading.


def _resolve_config(path: Path, config: Gemma2Config | str | None) -> Gemma2Config:
    if isinstance(config, Gemma2Config):
        return config
    if isinstance(config, str):
        return Gemma2Config.from_name(config)
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").exists():
        raise CheckpointError(
            f"{directory}: no config.json; pass config= (a Gemma2Config or a preset name such as '2b')"
        )
    return Gemma2Config.from_json(directory / "config.json")


def _read_safetensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from e


def _read_pickle(file: Path) -> Iterator[tuple[str, Tensor]]:
    try:
        # weights_only: never unpickle arbitrary objects; mmap: never hold two copies.
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read PyTorch checkpoint ({e}); is it truncated or corrupt?") from e
    state = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors (optionally under 'model_state_dict')")
    yield from state.items()


def _shards(path: Path) -> list[Path]:
    """The files that hold the tensors, in a stable order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    for index_name in (HF_INDEX, OFFICIAL_INDEX):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid index file ({e})") from None
            files = [path / f for f in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{index} lists shards that are missing: {absent}")
            return files
    if (path / HF_SINGLE).exists():
        return [path / HF_SINGLE]
    ckpts = sorted(path.glob("*.ckpt"))
    if len(ckpts) == 1:
        return ckpts
    raise CheckpointError(
        f"{path}: found no {HF_SINGLE}, {HF_INDEX}, {OFFICIAL_INDEX} or single .ckpt file to load"
    )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    config: Gemma2Config | str | None = None,
    progress: bool = False,
    attention: str = "auto",
    compile_attention: bool | None = None,
) -> Gemma2ForCausalLM:
    """Load a Gemma 2 checkpoint (Hugging Face directory, official `.ckpt`, or `.bin` shards).

    config: the model's shape when the checkpoint has no config.json (a Gemma2Config or a preset
    name); it overrides config.json when given. progress: show a bar over the tensors.
    attention, compile_attention: as in Gemma2ForCausalLM (default: the fastest measured path for
    the device and call; "eager" is the reference; compile_attention=False never compiles).
    """
    dtype = to_dtype(dtype)  # bfloat16 or float32, by dtype or by name (gemma2.dtypes)
    path = Path(path)
    files = _shards(path)
    config = _resolve_config(path, config)
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config, attention, compile_attention)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    bar = tqdm(total=len(expected), desc="loading", unit="tensor", disable=not progress)
    for file in files:
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_pickle
        for raw_name, raw in reader(file):
            if raw_name in SKIPPED or raw_name == "lm_head.weight" and EMBED in expected:
                # lm_head is tied to the embedding; some exporters write the copy anyway.
                continue
            for name, tensor in official_to_hf(raw_name, raw, config):
                if name not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {raw_name!r}; is this a Gemma 2 checkpoint?")
                if name in state:
                    raise CheckpointError(f"{file}: tensor {raw_name!r} appears twice in the checkpoint")
                if tensor.shape != expected[name]:
                    raise CheckpointError(
                        f"{file}: tensor {raw_name!r} has shape {tuple(tensor.shape)} but the config expects "
                        f"{tuple(expected[name])}: the config does not match this checkpoint"
                    )
                state[name] = tensor.to(device=device, dtype=dtype)
                bar.update()
    bar.close()
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: missing tensors {shown}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# Writing.


def save_model(
    model: Gemma2ForCausalLM, directory: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> None:
    """Write the Hugging Face layout: config.json and safetensors, sharded above `max_shard_bytes`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [*directory.glob("model*.safetensors"), directory / HF_INDEX]:
        stale.unlink(missing_ok=True)  # a previous save with another sharding must not linger
    if len(shards) == 1:
        save_file(shards[0], directory / HF_SINGLE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    model.config.to_json(directory / "config.json", dtype=dtype)


def save_official(model: Gemma2ForCausalLM, path: str | os.PathLike) -> None:
    """Write the official reference's `.ckpt`: `{"model_state_dict": ...}` with fused qkv."""
    state = hf_to_official({k: v.detach() for k, v in model.state_dict().items()})
    torch.save({"model_state_dict": state}, path)
