"""The default demo corpus: English technical prose that ships inside CPython, so that training
and evaluation need no download.

Two sources, both read from the running interpreter's own standard library:

- the interactive help topics in `pydoc_data.topics` (the text of `help("FORMATTING")` etc.,
  about 0.5 MB), one document per topic;
- the docstrings of the standard library's modules, classes and functions, pulled out of the
  `.py` sources with `ast` (nothing is imported or executed), one document per docstring.

Test packages, site-packages and files that fail to parse are skipped; docstrings are cleaned with
`inspect.cleandoc`, very short ones are dropped and exact duplicates are kept once (so the held-out
split cannot contain a copy of a training document). The result is deterministic for a given
Python version; `corpus_fingerprint` records which version a run used.

Documents contain blank lines, so files are written as JSONL (one `{"text": ...}` per line).
"""

from __future__ import annotations

import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

MIN_CHARS = 40  # shorter docstrings ("Return self.") are noise, not prose
# Directory names that hold tests rather than library code (test, tests, idlelib/idle_test ...),
# plus third-party installs, which are neither part of CPython nor the same on every machine.
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def help_topics() -> list[str]:
    """The texts of `help(topic)` for every topic, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split pydoc_data into its own package
        raise RuntimeError(
            "this Python has no pydoc_data module, which the default corpus is built from; "
            "install your distribution's full Python standard library (e.g. the libpython3-stdlib "
            "package) or pass your own text files instead"
        ) from e
    return [topics[name] for name in sorted(topics)]


def stdlib_sources(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files below `root` (default: this interpreter's), sorted, tests
    and site-packages excluded."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            files.append(path)
    # Sort on the relative POSIX path so the order does not depend on where Python lives.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(source: bytes | str) -> list[str]:
    """The cleaned docstrings of a module and of all its classes and functions, in source order.
    Raises SyntaxError / ValueError for source that does not parse."""
    with warnings.catch_warnings():  # old files' invalid escapes warn; they are not our problem
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    out = []
    stack: list[ast.AST] = [tree]
    while stack:  # depth first, source order (ast.walk is breadth first)
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)  # clean=True is inspect.cleandoc
            if doc:
                out.append(doc)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return out


def build_corpus(root: str | Path | None = None) -> list[str]:
    """The default corpus as a list of documents: help topics, then the docstrings of every
    standard library file in sorted path order. Takes a few seconds (it parses ~1,000 files)."""
    docs = help_topics()
    for path in stdlib_sources(root):
        try:
            docs.extend(docstrings(path.read_bytes()))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue  # e.g. lib2to3's deliberately broken fixtures, unreadable files
    return _dedup(d.strip() for d in docs if len(d.strip()) >= MIN_CHARS)


def _dedup(docs: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def document_key(doc: str, seed: int = 0) -> bytes:
    """The sha256 that ranks `doc` (a document, or a prompt) for the held-out split (held_out)."""
    # sha256 rather than hash(): Python salts str hashes per process, which would reshuffle the
    # split on every run.
    return hashlib.sha256(f"{seed}\0{doc}".encode()).digest()


def heldout_count(n_docs: int, holdout_fraction: float) -> int:
    """How many of `n_docs` items held_out holds out: the fraction, rounded, at least one
    when it is positive; ValueError when that leaves nothing to train on."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n_held = 0 if holdout_fraction == 0 else max(1, round(n_docs * holdout_fraction))
    if n_held >= n_docs and n_held > 0:
        raise ValueError(
            f"cannot hold out {n_held} of {n_docs} documents (or examples) and still train; "
            "pass more, or a smaller holdout_fraction (0: hold out none)"
        )
    return n_held


def held_out(keys: Sequence[str], holdout_fraction: float = 0.02, seed: int = 0) -> list[bool]:
    """Which items, named by `keys`, are held out: those whose key's seeded hash ranks in the lowest
    `holdout_fraction` (at least one when the fraction is positive), so the split is the same in
    every process and an item's side barely depends on the others. Items of one key go to the same
    side: those sharing the key of the last one held out are held out too (a few more than the
    fraction), so no held-out text (a document's copy, a prompt's other completion) is trained on."""
    n_held = heldout_count(len(keys), holdout_fraction)
    hashes = [document_key(k, seed) for k in keys]
    last = sorted(hashes)[n_held - 1] if n_held else None
    held = [last is not None and h <= last for h in hashes]
    if keys and all(held):
        raise all_held_out(n_held, len(keys))
    return held


