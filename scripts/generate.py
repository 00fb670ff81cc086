"""Generate text with a Gemma 2 checkpoint.

    python scripts/generate.py --checkpoint checkpoints/gemma-2-2b-it --chat --prompt "Why is the sky blue?"
    python scripts/generate.py --checkpoint DIR --prompt "Once upon" --prompt "The capital of" --max-new-tokens 40
    python scripts/generate.py --checkpoint DIR --interactive          # a multi-turn chat on stdin
    python scripts/generate.py --checkpoint BIG --draft SMALL --draft-tokens 4 --prompt "Once upon"

Output: stdout holds only generated text. One prompt streams as it is produced; several prompts
run as one left-padded batch and each row is printed when all are done, as "[i] text". A line of
figures (prompt tokens, new tokens, prefill and decode tokens/s) goes to stderr after each
generation, so the text can be piped on its own.

--chat wraps each prompt as a user turn and stops on <end_of_turn> or eos. --interactive reads one
user turn per stdin line and keeps the KV cache between turns (sized for the model's whole
context); "/new" starts a new chat (a turn that does not fit says so, and the chat goes on), and an
empty line, "/exit" or end of input ends it. Defaults: greedy decoding, float32 on
CPU (bfloat16 with --quantize int8) and bfloat16 on CUDA.

--draft DIR: speculative decoding (gemma2.speculative) with a smaller model of the same vocabulary
(e.g. a student distilled from the checkpoint), loaded like the checkpoint: it proposes
--draft-tokens tokens per forward of the checkpoint, which keeps its own greedy tokens (or, when
sampling, its own distribution). One prompt, or --interactive (the draft keeps its own cache of the
chat); the figures line adds the share of proposals accepted and the tokens per forward of the
checkpoint. --prompt-lookup drafts the same way without a draft model: the text so far (in a chat,
the whole conversation) proposes its own continuation (gemma2.prompt_lookup), which pays where the
output repeats the prompt or itself.

--compile decodes through torch.compile (gemma2.static_decode): the whole step traced once, as a CUDA
graph on GPU. On CPU it made the 5.8M-parameter tiny teacher decode 2.2-2.5x faster and a 150M model
1.05-1.17x (README, "Generating"; measured on several days), after seconds of compiling (given apart
on the figures line), and bigger models gain less (their steps are reading weights): worth it for
long outputs.
Its global layers read every slot of the cache each step, so it suits --prompt runs (the cache is
sized to the request) better than --interactive (the cache holds the model's whole context). With
--draft it compiles the draft's one-token steps (the checkpoint checks several tokens a forward).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from gemma2 import Gemma2ForCausalLM, load_model
from gemma2.cli import add_threads_option, device_arg, run_cli, set_threads
from gemma2.dtypes import to_dtype
from gemma2.chat import Chat
from gemma2.generation import left_pad, stream
from gemma2.loading import config_flag, default_dtype, load_with_tokenizer, stored_config
from gemma2.prompt_lookup import PromptLookup
from gemma2.quantize import QUANTIZE_MODES
from gemma2.sampling import check_sampling_args
from gemma2.speculative import DRAFT_TOKENS, SpeculativeStats, check_draft, check_vocab_sizes, speculative_stream
from gemma2.tokenizer import StreamDecoder, Tokenizer


class UsageError(ValueError):
    """A bad command line: reported as one line, exit status 2 (gemma2.cli.run_cli)."""


def utf8(text: str, where: str) -> str:
    """`text` unless it holds bytes that were not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} is not valid UTF-8 text; pass prompts encoded as UTF-8") from None
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model directory (config.json, *.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--tokenizer", help="SentencePiece model (default: CHECKPOINT/tokenizer.model)")
    p.add_argument("--config", help="for an official .ckpt without config.json: a preset (2b, 9b, 27b) or a config.json")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", help="float32 (fp32) or bfloat16 (bf16) (default: float32 on CPU, bfloat16 on CUDA and with --quantize int8)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8: weight-only int8, quantised while loading")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn")
    p.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin (implies --chat)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile (CUDA graphs on GPU; on CPU 2.2-2.5x faster for the 5.8M tiny teacher, "
                        "1.05-1.17x for a 150M model, after seconds of compiling: worth it for long generations; "
                        "with --draft, the draft's steps)")
    p.add_argument("--draft", help="a draft model directory with the checkpoint's vocabulary: speculative decoding")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding without a draft model: the text so far proposes its continuation")
    p.add_argument("--draft-tokens", type=int,
                   help=f"tokens the draft proposes per forward of the checkpoint (default {DRAFT_TOKENS})")  # fmt: skip
    add_threads_option(p)
    return p.parse_args(argv)


