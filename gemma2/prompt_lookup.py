"""Speculative decoding without a draft model (prompt lookup decoding, Saxena 2023; transformers'
`prompt_lookup_num_tokens`): the sequence so far drafts its own continuation.

The guess for the next k tokens is what followed the latest earlier occurrence of the sequence's
last n tokens, for the longest n from `max_ngram` down to `min_ngram` that occurs; no guess when
none does (that round is a plain decode step). When fewer than k tokens follow that occurrence
(it lies near the end: the text is looping), they are repeated with their period, as the loop
would go on: "a b c a b" guesses "c a b c" for k = 4. Text that repeats its prompt or itself (a summary
quoting its source, code being edited, a small model's loops) is drafted for free. The target
checks the guesses exactly as it checks a draft model's (gemma2.speculative), so the output is
unchanged: greedy, the target's own tokens; sampling, its distribution, a guess being a draft
distribution with all its mass on one token (kept with probability p(guess); after a rejection
the next token is drawn from p without the guess, renormalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PromptLookup:
    """The draft `gemma2.speculative` takes in place of a model: n-grams of `min_ngram` ..
    `max_ngram` tokens looked up in the sequence so far."""

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.max_ngram, self.min_ngram))
        if not (ints and 1 <= self.min_ngram <= self.max_ngram):
            raise ValueError(f"prompt lookup needs integers 1 <= min_ngram <= max_ngram, got max_ngram="
                             f"{self.max_ngram!r}, min_ngram={self.min_ngram!r}")  # fmt: skip

    def propose(self, seq: Tensor, k: int) -> Tensor:
        """k tokens (none without a match) guessed from `seq` `[L]`: those after the latest earlier
        occurrence of its last n tokens, n as long as possible, repeated with their period when
        fewer than k follow it."""
        L = len(seq)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            earlier = seq.unfold(0, n, 1)[:-1]  # [L - n, n]: every window but the last n tokens themselves
            starts = (earlier == seq[L - n :]).all(1).nonzero()
            if len(starts):
                after = int(starts[-1]) + n  # < L: at least one token follows
                return seq[after + torch.arange(k, device=seq.device) % (L - after)]
        return seq[:0]
