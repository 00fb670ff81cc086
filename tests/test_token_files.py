"""Token files: the streamed, multi-process tokenizer gives exactly the tokens and split of the
in-memory paths (gemma2.data.load_datasets for documents, gemma2.prompts.load_prompt_datasets for
prompts), refuses another tokenizer or the other kind, a killed run leaves nothing a trainer
accepts, and the same call again finishes it byte for byte as an uninterrupted one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma2.corpus import document_key, split_corpus
from gemma2.data import load_datasets
from gemma2.prompts import load_prompt_datasets
from gemma2 import token_writer
from gemma2.token_files import (
    load_prompt_file,
    load_token_file,
    open_datasets,
    open_prompt_datasets,
    sidecar_path,
)
from gemma2.token_writer import write_token_file
from gemma2.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "the", "fox", "jumps", "over", "lazy", "dog", "é", "日本"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer(train_tokenizer(_docs(200, seed=1), path, vocab_size=300))


def _corpus(root: Path, docs: list[str]) -> list[Path]:
    """The documents as three text files, one .jsonl with a blank and an empty document, and
    (if pyarrow is here) a Parquet file; returns the paths in the order to read them."""
    root.mkdir()
    paths = []
    for i, d in enumerate(docs[:3]):
        paths.append(root / f"doc{i}.txt")
        paths[-1].write_text(d, encoding="utf-8")
    paths.append(root / "more.jsonl")
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs[3:60]]
    lines.insert(5, "")  # blank line: skipped
    lines.insert(9, json.dumps({"text": "   "}))  # empty document: dropped, as read_texts drops it
    paths[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _same(a, b) -> None:
    np.testing.assert_array_equal(np.asarray(a.train.tokens), np.asarray(b.train.tokens))
    assert (a.heldout is None) == (b.heldout is None)
    if a.heldout is not None:
        np.testing.assert_array_equal(np.asarray(a.heldout.tokens), np.asarray(b.heldout.tokens))


@pytest.mark.parametrize("workers", [1, 2])
def test_token_file_equals_the_in_memory_path(tmp_path, tok, workers):
    docs = _docs(120) + _docs(5)[:2]  # duplicate documents too: both land on the same side
    docs.append(max(split_corpus(docs, holdout_fraction=0.1)[1], key=document_key))  # the last held out, again
    paths = _corpus(tmp_path / "c", docs[:60])
    (tmp_path / "rest.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[60:]))
    paths.append(tmp_path / "rest.jsonl")
    info = write_token_file(paths, tok, tmp_path / "t.npy", holdout_fraction=0.1, workers=workers, progress=False)
    got = load_token_file(tmp_path / "t.npy", tok, SEQ)
    _same(got, load_datasets(paths, tok, SEQ, holdout_fraction=0.1))
    assert isinstance(got.train.tokens, np.memmap)
    # 123 documents (the blank line and the empty document make none), 12 of them held out and
    # the copy of the last one.
    assert info["documents"] == {"train": 110, "heldout": 13}
    assert info["tokens"] == {"train": len(got.train.tokens), "heldout": len(got.heldout.tokens)}
    assert sidecar_path(tmp_path / "t.npy").is_file()


def test_parquet_gives_the_tokens_of_the_same_documents_as_jsonl(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = _docs(90)
    pq.write_table(pa.table({"id": list(range(90)), "body": docs}), tmp_path / "d.parquet", row_group_size=7)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_token_file([tmp_path / "d.parquet"], tok, tmp_path / "t.npy", text_column="body", workers=2, progress=False)
    _same(load_token_file(tmp_path / "t.npy", tok, SEQ), load_datasets([tmp_path / "d.jsonl"], tok, SEQ))
    with pytest.raises(ValueError, match="no column 'text'"):
        write_token_file([tmp_path / "d.parquet"], tok, tmp_path / "u.npy", progress=False)
    assert not (tmp_path / "u.npy").exists() and not sidecar_path(tmp_path / "u.npy").exists()


def test_eval_paths_are_the_heldout_split(tmp_path, tok):
    docs = _docs(80)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:70]))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[70:]))
    write_token_file([tmp_path / "train.jsonl"], tok, tmp_path / "t.npy", eval_paths=[tmp_path / "held.jsonl"],
                     progress=False)  # fmt: skip
    expected = load_datasets([tmp_path / "train.jsonl"], tok, SEQ, eval_paths=[tmp_path / "held.jsonl"])
    _same(open_datasets([tmp_path / "t.npy"], tok, SEQ), expected)


def test_no_holdout_and_refusals(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)))
    write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", holdout_fraction=0, progress=False)
    data = load_token_file(tmp_path / "t.npy", tok, SEQ)
    assert data.heldout is None
    _same(data, load_datasets([tmp_path / "a.jsonl"], tok, SEQ, holdout_fraction=0))
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", progress=False)
    # A sidecar's name taken by a file alone: that file is named, not the .npy that does not exist.
    sidecar_path(tmp_path / "side.npy").write_text("someone's")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'side.json'))} already exists; pass --overwrite"):
        write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "side.npy", progress=False)
    assert sidecar_path(tmp_path / "side.npy").read_text() == "someone's" and not (tmp_path / "side.npy").exists()
    with pytest.raises(ValueError, match="without --eval-data or --holdout-fraction"):
        open_datasets([tmp_path / "t.npy"], tok, SEQ, holdout_fraction=0.1)
    other = Tokenizer(train_tokenizer(_docs(100, seed=7), tmp_path / "other.model", vocab_size=320))
    with pytest.raises(ValueError, match="tokenized with another tokenizer"):
        load_token_file(tmp_path / "t.npy", other, SEQ)
    # A .npy without its sidecar is not a token file (np.save writes one of the right shape).
    np.save(tmp_path / "bare.npy", np.asarray(data.train.tokens))
    with pytest.raises(ValueError, match="no sidecar"):
        load_token_file(tmp_path / "bare.npy", tok, SEQ)


def test_overwrite_replaces_the_pair(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(70, seed=3)))
    write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", progress=False)
    write_token_file([tmp_path / "b.jsonl"], tok, tmp_path / "t.npy", overwrite=True, progress=False)
    _same(load_token_file(tmp_path / "t.npy", tok, 4), load_datasets([tmp_path / "b.jsonl"], tok, 4))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    # Through a symbolic link: the target is replaced, the link stays, no temporary is left.
    (tmp_path / "disk").mkdir()
    (tmp_path / "linked.npy").symlink_to(tmp_path / "disk/t.npy")
    write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "linked.npy", progress=False)
    assert (tmp_path / "linked.npy").is_symlink() and sorted(os.listdir(tmp_path / "disk")) == ["t.json", "t.npy"]
    _same(load_token_file(tmp_path / "linked.npy", tok, 4), load_datasets([tmp_path / "a.jsonl"], tok, 4))


def test_a_killed_run_leaves_nothing_a_trainer_accepts_and_the_same_command_finishes_it(tmp_path, tok):
    """A scheduler's SIGTERM, then SIGKILL, mid-tokenize: neither the .npy nor its sidecar appears;
    the same command again continues from the last record and writes the file an uninterrupted run
    writes."""
    big = tmp_path / "big.jsonl"
    with big.open("w") as f:
        for d in _docs(20000):
            f.write(json.dumps({"text": d * 4}) + "\n")
    out, progress = tmp_path / "t.npy", tmp_path / "t.npy.partial/progress.json"
    cmd = [sys.executable, str(ROOT / "scripts/tokenize_data.py"), "--tokenizer", str(tok.path), "--data", str(big),
           "--out", str(out), "--workers", "2", "--no-progress"]  # fmt: skip

    def recorded() -> int:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(progress.read_text())["items"]
        return 0

    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE, text=True)
        # Wait until pass 2 has recorded documents beyond the earlier run's, then signal the group.
        start, deadline = recorded(), time.time() + 120
        while time.time() < deadline and proc.poll() is None and recorded() <= start:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: make the corpus bigger"
        os.killpg(proc.pid, sig)
        err = proc.communicate(timeout=60)[1]
        done = recorded()
        assert start < done < 20000 and not out.exists() and not sidecar_path(out).exists()
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and f"terminated (SIGTERM); the same command continues it from {out}.partial" in err
        else:
            assert f"an earlier run tokenized {start:,} of its 20,000 documents" in err
    with pytest.raises(FileNotFoundError):
        open_datasets([out], tok, SEQ)
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"resuming t.npy from {out}.partial: an earlier run tokenized {done:,} of its 20,000 documents" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "t.json", "t.npy"]
    whole = write_token_file([big], tok, tmp_path / "u.npy", progress=False)
    assert out.read_bytes() == (tmp_path / "u.npy").read_bytes()
    assert json.loads(sidecar_path(out).read_text()) == whole


def _stop_after(monkeypatch, calls: int, error: BaseException | None = None) -> None:
    """Make the `calls`-th chunk encoded (of documents and of prompts alike) raise `error`
    (default: Ctrl-C's KeyboardInterrupt)."""
    seen = [0]

    def wrap(encode):
        def stopping(items, tokenizer=None):
            seen[0] += 1
            if seen[0] == calls:
                raise error or KeyboardInterrupt()
            return encode(items, tokenizer)
        return stopping

    monkeypatch.setattr(token_writer, "_encode_documents", wrap(token_writer._encode_documents))
    monkeypatch.setattr(token_writer, "_encode_prompts", wrap(token_writer._encode_prompts))


@pytest.mark.parametrize("prompts", [False, True])
def test_an_interrupted_write_resumes_to_the_same_bytes(tmp_path, tok, monkeypatch, capsys, prompts):
    """Ctrl-C (or a full disk) in pass 2, then in assembly, then between the last two renames: each
    time the same call finishes the file an uninterrupted call writes, byte for byte; bytes a killed
    run wrote after its last record are cut."""
    if prompts:
        source = _jsonl(tmp_path / "a.jsonl", _examples(120))
    else:
        source = _jsonl(tmp_path / "a.jsonl", [{"text": d} for d in _docs(300)])
    kw = dict(holdout_fraction=0.2, prompts=prompts, progress=False)
    whole = write_token_file([source], tok, tmp_path / "whole.npy", **kw)
    monkeypatch.setattr(token_writer, "_CHUNK_CHARS", 200)  # many chunks
    monkeypatch.setattr(token_writer, "_RECORD_SECONDS", 0.0)  # a record after each
    out, work = tmp_path / "t.npy", tmp_path / "t.npy.partial"

    def same() -> None:
        assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()
        assert json.loads(sidecar_path(out).read_text()) == whole
        assert not work.exists()

    with monkeypatch.context() as m:
        _stop_after(m, 4)
        with pytest.raises(KeyboardInterrupt):
            write_token_file([source], tok, out, **kw)
    assert not out.exists() and json.loads((work / "progress.json").read_text())["items"] > 0
    with (work / "train.bin").open("ab") as f:  # written after the last record, by a killed run
        f.write(b"\x07" * 12)
    unit = "examples" if prompts else "documents"
    assert write_token_file([source], tok, out, **kw) == whole
    assert re.search(rf"note: resuming t.npy from .*t.npy.partial: an earlier run tokenized \d+ of its \d+ {unit}",
                     capsys.readouterr().err)  # fmt: skip
    same()

    # Stopped while assembling (the held-out tokens appended, the header not yet written).
    out.unlink(), sidecar_path(out).unlink()
    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "write_array_header_1_0", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            write_token_file([source], tok, out, **kw)
    assert write_token_file([source], tok, out, **kw) == whole
    same()

    # Killed between moving the .npy in place and its sidecar: the next call puts the sidecar there.
    out.unlink(), sidecar_path(out).unlink()
    real_replace = os.replace

    def no_sidecar(src, dst):
        if Path(dst) == sidecar_path(out):
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_sidecar)
        with pytest.raises(KeyboardInterrupt):
            write_token_file([source], tok, out, **kw)
    assert out.exists() and not sidecar_path(out).exists()
    with pytest.raises(ValueError, match="already exists"):  # ... once its sidecar is in place
        write_token_file([source], tok, out, **kw)
    assert "t.npy is complete: a run was killed after moving it there and before its sidecar" in capsys.readouterr().err
    same()
    # The same kill, then a file of the sidecar's name made by hand: kept, the .npy waits for an overwrite.
    out.unlink(), sidecar_path(out).unlink()
    with monkeypatch.context() as m:
        m.setattr(os, "replace", no_sidecar)
        with pytest.raises(KeyboardInterrupt):
            write_token_file([source], tok, out, **kw)
    sidecar_path(out).write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        write_token_file([source], tok, out, **kw)
    assert sidecar_path(out).read_text() == "mine" and not work.exists()
    write_token_file([source], tok, out, overwrite=True, **kw)
    same()
    # A removal of the partial directory killed midway leaves a temporary the next call clears.
    (tmp_path / ".tmp-new-t.npy.partial-999999999-0").mkdir()
    (tmp_path / ".tmp-new-t.npy.partial-999999999-0/train.bin").write_bytes(b"\0" * 64)
    write_token_file([source], tok, out, overwrite=True, **kw)
    same()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "t.json", "t.npy", "whole.json", "whole.npy"]


