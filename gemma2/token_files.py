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

`write_token_file` streams:
- pass 1 reads the documents (or the prompt files' lines, each parsed, so a malformed one stops
  the run before any tokenizing) only to rank them for the held-out split (gemma2.corpus.held_out:
  the items whose seeded sha256 of their text, or of their prompt, is lowest, whole), keeping 16
  bytes per item; a repeated prompt line is kept once, as gemma2.prompts keeps it;
- pass 2 reads them again and tokenizes them in `workers` processes, a bounded number of chunks
  in flight, appending each chunk's training tokens to the output and its held-out tokens to a
  scratch file that is appended at the end.
Memory is a few chunks of text and tokens plus ~40 bytes per document or example (the keys, the
masks, the lengths), never the corpus or the token array. (held_out compares whole digests; here
the first 8 bytes, so the splits could differ only if two different items shared a 64-bit hash
prefix right at the boundary, and two different prompt lines sharing one would be kept once.)

Atomic: the `.npy` is written under a `.tmp-` name and renamed when complete, then the sidecar is
written (atomically) last; an overwrite removes the old sidecar first. A killed run therefore
leaves no `.npy` + sidecar pair that a loader accepts; its temporaries are removed by the next
run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .corpus import all_held_out, document_key, heldout_count, iter_documents, note_overlap
from .data import Datasets, load_datasets, pack_datasets
from .files import atomic_file, followed, remove_stale_temporaries, scratch_file, write_text_atomic
from .prompts import (
    Examples,
    encode_examples,
    example_lines,
    load_prompt_datasets,
    parse_example,
    prompt_datasets,
    prompt_key,
)
from .tokenizer import Tokenizer

