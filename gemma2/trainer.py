"""Training and distillation of Gemma 2 students: one loop, from one CPU to many GPUs.

Per counted token the objective is

    (1 - alpha) * CE(student, next token) + alpha * T^2 * KD(teacher || student)

with KD from gemma2.distill (forward KL as in the Gemma 2 report, reverse KL or JSD) computed
chunk by chunk from the student's final hidden states and the tied embedding, never as [B, T, V]
logits. The teacher (gemma2.teacher) is a frozen Gemma2ForCausalLM (eval mode, no grad, its own
dtype and device) or an offline top-k cache (gemma2.teacher_cache). alpha = 0 without a teacher is plain
next-token training; alpha = 0 WITH a teacher trains on CE and still reports the held-out KD.
On-policy distillation (GKD, gemma2.on_policy): with probability lmbda a step's rows keep only their
prompts and the student samples the completions, on which alone the loss then runs (seq_kd: the
teacher samples the other steps' completions).

Choices, and why:
- Gradient accumulation: the loss of every micro-batch is its SUM over counted tokens divided by
  the number of counted tokens in the whole accumulated (and data-parallel) batch, counted before
  the first forward, so the step's gradient is that of the mean over all its tokens whatever the
  split into micro-batches or ranks.
- AdamW decays only the Block projection matrices. Norm weights are offsets from a scale of 1
  (decay would pull every scale towards 1), and the tied embedding's rows for rare tokens see
  gradient rarely, so decay would mostly shrink them for being rare.
- Linear warmup to lr, then cosine decay to min_lr at the last step; the schedule is a pure
  function of the step, so the step is the scheduler's whole state.
- Precision: fp32 master weights; bf16 autocast on CUDA by default (CPU: fp32 unless asked). The
  loss matmuls run in the compute dtype; softmax, losses and their gradients in fp32.
- A non-finite loss or gradient norm stops training BEFORE the update, so the last checkpoint and
  the weights in memory are both still good.
- Checkpoints (gemma2.train_state) appear atomically as out_dir/step-XXXXXX: the student in the
  Hugging Face layout, the optimizer state (DCP), RNG states and the data position. Resuming
  reproduces the uninterrupted run's losses exactly.

Many machines: run the same code under torchrun. Every Block and then the root are sharded with
FSDP2 (`fully_shard`, in gemma2.distributed), student and teacher alike; NCCL on GPUs, gloo on CPU; each rank reads its
own slice of every global batch. The tied embedding sits in the root's parameter group, which is
unsharded only inside the root's forward, so the student's forward AND its chunked loss run in one
module (`_StudentLoss`): the head's gradient and the embedding lookup's gradient meet in the
unsharded parameter before the reduce-scatter. The teacher's root is unsharded explicitly around
the loss that reads its head. Checkpoints gather the full student to rank 0 for the Hugging Face
files; the optimizer state is saved sharded with DCP (so it reloads on another world size). Models
from gemma2.sharded_load (scripts/distill.py under torchrun) wait on `meta` and each rank reads
only its shards when they are sharded; others are whole on every rank until then.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .compatibility import check_seq_len, check_tokenizer
from .data import IGNORE_INDEX, Batch, BatchLoader, Datasets, eval_batches
from .distill import OBJECTIVES, DistillStats, TeacherHead, TopK, chunked_distill_loss, distill_sums
from .distributed import Runtime, move_to, runtime, shard, under_torchrun
from .dtypes import dtype_name, to_dtype
from .evaluation import perplexity
from .files import notice, write_text_atomic
from .locks import ensure_held
from .model import Gemma2ForCausalLM, RMSNorm
from .on_policy import Rollouts, check_on_policy
from .preemption import StopSignals, StopTime, TrainingStopped, check_together
from .run_dir import METRICS_FILE, Run, json_line, open_run, read_metrics
from .sharded_load import load_weights
from .teacher import Teacher, check_teacher, teacher_record
from .teacher_cache import TeacherCache
from .throughput import mfu, peak_flops, training_flops_per_token
from .tokenizer import Tokenizer
from .train_state import load_training_state, save_checkpoint


@dataclass
class TrainConfig:
    out_dir: str  # checkpoints (step-XXXXXX/) and metrics.jsonl go here
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float | None = None  # the cosine ends here; None = lr / 10
    warmup: int = 100  # steps of linear warmup from lr / warmup
    weight_decay: float = 0.1  # AdamW decoupled decay, Block projection matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    alpha: float = 1.0  # weight of KD; 1 = pure distillation (Gemma 2), 0 = plain next-token CE
    objective: str = "forward_kl"  # "forward_kl", "reverse_kl" or "jsd"
    temperature: float = 1.0  # softmax temperature of the KD term (CE is always at 1)
    beta: float = 0.5  # JSD mixture weight (0 = forward KL, 1 = reverse KL)
    chunk_size: int = 1024  # tokens per chunk of the loss: memory ~ 4 * chunk_size * V * 4 bytes
    dtype: str = "auto"  # compute dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32" (or their long names)
    activation_checkpointing: bool = False  # recompute each Block in backward: memory for time
    eval_every: int = 100  # held-out evaluation every N steps, at step 0 and at the end; 0 = never
    eval_sequences: int | None = None  # cap on held-out sequences per evaluation; None = all
    save_every: int = 0  # checkpoint every N steps; 0 = only at the end
    keep_last: int | None = 1  # newest checkpoints to keep; None = all
    seed: int = 0  # data order
    device: str | None = None  # None: cuda if available, else cpu (under torchrun: the local GPU)
    tokenizer_file: str | None = None  # copied into every checkpoint, making it a model directory
    peak_flops: float | None = None  # per device, for MFU; None = gemma2.throughput's table (no MFU if unknown)
    # On-policy distillation (gemma2.on_policy; the names are TRL GKDTrainer's):
    lmbda: float = 0.0  # probability that a step trains on completions the student samples; 0 = never
    seq_kd: bool = False  # the other steps train on completions the teacher samples, not on the data
    max_new_tokens: int = 128  # tokens sampled per completion
    gen_temperature: float = 0.9  # sampling temperature of the completions; 0 = greedy
    prompt_len: int | None = None  # each row's first tokens kept as the prompt; None = seq_len - max_new_tokens
    compile_sampling: bool = False  # completions decode through torch.compile (gemma2.static_decode); one process
    sample_sharded: bool = False  # FSDP2: gather each Block per new token (its memory alone), not the student once
    group_by_length: int = 0  # prompts: rows sorted longest first within runs of this many (gemma2.data.BatchLoader)
    # Seconds a scheduler allows between SIGTERM and SIGKILL (Kubernetes' and SLURM's default); a
    # stop measured to take longer is noted once (gemma2.preemption.StopTime). None: not checked.
    stop_grace: float | None = 30.0

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}")
        if self.eval_sequences is not None and self.eval_sequences < 1:
            raise ValueError(f"eval_sequences must be >= 1 or None (all), got {self.eval_sequences}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr = {self.lr}], got {self.min_lr}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (0 = plain CE, 1 = pure KD), got {self.alpha}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.dtype != "auto":
            try:
                self.dtype = dtype_name(self.dtype)
            except ValueError as e:
                raise ValueError(f"dtype must be 'auto' or a name from gemma2.dtypes: {e}") from None
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak_flops must be > 0 (FLOP/s of one device) or None, got {self.peak_flops}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {self.keep_last}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1] (the fraction of on-policy steps), got {self.lmbda}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.gen_temperature < math.inf:
            raise ValueError(f"gen_temperature must be a finite number >= 0 (0 = greedy), got {self.gen_temperature}")
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0 rows (0: off), got {self.group_by_length}")
        if self.stop_grace is not None and not 0 < self.stop_grace < math.inf:
            raise ValueError(f"stop_grace must be a positive number of seconds or None (not checked), got "
                             f"{self.stop_grace}")  # fmt: skip
        if self.prompt_len is not None and self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1 or None (seq_len - max_new_tokens), got {self.prompt_len}")
        self.betas = tuple(self.betas)  # JSON gives a list back


class NonFiniteLossError(RuntimeError):
    """Training met a NaN or infinite loss or gradient norm and stopped before the update."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------
