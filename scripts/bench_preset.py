"""Speed and memory of one model size, with random weights, on one device: what a run of that size
will see before its weights are at hand.

    python scripts/bench_preset.py --preset 2b --device cuda --json 2b.json
    python scripts/bench_preset.py --preset tiny --seq-len 128          # seconds, on a CPU

Figures, bf16 inference at batch 1 unless said:
- prefill: tokens/s of a --seq-len prompt, the head on its last position only (as generation runs
  it), median of 3 after a first call timed apart (on CUDA it compiles FlexAttention);
- decode: tokens/s of --decode-steps greedy steps after that prompt, eager, then through
  gemma2.static_decode (the whole step compiled: a CUDA graph on CUDA), whose first call
  (compiling) and second (recording the graph) are timed apart; --no-compile skips it;
- one distillation step at --seq-len (gemma2.memory_plan.training_step: fp32 master weights, bf16
  compute, the chunked loss against a top-k teacher cache of k 32, or a live --teacher, backward,
  clipping, AdamW), timed on its second run (the first compiles); on CUDA its measured peak
  (max_memory_allocated) beside the peak gemma2.memory_plan traces for the same step.
--preset also takes a config.json or a checkpoint directory (only its config is read).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
from pathlib import Path

import torch

from gemma2 import KVCache
from gemma2.cli import device_arg, run_cli
from gemma2.data import Batch
from gemma2.distributed import Runtime
from gemma2.files import write_text_atomic
from gemma2.memory_plan import GiB, plan_memory, step_config, training_step
from gemma2.model import Gemma2ForCausalLM
from gemma2.static_decode import StaticDecoder
from gemma2.student import init_weights, model_config
from gemma2.throughput import timed

TEACHER_CACHE_K = 32


class Figures(dict):
    """The figures so far; each printed as it is measured (a part cut short still tells them)."""

    def __setitem__(self, key: str, value) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)


def inference(model: Gemma2ForCausalLM, T: int, steps: int, compiled: bool, res: Figures) -> None:
    """Prefill and decode figures of `model` (bf16, eval) for a T-token prompt, into `res`."""
    cfg, device, dtype = model.config, model.output_weight.device, model.dtype
    ids = torch.randint(3, cfg.vocab_size, (1, T), device=device)
    ones = torch.ones(1, 1, dtype=torch.bool, device=device)
    res["prefill_first_call_s"] = timed(lambda: model.last_logits(ids), device)
    res["prefill_tok_s"] = T / statistics.median(timed(lambda: model.last_logits(ids), device) for _ in range(3))

    def prefilled() -> tuple[KVCache, torch.Tensor]:
        """A cache holding the prompt, and the first token after it."""
        cache = KVCache(cfg, 1, T + steps + 2, dtype=dtype, device=device)
        return cache, model.last_logits(ids, None, cache).argmax(-1)[:, None]

    def decode(step, n):
        def run():
            nonlocal tok
            for _ in range(n):
                tok = step(tok).argmax(-1)[:, None]
        return run

    cache, tok = prefilled()
    res["decode_tok_s"] = steps / timed(decode(lambda t: model.last_logits(t, ones, cache), steps), device)
    if compiled:  # the same positions again, through the compiled step
        cache, tok = prefilled()
        decoder = StaticDecoder(model, cache)
        res["decode_compiled_first_call_s"] = timed(decode(decoder, 1), device)
        res["decode_compiled_second_call_s"] = timed(decode(decoder, 1), device)  # records the CUDA graph
        res["decode_compiled_tok_s"] = steps / timed(decode(decoder, steps), device)


def distill_step(student: Gemma2ForCausalLM, teacher: Gemma2ForCausalLM | None, T: int, res: Figures) -> None:
    """One training step of `student` (fp32 master weights, bf16 compute) at T tokens, timed and,
    on CUDA, its peak measured, beside the peak gemma2.memory_plan traces for it, into `res`."""
    device = student.output_weight.device
    k = None if teacher is not None else TEACHER_CACHE_K
    res["distill_teacher"] = f"top-k cache, k {k}" if teacher is None else "live"
    plan = plan_memory(student.config, seq_len=T, batch_size=1, teacher=None if teacher is None else teacher.config,
                       teacher_cache_k=k, device_type=device.type, attention=student.attention)  # fmt: skip
    res["distill_planned_peak_gib"] = plan.peak / GiB
    allocated_at_start = 0
    cfg = step_config(1, distilling=True)
    rt = Runtime(0, 1, device, False)
    ids = torch.randint(3, student.config.vocab_size, (1, T))
    batch = Batch(torch.arange(1), ids, ids.clone())  # as the trainer's batches: on the host

    def step():
        training_step(student, cfg, rt, batch, teacher=teacher, teacher_cache_k=k, device_type=device.type,
                      started=started)  # fmt: skip

    def started():  # the plan's peak counts what is alive from here on: so does the allocator's
        nonlocal allocated_at_start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            allocated_at_start = torch.cuda.memory_allocated(device)

    def fresh():  # before each step, untimed: no gradients, and no earlier step's optimizer alive
        student.zero_grad(set_to_none=True)
        gc.collect()  # that optimizer sits in a reference cycle

    fresh()
    res["distill_first_step_s"] = timed(step, device)  # compiles FlexAttention on CUDA
    fresh()
    res["distill_step_s"] = timed(step, device)
    if device.type == "cuda":
        # At the start: the models (and, from the step's set-up, nothing else); the plan's
        # parameter and teacher rows hold the same.
        res["distill_allocated_at_start_gib"] = allocated_at_start / GiB
        res["distill_measured_peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    student.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="2b, 9b, 27b, tiny; or a config.json or checkpoint directory")
    p.add_argument("--teacher", help="distil from a live teacher of this size (default: a top-k cache, k 32)")
    p.add_argument("--seq-len", type=int, default=4096, help="prompt and training sequence length")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled (CUDA-graph) decode")
    p.add_argument("--json", help="write the figures here (a new file unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args()
    # Every argument checked before minutes of work.
    if args.json:
        out = Path(args.json)
        if out.exists() and not args.overwrite:
            raise ValueError(f"{out} exists; pass --overwrite to replace it, or another --json path")
        if not out.parent.is_dir():
            raise ValueError(f"--json {out}: the directory {out.parent} does not exist")
    device = device_arg(args.device)
    cfg = model_config(args.preset, "preset")
    teacher_cfg = model_config(args.teacher, "teacher") if args.teacher else None
    if teacher_cfg is not None and teacher_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(f"--teacher has vocab size {teacher_cfg.vocab_size}, --preset {cfg.vocab_size}: they must match")
    T, steps = args.seq_len, args.decode_steps
    if T < 1 or steps < 1 or T + steps + 2 > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len and --decode-steps must be >= 1 with seq-len + decode-steps + 2 <= "
                         f"{cfg.max_position_embeddings} (the model's context), got {T} and {steps}")  # fmt: skip

    torch.manual_seed(0)
    with torch.device(device):
        student = Gemma2ForCausalLM(cfg, attention="auto")
    init_weights(student)  # values do not matter; a trained model's scale keeps the softmaxes honest
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    res = Figures()
    res |= {"device": name, "torch": torch.__version__, "preset": args.preset, "seq_len": T}
    print("\n".join(f"{key}: {value}" for key, value in res.items()), flush=True)
    model = copy.deepcopy(student).to(torch.bfloat16).eval()
    with torch.inference_mode():
        inference(model, T, steps, not args.no_compile, res)
    del model
    gc.collect()
    teacher = None
    if teacher_cfg is not None:
        with torch.device(device):
            teacher = init_weights(Gemma2ForCausalLM(teacher_cfg, attention="auto")).to(torch.bfloat16).eval()
    distill_step(student, teacher, T, res)
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=1))


if __name__ == "__main__":
    run_cli(main)
