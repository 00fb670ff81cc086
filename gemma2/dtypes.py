"""The one dtype vocabulary: which names every script and API accepts, and why float16 is not one.

Gemma 2 runs in bfloat16 or float32. Both the short names (`bf16`, `fp32`) and PyTorch's
(`bfloat16`, `float32`) are accepted everywhere; float16 is refused with its reason: the larger
models' activations overflow its range (max 65504), while bfloat16 keeps float32's exponent.
"""

from __future__ import annotations

import argparse

import torch

# Name -> dtype. PyTorch's names first: error messages list the names in this order.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
}
_FLOAT16 = ("float16", "fp16", "half")
FLOAT16_REASON = "Gemma 2's activations overflow float16; use bfloat16 or float32"


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype a name (or a dtype) stands for; ValueError naming the accepted ones."""
    if isinstance(name, torch.dtype):
        if name == torch.float16:
            raise ValueError(f"float16 is refused: {FLOAT16_REASON}")
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not supported: use bfloat16 or float32")
        return name
    if name.lower() in _FLOAT16:
        raise ValueError(f"{name} is refused: {FLOAT16_REASON}")
    if name not in DTYPES:
        raise ValueError(f"{name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The short name of a dtype or any of its names: 'bf16' or 'fp32'."""
    return "bf16" if to_dtype(dtype) == torch.bfloat16 else "fp32"


def dtype_argument(value: str) -> str:
    """argparse `type=` for a dtype flag: the short name, or a usage error listing the names."""
    try:
        return dtype_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def compute_dtype_argument(value: str) -> str:
    """argparse `type=` for a compute dtype: 'auto' (bf16 on CUDA, fp32 on CPU) or a dtype name."""
    return "auto" if value == "auto" else dtype_argument(value)
