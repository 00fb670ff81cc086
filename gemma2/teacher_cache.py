"""An offline teacher: its top-k next-token log-probs for every packed sequence, or for the
completion columns of every row of a prompt dataset (gemma2.prompts: the only columns whose targets
count; a prompt's columns are never stored, and a completion's padding holds whatever the teacher
gave for the pad tokens, or zeros past a batch's longest row: never counted), run once.

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

The writer checks every argument before it touches anything (a cache larger than the free disk
space too: its size is known up front), then fills `NAME.partial`, beside the
cache directory NAME (beside its target if NAME is a symbolic link): `plan.json` (the index to be,
with the teacher's dtype and weights' checksum) and each shard as it is finished (a file is whole
or absent; its teacher cross-entropy in its metadata). The last shard done, cache.json is written
and the partial directory swapped in for NAME at once (gemma2.files.publish_directory): a failed or
killed write leaves an old cache whole, and the same call again (the same teacher, dtype, data and
settings, else it is refused with the difference; `batch_size` and `chunk_size` may change, say
after running out of memory, and only move the last bits of the shards computed after the change)
writes only the shards still missing. An existing cache is replaced only when asked (`overwrite`);
a lock keeps a second writer out.

Under torchrun every rank runs the same call: the shards still missing, of all splits in one list,
are dealt round-robin (no rank has more than one shard more than another), each rank runs its own
copy of the teacher over its shards and writes them into the partial directory (rank 0 takes it; on
several machines it must be on a filesystem they share), and rank 0 writes cache.json and swaps the
directory in once every rank has finished without error. The cache is the one a single process
writes, byte for byte (the same batches; the cross-entropy summed from the shards in order), and
a write may be resumed with another number of ranks. The ranks agree over a gloo group with no
practical timeout, so a rank that finishes early waits for the slowest (NCCL's default timeout is
10 minutes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
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
from .files import (TMP_PREFIX, atomic_file, directory_destination, drop_kept_links, notice, publish_directory,
                    remove_stale_temporaries, write_text_atomic)  # fmt: skip
from .locks import LOCK_FILE, acquire_lock, ensure_held, lock_holder, release_lock
from .model import Gemma2ForCausalLM

INDEX = "cache.json"
PLAN = "plan.json"  # in the partial directory: what is being written there
PARTIAL = ".partial"  # the partial directory's suffix
CE_KEY = "teacher_ce"  # a shard's metadata: "SUM COUNT", its teacher cross-entropy summed over its counted tokens
FORMAT = 2
READS = (1, 2)  # format 1: every column of the layout stored, no "columns" in the index


def bytes_per_token(k: int, vocab_size: int, logprob_dtype: torch.dtype = torch.float16) -> int:
    """Storage per token: k ids, k log-probs and one float32 tail."""
    id_bytes = 2 if vocab_size <= 2**15 else 4
    return k * (id_bytes + torch.finfo(logprob_dtype).bits // 8) + 4


def partial_directory(directory: Path) -> Path:
    """Where the cache for `directory` is written until it is complete."""
    return directory.with_name(directory.name + PARTIAL)


def check_cache_settings(vocab_size: int | None, *, k: int, temperature: float, batch_size: int, chunk_size: int,
                         logprob_dtype: torch.dtype, shard_bytes: int) -> None:  # fmt: skip
    """write_teacher_cache's settings, checkable before the teacher loads (vocab_size None: its
    config is not known yet, and k is checked against it later)."""
    if logprob_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logprob_dtype must be torch.float16 or torch.float32, got {logprob_dtype}")
    if not 1 <= k <= (vocab_size or k):
        raise ValueError(f"k must be in [1, vocab size {vocab_size}], got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be > 0 (and the training temperature), got {temperature}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size), ("shard_bytes", shard_bytes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_cache_directory(directory: Path, overwrite: bool) -> None:
    """Refuse a non-empty `directory` (an earlier cache, or anything else) unless `overwrite`."""
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        what = "a complete teacher cache" if (directory / INDEX).is_file() else "files"
        raise ValueError(f"{directory} already holds {what}; pass overwrite=True (--overwrite) to replace it")


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
    files are replaced and anything else in it kept. Shards an interrupted call with the same
    arguments finished are not computed again (see the module docstring). Returns the index
    written to cache.json.
    """
    check_cache_settings(teacher.config.vocab_size, k=k, temperature=temperature, batch_size=batch_size,
                         chunk_size=chunk_size, logprob_dtype=logprob_dtype, shard_bytes=shard_bytes)  # fmt: skip
    for name, rows in splits.items():
        if not getattr(rows, "has_completions", True):  # prompt rows (gemma2.prompts)
            raise ValueError(
                f"some {name} examples have no completion: a teacher cache scores only the file's completions "
                "(training on them, lmbda 0), so give every example one, or train on-policy with a live teacher"
            )
    # Resolved: the same path on every rank, whatever their working directories.
    directory = directory_destination(Path(directory).resolve())
    plan = _plan(teacher, splits, k=k, temperature=temperature, logprob_dtype=logprob_dtype, shard_bytes=shard_bytes)
    shard_topk = partial(_shard_topk, teacher, k=k, temperature=temperature, batch_size=batch_size,
                         chunk_size=chunk_size, logprob_dtype=logprob_dtype)  # fmt: skip
    if distributed.is_distributed():
        return _write_on_every_rank(directory, plan, splits, shard_topk, overwrite, progress)
    lock, done = _take_partial(directory, plan, overwrite)
    try:
        work = lock.parent
        _write_shards(shard_topk, splits, work, _missing(plan, done), progress)
        return _publish(work, directory)
    finally:
        release_lock(lock)


