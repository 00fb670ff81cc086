"""Will a distillation run fit? One rank's memory, traced from the trainer's own code.

    python scripts/plan_memory.py --student 2b --teacher 9b --seq-len 8192 --batch-size 1 --gpus 8 --gpu-memory 80
    python scripts/plan_memory.py --student 9b --teacher-cache-k 32 --seq-len 8192 --gpus 8 --gpu-memory 80 --activation-checkpointing

--student and --teacher are presets, config.json files or checkpoint directories. Traces one step
(forward, chunked loss, backward, clipping, AdamW) on fake tensors under a fake process group of
--gpus ranks and prints a per-GPU table; with --max-new-tokens also the student's on-policy
sampling after it (its own column), and with --seq-kd the teacher's (another); when the run does
not fit, the single changes that would make it fit. Library: gemma2.memory_plan.plan_memory.
"""

import argparse
import sys

from gemma2.cli import run_cli
from gemma2.dtypes import dtype_argument
from gemma2.memory_plan import CUDA_CONTEXT, MARGIN, change_kinds, plan_memory, suggestions
from gemma2.student import model_config, student_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="preset (2b, 9b, 27b, tiny), config.json or checkpoint directory")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", help="a live teacher: preset, config.json or checkpoint directory")
    teacher.add_argument("--teacher-cache-k", type=int, help="distil from a top-k teacher cache with this k instead")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch per GPU")
    p.add_argument("--gpus", type=int, default=1, help="ranks the run shards over (FSDP2 when > 1)")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GB (10^9 bytes)")
    p.add_argument("--dtype", type=dtype_argument, default="bf16", help="compute dtype: bf16 or fp32")
    p.add_argument("--teacher-dtype", type=dtype_argument, default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the loss")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="on-policy (--lmbda > 0): also trace the student sampling this many tokens per row")
    p.add_argument("--prompt-len", type=int, help="with --max-new-tokens: prompt tokens per row (default: seq-len "
                   "minus max-new-tokens)")  # fmt: skip
    p.add_argument("--sample-sharded", action="store_true", help="with --max-new-tokens: as scripts/distill.py's")
    p.add_argument("--seq-kd", action="store_true",
                   help="with --teacher and --max-new-tokens: the teacher samples too (as scripts/distill.py's)")
    args = p.parse_args()

    if args.gpus < 1 or args.gpu_memory <= 0:
        raise ValueError(f"--gpus must be >= 1 and --gpu-memory > 0, got {args.gpus} and {args.gpu_memory}")
    teacher = model_config(args.teacher, "teacher") if args.teacher else None
    # A fresh student speaks the teacher's vocabulary, as scripts/distill.py makes it.
    student = student_config(args.student, teacher.vocab_size if teacher is not None else None)
    run = dict(student=student, teacher=teacher,
               teacher_cache_k=args.teacher_cache_k, seq_len=args.seq_len, batch_size=args.batch_size,
               world=args.gpus, dtype=args.dtype, teacher_dtype=args.teacher_dtype,
               activation_checkpointing=args.activation_checkpointing, chunk_size=args.chunk_size,
               max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
               sample_sharded=args.sample_sharded, seq_kd=args.seq_kd)  # fmt: skip
    device_bytes = args.gpu_memory * 1e9
    plan = plan_memory(**run)
    print(plan.table(device_bytes))
    if CUDA_CONTEXT > (1 - MARGIN) * device_bytes:
        print(f"the CUDA context alone ({CUDA_CONTEXT / 2**30:.0f} GiB, with {MARGIN:.0%} of the card kept free) does "
              f"not fit in {args.gpu_memory} GB: no change to the run makes it fit; check --gpu-memory",
              file=sys.stderr)  # fmt: skip
        return 1
    if not plan.fits(device_bytes):
        found = suggestions(device_bytes, **run)
        tried = ", ".join(name for name, _ in change_kinds(**run))
        print("would fit with: " + ("; ".join(found) if found else f"none of {tried} alone: combine them"),
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
