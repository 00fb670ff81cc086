"""Writing token files (gemma2.token_files): a corpus or a prompt dataset tokenized in two streaming
passes, in several processes, resumably.

`write_token_file` streams:
- pass 1 reads the documents (or the prompt files' lines, each parsed and its conversation checked
  as encoding will check it, so a bad example stops the run before any tokenizing) only to rank
  them for the held-out split (gemma2.corpus.held_out: the items whose seeded sha256 of their
  text, or of their prompt, is lowest, whole), keeping 16 bytes per item; a repeated prompt line
  is kept once, as gemma2.prompts keeps it;
- pass 2 reads them again and tokenizes them in `workers` processes, a bounded number of chunks
  in flight, appending each chunk's training and held-out tokens, and their length tables, to
  files of the partial directory (below).
Memory is a few chunks of text and tokens plus ~40 bytes per document or example (pass 1's keys
and masks, the length tables read back at the end), never the corpus or the token array.
(held_out compares whole digests; here the first 8 bytes, so the splits could differ only if two
different items shared a 64-bit hash prefix right at the boundary, and two different prompt lines
sharing one would be kept once.)

Resumable and atomic: the write happens in `NAME.npy.partial/`, beside NAME.npy (beside its target
if it is a symbolic link), under a lock taken before anything else (a second writer of NAME.npy
is refused at once): `plan.json` (the settings and a digest of pass 1: the items, in order, and
their split), the four parts (`train.bin`, `heldout.bin`, `train.lengths`, `heldout.lengths`) and
`progress.json`, which records, at most once a second, how many items and bytes of the parts are
on disk (fsynced first). The same call again, after a kill, Ctrl-C or an I/O error (a full
disk), repeats pass 1, checks it against `plan.json` (other data, split or tokenizer is refused
and named), cuts each part back to its recorded size, reads past the items recorded and
tokenizes the rest: the file is byte for byte the one an uninterrupted run writes (tested). At
the end the held-out tokens and the tables are appended to `train.bin`, which gets its header
and is renamed to NAME.npy; then the sidecar is moved beside it (an overwrite removes the old
sidecar first) and the partial directory removed, its lock with it. A killed run therefore never
leaves a `.npy` + sidecar pair that a loader accepts but the complete one (killed between the two
renames, the sidecar waits in the partial directory; the next call puts it in place, never over
a file of its name made since). A call that fails before its first record leaves no partial
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .corpus import all_held_out, document_key, heldout_count, iter_documents, note_overlap
from .files import (followed, fsync, is_temporary, notice, remove_directory, remove_stale_temporaries,
                    write_text_atomic)  # fmt: skip
from .locks import LOCK_FILE, acquire_lock, ensure_held, holds, release_lock
from .prompts import encode_examples, example_lines, parse_example, prompt_key
from .token_files import FORMAT, sidecar_path
from .tokenizer import Tokenizer

_HEADER_BYTES = 128  # np.save's version-1.0 header for any 1-D int32 shape up to 10^15 entries
_CHUNK_CHARS = 1 << 20  # text per task sent to a worker
_RECORD_SECONDS = 1.0  # at most this much tokenizing is lost to a kill
# The partial directory (NAME.npy.partial) of a write in progress:
PARTIAL = ".partial"  # NAME.npy.partial
PLAN, PROGRESS, SIDECAR = "plan.json", "progress.json", "sidecar.json"
TRAIN, HELDOUT, TRAIN_LENGTHS, HELDOUT_LENGTHS = "train.bin", "heldout.bin", "train.lengths", "heldout.lengths"
_PARTS = (TRAIN, HELDOUT, TRAIN_LENGTHS, HELDOUT_LENGTHS)
# What a resumed write must share with the one that began it (plan.json; the format too), and how
# to name a difference.
_PLAN_KEYS = {"kind": "the kind (documents or prompts)", "tokenizer": "the tokenizer", "text_column": "the text column",
              "items": "the items or their held-out split", "digest": "the items or their held-out split"}  # fmt: skip


def _documents(paths: Sequence[str | os.PathLike], text_column: str) -> Iterator[str]:
    """The non-empty documents of `paths`, in order: what gemma2.data.read_texts keeps."""
    for path in paths:
        for doc in iter_documents(path, text_column=text_column):
            if doc.strip():
                yield doc


def _items(paths: Sequence[str | os.PathLike], text_column: str, prompts: bool) -> Iterator[Any]:
    """What is ranked and tokenized: the documents of `paths`, or their prompt examples' lines as
    (`FILE:LINE`, line) pairs."""
    return example_lines(paths) if prompts else _documents(paths, text_column)


def _keys(item: Any, prompts: bool, tokenizer: Tokenizer) -> tuple[int, int]:
    """The 64-bit prefixes of the document_key of an item, and of what ranks it for the held-out
    split: a document's text; a prompt line and its prompt (`prompt_key`). A prompt line is parsed
    and its conversation checked as encoding it will be (`format_chat`), so that a bad example stops
    the run before any tokenizing, not in pass 2, where a failure is resumed."""
    if not prompts:
        return _prefix(item), _prefix(item)
    where, line = item
    example = parse_example(line, where)
    ranked = prompt_key(example, where)
    if "messages" in example:
        try:
            tokenizer.format_chat(example["messages"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return _prefix(line), _prefix(ranked)


def _prefix(text: str) -> int:
    return int.from_bytes(document_key(text)[:8], "big")


def _pass_one(groups: list[Sequence[str | os.PathLike]], holdout_fraction: float | None, text_column: str,
              prompts: bool, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, str]:  # fmt: skip
    """Pass 1 over the items of the training paths (groups[0]) and the held-out ones (groups[1],
    when given): bool masks (keep, held) over all items, in order. keep: the item is tokenized
    (every document; the first of repeated prompt lines within a group); held: it is held out
    (every item of groups[1], else held_out's choice, seed 0, among the kept training items); and
    a sha256 of every item's key and both masks, which a resumed run checks (the same items, in the
    same order, split the same way)."""
    keeps, helds, ranked, digest = [], [], [], hashlib.sha256()
    for g, paths in enumerate(groups):
        pairs = (_keys(item, prompts, tokenizer) for item in _items(paths, text_column, prompts))
        keys, ranks = np.fromiter(chain.from_iterable(pairs), dtype=np.uint64).reshape(-1, 2).T
        if len(keys) == 0:
            what = "prompt examples" if prompts else "text"
            raise ValueError(f"no {what} in {', '.join(map(str, paths))}: pass non-empty files")
        keep = np.zeros(len(keys), dtype=bool) if prompts else np.ones(len(keys), dtype=bool)
        if prompts:
            keep[np.unique(keys, return_index=True)[1]] = True  # each key's first occurrence
        held = np.full(len(keys), g == 1)
        if len(groups) == 1:
            kept = np.flatnonzero(keep)
            n_held = heldout_count(len(kept), holdout_fraction)
            if n_held:  # as gemma2.corpus.held_out: the items of one rank key go to one side
                last = np.partition(ranks[kept], n_held - 1)[n_held - 1]
                held[kept[ranks[kept] <= last]] = True
                if held[kept].all():
                    raise all_held_out(n_held, len(kept))
        keeps.append(keep)
        helds.append(held)
        ranked.append(ranks[keep])
        for array in (keys, keep, held):
            digest.update(array.tobytes())
    if len(groups) == 2:
        note_overlap(int(np.isin(ranked[1], ranked[0]).sum()), len(ranked[1]), "prompts" if prompts else "documents")
    return np.concatenate(keeps), np.concatenate(helds), digest.hexdigest()


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent ends the pool
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_documents(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (their tokens concatenated, int32; `[n, 1]` each document's token count)."""
    tok = tokenizer or _worker_tokenizer
    parts = [tok.encode(d, bos=True, eos=True) for d in docs]
    return np.array(list(chain.from_iterable(parts)), dtype=np.int32), np.array([[len(p)] for p in parts])


