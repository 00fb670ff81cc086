"""Speculative decoding: greedy output is the target's own, sampled output follows the target's
(filtered) distribution, and bad requests are refused before any work."""

import copy
import itertools
import math
from collections import Counter

import pytest
import torch

from conftest import failing, randomize_, tiny_config, until_injected
from gemma2 import Gemma2ForCausalLM
from gemma2.chat import Chat
from gemma2.generation import Session, generate
from gemma2.prompt_lookup import PromptLookup
from gemma2.speculative import SpeculativeSession, speculative_generate
from gemma2.tokenizer import Tokenizer, train_tokenizer

CFG = tiny_config()  # W = 8, context 128
NEW = 40  # with prompts up to 12 tokens, decoding runs past 4 W: three windows past the first


def talkative(cfg, seed: int) -> Gemma2ForCausalLM:
    """A random model whose greedy decoding does not just repeat (see test_generation.talkative_twin)."""
    model = Gemma2ForCausalLM(cfg).eval()
    randomize_(model, seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.1)
        model.model.norm.weight.mul_(40.0)
    return model


def perturbed(model: Gemma2ForCausalLM, scale: float, seed: int) -> Gemma2ForCausalLM:
    """The model with noise on every weight: a draft that agrees often, not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft


@pytest.fixture(scope="module")
def pair():
    target = talkative(CFG, seed=3)
    return target, perturbed(target, 0.02, seed=2)


def prompts(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 13, (n,), generator=g).tolist()
    return [torch.randint(3, CFG.vocab_size, (1, T), generator=g) for T in lengths]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_is_the_targets_own_output(pair, k):
    target, draft = pair
    proposed = accepted = 0
    for ids in prompts(6, seed=k):
        want = generate(target, ids, max_new_tokens=NEW, stop_token_ids=())
        got, stats = speculative_generate(target, draft, ids, draft_tokens=k, max_new_tokens=NEW, stop_token_ids=())
        assert torch.equal(got, want)
        assert stats.new_tokens == NEW and stats.proposed <= k * stats.target_forwards
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
        assert len(set(want[0, -NEW:].tolist())) > 10  # a real test: the target does not loop
    assert 0 < accepted < proposed  # proposals were kept and rejected: both paths ran, rollbacks included


def test_compiled_draft_steps_change_nothing(pair):
    """The draft's one-token steps through torch.compile (gemma2.static_decode, fp32): the target's
    own greedy tokens, and the very proposals and acceptances of eager draft steps, one-token
    prompts included (the draft's first step is then compiled too)."""
    target, draft = pair
    proposed = accepted = 0
    for ids in prompts(4, seed=11) + [torch.tensor([[7]])]:
        eager, eager_stats = speculative_generate(target, draft, ids, draft_tokens=3, max_new_tokens=NEW,
                                                  stop_token_ids=())  # fmt: skip
        got, stats = speculative_generate(target, draft, ids, draft_tokens=3, max_new_tokens=NEW, stop_token_ids=(),
                                          compiled=True)  # fmt: skip
        assert torch.equal(got, generate(target, ids, max_new_tokens=NEW, stop_token_ids=()))
        assert torch.equal(got, eager) and stats == eager_stats
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert 0 < accepted < proposed  # rejections, so truncated caches fed the compiled steps


@pytest.mark.parametrize("k", [1, 4])
def test_a_draft_equal_to_the_target_is_always_right(pair, k):
    target, _ = pair
    ids = prompts(1, seed=9)[0]
    got, stats = speculative_generate(target, target, ids, draft_tokens=k, max_new_tokens=NEW, stop_token_ids=())
    assert torch.equal(got, generate(target, ids, max_new_tokens=NEW, stop_token_ids=()))
    assert stats.accepted == stats.proposed > 0 and stats.acceptance_rate == 1.0
    # Every round but the last proposes k and emits k + 1; the last proposes what is left minus one.
    assert stats.target_forwards == math.ceil(NEW / (k + 1))
    assert stats.tokens_per_forward == NEW / stats.target_forwards


def test_generate_dispatches_to_the_draft(pair):
    target, draft = pair
    ids = prompts(1, seed=11)[0]
    via_generate = generate(target, ids, max_new_tokens=20, draft_model=draft, draft_tokens=3, temperature=0.9,
                            generator=torch.Generator().manual_seed(4))  # fmt: skip
    direct, _ = speculative_generate(target, draft, ids, draft_tokens=3, max_new_tokens=20, temperature=0.9,
                                     generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert torch.equal(via_generate, direct)


def test_stop_tokens_end_the_output_as_in_generate(pair):
    target, draft = pair
    ids = prompts(1, seed=12)[0]
    free = generate(target, ids, max_new_tokens=NEW, stop_token_ids=())[0, ids.shape[1] :].tolist()
    stop = free[17]  # a token first produced somewhere in the middle
    assert stop not in free[:17]
    want = generate(target, ids, max_new_tokens=NEW, stop_token_ids=(stop,), pad_id=0)
    got, stats = speculative_generate(target, draft, ids, draft_tokens=4, max_new_tokens=NEW,
                                      stop_token_ids=(stop,), pad_id=0)  # fmt: skip
    assert torch.equal(got, want)
    assert stats.new_tokens == 18 and (got[0, ids.shape[1] + 18 :] == 0).all()


@pytest.mark.parametrize("new", [1, 2, 5])
def test_max_new_tokens_and_padding_as_in_generate(pair, new):
    target, draft = pair
    ids = torch.tensor([[0, 0, 5, 17, 42]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    want = generate(target, ids, attention_mask=mask, max_new_tokens=new, stop_token_ids=())
    got, stats = speculative_generate(target, draft, ids, attention_mask=mask, draft_tokens=4, max_new_tokens=new,
                                      stop_token_ids=())  # fmt: skip
    assert torch.equal(got, want) and stats.new_tokens == new


def test_the_generator_makes_sampling_reproducible(pair):
    target, draft = pair
    ids = prompts(1, seed=13)[0]

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return speculative_generate(target, draft, ids, max_new_tokens=NEW, temperature=1.0, generator=g,
                                    stop_token_ids=())[0]  # fmt: skip

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# The sampling path's distribution: a tiny vocabulary, so that every 3-token continuation is a cell.
SMALL = tiny_config(vocab_size=8, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=2,
                    max_position_embeddings=16)  # fmt: skip
FILTERS = dict(temperature=0.8, top_k=4, top_p=0.9)
DRAWS = 5000
ALPHA = 1e-3


def flat(seed: int) -> Gemma2ForCausalLM:
    """A random model with spread-out next-token distributions (every filter then bites)."""
    model = Gemma2ForCausalLM(SMALL).eval()
    randomize_(model, seed)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.embed_tokens.weight.mul_(0.2)
    return model


def filtered(logits: torch.Tensor) -> torch.Tensor:
    """FILTERS applied by their textbook definitions to one row of logits `[V]`."""
    probs = (logits.double() / FILTERS["temperature"]).softmax(-1)
    order = probs.argsort(descending=True)[: FILTERS["top_k"]]  # random logits: no ties
    top = probs[order] / probs[order].sum()  # top-p works on what top-k left, renormalised
    n = next(i + 1 for i in range(len(top)) if top[: i + 1].sum() >= FILTERS["top_p"])  # smallest set reaching p
    out = torch.zeros_like(probs)
    out[order[:n]] = probs[order[:n]]
    return out / out.sum()


def chi2_sf(x: float, df: int) -> float:
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2.0)).item()


def noncentral_chi2_cdf(x: float, df: int, lam: float) -> float:
    """Poisson mixture of central chi-square CDFs."""
    js = torch.arange(int(lam / 2 + 20 * math.sqrt(lam / 2 + 1) + 50), dtype=torch.float64)
    weights = torch.exp(-lam / 2 + js * math.log(lam / 2) - torch.lgamma(js + 1))
    return float((weights * torch.special.gammainc(df / 2 + js, torch.tensor(x / 2.0))).sum())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_sampling_follows_the_targets_filtered_distribution(kind):
    target = flat(1)
    if kind == "model":
        draft, ids = flat(2), torch.tensor([[2, 5, 3]])
    else:  # the last two tokens occurred before: the first round guesses 4 (p = 0.53 after the filters), then 5
        draft, ids = PromptLookup(), torch.tensor([[5, 4, 4, 5, 4]])
        assert draft.propose(ids[0], 2).tolist() == [4, 5]
    P = ids.shape[1]
    with torch.no_grad():
        # The exact distribution of every 3-token continuation under the target alone.
        exact: dict[tuple[int, ...], float] = {(): 1.0}
        for _ in range(3):
            exact = {
                seq + (t,): pr * float(p)
                for seq, pr in exact.items()
                for t, p in enumerate(filtered(target(torch.tensor([ids[0].tolist() + list(seq)]))[0, -1]))
                if p > 0
            }  # fmt: skip
        p1 = filtered(target(ids)[0, -1])
        q1 = filtered(draft(ids)[0, -1]) if kind == "model" else torch.nn.functional.one_hot(torch.tensor(4), 8).double()
    g = torch.Generator().manual_seed(0)
    counts, proposed, accepted = Counter(), 0, 0
    for _ in range(DRAWS):
        out, stats = speculative_generate(target, draft, ids, draft_tokens=2, max_new_tokens=3, stop_token_ids=(),
                                          generator=g, **FILTERS)  # fmt: skip
        counts[tuple(out[0, P:].tolist())] += 1
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert set(counts) <= set(exact)  # nothing the filters remove is ever emitted
    assert 0.2 < accepted / proposed < 0.9  # the draft differs: rejections and residual draws happen
    # Pearson's chi-square; cells expecting fewer than 5 draws pooled per first token, so that the
    # pooled cells still refine the first token's distribution (used for the power below).
    cells: dict[tuple, list[float]] = {}
    for seq, pr in exact.items():
        key = seq if pr * DRAWS >= 5 else (seq[0], "rest")
        cell = cells.setdefault(key, [0.0, 0.0])
        cell[0] += pr * DRAWS
        cell[1] += counts[seq]
    stat = sum((obs - exp) ** 2 / exp for exp, obs in cells.values())
    df = len(cells) - 1
    assert chi2_sf(stat, df) > ALPHA, f"chi-square {stat:.1f} on {df} degrees of freedom"
    # Power: a classic bug, drawing from the target's p instead of the residual after a rejection,
    # moves the first token's distribution to min(p, q) + (1 - sum(min(p, q))) p. Its chi-square
    # divergence from p bounds the one on our cells from below (they refine the first token), so
    # the test's power against that bug is at least the noncentral chi-square's at DRAWS * that.
    overlap = torch.minimum(p1, q1)
    wrong = overlap + (1 - overlap.sum()) * p1
    divergence = float(((wrong - p1)[p1 > 0] ** 2 / p1[p1 > 0]).sum())
    critical = next(x / 10 for x in range(1, 100000) if chi2_sf(x / 10, df) < ALPHA)
    power = 1 - noncentral_chi2_cdf(critical, df, DRAWS * divergence)
    assert power > 0.99, f"power {power:.3f} against the wrong residual"


def test_batches_are_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match=r"batch 1\), got a batch of 2"):
        speculative_generate(target, draft, torch.ones(2, 3, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="batch 1"):
        generate(target, torch.ones(2, 3, dtype=torch.long), max_new_tokens=4, draft_model=draft)


def test_a_draft_with_another_vocabulary_is_refused(pair):
    target, _ = pair
    other = Gemma2ForCausalLM(CFG.replace(vocab_size=CFG.vocab_size + 1))
    with pytest.raises(ValueError, match=rf"draft model's vocabulary has {CFG.vocab_size + 1} tokens but the target's has {CFG.vocab_size}"):
        speculative_generate(target, other, torch.ones(1, 3, dtype=torch.long), max_new_tokens=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(draft_tokens=0), "draft_tokens must be an integer >= 1"),
        (dict(draft_tokens=2.0), "draft_tokens must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(max_new_tokens=130), "exceed the model's context of 128"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(pair, kwargs, message):
    target, draft = pair
    with pytest.raises(ValueError, match=message):
        speculative_generate(target, draft, torch.ones(1, 3, dtype=torch.long), **(dict(max_new_tokens=4) | kwargs))


def test_a_draft_with_a_shorter_context_is_refused(pair):
    target, _ = pair
    short = Gemma2ForCausalLM(CFG.replace(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceed the draft model's context of 16"):
        speculative_generate(target, short, torch.ones(1, 3, dtype=torch.long), max_new_tokens=20)


def test_draft_tokens_without_a_draft_is_refused(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="draft_tokens needs a draft_model"):
        generate(target, torch.ones(1, 3, dtype=torch.long), max_new_tokens=4, draft_tokens=3)


# Prompt lookup: the sequence drafts itself (gemma2.prompt_lookup).


def latest_continuation(seq: list[int], k: int, max_ngram: int, min_ngram: int) -> tuple[list[int], bool]:
    """The definition, by brute force: for n from max_ngram down, the latest start i < L - n whose n
    tokens equal the last n; the tokens after them, continued as the loop they make when fewer
    than k (the text from i + n on, over and over), cut to k; and whether it looped."""
    L = len(seq)
    for n in range(max_ngram, min_ngram - 1, -1):
        for i in reversed(range(L - n)):
            if seq[i : i + n] == seq[L - n :]:
                loop = seq[i + n :]
                while len(loop) < k:
                    loop = loop + seq[i + n :]
                return loop[:k], L - (i + n) < k
    return [], False


@pytest.mark.parametrize("max_ngram, min_ngram", [(3, 1), (2, 2), (1, 1), (4, 2)])
def test_prompt_lookup_guesses_what_followed_the_latest_earlier_occurrence(max_ngram, min_ngram):
    lookup, g = PromptLookup(max_ngram, min_ngram), torch.Generator().manual_seed(max_ngram * 10 + min_ngram)
    found = looped = 0
    for _ in range(300):
        seq = torch.randint(0, 3, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g)
        for k in (1, 4):
            want, loops = latest_continuation(seq.tolist(), k, max_ngram, min_ngram)
            assert lookup.propose(seq, k).tolist() == want, (seq.tolist(), k)
            found, looped = found + bool(want), looped + loops
    assert 100 < found < 600 and looped > 20  # each outcome, often


@pytest.mark.parametrize("k", [1, 3, 8])
def test_prompt_lookup_greedy_is_the_targets_own_output(pair, k):
    talkative_target, _ = pair
    copier = Gemma2ForCausalLM(CFG).eval()
    randomize_(copier, seed=5)  # at this scale a tied head predicts the input token again: guesses come true
    proposed = accepted = 0
    g = torch.Generator().manual_seed(k)
    for target in (talkative_target, copier):
        for _ in range(3):
            ids = torch.randint(3, 9, (1, 12), generator=g)  # six ids: the prompt repeats itself
            want = generate(target, ids, max_new_tokens=NEW, stop_token_ids=())
            got, stats = speculative_generate(target, PromptLookup(), ids, draft_tokens=k, max_new_tokens=NEW,
                                              stop_token_ids=())  # fmt: skip
            assert torch.equal(got, want)
            assert stats.new_tokens == NEW and stats.proposed <= k * stats.target_forwards
            proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert 0 < accepted < proposed  # kept and rejected guesses both happened


def test_prompt_lookup_through_generate_and_its_refusals(pair):
    target, _ = pair
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5]])
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    via_generate = generate(target, ids, max_new_tokens=20, draft_model=PromptLookup(), temperature=0.9, generator=g[0])
    direct, _ = speculative_generate(target, PromptLookup(), ids, max_new_tokens=20, temperature=0.9, generator=g[1])
    assert torch.equal(via_generate, direct)
    with pytest.raises(ValueError, match="prompt lookup has none"):
        speculative_generate(target, PromptLookup(), ids, max_new_tokens=4, compiled=True)
    with pytest.raises(ValueError, match="draft_tokens must be an integer >= 1"):
        speculative_generate(target, PromptLookup(), ids, max_new_tokens=4, draft_tokens=0)
    with pytest.raises(ValueError, match="exceed the model's context of 128"):
        speculative_generate(target, PromptLookup(), ids, max_new_tokens=125)
    for bad in ((0, 1), (2, 3), (2.0, 1), (True, 1)):
        with pytest.raises(ValueError, match="1 <= min_ngram <= max_ngram"):
            PromptLookup(*bad)


# Sessions: a conversation decoded speculatively, turn after turn (gemma2.speculative.SpeculativeSession).


@pytest.fixture(scope="module")
def copier():
    model = Gemma2ForCausalLM(CFG).eval()
    randomize_(model, seed=5)  # at this scale a tied head predicts the input token again: guesses come true
    return model


def session_pair(pair, copier, kind: str) -> tuple[Gemma2ForCausalLM, Gemma2ForCausalLM | PromptLookup]:
    """A target and its draft: a close model for the talkative target, or prompt lookup for the copier."""
    return (pair[0], pair[1]) if kind == "model" else (copier, PromptLookup())


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_a_speculative_session_goes_on_turn_after_turn_as_a_plain_one(pair, copier, kind):
    """Three turns, each read to its end or left after `cut` tokens (often in the middle of a round,
    whose later tokens the caller never gets): the plain Session's tokens, turn after turn, and the
    same length. The plain Session is itself tested against generating from the whole conversation."""
    target, draft = session_pair(pair, copier, kind)
    g = torch.Generator().manual_seed(3)
    left_mid_round = proposed = accepted = 0
    for cut in (1, 2, 3, 5, None):
        plain, fast = Session(target, max_len=128), SpeculativeSession(target, draft, max_len=128, draft_tokens=4)
        for T in (12, 5, 3):
            ids = torch.randint(3, 9, (1, T), generator=g)  # six ids: the turns repeat each other
            want = [int(t) for t in itertools.islice(plain.stream(ids, max_new_tokens=20, stop_token_ids=()), cut)]
            steps = fast.stream(ids, max_new_tokens=20, stop_token_ids=())
            got = [int(t) for t in itertools.islice(steps, cut)]  # `steps` is still open: never closed
            assert got == want and fast.length == plain.length and fast.tokens_left == plain.tokens_left
            stats = fast.stats
            assert stats.new_tokens == len(got)
            left_mid_round += stats.accepted + stats.target_forwards > stats.new_tokens
            proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    assert left_mid_round and 0 < accepted < proposed


@pytest.mark.parametrize("kind", ["model", "lookup"])
@pytest.mark.parametrize("where", ["inside", "after"])
def test_a_round_that_fails_is_undone(pair, copier, kind, where):
    """An error in the middle of the target's forward (its caches half written) or right after it
    (every column of the round written): the session goes on from the last token the caller got,
    and the tokens are those of a session that never failed."""
    target, draft = session_pair(pair, copier, kind)
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 8, 5, 6]])
    want = [int(t) for t in Session(target, max_len=128).stream(ids, max_new_tokens=NEW, stop_token_ids=())]
    session = SpeculativeSession(target, draft, max_len=128, draft_tokens=4)
    # Inside: after the second layer (the first, local, has written its ring too); after: the final
    # norm, which runs once the cache has counted the round's columns. The third round fails.
    with failing(target.model.layers[1] if where == "inside" else target.model.norm, on_call=3):
        got = until_injected(session.stream(ids, max_new_tokens=NEW, stop_token_ids=()))
    assert 2 <= len(got) < NEW and session.length == ids.shape[1] + len(got)
    got += [int(t) for t in session.stream(ids[:, :0], max_new_tokens=NEW - len(got), stop_token_ids=())]
    assert got == want


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_a_later_turns_first_forward_that_fails_midway_is_fed_again(pair, copier, kind):
    """A second turn of 10 tokens whose first target forward (the last token, the turn, the
    proposals: a chunk longer than the rings' spare slots) fails after its first layers wrote their
    rings: the caches are rebuilt from the conversation, and the session goes on with the tokens of
    one that never failed."""
    target, draft = session_pair(pair, copier, kind)
    g = torch.Generator().manual_seed(7)
    turn1, turn2 = torch.randint(3, 9, (1, 12), generator=g), torch.randint(3, 9, (1, 10), generator=g)
    plain = Session(target, max_len=128)
    list(plain.stream(turn1, max_new_tokens=20, stop_token_ids=()))
    want = [int(t) for t in plain.stream(turn2, max_new_tokens=30, stop_token_ids=())]
    session = SpeculativeSession(target, draft, max_len=128, draft_tokens=4)
    list(session.stream(turn1, max_new_tokens=20, stop_token_ids=()))
    with failing(target.model.layers[1]):
        assert until_injected(session.stream(turn2, max_new_tokens=30, stop_token_ids=())) == []
    assert session.length == 42 and not session.cache.holds_window(session.cache.length)
    got = [int(t) for t in session.stream(turn2[:, :0], max_new_tokens=30, stop_token_ids=())]
    assert got == want


