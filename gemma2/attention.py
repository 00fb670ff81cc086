"""Attention kernels: soft-capped, masked, grouped-query attention computed three ways, tested equal.

All take q `[B, H, T, hd]`, k and v `[B, KV, S, hd]` and return `[B, H, T, hd]` in q's dtype, with
scores scaled, soft-capped (cap * tanh(s / cap)) and masked before a softmax in fp32.

- `eager`: the readable reference. Every score of the `[T, S]` matrix, an explicit boolean mask.
- `flex`: FlexAttention, the softcap as a `score_mod` and the mask as a block mask, so blocks
  outside the causal window are skipped. Compiled (`compiled=True`) it is a fused kernel that never
  holds the score matrix. Compiled once per process and length bucket: lengths are padded to
  powers of two (`gemma2.masks.flex_block_mask`) and the kernel compiled with static shapes
  (`dynamic=True` fails to lower on CPU in torch 2.13), so 128 .. 8192 tokens compile at most 7 times.
  Forward and backward on CUDA; forward only on CPU (torch has no CPU FlexAttention backward).
- `banded`: sliding-window attention without a compiler, with autograd on any device. Queries go in
  blocks of C = W columns; each block scores only its C + W - 1 candidate keys, so memory is
  O(T * W) instead of O(T^2). Only for a self-attending sequence (keys are the queries' columns).

`recompute` wraps a kernel so that backward recomputes its scores instead of keeping them: the
training path on CPU keeps only q, k, v per layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .masks import keep


def softcap(x: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(x / cap)


def eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, cap: float) -> Tensor:
    """The reference: every score computed, capped, masked; softmax in fp32. mask: `[B, T, S]` bool."""
    B, H, T, hd = q.shape
    KV = k.shape[1]
    # Group the query heads that share a KV head instead of repeating K and V.
    qg = q.reshape(B, KV, H // KV * T, hd)  # [B, KV, G*T, hd]
    # K @ Q^T, transposed: the same products, but CPU bmm copies a cache slice (k[:, :, :S] of a
    # longer buffer) when it is the transposed operand: 3.2 ms against 0.7 ms at S = 4096, bf16.
    scores = (k @ qg.transpose(-1, -2)).transpose(-1, -2).float() * scale  # [B, KV, G*T, S]
    scores = softcap(scores, cap).view(B, KV, H // KV, T, -1)
    scores = scores.masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1).to(v.dtype).view(B, KV, -1, k.shape[2])
    return (probs @ v).view(B, H, T, hd)


def banded(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, window: int, scale: float, cap: float) -> Tensor:
    """Sliding-window self-attention in query blocks: `eager` with the window mask, in O(T * W) memory.

    q `[B, H, T, hd]`, k and v `[B, KV, T, hd]` at columns 0 .. T - 1; key_valid `[B, T]` bool.
    A fully masked query row (a padding query) gives the mean of its block's values, not eager's
    mean over every key: such rows are never attended to, and losses skip them.
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    C = min(window, T)  # queries per block
    S = C + window - 1  # keys a block can see: its first query's window up to its last query
    nb = -(-T // C)
    pad_q = nb * C - T
    # Key slot j of block i is column i * C + j - (W - 1); columns outside 0 .. T - 1 are padding.
    kp = F.pad(k, (0, 0, window - 1, pad_q)).unfold(2, S, C).transpose(-1, -2)  # [B, KV, nb, S, hd]
    vp = F.pad(v, (0, 0, window - 1, pad_q)).unfold(2, S, C).transpose(-1, -2)
    valid = F.pad(key_valid, (window - 1, pad_q)).unfold(1, S, C)  # [B, nb, S]
    qb = F.pad(q, (0, 0, 0, pad_q)).view(B, KV, H // KV, nb, C, hd)
    first = torch.arange(nb, device=q.device)[:, None, None] * C
    q_cols = first + torch.arange(C, device=q.device)[:, None]  # [nb, C, 1]
    k_cols = first + torch.arange(S, device=q.device) - (window - 1)  # [nb, 1, S]
    mask = keep(q_cols, k_cols, window) & valid[:, :, None, :]  # [B, nb, C, S]
    scores = (qb @ kp[:, :, None].transpose(-1, -2)).float() * scale  # [B, KV, G, nb, C, S]
    scores = softcap(scores, cap).masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
    out = scores.softmax(dim=-1).to(v.dtype) @ vp[:, :, None]  # [B, KV, G, nb, C, hd]
    return out.reshape(B, H, nb * C, hd)[:, :, :T]


@functools.cache
def _capped(cap: float) -> Callable:
    """One score_mod per cap, so a compiled kernel sees the same function on every call."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return score_mod


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, cap: float, *, compiled: bool) -> Tensor:
    """FlexAttention with the softcap as a score_mod; block_mask from `gemma2.masks.flex_block_mask`,
    whose bucketed lengths q, k and v are padded to (the padding is masked, then sliced off)."""
    if compiled:
        kernel = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as kernel
    T, S = q.shape[2], k.shape[2]
    Tq, Tk = block_mask.seq_lengths
    if (Tq, Tk) != (T, S):  # a length between buckets
        q, k, v = F.pad(q, (0, 0, 0, Tq - T)), F.pad(k, (0, 0, 0, Tk - S)), F.pad(v, (0, 0, 0, Tk - S))
    out = kernel(q, k, v, score_mod=_capped(cap), block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[:, :, :T]


def recompute(kernel: Callable, *args) -> Tensor:
    """`kernel(*args)` whose backward recomputes the scores instead of keeping them."""
    return checkpoint(kernel, *args, use_reentrant=False)
