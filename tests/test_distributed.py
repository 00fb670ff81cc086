"""gemma2.distributed on one process (the two-process FSDP run is tests/test_fsdp.py)."""

import torch

from gemma2 import distributed


def test_one_process_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_distributed() == (0, 1)
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()  # a no-op, not a hang
    distributed.close_distributed()
    rt = distributed.runtime("cpu")
    assert (rt.rank, rt.world, rt.device, rt.sharded, rt.is_main) == (0, 1, torch.device("cpu"), False, True)
    t = torch.tensor([3.0])
    assert rt.all_reduce(t) is t and t.item() == 3.0  # nothing to sum with
