"""The memory planner against measured peaks: one real training step (gemma2.trainer.train) per
configuration, in fresh processes (one, and two ranks on gloo), each rank's peak resident memory
growth (VmHWM) after a warm-up step on a tiny model, compared with the plan traced on fake
tensors. Linux only (/proc/self)."""

from __future__ import annotations

import json
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
from gemma2.memory_plan import MARGIN, GiB, plan_memory, suggestions
from gemma2.student import init_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self")

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


def _status_kib(field: str) -> int:
    """A size from /proc/self/status, in KiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def _measure(rank: int, world: int, case: str, tmp: str) -> None:
    """One rank: build the models and run one training step; record the peak RSS growth."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    import gemma2.trainer as trainer

    trainer.save_checkpoint = lambda *a, **k: None  # the plan covers a step, not the final save
    teacher_cfg, T, B, ckpt, chunk = CASES[case]

    def step(student_cfg, teacher_cfg, run: str) -> None:
        tokens = np.random.default_rng(0).integers(3, student_cfg.vocab_size, size=B * world * T * 2 + 1)
        data = Datasets(PackedSequences(tokens.astype(np.int32), T), None)
        student = init_weights(Gemma2ForCausalLM(student_cfg))
        teacher = None if teacher_cfg is None else init_weights(Gemma2ForCausalLM(teacher_cfg)).to(torch.bfloat16)
        cfg = trainer.TrainConfig(out_dir=f"{tmp}/{run}", steps=1, batch_size=B, alpha=0.0 if teacher is None else 1.0,
                                  eval_every=0, activation_checkpointing=ckpt, chunk_size=chunk, dtype="fp32",
                                  device="cpu")  # fmt: skip
        trainer.train(cfg, student, data, teacher=teacher, progress=False)

    # The plan counts tensors. A first step on a tiny model pays what a process allocates once
    # outside them (kernel code pages, thread pools, gloo's buffers), which is 50-120 MB here.
    tiny = tiny_training_config(max_position_embeddings=T)
    step(tiny, None if teacher_cfg is None else tiny, "warm-up")
    # The peak resident set from here on: ru_maxrss would carry the parent's size over from fork.
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    base = _status_kib("VmRSS")
    step(STUDENT, teacher_cfg, "run")
    growth = (_status_kib("VmHWM") - base) * 1024
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(growth))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_is_within_10_percent_of_the_measured_peak(tmp_path, monkeypatch, case, world):
    # Large blocks straight from mmap, so freed tensors leave the resident set at once and the
    # peak RSS is the peak of live tensors (glibc's adaptive threshold would keep freed ones).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    mp.spawn(_measure, args=(world, case, str(tmp_path)), nprocs=world, join=True)
    measured = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
    teacher_cfg, T, B, ckpt, chunk = CASES[case]
    plan = plan_memory(STUDENT, teacher=teacher_cfg, seq_len=T, batch_size=B, world=world, dtype="fp32",
                       teacher_dtype="bf16", activation_checkpointing=ckpt, chunk_size=chunk, device_type="cpu")  # fmt: skip
    for m in measured:
        assert abs(plan.peak - m) <= 0.10 * m, (f"planned {plan.peak / GiB:.3f} GiB, measured {m / GiB:.3f} GiB", plan.at_peak)


# Blocks hold most of the weights (~26M of 28M parameters), so that gathering them all to sample
# shows against gathering one at a time.
SAMPLER = STUDENT.replace(vocab_size=4096, num_hidden_layers=8)
SAMPLER_TEACHER = SAMPLER.replace(hidden_size=640, intermediate_size=2560, num_hidden_layers=4)
SAMPLING = dict(seq_len=64, prompt_len=32, max_new_tokens=8, batch_size=4)


