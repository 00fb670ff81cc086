"""On-policy distillation (GKD; Agarwal et al. 2024, "On-Policy Distillation of Language Models"):
training rows whose completions a model samples itself, scored token by token by the teacher.

The settings are TrainConfig's and carry the names of TRL's GKDTrainer:
- lmbda: the probability that a step trains on-policy: each row keeps its prompt and the current
  student samples the completion (KV-cached generation from gemma2.generation, eval mode, no grad).
- seq_kd: the steps that are not on-policy train on completions the teacher samples instead of on
  the data (sequence-level KD, Kim & Rush 2016). Without it they train on the data as it is, so
  lmbda = 0 is plain distillation, unchanged.
- max_new_tokens and gen_temperature (0 = greedy) shape the sampling; beta (the JSD mixture) and
  the objective are the trainer's (gemma2.distill).

Prompts come from the packed training rows: each row's first prompt_len tokens (None: seq_len -
max_new_tokens, so a generated row is at most as long as a data row); or, from a prompt dataset
(gemma2.prompts), each row's left-padded prompt, sampled with its padding mask, stopped also by the
tokenizer's stop ids (`<end_of_turn>` for chats). The new row is the prompt followed by up to
max_new_tokens sampled tokens, the batch's rows ending at the step where every row on every rank
had stopped; its loss mask, written into the targets (`targets != IGNORE_INDEX`, the mask the
trainer's loss already reads), covers exactly the completion up to and including its first stop
token (the generating model's eos ids); later columns are padding. The teacher then
scores the whole row, so the KD (and, when alpha < 1, CE against the sampled tokens) runs on the
completion only.

Randomness without state: whether step s is on-policy is a pure function of (seed, s), the same on
every rank and for any world size, and the sampling generator of micro-batch i of step s on rank r
is seeded from (seed, s, r, i). A resumed run replays exactly what the uninterrupted run drew,
and the checkpoint needs no generator state for it. (With gen_temperature > 0 the samples depend
on how the global batch is split into ranks and micro-batches; with greedy sampling they do not.)

FSDP2: every rank samples its own rows. A forward of a sharded model is a collective, so every
rank must run the same number of them: generation never stops on its own (stop tokens are applied
here), and after each new token the ranks agree, with one all-reduce, whether every row on every
rank has stopped. Generation is a registered FSDP forward of the model's root. The student's
units are gathered once for the whole call (`_as_forward`), not once per new token: during
sampling each rank holds the whole student's unsharded parameters (gemma2.memory_plan traces it
with max_new_tokens); sample_sharded gathers each Block per new token instead, one at a time, as
the teacher's sampling (seq_kd) always does (the whole teacher is the largest model of the run).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from .config import Gemma2Config
from .data import IGNORE_INDEX, Batch, Datasets, Rows, eval_batches
from .distributed import Runtime
from .generation import stream
from .model import Gemma2ForCausalLM
from .prompts import PromptRows
from .teacher_cache import TeacherCache

if TYPE_CHECKING:
    from .teacher import Teacher
    from .trainer import TrainConfig, _StudentLoss

# Tags that keep these streams apart from each other (and from the data order's [seed, epoch]).
_COIN, _SAMPLING = 1, 2


def is_on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step `step` (0-based) trains on the student's own samples."""
    return lmbda > 0 and np.random.default_rng([seed, _COIN, step]).random() < lmbda


