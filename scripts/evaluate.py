"""Measure a checkpoint on held-out text: cross-entropy and perplexity, and beside a teacher the KL
divergence from it and top-1 agreement (gemma2/evaluation.py).

    python scripts/evaluate.py --checkpoint runs/demo/distilled/step-000200 --teacher checkpoints/tiny-teacher
    python scripts/evaluate.py --checkpoint checkpoints/gemma-2-2b --data notes.txt --split all --seq-len 1024
    python scripts/evaluate.py --checkpoint checkpoints/gemma-2-2b --quantize int8 --teacher checkpoints/gemma-2-2b ...

The rows are those scripts/distill.py reads from the same data flags (gemma2.data_args): the
default, --split heldout, evaluates exactly the held-out sequences distill.py evaluates during
training (the built-in corpus's split without --data); --split train evaluates the training rows
instead. --split all evaluates everything: without held-out flags every document (or prompt) is
packed as one set, nothing held out; with --eval-data / --eval-prompts, or a token file, its
training rows then its held-out rows. Packed rows end where a whole sequence of --seq-len + 1
tokens does (the tail after the last is not evaluated, as in training). With --prompts only the
completions count. The figures go to stdout, and with --json PATH to a new file (replaced only
with --overwrite). --quantize int8 quantises the checkpoint, never the teacher: give the same
checkpoint as --teacher to measure what int8 changes. Every flag, path and config is checked, and
the data read, before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

import torch

from gemma2.cli import add_threads_option, check_json_flag, device_arg, run_cli, set_threads
from gemma2.compatibility import check_own_tokenizer, check_seq_len, check_tokenizer
from gemma2.config import Gemma2Config
from gemma2.data_args import add_data_arguments, check_data_args, datasets_from_args, packed_seq_len
from gemma2.dtypes import dtype_argument, dtype_name, to_dtype
from gemma2.evaluation import evaluate
from gemma2.files import write_text_atomic
from gemma2.loading import check_model_arg, config_flag, default_dtype, find_tokenizer, load_checked, stored_config
from gemma2.quantize import QUANTIZE_MODES
from gemma2.token_files import names_token_file
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
    p.add_argument("--eval-sequences", type=int, help="evaluate at most the first this many sequences of each split")
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
    """The flags alone: what goes together, what would be ignored, the paths."""
    for name in ("batch_size", "chunk_size", "eval_sequences"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    ignored = {"prompt_len", "max_new_tokens"} & args.given if args.prompts is None else set()
    if ignored:
        raise ValueError(f"{', '.join(sorted('--' + n.replace('_', '-') for n in ignored))} lay out --prompts rows; "
                         "with --data evaluation would ignore them: drop them")  # fmt: skip
    if args.split == "train" and (args.eval_data or args.eval_prompts):
        raise ValueError("--split train evaluates the training rows, not --eval-data / --eval-prompts: drop those "
                         "or pass --split heldout or all")  # fmt: skip
    if args.split == "all" and args.holdout_fraction is not None:
        raise ValueError("--split all evaluates every document (prompt) whatever the split: drop --holdout-fraction")
    check_data_args(args)
    if args.teacher is not None:
        check_model_arg(args.teacher, "--teacher")
    check_json_flag(args.json, args.overwrite)


def check_configs(args: argparse.Namespace, tokenizer: Tokenizer, config: Gemma2Config | None) -> None:
    """What the checkpoint's and the teacher's config.json (or --config) say, before any weight is
    read: both speak `tokenizer`, share one vocabulary, and hold a packed row in their context.
    The teacher's own tokenizer.model, when it has one, must be the checkpoint's."""
    configs = {"the checkpoint": config or stored_config(args.checkpoint)}
    if args.teacher is not None:
        check_own_tokenizer(tokenizer, args.teacher, "the teacher")  # compare models that share a tokenizer
        configs["the teacher"] = stored_config(args.teacher)
    known = {what: cfg for what, cfg in configs.items() if cfg is not None}
    for what, cfg in known.items():
        check_tokenizer(tokenizer, cfg, what)
        if packed_seq_len(args):  # prompt rows: once laid out
            check_seq_len(packed_seq_len(args), cfg, what)
    if len({cfg.vocab_size for cfg in known.values()}) > 1:
        raise ValueError(f"the teacher's vocabulary of {known['the teacher'].vocab_size} is not the checkpoint's "
                         f"{known['the checkpoint'].vocab_size}: compare models that share a tokenizer")  # fmt: skip


def evaluate_main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    device_arg(args.device)
    check_args(args)
    dtype = to_dtype(args.dtype or default_dtype(args.device, args.quantize))
    config = config_flag(args.checkpoint, args.config)
    tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
    check_configs(args, tokenizer, config)
    if args.split == "all" and not (args.eval_data or args.eval_prompts or names_token_file(args.data or args.prompts)):
        args.holdout_fraction = 0.0  # every document (prompt) in one set
    data = datasets_from_args(args, tokenizer)  # a bad file, or no held-out split: said before minutes of loading
    if args.split == "heldout" and data.heldout is None:
        flag = "--eval-data" if args.prompts is None else "--eval-prompts"
        raise ValueError("these data flags hold nothing out (--holdout-fraction 0, or a token file made without a "
                         f"held-out split): pass --split train or all, or {flag} FILES")  # fmt: skip
    model = load_checked(args.checkpoint, tokenizer, config=config, dtype=dtype, device=args.device,
                         quantize=args.quantize, check=check_tokenizer)  # fmt: skip
    teacher = None
    if args.teacher is not None:
        teacher = load_checked(args.teacher, tokenizer, dtype=dtype, device=args.device,
                               check=partial(check_tokenizer, what="the teacher"))  # fmt: skip
    parts = [rows for rows in {"heldout": [data.heldout], "train": [data.train], "all": [data.train, data.heldout]}[
        args.split] if rows is not None]  # fmt: skip
    # Again on the loaded configs: prompt rows' width is known only now, and an official .ckpt
    # without config.json was not checked before loading.
    for rows in parts:
        for m, what in ((model, "the checkpoint"), (teacher, "the teacher")):
            if m is not None:
                check_seq_len(rows.seq_len, m.config, what)
    width = f"{'up to ' if args.prompts else ''}{parts[0].seq_len}"
    print(f"evaluating sequences of {width} tokens ({args.split})", file=sys.stderr)
    result = evaluate(model, *parts, teacher=teacher, batch_size=args.batch_size, max_sequences=args.eval_sequences,
                      chunk_size=args.chunk_size, progress=not args.no_progress)  # fmt: skip
    print(f"{result.tokens} targets counted in {result.sequences} sequences ({args.split})")
    print(f"checkpoint {args.checkpoint}: cross-entropy {result.ce:.4f} nats/token, perplexity {result.ppl:.2f}")
    if teacher is not None:
        print(f"teacher {args.teacher}: cross-entropy {result.teacher_ce:.4f} nats/token, "
              f"perplexity {result.teacher_ppl:.2f}")  # fmt: skip
        print(f"KL(teacher || checkpoint): {result.kl:#.4g} nats/token; top-1 agreement: {result.top1_agreement:.1%}")
    if args.json:
        record = {"checkpoint": args.checkpoint, "teacher": args.teacher, "split": args.split,
                  "dtype": dtype_name(dtype), "quantize": args.quantize, **result.as_dict()}  # fmt: skip
        write_text_atomic(args.json, json.dumps(record, indent=1) + "\n", replace=args.overwrite)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: evaluate_main(args))


if __name__ == "__main__":
    main()
