"""An offline teacher: its top-k next-token log-probs for every packed sequence, or for the
completion columns of every row of a prompt dataset (gemma2.prompts: the only columns whose targets
count; a prompt's columns are never stored, and a completion's padding is stored as zeros), run once.

Distilling from a cache costs no teacher forward per step and no teacher memory, at the price of
keeping k of the V probabilities (plus one bucket for the rest: gemma2.distill.topk_kd_loss).
Storage per token: k ids (int16 when V <= 32768, else int32), k log-probs (float16 by default)
and the tail log-mass (float32). With Gemma's 256000-way vocabulary and k = 32 that is
32 * (4 + 2) + 4 = 196 bytes per token, against 512,000 for the full distribution in bf16.

Layout of a cache directory:
    cache.json                                 what the cache holds (see `TeacherCache`)
    {split}-{i:05d}.safetensors                ids [n, C, k], logprobs [n, C, k], tail [n, C]
Shards hold consecutive sequences of one split ("train", "heldout") of a `Datasets`; sequence j
of the split is row j - start of its shard. The C stored columns are the split's `counted_columns`
(its index's "columns": [first, end)): all seq_len of packed sequences; max_new_tokens of prompt
rows, whose prompt_len - 1 prompt columns would otherwise be stored for nothing (with long-tailed
chat prompts most of a row). A format 1 cache (written before prompt columns were left out) holds
every column and is still read. The cache records each split's token fingerprint,
so it cannot be read against other data, another tokenizer or another seq_len.

The writer checks every argument before it touches the directory, builds the new cache beside it
and swaps it in at once (gemma2.files.atomic_directory): a failed or killed write leaves the old
cache whole, and an existing cache is replaced only when asked (`overwrite`).

Under torchrun every rank runs the same call: the shards of all splits, in one list, are dealt
round-robin (no rank has more than one shard more than another), each rank runs its own copy of the
teacher over its shards and writes them into one temporary directory (rank 0 makes it; on several
machines it must be on a filesystem they share), and rank 0 writes cache.json and swaps the
directory in once every rank has finished without error. The shards are those one process writes,
byte for byte (the same batches); the index too, but for the teacher's cross-entropy, summed in
another order (equal to ~1e-7). The ranks agree over a gloo group with no practical timeout, so a
rank that finishes early waits for the slowest (NCCL's default timeout is 10 minutes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import distributed
from .data import IGNORE_INDEX, Rows
from .distill import TopK, teacher_topk
from .files import atomic_directory, remove_stale_temporaries
from .model import Gemma2ForCausalLM

INDEX = "cache.json"
FORMAT = 2
READS = (1, 2)  # format 1: every column of the layout stored, no "columns" in the index


def bytes_per_token(k: int, vocab_size: int, logprob_dtype: torch.dtype = torch.float16) -> int:
    """Storage per token: k ids, k log-probs and one float32 tail."""
    id_bytes = 2 if vocab_size <= 2**15 else 4
    return k * (id_bytes + torch.finfo(logprob_dtype).bits // 8) + 4


@torch.no_grad()
def write_teacher_cache(
    teacher: Gemma2ForCausalLM,
    splits: dict[str, Rows],
    directory: str | os.PathLike,
    *,
    k: int = 32,
    temperature: float = 1.0,
    batch_size: int = 8,
    chunk_size: int = 1024,
    logprob_dtype: torch.dtype = torch.float16,
    shard_bytes: int = 512 * 2**20,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run `teacher` over every sequence of every split once; write shards and `cache.json`.

    The teacher runs where it is, in its own dtype; logits are formed `chunk_size` tokens at a
    time from the hidden states, so a batch never holds [B, T, V]. The log-probs are at
    `temperature` (training must use the same one). The held-out split's teacher cross-entropy is
    recorded too, so the trainer can report the teacher's perplexity without the teacher.
    A non-empty `directory` (an earlier cache, say) is refused unless `overwrite`; then its cache
    files are replaced and anything else in it kept. Returns the index written to cache.json.
    """
    if logprob_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logprob_dtype must be torch.float16 or torch.float32, got {logprob_dtype}")
    V = teacher.config.vocab_size
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, vocab size {V}], got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 (and the training temperature), got {temperature}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("shard_bytes", shard_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, rows in splits.items():
        if not getattr(rows, "has_completions", True):  # prompt rows (gemma2.prompts)
            raise ValueError(
                f"some {name} examples have no completion: a teacher cache scores only the file's completions "
                "(training on them, lmbda 0), so give every example one, or train on-policy with a live teacher"
            )
    directory = Path(directory).resolve()  # the same path on every rank, whatever their working directories
    write = partial(_write, teacher, splits, k=k, temperature=temperature, batch_size=batch_size,
                    chunk_size=chunk_size, logprob_dtype=logprob_dtype, shard_bytes=shard_bytes)  # fmt: skip
    if not distributed.is_distributed():
        with _temporary(directory, overwrite) as tmp:
            index, ce_sums = write(tmp, progress=progress)
            return _finish_index(index, ce_sums, tmp)
    return _write_on_every_rank(directory, write, len(splits), overwrite, progress)


@contextmanager
def _temporary(directory: Path, overwrite: bool) -> Iterator[Path]:
    """`atomic_directory(directory)` once a killed earlier write's leftovers are cleared (which may put
    a previous cache back in place) and `overwrite` allows replacing what is there."""
    remove_stale_temporaries(directory.parent, directory.name)
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        what = "a complete teacher cache" if (directory / INDEX).is_file() else "files"
        raise ValueError(f"{directory} already holds {what}; pass overwrite=True (--overwrite) to replace it")
    with atomic_directory(directory, keep=_foreign_entries(directory)) as tmp:
        yield tmp


def _write_on_every_rank(directory: Path, write: Callable, n_splits: int, overwrite: bool, progress: bool) -> dict:
    """`write` (a partial `_write`) of this rank's shards into one temporary directory, which rank 0
    makes, completes with cache.json and swaps in once every rank has reported success. Every rank
    returns the index, or every rank raises (the temporary removed, `directory` as it was): the
    ranks agree at three fixed points, so a failing rank never leaves the others waiting."""
    rank, world = distributed.rank(), distributed.world_size()
    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # CPU tensors; waits for the slowest rank
    written, late_error = False, None
    try:
        with ExitStack() as stack:
            made, failure = [None], None
            if rank == 0:  # only rank 0 can tell whether the processes that left temporaries are gone
                try:
                    made[0] = str(stack.enter_context(_temporary(directory, overwrite)))
                except Exception as e:
                    failure, made[0] = e, e if isinstance(e, ValueError) else None
            dist.broadcast_object_list(made, src=0, group=group)  # the temporary's path, or why there is none
            if not isinstance(made[0], str):
                raise failure or made[0] or ValueError(f"rank 0 could not make a temporary directory beside {directory}; see its error")
            tmp = Path(made[0])
            index, ce_sums = None, [0.0] * (2 * n_splits)
            try:
                if not tmp.is_dir():
                    raise ValueError(f"rank {rank} cannot see {tmp}: the cache directory must be on a filesystem every rank shares")
                index, ce_sums = write(tmp, part=(rank, world), progress=progress and rank == 0)
            except Exception as e:  # told to the other ranks first, so that none waits for this one
                failure = e
            sums = torch.tensor([*ce_sums, failure is not None], dtype=torch.float64)
            dist.all_reduce(sums, group=group)  # every rank's shards written? and the cross-entropy sums
            if failure is not None:
                raise failure
            if failed := int(sums[-1].item()):
                raise ValueError(f"{failed} of {world} ranks failed to write their teacher cache shards (their "
                                 f"errors are in their own output); {directory} is unchanged")  # fmt: skip
            written = True
            index = _finish_index(index, sums[:-1].tolist(), tmp, write_index=rank == 0)
        # Leaving the block, rank 0 swapped the new directory in.
    except Exception as e:
        if not written:
            raise  # every rank raises at the same point
        late_error = e  # rank 0's cache.json or swap failed: the others hear of it first
    done = torch.tensor([float(late_error is None)])
    dist.all_reduce(done, op=dist.ReduceOp.MIN, group=group)  # the cache is in place
    if late_error is not None:
        raise late_error
    if done.item() == 0:
        raise ValueError(f"rank 0 could not put the teacher cache in place at {directory} (see its error); it is unchanged")
    return index


def _foreign_entries(directory: Path) -> list[str]:
    """The entries of an existing directory that are not an earlier cache's (kept on overwrite)."""
    if not directory.is_dir():
        return []
    ours = {INDEX}
    try:
        index = json.loads((directory / INDEX).read_text())
        ours |= {shard["file"] for split in index["splits"].values() for shard in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no readable index: it names no files of ours
    return [p.name for p in directory.iterdir() if p.name not in ours]


def _write(teacher: Gemma2ForCausalLM, splits: dict[str, Rows], directory: Path, *, k: int,
           temperature: float, batch_size: int, chunk_size: int, logprob_dtype: torch.dtype, shard_bytes: int,
           progress: bool, part: tuple[int, int] = (0, 1)) -> tuple[dict, list[float]]:  # fmt: skip
    """Every `world`-th shard from the `rank`-th on (part = (rank, world)) of all splits' shards in
    order, written into `directory`, and the index that lists every shard, all ranks' included.
    Returns the index and, per split, the teacher's cross-entropy summed over the counted tokens of
    the sequences written here and their number."""
    rank, world = part
    dealt = 0  # shards of the splits before this one: the deal runs over all splits' shards in order
    V = teacher.config.vocab_size
    teacher.eval()
    index: dict = {"format": FORMAT, "k": k, "temperature": temperature, "vocab_size": V,
                   "logprob_dtype": str(logprob_dtype).removeprefix("torch."),
                   "bytes_per_token": bytes_per_token(k, V, logprob_dtype), "splits": {}}  # fmt: skip
    ce_sums = []
    for name, data in splits.items():
        kept = data.counted_columns  # the layout's columns stored (a loss reads no other)
        per_shard = max(batch_size, shard_bytes // ((kept.stop - kept.start) * index["bytes_per_token"])
                        // batch_size * batch_size)  # fmt: skip
        starts = range(0, len(data), per_shard)
        shards = [{"file": f"{name}-{i:05d}.safetensors", "start": start, "count": min(per_shard, len(data) - start)}
                  for i, start in enumerate(starts)]  # fmt: skip
        mine = [sh for i, sh in enumerate(shards, dealt) if i % world == rank]
        dealt += len(shards)
        ce_sum = torch.zeros(2, dtype=torch.float64, device=teacher.output_weight.device)  # CE, counted tokens
        bar = tqdm(total=sum(sh["count"] for sh in mine), desc=f"caching {name}", unit="seq", disable=not progress)
        with bar:  # closed however the loop ends: an error's line is its own
            for shard in mine:
                tensors = _shard_topk(teacher, data, range(shard["start"], shard["start"] + shard["count"]), ce_sum,
                                      bar, k=k, temperature=temperature, batch_size=batch_size, chunk_size=chunk_size,
                                      logprob_dtype=logprob_dtype)  # fmt: skip
                save_file(tensors, directory / shard["file"])
        index["splits"][name] = {"seq_len": data.seq_len, "num_sequences": len(data), "fingerprint": data.fingerprint(),
                                 "columns": [kept.start, kept.stop], "teacher_ce": None, "shards": shards}  # fmt: skip
        ce_sums += ce_sum.tolist()
    return index, ce_sums


def _shard_topk(teacher: Gemma2ForCausalLM, data: Rows, sequences: range, ce_sum: Tensor, bar: tqdm, *, k: int,
                temperature: float, batch_size: int, chunk_size: int, logprob_dtype: torch.dtype) -> dict[str, Tensor]:
    """One shard's tensors: the teacher's top-k of `sequences` at the split's stored columns (the
    head and top-k run there alone); adds their cross-entropy and counted tokens to `ce_sum`."""
    kept, device = data.counted_columns, teacher.output_weight.device
    id_dtype = torch.int16 if teacher.config.vocab_size <= 2**15 else torch.int32
    n, C = len(sequences), kept.stop - kept.start
    # Zeros where a batch of prompt rows stops short of the layout (padding: never counted).
    ids, lps = torch.zeros(n, C, k, dtype=id_dtype), torch.zeros(n, C, k, dtype=logprob_dtype)
    tail = torch.zeros(n, C, dtype=torch.float32)
    for lo in range(0, n, batch_size):
        batch = data.batch(sequences[lo : lo + batch_size])
        hidden = teacher.hidden_states(batch.inputs.to(device), batch.valid_on(device))
        a, b = max(batch.columns.start, kept.start), min(batch.columns.stop, kept.stop)  # stored columns here
        width, here = b - a, slice(a - batch.start, b - batch.start)
        hidden = hidden[:, here].flatten(0, 1)  # [B width, D]
        targets = batch.targets[:, here].to(device).flatten()
        out = [], [], []
        for c in range(0, hidden.shape[0], chunk_size):
            logits = teacher.logits(hidden[c : c + chunk_size])  # [chunk, V] fp32, soft-capped
            chunk = targets[c : c + chunk_size]
            ce = torch.nn.functional.cross_entropy(logits, chunk, ignore_index=IGNORE_INDEX, reduction="sum")
            ce_sum += torch.stack([ce.double(), (chunk != IGNORE_INDEX).sum().double()])
            for o, t in zip(out, teacher_topk(logits, k, temperature)):
                o.append(t)
        rows, cols = slice(lo, lo + len(batch.indices)), slice(a - kept.start, b - kept.start)
        ids[rows, cols] = torch.cat(out[0]).view(-1, width, k).to("cpu", id_dtype)
        lps[rows, cols] = torch.cat(out[1]).view(-1, width, k).to("cpu", logprob_dtype)
        tail[rows, cols] = torch.cat(out[2]).view(-1, width).cpu()
        bar.update(len(batch.indices))
    return {"ids": ids, "logprobs": lps, "tail": tail}


def _finish_index(index: dict, ce_sums: list[float], directory: Path, write_index: bool = True) -> dict:
    """Put each split's teacher cross-entropy (from `ce_sums`: its sum over every counted token and
    their number, split after split) into the index and write cache.json into `directory` (its
    presence: the cache is complete); returns the index."""
    for i, split in enumerate(index["splits"].values()):
        counted = ce_sums[2 * i + 1]
        split["teacher_ce"] = ce_sums[2 * i] / counted if counted else None  # None: no completions to score
    if write_index:
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


@dataclass
class CacheSplit:
    """One split of a cache; `topk(indices)` reads the rows of those sequences (memory-mapped)."""

    name: str
    directory: Path
    seq_len: int
    num_sequences: int
    fingerprint: str
    teacher_ce: float
    shards: list[dict]
    columns: tuple[int, int]  # the layout's columns stored, [first, end)

    def __post_init__(self) -> None:
        self._open: dict[str, object] = {}

    def check(self, data: Rows, where: str) -> None:
        """Raise unless this split was computed from exactly `data`."""
        if data.seq_len != self.seq_len or len(data) != self.num_sequences or data.fingerprint() != self.fingerprint:
            raise ValueError(
                f"{self.directory}: the teacher cache's {self.name!r} split was built from other "
                f"tokens than the {where} data (cache: {self.num_sequences} sequences of seq_len "
                f"{self.seq_len}, fingerprint {self.fingerprint}; data: {len(data)} of "
                f"{data.seq_len}, {data.fingerprint()}); rerun scripts/cache_teacher.py with the "
                "same data, tokenizer and holdout fraction as training, and the same seq_len (for "
                "prompts: --prompt-len, --max-new-tokens and --eval-prompts)"
            )

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(self.directory / name, framework="pt")
        return self._open[name]

    def topk(self, indices: Tensor, device: torch.device | str = "cpu", columns: slice = slice(None)) -> TopK:
        """TopK with ids int64 [B, T, k], log-probs and tail float32, for sequences `indices`
        (positions `columns` of them: a batch of prompt rows holds only some, `Batch.start` on);
        zeros at the columns not stored (a prompt's: no loss reads them)."""
        first, end, _ = columns.indices(self.seq_len)
        lo, hi = max(first, self.columns[0]), min(end, self.columns[1])  # the columns read
        if hi > lo:
            stored = slice(lo - self.columns[0], hi - self.columns[0])
        else:  # none of them is stored: all zeros
            lo = hi = end
            stored = slice(0, 0)
        ids, lps, tail = [], [], []
        for i in indices.tolist():
            shard = self.shards[self._shard_of(i)]
            f, row = self._file(shard["file"]), i - shard["start"]
            ids.append(f.get_slice("ids")[row : row + 1, stored])
            lps.append(f.get_slice("logprobs")[row : row + 1, stored])
            tail.append(f.get_slice("tail")[row : row + 1, stored])
        pad = (0, 0, lo - first, end - hi)  # zeros before and after, along the columns
        return TopK(
            F.pad(torch.cat(ids), pad).to(device, torch.int64, non_blocking=True),
            F.pad(torch.cat(lps), pad).to(device, torch.float32, non_blocking=True),
            F.pad(torch.cat(tail), pad[2:]).to(device, torch.float32, non_blocking=True),
        )

    def _shard_of(self, i: int) -> int:
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} is outside the cache's {self.num_sequences} sequences")
        # Every shard but the last holds the same number of sequences.
        return i // self.shards[0]["count"]


class TeacherCache:
    """A cache directory written by `write_teacher_cache` (scripts/cache_teacher.py)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        index_file = self.directory / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{self.directory}: no {INDEX}, so no complete teacher cache; write one with "
                "scripts/cache_teacher.py (an interrupted run leaves none)"
            )
        index = json.loads(index_file.read_text())
        if index.get("format") not in READS:
            raise ValueError(f"{index_file}: cache format {index.get('format')!r}, this code reads {READS}; "
                             "rebuild the cache")
        self.k: int = index["k"]
        self.temperature: float = index["temperature"]
        self.vocab_size: int = index["vocab_size"]
        self.bytes_per_token: int = index["bytes_per_token"]
        self.splits = {
            name: CacheSplit(name, self.directory, s["seq_len"], s["num_sequences"], s["fingerprint"],
                             s["teacher_ce"], s["shards"], tuple(s.get("columns", (0, s["seq_len"]))))
            for name, s in index["splits"].items()
        }  # fmt: skip

    def split(self, name: str) -> CacheSplit:
        if name not in self.splits:
            raise ValueError(
                f"{self.directory}: the teacher cache has no {name!r} split (it has "
                f"{sorted(self.splits)}); rerun scripts/cache_teacher.py on data with that split"
            )
        return self.splits[name]

    def check_temperature(self, temperature: float) -> None:
        if not math.isclose(temperature, self.temperature):
            raise ValueError(
                f"{self.directory}: the cached log-probs are at temperature {self.temperature}, "
                f"training asks for {temperature}; train at that temperature or rebuild the cache "
                f"with --temperature {temperature}"
            )
