"""On-policy distillation (gemma2.on_policy): the rows trained on are exactly the sampled ones, with
the loss on the completion alone; lmbda = 0 is today's run; resume stays exact; two FSDP ranks
sample in step (no hang) and train like one process; settings that cannot work are refused first."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from conftest import TIMINGS, assert_same_metrics, tiny_training_config
from gemma2 import Gemma2ForCausalLM
from gemma2 import on_policy
from gemma2 import trainer as T
from gemma2.data import IGNORE_INDEX, BatchLoader, Datasets
from gemma2.distributed import Runtime
from gemma2.on_policy import is_on_policy, sampling_seed
from gemma2.run_dir import check_resume
from gemma2.static_decode import StaticDecoder
from gemma2.student import init_weights
from gemma2.teacher_cache import TeacherCache, write_teacher_cache
from gemma2.trainer import TrainConfig, train
from test_fsdp import _data as fsdp_data
from test_fsdp import _train_config as fsdp_train_config
from test_trainer import GOLDEN, config, markov_data, run_script, student, teacher

STOPS = (1, 5, 9, 13, 17, 21)  # the student's eos ids: several, so some rows stop early
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def data() -> Datasets:
    return markov_data()


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def spy_loss_targets(monkeypatch) -> list[torch.Tensor]:
    """The targets of every training loss call (evaluation does not go through it)."""
    seen, real = [], T.chunked_distill_loss

    def spy(hidden, weight, src, targets, **kwargs):
        seen.append(targets.clone())
        return real(hidden, weight, src, targets, **kwargs)

    monkeypatch.setattr(T, "chunked_distill_loss", spy)
    return seen


def spy_model_inputs(monkeypatch, model: Gemma2ForCausalLM) -> list[torch.Tensor]:
    """The input ids of every uncached forward of `model` (the teacher scoring a batch)."""
    seen, real = [], model.hidden_states

    def spy(input_ids, attention_mask=None, cache=None):
        if cache is None:
            seen.append(input_ids.clone())
        return real(input_ids, attention_mask, cache)

    monkeypatch.setattr(model, "hidden_states", spy)
    return seen


def reference_rollout(model: Gemma2ForCausalLM, prompts: torch.Tensor, n: int, temperature: float, seed: int | None):
    """Independent sampling: full uncached forwards, softmax(logits / T) and multinomial with a
    generator seeded with `seed` (argmax when seed is None). Returns the row [B, P + n] as sampled
    and the completion's loss mask [B, n] (up to and including the first stop id)."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    rows = prompts.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(rows)[:, -1]
            if g is None:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g).squeeze(1)
            rows = torch.cat([rows, token[:, None]], dim=1)
    stops = torch.isin(rows[:, prompts.shape[1]:], torch.tensor(model.config.eos_token_id).reshape(-1))
    mask = (stops.long().cumsum(1) - stops.long()) == 0  # no stop before this token
    return rows, mask


def expected_batch(rows: torch.Tensor, mask: torch.Tensor, P: int, pad: int = 0):
    """Inputs and targets the trainer should see: pad after the first stop, IGNORE_INDEX off the completion."""
    window = rows.clone()
    window[:, P:] = window[:, P:].masked_fill(~mask, pad)
    counted = torch.zeros_like(window, dtype=torch.bool)
    counted[:, P:] = mask
    return window[:, :-1], window[:, 1:].masked_fill(~counted[:, 1:], IGNORE_INDEX)


