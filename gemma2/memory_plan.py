"""Will a training run fit? Trace one step of the trainer on fake tensors and account every byte.

`plan_memory` builds the student (and the teacher) as FakeTensors, which have shapes, dtypes and
storage sizes but no data, under a fake process group of the run's world size, and runs one
optimizer step through the trainer's own pieces: `_prepare_student` (activation checkpointing,
FSDP2 sharding, mixed precision), the teacher's `Teacher` wrapper, `_StudentLoss` (the forward and
the chunked loss), backward, gradient clipping and `build_optimizer`'s AdamW. A dispatch mode sees
every tensor each operation creates and every storage as it is freed, so the peak it records is the
peak of live tensor bytes on one rank for that code, not a formula that could drift from it.

With `max_new_tokens` (on-policy distillation, gemma2.on_policy) the student's sampling of a
micro-batch is traced too, after the step (the optimizer state alive, the gradients freed, as
between the trainer's steps), through the trainer's own sampler (`student_sampler`: under FSDP2
every unit gathered for the whole call; one process in mixed precision: a cast copy of the
weights): its KV cache, the prompts' prefill and one decode step (later steps reuse the cache).
With `seq_kd` the live teacher's sampling is traced the same way, through `teacher_sampler` (in
its own dtype, one Block gathered at a time): its KV cache is the teacher's, often the larger. It
is traced after the student's, as it runs in the first step after an evaluation: FSDP2 keeps the
root of the student (its embedding) gathered after a forward without backward. A run needs the
largest of the peaks.

The peak is broken down by what the live bytes were at that moment: the student's parameters,
gradients and optimizer state, the teacher's weights (all as this rank's shards), and the rest:
activations saved for backward and transients (unsharded FSDP blocks, the gathered embeddings,
loss chunks, optimizer temporaries). The largest single allocation of the step is reported too.

Not counted: the CUDA context and the caching allocator's rounding and fragmentation (the margin
in `MemoryPlan.fits` is for those), NCCL buffers, and the data loader. One process (world 1)
traces the unsharded path with autocast on the CPU's autocast lists, close to but not exactly
CUDA's. The fake process group is torch's testing backend (torch.testing._internal), the only way
to trace collectives without peers.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .compatibility import check_seq_len
from .config import Gemma2Config
from .data import Batch
from .distill import TopK
from .distributed import Runtime, local_shard
from .dtypes import to_dtype
from .kv_cache import KVCache
from .model import Gemma2ForCausalLM
from .on_policy import student_sampler, teacher_sampler
from .teacher import Teacher
from .trainer import TrainConfig, _clip_gradients, _prepare_student, _StudentLoss, build_optimizer

GiB = 2**30
CUDA_CONTEXT = 1 * GiB  # CUDA context, kernels and cuBLAS workspaces: not tensors, not traced
MARGIN = 0.10  # of the device's memory, for the caching allocator's rounding and fragmentation


class _LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that operations created, their peak, and a snapshot of what was
    alive then. Each storage gets a serial number (ids of freed objects are reused) and is dropped
    through a weak reference when freed."""

    def __init__(self) -> None:
        super().__init__()
        self.serial: dict[int, int] = {}  # id(storage) -> serial, while it lives
        self.live: dict[int, int] = {}  # serial -> bytes
        self._refs: dict[int, weakref.ref] = {}
        self._next = 0
        self.now = 0
        self.peak = 0
        self.at_peak: dict[int, int] = {}
        self.largest = 0

    def add(self, t: Tensor) -> None:
        st = t.untyped_storage()
        if id(st) in self.serial:
            return
        n, key = st.nbytes(), self._next
        self._next += 1
        self.serial[id(st)], self.live[key] = key, n
        self._refs[key] = weakref.ref(st, lambda _, key=key, ident=id(st): self._drop(key, ident))
        self.now += n
        self.largest = max(self.largest, n)

    def _drop(self, key: int, ident: int) -> None:
        self.now -= self.live.pop(key)
        del self._refs[key], self.serial[ident]

    def _resized(self, st: torch.UntypedStorage) -> None:
        key = self.serial.get(id(st))
        if key is not None:
            self.now += st.nbytes() - self.live[key]
            self.live[key] = st.nbytes()
            self.largest = max(self.largest, st.nbytes())
            if self.now > self.peak:
                self.reset_peak()

    def __enter__(self):
        # FSDP2 frees and reallocates unsharded parameters by resizing their storage, which no
        # dispatch mode sees: watch it here.
        self._resize = resize = torch.UntypedStorage.resize_

        def resize_(st: torch.UntypedStorage, size: int):
            out = resize(st, size)
            self._resized(st)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def serials(self, tensors) -> set[int]:
        """The serial numbers of the storages of `tensors` (DTensors: their local shards)."""
        out = set()
        for t in tensors:
            ident = id(local_shard(t).untyped_storage())
            if ident in self.serial:
                out.add(self.serial[ident])
        return out

    def reset_peak(self) -> None:
        self.peak, self.at_peak = self.now, dict(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default and isinstance(args[0], FakeTensor):
            # A fake tensor has no values: the plan assumes every token counts (the most memory),
            # so the indices of the counted rows are all of them.
            (mask,) = args
            out = torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            # Only fake tensors hold (fake) memory, except on `meta` (a model built there before it is
            # given weights); a DTensor is a wrapper around a local one.
            if isinstance(t, FakeTensor) and t.device.type != "meta":
                self.add(t)
        if self.now > self.peak:
            self.reset_peak()
        return out


@contextmanager
def _fake_world(world: int) -> Iterator[None]:
    """A fake process group of `world` ranks (this process is rank 0): collectives return at once."""
    if world == 1:
        yield
        return
    if dist.is_initialized():
        raise ValueError("plan_memory runs in a process outside any process group; call it before init_distributed")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class Phase:
    """One rank's memory over a traced sampling call between steps."""

    at_peak: dict[str, int]  # category -> bytes alive at the call's peak (they sum to `peak`)
    peak: int


@dataclass
class MemoryPlan:
    """One rank's memory over a traced training step (and the sampling between steps)."""

    at_peak: dict[str, int]  # category -> bytes alive at the step's peak (they sum to `peak`)
    held: dict[str, int]  # category -> bytes held once the step is done (before zero_grad)
    peak: int  # the most tensor bytes alive at once on one rank
    largest_allocation: int  # the largest single tensor the step created
    world: int
    phases: dict[str, Phase]  # "sampling" (the student's), "teacher sampling" (seq_kd): those traced

    def required(self) -> int:
        """What a device needs: the largest traced peak (the step's or a sampling's) plus the CUDA context."""
        return max([self.peak, *(phase.peak for phase in self.phases.values())]) + CUDA_CONTEXT

    def fits(self, device_bytes: float) -> bool:
        """True when the peak plus the CUDA context leaves MARGIN of the device free."""
        return self.required() <= (1 - MARGIN) * device_bytes

    def table(self, device_bytes: float | None = None) -> str:
        """The plan as a text table (GiB per rank), a column per traced phase, with a verdict when
        `device_bytes` is given."""
        phases = self.phases.values()
        widths = [8, 11] + [max(9, len(name)) for name in self.phases]

        def row(label: str, cells: list, missing: str = "-") -> str:
            return f"{label:<30} " + " ".join(f"{missing if b is None else f'{b / GiB:.2f}':>{w}}"
                                              for b, w in zip(cells, widths))  # fmt: skip

        head = ["at peak", "after step", *self.phases]
        lines = [f"{'GiB per rank, ' + str(self.world) + ' rank(s)':<30} " + " ".join(map(str.rjust, head, widths))]
        for name in dict.fromkeys([*self.at_peak, *(name for phase in phases for name in phase.at_peak)]):
            cells = [self.at_peak.get(name), self.held.get(name), *(phase.at_peak.get(name) for phase in phases)]
            lines.append(row(name, cells))
        lines += [row("peak (traced tensors)", [self.peak, None, *(p.peak for p in phases)], missing=""),
                  f"{'  largest single tensor':<30} {self.largest_allocation / GiB:8.2f}",
                  f"{'+ CUDA context':<30} {CUDA_CONTEXT / GiB:8.2f}",
                  f"{'= needed':<30} {self.required() / GiB:8.2f}"]  # fmt: skip
        if device_bytes is not None:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(f"{verdict} in {device_bytes / GiB:.1f} GiB per device (keeping {MARGIN:.0%} free)")
        return "\n".join(lines)


def step_config(
    batch_size: int, *, distilling: bool, dtype: str = "bf16", chunk_size: int = 1024, activation_checkpointing: bool = False
) -> TrainConfig:
    """The TrainConfig of the step `plan_memory` traces: pure distillation (alpha 1) when there is a
    teacher, plain next-token CE (alpha 0) when not."""
    return TrainConfig(out_dir="", batch_size=batch_size, alpha=1.0 if distilling else 0.0, dtype=dtype,
                       chunk_size=chunk_size, activation_checkpointing=activation_checkpointing)  # fmt: skip


def training_step(
    student: Gemma2ForCausalLM,
    cfg: TrainConfig,
    rt: Runtime,
    batch: Batch,
    *,
    teacher: Gemma2ForCausalLM | None = None,
    teacher_cache_k: int | None = None,
    device_type: str = "cuda",
    started: Callable[[], None] = lambda: None,
) -> tuple[torch.optim.AdamW, _StudentLoss, Teacher | None]:
    """One optimizer step on one micro-batch through the trainer's own pieces: `_prepare_student`,
    the teacher (a live model; or, with teacher_cache_k, the TopK tensors a top-k cache hands the
    loss, a uniform distribution here: memory does not depend on the values; or neither), the chunked
    loss at `cfg.alpha`, backward, gradient clipping and `build_optimizer`'s AdamW.

    `plan_memory` traces it on fake tensors; scripts/bench_preset.py runs it on a device to measure
    the peak the plan predicts. `started()` is called once the set-up is done: the step's peak
    begins there. Returns the optimizer (its state is part of the plan), the student's loss
    module and the live teacher (what `plan_memory`'s sampling goes through)."""
    loss_mod = _prepare_student(student, cfg, rt)
    source = Teacher(teacher, None, rt) if teacher is not None else None
    optimizer = build_optimizer(student, cfg, torch.device(device_type))
    started()
    inputs, targets = batch.inputs.to(rt.device), batch.targets.to(rt.device)
    B, T = inputs.shape
    src = None
    if source is not None:
        src = source(batch, "train")
    elif teacher_cache_k is not None:
        k, device = teacher_cache_k, rt.device
        share = torch.full((B, T), -math.log(k + 1), device=device)  # each id and the tail: 1 / (k + 1)
        src = TopK(torch.arange(k, device=device).repeat(B, T, 1), share[..., None].repeat(1, 1, k), share)
        del share  # held by src alone, freed with it
    loss, _ = loss_mod(inputs, targets, src, float(B * T), cfg.alpha)
    if source is not None:
        source.release()
    loss.backward()
    del loss, src
    _clip_gradients(student, cfg.grad_clip)
    optimizer.step()
    return optimizer, loss_mod, source


@torch.inference_mode()
def _decode_start(model: Gemma2ForCausalLM, batch_size: int, prompt_len: int, max_new_tokens: int,
                  device: torch.device) -> KVCache:  # fmt: skip
    """What sampling a micro-batch allocates (gemma2.on_policy.sample_completions through
    gemma2.generation): the KV cache of prompt_len + max_new_tokens columns in the model's dtype, the
    prompts' prefill and one decode step; later steps write into the same cache."""
    cache = KVCache(model.config, batch_size, prompt_len + max_new_tokens, dtype=model.dtype, device=device)
    prompts = torch.zeros(batch_size, prompt_len, dtype=torch.long, device=device)
    token = model.last_logits(prompts, None, cache).argmax(-1, keepdim=True)
    model.last_logits(token, None, cache)
    return cache


def plan_memory(
    student: Gemma2Config,
    *,
    seq_len: int,
    batch_size: int,
    world: int = 1,
    teacher: Gemma2Config | None = None,
    teacher_cache_k: int | None = None,
    dtype: str = "bf16",
    teacher_dtype: str = "bf16",
    activation_checkpointing: bool = False,
    chunk_size: int = 1024,
    device_type: str = "cuda",
    attention: str = "auto",
    max_new_tokens: int = 0,
    prompt_len: int | None = None,
    sample_sharded: bool = False,
    seq_kd: bool = False,
) -> MemoryPlan:
    """Trace one training step (one micro-batch, forward, backward, clip, AdamW) of the trainer on
    fake tensors on rank 0 of `world` and return its peak memory per rank.

    teacher: a live teacher's config (its weights in `teacher_dtype`); teacher_cache_k: distil
    from a top-k cache instead (the batch's TopK tensors). dtype: the compute dtype ("bf16" or
    "fp32"; master weights stay fp32). device_type: "cuda" picks the trainer's fused AdamW, "cpu"
    its foreach AdamW (which allocates temporaries the size of the parameters). attention: both
    models' kernels (gemma2.model), "auto" as the trainer and load_model run them: the trace, on
    the CPU, then runs `banded` (training: recomputed in backward), where CUDA runs compiled
    FlexAttention; neither keeps a score matrix for backward. max_new_tokens: on-policy, the student
    also samples that many tokens after prompt_len of each row (None: seq_len - max_new_tokens, the
    trainer's default); 0: nothing is sampled. sample_sharded: as TrainConfig's (FSDP2 gathers one
    Block at a time while sampling). seq_kd: the live teacher samples too (as many tokens)."""
    if teacher is not None and teacher_cache_k is not None:
        raise ValueError("pass a live teacher's config or a cache's k, not both")
    if seq_len < 1 or (teacher_cache_k is not None and teacher_cache_k < 1):
        raise ValueError(f"seq_len and the cache's k must be >= 1, got seq_len {seq_len} and k {teacher_cache_k}")
    for config, what in ((student, "the student"), (teacher, "the teacher")):
        if config is not None:
            check_seq_len(seq_len, config, what)  # as the trainer refuses it (and a trace would run for minutes)
    P = seq_len - max_new_tokens if prompt_len is None else prompt_len
    if prompt_len is None and max_new_tokens >= seq_len:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no prompt in a row of seq_len {seq_len} (the "
                         f"prompt is seq_len - max_new_tokens): lower max_new_tokens below {seq_len}, raise "
                         "seq_len, or pass prompt_len")  # fmt: skip
    # A sampled row holds P + N tokens: one more than a training row of a prompt dataset (P + N - 1).
    if max_new_tokens < 0 or max_new_tokens and not 1 <= P <= seq_len + 1 - max_new_tokens:
        raise ValueError(f"max_new_tokens must be >= 0 and, with a prompt of >= 1 token, fit a row of seq_len "
                         f"{seq_len}; got {max_new_tokens} new tokens after a prompt of {P}")  # fmt: skip
    if not max_new_tokens and (prompt_len is not None or sample_sharded):  # they shape sampling: say it is off
        raise ValueError("prompt_len and sample_sharded describe on-policy sampling, which is off without "
                         "max_new_tokens: pass max_new_tokens (--max-new-tokens) too, or drop them")  # fmt: skip
    if seq_kd and (teacher is None or not max_new_tokens):
        raise ValueError("seq_kd samples from a live teacher: pass its config (--teacher) and how many tokens "
                         "it samples (--max-new-tokens)")
    cfg = step_config(batch_size, distilling=teacher is not None or teacher_cache_k is not None, dtype=dtype,
                      chunk_size=chunk_size, activation_checkpointing=activation_checkpointing)  # fmt: skip
    cpu = torch.device("cpu")
    rt = Runtime(0, world, cpu, world > 1)
    tracker = _LiveBytes()
    T = seq_len
    inputs = torch.zeros(batch_size, T, dtype=torch.long)  # real: the trainer's batches come from the host
    batch = Batch(torch.arange(batch_size), inputs, inputs.clone())
    # Built on meta (no memory), given fake storage inside the trace: fake tensors cannot be cast.
    with torch.device("meta"):
        model = Gemma2ForCausalLM(student, attention)
        t_model = Gemma2ForCausalLM(teacher, attention).to(to_dtype(teacher_dtype)) if teacher is not None else None
    with _fake_world(world), FakeTensorMode(allow_non_fake_inputs=True), tracker:
        model.to_empty(device=cpu)
        if t_model is not None:
            t_model.to_empty(device=cpu)
        # The step's peak, not the set-up's (each rank builds the full models before sharding).
        optimizer, loss_mod, source = training_step(model, cfg, rt, batch, teacher=t_model,
                                                    teacher_cache_k=teacher_cache_k, device_type=device_type,
                                                    started=tracker.reset_peak)  # fmt: skip
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        groups = {
            "student parameters": tracker.serials(model.parameters()),
            "student gradients": tracker.serials(p.grad for p in model.parameters() if p.grad is not None),
            "optimizer state": tracker.serials(states),
            "teacher weights": tracker.serials(t_model.parameters()) if t_model is not None else set(),
        }
        held = {name: sum(tracker.live[k] for k in ids) for name, ids in groups.items()}
        at_peak = _breakdown(tracker, groups, "activations and transients")
        peak, largest, phases = tracker.peak, tracker.largest, {}
        optimizer.zero_grad(set_to_none=True)  # as the trainer does after each step
        # The start of a micro-batch's sampling through the trainer's own samplers: the student's
        # (on-policy and in evaluation), and with seq_kd the teacher's (one at a time).
        samplers = {}
        if max_new_tokens:
            samplers["sampling"] = student_sampler(loss_mod, model, _decode_start, sample_sharded)
        if seq_kd:
            samplers["teacher sampling"] = teacher_sampler(source, _decode_start)
        for name, sample in samplers.items():
            tracker.reset_peak()
            cache = sample(batch_size, P, max_new_tokens, rt.device)
            kv = tracker.serials([*cache.keys, *cache.values])
            del cache  # freed before the next sampling (what FSDP2 left gathered stays: see the docstring)
            phases[name] = Phase(_breakdown(tracker, groups | {"KV cache": kv}, "sampling weights, transients"),
                                 tracker.peak)  # fmt: skip
    return MemoryPlan(at_peak, held, peak, largest, world, phases)


def _breakdown(tracker: _LiveBytes, groups: dict[str, set[int]], rest: str) -> dict[str, int]:
    """The bytes alive at the tracker's peak by group (storage serials), the remainder as `rest`."""
    out = {name: sum(b for key, b in tracker.at_peak.items() if key in ids) for name, ids in groups.items()}
    out[rest] = tracker.peak - sum(out.values())
    return out


def suggestions(device_bytes: float, **run) -> list[str]:
    """For a run (plan_memory's keyword arguments) that does not fit `device_bytes`: the single
    changes that make it fit, each checked with its own plan; of each kind (`change_kinds`) the
    mildest is named."""
    found = []
    for _, options in change_kinds(**run):
        for label, change in options:
            if plan_memory(**(run | change)).fits(device_bytes):
                found.append(label)
                break
    return found


def change_kinds(**run) -> list[tuple[str, list[tuple[str, dict]]]]:
    """The kinds of single change `suggestions` tries for a run, each (its name, its options from
    the mildest: (label, plan_memory's changed arguments)): activation checkpointing, a smaller
    loss chunk, a teacher cache instead of a live teacher (when nothing is sampled: scoring samples
    needs the live one), sampling with the student sharded (on-policy, several devices), more
    devices (powers of two up to 64)."""
    kinds = []
    if not run.get("activation_checkpointing"):
        kinds.append(("checkpointing", [("--activation-checkpointing", {"activation_checkpointing": True})]))
    chunks = [c for c in (512, 256, 128) if c < run.get("chunk_size", 1024)]
    kinds.append(("a smaller chunk", [(f"--chunk-size {c}", {"chunk_size": c}) for c in chunks]))
    if run.get("teacher") is not None and not run.get("max_new_tokens"):  # sampling needs the live teacher
        kinds.append(("a teacher cache", [("a teacher cache (scripts/cache_teacher.py --k 32) instead of the live "
                                           "teacher", {"teacher": None, "teacher_cache_k": 32})]))  # fmt: skip
    if run.get("max_new_tokens") and run.get("world", 1) > 1 and not run.get("sample_sharded"):
        kinds.append(("--sample-sharded", [("--sample-sharded", {"sample_sharded": True})]))
    worlds = [w for w in (2, 4, 8, 16, 32, 64) if w > run.get("world", 1)]
    kinds.append(("up to 64 GPUs", [(f"{w} devices", {"world": w}) for w in worlds]))
    return kinds
