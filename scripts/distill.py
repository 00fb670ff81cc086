"""Train or distil a Gemma 2 student (one process, or many under torchrun).

    # plain next-token training of a small model on the built-in corpus
    python scripts/distill.py --student tiny --tokenizer runs/tok/tokenizer.model --alpha 0 --out runs/teacher
    # distil from a teacher checkpoint (its tokenizer.model is used unless --tokenizer says otherwise)
    python scripts/distill.py --student tiny --teacher runs/teacher/step-001000 --out runs/student
    # ... or from an offline top-k cache written by scripts/cache_teacher.py
    python scripts/distill.py --student tiny --teacher-cache runs/cache --tokenizer tok.model --out runs/s2
    # on-policy distillation (GKD): half the steps train on completions the student samples
    python scripts/distill.py --student tiny --teacher runs/teacher/step-001000 --lmbda 0.5 --max-new-tokens 64 --out runs/gkd
    # ... from a prompt dataset: one {"messages": [...]} or {"prompt": ..., "completion": ...} per line
    python scripts/distill.py --student tiny --teacher runs/teacher/step-001000 --prompts chats.jsonl --lmbda 0.5 --out runs/gkd2
    # many processes: FSDP2 over every rank (NCCL on GPUs, gloo on CPU)
    torchrun --nproc-per-node 8 scripts/distill.py --student 2b --teacher checkpoints/gemma-2-9b ...

--student is a preset name, a config.json or a checkpoint directory; a fresh student takes the
teacher's vocabulary size (else the tokenizer's). Checkpoints land in OUT/step-XXXXXX (Hugging Face
layout plus trainer state), metrics in OUT/metrics.jsonl. Library: gemma2.trainer.train.

A scheduler ending the job (SIGTERM; SLURM's --signal=USR1@SECONDS warns with SIGUSR1) stops the
training after the step in progress, with a checkpoint saved there and named, exit status 128 + the
signal's number; continue with --resume (gemma2.preemption). Ctrl-C stops at once and names the
newest complete checkpoint.
"""

import argparse
import dataclasses
import math
import signal
import sys
from pathlib import Path

import torch

