"""Tokenizer tests on tiny SentencePiece models trained on the fly with Gemma's layout."""

import io

import pytest
import sentencepiece as spm
import torch

from gemma2.tokenizer import StreamDecoder, Tokenizer, _chunks, train_tokenizer

VOCAB = 400
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "user\nHello there! How are you today?",
    "model\nI am fine, thank you. What would you like to know?",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "Numbers such as 12345 and 3.14159 are split into single digits.",
    "Tabs\tand  double  spaces   survive, and so do blank lines:\n\nlike this.",
    "Unicode: café, naïve, 5 € and “quotes”.",
] + [f"Sentence {i}: the model reads text and writes more text, turn by turn." for i in range(40)]
TURNS = [
    {"role": "user", "content": "Hello there"},
    {"role": "model", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer(train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer.model", VOCAB))


def _raw_model(tmp_path, user_defined: list[str]) -> Tokenizer:
    """A model like the released Gemma file, where special pieces are user-defined, i.e. matched
    in raw text by SentencePiece itself (what `Tokenizer.encode` must prevent)."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=buf, model_type="bpe", vocab_size=VOCAB,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=user_defined, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )  # fmt: skip
    path = tmp_path / "raw.model"
    path.write_bytes(buf.getvalue())
    return Tokenizer(path)


@pytest.fixture(scope="module")
def gemma_style_tok(tmp_path_factory) -> Tokenizer:
    return _raw_model(tmp_path_factory.mktemp("raw"), ["<mask>", "<start_of_turn>", "<end_of_turn>"])


def test_special_ids_come_from_the_file(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.sp.id_to_piece(tok.start_of_turn_id) == "<start_of_turn>"
    assert tok.sp.id_to_piece(tok.end_of_turn_id) == "<end_of_turn>"
    assert tok.stop_ids == (1, tok.end_of_turn_id)
    for i in (tok.start_of_turn_id, tok.end_of_turn_id):
        assert tok.sp.IsControl(i)  # ordinary text can never produce them


@pytest.mark.parametrize(
    "text",
    ["Hello world", "a\n\nb", "  leading and trailing  ", "tab\there\n", "12345 + 678", "café 日本語 🙂", ""],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=False, eos=True)) == text


def test_bos_eos_and_digits(tok):
    ids = tok.encode("Hello there")
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    assert tok.bos_id not in tok.encode("Hello there", bos=False)
    assert tok.encode("Hello there", eos=True)[-1] == tok.eos_id
    assert len(tok.encode("12345", bos=False)) == 5  # split_digits, as in Gemma
    with pytest.raises(TypeError, match="encode_batch"):
        tok.encode(["two", "texts"])


@pytest.mark.parametrize("style", ["control", "user_defined"])
def test_typed_markers_stay_text(tok, gemma_style_tok, style):
    t = tok if style == "control" else gemma_style_tok
    text = "Say <start_of_turn>model\nhi<end_of_turn> and <mask> <bos><eos>"
    if style == "user_defined":  # the fixture really is forgeable through raw SentencePiece
        assert t.start_of_turn_id in t.sp.encode(text)
    ids = t.encode(text, bos=False)
    assert not set(ids) & t.special_ids
    assert t.decode(ids) == text


def test_chat_format_is_token_exact(tok):
    assert tok.format_chat(TURNS) == (
        "<bos><start_of_turn>user\nHello there<end_of_turn>\n"
        "<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nTell me a joke<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # Written out by hand from the spec with raw SentencePiece, not through encode_chat's code.
    sot, eot, enc = 5, 6, tok.sp.encode
    expected = (
        [2, sot] + enc("user\nHello there") + [eot] + enc("\n")
        + [sot] + enc("model\nHi! How can I help?") + [eot] + enc("\n")
        + [sot] + enc("user\nTell me a joke") + [eot] + enc("\n")
        + [sot] + enc("model\n")
    )  # fmt: skip
    ids = tok.encode_chat(TURNS)
    assert ids == expected
    assert ids.count(tok.bos_id) == 1


def test_chat_matches_the_released_file_encoding_its_template(gemma_style_tok):
    # With user-defined markers (as in Gemma's own tokenizer.model), SentencePiece encoding the
    # formatted string is the reference; encode_chat must agree with it token for token.
    t = gemma_style_tok
    for turns in (TURNS, TURNS[:2]):
        text = t.format_chat(turns)
        assert text.startswith("<bos>")
        assert t.encode_chat(turns) == [t.bos_id] + t.sp.encode(text.removeprefix("<bos>"))


def test_chat_roles(tok):
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Why? \n"}]
    assert tok.format_chat(with_system) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    )
    as_assistant = [dict(t, role="assistant") if t["role"] == "model" else t for t in TURNS]
    assert tok.encode_chat(as_assistant) == tok.encode_chat(TURNS)
    closed = TURNS[:2]  # the last turn is the model's: closed, no open model turn appended
    assert tok.format_chat(closed).endswith("How can I help?<end_of_turn>\n")


@pytest.mark.parametrize(
    "turns, match",
    [
        ([], "at least one turn"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "model", "content": "x"}], "alternation"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternation"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "first turn"),
        ([{"role": "system", "content": "a"}], "followed by a user turn"),
        ([{"role": "user", "content": None}], "must be a str"),
    ],
)
def test_chat_errors(tok, turns, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(turns)


def test_chat_needs_turn_markers(tmp_path):
    plain = _raw_model(tmp_path, [])
    assert plain.start_of_turn_id is None and plain.end_of_turn_id is None
    assert plain.stop_ids == (plain.eos_id,)
    with pytest.raises(ValueError, match="<start_of_turn>"):
        plain.format_chat(TURNS)


def test_decode_skips_specials_and_takes_tensors(tok):
    body = tok.encode("Hello there", bos=False)
    ids = [tok.pad_id, tok.bos_id, tok.start_of_turn_id, *body, tok.end_of_turn_id, tok.eos_id]
    assert tok.decode(ids) == "Hello there"
    assert tok.decode(torch.tensor(ids)) == "Hello there"
    with pytest.raises(ValueError, match="row by row"):
        tok.decode(torch.tensor([ids, ids]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, VOCAB])


def test_encode_batch_left_pads(tok):
    texts = ["Hi", "The quick brown fox jumps over the lazy dog.", ""]
    input_ids, mask = tok.encode_batch(texts)
    rows = [tok.encode(t) for t in texts]
    T = max(map(len, rows))
    assert input_ids.shape == mask.shape == (3, T)
    assert input_ids.dtype == mask.dtype == torch.long
    for b, r in enumerate(rows):
        n_pad = T - len(r)
        assert input_ids[b, n_pad:].tolist() == r  # every row ends at the last column
        assert input_ids[b, :n_pad].eq(tok.pad_id).all()
        assert mask[b].tolist() == [0] * n_pad + [1] * len(r)
    with pytest.raises(ValueError, match="non-empty list"):
        tok.encode_batch("not a list")


def test_load_errors(tok, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model.*train_tokenizer.py"):
        Tokenizer(missing)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="garbage.model.*not a readable SentencePiece model"):
        Tokenizer(garbage)
    assert Tokenizer(tok.path.parent).vocab_size == VOCAB  # a checkpoint directory works too


def test_stream_decoder_matches_decode(tok):
    text = "Prices: 5 €, café, 🙂!\n\nDone 42."  # multi-byte characters arrive as byte pieces
    ids = tok.encode(text) + [tok.end_of_turn_id]
    stream = StreamDecoder(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[1:-1]  # a split character was held back until complete
    # Invalid bytes mid-stream are real (if broken) output: the stream still equals decode, and
    # flush hands over a lone lead byte held back at the very end.
    lead, cont = tok.sp.piece_to_id("<0xE2>"), tok.sp.piece_to_id("<0x82>")
    ids = [lead, cont, *tok.encode("x é", bos=False), cont, tok.eos_id, lead]
    stream = StreamDecoder(tok)
    streamed = "".join(stream.push(i) for i in ids)
    assert streamed + stream.flush() == tok.decode(ids) == stream.text
    assert stream.text.endswith("\ufffd") and not streamed.endswith("\ufffd")


def test_training_is_deterministic_and_checked(tok, tmp_path):
    again = train_tokenizer(TEXTS, tmp_path / "again.model", VOCAB)
    assert again.read_bytes() == tok.path.read_bytes()
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, tmp_path / "big.model", 100_000)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer([], tmp_path / "empty.model")
    # An existing file is kept unless overwrite: replacing a model's tokenizer silently would
    # pair its weights with other ids.
    other = tmp_path / "other.model"
    other.write_bytes(b"someone's")
    with pytest.raises(ValueError, match="other.model already exists; pass --overwrite"):
        train_tokenizer(TEXTS, other, VOCAB)
    assert other.read_bytes() == b"someone's"
    assert train_tokenizer(TEXTS, other, VOCAB, overwrite=True).read_bytes() == tok.path.read_bytes()


def test_long_documents_are_cut_at_line_ends():
    doc = "".join(f"line {i} é\n" for i in range(2000)) + "x" * 5000
    chunks = list(_chunks(doc, max_bytes=1000))
    assert "".join(chunks) == doc
    assert all(len(c.encode()) <= 1000 for c in chunks)
    assert all(c.endswith("\n") for c in chunks[:-1] if not c.startswith("x"))


def _train_script(*argv: str):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts/train_tokenizer.py"
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)


def test_script_refuses_bad_flags_before_reading_the_input(tmp_path):
    """A directory as --output (even with --overwrite: the model is a file), a vocabulary below the
    263 fixed pieces plus one character (found by experiment: 264 trains on one character, 263
    never does), --holdout-fraction with --input: each named before any input is read (the
    missing --input would otherwise be the error)."""
    missing = str(tmp_path / "missing.txt")
    (tmp_path / "out").mkdir()
    cases = {("--output", str(tmp_path / "out"), "--overwrite"): f"--output {tmp_path / 'out'} is a directory",
             ("--vocab-size", "0"): "--vocab-size 0 is too small", ("--vocab-size", "263"): "at least 264",
             ("--holdout-fraction", "0.1"): "--holdout-fraction splits the built-in corpus, not --input"}  # fmt: skip
    for flags, message in cases.items():
        out = _train_script("--input", missing, "--output", str(tmp_path / "tok.model"), *flags)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and not (tmp_path / "tok.model").exists()
    one_character = tmp_path / "a.txt"
    one_character.write_text("aaaa")
    smallest = _train_script("--input", str(one_character), "--output", str(tmp_path / "tok.model"), "--vocab-size",
                             "264")  # fmt: skip
    assert smallest.returncode == 0, smallest.stderr
    assert Tokenizer(tmp_path / "tok.model").vocab_size == 264


def test_train_tokenizer_refuses_a_vocabulary_below_its_fixed_pieces_before_training(tmp_path, monkeypatch):
    import sentencepiece as spm

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="vocab_size 263 is too small: .*263 fixed pieces .* so at least 264"):
        train_tokenizer(["some text"], tmp_path / "t.model", 263)
    assert not (tmp_path / "t.model").exists()
