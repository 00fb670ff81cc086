"""A preallocated key/value cache with ring buffers for the sliding-window layers.

Global layers keep every column up to `max_len`. Local layers only ever look W keys back, so they
keep the last W columns in a ring buffer (column c lives in slot c % W). For the 2B preset at 8192
tokens that is 0.61 GiB in bf16 instead of 0.81 GiB.

The model drives the cache in three calls per forward: `begin(valid)` before the layers (it records
the padding and returns the forward's `Columns`), `update(layer, k, v)` inside each attention layer,
`advance(T)` after. The cache owns its position (`length`) and each row's count of real tokens.

On CPU a decode step's global layers attend over the whole buffer once it is 2/3 written
(`decode_span`): a contiguous operand, which CPU bf16 matmuls take without the copy they make of a
prefix.

`truncate(length)` drops the last columns again (speculative decoding's rejected draft tokens). A
forward may have overwritten ring slots that the kept columns' window still needs, so a cache built
with `rollback=k` keeps W + k - 1 slots per local layer instead of saving what is overwritten:
dropping d <= k columns then leaves the W - 1 columns before the new end intact (a forward ending at
column E overwrites only columns before E - ring), and the local mask still restricts each query to
its W keys, so the extra slots change no result. Extra slots cost (k - 1) / W more local-layer memory
and keys per decode step; saving the overwritten slots would cost a copy per layer per forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import Gemma2Config
from .masks import Columns, ring_columns


class KVCache:
    def __init__(
        self,
        config: Gemma2Config,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rollback: int = 0,
    ) -> None:
        """rollback: the most columns one `truncate` may drop (0: the cache is never truncated)."""
        if max_len > config.max_position_embeddings:
            raise ValueError(
                f"a cache of {max_len} tokens exceeds the model's context of "
                f"{config.max_position_embeddings}; shorten the prompt or max_new_tokens"
            )
        if isinstance(rollback, bool) or not isinstance(rollback, int) or rollback < 0:
            raise ValueError(f"rollback must be an integer >= 0 (the most columns truncate may drop), got {rollback!r}")
        self.config = config
        self.max_len = max_len
        self.ring = self.ring_slots(config, max_len, rollback)  # slots of a local layer's buffer
        kv, hd = config.num_key_value_heads, config.head_dim
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        for layer in range(config.num_hidden_layers):
            slots = self.ring if config.is_local(layer) else max_len
            self.keys.append(torch.zeros(batch_size, kv, slots, hd, dtype=dtype, device=device))
            self.values.append(torch.zeros(batch_size, kv, slots, hd, dtype=dtype, device=device))
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # real tokens
        self.length = 0  # columns written so far
        self.seen = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # real tokens per row
        self.span = 0  # the global layers' key columns in this forward (`begin`)
        self.intact = 0  # the rings hold columns intact..length-1 (a truncate may leave older ones lost)

    @staticmethod
    def ring_slots(config: Gemma2Config, max_len: int, rollback: int = 0) -> int:
        """Slots of a local layer's ring: W, plus rollback - 1 so that a truncate keeps the window."""
        return min(config.sliding_window + max(rollback - 1, 0), max_len)

    @staticmethod
    def nbytes(config: Gemma2Config, batch_size: int, max_len: int, dtype: torch.dtype, rollback: int = 0) -> int:
        """Bytes the key/value buffers take, computed without allocating them."""
        ring = KVCache.ring_slots(config, max_len, rollback)
        slots = sum(ring if config.is_local(i) else max_len for i in range(config.num_hidden_layers))
        per_slot = 2 * batch_size * config.num_key_value_heads * config.head_dim * dtype.itemsize
        return slots * per_slot

    def begin(self, valid: Tensor) -> Columns:
        """Record the new columns' padding; return what the masks and RoPE need for this forward.

        valid: `[B, T]` bool, False for left padding.
        """
        start, T = self.length, valid.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; {start} + {T} do not fit")
        device = valid.device
        self.valid[:, start : start + T] = valid
        counts = self.seen + valid.long().cumsum(-1)  # [B, T] real tokens up to each new column
        positions = (counts - 1).clamp(min=0)
        self.seen.copy_(counts[:, -1:])  # in place: its address never changes (gemma2.static_decode)
        q_cols = torch.arange(start, start + T, device=device)
        self.span = self.decode_span(start + 1) if T == 1 else start + T  # global layers' keys
        global_cols = torch.arange(self.span, device=device)
        if T == 1:  # decoding: write first; the ring then holds the W keys to attend to (older: masked)
            local_cols = ring_columns(start + 1, self.ring, device)
        elif start == 0:  # a first prefill attends to its own keys only
            local_cols = q_cols
        else:  # chunked prefill: the ring as it was, then the new keys
            local_cols = torch.cat([ring_columns(start, self.ring, device), q_cols])
        local_valid = self.valid[:, local_cols.clamp(min=0)] & (local_cols >= 0)
        self_attending = start == 0 and T > 1  # a decode step's local keys are the whole ring
        return Columns(q_cols, global_cols, self.valid[:, : self.span], local_cols, local_valid, positions, self_attending)

    def decode_span(self, n: int) -> int:
        """Columns a global layer's decode step attends over when n are written: on CPU all
        `max_len` once n >= 2/3 of them (the columns past n are masked), else the first n.

        The whole buffer is contiguous; a prefix of it is not (each head's rows are `max_len` apart),
        and CPU bf16 `bmm` (oneDNN) copies such an operand before multiplying, keys and values, every
        layer, every step (CUDA's batched matmuls take the strides as they are). Reading up to 1.5x the keys costs less than that copy: one process, the
        benchmark config at ~1050 columns, 10 interleaved rounds of 12 steps, medians: 16.8 against
        18.3 ms a step for a buffer of 1200, even at 1600, and 17.6 against 16.5 ms at 2100.
        """
        return self.max_len if self.valid.device.type == "cpu" and 3 * n >= 2 * self.max_len else n

    def advance(self, T: int) -> None:
        """The T columns given to `begin` are written in every layer."""
        self.length += T
        # Writing column c overwrote slot c % ring, which held column c - ring.
        self.intact = max(self.intact, self.length - self.ring)

    def truncate(self, length: int) -> None:
        """Drop the columns from `length` on, as if they had never been written.

        The global layers' columns past `length` are simply overwritten later. A local layer's
        next query (at column `length`) needs columns length - W + 1 .. length - 1 from its ring:
        a cache built with `rollback` >= the columns dropped still holds them.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate keeps 0 .. {self.length} columns (those written), got {length}")
        if not self.holds_window(length):
            raise ValueError(
                f"truncating {self.length} columns to {length} loses the sliding window: the rings of "
                f"{self.ring} slots were overwritten; build the cache with rollback >= {self.length - length}"
            )
        self.length = length
        self.abandon()

    def abandon(self) -> None:
        """Forget the columns past `length` that a forward began (`begin` marked and counted them)
        but never finished: it stopped before `advance`."""
        self.valid[:, self.length :] = False
        self.seen.copy_(self.valid[:, : self.length].sum(-1, keepdim=True))

    def holds_window(self, length: int) -> bool:
        """Whether the rings hold the W - 1 columns before `length`, which a query at `length`
        attends to besides itself (False after a forward that failed midway through a chunk)."""
        return length == 0 or max(length - self.config.sliding_window + 1, 0) >= self.intact

    def rewind(self, length: int) -> None:
        """Keep at most `length` columns: `truncate` to them, or `reset` when the rings lost the
        window they need (the caller then feeds them again)."""
        length = min(length, self.length)
        if self.holds_window(length):
            self.truncate(length)
        else:
            self.reset()

    def reset(self) -> None:
        """Forget every column, in place (the buffers keep their addresses: gemma2.static_decode)."""
        self.valid.zero_()
        self.seen.zero_()
        self.length = self.intact = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values `[B, KV, T, hd]`; return the keys/values to attend over."""
        start, T = self.length, k.shape[2]
        kbuf, vbuf = self.keys[layer], self.values[layer]
        if not self.config.is_local(layer):
            kbuf[:, :, start : start + T] = k
            vbuf[:, :, start : start + T] = v
            return kbuf[:, :, : self.span], vbuf[:, :, : self.span]
        # Raised before the ring is written (`advance` raises it to the same): a forward that fails
        # midway leaves the loss of the columns it overwrote on record, so that `holds_window`
        # refuses them rather than a query attending to newer ones in their slots.
        self.intact = max(self.intact, start + T - self.ring)
        if T == 1:
            slot = start % self.ring
            kbuf[:, :, slot : slot + 1] = k
            vbuf[:, :, slot : slot + 1] = v
            return kbuf, vbuf
        if start == 0:
            keys, values = k, v
        else:
            keys, values = torch.cat([kbuf, k], dim=2), torch.cat([vbuf, v], dim=2)
        # Keep the last `ring` new columns for later steps.
        n = min(T, self.ring)
        slots = torch.arange(start + T - n, start + T, device=k.device) % self.ring
        kbuf.index_copy_(2, slots, k[:, :, T - n :])
        vbuf.index_copy_(2, slots, v[:, :, T - n :])
        return keys, values
