#!/usr/bin/env python3
"""Peak memory of load_model against the size of the weights it produces.

Writes a model of a few hundred MB once (HF safetensors and official .ckpt), then loads it in a
fresh process per case and reports the peak resident memory above the process's baseline (torch
imported, nothing loaded) divided by the bytes of the loaded weights. Linux only (ru_maxrss in KiB).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gemma2 import Gemma2Config, Gemma2ForCausalLM, load_model, save_model
from gemma2.checkpoint import save_official

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        with torch.device("meta"):
            model = Gemma2ForCausalLM(CONFIG)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_model(model, Path(tmp) / "hf")
        save_official(model, Path(tmp) / "model.ckpt")
        del model
        for name, path in [("HF safetensors", Path(tmp) / "hf"), ("official .ckpt", Path(tmp) / "model.ckpt")]:
            for dtype in ("bfloat16", "float32"):
                out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                r = json.loads(out.stdout)
                print(f"{name:15s} bf16 on disk -> {dtype:8s}: weights {r['weights_mb']:7.1f} MB, "
                      f"peak growth {r['peak_growth_mb']:7.1f} MB, ratio {r['ratio']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