def test_a_full_disk_names_the_partial_directory_and_the_same_command_continues(tmp_path, tok, monkeypatch, capsys):
    source = _jsonl(tmp_path / "a.jsonl", [{"text": d} for d in _docs(300)])
    whole = write_token_file([source], tok, tmp_path / "whole.npy", progress=False)
    monkeypatch.setattr(token_writer, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(token_writer, "_RECORD_SECONDS", 0.0)
    out = tmp_path / "t.npy"
    cmd = ["tokenize_data.py", "--tokenizer", str(tok.path), "--data", str(source), "--out", str(out), "--no-progress"]
    monkeypatch.setattr(sys, "argv", cmd)
    with monkeypatch.context() as m:
        _stop_after(m, 5, OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "t.npy.partial/train.bin")))
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "scripts/tokenize_data.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: no space left on device") and err.endswith(
        f"Free some space and run the command again; the same command continues it from {out}.partial\n")
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts/tokenize_data.py"), run_name="__main__")
    assert exit_info.value.code == 0 and "note: resuming t.npy" in capsys.readouterr().err
    assert out.read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert json.loads(sidecar_path(out).read_text()) == {**whole, "sources": [str(source)]}


def test_a_partial_write_of_other_data_or_settings_is_refused(tmp_path, tok, monkeypatch):
    docs = _docs(300)
    source = _jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr(token_writer, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(token_writer, "_RECORD_SECONDS", 0.0)
    out, work = tmp_path / "t.npy", tmp_path / "t.npy.partial"
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            write_token_file([source], tok, out, progress=False)
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    other = Tokenizer(train_tokenizer(_docs(100, seed=7), tmp_path / "other.model", vocab_size=320))
    _jsonl(tmp_path / "b.jsonl", [{"text": d} for d in docs[:-1]])
    for call, what in ((lambda: write_token_file([source], tok, out, holdout_fraction=0.1, progress=False),
                        "the items or their held-out split"),
                       (lambda: write_token_file([tmp_path / "b.jsonl"], tok, out, progress=False),
                        "the items or their held-out split"),
                       (lambda: write_token_file([source], other, out, progress=False), "the tokenizer")):  # fmt: skip
        with pytest.raises(ValueError, match=f"holds part of a token file that differs from this run's in {what}.*"
                                             f"remove {re.escape(str(work))} to start over"):  # fmt: skip
            call()
    (work / "notes.txt").write_text("mine")
    (work / ".tmp-mine").write_text("mine too")  # not a name gemma2.files makes: the user's, kept
    with pytest.raises(ValueError, match=r"holds files that are not a token file's \(.tmp-mine, notes.txt\)"):
        write_token_file([source], tok, out, progress=False)
    assert (work / ".tmp-mine").read_text() == "mine too"
    (work / "notes.txt").unlink(), (work / ".tmp-mine").unlink()
    (work / ".lock").write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live writer
    with pytest.raises(ValueError, match="is in use by process"):
        write_token_file([source], tok, out, progress=False)
    (work / ".lock").unlink()
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before  # refused without a change
    write_token_file([source], tok, out, progress=False)
    _same(load_token_file(out, tok, SEQ), load_datasets([source], tok, SEQ))


def test_cli_errors_are_one_line(tmp_path, tok):
    r = subprocess.run([sys.executable, str(ROOT / "scripts/tokenize_data.py"), "--tokenizer", str(tok.path),
                        "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.npy")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "t.npy").exists()


def test_distill_and_cache_teacher_scripts_read_a_token_file(tmp_path, tok):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(120)))
    write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", holdout_fraction=0.1, progress=False)
    common = ["--tokenizer", str(tok.path), "--data", str(tmp_path / "t.npy"), "--seq-len", "16"]
    distill = [sys.executable, str(ROOT / "scripts/distill.py"), "--student", "tiny", *common, "--batch-size", "2",
               "--steps", "2", "--eval-every", "2", "--no-progress", "--alpha", "0"]  # fmt: skip
    subprocess.run([*distill, "--out", str(tmp_path / "run")], check=True, capture_output=True)
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[1])
    assert record["step"] == 1 and record["tokens_per_s"] > 0 and "mfu" in record
    cache = [sys.executable, str(ROOT / "scripts/cache_teacher.py"), "--teacher", str(tmp_path / "run/step-000002"),
             "--out", str(tmp_path / "cache"), *common, "--k", "4"]  # fmt: skip
    subprocess.run(cache, check=True, capture_output=True)
    assert json.loads((tmp_path / "cache/cache.json").read_text())["splits"]["train"]["seq_len"] == 16
    r = subprocess.run([*distill, "--out", str(tmp_path / "x"), "--holdout-fraction", "0.1"], capture_output=True, text=True)
    assert r.returncode == 2 and "without --eval-data or --holdout-fraction" in r.stderr


