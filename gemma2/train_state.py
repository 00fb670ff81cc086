"""Training checkpoints: what one holds, written atomically, read back for an exact resume.

    out_dir/step-XXXXXX/
        config.json, model.safetensors   the student in the Hugging Face layout (full weights,
                                         gathered to rank 0): load_model and transformers read it
        tokenizer.model                  when the trainer has one, so the directory is a model
        optimizer/                       AdamW state, torch.distributed.checkpoint (DCP): each rank
                                         writes its shards, and DCP reshards on load
        rng-{rank}.pt                    each rank's torch / CUDA / Python / NumPy RNG states
        trainer_state.json               step, data position, world size, config, torch version

Every file is written into out_dir/.tmp-step-XXXXXX and fsynced; then the directory is renamed
into place and the parent fsynced. A crash at any moment leaves either the whole new checkpoint or
none of it, and the previous one untouched. Under torch.distributed every rank must call these
functions, and all ranks must see one shared out_dir.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from . import distributed
from .checkpoint import save_model
from .config import Gemma2Config
from .files import publish_directory
from .model import Gemma2ForCausalLM
from .run_dir import RNG_FILE, STATE_FILE, latest_complete, rotate


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete out_dir/step-XXXXXX, or None (a crash mid-save leaves only a
    .tmp-step-XXXXXX directory, which is ignored; see gemma2.run_dir.latest_complete)."""
    found = latest_complete(out_dir)
    return found[0] if found else None


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns on every single-process save and load that it assumes a single process: it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this rank's device
        "python": random.getstate(),
        # As a tensor and plain numbers, so the file loads with weights_only=True.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["cuda"]
    if saved and torch.cuda.is_available():
        # One state, this rank's device's; older checkpoints hold every device's, and a resume
        # may run on a machine with fewer devices.
        here = torch.cuda.current_device()
        torch.cuda.set_rng_state(saved[here if len(saved) > here else 0])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def _write_student(config: Gemma2Config, state: dict[str, Tensor], directory: Path) -> None:
    """The Hugging Face files from a full (gathered) state dict, without a second copy."""
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    save_model(model, directory)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    student: Gemma2ForCausalLM,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    tokenizer_file: str | os.PathLike | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write out_dir/step-{step:06d} atomically and return it; then keep only the newest
    `keep_last` checkpoints (None: all). `state` (JSON-able: data position, config ...) goes
    into trainer_state.json with the step."""
    rank = distributed.rank()
    out = Path(out_dir)
    final, tmp = out / f"step-{step:06d}", out / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    # Every rank takes part in the gather; with cpu_offload only rank 0 receives the tensors.
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        _write_student(student.config, full, tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
    del full
    with _quiet_dcp():
        dcp.save({"optimizer": get_optimizer_state_dict(student, optimizer)}, checkpoint_id=tmp / "optimizer",
                 no_dist=not distributed.is_distributed())  # fmt: skip
    torch.save(_rng_state(), tmp / RNG_FILE.format(rank=rank))
    if rank == 0:
        record = {"step": step, **state, "world_size": distributed.world_size(),
                  "torch": torch.__version__}  # fmt: skip
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    distributed.barrier()
    if rank == 0:
        publish_directory(tmp, final)  # whole or not at all; replaces the same step saved before a crash
        rotate(out, (state.get("run") or {}).get("id"), keep_last)  # this run's checkpoints only
    distributed.barrier()
    return final


def load_training_state(path: str | os.PathLike, student: Gemma2ForCausalLM, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer (into a model that may be sharded differently than when saved) and
    this rank's RNG states from the checkpoint at `path`; return its trainer_state.json.
    The student's weights come from the Hugging Face files (gemma2.checkpoint.load_model)."""
    path = Path(path)
    rank = distributed.rank()
    state = {"optimizer": get_optimizer_state_dict(student, optimizer)}  # the layout to fill in
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=path / "optimizer", no_dist=not distributed.is_distributed())
    set_optimizer_state_dict(student, optimizer, state["optimizer"])
    rng = path / RNG_FILE.format(rank=rank)
    if rng.is_file():  # absent for ranks beyond the saved world size: nothing draws from it anyway
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
