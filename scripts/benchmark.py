"""Speed and memory of our model against transformers' Gemma 2 (eager), the same random weights.

    python scripts/benchmark.py --json bench.json          # ~10 min on 2 CPU cores
    python scripts/benchmark.py --quick                    # fewer repetitions and steps

Fixed config: hidden 1024, 8 layers, 8 heads / 4 KV heads, head_dim 128, MLP 4096, vocab 32768,
window 512, bf16, batch 1 (decode also batch 8). Ours runs `attention="auto"` with compilation on
(compiled FlexAttention on CUDA, whose first call's compile time is reported beside each compiled
figure; on CPU auto runs `banded`, faster there than compiled FlexAttention); transformers its eager
attention (its SDPA path cannot softcap). Repetitions alternate between the two after a warm-up
each; figures are medians. Peak memory: RSS growth on CPU (sampled), max_memory_allocated on CUDA.
The training step (forward + backward of a token loss, seq 2048) compares ours with our own eager
reference, and `decode_1024_int8` our weight-only int8 model (gemma2.quantize) with our bf16 one
(the "transformers" column of that row is ours in bf16). `_compiled` rows decode through
gemma2.static_decode (the whole step compiled; first-call time in the compile column), the int8 one
against our bf16 compiled the same way. Limits, measured in the same run: bf16 GEMV bandwidth (decode reads every weight once per
step: the roofline is bandwidth / weight bytes) and bf16 matmul rate (prefill limit: 2 * params * T
flops, attention not counted). Needs transformers (a test-only dependency).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from gemma2 import Gemma2Config, Gemma2ForCausalLM, KVCache
from gemma2.cli import add_threads_option, check_json_flag, device_arg, run_cli, set_threads
from gemma2.files import write_text_atomic
from gemma2.quantize import quantize_model
from gemma2.quantize import weight_bytes as quantized_weight_bytes
from gemma2.static_decode import StaticDecoder
from gemma2.throughput import timed

CONFIG = Gemma2Config(vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                      sliding_window=512, max_position_embeddings=8192)  # fmt: skip


class PeakMemory:
    """Peak memory growth during a `with` block: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()


def alternate(runs: dict, reps: int, device) -> dict:
    """Per run: (median seconds, first call's seconds, peak memory growth of the last call), after
    one warm-up call each (the first: compilation included), the repetitions interleaved."""
    first = {name: timed(fn, device) for name, fn in runs.items()}
    times = {name: [] for name in runs}
    peaks = {}
    for rep in range(reps):
        for name, fn in runs.items():
            with PeakMemory(device) as memory:
                times[name].append(timed(fn, device))
            peaks[name] = memory.peak
    return {name: (statistics.median(t), first[name], peaks[name]) for name, t in times.items()}


def limits(device, dtype, reps: int) -> dict:
    n = 8192
    w = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(n, device=device, dtype=dtype)
    a = torch.randn(1024, 4096, device=device, dtype=dtype)
    b = torch.randn(4096, 4096, device=device, dtype=dtype)
    # The faster of torch's two GEMVs (on CPU bf16 `mv` beats the matmul by 1.15-1.5x: gemma2.model.project)
    gemv = alternate({"mv": lambda: [torch.mv(w, x) for _ in range(5)],
                      "matmul": lambda: [x[None] @ w.T for _ in range(5)]}, reps, device)  # fmt: skip
    gemv = min(t[0] for t in gemv.values()) / 5
    mm = alternate({"mm": lambda: a @ b}, reps, device)["mm"][0]
    return {"gemv_gbps": w.numel() * w.itemsize / gemv / 1e9, "matmul_gflops": 2 * a.shape[0] * a.shape[1] * b.shape[1] / mm / 1e9}


