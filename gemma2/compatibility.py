"""Checks that the parts a command combines belong together, made before any work.

- A tokenizer and a model: the model's vocabulary must be the tokenizer's pieces, or that number
  padded up to a multiple of `VOCAB_PADDING` (300 pieces, 384 rows; Gemma's 256000 is already a
  multiple, so its JAX tables' 256128 rows are refused: slice them to 256000), and
  the special ids (pad, bos, eos) must be the ones the model's config names. A mismatched tokenizer
  does not fail loudly by itself: every id simply means another piece (the tiny teacher's
  perplexity reads 3974 instead of 74) and generation decodes nonsense or ids past the tokenizer.
  Nor does another tokenizer of the same size and special ids: a model directory's own
  tokenizer.model, when it has one, must be the one given (`check_own_tokenizer`).
- A sequence length and a model: at most the model's context (`max_position_embeddings`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Gemma2Config, model_directory
from .tokenizer import Tokenizer

VOCAB_PADDING = 128


def check_vocab(pieces: int, vocab_size: int, what: str, tokenizer: str) -> None:
    """Raise unless a model of `vocab_size` entries can speak a tokenizer of `pieces` pieces."""
    padded = -(-pieces // VOCAB_PADDING) * VOCAB_PADDING
    if vocab_size not in (pieces, padded):
        also = f" (or {padded}, padded to a multiple of {VOCAB_PADDING})" if padded != pieces else ""
        raise ValueError(
            f"the tokenizer {tokenizer} has {pieces} pieces but {what} has a vocabulary of {vocab_size}, "
            f"not {pieces}{also}: they were not made for each other; pass the tokenizer.model that "
            "came with the model"
        )


def check_tokenizer(tokenizer: Tokenizer, config: Gemma2Config, what: str = "the model") -> None:
    """Raise ValueError unless `tokenizer` is the one `config` (a model's) was built for."""
    check_vocab(tokenizer.vocab_size, config.vocab_size, what, str(tokenizer.path))
    eos = config.eos_ids
    wrong = [
        f"{name} {mine} (model: {theirs})"
        for name, mine, theirs, ok in [
            ("pad", tokenizer.pad_id, config.pad_token_id, tokenizer.pad_id == config.pad_token_id),
            ("bos", tokenizer.bos_id, config.bos_token_id, tokenizer.bos_id == config.bos_token_id),
            ("eos", tokenizer.eos_id, config.eos_token_id, tokenizer.eos_id in eos),
        ]
        if not ok
    ]
    if wrong:
        raise ValueError(
            f"the tokenizer {tokenizer.path} numbers its special tokens differently from {what}: "
            f"{', '.join(wrong)}; pass the tokenizer.model that came with the model"
        )


def check_own_tokenizer(tokenizer: Tokenizer, model: str | os.PathLike, what: str = "the model") -> None:
    """Raise ValueError when the model at `model` (a directory, or a checkpoint file in one) came
    with a tokenizer.model that is not `tokenizer`: the same number of pieces, other pieces (a
    Gemma tokenizer against the tiny teacher's, of equal size: perplexity 3068 instead of 92)."""
    own = model_directory(model) / "tokenizer.model"
    if not own.is_file() or own.resolve() == Path(tokenizer.path).resolve():
        return
    try:
        theirs = Tokenizer(own)
    except ValueError:  # unreadable (a Git LFS pointer, say): the one given is the user's way round it
        return
    if theirs.fingerprint() != tokenizer.fingerprint():
        raise ValueError(
            f"the tokenizer {tokenizer.path} ({tokenizer.vocab_size} pieces) is not the one {what} came with "
            f"({own}, {theirs.vocab_size} pieces): its ids would mean other pieces; pass {own} (or leave --tokenizer out)"
        )


def check_seq_len(seq_len: int, config: Gemma2Config, what: str = "the model") -> None:
    """Raise ValueError when sequences of `seq_len` tokens do not fit the model's context."""
    if seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len {seq_len} exceeds the context of {what}, max_position_embeddings = "
            f"{config.max_position_embeddings}; lower seq_len to at most that (for a prompt dataset, "
            "seq_len is prompt_len + max_new_tokens - 1)"
        )
