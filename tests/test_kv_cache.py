"""KV cache rollback (`KVCache.truncate`): after dropping a verified block's rejected columns, the
cache continues exactly as one built fresh from the kept sequence, past the sliding window."""

import pytest
import torch

from conftest import failing, randomize_, tiny_config
from gemma2 import Gemma2ForCausalLM, KVCache

CFG = tiny_config()  # W = 8, 3 layers: local, global, local


@pytest.fixture(scope="module")
def model():
    m = Gemma2ForCausalLM(CFG).eval()
    randomize_(m, seed=5)
    return m


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_truncated_cache_continues_like_a_fresh_prefill(model, k):
    """Rounds of speculative verification: feed the last token and k proposals, keep a random
    number of them plus one new token, truncate. Each round's logits must equal a full forward
    (no cache) of the kept sequence and the new block, for 3 windows past W."""
    g = torch.Generator().manual_seed(k)
    kept = torch.randint(3, CFG.vocab_size, (5,), generator=g).tolist()
    cache = KVCache(CFG, 1, 64, rollback=k)
    with torch.no_grad():
        model(torch.tensor([kept[:-1]]), cache=cache)
        rounds = dropped = 0
        while len(kept) + k + 1 <= 4 * CFG.sliding_window + 16:
            block = [kept[-1]] + torch.randint(3, CFG.vocab_size, (k,), generator=g).tolist()
            got = model(torch.tensor([block]), cache=cache)[0]
            full = model(torch.tensor([kept[:-1] + block]))[0, -(k + 1) :]  # the independent reference
            assert (got - full).abs().max().item() <= 1e-4
            keep = int(torch.randint(0, k + 1, (1,), generator=g))  # proposals kept (all of them: no rollback)
            kept += block[1 : 1 + keep] + torch.randint(3, CFG.vocab_size, (1,), generator=g).tolist()
            dropped += k - keep
            cache.truncate(len(kept) - 1)
            fresh = KVCache(CFG, 1, 64)
            model(torch.tensor([kept[:-1]]), cache=fresh)
            assert cache.length == fresh.length and torch.equal(cache.seen, fresh.seen)
            assert torch.equal(cache.valid, fresh.valid)
            rounds += 1
    assert rounds >= 4 and dropped > 0


def test_rings_grow_by_rollback_minus_one():
    for rollback, slots in [(0, 8), (1, 8), (2, 9), (7, 14)]:
        cache = KVCache(CFG, 1, 64, rollback=rollback)
        assert [cache.keys[i].shape[2] for i in range(3)] == [slots, 64, slots]
        assert KVCache.nbytes(CFG, 1, 64, torch.float32, rollback) == sum(
            t.numel() * t.element_size() for t in cache.keys + cache.values
        )
    assert KVCache(CFG, 1, 10, rollback=7).keys[0].shape[2] == 10  # never more than max_len


def test_truncating_more_than_the_rings_keep_is_refused(model):
    cache = KVCache(CFG, 1, 64, rollback=2)
    with torch.no_grad():
        model(torch.randint(3, CFG.vocab_size, (1, 30)), cache=cache)
        model(torch.randint(3, CFG.vocab_size, (1, 5)), cache=cache)
    with pytest.raises(ValueError, match="build the cache with rollback >= 3"):
        cache.truncate(32)
    cache.truncate(33)  # two columns: what rollback=2 promises
    assert cache.length == 33
    with pytest.raises(ValueError, match="truncate keeps 0 .. 33 columns"):
        cache.truncate(34)
    with pytest.raises(ValueError, match="rollback must be an integer >= 0"):
        KVCache(CFG, 1, 64, rollback=-1)


def test_a_cache_that_never_wrapped_truncates_anywhere(model):
    cache = KVCache(CFG, 1, 64)
    with torch.no_grad():
        model(torch.randint(3, CFG.vocab_size, (1, 7)), cache=cache)
    cache.truncate(2)  # the ring (8 slots) still holds every column
    assert cache.length == 2 and cache.seen.item() == 2


def test_decode_steps_over_the_whole_buffer_equal_a_full_forward(model):
    """A global layer's decode step attends over every slot of its buffer once 2/3 of them are
    written (the rest masked, and after a truncate they hold the dropped columns' stale keys), over
    the written prefix before that: both must give a full forward's logits (the reference)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, CFG.vocab_size, (1, 30), generator=g)
    cache = KVCache(CFG, 1, 30, rollback=4)
    spans = []
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        for t in range(4, 30):
            got = model(ids[:, t : t + 1], cache=cache)[0, -1]
            spans.append(cache.span)
            assert (got - model(ids[:, : t + 1])[0, -1]).abs().max().item() <= 1e-4
            if t == 25:  # drop 3 columns: they stay in the buffer, past the cache's length
                cache.truncate(23)
                for s in range(23, 26):
                    got = model(ids[:, s : s + 1], cache=cache)[0, -1]
                    assert cache.span == 30  # the stale slots are inside the span: masked
                    assert (got - model(ids[:, : s + 1])[0, -1]).abs().max().item() <= 1e-4
    assert spans[0] == 5 and spans[-1] == 30 and 19 in spans and 20 not in spans  # both regimes ran


def test_a_forward_that_fails_midway_through_a_chunk_leaves_its_loss_on_record(model):
    """A chunk's forward stopped after the first (local) layer wrote its ring: the length is as it
    was, but the ring's older columns are gone. `holds_window` says so, `truncate` refuses, `rewind`
    resets; a reset cache, fed again, continues as a fresh one."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CFG.vocab_size, (1, 40), generator=g)
    cache = KVCache(CFG, 1, 64)
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        assert cache.holds_window(20)
        with failing(model.model.layers[0]), pytest.raises(RuntimeError, match="injected"):
            model(ids[:, 20:32], cache=cache)  # 12 columns: more than the ring's 8 slots
        assert cache.length == 20 and not cache.holds_window(20)
        with pytest.raises(ValueError, match="loses the sliding window"):
            cache.truncate(20)
        cache.rewind(20)
        assert cache.length == 0 and cache.seen.item() == 0 and not cache.valid.any()
        got = model(ids[:, :32], cache=cache)[0, -1]
        assert (got - model(ids[:, :32])[0, -1]).abs().max().item() <= 1e-4
        cache.rewind(40)  # nothing lost: at most what is written, by truncating
        assert cache.length == 32