def sampling_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The seed of the generator that samples micro-batch `micro` of step `step` on rank `rank`."""
    return int(np.random.SeedSequence([seed, _SAMPLING, step, rank, micro]).generate_state(1, np.uint64)[0])


def prompt_length(cfg: TrainConfig, rows: Rows) -> int:
    """Tokens of each training row kept as the prompt: a prompt dataset's own width, else
    prompt_len (None: seq_len - max_new_tokens)."""
    if isinstance(rows, PromptRows):
        return rows.prompt_len
    return rows.seq_len - cfg.max_new_tokens if cfg.prompt_len is None else cfg.prompt_len


def _check_prompt_rows(cfg: TrainConfig, data: Datasets, student: Gemma2Config,
                       teacher: Gemma2ForCausalLM | TeacherCache | None) -> None:  # fmt: skip
    """The settings a prompt dataset (gemma2.prompts) needs."""
    rows, held = data.train, data.heldout
    if held is not None and not (isinstance(held, PromptRows) and (held.prompt_len, held.max_new_tokens)
                                 == (rows.prompt_len, rows.max_new_tokens)):  # fmt: skip
        raise ValueError("the held-out split of a prompt dataset must be prompt rows of the training rows' "
                         "prompt_len and max_new_tokens (gemma2.prompts.load_prompt_datasets lays out both)")  # fmt: skip
    if cfg.prompt_len is not None and cfg.prompt_len != rows.prompt_len:
        raise ValueError(f"prompt_len = {cfg.prompt_len}, but the prompt dataset was laid out with prompt_len = "
                         f"{rows.prompt_len}: pass the same value to both, or leave TrainConfig.prompt_len None")  # fmt: skip
    if cfg.max_new_tokens != rows.max_new_tokens:
        raise ValueError(f"max_new_tokens = {cfg.max_new_tokens}, but the prompt dataset was laid out for "
                         f"{rows.max_new_tokens} completion tokens: load it with the same max_new_tokens")  # fmt: skip
    if not rows.has_completions and cfg.lmbda < 1 and not cfg.seq_kd:
        raise ValueError(
            f"some training examples have no completion, which a step that is not on-policy (lmbda = {cfg.lmbda}) "
            "trains on: give every example a completion, or set lmbda = 1, or seq_kd"
        )
    live = isinstance(teacher, Gemma2ForCausalLM)
    if cfg.eval_every and held is not None and not held.has_completions and not live:
        raise ValueError("some held-out examples have no completion, and without a live teacher to score the "
                         "student's own completions nothing can be evaluated on them: give every example a "
                         "completion, or pass a live teacher, or eval_every = 0 (--eval-every 0)")  # fmt: skip
    # A sampled row holds prompt_len + max_new_tokens tokens, one more than a training row.
    evaluates = live and cfg.eval_every and held is not None  # eval_sample_kd samples from the student
    samplers = [("the student", student)] if cfg.lmbda > 0 or evaluates else []
    samplers += [("the teacher", teacher.config)] if cfg.seq_kd and live else []
    width = rows.prompt_len + rows.max_new_tokens
    for what, config in samplers:
        if width > config.max_position_embeddings:
            raise ValueError(
                f"a prompt with its sampled completion takes prompt_len {rows.prompt_len} + max_new_tokens "
                f"{rows.max_new_tokens} = {width} tokens, beyond the context of {what} "
                f"({config.max_position_embeddings}); lower --prompt-len or --max-new-tokens"
            )


def check_on_policy(
    cfg: TrainConfig, data: Datasets, student: Gemma2Config, teacher: Gemma2ForCausalLM | TeacherCache | None,
    sharded: bool = False,
) -> None:
    """ValueError naming the fix for settings that cannot work together, before any work.
    sharded: the models are FSDP2-sharded across processes (torchrun)."""
    if cfg.compile_sampling and sharded:
        raise ValueError(
            "compile_sampling runs in one process: FSDP2's gathering hooks cannot run inside a compiled "
            "decode step; drop compile_sampling (--compile-sampling) under torchrun"
        )
    if isinstance(data.train, PromptRows):
        _check_prompt_rows(cfg, data, student, teacher)
    if cfg.lmbda == 0 and not cfg.seq_kd:
        return
    what = f"on-policy distillation (lmbda = {cfg.lmbda})" if cfg.lmbda > 0 else "seq_kd"
    if teacher is None:
        raise ValueError(f"{what} needs a live teacher to score the sampled completions: pass a teacher model "
                         "(--teacher), or lmbda=0 without seq_kd")  # fmt: skip
    if isinstance(teacher, TeacherCache):
        raise ValueError(
            f"{what} needs a live teacher: a teacher cache holds its outputs for the data's tokens only, not "
            "for completions sampled during training; pass the teacher model (--teacher instead of "
            "--teacher-cache), or lmbda=0 without seq_kd"
        )
    if cfg.lmbda > 0 and cfg.alpha == 0:
        raise ValueError(
            f"lmbda = {cfg.lmbda} with alpha = 0 would train the student on cross-entropy against its own "
            "samples, which teaches it nothing: set alpha > 0 (1 = pure distillation, as GKD), or lmbda=0"
        )
    if isinstance(data.train, PromptRows):
        return  # its rows are laid out for its prompts and max_new_tokens (checked above)
    seq_len = data.train.seq_len
    P, N = prompt_length(cfg, data.train), cfg.max_new_tokens
    if P < 1:
        raise ValueError(
            f"max_new_tokens = {N} leaves no prompt in a training row of seq_len = {seq_len} tokens: lower "
            f"max_new_tokens below {seq_len}, raise seq_len, or pass prompt_len"
        )
    if P + N > seq_len:
        raise ValueError(
            f"prompt_len {P} + max_new_tokens {N} = {P + N} tokens exceed seq_len = {seq_len}: a generated "
            "row must fit in a training row; lower prompt_len or max_new_tokens (or raise seq_len)"
        )


@torch.no_grad()
def sample_completions(
    model: Gemma2ForCausalLM,
    batch: Batch,
    prompt_len: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    rt: Runtime,
    *,
    stop_ids: tuple[int, ...] = (),
    compiled: bool = False,
) -> Batch:
    """The rows of `batch` cut to their first `prompt_len` tokens of the row layout (columns from
    `batch.start`: a batch of prompt rows may begin inside the padding), with their padding mask
    `batch.valid`, if any, each followed by up to `max_new_tokens` tokens sampled from `model` (at
    `temperature`, 0 = greedy, with a generator seeded with `seed` on the model's device) and ended
    by the model's eos ids or `stop_ids`; targets count exactly the completion (see the module
    docstring). Returns a Batch on the model's device: inputs, targets (and valid)
    `[B, prompt_len - batch.start + n - 1]`, n <= max_new_tokens the steps until every row on every
    rank had stopped (the columns after them would be padding alone).
    compiled: decode through torch.compile (gemma2.static_decode: CUDA graphs on GPU; on CPU about
    2x for a few-million-parameter student), with the first call's seconds of compiling."""
    cfg = model.config
    device = model.output_weight.device
    generator = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor([*cfg.eos_ids, *stop_ids], device=device)
    P, N = prompt_len - batch.start, max_new_tokens
    prompts = batch.inputs[:, :P].to(device)  # [B, P]
    mask = None if batch.valid is None else batch.valid[:, :P].to(device)
    B = prompts.shape[0]
    window = prompts.new_full((B, P + N), cfg.pad_token_id)
    window[:, :P] = prompts
    counted = torch.zeros(B, P + N, dtype=torch.bool, device=device)  # the completion's columns
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # stop_token_ids=(): generation must not end early on one rank only (see the module docstring).
    steps = stream(model, prompts, attention_mask=mask, max_new_tokens=N, temperature=temperature,
                   stop_token_ids=(), generator=generator, pad_id=cfg.pad_token_id, compiled=compiled)  # fmt: skip
    n = 0
    for n, token in enumerate(steps, 1):
        counted[:, P + n - 1] = ~done
        window[:, P + n - 1] = token.masked_fill(done, cfg.pad_token_id)
        done |= torch.isin(token, stop)
        if n < N and rt.all_reduce((~done).sum()).item() == 0:
            break  # every row on every rank has stopped: all ranks leave at this same step
    window, counted = window[:, : P + n], counted[:, : P + n]
    targets = window[:, 1:].masked_fill(~counted[:, 1:], IGNORE_INDEX)
    valid = None if mask is None else torch.cat([mask, mask.new_ones(B, n - 1)], dim=1)
    return Batch(batch.indices, window[:, :-1], targets, valid, batch.start)


