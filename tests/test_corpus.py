"""The built-in corpus: deterministic, test-free, plausibly sized, split stably."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma2 import corpus as C


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return C.build_corpus()  # a few seconds: built once for the module


def test_docstrings_in_source_order_and_cleaned():
    src = '''"""Module doc."""
class A:
    """Class doc,
        indented."""
    def f(self):
        """Method doc."""
        def inner():
            """Nested doc."""
async def g():
    """Async doc."""
x = "not a docstring"
'''
    assert C.docstrings(src) == [
        "Module doc.", "Class doc,\nindented.", "Method doc.", "Nested doc.", "Async doc."
    ]
    with pytest.raises(SyntaxError):
        C.docstrings("def broken(:\n")


def test_sources_exclude_tests_and_site_packages():
    files = C.stdlib_sources()
    parts = {p for f in files for p in f.parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    names = {f.name for f in files}
    assert {"os.py", "argparse.py", "inspect.py"} <= names


def test_sizes_are_plausible(docs):
    # Measured on CPython 3.11: 79 help topics (0.47 MB) + docstrings, 7,070 documents, 2.19 MB.
    assert 3_000 < len(docs) < 30_000
    assert 1_000_000 < C.corpus_bytes(docs) < 6_000_000
    assert all(len(d) >= C.MIN_CHARS and d == d.strip() for d in docs)
    assert len(set(docs)) == len(docs)
    topics = C.help_topics()
    assert len(topics) > 50 and topics[0].strip() in docs  # the help texts come first
    assert any(d.startswith("Command-line parsing library") for d in docs)  # argparse's docstring


def test_build_and_split_are_stable_across_processes(docs):
    # A fresh process with a different str hash salt must give the same corpus and split.
    code = (
        "from gemma2.corpus import *; d = build_corpus(); tr, he = split_corpus(d); "
        "print(corpus_fingerprint(d), corpus_fingerprint(he))"
    )
    root = str(Path(C.__file__).parents[1])
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    _, heldout = C.split_corpus(docs)
    assert out.stdout.split() == [C.corpus_fingerprint(docs), C.corpus_fingerprint(heldout)]


def test_split(docs):
    train, heldout = C.split_corpus(docs)
    assert len(train) + len(heldout) == len(docs)
    assert not set(train) & set(heldout)
    assert len(heldout) == round(0.02 * len(docs))
    held = set(heldout)
    assert train == [d for d in docs if d not in held]  # input order kept
    assert C.split_corpus(docs, seed=1)[1] != heldout
    small = [f"document number {i}" for i in range(10)]
    assert C.split_corpus(small, holdout_fraction=0.0) == (small, [])
    assert len(C.split_corpus(small, holdout_fraction=0.01)[1]) == 1  # never an empty held-out set
    with pytest.raises(ValueError, match="holdout_fraction"):
        C.split_corpus(small, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="cannot hold out"):
        C.split_corpus(small[:1], holdout_fraction=0.5)


def test_copies_of_a_document_go_to_the_same_side():
    """A copy ranks with its original: copies of the last document held out are held out too
    (the old split cut between them, training on held-out text)."""
    docs = [f"document number {i}" for i in range(100)]
    last = max(C.split_corpus(docs)[1], key=C.document_key)  # the last one held out
    train, heldout = C.split_corpus(docs + [last, last])
    assert last not in train and heldout.count(last) == 3 and len(heldout) == 4
    with pytest.raises(ValueError, match="holds out all of them"):
        C.split_corpus(["same"] * 5, holdout_fraction=0.2)


def test_fingerprint_sees_order_and_boundaries():
    fp = C.corpus_fingerprint
    assert fp(["ab", "c"]) == fp(["ab", "c"])
    assert len({fp(["ab", "c"]), fp(["a", "bc"]), fp(["c", "ab"]), fp(["abc"])}) == 4


def test_write_and_read_documents(tmp_path, monkeypatch):
    small = [f"Doc {i}.\n\nIt has a blank line, “quotes” and é." for i in range(60)]
    monkeypatch.setattr(C, "build_corpus", lambda: small)
    train, heldout = C.split_corpus(small, holdout_fraction=0.02)
    assert (len(train), len(heldout)) == (59, 1)
    (tmp_path / "corpus").mkdir()
    for name, docs in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        (tmp_path / "corpus" / name).write_text(lines, encoding="utf-8")
    written = [d for name in ("train.jsonl", "heldout.jsonl") for d in C.read_documents(tmp_path / "corpus" / name)]
    assert sorted(written) == sorted(small)  # blank lines inside documents survive JSONL
    assert sorted(C.read_documents(tmp_path / "corpus")) == sorted(small)  # a directory
    (tmp_path / "plain.txt").write_text("one document\n\nin a text file\n")
    assert C.read_documents(tmp_path / "plain.txt") == ["one document\n\nin a text file\n"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match='bad.jsonl:2: .*"text" field'):
        C.read_documents(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        C.read_documents(tmp_path / "missing.txt")
    # Structured or compressed data is not one text document: refused, naming the fix.
    (tmp_path / "train.json").write_text(json.dumps([{"text": "hello"}]))
    (tmp_path / "rows.CSV").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r'train.json: a .json file is not read as text: write one JSON object per line'):
        C.read_documents(tmp_path / "train.json")
    with pytest.raises(ValueError, match=r"rows.CSV: a .CSV file is not read as text: convert it to .jsonl"):
        C.read_documents(tmp_path / "rows.CSV")


def test_suffixes_in_any_case_a_byte_order_mark_and_bad_bytes(tmp_path):
    """x.JSONL is JSON Lines and B.TXT a document, in a directory or given alone; a byte-order mark
    is not text; a file that is not UTF-8 (or a Parquet column of bytes) is named, with the fix."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "B.TXT").write_text("upper-case text")
    (tmp_path / "d" / "x.JSONL").write_text(json.dumps({"text": "a line"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert C.read_documents(tmp_path / "d") == ["upper-case text", "a line", "two"]
    assert C.read_documents(tmp_path / "d" / "x.JSONL") == ["a line", "two"]
    (tmp_path / "bom.txt").write_bytes("\ufeffno mark".encode())
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + json.dumps({"text": "no mark"}) + "\n").encode())
    assert C.read_documents(tmp_path / "bom.txt") == C.read_documents(tmp_path / "bom.jsonl") == ["no mark"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text .*convert it to UTF-8"):
        C.read_documents(tmp_path / "latin1.txt")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": [b"bytes, not text"]}), tmp_path / "bytes.parquet")
    with pytest.raises(ValueError, match=r"bytes.parquet: column 'text' holds bytes values, not text; .*--text-column"):
        C.read_documents(tmp_path / "bytes.parquet")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "bytes.parquet").read_bytes()[:20])  # a truncated copy
    with pytest.raises(ValueError, match=r"cut.parquet: not a readable Parquet file \("):
        C.read_documents(tmp_path / "cut.parquet")