# Precision


def _compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return to_dtype(cfg.dtype)


# ------------------------------------------------------------------------------------------------
# The modules FSDP sees


class _StudentLoss(nn.Module):
    """The student's forward and its chunked loss as ONE forward (see the module docstring)."""

    def __init__(self, student: Gemma2ForCausalLM, cfg: TrainConfig, dtype: torch.dtype, autocast: bool) -> None:
        super().__init__()
        self.student = student
        self.cfg = cfg
        self.dtype = dtype  # the dtype of the loss matmuls
        self.autocast = autocast  # False under FSDP mixed precision, whose params are already bf16

    def forward(
        self, inputs: Tensor, targets: Tensor, teacher: TeacherHead | TopK | None, normalizer: float | None = None,
        alpha: float | None = None, valid: Tensor | None = None,
    ) -> tuple[Tensor | None, DistillStats]:
        """Training (normalizer and alpha given): the loss and its sums. Evaluation (neither): no
        loss, the sums an evaluation reports (KD when `teacher` is given, CE always). valid: the
        batch's padding mask (`Batch.valid`)."""
        cfg = self.cfg
        ctx = torch.autocast(inputs.device.type, self.dtype) if self.autocast else nullcontext()
        with ctx:
            hidden = self.student.hidden_states(inputs, valid)  # [B, T, D]
        # The residual stream leaves autocast in fp32; cast it so the head matmul runs in bf16 too.
        hidden = hidden.to(self.dtype)
        weight = self.student.output_weight.to(self.dtype)  # [V, D]; the gradient flows back
        options = dict(final_softcap=self.student.config.final_logit_softcapping, objective=cfg.objective,
                       temperature=cfg.temperature, beta=cfg.beta, chunk_size=cfg.chunk_size, ignore_index=IGNORE_INDEX)
        if alpha is None:
            return None, distill_sums(hidden, weight, teacher, targets, **options)
        return chunked_distill_loss(hidden, weight, teacher, targets, alpha=alpha, normalizer=normalizer, **options)


