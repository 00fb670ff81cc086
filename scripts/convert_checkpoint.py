#!/usr/bin/env python3
"""Convert between the official PyTorch `.ckpt` layout and the Hugging Face layout.

  official -> HF:  convert_checkpoint.py --input gemma-2-2b.ckpt --config 2b --output gemma-2-2b-hf
  HF -> official:  convert_checkpoint.py --input gemma-2-2b-hf --output gemma-2-2b.ckpt --to-official
  to int8, once:   convert_checkpoint.py --input gemma-2-2b-hf --output gemma-2-2b-int8 --quantize int8

An int8 output holds int8 weights and per-row `weight_scaler`s (gemma2.quantize); --dtype is then
the dtype of the scales and of the remaining tensors (the norms). An int8 input stays int8 (its
float weights are gone; convert the original checkpoint for bf16 or fp32 weights), and only this
library reads int8 checkpoints.

A tokenizer.model next to the input is copied next to the output (over one there with
--overwrite). An existing output (a non-empty directory, or a .ckpt file) is replaced only with
--overwrite, and converting a directory into itself only when the dtype stays the same (or with
--overwrite); the output is written beside its place and swapped in at once, so a failure leaves
what was there before.
"""

import argparse
import filecmp
import math
import shutil
import sys
from pathlib import Path

import torch

from gemma2 import load_model, save_model
from gemma2.checkpoint import check_save_directory, save_official, stored_dtype
from gemma2.cli import run_cli
from gemma2.config import model_directory
from gemma2.dtypes import dtype_argument, to_dtype
from gemma2.files import atomic_file
from gemma2.loading import config_flag
from gemma2.quantize import QUANTIZE_MODES


def check_output(source: Path, target: Path, dtype: torch.dtype, args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that would destroy something without --overwrite."""
    if args.to_official:
        if target.is_dir():
            raise ValueError(f"--output {target} is a directory; --to-official writes a .ckpt file path")
        exists = target.exists()
    else:
        if target.exists() and not target.is_dir():
            raise ValueError(f"--output {target} is a file; the Hugging Face layout is a directory")
        exists = target.is_dir() and any(target.iterdir())
        check_save_directory(target)  # before loading anything
    if target.resolve() == source.resolve() and not args.overwrite:
        weights, floats = stored_dtype(source), stored_dtype(source, floating=True)
        if args.quantize and weights != torch.int8:
            raise ValueError(
                f"--output is the input and --quantize {args.quantize} would replace its {weights} weights in "
                "place; pass another --output, or --overwrite"
            )
        if floats != dtype:  # an int8 input stays int8: --dtype is that of its scales and norms
            what = f"{weights} weights" if weights != torch.int8 else f"int8 checkpoint's {floats} scales and norms"
            keep = f"--dtype {str(floats).removeprefix('torch.')}, " if floats in (torch.bfloat16, torch.float32) else ""
            raise ValueError(
                f"--output is the input and would turn its {what} into {dtype} in place; pass "
                f"{keep}another --output, or --overwrite"
            )
    elif exists and not args.overwrite:
        raise ValueError(f"--output {target} already exists and is not empty; pass --overwrite to replace it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a .ckpt file, a directory of .bin shards, or an HF directory")
    parser.add_argument("--output", required=True, help="an HF directory, or a .ckpt path with --to-official")
    parser.add_argument("--config", help="preset (2b, 9b, 27b) or config.json path; needed for official inputs")
    parser.add_argument("--dtype", type=dtype_argument, default="bf16", help="dtype written: bf16 (bfloat16, default) or fp32 (float32)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: write int8 weights + per-row scales")
    parser.add_argument("--to-official", action="store_true", help="write the official .ckpt instead")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="HF shard size (default 4 GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args()

    if not 0 < args.max_shard_gb < math.inf:
        raise ValueError(f"--max-shard-gb must be a positive number of GB, got {args.max_shard_gb}")
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise ValueError(f"--input {source}: no such file or directory")
    config = config_flag(source, args.config)
    check_output(source, target, to_dtype(args.dtype), args)
    model = load_model(source, dtype=to_dtype(args.dtype), config=config, progress=True, quantize=args.quantize)
    if not args.quantize and model.output_weight.dtype == torch.int8:  # an int8 checkpoint loads as int8
        print(f"{source} holds int8 weights: written as int8 with {args.dtype} scales (int8 weights cannot be made "
              "bf16 or fp32 again; convert the original checkpoint for those)", file=sys.stderr)  # fmt: skip
    if args.to_official:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_official(model, target)
        out_dir = target.parent
    else:
        save_model(model, target, max_shard_bytes=int(args.max_shard_gb * 2**30))
        out_dir = target
    tokenizer, copy = model_directory(source) / "tokenizer.model", out_dir / "tokenizer.model"
    if tokenizer.exists() and (not copy.exists() or args.overwrite and not copy.samefile(tokenizer)):
        with atomic_file(copy) as tmp:
            shutil.copyfile(tokenizer, tmp)
    elif tokenizer.exists() and not filecmp.cmp(tokenizer, copy, shallow=False):
        print(f"kept the {copy} that was there, which differs from {tokenizer}; pass --overwrite to replace it",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    run_cli(main)
