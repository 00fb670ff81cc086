"""Throughput: model FLOPs per token, the peak FLOP/s of common accelerators, MFU, and a timer
that counts a device's queued work (`timed`).

Model FLOPs count the matmuls a step needs, whatever the implementation does (the convention of
the PaLM paper's appendix B, with attention counted exactly):
- a forward pass costs 2 FLOPs per token per weight of every projection and of the tied output
  head (the embedding lookup costs none), plus attention: 2 * 2 * H * head_dim per (query, key)
  pair attended (the scores and the weighted sum), counting only the keys a query sees: causal,
  and at most the sliding window on local layers;
- backward costs twice the forward, so a student costs 3 forwards per token and a live teacher
  1 (a teacher cache costs nothing); activation checkpointing's recomputed forwards are not
  counted (they are hardware FLOPs, not model FLOPs).

MFU = model FLOPs per second per device / the device's peak dense FLOP/s in the compute dtype
(`peak_flops`: a table of common cards; pass the figure yourself for others).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch

from .config import Gemma2Config

# Peak dense (no sparsity) tensor FLOP/s from the vendors' data sheets: (name pattern, bf16,
# fp32 without TF32). The first pattern that matches torch.cuda.get_device_name() wins.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    (r"H100.*PCIe", 756e12, 51e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100|H200|GH200", 989e12, 67e12),
    (r"B200", 2250e12, 80e12),
    (r"A100", 312e12, 19.5e12),
    (r"L40S", 362e12, 91.6e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"\bA10\b", 125e12, 31.2e12),
    (r"RTX 4090", 165e12, 82.6e12),
    (r"MI300X", 1307e12, 163.4e12),
]


def forward_flops_per_token(config: Gemma2Config, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token, averaged over a sequence of `seq_len` tokens."""
    D, hd = config.hidden_size, config.head_dim
    H, KV, F = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    per_layer = (2 * H + 2 * KV) * hd * D + 3 * F * D  # q, o; k, v; gate, up, down
    weights = config.num_hidden_layers * per_layer + config.vocab_size * D  # + the tied head
    pairs = 0  # (query, key) pairs attended in one sequence, all layers
    for layer in range(config.num_hidden_layers):
        w = config.sliding_window if config.is_local(layer) else seq_len
        # Query p sees min(p + 1, w) keys: 1 + 2 + ... + w, then w for each later query.
        k = min(w, seq_len)
        pairs += k * (k + 1) // 2 + (seq_len - k) * w
    return 2 * weights + 4 * H * hd * pairs / seq_len


def training_flops_per_token(student: Gemma2Config, seq_len: int, teacher: Gemma2Config | None = None) -> float:
    """Model FLOPs per training token: the student's forward and backward, plus the forward of a
    live teacher (None: no teacher, or a cache)."""
    flops = 3 * forward_flops_per_token(student, seq_len)
    return flops + (forward_flops_per_token(teacher, seq_len) if teacher is not None else 0.0)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak dense FLOP/s of `device` in `dtype` from PEAK_FLOPS; None when unknown (CPUs,
    unlisted cards, dtypes other than bf16 and fp32)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, bf16, fp32 in PEAK_FLOPS:
        if re.search(pattern, name):
            return bf16 if dtype == torch.bfloat16 else fp32
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak; None when the peak is unknown."""
    return flops_per_token * tokens_per_s_per_device / peak if peak else None


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds that `fn()` takes on `device`, the CUDA work it queued included (synchronised before
    and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
