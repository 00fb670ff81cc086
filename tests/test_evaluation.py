"""gemma2.evaluation and scripts/evaluate.py: cross-entropy, KL(teacher || model) and top-1
agreement against textbook formulas over transformers' logits in fp64, and the script's rows,
figures and refusals."""

import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import hf_twin, random_prompt_rows, randomize_, tiny_config
from gemma2 import Gemma2ForCausalLM, load_model, save_model
from gemma2.data import PackedSequences
from gemma2.evaluation import evaluate
from gemma2.quantize import quantize_model
from gemma2.token_files import open_datasets
from gemma2.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"


def twins(cfg, seed: int):
    """hf_twin's pair with the embedding scaled down: at hf_twin's scale a tied head makes every
    random model predict its input token (top-1 agreement 100%); here they disagree."""
    hf, ours = hf_twin(cfg, seed)
    with torch.no_grad():
        hf.model.embed_tokens.weight.mul_(0.1)
        hf.model.norm.weight.mul_(40.0)
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    return hf, ours


def reference(model, teacher, *rows, forward=None) -> dict:
    """The measures in fp64 from each model's whole logits, batch by batch: mean -log p(target),
    mean sum_v p_t (log p_t - log p_s), and how often the two argmaxes agree, over targets != -100;
    "ties": the tokens where either model's two likeliest are within 1e-4 (fp32 may rank them either
    way). forward(model, inputs, mask) gives the logits (default: transformers' call)."""
    forward = forward or (lambda m, ids, mask: m(input_ids=ids, attention_mask=mask).logits)
    ce = t_ce = kl = agree = ties = n = 0.0
    for r in rows:
        batch = r.batch(range(len(r)))
        mask = None if batch.valid is None else batch.valid.long()
        counted = batch.targets != -100
        target = batch.targets[counted]
        with torch.no_grad():
            ls = forward(model, batch.inputs, mask).double().log_softmax(-1)[counted]
            lt = forward(teacher, batch.inputs, mask).double().log_softmax(-1)[counted]
        ce -= ls.gather(1, target[:, None]).sum().item()
        t_ce -= lt.gather(1, target[:, None]).sum().item()
        kl += (lt.exp() * (lt - ls)).sum().item()
        agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
        margins = [v[:, 0] - v[:, 1] for v in (lt.topk(2, -1).values, ls.topk(2, -1).values)]
        ties += ((margins[0] < 1e-4) | (margins[1] < 1e-4)).sum().item()
        n += len(target)
    return {"tokens": n, "ce": ce / n, "teacher_ce": t_ce / n, "kl": kl / n, "top1_agreement": agree / n,
            "ties": ties}


def assert_matches(got, want: dict) -> None:
    assert got.tokens == want["tokens"]
    for key in ("ce", "teacher_ce", "kl"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert abs(got.top1_agreement - want["top1_agreement"]) * want["tokens"] <= want["ties"]
    assert got.ppl == pytest.approx(math.exp(want["ce"]), rel=1e-5)
    assert got.teacher_ppl == pytest.approx(math.exp(want["teacher_ce"]), rel=1e-5)


def test_packed_rows_match_textbook_measures_over_transformers_logits():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=1)
    hf_teacher, teacher = twins(cfg, seed=2)
    rng = np.random.default_rng(0)
    a = PackedSequences(rng.integers(3, cfg.vocab_size, 5 * 20 + 1), seq_len=20)  # longer than twice the window
    b = PackedSequences(rng.integers(3, cfg.vocab_size, 3 * 17 + 5), seq_len=17)
    # Batches of 2 (the last one short), chunks of 7 counted tokens (crossing rows), two row sets.
    got = evaluate(model, a, b, teacher=teacher, batch_size=2, chunk_size=7)
    assert_matches(got, reference(hf_model, hf_teacher, a, b))
    assert 0 < got.top1_agreement < 1 and got.kl > 0.1  # two different random models: it can fail


def test_prompt_rows_count_only_the_completions_with_left_padding():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=3)
    hf_teacher, teacher = twins(cfg, seed=4)
    rows = random_prompt_rows(7, seed=5, vocab=cfg.vocab_size)
    got = evaluate(model, rows, teacher=teacher, batch_size=3, chunk_size=5)
    want = reference(hf_model, hf_teacher, rows)
    assert want["tokens"] == rows.completion_lens.sum()  # the reference counts completions only
    assert_matches(got, want)


def test_max_sequences_takes_the_first_rows_of_each_set():
    cfg = tiny_config()
    _, model = hf_twin(cfg, seed=1)
    rng = np.random.default_rng(1)
    a = PackedSequences(rng.integers(3, cfg.vocab_size, 6 * 10 + 1), seq_len=10)
    first = PackedSequences(a.tokens[: 4 * 10 + 1], seq_len=10)
    got, want = evaluate(model, a, max_sequences=4, batch_size=3), evaluate(model, first, batch_size=4)
    assert got.tokens == want.tokens == 40 and got.ce == pytest.approx(want.ce, rel=1e-6)
    assert got.teacher_ce is got.kl is got.top1_agreement is None
    assert set(got.as_dict()) == {"tokens", "ce", "ppl"}


