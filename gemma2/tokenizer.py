"""Gemma's tokenizer: a thin, typed layer over a SentencePiece model file.

Gemma layout: pad 0, eos 1, bos 2, unk 3, and the chat turn markers `<start_of_turn>` and
`<end_of_turn>` (106 and 107 in the released 256k vocabulary). Every id is read from the model
file, never hard-coded, so tokenizers trained with `train_tokenizer` work the same way.

Three rules worth knowing:

- Text is always plain text. A user who types "<start_of_turn>" gets the characters, never the
  special id: the released Gemma model file would otherwise match that string (its turn markers are
  user-defined pieces), letting chat content forge turns. Special ids enter a sequence only through
  `encode(bos=..., eos=...)` and `encode_chat`.
- Exactly one bos per sequence. `encode_chat` inserts bos and the turn markers as ids and encodes
  only the text between them, so a chat can never pick up a second bos.
- `decode` drops special ids (pad, bos, eos, mask, turn markers), so a generated sequence decodes to
  its text.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm
import torch

from .files import atomic_file

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
MASK = "<mask>"
ROLES = ("user", "model", "assistant", "system")  # "assistant" is an alias of "model"


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), both LongTensor `[B, T]`, left-padded."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad needs a non-empty list of non-empty token id lists")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, T - len(r) :] = 1
    return ids, mask


def chat_pairs(turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """A chat's validated (role, content) pairs, as Gemma's template writes them: roles "user" and
    "model" ("assistant" an alias) alternating from "user", contents trimmed, a leading system
    message folded into the first user turn (Gemma 2's own template refuses a system role; this
    is the usual convention, Gemma 3's)."""
    if len(turns) == 0:
        raise ValueError(
            "a chat needs at least one turn, e.g. [{'role': 'user', 'content': 'Hi'}]"
        )
    pairs = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise ValueError(f"turn {i} must be an object with role and content, got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise ValueError(f"turn {i} has role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"turn {i} content must be a str, got {type(content).__name__}")
        # Trimmed like the published Gemma chat template, so prompts match it token for token.
        pairs.append(("model" if role == "assistant" else role, content.strip()))
    # Gemma has no system role. The usual convention, followed here: the system message
    # becomes the start of the first user turn, separated by a blank line.
    if pairs[0][0] == "system":
        if len(pairs) < 2 or pairs[1][0] != "user":
            raise ValueError("a system message must be followed by a user turn")
        pairs[:2] = [("user", f"{pairs[0][1]}\n\n{pairs[1][1]}")]
    for i, (role, _) in enumerate(pairs):
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            where = "only as the first turn" if role == "system" else "in alternation"
            raise ValueError(
                f"chat turn {i} is {role!r} where {expected!r} was expected: Gemma chats are "
                f"user and model turns in alternation starting with user (system {where})"
            )
    return pairs


class Tokenizer:
    """A SentencePiece model with Gemma's special tokens, chat format and batching."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():  # a checkpoint directory in the Hugging Face layout
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path}. Pass a SentencePiece .model file (e.g. "
                "checkpoints/<name>/tokenizer.model) or train one with scripts/train_tokenizer.py"
            )
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{path} is not a readable SentencePiece model ({e}); pass the tokenizer.model "
                "that came with the checkpoint, or retrain it with scripts/train_tokenizer.py"
            ) from e
        for name, i in [("pad", self.sp.pad_id()), ("eos", self.sp.eos_id()), ("bos", self.sp.bos_id())]:
            if i < 0:
                raise ValueError(
                    f"{path} defines no {name} token; Gemma tokenizers need pad, eos and bos "
                    "(train one with scripts/train_tokenizer.py)"
                )
        self.start_of_turn_id = self._optional_piece(START_OF_TURN)
        self.end_of_turn_id = self._optional_piece(END_OF_TURN)
        mask_id = self._optional_piece(MASK)
        specials = [self.pad_id, self.eos_id, self.bos_id, mask_id]
        specials += [self.start_of_turn_id, self.end_of_turn_id]
        self.special_ids = frozenset(i for i in specials if i is not None)
        # Special pieces that SentencePiece would produce from their text (user-defined pieces,
        # as in the released Gemma file). `encode` breaks such text apart so it stays text.
        pieces = [self.sp.id_to_piece(i) for i in sorted(self.special_ids)]
        forgeable = [p for p in pieces if self.sp.piece_to_id(p) in self.sp.encode(p)]
        self._forgeable = re.compile("|".join(map(re.escape, forgeable))) if forgeable else None

    def _optional_piece(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)  # unknown pieces map to unk, hence the round trip check
        return i if self.sp.id_to_piece(i) == piece else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def fingerprint(self) -> str:
        """A short sha256 of the model: token ids mean the same text only under the same one."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()[:16]

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos, and `<end_of_turn>` when the vocabulary has it."""
        return (self.eos_id,) if self.end_of_turn_id is None else (self.eos_id, self.end_of_turn_id)

    # -- plain text -------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text` as plain text, with a leading bos / trailing eos if asked."""
        if not isinstance(text, str):
            raise TypeError(
                f"encode takes a str, got {type(text).__name__}; for many texts use encode_batch"
            )
        ids = [self.bos_id] if bos else []
        if self._forgeable is None:
            ids += self.sp.encode(text)
        else:
            start = 0
            for m in self._forgeable.finditer(text):
                # Encoding "<" and "start_of_turn>" apart spells the marker with ordinary pieces.
                ids += self.sp.encode(text[start : m.start()])
                ids += self.sp.encode(m.group()[:1]) + self.sp.encode(m.group()[1:])
                start = m.end()
            ids += self.sp.encode(text[start:])
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one sequence of ids (a list or a 1-D tensor), special ids left out."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}; "
                    "decode a batch row by row: [tok.decode(row) for row in ids]"
                )
            ids = ids.tolist()
        ids = [int(i) for i in ids if i not in self.special_ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}); was the model's "
                "vocabulary padded past the tokenizer's? Mask those logits before sampling"
            )
        return self.sp.decode(ids)

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode several texts into a LEFT-padded batch, so that every row ends at the last
        column and generation appends to all rows at once.

        Returns input_ids and attention_mask, both LongTensor [B, T]; the mask is 1 on real tokens
        and 0 on padding."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError(
                "encode_batch takes a non-empty list of strings; for one text use encode"
            )
        return left_pad([self.encode(t, bos=bos) for t in texts], self.pad_id)

    # -- chat -------------------------------------------------------------------------------------

    def _chat_turns(self, turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
        """`chat_pairs(turns)`, once this tokenizer is known to have the turn markers."""
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError(
                f"{self.path} has no {START_OF_TURN} / {END_OF_TURN} pieces, so it cannot format "
                "chats; use an instruction-tuned Gemma tokenizer or train one with "
                "scripts/train_tokenizer.py"
            )
        return chat_pairs(turns)

    def format_chat(self, turns: Sequence[Mapping[str, str]]) -> str:
        """The chat as Gemma-formatted text, for display and logging:
        `<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n`. Each turn is
        closed with `<end_of_turn>\\n`; an open model turn follows when the last turn is the
        user's. Do not encode this string; use `encode_chat`."""
        pairs = self._chat_turns(turns)
        text = self.sp.id_to_piece(self.bos_id)
        for role, content in pairs:
            text += f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n"
        if pairs[-1][0] == "user":
            text += f"{START_OF_TURN}model\n"
        return text

    def encode_chat(self, turns: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of `format_chat(turns)`: one bos, the turn markers as ids, and everything
        between them encoded as plain text (so typed markers in content stay text)."""
        pairs = self._chat_turns(turns)
        sot, eot = self.start_of_turn_id, self.end_of_turn_id
        ids = [self.bos_id]
        for role, content in pairs:
            # The text between two markers is encoded in one piece, as SentencePiece does when it
            # meets the whole formatted string: "user\n" and the content can share a token.
            ids += [sot, *self.encode(f"{role}\n{content}", bos=False), eot]
            ids += self.encode("\n", bos=False)
        if pairs[-1][0] == "user":
            ids += [sot, *self.encode("model\n", bos=False)]
        return ids


class StreamDecoder:
    """Turns ids arriving one at a time into printable text.

    SentencePiece decodes sequences, not single ids (a character may span several byte tokens), so
    `push` decodes the ids not yet returned together with the previously returned chunk as
    context, returns the text past that context, and holds back while the text ends in U+FFFD, the
    mark of a still incomplete UTF-8 character. The pieces returned by `push` and then `flush`
    concatenate to `tokenizer.decode(all_ids)`, and each push costs O(1), not O(length)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._context = 0  # ids[_context:_done] is the last chunk returned, kept as context
        self._done = 0  # ids[:_done] have been returned as text

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes (possibly "")."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truly invalid byte at the end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        # Both decodes start at a chunk boundary that decoded cleanly, so `text` extends `prefix`.
        prefix = decode(self.ids[self._context : self._done])
        text = decode(self.ids[self._context :])
        if text.endswith("\ufffd") and not final:
            return ""
        new = text[len(prefix) :]
        self._context, self._done = self._done, len(self.ids)
        self.text += new
        return new


# -- training -------------------------------------------------------------------------------------

MAX_SENTENCE_BYTES = 1 << 16  # longer documents are cut at line ends before training


def _chunks(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterable[str]:
    """`text` cut at line ends into pieces of at most `max_bytes` UTF-8 bytes (SentencePiece
    silently skips longer "sentences")."""
    if len(text.encode()) <= max_bytes:
        yield text
        return
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode())
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:  # one enormous line: cut it by characters (4 bytes at most each)
            yield line[: max_bytes // 4]
            line = line[max_bytes // 4 :]
            n = len(line.encode())
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


FIXED_PIECES = 263  # pad, eos, bos, unk, the three control symbols and 256 byte pieces (train_tokenizer)


def check_vocab_size(vocab_size: int, name: str = "vocab_size") -> None:
    """Refuse a vocabulary SentencePiece would refuse only after reading the text: at most the fixed
    pieces (found by experiment: 264 trains on one character, 263 never)."""
    if vocab_size <= FIXED_PIECES:
        raise ValueError(f"{name} {vocab_size} is too small: a tokenizer holds {FIXED_PIECES} fixed pieces (7 special "
                         f"and 256 bytes) plus one per character of the text, so at least {FIXED_PIECES + 1}")  # fmt: skip


def train_tokenizer(
    texts: Iterable[str],
    output_path: str | Path,
    vocab_size: int = 4096,
    *,
    character_coverage: float = 0.9999,
    overwrite: bool = False,
) -> Path:
    """Train a BPE SentencePiece model with Gemma's layout and options, write it to `output_path`
    and return that path.

    Layout: pad 0, eos 1, bos 2, unk 3, then control symbols `<mask>`, `<start_of_turn>`,
    `<end_of_turn>` (control, so ordinary text can never produce them), then 256 byte pieces.
    Options as in Gemma: byte fallback (no unknown characters), digits split one by one, and the
    text kept exactly as written (identity normalization, whitespace and newlines preserved, no
    dummy space prefix), so decode(encode(text)) == text. Characters rarer than
    `1 - character_coverage` of the text get no piece and are spelled in bytes. Every sentence is
    used, in order, on one thread, so the file depends only on the texts (a few seconds for a few
    MB). An existing `output_path` is refused unless `overwrite` (then replaced atomically)."""
    output_path = Path(output_path)
    if output_path.exists() and not overwrite:
        raise ValueError(f"{output_path} already exists; pass --overwrite (overwrite=True) to replace it, or another path")
    check_vocab_size(vocab_size)
    texts = [c for t in texts for c in _chunks(t) if c]
    if not texts:
        raise ValueError("train_tokenizer got no text; pass a non-empty list of documents")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=[MASK, START_OF_TURN, END_OF_TURN],
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=0,  # use every sentence: no random sampling
            shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=1,  # BPE breaks frequency ties differently with more threads
            minloglevel=2,  # warnings and errors only
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece training failed: {e}. vocab_size must be more than {FIXED_PIECES} (7 special and 256 "
            "byte pieces) plus the text's distinct characters (raise it when below that), and no more than the "
            "text can fill (lower it, or add text)"
        ) from e
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_path) as tmp:  # a reader never sees half a model
        tmp.write_bytes(model.getvalue())
    return output_path
