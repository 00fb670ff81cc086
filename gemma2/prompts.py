"""Prompt datasets for on-policy distillation: prompts (and optional reference completions) from
JSON Lines files, as left-padded training rows of one layout, each batch cut to what its rows reach.

Each line of a `.jsonl` file is one example, in one of TRL's two forms:
- `{"prompt": str, "completion": str}`: plain text. The prompt is encoded with bos, the completion
  without, followed by eos.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation in Gemma's chat format
  (gemma2.tokenizer.Tokenizer.encode_chat). A final assistant turn is the completion, followed by
  `<end_of_turn>`; everything before it is the prompt, which ends by opening the model's turn.
The completion may be left out ("prompt" alone, or messages ending with a user turn): such rows can
only be trained on-policy or on the teacher's samples (lmbda = 1, or seq_kd).

Row layout, P = prompt_len and N = max_new_tokens: a row holds P + N tokens, its prompt
right-aligned in the first P columns (left padding, marked invalid so no query attends to it and
RoPE positions start at the first real token) and its completion from column P, cut to N tokens
and padded after its end. The layout's inputs are columns 0 .. P + N - 2 and its targets columns
1 .. P + N - 1, counted (`!= IGNORE_INDEX`) exactly on the completion; so seq_len = P + N - 1,
the width of the rows gemma2.on_policy samples from these prompts. Padding after the completion
stays valid: causal attention keeps it out of every counted position. A batch holds only the
columns its own rows reach, from its longest prompt's first column to its longest completion's
end (one column past the prompts at least: a sampler cuts them there), `Batch.start` the first;
as TRL pads each batch to its longest example: a wide prompt_len costs compute only where a
batch's prompts fill it.

Examples whose prompt is longer than P are dropped, with a count on stderr, never cut: the start of
a chat holds its instructions. The held-out split is by a hash of each example's prompt
(`prompt_key`, gemma2.corpus.held_out), the same in every process, every completion of a prompt
on the same side (the held-out prompts are unseen ones); a repeated line is kept once. Encoded
examples are held ragged (`Examples`: one flat int32 array, each prompt then its whole completion,
and their lengths), so a prompt dataset tokenized once into a token file (gemma2.token_files,
scripts/tokenize_data.py --prompts) is memory-mapped as it is and laid out for any P and N; a
batch is assembled on the host with one fancy index.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import distributed
from .corpus import held_out, note_overlap
from .data import IGNORE_INDEX, Batch, Datasets
from .tokenizer import Tokenizer, chat_pairs


def example_lines(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str]]:
    """(`FILE:LINE`, line) for each non-blank line of the `.jsonl` files in `paths`, in order;
    ValueError naming a path that is missing, not `.jsonl` or not UTF-8."""
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: prompts come as .jsonl files, one JSON object per line")
        try:
            with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the JSON
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield f"{path}:{n}", line
        except FileNotFoundError:
            raise ValueError(f"{path}: no such prompts file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_examples(paths: Sequence[str | os.PathLike]) -> dict[str, tuple[str, dict]]:
    """The examples of `paths` (example_lines), each parsed and checked to be a JSON object of one
    of the two forms (ValueError naming the file and line otherwise), keyed by their line and
    mapped to where they are (the first place for a repeated line) and the object."""
    lines: dict[str, tuple[str, dict]] = {}
    for where, line in example_lines(paths):
        if line not in lines:
            lines[line] = (where, parse_example(line, where))
    if not lines:
        raise ValueError(f"no examples in {', '.join(map(str, paths))}: each line must hold a JSON object")
    return lines


def parse_example(line: str, where: str) -> dict:
    """One line as a JSON object of one of the two forms; ValueError starting with `where` otherwise."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply") from None
    if isinstance(example, dict) and "messages" in example:  # the conversation, even beside a "prompt"
        if isinstance(example["messages"], list) and example["messages"]:
            return example
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role": str, "content": str}} turns')
    if isinstance(example, dict) and isinstance(example.get("prompt"), str):
        if not isinstance(example.get("completion", ""), str):
            raise ValueError(f'{where}: "completion" must be a string')
        return example
    raise ValueError(
        f'{where}: expected {{"prompt": str, "completion": str}} (completion optional) or '
        '{"messages": [{"role": "user", "content": str}, ...]}'
    )