def _plan(teacher: Gemma2ForCausalLM, splits: dict[str, Rows], *, k: int, temperature: float,
          logprob_dtype: torch.dtype, shard_bytes: int) -> dict:  # fmt: skip
    """The index the cache will have, but for the teacher's cross-entropy (None): the settings, the
    teacher's dtype (the activations': a bf16 checkpoint run in fp32 has the same weights) and
    `weights_checksum`, and each split's shards (at most `shard_bytes`, at least one sequence)."""
    V = teacher.config.vocab_size
    per_token = bytes_per_token(k, V, logprob_dtype)
    plan: dict = {"format": FORMAT, "k": k, "temperature": temperature, "vocab_size": V,
                  "logprob_dtype": str(logprob_dtype).removeprefix("torch."), "bytes_per_token": per_token,
                  "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
                  "teacher_checksum": distributed.weights_checksum(teacher).tolist(), "splits": {}}  # fmt: skip
    for name, data in splits.items():
        kept = data.counted_columns  # the layout's columns stored (a loss reads no other)
        per_shard = max(1, shard_bytes // ((kept.stop - kept.start) * per_token))
        shards = [{"file": f"{name}-{i:05d}.safetensors", "start": start, "count": min(per_shard, len(data) - start)}
                  for i, start in enumerate(range(0, len(data), per_shard))]  # fmt: skip
        plan["splits"][name] = {"seq_len": data.seq_len, "num_sequences": len(data), "fingerprint": data.fingerprint(),
                                "columns": [kept.start, kept.stop], "teacher_ce": None, "shards": shards}  # fmt: skip
    return plan


def _take_partial(directory: Path, plan: dict, overwrite: bool) -> tuple[Path, set[str]]:
    """Refuse an existing cache in `directory` unless `overwrite`; then take the lock of the partial
    directory beside it, made with `plan` if there is none, else checked to be for `plan`. Returns
    the lock and the names of the shards an earlier write finished there."""
    remove_stale_temporaries(directory.parent, directory.name)  # a killed swap's old cache is put back
    check_cache_directory(directory, overwrite)
    if holder := lock_holder(directory):
        raise ValueError(f"{directory} is in use by {holder} (its {LOCK_FILE}): wait for it to end, or write the "
                         f"cache elsewhere. If that process is gone, delete {directory / LOCK_FILE}")  # fmt: skip
    work = partial_directory(directory)
    if work.exists() and not work.is_dir():
        raise ValueError(f"{work} is a file, in the way of the directory the cache is written in first: move it")
    if not work.exists():
        _check_room(work, plan)  # a new write: before anything is made
    work.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(work)
    try:
        for p in work.glob(TMP_PREFIX + "*"):  # a shard a killed write had begun (under the lock none is live)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        drop_kept_links(work, directory)  # a publish killed before its swap linked the user's files
        entries = {p.name for p in work.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX)}
        names = {shard["file"] for split in plan["splits"].values() for shard in split["shards"]}
        if not any(name.endswith(".safetensors") for name in entries):  # new, or only begun: nothing to lose
            if entries - {PLAN, INDEX}:
                raise ValueError(f"{work} holds files that are not a teacher cache's ({', '.join(sorted(entries))}), "
                                 f"where the cache for {directory.name} is written first: move them")  # fmt: skip
            write_text_atomic(work / PLAN, json.dumps(plan, indent=2) + "\n")
        elif (recorded := _recorded_plan(work)) is None:
            raise ValueError(f"{work} holds .safetensors files but no {PLAN} or {INDEX} saying what they are, "
                             f"where the cache for {directory.name} is written first: move it aside")  # fmt: skip
        else:
            _check_plan(work, recorded, plan, whole=(work / INDEX).is_file())
            if stray := entries - names - {PLAN, INDEX}:
                raise ValueError(f"{work} holds files that are not this cache's ({', '.join(sorted(stray))}): "
                                 "move them")  # fmt: skip
            write_text_atomic(work / PLAN, json.dumps(recorded, indent=2) + "\n")
            _check_room(work, plan)
        done = entries & names
        if done:
            notice(f"resuming the teacher cache in {work}: {len(done)} of its {len(names)} shards were finished "
                   "by an earlier run")  # fmt: skip
    except BaseException:
        release_lock(lock)
        raise
    return lock, done