def _encode_prompts(lines: list[tuple[str, str]], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(`FILE:LINE`, line) pairs -> (their tokens, `[n, 2]` prompt and completion lengths)."""
    parsed = ((where, parse_example(line, where)) for where, line in lines)
    examples = encode_examples(parsed, tokenizer or _worker_tokenizer)
    return examples.tokens, examples.lengths


def _chunks(items: Iterable[Any], prompts: bool) -> Iterator[list[Any]]:
    """Lists of items holding about _CHUNK_CHARS characters of text each."""
    chunk: list[Any] = []
    size = 0
    for item in items:
        chunk.append(item)
        size += len(item[1] if prompts else item)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(
    items: Iterable[Any], tokenizer: Tokenizer, workers: int, prompts: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """_encode_documents (_encode_prompts) over chunks of `items`, in order; with workers > 1 in a
    process pool holding at most 2 * workers chunks in flight (Pool.imap would read ahead it all).
    A ProcessPoolExecutor, not a multiprocessing.Pool: a worker killed while it hands back a result
    (a scheduler's SIGTERM reaches the whole process group) holds a lock of Pool's result queue
    forever, and Pool.terminate then waits on it (seen: the test's SIGTERM hung the writer); the
    executor's own wait on such a worker is ended by `_abandon`."""
    encode = _encode_prompts if prompts else _encode_documents
    if workers == 1:
        for chunk in _chunks(items, prompts):
            yield encode(chunk, tokenizer)
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                               initargs=(str(tokenizer.path),))  # fmt: skip
    try:
        pending: deque = deque()
        for chunk in _chunks(items, prompts):
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BaseException:
        _abandon(pool)
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _abandon(pool: ProcessPoolExecutor) -> None:
    """Kill the pool's workers and close this process's copy of their result pipe's write end: a
    worker killed while sending a result (a chunk's tokens, over a pipe's 64 KiB) leaves the
    executor's reader thread inside that message, and only an end of file frees it; the shutdown
    (and Python's exit, which joins that thread) would wait on it forever. CPython's attributes
    (3.10 - 3.13), read with defaults: without them the shutdown is as before."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.kill()
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    if writer is not None:
        writer.close()


class _Parts:
    """Pass 2's output in the partial directory: the training and held-out items' tokens (TRAIN
    begins with room for the .npy header) and their length tables, each appended chunk by chunk,
    and PROGRESS, the items and bytes of them made durable so far. Opened at the recorded progress
    (a file's bytes past it, which a killed run wrote unrecorded, are cut), or new."""

    def __init__(self, work: Path, width: int, progress: dict | None) -> None:
        self.work, self.width = work, width
        sizes = progress["bytes"] if progress else dict.fromkeys(_PARTS, 0)
        self.items = progress["items"] if progress else 0
        self.files = {}
        for name in _PARTS:
            f = open(work / name, "r+b" if progress else "wb")
            f.truncate(sizes[name])
            f.seek(sizes[name])
            self.files[name] = f
        if not progress:
            self.files[TRAIN].write(b"\0" * _HEADER_BYTES)  # the header, written once the length is known
            self.record()
        self._recorded = time.monotonic()

    def append(self, tokens: np.ndarray, table: np.ndarray, held: np.ndarray) -> None:
        """One encoded chunk: its items' tokens and `[n, width]` length table, `held` saying which
        items are held out; its progress is recorded at most every _RECORD_SECONDS."""
        per_token = np.repeat(held, table.sum(1))
        self.files[TRAIN].write(tokens[~per_token].tobytes())
        self.files[HELDOUT].write(tokens[per_token].tobytes())
        self.files[TRAIN_LENGTHS].write(table[~held].astype(np.int32).tobytes())
        self.files[HELDOUT_LENGTHS].write(table[held].astype(np.int32).tobytes())
        self.items += len(table)
        if time.monotonic() - self._recorded >= _RECORD_SECONDS:
            self.record()

    def record(self) -> None:
        """Make what was appended durable, then say so in PROGRESS (if the lock is still ours)."""
        ensure_held(self.work / LOCK_FILE)
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        sizes = {name: f.tell() for name, f in self.files.items()}
        write_text_atomic(self.work / PROGRESS, json.dumps({"items": self.items, "bytes": sizes}) + "\n")
        self._recorded = time.monotonic()

    def tables(self) -> dict[str, np.ndarray]:
        """Each split's length table, `[n, width]` int32 (read back from the files)."""
        for f in self.files.values():
            f.flush()
        return {split: np.fromfile(self.work / name, dtype=np.int32).reshape(-1, self.width)
                for split, name in (("train", TRAIN_LENGTHS), ("heldout", HELDOUT_LENGTHS))}  # fmt: skip

    def assemble(self, tables: dict[str, np.ndarray], prompts: bool) -> None:
        """Make TRAIN the token file: the held-out tokens after the training ones, then (prompts)
        both `tables`, and the header. Killed midway, the next run cuts TRAIN back and does it again."""
        f = self.files[TRAIN]
        with open(self.work / HELDOUT, "rb") as held:
            shutil.copyfileobj(held, f, 1 << 24)
        if prompts:
            f.write(np.concatenate([tables["train"], tables["heldout"]]).tobytes())
        size = f.tell() - _HEADER_BYTES
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (size // 4,)})
        assert f.tell() == _HEADER_BYTES, f.tell()
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _partial_directory(out: Path) -> Path:
    """Where token file `out` is written until it is complete: NAME.npy.partial beside it."""
    return out.with_name(out.name + PARTIAL)


def _lock_partial(out: Path) -> Path:
    """Take the lock of `out`'s partial directory (made if there is none), before anything else of
    a write, so that a second writer of `out` is refused at once; clear what a killed run left
    there. Returns the lock."""
    work = _partial_directory(out)
    if work.exists() and not work.is_dir():
        raise ValueError(f"{work} is a file, in the way of the directory the token file is written in first: move it")
    work.mkdir(exist_ok=True)
    lock = acquire_lock(work)
    try:
        remove_stale_temporaries(work)  # a record a killed run had begun: gemma2.files' own names only
        entries = {p.name for p in work.iterdir() if not is_temporary(p.name)} - {LOCK_FILE}
        if stray := entries - {PLAN, PROGRESS, SIDECAR, *_PARTS}:
            raise ValueError(f"{work} holds files that are not a token file's ({', '.join(sorted(stray))}), where "
                             f"{out.name} is written first: move them")  # fmt: skip
        if (work / PROGRESS).is_file() and not (work / TRAIN).exists():  # killed once its .npy was at `out`
            # Never over a sidecar-named file that appeared since: the .npy then waits for an overwrite.
            if (work / SIDECAR).is_file() and out.is_file() and not sidecar_path(out).exists():
                os.replace(work / SIDECAR, sidecar_path(out))
                fsync(out.parent)
                notice(f"{out} is complete: a run was killed after moving it there and before its sidecar")
            for name in entries:
                (work / name).unlink(missing_ok=True)
    except BaseException:
        release_lock(lock)
        raise
    return lock


def _resume_point(work: Path, out: Path, plan: dict) -> dict | None:
    """The progress an earlier run recorded in `work` for `plan` (None: start, with `plan` recorded);
    a ValueError when `work` holds part of another token file."""
    try:
        recorded = json.loads((work / PLAN).read_text())
        progress = json.loads((work / PROGRESS).read_text())
    except (OSError, ValueError):  # new, or killed before its first record: nothing to lose
        write_text_atomic(work / PLAN, json.dumps(plan, indent=2) + "\n")
        return None
    if recorded.get("format") != plan["format"]:
        raise ValueError(f"{work} holds part of a token file of format {recorded.get('format')}, which this "
                         f"version does not continue: remove {work} to start over")  # fmt: skip
    if differ := dict.fromkeys(what for key, what in _PLAN_KEYS.items() if recorded.get(key) != plan.get(key)):
        raise ValueError(f"{work} holds part of a token file that differs from this run's in {', '.join(differ)}: "
                         f"rerun the command that began it to finish it, or remove {work} to start over")  # fmt: skip
    short = [name for name, size in progress["bytes"].items()
             if not (work / name).is_file() or (work / name).stat().st_size < size]  # fmt: skip
    if short:  # the machine, not the process, went down before the files reached the disk (or a hand)
        notice(f"{work}: {', '.join(short)} lost bytes an earlier run had recorded; starting over")
        return None
    if progress["items"]:
        unit = "examples" if plan["kind"] == "prompts" else "documents"
        notice(f"resuming {out.name} from {work}: an earlier run tokenized {progress['items']:,} of its "
               f"{plan['items']:,} {unit}")  # fmt: skip
    return progress


def interrupted(out: str | os.PathLike) -> str:
    """For a user whose write of token file `out` stopped (Ctrl-C, a full disk): how to finish it
    ("" before anything was kept)."""
    work = _partial_directory(followed(out))
    return f"the same command continues it from {work}" if (work / PROGRESS).is_file() else ""


def write_token_file(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    holdout_fraction: float = 0.02,
    eval_paths: Sequence[str | os.PathLike] | None = None,
    text_column: str = "text",
    prompts: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of `paths` (.txt, .jsonl, .parquet files or directories), or with
    `prompts` the examples of prompt datasets (`.jsonl`, gemma2.prompts), into the token file
    `out` (NAME.npy) and its sidecar; returns the sidecar's content.

    The held-out split is `eval_paths` when given (all of `paths` then trains), else
    `holdout_fraction` of the items, chosen as gemma2.data.load_datasets (gemma2.prompts.
    load_prompt_datasets) chooses them. A killed or interrupted call is continued by the same call
    (see the module docstring)."""
    out = followed(out)  # a symbolic link: its target is written, and the partial directory sits beside it
    if out.suffix != ".npy":
        raise ValueError(f"{out}: a token file is named NAME.npy; pick a name ending in .npy")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {out.parent}; create it first")
    # What killed writes left: a removal of the partial directory begun, or (before writes resumed)
    # a temporary .npy and held-out scratch file.
    for name in (out.name + PARTIAL, out.name, out.name + ".heldout"):
        remove_stale_temporaries(out.parent, name)
    lock = _lock_partial(out)
    work = lock.parent
    try:
        # Under the lock: no writer is mid-way. Named as found: a sidecar alone is replaced too.
        existing = next((p for p in (out, sidecar_path(out)) if p.exists()), None)
        if not overwrite and existing is not None:
            raise ValueError(f"{existing} already exists; pass --overwrite (overwrite=True) to replace it, or another "
                             "name")  # fmt: skip
        info = _write(work, out, tokenizer, paths, eval_paths, holdout_fraction, text_column, prompts, workers,
                      progress)  # fmt: skip
        try:
            remove_directory(work)  # the lock with it
        finally:
            release_lock(lock)  # its heartbeat
        return info
    except BaseException:
        if (work / PROGRESS).is_file() or not holds(lock):
            release_lock(lock)  # kept for the same call to continue (or another process's now)
        else:
            try:
                remove_directory(work)  # nothing to continue: nothing left
            finally:
                release_lock(lock)  # its heartbeat
        raise


def _write(work: Path, out: Path, tokenizer: Tokenizer, paths: Sequence[str | os.PathLike],
           eval_paths: Sequence[str | os.PathLike] | None, holdout_fraction: float, text_column: str, prompts: bool,
           workers: int, progress: bool) -> dict:  # fmt: skip
    """write_token_file's work, under the lock of the partial directory `work`: both passes, then
    the token file and its sidecar moved to `out`. Returns the sidecar's content."""
    groups = [list(paths)] if eval_paths is None else [list(paths), list(eval_paths)]
    keep, held_mask, digest = _pass_one(groups, holdout_fraction, text_column, prompts, tokenizer)
    held_mask = held_mask[keep]  # over the items pass 2 tokenizes
    info = {
        "format": FORMAT,
        "kind": "prompts" if prompts else "documents",
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size},
        # How the held-out items were chosen, to be repeated from the same sources.
        "heldout": {"eval_paths": list(map(str, eval_paths))} if eval_paths is not None
        else {"holdout_fraction": holdout_fraction, "seed": 0},
        "sources": list(map(str, paths)),
        **({} if prompts else {"text_column": text_column}),
    }  # fmt: skip
    plan = {"format": FORMAT, **{key: info[key] for key in _PLAN_KEYS if key in info}, "items": len(held_mask),
            "digest": digest}  # fmt: skip
    done = _resume_point(work, out, plan)
    items = (item for g in groups for item in _items(g, text_column, prompts))
    kept = (item for item, k in zip(items, keep) if k)
    tables = _pass_two(work, done, kept, held_mask, tokenizer, workers, prompts,
                       desc=f"tokenize {out.name}" if progress else None)  # fmt: skip
    unit = "examples" if prompts else "documents"
    info[unit] = {split: len(table) for split, table in tables.items()}
    info["tokens"] = {split: int(table.sum()) for split, table in tables.items()}
    write_text_atomic(work / SIDECAR, json.dumps(info, indent=2) + "\n")
    ensure_held(work / LOCK_FILE)
    sidecar_path(out).unlink(missing_ok=True)  # the old pair stops being a token file first
    os.replace(work / TRAIN, out)
    os.replace(work / SIDECAR, sidecar_path(out))
    fsync(out.parent)
    return info


def _pass_two(work: Path, done: dict | None, kept: Iterator[Any], held_mask: np.ndarray, tokenizer: Tokenizer,
              workers: int, prompts: bool, desc: str | None) -> dict[str, np.ndarray]:  # fmt: skip
    """Tokenize the `kept` items (all of them; those `done` records are skipped) into the parts in
    `work`, then assemble the token file there (TRAIN). Returns each split's length table. desc:
    the progress bar's, None for none."""
    parts = _Parts(work, 2 if prompts else 1, done)
    try:
        bar = tqdm(total=len(held_mask), initial=parts.items, unit="example" if prompts else "doc", desc=desc,
                   disable=desc is None)  # fmt: skip
        with bar:  # closed however this ends: an error's line is its own
            for tokens, table in _encoded_chunks(islice(kept, parts.items, None), tokenizer, workers, prompts):
                parts.append(tokens, table, held_mask[parts.items : parts.items + len(table)])
                bar.update(len(table))
        assert parts.items == len(held_mask), "pass 2 read other items than pass 1"
        parts.record()
        tables = parts.tables()
        parts.assemble(tables, prompts)
    finally:
        parts.close()
    return tables
