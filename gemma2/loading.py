"""A checkpoint and its tokenizer, as the scripts that run a model load them (scripts/generate.py,
scripts/evaluate.py).

The tokenizer is the checkpoint's `tokenizer.model` unless one is named (`find_tokenizer`). It is
read first and checked against the model's config.json (gemma2.compatibility) before any weight is
read (`load_checked`), so a wrong pairing costs a second, not a 9B load. An official `.ckpt`
without a config.json is checked once loaded. Every error is a ValueError or an OSError naming the
fix (one line from gemma2.cli).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import checkpoint_files, load_model
from .compatibility import check_own_tokenizer, check_tokenizer
from .config import Gemma2Config, model_directory
from .model import Gemma2ForCausalLM
from .student import model_config
from .tokenizer import Tokenizer


def default_dtype(device: str | torch.device, quantize: str | None) -> str:
    """float32 on CPU, bfloat16 on CUDA, and bfloat16 for int8 weights, whose fast CPU kernel
    takes bf16 activations (gemma2.quantize)."""
    return "bfloat16" if torch.device(device).type == "cuda" or quantize else "float32"


def stored_config(path: str | os.PathLike) -> Gemma2Config | None:
    """The config.json beside a checkpoint, or None (an official .ckpt: checked once loaded)."""
    file = model_directory(path) / "config.json"
    try:
        return Gemma2Config.from_json(file) if file.is_file() else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # load_model reports what is wrong with it


def config_flag(checkpoint: str | os.PathLike, spec: str | None) -> Gemma2Config | None:
    """The config that --config names (a preset or a config.json), for a checkpoint without a
    config.json of its own (an official .ckpt). One that differs from the checkpoint's own
    config.json is refused, naming the fields, rather than silently overriding it."""
    if spec is None:
        return None
    config, own = model_config(spec, "--config"), stored_config(checkpoint)
    if own is None or own == config:
        return config
    raise ValueError(
        f"--config {spec} differs from {model_directory(checkpoint) / 'config.json'} (config.json -> --config: "
        f"{'; '.join(own.differences(config))}): --config is for a checkpoint without a config.json; drop it to "
        "load the checkpoint as its config.json says"
    )


def check_vocabulary(tokenizer: Tokenizer, config: Gemma2Config) -> None:
    """The tokenizer is the model's (gemma2.compatibility), and its vocabulary not padded beyond
    the pieces: a padded one trains fine, but sampling could pick an id no piece decodes."""
    check_tokenizer(tokenizer, config)
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocabulary of {config.vocab_size} is padded beyond the tokenizer's {tokenizer.vocab_size} "
            f"pieces, so generation could pick ids the tokenizer cannot decode; slice the embedding to its first "
            f"{tokenizer.vocab_size} rows first (and vocab_size in config.json)"
        )


def check_model_arg(path: str | os.PathLike, flag: str) -> None:
    """A model that `flag` names exists and holds weights (a run's directory is named with a
    checkpoint inside it to pass), before any tokenizer is sought there or any weight read."""
    if not Path(path).exists():
        raise ValueError(f"{flag} {path}: no such file or directory")
    checkpoint_files(Path(path))


def find_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer for `checkpoint`: `tokenizer` (a .model file, or a directory holding
    tokenizer.model), by default the checkpoint's own, which `tokenizer` must then be; first checks
    that the checkpoint exists and holds weights."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ValueError(
            f"checkpoint {checkpoint} not found; pass --checkpoint a directory with config.json and *.safetensors "
            "(scripts/convert_checkpoint.py converts an official .ckpt)"
        )
    checkpoint_files(checkpoint)  # a directory without weights (a run's, say) is named before its tokenizer
    path = Path(tokenizer) if tokenizer else model_directory(checkpoint)
    if path.is_dir():  # a checkpoint directory, as for Tokenizer()
        path /= "tokenizer.model"
    if not path.is_file():
        raise ValueError(
            f"tokenizer {path} not found; put tokenizer.model in the checkpoint directory or pass --tokenizer PATH"
        )
    found = Tokenizer(path)
    check_own_tokenizer(found, checkpoint, "the checkpoint")
    return found


def load_checked(
    checkpoint: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    config: Gemma2Config | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    check: Callable[[Tokenizer, Gemma2Config], None] = check_vocabulary,
) -> Gemma2ForCausalLM:
    """gemma2.checkpoint.load_model, with `check(tokenizer, config)` before any weight is read (on
    `config`, else config.json), or after loading for an official .ckpt without either. The default
    check is generation's (`check_vocabulary`); `compatibility.check_tokenizer` also accepts a
    vocabulary padded past the pieces."""
    known = config or stored_config(checkpoint)
    if known is not None:
        check(tokenizer, known)
    model = load_model(checkpoint, config=config, dtype=dtype, device=device, quantize=quantize)
    if known is None:
        check(tokenizer, model.config)
    return model


def load_with_tokenizer(
    checkpoint: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, **options
) -> tuple[Gemma2ForCausalLM, Tokenizer]:
    """`find_tokenizer`, then `load_checked` with `options` (config, dtype, device, quantize, check)."""
    tok = find_tokenizer(checkpoint, tokenizer)  # before the model: a bad tokenizer fails fast
    return load_checked(checkpoint, tok, **options), tok
