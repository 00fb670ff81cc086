"""The Gemma 2 decoder.

Features, each as the Gemma 2 report (arXiv 2408.00118) and the official reference implementation
(google/gemma_pytorch) compute them:
- interleaved attention: even layers local (sliding window of W keys), odd layers global;
- grouped-query attention, scores scaled by query_pre_attn_scalar ** -0.5;
- attention logits soft-capped (50 * tanh(s / 50)) before the mask, softmax in fp32;
- RMSNorm in fp32 with (1 + w) weights, around both sublayers (pre and post norms);
- embeddings scaled by sqrt(D) rounded to the activation dtype; half-split RoPE;
- GeGLU MLP with tanh GELU; output head tied to the embedding, final logits soft-capped at 30.

Dtype policy: weights and activations in the model dtype (fp32 or bf16); norms, RoPE angles,
softcaps, softmax and logits in fp32.

`attention` picks the kernels (gemma2.attention), all tested equal to "eager":
- "eager": the readable reference (full score matrix, explicit mask) in every layer;
- "flex": FlexAttention for prompts (compiled unless `compile_attention` is False), eager for decoding;
- "banded": every layer in query blocks that score only the keys they can see (local: O(T * W)
  memory; global: half of eager's scores), autograd on any device, its backward recomputing the
  scores block by block;
- "auto": the fastest measured path for the call (see `Gemma2ForCausalLM.kernel_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention as kernels
from .attention import softcap, softcap_
from .config import Gemma2Config
from .kv_cache import KVCache
from .masks import Columns, flex_block_mask, may_attend, own_columns

ATTENTION_IMPLS = ("eager", "flex", "banded", "auto")
FLEX_MIN_HEAD_DIM = 16  # compiled FlexAttention's CUDA (Triton) kernel refuses smaller heads (torch 2.13)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored zero-centred: the scale is 1 + w

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is x * rsqrt(mean(x^2) + eps), one op instead of five: at 1024 tokens of the
        # benchmark config (D 1024, bf16, one CPU thread) 8.7 ms against 14.2 for the spelled-out
        # formula (tests/test_model.py holds it), bit for bit equal.
        # The scale inside the fused op: bit for bit the product after it, one op fewer per norm.
        return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), eps=self.eps).to(x.dtype)


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin `[B, T, head_dim]` for RoPE in the half-split convention, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """What `apply_rope` takes, once per forward: cos and sin `[B, 1, T, head_dim]` in `dtype`, the
    first half of sin negated (the rotation's sign, folded into the table)."""
    cos, sin = (a.to(dtype)[:, None] for a in rope_angles(positions, head_dim, theta))
    half = head_dim // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + head_dim / 2) of x `[B, heads, T, hd]`: x * cos + rotate_half(x) * sin,
    where rotate_half(x) = [-x2, x1] is x rolled by half a head with the sign in `signed_sin`
    (`rope_tables`; bit for bit the textbook form, four ops instead of eight)."""
    cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)  # no copy when already x's (autocast: not)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Linear(nn.Linear):
    """A bias-free projection whose one-row calls on CPU (a batch-1 decode step) run as `torch.mv`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.weight)


def project(x: Tensor, weight: Tensor) -> Tensor:
    """`x @ weight.T` for x `[..., in]`, weight `[out, in]`: `torch.mv` when x is one row on CPU.

    Bit for bit F.linear's result, and in bf16 1.15-1.5x faster for one row: F.linear's matmul reads
    the benchmark config's weights at 7 GB/s on one thread (14 on two), `mv` at 10 (20). fp32: the same
    speed either way. CUDA: F.linear (not measured there).
    """
    if x.numel() == x.shape[-1] and x.device.type == "cpu":
        return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], -1)
    return F.linear(x, weight)


