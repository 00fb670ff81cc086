"""Sharded loading: under torchrun, models that no rank ever holds whole.

Loading a model and then sharding it (what `load_model` + FSDP2 does) costs every rank the full
model in host memory for a moment: 54 GB for a 27B teacher in bf16, on each of eight ranks. Here
a model is built on the `meta` device instead (no memory at all) and carries where its weights
will come from: a checkpoint (`load_sharded`) or fresh values (`init_sharded`). When
gemma2.distributed.shard has cut it with `fully_shard`, exactly as it cuts any model, `materialize`
allocates only this rank's shard of every parameter (`to_empty`) and fills it:

- from a checkpoint, each rank reads the rows it owns straight from the file (FSDP2 shards every
  parameter along dim 0, so they are one contiguous range of a row-major tensor): safetensors
  through `safe_open(...).get_slice`, the official `.ckpt`/`.bin` through the memory map that
  `torch.load(weights_only=True, mmap=True)` makes (the fused qkv is split into q, k and v as row
  ranges first). The file is mapped for one tensor at a time, so the pages read are released with it: host memory
  per rank is its shards plus one tensor's rows in transit. No rank sends anything to another
  (ranks need one shared filesystem, as the trainer's checkpoints already do). Chosen over rank 0
  reading each tensor whole and broadcasting it: on 2 gloo ranks (scripts/bench_load.py's 150M
  model, bf16 on disk) that peaked at 163-183 MB per rank into bf16 and 326-358 MB into fp32,
  against 160 and 311 MB here, in about twice the time.
- fresh: each full tensor is generated on the CPU once, in the order and from the generator of
  the single-process initialiser (gemma2.student.initial_values), and the owned rows are kept:
  exactly the values one process gets for the same seed, one tensor in transit.

Every check of `load_model` holds, with its messages (the code is gemma2.checkpoint's): names,
shapes, duplicates and missing tensors from the files' headers as soon as the model is asked for
(every rank finds the same problem, before any value is read); NaN and inf in the rows each rank
reads, agreed across ranks before anyone goes on: every rank raises the error of the first such
tensor in the files' order (the one load_model names) and none waits forever. int8 checkpoints
(gemma2.quantize) are refused: training and FSDP2 shard float weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (
    EMBED,
    HEAD,
    LazyRows,
    check_complete,
    check_finite_values,
    check_tensor,
    check_tied_head,
    checkpoint_files,
    load_model,
    lazy_tensors,
    official_to_hf,
    resolve_config,
    skipped,
)
from .config import Gemma2Config
from .dtypes import to_dtype
from .errors import CheckpointError
from .model import Gemma2ForCausalLM
from .quantize import SCALER

PENDING = "pending_weights"  # the attribute of a meta model that says where its weights come from

# (parameter, its full fresh value), in the single-process initialiser's order
InitialValues = Callable[[nn.Module], Iterator[tuple[nn.Parameter, Tensor]]]


@dataclass
class _Entry:
    """One tensor the checkpoint holds, checked against the model: read later, by rows."""

    position: int  # in the order load_model meets it: which error it would raise first
    file: Path
    raw_name: str  # as stored (the error messages name it)
    name: str  # the model's (Hugging Face) name
    rows: LazyRows


@dataclass
class _FromCheckpoint:
    """Fills a sharded model with its rows of each checked checkpoint tensor."""

    entries: list[_Entry]
    check_finite: bool
    head: LazyRows | None = None  # lm_head.weight, a copy of the embedding: each rank checks its rows

    def fill(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for entry in self.entries:
            try:
                local, start = _owned(params[entry.name])
                if local.numel():
                    # Cast by the copy itself: no converted copy of the rows in transit, and the
                    # file's mapped pages are released when the rows go.
                    local.copy_(entry.rows.read(start, start + local.shape[0]))
                    if entry.name == EMBED and self.head is not None:
                        check_tied_head(self.head, entry.rows, start, start + local.shape[0])
                    if self.check_finite:  # in the target dtype, as load_model checks
                        check_finite_values(entry.file, entry.raw_name, local)
            except CheckpointError as e:
                raise _AtPosition(entry.position, str(e)) from e


@dataclass
class _Fresh:
    """Fills a sharded model with its rows of each full fresh value."""

    values: InitialValues

    def fill(self, model: nn.Module) -> None:
        for param, full in self.values(model):
            local, start = _owned(param)
            local.copy_(full[start : start + local.shape[0]])


class _AtPosition(Exception):
    """A CheckpointError of one rank, with the position of its tensor (to agree on the first)."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def _meta_model(config: Gemma2Config, dtype: torch.dtype, attention: str, compile_attention: bool | None,
                source: _FromCheckpoint | _Fresh) -> Gemma2ForCausalLM:  # fmt: skip
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config, attention, compile_attention).to(dtype)
    setattr(model, PENDING, source)
    return model


