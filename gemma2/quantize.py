"""Weight-only int8: half the bytes a decode step reads, for the same Gemma 2.

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth.
Here every projection (q, k, v, o, gate, up, down) and the tied embedding / output head (the
largest single read) hold int8 weights with one scale per output channel (row):

    s = max_j |w[i, j]| / 127,   q[i, j] = round(w[i, j] / s)  in [-127, 127],   w ~ q * s[:, None]

Activations stay in the model dtype (bf16 or fp32; the scales are stored in it); norms, RoPE,
softcaps and softmax are untouched, because only the modules that hold those matrices are
swapped (`Int8Linear` for `nn.Linear`, `Int8Embedding` for the tied embedding): the model's
forward has no quantisation branch. Inference only: the int8 tensors are buffers, not parameters.

Kernels: decoding on CPU in bf16 uses `torch.ops.aten._weight_int8pack_mm` (int8 weights x bf16
activations with per-row scales, no dequantised copy); everything else (a prefill, fp32
activations, CUDA) uses `dequantize_matmul`, the readable reference: it dequantises the weight to
the activation dtype and multiplies. That is correct and halves resident memory, but not the bytes
a step reads, so the decode speed-up is a CPU + bf16 one (CUDA has not run here).

Layout on disk, ours and the official PyTorch release's alike: for each quantised module
`<module>.weight` int8 `[out, in]` and `<module>.weight_scaler` `[out]` (the embedding's scaler
has one entry per token). Ours uses the Hugging Face names in safetensors (`save_model` of a
quantised model); the official `.ckpt` uses its own (`embedder.*`, one fused `qkv_proj` whose
weight and scaler rows are q, k, v). A checkpoint is int8 when it holds an int8 weight or a
`weight_scaler`; then every projection weight must be int8 and have its scaler. A float
checkpoint is quantised tensor by tensor while it loads (`load_model(..., quantize="int8")`), so
the model never exists in bf16 and int8 at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import CheckpointError

QUANTIZE_MODES = ("int8",)
SCALER = "weight_scaler"
# The CPU kernel's time grows with the rows while dequantising once does not: measured on one
# AVX-512 core (4096 x 1024, bf16) the two cross between 16 and 64 rows.
_KERNEL_MAX_ROWS = 16
_ROWS_PER_CHUNK_BYTES = 16 * 2**20  # fp32 rows quantised at a time (the transients are a few times this)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")


def quantize_per_channel(weight: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """`[out, in]` float -> (int8 `[out, in]`, scales `[out]` in `dtype`), symmetric, one scale per
    row: s = max|row| / 127 rounded to `dtype` (the scales' storage and compute dtype), q =
    round(w / s), so that each weight is within s / 2 of q * s with the scale as it is used.

    Rows are processed in chunks, so quantising the 2B embedding never holds it in fp32 whole.
    """
    out_features, in_features = weight.shape
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(out_features, dtype=dtype, device=weight.device)
    step = max(1, _ROWS_PER_CHUNK_BYTES // (4 * max(in_features, 1)))
    for start in range(0, out_features, step):
        w = weight[start : start + step].float()
        # An all-zero row gets the smallest positive scale: its int8 values are 0 either way.
        s = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
        q[start : start + step] = torch.round(w / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
        scale[start : start + step] = s
    return q, scale


def dequantize_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The reference int8 linear: `x [..., in] @ (q * scale[:, None]).T -> [..., out]`, through a
    dequantised copy of the weight in the activation dtype."""
    weight = q.to(x.dtype).mul_(scale.to(x.dtype)[:, None])
    return F.linear(x, weight)


def int8_matmul(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """`x [..., in]` times the int8 weight `q [out, in]` with row scales `[out]` -> `[..., out]`.

    The CPU int8 kernel (one byte read per weight) where it is fast: bf16 activations and at most
    `_KERNEL_MAX_ROWS` rows, i.e. decoding. Elsewhere `dequantize_matmul`: a prefill amortises the
    dequantised copy over its rows, the kernel's fp32 path is slower than dequantising even for
    one row (measured: 8 ms against 4 ms for 4096 x 1024), and CUDA has no such kernel. The kernel
    also needs an input width that is a multiple of 16: in torch 2.13 it reads past the end of the
    rows otherwise (garbage, or a segfault); every published Gemma 2 width is one.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or rows > _KERNEL_MAX_ROWS or x.shape[-1] % 16:
        return dequantize_matmul(x, q, scale)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), q, scale.to(x.dtype))
    return y.view(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A bias-free `nn.Linear` with an int8 weight and per-output-channel scales."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [out, in]
        self.register_buffer(SCALER, scale)  # [out], in the activation dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias; Gemma 2 has none anywhere")
        return cls(*quantize_per_channel(linear.weight.detach(), linear.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.weight, self.weight_scaler)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, int8"


class Int8Embedding(nn.Module):
    """The tied embedding / output head in int8: a row per token, one scale per row.

    `forward(ids)` gathers and dequantises rows; `attend(hidden)` is the output head (the int8
    matmul against every row), the same call as the float embedding's.
    """

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # int8 [V, D]
        self.register_buffer(SCALER, scale)  # [V], in the activation dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        return cls(*quantize_per_channel(embedding.weight.detach(), embedding.weight.dtype))

    def forward(self, input_ids: Tensor) -> Tensor:
        rows = self.weight[input_ids]  # [..., D] int8
        return rows.to(self.weight_scaler.dtype) * self.weight_scaler[input_ids][..., None]

    def attend(self, hidden: Tensor) -> Tensor:
        return int8_matmul(hidden, self.weight, self.weight_scaler)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"


def quantize_model(model: nn.Module) -> nn.Module:
    """Swap, in place and module by module, every `nn.Linear` for an `Int8Linear` and the tied
    embedding for an `Int8Embedding`; return the model. Each float weight is released as soon as
    its int8 copy exists. On the `meta` device this only builds the int8 model's shape."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, child_name, Int8Linear.from_linear(child))
            elif isinstance(child, nn.Embedding):
                setattr(parent, child_name, Int8Embedding.from_embedding(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model holds resident (int8 or not), and what
    one decode step reads (every matrix once; the tied head reads the whole embedding)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Int8Loading:
    """Places a checkpoint's tensors, one at a time, into the state dict of a float or int8 model.

    `load_model` builds the model on `meta` and hands every tensor through `place`, which yields
    what goes into the state dict: int8 weights as they are, scalers and float tensors in `dtype`,
    and, with quantize="int8", each float projection or embedding weight quantised as it arrives.
    A checkpoint holding int8 weights or a `weight_scaler` is int8 whatever `quantize` says: the
    first such tensor swaps the still empty model to int8 and adds the scalers to `expected`, which
    the loader checks every key against. `check` then refuses an int8 checkpoint in which some
    projection weight is not int8.
    """

    def __init__(self, model: nn.Module, quantize: str | None, expected: dict[str, torch.Size],
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        check_quantize(quantize)
        self.model, self.expected, self.dtype, self.device = model, expected, dtype, device
        self.quantizable = {
            f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
        }
        self.int8 = False  # the model has been swapped to int8
        self.int8_checkpoint = False  # the file holds int8 weights or scalers
        self.float_weights: dict[str, torch.dtype] = {}  # quantizable weights the file holds in float
        if quantize is not None:
            self._to_int8()

    def _to_int8(self) -> None:
        if not self.int8:
            quantize_model(self.model)  # on meta: shapes only
            self.expected.update({k: v.shape for k, v in self.model.state_dict().items()})
            self.int8 = True

    def _refuse_float(self, name: str) -> CheckpointError:
        return CheckpointError(
            f"{name} is {self.float_weights[name]}, not int8, in an int8 checkpoint (one with int8 weights and "
            f"{SCALER}s): every projection and the embedding must be int8; the checkpoint is inconsistent"
        )

    def place_all(self, pairs: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for name, tensor in pairs:
            yield from self.place(name, tensor)

    def place(self, name: str, tensor: Tensor) -> Iterator[tuple[str, Tensor]]:
        """One checkpoint tensor (Hugging Face name) -> the (name, tensor) pairs of the state dict."""
        if name.endswith("." + SCALER) or tensor.dtype == torch.int8:
            self._to_int8()
            self.int8_checkpoint = True
        if name.endswith("." + SCALER):
            weight = name.removesuffix(SCALER) + "weight"
            if weight in self.float_weights:
                raise self._refuse_float(weight)
            yield name, tensor.to(device=self.device, dtype=self.dtype)
        elif tensor.dtype == torch.int8:
            if name not in self.quantizable:
                raise CheckpointError(f"{name} is int8, but only projection and embedding weights can be")
            yield name, tensor.to(self.device)
        elif name in self.quantizable and self.int8:
            self.float_weights[name] = tensor.dtype
            if self.int8_checkpoint:
                raise self._refuse_float(name)
            q, scale = quantize_per_channel(tensor, self.dtype)
            yield name, q.to(self.device)
            yield name.removesuffix("weight") + SCALER, scale.to(self.device)
        else:
            if name in self.quantizable:
                self.float_weights[name] = tensor.dtype
            yield name, tensor.to(device=self.device, dtype=self.dtype)

    def check(self) -> None:
        """After the last tensor: an int8 checkpoint must not have had float projection weights."""
        if self.int8_checkpoint and self.float_weights:
            raise self._refuse_float(next(iter(self.float_weights)))
