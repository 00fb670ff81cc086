"""FSDP2 across two CPU processes (gloo) trains exactly like one process over the same global batch.

One spawn of two ranks covers: student and teacher sharded per Block + root, the tied embedding's
gradient from both the lookup and the chunked loss, gradient accumulation with the loss
normalised over the global batch, gradient clipping of DTensors, the full state dict gathered to
rank 0 for the Hugging Face files, and the optimizer state saved sharded with DCP, which the
single-process run then resumes from (a change of world size).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import assert_same_metrics, tiny_training_config
from gemma2 import Gemma2Config, Gemma2ForCausalLM
from gemma2.checkpoint import load_model
from gemma2.data import Datasets, PackedSequences
from gemma2.student import init_weights
from gemma2.trainer import TrainConfig, train

WORLD = 2
STEPS = 4


def _config() -> Gemma2Config:
    return tiny_training_config(vocab_size=96, sliding_window=4, max_position_embeddings=32)


def _data() -> Datasets:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 96, size=3000).astype(np.int32)
    return Datasets(PackedSequences(tokens[:2600], 16), PackedSequences(tokens[2600:], 16))


def _train_config(out: Path, batch_size: int, **kw) -> TrainConfig:
    values = dict(out_dir=str(out), steps=STEPS, batch_size=batch_size, grad_accum=2, lr=1e-2, warmup=1,
                  alpha=0.5, eval_every=2, save_every=2, keep_last=None, chunk_size=40)  # fmt: skip
    return TrainConfig(**(values | kw))


def _models() -> tuple[Gemma2ForCausalLM, Gemma2ForCausalLM]:
    teacher = init_weights(Gemma2ForCausalLM(_config()), seed=1, std=0.3)  # wide: a peaked teacher
    return init_weights(Gemma2ForCausalLM(_config()), seed=2), teacher


def _worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        student, teacher = _models()
        metrics = train(_train_config(Path(tmp) / "fsdp", 2, activation_checkpointing=True), student, _data(),
                        teacher=teacher, progress=False)  # fmt: skip
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    sharded = json.loads((tmp_path / "metrics.json").read_text())

    student, teacher = _models()
    single = train(_train_config(tmp_path / "single", 2 * WORLD), student, _data(), teacher=teacher, progress=False)
    assert_same_metrics(sharded, single, rel=1e-5, abs=1e-6)

    # The gathered Hugging Face files hold the same weights as the single process's. Adam divides
    # each gradient by its own running RMS, so where a gradient is ~0 the rounding noise of a
    # different summation order moves a weight by up to ~lr * 1e-3: compare against that.
    for step in (2, STEPS):
        fsdp_model = load_model(tmp_path / "fsdp" / f"step-{step:06d}")
        one_model = load_model(tmp_path / "single" / f"step-{step:06d}")
        for (name, p), q in zip(fsdp_model.state_dict().items(), one_model.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-4, msg=name)

    # One process resumes the two-rank checkpoint (the DCP optimizer state is resharded) and
    # continues exactly as the single-process run did.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "step-000002", resumed_dir / "step-000002")
    student, teacher = _models()
    resumed = train(_train_config(resumed_dir, 2 * WORLD), student, _data(), teacher=teacher, resume=True,
                    progress=False)  # fmt: skip
    tail = [m for m in single if m["step"] > 2]
    assert [m["step"] for m in resumed] == [m["step"] for m in tail]
    for a, b in zip(resumed, tail):
        for key in ("loss", "eval_ce", "eval_kd"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
