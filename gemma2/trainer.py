"""Training and distillation of Gemma 2 students: one loop, from one CPU to many GPUs.

Per counted token the objective is

    (1 - alpha) * CE(student, next token) + alpha * T^2 * KD(teacher || student)

with KD from gemma2.distill (forward KL as in the Gemma 2 report, reverse KL or JSD) computed
chunk by chunk from the student's final hidden states and the tied embedding, never as [B, T, V]
logits. The teacher is a frozen Gemma2ForCausalLM (eval mode, no grad, its own dtype and device)
or an offline top-k cache (gemma2.teacher_cache). alpha = 0 without a teacher is plain
next-token training; alpha = 0 WITH a teacher trains on CE and still reports the held-out KD.

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
FSDP2 (`fully_shard`), student and teacher alike; NCCL on GPUs, gloo on CPU; each rank reads its
own slice of every global batch. The tied embedding sits in the root's parameter group, which is
unsharded only inside the root's forward, so the student's forward AND its chunked loss run in one
module (`_StudentLoss`): the head's gradient and the embedding lookup's gradient meet in the
unsharded parameter before the reduce-scatter. The teacher's root is unsharded explicitly around
the loss that reads its head. Checkpoints gather the full student to rank 0 for the Hugging Face
files; the optimizer state is saved sharded with DCP (so it reloads on another world size). Each
rank still builds (or loads) the full models before sharding them: fine while one model fits in
one process's memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import load_model
from .compatibility import check_seq_len, check_tokenizer, check_vocab
from .config import PRESETS, Gemma2Config
from .data import IGNORE_INDEX, Batch, BatchLoader, Datasets, eval_batches
from .distill import OBJECTIVES, DistillStats, TeacherHead, TopK, chunked_distill_loss
from .model import Gemma2ForCausalLM, RMSNorm
from .run_dir import Run, open_run
from .teacher_cache import TeacherCache
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
    dtype: str = "auto"  # compute dtype: "auto" (bf16 on CUDA, fp32 on CPU), "bf16" or "fp32"
    activation_checkpointing: bool = False  # recompute each Block in backward: memory for time
    eval_every: int = 100  # held-out evaluation every N steps, at step 0 and at the end; 0 = never
    eval_sequences: int | None = None  # cap on held-out sequences per evaluation; None = all
    save_every: int = 0  # checkpoint every N steps; 0 = only at the end
    keep_last: int | None = 1  # newest checkpoints to keep; None = all
    seed: int = 0  # data order
    device: str | None = None  # None: cuda if available, else cpu (under torchrun: the local GPU)
    tokenizer_file: str | None = None  # copied into every checkpoint, making it a model directory

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
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {self.dtype!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {self.keep_last}")
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
# Students


@torch.no_grad()
def init_weights(model: Gemma2ForCausalLM, seed: int = 0, std: float = 0.02) -> Gemma2ForCausalLM:
    """Fresh weights: N(0, std) for the embedding and every projection (transformers' Gemma 2
    initialiser), norm offsets 0 (scale 1). nn.Embedding's own N(0, 1) would make the tied head's
    first logits ~sqrt(D) wide, far from the uniform guess a new model should start at."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:  # RMSNorm offsets: the only vectors in the model
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def load_student(spec: str | os.PathLike, *, vocab_size: int | None = None, seed: int = 0) -> Gemma2ForCausalLM:
    """A student from a checkpoint directory (its weights), a config.json or a preset name (fresh
    weights from `init_weights(seed)`). `vocab_size` replaces a fresh student's vocabulary size, to
    match the teacher's or the tokenizer's; a checkpoint keeps its own."""
    path = Path(spec)
    if path.is_dir():
        return load_model(path)
    if path.suffix == ".json":
        config = Gemma2Config.from_json(path)
    else:
        try:
            config = Gemma2Config.from_name(str(spec))
        except ValueError:
            raise ValueError(
                f"student {str(spec)!r} is neither a checkpoint directory, a config.json nor a preset; "
                f"pass one of those (presets: {', '.join(sorted(PRESETS))})"
            ) from None
    if vocab_size is not None:
        config = config.replace(vocab_size=vocab_size)
    return init_weights(Gemma2ForCausalLM(config), seed)


# ------------------------------------------------------------------------------------------------
# Processes and devices


