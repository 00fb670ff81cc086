"""Attention masks: which keys each query may attend to.

Queries and keys are named by their *column* in the token sequence (0, 1, 2, ... across the prompt
and every generated token, padding included). Columns, not RoPE positions, decide causality and the
window: within one row the real tokens are contiguous, so the two differ by a constant there, and
padding columns are removed by `key_valid` anyway.

A local (sliding-window) query at column q sees keys q - W + 1 .. q: exactly W keys, itself included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

FLEX_BLOCK = 128  # FlexAttention's block of queries and of keys (its default)
_MASK_ENTRIES = 1 << 22  # flex_block_mask's booleans per pass (its memory: a few times this in bytes)


class Columns(NamedTuple):
    """What one forward's masks and RoPE need: the queries' and each layer kind's keys' columns."""

    q_cols: Tensor  # [T] the new tokens' columns
    global_cols: Tensor  # [S] keys of the global layers
    global_valid: Tensor  # [B, S] bool, False for padding
    local_cols: Tensor  # [S'] keys of the local layers (negative: an empty ring slot)
    local_valid: Tensor  # [B, S'] bool
    positions: Tensor  # [B, T] RoPE positions, counted from each row's first real token
    self_attending: bool  # every layer's keys are exactly the queries' columns (no cache before)


def own_columns(valid: Tensor) -> Columns:
    """The columns of a sequence attending to itself (no cache). valid: `[B, T]` bool, left-padded."""
    cols = torch.arange(valid.shape[1], device=valid.device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return Columns(cols, cols, valid, cols, valid, positions, True)


def keep(q: Tensor, k: Tensor, window: int | Tensor | None) -> Tensor:
    """The rule itself, elementwise over broadcastable query and key columns."""
    allowed = (k <= q) & (k >= 0)  # causal; a negative column is an empty cache slot
    if window is not None:
        allowed = allowed & (k > q - window)  # exactly W keys: q - W + 1 .. q
    return allowed


def may_attend(
    q_cols: Tensor, k_cols: Tensor, *, window: int | None = None, key_valid: Tensor | None = None
) -> Tensor:
    """Boolean "may attend" mask: `[Tq, Tk]`, or `[B, Tq, Tk]` with `key_valid`.

    q_cols: `[Tq]` query columns.
    k_cols: `[Tk]` key columns; a negative column marks an empty cache slot.
    window: sliding window W (None: global causal attention).
    key_valid: `[B, Tk]` bool, False for padding keys.
    """
    mask = keep(q_cols[:, None], k_cols[None, :], window)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    return mask


def ring_columns(next_col: int | Tensor, size: int, device: torch.device | str | None = None) -> Tensor:
    """Columns held by a ring buffer of `size` slots once columns 0 .. next_col - 1 were written
    (next_col an int, or a 0-dim tensor: gemma2.static_decode).

    Slot s holds the latest column c < next_col with c % size == s, or a negative column (empty)
    if there is none yet.
    """
    slots = torch.arange(size, device=device)
    last = next_col - 1
    return last - torch.remainder(last - slots, size)  # [size]


def flex_mask_mod(q_cols: Tensor, k_cols: Tensor, window: int | Tensor | None, key_valid: Tensor) -> Callable:
    """`may_attend` as a FlexAttention `mask_mod`: the same columns, the same rule."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep(q_cols[q_idx], k_cols[kv_idx], window) & key_valid[b, kv_idx]

    return mask_mod


def flex_block_mask(q_cols: Tensor, k_cols: Tensor, window: int | None, key_valid: Tensor):
    """The FlexAttention BlockMask of `may_attend` (blocks with no allowed key are skipped), for
    query and key lengths rounded up to powers of two (at least 128).

    Rounding bounds the shapes a compiled kernel sees (one compilation per bucket, 128 .. 8192 is 7);
    the extra keys are masked out and the extra query rows are sliced off by `gemma2.attention.flex`.
    The window is a tensor (a global layer's spans every column), so local and global layers share
    one compiled kernel.

    The same BlockMask as torch's `create_block_mask` (tested), built a few rows of query blocks at
    a time: about 2^22 booleans per pass (`_MASK_ENTRIES`), where `create_block_mask` evaluates the
    rule over the whole `[B, Tq, Tk]` (on CPU, B 8 and T 4096, window 512: 20-24 MB of peak memory
    growth against 1354-1386 MB, and 0.2 against 1.7-2.8 s; at B 8 and T 8192 an estimated ~5.4 GB
    per mask, twice a forward). Passes of several rows keep a GPU's kernel launches few (16 passes
    at B 1 and T 8192; not run on a GPU).
    """
    from torch.nn.attention.flex_attention import BlockMask

    Tq, Tk = _bucket(len(q_cols)), _bucket(len(k_cols))
    q_cols = F.pad(q_cols, (0, Tq - len(q_cols)), value=-1)  # a negative query column sees nothing
    k_cols = F.pad(k_cols, (0, Tk - len(k_cols)), value=-1)
    key_valid = F.pad(key_valid, (0, Tk - key_valid.shape[1]), value=False)
    span = torch.full((), Tq + Tk + 1 if window is None else window, device=q_cols.device)  # no host copy
    B, C, Qb = key_valid.shape[0], FLEX_BLOCK, Tq // FLEX_BLOCK
    some = torch.empty(B, Qb, Tk // C, dtype=torch.bool, device=q_cols.device)  # a block with a key allowed
    every = torch.empty_like(some)  # a block with every key allowed (no mask_mod needed)
    rows = max(1, _MASK_ENTRIES // (B * C * Tk))  # query blocks per pass
    for i in range(0, Qb, rows):
        r = min(rows, Qb - i)
        allowed = keep(q_cols[i * C : (i + r) * C, None], k_cols, span) & key_valid[:, None]  # [B, r * C, Tk]
        allowed = allowed.view(B, r, C, -1, C)
        some[:, i : i + r], every[:, i : i + r] = allowed.any(4).any(2), allowed.all(4).all(2)
    return BlockMask.from_kv_blocks(*_ordered(some & ~every), *_ordered(every), BLOCK_SIZE=(C, C),
                                    mask_mod=flex_mask_mod(q_cols, k_cols, span, key_valid), seq_lengths=(Tq, Tk))  # fmt: skip


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """A `[B, Qb, Kb]` bool block table as a BlockMask holds it: per query block, how many key
    blocks, and which (those first, ascending), int32, with a head dimension of 1."""
    blocks = blocks[:, None].to(torch.int32)
    return blocks.sum(-1, dtype=torch.int32), torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)


def _bucket(n: int) -> int:
    return max(128, 1 << (n - 1).bit_length())
