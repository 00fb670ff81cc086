"""Masks against brute-force definitions written here, and against the masks transformers builds."""

import math

import pytest
import torch

from conftest import hf_twin, left_padded, tiny_config
from gemma2 import masks
from gemma2.masks import flex_block_mask, flex_mask_mod, may_attend, ring_columns


def brute_force(q_cols, k_cols, window, key_valid):
    """The textbook rule, one (query, key) pair at a time."""
    B = key_valid.shape[0]
    out = torch.zeros(B, len(q_cols), len(k_cols), dtype=torch.bool)
    for b in range(B):
        for i, q in enumerate(q_cols.tolist()):
            for j, k in enumerate(k_cols.tolist()):
                seen = 0 <= k <= q and (window is None or q - window < k)
                out[b, i, j] = seen and bool(key_valid[b, j])
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 8, 20, 64])  # < , = and > the sequence
@pytest.mark.parametrize("q_start", [0, 5, 40])  # queries deep into the sequence (decoding)
def test_may_attend_matches_brute_force(window, q_start):
    T = 20
    k_cols = torch.arange(q_start + T)
    q_cols = torch.arange(q_start, q_start + T)
    g = torch.Generator().manual_seed(q_start)
    key_valid = torch.rand(2, len(k_cols), generator=g) > 0.2
    got = may_attend(q_cols, k_cols, window=window, key_valid=key_valid)
    assert torch.equal(got, brute_force(q_cols, k_cols, window, key_valid))


def test_sliding_window_sees_exactly_w_keys():
    W = 4
    cols = torch.arange(12)
    mask = may_attend(cols, cols, window=W)
    assert mask.sum(-1).tolist() == [1, 2, 3, 4] + [W] * 8
    assert mask[10].nonzero().flatten().tolist() == [7, 8, 9, 10]  # p - W + 1 .. p


def test_ring_columns_hold_the_latest_columns():
    size = 5
    for next_col in range(0, 23):
        got = ring_columns(next_col, size)
        for slot in range(size):
            written = [c for c in range(next_col) if c % size == slot]
            expected = written[-1] if written else None
            assert (got[slot].item() if got[slot] >= 0 else None) == expected


def test_flex_mask_mod_matches_may_attend():
    q_cols = torch.arange(30, 40)
    k_cols = torch.cat([ring_columns(30, 8), q_cols])  # a cache ring, then new keys
    key_valid = torch.rand(3, len(k_cols)) > 0.3
    mod = flex_mask_mod(q_cols, k_cols, 8, key_valid)
    b, q, k = torch.meshgrid(torch.arange(3), torch.arange(10), torch.arange(len(k_cols)), indexing="ij")
    assert torch.equal(mod(b, torch.zeros_like(b), q, k), may_attend(q_cols, k_cols, window=8, key_valid=key_valid))


@pytest.mark.parametrize(
    "B, q_cols, k_cols, window, pad",
    [
        (1, torch.arange(300), torch.arange(300), 7, 0),  # odd window, one row
        (3, torch.arange(1000), torch.arange(1000), 129, 37),  # left padding, T > 2W
        (4, torch.arange(513), torch.arange(513), None, 200),  # global, just past a bucket
        (2, torch.arange(695, 700), torch.arange(700), 100, 3),  # a chunk after a cache
        (1, torch.arange(4095, 4096), torch.arange(4096), 512, 0),  # one decode query
        (3, torch.arange(30, 40), torch.cat([ring_columns(30, 8), torch.arange(30, 40)]), 8, 2),  # a ring
    ],
)
@pytest.mark.parametrize("rows_per_pass", [1, 3, None])  # None: as many as the default budget allows
def test_flex_block_mask_is_torchs_create_block_mask(B, q_cols, k_cols, window, pad, rows_per_pass, monkeypatch):
    """Built a few rows of query blocks at a time, the BlockMask is the one torch's create_block_mask
    makes from the same rule over the whole [B, Tq, Tk] grid: every block table equal."""
    from torch.nn.attention.flex_attention import create_block_mask

    Tq, Tk = (max(128, 2 ** math.ceil(math.log2(n))) for n in (len(q_cols), len(k_cols)))  # the buckets
    if rows_per_pass is not None:
        monkeypatch.setattr(masks, "_MASK_ENTRIES", rows_per_pass * B * 128 * Tk)
    key_valid = torch.ones(B, len(k_cols), dtype=torch.bool)
    key_valid[:, :pad] = False
    key_valid[-1, : pad // 2] = False  # rows padded differently
    got = flex_block_mask(q_cols, k_cols, window, key_valid)
    q = torch.cat([q_cols, torch.full((Tq - len(q_cols),), -1)])
    k = torch.cat([k_cols, torch.full((Tk - len(k_cols),), -1)])
    valid = torch.cat([key_valid, torch.zeros(B, Tk - len(k_cols), dtype=torch.bool)], dim=1)
    span = Tq + Tk + 1 if window is None else window
    want = create_block_mask(flex_mask_mod(q, k, span, valid), B, None, Tq, Tk, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):  # fmt: skip
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.shape == want.shape and got.BLOCK_SIZE == want.BLOCK_SIZE


@pytest.mark.parametrize("window", [4, 8, 40])  # smaller than, around, larger than the sequence
def test_matches_masks_transformers_builds(window, monkeypatch):
    """Capture the mask transformers' eager attention receives in each layer."""
    import transformers.models.gemma2.modeling_gemma2 as hf_gemma2

    cfg = tiny_config(sliding_window=window, num_hidden_layers=2)
    hf, _ = hf_twin(cfg)
    seen = []
    original = hf_gemma2.eager_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, attention_mask))
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(hf_gemma2, "eager_attention_forward", spy)
    ids, am = left_padded([20, 13, 7], cfg.vocab_size)
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=am)
    assert [layer for layer, _ in seen] == [0, 1]
    cols = torch.arange(ids.shape[1])
    for layer, hf_mask in seen:
        allowed = hf_mask[:, 0] == 0 if hf_mask.dtype != torch.bool else hf_mask[:, 0]  # additive or bool
        ours = may_attend(cols, cols, window=window if layer == 0 else None, key_valid=am.bool())
        real = am.bool()[:, :, None]  # rows of padding queries are don't-cares
        assert torch.equal(allowed & real, ours & real), f"layer {layer}"


@pytest.mark.parametrize("window", [3, 8])
def test_matches_transformers_mask_functions_at_offsets(window):
    """Past the window (decoding with a cache): transformers' own mask rule at absolute indices."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    rule = sliding_window_causal_mask_function(window)
    q_cols = torch.arange(50, 54)
    k_cols = torch.arange(54)
    theirs = rule(0, 0, q_cols[:, None], k_cols[None, :])
    assert torch.equal(may_attend(q_cols, k_cols, window=window), theirs)