def _check_room(work: Path, plan: dict) -> None:
    """Refuse, before any teacher work, when the filesystem of `work` (or of its nearest existing
    parent) has less room than the shards not yet in `work` take: a cache's size is known up
    front (196 bytes a token at Gemma's k = 32: 2 TB for 10B tokens)."""
    have = {p.name for p in work.iterdir()} if work.is_dir() else set()
    per_token = plan["bytes_per_token"]
    needed = sum(shard["count"] * (split["columns"][1] - split["columns"][0]) * per_token
                 for split in plan["splits"].values() for shard in split["shards"] if shard["file"] not in have)
    where = next(p for p in (work, *work.parents) if p.exists())
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ValueError(f"the teacher cache needs {needed:,} bytes more ({needed / 2**30:.2f} GiB), and the "
                         f"filesystem of {where} has {free:,} free: free some space, or write the cache elsewhere "
                         "(--out)")  # fmt: skip


def _recorded_plan(work: Path) -> dict | None:
    """What the shards in `work` were computed for, without the cross-entropy: its cache.json
    (a publish killed midway: this cache's, or an older one a swap moved here, whose shards are as
    good as a partial write's), else its plan.json; None if neither reads."""
    for name in (INDEX, PLAN):
        try:
            recorded = json.loads((work / name).read_text())
            for split in recorded["splits"].values():
                split["teacher_ce"] = None
            return recorded
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def _check_plan(work: Path, old: dict, plan: dict, whole: bool) -> None:
    """Refuse to go on with a partial cache (`whole`: a complete one) written for another teacher,
    other data or settings."""
    derived = ("bytes_per_token", "teacher_checksum", "splits")  # of the settings, or compared below
    differ = [f"{key} (was {old.get(key)}, now {plan.get(key)})" for key in sorted(plan.keys() | old.keys())
              if key not in derived and old.get(key) != plan.get(key)]  # fmt: skip

    def data(index: dict) -> dict:
        return {name: {k: v for k, v in split.items() if k != "shards"} for name, split in index["splits"].items()}

    if data(old) != data(plan):
        differ.append("the data (its tokens, row layout or held-out split)")
    elif old["splits"] != plan["splits"] and not differ:  # shards of another size, not of another k
        differ.append("the shard size (--shard-mb)")
    stored = old.get("teacher_checksum") or [math.nan] * 2
    if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(stored, plan["teacher_checksum"])):
        differ.append("the teacher's weights")
    if differ and whole:
        raise ValueError(f"{work} holds a whole teacher cache ({INDEX}: a publish killed midway left it, perhaps the "
                         f"cache an overwrite replaced) that differs from this one in {'; '.join(differ)}: move it "
                         "aside (renamed, it is a cache) or remove it")  # fmt: skip
    if differ:
        raise ValueError(f"{work} holds part of a teacher cache that differs from this one in {'; '.join(differ)}: "
                         f"finish it with its teacher, data and settings, or remove {work} to start over")  # fmt: skip


