"""Distributed setup and FSDP2 wrapping: the one place that knows about process groups.

Run the same code under torchrun: `init_distributed` joins the group torchrun describes (NCCL on
GPUs, gloo on CPU), `runtime` says which rank, world and device this process has, and `shard`
wraps a model with FSDP2 (`fully_shard`): every Block one all-gather unit, the root holding the
embedding and the final norm (a model built on `meta` by gemma2.sharded_load is filled there).
Outside torchrun everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .model import Gemma2ForCausalLM
from .sharded_load import materialize


def launched_world() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Whether torchrun started this process (it sets TORCHELASTIC_RUN_ID in every worker, with
    one process too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): NCCL when this machine has
    GPUs, gloo otherwise. Returns (rank, world_size); (0, 1) outside torchrun."""
    if launched_world() == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def close_distributed() -> None:
    """Leave the process group, if this process joined one, once every rank is here: no rank
    tears the group down while a peer's last collective may still be in flight."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when this process is one of several in a process group."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@dataclass
class Runtime:
    """Where this process runs: its rank, the world size, its device, and whether it shards."""

    rank: int
    world: int
    device: torch.device
    sharded: bool  # FSDP2 across `world` processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def all_reduce(self, t: Tensor) -> Tensor:
        if self.sharded:
            dist.all_reduce(t)
        return t


def runtime(device: str | None = None) -> Runtime:
    """This process's Runtime. In a process group the device follows the backend (the current
    GPU for NCCL, the CPU for gloo); alone it is `device`, else cuda if available, else cpu."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            here = torch.device("cuda", torch.cuda.current_device())
        else:
            here = torch.device("cpu")
        return Runtime(dist.get_rank(), dist.get_world_size(), here, True)
    return Runtime(0, 1, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), False)


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def weights_checksum(module: nn.Module) -> Tensor:
    """The sum of the absolute values and the sum of squares of every weight of `module` (int8
    weights and their scales, which are buffers, included), float64 [2], over this rank's shards
    (FSDP2 pads a shard with zeros, which add nothing; all-reduce it for the whole model). Both are
    sums of positive terms, so their rounding is relative to them (a plain sum can be near zero),
    and fine-tuning moves both. A float64 copy of 4M values at a time, never of a whole weight (the
    27B embedding would be 9.4 GB)."""
    tensors = [*module.parameters(), *module.buffers()]
    sums = torch.zeros(2, dtype=torch.float64, device=tensors[0].device if tensors else None)
    for t in tensors:
        for piece in local_shard(t).detach().reshape(-1).split(1 << 22):
            x = piece.double()
            sums += torch.stack([x.abs().sum(), x.square().sum()])
    return sums


def move_to(module: nn.Module, device: torch.device) -> None:
    """module.to(device), skipped when every parameter is already there: then it would change
    nothing, and the fake tensors that gemma2.memory_plan traces with cannot be moved. A model on
    `meta` (gemma2.sharded_load) stays there: it gets its shards on the device when sharded."""
    if any(p.device != device and not p.is_meta for p in module.parameters()):
        module.to(device)


def shard(root: nn.Module, model: Gemma2ForCausalLM, rt: Runtime, param_dtype: torch.dtype | None) -> None:
    """FSDP2: each Block of `model` is one all-gather unit; `root` (which holds `model`) holds the
    embedding and final norm. param_dtype: the dtype the unsharded parameters compute in (None:
    their own); gradients are reduced in fp32. A model still on `meta` (gemma2.sharded_load) then
    gets this rank's shards on the device, filled from its checkpoint or fresh values."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the mesh reads real rank lists, even while gemma2.memory_plan traces
        mesh = init_device_mesh(rt.device.type, (rt.world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    materialize(root, rt.device)