# ------------------------------------------------------------------------------------------------
# Optimizer


def build_optimizer(model: Gemma2ForCausalLM, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the Block projection matrices only (see the module docstring)."""
    # By identity, not by name: the embedding and the RMSNorm weights.
    skip = {id(model.output_weight)} | {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in skip], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
    ]
    # One fused kernel on CUDA; elsewhere foreach (a few multi-tensor ops instead of a loop over
    # parameters, which dominates a tiny model's step on CPU).
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None, foreach=not fused or None)


# ------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def _evaluate(loss_mod: _StudentLoss, teacher: Teacher | None, data: Datasets, cfg: TrainConfig,
              rt: Runtime, with_teacher_ce: bool) -> dict:  # fmt: skip
    """Held-out CE / perplexity and KD of the student (and the teacher's CE, if asked)."""
    kd_on = teacher is not None and teacher.has_heldout
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # ce, kd, tokens, teacher ce
    for batch in eval_batches(data.heldout, cfg.batch_size, rank=rt.rank, world_size=rt.world,
                              max_sequences=cfg.eval_sequences):  # fmt: skip
        inputs, targets = batch.inputs.to(rt.device), batch.targets.to(rt.device)
        src = teacher(batch, "heldout") if kd_on else None
        _, st = loss_mod(inputs, targets, src, valid=batch.valid_on(rt.device))
        sums[:3] += torch.stack([st.ce_sum, st.kd_sum, torch.tensor(st.tokens, device=st.ce_sum.device)]).double()
        if with_teacher_ce and teacher is not None and teacher.model is not None:
            sums[3] += distill_sums(src.hidden, src.weight, None, targets, final_softcap=src.final_softcap,
                                    chunk_size=cfg.chunk_size).ce_sum.double()  # fmt: skip
        if kd_on:
            teacher.release()
    ce, kd, n, t_ce = rt.all_reduce(sums).tolist()
    out = {"eval_ce": ce / n, "eval_ppl": perplexity(ce / n)}
    if kd_on:
        out["eval_kd"] = kd / n * cfg.temperature**2
    if with_teacher_ce and teacher is not None:
        # A cache recorded its teacher's CE over the whole held-out split when it was written.
        t_ce = t_ce / n if teacher.model is not None else teacher.heldout.teacher_ce if teacher.heldout else None
        if t_ce is not None:
            out |= {"teacher_eval_ce": t_ce, "teacher_eval_ppl": perplexity(t_ce)}
    return out


# ------------------------------------------------------------------------------------------------
# The loop


def _prepare_student(student: Gemma2ForCausalLM, cfg: TrainConfig, rt: Runtime) -> _StudentLoss:
    """In place: the student on its device in train mode, each Block recomputed in backward if
    asked, and (under torchrun) sharded; returns the module whose forward is the loss."""
    dtype = _compute_dtype(cfg, rt.device)
    move_to(student, rt.device)
    student.train()
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in student.model.layers:
            checkpoint(block)
    loss_mod = _StudentLoss(student, cfg, dtype, autocast=dtype != torch.float32 and not rt.sharded)
    if rt.sharded:
        shard(loss_mod, student, rt, param_dtype=None if dtype == torch.float32 else dtype)
    return loss_mod


class _MetricsLog:
    """This call's metrics, each also appended to out_dir/metrics.jsonl by rank 0. A resumed run
    first keeps only the lines up to its checkpoint's step: a crashed run may have logged further.
    lock: out_dir's (rank 0), checked before each line (gemma2.locks.ensure_held)."""

    def __init__(self, path: Path, rt: Runtime, resumed_at: int | None, lock: Path | None) -> None:
        self.path, self.rt, self.lock = path, rt, lock
        self.records: list[dict] = []
        if rt.is_main:
            resumed = resumed_at is not None and path.exists()
            old = read_metrics(path) if resumed else []  # a torn last line dropped, with a notice
            write_text_atomic(path, "".join(json_line(m) for m in old if m["step"] <= resumed_at))

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.rt.is_main:
            if self.lock is not None:
                ensure_held(self.lock)
            with self.path.open("a") as f:
                f.write(json_line(record))  # NaN and inf as null, flagged


def _clip_gradients(student: Gemma2ForCausalLM, grad_clip: float) -> Tensor:
    """Clip the global gradient norm to grad_clip (0: never) and return the norm before clipping."""
    norm = nn.utils.clip_grad_norm_(student.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP


def _accumulate_gradients(
    loss_mod: _StudentLoss, micro: list[Batch], teacher: Teacher | None, alpha: float, rt: Runtime,
    flops_per_token: Callable[[int], float],
) -> tuple[float, float, float, Tensor]:
    """Forward and backward over one step's micro-batches. The gradients left in the student are
    those of the mean loss over every counted token of every micro-batch on every rank.
    flops_per_token(T): the model FLOPs per token of a row T wide (rows differ in width: prompts).
    Returns (counted tokens, tokens in the rows, their model FLOPs, [loss, kd_sum, ce_sum]), each
    summed over micro-batches and ranks."""
    # Count all micro-batches' tokens first (data targets are still on the host: no device sync).
    work = torch.tensor([[float((b.targets != IGNORE_INDEX).sum()), b.inputs.numel(),
                          b.inputs.numel() * flops_per_token(b.inputs.shape[1])] for b in micro],
                        dtype=torch.float64, device=rt.device)  # fmt: skip
    n_counted, n_tokens, flops = rt.all_reduce(work.sum(0)).tolist()
    if n_counted == 0:
        raise ValueError(f"a training batch has no counted tokens (every target is {IGNORE_INDEX})")
    # Each micro-batch's loss is its token SUM over this; FSDP then averages the ranks' gradients,
    # hence the division by the world size.
    normalizer = n_counted / rt.world
    sums = torch.zeros(3, device=rt.device)  # loss, kd_sum, ce_sum
    for i, batch in enumerate(micro):
        if rt.sharded:
            loss_mod.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
        inputs = batch.inputs.to(rt.device, non_blocking=True)
        targets = batch.targets.to(rt.device, non_blocking=True)
        src = teacher(batch, "train") if teacher is not None else None
        loss, st = loss_mod(inputs, targets, src, normalizer, alpha, batch.valid_on(rt.device, non_blocking=True))
        if teacher is not None:
            teacher.release()
        loss.backward()
        sums += torch.stack([loss.detach(), st.kd_sum, st.ce_sum])
    return n_counted, n_tokens, flops, rt.all_reduce(sums)


def _check(cfg: TrainConfig, student: Gemma2ForCausalLM, teacher, data: Datasets, rt: Runtime) -> None:
    sharded, world = rt.sharded, rt.world
    V = student.config.vocab_size
    if teacher is None and cfg.alpha > 0:
        raise ValueError(
            f"alpha = {cfg.alpha} weighs a distillation term but there is no teacher: pass a teacher "
            "(a model or a TeacherCache), or alpha=0 for plain next-token training"
        )
    if teacher is not None:
        check_teacher(teacher, V, cfg.temperature, cfg.objective, data)
    # Refuses data smaller than one global batch, and grouping rows that are all one length.
    BatchLoader(data.train, cfg.batch_size, world_size=world, group=cfg.group_by_length, grad_accum=cfg.grad_accum)
    top = max(int(d.tokens.max()) for d in (data.train, data.heldout) if d is not None)
    if top >= V:
        raise ValueError(
            f"the data holds token id {top} but the student's vocabulary has {V} entries: tokenize "
            "with the tokenizer the model was built for, or build the student with a larger vocab_size"
        )
    check_on_policy(cfg, data, student.config, teacher, sharded)
    if cfg.eval_every and data.heldout is None:
        raise ValueError("eval_every > 0 needs held-out data: set holdout_fraction > 0 (or eval paths), or eval_every=0")
    evaluated = min(len(data.heldout), cfg.eval_sequences or len(data.heldout)) if cfg.eval_every else world
    if evaluated < world:  # eval_batches gives each rank an equal share: none at all here
        raise ValueError(
            f"evaluation would find {evaluated} held-out rows for {world} ranks (each rank takes an equal "
            "share); raise eval_sequences or holdout_fraction, or set eval_every=0"
        )
    if cfg.tokenizer_file is not None and not Path(cfg.tokenizer_file).is_file():
        raise FileNotFoundError(f"tokenizer_file {cfg.tokenizer_file} does not exist; pass the tokenizer.model path")
    # A cache's vocabulary is the student's (check_teacher); a live teacher has its own config too.
    models = [("the student", student.config)]
    if isinstance(teacher, Gemma2ForCausalLM):
        models.append(("the teacher", teacher.config))
    tokenizer = Tokenizer(cfg.tokenizer_file) if cfg.tokenizer_file is not None else None
    for what, config in models:
        check_seq_len(data.train.seq_len, config, what)
        if tokenizer is not None:
            check_tokenizer(tokenizer, config, what)


def train(
    cfg: TrainConfig,
    student: Gemma2ForCausalLM,
    data: Datasets,
    *,
    teacher: Gemma2ForCausalLM | TeacherCache | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train `student` on `data` (gemma2.data.load_datasets), distilling from `teacher`.

    The student is prepared in place: moved to the device, wrapped for activation checkpointing
    and, under torchrun, sharded with FSDP2 (pass a fresh model to each call). With resume=True the
    newest checkpoint in cfg.out_dir is loaded into it (weights, optimizer, data position, RNG) and
    training continues to cfg.steps, provided every setting that changes the run's meaning is the
    checkpoint's (gemma2.run_dir); without one, training starts fresh (with a notice). A fresh run
    refuses an out_dir that already holds checkpoints, and a non-empty one that holds no previous
    run unless overwrite=True; a second process on one out_dir is refused (a lock file).

    Returns this call's metrics, also appended to out_dir/metrics.jsonl (one JSON object a line):
      training, every step:  step, lr, loss, ce (None if alpha = 1), kd (None if alpha = 0),
                             grad_norm, tokens (in the step's rows on all devices: prompt rows
                             and sampled ones are cut to what each batch's rows reach),
                             tokens_per_s (all devices), tokens_per_s_per_device,
                             mfu (model FLOPs utilisation, gemma2.throughput; None if the peak is unknown)
      with lmbda > 0 or seq_kd, every step also: on_policy_fraction (of the steps so far),
                             completion_len (mean sampled tokens per row; None on a step of data)
      evaluation:            step, eval_ce, eval_ppl, eval_kd (with a teacher),
                             teacher_eval_ce and teacher_eval_ppl (at step 0 only); with a live
                             teacher and lmbda > 0, seq_kd or a prompt dataset also eval_sample_kd
                             and eval_sample_len (the student's greedy completions of the held-out
                             prompts, scored by the teacher: gemma2.on_policy), which alone remain
                             when held-out prompts lack completions
    `step` counts optimizer updates done; evaluation runs at step 0 (with the teacher's numbers),
    every eval_every steps and at the end. Raises NonFiniteLossError if the loss or the gradient
    norm stops being finite, and TrainingStopped after saving a checkpoint when the job is asked to
    end (SIGTERM or SIGUSR1 during the loop: gemma2.preemption).
    """
    rt = runtime(cfg.device)
    _check(cfg, student, teacher, data, rt)
    if cfg.warmup > cfg.steps and rt.is_main:
        notice(f"warmup = {cfg.warmup} steps is longer than the run's {cfg.steps}: the learning rate climbs only to "
               f"{lr_at(cfg.steps - 1, cfg):.3g} of lr = {cfg.lr:.3g}; pass warmup <= steps (--warmup) for the "
               "whole schedule")  # fmt: skip
    models = {"student": dataclasses.asdict(student.config), "teacher": teacher_record(teacher),
              "compute_dtype": dtype_name(_compute_dtype(cfg, rt.device))}  # dtype "auto": per device
    with open_run(cfg, data, models=models, resume=resume, overwrite=overwrite, main=rt.is_main, world=rt.world) as run:
        return _train(cfg, student, data, teacher, rt, run, progress)


def _train(cfg: TrainConfig, student: Gemma2ForCausalLM, data: Datasets, teacher, rt: Runtime, run: Run,
           progress: bool) -> list[dict]:  # fmt: skip
    out, ckpt = run.out, run.checkpoint
    kd_teacher = Teacher(teacher, data, rt) if teacher is not None else None
    if kd_teacher is not None and kd_teacher.model is not None:  # first: a resume may refuse it
        run.check_teacher_weights(kd_teacher.checksum())
    if ckpt is not None:
        # Before sharding: fully_shard cuts every rank's shard out of these tensors, or a sharded
        # student (gemma2.sharded_load) reads its rows of them.
        load_weights(student, ckpt)

    loss_mod = _prepare_student(student, cfg, rt)
    optimizer = build_optimizer(student, cfg, rt.device)
    loader = BatchLoader(data.train, cfg.batch_size, seed=cfg.seed, rank=rt.rank, world_size=rt.world,
                         group=cfg.group_by_length, grad_accum=cfg.grad_accum)  # fmt: skip
    start_step = 0
    if ckpt is not None:
        state = load_training_state(ckpt, student, optimizer)
        loader.load_state_dict(state["data"])
        start_step = state["step"]

    metrics = _MetricsLog(out / METRICS_FILE, rt, resumed_at=start_step if ckpt is not None else None, lock=run.lock)
    log = metrics.log

    rollouts = Rollouts(cfg, student, loss_mod, kd_teacher, data.train, rt, start_step)

    # Held-out prompts without completions (gemma2.prompts) have no text to score the student on:
    # only the student's own completions of them are evaluated (a live teacher: check_on_policy).
    scored = getattr(data.heldout, "has_completions", True)

    def evaluate(step: int, first: bool) -> dict:
        loss_mod.eval()
        on_data = _evaluate(loss_mod, kd_teacher, data, cfg, rt, with_teacher_ce=first) if scored else {}
        record = {"step": step, **on_data, **rollouts.evaluate(data.heldout)}
        loss_mod.train()
        return record

    stop_time = StopTime(cfg.stop_grace, quiet=not rt.is_main, torchrun=under_torchrun())
    # Every metrics line and checkpoint follows a check_together of every rank (gemma2.preemption):
    # a lost lock stops them all there, not the rank holding it alone. The log and the save check
    # again on that rank alone (a lock lost in the moment between stops it alone, before writing).
    if cfg.eval_every and start_step == 0:
        t0 = time.perf_counter()
        evaluated = evaluate(0, first=True)
        stop_time.measured("evaluation", time.perf_counter() - t0)  # the process's first: a warm-up
        check_together(rt, run.lock)
        log(evaluated)
    train_teacher = kd_teacher if cfg.alpha > 0 else None  # alpha = 0: the teacher only evaluates
    live_teacher = train_teacher.model.config if train_teacher is not None and train_teacher.model is not None else None
    flops_per_token = partial(training_flops_per_token, student.config, teacher=live_teacher)
    peak = cfg.peak_flops or peak_flops(rt.device, loss_mod.dtype)
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not progress or not rt.is_main)
    with StopSignals() as stop, bar:  # the bar closed however the loop ends: an error's line is its own
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = rollouts([next(loader) for _ in range(cfg.grad_accum)], step)
            n_counted, tokens, flops, sums = _accumulate_gradients(loss_mod, micro, train_teacher, cfg.alpha, rt,
                                                                   flops_per_token)  # fmt: skip
            norm = _clip_gradients(student, cfg.grad_clip)
            loss_sum, kd_sum, ce_sum, grad_norm = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()  # one sync
            loss_value = loss_sum / rt.world
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                message = run.nonfinite_message(step + 1, start_step + 1, loss_value, grad_norm, student)
                raise NonFiniteLossError(message)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            stop_time.measured("step", dt)
            done = step + 1 == cfg.steps
            due = cfg.eval_every and (done or (step + 1) % cfg.eval_every == 0)
            evaluated = evaluate(step + 1, first=False) if due else None
            if due:
                stop_time.measured("evaluation", time.perf_counter() - t0 - dt)
            stopping = stop.requested(rt, run.lock)  # a scheduler's SIGTERM or SIGUSR1, the lock: one collective
            per_device = tokens / dt / rt.world
            utilisation = mfu(flops / tokens, per_device, peak)
            log({
                "step": step + 1, "lr": lr, "loss": loss_value,
                "ce": ce_sum / n_counted if cfg.alpha < 1 else None,
                "kd": kd_sum / n_counted * cfg.temperature**2 if cfg.alpha > 0 else None,
                "grad_norm": grad_norm, "tokens": int(tokens), "tokens_per_s": tokens / dt,
                "tokens_per_s_per_device": per_device, "mfu": utilisation,
            } | rollouts.metrics(step, n_counted))  # fmt: skip
            bar.update(1)
            util = "" if peak is None else f", mfu={utilisation:.1%}"
            util += rollouts.postfix(metrics.records[-1])
            bar.set_postfix_str(f"loss={loss_value:.4f}, tok/s/device={per_device:,.0f}{util}", refresh=False)
            if evaluated is not None:
                log(evaluated)
            if done or stopping or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                state = {"data": loader.state_dict(), "config": dataclasses.asdict(cfg), "run": run.record}
                t_save = time.perf_counter()
                with run.saving(student):
                    saved = save_checkpoint(out, step + 1, student, optimizer, state,
                                            tokenizer_file=cfg.tokenizer_file, keep_last=cfg.keep_last)  # fmt: skip
                stop_time.measured("save", time.perf_counter() - t_save)
                # A signal that came during a periodic save stops the run at that checkpoint, not one
                # step and another save later (one more collective, on save steps only).
                stopping = stopping or not done and stop.requested(rt, run.lock)
            if stopping and not done:
                asked = stop.received or "a stop signal (on another rank)"
                raise TrainingStopped(f"stopped by {asked} after step {step + 1} of {cfg.steps}; saved {saved}: "
                                      "continue with the same command and --resume", stop.received or "SIGTERM")
    return metrics.records
