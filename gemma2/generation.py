"""Autoregressive generation over the KV cache: the prompt in one prefill call, then one-token steps.

- `Session`: a model and a cache sized up front. Each `stream` call feeds only the tokens that are
  new since the last call, so a multi-turn chat never recomputes earlier turns.
- `stream(model, ids, ...)`: a fresh session for one (left-padded) batch of prompts; yields each
  step's new tokens `[B]`.
- `generate(model, ids, ...)`: `stream` written into a preallocated `[B, T + max_new_tokens]` buffer.
(`gemma2.chat.Chat`: Gemma's chat template over a session, one user turn at a time.)

Stopping: a row that samples a stop id keeps that token and gets pad_id for every later step. When
every row has stopped the loop ends early; `generate` still returns `[B, T + max_new_tokens]`, the
columns after the last step left as pad_id, so the output shape never depends on the content.

The last sampled token is not fed to the model until there is a reason to (the next step, or the
next turn): a session holds it as `pending`, and counts it in `length`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .kv_cache import KVCache
from .model import Gemma2ForCausalLM
from .sampling import check_sampling_args, sample
from .static_decode import StaticDecoder
from .tokenizer import left_pad  # noqa: F401  re-exported: prompts are padded with it for generate

if TYPE_CHECKING:
    from .prompt_lookup import PromptLookup


def check_max_new_tokens(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {n!r}")


def stop_ids(stop_token_ids: Sequence[int] | int | None) -> tuple[int, ...]:
    """The ids that end a row: a sequence of ints, one int, or None (none: run to max_new_tokens)."""
    if stop_token_ids is None:
        return ()
    try:  # ints, numpy or 0-dim tensor integers
        return (operator.index(stop_token_ids),)
    except TypeError:
        pass
    try:
        return tuple(operator.index(i) for i in stop_token_ids)
    except TypeError:
        raise ValueError(
            f"stop_token_ids must be token ids (a list of ints, one int, or None), got {stop_token_ids!r}"
        ) from None


class Sampling(NamedTuple):
    """How a stream picks its tokens (checked by `Session.stream`; see gemma2.sampling)."""

    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None


class Session:
    """A conversation with a model: a KV cache of `max_len` tokens and the last sampled tokens.

    The cache is allocated by the first stream (which fixes the batch size) and holds the whole
    conversation, so `max_len` must cover every turn; a turn that does not fit is refused before any
    work, and `tokens_left` says how much room remains. Run one stream at a time: it may be left
    before its end, and the next call goes on from the last token it yielded.
    """

    def __init__(self, model: Gemma2ForCausalLM, max_len: int | None = None, *, compiled: bool = False) -> None:
        """compiled: run the decode steps through torch.compile (gemma2.static_decode: CUDA graphs on
        GPU; on CPU 2.2-2.5x faster on a 5.8M-parameter model, 1.05-1.17x on a 150M one, after
        seconds of compiling)."""
        context = model.config.max_position_embeddings
        max_len = context if max_len is None else max_len
        if not 1 <= max_len <= context:
            raise ValueError(f"max_len must be in [1, {context}] (the model's context), got {max_len}")
        self.model = model
        self.max_len = max_len
        self.cache: KVCache | None = None  # allocated by the first stream call, for its batch size
        self.pending: Tensor | None = None  # [B, 1] the last sampled tokens, not yet in the cache
        self.compiled = compiled
        self.decoder: StaticDecoder | None = None  # the compiled steps over `cache`

    @property
    def length(self) -> int:
        """Tokens in the conversation so far: those in the cache plus the pending ones."""
        return (0 if self.cache is None else self.cache.length) + (self.pending is not None)

    @property
    def tokens_left(self) -> int:
        return self.max_len - self.length

    def drop_pending(self) -> None:
        """Forget the last sampled tokens, which the cache has not been fed: the conversation now
        ends before them (a chat drops a reply's `<eos>`, which Gemma's template never holds).
        Once after a stream: another call (or one before any) drops nothing."""
        self.pending = None

    def stream(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token_ids: Sequence[int] = (1,),
        generator: torch.Generator | None = None,
        pad_id: int = 0,
    ) -> Iterator[Tensor]:
        """Feed `input_ids` `[B, T]` (the tokens new since the last call), then yield up to
        `max_new_tokens` steps of new tokens `[B]`. Everything is checked before any work.

        attention_mask: `[B, T]` 1/0, left-padded; only a session's first call may pad.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = f"{input_ids.dtype} {tuple(input_ids.shape)}"
            raise ValueError(f"input_ids must be a LongTensor [B, T], got {got}")
        B, T = input_ids.shape
        if B == 0:
            raise ValueError(f"input_ids is an empty batch (shape {tuple(input_ids.shape)}); pass at least one row")
        V = self.model.config.vocab_size
        if T and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < V:
            raise ValueError(f"input_ids holds ids outside [0, {V}) (the model's vocabulary): "
                             f"min {int(input_ids.min())}, max {int(input_ids.max())}; encode with the model's tokenizer")  # fmt: skip
        check_max_new_tokens(max_new_tokens)
        check_sampling_args(temperature, top_k, top_p)
        total = self.length + T + max_new_tokens
        if total > self.max_len:
            context = self.model.config.max_position_embeddings
            limit = "the model's context" if self.max_len == context else "the session's max_len"
            used = f"the prompt ({T} tokens)" if self.length == 0 else f"{self.length} tokens so far + {T} new"
            raise ValueError(
                f"{used} + max_new_tokens ({max_new_tokens}) = {total} tokens exceed {limit} of "
                f"{self.max_len}; shorten the prompt or lower max_new_tokens"
                + ("" if self.length == 0 else ", or start a new Session")
            )
        device = self.model.output_weight.device
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}; move them with .to()")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"the generator is on {generator.device} but the model is on {device}; "
                             f"make it with torch.Generator(device={str(device)!r})")  # fmt: skip
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
        else:
            if ((attention_mask != 0) & (attention_mask != 1)).any():
                raise ValueError("attention_mask must hold only 1 (a token) and 0 (padding)")
            valid = attention_mask.bool()
            if valid.shape != input_ids.shape:
                shapes = f"{tuple(valid.shape)} vs {tuple(input_ids.shape)}"
                raise ValueError(f"attention_mask must have the shape of input_ids, got {shapes}")
        if self.cache is None:
            if T == 0:
                raise ValueError("the prompt is empty; a generation starts from at least one token (e.g. bos)")
            if not valid[:, -1].all() or (valid[:, 1:] < valid[:, :-1]).any():
                raise ValueError(
                    "attention_mask must be left-padded (0s then 1s, every row ending in a real token); "
                    "Tokenizer.encode_batch pads this way"
                )
        else:
            held = self.cache.valid.shape[0]
            if B != held:
                raise ValueError(f"this session holds a batch of {held}, got input_ids for {B}")
            if B > 1:
                # Rows stop at different steps, and padding them in the middle would shift the
                # sliding window (it counts columns), so only one sequence can go on exactly.
                raise ValueError("only a session of one sequence can be continued; run one Session per conversation")
            if not valid.all():
                raise ValueError("only a session's first call may pad: pass attention_mask=None when continuing")
            if not self._continuable():
                raise ValueError("an earlier stream of this session stopped in the middle of a forward (an error or "
                                 "Ctrl-C) that overwrote cache slots the next token attends to: start a new Session "
                                 "(a new Chat)")  # fmt: skip
        sampling = Sampling(temperature, top_k, top_p, generator)
        return self._steps(input_ids, valid, max_new_tokens, sampling, stop_ids(stop_token_ids), pad_id)

    @torch.inference_mode()
    def _steps(
        self,
        ids: Tensor,  # [B, T] the new tokens
        valid: Tensor,  # [B, T] bool, False for left padding
        max_new_tokens: int,
        sampling: Sampling,
        stop_token_ids: tuple[int, ...],
        pad_id: int,
    ) -> Iterator[Tensor]:
        model = self.model
        pick = partial(sample, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                       generator=sampling.generator)  # fmt: skip
        stop = torch.tensor(stop_token_ids, dtype=torch.long, device=ids.device)
        B = ids.shape[0]
        if self.cache is None:
            weight = model.output_weight
            self.cache = KVCache(model.config, B, self.max_len, dtype=model.dtype, device=weight.device)
        cache = self.cache
        ones = torch.ones(B, 1, dtype=torch.bool, device=ids.device)  # decode steps never pad
        if self.pending is not None:  # the previous turn's last token goes in first
            ids, valid = torch.cat([self.pending, ids], dim=1), torch.cat([ones, valid], dim=1)
        was_training = model.training
        model.eval()
        try:
            # Prefill in one call; only the last position goes through the output head, so a long
            # prompt never materialises [B, T, V] logits.
            logits = self._fed(lambda: model.last_logits(ids, valid, cache), ids[:, -1:])  # [B, V]
            done = torch.zeros(B, dtype=torch.bool, device=ids.device)
            for step in range(max_new_tokens):
                # [B]; a row's NaN would otherwise sample pad ids. Softcapped logits (|x| <= cap) sum
                # to a finite value unless one is NaN or inf: one reduction, no [B, V] mask
                # (measured per step, V 32768: 90 -> 46 us at batch 1, 650 -> 270 us at batch 8).
                bad = ~logits.sum(dim=-1).isfinite()
                token = pick(logits.masked_fill_(bad[:, None], 0.0)).masked_fill_(done, pad_id)  # [B]
                done |= torch.isin(token, stop)
                all_done, any_bad = torch.stack([done.all(), bad.any()]).tolist()  # the step's one host sync
                if any_bad:
                    raise ValueError(
                        f"the model's logits are NaN or inf at new token {step + 1}: its weights are not finite "
                        "or its activations overflowed; check the checkpoint (load_model refuses NaN/inf "
                        "weights unless check_finite=False) or use float32"
                    )
                # The consumer may stop iterating here: the cache plus `pending` stay consistent.
                self.pending = token[:, None]
                yield token
                if step == max_new_tokens - 1 or all_done:
                    return
                if self.compiled and self.decoder is None:  # made here, so the prefill's time is its own
                    self.decoder = StaticDecoder(model, cache)
                fed = token[:, None]
                step = partial(self.decoder, fed) if self.compiled else partial(model.last_logits, fed, ones, cache)
                logits = self._fed(step, fed)
        finally:
            model.train(was_training)

    def _fed(self, forward: Callable[[], Tensor], last: Tensor) -> Tensor:
        """`forward()`, which feeds `pending` and the new tokens (the last of them `last` `[B, 1]`)
        to the cache. A forward that fails leaves a session that goes on: one that stopped before
        the cache counted its columns feeds `pending` again (a first one leaves the session new);
        one that stopped after keeps them but the last, which becomes `pending` (always possible:
        every ring holds the window of the column before its last)."""
        cache, before = self.cache, self.cache.length
        pending, self.pending = self.pending, None
        try:
            return forward()
        except BaseException:
            if cache.length > before:
                cache.truncate(cache.length - 1)
                self.pending = last
            elif before == 0:
                self.cache = None  # a first call that failed: as new (a batch, padding and all)
            else:
                cache.abandon()  # `begin` marked and counted the columns it never wrote whole
                self.pending = pending
            raise

    def _continuable(self) -> bool:
        """Whether the cache holds what the next token attends to (not after a forward that failed
        midway through a chunk: its rings may hold columns it never counted)."""
        return self.cache.holds_window(self.cache.length)


