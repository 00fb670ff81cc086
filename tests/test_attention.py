"""Every attention kernel against the eager reference, outputs and gradients, 1e-5.

Shapes of the parity configs: an odd window, left padding, sequences longer than twice the window.
Only real positions count: a padding query attends to nothing, and each kernel fills it differently.

Kernels are compared in fp32. Whole models are compared in fp64 weights: on this random model the
eager reference's own fp32 rounding moves the logits by 1.1e-5 (eager fp32 against eager fp64), so
an fp32 model comparison at 1e-5 would measure summation order, not the kernel.
"""

import pytest
import torch

from conftest import hf_twin, left_padded, tiny_config
from gemma2.attention import banded, eager, flex
from gemma2.masks import flex_block_mask, may_attend

CONFIG = tiny_config(sliding_window=7)  # odd window; sequences below are > 2W


def real_loss(logits, mask):
    """A loss over real positions only, weighted so every logit's gradient differs."""
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    return (logits.log_softmax(-1) * weights)[mask.bool()].sum()


def logits_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(ids, mask)
    real_loss(logits, mask).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["banded", "auto"])
def test_training_paths_match_eager_in_outputs_and_gradients(impl):
    _, model = hf_twin(CONFIG, seed=11)
    model = model.double()
    ids, mask = left_padded([23, 17, 9], CONFIG.vocab_size)
    want, want_grads = logits_and_grads(model, ids, mask)
    model.attention = impl
    assert model.kernel_for(23, True, torch.device("cpu")) == "banded"  # CPU autograd: banded
    got, grads = logits_and_grads(model, ids, mask)
    assert (got - want)[mask.bool()].abs().max() <= 1e-5
    for name, g in grads.items():
        assert (g - want_grads[name]).abs().max() <= 1e-5 * max(1.0, want_grads[name].abs().max()), name


@pytest.mark.parametrize("window", [1, 3, 8, 40])  # 40: one block holds the whole sequence
def test_banded_kernel_matches_eager(window):
    g = torch.Generator().manual_seed(window)
    B, H, KV, T, hd = 2, 4, 2, 29, 8
    q, k, v = (torch.randn(B, n, T, hd, generator=g, requires_grad=True) for n in (H, KV, KV))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    cols = torch.arange(T)
    want = eager(q, k, v, may_attend(cols, cols, window=window, key_valid=valid), 0.35, 2.0)
    got = banded(q, k, v, valid, window, 0.35, 2.0)
    real = valid[:, None, :, None].float()
    assert ((got - want) * real).abs().max() <= 1e-5
    for a, b in zip(torch.autograd.grad((want * real).sum(), (q, k, v)), torch.autograd.grad((got * real).sum(), (q, k, v))):
        assert (a - b).abs().max() <= 1e-5


def test_banded_memory_is_linear_in_t():
    """Regression guard for O(T * W): no [T, T] score matrix in a local layer's graph."""
    T, W = 64, 4
    q, k, v = (torch.randn(1, 1, T, 8, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        banded(q, k, v, torch.ones(1, T, dtype=torch.bool), W, 1.0, 50.0)
    assert max(saved) <= T * (2 * W - 1) * 8  # k unfolded into blocks [T / W, 2W - 1, hd]: linear in T
    assert max(saved) < T * T // 2  # eager keeps T * T scores


def test_auto_picks_per_call():
    _, model = hf_twin(CONFIG, seed=12)  # window 7
    model.attention = "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.no_grad():
        assert model.kernel_for(1, False, cpu) == "eager"  # one-token decode
        assert model.kernel_for(64, False, cpu) == "eager"  # chunked prefill: keys are not the queries'
        assert model.kernel_for(14, True, cpu) == "eager"  # within two windows banded saves nothing
        assert model.kernel_for(15, True, cpu) == "banded"  # CPU compiles only when asked
        assert model.kernel_for(15, True, cuda) == "flex"
        model.compile_attention = True
        assert model.kernel_for(64, True, cpu) == "flex"
    assert model.kernel_for(64, True, cpu) == "banded"  # no FlexAttention backward on CPU
    assert model.kernel_for(64, True, cuda) == "flex"
    model.compile_attention = False
    assert model.kernel_for(64, True, cuda) == "banded"  # unfused flex is slower than banded


@pytest.mark.slow
@pytest.mark.parametrize("window", [7, None])
def test_compiled_flex_kernel_matches_eager_on_cpu(window):
    """The compiled kernel (forward only on CPU; no fp64 there) with the model's block masks, a
    length (29) padded to its bucket (128), left padding. One compilation serves both parameters."""
    g = torch.Generator().manual_seed(3)
    B, H, KV, T, hd = 2, 4, 2, 29, 8
    q, k, v = (torch.randn(B, n, T, hd, generator=g) for n in (H, KV, KV))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False
    cols = torch.arange(T)
    want = eager(q, k, v, may_attend(cols, cols, window=window, key_valid=valid), 0.35, 2.0)
    got = flex(q, k, v, flex_block_mask(cols, cols, window, valid), 0.35, 2.0, compiled=True)
    assert ((got - want) * valid[:, None, :, None]).abs().max() <= 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["flex", "banded"])
def test_cuda_training_paths_match_eager(impl):
    """Compiled FlexAttention forward and backward on CUDA (and banded), fp32, against eager."""
    _, model = hf_twin(CONFIG, seed=14)
    model = model.cuda()
    ids, mask = (t.cuda() for t in left_padded([23, 17, 9], CONFIG.vocab_size))
    want, want_grads = logits_and_grads(model, ids, mask)
    model.attention = impl
    got, grads = logits_and_grads(model, ids, mask)
    assert (got - want)[mask.bool()].abs().max() <= 1e-5
    for name, g in grads.items():
        assert (g - want_grads[name]).abs().max() <= 1e-5 * max(1.0, want_grads[name].abs().max()), name


@pytest.mark.cuda
def test_cuda_bf16_flex_agrees_with_fp32_eager():
    hf, model = hf_twin(CONFIG, seed=15)
    ids, mask = left_padded([23, 17], CONFIG.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).logits
        model = model.to("cuda", torch.bfloat16)
        model.attention = "auto"
        got = model(ids.cuda(), mask.cuda()).cpu()
    err = (got - want)[mask.bool()].abs()
    assert err.mean() <= 0.05 * want[mask.bool()].abs().mean()  # as the CPU bf16 test