def test_a_chat_with_a_draft_replies_as_a_plain_chat(tmp_path, pair):
    """Chat(..., draft=...): the same replies (greedy), turn after turn, for a model draft and
    for prompt lookup; its refusals."""
    texts = ["Hello there! How are you today?", "I am fine, thank you. What would you like to know?"] * 3
    tok = Tokenizer(train_tokenizer(texts, tmp_path / "tokenizer.model", 300))
    target = talkative(tiny_config(vocab_size=tok.vocab_size), seed=4)
    close = perturbed(target, 0.02, seed=2)
    turns = ["Hello there!", "How are you today? How are you?", "Hello"]
    plain = Chat(target, tok)
    want = [list(plain.reply(text, max_new_tokens=12)) for text in turns]
    for draft in (close, PromptLookup()):
        chat = Chat(target, tok, draft=draft, draft_tokens=3)
        assert [list(chat.reply(text, max_new_tokens=12)) for text in turns] == want
        assert chat.session.stats.new_tokens == len(want[-1]) and chat.session.length == plain.session.length
    with pytest.raises(ValueError, match="draft_tokens needs a draft"):
        Chat(target, tok, draft_tokens=3)
    short = Gemma2ForCausalLM(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=16))
    assert Chat(target, tok, draft=short).session.max_len == 16  # the shorter context, by default
    with pytest.raises(ValueError, match="max_len 40 exceeds the draft model's context of 16"):
        Chat(target, tok, max_len=40, draft=short)
    with pytest.raises(ValueError, match=r"batch 1\), got a batch of 2"):
        SpeculativeSession(target, close).stream(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


@pytest.mark.cuda
@pytest.mark.parametrize("lookup", [False, True])
def test_on_cuda_greedy_is_the_targets_own_and_sampling_runs(pair, lookup):
    target, draft = (copy.deepcopy(m).cuda() for m in pair)
    draft = PromptLookup() if lookup else draft
    for ids in prompts(3, seed=21):
        ids = ids.cuda()
        want = generate(target, ids, max_new_tokens=NEW, stop_token_ids=())
        got, _ = speculative_generate(target, draft, ids, draft_tokens=4, max_new_tokens=NEW, stop_token_ids=())
        assert torch.equal(got, want)
    g = torch.Generator(device="cuda").manual_seed(0)
    out, stats = speculative_generate(target, draft, ids, max_new_tokens=NEW, temperature=1.0, top_p=0.9, generator=g,
                                      stop_token_ids=())  # fmt: skip
    assert out.device.type == "cuda" and stats.new_tokens == NEW
