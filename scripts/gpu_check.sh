#!/usr/bin/env bash
# The CUDA checks, a few minutes on one GPU: the CUDA tests (bf16 parity, compiled FlexAttention
# forward/backward against eager, CUDA-graph decoding against eager tokens), scripts/benchmark.py on
# the GPU (batch sizes as on CPU), then the 2B preset with random weights: prefill and decode
# tokens/s (decode eager and as a CUDA graph), and one distillation step's peak memory at seq 4096
# (student forward + chunked loss + backward, bf16, no teacher logits held).
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # writes OUT_DIR/benchmark.json and 2b.json
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -m pytest -q -m cuda tests 2>&1 | tail -n 20
$PY scripts/benchmark.py --device cuda --json "$OUT/benchmark.json"
$PY - "$OUT/2b.json" <<'PY'
import json, sys, time
import torch
from gemma2 import Gemma2ForCausalLM, KVCache
from gemma2.config import PRESETS
from gemma2.distill import chunked_distill_loss
from gemma2.static_decode import StaticDecoder

cfg, dev, dt = PRESETS["2b"], torch.device("cuda"), torch.bfloat16
model = Gemma2ForCausalLM(cfg, attention="auto").to(dev, dt)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
res = {}
def timed(fn):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize(); return time.perf_counter() - t
ids = torch.randint(3, cfg.vocab_size, (1, 4096), device=dev)
with torch.inference_mode():
    res["prefill_4096_first_call_s"] = timed(lambda: model.hidden_states(ids))
    res["prefill_4096_tok_s"] = 4096 / min(timed(lambda: model.hidden_states(ids)) for _ in range(3))
    cache = KVCache(cfg, 1, 4096 + 65, dtype=dt, device=dev)
    tok = model.last_logits(ids, None, cache).argmax(-1)[:, None]
    ones = torch.ones(1, 1, dtype=torch.bool, device=dev)
    def steps():
        global tok
        for _ in range(64):
            tok = model.last_logits(tok, ones, cache).argmax(-1)[:, None]
    res["decode_4096_tok_s"] = 64 / timed(steps)
    # The same steps as a CUDA graph (gemma2.static_decode), on a fresh cache: the first call
    # compiles, the second records the graph, later ones replay it.
    cache = KVCache(cfg, 1, 4096 + 66, dtype=dt, device=dev)
    tok = model.last_logits(ids, None, cache).argmax(-1)[:, None]
    decoder = StaticDecoder(model, cache)
    res["decode_compiled_first_call_s"] = timed(lambda: decoder(tok))
    decoder(tok)
    def graph_steps():
        global tok
        for _ in range(63):
            tok = decoder(tok).argmax(-1)[:, None]
    res["decode_4096_compiled_tok_s"] = 63 / timed(graph_steps)
model.train()
torch.cuda.reset_peak_memory_stats()
hidden = model.hidden_states(ids[:, :-1])
loss, _ = chunked_distill_loss(hidden[0], model.output_weight, None, ids[0, 1:], alpha=0.0)
loss.backward()
res["distill_step_4096_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
res["device"] = torch.cuda.get_device_name()
print(res)
json.dump(res, open(sys.argv[1], "w"), indent=1)
PY