def prompt_key(example: dict, where: str) -> str:
    """What names a parsed example's prompt for the held-out split, so that every completion of one
    prompt lands on the same side: its prompt text, or its conversation before a final assistant
    turn as the chat template reads it (gemma2.tokenizer.chat_pairs: "assistant" and "model" one
    role, contents trimmed, a system message folded in), as JSON; a ValueError starting with
    `where` for a conversation the template refuses."""
    if "messages" not in example:
        return "prompt\0" + example["prompt"]
    turns = example["messages"]
    # The completion is a final model turn; a lone model turn stays, for chat_pairs to refuse.
    if isinstance(turns[-1], dict) and turns[-1].get("role") in ("assistant", "model") and len(turns) > 1:
        turns = turns[:-1]
    try:
        return "messages\0" + json.dumps(chat_pairs(turns), ensure_ascii=False)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def encode_example(example: dict, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one parsed example; the completion [] when it has none."""
    if "messages" in example:
        turns = example["messages"]
        tokenizer.format_chat(turns)  # the whole conversation checked (roles, alternation, contents)
        if turns[-1]["role"] not in ("assistant", "model"):
            return tokenizer.encode_chat(turns), []
        answer = tokenizer.encode(turns[-1]["content"].strip(), bos=False)
        return tokenizer.encode_chat(turns[:-1]), [*answer, tokenizer.end_of_turn_id]
    prompt = tokenizer.encode(example["prompt"], bos=True)
    completion = example.get("completion")
    return prompt, [] if completion is None else tokenizer.encode(completion, bos=False, eos=True)


class Examples(NamedTuple):
    """Encoded examples, ragged: each one's prompt then its whole completion, one after another."""

    tokens: np.ndarray  # [sum of lengths] int32 (a memory map, for a token file)
    lengths: np.ndarray  # [n, 2] int64: each example's prompt and completion lengths

    @staticmethod
    def of(pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> Examples:
        """Examples holding these (prompt ids, completion ids) pairs."""
        parts, lengths = [], []
        for prompt, completion in pairs:
            parts.append(np.asarray([*prompt, *completion], dtype=np.int32))
            lengths.append((len(prompt), len(completion)))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        return Examples(tokens, np.asarray(lengths, dtype=np.int64).reshape(-1, 2))


def encode_examples(examples: Iterable[tuple[str, dict]], tokenizer: Tokenizer) -> Examples:
    """Encode (where, parsed example) pairs; a ValueError names the example's `where`."""

    def encoded(where: str, example: dict) -> tuple[list[int], list[int]]:
        try:
            return encode_example(example, tokenizer)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    return Examples.of(encoded(where, example) for where, example in examples)


class PromptRows:
    """Examples as rows of prompt_len + max_new_tokens tokens (see the module docstring); the
    interface of gemma2.data.PackedSequences (len, batch, seq_len, tokens, fingerprint). Examples
    whose prompt is longer than prompt_len are left out (`dropped` counts them)."""

    def __init__(self, examples: Examples, prompt_len: int, max_new_tokens: int, pad_id: int,
                 stop_ids: Sequence[int] = ()) -> None:  # fmt: skip
        if prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"prompt_len and max_new_tokens must be >= 1, got {prompt_len} and {max_new_tokens}")
        lengths = np.asarray(examples.lengths, dtype=np.int64).reshape(-1, 2)
        if len(examples.tokens) != lengths.sum():
            raise ValueError(f"{len(examples.tokens)} tokens, but the examples' lengths add up to {lengths.sum()}")
        if len(lengths) and lengths[:, 0].min() < 1:
            raise ValueError("every prompt must hold at least one token")
        self.prompt_len, self.max_new_tokens, self.pad_id = prompt_len, max_new_tokens, pad_id
        self.stop_ids = tuple(stop_ids)  # what ends a sampled completion besides the model's eos
        self.seq_len = prompt_len + max_new_tokens - 1
        self.tokens, self._lengths = examples.tokens, lengths  # every example, the dropped ones too
        fits = lengths[:, 0] <= prompt_len
        self.dropped = int((~fits).sum())
        sizes = lengths.sum(1)
        self.starts = (np.cumsum(sizes) - sizes)[fits]
        self._fingerprint: str | None = None  # computed once: it reads every token
        self.prompt_lens = lengths[fits, 0]
        self.completion_lens = np.minimum(lengths[fits, 1], max_new_tokens)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def lengths(self) -> np.ndarray:
        """Each row's tokens, prompt and completion (cut to max_new_tokens): what its batch's width
        follows (gemma2.data.BatchLoader groups by it)."""
        return self.prompt_lens + self.completion_lens

    @property
    def has_completions(self) -> bool:
        """Whether every example has a reference completion to train on off-policy."""
        return bool(len(self) and self.completion_lens.min() > 0)

    @property
    def counted_columns(self) -> slice:
        """The completions' columns: targets count from the prompts' last column (the first
        completion token) on."""
        return slice(self.prompt_len - 1, self.seq_len)

    def batch(self, indices: torch.Tensor | Sequence[int]) -> Batch:
        """The examples at `indices` as a Batch with `valid` (False on the left padding), cut to
        the columns its rows reach (see the module docstring)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise IndexError("a batch needs at least one example index")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"example indices must be in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        P = self.prompt_len
        plen, clen = self.prompt_lens[idx, None], self.completion_lens[idx, None]
        start, stop = P - int(plen.max()), P + max(int(clen.max()), 1)
        col = np.arange(start, stop)[None]
        first = P - plen  # the column of each row's first prompt token
        real = (col >= first) & (col < P + clen)
        source = np.where(real, self.starts[idx, None] + col - first, 0)
        rows = torch.from_numpy(np.where(real, self.tokens[source], self.pad_id).astype(np.int64))
        counted = torch.from_numpy((col >= P) & (col < P + clen))
        valid = torch.from_numpy(col >= first)
        targets = rows[:, 1:].masked_fill(~counted[:, 1:], IGNORE_INDEX)
        return Batch(torch.from_numpy(idx), rows[:, :-1], targets, valid[:, :-1], start)

    def fingerprint(self) -> str:
        """A short sha256 of the examples and the layout (a resumed run checks it): the same for a
        prompt dataset read from `.jsonl` files or from its token file."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"prompts\0{self.prompt_len}\0{self.max_new_tokens}\0{self.pad_id}\0".encode())
            h.update(self._lengths)
            h.update(np.ascontiguousarray(self.tokens))  # a memory map is hashed in place, not copied
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def load_prompt_datasets(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    max_new_tokens: int,
    *,
    prompt_len: int | None = None,
    holdout_fraction: float = 0.02,
    eval_paths: Sequence[str | os.PathLike] | None = None,
) -> Datasets:
    """Read, split and encode the prompt examples of `.jsonl` files, then lay them out
    (prompt_datasets). The held-out split is `eval_paths` when given, else `holdout_fraction` of
    the examples by hash."""
    examples = list(read_examples(paths).values())
    if eval_paths is not None:
        parts = [examples, list(read_examples(eval_paths).values())]
        trained = {prompt_key(example, where) for where, example in examples}
        seen = sum(prompt_key(example, where) in trained for where, example in parts[1])
        note_overlap(seen, len(parts[1]), "prompts")
    else:
        held = held_out([prompt_key(example, where) for where, example in examples], holdout_fraction)
        parts = [[e for e, h in zip(examples, held) if not h], [e for e, h in zip(examples, held) if h]]
    train, held = (encode_examples(part, tokenizer) for part in parts)
    return prompt_datasets(train, held if len(held.lengths) else None, tokenizer, max_new_tokens, prompt_len)


def prompt_datasets(train: Examples, heldout: Examples | None, tokenizer: Tokenizer, max_new_tokens: int,
                    prompt_len: int | None = None) -> Datasets:  # fmt: skip
    """Encoded examples as the Datasets of PromptRows; prompt_len None: the longest prompt's length.
    Says on stderr (rank 0 only) how wide the rows are and what was dropped."""
    lengths = np.concatenate([part.lengths[:, 0] for part in (train, heldout) if part is not None])
    if prompt_len is None:
        prompt_len = int(lengths.max())
    say = partial(print, file=sys.stderr) if distributed.rank() == 0 else lambda *_: None
    splits = {}
    for name, part in (("training", train), ("held-out", heldout)):
        if part is None:
            splits[name] = None
            continue
        rows = PromptRows(part, prompt_len, max_new_tokens, tokenizer.pad_id, tokenizer.stop_ids)
        if rows.dropped:
            say(f"prompts: dropped {rows.dropped} of {len(part.lengths)} {name} examples whose prompt is "
                f"longer than prompt_len = {prompt_len} tokens")  # fmt: skip
        if not len(rows):
            raise ValueError(f"no {name} prompt fits in prompt_len = {prompt_len} tokens; raise prompt_len")
        splits[name] = rows

    def padding(width: int) -> float:
        """The share of the prompt columns that are padding when prompts are `width` wide."""
        return 1 - np.minimum(lengths, width).mean() / width

    shorter = int(np.quantile(lengths, 0.99, method="higher"))  # a width that drops about 1% of the examples
    hint = ""
    if padding(prompt_len) > 0.5 and shorter < prompt_len:
        hint = (f"; prompt_len {shorter} would keep {np.mean(lengths <= shorter):.1%} of the examples, with "
                f"{padding(shorter):.0%} padding")  # fmt: skip
    say(f"prompts: rows of prompt_len {prompt_len} + max_new_tokens {max_new_tokens} tokens, each batch cut to its "
        f"longest prompt and completion; the prompts' median length is {int(np.median(lengths))}, so about "
        f"{padding(prompt_len):.0%} of the layout's prompt columns are padding (paid for by a batch that holds the "
        f"longest prompt and by the memory plan){hint}")  # fmt: skip
    return Datasets(splits["training"], splits["held-out"])
