"""Token files: a corpus or a prompt dataset tokenized once into one `.npy` that every rank
memory-maps.

A token file is two files:
- `NAME.npy`, int32. Documents (kind "documents"): the training documents' tokens followed by the
  held-out documents', each document `bos ids eos` (the packing of gemma2.data.tokenize). Prompts
  (kind "prompts", gemma2.prompts): the training examples' tokens followed by the held-out
  examples', each its prompt then its whole completion (gemma2.prompts.Examples), then the
  `[n, 2]` table of every example's prompt and completion lengths, in the same order;
- `NAME.json`, the sidecar: the kind, the tokenizer's fingerprint and vocabulary size, documents
  (examples) and tokens per split, and how the held-out split was made. Only the sidecar makes the
  `.npy` a token file.

`load_token_file` gives exactly the Datasets that gemma2.data.load_datasets builds in memory from
the same sources and holdout fraction, and `load_prompt_file` those of
gemma2.prompts.load_prompt_datasets (tested), without reading or tokenizing anything; a prompt
file is laid out at load time, for any prompt_len and max_new_tokens.

Written by gemma2.token_writer.write_token_file (scripts/tokenize_data.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import Datasets, load_datasets, pack_datasets
from .files import followed
from .prompts import Examples, load_prompt_datasets, prompt_datasets
from .tokenizer import Tokenizer

FORMAT = 1


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the sidecar of token file `path` lives: NAME.npy -> NAME.json."""
    return Path(path).with_suffix(".json")


def _open(path: str | os.PathLike, tokenizer: Tokenizer, kind: str) -> tuple[np.ndarray, dict]:
    """Token file `path`, memory-mapped, and its sidecar; ValueError when it is no complete token
    file, holds the other kind, or was made with another tokenizer."""
    path = followed(path)  # a symbolic link: its target's sidecar, as write_token_file wrote it
    side = sidecar_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such token file: {path}")
    if not side.is_file():
        raise ValueError(
            f"{path} has no sidecar {side.name}: it is not a complete token file (was "
            "scripts/tokenize_data.py killed?); rerun scripts/tokenize_data.py to write it"
        )
    info = json.loads(side.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{side}: token file format {info.get('format')}, this code reads {FORMAT}; rerun scripts/tokenize_data.py"
        )
    made, flags = info.get("kind", "documents"), {"documents": "--data", "prompts": "--prompts"}
    if made not in flags:
        raise ValueError(f"{side}: unknown kind {made!r} of token file; rerun scripts/tokenize_data.py")
    if made != kind:
        flag = flags[made]
        raise ValueError(f"{path} is a token file of {made} (scripts/tokenize_data.py {flag}): pass it as {flag}")
    made_with, here = info["tokenizer"]["fingerprint"], tokenizer.fingerprint()
    if made_with != here:
        raise ValueError(
            f"{path} was tokenized with another tokenizer (fingerprint {made_with}, this run's "
            f"{tokenizer.path} is {here}); pass the tokenizer it was made with, or rerun "
            "scripts/tokenize_data.py with this one"
        )
    array = np.load(path, mmap_mode="r")
    size = info["tokens"]["train"] + info["tokens"]["heldout"]
    if kind == "prompts":
        size += 2 * (info["examples"]["train"] + info["examples"]["heldout"])
    if array.dtype != np.int32 or array.shape != (size,):
        raise ValueError(
            f"{path} holds {array.dtype} {array.shape}, its sidecar says int32 ({size},): "
            "the pair does not belong together; rerun scripts/tokenize_data.py"
        )
    return array, info


def load_token_file(path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int) -> Datasets:
    """The Datasets of the token file of documents `path`, memory-mapped (see _open's errors)."""
    tokens, info = _open(path, tokenizer, "documents")
    n_train = info["tokens"]["train"]
    return pack_datasets(tokens[:n_train], tokens[n_train:], seq_len, where=str(path))


def load_prompt_file(path: str | os.PathLike, tokenizer: Tokenizer, max_new_tokens: int,
                     prompt_len: int | None = None) -> Datasets:  # fmt: skip
    """The Datasets of the token file of prompts `path` (gemma2.prompts.prompt_datasets), its
    tokens memory-mapped (see _open's errors)."""
    array, info = _open(path, tokenizer, "prompts")
    t_train, t_held = info["tokens"]["train"], info["tokens"]["heldout"]
    e_train = info["examples"]["train"]
    lengths = np.asarray(array[t_train + t_held :], dtype=np.int64).reshape(-1, 2)
    train = Examples(array[:t_train], lengths[:e_train])
    held = Examples(array[t_train : t_train + t_held], lengths[e_train:]) if len(lengths) > e_train else None
    return prompt_datasets(train, held, tokenizer, max_new_tokens, prompt_len)


def names_token_file(paths: Sequence[str | os.PathLike] | None) -> bool:
    """Whether a --data or --prompts list names a token file (NAME.npy)."""
    return any(Path(p).suffix == ".npy" for p in paths or ())


def _alone(paths: Sequence[str | os.PathLike], flag: str, eval_flag: str, others: bool) -> bool:
    """Whether `paths` name a token file, which must come alone and without held-out flags."""
    if not names_token_file(paths):
        return False
    if len(paths) > 1 or others:
        raise ValueError(
            f"a token file (.npy) is the whole data set, its held-out split included: pass it alone as {flag}, "
            f"without {eval_flag} or --holdout-fraction (choose those in scripts/tokenize_data.py)"
        )
    return True


def open_datasets(
    paths: Sequence[str | os.PathLike] | None,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    holdout_fraction: float | None = None,
    eval_paths: Sequence[str | os.PathLike] | None = None,
) -> Datasets:
    """What a script's --data names: one token file of documents (NAME.npy, split inside it), else
    documents for gemma2.data.load_datasets (holdout_fraction None = 0.02)."""
    if paths and _alone(paths, "--data", "--eval-data", eval_paths is not None or holdout_fraction is not None):
        return load_token_file(paths[0], tokenizer, seq_len)
    fraction = 0.02 if holdout_fraction is None else holdout_fraction
    return load_datasets(paths, tokenizer, seq_len, holdout_fraction=fraction, eval_paths=eval_paths)


def open_prompt_datasets(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    *,
    prompt_len: int | None = None,
    holdout_fraction: float | None = None,
    eval_paths: Sequence[str | os.PathLike] | None = None,
) -> Datasets:
    """What a script's --prompts names: one token file of prompts, else `.jsonl` prompt datasets
    for gemma2.prompts.load_prompt_datasets (holdout_fraction None = 0.02)."""
    if _alone(paths, "--prompts", "--eval-prompts", eval_paths is not None or holdout_fraction is not None):
        return load_prompt_file(paths[0], tokenizer, max_new_tokens, prompt_len)
    fraction = 0.02 if holdout_fraction is None else holdout_fraction
    return load_prompt_datasets(paths, tokenizer, max_new_tokens, prompt_len=prompt_len, holdout_fraction=fraction,
                                eval_paths=eval_paths)  # fmt: skip