def _missing(plan: dict, done: set[str]) -> list[tuple[str, dict]]:
    """(split, shard) of every shard not in `done`, all splits' in order."""
    return [(name, shard) for name, split in plan["splits"].items() for shard in split["shards"]
            if shard["file"] not in done]  # fmt: skip


def _write_shards(shard_topk: Callable, splits: dict[str, Rows], work: Path, todo: list[tuple[str, dict]],
                  progress: bool) -> None:  # fmt: skip
    """Compute the shards `todo` (a partial `_shard_topk` each) and write each into `work` (whole
    or not at all), its teacher cross-entropy sum and counted tokens in its metadata. A shard is
    the same bytes whichever process writes it (the plan is checked), so one written by a holder
    whose lock was taken over meanwhile (gemma2.locks) harms nothing; `_publish` checks the lock."""
    bar = tqdm(total=sum(shard["count"] for _, shard in todo), desc="caching the teacher", unit="seq",
               disable=not progress)  # fmt: skip
    with bar:  # closed however the loop ends: an error's line is its own
        for name, shard in todo:
            sequences = range(shard["start"], shard["start"] + shard["count"])
            tensors, (ce, counted) = shard_topk(splits[name], sequences, bar)
            with atomic_file(work / shard["file"]) as tmp:
                # One key: safetensors writes several in an order that varies from process to process.
                save_file(tensors, tmp, metadata={CE_KEY: f"{ce!r} {counted!r}"})


def _write_on_every_rank(directory: Path, plan: dict, splits: dict[str, Rows], shard_topk: Callable,
                         overwrite: bool, progress: bool) -> dict:  # fmt: skip
    """This rank's deal of the missing shards, written into the partial directory that rank 0 takes;
    rank 0 publishes it once every rank has reported success. Every rank returns the index, or
    every rank raises (`directory` as it was, the finished shards kept for a rerun): the ranks
    agree at three fixed points, so a failing rank never leaves the others waiting."""
    rank, world = distributed.rank(), distributed.world_size()
    group = dist.new_group(backend="gloo", timeout=timedelta(days=7))  # CPU tensors; waits for the slowest rank
    work, lock, failure = partial_directory(directory), None, None
    found: list = [None]  # the shards finished before, or why there is no partial directory to write in
    try:
        if rank == 0:  # only rank 0 can tell whether the processes that left files are gone
            try:
                lock, done = _take_partial(directory, plan, overwrite)
                found[0] = sorted(done)
            except Exception as e:
                failure, found[0] = e, e if isinstance(e, ValueError) else None
        dist.broadcast_object_list(found, src=0, group=group)
        if not isinstance(found[0], list):
            raise failure or found[0] or ValueError(f"rank 0 could not start the teacher cache in {work}; see its error")
        try:
            if not (work / PLAN).is_file():
                raise ValueError(f"rank {rank} cannot see {work / PLAN}: the cache directory must be on a filesystem "
                                 "every rank shares")  # fmt: skip
            _write_shards(shard_topk, splits, work, _missing(plan, set(found[0]))[rank::world], progress and rank == 0)
        except Exception as e:  # told to the other ranks first, so that none waits for this one
            failure = e
        failed = torch.tensor([float(failure is not None)])
        dist.all_reduce(failed, group=group)  # every rank's shards written?
        if failure is not None:
            raise failure
        if n := int(failed.item()):
            raise ValueError(f"{n} of {world} ranks failed to write their teacher cache shards (their errors are in "
                             f"their own output); {directory} is unchanged, and the shards finished are kept in "
                             f"{work}: the same command again writes the rest")  # fmt: skip
        published: list = [None]
        if rank == 0:
            try:
                published[0] = _publish(work, directory)
            except Exception as e:  # the others hear of it first
                failure = e
        dist.broadcast_object_list(published, src=0, group=group)  # the index: the cache is in place
        if failure is not None:
            raise failure
        if published[0] is None:
            raise ValueError(f"rank 0 could not put the teacher cache in place at {directory} (see its error); it "
                             "is unchanged")  # fmt: skip
        return published[0]
    finally:
        if lock is not None:
            release_lock(lock)


