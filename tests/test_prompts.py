"""Prompt datasets (gemma2.prompts) for on-policy distillation: rows laid out as written by hand
from the tokenizer's own encodings; left padding changes no loss, gradient or sample (against each
example computed alone, unpadded); the trainer and the script run on them and resume exactly; two
FSDP2 ranks train like one process; settings that cannot work are refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import TIMINGS, assert_same_metrics, random_prompt_rows, tiny_training_config
from gemma2 import Gemma2ForCausalLM
from gemma2.data import IGNORE_INDEX, Batch, BatchLoader, Datasets
from gemma2.distributed import Runtime
from gemma2.on_policy import is_on_policy, sample_completions
from gemma2.prompts import encode_example, load_prompt_datasets, prompt_key
from gemma2.student import init_weights
from gemma2.tokenizer import Tokenizer, train_tokenizer
from gemma2.trainer import TrainConfig, train
from test_fsdp import _train_config as fsdp_train_config

ROOT = Path(__file__).parents[1]
TEXTS = [f"Question {i}: how many legs has a {a}? Answer: a {a} has {n} legs." for i, (a, n) in
         enumerate([("cat", 4), ("bird", 2), ("spider", 8), ("ant", 6), ("dog", 4), ("fish", 0)] * 10)]  # fmt: skip
EXAMPLES = [
    {"prompt": "How many legs has a cat?", "completion": " Four."},
    {"messages": [{"role": "user", "content": "How many legs has a bird?"}, {"role": "assistant", "content": "Two."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A spider?"},
                  {"role": "assistant", "content": "Eight legs, and a very long answer that is cut."}]},
    {"prompt": "An ant", "completion": " has six legs."},
]  # fmt: skip
N = 6  # max_new_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320))


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def model(tok: Tokenizer, seed: int, **overrides) -> Gemma2ForCausalLM:
    cfg = tiny_training_config(**({"vocab_size": tok.vocab_size, "max_position_embeddings": 128, "sliding_window": 4}
                                  | overrides))  # fmt: skip
    return init_weights(Gemma2ForCausalLM(cfg), seed, std=0.3)


def expected_ids(example: dict, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Prompt and completion as the tokenizer writes them (the chat format is tested in test_tokenizer)."""
    if "messages" in example:
        *turns, answer = example["messages"]
        return tok.encode_chat(turns), [*tok.encode(answer["content"], bos=False), tok.end_of_turn_id]
    return tok.encode(example["prompt"]), tok.encode(example["completion"], bos=False, eos=True)


def test_rows_hold_each_prompt_right_aligned_and_count_only_its_completion(tmp_path, tok):
    data = load_prompt_datasets([write_jsonl(tmp_path / "p.jsonl", EXAMPLES)], tok, N, holdout_fraction=0)
    rows = data.train
    pairs = [expected_ids(e, tok) for e in EXAMPLES]
    P = max(len(p) for p, _ in pairs)
    assert data.heldout is None and len(rows) == 4 and rows.prompt_len == P and rows.seq_len == P + N - 1
    assert len(pairs[2][1]) > N  # the third completion is cut to N tokens
    # A batch spans its own longest prompt and completion: the whole layout for all four, fewer
    # prompt columns for the two shortest prompts, and fewer completion columns too for the one
    # short answer; it says where in the layout it starts.
    assert len(pairs[3][0]) < len(pairs[0][0]) < len(pairs[1][0]) < P and len(pairs[1][1]) < N
    for indices in ([0, 1, 2, 3], [3, 0], [1]):
        batch = rows.batch(indices)
        wide = max(len(pairs[i][0]) for i in indices)  # the batch's prompt columns
        C = max(min(len(pairs[i][1]), N) for i in indices)  # its completion columns
        assert batch.start == P - wide and batch.inputs.shape == (len(indices), wide + C - 1)
        for b, i in enumerate(indices):
            prompt, completion = pairs[i][0], pairs[i][1][:N]
            row = [tok.pad_id] * (wide - len(prompt)) + prompt + completion + [tok.pad_id] * (C - len(completion))
            counted = [wide <= j < wide + len(completion) for j in range(wide + C)]
            assert batch.inputs[b].tolist() == row[:-1]
            assert batch.targets[b].tolist() == [t if c else IGNORE_INDEX for t, c in zip(row[1:], counted[1:])]
            assert batch.valid[b].tolist() == [j >= wide - len(prompt) for j in range(wide + C - 1)]
    assert rows.batch([0, 1, 2, 3]).start == 0 and rows.batch([0, 1, 2, 3]).inputs.shape[1] == P + N - 1
    assert rows.has_completions and rows.stop_ids == (tok.eos_id, tok.end_of_turn_id)


