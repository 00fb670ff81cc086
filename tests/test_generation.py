"""Generation: cached decoding against recomputation and transformers, stopping, sessions, chats."""

from pathlib import Path

import pytest
import torch

from conftest import failing, hf_twin, left_padded, tiny_config, until_injected
from gemma2.chat import Chat
from gemma2.generation import Session, generate, left_pad, stream
from gemma2.tokenizer import Tokenizer, train_tokenizer

CFG = tiny_config()  # W = 8, context 128
NEW = 30  # with prompts up to 20 tokens, decoding runs 5 windows past W


def talkative_twin(cfg, seed: int = 0):
    """hf_twin with every parameter random, rescaled so greedy decoding does not just repeat.

    hf_twin's large tied embedding makes each position predict its own input token forever, which
    would hide cache bugs. A smaller embedding lets the layers decide; a wider final norm keeps the
    final softcap biting (raw logits well past 30) without saturating it into ties.
    """
    hf, ours = hf_twin(cfg, seed)
    with torch.no_grad():
        for model in (hf, ours):
            model.model.embed_tokens.weight.mul_(0.1)
            model.model.norm.weight.mul_(40.0)
    return hf, ours


@pytest.fixture(scope="module")
def twin():
    return talkative_twin(CFG, seed=1)


def new_tokens(out: torch.Tensor, T: int) -> torch.Tensor:
    return out[:, T:]


def test_cached_greedy_equals_recomputing_every_step(twin):
    _, model = twin
    ids, mask = left_padded([20, 13, 5], CFG.vocab_size)  # the longest prompt is past W already
    out = generate(model, ids, attention_mask=mask, max_new_tokens=NEW, stop_token_ids=())
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(NEW):
            nxt = model(seq, seq_mask)[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)
    assert all(len(set(row.tolist())) > 10 for row in new_tokens(out, 20))  # a real test: no loops


@pytest.mark.parametrize(
    "cfg", [CFG, tiny_config(num_hidden_layers=4, num_key_value_heads=1, sliding_window=5)], ids=["base", "mqa_w5"]
)
def test_greedy_matches_transformers_generate(cfg):
    hf, ours = talkative_twin(cfg, seed=2)
    ids, mask = left_padded([17, 9, 4], cfg.vocab_size, seed=3)
    want = hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW,
        pad_token_id=0, eos_token_id=None,  # no stop token: every row runs NEW steps
    )  # fmt: skip
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=NEW, stop_token_ids=())
    assert torch.equal(got, want)


def test_stream_yields_the_steps_of_generate(twin):
    _, model = twin
    ids, mask = left_padded([12, 6], CFG.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, stop_token_ids=())
    steps = list(stream(model, ids, generator=torch.Generator().manual_seed(5), **kwargs))
    out = generate(model, ids, generator=torch.Generator().manual_seed(5), **kwargs)
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), new_tokens(out, 12))
    other = generate(model, ids, generator=torch.Generator().manual_seed(6), **kwargs)
    assert not torch.equal(out, other)


def test_stop_ids_pad_the_row_afterwards(twin):
    _, model = twin
    ids, mask = left_padded([12, 8, 5], CFG.vocab_size)
    free = new_tokens(generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=()), 12)
    stop_id = free[0, 3].item()
    out = generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=(stop_id,), pad_id=0)
    out = new_tokens(out, 12)
    for row in range(3):
        hits = (free[row] == stop_id).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else 12  # the stop token itself is kept
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == 0).all()


def test_stop_ids_come_as_a_list_one_id_or_none(twin):
    """As transformers users write them: None runs to max_new_tokens, one id is a list of one."""
    _, model = twin
    ids, mask = left_padded([12, 8, 5], CFG.vocab_size)
    run = lambda stops: generate(model, ids, attention_mask=mask, max_new_tokens=12, stop_token_ids=stops)  # noqa: E731
    free = run(())
    assert torch.equal(run(None), free)
    stop_id = int(free[0, -9])
    assert torch.equal(run(stop_id), run([stop_id])) and torch.equal(run(torch.tensor([stop_id])), run([stop_id]))
    assert torch.equal(run(torch.tensor(stop_id)), run([stop_id]))  # one id as a 0-dim tensor
    assert not torch.equal(run(stop_id), free)
    for bad in ("1", 1.5, [1, "x"]):
        with pytest.raises(ValueError, match="stop_token_ids must be token ids"):
            run(bad)


