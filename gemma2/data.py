"""Training data: documents -> one flat token array -> fixed-length packed sequences.

- Sources: a `.txt` file is ONE document; a `.jsonl` file holds one document per line in its
  `text` field (the unambiguous form: documents may contain blank lines); a `.parquet` file one
  per row of its `text` column; a directory gives those files below it in sorted path order
  (gemma2.corpus.read_documents). No paths means the built-in corpus (gemma2.corpus.build_corpus:
  CPython's own documentation). Big corpora: tokenize once into a token file (gemma2.token_files).
- Held-out split: by whole document, from a hash of its text (gemma2.corpus.split_corpus), so it
  is the same in every process, for every training seed, and no document straddles the split.
- Packing: every document becomes `bos ids eos`; documents are concatenated into one int32 array
  and cut into windows of seq_len + 1 tokens that overlap by one token (inputs = window[:-1],
  targets = window[1:]), so every token after the first is a target exactly once. No padding;
  the last partial window (< seq_len tokens) is dropped. Attention runs across document
  boundaries, as in GPT-style pretraining; the bos/eos markers tell the model where they are.
- Order: packing is fixed; each epoch visits the sequences in a permutation drawn from
  (seed, epoch). Fixing the packing keeps sequence i the same across epochs and runs, which is
  what lets an offline teacher cache (gemma2.teacher_cache) be keyed by sequence index.
- Sharding: a global micro-batch is batch_size * world_size consecutive entries of the
  permutation; rank r takes the r-th block of batch_size. An optimizer step reads grad_accum of
  them, and an epoch ends at a step's boundary, so the rows of every step depend only on the step
  batch (batch_size * grad_accum * world_size), not on how it is split: one process with
  batch_size * W sees exactly the rows that W processes see together, and 4 x 1 micro-batches the
  rows of 2 x 2. The position in the data, (epoch, offset in sequences), is part of the trainer's
  checkpoint, so a resumed run reads the same batches, however it splits its step.

Tokens are held as a flat numpy int32 array (or a read-only memmap of a `.npy` file for big
corpora), never as Python lists; a batch is gathered with one fancy index.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from .corpus import build_corpus, note_overlap, read_documents, split_corpus


class TextEncoder(Protocol):
    """What the data pipeline needs from a tokenizer (gemma2.tokenizer.Tokenizer has it)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]: ...


# ------------------------------------------------------------------------------------------------
# Documents and tokens


def read_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The documents in `paths` (files or directories), in order; empty documents dropped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[str] = []
    for path in paths:
        try:
            docs += read_documents(path)  # a file that is not UTF-8: read_documents' message names it
        except FileNotFoundError:
            raise  # read_documents' message names the path
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        shown = ", ".join(map(str, paths)) or "(no paths)"
        raise ValueError(
            f"no text in {shown}: pass non-empty .txt files (one document each), .jsonl files "
            'with a "text" field per line, or directories of them'
        )
    return docs


