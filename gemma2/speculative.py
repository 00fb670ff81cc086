"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Each round the draft proposes k tokens one at a time over its own KV cache; the target runs the last
token and the k proposals as one chunked prefill, which gives its distribution p_i at every proposed
position and p_{k+1} after the last. Greedy: a proposal is kept while it is the target's argmax, and
the target's argmax follows the kept ones, so the output is token for token the target's own greedy
output. Sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023): proposal d_i, drawn from the draft's q_i, is kept with probability
min(1, p_i(d_i) / q_i(d_i)), in order; the first rejected one is replaced by a draw from the residual
max(0, p_i - q_i), normalised, and when all k are kept p_{k+1} gives one more token. Each emitted
token then follows the target's distribution exactly, with p and q both taken after the same
temperature / top-k / top-p filters (`gemma2.sampling.probabilities`).

After each round both caches drop the rejected columns (`KVCache.truncate`; built with `rollback`,
so their sliding-window rings keep the window behind every kept column). One sequence at a time: rows
would accept different counts, and a cache holds one position for all its rows.

The draft is a model (`_ModelDraft`) or `gemma2.prompt_lookup.PromptLookup` (`_LookupDraft`): the
sequence's own earlier tokens as guesses, with no draft model and no draft cache.
`SpeculativeSession` runs the rounds over a `gemma2.generation.Session`'s conversation (a chat's
turns: `gemma2.chat.Chat(..., draft=...)`); `speculative_stream` / `speculative_generate` are one
prompt in a session of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .generation import Sampling, Session, check_max_new_tokens
from .kv_cache import KVCache
from .model import Gemma2ForCausalLM
from .prompt_lookup import PromptLookup
from .sampling import is_greedy, probabilities
from .static_decode import StaticDecoder

DRAFT_TOKENS = 4  # proposals per round unless told


@dataclass
class SpeculativeStats:
    """What one speculative generation did; updated as its tokens are produced."""

    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of which it kept
    target_forwards: int = 0  # target forward passes (the first one also runs the prompt)
    new_tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        """Kept proposals / proposals (NaN when none was proposed)."""
        return self.accepted / self.proposed if self.proposed else math.nan

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per target forward: 1 is plain decoding, k + 1 the most a round gives."""
        return self.new_tokens / self.target_forwards if self.target_forwards else math.nan


def check_draft(target: Gemma2ForCausalLM, draft: Gemma2ForCausalLM | PromptLookup, draft_tokens: int) -> None:
    """Raise ValueError unless `draft` can propose `draft_tokens` tokens per round for `target`."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
    if isinstance(draft, PromptLookup):
        return
    check_vocab_sizes(target.config.vocab_size, draft.config.vocab_size)
    there, here = draft.output_weight.device, target.output_weight.device
    if there != here:
        raise ValueError(f"the draft model is on {there} but the target is on {here}; move it with .to()")


def check_vocab_sizes(target: int, draft: int) -> None:
    """Raise ValueError unless a draft's vocabulary is the target's (ids must mean the same pieces)."""
    if target != draft:
        raise ValueError(
            f"the draft model's vocabulary has {draft} tokens but the target's has {target}; "
            "a draft must share the target's tokenizer (e.g. a student distilled from it)"
        )


