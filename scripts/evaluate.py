"""Measure a checkpoint on held-out text: cross-entropy and perplexity, and beside a teacher the KL
divergence from it and top-1 agreement (gemma2/evaluation.py).

    python scripts/evaluate.py --checkpoint runs/demo/distilled/step-000200 --teacher checkpoints/tiny-teacher
    python scripts/evaluate.py --checkpoint checkpoints/gemma-2-2b --data notes.txt --split all --seq-len 1024
    python scripts/evaluate.py --checkpoint checkpoints/gemma-2-2b --quantize int8 --teacher checkpoints/gemma-2-2b ...

The rows are those scripts/distill.py reads from the same data flags (gemma2.data_args): the
default, --split heldout, evaluates exactly the held-out sequences distill.py evaluates during
training (the built-in corpus's split without --data); --split train takes the training rows,
--split all both (with --data FILE: every document in FILE). With --prompts only the completions
count, as in training. The figures go to stdout, and with --json PATH to a new file (replaced only
with --overwrite). --quantize int8 quantises the checkpoint, never the teacher: give the same
checkpoint as --teacher to measure what int8 changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gemma2 import load_model
from gemma2.cli import add_threads_option, device_arg, run_cli, set_threads
from gemma2.compatibility import check_seq_len, check_tokenizer
from gemma2.data_args import add_data_arguments, datasets_from_args, packed_seq_len
from gemma2.dtypes import dtype_argument, dtype_name, to_dtype
from gemma2.evaluation import evaluate
from gemma2.files import write_text_atomic
from gemma2.loading import default_dtype, load_with_tokenizer, stored_config
from gemma2.quantize import QUANTIZE_MODES
from gemma2.student import model_config
from gemma2.tokenizer import Tokenizer

SPLITS = ("heldout", "train", "all")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory (config.json, *.safetensors)")
    p.add_argument("--teacher", help="a model directory of the same vocabulary to compare with (KL, top-1 agreement)")
    p.add_argument("--config", help="for an official .ckpt without config.json: a preset (2b, 9b, 27b) or a config.json")
    p.add_argument("--tokenizer", help="SentencePiece model (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--dtype", type=dtype_argument,
                   help="float32 (fp32) or bfloat16 (bf16), both models (default: float32 on CPU, bfloat16 on CUDA "
                        "or with --quantize)")  # fmt: skip
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: the checkpoint's weights as int8 (not the teacher's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_data_arguments(p)  # --data or --prompts, held-out splits, --seq-len, --prompt-len, --max-new-tokens
    p.add_argument("--split", choices=SPLITS, default="heldout",
                   help="the rows evaluated: the held-out split (default), the training split, or all of them")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    p.add_argument("--max-sequences", type=int, help="evaluate at most this many sequences of each split")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="tokens whose [tokens, vocab] logits are made at once (256 x 256000: 262 MB per tensor)")
    p.add_argument("--json", help="also write the figures here (a new file unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    args = p.parse_args(argv)
    args.given = {name for name, value in vars(args).items() if value != p.get_default(name)}
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before minutes of loading."""
    for name in ("batch_size", "chunk_size", "max_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    unused = sorted({"prompt_len", "max_new_tokens"} & args.given) if args.prompts is None else []
    if unused:
        raise ValueError(f"{', '.join('--' + n.replace('_', '-') for n in unused)} lay out --prompts rows; with "
                         "--data evaluation would ignore them: drop them")  # fmt: skip
    if args.teacher is not None and not Path(args.teacher).exists():
        raise ValueError(f"--teacher {args.teacher}: no such file or directory")
    if args.json:
        out = Path(args.json)
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it, or another --json path")
        if not out.parent.is_dir():
            raise ValueError(f"--json {out}: the directory {out.parent} does not exist")


def load_teacher(path: str, tokenizer: Tokenizer, dtype: torch.dtype, device: str):
    """The teacher, after checking that it speaks the checkpoint's tokenizer (its config.json
    before its weights are read, and its own tokenizer.model, when it has one)."""
    own = Path(path) / "tokenizer.model"
    if own.is_file() and Tokenizer(own).fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"the teacher's {own} is not the checkpoint's tokenizer {tokenizer.path}: compare models "
                         "that share a tokenizer")  # fmt: skip
    config = stored_config(path)
    if config is not None:
        check_tokenizer(tokenizer, config, "the teacher")
    teacher = load_model(path, dtype=dtype, device=device)
    check_tokenizer(tokenizer, teacher.config, "the teacher")
    return teacher


def evaluate_main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    device_arg(args.device)
    check_args(args)
    dtype = to_dtype(args.dtype or default_dtype(args.device, args.quantize))
    config = model_config(args.config, "--config") if args.config else None
    model, tokenizer = load_with_tokenizer(args.checkpoint, tokenizer=args.tokenizer, config=config, dtype=dtype,
                                           device=args.device, quantize=args.quantize)  # fmt: skip
    teacher = None if args.teacher is None else load_teacher(args.teacher, tokenizer, dtype, args.device)
    models = [(m, what) for m, what in ((model, "the checkpoint"), (teacher, "the teacher")) if m is not None]
    for m, what in models if packed_seq_len(args) else []:  # before reading the data; prompt rows: after
        check_seq_len(packed_seq_len(args), m.config, what)
    data = datasets_from_args(args, tokenizer)
    if args.split != "train" and data.heldout is None:
        raise ValueError("these data flags hold nothing out (--holdout-fraction 0, or a token file made without a "
                         "held-out split): pass --split train or --eval-data FILES")  # fmt: skip
    parts = {"heldout": [data.heldout], "train": [data.train], "all": [data.train, data.heldout]}[args.split]
    parts = [rows for rows in parts if rows is not None]
    for rows in parts:
        for m, what in models:
            check_seq_len(rows.seq_len, m.config, what)
    sequences = sum(len(r) if args.max_sequences is None else min(len(r), args.max_sequences) for r in parts)
    width = f"{'up to ' if args.prompts else ''}{parts[0].seq_len}"
    print(f"evaluating {sequences} sequences of {width} tokens ({args.split})", file=sys.stderr)
    result = evaluate(model, *parts, teacher=teacher, batch_size=args.batch_size, max_sequences=args.max_sequences,
                      chunk_size=args.chunk_size, progress=not args.no_progress)  # fmt: skip
    print(f"{result.tokens} targets counted in {sequences} sequences ({args.split})")
    print(f"checkpoint {args.checkpoint}: cross-entropy {result.ce:.4f} nats/token, perplexity {result.ppl:.2f}")
    if teacher is not None:
        print(f"teacher {args.teacher}: cross-entropy {result.teacher_ce:.4f} nats/token, "
              f"perplexity {result.teacher_ppl:.2f}")  # fmt: skip
        print(f"KL(teacher || checkpoint): {result.kl:.4g} nats/token; top-1 agreement: {result.top1_agreement:.1%}")
    if args.json:
        record = {"checkpoint": args.checkpoint, "teacher": args.teacher, "split": args.split, "sequences": sequences,
                  "dtype": dtype_name(dtype), "quantize": args.quantize, **result.as_dict()}  # fmt: skip
        write_text_atomic(args.json, json.dumps(record, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: evaluate_main(args))


if __name__ == "__main__":
    main()