def _measure_sampling(rank: int, world: int, dtype: str, sample_sharded: bool, seq_kd: bool, tmp: str) -> None:
    """One rank: two on-policy steps (lmbda 1) with the live teacher, or with seq_kd two steps on
    the teacher's samples (lmbda 0); the peak RSS growth during the second step's sampling (the
    optimizer state alive, as the plan traces it)."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    import gemma2.on_policy as on_policy
    import gemma2.trainer as trainer

    trainer.save_checkpoint = lambda *a, **k: None
    T, B, P, N = (SAMPLING[k] for k in ("seq_len", "batch_size", "prompt_len", "max_new_tokens"))
    calls, real = [], on_policy.sample_completions

    def measured(*args, **kwargs):
        calls.append(None)
        if len(calls) != 2:
            return real(*args, **kwargs)
        Path("/proc/self/clear_refs").write_text("5")
        out = real(*args, **kwargs)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps((_status_kib("VmHWM") - base) * 1024))
        return out

    def run(student_cfg, name: str, teacher_cfg=None) -> None:
        tokens = np.random.default_rng(0).integers(3, student_cfg.vocab_size, size=B * world * T * 4 + 1)
        data = Datasets(PackedSequences(tokens.astype(np.int32), T), None)
        student = init_weights(Gemma2ForCausalLM(student_cfg))
        teacher = init_weights(Gemma2ForCausalLM(teacher_cfg or student_cfg)).to(torch.bfloat16)
        cfg = trainer.TrainConfig(out_dir=f"{tmp}/{name}", steps=2, batch_size=B, eval_every=0,
                                  lmbda=0.0 if seq_kd else 1.0, seq_kd=seq_kd, max_new_tokens=N, prompt_len=P,
                                  dtype=dtype, device="cpu", sample_sharded=sample_sharded)  # fmt: skip
        trainer.train(cfg, student, data, teacher=teacher, progress=False)

    run(tiny_training_config(max_position_embeddings=T), "warm-up")  # see _measure
    on_policy.sample_completions = measured
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    run(SAMPLER, "run", SAMPLER_TEACHER)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world, dtype, sample_sharded, seq_kd", [
    (1, "fp32", False, False), (1, "bf16", False, False), (2, "fp32", False, False), (2, "fp32", True, False),
    (1, "fp32", False, True), (2, "fp32", False, True)])  # fmt: skip
def test_sampling_plan_is_within_10_percent_of_the_measured_peak(tmp_path, monkeypatch, world, dtype, sample_sharded,
                                                                 seq_kd):  # fmt: skip
    """On-policy sampling's peak (one process: the student itself, or in bf16 a cast copy; two ranks:
    the whole student gathered, or one Block at a time), or the teacher's (seq_kd: in its own
    dtype, one Block at a time on two ranks), against the plan's, as the step's above."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    mp.spawn(_measure_sampling, args=(world, dtype, sample_sharded, seq_kd, str(tmp_path)), nprocs=world, join=True)
    measured = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(world)]
    plan = plan_memory(SAMPLER, teacher=SAMPLER_TEACHER, world=world, dtype=dtype, teacher_dtype="bf16",
                       device_type="cpu", sample_sharded=sample_sharded, seq_kd=seq_kd, **SAMPLING)  # fmt: skip
    phase = plan.phases["teacher sampling" if seq_kd else "sampling"]
    assert list(plan.phases) == ["sampling", "teacher sampling"][: 1 + seq_kd]
    for m in measured:
        assert abs(phase.peak - m) <= 0.10 * m, (
            f"planned {phase.peak / GiB:.3f} GiB, measured {m / GiB:.3f} GiB", phase.at_peak)