def test_an_int8_model_is_measured_through_its_own_head():
    cfg = tiny_config()
    model, teacher = Gemma2ForCausalLM(cfg).eval(), Gemma2ForCausalLM(cfg).eval()
    randomize_(model, seed=6)
    randomize_(teacher, seed=7)
    quantize_model(model)
    rows = PackedSequences(np.random.default_rng(2).integers(3, cfg.vocab_size, 4 * 16 + 1), seq_len=16)
    got = evaluate(model, rows, teacher=teacher, batch_size=3, chunk_size=9)
    assert_matches(got, reference(model, teacher, rows, forward=lambda m, ids, mask: m(ids, mask)))


def test_a_teacher_of_another_vocabulary_is_refused():
    model, teacher = Gemma2ForCausalLM(tiny_config()), Gemma2ForCausalLM(tiny_config(vocab_size=256))
    rows = PackedSequences(np.arange(3, 40), seq_len=8)
    with pytest.raises(ValueError, match="teacher's vocabulary of 256 is not the model's 300"):
        evaluate(model, rows, teacher=teacher)


# ------------------------------------------------------------------------------------------------
# scripts/evaluate.py

TEXTS = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs, and then {i * 7} more." for i in range(60)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A student and a teacher sharing a tokenizer, and a model of another vocabulary."""
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(train_tokenizer(TEXTS, root / "tokenizer.model", 320))
    out = {}
    for name, seed, vocab in (("student", 0, tok.vocab_size), ("teacher", 1, tok.vocab_size), ("other", 2, 256)):
        model = Gemma2ForCausalLM(tiny_config(vocab_size=vocab))
        randomize_(model, seed)
        with torch.no_grad():  # as in `twins`: models that disagree
            model.model.embed_tokens.weight.mul_(0.1)
            model.model.norm.weight.mul_(40.0)
        save_model(model, root / name)
        if name != "other":
            shutil.copy(root / "tokenizer.model", root / name / "tokenizer.model")
        out[name] = root / name
    for name, texts in (("train", TEXTS[:50]), ("heldout", TEXTS[50:])):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return out


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        load_script().main([*map(str, args), "--no-progress"])
    return exit_info.value.code


@pytest.mark.parametrize("split", ["heldout", "train", "all"])
def test_the_script_reports_evaluate_on_the_rows_distill_py_reads(models, tmp_path, capsys, split):
    out = tmp_path / "figures.json"
    flags = ["--data", models["train"], "--eval-data", models["heldout"], "--seq-len", 12]
    code = run("--checkpoint", models["student"], "--teacher", models["teacher"], *flags, "--split", split,
               "--batch-size", 3, "--json", out)  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    tok = Tokenizer(models["student"] / "tokenizer.model")
    data = open_datasets([models["train"]], tok, 12, eval_paths=[models["heldout"]])
    parts = {"heldout": [data.heldout], "train": [data.train], "all": [data.train, data.heldout]}[split]
    want = evaluate(load_model(models["student"]), *parts, teacher=load_model(models["teacher"]), batch_size=3)
    record = json.loads(out.read_text())
    assert record["split"] == split and record["sequences"] == sum(map(len, parts)) and record["dtype"] == "fp32"
    for key, value in want.as_dict().items():
        assert record[key] == pytest.approx(value, rel=1e-6), key
    assert f"cross-entropy {want.ce:.4f} nats/token, perplexity {want.ppl:.2f}" in stdout
    assert f"top-1 agreement: {want.top1_agreement:.1%}" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--prompt-len", "4"], "--prompt-len lay out --prompts rows; with --data evaluation would ignore them"),
        (["--holdout-fraction", "0"], "hold nothing out .*: pass --split train or --eval-data"),
        (["--teacher", "{other}"], "has 320 pieces but the teacher has a vocabulary of 256"),
        (["--teacher", "{tmp}/missing"], "--teacher .*missing: no such file or directory"),
        (["--json", "{tmp}/kept.json"], "kept.json exists; pass --overwrite to replace it"),
        (["--seq-len", "200"], "seq_len 200 exceeds the context of the checkpoint"),
    ],
)
def test_user_errors_are_one_line_with_status_2_before_any_output(models, tmp_path, capsys, args, message):
    kept = tmp_path / "kept.json"
    kept.write_text("mine")
    args = [a.format(tmp=tmp_path, other=models["other"]) for a in args]
    assert run("--checkpoint", models["student"], "--data", models["train"], "--seq-len", 12, *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert kept.read_text() == "mine"
