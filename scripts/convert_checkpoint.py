#!/usr/bin/env python3
"""Convert between the official PyTorch `.ckpt` layout and the Hugging Face layout.

  official -> HF:  convert_checkpoint.py --input gemma-2-2b.ckpt --config 2b --output gemma-2-2b-hf
  HF -> official:  convert_checkpoint.py --input gemma-2-2b-hf --output gemma-2-2b.ckpt --to-official
  to int8, once:   convert_checkpoint.py --input gemma-2-2b-hf --output gemma-2-2b-int8 --quantize int8

An int8 output holds int8 weights and per-row `weight_scaler`s (gemma2.quantize); --dtype is then
the dtype of the scales and of the remaining tensors (the norms).

A tokenizer.model next to the input is copied next to the output.
"""

import argparse
import shutil
from pathlib import Path

from gemma2 import load_model, save_model
from gemma2.checkpoint import save_official
from gemma2.cli import run_cli
from gemma2.dtypes import dtype_argument, to_dtype
from gemma2.quantize import QUANTIZE_MODES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="a .ckpt file, a directory of .bin shards, or an HF directory")
    parser.add_argument("--output", required=True, help="an HF directory, or a .ckpt path with --to-official")
    parser.add_argument("--config", help="preset (2b, 9b, 27b) or config.json path; needed for official inputs")
    parser.add_argument("--dtype", type=dtype_argument, default="bf16", help="dtype written: bf16 (bfloat16, default) or fp32 (float32)")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: write int8 weights + per-row scales")
    parser.add_argument("--to-official", action="store_true", help="write the official .ckpt instead")
    parser.add_argument("--max-shard-gb", type=float, default=4.0, help="HF shard size (default 4 GB)")
    args = parser.parse_args()

    source, target = Path(args.input), Path(args.output)
    config = args.config
    if config and config.endswith(".json"):
        from gemma2 import Gemma2Config

        config = Gemma2Config.from_json(config)
    model = load_model(source, dtype=to_dtype(args.dtype), config=config, progress=True, quantize=args.quantize)
    if args.to_official:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_official(model, target)
        out_dir = target.parent
    else:
        save_model(model, target, max_shard_bytes=int(args.max_shard_gb * 2**30))
        out_dir = target
    tokenizer = (source if source.is_dir() else source.parent) / "tokenizer.model"
    if tokenizer.exists() and not (out_dir / "tokenizer.model").exists():
        shutil.copy(tokenizer, out_dir / "tokenizer.model")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    run_cli(main)
