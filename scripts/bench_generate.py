"""Decode speed of our cached greedy generation against transformers' `generate`, and KV cache size.

    python scripts/bench_generate.py                       # 4 layers, D = 512, prompt 256, 128 new
    python scripts/bench_generate.py --threads 1 --runs 5

Both models hold the same random weights (transformers: eager attention, its default cache). The
runs alternate between the two (a shared machine's load then hits both alike), after one warm-up
run each; figures are medians over --runs runs. Decode tokens/s counts only the one-token steps:
B * (new - 1) / (time from the first new token to the last).
Needs transformers (a test-only dependency).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma2 import Gemma2Config, Gemma2ForCausalLM, KVCache
from gemma2.generation import generate, stream


def bench_config(window: int) -> Gemma2Config:
    # A small model where per-step overheads show, with a window the decode runs past.
    return Gemma2Config(vocab_size=32000, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64,
                        sliding_window=window, max_position_embeddings=1024)  # fmt: skip


def twins(cfg: Gemma2Config):
    import transformers

    hf_cfg = transformers.Gemma2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    ours = Gemma2ForCausalLM(cfg).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, strict=True)
    return hf, ours


class Stamps:
    """A transformers streamer that only notes the time of each `put`: first the prompt, then
    one call per generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_ours(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    """(prefill + first token, the remaining new - 1 steps) in seconds."""
    t0 = time.perf_counter()
    for i, token in enumerate(stream(model, ids, max_new_tokens=new, stop_token_ids=())):
        if i == 0:
            t_first = time.perf_counter()
    return t_first - t0, time.perf_counter() - t_first


def time_hf(model, ids: torch.Tensor, new: int) -> tuple[float, float]:
    stamps = Stamps()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                       min_new_tokens=new, pad_token_id=0, eos_token_id=None, streamer=stamps)  # fmt: skip
    t_first = stamps.times[1]  # times[0] is the prompt, put before any work
    return t_first - t0, time.perf_counter() - t_first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batch", type=int, action="append", help="repeatable (default: 1 and 4)")
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args.window)
    hf, ours = twins(cfg)
    print(f"model: 4 layers, D=512, V={cfg.vocab_size}, W={cfg.sliding_window}; prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, fp32, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.runs}")  # fmt: skip

    for B in args.batch or [1, 4]:
        ids = torch.randint(3, cfg.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(B))
        with torch.inference_mode():
            want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0, eos_token_id=None)
        same = torch.equal(generate(ours, ids, max_new_tokens=args.new, stop_token_ids=()), want)
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "transformers": []}
        for _ in range(args.runs):  # interleaved, so that both see the same background load
            runs["ours"].append(time_ours(ours, ids, args.new))
            runs["transformers"].append(time_hf(hf, ids, args.new))
        rates = {}
        for name, times in runs.items():
            prefill = statistics.median(t[0] for t in times)
            rates[name] = statistics.median(B * (args.new - 1) / t[1] for t in times)
            print(f"B={B} {name:>12}: prefill + first token {prefill * 1e3:7.1f} ms, "
                  f"decode {rates[name]:7.1f} tokens/s")  # fmt: skip
        print(f"B={B} ours / transformers decode speed: {rates['ours'] / rates['transformers']:.2f}x; "
              f"same greedy tokens: {'yes' if same else 'NO'}")  # fmt: skip

    two_b = Gemma2Config.from_name("2b")
    ring = KVCache.nbytes(two_b, 1, 8192, torch.bfloat16)
    full = KVCache.nbytes(two_b.replace(sliding_window=8192), 1, 8192, torch.bfloat16)  # every layer keeps all
    print(f"KV cache, 2B preset, 8192 tokens, bf16, batch 1: {ring / 2**30:.3f} GiB with ring buffers for the "
          f"local layers vs {full / 2**30:.3f} GiB keeping every position ({ring / full:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
