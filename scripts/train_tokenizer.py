"""Train a SentencePiece tokenizer with Gemma's special-token layout.

    python scripts/train_tokenizer.py --output runs/tok/tokenizer.model            # default corpus
    python scripts/train_tokenizer.py --input a.txt --input docs.jsonl --vocab-size 8192 --output tok.model

Without --input it trains on the train split of the built-in corpus (gemma2/corpus.py), so the
held-out documents stay unseen. See gemma2.tokenizer.train_tokenizer for the options it sets.
"""

import argparse
import time
from pathlib import Path

from gemma2.cli import run_cli
from gemma2.corpus import build_corpus, corpus_bytes, corpus_fingerprint, read_documents, split_corpus
from gemma2.tokenizer import Tokenizer, check_vocab_size, train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="a .txt file (one document), a .jsonl file (a 'text' field per line) or a directory "
                        "of them; repeatable. Default: the built-in corpus's train split")
    p.add_argument("--output", required=True, help="where to write the .model file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--holdout-fraction", type=float, default=0.02,
                   help="held-out share of the built-in corpus left out of training (default 0.02)")
    args = p.parse_args()
    # Every flag before reading any input.
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a directory; pass the path of the .model file to write "
                         f"(e.g. {Path(args.output) / 'tokenizer.model'})")  # fmt: skip
    if Path(args.output).exists() and not args.overwrite:
        raise ValueError(f"{args.output} already exists; pass --overwrite to replace it, or another --output")
    check_vocab_size(args.vocab_size, "--vocab-size")
    if args.input and args.holdout_fraction != p.get_default("holdout_fraction"):
        raise ValueError("--holdout-fraction splits the built-in corpus, not --input: drop one of them")

    if args.input:
        docs = [d for path in args.input for d in read_documents(path)]
        print(f"input: {len(docs):,} documents, {corpus_bytes(docs) / 1e6:.2f} MB from {len(args.input)} path(s)")
    else:
        corpus = build_corpus()
        docs, _ = split_corpus(corpus, holdout_fraction=args.holdout_fraction)
        print(f"built-in corpus {corpus_fingerprint(corpus)}: training on {len(docs):,} of {len(corpus):,} "
              f"documents, {corpus_bytes(docs) / 1e6:.2f} MB")
    t0 = time.perf_counter()
    path = train_tokenizer(docs, args.output, args.vocab_size, overwrite=args.overwrite)
    tok = Tokenizer(path)
    n_tokens = sum(len(tok.encode(d, bos=False)) for d in docs)
    print(f"wrote {path} ({tok.vocab_size:,} pieces) in {time.perf_counter() - t0:.1f} s; "
          f"{corpus_bytes(docs) / n_tokens:.2f} bytes per token on the training text")


if __name__ == "__main__":
    run_cli(main)