def _require_distributed(what: str) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        raise ValueError(
            f"{what} is for torchrun (a process group of several ranks); in one process use "
            "gemma2.checkpoint.load_model or gemma2.student.load_student"
        )


def _checked_entries(path: Path, files: list[Path], config: Gemma2Config,
                     expected: dict[str, torch.Size]) -> tuple[list[_Entry], LazyRows | None]:  # fmt: skip
    """Every tensor of the checkpoint, checked from the headers alone as load_model checks it; and
    lm_head.weight, if it is there (its values are checked with the embedding's rows)."""
    entries: list[_Entry] = []
    seen: set[str] = set()
    head = None
    for file in files:
        for raw_name, lazy in lazy_tensors(file):
            if skipped(raw_name, expected):
                head = lazy if raw_name == HEAD else head
                continue
            for name, rows in official_to_hf(raw_name, lazy, config):
                if rows.int8 or name.endswith("." + SCALER):
                    raise CheckpointError(
                        f"{file}: tensor {raw_name!r} belongs to an int8 checkpoint (gemma2.quantize); sharded "
                        "loading (torchrun) shards float weights only: load the bf16 or fp32 checkpoint"
                    )
                check_tensor(file, raw_name, name, rows.shape, expected, seen)
                seen.add(name)
                entries.append(_Entry(len(entries), file, raw_name, name, rows))
    check_complete(path, expected, seen)
    return entries, head


def load_sharded(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    config: Gemma2Config | str | None = None,
    check_finite: bool = True,
    attention: str = "auto",
    compile_attention: bool | None = None,
) -> Gemma2ForCausalLM:
    """A model on `meta` whose weights are the checkpoint's at `path`, read shard by shard when it
    is sharded (gemma2.distributed.shard, then `materialize`). Arguments as for load_model (no
    quantize); the checkpoint's names and shapes are checked now, its values while they load.
    Under torchrun only: every rank calls it."""
    _require_distributed("load_sharded")
    path = Path(path)
    files = checkpoint_files(path)
    config = resolve_config(path, config)
    dtype = to_dtype(dtype)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Gemma2ForCausalLM(config).state_dict().items()}
    entries, head = _checked_entries(path, files, config, shapes)
    return _meta_model(config, dtype, attention, compile_attention, _FromCheckpoint(entries, check_finite, head))


def init_sharded(
    config: Gemma2Config, values: InitialValues, *, dtype: torch.dtype = torch.float32
) -> Gemma2ForCausalLM:
    """A model on `meta` whose weights will be `values(model)` (full tensors, gemma2.student's
    initial_values), each rank keeping its rows when it is sharded. Under torchrun only."""
    _require_distributed("init_sharded")
    return _meta_model(config, dtype, "eager", None, _Fresh(values))


def pending(model: nn.Module) -> bool:
    """Whether `model` is one of this module's, waiting on `meta` to be sharded and filled."""
    return hasattr(model, PENDING)


def load_weights(model: Gemma2ForCausalLM, path: str | os.PathLike) -> None:
    """The checkpoint at `path` (of `model`'s config) as `model`'s weights: replacing what a
    pending model would have been filled with (read when it is sharded), or, for a model that
    holds its weights, loaded into it now."""
    if pending(model):
        setattr(model, PENDING, getattr(load_sharded(path, dtype=model.dtype, config=model.config), PENDING))
        return
    model.load_state_dict(load_model(path, config=model.config).state_dict(), strict=True)


@torch.no_grad()
def materialize(root: nn.Module, device: torch.device) -> None:
    """After `fully_shard` (gemma2.distributed.shard) of `root`: give every pending model inside
    it its shards on `device`, filled from its source; no-op for a root that holds none. Every
    rank calls it; a CheckpointError is raised on all ranks alike."""
    models = [m for m in root.modules() if pending(m)]
    if not models:
        return
    assert all(p.is_meta for p in root.parameters()), "to_empty would discard the root's other weights"
    root.to_empty(device=device)  # through the root: FSDP2 re-registers each group's new shards
    error: tuple[int, str] | None = None
    for model in models:
        source = getattr(model, PENDING)
        delattr(model, PENDING)
        try:
            source.fill(model)
        except _AtPosition as e:
            error = (e.position, str(e))
            break
    errors: list[tuple[int, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [e for e in errors if e is not None]
    if found:
        raise CheckpointError(min(found)[1])  # the first tensor in file order: load_model's error


def _owned(param: nn.Parameter) -> tuple[Tensor, int]:
    """This rank's shard of an FSDP2 parameter (a view to fill in place) and its first row in
    the full tensor. FSDP2 cuts dim 0 as torch.chunk does: ceil(rows / world) rows a rank."""
    local = param.to_local()
    rows, world = param.shape[0], param.device_mesh.size()
    per_rank = -(-rows // world)
    start = min(param.device_mesh.get_local_rank() * per_rank, rows)
    assert local.shape[0] == min(per_rank, rows - start), (param.shape, local.shape, start)
    return local, start