def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): NCCL when this machine has
    GPUs, gloo otherwise. Returns (rank, world_size); (0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


@dataclass
class _Runtime:
    rank: int
    world: int
    device: torch.device
    sharded: bool  # FSDP2 across `world` processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.sharded:
            dist.all_reduce(t)
        return t


def _runtime(cfg: TrainConfig) -> _Runtime:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return _Runtime(dist.get_rank(), dist.get_world_size(), device, True)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return _Runtime(0, 1, device, False)


def _compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


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
        self, inputs: Tensor, targets: Tensor, teacher: TeacherHead | TopK | None, normalizer: float, alpha: float
    ) -> tuple[Tensor, DistillStats]:
        cfg = self.cfg
        ctx = torch.autocast(inputs.device.type, self.dtype) if self.autocast else nullcontext()
        with ctx:
            hidden = self.student.hidden_states(inputs)  # [B, T, D]
        # The residual stream leaves autocast in fp32; cast it so the head matmul runs in bf16 too.
        hidden = hidden.to(self.dtype)
        weight = self.student.output_weight.to(self.dtype)  # [V, D]; the gradient flows back
        return chunked_distill_loss(
            hidden, weight, teacher, targets,
            final_softcap=self.student.config.final_logit_softcapping, objective=cfg.objective,
            temperature=cfg.temperature, beta=cfg.beta, alpha=alpha, normalizer=normalizer,
            chunk_size=cfg.chunk_size, ignore_index=IGNORE_INDEX,
        )  # fmt: skip


class _TeacherHidden(nn.Module):
    """The teacher's final hidden states as a module forward, so FSDP2 unshards its root."""

    def __init__(self, teacher: Gemma2ForCausalLM) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, inputs: Tensor) -> Tensor:
        return self.teacher.hidden_states(inputs)