# ------------------------------------------------------------------------------------------------
# Token files of prompts (gemma2.prompts)


def _examples(n: int, seed: int = 0) -> list[dict]:
    """Plain and chat examples, some without a completion, of 1-30 words each."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "the", "fox", "jumps", "é", "日本"]
    say = lambda: " ".join(rng.choice(words, size=int(rng.integers(1, 30))))
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": f"{say()} {i}", **({"completion": say()} if i % 2 else {})})
        else:
            turns = [{"role": "user", "content": f"{say()} {i}"}, {"role": "assistant", "content": say()}]
            out.append({"messages": turns if i % 5 else turns[:1]})
    return out


def _jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return path


def _same_rows(a, b) -> None:
    """Two Datasets of PromptRows give the same batches, layout and fingerprints."""
    for x, y in ((a.train, b.train), (a.heldout, b.heldout)):
        assert (x is None) == (y is None)
        if x is None:
            continue
        assert (len(x), x.prompt_len, x.seq_len, x.dropped, x.stop_ids) == (len(y), y.prompt_len, y.seq_len, y.dropped,
                                                                            y.stop_ids)  # fmt: skip
        u, v = x.batch(range(len(x))), y.batch(range(len(y)))
        assert u.start == v.start and all(torch.equal(s, t) for s, t in zip(u[:4], v[:4]))
        assert x.fingerprint() == y.fingerprint()


@pytest.mark.parametrize("workers", [1, 2])
def test_prompt_file_equals_the_in_memory_path(tmp_path, tok, workers, capsys):
    examples = _examples(90)
    paths = [_jsonl(tmp_path / "a.jsonl", examples[:50]), _jsonl(tmp_path / "b.jsonl", [*examples[50:], examples[3]])]
    with paths[0].open("a", encoding="utf-8") as f:  # a blank line, and a repeat within the file
        f.write("\n" + json.dumps(examples[7], ensure_ascii=False) + "\n")
    info = write_token_file(paths, tok, tmp_path / "p.npy", holdout_fraction=0.2, prompts=True, workers=workers,
                            progress=False)  # fmt: skip
    # 90 distinct examples (two repeated lines kept once), 18 of them held out.
    assert info["kind"] == "prompts" and info["examples"] == {"train": 72, "heldout": 18}
    for prompt_len in (None, 65):  # the longest prompt, and one that drops some examples
        got = load_prompt_file(tmp_path / "p.npy", tok, 5, prompt_len)
        expected = load_prompt_datasets(paths, tok, 5, prompt_len=prompt_len, holdout_fraction=0.2)
        _same_rows(got, expected)
        assert isinstance(got.train.tokens, np.memmap)
    assert got.train.dropped > 0 and got.heldout.dropped >= 0
    assert "dropped" in capsys.readouterr().err


def test_every_completion_of_a_prompt_is_on_one_side(tmp_path, tok):
    """Each prompt answered three times: the held-out prompts are unseen in training (a split by
    line put a prompt's completions on both sides), in memory and in the token file alike."""
    examples = _examples(60)
    again = [{**e, "completion": f"another {k}"} if "prompt" in e else
             {"messages": [e["messages"][0], {"role": "assistant", "content": f"another {k}"}]}
             for k in range(2) for e in examples]  # fmt: skip
    path = _jsonl(tmp_path / "a.jsonl", examples + again)
    data = load_prompt_datasets([path], tok, 5, holdout_fraction=0.2)

    def prompts(rows) -> set[tuple[int, ...]]:
        batch = rows.batch(range(len(rows)))
        P = rows.prompt_len - batch.start  # the batch's prompt columns
        return {tuple(row[valid].tolist()) for row, valid in zip(batch.inputs[:, :P], batch.valid[:, :P])}

    held = prompts(data.heldout)
    assert held and held.isdisjoint(prompts(data.train)) and len(data.heldout) == 3 * len(held)
    write_token_file([path], tok, tmp_path / "p.npy", holdout_fraction=0.2, prompts=True, progress=False)
    _same_rows(load_prompt_file(tmp_path / "p.npy", tok, 5, None), data)


def test_held_out_files_that_repeat_training_items_are_noted(tmp_path, tok, capsys):
    """An eval file whose items are also in the training files (an eval file inside the data
    directory): a note with the count, from the in-memory path and the token file alike."""
    docs, examples = _docs(40), _examples(30)
    _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    _jsonl(tmp_path / "e.jsonl", [{"text": d} for d in docs[:3] + docs[:1] + _docs(5, seed=4)])  # one twice
    _jsonl(tmp_path / "p.jsonl", examples)
    _jsonl(tmp_path / "q.jsonl", examples[:4] + _examples(6, seed=5))  # 4 prompts answered again, as they were
    runs = [lambda: load_datasets([tmp_path / "d.jsonl"], tok, SEQ, eval_paths=[tmp_path / "e.jsonl"]),
            lambda: write_token_file([tmp_path / "d.jsonl"], tok, tmp_path / "d.npy", eval_paths=[tmp_path / "e.jsonl"],
                                     progress=False),
            lambda: load_prompt_datasets([tmp_path / "p.jsonl"], tok, 4, eval_paths=[tmp_path / "q.jsonl"]),
            lambda: write_token_file([tmp_path / "p.jsonl"], tok, tmp_path / "p.npy", eval_paths=[tmp_path / "q.jsonl"],
                                     prompts=True, progress=False)]  # fmt: skip
    for run, note in zip(runs, ["4 of the 9 held-out documents"] * 2 + ["4 of the 10 held-out prompts"] * 2):
        run()
        assert f"note: {note} are also in the training data" in capsys.readouterr().err
    _jsonl(tmp_path / "f.jsonl", [{"text": d} for d in _docs(5, seed=4)])  # nothing repeated: no note
    write_token_file([tmp_path / "d.jsonl"], tok, tmp_path / "x.npy", eval_paths=[tmp_path / "f.jsonl"], progress=False)
    assert "also in the training data" not in capsys.readouterr().err


def test_prompt_file_with_held_out_files_and_refusals(tmp_path, tok):
    train, held = _jsonl(tmp_path / "t.jsonl", _examples(40)), _jsonl(tmp_path / "h.jsonl", _examples(8, seed=1))
    write_token_file([train], tok, tmp_path / "p.npy", eval_paths=[held], prompts=True, progress=False)
    expected = load_prompt_datasets([train], tok, 4, eval_paths=[held])
    _same_rows(open_prompt_datasets([tmp_path / "p.npy"], tok, 4), expected)
    write_token_file([train], tok, tmp_path / "none.npy", holdout_fraction=0, prompts=True, progress=False)
    assert load_prompt_file(tmp_path / "none.npy", tok, 4).heldout is None
    # Each kind of token file is refused where the other is expected, in one line naming the flag.
    with pytest.raises(ValueError, match=r"a token file of prompts \(scripts/tokenize_data.py --prompts\): pass it as"):
        open_datasets([tmp_path / "p.npy"], tok, SEQ)
    _jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in _docs(30)])
    write_token_file([tmp_path / "docs.jsonl"], tok, tmp_path / "d.npy", progress=False)
    with pytest.raises(ValueError, match="is a token file of documents .*: pass it as --data"):
        open_prompt_datasets([tmp_path / "d.npy"], tok, 4)
    with pytest.raises(ValueError, match="alone as --prompts, without --eval-prompts or --holdout-fraction"):
        open_prompt_datasets([tmp_path / "p.npy"], tok, 4, holdout_fraction=0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_example_is_named_and_nothing_is_written(tmp_path, tok, workers):
    good = [json.dumps(e) for e in _examples(30)]
    # A line that is not JSON, and a conversation the chat format refuses (two model turns in a row,
    # which the prompt's key does not see), stop pass 1: no partial directory is left to resume.
    for bad, error in (("{oops", r"b.jsonl:3: not JSON"), (json.dumps({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": "b"}]}), r"b.jsonl:3: ")):  # fmt: skip
        (tmp_path / "b.jsonl").write_text("\n".join([*good[:2], bad, *good[2:]]) + "\n")
        with pytest.raises(ValueError, match=error):
            write_token_file([tmp_path / "b.jsonl"], tok, tmp_path / "p.npy", prompts=True, workers=workers,
                             progress=False)  # fmt: skip
        with pytest.raises(ValueError, match=error):  # the in-memory path says the same
            load_prompt_datasets([tmp_path / "b.jsonl"], tok, 4)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.jsonl"]


def test_a_writer_whose_lock_was_taken_over_stops_at_its_next_record(tmp_path, tok, monkeypatch):
    """Its lock taken over from another machine while it tokenized (gemma2.locks): its next record
    of progress stops it, and nothing is published."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)))
    real = token_writer._Parts.append

    def taken_over(self, *args):
        real(self, *args)
        (self.work / ".lock").write_text("4242 node-b\n")

    monkeypatch.setattr(token_writer._Parts, "append", taken_over)
    with pytest.raises(ValueError, match="no longer this process's to write: .* taken over by process 4242 on node-b"):
        write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", progress=False)
    assert not (tmp_path / "t.npy").exists() and not (tmp_path / "t.json").exists()
    assert (tmp_path / "t.npy.partial" / ".lock").read_text() == "4242 node-b\n"


def test_a_writer_interrupted_after_its_lock_was_taken_over_leaves_the_partial_directory(tmp_path, tok, monkeypatch):
    """Before any progress was recorded a failed write removes its partial directory; not once its
    lock is another process's: the directory is that process's work now."""
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)))

    def taken_over_then_interrupted(*args, **kwargs):
        (tmp_path / "t.npy.partial" / ".lock").write_text("4242 node-b\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(token_writer, "_pass_one", taken_over_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", progress=False)
    assert os.listdir(tmp_path / "t.npy.partial") == [".lock"]
    assert (tmp_path / "t.npy.partial" / ".lock").read_text() == "4242 node-b\n"


def test_a_write_failing_before_any_progress_leaves_nothing_and_stops_its_lock(tmp_path, tok, monkeypatch):
    from gemma2 import locks

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(50)))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(token_writer, "_pass_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_token_file([tmp_path / "a.jsonl"], tok, tmp_path / "t.npy", progress=False)
    assert os.listdir(tmp_path) == ["a.jsonl"]
    assert not [lock for lock in locks._heartbeats if lock.parent == tmp_path / "t.npy.partial"]


def test_abandoning_the_pool_kills_its_workers_and_frees_its_reader():
    """`_abandon` (the writer's exception path) reaches into CPython's ProcessPoolExecutor: the
    attributes it uses must exist here, or it would silently do nothing."""
    import time as _time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(2, mp_context=get_context("spawn"))
    futures = [pool.submit(_time.sleep, 30) for _ in range(2)]
    while len(pool._processes) < 2:
        _time.sleep(0.05)
    workers = list(pool._processes.values())
    begun = _time.monotonic()
    token_writer._abandon(pool)
    pool.shutdown(cancel_futures=True)
    assert _time.monotonic() - begun < 20 and all(p.exitcode is not None and p.exitcode < 0 for p in workers)
    assert all(f.done() for f in futures)
