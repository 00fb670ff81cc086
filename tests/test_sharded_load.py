"""Sharded loading (gemma2.sharded_load) across two CPU processes (gloo).

Each rank's shards must be its rows of what one process loads (load_model, init_weights): the
rows a rank owns are defined here independently, as torch.chunk along dim 0 (FSDP2's documented
layout). A bad checkpoint must raise load_model's error on every rank. Training on the sharded
path must match today's FSDP path (full models sharded after loading) loss for loss, and resume.
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
from safetensors.torch import save_file

from conftest import assert_same_metrics, tiny_training_config
from gemma2 import CheckpointError, Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import save_official
from gemma2.data import Datasets, PackedSequences
from gemma2.distributed import runtime, shard
from gemma2.quantize import quantize_model
from gemma2.sharded_load import load_sharded
from gemma2.student import init_weights, load_student
from gemma2.trainer import TrainConfig, train

WORLD = 2
# An odd vocabulary and width: the last rank's shards are shorter than the first's.
CFG = tiny_training_config(vocab_size=97, hidden_size=33, max_position_embeddings=32, sliding_window=4)


def _spawn(worker, tmp: Path, *args) -> list[dict]:
    mp.spawn(worker, args=(str(tmp), *args), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _join(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)


def _shards_of(model: Gemma2ForCausalLM) -> dict[str, torch.Tensor]:
    shard(model, model, runtime(), param_dtype=None)  # the model is its own FSDP2 root here
    return {name: p.to_local().clone() for name, p in model.named_parameters()}


def _load_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    try:
        out = {}
        for name in ("hf", "model.ckpt"):
            for dtype in ("float32", "bfloat16"):
                out[f"{name} {dtype}"] = _shards_of(load_sharded(Path(tmp) / name, dtype=dtype, config=CFG))
        out["fresh"] = _shards_of(load_student(str(Path(tmp) / "student.json"), vocab_size=97, seed=5, sharded=True))
        torch.save(out, Path(tmp) / f"shards{rank}.pt")
        (Path(tmp) / f"rank{rank}.json").write_text("{}")
        dist.barrier()  # no rank tears the group down while a peer's last collective may be in flight
    finally:
        dist.destroy_process_group()


def _checkpoint(tmp: Path) -> Gemma2ForCausalLM:
    model = init_weights(Gemma2ForCausalLM(CFG), seed=3, std=0.3).to(torch.bfloat16)
    save_model(model, tmp / "hf", max_shard_bytes=20_000)  # several files and an index
    save_official(model, tmp / "model.ckpt")
    return model


def test_each_rank_holds_its_rows_of_the_single_process_model(tmp_path):
    _checkpoint(tmp_path)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    CFG.to_json(tmp_path / "student.json")
    _spawn(_load_worker, tmp_path)
    fresh = load_student(str(tmp_path / "student.json"), vocab_size=97, seed=5)
    for rank in range(WORLD):
        shards = torch.load(tmp_path / f"shards{rank}.pt", weights_only=True)
        for case, got in shards.items():
            if case == "fresh":
                full = fresh
            else:
                name, dtype = case.split()
                full = load_model(tmp_path / name, dtype=dtype, config=CFG)
            state = full.state_dict()
            assert got.keys() == state.keys()
            for key, tensor in state.items():
                mine = torch.chunk(tensor, WORLD)[rank] if rank < len(torch.chunk(tensor, WORLD)) else tensor[:0]
                assert got[key].dtype == tensor.dtype, (case, key)
                assert torch.equal(got[key], mine), (case, rank, key)


def _error_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    try:
        messages = {}
        for case in sorted(p.name for p in Path(tmp).iterdir() if p.name.startswith("bad-")):
            try:
                _shards_of(load_sharded(Path(tmp) / case, config=CFG))
                messages[case] = None
            except CheckpointError as e:
                messages[case] = str(e)
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(messages))
        dist.barrier()  # (one run in about seven aborted in gloo's teardown without it)
    finally:
        dist.destroy_process_group()


def test_a_bad_checkpoint_raises_load_models_error_on_every_rank(tmp_path):
    good = _checkpoint(tmp_path).float()

    def bad(name: str, edit) -> None:
        model = Gemma2ForCausalLM(CFG)
        model.load_state_dict(good.state_dict())
        with torch.no_grad():
            edit(model)
        save_model(model, tmp_path / name)

    # NaN in a row only rank 1 reads, and a later one only rank 0 reads: every rank must report
    # the first in the file's order, as one process does.
    def two_nans(model):
        model.model.layers[0].mlp.down_proj.weight[-1, 0] = float("nan")
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")

    bad("bad-nan", two_nans)
    bad("bad-nan-rank1", lambda m: m.model.norm.weight.__setitem__(-1, float("nan")))
    # An output head of its own: its last row differs from the embedding's, which only rank 1 reads.
    (tmp_path / "bad-head").mkdir()
    head = good.state_dict()["model.embed_tokens.weight"].clone()
    head[-1, 0] += 1.0
    save_file(good.state_dict() | {"lm_head.weight": head}, tmp_path / "bad-head" / "model.safetensors")
    save_model(init_weights(Gemma2ForCausalLM(CFG.replace(intermediate_size=48))), tmp_path / "bad-shape")
    save_model(quantize_model(Gemma2ForCausalLM(CFG)), tmp_path / "bad-int8")
    (tmp_path / "bad-missing").mkdir()
    state = {k: v for k, v in good.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "bad-missing" / "model.safetensors")
    shutil.copytree(tmp_path / "bad-nan", tmp_path / "bad-truncated")
    file = tmp_path / "bad-truncated" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])

    ranks = _spawn(_error_worker, tmp_path)
    assert ranks[0].keys() == {p.name for p in tmp_path.iterdir() if p.name.startswith("bad-")}
    for case in ranks[0]:
        assert ranks[0][case] is not None and ranks[0][case] == ranks[1][case], case
        if case == "bad-int8":  # one process loads int8 checkpoints; FSDP2 shards float weights only
            assert "int8 checkpoint" in ranks[0][case] and "load the bf16 or fp32 checkpoint" in ranks[0][case]
            continue
        with pytest.raises(CheckpointError) as single:
            load_model(tmp_path / case, config=CFG)
        assert ranks[0][case] == str(single.value), case
    assert "down_proj" in ranks[0]["bad-nan"] and "holds NaN or inf" in ranks[0]["bad-nan"]
    assert "lm_head.weight differs from model.embed_tokens.weight" in ranks[0]["bad-head"]


STEPS = 4


def _data() -> Datasets:
    tokens = np.random.default_rng(0).integers(3, 97, size=3000).astype(np.int32)
    return Datasets(PackedSequences(tokens[:2600], 16), PackedSequences(tokens[2600:], 16))


def _train_config(out: Path, **kw) -> TrainConfig:
    values = dict(out_dir=str(out), steps=STEPS, batch_size=2, grad_accum=2, lr=1e-2, warmup=1, alpha=0.5,
                  eval_every=2, save_every=2, keep_last=None, chunk_size=40, activation_checkpointing=True)  # fmt: skip
    return TrainConfig(**(values | kw))


def _train_worker(rank: int, tmp: str) -> None:
    _join(rank, tmp)
    root = Path(tmp)
    student_spec = str(root / "student.json")
    try:
        # Today's path: every rank holds both models whole until train() shards them.
        today = train(_train_config(root / "today"), load_student(student_spec, seed=2), _data(),
                      teacher=load_model(root / "teacher"), progress=False)  # fmt: skip
        sharded = train(_train_config(root / "sharded"), load_student(student_spec, seed=2, sharded=True), _data(),
                        teacher=load_sharded(root / "teacher"), progress=False)  # fmt: skip
        resumed_dir = root / "resumed"
        if rank == 0:
            shutil.copytree(root / "sharded" / "step-000002", resumed_dir / "step-000002")
        dist.barrier()
        resumed = train(_train_config(resumed_dir), load_student(student_spec, seed=7, sharded=True), _data(),
                        teacher=load_sharded(root / "teacher"), resume=True, progress=False)  # fmt: skip
        result = {"today": today, "sharded": sharded, "resumed": resumed}
        (root / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_training_on_the_sharded_path_matches_todays_and_resumes(tmp_path):
    CFG.to_json(tmp_path / "student.json")
    save_model(init_weights(Gemma2ForCausalLM(CFG), seed=1, std=0.3), tmp_path / "teacher")  # a peaked teacher
    result = _spawn(_train_worker, tmp_path)[0]
    today, sharded = result["today"], result["sharded"]
    assert len(today) > STEPS
    assert_same_metrics(sharded, today, rel=1e-6, abs=1e-7)
    # Resumed from step 2 (a student built with another seed: the checkpoint's weights replace
    # them), the run continues exactly as the uninterrupted one.
    tail = [m for m in sharded if m["step"] > 2]
    assert_same_metrics(result["resumed"], tail, rel=1e-6, abs=1e-7)
    for step in (2, STEPS):
        one, two = (load_model(tmp_path / run / f"step-{step:06d}") for run in ("today", "sharded"))
        for (name, p), q in zip(one.state_dict().items(), two.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_sharded_loading_outside_torchrun_says_what_to_use(tmp_path):
    with pytest.raises(ValueError, match="is for torchrun"):
        load_student("tiny", sharded=True)