def _in_compute_dtype(model: Gemma2ForCausalLM, dtype: torch.dtype, fn: Callable) -> Callable:
    """`fn(model, ...)`, called instead with a copy of `model` whose weights are cast to `dtype`
    afresh at each call (and freed when it returns).

    A single process training in mixed precision keeps fp32 weights and runs its forward under
    autocast; KV-cached decoding does not run under autocast, and sampling from the fp32 weights
    would read twice the bytes per new token that FSDP2's bf16-gathered parameters do (decoding is
    bound by reading the weights). The copy samples as FSDP2 does, from the weights rounded to the
    compute dtype, and costs one cast of them per call. Measured (benchmark config of
    scripts/benchmark.py, 150M parameters, batch 8, 64 prompt tokens + 32 sampled, 2 CPU threads,
    medians): 0.84 s against 2.77 s sampling the fp32 weights, the cast included. torch.compile
    (compile_sampling) takes the copy's weights as inputs: no recompilation per copy."""

    def call(*args, **kwargs):
        with torch.device("meta"):
            copy = Gemma2ForCausalLM(model.config, model.attention, model.compile_attention)
        weights = {name: t.detach().to(dtype) for name, t in model.state_dict().items()}
        copy.load_state_dict(weights, strict=True, assign=True)
        return fn(copy.eval().requires_grad_(False), *args, **kwargs)

    return call