def _shard(root: nn.Module, model: Gemma2ForCausalLM, rt: _Runtime, param_dtype: torch.dtype | None) -> None:
    """FSDP2: each Block is one all-gather unit, the root holds the embedding and final norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)


class _Teacher:
    """Gives the KD target of a batch: a TeacherHead from the model, or TopK from a cache."""

    def __init__(self, teacher: Gemma2ForCausalLM | TeacherCache, data: Datasets, rt: _Runtime) -> None:
        self.rt = rt
        self.model: Gemma2ForCausalLM | None = None
        self.cache: TeacherCache | None = None
        if isinstance(teacher, TeacherCache):
            self.cache = teacher
            teacher.split("train").check(data.train, "training")
            self.heldout = None
            if data.heldout is not None and "heldout" in teacher.splits:
                self.heldout = teacher.split("heldout")
                self.heldout.check(data.heldout, "held-out")
            return
        self.model = teacher.eval().requires_grad_(False)
        self.heldout = None
        self.root = _TeacherHidden(teacher)
        if rt.sharded:
            teacher.to(rt.device)
            _shard(self.root, teacher, rt, param_dtype=None)  # the teacher computes in its own dtype
            self.device = rt.device
            self._weight = None
        else:
            self.device = teacher.output_weight.device
            # A teacher on another device: one copy of its frozen head next to the student.
            self._weight = teacher.output_weight.detach().to(rt.device)

    @property
    def has_heldout(self) -> bool:
        return self.model is not None or self.heldout is not None

    @torch.no_grad()
    def __call__(self, batch: Batch, split: str) -> TeacherHead | TopK:
        if self.cache is not None:
            part = self.cache.split("train") if split == "train" else self.heldout
            return part.topk(batch.indices, self.rt.device)
        hidden = self.root(batch.inputs.to(self.device, non_blocking=True)).to(self.rt.device)
        if self.rt.sharded:
            self.root.unshard()  # the tied head lives in the root group: gather it for the loss
            weight = self.model.output_weight
        else:
            weight = self._weight
        return TeacherHead(hidden, weight, self.model.config.final_logit_softcapping)

    def release(self) -> None:
        """Free the gathered teacher head once the loss that reads it is done."""
        if self.model is not None and self.rt.sharded:
            self.root.reshard()


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
def _evaluate(loss_mod: _StudentLoss, teacher: _Teacher | None, data: Datasets, cfg: TrainConfig,
              rt: _Runtime, with_teacher_ce: bool) -> dict:  # fmt: skip
    """Held-out CE / perplexity and KD of the student (and the teacher's CE, if asked)."""
    kd_on = teacher is not None and teacher.has_heldout
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # ce, kd, tokens, teacher ce
    for batch in eval_batches(data.heldout, cfg.batch_size, rank=rt.rank, world_size=rt.world,
                              max_sequences=cfg.eval_sequences):  # fmt: skip
        inputs, targets = batch.inputs.to(rt.device), batch.targets.to(rt.device)
        src = teacher(batch, "heldout") if kd_on else None
        # alpha strictly between 0 and 1 makes the loss compute both sums; its value is unused.
        _, st = loss_mod(inputs, targets, src, 1.0, 0.5 if kd_on else 0.0)
        sums[:3] += torch.stack([st.ce_sum, st.kd_sum, torch.tensor(st.tokens, device=st.ce_sum.device)]).double()
        if with_teacher_ce and teacher is not None and teacher.model is not None:
            _, tst = chunked_distill_loss(src.hidden, src.weight, None, targets, alpha=0.0,
                                          final_softcap=src.final_softcap, chunk_size=cfg.chunk_size)  # fmt: skip
            sums[3] += tst.ce_sum.double()
        if kd_on:
            teacher.release()
    ce, kd, n, t_ce = rt.all_reduce(sums).tolist()
    if n == 0:
        raise ValueError(
            f"evaluation found no held-out sequences for {rt.world} ranks; raise eval_sequences "
            "or holdout_fraction, or set eval_every=0"
        )
    out = {"eval_ce": ce / n, "eval_ppl": math.exp(min(ce / n, 50.0))}
    if kd_on:
        out["eval_kd"] = kd / n * cfg.temperature**2
    if with_teacher_ce and teacher is not None:
        # A cache recorded its teacher's CE over the whole held-out split when it was written.
        t_ce = t_ce / n if teacher.model is not None else teacher.heldout.teacher_ce if teacher.heldout else None
        if t_ce is not None:
            out |= {"teacher_eval_ce": t_ce, "teacher_eval_ppl": math.exp(min(t_ce, 50.0))}
    return out


# ------------------------------------------------------------------------------------------------
# The loop


def _accumulate_gradients(
    loss_mod: _StudentLoss, micro: list[Batch], teacher: _Teacher | None, alpha: float, rt: _Runtime
) -> tuple[float, Tensor]:
    """Forward and backward over one step's micro-batches. The gradients left in the student are
    those of the mean loss over every counted token of every micro-batch on every rank.
    Returns (counted tokens, [loss, kd_sum, ce_sum] summed over micro-batches and ranks)."""
    # Count all micro-batches' tokens first (targets are still on the host: no device sync).
    counted = torch.tensor(float(sum(int((b.targets != IGNORE_INDEX).sum()) for b in micro)), device=rt.device)
    n_counted = rt.all_reduce(counted).item()
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
        loss, st = loss_mod(inputs, targets, src, normalizer, alpha)
        if teacher is not None:
            teacher.release()
        loss.backward()
        sums += torch.stack([loss.detach(), st.kd_sum, st.ce_sum])
    return n_counted, rt.all_reduce(sums)


def _check(cfg: TrainConfig, student: Gemma2ForCausalLM, teacher, data: Datasets) -> None:
    V = student.config.vocab_size
    if teacher is None and cfg.alpha > 0:
        raise ValueError(
            f"alpha = {cfg.alpha} weighs a distillation term but there is no teacher: pass a teacher "
            "(a model or a TeacherCache), or alpha=0 for plain next-token training"
        )
    if isinstance(teacher, Gemma2ForCausalLM) and teacher.config.vocab_size != V:
        raise ValueError(
            f"student vocab size {V} != teacher vocab size {teacher.config.vocab_size}: distillation "
            "compares distributions over the same token ids; build the student with the teacher's "
            f"vocab_size (load_student(..., vocab_size={teacher.config.vocab_size})) and its tokenizer"
        )
    if isinstance(teacher, TeacherCache):
        if teacher.vocab_size != V:
            raise ValueError(
                f"student vocab size {V} != the teacher cache's {teacher.vocab_size}: build the student "
                f"with vocab_size={teacher.vocab_size} and the tokenizer the cache was made with"
            )
        teacher.check_temperature(cfg.temperature)
        if cfg.objective != "forward_kl":  # held-out KD uses the objective too, even at alpha = 0
            raise ValueError(f"a top-k teacher cache supports only objective='forward_kl', got {cfg.objective!r}")
    top = max(int(d.tokens.max()) for d in (data.train, data.heldout) if d is not None)
    if top >= V:
        raise ValueError(
            f"the data holds token id {top} but the student's vocabulary has {V} entries: tokenize "
            "with the tokenizer the model was built for, or build the student with a larger vocab_size"
        )
    if cfg.eval_every and data.heldout is None:
        raise ValueError("eval_every > 0 needs held-out data: set holdout_fraction > 0 (or eval paths), or eval_every=0")
    if cfg.tokenizer_file is not None and not Path(cfg.tokenizer_file).is_file():
        raise FileNotFoundError(f"tokenizer_file {cfg.tokenizer_file} does not exist; pass the tokenizer.model path")
    tokenizer = Tokenizer(cfg.tokenizer_file) if cfg.tokenizer_file is not None else None
    models = [("the student", student.config)]
    if isinstance(teacher, Gemma2ForCausalLM):
        models.append(("the teacher", teacher.config))
    for what, config in models:
        check_seq_len(data.train.seq_len, config, what)
        if tokenizer is not None:
            check_tokenizer(tokenizer, config, what)
    if isinstance(teacher, TeacherCache) and tokenizer is not None:
        check_vocab(tokenizer.vocab_size, teacher.vocab_size, "the teacher cache", cfg.tokenizer_file)


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
                             grad_norm, tokens, tokens_per_s
      evaluation:            step, eval_ce, eval_ppl, eval_kd (with a teacher),
                             teacher_eval_ce and teacher_eval_ppl (at step 0 only)
    `step` counts optimizer updates done; evaluation runs at step 0 (with the teacher's numbers),
    every eval_every steps and at the end. Raises NonFiniteLossError if the loss or the gradient
    norm stops being finite.
    """
    rt = _runtime(cfg)
    _check(cfg, student, teacher, data)
    with open_run(cfg, data, resume=resume, overwrite=overwrite, main=rt.is_main, world=rt.world) as run:
        return _train(cfg, student, data, teacher, rt, run, progress)


def _train(cfg: TrainConfig, student: Gemma2ForCausalLM, data: Datasets, teacher, rt: _Runtime, run: Run,
           progress: bool) -> list[dict]:  # fmt: skip
    out, ckpt = run.out, run.checkpoint
    if ckpt is not None:
        # Loaded before sharding: fully_shard then cuts every rank's shard out of these tensors.
        student.load_state_dict(load_model(ckpt, config=student.config).state_dict(), strict=True)

    # Prepare the student: device, activation checkpointing, sharding, optimizer.
    dtype = _compute_dtype(cfg, rt.device)
    student.to(rt.device).train()
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in student.model.layers:
            checkpoint(block)
    loss_mod = _StudentLoss(student, cfg, dtype, autocast=dtype != torch.float32 and not rt.sharded)
    if rt.sharded:
        _shard(loss_mod, student, rt, param_dtype=None if dtype == torch.float32 else dtype)
    optimizer = build_optimizer(student, cfg, rt.device)
    loader = BatchLoader(data.train, cfg.batch_size, seed=cfg.seed, rank=rt.rank, world_size=rt.world)
    kd_teacher = _Teacher(teacher, data, rt) if teacher is not None else None
    start_step = 0
    if ckpt is not None:
        state = load_training_state(ckpt, student, optimizer)
        loader.load_state_dict(state["data"])
        start_step = state["step"]

    metrics: list[dict] = []
    if rt.is_main:
        run.restart_metrics(start_step)

    def log(record: dict) -> None:
        metrics.append(record)
        if rt.is_main:
            run.log(record)

    def evaluate(step: int, first: bool) -> None:
        loss_mod.eval()
        log({"step": step, **_evaluate(loss_mod, kd_teacher, data, cfg, rt, with_teacher_ce=first)})
        loss_mod.train()

    if cfg.eval_every and start_step == 0:
        evaluate(0, first=True)
    tokens_per_step = cfg.batch_size * data.train.seq_len * cfg.grad_accum * rt.world
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", disable=not progress or not rt.is_main)
    train_teacher = kd_teacher if cfg.alpha > 0 else None  # alpha = 0: the teacher only evaluates
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(loader) for _ in range(cfg.grad_accum)]
        n_counted, sums = _accumulate_gradients(loss_mod, micro, train_teacher, cfg.alpha, rt)
        norm = nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        loss_sum, kd_sum, ce_sum, grad_norm = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()  # one sync
        loss_value = loss_sum / rt.world
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(run.nonfinite_message(step + 1, start_step + 1, loss_value, grad_norm, student))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        log({
            "step": step + 1, "lr": lr, "loss": loss_value,
            "ce": ce_sum / n_counted if cfg.alpha < 1 else None,
            "kd": kd_sum / n_counted * cfg.temperature**2 if cfg.alpha > 0 else None,
            "grad_norm": grad_norm, "tokens": tokens_per_step, "tokens_per_s": tokens_per_step / dt,
        })  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
        done = step + 1 == cfg.steps
        if cfg.eval_every and (done or (step + 1) % cfg.eval_every == 0):
            evaluate(step + 1, first=False)
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            state = {"data": loader.state_dict(), "config": dataclasses.asdict(cfg), "run": run.record}
            with run.saving(student):
                save_checkpoint(out, step + 1, student, optimizer, state, tokenizer_file=cfg.tokenizer_file,
                                keep_last=cfg.keep_last)  # fmt: skip
    bar.close()
    return metrics
