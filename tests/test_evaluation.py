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


def assert_matches(got, want: dict, sequences: int) -> None:
    assert got.sequences == sequences and got.tokens == want["tokens"]
    for key in ("ce", "teacher_ce", "kl"):
        assert getattr(got, key) == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert abs(got.top1_agreement - want["top1_agreement"]) * want["tokens"] <= want["ties"]
    assert got.ppl == pytest.approx(math.exp(want["ce"]), rel=1e-5)
    assert got.teacher_ppl == pytest.approx(math.exp(want["teacher_ce"]), rel=1e-5)


def packed(vocab: int, seed: int, sequences: int, seq_len: int, extra: int = 1) -> PackedSequences:
    return PackedSequences(np.random.default_rng(seed).integers(3, vocab, sequences * seq_len + extra), seq_len)


def test_packed_rows_match_textbook_measures_over_transformers_logits():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=1)
    hf_teacher, teacher = twins(cfg, seed=2)
    a, b = packed(cfg.vocab_size, 0, 5, 20), packed(cfg.vocab_size, 1, 3, 17, extra=5)  # 20 > twice the window
    # Batches of 2 (the last one short), chunks of 7 counted tokens (crossing rows), two row sets.
    got = evaluate(model, a, b, teacher=teacher, batch_size=2, chunk_size=7)
    assert_matches(got, reference(hf_model, hf_teacher, a, b), sequences=8)
    assert 0 < got.top1_agreement < 1 and got.kl > 0.1  # two different random models: it can fail


def test_prompt_rows_count_only_the_completions_with_left_padding():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=3)
    hf_teacher, teacher = twins(cfg, seed=4)
    rows = random_prompt_rows(7, seed=5, vocab=cfg.vocab_size)
    got = evaluate(model, rows, teacher=teacher, batch_size=3, chunk_size=5)
    want = reference(hf_model, hf_teacher, rows)
    assert want["tokens"] == rows.completion_lens.sum()  # the reference counts completions only
    assert_matches(got, want, sequences=7)


def test_max_sequences_takes_the_first_rows_of_each_set():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=1)
    hf_teacher, teacher = twins(cfg, seed=2)
    a, b = packed(cfg.vocab_size, 2, 6, 10), packed(cfg.vocab_size, 3, 5, 12)
    firsts = [PackedSequences(r.tokens[: 4 * r.seq_len + 1], r.seq_len) for r in (a, b)]
    got = evaluate(model, a, b, teacher=teacher, max_sequences=4, batch_size=3)
    assert_matches(got, reference(hf_model, hf_teacher, *firsts), sequences=8)
    alone = evaluate(model, a, max_sequences=4)
    assert alone.ce == pytest.approx(reference(hf_model, hf_teacher, firsts[0])["ce"], rel=1e-5)
    assert alone.teacher_ce is alone.kl is alone.top1_agreement is alone.teacher_ppl is None
    assert set(alone.as_dict()) == {"sequences", "tokens", "ce", "ppl"}


def test_an_int8_model_matches_transformers_with_its_dequantised_weights():
    cfg = tiny_config()
    hf_model, model = twins(cfg, seed=6)
    hf_teacher, teacher = twins(cfg, seed=7)
    quantize_model(model)
    state = model.state_dict()
    dequantised = {name: q.double() * state[name + "_scaler"].double()[:, None]
                   for name, q in state.items() if q.dtype == torch.int8}  # fmt: skip
    assert len(dequantised) == 1 + 7 * cfg.num_hidden_layers  # the embedding (the head) and every projection
    with torch.no_grad():
        for name, w in dequantised.items():
            hf_model.get_parameter(name).copy_(w)
    rows = packed(cfg.vocab_size, 4, 4, 16)
    got = evaluate(model, rows, teacher=teacher, batch_size=3, chunk_size=9)
    assert_matches(got, reference(hf_model, hf_teacher, rows), sequences=4)


def test_teachers_of_another_vocabulary_or_device_and_non_finite_logits_are_refused():
    model, teacher = Gemma2ForCausalLM(tiny_config()), Gemma2ForCausalLM(tiny_config(vocab_size=256))
    rows = PackedSequences(np.arange(3, 40), seq_len=8)
    with pytest.raises(ValueError, match="teacher's vocabulary of 256 is not the model's 300"):
        evaluate(model, rows, teacher=teacher)
    with pytest.raises(ValueError, match="the teacher is on meta but the model on cpu"):
        evaluate(model, rows, teacher=Gemma2ForCausalLM(tiny_config()).to("meta"))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="logits are NaN or inf"):
        evaluate(model, rows)