def _as_forward(root: nn.Module, fn: Callable, per_token: bool = False) -> Callable:
    """`fn` run as a forward of the FSDP2 root `root`, every unit's parameters gathered once for
    the whole call (per_token: before each of its forwards, as FSDP2 does); `fn` itself without FSDP.

    A unit is gathered before its forward and freed after it, so sampling N tokens gathers every
    Block N times (the whole model's weights moved N times per micro-batch, where a decode step
    reads them once). By default the Blocks stay gathered until the call returns: one all-gather
    per unit per call, at the cost of holding the whole model's unsharded parameters (in the
    compute dtype) while it runs, as TRL's generation under ZeRO-3 does by default.

    generation.py decodes under torch.inference_mode, and FSDP2 keeps the tensor that a parameter
    is first gathered into: gathered there first, it would be an inference tensor that the next
    training forward may not write. So every unit is gathered once here, outside inference mode."""
    if not isinstance(root, FSDPModule):
        return fn
    blocks = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    for module in [*blocks, root]:
        module.unshard()
        module.reshard()
    if per_token:
        blocks = []

    def gathered(*args, **kwargs):
        for block in blocks:  # gemma2.distributed.shard leaves each Block resharding after forward
            block.set_reshard_after_forward(False, recurse=False)
        try:
            return fn(*args, **kwargs)
        finally:
            for block in blocks:
                block.set_reshard_after_forward(True, recurse=False)
                block.reshard()

    root._sample_completions = gathered  # the method FSDP2 wraps with its pre- and post-forward
    register_fsdp_forward_method(root, "_sample_completions")
    return root._sample_completions


def student_sampler(
    loss_mod: _StudentLoss, student: Gemma2ForCausalLM, fn: Callable, per_token: bool = False
) -> Callable:
    """`fn(model, ...)` with `model` the student as the trainer samples from it: its weights in the
    compute dtype (`_in_compute_dtype` when one process trains in mixed precision) and, under FSDP2,
    one forward of the loss module's root with every unit gathered once (per_token: per new token;
    `_as_forward`)."""
    sampler = _in_compute_dtype(student, loss_mod.dtype, fn) if loss_mod.autocast else partial(fn, student)
    return _as_forward(loss_mod, sampler, per_token)


def teacher_sampler(teacher: Teacher, fn: Callable) -> Callable:
    """`fn(model, ...)` with `model` the live teacher as seq_kd samples from it: in its own dtype
    and, under FSDP2, one forward of its root with each Block gathered per new token (gathered
    whole, the run's largest model would be held at once on every rank: a 27B, 50 GiB)."""
    return _as_forward(teacher.root, partial(fn, teacher.model), True)


