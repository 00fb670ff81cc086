"""Decode steps with static shapes, so that torch.compile traces one step for every position.

A `KVCache` decode step places its column and builds its masks from the cache's length, a Python
int: a compiled step would be specialised again at each position, and a CUDA graph (which replays
the kernel arguments it recorded) could not be replayed at the next one. `StaticDecoder` runs the
model's own forward over the same buffers through `StaticColumns`, a view whose every changing
quantity is a tensor updated in place: the column written (`pos`), each row's count of real tokens,
the padding mask. Its global layers attend over the whole buffer (the columns not yet written are
masked, as `KVCache.decode_span` does on CPU once 2/3 are written), so each step has the shapes
and the addresses of the one before, and torch.compile traces it without a position in it: on CUDA
with CUDA graphs (`mode="reduce-overhead"`, every buffer marked static), on CPU with inductor,
which fuses the element-wise work between the matmuls. Dynamo traces the first request's shapes as
they are; another batch size or cache length traces once more with them symbolic (once for
batch 1, once for larger batches): three traces for the test's requests of five shapes. Models of
one config share the traces (the weights are inputs: five models, one trace); each other config is
traced anew (its layers unrolled), up to 64 traces per process (gemma2.compiling). On
CUDA each new cache is recorded as a new graph (its buffers are new addresses); a long-running
server should keep its sessions rather than open one per request.

Measured on 2 CPU threads, the benchmark config (150M parameters, bf16, ~1050 positions), one
process, interleaved rounds: 15.1 against 16.4 ms a step eager (8%), and 18.8 against 19.8 (5%)
when the machine's memory bandwidth was lower; int8 (gemma2.quantize) 7.2 against 8.5 ms; the
symbolic-shape trace as fast as the first (14.6 against 14.6, eager 15.8). Each trace compiles on
its first call: 8-14 s, ~3 s once inductor's on-disk cache holds the kernels. The smaller the model,
the larger the share of a step that is per-op overhead: the shipped tiny teacher (5.8M parameters,
bf16) decodes 599 against 271 tokens/s (2.2x; `scripts/generate.py`, 200 tokens, medians of 3),
while a 2B step reads 5 GB of weights, so there the gain is a few percent at most. (Measured again
after the eager step got faster, on a slower day: 1.17x on the benchmark config, 2.5x on the tiny
teacher; README, "Generating".) Hence opt-in on CPU (`Session(...,
compiled=True)`, `scripts/generate.py --compile`). CUDA has not run here.

In fp32 the compiled tokens are eager's (tested). In bf16 they can part ways after a near-tie,
because inductor keeps fp32 inside its fused kernels where eager rounds each op to bf16: the shipped
tiny teacher's greedy tokens for 5 prompts stayed equal to fp32's for 16/43/64/2/64 of 64 tokens
eager and 64/43/58/2/64 compiled, neither closer to fp32 than the other.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .compiling import with_more_traces
from .kv_cache import KVCache
from .masks import Columns, ring_columns


class StaticColumns:
    """The cache protocol of `Gemma2ForCausalLM.hidden_states` (`begin`, `update`, `advance`) for
    one decode step (T = 1) over a KVCache's buffers, its state tensors only: `pos` is the column
    the step writes, set by `StaticDecoder` before each step."""

    def __init__(self, cache: KVCache, pos: Tensor) -> None:
        device = pos.device
        self.cache, self.pos = cache, pos
        self.columns = torch.arange(cache.max_len, device=device)  # a global layer's keys: every slot

    def begin(self, valid: Tensor) -> Columns:
        cache, pos = self.cache, self.pos
        cache.valid.index_copy_(1, pos.view(1), valid)
        positions = cache.seen.clone()  # the row's real tokens before this one
        cache.seen.add_(valid.long())
        local_cols = ring_columns(pos + 1, cache.ring, pos.device)
        local_valid = cache.valid[:, local_cols.clamp(min=0)] & (local_cols >= 0)
        return Columns(pos.view(1), self.columns, cache.valid, local_cols, local_valid, positions, False)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache = self.cache
        slot = (self.pos % cache.ring if cache.config.is_local(layer) else self.pos).view(1)
        cache.keys[layer].index_copy_(2, slot, k)
        cache.values[layer].index_copy_(2, slot, v)
        return cache.keys[layer], cache.values[layer]

    def advance(self, T: int) -> None:
        """Nothing on the device: `StaticDecoder` advances the cache's length on the host."""


def _step(model, token: Tensor, view: StaticColumns) -> Tensor:
    return model.last_logits(token, None, view)


_compiled: dict[str, object] = {}  # one compiled step per device type: dynamo keeps its traces


def _compiled_step(device: torch.device):
    if device.type not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs
        _compiled[device.type] = with_more_traces(torch.compile(_step, mode=mode, fullgraph=True))
    return _compiled[device.type]


def _compile_cache() -> str:
    """Where inductor keeps compiled kernels between processes (TORCHINDUCTOR_CACHE_DIR, or a
    directory under the system's temporary one)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return cache_dir()
    except (ImportError, OSError):  # moved in another torch; cannot be made (it makes it)
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "torchinductor_$USER in the temporary directory")


class StaticDecoder:
    """`decoder(token [B, 1]) -> logits [B, V]`: one decode step of `model` over `cache`,
    compiled (`compiled=True`) or run eagerly through the same static view (the test of one
    against the other)."""

    def __init__(self, model, cache: KVCache, *, compiled: bool = True) -> None:
        device = cache.valid.device
        self.model, self.cache = model, cache
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.view = StaticColumns(cache, self.pos)
        # Their addresses never change (KVCache updates `seen` in place), so CUDA graphs read them
        # where they are instead of copying them in at each replay.
        for t in (*cache.keys, *cache.values, cache.valid, cache.seen, self.pos, self.view.columns):
            torch._dynamo.mark_static_address(t)
        self.step = _compiled_step(device) if compiled else _step

    def __call__(self, token: Tensor) -> Tensor:
        cache = self.cache
        if cache.length >= cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} tokens; all are written")
        self.pos.fill_(cache.length)
        try:
            logits = self.step(self.model, token, self.view)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # before the step ran: the cache is as it was
            inner = getattr(e, "inner_exception", e)  # what the backend raised
            reason = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
            raise ValueError(
                f"compiling the decode step failed ({reason}); decode without compiling (drop --compile, or "
                "compiled=False), or give torch.compile what it needs: a working C++ compiler on CPU, Triton on CUDA. "
                "If it compiled before, a compile killed midway can leave a damaged file in torch's compile cache: "
                f"remove {_compile_cache()} (it is rebuilt)"
            ) from e
        cache.advance(1)
        return logits
