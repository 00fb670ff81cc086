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
- `banded`: causal and sliding-window attention without a compiler, with autograd on any device.
  Queries go in blocks of C columns; each block scores only the keys it can see (a local block its
  C + W - 1 candidates, so memory is O(T * W) instead of O(T^2); a global block the keys up to its
  last query, half of eager's scores). Its fp32 score passes run in place on one block at a time,
  and under autograd its own backward recomputes each block's scores, keeping only q, k and v per
  layer. Only for a self-attending sequence (keys are the queries' columns).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .compiling import with_more_traces
from .masks import keep

# Queries per block in `banded` (at most W for a local layer). One layer of the benchmark config
# (8 / 4 heads, head_dim 128, bf16, one CPU thread), global / local (W = 512), ms: T = 1024 block
# 128: 38 / 28, 256: 75 / 33, 512: 94 / 93; T = 4096: 128: 667 / 143, 256: 612 / 165; eager 382 / 368
# at 1024 and 6330 / 6560 at 4096.
BLOCK = 128


def softcap(x: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(x / cap)


def softcap_(x: Tensor, cap: float, scale: float = 1.0) -> Tensor:
    """`softcap(x * scale, cap)` in place (fp32 x, no autograd), through the identity
    cap * tanh(y / cap) = 2 * cap * sigmoid(2 * y / cap) - cap: on CPU fp32 `tanh` is ~10x slower
    than `sigmoid` (8.7 ms against 0.8 ms for 2M values, one AVX-512 core). Its error is within
    2 fp32 epsilons of the cap (the tanh formula's in fp32: 0.9), the rounding of a value that size."""
    return x.mul_(2 * scale / cap).sigmoid_().mul_(2 * cap).sub_(cap)


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


def banded(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, window: int | None, scale: float, cap: float) -> Tensor:
    """Self-attention in query blocks, each scoring only the keys it can see: `eager` with the
    causal (window None) or sliding-window mask, in O(T * W) memory for a window.

    q `[B, H, T, hd]`, k and v `[B, KV, T, hd]` at columns 0 .. T - 1; key_valid `[B, T]` bool.
    A block of C queries scores the C + W - 1 keys from its first query's window to its last query
    (a global block: every key up to its last query), so a causal prefill skips about half of
    eager's scores and a local one all but O(T * W). A fully masked query row (a padding query)
    gives the mean of its block's values, not eager's mean over every key: such rows are never
    attended to, and losses skip them.

    Under autograd it keeps only q, k and v, and its own backward recomputes each block's scores
    (`_Banded`).
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Banded.apply(q, k, v, key_valid, window, scale, cap)
    B, H, T, hd = q.shape
    KV = k.shape[1]
    q5 = q.view(B, KV, H // KV, T, hd)
    outs = []
    for first, last, lo in _blocks(T, window):
        probs = _block_probs(q5, k, key_valid, window, first, last, lo, scale, cap)[0]
        outs.append(probs.to(v.dtype).flatten(2, 3) @ v[:, :, lo:last])  # [B, KV, G*C, hd]
    return torch.cat([o.view(B, KV, H // KV, -1, hd) for o in outs], dim=3).view(B, H, T, hd)


def _blocks(T: int, window: int | None) -> Iterator[tuple[int, int, int]]:
    """`banded`'s blocks: (first, last, lo), queries first .. last - 1 scoring keys lo .. last - 1."""
    C = min(BLOCK, T) if window is None else min(BLOCK, window, T)  # queries per block
    for first in range(0, T, C):
        yield first, min(first + C, T), 0 if window is None else max(0, first - window + 1)


def _block_probs(
    q5: Tensor, k: Tensor, key_valid: Tensor, window: int | None, first: int, last: int, lo: int, scale: float,
    cap: float, *, keep_capped: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """One block's probabilities `[B, KV, G, C, S]` in fp32 (q5: q as `[B, KV, G, T, hd]`), and
    with keep_capped its capped scores (before the mask) too; without autograd. The passes run in
    place on the block's fp32 scores: every fresh temporary of that size costs page faults."""
    B, KV, G, _, hd = q5.shape
    cols = torch.arange(lo, last, device=q5.device)
    scores = q5[:, :, :, first:last].reshape(B, KV, -1, hd) @ k[:, :, lo:last].transpose(-1, -2)  # [B, KV, G*C, S]
    scores = scores.view(B, KV, G, last - first, -1)
    masked = ~(keep(cols[first - lo :, None], cols, window) & key_valid[:, None, lo:last])[:, None, None]
    capped = softcap_(scores.float(), cap, scale)  # the fp32 scores: .float() copies bf16 ones
    if not keep_capped:
        return capped.masked_fill_(masked, torch.finfo(torch.float32).min).softmax(dim=-1), None
    return capped.masked_fill(masked, torch.finfo(torch.float32).min).softmax(dim=-1), capped


class _Banded(torch.autograd.Function):
    """`banded` with a backward of its own, FlashAttention's arithmetic: each block's probabilities
    P are recomputed from q and k; with dO the output's gradient, dV += P^T dO, and the gradient of
    the capped scores Z = cap * tanh(s * scale / cap) is dZ = P * (dP - D) with dP = dO V^T and
    D = rowsum(P * dP) (a row's keys all lie in its block, so D is exact where FlashAttention
    takes rowsum(dO * O): in bf16 that rounded output put dQ 20% further from fp64 than autograd's);
    then ds = dZ * scale * (1 - (Z / cap)^2), dQ = ds K and dK += ds^T Q. Nothing of a block
    outlives it, most fp32 passes run in place, and dK and dV are summed over blocks in fp32.
    Against autograd through a recomputed forward (benchmark config, bf16, seq 2048, one layer's
    forward and backward, two threads, 9 alternating repetitions, medians): 0.177 against 0.318 s
    for a global layer, 0.100 against 0.167 s for a local one (1.8x, 1.7x; 1.55-1.7x, 1.46-1.54x in
    three other runs), and backward never holds a layer's recomputed graph (every block's fp32 scores
    at once)."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, window, scale, cap):
        out = banded(q, k, v, key_valid, window, scale, cap)  # grad is off in forward: no recursion
        ctx.save_for_backward(q, k, v, key_valid)
        ctx.window, ctx.scale, ctx.cap = window, scale, cap
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, key_valid = ctx.saved_tensors
        window, scale, cap = ctx.window, ctx.scale, ctx.cap
        B, H, T, hd = q.shape
        KV = k.shape[1]
        G = H // KV
        q5, do5, dq = q.view(B, KV, G, T, hd), d_out.view(B, KV, G, T, hd), torch.empty_like(q)
        # A query that sees no valid key (left padding) outputs its block's mean value whatever the
        # scores: dV takes its dO, the scores' gradient none (dP from dO with those rows zeroed).
        seen = key_valid.cumsum(-1)  # [B, T] valid keys up to each column
        if window is not None:
            seen = seen - F.pad(seen, (window, 0))[:, :T]
        do5_scored = (d_out * (seen > 0)[:, None, :, None]).view(B, KV, G, T, hd)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for first, last, lo in _blocks(T, window):
            probs, capped = _block_probs(q5, k, key_valid, window, first, last, lo, scale, cap, keep_capped=True)
            do = do5[:, :, :, first:last].reshape(B, KV, -1, hd)  # [B, KV, G*C, hd]
            dv[:, :, lo:last] += probs.to(v.dtype).flatten(2, 3).transpose(-1, -2) @ do
            do = do5_scored[:, :, :, first:last].reshape(B, KV, -1, hd)
            dz = (do @ v[:, :, lo:last].transpose(-1, -2)).float().view_as(probs).mul_(probs)  # P * dP
            dz.addcmul_(probs, dz.sum(-1, keepdim=True), value=-1)  # P * (dP - D): a row's keys are all here
            ds = capped.square_().mul_(-scale / cap**2).add_(scale).mul_(dz)  # in place on capped
            ds = ds.to(q.dtype).flatten(2, 3)  # [B, KV, G*C, S]
            dq.view(B, KV, G, T, hd)[:, :, :, first:last] = (ds @ k[:, :, lo:last]).view(B, KV, G, -1, hd)
            dk[:, :, lo:last] += ds.transpose(-1, -2) @ q5[:, :, :, first:last].reshape(B, KV, -1, hd)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


@functools.cache
def _capped(cap: float) -> Callable:
    """One score_mod per cap, so a compiled kernel sees the same function on every call."""

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return score_mod


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return with_more_traces(torch.compile(flex_attention, dynamic=False))


def flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, cap: float, *, compiled: bool) -> Tensor:
    """FlexAttention with the softcap as a score_mod; block_mask from `gemma2.masks.flex_block_mask`,
    whose bucketed lengths q, k and v are padded to (the padding is masked, then sliced off)."""
    if compiled:
        kernel = _compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as kernel
    # Contiguous: the compiled kernel is specialised to its inputs' strides, and a cache slice's
    # depend on the cache's length (one compilation per cache size otherwise).
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    T, S = q.shape[2], k.shape[2]
    Tq, Tk = block_mask.seq_lengths
    if (Tq, Tk) != (T, S):  # a length between buckets
        q, k, v = F.pad(q, (0, 0, 0, Tq - T)), F.pad(k, (0, 0, 0, Tk - S)), F.pad(v, (0, 0, 0, Tk - S))
    out = kernel(q, k, v, score_mod=_capped(cap), block_mask=block_mask, scale=scale, enable_gqa=True)
    return out[:, :, :T]