class Rollouts:
    """The trainer's entry point: each step's micro-batches, replaced by sampled ones when the step
    is on-policy (or, with seq_kd, by the teacher's samples), and the metrics of that; and the
    evaluation of the student on its own samples."""

    def __init__(self, cfg: TrainConfig, student: Gemma2ForCausalLM, loss_mod: _StudentLoss,
                 teacher: Teacher | None, rows: Rows, rt: Runtime, start_step: int) -> None:  # fmt: skip
        """loss_mod: the trainer's student loss (gemma2.trainer._StudentLoss; under FSDP2 the root
        that gathers the student), which evaluation runs in the mode the trainer sets."""
        self.cfg, self.rt, self.loss_mod, self.teacher = cfg, rt, loss_mod, teacher
        self.active = cfg.lmbda > 0 or cfg.seq_kd
        # What on-policy training aims at, measured for every run that samples or trains on prompts.
        live = teacher is not None and teacher.model is not None
        self.evaluates = live and (self.active or isinstance(rows, PromptRows))
        if not (self.active or self.evaluates):
            return
        self.prompt_len = prompt_length(cfg, rows)
        self.rows = cfg.batch_size * cfg.grad_accum * rt.world  # per step, all ranks
        stop_ids = rows.stop_ids if isinstance(rows, PromptRows) else ()
        sample = partial(sample_completions, stop_ids=stop_ids, compiled=cfg.compile_sampling)
        wanted = cfg.lmbda > 0 or self.evaluates
        self.sample_student = student_sampler(loss_mod, student, sample, cfg.sample_sharded) if wanted else None
        self.sample_teacher = teacher_sampler(teacher, sample) if cfg.seq_kd else None
        self.on_policy_steps = sum(is_on_policy(cfg.seed, s, cfg.lmbda) for s in range(start_step))
        self.generated = False  # whether this step's rows were sampled

    def __call__(self, micro: list[Batch], step: int) -> list[Batch]:
        """This step's micro-batches to train on: `micro` itself unless its rows are sampled."""
        if not self.active:
            return micro
        cfg = self.cfg
        on_policy = is_on_policy(cfg.seed, step, cfg.lmbda)
        self.on_policy_steps += on_policy
        sample = self.sample_student if on_policy else self.sample_teacher
        self.generated = sample is not None
        if sample is None:
            return micro
        return [sample(batch, self.prompt_len, cfg.max_new_tokens, cfg.gen_temperature,
                       sampling_seed(cfg.seed, step, self.rt.rank, i), self.rt) for i, batch in enumerate(micro)]

    @torch.no_grad()
    def evaluate(self, heldout: Rows) -> dict:
        """The student's greedy completions of the held-out prompts (the first eval_sequences rows),
        scored by the teacher: eval_sample_kd, the run's KD objective per completion token (times
        temperature**2, as eval_kd), and eval_sample_len, the completions' mean length in tokens.
        Nothing unless there is a live teacher and the run samples or trains on prompts. The
        trainer puts the loss module in eval mode first."""
        if not self.evaluates:
            return {}
        cfg, rt = self.cfg, self.rt
        sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # kd, tokens, rows
        for batch in eval_batches(heldout, cfg.batch_size, rank=rt.rank, world_size=rt.world,
                                  max_sequences=cfg.eval_sequences):  # fmt: skip
            rows = self.sample_student(batch, self.prompt_len, cfg.max_new_tokens, 0.0, 0, rt)
            inputs, targets = rows.inputs.to(rt.device), rows.targets.to(rt.device)
            _, st = self.loss_mod(inputs, targets, self.teacher(rows, "heldout"), valid=rows.valid_on(rt.device))
            self.teacher.release()
            counts = torch.tensor([st.tokens, len(rows.inputs)], device=rt.device)
            sums += torch.cat([st.kd_sum.reshape(1), counts]).double()
        kd, tokens, count = rt.all_reduce(sums).tolist()
        return {"eval_sample_kd": kd / tokens * cfg.temperature**2, "eval_sample_len": tokens / count}

    def metrics(self, step: int, counted_tokens: float) -> dict:
        """For step `step` (0-based), whose rows counted `counted_tokens` tokens on all ranks:
        on_policy_fraction (of the steps so far) and completion_len (mean tokens per sampled
        completion, None when the step trained on the data); nothing when neither lmbda nor seq_kd
        is set."""
        if not self.active:
            return {}
        return {"on_policy_fraction": self.on_policy_steps / (step + 1),
                "completion_len": counted_tokens / self.rows if self.generated else None}  # fmt: skip

    @staticmethod
    def postfix(record: dict) -> str:
        """The progress bar's part for a step's metrics record ("" without on-policy metrics)."""
        if "on_policy_fraction" not in record:
            return ""
        length = record["completion_len"]
        return f", on-policy={record['on_policy_fraction']:.0%}" + ("" if length is None else f", completion={length:.1f}")