def test_lmbda_one_trains_on_exactly_the_sampled_completions(tmp_path, data, monkeypatch):
    P, N, temperature = 5, 7, 1.3
    the_teacher = teacher()
    teacher_inputs = spy_model_inputs(monkeypatch, the_teacher)
    targets_seen = spy_loss_targets(monkeypatch)
    cfg = config(tmp_path, steps=1, eval_every=0, lmbda=1.0, max_new_tokens=N, prompt_len=P,
                 gen_temperature=temperature)  # fmt: skip
    metrics = train(cfg, student(eos_token_id=STOPS), data, teacher=the_teacher, progress=False)

    batch = next(BatchLoader(data.train, cfg.batch_size, seed=cfg.seed))
    rows, mask = reference_rollout(student(eos_token_id=STOPS), batch.inputs[:, :P], N, temperature,
                                   sampling_seed(cfg.seed, 0, 0, 0))  # fmt: skip
    inputs, targets = expected_batch(rows, mask, P)
    lengths = mask.sum(1)
    assert 0 < lengths.min() < N and lengths.max() == N  # some rows stopped early, some did not
    assert len(teacher_inputs) == 1 and torch.equal(teacher_inputs[0], inputs)  # the sampled rows, nothing else
    assert len(targets_seen) == 1 and torch.equal(targets_seen[0], targets)
    counted = targets_seen[0] != IGNORE_INDEX  # the loss mask: exactly the completion, to its first stop
    assert not counted[:, : P - 1].any() and torch.equal(counted.sum(1), lengths)
    assert metrics[0]["on_policy_fraction"] == 1.0
    assert metrics[0]["completion_len"] == pytest.approx(lengths.float().mean().item())