@pytest.mark.parametrize("world", [1, 2])
def test_plan_holds_exactly_the_sharded_state(world):
    """Counted independently: FSDP2 pads each parameter's first dimension to a multiple of the
    world size; AdamW keeps two moments per parameter plus a scalar step tensor."""
    cfg = tiny_training_config()
    plan = plan_memory(cfg, teacher=cfg, seq_len=16, batch_size=2, world=world, dtype="fp32", teacher_dtype="bf16",
                       device_type="cpu")  # fmt: skip
    shapes = [p.shape for p in Gemma2ForCausalLM(cfg).parameters()]
    shard = sum(-(-s[0] // world) * (s[1] if len(s) > 1 else 1) for s in shapes)  # elements on one rank
    assert plan.held["student parameters"] == plan.held["student gradients"] == 4 * shard
    assert plan.held["optimizer state"] == 2 * 4 * shard + 4 * len(shapes)
    assert plan.held["teacher weights"] == 2 * shard
    assert plan.peak == sum(plan.at_peak.values()) >= sum(plan.held.values()) - plan.held["student gradients"]


def test_sampling_that_does_not_fit_gathered_is_suggested_sharded():
    """Many small Blocks over 4 ranks: gathering the whole student to sample needs more than the
    training step; sampling one Block at a time fits where that does not."""
    cfg = tiny_training_config(vocab_size=512, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=64)
    run = dict(student=cfg, seq_len=32, batch_size=2, world=4, dtype="fp32", device_type="cpu",
               activation_checkpointing=True, max_new_tokens=16)  # fmt: skip
    gathered, sharded = plan_memory(**run), plan_memory(**run, sample_sharded=True)
    assert gathered.phases["sampling"].peak > max(gathered.peak, sharded.phases["sampling"].peak)
    # Every Block's fp32 weights are alive at the gathered peak, on top of this rank's state.
    blocks = sum(p.numel() for p in Gemma2ForCausalLM(cfg).model.layers.parameters()) * 4
    assert gathered.phases["sampling"].at_peak["sampling weights, transients"] >= blocks
    device = (gathered.required() + sharded.required()) / 2 / (1 - MARGIN)  # between the two
    assert not gathered.fits(device) and sharded.fits(device)
    assert "--sample-sharded" in suggestions(device, **run)


def test_seq_kd_traces_the_teachers_sampling_with_the_teachers_kv_cache():
    """seq_kd adds a column: the teacher's KV cache, in its dtype and of its layers (its local
    layers' rings hold the window), counted by hand; a run that samples is never told to use a
    teacher cache (scoring samples needs the live teacher)."""
    student = tiny_training_config(max_position_embeddings=64)
    teacher = student.replace(num_hidden_layers=6, num_key_value_heads=4, head_dim=32)
    B, P, N = 3, 20, 12
    plan = plan_memory(student, teacher=teacher, seq_len=P + N, batch_size=B, dtype="fp32", teacher_dtype="bf16",
                       device_type="cpu", max_new_tokens=N, prompt_len=P, seq_kd=True)  # fmt: skip

    def kv_bytes(cfg, itemsize: int) -> int:
        columns = [min(cfg.sliding_window, P + N) if i % 2 == 0 else P + N for i in range(cfg.num_hidden_layers)]
        return 2 * B * cfg.num_key_value_heads * cfg.head_dim * itemsize * sum(columns)  # keys and values

    assert student.sliding_window < P + N and student.is_local(0) and not student.is_local(1)
    assert list(plan.phases) == ["sampling", "teacher sampling"]
    assert plan.phases["sampling"].at_peak["KV cache"] == kv_bytes(student, 4)  # fp32: sampled as it is
    assert plan.phases["teacher sampling"].at_peak["KV cache"] == kv_bytes(teacher, 2)
    assert "teacher sampling" in plan.table()
    with pytest.raises(ValueError, match="seq_kd samples from a live teacher"):
        plan_memory(student, seq_len=P + N, batch_size=B, max_new_tokens=N, seq_kd=True, device_type="cpu")
    # A wide teacher whose cache would fit where the live one does not: suggested unless sampling.
    wide = teacher.replace(hidden_size=512, intermediate_size=4096)
    tight = dict(student=student, seq_len=P + N, batch_size=B, dtype="fp32", device_type="cpu")
    live, cached = plan_memory(**tight, teacher=wide), plan_memory(**tight, teacher_cache_k=32)
    device = (live.required() + cached.required()) / 2 / (1 - MARGIN)
    tight["teacher"] = wide
    assert not live.fits(device) and any("teacher cache" in s for s in suggestions(device, **tight))
    assert not any("teacher cache" in s for s in suggestions(device, **tight, max_new_tokens=N))


def test_script_prints_the_table_and_suggests_what_fits(tmp_path):
    import subprocess

    script = Path(__file__).parents[1] / "scripts/plan_memory.py"
    cfg = tmp_path / "config.json"
    STUDENT.to_json(cfg)
    common = [sys.executable, str(script), "--student", str(cfg), "--seq-len", "128", "--dtype", "fp32"]
    ok = subprocess.run([*common, "--gpu-memory", "80"], capture_output=True, text=True)
    assert ok.returncode == 0 and "fits in 74.5 GiB" in ok.stdout, ok.stderr
    # 1.6 GB: the 1 GiB CUDA context and ~0.5 GiB of tensors leave too little; two GPUs halve the state.
    tight = subprocess.run([*common, "--gpu-memory", "1.75"], capture_output=True, text=True)
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout
    assert "would fit with:" in tight.stderr and "2 devices" in tight.stderr, tight.stderr
    # 1 GB: the CUDA context alone does not fit, so no change to the run is suggested.
    tiny_card = subprocess.run([*common, "--gpu-memory", "1"], capture_output=True, text=True)
    assert tiny_card.returncode == 1 and "would fit with" not in tiny_card.stderr
    assert "the CUDA context alone (1 GiB, with 10% of the card kept free) does not fit in 1.0 GB" in tiny_card.stderr
    bad = subprocess.run([*common, "--gpu-memory", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpus must be >= 1")
    bad = subprocess.run([*common, "--gpu-memory", "80", "--teacher-cache-k", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: seq_len and the cache's k must be >= 1"), bad.stderr
    # A fresh preset student gets the teacher's vocabulary, as distill.py gives it (tiny's own is 512).
    teacher = Path(__file__).parents[1] / "checkpoints/tiny-teacher"
    paired = subprocess.run([sys.executable, str(script), "--student", "tiny", "--teacher", str(teacher), "--seq-len",
                             "128", "--gpu-memory", "80"], capture_output=True, text=True)  # fmt: skip
    assert paired.returncode == 0 and "fits in 74.5 GiB" in paired.stdout, paired.stderr
    # Beyond the student's context of 256, as distill.py refuses it: at once, not after a trace.
    too_long = subprocess.run([sys.executable, str(script), "--student", "tiny", "--teacher", str(teacher),
                               "--seq-len", "512", "--gpu-memory", "80"], capture_output=True, text=True, timeout=60)
    assert too_long.returncode == 2 and too_long.stdout == "", too_long.stdout
    assert too_long.stderr.startswith("error: seq_len 512 exceeds the context of the student"), too_long.stderr


def test_a_run_beyond_a_models_context_or_without_a_prompt_is_refused():
    """What the trainer refuses is not planned: a row longer than either model's context, and on-policy
    sampling whose default prompt (seq_len - max_new_tokens) would be empty."""
    student = tiny_training_config(max_position_embeddings=64)
    with pytest.raises(ValueError, match="seq_len 65 exceeds the context of the student"):
        plan_memory(student, seq_len=65, batch_size=1, device_type="cpu")
    with pytest.raises(ValueError, match="seq_len 64 exceeds the context of the teacher, max_position_embeddings = 32"):
        plan_memory(student, teacher=student.replace(max_position_embeddings=32), seq_len=64, batch_size=1)
    for n in (32, 40):
        with pytest.raises(ValueError, match=f"max_new_tokens {n} leaves no prompt in a row of seq_len 32"):
            plan_memory(student, seq_len=32, batch_size=1, max_new_tokens=n, device_type="cpu")
    for shaping in (dict(prompt_len=8), dict(sample_sharded=True)):  # ignored without sampling: refused
        with pytest.raises(ValueError, match="describe on-policy sampling, which is off without max_new_tokens: pass"):
            plan_memory(student, seq_len=32, batch_size=1, device_type="cpu", **shaping)
    # A prompt of its own: a prompt dataset's row of 1 + 32 - 1 tokens, its sample one more.
    plan = plan_memory(student, seq_len=32, batch_size=1, max_new_tokens=32, prompt_len=1, device_type="cpu")
    assert "sampling" in plan.phases