def _foreign_entries(directory: Path) -> list[str]:
    """The entries of an existing directory that are not an earlier cache's (kept on overwrite)."""
    if not directory.is_dir():
        return []
    ours = {INDEX}
    try:
        index = json.loads((directory / INDEX).read_text())
        ours |= {shard["file"] for split in index["splits"].values() for shard in split["shards"]}
        ours.add(LOCK_FILE)  # beside a cache: the lock of a write killed right after its swap
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no readable index: it names no files of ours
    return [p.name for p in directory.iterdir() if p.name not in ours]


def _shard_topk(teacher: Gemma2ForCausalLM, data: Rows, sequences: range, bar: tqdm, *, k: int, temperature: float,
                batch_size: int, chunk_size: int, logprob_dtype: torch.dtype) -> tuple[dict[str, Tensor], list[float]]:
    """One shard's tensors: the teacher's top-k of `sequences` at the split's stored columns (the
    head and top-k run there alone), and their cross-entropy summed over the counted tokens and the
    number of those."""
    kept, device = data.counted_columns, teacher.output_weight.device
    id_dtype = torch.int16 if teacher.config.vocab_size <= 2**15 else torch.int32
    n, C = len(sequences), kept.stop - kept.start
    # Zeros where a batch of prompt rows stops short of the layout (padding: never counted).
    ids, lps = torch.zeros(n, C, k, dtype=id_dtype), torch.zeros(n, C, k, dtype=logprob_dtype)
    tail = torch.zeros(n, C, dtype=torch.float32)
    ce_sum = torch.zeros(2, dtype=torch.float64, device=device)  # CE, counted tokens
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
    return {"ids": ids, "logprobs": lps, "tail": tail}, ce_sum.tolist()


def _publish(work: Path, directory: Path) -> dict:
    """Complete the partial directory `work` and put it in place of `directory` (files of an older
    cache there that are not its own kept). The index is the plan recorded in `work` with each
    split's teacher cross-entropy, summed from its shards' metadata in order (the same sum whichever
    rank or run wrote which shard); returns it."""
    ensure_held(work / LOCK_FILE)
    index = json.loads((work / PLAN).read_text())
    for split in index["splits"].values():
        ce, counted = 0.0, 0.0
        for shard in split["shards"]:
            with safe_open(work / shard["file"], framework="pt") as f:
                shard_ce, shard_counted = map(float, f.metadata()[CE_KEY].split())
            ce, counted = ce + shard_ce, counted + shard_counted
        split["teacher_ce"] = ce / counted if counted else None  # None: no completions to score
    write_text_atomic(work / INDEX, json.dumps(index, indent=2) + "\n")  # its presence: the cache is complete
    (work / PLAN).unlink()  # killed from here to the swap, `work` is still resumed: from cache.json
    publish_directory(work, directory, keep=_foreign_entries(directory))
    # Held until the swap, so that no other writer could start on `work`; a leftover is harmless.
    with suppress(OSError):
        release_lock(directory / LOCK_FILE)
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
                f"scripts/cache_teacher.py (an interrupted run leaves its finished shards in "
                f"{partial_directory(self.directory.resolve())}: the same command again finishes it)"
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
