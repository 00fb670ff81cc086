#!/usr/bin/env python3
"""Throughput and peak memory of scripts/tokenize_data.py's streaming writer.

Writes a .jsonl corpus of --mb megabytes (the built-in corpus's documents, repeated with a
numbered suffix so each is distinct), tokenizes it with gemma2.token_files.write_token_file, and
reports tokens/s and the peak resident memory of the main process and of the largest worker
(an upper bound: a child's ru_maxrss starts from its parent's size when it was started).
Run it at two sizes to see that memory does not grow with the corpus. Linux only (ru_maxrss in KiB).
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from gemma2.corpus import build_corpus
from gemma2.demo import TEACHER_DIR
from gemma2.token_files import write_token_file
from gemma2.tokenizer import Tokenizer


def write_corpus(path: Path, megabytes: int) -> int:
    docs, written, n = build_corpus(), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < megabytes * 2**20:
            line = json.dumps({"text": f"{docs[n % len(docs)]} ({n})"}, ensure_ascii=False) + "\n"
            written += f.write(line)
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer", default=str(TEACHER_DIR / "tokenizer.model"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        n_docs = write_corpus(corpus, args.mb)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        info = write_token_file([corpus], Tokenizer(args.tokenizer), Path(tmp) / "t.npy", workers=args.workers,
                                progress=False)  # fmt: skip
        dt = time.perf_counter() - t0
    tokens = info["tokens"]["train"] + info["tokens"]["heldout"]
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{args.mb} MB, {n_docs:,} documents, {tokens:,} tokens, {args.workers} workers: {dt:.1f} s, "
          f"{tokens / dt:,.0f} tokens/s; peak RSS main {main_peak:.0f} MB (before tokenizing {base / 1024:.0f} MB), "
          f"largest worker at most {worker_peak:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
