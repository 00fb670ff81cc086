#!/usr/bin/env python3
"""Throughput and peak memory of scripts/tokenize_data.py's streaming writer.

Writes a .jsonl corpus of --mb megabytes (the built-in corpus's documents, repeated with a
numbered suffix so each is distinct), tokenizes it with gemma2.token_writer.write_token_file, and
reports tokens/s and the peak resident memory of the main process and of the largest worker
(an upper bound: a child's ru_maxrss starts from its parent's size when it was started).
Run it at two sizes to see that memory does not grow with the corpus. Linux only (ru_maxrss in KiB).

--prompts: the corpus is a prompt dataset instead ({"prompt": a document's first line, "completion":
the next 400 characters}), and two fresh processes then load it as each training rank would: from
the .jsonl (gemma2.prompts.load_prompt_datasets) and from the token file (load_prompt_file), each
with the rows' fingerprint that a run records; their seconds and peak RSS are reported.
"""

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

from gemma2.cli import run_cli
from gemma2.corpus import build_corpus
from gemma2.demo import TEACHER_DIR
from gemma2.prompts import load_prompt_datasets
from gemma2.token_files import load_prompt_file
from gemma2.token_writer import write_token_file
from gemma2.tokenizer import Tokenizer


def write_corpus(path: Path, megabytes: int, prompts: bool) -> int:
    docs, written, n = build_corpus(), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < megabytes * 2**20:
            doc = f"{docs[n % len(docs)]} ({n})"
            if prompts:
                head, _, rest = doc.partition("\n")
                item = {"prompt": f"{head} ({n})", "completion": rest.strip()[:400]}
            else:
                item = {"text": doc}
            written += f.write(json.dumps(item, ensure_ascii=False) + "\n")
            n += 1
    return n


def _load(path: str, tokenizer: str) -> tuple[float, float, int]:
    """In a fresh process: load the prompts as a rank does; (seconds, peak RSS growth MB, training rows)."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if path.endswith(".npy"):
        data = load_prompt_file(path, Tokenizer(tokenizer), 128)
    else:
        data = load_prompt_datasets([path], Tokenizer(tokenizer), 128)
    data.train.fingerprint()
    return time.perf_counter() - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, len(data.train)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default=str(TEACHER_DIR / "tokenizer.model"))
    p.add_argument("--prompts", action="store_true", help="a prompt dataset, then its loading by a rank")
    args = p.parse_args()
    # Checked before a corpus of --mb is written.
    for name in ("mb", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    tokenizer = Tokenizer(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, out = Path(tmp) / "corpus.jsonl", Path(tmp) / "t.npy"
        n_docs = write_corpus(corpus, args.mb, args.prompts)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        info = write_token_file([corpus], tokenizer, out, prompts=args.prompts,
                                workers=args.workers, progress=False)  # fmt: skip
        dt = time.perf_counter() - t0
        tokens = info["tokens"]["train"] + info["tokens"]["heldout"]
        main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        what = "examples" if args.prompts else "documents"
        print(f"{args.mb} MB, {n_docs:,} {what}, {tokens:,} tokens, {args.workers} workers: {dt:.1f} s, "
              f"{tokens / dt:,.0f} tokens/s; peak RSS main {main_peak:.0f} MB (before tokenizing {base / 1024:.0f} "
              f"MB), largest worker at most {worker_peak:.0f} MB")  # fmt: skip
        if args.prompts:
            with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
                for path in (corpus, out):
                    seconds, peak, rows = pool.apply(_load, (str(path), args.tokenizer))
                    print(f"a rank loads {path.name} ({rows:,} training rows, with the fingerprint): {seconds:.2f} s, "
                          f"peak RSS growth {peak:.0f} MB", flush=True)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)  # a user error is one line (gemma2.cli)
