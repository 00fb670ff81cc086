"""The data flags that scripts/distill.py and scripts/cache_teacher.py share, and what they name:
packed text (--data: documents or a token file, gemma2.token_files.open_datasets) or a prompt
dataset (--prompts: `.jsonl` files or a token file of prompts, gemma2.token_files.
open_prompt_datasets), each with its held-out split. A teacher cache is keyed by
these rows, so both scripts must read the same flags the same way."""

from __future__ import annotations

import argparse

from .data import Datasets
from .token_files import open_datasets, open_prompt_datasets
from .tokenizer import Tokenizer

DEFAULT_SEQ_LEN = 256


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data | --prompts, --eval-data, --eval-prompts, --holdout-fraction, --seq-len,
    --prompt-len and --max-new-tokens."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", nargs="+", metavar="PATH",
                        help=".txt (one document each), .jsonl ('text' per line), directories, or one token file "
                             "NAME.npy from scripts/tokenize_data.py (memory-mapped); default: built-in corpus")
    source.add_argument("--prompts", nargs="+", metavar="PATH",
                        help='.jsonl prompt datasets (gemma2/prompts.py): one {"messages": [...]} (Gemma chat format) '
                             'or {"prompt": ..., "completion": ...} per line, or one token file NAME.npy from '
                             "scripts/tokenize_data.py --prompts; rows are --prompt-len + --max-new-tokens tokens, "
                             "the loss on the completion only")  # fmt: skip
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out documents (default: split from --data); those also in --data are noted")
    p.add_argument("--eval-prompts", nargs="+", metavar="PATH",
                   help="held-out prompts (default: split from --prompts); those also in --prompts are noted")
    p.add_argument("--holdout-fraction", type=float, default=None,
                   help="documents or examples held out by hash (default 0.02; a token file carries its own split)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training row (default {DEFAULT_SEQ_LEN}; not with --prompts)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens sampled per on-policy completion; with --prompts, the completions' width")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="each training row's first tokens kept as the prompt (default: seq-len - max-new-tokens; "
                        "with --prompts: the longest prompt, longer ones dropped)")  # fmt: skip


def packed_seq_len(args: argparse.Namespace) -> int | None:
    """--seq-len with --data (default 256), to check before reading anything; None with --prompts,
    whose rows are as wide as their layout makes them."""
    if args.prompts is not None:
        return None
    return DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len


def check_heldout(eval_paths: object, holdout_fraction: float | None) -> None:
    """Refuse --holdout-fraction beside held-out files, which it would not split."""
    if eval_paths is not None and holdout_fraction is not None:
        raise ValueError("--holdout-fraction splits the training files, but --eval-data / --eval-prompts name the "
                         "held-out set instead: pass one or the other")  # fmt: skip


def check_data_args(args: argparse.Namespace) -> None:
    """ValueError for flags of `add_data_arguments` that do not go together (before any reading)."""
    check_heldout(args.eval_data if args.prompts is None else args.eval_prompts, args.holdout_fraction)
    if args.prompts is None and args.eval_prompts is not None:
        raise ValueError("--eval-prompts goes with --prompts; held-out documents for --data are --eval-data")
    if args.prompts is not None and (args.seq_len is not None or args.eval_data is not None):
        given = " and ".join(flag for flag, value in (("--seq-len", args.seq_len), ("--eval-data", args.eval_data))
                             if value is not None)  # fmt: skip
        raise ValueError("with --prompts, rows are --prompt-len + --max-new-tokens tokens and held-out prompts are "
                         f"--eval-prompts: drop {given}")  # fmt: skip


def datasets_from_args(args: argparse.Namespace, tokenizer: Tokenizer) -> Datasets:
    """The Datasets the flags of `add_data_arguments` name (`check_data_args` first)."""
    check_data_args(args)
    if args.prompts is None:
        return open_datasets(args.data, tokenizer, packed_seq_len(args), holdout_fraction=args.holdout_fraction,
                             eval_paths=args.eval_data)  # fmt: skip
    return open_prompt_datasets(args.prompts, tokenizer, args.max_new_tokens, prompt_len=args.prompt_len,
                                holdout_fraction=args.holdout_fraction, eval_paths=args.eval_prompts)  # fmt: skip