def all_held_out(n_held: int, n: int) -> ValueError:
    """The error when holding out `n_held` of `n` items takes all of them (`held_out`)."""
    return ValueError(f"holding out {n_held} of {n} items holds out all of them (they are copies, or share one "
                      "prompt); pass more distinct ones, or holdout_fraction 0")


def note_overlap(shared: int, held: int, what: str) -> None:
    """Say on stderr when `shared` of `held` held-out items (documents, or prompts) are also in the
    training data, e.g. an eval file inside the training directory: the held-out figures would
    then measure text the model trained on. A note, not an error: a few shared items (a licence
    text) can be harmless."""
    if shared:
        print(f"note: {shared} of the {held} held-out {what} are also in the training data (is an eval file "
              "inside the training paths?); held-out figures then measure text the model trained on",
              file=sys.stderr)  # fmt: skip


def split_corpus(
    docs: list[str], *, holdout_fraction: float = 0.02, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of documents by their text (`held_out`): copies of a
    document go to the same side. Both halves keep the input order."""
    held = held_out(docs, holdout_fraction, seed)
    return [d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h]


def corpus_fingerprint(docs: list[str]) -> str:
    """A short sha256 of the documents (order and boundaries included), to record in a run."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode()
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab"] != ["a", "b"]
        h.update(b)
    return h.hexdigest()[:16]


def corpus_bytes(docs: Iterable[str]) -> int:
    """Total UTF-8 size of the documents."""
    return sum(len(d.encode()) for d in docs)


DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Files that hold structured or compressed data: read as one text document they would train on
# their syntax or bytes, so they are refused with what to do instead.
NOT_TEXT = {
    ".json": 'write one JSON object per line, with a "text" field, as .jsonl',
    ".csv": 'convert it to .jsonl (a "text" field per line) or .parquet',
    ".tsv": 'convert it to .jsonl (a "text" field per line) or .parquet',
    ".gz": "decompress it first", ".bz2": "decompress it first", ".xz": "decompress it first",
    ".zst": "decompress it first", ".zip": "decompress it first",
    ".npy": "a token file (what scripts/tokenize_data.py writes) is tokenized already: pass it alone to the "
            "--data of scripts/distill.py or scripts/cache_teacher.py",
}  # fmt: skip


def iter_documents(path: str | Path, *, text_column: str = "text") -> Iterator[str]:
    """Documents from a file or a directory, one at a time (a file is never read whole unless it
    is one `.txt` document): a `.jsonl` file gives one document per line (its `text` field), a
    `.parquet` file one per row of its `text_column` (needs pyarrow: pip install -e '.[data]'),
    structured or compressed data (`NOT_TEXT`) is refused, any other file is one document, a
    directory gives the files below it with those suffixes in sorted path order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no {', '.join(DOCUMENT_SUFFIXES)} files")
        for f in files:
            yield from iter_documents(f, text_column=text_column)
        return
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    suffix = path.suffix.lower()  # x.JSONL is JSON Lines too
    if suffix in NOT_TEXT:
        raise ValueError(f"{path}: a {path.suffix} file is not read as text: {NOT_TEXT[suffix]}")
    if suffix == ".parquet":
        yield from _parquet_documents(path, text_column)
        return
    try:  # utf-8-sig: a byte-order mark is not part of the text
        if suffix != ".jsonl":
            yield path.read_text(encoding="utf-8-sig")
        else:
            yield from _jsonl_documents(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); convert it to UTF-8 or pass other files") from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    """One document per non-blank line: its JSON object's "text" field."""
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f'{path}:{lineno}: expected a JSON object with a "text" field per line ({e})'
                ) from e
            if not isinstance(text, str):
                raise ValueError(
                    f'{path}:{lineno}: "text" must be a string, got {type(text).__name__} {text!r:.40}'
                )
            yield text


def _parquet_documents(path: Path, column: str, rows_per_batch: int = 1024) -> Iterator[str]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow; pip install -e '.[data]'") from None
    try:
        file = pq.ParquetFile(path)
    except pyarrow.ArrowException as e:  # a damaged or truncated file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    if column not in file.schema_arrow.names:
        raise ValueError(
            f"{path} has no column {column!r} (columns: {', '.join(file.schema_arrow.names)}); "
            "name the text column with --text-column"
        )
    for batch in file.iter_batches(batch_size=rows_per_batch, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is None:  # a null row is no document
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}: column {column!r} holds {type(text).__name__} values, not text; name a "
                                 "text column with --text-column (or cast this one to string)")  # fmt: skip
            yield text


def read_documents(path: str | Path) -> list[str]:
    """All documents of `iter_documents(path)` as a list."""
    return list(iter_documents(path))
