"""Throughput: model FLOPs per token against a hand count, PyTorch's FLOP counter and a brute-force
count of attended pairs; MFU in the trainer's metrics; the peak FLOP/s table's precedence."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gemma2 import Gemma2ForCausalLM
from gemma2.data import Datasets, PackedSequences
from gemma2.student import init_weights
from gemma2.throughput import forward_flops_per_token, peak_flops, training_flops_per_token
from gemma2.trainer import TrainConfig, train

from conftest import tiny_training_config

# tiny_training_config: V 64, D 32, F 64, 2 layers (0 local, window 8; 1 global), H 4, KV 2, head_dim 8.
# Weights per layer: q 4*8*32 = 1024, k 512, v 512, o 1024, gate / up / down 64*32 = 2048 each:
# 9216; two layers and the tied head (64*32 = 2048): 20480, at 2 FLOPs each = 40960 per token.
# Attended pairs of a 16-token sequence: local 1+...+8 + 8*8 = 100, global 1+...+16 = 136;
# 4 * H * head_dim = 128 FLOPs each: 128 * 236 / 16 = 1888 per token.
HAND_FORWARD = 40960 + 1888  # = 42848


def test_forward_flops_match_a_hand_count():
    assert forward_flops_per_token(tiny_training_config(), 16) == HAND_FORWARD
    assert training_flops_per_token(tiny_training_config(), 16) == 3 * HAND_FORWARD
    assert training_flops_per_token(tiny_training_config(), 16, tiny_training_config()) == 4 * HAND_FORWARD


@pytest.mark.parametrize("seq_len", [5, 16, 37])
def test_forward_flops_match_the_flop_counter_and_brute_force_pairs(seq_len):
    """PyTorch counts the projections exactly and attention as full T x T (the eager kernel
    computes the masked scores too); the model FLOPs keep only the pairs the mask lets through."""
    cfg = tiny_training_config(max_position_embeddings=64)
    B = 2
    with FlopCounterMode(display=False) as counter:
        Gemma2ForCausalLM(cfg)(torch.zeros(B, seq_len, dtype=torch.long))
    H, hd, L = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    projections = counter.get_total_flops() - B * L * 4 * H * hd * seq_len * seq_len
    pairs = sum(
        1
        for layer in range(L)
        for q in range(seq_len)
        for k in range(seq_len)
        if k <= q and (not cfg.is_local(layer) or q - k < cfg.sliding_window)
    )
    assert forward_flops_per_token(cfg, seq_len) * B * seq_len == pytest.approx(projections + B * 4 * H * hd * pairs)


def test_metrics_carry_throughput_and_mfu(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = Datasets(PackedSequences(torch.randint(3, 64, (2000,), generator=g).numpy().astype("int32"), 16), None)
    cfg = TrainConfig(out_dir=str(tmp_path / "a"), steps=2, batch_size=2, eval_every=0, device="cpu", peak_flops=1e9)
    teacher = init_weights(Gemma2ForCausalLM(tiny_training_config()), seed=1)
    for m in train(cfg, init_weights(Gemma2ForCausalLM(tiny_training_config())), data, teacher=teacher, progress=False):
        assert m["tokens_per_s_per_device"] == m["tokens_per_s"]  # one process
        # Student forward + backward and the live teacher's forward, per token, over 1e9 FLOP/s.
        assert m["mfu"] == pytest.approx(4 * HAND_FORWARD * m["tokens_per_s"] / 1e9)
    cfg = TrainConfig(out_dir=str(tmp_path / "b"), steps=1, batch_size=2, alpha=0, eval_every=0, device="cpu")
    (m,) = train(cfg, init_weights(Gemma2ForCausalLM(tiny_training_config())), data, progress=False)
    assert m["mfu"] is None  # no peak known for a CPU
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        TrainConfig(out_dir=str(tmp_path), peak_flops=0)


def test_peak_flops_table_picks_the_right_card(monkeypatch):
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
                       ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("Some new card", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert peak_flops(torch.device("cuda", 0), torch.bfloat16) == bf16, name
    assert peak_flops(torch.device("cuda", 0), torch.float16) is None
