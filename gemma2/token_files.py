"""Token files: a corpus tokenized once into one `.npy` that every rank memory-maps.

A token file is two files:
- `NAME.npy`: int32 `[N]`, the training documents' tokens followed by the held-out documents',
  each document `bos ids eos` (the packing of gemma2.data.tokenize);
- `NAME.json`, the sidecar: the tokenizer's fingerprint and vocabulary size, documents and tokens
  per split, and how the held-out split was made. Only the sidecar makes the `.npy` a token file.

`load_token_file` gives exactly the Datasets that gemma2.data.load_datasets builds in memory from
the same sources and holdout fraction (tested), without reading or tokenizing anything.

`write_token_file` streams:
- pass 1 reads the documents only to rank them for the held-out split (split_corpus: the
  documents whose seeded sha256 is lowest, by whole document), keeping 8 bytes per document;
- pass 2 reads them again and tokenizes them in `workers` processes, a bounded number of chunks
  in flight, appending each chunk's training tokens to the output and its held-out tokens to a
  scratch file that is appended at the end.
Memory is a few chunks of text and tokens plus ~17 bytes per document (the split's keys and
their ranking), never the corpus or the token array. (split_corpus compares whole digests;
here the first 8 bytes, so the splits could differ only if two different documents shared a
64-bit hash prefix right at the boundary.)

Atomic: the `.npy` is written under a `.tmp-` name and renamed when complete, then the sidecar is
written (atomically) last; an overwrite removes the old sidecar first. A killed run therefore
leaves no `.npy` + sidecar pair that `load_token_file` accepts; its temporaries are removed by
the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import chain
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .corpus import document_key, heldout_count, iter_documents
from .data import Datasets, load_datasets, pack_datasets
from .files import atomic_file, remove_stale_temporaries, scratch_file, write_text_atomic
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
        try:
            for doc in iter_documents(path, text_column=text_column):
                if doc.strip():
                    yield doc
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8 or pass other files") from None


def _heldout_mask(paths: Sequence[str | os.PathLike], text_column: str, holdout_fraction: float) -> np.ndarray:
    """Pass 1: bool `[n_docs]`, True for the documents split_corpus (seed 0) holds out."""
    keys = np.fromiter(
        (int.from_bytes(document_key(d)[:8], "big") for d in _documents(paths, text_column)), dtype=np.uint64
    )
    if len(keys) == 0:
        raise ValueError(f"no text in {', '.join(map(str, paths))}: pass non-empty .txt, .jsonl or .parquet files")
    mask = np.zeros(len(keys), dtype=bool)
    # A stable sort ranks equal keys (duplicate documents) by position, as sorted() does.
    mask[np.argsort(keys, kind="stable")[: heldout_count(len(keys), holdout_fraction)]] = True
    return mask


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode(docs: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (their tokens concatenated, int32; each document's token count)."""
    tok = tokenizer or _worker_tokenizer
    parts = [tok.encode(d, bos=True, eos=True) for d in docs]
    return np.array(list(chain.from_iterable(parts)), dtype=np.int32), np.array([len(p) for p in parts])


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(docs: Iterator[str], tokenizer: Tokenizer, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """_encode over chunks of `docs`, in order; with workers > 1 in a process pool holding at most
    2 * workers chunks in flight (Pool.imap would read the whole corpus ahead)."""
    if workers == 1:
        for chunk in _chunks(docs):
            yield _encode(chunk, tokenizer)
        return
    with get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(str(tokenizer.path),)) as pool:
        pending: deque = deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_token_file(
    paths: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out: str | os.PathLike,
    *,
    holdout_fraction: float = 0.02,
    eval_paths: Sequence[str | os.PathLike] | None = None,
    text_column: str = "text",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize the documents of `paths` (.txt, .jsonl, .parquet files or directories) into the
    token file `out` (NAME.npy) and its sidecar; returns the sidecar's content.

    The held-out split is `eval_paths` when given (all of `paths` then trains), else
    `holdout_fraction` of the documents, chosen as gemma2.data.load_datasets chooses them."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"{out}: a token file is named NAME.npy; pick a name ending in .npy")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not overwrite and (out.exists() or sidecar_path(out).exists()):
        raise ValueError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or another name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no such directory: {out.parent}; create it first")
    paths = list(paths)
    if eval_paths is None:
        held_mask = _heldout_mask(paths, text_column, holdout_fraction)
    else:
        n_train = sum(1 for _ in _documents(paths, text_column))
        held_mask = np.arange(n_train + sum(1 for _ in _documents(eval_paths, text_column))) >= n_train
    n_docs = len(held_mask)

    def docs() -> Iterator[str]:
        yield from _documents(paths, text_column)
        if eval_paths is not None:
            yield from _documents(eval_paths, text_column)

    for name in (out.name, out.name + ".heldout"):
        remove_stale_temporaries(out.parent, name)
    counts = {"train": [0, 0], "heldout": [0, 0]}  # documents, tokens
    bar = tqdm(total=n_docs, unit="doc", desc=f"tokenize {out.name}", disable=not progress)
    with atomic_file(out) as tmp, scratch_file(out.with_name(out.name + ".heldout")) as held_tmp:
        with open(tmp, "wb") as f_train, open(held_tmp, "wb") as f_held:
            f_train.write(b"\0" * _HEADER_BYTES)  # the header, written once the length is known
            doc = 0
            for tokens, lengths in _encoded_chunks(docs(), tokenizer, workers):
                held = held_mask[doc : doc + len(lengths)]
                per_token = np.repeat(held, lengths)
                f_train.write(tokens[~per_token].tobytes())
                f_held.write(tokens[per_token].tobytes())
                for split, sel in (("train", ~held), ("heldout", held)):
                    counts[split][0] += int(sel.sum())
                    counts[split][1] += int(lengths[sel].sum())
                doc += len(lengths)
                bar.update(len(lengths))
                bar.set_postfix(tokens=f"{counts['train'][1] + counts['heldout'][1]:,}", refresh=False)
            assert doc == n_docs, "pass 2 read other documents than pass 1"
        bar.close()
        with open(tmp, "r+b") as f:
            f.seek(0, os.SEEK_END)
            with open(held_tmp, "rb") as f_held:
                shutil.copyfileobj(f_held, f, 1 << 24)
            f.seek(0)
            total = counts["train"][1] + counts["heldout"][1]
            np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (total,)})
            assert f.tell() == _HEADER_BYTES, f.tell()
        sidecar_path(out).unlink(missing_ok=True)  # the old pair stops being a token file first
    info = {
        "format": FORMAT,
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size},
        "documents": {"train": counts["train"][0], "heldout": counts["heldout"][0]},
        "tokens": {"train": counts["train"][1], "heldout": counts["heldout"][1]},
        # How the held-out documents were chosen, to be repeated from the same sources.
        "heldout": {"eval_paths": list(map(str, eval_paths))} if eval_paths is not None
        else {"holdout_fraction": holdout_fraction, "seed": 0},
        "sources": list(map(str, paths)),
        "text_column": text_column,
    }  # fmt: skip
    write_text_atomic(sidecar_path(out), json.dumps(info, indent=2) + "\n")
    return info


