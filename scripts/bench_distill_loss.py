"""Peak memory and time of the chunked distillation loss vs the naive one, forward + backward.

naive:   logits = softcap(h @ W.T) -> teacher logits the same way (no_grad) -> kd_loss -> backward
chunked: chunked_distill_loss(h, W, TeacherHead(h_T, W_T)) -> backward

Defaults are the Gemma 2 2B student with a 9B teacher: V = 256000, 4096 tokens, D = 2304, D_T = 3584.
The naive fp32 variant needs several [N, V] fp32 tensors (3.9 GiB each at that size): on a small
machine, use --tokens to scale it down (both variants grow linearly in N, the chunked one only
through the [N, D] tensors) and --variants to run one side alone.

How peak memory is measured (the extra bytes above the inputs, which both variants share):
- CUDA: torch.cuda.max_memory_allocated() after the run, minus memory_allocated() before it.
- CPU: PyTorch's CPU tensors are plain malloc/mmap, invisible to tracemalloc, so each variant runs
  in a fresh subprocess and reads the kernel's resident-set high-water mark (VmHWM). After the
  inputs exist the mark is reset (writing 5 to /proc/self/clear_refs), and the figure is
  VmHWM - VmRSS-at-reset: every byte the forward + backward touched at its worst moment,
  allocator overheads included.
The naive peak is about eight [N, V] fp32 tensors (forward activations kept for backward), and
its [V, D] weight gradient only appears after they are freed; the chunked peak is that weight
gradient (2.2 GiB for 2B in fp32, alive from the first chunk on) plus a few [chunk, V] buffers,
so the ratio falls as N grows.
On a CPU shared with other work, pass --threads 1: with more threads, every op waits for its
slowest thread to be scheduled, which penalises the chunked loss's many smaller ops unfairly;
the CPU seconds are then the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from gemma2.cli import add_threads_option, device_arg, run_cli, set_threads
from gemma2.dtypes import dtype_argument, to_dtype
from gemma2.distill import OBJECTIVES, TeacherHead, chunked_distill_loss, kd_loss

CAP = 30.0  # Gemma 2 final logit softcap, student and teacher
VARIANTS = ("naive", "chunked")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the bytes in use now (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    return _status_kib("VmRSS") * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _step(variant: str, h, w, h_t, w_t, args) -> None:
    if variant == "naive":
        logits = CAP * torch.tanh((h @ w.T).float() / CAP)  # [N, V]
        with torch.no_grad():
            t_logits = CAP * torch.tanh((h_t @ w_t.T).float() / CAP)
        loss = kd_loss(logits, t_logits, objective=args.objective, temperature=args.temperature)
    else:
        teacher = TeacherHead(h_t, w_t, CAP)
        loss, _ = chunked_distill_loss(h, w, teacher, final_softcap=CAP, objective=args.objective,
                                       temperature=args.temperature, chunk_size=args.chunk_size)
    loss.backward()


def worker(args) -> None:
    """One timed forward + backward of one variant: print a JSON line with its peak and time."""
    torch.manual_seed(0)
    set_threads(args.threads)
    device = torch.device(args.device)
    dtype = to_dtype(args.dtype)
    N, V, D, D_T = args.tokens, args.vocab, args.hidden, args.teacher_hidden

    def randn(*shape, std, grad=False):  # built in place: no transient copies raise the peak
        return torch.empty(*shape, dtype=dtype, device=device).normal_(std=std).requires_grad_(grad)

    # Scales give logits of std ~10, so the softcap (30) bends the tails as in a trained model.
    h, w = randn(N, D, std=1.0, grad=True), randn(V, D, std=10 / D**0.5, grad=True)
    h_t, w_t = randn(N, D_T, std=1.0), randn(V, D_T, std=10 / D_T**0.5)
    base = _reset_peak(device)
    t0, c0 = time.perf_counter(), time.process_time()
    _step(args.variant, h, w, h_t, w_t, args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"peak_bytes": _peak(device) - base, "seconds": seconds, "cpu_seconds": cpu_seconds}))


def check_args(args) -> None:
    """Every flag, in the parent, before any worker runs: one line and status 2 (gemma2.cli), not a
    worker's failure."""
    set_threads(args.threads)  # refuses < 1; each worker applies it again
    device_arg(args.device)
    for name in ("tokens", "vocab", "hidden", "teacher_hidden", "chunk_size", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not set(args.variants.split(",")) <= set(VARIANTS):
        raise ValueError(f"--variants {args.variants!r}: pass {' or '.join(VARIANTS)}, or both separated by a comma")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--hidden", type=int, default=2304, help="student hidden size (2B: 2304)")
    p.add_argument("--teacher-hidden", type=int, default=3584, help="teacher hidden size (9B: 3584)")
    p.add_argument("--dtype", type=dtype_argument, default="fp32", help="hidden states and weights: fp32 or bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--objective", choices=OBJECTIVES, default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per variant, each in a fresh process (medians reported)")
    add_threads_option(p)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args()
    if args.variant:
        return worker(args)
    check_args(args)

    # One fresh process per timed run, variants interleaved (A B B A A B ...) so that drifting load
    # from other processes on the machine hits both alike.
    variants = args.variants.split(",")
    results = {v: {"peak_bytes": [], "seconds": [], "cpu_seconds": []} for v in variants}
    for rep in range(args.repeats):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{variant} failed (exit {out.returncode}; -9 is usually out of memory: lower "
                         f"--tokens):\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  run {rep}: {variant} peak {r['peak_bytes'] / 2**30:.2f} GiB, {r['seconds']:.2f} s "
                  f"({r['cpu_seconds']:.2f} CPU s)", flush=True)
            for key, value in r.items():
                results[variant][key].append(value)

    print(f"N={args.tokens} V={args.vocab} D={args.hidden} D_T={args.teacher_hidden} {args.dtype} "
          f"{args.device} threads={args.threads or torch.get_num_threads()} "
          f"objective={args.objective} chunk={args.chunk_size} repeats={args.repeats}")
    summary = {}
    for name, r in results.items():
        peak = max(r["peak_bytes"])
        wall, cpu = statistics.median(r["seconds"]), statistics.median(r["cpu_seconds"])
        summary[name] = (peak, wall, cpu)
        print(f"  {name:8s} peak {peak / 2**30:6.2f} GiB   time {wall:7.2f} s   CPU {cpu:7.2f} s (medians)")
    if {"naive", "chunked"} <= summary.keys():
        ratios = [c / n for c, n in zip(summary["chunked"], summary["naive"])]
        print("  chunked / naive: peak {:.3f}, time {:.2f}, CPU {:.2f}".format(*ratios))


if __name__ == "__main__":
    run_cli(main)  # a user error is one line (gemma2.cli)
