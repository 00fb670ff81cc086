"""How well a model predicts held-out tokens, alone or beside its teacher: what scripts/evaluate.py
reports.

Over the counted targets of some rows (gemma2.data: packed documents, or prompt rows whose
completions alone count, as in training):
- the model's cross-entropy (nats per token) and perplexity exp(CE);
- with a teacher of the same vocabulary: the teacher's own, the forward KL divergence
  KL(p_teacher || p_model) per token at temperature 1 (the objective Gemma 2's students were
  trained on; `gemma2.distill.divergence`), and top-1 agreement, the share of tokens where both
  models' likeliest next token is the same (greedy speculative decoding keeps a drafted token
  exactly when the two agree there).

Each model's logits are its own (`Gemma2ForCausalLM.logits`: soft-capped, fp32; an int8 model's
through its int8 head), made `chunk_size` counted tokens at a time, so at most a few
`[chunk_size, V]` fp32 tensors exist at once (256 x 256000: 262 MB each); sums are fp64. The
trainer's evaluation (gemma2.distill.distill_sums) computes its CE and KD from a float `[V, D]`
head, which an int8 model does not have, and no argmax: hence this loop of its own, over the
textbook definitions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import IGNORE_INDEX, Rows, eval_batches
from .distill import divergence
from .model import Gemma2ForCausalLM


def perplexity(ce: float) -> float:
    """exp(cross-entropy in nats): inf where a double overflows (CE > 709.78), NaN for NaN."""
    return math.exp(ce) if not ce > 709 else math.inf


@dataclass(frozen=True)
class Evaluation:
    """Means per counted token; the teacher's fields are None without a teacher."""

    sequences: int
    tokens: int  # counted targets
    ce: float
    teacher_ce: float | None = None
    kl: float | None = None  # KL(p_teacher || p_model), nats per token
    top1_agreement: float | None = None

    @property
    def ppl(self) -> float:
        return perplexity(self.ce)

    @property
    def teacher_ppl(self) -> float | None:
        return None if self.teacher_ce is None else perplexity(self.teacher_ce)

    def as_dict(self) -> dict:
        """Every field and perplexity, without the teacher's when there was none."""
        out = asdict(self) | {"ppl": self.ppl, "teacher_ppl": self.teacher_ppl}
        return {k: v for k, v in out.items() if v is not None}


@torch.inference_mode()
def evaluate(
    model: Gemma2ForCausalLM,
    *rows: Rows,
    teacher: Gemma2ForCausalLM | None = None,
    batch_size: int = 8,
    max_sequences: int | None = None,
    chunk_size: int = 256,
    progress: bool = False,
) -> Evaluation:
    """The measures above over the first `max_sequences` (all by default) sequences of each of
    `rows`, taken in order, `batch_size` at a time; model and teacher on one device."""
    if batch_size < 1 or chunk_size < 1 or max_sequences is not None and max_sequences < 1:
        raise ValueError(f"batch_size, chunk_size and max_sequences must be >= 1, got {batch_size}, {chunk_size} "
                         f"and {max_sequences}")  # fmt: skip
    device = model.output_weight.device
    if teacher is not None:
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the teacher's vocabulary of {teacher.config.vocab_size} is not the model's "
                             f"{model.config.vocab_size}: compare models that share a tokenizer")  # fmt: skip
        if teacher.output_weight.device != device:
            raise ValueError(f"the teacher is on {teacher.output_weight.device} but the model on {device}; move "
                             "one with .to()")  # fmt: skip
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # model CE, teacher CE, KL, agreeing tokens
    tokens = 0
    sizes = [len(r) if max_sequences is None else min(len(r), max_sequences) for r in rows]
    batches = (batch for r in rows for batch in eval_batches(r, batch_size, max_sequences=max_sequences))
    total = sum(-(-size // batch_size) for size in sizes)
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, total=total):
        inputs, valid = batch.inputs.to(device), batch.valid_on(device)
        targets = batch.targets.to(device)
        counted = targets != IGNORE_INDEX
        targets = targets[counted]
        hidden = model.hidden_states(inputs, valid)[counted]  # [n, D]
        teacher_hidden = None if teacher is None else teacher.hidden_states(inputs, valid)[counted]
        for lo in range(0, len(targets), chunk_size):
            part, target = slice(lo, lo + chunk_size), targets[lo : lo + chunk_size]
            ls = model.logits(hidden[part]).log_softmax(-1)  # [c, V] fp32
            sums[0] += F.nll_loss(ls, target, reduction="sum").double()
            if teacher is not None:
                lt = teacher.logits(teacher_hidden[part]).log_softmax(-1)
                sums[1:] += torch.stack([
                    F.nll_loss(lt, target, reduction="sum"),
                    divergence(ls, lt, "forward_kl", 0.0).sum(),
                    (ls.argmax(-1) == lt.argmax(-1)).sum(),
                ]).double()  # fmt: skip
        tokens += len(targets)
    if tokens == 0:
        raise ValueError(f"the {sum(sizes)} sequences evaluated hold no counted target (prompt rows without "
                         "completions?); evaluate rows with targets")  # fmt: skip
    ce, teacher_ce, kl, agreeing = (sums / tokens).tolist()
    if not math.isfinite(ce + teacher_ce + kl):
        raise ValueError("a model's logits are NaN or inf: its weights are not finite or its activations overflowed; "
                         "check the checkpoints or use float32")  # fmt: skip
    if teacher is None:
        return Evaluation(sum(sizes), tokens, ce)
    return Evaluation(sum(sizes), tokens, ce, teacher_ce, kl, agreeing)
