"""A multi-turn chat in Gemma's template over a `gemma2.generation.Session`, one user turn at a time,
decoded plainly or speculatively (a `gemma2.speculative.SpeculativeSession`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .generation import Session
from .model import Gemma2ForCausalLM
from .prompt_lookup import PromptLookup
from .speculative import DRAFT_TOKENS, SpeculativeSession
from .tokenizer import Tokenizer


class Chat:
    """Gemma's chat template over a Session: each `reply` feeds one user turn, streams the model's turn.

    The first turn is `<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`; each
    later one closes the model's turn (with the `<end_of_turn>` it sampled, or one added after a
    reply cut by max_new_tokens, or in place of an `<eos>` it stopped on: the template holds no
    `<eos>` inside a conversation) and opens the next user turn, so the cache always holds exactly
    the conversation in Gemma's template.
    """

    def __init__(
        self,
        model: Gemma2ForCausalLM,
        tokenizer: Tokenizer,
        max_len: int | None = None,
        *,
        compiled: bool = False,
        draft: Gemma2ForCausalLM | PromptLookup | None = None,
        draft_tokens: int | None = None,
    ) -> None:
        """max_len: the conversation's tokens (default: the model's context, and the draft's).
        compiled: decode through torch.compile (with a draft model: the draft's steps).
        draft: speculative decoding (gemma2.speculative): a smaller model of the same vocabulary, or
        `PromptLookup()` (the conversation drafts itself), proposing draft_tokens (default 4) tokens
        per forward of the model; `session.stats` then holds what the latest reply's drafting achieved."""
        if tokenizer.end_of_turn_id is None:
            raise ValueError(
                f"{tokenizer.path} has no <end_of_turn> piece; a chat needs an instruction-tuned Gemma tokenizer"
            )
        if draft is None and draft_tokens is not None:
            raise ValueError("draft_tokens needs a draft to propose them; pass draft= or drop draft_tokens")
        k = DRAFT_TOKENS if draft_tokens is None else draft_tokens
        self.session: Session = (
            Session(model, max_len=max_len, compiled=compiled) if draft is None
            else SpeculativeSession(model, draft, max_len, draft_tokens=k, compiled=compiled)
        )  # fmt: skip
        self.tokenizer = tokenizer

    @property
    def tokens_left(self) -> int:
        return self.session.tokens_left

    def turn_ids(self, text: str) -> list[int]:
        """The tokens that take the conversation from where it is to the model's next turn."""
        tok = self.tokenizer
        opening = tok.encode_chat([{"role": "user", "content": text}])  # bos, user turn, model turn open
        if self.session.length == 0:
            return opening
        last = int(self.session.pending[0, 0]) if self.session.pending is not None else None
        close = [] if last == tok.end_of_turn_id else [tok.end_of_turn_id]  # a reply cut short (or by <eos>)
        return close + tok.encode("\n", bos=False) + opening[1:]  # opening[1:]: one bos per conversation

    def reply(
        self,
        text: str,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Stream the model's reply to `text` as token ids, ending with its stop token (if it fits).

        The reply is cut short when the context fills; a turn that leaves no room for even one new
        token is a ValueError (start a new Chat, with a larger max_len if the model allows).
        """
        pending = self.session.pending
        if pending is not None and int(pending[0, 0]) == self.tokenizer.eos_id:
            self.session.drop_pending()  # the reply stopped on <eos>: turn_ids closes it with <end_of_turn>
        ids = self.turn_ids(text)
        room = self.tokens_left - len(ids)
        # No chat holds it (a new one also opens with a bos): a new chat would not help.
        if room < 1 and (self.session.length == 0 or len(ids) + 1 >= self.session.max_len):
            raise ValueError(f"this turn needs {len(ids)} tokens and a reply at least one more, but the chat "
                             f"holds {self.session.max_len}: shorten it")  # fmt: skip
        if room < 1:
            raise ValueError(
                f"the chat is full: {self.session.length} of {self.session.max_len} tokens used and this turn "
                f"needs {len(ids)} more; start a new chat"
            )
        device = self.session.model.output_weight.device
        steps = self.session.stream(
            torch.tensor([ids], device=device), max_new_tokens=min(max_new_tokens, room), temperature=temperature,
            top_k=top_k, top_p=top_p, stop_token_ids=self.tokenizer.stop_ids, generator=generator,
            pad_id=self.tokenizer.pad_id,
        )  # fmt: skip
        return (int(token) for token in steps)
