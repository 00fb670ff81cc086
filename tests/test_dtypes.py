import argparse

import pytest
import torch

from gemma2.dtypes import compute_dtype_argument, dtype_argument, dtype_name, to_dtype


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                         ("fp32", torch.float32), ("float32", torch.float32)])  # fmt: skip
def test_both_spellings_name_the_same_dtype(name, dtype):
    assert to_dtype(name) is dtype
    assert to_dtype(dtype) is dtype
    assert dtype_name(name) == {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


@pytest.mark.parametrize("name", ["fp16", "float16", "half", torch.float16])
def test_float16_is_refused_with_the_reason(name):
    with pytest.raises(ValueError, match="overflow float16; use bfloat16 or float32"):
        to_dtype(name)


def test_unknown_names_list_the_accepted_ones():
    with pytest.raises(ValueError, match="'int8' is not one of float32, bfloat16, fp32, bf16"):
        to_dtype("int8")
    with pytest.raises(ValueError, match="not supported"):
        to_dtype(torch.float64)


def test_argparse_types():
    assert dtype_argument("bfloat16") == "bf16"
    assert compute_dtype_argument("auto") == "auto"
    assert compute_dtype_argument("float32") == "fp32"
    with pytest.raises(argparse.ArgumentTypeError, match="overflow"):
        dtype_argument("fp16")