# ------------------------------------------------------------------------------------------------
# scripts/evaluate.py

TEXTS = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs, and then {i * 7} more." for i in range(60)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A student and a teacher sharing a tokenizer, a model of that tokenizer with its vocabulary
    padded (320 pieces, 384 rows), one of another vocabulary, and the data files."""
    root = tmp_path_factory.mktemp("eval")
    tok = Tokenizer(train_tokenizer(TEXTS, root / "tokenizer.model", 320))
    out = {}
    for name, seed, vocab in (("student", 0, 320), ("teacher", 1, 320), ("padded", 3, 384), ("other", 2, 256)):
        model = Gemma2ForCausalLM(tiny_config(vocab_size=vocab))
        randomize_(model, seed)
        with torch.no_grad():  # as in `twins`: models that disagree
            model.model.embed_tokens.weight.mul_(0.1)
            model.model.norm.weight.mul_(40.0)
        save_model(model, root / name)
        if name != "other":
            shutil.copy(root / "tokenizer.model", root / name / "tokenizer.model")
        out[name] = root / name
    assert tok.vocab_size == 320
    # A tokenizer of the same size and special ids, of other pieces; and a teacher that came with it.
    foreign = Tokenizer(train_tokenizer([t[::-1] for t in TEXTS], root / "foreign.model", 320))
    assert foreign.vocab_size == 320 and foreign.fingerprint() != tok.fingerprint()
    out["foreign"] = foreign.path
    shutil.copytree(root / "teacher", root / "foreign-teacher")
    shutil.copy(foreign.path, root / "foreign-teacher" / "tokenizer.model")
    out["foreign-teacher"] = root / "foreign-teacher"
    for name, texts in (("train", TEXTS[:50]), ("heldout", TEXTS[50:])):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out["prompts"] = root / "prompts.jsonl"
    out["prompts"].write_text("".join(json.dumps({"prompt": t[:30], "completion": t[30:50]}) + "\n" for t in TEXTS))
    (root / "no-weights").mkdir()
    shutil.copy(root / "student" / "config.json", root / "no-weights" / "config.json")
    out["no-weights"] = root / "no-weights"
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


def rows_named(case: str, models: dict[str, Path]) -> list:
    """The rows each case of the next test must evaluate, written out with the data module."""
    tok = Tokenizer(models["student"] / "tokenizer.model")
    split = open_datasets([models["train"]], tok, 12)  # 2% of the documents held out by hash
    files = open_datasets([models["train"]], tok, 12, eval_paths=[models["heldout"]])
    return {
        "heldout": [files.heldout],
        "train": [split.train],
        "all": [open_datasets([models["train"], models["heldout"]], tok, 12, holdout_fraction=0).train],
        "all-files": [files.train, files.heldout],
        "int8": [files.heldout],
    }[case]  # fmt: skip


CASES = {
    "heldout": ["--eval-data", "{heldout}", "--split", "heldout"],
    "train": ["--split", "train", "--eval-sequences", "5"],
    "all": ["--data", "{train}", "{heldout}", "--split", "all"],  # every document of both files, one set
    "all-files": ["--eval-data", "{heldout}", "--split", "all", "--eval-sequences", "4"],
    "int8": ["--eval-data", "{heldout}", "--quantize", "int8", "--dtype", "fp32"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_script_reports_evaluate_on_the_rows_its_flags_name(models, tmp_path, capsys, case):
    out = tmp_path / "figures.json"
    out.write_text("an earlier run's")  # replaced: --overwrite
    flags = [a.format(**models) for a in CASES[case]]  # a later --data replaces the first
    code = run("--checkpoint", models["student"], "--teacher", models["teacher"], "--data", models["train"],
               *flags, "--seq-len", 12, "--batch-size", 3, "--json", out, "--overwrite")  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    limit = {"train": 5, "all-files": 4}.get(case)
    student = load_model(models["student"], quantize="int8" if case == "int8" else None)
    parts = rows_named(case, models)
    want = evaluate(student, *parts, teacher=load_model(models["teacher"]), batch_size=3, max_sequences=limit)
    record = json.loads(out.read_text())
    assert record["split"] == {"all-files": "all", "int8": "heldout"}.get(case, case)
    assert record["sequences"] == sum(len(r) if limit is None else min(len(r), limit) for r in parts)
    assert record["dtype"] == "fp32" and record["quantize"] == ("int8" if case == "int8" else None)
    for key, value in want.as_dict().items():
        assert record[key] == pytest.approx(value, rel=1e-6), key
    assert f"cross-entropy {want.ce:.4f} nats/token, perplexity {want.ppl:.2f}" in stdout
    assert f"top-1 agreement: {want.top1_agreement:.1%}" in stdout


def test_a_vocabulary_padded_past_the_pieces_is_evaluated(models, capsys):
    """generate.py refuses it (sampling could pick an id no piece decodes); measuring is fine."""
    assert run("--checkpoint", models["padded"], "--teacher", models["student"], "--data", models["train"],
               "--seq-len", 12) == 2  # fmt: skip
    assert "the teacher's vocabulary of 320 is not the checkpoint's 384" in capsys.readouterr().err
    assert run("--checkpoint", models["padded"], "--data", models["train"], "--seq-len", 12) == 0
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--eval-sequences", "0"], "--eval-sequences must be >= 1, got 0"),
        (["--prompt-len", "4"], "--prompt-len lay out --prompts rows; with --data evaluation would ignore them"),
        (["--eval-data", "{heldout}", "--split", "train"], "--split train evaluates the training rows, not --eval-data"),
        (["--holdout-fraction", "0.1", "--split", "all"], "--split all evaluates every document .*drop --holdout-fraction"),
        (["--eval-prompts", "{prompts}"], "--eval-prompts goes with --prompts"),
        (["--overwrite"], "--overwrite replaces an existing --json file: pass --json PATH"),
        (["--json", "{tmp}"], "is a directory; pass a file path"),
        (["--json", "{tmp}/kept.json"], "kept.json exists; pass --overwrite to replace it"),
        (["--json", "{tmp}/no/such.json"], "the directory .*no does not exist"),
        (["--teacher", "{tmp}/missing"], "--teacher .*missing: no such file or directory"),
        (["--teacher", "{no-weights}"], "no-weights: found no model.safetensors"),
        (["--teacher", "{other}"], "has 320 pieces but the teacher has a vocabulary of 256"),
        (["--seq-len", "200"], "seq_len 200 exceeds the context of the checkpoint"),
        (["--tokenizer", "{tmp}/no.model"], "no.model not found"),
        (["--tokenizer", "{foreign}"], r"foreign.model \(320 pieces\) is not the one the checkpoint came with"),
        (["--teacher", "{foreign-teacher}"], "is not the one the teacher came with .*foreign-teacher/tokenizer.model"),
        (["--config", "2b"], "--config 2b differs from .*/config.json \\(config.json -> --config: vocab_size 320 -> "
                             "256000; hidden_size .*: --config is for a checkpoint without a config.json; drop it"),
    ],
)
def test_bad_flags_are_one_line_with_status_2_before_any_weight_is_read(models, tmp_path, capsys, monkeypatch, args,
                                                                         message):  # fmt: skip
    kept = tmp_path / "kept.json"
    kept.write_text("mine")
    monkeypatch.setattr("gemma2.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a.format(tmp=tmp_path, **models) for a in args]
    assert run("--checkpoint", models["student"], "--data", models["train"], "--seq-len", 12, *args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert kept.read_text() == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{train}", "--seq-len", "12", "--holdout-fraction", "0"],
         "hold nothing out .*pass --split train or all, or --eval-data FILES"),
        (["--prompts", "{prompts}", "--holdout-fraction", "0", "--max-new-tokens", "8"], "or --eval-prompts FILES"),
    ],
)
def test_a_missing_held_out_split_names_the_flag_that_gives_one(models, capsys, args, message):
    args = [a.format(**models) for a in args]
    assert run("--checkpoint", models["student"], *args) == 2
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]  # after the prompt layout's note
    assert out == "" and last.startswith("error: ") and re.search(message, last), err