class Attention(nn.Module):
    def __init__(self, config: Gemma2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        D = config.hidden_size
        self.q_proj = Linear(D, self.n_heads * self.hd)
        self.k_proj = Linear(D, self.n_kv * self.hd)
        self.v_proj = Linear(D, self.n_kv * self.hd)
        self.o_proj = Linear(self.n_heads * self.hd, D)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], attend: Callable, cache: KVCache | None) -> Tensor:
        """attend: the kernel with this forward's mask bound, `(q, k, v) -> out` (Gemma2ForCausalLM.kernels)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # [B, KV, S, hd]
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(D, F_)
        self.up_proj = Linear(D, F_)
        self.down_proj = Linear(F_, D)

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

    def forward(self, x: Tensor, rope, attend: Callable, cache: KVCache | None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, attend, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class TiedEmbedding(nn.Embedding):
    """The token embedding, which is also the output head: `attend` maps hidden states to logits."""

    def attend(self, hidden: Tensor) -> Tensor:
        return project(hidden, self.weight)


class Gemma2Model(nn.Module):
    """Embedding, decoder layers and final norm: named as in the Hugging Face checkpoints."""

    def __init__(self, config: Gemma2Config) -> None:
        super().__init__()
        self.embed_tokens = TiedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma2ForCausalLM(nn.Module):
    def __init__(self, config: Gemma2Config, attention: str = "eager", compile_attention: bool | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma2Model(config)
        self.attention = attention  # one of ATTENTION_IMPLS; may be changed at any time
        # Compile FlexAttention: True, False (unfused, never compiles), None: on CUDA only (on CPU a
        # compilation costs 7-20 s per length bucket, and "auto" picks banded there anyway).
        self.compile_attention = compile_attention

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

    def last_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Soft-capped fp32 logits `[B, V]` of each row's last position (a prefill or decode step):
        the output head runs on that position only, never on `[B, T, V]`."""
        return self.logits(self.hidden_states(input_ids, attention_mask, cache)[:, -1])

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states `[..., D]` -> soft-capped logits `[..., V]` in fp32."""
        logits, cap = self.model.embed_tokens.attend(hidden).float(), self.config.final_logit_softcapping
        if torch.is_grad_enabled() and logits.requires_grad:
            return softcap(logits, cap)
        return softcap_(logits, cap)  # in place: no [T, V] fp32 temporaries

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
        view = own_columns(valid) if cache is None else cache.begin(valid)
        attends = self.kernels(view)
        x = self.model.embed_tokens(input_ids)
        # Angles in fp32, cast once to the activation dtype, not twice per layer.
        rope = rope_tables(view.positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        # sqrt(D) rounded to the activation dtype, then multiplied as a Python number (the same
        # product as a 0-dim tensor's, but no CPU tensor inside a compiled or CUDA-graph step).
        x = x * torch.tensor(math.sqrt(cfg.hidden_size), dtype=x.dtype).item()
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, attends[cfg.is_local(i)], cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)

    def kernel_for(self, T: int, self_attending: bool, device: torch.device) -> str:
        """The kernel this call runs: "eager", "flex" or "banded" (see the module docstring).

        "auto" is what measured fastest (scripts/benchmark.py, README "Figures"): eager for one-token
        decoding (one row of scores; nothing to skip) and chunked prefills (short chat turns);
        compiled FlexAttention for CUDA prompts and training (heads of at least 16: every Gemma 2's);
        otherwise "banded". On CPU banded beats even compiled FlexAttention (benchmark config, bf16,
        one thread, whole forward: 2.14 s against 2.60 s at 1024 tokens, 17.5 s against 26.1 s at
        4096), and FlexAttention has no CPU backward; per layer it is 10x faster than eager at 1024
        (it skips the masked half of the causal scores and works in place).
        """
        impl = self.attention
        triton = device.type == "cuda" and self.compiles(device)  # compiled flex on CUDA: a Triton kernel
        if impl == "auto":
            if T == 1 or not self_attending:
                return "eager"
            if triton and self.config.head_dim >= FLEX_MIN_HEAD_DIM:
                return "flex"
            return "banded"
        if impl == "flex" and T == 1 or impl == "banded" and not self_attending:
            return "eager"  # banded needs keys at the queries' own columns (not a chunked prefill)
        if impl == "flex" and triton and self.config.head_dim < FLEX_MIN_HEAD_DIM:
            raise ValueError(f"compiled FlexAttention on CUDA needs head_dim >= {FLEX_MIN_HEAD_DIM} (its Triton "
                             f"kernel's limit), this model's is {self.config.head_dim}: use attention='auto' "
                             "or 'banded'")  # fmt: skip
        return impl

    def compiles(self, device: torch.device) -> bool:
        """Whether FlexAttention is compiled on this device (`compile_attention`, None: CUDA only)."""
        return device.type == "cuda" if self.compile_attention is None else self.compile_attention

    def kernels(self, view: Columns) -> dict[bool, Callable]:
        """The global (False) and local (True) attention kernels `(q, k, v) -> out`, their masks
        built once per forward and shared by the layers."""
        cfg = self.config
        W, T = cfg.sliding_window, len(view.q_cols)
        impl = self.kernel_for(T, view.self_attending, view.q_cols.device)
        keys = {False: (view.global_cols, view.global_valid, None), True: (view.local_cols, view.local_valid, W)}
        caps = dict(scale=cfg.query_pre_attn_scalar**-0.5, cap=cfg.attn_logit_softcapping)
        if impl == "flex":
            return {
                local: partial(kernels.flex, block_mask=flex_block_mask(view.q_cols, cols, w, valid),
                               compiled=self.compiles(view.q_cols.device), **caps)
                for local, (cols, valid, w) in keys.items()
            }  # fmt: skip
        return {
            local: partial(kernels.banded, key_valid=valid, window=w, **caps)
            if impl == "banded"
            else partial(kernels.eager, mask=may_attend(view.q_cols, cols, window=w, key_valid=valid), **caps)
            for local, (cols, valid, w) in keys.items()
        }