def check_draft_args(args: argparse.Namespace) -> None:
    """--draft's or --prompt-lookup's conditions, before any model is loaded."""
    flag = "--draft" if args.draft else "--prompt-lookup"
    if args.draft and args.prompt_lookup:
        raise UsageError("--draft and --prompt-lookup are two ways to draft: pass one of them")
    if not args.interactive and len(args.prompt) != 1:
        raise UsageError(f"{flag} decodes one sequence: pass exactly one --prompt (no batch), or --interactive")
    args.draft_tokens = DRAFT_TOKENS if args.draft_tokens is None else args.draft_tokens
    if args.draft_tokens < 1:
        raise UsageError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.prompt_lookup:
        if args.compile:
            raise UsageError("--compile compiles a draft model's steps, and --prompt-lookup has none (the checkpoint "
                             "checks several tokens a forward): drop one of the two")  # fmt: skip
        return
    draft = Path(args.draft)
    if not draft.exists():
        raise UsageError(f"draft model {draft} not found; pass --draft a directory with config.json and *.safetensors")
    configs = stored_config(Path(args.checkpoint)), stored_config(draft)
    if None not in configs:
        check_vocab_sizes(configs[0].vocab_size, configs[1].vocab_size)


def load(args: argparse.Namespace) -> tuple[Gemma2ForCausalLM, Tokenizer]:
    args.dtype = args.dtype or default_dtype(args.device, args.quantize)
    try:
        dtype = to_dtype(args.dtype)
    except ValueError as e:
        raise UsageError(f"--dtype {e}") from None
    config = config_flag(args.checkpoint, args.config)
    return load_with_tokenizer(args.checkpoint, tokenizer=args.tokenizer, config=config, dtype=dtype,
                               device=args.device, quantize=args.quantize)  # fmt: skip


class Meter:
    """Times one generation: prefill ends when the first new tokens reach the host.

    compiling: the first decode step compiles (--compile, the first time in this process): its time
    is reported on its own and the decode rate counts the steps after it. (With --draft the draft's
    step compiles before the first tokens: `report(..., compiled_draft=True)` says so.)
    """

    def __init__(self, prompt_tokens: int, compiling: bool = False) -> None:
        self.prompt_tokens = prompt_tokens
        self.compiling = compiling
        self.t0 = time.perf_counter()
        self.times: list[float] = []  # when each step's tokens reached the host
        self.counts: list[int] = []

    def step(self, n: int) -> None:
        """Count n new tokens, already copied to the host (so the device has caught up)."""
        self.times.append(time.perf_counter())
        self.counts.append(n)

    def report(self, drafting: SpeculativeStats | None = None, compiled_draft: bool = False) -> None:
        t_end = time.perf_counter()
        times = self.times or [t_end]
        prefill = self.prompt_tokens / max(times[0] - self.t0, 1e-9)
        start = 2 if self.compiling and len(times) > 2 else 1  # the step the decode rate starts after
        decoded = sum(self.counts[start:])
        decode = f"{decoded / max(t_end - times[start - 1], 1e-9):.1f}" if decoded else "n/a"
        extra = f" | first decode step (compiling): {times[1] - times[0]:.1f} s" if start == 2 else ""
        extra += " | the prefill includes compiling the draft's step" if compiled_draft else ""
        if drafting is not None:
            accepted = f"{drafting.acceptance_rate:.1%} of {drafting.proposed}" if drafting.proposed else "none"
            extra += f" | accepted: {accepted} proposed | tokens per target forward: {drafting.tokens_per_forward:.2f}"
        print(f"prompt tokens: {self.prompt_tokens} | new tokens: {sum(self.counts)} | "
              f"prefill: {prefill:.1f} tokens/s | decode: {decode} tokens/s{extra}", file=sys.stderr, flush=True)  # fmt: skip


@contextmanager
def own_line() -> Iterator[None]:
    """Streamed text ends its line when the stream stops on an error or Ctrl-C, whose line on
    stderr is then its own (not glued to the last word on a terminal)."""
    try:
        yield
    except BaseException:
        print(flush=True)
        raise


