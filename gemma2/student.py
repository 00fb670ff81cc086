"""Students to train: fresh weights for a config (`init_weights`), or a model from a checkpoint,
a config.json or a preset name (`load_student`; `model_config` for the config alone)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import load_model
from .config import PRESETS, Gemma2Config
from .model import Gemma2ForCausalLM
from .sharded_load import init_sharded, load_sharded


def initial_values(model: nn.Module, seed: int = 0, std: float = 0.02) -> Iterator[tuple[nn.Parameter, Tensor]]:
    """Each parameter of `model` with its fresh full value, in parameter order, from one generator:
    N(0, std) for the embedding and every projection (transformers' Gemma 2 initialiser), norm
    offsets 0 (scale 1). nn.Embedding's own N(0, 1) would make the tied head's first logits
    ~sqrt(D) wide, far from the uniform guess a new model should start at. One definition for
    `init_weights` and for sharded students (gemma2.sharded_load), which keep their rows of each."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:  # RMSNorm offsets: the only vectors in the model
            yield p, torch.zeros(p.shape)
        else:
            yield p, torch.randn(p.shape, generator=g) * std


@torch.no_grad()
def init_weights(model: Gemma2ForCausalLM, seed: int = 0, std: float = 0.02) -> Gemma2ForCausalLM:
    """Fresh weights in place (`initial_values`); returns the model."""
    for p, value in initial_values(model, seed, std):
        p.copy_(value)
    return model


def model_config(spec: str | os.PathLike, role: str = "student") -> Gemma2Config:
    """The config that `spec` names: a checkpoint directory's config.json, a config.json file or
    a preset name (`role` names the model in the error)."""
    path = Path(spec)
    if path.is_dir():
        return Gemma2Config.from_json(path / "config.json")
    if path.suffix == ".json":
        return Gemma2Config.from_json(path)
    try:
        return Gemma2Config.from_name(str(spec))
    except ValueError:
        raise ValueError(
            f"{role} {str(spec)!r} is neither a checkpoint directory, a config.json nor a preset; "
            f"pass one of those (presets: {', '.join(sorted(PRESETS))})"
        ) from None


def student_config(spec: str | os.PathLike, vocab_size: int | None = None) -> Gemma2Config:
    """The config of the student `spec` names (as load_student reads it): a fresh student's
    vocabulary size replaced by `vocab_size` when given, a checkpoint's kept."""
    config = model_config(spec)
    return config if vocab_size is None or Path(spec).is_dir() else config.replace(vocab_size=vocab_size)


def load_student(
    spec: str | os.PathLike, *, vocab_size: int | None = None, seed: int = 0, sharded: bool = False
) -> Gemma2ForCausalLM:
    """A student from a checkpoint directory (its weights), a config.json or a preset name (fresh
    weights from `init_weights(seed)`). `vocab_size` replaces a fresh student's vocabulary size, to
    match the teacher's or the tokenizer's; a checkpoint keeps its own. sharded (torchrun only):
    the same weights, loaded shard by shard when the trainer shards the student (gemma2.sharded_load)."""
    if Path(spec).is_dir():
        return load_sharded(spec) if sharded else load_model(spec)
    config = student_config(spec, vocab_size)
    if sharded:
        return init_sharded(config, partial(initial_values, seed=seed))
    return init_weights(Gemma2ForCausalLM(config), seed)
