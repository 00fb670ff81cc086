"""gemma2.compatibility: a tokenizer and a sequence length checked against a model's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma2 import Gemma2Config
from gemma2.compatibility import check_own_tokenizer, check_seq_len, check_tokenizer, check_vocab
from gemma2.tokenizer import Tokenizer, train_tokenizer

TEACHER = Path(__file__).parents[1] / "checkpoints" / "tiny-teacher"


@pytest.mark.parametrize("pieces, vocab", [(4096, 4096), (300, 300), (300, 384), (256000, 256000)])
def test_equal_or_padded_to_a_multiple_of_128_is_accepted(pieces, vocab):
    check_vocab(pieces, vocab, "the model", "tok.model")


@pytest.mark.parametrize("pieces, vocab", [(320, 4096), (4096, 320), (300, 512), (256000, 256128), (300, 301)])
def test_other_sizes_are_refused(pieces, vocab):
    with pytest.raises(ValueError, match=f"has {pieces} pieces but the model has a vocabulary of {vocab}"):
        check_vocab(pieces, vocab, "the model", "tok.model")


def test_special_ids_must_match_the_config():
    tok = Tokenizer(TEACHER / "tokenizer.model")  # pad 0, eos 1, bos 2, 4096 pieces
    config = Gemma2Config.from_json(TEACHER / "config.json")
    check_tokenizer(tok, config)
    check_tokenizer(tok, config.replace(eos_token_id=(1, 107)))  # instruction-tuned: eos among several
    with pytest.raises(ValueError, match=r"pad 0 \(model: 3\), eos 1 \(model: 5\)"):
        check_tokenizer(tok, config.replace(pad_token_id=3, eos_token_id=5))


def test_seq_len_up_to_the_context():
    config = Gemma2Config.from_json(TEACHER / "config.json")
    check_seq_len(256, config)
    with pytest.raises(ValueError, match="seq_len 257 exceeds the context of the model, max_position_embeddings = 256"):
        check_seq_len(257, config)


def test_a_model_directorys_own_tokenizer_must_be_the_one_given(tmp_path):
    """Two tokenizers of 300 pieces and the same special ids, trained on other texts: the model
    directory's own, or a copy of it, passes; the other is refused, naming both; a directory without
    tokenizer.model, and a checkpoint file beside its tokenizer.model, as expected."""
    model, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    model.mkdir(), elsewhere.mkdir()
    own = Tokenizer(train_tokenizer(["The quick brown fox jumps over the lazy dog."] * 3, model / "tokenizer.model", 300))
    copy = Tokenizer(train_tokenizer(["The quick brown fox jumps over the lazy dog."] * 3, elsewhere / "copy.model", 300))
    other = Tokenizer(train_tokenizer(["Hello there! How are you today?"] * 3, elsewhere / "other.model", 300))
    assert own.vocab_size == other.vocab_size and (own.pad_id, own.bos_id, own.eos_id) == (other.pad_id, other.bos_id, other.eos_id)
    check_own_tokenizer(own, model)
    check_own_tokenizer(copy, model)
    check_own_tokenizer(other, elsewhere)  # no tokenizer.model there: nothing to compare with
    with pytest.raises(ValueError, match=r"other.model \(300 pieces\) is not the one the teacher came with \(.*model/tokenizer.model, 300 pieces\)"):
        check_own_tokenizer(other, model, "the teacher")
    with pytest.raises(ValueError, match="is not the one the model came with"):
        check_own_tokenizer(other, model / "model.ckpt")  # a checkpoint file: its directory's tokenizer
    (model / "tokenizer.model").write_text("version https://git-lfs.github.com/spec/v1\n")  # a pointer, not a model
    check_own_tokenizer(other, model)  # the one given is the user's way round an unreadable own one