def load_token_file(path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int) -> Datasets:
    """The Datasets of token file `path`, memory-mapped; ValueError when it is no complete token
    file or was made with another tokenizer."""
    path = Path(path)
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
        raise ValueError(f"{side}: token file format {info.get('format')}, this code reads {FORMAT}; rerun scripts/tokenize_data.py")
    made_with, here = info["tokenizer"]["fingerprint"], tokenizer.fingerprint()
    if made_with != here:
        raise ValueError(
            f"{path} was tokenized with another tokenizer (fingerprint {made_with}, this run's "
            f"{tokenizer.path} is {here}); pass the tokenizer it was made with, or rerun "
            "scripts/tokenize_data.py with this one"
        )
    tokens = np.load(path, mmap_mode="r")
    n_train, n_held = info["tokens"]["train"], info["tokens"]["heldout"]
    if tokens.dtype != np.int32 or tokens.shape != (n_train + n_held,):
        raise ValueError(
            f"{path} holds {tokens.dtype} {tokens.shape}, its sidecar says int32 ({n_train + n_held},): "
            "the pair does not belong together; rerun scripts/tokenize_data.py"
        )
    return pack_datasets(tokens[:n_train], tokens[n_train:], seq_len, where=str(path))


def open_datasets(
    paths: Sequence[str | os.PathLike] | None,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    holdout_fraction: float | None = None,
    eval_paths: Sequence[str | os.PathLike] | None = None,
) -> Datasets:
    """What a script's --data names: one token file (NAME.npy, split inside it), else documents
    for gemma2.data.load_datasets (holdout_fraction None = 0.02)."""
    if paths and any(Path(p).suffix == ".npy" for p in paths):
        if len(paths) > 1 or eval_paths is not None or holdout_fraction is not None:
            raise ValueError(
                "a token file (.npy) is the whole data set, its held-out split included: pass it "
                "alone as --data, without --eval-data or --holdout-fraction (choose those in "
                "scripts/tokenize_data.py)"
            )
        return load_token_file(paths[0], tokenizer, seq_len)
    fraction = 0.02 if holdout_fraction is None else holdout_fraction
    return load_datasets(paths, tokenizer, seq_len, holdout_fraction=fraction, eval_paths=eval_paths)
