"""scripts/generate.py end to end on a tiny checkpoint written by the test: its text must be what the
library generates, and user errors must be one line with exit status 2."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import randomize_, tiny_config
from gemma2 import Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import save_official
from gemma2.chat import Chat
from gemma2.generation import generate, left_pad
from gemma2.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "generate.py"
FIGURES = re.compile(
    r"prompt tokens: \d+ \| new tokens: \d+ \| prefill: [\d.]+ tokens/s \| decode: ([\d.]+|n/a) tokens/s"
)
DRAFTING = r" \| accepted: (?:([\d.]+)% of (\d+)|none) proposed \| tokens per target forward: ([\d.]+)"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there! How are you today?",
         "I am fine, thank you. What would you like to know?"] * 3  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer(train_tokenizer(TEXTS, directory / "tokenizer.model", 300))
    model = Gemma2ForCausalLM(tiny_config(vocab_size=tok.vocab_size))
    randomize_(model, seed=0)
    with torch.no_grad():  # as in test_generation.talkative_twin: varied text, not one token repeated
        model.model.embed_tokens.weight.mul_(0.1)
        model.model.norm.weight.mul_(40.0)
    save_model(model, directory)
    return directory


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # tiny matmuls: one thread is fastest
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def expected_texts(checkpoint: Path, rows: list[list[int]], stop: tuple[int, ...], new: int) -> list[str]:
    tok, model = Tokenizer(checkpoint / "tokenizer.model"), load_model(checkpoint)
    ids, mask = left_pad(rows, tok.pad_id)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=new, stop_token_ids=stop, pad_id=tok.pad_id)
    return [tok.decode(row) for row in out[:, ids.shape[1] :]]


def test_a_batch_of_two_prompts(checkpoint):
    prompts = ["--prompt", "The quick", "--prompt", "Hello there! How"]
    result = run_cli("--checkpoint", str(checkpoint), *prompts, "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    texts = expected_texts(checkpoint, [tok.encode("The quick"), tok.encode("Hello there! How")], (tok.eos_id,), 12)
    assert result.stdout == f"[0] {texts[0]}\n[1] {texts[1]}\n"
    assert FIGURES.fullmatch(result.stderr.strip())


def test_compile_gives_the_same_text(checkpoint):
    """--compile: the decode steps through torch.compile (gemma2.static_decode), the same greedy text."""
    prompts = ["--prompt", "The quick", "--prompt", "Hello there! How"]
    result = run_cli("--checkpoint", str(checkpoint), *prompts, "--max-new-tokens", "12", "--compile")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    texts = expected_texts(checkpoint, [tok.encode("The quick"), tok.encode("Hello there! How")], (tok.eos_id,), 12)
    assert result.stdout == f"[0] {texts[0]}\n[1] {texts[1]}\n"
    compiling = re.fullmatch(FIGURES.pattern + r" \| first decode step \(compiling\): [\d.]+ s", result.stderr.strip())
    assert compiling, result.stderr


def test_one_chat_prompt_streams_the_reply(checkpoint):
    result = run_cli("--checkpoint", str(checkpoint), "--chat", "--prompt", "How are you?", "--max-new-tokens", "10")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    prompt = tok.encode_chat([{"role": "user", "content": "How are you?"}])
    [text] = expected_texts(checkpoint, [prompt], tok.stop_ids, 10)
    assert result.stdout == text + "\n"
    assert FIGURES.fullmatch(result.stderr.strip())


def test_interactive_chat_keeps_its_cache_between_turns(checkpoint):
    result = run_cli("--checkpoint", str(checkpoint), "--interactive", "--max-new-tokens", "8",
                     stdin="Hi\nHow are you?\n/exit\nnever read\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    tok, model = Tokenizer(checkpoint / "tokenizer.model"), load_model(checkpoint)
    chat = Chat(model, tok)
    replies = [tok.decode(list(chat.reply(text, max_new_tokens=8))) for text in ("Hi", "How are you?")]
    assert result.stdout == "".join(r + "\n" for r in replies)
    assert len(FIGURES.findall(result.stderr)) == 2  # one figures line per turn, nothing after /exit


def test_an_interactive_line_that_is_not_utf8_is_skipped_and_the_chat_goes_on(checkpoint):
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--interactive",
                             "--max-new-tokens", "8"], input=b"\xff\xfe\nHi\n", capture_output=True, env=env,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert b"is not valid UTF-8 text, so it was skipped" in result.stderr
    tok, model = Tokenizer(checkpoint / "tokenizer.model"), load_model(checkpoint)
    assert result.stdout.decode() == tok.decode(list(Chat(model, tok).reply("Hi", max_new_tokens=8))) + "\n"


def test_a_tokenizer_directory_is_its_tokenizer_model(checkpoint):
    plain = run_cli("--checkpoint", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "4")
    named = run_cli("--checkpoint", str(checkpoint), "--tokenizer", str(checkpoint), "--prompt", "Hi", "--max-new-tokens", "4")
    assert plain.returncode == named.returncode == 0, named.stderr
    assert named.stdout == plain.stdout


def test_interactive_chat_goes_on_after_a_turn_that_does_not_fit(checkpoint):
    """A turn longer than the context is refused with the reason and the chat reads on; /new starts
    a new chat (the same first reply again)."""
    result = run_cli("--checkpoint", str(checkpoint), "--interactive", "--max-new-tokens", "8",
                     stdin="word " * 400 + "\nHi\n/new\nHi\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tokens and a reply at least one more, but the chat holds 128: shorten it (/new" in result.stderr
    tok, model = Tokenizer(checkpoint / "tokenizer.model"), load_model(checkpoint)
    first = tok.decode(list(Chat(model, tok).reply("Hi", max_new_tokens=8)))
    assert result.stdout == first + "\n" + first + "\n"
    assert len(FIGURES.findall(result.stderr)) == 2 and "(a new chat)" in result.stderr


def test_float16_is_refused_with_the_reason(checkpoint):
    result = run_cli("--checkpoint", str(checkpoint), "--prompt", "Hi", "--dtype", "float16")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --dtype float16 is refused: Gemma 2's activations overflow float16")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_an_official_ckpt_with_config(checkpoint, tmp_path):
    """An official .ckpt has no config.json: --config names the shape (a config.json here; a preset
    such as 2b for real weights), and without it the error says so."""
    official = tmp_path / "official"
    official.mkdir()
    save_official(load_model(checkpoint), official / "model.ckpt")
    common = ["--checkpoint", str(official / "model.ckpt"), "--tokenizer", str(checkpoint / "tokenizer.model"),
              "--prompt", "The quick", "--max-new-tokens", "6"]  # fmt: skip
    result = run_cli(*common, "--config", str(checkpoint / "config.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == run_cli("--checkpoint", str(checkpoint), *common[2:]).stdout
    missing = run_cli(*common)
    assert missing.returncode == 2 and "no config.json" in missing.stderr and "--config" in missing.stderr
    # Beside a config.json, --config may only repeat it (it silently won): another is refused.
    beside = ["--checkpoint", str(checkpoint), *common[2:]]
    assert run_cli(*beside, "--config", str(checkpoint / "config.json")).stdout == result.stdout
    other = run_cli(*beside, "--config", "tiny")
    assert other.returncode == 2 and other.stderr.startswith(f"error: --config tiny differs from {checkpoint}/config.json (")
    assert "--config is for a checkpoint without a config.json; drop it" in other.stderr


def test_a_padded_vocabulary_is_refused_before_generating(checkpoint, tmp_path, capsys):
    """A table padded to a multiple of 128 fits the tokenizer for training, but sampling could pick
    a padded id that no piece decodes."""
    pieces = Tokenizer(checkpoint / "tokenizer.model").vocab_size
    padded = -(-pieces // 128) * 128
    save_model(Gemma2ForCausalLM(tiny_config(vocab_size=padded)), tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--checkpoint", str(tmp_path), "--tokenizer", str(checkpoint / "tokenizer.model"),
                            "--prompt", "Hi"])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"vocabulary of {padded} is padded beyond the tokenizer's {pieces} pieces" in err, err


def load_script():
    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing", "--prompt", "Hi"], "missing not found; pass --checkpoint a directory"),
        (["--checkpoint", "{ckpt}", "--tokenizer", "{tmp}/no.model", "--prompt", "Hi"], "no.model not found; put"),
        (["--checkpoint", "{ckpt}", "--prompt", "Hi", "--dtype", "int8"], "'int8' is not one of float32, bfloat16"),
        (["--checkpoint", "{ckpt}"], "pass --prompt TEXT"),
        (["--checkpoint", "{ckpt}", "--prompt", "Hi", "--max-new-tokens", "500"], "exceed the model's context of 128"),
        (["--checkpoint", "{ckpt}", "--prompt", "Hi", "--temperature", "1", "--top-p", "0"], "top_p must be in"),
        (["--checkpoint", "{ckpt}", "--prompt", "Hi", "--top-p", "0.9"], "decodes greedily: pass --temperature > 0"),
        (["--checkpoint", "{ckpt}", "--prompt", "Hi", "--top-k", "5"], "decodes greedily: pass --temperature > 0"),
    ],
)
def test_user_errors_are_one_line_with_status_2(checkpoint, tmp_path, capsys, args, message):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main([a.format(tmp=tmp_path, ckpt=checkpoint) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err


def test_another_tokenizer_of_the_same_size_is_refused(checkpoint, tmp_path, capsys):
    other = train_tokenizer([t[::-1] for t in TEXTS], tmp_path / "other.model", 300)
    assert Tokenizer(other).vocab_size == Tokenizer(checkpoint / "tokenizer.model").vocab_size
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--checkpoint", str(checkpoint), "--tokenizer", str(other), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"error: the tokenizer {other} (300 pieces) is not the one the checkpoint came with" in err, err


def test_an_error_in_the_middle_of_the_streamed_text_is_on_a_line_of_its_own(checkpoint, capsys, monkeypatch):
    """A decode step failing (or Ctrl-C) after some tokens were streamed: the text's line is ended
    first, so that on a terminal the error is not glued to the last word."""
    script = load_script()
    real = script.stream

    def failing(*args, **kwargs):
        steps = real(*args, **kwargs)
        yield next(steps)
        raise ValueError("compiling the decode step failed (C++ compile error)")

    monkeypatch.setattr(script, "stream", failing)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--checkpoint", str(checkpoint), "--prompt", "The quick", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.startswith("error: compiling") and out.endswith("\n") and len(out) > 1


@pytest.fixture(scope="module")
def drafts(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A draft close to the checkpoint's model (same vocabulary) and one with another vocabulary."""
    model = load_model(checkpoint)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    close = tmp_path_factory.mktemp("draft")
    save_model(model, close)
    other = tmp_path_factory.mktemp("other_vocab")
    save_model(Gemma2ForCausalLM(tiny_config(vocab_size=model.config.vocab_size + 5)), other)
    return {"close": close, "other": other}