from gemma2.checkpoint import load_model
from gemma2.cli import add_threads_option, device_arg, run_cli, set_threads
from gemma2.compatibility import check_own_tokenizer
from gemma2.data_args import add_data_arguments, check_data_args, datasets_from_args
from gemma2.distributed import close_distributed, init_distributed, launched_world
from gemma2.dtypes import compute_dtype_argument, dtype_argument, to_dtype
from gemma2.preemption import TrainingStopped, note_warnings
from gemma2.run_dir import check_out_dir, check_resume_settings
from gemma2.sharded_load import load_sharded
from gemma2.teacher import teacher_vocab_size
from gemma2.teacher_cache import TeacherCache
from gemma2.tokenizer import Tokenizer
from gemma2.student import load_student
from gemma2.train_state import latest_checkpoint
from gemma2.trainer import NonFiniteLossError, TrainConfig, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="preset (e.g. tiny, 2b), config.json or checkpoint directory")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", help="teacher checkpoint directory (Hugging Face layout)")
    teacher.add_argument("--teacher-cache", help="directory written by scripts/cache_teacher.py")
    p.add_argument("--teacher-dtype", type=dtype_argument, default="bf16" if torch.cuda.is_available() else "fp32",
                   help="bf16 (bfloat16) or fp32 (float32); default bf16 on CUDA, fp32 on CPU")
    add_data_arguments(p)  # --data or --prompts, held-out splits, --seq-len, --prompt-len, --max-new-tokens
    p.add_argument("--tokenizer", help="SentencePiece .model (default: the teacher's or the student's tokenizer.model)")
    p.add_argument("--out", required=True, help="output directory for checkpoints and metrics.jsonl")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default lr / 10)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=None,
                   help="KD weight: loss = (1 - alpha) CE + alpha KD (default 1 with a teacher, 0 without)")
    p.add_argument("--objective", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5,
                   help="--objective jsd: the teacher's weight B in the mixture B p_T + (1 - B) p_S; the JSD is "
                        "divided by B (1 - B): 0 is the forward KL, 1 the reverse KL")  # fmt: skip
    gkd = p.add_argument_group("on-policy distillation (GKD; TRL GKDTrainer's names; gemma2/on_policy.py)")
    gkd.add_argument("--lmbda", type=float, default=0.0,
                     help="probability that a step trains on completions the student samples (default 0: never)")
    gkd.add_argument("--seq-kd", action="store_true",
                     help="the other steps train on completions the teacher samples instead of on the data")
    gkd.add_argument("--gen-temperature", type=float, default=0.9, help="sampling temperature (0: greedy)")
    gkd.add_argument("--compile-sampling", action="store_true",
                     help="sample completions through torch.compile (CUDA graphs on GPU; on CPU 1.08x a GKD step of "
                          "the README's tiny student, after ~10 s of compiling); one process only")
    gkd.add_argument("--sample-sharded", action="store_true",
                     help="under torchrun: gather each student block per sampled token (the memory of one block, "
                          "slower) instead of the whole student once per micro-batch")
    p.add_argument("--group-by-length", type=int, default=0, metavar="N",
                   help="prompts: sort the rows longest first within each run of N rows of the shuffled order, so "
                   "a batch holds rows of like lengths (0: off; N many global batches)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-sequences", type=int, default=None, help="cap on held-out sequences per evaluation")
    p.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    p.add_argument("--keep-last", type=int, default=1, help="newest checkpoints to keep (0: all)")
    p.add_argument("--seed", type=int, default=0, help="data order, and a fresh student's weights")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dtype", type=compute_dtype_argument, default="auto",
                   help="compute dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 (bfloat16) or fp32 (float32)")
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per chunk of the loss")
    p.add_argument("--device", default=None)
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of one device, for MFU (default: gemma2.throughput's table of common cards)")
    p.add_argument("--stop-grace", type=float, default=30.0, metavar="SECONDS",
                   help="seconds the scheduler allows between SIGTERM and SIGKILL (default 30, Kubernetes' and "
                   "SLURM's); a stop (step, evaluation, save) measured longer is noted once. 0: not checked")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start in a non-empty --out that holds no previous run (nothing in it is deleted)")
    p.add_argument("--no-progress", action="store_true")
    add_threads_option(p)
    args = p.parse_args()
    args.given = {name for name, value in vars(args).items() if value != p.get_default(name)}  # see check_unused
    return args


def check_unused(args: argparse.Namespace) -> None:
    """Refuse flags given that this run would ignore (and a resume then compare): one line naming
    what each goes with. A resume from a checkpoint is left to the resume's own check against what
    the checkpoint recorded (a run started before this check may hold such a flag). --sample-sharded
    in one process is only noted: a command line may be shared by one-process and torchrun runs."""
    samples = args.lmbda > 0 or args.seq_kd
    evaluates = args.prompts is not None and args.teacher is not None  # eval_sample_kd: the student samples
    needs = {"beta": ("--objective jsd", args.objective == "jsd"),
             "gen_temperature": ("--lmbda > 0 or --seq-kd (sampling)", samples)}  # fmt: skip
    for name in ("compile_sampling", "sample_sharded"):
        needs[name] = ("--lmbda > 0, --seq-kd, or --prompts with a --teacher (sampling)", samples or evaluates)
    for name in ("prompt_len", "max_new_tokens"):
        needs[name] = ("--lmbda > 0, --seq-kd or --prompts", samples or args.prompts is not None)
    unused = [(name, what) for name, (what, used) in needs.items() if name in args.given and not used]
    if unused and not (args.resume and latest_checkpoint(args.out) is not None):
        flags = "; ".join(f"--{name.replace('_', '-')} goes with {what}" for name, what in unused)
        raise ValueError(f"{flags}: this run would ignore it, so drop it (or add what it goes with)")
    if args.sample_sharded and launched_world() == 1:
        print("note: --sample-sharded changes nothing in one process (it is for torchrun's ranks)", file=sys.stderr)


def tokenizer_path(args: argparse.Namespace) -> Path:
    if args.tokenizer:
        return Path(args.tokenizer)
    for source in (args.teacher, args.student):
        if source and (Path(source) / "tokenizer.model").is_file():
            return Path(source) / "tokenizer.model"
    raise ValueError("no tokenizer: pass --tokenizer PATH (or a --teacher / --student directory holding tokenizer.model)")


def train_config(args: argparse.Namespace, tok_path: Path) -> TrainConfig:
    """The run's settings from the flags (TrainConfig checks each); what the data decides
    (evaluation without a held-out split, a prompt dataset's layout) is filled in once it is read."""
    taught = args.teacher is not None or args.teacher_cache is not None
    if not 0 <= args.stop_grace < math.inf:
        raise ValueError(f"--stop-grace must be a number of seconds >= 0 (0: not checked), got {args.stop_grace}")
    return TrainConfig(
        out_dir=args.out, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        alpha=args.alpha if args.alpha is not None else float(taught), objective=args.objective,
        temperature=args.temperature, beta=args.beta, chunk_size=args.chunk_size, dtype=args.dtype,
        activation_checkpointing=args.activation_checkpointing, eval_every=args.eval_every,
        eval_sequences=args.eval_sequences, save_every=args.save_every, keep_last=args.keep_last or None,
        seed=args.seed, device=args.device, tokenizer_file=str(tok_path), peak_flops=args.peak_flops,
        lmbda=args.lmbda, seq_kd=args.seq_kd, max_new_tokens=args.max_new_tokens,
        gen_temperature=args.gen_temperature, prompt_len=args.prompt_len, compile_sampling=args.compile_sampling,
        sample_sharded=args.sample_sharded, group_by_length=args.group_by_length, stop_grace=args.stop_grace or None,
    )  # fmt: skip


def interrupted(out: str) -> str:
    """What Ctrl-C leaves: the newest checkpoint is whole (a save in progress is discarded)."""
    ckpt = latest_checkpoint(out) if Path(out).is_dir() else None
    if ckpt is None:
        return "no checkpoint was saved yet"
    return f"the latest complete checkpoint is {ckpt}; continue with the same command and --resume"


def main(args: argparse.Namespace) -> int:
    note_warnings()  # SLURM's SIGUSR1 while the models load: the training loop stops at its first check
    set_threads(args.threads)
    if args.device is not None:
        device_arg(args.device)
    check_unused(args)
    check_data_args(args)  # before the models load
    if args.group_by_length and args.prompts is None:
        raise ValueError("--group-by-length goes with --prompts: packed rows (--data) are all --seq-len long")
    for flag, path in (("--teacher", args.teacher), ("--teacher-cache", args.teacher_cache)):
        if path is not None and not Path(path).exists():  # before the tokenizer, which may be sought there
            raise ValueError(f"{flag} {path}: no such file or directory")
    tok_path = tokenizer_path(args)
    cfg = train_config(args, tok_path)  # every training flag checked, then --out: before the models load
    found = check_out_dir(Path(args.out), resume=args.resume, overwrite=args.overwrite)
    rank, world = init_distributed()
    if found is not None:  # --resume: a changed flag is refused now, the data's and models' part once read
        check_resume_settings(cfg, found, world, decided_later=("prompt_len",) if args.prompts else ())
    tokenizer = Tokenizer(tok_path)
    if args.teacher is not None:
        check_own_tokenizer(tokenizer, args.teacher, "the teacher")
    if Path(args.student).is_dir():  # a checkpoint; a preset or a config.json is built fresh for the tokenizer
        check_own_tokenizer(tokenizer, args.student, "the student")
    teacher = None
    if args.teacher:
        # Under torchrun each rank reads only its shards of the models (gemma2.sharded_load).
        teacher = (load_sharded if world > 1 else load_model)(args.teacher, dtype=to_dtype(args.teacher_dtype))
    elif args.teacher_cache:
        teacher = TeacherCache(args.teacher_cache)
    # A fresh student speaks the teacher's vocabulary (else the tokenizer's).
    vocab = teacher_vocab_size(teacher) if teacher is not None else tokenizer.vocab_size
    student = load_student(args.student, vocab_size=vocab, seed=args.seed, sharded=world > 1)
    student.attention = "auto"  # the fastest measured path for the device (gemma2.model)
    data = datasets_from_args(args, tokenizer)
    if rank == 0:
        n = sum(p.numel() for p in student.parameters())
        held = len(data.heldout) if data.heldout is not None else 0
        width = f"{'up to ' if args.prompts else ''}{data.train.seq_len}"  # prompt rows: cut per batch
        print(f"student {args.student}: {n / 1e6:.2f} M parameters; data: {len(data.train)} training and "
              f"{held} held-out sequences of {width} tokens", file=sys.stderr)  # fmt: skip
        if data.heldout is None and args.eval_every:
            print("note: no held-out split (--holdout-fraction 0, or a token file made without one): no "
                  "evaluation", file=sys.stderr)  # fmt: skip
    cfg = dataclasses.replace(
        cfg, eval_every=args.eval_every if data.heldout is not None else 0,
        prompt_len=data.train.prompt_len if args.prompts else args.prompt_len,  # a prompt dataset's layout
    )  # fmt: skip
    try:
        metrics = train(cfg, student, data, teacher=teacher, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress)  # fmt: skip
    except NonFiniteLossError as e:  # not a usage error: the run diverged (exit 1, message kept short)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingStopped as e:  # a scheduler's SIGTERM / SIGUSR1, at a checkpoint saved for it
        if rank == 0:
            print(str(e), file=sys.stderr)
        close_distributed()
        return 128 + signal.Signals[e.signal_name]
    if rank == 0:
        evals = [m for m in metrics if "eval_ce" in m or "eval_sample_kd" in m]
        if evals:
            print(f"final held-out: {evals[-1]}", file=sys.stderr)
    close_distributed()
    return 0


if __name__ == "__main__":
    arguments = parse_args()
    run_cli(lambda: main(arguments), on_interrupt=lambda: interrupted(arguments.out))