def stream(
    model: Gemma2ForCausalLM,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (1,),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    compiled: bool = False,
) -> Iterator[Tensor]:
    """Yield each step's new tokens `[B]` for a left-padded batch of prompts `[B, T]`.

    The cache is sized exactly for the request (T + max_new_tokens, at most the model's context).
    Arguments as in `generate`; they are checked when `stream` is called, before any work.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    check_max_new_tokens(max_new_tokens)
    # Past the context, Session.stream refuses the request with the numbers.
    max_len = min(input_ids.shape[1] + max_new_tokens, model.config.max_position_embeddings)
    return Session(model, max_len=max_len, compiled=compiled).stream(
        input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, generator=generator, pad_id=pad_id,
    )  # fmt: skip


def generate(
    model: Gemma2ForCausalLM,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (1,),
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    draft_model: Gemma2ForCausalLM | PromptLookup | None = None,
    draft_tokens: int | None = None,
    compiled: bool = False,
) -> Tensor:
    """The prompt followed by the new tokens: LongTensor `[B, T + max_new_tokens]`.

    input_ids: `[B, T]` left-padded prompts; attention_mask: `[B, T]` 1/0 (None: no padding).
    temperature 0 is greedy; top_k / top_p filter before sampling (see gemma2.sampling).
    A row that samples one of stop_token_ids keeps it and is pad_id afterwards; when every row
    has stopped, generation ends and the remaining columns are pad_id.
    Raises ValueError, before any work, when T + max_new_tokens exceeds the model's context.
    draft_model: a model with the same vocabulary that proposes draft_tokens tokens (default 4) per
    forward of `model` (speculative decoding, batch 1; gemma2.speculative, whose
    `speculative_generate` also returns the acceptance statistics): the same tokens when greedy,
    the same distribution when sampling. `gemma2.prompt_lookup.PromptLookup()` in its place drafts
    from the sequence itself.
    compiled: decode through torch.compile (see `Session`; with a draft model, the draft's steps).
    """
    if draft_model is not None:
        from .speculative import DRAFT_TOKENS, speculative_generate  # (it builds on this module)

        return speculative_generate(
            model, draft_model, input_ids, draft_tokens=DRAFT_TOKENS if draft_tokens is None else draft_tokens,
            attention_mask=attention_mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, stop_token_ids=stop_token_ids, generator=generator, pad_id=pad_id, compiled=compiled,
        )[0]  # fmt: skip
    if draft_tokens is not None:
        raise ValueError("draft_tokens needs a draft_model to propose them; pass draft_model= or drop draft_tokens")
    steps = stream(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, stop_token_ids=stop_token_ids, generator=generator, pad_id=pad_id, compiled=compiled,
    )  # fmt: skip
    B, T = input_ids.shape
    out = input_ids.new_full((B, T + max_new_tokens), pad_id)
    out[:, :T] = input_ids
    for i, token in enumerate(steps):
        out[:, T + i] = token
    return out