def test_generation_ends_when_every_row_has_stopped(twin):
    _, model = twin
    ids, mask = left_padded([12, 8, 5], CFG.vocab_size)
    first = new_tokens(generate(model, ids, attention_mask=mask, max_new_tokens=1, stop_token_ids=()), 12)[:, 0]
    stops = tuple(first.tolist())  # every row stops at its first token
    assert len(list(stream(model, ids, attention_mask=mask, max_new_tokens=20, stop_token_ids=stops))) == 1
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_token_ids=stops, pad_id=0)
    assert out.shape == (3, 32)  # still padded out to T + max_new_tokens
    assert torch.equal(out[:, 12], first) and (out[:, 13:] == 0).all()


def test_context_overflow_is_refused_before_any_work(twin, monkeypatch):
    _, model = twin

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "hidden_states", no_work)
    ids = torch.randint(3, CFG.vocab_size, (2, 100))
    message = r"prompt \(100 tokens\) \+ max_new_tokens \(29\) = 129 tokens exceed the model's context of 128"
    with pytest.raises(ValueError, match=message):
        generate(model, ids, max_new_tokens=29)
    with pytest.raises(ValueError, match="context of 128"):
        stream(model, ids, max_new_tokens=29)  # refused on the call, not on the first step
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        stream(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="left-padded"):
        stream(model, ids, attention_mask=torch.ones(2, 100).flip(1).tril()[:2].long(), max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        stream(model, ids, max_new_tokens=1, temperature=1.0, top_p=0.0)


def test_generate_leaves_the_model_mode_and_gives_a_normal_tensor(twin):
    _, model = twin
    model.train()
    out = generate(model, torch.tensor([[2, 5, 9]]), max_new_tokens=3)
    assert model.training
    model.eval()
    out[0, 0] = 7  # not an inference tensor: callers may edit it
    assert out.shape == (1, 6)


def test_session_turns_equal_feeding_the_whole_conversation(twin):
    _, model = twin
    g = torch.Generator().manual_seed(0)
    turn1 = torch.randint(3, CFG.vocab_size, (1, 10), generator=g)
    turn2 = torch.randint(3, CFG.vocab_size, (1, 6), generator=g)
    session = Session(model, max_len=60)
    reply1 = torch.stack(list(session.stream(turn1, max_new_tokens=12, stop_token_ids=())), 1)
    assert session.length == 22 and session.tokens_left == 38
    reply2 = torch.stack(list(session.stream(turn2, max_new_tokens=12, stop_token_ids=())), 1)
    whole = torch.cat([turn1, reply1, turn2], 1)  # 28 tokens, then 12 more: 5 windows of W = 8
    assert torch.equal(new_tokens(generate(model, whole, max_new_tokens=12, stop_token_ids=()), 28), reply2)
    message = r"40 tokens so far \+ 15 new \+ max_new_tokens \(6\) = 61 tokens exceed the session's max_len of 60"
    with pytest.raises(ValueError, match=message):
        session.stream(torch.randint(3, CFG.vocab_size, (1, 15)), max_new_tokens=6)
    assert session.length == 40  # the refused turn changed nothing


@pytest.mark.parametrize("where", ["inside", "after"])
def test_a_decode_step_that_fails_leaves_the_session_where_the_caller_is(twin, where):
    """A decode step that fails in the middle of the model (after its second layer) or once the
    cache has counted its column (in the final norm): the session holds the tokens the caller got,
    the last one pending or in the cache, and goes on with the tokens of one that never failed."""
    _, model = twin
    ids = torch.randint(3, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    want = [int(t) for t in Session(model, max_len=60).stream(ids, max_new_tokens=NEW, stop_token_ids=())]
    session = Session(model, max_len=60)
    with failing(model.model.layers[1] if where == "inside" else model.model.norm, on_call=5):
        got = until_injected(session.stream(ids, max_new_tokens=NEW, stop_token_ids=()))
    assert len(got) == 4 and session.length == 14
    got += [int(t) for t in session.stream(ids[:, :0], max_new_tokens=NEW - 4, stop_token_ids=())]
    assert got == want


@pytest.mark.parametrize("where", ["before its rings", "midway through its rings", "after it was counted"])
def test_a_later_turn_that_fails(twin, where):
    """A later turn of 12 tokens (more than the rings' 8 slots) whose forward fails: before any ring
    is written (in the first layer's norm), the turn is fed again as if never sent; after the first
    layer wrote its ring, the cache no longer holds the window the next token needs, and a plain
    session keeps no tokens to feed again, so it refuses to go on and says what to do; after the
    cache counted it (in the final norm), the turn stays and the reply follows. Each against a
    session that never failed."""
    _, model = twin
    g = torch.Generator().manual_seed(9)
    turn1, turn2 = (torch.randint(3, CFG.vocab_size, (1, T), generator=g) for T in (10, 12))
    plain = Session(model, max_len=60)
    list(plain.stream(turn1, max_new_tokens=5, stop_token_ids=()))
    want = [int(t) for t in plain.stream(turn2, max_new_tokens=8, stop_token_ids=())]
    session = Session(model, max_len=60)
    list(session.stream(turn1, max_new_tokens=5, stop_token_ids=()))
    module = {"before its rings": model.model.layers[0].input_layernorm, "midway through its rings":
              model.model.layers[0], "after it was counted": model.model.norm}[where]  # fmt: skip
    with failing(module):
        assert until_injected(session.stream(turn2, max_new_tokens=8, stop_token_ids=())) == []
    if where == "midway through its rings":
        with pytest.raises(ValueError, match="stopped in the middle of a forward .* start a new Session"):
            session.stream(turn2, max_new_tokens=8)
        return
    again = turn2 if where == "before its rings" else turn2[:, :0]
    assert session.length == 15 + 12 * (where == "after it was counted")
    assert [int(t) for t in session.stream(again, max_new_tokens=8, stop_token_ids=())] == want


def test_a_first_call_that_fails_leaves_the_session_new(twin):
    """A left-padded batch's prefill failing (after the first layer wrote its ring): the same call
    again, padding and batch and all, gives a fresh session's tokens."""
    _, model = twin
    ids, mask = left_padded([14, 9], CFG.vocab_size)
    want = torch.stack(list(Session(model).stream(ids, attention_mask=mask, max_new_tokens=6)), 1)
    session = Session(model)
    with failing(model.model.layers[0]):
        assert until_injected(session.stream(ids, attention_mask=mask, max_new_tokens=6)) == []
    assert session.length == 0
    assert torch.equal(torch.stack(list(session.stream(ids, attention_mask=mask, max_new_tokens=6)), 1), want)


def test_a_batch_session_cannot_be_continued(twin):
    _, model = twin
    ids, mask = left_padded([6, 4], CFG.vocab_size)
    session = Session(model)
    list(session.stream(ids, attention_mask=mask, max_new_tokens=2))
    with pytest.raises(ValueError, match="only a session of one sequence can be continued"):
        session.stream(ids[:, -1:], max_new_tokens=2)


@pytest.fixture(scope="module")
def chat_parts(tmp_path_factory):
    texts = ["Hello there! How are you today?", "I am fine, thank you. What would you like to know?"] * 3
    tok = Tokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", 300))
    _, model = talkative_twin(tiny_config(vocab_size=tok.vocab_size), seed=4)
    return model, tok


def test_chat_turn_ids_continue_gemmas_template(chat_parts):
    model, tok = chat_parts
    u1 = {"role": "user", "content": "Hi"}
    m1 = {"role": "model", "content": "Hello"}
    u2 = {"role": "user", "content": "How are you?"}
    after_reply = tok.encode_chat([u1, m1])  # ends "<end_of_turn>\n": the model's stop, then "\n"
    newline = tok.encode("\n", bos=False)
    assert after_reply[-len(newline) - 1] == tok.end_of_turn_id
    expected = tok.encode_chat([u1, m1, u2])[len(after_reply) - len(newline) :]
    chat = Chat(model, tok)
    list(chat.reply("Hi", max_new_tokens=1))
    chat.session.pending = torch.tensor([[tok.end_of_turn_id]])  # as if the model had closed its turn
    assert chat.turn_ids("How are you?") == expected
    chat.session.pending = torch.tensor([[42]])  # a reply cut by max_new_tokens: close the turn first
    assert chat.turn_ids("How are you?") == [tok.end_of_turn_id] + expected


def test_chat_replies_equal_generating_from_the_whole_conversation(chat_parts):
    model, tok = chat_parts
    chat = Chat(model, tok, max_len=120)
    first = chat.turn_ids("Hi")
    assert first == tok.encode_chat([{"role": "user", "content": "Hi"}])
    reply1 = list(chat.reply("Hi", max_new_tokens=15))
    second = chat.turn_ids("How are you?")
    reply2 = list(chat.reply("How are you?", max_new_tokens=15))
    whole = torch.tensor([first + reply1 + second])
    want = generate(model, whole, max_new_tokens=15, stop_token_ids=tok.stop_ids)[0, whole.shape[1] :].tolist()
    assert reply2 == want[: len(reply2)] and set(want[len(reply2) :]) <= {tok.pad_id}
    # A turn that a new chat would hold, but not this one; then one that no chat holds (mid-chat too).
    too_long_here = next(t for t in ("x " * n for n in range(100)) if len(chat.turn_ids(t)) > chat.tokens_left)
    assert len(chat.turn_ids(too_long_here)) + 1 < 120
    with pytest.raises(ValueError, match="the chat is full: .* start a new chat"):
        list(chat.reply(too_long_here, max_new_tokens=5))
    with pytest.raises(ValueError, match="the chat holds 120: shorten it"):
        list(chat.reply("x " * 100, max_new_tokens=5))


@pytest.mark.parametrize("lookup", [False, True])
def test_a_reply_that_stopped_on_eos_is_closed_with_end_of_turn_alone(lookup):
    """Gemma's template holds no <eos> inside a conversation: after a reply that stopped on it, the
    chat goes on from the reply's text with <end_of_turn> (it fed <eos><end_of_turn>), and the
    next reply is the model's continuation of exactly that conversation."""
    from gemma2 import load_model
    from gemma2.prompt_lookup import PromptLookup

    teacher = Path(__file__).parents[1] / "checkpoints" / "tiny-teacher"
    model, tok = load_model(teacher), Tokenizer(teacher / "tokenizer.model")
    chat = Chat(model, tok, draft=PromptLookup() if lookup else None)
    chat.session.drop_pending()  # nothing to drop yet
    first = chat.turn_ids("What is a list?")
    reply1 = list(chat.reply("What is a list?", max_new_tokens=60))
    assert reply1[-1] == tok.eos_id  # the tiny teacher (not instruction-tuned) ends its replies so
    for _ in range(2):  # by hand (reply does it): once drops the <eos>, twice nothing more
        chat.session.drop_pending()
        assert chat.session.length == len(first) + len(reply1) - 1
    second = chat.turn_ids("And a tuple?")
    assert second == [tok.end_of_turn_id] + tok.encode("\n", bos=False) + tok.encode_chat(
        [{"role": "user", "content": "And a tuple?"}])[1:]  # fmt: skip
    reply2 = list(chat.reply("And a tuple?", max_new_tokens=12))
    whole = torch.tensor([first + reply1[:-1] + second])  # the conversation, without the <eos>
    want = generate(model, whole, max_new_tokens=12, stop_token_ids=tok.stop_ids)[0, whole.shape[1] :].tolist()
    assert reply2 == want[: len(reply2)] and set(want[len(reply2) :]) <= {tok.pad_id}
    assert chat.session.length == len(first) + len(reply1) - 1 + len(second) + len(reply2)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="non-empty"):
        left_pad([[1], []])