@pytest.mark.parametrize("compile_", [False, True])
def test_a_draft_gives_the_checkpoints_own_greedy_text(checkpoint, drafts, compile_):
    result = run_cli("--checkpoint", str(checkpoint), "--draft", str(drafts["close"]), "--draft-tokens", "3",
                     "--prompt", "The quick", "--max-new-tokens", "24", *(["--compile"] if compile_ else []))  # fmt: skip
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    [text] = expected_texts(checkpoint, [tok.encode("The quick")], (tok.eos_id,), 24)
    assert result.stdout == text + "\n"
    compiling = r" \| the prefill includes compiling the draft's step" if compile_ else ""
    figures = re.fullmatch(FIGURES.pattern + compiling + DRAFTING, result.stderr.strip())
    assert figures and figures[3] is not None, result.stderr
    accepted, proposed, per_forward = float(figures[2]), int(figures[3]), float(figures[4])
    assert 0 <= accepted <= 100 and proposed > 0 and 1 <= per_forward <= 4


def test_prompt_lookup_gives_the_checkpoints_own_greedy_text(checkpoint):
    prompt = "The quick brown fox. The quick brown fox. The quick"  # the text repeats: guesses are found
    result = run_cli("--checkpoint", str(checkpoint), "--prompt-lookup", "--prompt", prompt, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(checkpoint / "tokenizer.model")
    [text] = expected_texts(checkpoint, [tok.encode(prompt)], (tok.eos_id,), 24)
    assert result.stdout == text + "\n"
    figures = re.fullmatch(FIGURES.pattern + DRAFTING, result.stderr.strip())
    assert figures and figures[3] is not None and int(figures[3]) > 0, result.stderr
    nothing = run_cli("--checkpoint", str(checkpoint), "--prompt-lookup", "--prompt", "The", "--max-new-tokens", "1")
    assert nothing.returncode == 0 and re.fullmatch(FIGURES.pattern + r" \| accepted: none proposed \| tokens per "
                                                    r"target forward: 1.00", nothing.stderr.strip()), nothing.stderr


@pytest.mark.parametrize("drafting", [["--prompt-lookup"], ["--draft", "{close}", "--draft-tokens", "3"]])
def test_an_interactive_chat_with_a_draft_replies_as_without(checkpoint, drafts, drafting):
    """--interactive with --prompt-lookup or --draft: the plain chat's replies, turn after turn,
    /new included, each figures line with its drafting."""
    stdin = "Hi\nHow are you? How are you today?\n/new\nHi\n"
    plain = run_cli("--checkpoint", str(checkpoint), "--interactive", "--max-new-tokens", "10", stdin=stdin)
    result = run_cli("--checkpoint", str(checkpoint), "--interactive", "--max-new-tokens", "10",
                     *[a.format(**drafts) for a in drafting], stdin=stdin)  # fmt: skip
    assert plain.returncode == result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout and plain.stdout.count("\n") == 3
    lines = re.findall(FIGURES.pattern + DRAFTING, result.stderr)
    assert len(lines) == 3 and sum(int(line[2] or 0) for line in lines) > 0, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "Hi", "--prompt", "Ho", "--draft", "{close}"], "--draft decodes one sequence"),
        (["--prompt", "Hi", "--prompt", "Ho", "--prompt-lookup"], "--prompt-lookup decodes one sequence"),
        (["--prompt", "Hi", "--prompt-lookup", "--draft", "{close}"], "--draft and --prompt-lookup are two ways"),
        (["--prompt", "Hi", "--prompt-lookup", "--compile"], "--prompt-lookup has none"),
        (["--prompt", "Hi", "--draft", "{close}", "--draft-tokens", "0"], "--draft-tokens must be >= 1"),
        (["--prompt", "Hi", "--draft-tokens", "3"], "--draft-tokens needs --draft or --prompt-lookup"),
        (["--prompt", "Hi", "--draft", "{tmp}/missing"], "draft model .*missing not found"),
        (["--prompt", "Hi", "--draft", "{other}"], r"vocabulary has \d+ tokens but the target's has \d+"),
    ],
)
def test_draft_errors_are_one_line_with_status_2(checkpoint, drafts, tmp_path, capsys, args, message):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--checkpoint", str(checkpoint)] + [a.format(tmp=tmp_path, **drafts) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