def test_mixed_precision_samples_from_the_weights_in_the_compute_dtype(tmp_path, data, monkeypatch):
    """One process training in bf16 (autocast over fp32 weights) samples from the weights rounded to
    bf16, as FSDP2's bf16-gathered parameters are: the model it samples from is the student cast to
    bf16 (every weight), and the rows it trains on are what sample_completions draws from that."""
    P, N, temperature = 5, 7, 1.3
    targets_seen = spy_loss_targets(monkeypatch)
    samplers, real = [], on_policy.sample_completions

    def recording(model, *args, **kwargs):
        samplers.append({name: t.clone() for name, t in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(on_policy, "sample_completions", recording)
    cfg = config(tmp_path, steps=1, eval_every=0, lmbda=1.0, max_new_tokens=N, prompt_len=P,
                 gen_temperature=temperature, dtype="bf16")  # fmt: skip
    train(cfg, student(eos_token_id=STOPS), data, teacher=teacher(), progress=False)

    as_bf16 = student(eos_token_id=STOPS).to(torch.bfloat16)
    assert len(samplers) == 1 and samplers[0].keys() == as_bf16.state_dict().keys()
    assert all(samplers[0][name].dtype == torch.bfloat16 and torch.equal(samplers[0][name], t)
               for name, t in as_bf16.state_dict().items())  # fmt: skip
    batch = next(BatchLoader(data.train, cfg.batch_size, seed=cfg.seed))
    rt = Runtime(0, 1, torch.device("cpu"), False)
    drawn = real(as_bf16, batch, P, N, temperature, sampling_seed(cfg.seed, 0, 0, 0), rt)
    assert len(targets_seen) == 1 and torch.equal(targets_seen[0], drawn.targets)


def test_seq_kd_trains_on_the_teachers_greedy_completions(tmp_path, data, monkeypatch):
    P, N = 6, 5
    targets_seen = spy_loss_targets(monkeypatch)
    cfg = config(tmp_path, steps=1, eval_every=0, alpha=0.0, seq_kd=True, max_new_tokens=N, prompt_len=P,
                 gen_temperature=0.0)  # fmt: skip
    metrics = train(cfg, student(), data, teacher=teacher(), progress=False)
    batch = next(BatchLoader(data.train, cfg.batch_size, seed=cfg.seed))
    rows, mask = reference_rollout(teacher(), batch.inputs[:, :P], N, 0.0, None)
    assert torch.equal(targets_seen[0], expected_batch(rows, mask, P)[1])
    assert metrics[0]["on_policy_fraction"] == 0.0 and metrics[0]["completion_len"] > 0


def test_compiled_sampling_trains_on_the_same_greedy_completions(tmp_path, data, monkeypatch):
    """compile_sampling (gemma2.static_decode): greedy student and teacher completions (lmbda 0.5
    with seq_kd, 4 steps: both samplers run) give the same rows to train on, so the same numbers."""
    run = dict(steps=4, eval_every=0, lmbda=0.5, seq_kd=True, max_new_tokens=5, prompt_len=6, gen_temperature=0.0,
               seed=1)  # steps 0 and 3 on-policy, 1 and 2 sampled by the teacher
    targets_seen = spy_loss_targets(monkeypatch)
    eager = train(config(tmp_path / "a", **run), student(eos_token_id=STOPS), data, teacher=teacher(), progress=False)
    eager_targets = list(targets_seen)
    targets_seen.clear()
    steps, real_call = [], StaticDecoder.__call__
    monkeypatch.setattr(StaticDecoder, "__call__", lambda self, token: steps.append(1) or real_call(self, token))
    compiled = train(config(tmp_path / "b", **run, compile_sampling=True), student(eos_token_id=STOPS), data,
                     teacher=teacher(), progress=False)  # fmt: skip
    assert len(eager_targets) == 4 and all(torch.equal(a, b) for a, b in zip(eager_targets, targets_seen, strict=True))
    assert strip(compiled) == strip(eager)
    assert steps  # the completions did go through the compiled decode step
    assert [r["on_policy_fraction"] for r in compiled] == [1.0, 0.5, 1 / 3, 0.5]  # steps of both kinds ran


def test_lmbda_zero_is_todays_run_bit_for_bit(tmp_path, data):
    """The golden run (test_trainer.test_golden_loss_curve) with on-policy settings that lmbda = 0
    leaves unused: the same numbers, bit for bit, as without them, the same metric keys, and the
    committed golden curve."""
    golden_run = dict(steps=8, grad_accum=2, eval_every=4)
    today = train(config(tmp_path / "a", **golden_run), student(), data, teacher=teacher(), progress=False)
    unused = dict(lmbda=0.0, max_new_tokens=3, gen_temperature=0.2, prompt_len=2)
    gkd = train(config(tmp_path / "b", **golden_run, **unused), student(), data, teacher=teacher(), progress=False)
    assert strip(gkd) == strip(today)
    golden = json.loads(GOLDEN.read_text())
    for key in ("loss", "ce", "kd", "grad_norm", "eval_ce", "eval_kd"):
        assert [m[key] for m in gkd if key in m] == pytest.approx(golden[key], rel=1e-5), key


def test_resume_with_lmbda_half_is_bit_exact(tmp_path, data):
    # seed 1 draws on-policy steps 1, 4 and 5 of 6: one before the checkpoint, both kinds after it.
    run = dict(lmbda=0.5, max_new_tokens=6, gen_temperature=1.0, seed=1, grad_accum=2, save_every=3)
    assert [is_on_policy(1, s, 0.5) for s in range(6)] == [True, False, False, True, True, False]
    full = train(config(tmp_path / "a", keep_last=None, **run), student(eos_token_id=STOPS), data,
                 teacher=teacher(), progress=False)  # fmt: skip
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    resumed = train(config(tmp_path / "b", **run), student(seed=9, eos_token_id=STOPS), data, teacher=teacher(),
                    resume=True, progress=False)  # fmt: skip
    assert strip(resumed) == strip([m for m in full if m["step"] > 3])
    lengths = [m["completion_len"] for m in full if "loss" in m]
    assert [x is not None for x in lengths] == [True, False, False, True, True, False]
    assert [m["on_policy_fraction"] for m in full if "loss" in m] == pytest.approx([1, 1 / 2, 1 / 3, 2 / 4, 3 / 5, 3 / 6])


# ------------------------------------------------------------------------------------------------
# Two FSDP ranks (gloo, CPU)

WORLD = 2


def _gkd_models() -> tuple[Gemma2ForCausalLM, Gemma2ForCausalLM]:
    config = tiny_training_config(vocab_size=96, sliding_window=4, max_position_embeddings=32)
    # Half the vocabulary stops a row: rows (and ranks) finish at different steps.
    s = init_weights(Gemma2ForCausalLM(config.replace(eos_token_id=tuple(range(3, 48)))), seed=2)
    return s, init_weights(Gemma2ForCausalLM(config), seed=1, std=0.3)


GKD = dict(lmbda=0.5, max_new_tokens=6, gen_temperature=0.0, seed=1)  # greedy: the same samples on 1 or 2 ranks


def _gkd_worker(rank: int, tmp: str, sample_sharded: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        lengths, gathers, real = [], [], on_policy.sample_completions

        def recording(model, *args, **kwargs):
            # Every Block sharded again since the last sampling (or training) call ...
            assert all(isinstance(p, DTensor) for p in model.model.layers.parameters())
            with torch.profiler.profile() as prof:
                batch = real(model, *args, **kwargs)
            # ... and gathered once for this whole call, not once per new token.
            gathers.append(sum(e.name.startswith("FSDP::all_gather (") for e in prof.events()))
            lengths.append(int((batch.targets != IGNORE_INDEX).sum(1).max()))  # this rank's longest completion
            return batch

        on_policy.sample_completions = recording
        student, teacher = _gkd_models()
        metrics = train(fsdp_train_config(Path(tmp) / "fsdp", 2, activation_checkpointing=True,
                                          sample_sharded=sample_sharded, **GKD),
                        student, fsdp_data(), teacher=teacher, progress=False)  # fmt: skip
        (Path(tmp) / f"lengths-{rank}.json").write_text(json.dumps(lengths))
        (Path(tmp) / f"gathers-{rank}.json").write_text(json.dumps(gathers))
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sample_sharded", [False, True])
def test_two_ranks_sample_in_step_and_train_like_one_process(tmp_path, sample_sharded):
    context = mp.spawn(_gkd_worker, args=(str(tmp_path), sample_sharded), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120  # a normal run takes seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two ranks hung: they ran different numbers of generation forwards")
    sharded = json.loads((tmp_path / "metrics.json").read_text())
    per_rank = [json.loads((tmp_path / f"lengths-{r}.json").read_text()) for r in range(WORLD)]
    assert per_rank[0] and per_rank[0] != per_rank[1]  # one rank's rows stopped first and it kept stepping
    layers = _gkd_models()[0].config.num_hidden_layers
    for r in range(WORLD):  # each sampling call gathered each Block once (sample_sharded: per new token)
        gathers = json.loads((tmp_path / f"gathers-{r}.json").read_text())
        assert all(g > layers for g in gathers) if sample_sharded else gathers == [layers] * len(per_rank[r])

    student, teacher = _gkd_models()
    single = train(fsdp_train_config(tmp_path / "single", 2 * WORLD, **GKD), student, fsdp_data(), teacher=teacher,
                   progress=False)  # fmt: skip
    assert any(m.get("completion_len") for m in single) and any(m.get("completion_len") is None for m in single if "loss" in m)
    assert_same_metrics(sharded, single, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Refusals, before any work


def test_settings_that_cannot_work_are_refused_before_any_work(tmp_path, data):
    for bad, match in [(dict(lmbda=1.5), "lmbda must be in"), (dict(max_new_tokens=0), "max_new_tokens must be"),
                       (dict(gen_temperature=-1.0), "gen_temperature must be"),
                       (dict(gen_temperature=float("inf")), "gen_temperature must be"),
                       (dict(prompt_len=0), "prompt_len must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            config(tmp_path, **bad)
    out = tmp_path / "run"
    cases = [
        (dict(lmbda=0.5, alpha=0.0), None, r"on-policy distillation \(lmbda = 0.5\) needs a live teacher.*--teacher"),
        (dict(seq_kd=True, alpha=0.0), None, "seq_kd needs a live teacher"),
        (dict(lmbda=0.5, alpha=0.0), teacher(), "alpha = 0 would train the student on cross-entropy against its own"),
        (dict(lmbda=0.5, max_new_tokens=16), teacher(), "leaves no prompt in a training row of seq_len = 16"),
        (dict(lmbda=0.5, max_new_tokens=8, prompt_len=9), teacher(), r"prompt_len 9 \+ max_new_tokens 8 = 17 tokens exceed seq_len = 16"),
    ]  # fmt: skip
    for settings, source, match in cases:
        with pytest.raises(ValueError, match=match):
            train(config(out, **settings), student(), data, teacher=source, progress=False)
    assert not out.exists()  # nothing written
    with pytest.raises(ValueError, match="compile_sampling runs in one process.*under torchrun"):
        on_policy.check_on_policy(config(out, lmbda=0.5, compile_sampling=True), data, student().config, teacher(), sharded=True)


def test_a_teacher_cache_is_refused(tmp_path, data):
    write_teacher_cache(teacher(), {"train": data.train, "heldout": data.heldout}, tmp_path / "cache", k=4,
                        batch_size=64, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"needs a live teacher: a teacher cache .* \(--teacher instead of --teacher-cache\)"):
        train(config(tmp_path / "run", lmbda=0.5, max_new_tokens=4, alpha=1.0), student(), data,
              teacher=TeacherCache(tmp_path / "cache"), progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_on_policy_settings(tmp_path):
    """Each one changes what the run trains on, also against a checkpoint older than the fields."""
    old = TrainConfig(out_dir=str(tmp_path), lmbda=0.5, max_new_tokens=8)
    state = {"step": 2, "config": dict(vars(old)), "run": {"train_fingerprint": "f"}}
    for change in (dict(lmbda=0.25), dict(seq_kd=True), dict(max_new_tokens=4), dict(gen_temperature=0.0),
                   dict(prompt_len=3)):  # fmt: skip
        with pytest.raises(ValueError, match=f"cannot resume .*{next(iter(change))} \\(checkpoint: "):
            check_resume(TrainConfig(**(vars(old) | change)), state, "f", tmp_path)
    on_policy_fields = ("lmbda", "seq_kd", "max_new_tokens", "gen_temperature", "prompt_len")
    before = state | {"config": {k: v for k, v in state["config"].items() if k not in on_policy_fields}}
    check_resume(TrainConfig(out_dir=str(tmp_path)), before, "f", tmp_path)  # the defaults: today's run
    with pytest.raises(ValueError, match=r"lmbda \(checkpoint: 0.0, now: 0.5\)"):
        check_resume(old, before, "f", tmp_path)


def test_script_flags_reach_the_trainer(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox."}) + "\n"
                                                 for i in range(40)))  # fmt: skip
    common = ["--student", "tiny", "--teacher", str(ROOT / "checkpoints" / "tiny-teacher"), "--data",
              str(tmp_path / "docs.jsonl"), "--seq-len", "16", "--batch-size", "2", "--steps", "2",
              "--eval-every", "0", "--no-progress", "--max-new-tokens", "4"]  # fmt: skip
    assert run_script(monkeypatch, *common, "--lmbda", "1", "--gen-temperature", "0.5", "--prompt-len", "8",
                      "--out", str(tmp_path / "gkd")) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "gkd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy_fraction"] for r in records] == [1.0, 1.0]
    assert all(1 <= r["completion_len"] <= 4 for r in records)
    state = json.loads((tmp_path / "gkd" / "step-000002" / "trainer_state.json").read_text())["config"]
    assert (state["lmbda"], state["gen_temperature"], state["prompt_len"], state["max_new_tokens"]) == (1.0, 0.5, 8, 4)
    capsys.readouterr()
    assert run_script(monkeypatch, *common, "--seq-kd", "--prompt-len", "13", "--out", str(tmp_path / "x")) == 2
    assert "error: prompt_len 13 + max_new_tokens 4 = 17 tokens exceed seq_len = 16" in capsys.readouterr().err


@pytest.mark.cuda
def test_on_policy_training_on_cuda_in_bf16(tmp_path, data):
    """The sampling generators live on the model's device; the student samples in its fp32 master
    weights while training runs under bf16 autocast."""
    cfg = config(tmp_path, steps=2, eval_every=0, lmbda=1.0, max_new_tokens=5, gen_temperature=1.0, device="cuda",
                 dtype="bf16")  # fmt: skip
    metrics = train(cfg, student(eos_token_id=STOPS), data, teacher=teacher().cuda(), progress=False)
    assert all(m["on_policy_fraction"] == 1.0 and 1 <= m["completion_len"] <= 5 for m in metrics)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