def speculative_stream(
    target: Gemma2ForCausalLM,
    draft: Gemma2ForCausalLM | PromptLookup,
    input_ids: Tensor,
    *,
    draft_tokens: int = DRAFT_TOKENS,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (1,),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    compiled: bool = False,
) -> tuple[Iterator[Tensor], SpeculativeStats]:
    """The new tokens `[1]` one by one, as `gemma2.generation.stream` yields them, and the statistics
    that fill in as they are produced. Arguments as in `speculative_generate`, checked now."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    check_max_new_tokens(max_new_tokens)
    total, context = input_ids.shape[1] + max_new_tokens, target.config.max_position_embeddings
    # The shorter context refuses: the draft's here, the target's in Session.stream (with the numbers).
    if not isinstance(draft, PromptLookup) and draft.config.max_position_embeddings < min(total, context):
        raise ValueError(
            f"the prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens exceed "
            f"the draft model's context of {draft.config.max_position_embeddings}; shorten the prompt or lower "
            "max_new_tokens"
        )
    session = SpeculativeSession(target, draft, min(total, context), draft_tokens=draft_tokens, compiled=compiled)
    steps = session.stream(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, generator=generator, pad_id=pad_id,
    )  # fmt: skip
    return steps, session.stats


def speculative_generate(
    target: Gemma2ForCausalLM,
    draft: Gemma2ForCausalLM | PromptLookup,
    input_ids: Tensor,
    *,
    draft_tokens: int = DRAFT_TOKENS,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (1,),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    compiled: bool = False,
) -> tuple[Tensor, SpeculativeStats]:
    """`gemma2.generation.generate`'s output for one prompt `[1, T]`, with `draft` proposing
    `draft_tokens` tokens per target forward; and what the drafting achieved.

    Greedy (temperature 0): the tokens of `generate(target, ...)`. Sampling: the same distribution
    (not the same draws: the generator also drives the draft and the accept/reject tests).
    A draft model must share the target's vocabulary; its context must hold T + max_new_tokens.
    `PromptLookup()` drafts from the sequence itself (gemma2.prompt_lookup).
    compiled: a draft model's one-token steps run through torch.compile (gemma2.static_decode); a
    small draft's step is mostly per-op overhead, which compiling removes.
    """
    steps, stats = speculative_stream(
        target, draft, input_ids, draft_tokens=draft_tokens, attention_mask=attention_mask,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_token_ids=stop_token_ids, generator=generator, pad_id=pad_id, compiled=compiled,
    )  # fmt: skip
    T = input_ids.shape[1]
    out = input_ids.new_full((1, T + max_new_tokens), pad_id)
    out[:, :T] = input_ids
    for i, token in enumerate(steps):
        out[:, T + i] = token
    return out, stats


def accept_reject(p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None) -> tuple[int, Tensor]:
    """Speculative sampling's check: how many of the proposals to keep, and the token after them.

    p: `[k + 1, V]` the target's distributions at each proposal and after the last; q: `[k, V]` the
    draft's distributions the proposals `[k]` were drawn from (so q(d) > 0).
    """
    k = drafts.shape[0]
    rows = torch.arange(k, device=drafts.device)
    u = torch.rand(k, generator=generator, device=p.device)
    kept = u * q[rows, drafts] < p[rows, drafts]  # probability min(1, p(d) / q(d))
    n = int(kept.long().cumprod(0).sum())  # the proposals before the first rejection
    if n == k:
        dist = p[k]
    else:
        dist = (p[n] - q[n]).clamp(min=0)
        if not dist.sum() > 0:  # p <= q everywhere only by rounding (else nothing is rejected)
            dist = p[n]
    return n, torch.multinomial(dist, 1, generator=generator)[0]


def _forward(
    model: Gemma2ForCausalLM, cache: KVCache, ids: Tensor, last: int, decoder: StaticDecoder | None = None
) -> Tensor:
    """Feed `ids` `[t]` (the columns after the cache's); soft-capped logits `[last, V]` of the last ones.
    decoder: the cache's compiled steps, which take a single token."""
    if decoder is not None and len(ids) == 1:
        logits = decoder(ids[None])
    else:
        logits = model.logits(model.hidden_states(ids[None], None, cache)[0, -last:])
    if not logits.isfinite().all():
        raise ValueError(
            "a model's logits are NaN or inf: its weights are not finite or its activations overflowed; "
            "check the checkpoints or use float32"
        )
    return logits


class _Draft(Protocol):
    """What `SpeculativeSession` asks of a draft."""

    def propose(self, seq: Tensor, n: int, r: int, greedy: bool, pick: Callable[[Tensor], Tensor],
                generator: torch.Generator | None) -> tuple[int, Tensor | None]:  # fmt: skip
        """Write up to r proposals into seq[n:], after the sequence so far seq[:n]; return how
        many, and (sampling) the distributions `[r', V]` they were drawn from."""
        ...

    def truncate(self, n: int) -> None:
        """The sequence is now seq[:n] (the kept proposals and the target's token): forget the rejected ones."""
        ...


class _ModelDraft:
    """A draft model proposing one token at a time over its own KV cache (compiled steps if asked)."""

    def __init__(self, model: Gemma2ForCausalLM, length: int, k: int, device: torch.device, compiled: bool) -> None:
        self.model = model
        self.cache = KVCache(model.config, 1, length, dtype=model.dtype, device=device, rollback=k)
        self.decoder = StaticDecoder(model, self.cache) if compiled else None

    def propose(self, seq: Tensor, n: int, r: int, greedy: bool, pick: Callable[[Tensor], Tensor],
                generator: torch.Generator | None) -> tuple[int, Tensor | None]:  # fmt: skip
        q = None if greedy else torch.empty(r, self.model.config.vocab_size, device=seq.device)
        for i in range(r):  # the draft first catches up with the sequence (the prompt, or 1-2 tokens)
            logits = _forward(self.model, self.cache, seq[self.cache.length : n + i], 1, self.decoder)[0]
            if greedy:
                seq[n + i] = logits.argmax()
            else:
                q[i] = pick(logits)
                seq[n + i] = torch.multinomial(q[i], 1, generator=generator)[0]
        return r, q

    def truncate(self, n: int) -> None:
        self.cache.rewind(n - 1)  # at most seq[: n - 1]: the last token comes next


class _LookupDraft:
    """gemma2.prompt_lookup's guesses, as proposals whose draft distribution is one-hot."""

    def __init__(self, lookup: PromptLookup, vocab_size: int) -> None:
        self.lookup, self.vocab_size = lookup, vocab_size

    def propose(self, seq: Tensor, n: int, r: int, greedy: bool, pick: Callable[[Tensor], Tensor],
                generator: torch.Generator | None) -> tuple[int, Tensor | None]:  # fmt: skip
        guess = self.lookup.propose(seq[:n], r) if r else seq[:0]  # the last round proposes nothing
        seq[n : n + len(guess)] = guess
        return len(guess), None if greedy else F.one_hot(guess, self.vocab_size).float()

    def truncate(self, n: int) -> None:
        pass  # no state: the next guess is looked up in the sequence as it is then


class SpeculativeSession(Session):
    """A `Session` of one sequence whose new tokens come from speculative rounds: `draft` (a model
    of the same vocabulary, or `PromptLookup()`) proposes up to `draft_tokens` tokens, the model
    checks them in one forward. `stats` is what the latest stream's drafting achieved.

    Besides the caches it keeps the conversation's tokens: a lookup searches all of them, earlier
    turns included, and a draft model's cache catches up with a new turn in its first proposal.
    max_len defaults to the shorter of the two models' contexts. compiled: the draft model's
    one-token steps run through torch.compile (the target checks several tokens a forward).
    """

    def __init__(
        self,
        model: Gemma2ForCausalLM,
        draft: Gemma2ForCausalLM | PromptLookup,
        max_len: int | None = None,
        *,
        draft_tokens: int = DRAFT_TOKENS,
        compiled: bool = False,
    ) -> None:
        check_draft(model, draft, draft_tokens)
        lookup = isinstance(draft, PromptLookup)
        if compiled and lookup:
            raise ValueError("compiled=True compiles a draft model's one-token steps, and prompt lookup has none "
                             "(the target checks several tokens a forward): drop one of the two")  # fmt: skip
        if max_len is None and not lookup:
            max_len = min(model.config.max_position_embeddings, draft.config.max_position_embeddings)
        super().__init__(model, max_len)
        if not lookup and self.max_len > draft.config.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the draft model's context of "
                             f"{draft.config.max_position_embeddings}; lower max_len")  # fmt: skip
        self.draft, self.draft_tokens, self.draft_compiled = draft, draft_tokens, compiled
        self.drafter: _Draft | None = None  # made with the cache, by the first stream
        self.seq: Tensor | None = None  # [max_len] the conversation: seq[: self.done]
        self.done = 0  # the conversation's tokens so far: those fed, and those the caller got
        self.stats = SpeculativeStats()

    @property
    def length(self) -> int:
        return self.done

    def _hand_over(self, done: int) -> None:
        """The conversation is now seq[:done]; its last token is `pending` (what `Chat.turn_ids` reads)."""
        self.done = done
        self.pending = self.seq[done - 1 : done][None]

    def drop_pending(self) -> None:
        # The caches may then hold the new last token: the next stream rewinds them to
        # seq[: done - 1], as after any round. `pending` None marks the drop, as in Session: a
        # second call (or one on a new session) drops nothing.
        if self.pending is not None:
            self.done -= 1
            self.pending = None

    def stream(self, input_ids: Tensor, **kwargs) -> Iterator[Tensor]:
        """As `Session.stream`, for one sequence `[1, T]`; `stats` starts again for this stream."""
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(
                f"speculative decoding runs one sequence (batch 1), got a batch of {input_ids.shape[0]}; "
                "generate each prompt on its own"
            )
        steps = super().stream(input_ids, **kwargs)  # checked first: a refused call keeps the last stats
        self.stats = SpeculativeStats()  # read when `steps` starts
        return steps

    def _continuable(self) -> bool:
        return True  # it keeps the conversation's tokens: a cache that lost them is fed them again

    @torch.inference_mode()
    def _steps(
        self,
        ids: Tensor,  # [1, T] the new tokens
        valid: Tensor,  # [1, T] bool, False for left padding
        max_new_tokens: int,
        sampling: Sampling,
        stop_token_ids: tuple[int, ...],
        pad_id: int,
    ) -> Iterator[Tensor]:
        target, k, stats, device = self.model, self.draft_tokens, self.stats, ids.device
        if self.cache is None:
            # rollback k + 1: a round that fails after the target's forward (r + 1 columns) is undone too.
            self.cache = KVCache(target.config, 1, self.max_len, dtype=target.dtype, device=device, rollback=k + 1)
            self.seq = torch.zeros(self.max_len, dtype=torch.long, device=device)
            self.drafter = (
                _LookupDraft(self.draft, target.config.vocab_size) if isinstance(self.draft, PromptLookup)
                else _ModelDraft(self.draft, self.max_len, k, device, self.draft_compiled)
            )  # fmt: skip
        cache, drafter, seq = self.cache, self.drafter, self.seq
        if self.done:
            # The caches may hold columns the caller never got (a stream left mid-round, or ended by
            # an error after the target's forward): drop them, so that they hold at most seq[: done - 1].
            # After an error midway through a forward whose rings lost their window, they start again.
            cache.rewind(self.done - 1)
            drafter.truncate(self.done)
        new = ids[valid]  # the real tokens: only a first call pads, and one row has no use for it
        n = self.done + len(new)  # the caches hold at most seq[: n - 1]: the last token is fed with the proposals
        seq[self.done : n] = new
        self._hand_over(n)
        end = n + max_new_tokens
        greedy, generator = is_greedy(sampling.temperature), sampling.generator
        pick = partial(probabilities, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        stop = set(stop_token_ids)
        modes = [(m, m.training) for m in (target, self.draft) if isinstance(m, Gemma2ForCausalLM)]
        try:
            for m, _ in modes:
                m.eval()
            while n < end:
                # Proposals this round (the last token is the target's); a lookup may find none.
                r, q = drafter.propose(seq, n, min(k, end - n - 1), greedy, pick, generator)
                logits = _forward(target, cache, seq[cache.length : n + r], r + 1)  # [r + 1, V]
                if greedy:
                    best = logits.argmax(-1)
                    kept = int((best[:r] == seq[n : n + r]).long().cumprod(0).sum())
                    after = best[kept]
                else:
                    kept, after = accept_reject(pick(logits), q, seq[n : n + r], generator)
                seq[n + kept] = after
                stats.target_forwards += 1
                stats.proposed += r
                stats.accepted += kept
                for i in range(n, n + kept + 1):
                    self._hand_over(i + 1)  # before the yield: the caller may stop here for good
                    stats.new_tokens += 1
                    yield seq[i : i + 1]
                    if int(seq[i]) in stop:
                        return
                n += kept + 1
                # Drop the rejected proposals: the target's cache keeps seq[: n - 1], the draft's at most that.
                cache.truncate(n - 1)
                drafter.truncate(n)
        finally:
            for m, mode in modes:
                m.train(mode)