def tokenize(docs: Sequence[str], tokenizer: TextEncoder) -> np.ndarray:
    """Documents -> one flat int32 array `[N]`: bos ids eos, document after document."""
    parts = [np.asarray(tokenizer.encode(d, bos=True, eos=True), dtype=np.int32) for d in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


# ------------------------------------------------------------------------------------------------
# Packed sequences


class Batch(NamedTuple):
    indices: Tensor  # [B] sequence indices into the PackedSequences (for a teacher cache)
    inputs: Tensor  # [B, T] int64
    targets: Tensor  # [B, T] int64; entries equal to IGNORE_INDEX do not count
    valid: Tensor | None = None  # [B, T] bool, False on left padding (gemma2.prompts); None: none
    # The column of the dataset's row layout where column 0 lies: prompt rows are cut to their
    # batch's longest prompt and completion (gemma2.prompts), and a teacher cache reads from there.
    start: int = 0

    @property
    def columns(self) -> slice:
        """The columns of the dataset's row layout this batch holds (a teacher cache's positions)."""
        return slice(self.start, self.start + self.inputs.shape[1])

    def valid_on(self, device: torch.device | str, non_blocking: bool = False) -> Tensor | None:
        """The padding mask on `device` (None when the batch has no padding)."""
        return None if self.valid is None else self.valid.to(device, non_blocking=non_blocking)


class Rows(Protocol):
    """What training reads from a dataset: PackedSequences, or gemma2.prompts.PromptRows."""

    seq_len: int  # the row layout's width: a batch's inputs and targets are [B, seq_len] or narrower
    tokens: np.ndarray  # every token id it holds

    def __len__(self) -> int: ...

    def batch(self, indices: Tensor | Sequence[int]) -> Batch: ...

    def fingerprint(self) -> str: ...

    @property
    def counted_columns(self) -> slice:
        """The layout's columns whose targets can count: the only ones a teacher cache stores."""
        ...


IGNORE_INDEX = -100


class PackedSequences:
    """Fixed windows of seq_len + 1 tokens over a flat token array (no copy until a batch)."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a flat integer array, got {tokens.dtype} {tokens.shape}")
        self.tokens = tokens
        self.seq_len = seq_len
        self._fingerprint: str | None = None  # computed once: it reads every token

    def __len__(self) -> int:
        # Window i covers tokens [i T, i T + T]: consecutive windows share one token.
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def batch(self, indices: Tensor | Sequence[int]) -> Batch:
        """The sequences at `indices` as a Batch of int64 inputs / targets `[B, seq_len]`."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sequence indices must be in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        T = self.seq_len
        windows = torch.from_numpy(np.asarray(self.tokens[idx[:, None] * T + np.arange(T + 1)], dtype=np.int64))
        return Batch(torch.from_numpy(idx), windows[:, :-1], windows[:, 1:])

    @property
    def counted_columns(self) -> slice:
        """Every column's target counts."""
        return slice(0, self.seq_len)

    def fingerprint(self) -> str:
        """A short sha256 of the tokens and seq_len: a teacher cache is valid only for these."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.seq_len}\0{self.tokens.dtype.str}\0".encode())
            h.update(np.ascontiguousarray(self.tokens[: len(self) * self.seq_len + 1]))  # a memory map in place
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokens as `.npy`, to memory-map later with `PackedSequences.load`."""
        np.save(path, np.asarray(self.tokens, dtype=np.int32))

    @classmethod
    def load(cls, path: str | os.PathLike, seq_len: int) -> PackedSequences:
        return cls(np.load(path, mmap_mode="r"), seq_len)


@dataclass
class Datasets:
    train: Rows
    heldout: Rows | None  # None when nothing is held out


def load_datasets(
    paths: Sequence[str | os.PathLike] | None,
    tokenizer: TextEncoder,
    seq_len: int,
    *,
    holdout_fraction: float = 0.02,
    eval_paths: Sequence[str | os.PathLike] | None = None,
) -> Datasets:
    """Read, split, tokenise and pack.

    paths: files / directories of documents; None = the built-in corpus. The held-out split is
    `eval_paths` when given, else `holdout_fraction` of the documents (0 = none), chosen by a
    hash of each document (split_corpus, seed 0), so the teacher and every student of a
    comparison evaluate on the same documents.
    """
    docs = build_corpus() if paths is None else read_texts(paths)
    where = "the built-in corpus" if paths is None else ", ".join(map(str, paths))
    held_docs = None if eval_paths is None else read_texts(eval_paths)
    return split_datasets(docs, tokenizer, seq_len, holdout_fraction=holdout_fraction, heldout_docs=held_docs,
                          where=where)  # fmt: skip


def split_datasets(
    docs: list[str],
    tokenizer: TextEncoder,
    seq_len: int,
    *,
    holdout_fraction: float = 0.02,
    heldout_docs: list[str] | None = None,
    where: str = "the documents",
) -> Datasets:
    """Split documents already read (as load_datasets does: `heldout_docs` when given, else
    split_corpus), tokenise and pack them."""
    if heldout_docs is not None:
        train_docs, held_docs = docs, heldout_docs
        trained = set(train_docs)  # counted as the prompts' and the token writer's: held-out items, repeats too
        note_overlap(sum(doc in trained for doc in held_docs), len(held_docs), "documents")
    else:
        train_docs, held_docs = split_corpus(docs, holdout_fraction=holdout_fraction)
    held_tokens = tokenize(held_docs, tokenizer) if held_docs else None
    return pack_datasets(tokenize(train_docs, tokenizer), held_tokens, seq_len, where=where)


def pack_datasets(train_tokens: np.ndarray, heldout_tokens: np.ndarray | None, seq_len: int, *,
                  where: str = "the documents") -> Datasets:  # fmt: skip
    """Datasets over token arrays already made (None or empty: nothing held out); ValueError
    when a split is too short to make one sequence."""
    train = PackedSequences(train_tokens, seq_len)
    if len(train) == 0:
        raise ValueError(
            f"{where}: {len(train.tokens)} training tokens make no sequence of seq_len + 1 = "
            f"{seq_len + 1} tokens; lower seq_len or add text"
        )
    heldout = None
    if heldout_tokens is not None and len(heldout_tokens):
        heldout = PackedSequences(heldout_tokens, seq_len)
        if len(heldout) == 0:
            raise ValueError(
                f"{where}: the held-out documents hold {len(heldout.tokens)} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; raise holdout_fraction, lower seq_len, or pass "
                "holdout_fraction=0 to train without evaluation"
            )
    return Datasets(train, heldout)


# ------------------------------------------------------------------------------------------------
# Batches: shuffled, sharded, resumable


class BatchLoader:
    """Endless micro-batches over `data`: a fresh seeded permutation per epoch, sliced per rank.

    The state (epoch, offset) counts SEQUENCES, not batches, so a checkpoint taken with one split
    of its step batch (batch_size x grad_accum x world_size: the micro-batches of one optimizer
    step, over every rank) resumes at the same place with another. Sequences left over at the end
    of an epoch (fewer than a step batch) are skipped that epoch, whole steps only (an epoch ending
    at a micro-batch made a step's rows depend on its split); the next permutation puts different
    ones there.

    group > 0 (rows of different lengths: gemma2.prompts, whose batches are cut to their rows):
    within each run of `group` rows of the permutation, the rows go longest first (prompt plus
    completion), so a batch holds rows of like lengths and little padding (TRL's group_by_length,
    with a run fixed in rows, so the order does not depend on how a step's rows are split into
    ranks and micro-batches). The steps of a run go from its longest rows to its shortest, and one
    batch per run straddles two. The epoch's order is then rotated by a seeded offset, so the rows
    an epoch leaves over are not always the shortest of its last run.
    """

    def __init__(self, data: Rows, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 group: int = 0, grad_accum: int = 1) -> None:  # fmt: skip
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        if group < 0:
            raise ValueError(f"group must be >= 0 rows (0: no grouping by length), got {group}")
        if group and not hasattr(data, "lengths"):
            raise ValueError("grouping by length needs rows of different lengths (a prompt dataset, --prompts); "
                             "packed rows are all seq_len long: drop group_by_length (--group-by-length)")  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size = {world_size})")
        self.global_batch = batch_size * world_size  # one micro-batch over every rank
        self.step_batch = self.global_batch * grad_accum  # one optimizer step
        if len(data) < self.step_batch:
            raise ValueError(
                f"the data holds {len(data)} training rows, fewer than one global batch (batch_size "
                f"{batch_size} x grad_accum {grad_accum} x {world_size} ranks); lower the batch size, or add "
                "data (for packed text, a lower seq_len makes more rows)"
            )
        self.data, self.batch_size, self.seed, self.rank, self.group = data, batch_size, seed, rank, group
        self.epoch, self.offset = 0, 0
        self._perm: np.ndarray | None = None  # the permutation of self.epoch, built lazily

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            # SeedSequence([seed, epoch]) keeps the streams of different (seed, epoch) pairs apart.
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(len(self.data))
            if self.group:
                lengths = self.data.lengths()[perm]
                for lo in range(0, len(perm), self.group):
                    run = slice(lo, lo + self.group)
                    perm[run] = perm[run][np.argsort(-lengths[run], kind="stable")]
                perm = np.roll(perm, -int(rng.integers(len(perm))))
            self._perm = perm
        return self._perm

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.offset % self.step_batch == 0 and self.offset + self.step_batch > len(self.data):
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None  # at a step's start only
        start = self.offset + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size]
        self.offset += self.global_batch
        return self.data.batch(indices)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data order was drawn with seed {state['seed']}, this run uses "
                f"{self.seed}: resume with the same seed, or start a new out_dir"
            )
        if state["offset"] % self.step_batch:
            raise ValueError(
                f"the checkpoint stopped {state['offset']} sequences into epoch {state['epoch']}, "
                f"not a multiple of this run's global batch {self.step_batch} (batch_size x grad_accum x "
                "ranks); resume with the global batch it was saved with"
            )
        self.epoch, self.offset, self._perm = state["epoch"], state["offset"], None


def eval_batches(
    data: Rows, batch_size: int, *, rank: int = 0, world_size: int = 1, max_sequences: int | None = None
) -> Iterator[Batch]:
    """The first `max_sequences` held-out sequences (all by default) in order, rank r taking the
    r-th contiguous block; a remainder that does not divide among the ranks is skipped so every
    rank runs the same number of batches (collectives must match)."""
    n = len(data) if max_sequences is None else min(len(data), max_sequences)
    per_rank = n // world_size
    start = rank * per_rank
    for lo in range(start, start + per_rank, batch_size):
        yield data.batch(range(lo, min(lo + batch_size, start + per_rank)))
