"""Choosing the next token: pure functions of logits `[B, V]` and a seeded `torch.Generator`.

The order is the usual one: temperature, then top-k, then top-p on what top-k left. Filters set the
logits they drop to -inf, so the survivors keep their relative probabilities.

Ties are broken by token id, lowest first, everywhere: greedy picks the first maximum, and top-k /
top-p rank equal logits by id (a stable sort), so a given input always keeps the same set.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for settings that have no meaning, naming the accepted range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if not temperature >= 0:  # also catches NaN
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None to keep every token), got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None to keep every token), got {top_p!r}")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits (0 means greedy), got {temperature!r}")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k highest logits of each row `[B, V]` (equal logits ranked by id); -inf elsewhere."""
    check_sampling_args(0.0, k, None)
    if k >= logits.shape[-1]:
        return logits
    # A stable descending sort keeps equal logits in id order, so exactly k survive, chosen
    # the same way every time (a threshold `logits >= kth value` would keep every tied token).
    order = logits.sort(dim=-1, descending=True, stable=True).indices  # [B, V]
    dropped = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order[..., k:], True)
    return logits.masked_fill(dropped, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of highest-probability tokens whose total probability
    is >= p (always at least the top token); -inf elsewhere. logits `[B, V]`."""
    check_sampling_args(0.0, None, p)
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V]
    probs = sorted_logits.float().softmax(dim=-1)
    # A token is kept when the tokens ranked above it hold less than p: that keeps tokens up to
    # and including the one that reaches p, and always the first (nothing ranks above it).
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    dropped = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(dropped, float("-inf"))


def is_greedy(temperature: float) -> bool:
    """Temperature 0, or one below float32's smallest normal number (~1.2e-38): there every token but
    the top one has probability 0 in float32 anyway, and the temperature itself would round to 0."""
    return temperature < torch.finfo(torch.float32).smallest_normal


def probabilities(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The distribution `sample` draws from, after temperature, top-k and top-p: fp32 `[..., V]`.

    Greedy temperatures give the point mass on the argmax (the lowest id among equal maxima).
    """
    check_sampling_args(temperature, top_k, top_p)
    if is_greedy(temperature):
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits.float()
    # Shifting each row by its maximum changes no probability and keeps any temperature finite: the
    # top logit becomes 0 and an overflow can only reach -inf (probability 0), never inf - inf.
    logits = apply_temperature(logits - logits.amax(dim=-1, keepdim=True), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row: logits `[B, V]` -> LongTensor `[B]`, drawn from `probabilities`.

    Greedy temperatures (`is_greedy`) take the argmax (the lowest id among equal maxima) and consume
    no randomness, so top_k / top_p cannot change their result. The generator must be on the
    logits' device.
    """
    check_sampling_args(temperature, top_k, top_p)
    if is_greedy(temperature):
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
