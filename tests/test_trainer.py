"""The trainer: loss normalisation under gradient accumulation, exact resume, atomic checkpoints,
clear stops and errors, a distillation run that works, the golden loss curve, and checkpoints
that transformers loads."""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TIMINGS, tiny_training_config
from gemma2 import Gemma2ForCausalLM
from gemma2 import train_state
from gemma2 import trainer as T
from gemma2.checkpoint import load_model
from gemma2.data import IGNORE_INDEX, Batch, Datasets, PackedSequences
from gemma2.distill import kd_loss
from gemma2.distributed import runtime
from gemma2.teacher import Teacher
from gemma2.teacher_cache import TeacherCache, write_teacher_cache
from gemma2.train_state import latest_checkpoint
from gemma2.student import init_weights
from gemma2.trainer import NonFiniteLossError, TrainConfig, lr_at, train

V = tiny_training_config().vocab_size
GOLDEN = Path(__file__).parent / "golden" / "trainer_tiny.json"


tiny = tiny_training_config  # vocabulary V




def markov_data(n_tokens: int = 12_000, seq_len: int = 16, seed: int = 0) -> Datasets:
    """A stream where each token is usually followed by one fixed successor: learnable in a few
    hundred tiny steps, so the teacher has something to teach."""
    rng = np.random.default_rng(seed)
    successor = rng.integers(3, V, size=V)
    noise, random_ids = rng.random(n_tokens) < 0.3, rng.integers(3, V, size=n_tokens)
    tokens = np.empty(n_tokens, dtype=np.int32)
    tokens[0] = 3
    for i in range(1, n_tokens):
        tokens[i] = random_ids[i] if noise[i] else successor[tokens[i - 1]]
    cut = n_tokens * 9 // 10
    return Datasets(PackedSequences(tokens[:cut], seq_len), PackedSequences(tokens[cut:], seq_len))


def student(seed: int = 0, **overrides) -> Gemma2ForCausalLM:
    return init_weights(Gemma2ForCausalLM(tiny(**overrides)), seed)


def teacher(seed: int = 1) -> Gemma2ForCausalLM:
    return init_weights(Gemma2ForCausalLM(tiny()), seed, std=0.3)  # wide weights: a peaked teacher


def config(out: Path, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out), steps=6, batch_size=4, lr=3e-3, warmup=2, alpha=0.5, eval_every=3,
                  eval_sequences=16, chunk_size=24)  # fmt: skip
    return TrainConfig(**(values | overrides))


def losses(metrics: list[dict], key: str = "loss") -> list[float]:
    return [m[key] for m in metrics if key in m]


