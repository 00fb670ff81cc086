"""Run a teacher once over a dataset and store its top-k next-token log-probs for distillation.

    python scripts/cache_teacher.py --teacher runs/teacher/step-001000 --out runs/cache --k 32 --seq-len 256
    python scripts/distill.py --student tiny --teacher-cache runs/cache --tokenizer runs/teacher/step-001000/tokenizer.model ...

Use the same --data, --tokenizer, --seq-len and --holdout-fraction here as for training (or the
same --prompts, --prompt-len and --max-new-tokens: a prompt dataset's rows, gemma2/prompts.py, for
steps that train on its completions): the cache is keyed by row and checks the tokens'
fingerprint. Both splits are cached (the held-out one gives the student's held-out KD and the
teacher's perplexity).

Shards are written into OUT.partial/ as they are finished and OUT appears (or is replaced) when the
last one is: a run that fails or is killed loses only the shards in progress, and the same command
again computes the rest.

Under torchrun each GPU holds a whole teacher and writes its share of the shards (the same cache
as one process writes, in 1/N of the time; on several machines --out must be on a shared
filesystem):

    torchrun --nproc_per_node 8 scripts/cache_teacher.py --teacher checkpoints/gemma-2-27b --out runs/cache ...

Library: gemma2.teacher_cache.write_teacher_cache.
"""

import argparse
import math
import sys
from pathlib import Path

import torch

from gemma2.checkpoint import load_model
from gemma2.cli import add_threads_option, device_arg, run_cli, set_threads
from gemma2.compatibility import check_own_tokenizer, check_seq_len, check_tokenizer
from gemma2.data_args import add_data_arguments, check_data_args, datasets_from_args, packed_seq_len
from gemma2.distributed import close_distributed, init_distributed, launched_world, runtime
from gemma2.dtypes import dtype_argument, to_dtype
from gemma2.loading import check_model_arg, stored_config
from gemma2.teacher_cache import check_cache_directory, check_cache_settings, write_teacher_cache
from gemma2.tokenizer import Tokenizer

LOGPROB_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # --logprob-dtype


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    p.add_argument("--out", required=True, help="cache directory to write")
    add_data_arguments(p)  # as scripts/distill.py's
    p.add_argument("--tokenizer", help="default: the teacher's tokenizer.model")
    p.add_argument("--k", type=int, default=32, help="teacher log-probs kept per token")
    p.add_argument("--temperature", type=float, default=1.0, help="must equal the training temperature")
    p.add_argument("--logprob-dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of teacher logits")
    p.add_argument("--shard-mb", type=float, default=512, help="MiB per shard file (under torchrun: the unit of work)")
    p.add_argument("--dtype", type=dtype_argument, default="bf16" if torch.cuda.is_available() else "fp32",
                   help="teacher dtype: bf16 (bfloat16) or fp32 (float32)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu; under torchrun each rank's GPU")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    args = p.parse_args()
    set_threads(args.threads)
    if not (math.isfinite(args.shard_mb) and args.shard_mb * 2**20 >= 1):
        raise ValueError(f"--shard-mb must be a number > 0, got {args.shard_mb}")
    if launched_world() > 1 and args.device is not None:
        raise ValueError("--device is torchrun's to choose (each rank's own GPU, or the CPU on gloo); drop it")
    if args.device is not None:
        device_arg(args.device)  # refused before any work if this machine has no such device
    check_data_args(args)  # before the teacher loads, as are the teacher's path, the cache's settings and --out
    check_model_arg(args.teacher, "--teacher")
    config = stored_config(args.teacher)
    check_cache_settings(None if config is None else config.vocab_size, k=args.k, temperature=args.temperature,
                         batch_size=args.batch_size, chunk_size=args.chunk_size,
                         logprob_dtype=LOGPROB_DTYPES[args.logprob_dtype], shard_bytes=int(args.shard_mb * 2**20))  # fmt: skip
    check_cache_directory(Path(args.out), args.overwrite)
    init_distributed()  # under torchrun: one process per GPU, each with a whole teacher
    code = cache(args, runtime(args.device).device)
    close_distributed()  # only after success: a rank that failed exits, and torchrun stops the others
    return code


def cache(args: argparse.Namespace, device: torch.device) -> int:
    tok_path = Path(args.tokenizer) if args.tokenizer else Path(args.teacher) / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    check_own_tokenizer(tokenizer, args.teacher, "the teacher")
    teacher = load_model(args.teacher, dtype=to_dtype(args.dtype), device=device)
    check_tokenizer(tokenizer, teacher.config, "the teacher")
    if packed_seq_len(args) is not None:  # before reading and tokenizing the documents
        check_seq_len(packed_seq_len(args), teacher.config, "the teacher")
    data = datasets_from_args(args, tokenizer)
    check_seq_len(data.train.seq_len, teacher.config, "the teacher")  # a prompt dataset: known once read
    splits = {"train": data.train} | ({"heldout": data.heldout} if data.heldout is not None else {})
    index = write_teacher_cache(
        teacher, splits, args.out, k=args.k, temperature=args.temperature, batch_size=args.batch_size,
        chunk_size=args.chunk_size, logprob_dtype=LOGPROB_DTYPES[args.logprob_dtype],
        shard_bytes=int(args.shard_mb * 2**20), overwrite=args.overwrite,
        progress=runtime().is_main and not args.no_progress,
    )  # fmt: skip
    if not runtime().is_main:
        return 0
    tokens = sum(s["num_sequences"] * (s["columns"][1] - s["columns"][0]) for s in index["splits"].values())
    print(f"wrote {args.out}: {tokens:,} positions, {index['bytes_per_token']} bytes per position "
          f"({tokens * index['bytes_per_token'] / 2**20:.1f} MiB; full {index['vocab_size']}-way bf16 "
          f"distributions would take {2 * index['vocab_size']} bytes per token)", file=sys.stderr)  # fmt: skip
    if "heldout" in index["splits"] and index["splits"]["heldout"]["teacher_ce"] is not None:
        print(f"teacher held-out cross-entropy {index['splits']['heldout']['teacher_ce']:.4f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