def speculative_decode(put, device: torch.device, reps: int, student_dir: str = "runs/demo/distilled") -> None:
    """decode_speculative_k4 and decode_prompt_lookup_k4: greedy speculative decoding (4 proposals
    per target forward) against plain decoding of the same target, the shipped tiny teacher (5.77M
    parameters). The draft: the demo's distilled student (1.31M, 4.4x smaller; `scripts/demo.py`
    writes it to runs/demo/distilled; the row is skipped without it), or the text itself
    (gemma2.prompt_lookup). fp32, the first 32 tokens of 4 held-out sequences, 64 new tokens each.
    Random weights would accept almost nothing, hence this trained model."""
    from gemma2.checkpoint import load_model
    from gemma2.corpus import build_corpus
    from gemma2.data import split_datasets
    from gemma2.demo import load_teacher
    from gemma2.generation import generate
    from gemma2.prompt_lookup import PromptLookup
    from gemma2.speculative import speculative_generate

    teacher, tokenizer = load_teacher()
    teacher = teacher.to(device)
    drafts = {}
    saved = sorted(Path(student_dir).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if saved:
        drafts["decode_speculative_k4"] = (load_model(saved[-1], device=device), str(saved[-1]))
    else:
        print(f"decode_speculative_k4 skipped: no student in {student_dir}; run scripts/demo.py first", file=sys.stderr)
    drafts["decode_prompt_lookup_k4"] = (PromptLookup(), "the text itself (prompt lookup)")
    data = split_datasets(build_corpus(), tokenizer, teacher.config.max_position_embeddings)
    prompts, new = data.heldout.batch(range(4)).inputs[:, :32].to(device), 64

    def plain():
        for row in prompts:
            generate(teacher, row[None], max_new_tokens=new, stop_token_ids=())

    for name, (draft, what) in drafts.items():
        stats = []

        def speculative(draft=draft, stats=stats):  # this iteration's, bound now
            stats.clear()
            for row in prompts:
                stats.append(speculative_generate(teacher, draft, row[None], draft_tokens=4, max_new_tokens=new,
                                                  stop_token_ids=())[1])  # fmt: skip

        t = alternate({"speculative": speculative, "plain": plain}, reps, device)
        put(name, len(prompts) * new / t["speculative"][0], len(prompts) * new / t["plain"][0])
        accepted, proposed = sum(s.accepted for s in stats), sum(s.proposed for s in stats)
        forwards = sum(s.target_forwards for s in stats)
        print(f"{name}: {what} as draft, {accepted / proposed:.1%} of proposals accepted, "
              f"{len(prompts) * new / forwards:.2f} tokens per target forward", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition, fewer decode steps (under 3 min)")
    p.add_argument("--json", help="write the figures here (a new file unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_option(p)
    args = p.parse_args()
    # Every flag is checked before minutes of work.
    set_threads(args.threads)
    device, dtype = device_arg(args.device), torch.bfloat16
    check_json_flag(args.json, args.overwrite)
    try:
        import transformers
    except ImportError:
        raise ValueError("benchmark.py needs transformers, its reference: pip install -e '.[test]'") from None
    reps, steps = (1, 4) if args.quick else (3, 16)  # repetitions after the warm-up; decode steps per call
    torch.manual_seed(0)
    cfg = CONFIG
    hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings, attn_implementation="eager",
    )).to(device, dtype).eval()  # fmt: skip
    ours = Gemma2ForCausalLM(cfg, attention="auto", compile_attention=True).to(device, dtype).eval()
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}, strict=True)
    lim = limits(device, dtype, reps)
    weight_bytes = sum(t.numel() * t.itemsize for t in ours.parameters())
    linear_params = sum(t.numel() for n, t in ours.named_parameters() if "norm" not in n)  # embed = head
    figures, compile_s = {}, {}

    written = False  # the --json file is this run's own once written: later saves replace it

    def save(complete: bool) -> None:
        """The --json file with the figures so far: a run stopped by a time limit keeps them."""
        nonlocal written
        if args.json:
            result = {"device": str(device), "limits": lim, "figures": figures, "compile_s": compile_s,
                      "complete": complete}  # fmt: skip
            write_text_atomic(args.json, json.dumps(result, indent=1), replace=args.overwrite or written)
            written = True

    def put(name, ours_v, theirs_v, limit_fraction=None):
        print(f"{name}: ours {ours_v:.4g}, theirs {theirs_v:.4g}", file=sys.stderr, flush=True)
        figures[name] = {"ours": ours_v, "transformers": theirs_v, "ratio": ours_v / theirs_v,
                         "limit_fraction": limit_fraction}  # fmt: skip
        save(complete=False)

    with torch.inference_mode():
        for T in (1024, 4096):
            ids = torch.randint(3, cfg.vocab_size, (1, T), device=device)
            t = alternate({"ours": lambda: ours(ids), "hf": lambda: hf(input_ids=ids).logits}, reps, device)
            if ours.kernel_for(T, True, device) == "flex":  # otherwise nothing compiles
                compile_s[f"prefill_{T}"] = t["ours"][1] - t["ours"][0]
            put(f"prefill_{T}", T / t["ours"][0], T / t["hf"][0], 2 * linear_params * T / t["ours"][0] / 1e9 / lim["matmul_gflops"])
            if T == 4096:
                put("peak_mem_prefill_4096", t["ours"][2], t["hf"][2])
        def decoder(model, ids, compiled=False):
            """`steps` greedy decode steps of our `model` after prefilling `ids`, as a callable;
            compiled: through gemma2.static_decode (torch.compile of the whole step)."""
            B, P = ids.shape
            cache = KVCache(cfg, B, P + (reps + 1) * steps, dtype=dtype, device=device)
            ones = torch.ones(B, 1, dtype=torch.bool, device=device)
            tok = model.last_logits(ids, None, cache).argmax(-1)[:, None]
            step = StaticDecoder(model, cache) if compiled else lambda t: model.last_logits(t, ones, cache)

            def run():
                nonlocal tok
                for _ in range(steps):
                    tok = step(tok).argmax(-1)[:, None]
            return run

        for name, P, B, compiled in (("decode_1024", 1024, 1, False), ("decode_4096", 4096, 1, False),
                                     ("decode_1024_b8", 1024, 8, False), ("decode_1024_compiled", 1024, 1, True)):  # fmt: skip
            ids = torch.randint(3, cfg.vocab_size, (B, P), device=device)
            ours_steps = decoder(ours, ids, compiled)
            out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
            key = "cache" if "cache" in out else "past_key_values"  # the name since transformers 5.2x; before
            past, hf_tok = out[key], out.logits[:, -1].argmax(-1)[:, None]

            def hf_steps():
                nonlocal hf_tok
                for _ in range(steps):
                    o = hf(input_ids=hf_tok, use_cache=True, **{key: past})
                    hf_tok = o.logits[:, -1].argmax(-1)[:, None]

            t = alternate({"ours": ours_steps, "hf": hf_steps}, reps, device)
            if compiled:
                compile_s[name] = t["ours"][1] - t["ours"][0]
            roofline = lim["gemv_gbps"] * 1e9 / weight_bytes  # steps/s when every weight is read once
            put(name, B * steps / t["ours"][0], B * steps / t["hf"][0], steps / t["ours"][0] / roofline)
            ours_steps = past = None  # this row's caches freed before the next
        # Weight-only int8 (gemma2.quantize) against our own bf16 decode: this row's reference is ours.
        int8 = quantize_model(copy.deepcopy(ours))
        ids = torch.randint(3, cfg.vocab_size, (1, 1024), device=device)
        roofline = lim["gemv_gbps"] * 1e9 / quantized_weight_bytes(int8)
        for name, compiled in (("decode_1024_int8", False), ("decode_1024_int8_compiled", True)):  # like for like
            t = alternate({"int8": decoder(int8, ids, compiled), "bf16": decoder(ours, ids, compiled)}, reps, device)
            if compiled:
                compile_s[name] = t["int8"][1] - t["int8"][0]
            put(name, steps / t["int8"][0], steps / t["bf16"][0], steps / t["int8"][0] / roofline)
        print(f"resident weights: int8 {quantized_weight_bytes(int8) / 2**20:.1f} MiB, bf16 {weight_bytes / 2**20:.1f} MiB",
              file=sys.stderr)  # fmt: skip
        del int8
        speculative_decode(put, device, reps)

    ids = torch.randint(3, cfg.vocab_size, (1, 2048), device=device)
    ours.train()

    def train_step(impl):
        def step():
            ours.attention = impl
            ours.zero_grad(set_to_none=True)
            logits = ours(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[0, 1:]).backward()
        return step

    t = alternate({"ours": train_step("auto"), "eager": train_step("eager")}, reps, device)
    put("train_2048", 2047 / t["ours"][0], 2047 / t["eager"][0])
    put("peak_mem_train_2048", t["ours"][2], t["eager"][2])

    print(f"device {device} ({torch.get_num_threads()} threads), bf16; GEMV {lim['gemv_gbps']:.1f} GB/s, "
          f"matmul {lim['matmul_gflops']:.1f} GFLOP/s; train_2048 compares ours with our eager reference\n")  # fmt: skip
    print("| figure | ours | transformers | ratio | limit fraction | compile s |\n|---|---|---|---|---|---|")
    for name, f in figures.items():
        frac = "" if f["limit_fraction"] is None else f"{f['limit_fraction']:.2f}"
        comp = f"{compile_s[name]:.1f}" if name in compile_s else ""
        print(f"| {name} | {f['ours']:.4g} | {f['transformers']:.4g} | {f['ratio']:.2f} | {frac} | {comp} |")
    save(complete=True)


if __name__ == "__main__":
    run_cli(main)