@pytest.fixture(scope="module")
def data() -> Datasets:
    return markov_data()


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(out_dir="unused", steps=110, lr=1.0, min_lr=0.1, warmup=10)
    assert [lr_at(s, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(100, TrainConfig(out_dir="unused", steps=100, lr=1.0, warmup=0)) == pytest.approx(0.1)


def test_a_warmup_longer_than_the_run_is_named(tmp_path, data, capsys):
    """The learning rate of 2 steps with warmup 10 stops at 2/10 of lr: said before training."""
    train(config(tmp_path / "short", steps=2, warmup=10, alpha=0.0, eval_every=0), student(), data, progress=False)
    err = capsys.readouterr().err
    assert "warmup = 10 steps is longer than the run's 2: the learning rate climbs only to 0.0006 of lr = 0.003" in err
    train(config(tmp_path / "long", steps=2, warmup=2, alpha=0.0, eval_every=0), student(), data, progress=False)
    assert "warmup" not in capsys.readouterr().err


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="alpha must be in"):
        TrainConfig(out_dir="x", alpha=1.5)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(out_dir="x", objective="kl")
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(out_dir="x", dtype="fp16")


def test_an_evaluation_without_rows_is_refused_before_any_work(tmp_path, data):
    """Each rank evaluates an equal share of the held-out rows: with fewer rows than ranks (here
    none for one) there is nothing to evaluate, refused before the run starts."""
    empty = PackedSequences(data.heldout.tokens[:8], data.heldout.seq_len)
    assert len(empty) == 0
    with pytest.raises(ValueError, match="evaluation would find 0 held-out rows for 1 ranks"):
        train(config(tmp_path / "out"), student(), Datasets(data.train, empty), teacher=teacher(), progress=False)
    assert not (tmp_path / "out").exists()
    train(config(tmp_path / "out", eval_every=0, steps=1), student(), Datasets(data.train, empty), teacher=teacher(),
          progress=False)  # fmt: skip


def test_a_mismatched_cache_or_too_little_data_leaves_no_out_dir(tmp_path, data):
    cache = tmp_path / "cache"
    write_teacher_cache(teacher(), {"train": data.train, "heldout": data.heldout}, cache, k=4, progress=False)
    other = Datasets(PackedSequences(data.train.tokens[: len(data.train.tokens) // 2], data.train.seq_len), data.heldout)
    with pytest.raises(ValueError, match="cache's 'train' split was built from other tokens"):
        train(config(tmp_path / "out"), student(), other, teacher=TeacherCache(cache), progress=False)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(config(tmp_path / "out", batch_size=len(data.train) + 1), student(), data, teacher=teacher(),
              progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


def _grads(model: Gemma2ForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_normalises_over_all_counted_tokens(tmp_path, data):
    cfg = config(tmp_path, chunk_size=7)
    rt = runtime(cfg.device)
    kd_teacher = Teacher(teacher(), data, rt)
    batch = data.train.batch(range(4))
    targets = batch.targets.clone()
    targets[0, :3] = IGNORE_INDEX  # micro-batch 1 counts 29 tokens ...
    targets[2:, 5:] = IGNORE_INDEX  # ... micro-batch 2 only 10: a per-micro-batch mean would weigh them wrongly
    whole = Batch(batch.indices, batch.inputs, targets)
    halves = [Batch(batch.indices[s], batch.inputs[s], targets[s]) for s in (slice(0, 2), slice(2, 4))]

    grads = []
    for micro in ([whole], halves):
        model = student()
        n, tokens, flops, sums = T._accumulate_gradients(T._StudentLoss(model, cfg, torch.float32, False), micro,
                                                         kd_teacher, 0.5, rt, lambda width: 10.0 * width)  # fmt: skip
        width = batch.inputs.shape[1]
        assert n == 39 and tokens == 4 * width and flops == 4 * width * 10.0 * width
        grads.append(_grads(model))
    # Reference: full logits through plain autograd, one mean over the 39 counted tokens.
    model = student()
    counted = targets != IGNORE_INDEX
    logits = model(batch.inputs)
    with torch.no_grad():
        t_logits = kd_teacher.model(batch.inputs)
    ce = F.cross_entropy(logits[counted], targets[counted])
    (0.5 * ce + 0.5 * kd_loss(logits, t_logits, counted)).backward()
    reference = _grads(model)
    for name in reference:
        torch.testing.assert_close(grads[0][name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(grads[1][name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert sums[0].item() == pytest.approx((0.5 * ce + 0.5 * kd_loss(logits, t_logits, counted)).item(), rel=1e-5)


def test_accumulated_micro_batches_train_like_one_batch(tmp_path, data):
    a = train(config(tmp_path / "a", batch_size=2, grad_accum=2), student(), data, teacher=teacher(), progress=False)
    b = train(config(tmp_path / "b", batch_size=4), student(), data, teacher=teacher(), progress=False)
    for key in ("loss", "ce", "kd", "grad_norm", "eval_ce", "eval_kd"):
        assert losses(a, key) == pytest.approx(losses(b, key), rel=1e-5), key


def test_resume_continues_exactly(tmp_path, data):
    cfg = config(tmp_path / "a", grad_accum=2, save_every=3, keep_last=None)
    full = train(cfg, student(), data, teacher=teacher(), progress=False)
    # A new run directory holding only the step-3 checkpoint, resumed with a fresh student.
    shutil.copytree(tmp_path / "a" / "step-000003", tmp_path / "b" / "step-000003")
    resumed = train(config(tmp_path / "b", grad_accum=2, save_every=3), student(seed=9), data, teacher=teacher(),
                    resume=True, progress=False)  # fmt: skip
    tail = [m for m in full if m["step"] > 3]
    assert [m["step"] for m in resumed] == [m["step"] for m in tail]
    for a, b in zip(resumed, tail):
        assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    # Resuming in place after a crash rewrites metrics.jsonl from the checkpoint on: no duplicates.
    log = (tmp_path / "a" / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "a" / "step-000006")
    train(cfg, student(seed=9), data, teacher=teacher(), resume=True, progress=False)
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in text.splitlines()]  # noqa: E731
    assert strip((tmp_path / "a" / "metrics.jsonl").read_text()) == strip(log)


def test_resume_refuses_another_teacher_or_student_config(tmp_path, data):
    """The teacher and the student's architecture are part of the run: a resume with another
    teacher (weights of the same shape, another shape or dtype, a cache instead of the model) or
    another student config is refused before any step, naming what differs; the same ones resume."""
    cfg = config(tmp_path / "run", steps=2, save_every=2, eval_every=0)
    train(cfg, student(), data, teacher=teacher(), progress=False)
    more = config(tmp_path / "run", steps=3, save_every=2, eval_every=0)
    log = (tmp_path / "run/metrics.jsonl").read_text()
    cache = tmp_path / "cache"
    write_teacher_cache(teacher(), {"train": data.train, "heldout": data.heldout}, cache, k=4, progress=False)
    wider = init_weights(Gemma2ForCausalLM(tiny(hidden_size=48)), seed=1, std=0.3)
    cases = [
        (student(), teacher(seed=5), "the teacher's weights differ"),
        (student(), wider, "the teacher .*hidden 32,.* -> .*hidden 48"),
        (student(), teacher().to(torch.bfloat16), "the teacher .*in fp32 -> .*in bf16"),
        (student(), TeacherCache(cache), "the teacher .*-> a top-4 cache"),
        (student(sliding_window=2), teacher(), r"the student's config \(sliding_window 8 -> 2\)"),
    ]
    for model, source, message in cases:
        with pytest.raises(ValueError, match="cannot resume from .*step-000002.*" + message):
            train(more, model, data, teacher=source, resume=True, progress=False)
    # dtype "auto" is bf16 on a GPU, fp32 here: a run begun on one device resumed on the other.
    state_file = tmp_path / "run/step-000002/trainer_state.json"
    saved = state_file.read_text()
    state = json.loads(saved)
    state["run"]["models"]["compute_dtype"] = "bf16"
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"compute dtype \(bf16 -> fp32; dtype 'auto' picks it per device: pass --dtype bf16"):
        train(more, student(), data, teacher=teacher(), resume=True, progress=False)
    state_file.write_text(saved)
    assert (tmp_path / "run/metrics.jsonl").read_text() == log and latest_checkpoint(tmp_path / "run").name == "step-000002"
    # Naming the dtype "auto" gave (the fix that message suggests) resumes: the dtype it computes in decides.
    metrics = train(config(tmp_path / "run", steps=3, save_every=2, eval_every=0, dtype="fp32"), student(), data,
                    teacher=teacher(), resume=True, progress=False)  # fmt: skip
    assert [m["step"] for m in metrics] == [3]


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path, data, monkeypatch):
    real_save = train_state.save_model
    calls = []

    def crashing_save(model, directory, **kwargs):
        calls.append(directory)
        real_save(model, directory, **kwargs)  # the weights are written ...
        if len(calls) == 2:
            raise OSError("disk full")  # ... and the process dies before the rest

    monkeypatch.setattr(train_state, "save_model", crashing_save)
    cfg = config(tmp_path, steps=4, save_every=2, eval_every=0)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, student(), data, teacher=teacher(), progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert not (tmp_path / "step-000004").exists()
    assert (tmp_path / ".tmp-step-000004" / "model.safetensors").exists()
    saved = load_model(tmp_path / "step-000002")
    assert all(torch.isfinite(p).all() for p in saved.parameters())

    monkeypatch.setattr(train_state, "save_model", real_save)
    metrics = train(cfg, student(), data, teacher=teacher(), resume=True, progress=False)
    assert [m["step"] for m in metrics] == [3, 4]
    assert latest_checkpoint(tmp_path).name == "step-000004"
    assert not list(tmp_path.glob(".tmp-*"))
    assert not (tmp_path / "step-000002").exists()  # keep_last=1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    real_loss = T.chunked_distill_loss
    calls = []

    def exploding_loss(*args, **kwargs):
        calls.append(1)
        loss, stats = real_loss(*args, **kwargs)
        return (loss * math.nan if len(calls) == 4 else loss), stats

    monkeypatch.setattr(T, "chunked_distill_loss", exploding_loss)
    cfg = config(tmp_path, steps=6, save_every=2, eval_every=0)
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss nan.*last good checkpoint is .*step-000002"):
        train(cfg, student(), data, teacher=teacher(), progress=False)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    saved = load_model(tmp_path / "step-000002")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_mismatches_are_caught_before_training(tmp_path, data):
    with pytest.raises(ValueError, match="student vocab size 64 != teacher vocab size 72"):
        train(config(tmp_path), student(), data, teacher=init_weights(Gemma2ForCausalLM(tiny(vocab_size=72))))
    with pytest.raises(ValueError, match="no teacher.*alpha=0"):
        train(config(tmp_path, alpha=0.3), student(), data)
    with pytest.raises(ValueError, match="token id 63 .* vocabulary has 40"):
        train(config(tmp_path, alpha=0), student(vocab_size=40), data)
    assert not list(tmp_path.iterdir())  # nothing written
    train(config(tmp_path, alpha=0, steps=1, eval_every=0), student(), data, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints.*resume"):
        train(config(tmp_path, alpha=0, steps=1, eval_every=0), student(), data, progress=False)


def test_activation_checkpointing_and_bf16(tmp_path, data):
    cfg = dict(steps=3, eval_every=0)
    plain = train(config(tmp_path / "a", **cfg), student(), data, teacher=teacher(), progress=False)
    ckpt = train(config(tmp_path / "b", activation_checkpointing=True, **cfg), student(), data, teacher=teacher(),
                 progress=False)  # fmt: skip
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-6)
    bf16 = train(config(tmp_path / "c", dtype="bf16", **cfg), student(), data, teacher=teacher(), progress=False)
    assert losses(bf16) == pytest.approx(losses(plain), rel=3e-2)
    assert load_model(tmp_path / "c" / "step-000003").output_weight.dtype == torch.float32  # fp32 master weights


def test_distillation_run_end_to_end(tmp_path, data):
    """A teacher trained with plain CE, then a student distilled from it: the student's held-out
    KD falls far below where it started, and its held-out CE follows."""
    teacher_metrics = train(
        config(tmp_path / "teacher", steps=150, alpha=0.0, lr=1e-2, warmup=10, eval_every=150, eval_sequences=None),
        big := student(seed=5, hidden_size=48, intermediate_size=96), data, progress=False,
    )  # fmt: skip
    teacher_ce = losses(teacher_metrics, "eval_ce")
    assert teacher_ce[-1] < 0.6 * teacher_ce[0]
    trained = load_model(latest_checkpoint(tmp_path / "teacher"))
    metrics = train(config(tmp_path / "student", steps=100, alpha=1.0, lr=1e-2, warmup=10, eval_every=50,
                           eval_sequences=None), student(), data, teacher=trained, progress=False)  # fmt: skip
    kd, ce = losses(metrics, "eval_kd"), losses(metrics, "eval_ce")
    assert kd[-1] < 0.5 * kd[0]
    assert ce[-1] < ce[0]
    first = next(m for m in metrics if "teacher_eval_ce" in m)
    assert first["teacher_eval_ce"] == pytest.approx(teacher_ce[-1], rel=1e-5)  # the same model, evaluated
    assert big is not None


def test_golden_loss_curve(tmp_path, data):
    """A short deterministic fp32 CPU run against a committed curve. The numbers depend on the
    torch version (and, at the last digits, on the CPU's kernels): after an intended change to
    the trainer, the model or the losses, regenerate with
        GEMMA2_REGEN_GOLDEN=1 python -m pytest tests/test_trainer.py -k golden
    and commit tests/golden/trainer_tiny.json with a note of why it changed."""
    metrics = train(config(tmp_path, steps=8, grad_accum=2, eval_every=4), student(), data, teacher=teacher(),
                    progress=False)  # fmt: skip
    curve = {key: losses(metrics, key) for key in ("loss", "ce", "kd", "grad_norm", "eval_ce", "eval_kd")}
    if os.environ.get("GEMMA2_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, **curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for key, values in curve.items():
        assert values == pytest.approx(golden[key], rel=1e-5), key


def test_saved_student_loads_in_transformers_with_the_same_logits(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    train(config(tmp_path, steps=2, eval_every=0), student(), data, teacher=teacher(), progress=False)
    path = latest_checkpoint(tmp_path)
    ours = load_model(path)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = data.heldout.batch([0, 1]).inputs
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# scripts/distill.py: a thin wrapper, run in process


SCRIPT = Path(__file__).parents[1] / "scripts" / "distill.py"


def run_script(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return exit_info.value.code


def test_script_trains_and_reports_user_errors(tmp_path, monkeypatch, capsys):
    from gemma2.tokenizer import train_tokenizer

    docs = [f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60)]
    tok = train_tokenizer(docs, tmp_path / "tok.model", vocab_size=320)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    common = ["--tokenizer", str(tok), "--data", str(tmp_path / "docs.jsonl"), "--seq-len", "16",
              "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--no-progress"]  # fmt: skip
    assert run_script(monkeypatch, "--student", "tiny", "--out", str(tmp_path / "t"), *common) == 0
    step = tmp_path / "t" / "step-000002"
    assert (step / "tokenizer.model").is_file() and load_model(step).config.vocab_size == 320
    # A student distilled from that checkpoint; then the errors, one line each, exit status 2.
    assert run_script(monkeypatch, "--student", "tiny", "--teacher", str(step), "--out", str(tmp_path / "s"),
                      *common[2:]) == 0  # fmt: skip
    capsys.readouterr()
    assert run_script(monkeypatch, "--student", "nope", "--out", str(tmp_path / "x"), *common) == 2
    assert "error: student 'nope' is neither" in capsys.readouterr().err
    assert run_script(monkeypatch, "--student", "tiny", "--out", str(tmp_path / "t"), *common) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


TEACHER = Path(__file__).parents[1] / "checkpoints" / "tiny-teacher"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--alpha", "1.5"], r"alpha must be in \[0, 1\]"),
        (["--keep-last", "-2"], "keep_last must be >= 1"),
        (["--stop-grace", "-5"], r"--stop-grace must be a number of seconds >= 0 \(0: not checked\), got -5.0"),
        (["--out", "{tmp}/file"], "file exists and is not a directory"),
        (["--out", "{tmp}/mine"], r"mine is not empty \(notes.txt\) .*\(--overwrite\)"),
        (["--out", "{tmp}/run"], r"already holds checkpoints \(step-000001\); pass resume=True \(--resume\)"),
        (["--tokenizer", "{tmp}/other.model"], r"other.model \(300 pieces\) is not the one the teacher came with"),
        # --resume: what the checkpoint alone says is checked first too.
        (["--out", "{tmp}/run", "--resume"], r"step-000001 has no optimizer/ directory, so it cannot be resumed"),
        (["--out", "{tmp}/resumable", "--resume"], r"step-000005 is at step 5, past steps = 2"),
        (["--out", "{tmp}/resumable", "--resume", "--steps", "6"],
         r"cannot resume from .*step-000005: these settings differ .*lr \(checkpoint: 0.5, now: 0.0003\)"),
    ],
)
def test_script_refuses_bad_flags_and_out_dirs_before_any_model_or_data_is_read(tmp_path, monkeypatch, capsys, args,
                                                                                message):  # fmt: skip
    from gemma2.tokenizer import train_tokenizer

    train_tokenizer(["Hello there! How are you today?"] * 3, tmp_path / "other.model", 300)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "step-000001").mkdir(parents=True)
    (tmp_path / "run" / "step-000001" / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "resumable" / "step-000005" / "optimizer").mkdir(parents=True)
    (tmp_path / "resumable" / "step-000005" / "trainer_state.json").write_text(
        json.dumps({"step": 5, "config": {"lr": 0.5, "steps": 5}})
    )
    for name in ("gemma2.checkpoint.load_model", "gemma2.student.load_student", "gemma2.data_args.datasets_from_args"):
        monkeypatch.setattr(name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))
    flags = ["--student", "tiny", "--teacher", str(TEACHER), "--out", str(tmp_path / "new"), "--steps", "2"]
    code = run_script(monkeypatch, *flags, *[a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert (tmp_path / "file").read_text() == (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()


def test_a_student_config_beside_another_tokenizer_is_built_fresh_for_the_one_given(tmp_path, monkeypatch):
    """--student DIR/config.json builds a fresh student for --tokenizer: DIR's own tokenizer.model
    is not the student's, so it is not held against the one given (the checks pass; the load is next)."""
    from gemma2.tokenizer import train_tokenizer

    train_tokenizer(["Hello there! How are you today?"] * 3, tmp_path / "other.model", 300)

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr("gemma2.student.load_student", reached)
    with pytest.raises(Reached):
        run_script(monkeypatch, "--student", str(TEACHER / "config.json"), "--tokenizer", str(tmp_path / "other.model"),
                   "--out", str(tmp_path / "new"), "--steps", "2")  # fmt: skip


def test_a_rank_saves_and_restores_its_own_cuda_rng_state(monkeypatch):
    """Saving every device's state (as before) made a resume on a machine with fewer GPUs fail;
    CUDA is faked here: which state goes to which device is plain bookkeeping."""
    from gemma2.train_state import _rng_state, _set_rng_state

    device, restored = [1], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets every device"))
    state = _rng_state()
    assert [int(t[0]) for t in state["cuda"]] == [7]
    _set_rng_state(state)
    every = state | {"cuda": [torch.tensor([i]) for i in range(8)]}  # an older checkpoint: 8 devices
    _set_rng_state(every)
    device[0] = 9  # resumed where this device's index is beyond what was saved
    _set_rng_state(every)
    assert restored == [7, 1, 0]