@pytest.mark.parametrize("attention, device", [("eager", "cpu"), ("banded", "cpu"),
                                               pytest.param("flex", "cuda", marks=pytest.mark.cuda)])  # fmt: skip
def test_left_padding_changes_no_loss_and_no_gradient(tmp_path, tok, attention, device):
    """The summed CE of a padded batch and its gradients equal the sums over each example run
    alone without padding (fp32, 1e-5); on CUDA through compiled FlexAttention, forward and backward."""
    rows = load_prompt_datasets([write_jsonl(tmp_path / "p.jsonl", EXAMPLES)], tok, N, holdout_fraction=0).train
    batch = Batch(*(t.to(device) for t in rows.batch(range(4))[:4]))
    assert (~batch.valid).any(dim=1).sum() >= 2  # at least two rows are padded

    def ce_sum(m, inputs, targets, valid):
        logits = m(inputs, valid)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    wide = dict(head_dim=16, query_pre_attn_scalar=16)  # CUDA's compiled FlexAttention takes heads of 16 up
    padded, alone = model(tok, 0, **wide).to(device), model(tok, 0, **wide).to(device)
    padded.attention = alone.attention = attention
    loss = ce_sum(padded, batch.inputs, batch.targets, batch.valid)
    loss.backward()
    ref = 0.0
    for b in range(4):
        keep = batch.valid[b]
        ref = ref + ce_sum(alone, batch.inputs[b, keep][None], batch.targets[b, keep][None], None)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(padded.named_parameters(), alone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def greedy_alone(m: Gemma2ForCausalLM, prompt: torch.Tensor, n: int, stops: tuple[int, ...]) -> list[int]:
    """Up to n greedy tokens after `prompt` [T] by full uncached forwards, through the first stop."""
    row = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            row = torch.cat([row, m(row)[:, -1].argmax(-1, keepdim=True)], dim=1)
    new = row[0, len(prompt):].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in stops), n)]


def test_sampling_from_padded_prompts_gives_each_prompt_its_own_completion(tmp_path, tok):
    """Greedy completions of a left-padded batch equal each prompt's own, computed by full
    uncached forwards; each stops at its first stop id (the model's eos or the given ones)."""
    rows = load_prompt_datasets([write_jsonl(tmp_path / "p.jsonl", EXAMPLES)], tok, N, holdout_fraction=0).train
    m = model(tok, 3).eval()
    rt = Runtime(0, 1, torch.device("cpu"), False)
    # Stop ids from the tokens the rows would sample anyway, so some rows stop early.
    P = rows.prompt_len
    free = sample_completions(m, rows.batch(range(4)), P, N, 0.0, 0, rt)
    stops = (int(free.inputs[0, P + 1]), int(free.inputs[1, P]))
    # All four rows; the two shortest prompts alone, a batch that starts inside the padding; two
    # rows that both stop early, whose sampled rows end there.
    longest = []
    for indices in ([0, 1, 2, 3], [3, 0], [0, 1]):
        batch = rows.batch(indices)
        out = sample_completions(m, batch, rows.prompt_len, N, 0.0, 0, rt, stop_ids=stops)
        P = rows.prompt_len - batch.start  # the batch's prompt columns
        lengths = []
        for b in range(len(indices)):
            new = greedy_alone(m, batch.inputs[b, :P][batch.valid[b, :P]], N, (*stops, m.config.eos_token_id))
            n = len(new)
            lengths.append(n)
            full = torch.cat([out.inputs[b], out.targets[b, -1:].clamp(min=0)])
            assert full[P : P + n].tolist() == new
            counted = out.targets[b] != IGNORE_INDEX
            assert counted.tolist() == [P <= j + 1 < P + n for j in range(out.inputs.shape[1])]
            sampled = torch.ones(out.inputs.shape[1] - P, dtype=torch.bool)
            assert torch.equal(out.valid[b], torch.cat([batch.valid[b, :P], sampled]))
        # The rows end with the last step any row took: no column of padding alone after them.
        assert out.start == batch.start and out.inputs.shape[1] == P + max(lengths) - 1
        longest.append(max(lengths))
    assert batch.start > 0 and longest[0] == N > longest[-1]  # the stop ids ended some rows, or all


