"""Dynamo's limit on the traces of one compiled function, raised for the functions compiled here.

Dynamo keeps at most `cache_size_limit` traces (8 by default) of one function per process; past it
a function compiled with `fullgraph=True` raises, and any other runs uncompiled. Both of this
project's compiled functions meet many shapes in one process: FlexAttention one per batch size,
length bucket, head layout, dtype and grad mode (a distillation run on prompts, whose batches are
cut to their rows, meets a few of each for the student, the teacher and the sampler's prefill;
uncompiled it would hold the whole score matrix), and the static decode step one per model config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

TRACES = 64  # per compiled function and process


def with_more_traces(compiled: Callable) -> Callable:
    """`compiled` (a torch.compile'd function) called with dynamo's limit raised to TRACES, never lowered."""
    config = torch._dynamo.config

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        # cache_size_limit: torch 2.6's name for it, an alias of recompile_limit since 2.7.
        with config.patch(cache_size_limit=max(TRACES, config.cache_size_limit)):
            return compiled(*args, **kwargs)

    return call