def run_batch(args, model, tokenizer: Tokenizer, generator: torch.Generator,
              draft: Gemma2ForCausalLM | PromptLookup | None) -> None:  # fmt: skip
    if args.chat:
        rows = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in args.prompt]
        stop = tokenizer.stop_ids
    else:
        rows = [tokenizer.encode(p) for p in args.prompt]
        stop = (tokenizer.eos_id,)
    ids, mask = left_pad(rows, tokenizer.pad_id)
    meter = Meter(sum(len(r) for r in rows), compiling=args.compile and draft is None)
    kwargs = dict(attention_mask=mask.to(args.device), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, stop_token_ids=stop, generator=generator, pad_id=tokenizer.pad_id)  # fmt: skip
    if draft is None:
        steps, drafting = stream(model, ids.to(args.device), compiled=args.compile, **kwargs), None
    else:
        steps, drafting = speculative_stream(model, draft, ids.to(args.device), draft_tokens=args.draft_tokens,
                                             compiled=args.compile, **kwargs)  # fmt: skip
    new: list[list[int]] = [[] for _ in rows]  # each row's tokens up to and including its stop id
    decoder = StreamDecoder(tokenizer)
    with own_line():
        for token in steps:
            live = 0
            for row, t in zip(new, token.tolist()):
                if not row or row[-1] not in stop:  # a row that stopped only gets padding
                    row.append(t)
                    live += 1
            meter.step(live)
            if len(rows) == 1:  # one prompt streams; a batch is printed when done
                print(decoder.push(new[0][-1]), end="", flush=True)
    if len(rows) == 1:
        print(decoder.flush(), flush=True)
    else:
        for i, row in enumerate(new):
            print(f"[{i}] {tokenizer.decode(row)}")
    meter.report(drafting, compiled_draft=args.compile and args.draft is not None)


def run_interactive(args, model, tokenizer: Tokenizer, generator: torch.Generator,
                    draft: Gemma2ForCausalLM | PromptLookup | None) -> None:  # fmt: skip
    def new_chat() -> Chat:
        return Chat(model, tokenizer, compiled=args.compile, draft=draft, draft_tokens=args.draft_tokens)

    chat = new_chat()
    first = list(args.prompt)
    while True:
        if first:
            text = first.pop()
        else:
            print("> ", end="", file=sys.stderr, flush=True)
            try:
                line = utf8(sys.stdin.readline(), "a line on stdin")
            except (UnicodeDecodeError, UsageError):  # the chat goes on: its cache holds the conversation
                print("(that line is not valid UTF-8 text, so it was skipped: type or pipe UTF-8)", file=sys.stderr)
                continue
            text = line.strip()
            if not line or not text or text == "/exit":
                return
            if text == "/new":
                chat = new_chat()
                print("(a new chat)", file=sys.stderr)
                continue
        try:
            turn = len(chat.turn_ids(text))  # the tokens this turn feeds (for the figures)
            steps = chat.reply(text, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, generator=generator)  # fmt: skip
        except ValueError as e:  # the turn does not fit (the arguments were checked up front)
            print(f"{e} (/new starts a new chat, /exit ends)", file=sys.stderr)
            continue
        # The steps compile when a chat first uses them (with --draft, the draft's: before the first tokens).
        compiling = args.compile and (chat.session.drafter if draft else chat.session.decoder) is None
        meter, decoder = Meter(turn, compiling=compiling and draft is None), StreamDecoder(tokenizer)
        with own_line():
            for token in steps:
                meter.step(1)
                print(decoder.push(token), end="", flush=True)
        print(decoder.flush(), flush=True)
        meter.report(None if draft is None else chat.session.stats, compiled_draft=compiling and draft is not None)


def generate_main(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.interactive and len(args.prompt) > 1:
        raise UsageError("--interactive takes at most one --prompt (the first turn)")
    if not args.interactive and not args.prompt:
        raise UsageError("pass --prompt TEXT (repeat it for a batch) or --interactive")
    if args.interactive and (sys.stdin is None or sys.stdin.closed):
        raise UsageError("--interactive reads the turns from stdin, which is closed; pass --prompt instead")
    args.prompt = [utf8(p, "--prompt") for p in args.prompt]
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_sampling_args(args.temperature, args.top_k, args.top_p)  # before minutes of loading
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p shape sampling, but --temperature 0 (the default) decodes greedily: "
                         "pass --temperature > 0 (e.g. 0.7) to sample")  # fmt: skip
    if args.draft or args.prompt_lookup:
        check_draft_args(args)
    elif args.draft_tokens is not None:
        raise UsageError("--draft-tokens needs --draft or --prompt-lookup (what proposes them)")
    device_arg(args.device)
    model, tokenizer = load(args)
    draft = PromptLookup() if args.prompt_lookup else None
    if args.draft:
        draft = load_model(args.draft, dtype=model.dtype, device=args.device, quantize=args.quantize)
        check_draft(model, draft, args.draft_tokens)  # also for checkpoints without a config.json
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.interactive:
        run_interactive(args, model, tokenizer, generator, draft)
    else:
        run_batch(args, model, tokenizer, generator, draft)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_cli(lambda: generate_main(args))


if __name__ == "__main__":
    main()
