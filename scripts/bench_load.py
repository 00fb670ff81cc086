#!/usr/bin/env python3
"""Peak memory of load_model against the size of the weights it produces.

Writes a model of a few hundred MB once (HF safetensors and official .ckpt), then loads it in a
fresh process per case and reports the peak resident memory above the process's baseline (torch
imported, nothing loaded) divided by the bytes of the loaded weights. Linux only (ru_maxrss in KiB).

--ranks N: the same checkpoints loaded by N gloo ranks and sharded with FSDP2, today's way
(load_model on every rank, then shard) against sharded loading (gemma2.sharded_load: each rank
reads its rows); per rank, the peak resident memory above its baseline (VmHWM, reset once the
process group is up; --warm: also after torch's one-time set-up for meta tensors, ~74 MB whatever
the model) against the bytes of the whole model.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gemma2 import Gemma2Config, Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import save_official
from gemma2.cli import run_cli
from gemma2.distributed import runtime, shard
from gemma2.dtypes import to_dtype
from gemma2.sharded_load import load_sharded

# ~150M parameters: 600 MB in fp32, 300 MB in bf16.
CONFIG = Gemma2Config(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128,
                      sliding_window=512, max_position_embeddings=2048)  # fmt: skip


def measure(path: str, dtype: str) -> dict:
    """Run in a child process: peak RSS growth while loading."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = load_model(path, dtype=dtype, config=CONFIG)  # a name from gemma2.dtypes
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weights_mb": weights / 2**20, "peak_growth_mb": (peak - base) / 2**20, "ratio": (peak - base) / weights}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_rank(rank: int, world: int, path: str, dtype: str, sharded: bool, warm: bool, tmp: str) -> None:
    """One rank (mp.spawn): peak RSS growth while loading `path` and sharding it, into tmp/rank{rank}.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    if warm:  # torch loads its meta kernels (~74 MB, whatever the model) when a first model is built on meta
        with torch.device("meta"):
            Gemma2ForCausalLM(CONFIG.replace(num_hidden_layers=1))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    base = _status_kib("VmRSS")
    model = (load_sharded if sharded else load_model)(path, dtype=dtype, config=CONFIG)
    shard(model, model, runtime(), param_dtype=None)  # the model is its own root here
    growth = (_status_kib("VmHWM") - base) * 1024
    mine = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    Path(tmp, f"rank{rank}.json").write_text(json.dumps({"growth": growth, "shards": mine}))
    dist.destroy_process_group()


def compare_ranks(world: int, checkpoints: list[tuple[str, Path]], warm: bool) -> None:
    with torch.device("meta"):
        params = sum(p.numel() for p in Gemma2ForCausalLM(CONFIG).parameters())
    full = {dtype: params * to_dtype(dtype).itemsize for dtype in ("bfloat16", "float32")}
    for name, path in checkpoints:
        for dtype in ("bfloat16", "float32"):
            growth = {}
            for sharded in (False, True):
                with tempfile.TemporaryDirectory() as tmp:
                    mp.spawn(measure_rank, args=(world, str(path), dtype, sharded, warm, tmp), nprocs=world, join=True)
                    ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
                growth[sharded] = max(r["growth"] for r in ranks)
            print(f"{name:15s} bf16 on disk -> {dtype:8s}, {world} ranks: model {full[dtype] / 2**20:7.1f} MB; "
                  f"peak growth per rank (worst) today {growth[False] / 2**20:7.1f} MB "
                  f"({growth[False] / full[dtype]:.2f}x the model), sharded {growth[True] / 2**20:7.1f} MB "
                  f"({growth[True] / full[dtype]:.2f}x): sharded / today "
                  f"{growth[True] / growth[False]:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=1, help="gloo ranks; > 1 compares sharded loading with today's")
    parser.add_argument("--warm", action="store_true",
                        help="with --ranks: take the baseline after torch's one-time meta-device set-up")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    if args.ranks < 1:
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = Gemma2ForCausalLM(CONFIG)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_model(model, Path(tmp) / "hf")
        save_official(model, Path(tmp) / "model.ckpt")
        del model
        checkpoints = [("HF safetensors", Path(tmp) / "hf"), ("official .ckpt", Path(tmp) / "model.ckpt")]
        if args.ranks > 1:
            compare_ranks(args.ranks, checkpoints, args.warm)
            return
        for name, path in checkpoints:
            for dtype in ("bfloat16", "float32"):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                r = json.loads(out.stdout)
                print(f"{name:15s} bf16 on disk -> {dtype:8s}: weights {r['weights_mb']:7.1f} MB, "
                      f"peak growth {r['peak_growth_mb']:7.1f} MB, ratio {r['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)  # a user error is one line (gemma2.cli)
