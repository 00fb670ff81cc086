"""The Gemma 2 decoder.

Features, each as the reference implementation computes it (see shared GEMMA2_FACTS.md):
- interleaved attention: even layers local (sliding window of W keys), odd layers global;
- grouped-query attention, scores scaled by query_pre_attn_scalar ** -0.5;
- attention logits soft-capped (50 * tanh(s / 50)) before the mask, softmax in fp32;
- RMSNorm in fp32 with (1 + w) weights, around both sublayers (pre and post norms);
- embeddings scaled by sqrt(D) rounded to the activation dtype; half-split RoPE;
- GeGLU MLP with tanh GELU; output head tied to the embedding, final logits soft-capped at 30.

Dtype policy: weights and activations in the model dtype (fp32 or bf16); norms, RoPE angles,
softcaps, softmax and logits in fp32.

Two attention implementations give the same result: "eager" (the readable reference: full score
matrix, explicit mask) and "flex" (FlexAttention: the softcap as a score_mod and a block mask that
skips blocks outside the window; compile it for speed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Gemma2Config
from .kv_cache import KVCache
from .masks import flex_mask_mod, may_attend

ATTENTION_IMPLS = ("eager", "flex")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored zero-centred: the scale is 1 + w

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin `[B, T, head_dim]` for RoPE in the half-split convention, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim / 2) of x `[B, heads, T, hd]`."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


def softcap(x: Tensor, cap: float) -> Tensor:
    return cap * torch.tanh(x / cap)


class Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = config.query_pre_attn_scalar**-0.5
        self.cap = config.attn_logit_softcapping
        self.window = config.sliding_window if config.is_local(layer) else None
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, D, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask, impl: str, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, KV, S, hd]
        if impl == "flex" and T > 1:
            out = self._flex(q, k, v, mask)
        else:
            out = self._eager(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """The reference: every score computed, capped, masked; softmax in fp32."""
        B, H, T, hd = q.shape
        # Group the query heads that share a KV head instead of repeating K and V.
        qg = q.reshape(B, self.n_kv, H // self.n_kv * T, hd)  # [B, KV, G*T, hd]
        scores = (qg @ k.transpose(-1, -2)).float() * self.scale  # [B, KV, G*T, S]
        scores = softcap(scores, self.cap).view(B, self.n_kv, H // self.n_kv, T, -1)
        scores = scores.masked_fill(~mask[:, None, None], torch.finfo(torch.float32).min)
        probs = scores.softmax(dim=-1).to(v.dtype).view(B, self.n_kv, -1, k.shape[2])
        return (probs @ v).view(B, H, T, hd)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        cap = self.cap

        def capped(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return cap * torch.tanh(score / cap)

        return flex_attention(q, k, v, score_mod=capped, block_mask=block_mask, scale=self.scale, enable_gqa=True)


class MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(D, eps)  # on the attention output (not pre-MLP)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def forward(self, x: Tensor, rope, mask, impl: str, cache: KVCache | None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, impl, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head: `attend` maps hidden states to logits."""

    def attend(self, hidden: Tensor) -> Tensor:
        return hidden @ self.weight.T


class Gemma2Model(nn.Module):
    """Embedding, decoder layers and final norm: named as in the Hugging Face checkpoints."""

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma2ForCausalLM(nn.Module):
    def __init__(self, config: Gemma2Config, attention: str = "eager") -> None:
        super().__init__()
        self.config = config
        self.model = Gemma2Model(config)
        self.attention = attention  # "eager" or "flex"; may be changed at any time

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, impl: str) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self._attention = impl

    @property
    def output_weight(self) -> Tensor:
        """The tied output matrix `[V, D]` (the embedding)."""
        return self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: the norms', also when the projections are int8 (gemma2.quantize)."""
        return self.model.norm.weight.dtype

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Soft-capped logits `[B, T, V]` in fp32."""
        return self.logits(self.hidden_states(input_ids, attention_mask, cache))

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states `[..., D]` -> soft-capped logits `[..., V]` in fp32."""
        return softcap(self.model.embed_tokens.attend(hidden).float(), self.config.final_logit_softcapping)

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """Final-normed hidden states `[B, T, D]`, before the output head.

        input_ids: `[B, T]`; attention_mask: `[B, T]` 1 for real tokens, 0 for left padding.
        With a cache, input_ids are the next T columns after those already in it.
        """
        cfg = self.config
        B, T = input_ids.shape
        device = input_ids.device
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        if cache is None:
            cols = torch.arange(T, device=device)
            masks = self._masks(cols, cols, valid, cols, valid, T)
            # RoPE positions count from each row's first real token.
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        else:
            q_cols, g_cols, g_valid, l_cols, l_valid = cache.begin(valid)
            masks = self._masks(q_cols, g_cols, g_valid, l_cols, l_valid, T)
            seen = cache.valid[:, : cache.length + T].long().cumsum(-1)[:, cache.length :]
            positions = (seen - 1).clamp(min=0)
        rope = rope_angles(positions, cfg.head_dim, cfg.rope_theta)
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(math.sqrt(cfg.hidden_size), dtype=x.dtype)  # rounded to the activation dtype
        impl = self.attention
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, masks[cfg.is_local(i)], impl, cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def _masks(self, q_cols, g_cols, g_valid, l_cols, l_valid, T: int) -> dict[bool, object]:
        """The global and local masks, built once per forward and shared by the layers."""
        window = self.config.sliding_window
        if self.attention == "flex" and T > 1:
            from torch.nn.attention.flex_attention import create_block_mask

            def block(k_cols: Tensor, key_valid: Tensor, w: int | None):
                mod = flex_mask_mod(q_cols, k_cols, w, key_valid)
                return create_block_mask(mod, key_valid.shape[0], None, T, len(k_cols), device=q_cols.device)

            return {False: block(g_cols, g_valid, None), True: block(l_cols, l_valid, window)}
        return {
            False: may_attend(q_cols, g_cols, key_valid=g_valid),
            True: may_attend(q_cols, l_cols, window=window, key_valid=l_valid),
        }
