"""The teacher of a distillation run: a live model or an offline top-k cache, behind one type.

`Teacher(source, data, rt)` takes either a frozen Gemma2ForCausalLM (eval mode, no grad, its own
dtype and device; sharded with FSDP2 under torchrun, and then filled if it comes from
gemma2.sharded_load.load_sharded) or a gemma2.teacher_cache.TeacherCache, and
gives the trainer what the loss reads for a batch: a TeacherHead (final hidden states and the tied
head, logits made chunk by chunk) or TopK (the cached top-k log-probs). `check_teacher` says, before
any work, whether a source fits a student and the run's objective.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .data import Batch, Datasets
from .distill import TeacherHead, TopK
from .distributed import Runtime, move_to, shard, weights_checksum
from .dtypes import dtype_name
from .model import Gemma2ForCausalLM
from .teacher_cache import TeacherCache


def teacher_vocab_size(source: Gemma2ForCausalLM | TeacherCache) -> int:
    """The vocabulary a student of this teacher must have."""
    return source.vocab_size if isinstance(source, TeacherCache) else source.config.vocab_size


def teacher_record(source: Gemma2ForCausalLM | TeacherCache | None) -> dict | None:
    """What a resumed run's teacher must equal (gemma2.run_dir): a model's config and dtype (its
    weights' checksum joins once they are on the device: `Teacher.checksum`), or a cache's k,
    temperature and each split's token fingerprint and teacher cross-entropy (which the teacher's
    weights decide)."""
    if source is None:
        return None
    if isinstance(source, TeacherCache):
        splits = {name: [s.fingerprint, s.teacher_ce] for name, s in source.splits.items()}
        return {"cache": {"k": source.k, "temperature": source.temperature, "splits": splits}}
    return {"config": dataclasses.asdict(source.config), "dtype": dtype_name(source.dtype)}


def check_teacher(source: Gemma2ForCausalLM | TeacherCache, vocab_size: int, temperature: float, objective: str,
                  data: Datasets | None = None) -> None:  # fmt: skip
    """ValueError naming the fix when `source` cannot teach a student of `vocab_size` (on `data`,
    for a cache: its splits must have been computed from exactly these tokens)."""
    teacher_vocab = teacher_vocab_size(source)
    if isinstance(source, Gemma2ForCausalLM) and source.output_weight.dtype == torch.int8:
        raise ValueError(
            "the teacher has int8 weights (gemma2.quantize), but the chunked loss reads its output head "
            "as a float matrix: cache it first with scripts/cache_teacher.py (which runs int8 models) "
            "and pass --teacher-cache, or load a bf16/fp32 checkpoint of it"
        )
    if isinstance(source, Gemma2ForCausalLM) and teacher_vocab != vocab_size:
        raise ValueError(
            f"student vocab size {vocab_size} != teacher vocab size {teacher_vocab}: distillation "
            "compares distributions over the same token ids; build the student with the teacher's "
            f"vocab_size (load_student(..., vocab_size={teacher_vocab})) and its tokenizer"
        )
    if isinstance(source, TeacherCache):
        if teacher_vocab != vocab_size:
            raise ValueError(
                f"student vocab size {vocab_size} != the teacher cache's {teacher_vocab}: build the student "
                f"with vocab_size={teacher_vocab} and the tokenizer the cache was made with"
            )
        source.check_temperature(temperature)
        if data is not None:
            source.split("train").check(data.train, "training")
            if data.heldout is not None and "heldout" in source.splits:
                source.split("heldout").check(data.heldout, "held-out")
        if objective != "forward_kl":  # held-out KD uses the objective too, even at alpha = 0
            raise ValueError(f"a top-k teacher cache supports only objective='forward_kl', got {objective!r}")


class _TeacherHidden(nn.Module):
    """The teacher's final hidden states as a module forward, so FSDP2 unshards its root."""

    def __init__(self, teacher: Gemma2ForCausalLM) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, inputs: Tensor, valid: Tensor | None = None) -> Tensor:
        return self.teacher.hidden_states(inputs, valid)


class Teacher:
    """The teacher of a run as one type: gives the KD target of a batch, a TeacherHead from a live
    model (sharded with the student under torchrun) or TopK from an offline cache."""

    def __init__(self, teacher: Gemma2ForCausalLM | TeacherCache, data: Datasets, rt: Runtime) -> None:
        self.rt = rt
        self.model: Gemma2ForCausalLM | None = None
        self.cache: TeacherCache | None = None
        if isinstance(teacher, TeacherCache):  # its splits checked against the data (check_teacher)
            self.cache = teacher
            self.heldout = None
            if data.heldout is not None and "heldout" in teacher.splits:
                self.heldout = teacher.split("heldout")
            return
        self.model = teacher.eval().requires_grad_(False)
        self.heldout = None
        self.root = _TeacherHidden(teacher)
        if rt.sharded:
            move_to(teacher, rt.device)
            shard(self.root, teacher, rt, param_dtype=None)  # the teacher computes in its own dtype
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
            return part.topk(batch.indices, self.rt.device, batch.columns)
        inputs = batch.inputs.to(self.device, non_blocking=True)
        hidden = self.root(inputs, batch.valid_on(self.device, non_blocking=True)).to(self.rt.device)
        if self.rt.sharded:
            self.root.unshard()  # the tied head lives in the root group: gather it for the loss
            weight = self.model.output_weight
        else:
            weight = self._weight
        return TeacherHead(hidden, weight, self.model.config.final_logit_softcapping)

    def checksum(self) -> list[float]:
        """A live teacher's `weights_checksum` over all ranks' shards."""
        return self.rt.all_reduce(weights_checksum(self.model).to(self.rt.device)).tolist()

    def release(self) -> None:
        """Free the gathered teacher head once the loss that reads it is done."""
        if self.model is not None and self.rt.sharded:
            self.root.reshard()
