"""The memory planner against measured peaks: one real training step (gemma2.trainer.train) per
configuration, in fresh processes (one, and two ranks on gloo), each rank's peak resident memory
growth compared with the plan traced on fake tensors. Linux only (ru_maxrss in KiB)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_training_config
from gemma2 import Gemma2ForCausalLM
from gemma2.data import Datasets, PackedSequences
from gemma2.memory_plan import GiB, plan_memory
from gemma2.student import init_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")

# ~30M parameters (a 32000 x 512 embedding, 4 blocks): big enough that tensors dominate the
# process's memory, small enough for a few seconds of CPU.
STUDENT = tiny_training_config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=64, sliding_window=64,
                               max_position_embeddings=256)  # fmt: skip
TEACHER = STUDENT.replace(hidden_size=640, intermediate_size=2560)
CASES = {
    # name: (teacher in bf16 or None, seq_len, batch_size, activation checkpointing, chunk_size)
    "plain CE": (None, 128, 4, False, 1024),
    "live teacher": (TEACHER, 128, 4, False, 256),
    "teacher, checkpointing": (TEACHER, 256, 4, True, 512),
}


def _measure(rank: int, world: int, case: str, tmp: str) -> None:
    """One rank: build the models and run one training step; record the peak RSS growth."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    import gemma2.trainer as trainer

    trainer.save_checkpoint = lambda *a, **k: None  # the plan covers a step, not the final save
    teacher_cfg, T, B, ckpt, chunk = CASES[case]
    tokens = np.random.default_rng(0).integers(3, 32000, size=B * world * T * 2 + 1).astype(np.int32)
    data = Datasets(PackedSequences(tokens, T), None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    student = init_weights(Gemma2ForCausalLM(STUDENT))
    teacher = None if teacher_cfg is None else init_weights(Gemma2ForCausalLM(teacher_cfg)).to(torch.bfloat16)
    cfg = trainer.TrainConfig(out_dir=f"{tmp}/run", steps=1, batch_size=B, alpha=0.0 if teacher is None else 1.0,
                              eval_every=0, activation_checkpointing=ckpt, chunk_size=chunk, dtype="fp32",
                              device="cpu")  # fmt: skip
    trainer.train(cfg, student, data, teacher=teacher, progress=False)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(growth))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_within_15_percent_of_the_measured_peak(tmp_path, monkeypatch, case, world):
    # Large blocks straight from mmap, so freed tensors leave the resident set at once and the
    # peak RSS is the peak of live tensors (glibc's adaptive threshold would keep freed ones).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    mp.spawn(_measure, args=(world, case, str(tmp_path)), nprocs=world, join=True)
    measured = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
    teacher_cfg, T, B, ckpt, chunk = CASES[case]
    plan = plan_memory(STUDENT, teacher=teacher_cfg, seq_len=T, batch_size=B, world=world, dtype="fp32",
                       teacher_dtype="bf16", activation_checkpointing=ckpt, chunk_size=chunk, device_type="cpu")  # fmt: skip
    for m in measured:
        assert abs(plan.peak - m) <= 0.15 * m, (f"planned {plan.peak / GiB:.3f} GiB, measured {m / GiB:.3f} GiB", plan.rows)