FORMAT = 1
_HEADER_BYTES = 128  # np.save's version-1.0 header for any 1-D int32 shape up to 10^15 entries
_CHUNK_CHARS = 1 << 20  # text per task sent to a worker


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the sidecar of token file `path` lives: NAME.npy -> NAME.json."""
    return Path(path).with_suffix(".json")


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


def _keys(item: Any, prompts: bool) -> tuple[int, int]:
    """The 64-bit prefixes of the document_key of an item, and of what ranks it for the held-out
    split: a document's text; a prompt line and its prompt (`prompt_key`; the line is parsed here,
    so a malformed one stops the run before any tokenizing)."""
    if prompts:
        where, line = item
        ranked = prompt_key(parse_example(line, where), where)
        return _prefix(line), _prefix(ranked)
    return _prefix(item), _prefix(item)


def _prefix(text: str) -> int:
    return int.from_bytes(document_key(text)[:8], "big")


def _plan(groups: list[Sequence[str | os.PathLike]], holdout_fraction: float | None, text_column: str,
          prompts: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pass 1 over the items of the training paths (groups[0]) and the held-out ones (groups[1],
    when given): bool masks (keep, held) over all items, in order. keep: the item is tokenized
    (every document; the first of repeated prompt lines within a group); held: it is held out
    (every item of groups[1], else held_out's choice, seed 0, among the kept training items)."""
    keeps, helds, ranked = [], [], []
    for g, paths in enumerate(groups):
        pairs = (_keys(item, prompts) for item in _items(paths, text_column, prompts))
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
    if len(groups) == 2:
        note_overlap(int(np.isin(ranked[1], ranked[0]).sum()), len(ranked[1]), "prompts" if prompts else "documents")
    return np.concatenate(keeps), np.concatenate(helds)


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
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
    process pool holding at most 2 * workers chunks in flight (Pool.imap would read ahead it all)."""
    encode = _encode_prompts if prompts else _encode_documents
    if workers == 1:
        for chunk in _chunks(items, prompts):
            yield encode(chunk, tokenizer)
        return
    with get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(str(tokenizer.path),)) as pool:
        pending: deque = deque()
        for chunk in _chunks(items, prompts):
            pending.append(pool.apply_async(encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_splits(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], held_mask: np.ndarray, f_train: BinaryIO, f_held: BinaryIO,
    bar: tqdm,
) -> tuple[dict[str, list[int]], dict[str, list[np.ndarray]]]:
    """Pass 2's writes: each encoded chunk's training items' tokens to f_train, its held-out ones'
    to f_held (held_mask says which, item by item). Returns the documents (examples) and tokens
    of each split, and each split's rows of the chunks' length tables, in order."""
    counts = {"train": [0, 0], "heldout": [0, 0]}
    tables: dict[str, list[np.ndarray]] = {"train": [], "heldout": []}
    done = 0
    for tokens, table in chunks:
        lengths = table.sum(1)
        held = held_mask[done : done + len(lengths)]
        per_token = np.repeat(held, lengths)
        f_train.write(tokens[~per_token].tobytes())
        f_held.write(tokens[per_token].tobytes())
        for split, sel in (("train", ~held), ("heldout", held)):
            counts[split][0] += int(sel.sum())
            counts[split][1] += int(lengths[sel].sum())
            tables[split].append(table[sel])
        done += len(lengths)
        bar.update(len(lengths))
        bar.set_postfix(tokens=f"{counts['train'][1] + counts['heldout'][1]:,}", refresh=False)
    assert done == len(held_mask), "pass 2 read other items than pass 1"
    return counts, tables


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
    load_prompt_datasets) chooses them."""
    out = followed(out)  # a symbolic link: its target is written, and its temporaries sit beside it
    if out.suffix != ".npy":
        raise ValueError(f"{out}: a token file is named NAME.npy; pick a name ending in .npy")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not overwrite and (out.exists() or sidecar_path(out).exists()):
        raise ValueError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or another name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {out.parent}; create it first")
    groups = [list(paths)] if eval_paths is None else [list(paths), list(eval_paths)]
    keep, held_mask = _plan(groups, holdout_fraction, text_column, prompts)
    held_mask = held_mask[keep]  # over the items pass 2 tokenizes
    items = (item for g in groups for item in _items(g, text_column, prompts))
    kept = (item for item, k in zip(items, keep) if k)

    for name in (out.name, out.name + ".heldout"):
        remove_stale_temporaries(out.parent, name)
    unit = "example" if prompts else "doc"
    bar = tqdm(total=len(held_mask), unit=unit, desc=f"tokenize {out.name}", disable=not progress)
    with atomic_file(out) as tmp, scratch_file(out.with_name(out.name + ".heldout")) as held_tmp:
        with open(tmp, "wb") as f_train, open(held_tmp, "wb") as f_held, bar:  # the bar closed however this ends
            f_train.write(b"\0" * _HEADER_BYTES)  # the header, written once the length is known
            chunks = _encoded_chunks(kept, tokenizer, workers, prompts)
            counts, tables = _write_splits(chunks, held_mask, f_train, f_held, bar)
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            with open(held_tmp, "rb") as f_held:
                shutil.copyfileobj(f_held, f, 1 << 24)
            if prompts:
                f.write(np.concatenate([*tables["train"], *tables["heldout"]]).astype(np.int32).tobytes())
            size = f.tell() - _HEADER_BYTES
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (size // 4,)})
            assert f.tell() == _HEADER_BYTES, f.tell()
        sidecar_path(out).unlink(missing_ok=True)  # the old pair stops being a token file first
    info = {
        "format": FORMAT,
        "kind": "prompts" if prompts else "documents",
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size},
        "examples" if prompts else "documents": {"train": counts["train"][0], "heldout": counts["heldout"][0]},
        "tokens": {"train": counts["train"][1], "heldout": counts["heldout"][1]},
        # How the held-out items were chosen, to be repeated from the same sources.
        "heldout": {"eval_paths": list(map(str, eval_paths))} if eval_paths is not None
        else {"holdout_fraction": holdout_fraction, "seed": 0},
        "sources": list(map(str, paths)),
        **({} if prompts else {"text_column": text_column}),
    }  # fmt: skip
    write_text_atomic(sidecar_path(out), json.dumps(info, indent=2) + "\n")
    return info


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


def _alone(paths: Sequence[str | os.PathLike], flag: str, eval_flag: str, others: bool) -> bool:
    """Whether `paths` name a token file, which must come alone and without held-out flags."""
    if not any(Path(p).suffix == ".npy" for p in paths):
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