def config(out: Path, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out), steps=4, batch_size=2, lr=3e-3, warmup=1, alpha=1.0, eval_every=2,
                  chunk_size=16, max_new_tokens=N, lmbda=0.5, gen_temperature=1.0)  # fmt: skip
    return TrainConfig(**(values | overrides))


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_a_prompt_written_two_ways_is_one_prompt_for_the_held_out_split(tok):
    """The split's key is the prompt the template encodes: "assistant" or "model", spaces around a
    turn, a system message folded in: keys equal exactly when the prompt tokens are."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    examples = [
        {"messages": [turn("user", "Hi there"), turn("assistant", "A")]},
        {"messages": [turn("user", " Hi there\n"), turn("model", "B")]},
        {"messages": [turn("user", "Hi there")]},
        {"messages": [turn("system", "Be brief."), turn("user", "Hi there"), turn("assistant", "C")]},
        {"messages": [turn("user", "Be brief.\n\nHi there")]},
        {"messages": [turn("user", "Hi"), turn("model", "Hello"), turn("user", "Hi there")]},
        {"prompt": "Hi there", "completion": " A"},
    ]
    for a in examples:
        for b in examples:
            same_tokens = encode_example(a, tok)[0] == encode_example(b, tok)[0]
            assert (prompt_key(a, "a") == prompt_key(b, "b")) == same_tokens, (a, b)
    with pytest.raises(ValueError, match="x.jsonl:3: chat turn 0 is 'model'"):
        prompt_key({"messages": [turn("model", "A")]}, "x.jsonl:3")


@pytest.fixture(scope="module")
def chats(tmp_path_factory, tok):
    animals = [("cat", 4), ("bird", 2), ("spider", 8), ("ant", 6), ("dog", 4), ("fish", 0)] * 3
    examples = [{"messages": [{"role": "user", "content": f"How many legs has a {a} ({i})?"},
                              {"role": "assistant", "content": f"A {a} has {n} legs."}]}
                for i, (a, n) in enumerate(animals)]  # fmt: skip
    examples += [{"prompt": f"Legs of a {a} number", "completion": f" {n}."} for a, n in [("cat", 4), ("ant", 6)]]
    path = write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", examples)
    return load_prompt_datasets([path], tok, N, holdout_fraction=0.2)


def sums_alone(student: Gemma2ForCausalLM, teacher: Gemma2ForCausalLM, batch) -> tuple[float, float, int]:
    """CE, forward KL (teacher to student) and their token count, summed over the counted targets of
    each row of `batch` run alone through both models without its padding."""
    ce = kd = count = 0.0
    with torch.no_grad():
        for b in range(len(batch.inputs)):
            keep = batch.valid[b]
            inputs, targets = batch.inputs[b, keep][None], batch.targets[b, keep]
            counted = targets != IGNORE_INDEX
            log_s = student(inputs)[0, counted].log_softmax(-1)
            log_t = teacher(inputs)[0, counted].log_softmax(-1)
            ce += -log_s.gather(-1, targets[counted, None]).sum().item()
            kd += (log_t.exp() * (log_t - log_s)).sum().item()
            count += counted.sum().item()
    return ce, kd, count


def test_a_step_on_padded_rows_has_the_loss_of_each_example_alone(tmp_path, tok, chats):
    """The trainer's first loss on prompt rows (reference completions, lmbda 0): (1 - alpha) CE +
    alpha forward KL, both summed over the completions' tokens of each example run alone through
    both models without padding, over the count."""
    cfg = config(tmp_path / "run", steps=1, lmbda=0.0, alpha=0.5, eval_every=0, batch_size=4)
    metrics = train(cfg, model(tok, 0), chats, teacher=model(tok, 1), progress=False)
    batch = next(BatchLoader(chats.train, cfg.batch_size, seed=cfg.seed))
    ce, kd, count = sums_alone(model(tok, 0), model(tok, 1), batch)
    assert count > 0 and (~batch.valid).any()
    assert metrics[0]["loss"] == pytest.approx((0.5 * ce + 0.5 * kd) / count, rel=1e-5)


def test_evaluation_scores_the_file_and_the_students_own_completions(tmp_path, tok, chats):
    """At step 0: eval_ce and eval_kd over the held-out examples' own completions, and
    eval_sample_kd (lmbda 0: evaluated because the data are prompts), the teacher's forward KL to
    the student over the student's greedy completions of each held-out prompt; each example run
    alone, per completion token; eval_sample_len their mean length."""
    metrics = train(config(tmp_path / "run", steps=1, lmbda=0.0, eval_every=1), model(tok, 0), chats,
                    teacher=model(tok, 1), progress=False)  # fmt: skip
    student, teacher = model(tok, 0).eval(), model(tok, 1)
    held = chats.heldout.batch(range(len(chats.heldout)))
    assert (~held.valid).any()  # padded rows among them
    ce, kd, count = sums_alone(student, teacher, held)
    assert metrics[0]["eval_ce"] == pytest.approx(ce / count, rel=1e-5)
    assert metrics[0]["eval_kd"] == pytest.approx(kd / count, rel=1e-5)
    stops = (student.config.eos_token_id, *tok.stop_ids)
    kd, lengths = 0.0, []
    P = chats.heldout.prompt_len - held.start  # the batch's prompt columns
    for b in range(len(held.inputs)):
        prompt = held.inputs[b, :P][held.valid[b, :P]]
        completion = greedy_alone(student, prompt, N, stops)
        row = torch.tensor([*prompt.tolist(), *completion])[None]
        with torch.no_grad():
            scored = slice(len(prompt) - 1, row.shape[1] - 1)  # the positions that predict the completion
            log_s, log_t = (m(row)[0, scored].log_softmax(-1) for m in (student, teacher))
        kd += (log_t.exp() * (log_t - log_s)).sum().item()
        lengths.append(len(completion))
    assert metrics[0]["eval_sample_len"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics[0]["eval_sample_kd"] == pytest.approx(kd / sum(lengths), rel=1e-5)
    assert min(lengths) >= 1


@pytest.mark.parametrize("group", [0, 8])  # rows in batches of like lengths (gemma2.data.BatchLoader), or not
def test_on_policy_training_on_prompts_runs_and_resumes_exactly(tmp_path, tok, chats, group):
    assert chats.heldout is not None and len(chats.heldout) >= 1
    # A seed whose coin puts on-policy steps before and after the resume, and one step that is not.
    coins = {s: [is_on_policy(s, step, 0.5) for step in range(4)] for s in range(64)}
    seed = next(s for s, c in coins.items() if any(c[:2]) and any(c[2:]) and not all(c))
    run = dict(seed=seed, group_by_length=group)
    whole = train(config(tmp_path / "a", **run), model(tok, 0), chats, teacher=model(tok, 1), progress=False)
    steps = [r for r in whole if "loss" in r]
    assert len(steps) == 4 and 0 < steps[-1]["on_policy_fraction"] < 1  # both kinds of step ran
    assert all(r["completion_len"] is None or 0 < r["completion_len"] <= N for r in steps)
    assert all(math.isfinite(r["loss"]) for r in steps) and any("eval_kd" in r for r in whole)
    first = train(config(tmp_path / "b", steps=2, **run), model(tok, 0), chats, teacher=model(tok, 1),
                  progress=False)  # fmt: skip
    rest = train(config(tmp_path / "b", **run), model(tok, 0), chats, teacher=model(tok, 1), resume=True,
                 progress=False)  # fmt: skip
    assert strip(first + rest) == strip(whole)


def test_the_trainer_reads_its_rows_grouped_by_length_when_asked(tmp_path, tok, chats, monkeypatch):
    import gemma2.trainer as trainer

    groups, real = [], trainer.BatchLoader
    monkeypatch.setattr(trainer, "BatchLoader", lambda *a, **k: groups.append(k.get("group")) or real(*a, **k))
    train(config(tmp_path / "run", steps=1, lmbda=0.0, eval_every=0, group_by_length=8), model(tok, 0), chats,
          teacher=model(tok, 1), progress=False)  # fmt: skip
    assert groups and set(groups) == {8}  # the check before any work, and the run's loader


@pytest.mark.cuda
def test_on_policy_training_on_prompts_on_cuda_in_bf16(tmp_path, tok, chats):
    """Padding masks and sampled rows on the device, compiled FlexAttention under bf16 autocast."""
    cfg = config(tmp_path / "run", steps=2, lmbda=1.0, device="cuda", dtype="bf16")
    student, teacher = (model(tok, seed, head_dim=16, query_pre_attn_scalar=16) for seed in (0, 1))
    student.attention = teacher.attention = "auto"  # compiled FlexAttention on CUDA (heads of 16 up)
    metrics = train(cfg, student, chats, teacher=teacher.cuda(), progress=False)
    steps = [r for r in metrics if "loss" in r]
    assert all(r["on_policy_fraction"] == 1.0 and 1 <= r["completion_len"] <= N for r in steps)
    assert all(math.isfinite(r["loss"]) for r in steps) and any("eval_kd" in r for r in metrics)


def test_settings_that_cannot_work_with_prompts_are_refused(tmp_path, tok, chats):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "A cat"}, {"prompt": "A dog"}])
    no_answers = load_prompt_datasets([questions], tok, N, holdout_fraction=0)
    same_layout = load_prompt_datasets([questions], tok, N, prompt_len=chats.train.prompt_len, holdout_fraction=0)
    held_no_answers = Datasets(chats.train, same_layout.train)
    cases = [
        (chats, dict(max_new_tokens=N + 1), {}, "laid out for 6 completion tokens"),
        (chats, dict(prompt_len=chats.train.prompt_len + 1), {}, "laid out with prompt_len"),
        (no_answers, dict(lmbda=0.5, eval_every=0), {}, "no completion, which a step that is not on-policy"),
        (Datasets(chats.train, random_prompt_rows(8, 0, 96)), dict(), {},
         "the held-out split of a prompt dataset must be"),
        # A sampled row is prompt_len + max_new_tokens long: one more than a training row.
        (chats, dict(), dict(max_position_embeddings=chats.train.seq_len), "beyond the context of the student"),
    ]
    for data, settings, student_settings, match in cases:
        with pytest.raises(ValueError, match=match):
            train(config(tmp_path / "out", **settings), model(tok, 0, **student_settings), data,
                  teacher=model(tok, 1), progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()
    # Held-out prompts without completions: nothing to evaluate without a live teacher ...
    with pytest.raises(ValueError, match="some held-out examples have no completion, and without a live teacher"):
        train(config(tmp_path / "out", lmbda=0.0, alpha=0.0), model(tok, 0), held_no_answers, progress=False)
    assert not (tmp_path / "out").exists()
    # ... with one, the student's own completions of them are (and only those).
    metrics = train(config(tmp_path / "held", steps=1, eval_every=1), model(tok, 0), held_no_answers,
                    teacher=model(tok, 1), progress=False)  # fmt: skip
    evals = [r for r in metrics if "loss" not in r]
    assert len(evals) == 2 and all(r["eval_sample_kd"] > 0 and "eval_ce" not in r for r in evals)
    # Without completions, lmbda = 1 trains on the student's samples alone.
    metrics = train(config(tmp_path / "ok", lmbda=1.0, eval_every=0, steps=1), model(tok, 0), no_answers,
                    teacher=model(tok, 1), progress=False)  # fmt: skip
    assert metrics[0]["completion_len"] > 0
    # Nothing is sampled at lmbda 0 without evaluation: a layout that fills the context trains.
    full = model(tok, 0, max_position_embeddings=chats.train.seq_len)
    assert train(config(tmp_path / "full", lmbda=0.0, eval_every=0, steps=1), full, chats, teacher=model(tok, 1),
                 progress=False)[0]["loss"] > 0  # fmt: skip


def test_bad_files_are_named_with_their_line(tmp_path, tok, capsys):
    bad = {
        "a.jsonl": ('{"prompt": "x"}\n{"prompt": 3}\n', r"a.jsonl:2: expected"),
        "b.jsonl": ('{"prompt": "x"}\n\n{"prompt": \n', r"b.jsonl:3: not JSON"),
        "c.txt": ("hello\n", r"c.txt: prompts come as .jsonl files"),
        "d.jsonl": ('{"messages": [{"role": "model", "content": "hi"}, {"role": "user", "content": "x"}]}\n',
                    r"d.jsonl:1: chat turn 0 is 'model'"),
        "e.jsonl": ('{"messages": ["hi"]}\n', r"e.jsonl:1: turn 0 must be an object with role and content, got str"),
        "f.jsonl": ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
                    '{"role": "assistant", "content": "z"}]}\n', r"f.jsonl:1: chat turn 2 is 'model' where 'user'"),
        "g.jsonl": ("[" * 100_000 + "\n", r"g.jsonl:1: JSON nested too deeply"),
        # An empty or malformed conversation beside a prompt is named (it crashed with an IndexError).
        "h.jsonl": ('{"messages": [], "prompt": "x"}\n', r'h.jsonl:1: "messages" must be a non-empty list'),
        "i.jsonl": ('{"messages": {"role": "user"}, "prompt": "x"}\n', r'i.jsonl:1: "messages" must be a non-empty'),
    }  # fmt: skip
    for name, (text, match) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_prompt_datasets([tmp_path / name], tok, N, holdout_fraction=0)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "A cat", "completion": " four"}).encode() + b"\n")
    assert len(load_prompt_datasets([bom], tok, N, holdout_fraction=0).train) == 1
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a cat " * 20}, {"prompt": "A dog"}])
    data = load_prompt_datasets([long], tok, N, prompt_len=8, holdout_fraction=0)
    assert len(data.train) == 1 and "dropped 1 of 2 training examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no training prompt fits in prompt_len = 2"):
        load_prompt_datasets([long], tok, N, prompt_len=2, holdout_fraction=0)


def test_a_long_tail_of_prompts_gets_a_narrower_width_suggested(tmp_path, tok, capsys):
    short = [{"prompt": f"A {a} {i}?", "completion": " yes"} for i, a in enumerate(["cat", "dog", "ant", "bird"] * 50)]
    tail = [{"prompt": "a cat " * 40, "completion": " no"}]
    load_prompt_datasets([write_jsonl(tmp_path / "p.jsonl", short + tail)], tok, N, holdout_fraction=0)
    err = capsys.readouterr().err
    width = max(len(tok.encode(e["prompt"])) for e in short)  # 200 of the 201 examples fit in it
    assert f"rows of prompt_len {len(tok.encode(tail[0]['prompt']))} + max_new_tokens {N}" in err
    assert f"prompt_len {width} would keep {200 / 201:.1%} of the examples" in err
    load_prompt_datasets([write_jsonl(tmp_path / "q.jsonl", short)], tok, N, holdout_fraction=0)
    assert "would keep" not in capsys.readouterr().err  # no tail: nothing to suggest


def test_scripts_distil_on_prompts_from_the_teacher_or_its_cache(tmp_path, tok):
    """distill.py --prompts with a live teacher (on-policy) and from a cache that cache_teacher.py
    --prompts wrote for the same rows; flags that do not go together are one line."""
    import subprocess
    import sys

    from gemma2.checkpoint import save_model

    examples = [{"messages": [{"role": "user", "content": f"Legs of a {a} ({i})?"}, {"role": "assistant", "content": f"{n}."}]}
                for i, (a, n) in enumerate([("cat", 4), ("bird", 2), ("spider", 8), ("ant", 6)] * 3)]  # fmt: skip
    prompts = write_jsonl(tmp_path / "chats.jsonl", examples)
    save_model(model(tok, 1), tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    student_cfg = tmp_path / "student.json"
    model(tok, 0).config.to_json(student_cfg)
    common = [sys.executable, str(ROOT / "scripts/distill.py"), "--student", str(student_cfg), "--teacher",
              str(tmp_path / "teacher"), "--prompts", str(prompts), "--steps", "2", "--batch-size", "2",
              "--max-new-tokens", "4", "--eval-every", "0", "--warmup", "1", "--no-progress"]  # fmt: skip
    ok = subprocess.run([*common, "--lmbda", "0.5", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and "on_policy_fraction" in records[-1]
    # The run records its rows' layout, so naming the same prompt_len on resume changes nothing.
    P = json.loads((tmp_path / "run" / "step-000002" / "trainer_state.json").read_text())["config"]["prompt_len"]
    assert P == max(len(tok.encode_chat(e["messages"][:1])) for e in examples)
    more = [*common[:common.index("--steps")], "--steps", "3", *common[common.index("--steps") + 2 :]]
    resumed = subprocess.run([*more, "--lmbda", "0.5", "--prompt-len", str(P), "--resume", "--out", str(tmp_path / "run")],
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    # ... and without it, the data lay the rows out as before (distill.py's early check leaves
    # prompt_len to the data).
    more[more.index("--steps") + 1] = "4"
    resumed = subprocess.run([*more, "--lmbda", "0.5", "--resume", "--out", str(tmp_path / "run")], capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "step-000004").is_dir()
    bad = subprocess.run([*common, "--seq-len", "64", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: with --prompts, rows are")
    assert not (tmp_path / "bad").exists()

    layout = ["--prompts", str(prompts), "--max-new-tokens", "4", "--holdout-fraction", "0.25"]
    cached = subprocess.run([sys.executable, str(ROOT / "scripts/cache_teacher.py"), "--teacher", str(tmp_path / "teacher"),
                             "--out", str(tmp_path / "cache"), "--k", "8", *layout], capture_output=True, text=True)  # fmt: skip
    assert cached.returncode == 0, cached.stderr
    index = json.loads((tmp_path / "cache" / "cache.json").read_text())
    # Examples without completions give a cache no step could use: refused before the teacher runs.
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"messages": e["messages"][:1]} for e in examples])
    refused = subprocess.run([sys.executable, str(ROOT / "scripts/cache_teacher.py"), "--teacher",
                              str(tmp_path / "teacher"), "--out", str(tmp_path / "c2"), "--prompts", str(questions),
                              "--max-new-tokens", "4"], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: some train examples")
    assert "Traceback" not in refused.stderr and not (tmp_path / "c2").exists()
    assert index["splits"]["train"]["num_sequences"] == 9 and index["splits"]["heldout"]["teacher_ce"] > 0
    student = [sys.executable, str(ROOT / "scripts/distill.py"), "--student", str(student_cfg), "--tokenizer",
               str(tmp_path / "teacher" / "tokenizer.model"), "--teacher-cache", str(tmp_path / "cache"), *layout,
               "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--warmup", "1", "--no-progress"]  # fmt: skip
    ok = subprocess.run([*student, "--out", str(tmp_path / "from-cache")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    records = [json.loads(x) for x in (tmp_path / "from-cache" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["teacher_eval_ce"] == pytest.approx(index["splits"]["heldout"]["teacher_ce"])
    # The same prompts tokenized once into a token file are the same rows: the cache made from the
    # .jsonl accepts them (it checks their fingerprint), and the run is the same.
    tokenize = [sys.executable, str(ROOT / "scripts/tokenize_data.py"), "--tokenizer", str(tok.path), "--prompts",
                str(prompts), "--holdout-fraction", "0.25", "--out", str(tmp_path / "chats.npy"), "--no-progress"]
    tokenized = subprocess.run(tokenize, capture_output=True, text=True)
    assert tokenized.returncode == 0, tokenized.stderr
    at = student.index("--prompts")
    from_file = [*student[:at], "--prompts", str(tmp_path / "chats.npy"), "--max-new-tokens", "4",
                 *student[at + len(layout) :]]  # fmt: skip
    ok = subprocess.run([*from_file, "--out", str(tmp_path / "from-file")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    again = [json.loads(x) for x in (tmp_path / "from-file" / "metrics.jsonl").read_text().splitlines()]
    same = lambda rs: [(r["step"], r.get("loss"), r.get("eval_kd"), r.get("eval_ce")) for r in rs]
    assert same(again) == same(records) and len(records) == 4
    on_policy = subprocess.run([*student, "--lmbda", "0.5", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert on_policy.returncode == 2 and "needs a live teacher" in on_policy.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# Two FSDP2 ranks


def _rank_models() -> tuple[Gemma2ForCausalLM, Gemma2ForCausalLM]:
    cfg = tiny_training_config(vocab_size=96, sliding_window=4, max_position_embeddings=32)
    return init_weights(Gemma2ForCausalLM(cfg), seed=2), init_weights(Gemma2ForCausalLM(cfg), seed=1, std=0.3)


RANKED = dict(lmbda=0.5, max_new_tokens=6, gen_temperature=0.0, seed=1)  # greedy: the same samples on 1 or 2 ranks


def _ranked_data() -> Datasets:
    return Datasets(random_prompt_rows(64, 0, 96, (5, 6, 7)), random_prompt_rows(8, 1, 96, (5, 6, 7)))


def _rank_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        student, teacher = _rank_models()
        metrics = train(fsdp_train_config(Path(tmp) / "fsdp", 2, **RANKED), student, _ranked_data(), teacher=teacher,
                        progress=False)  # fmt: skip
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_two_ranks_train_on_prompts_like_one_process(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    sharded = json.loads((tmp_path / "metrics.json").read_text())
    student, teacher = _rank_models()
    single = train(fsdp_train_config(tmp_path / "single", 4, **RANKED), student, _ranked_data(), teacher=teacher,
                   progress=False)  # fmt: skip
    assert any(m.get("completion_len") for m in single) and any("eval_kd" in m for m in single)
    # Each rank cuts its own rows to their longest prompt and completion: fewer tokens than one
    # process's batch of both ranks' rows, the same loss.
    assert_same_metrics(sharded, single, rel=1e-5, abs=1e-6, skip=("tokens",))
    steps = [(a["tokens"], b["tokens"]) for a, b in zip(sharded, single) if "tokens" in a]
    assert all(a <= b for a, b in steps) and any(a < b for a, b in steps)
