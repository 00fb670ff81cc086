"""Attention masks: which keys each query may attend to.

Queries and keys are named by their *column* in the token sequence (0, 1, 2, ... across the prompt
and every generated token, padding included). Columns, not RoPE positions, decide causality and the
window: within one row the real tokens are contiguous, so the two differ by a constant there, and
padding columns are removed by `key_valid` anyway.

A local (sliding-window) query at column q sees keys q - W + 1 .. q: exactly W keys, itself included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def keep(q: Tensor, k: Tensor, window: int | None) -> Tensor:
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


def ring_columns(next_col: int, size: int, device: torch.device | str | None = None) -> Tensor:
    """Columns held by a ring buffer of `size` slots once columns 0 .. next_col - 1 were written.

    Slot s holds the latest column c < next_col with c % size == s, or a negative column (empty)
    if there is none yet.
    """
    slots = torch.arange(size, device=device)
    last = next_col - 1
    return last - torch.remainder(last - slots, size)  # [size]


def flex_mask_mod(q_cols: Tensor, k_cols: Tensor, window: int | None, key_valid: Tensor) -> Callable:
    """`may_attend` as a FlexAttention `mask_mod`: the same columns, the same rule."""

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return keep(q_cols[q_idx], k_cols[kv_idx], window) & key_valid[b, kv_idx]

    return mask_mod
