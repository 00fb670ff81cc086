"""Every attention kernel against the eager reference, outputs and gradients, 1e-5.

Shapes of the parity configs: an odd window, left padding, sequences longer than twice the window.
Only real positions count: a padding query attends to nothing, and each kernel fills it differently.

Kernels are compared in fp32. Whole models are compared in fp64 weights: on this random model the
eager reference's own fp32 rounding moves the logits by 1.1e-5 (eager fp32 against eager fp64), so
an fp32 model comparison at 1e-5 would measure summation order, not the kernel.
"""

import warnings

import pytest
import torch

from conftest import hf_twin, left_padded, tiny_config
from gemma2 import attention
from gemma2.attention import banded, eager, flex, softcap, softcap_
from gemma2.masks import flex_block_mask, may_attend

CONFIG = tiny_config(sliding_window=7)  # odd window; sequences below are > 2W


def real_loss(logits, mask):
    """A loss over real positions only, weighted so every logit's gradient differs."""
    weights = torch.linspace(0.5, 1.5, logits.shape[-1], device=logits.device)
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


@pytest.mark.parametrize("block", [4, 128])  # 4: many blocks of both kinds; 128: one block
@pytest.mark.parametrize("window", [1, 3, 8, 40, None])  # 40: one block holds the whole sequence
def test_banded_kernel_matches_eager(window, block, monkeypatch):
    monkeypatch.setattr(attention, "BLOCK", block)
    g = torch.Generator().manual_seed(window or 0)
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
    with torch.inference_mode():  # the in-place path
        assert ((banded(q, k, v, valid, window, 0.35, 2.0) - want) * real).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [3, None])
def test_banded_gradients_of_a_query_that_sees_no_key(window, monkeypatch):
    """A query that sees no valid key (left padding; with a window, also past a run of invalid keys
    as long as it) outputs a mean of values whatever the scores: a loss on such queries alone moves
    no q or k, and the values' gradients sum to their outputs'."""
    monkeypatch.setattr(attention, "BLOCK", 4)
    g = torch.Generator().manual_seed(5)
    B, H, KV, T, hd = 2, 4, 2, 19, 8
    q, k, v = (torch.randn(B, n, T, hd, generator=g, requires_grad=True) for n in (H, KV, KV))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    valid[0, 8:] = False  # a run of invalid keys: queries 10 .. 18 see none of them in a window of 3
    cols = torch.arange(T)
    dead = ~may_attend(cols, cols, window=window, key_valid=valid).any(-1)  # [B, T], by the mask's definition
    assert dead.sum() == (6 + 9 if window else 6)
    d_out = torch.randn(B, H, T, hd, generator=g) * dead[:, None, :, None]
    dq, dk, dv = torch.autograd.grad(banded(q, k, v, valid, window, 0.35, 2.0), (q, k, v), d_out)
    assert dq.abs().max() == 0 and dk.abs().max() == 0
    want = d_out.view(B, KV, H // KV, T, hd).sum((2, 3))  # [B, KV, hd]
    assert (dv.sum(2) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [5, None])
def test_banded_bf16_gradients_are_as_accurate_as_autograd_through_eager(window, monkeypatch):
    """bf16 (the training dtype): banded's own backward lands within bf16 rounding of the fp64
    gradients. dQ as close as autograd through the bf16 eager reference; dK and dV within 1.25x
    of its error (measured 1.07-1.14x): they sum 8 query blocks' products, each rounded to bf16
    (CPU has no bf16 matmul into fp32), where eager rounds one product."""
    monkeypatch.setattr(attention, "BLOCK", 8)
    g = torch.Generator().manual_seed(3)
    B, H, KV, T, hd = 2, 4, 2, 64, 16
    q, k, v = (torch.randn(B, n, T, hd, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    d_out = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    mask = may_attend(torch.arange(T), torch.arange(T), window=window, key_valid=valid)

    def grads(kernel, dtype):
        x = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = kernel(*x, mask, 0.25, 5.0) if kernel is eager else kernel(*x, valid, window, 0.25, 5.0)
        return torch.autograd.grad(out, x, d_out.to(dtype))

    every = zip("qkv", grads(eager, torch.float64), grads(banded, torch.bfloat16), grads(eager, torch.bfloat16))
    for name, want, ours, reference in every:
        err, ref_err = ((t.double() - want).norm() / want.norm() for t in (ours, reference))
        assert err <= (1.02 if name == "q" else 1.25) * ref_err and err < 1e-2, (name, err, ref_err)


def test_in_place_softcap_is_the_softcap():
    """Within 4 fp32 roundings of the cap of the textbook formula in fp64 (measured: 2.0; the
    tanh formula itself in fp32: 0.9)."""
    x = torch.linspace(-400, 400, 100_001)  # both tails saturate, and zero is on the grid
    eps = torch.finfo(torch.float32).eps
    for cap, scale in ((50.0, 0.3), (30.0, 1.0)):
        want = softcap(x.double() * scale, cap)
        assert (softcap_(x.clone(), cap, scale).double() - want).abs().max() <= 4 * eps * cap


def saved_for_backward(kernel, T: int, window: int | None) -> list[int]:
    """The sizes of the tensors autograd keeps for one call of a kernel (head_dim 8)."""
    q, k, v = (torch.randn(1, 1, T, 8, requires_grad=True) for _ in range(3))
    valid = torch.ones(1, T, dtype=torch.bool)
    cols = torch.arange(T)
    args = (may_attend(cols, cols, window=window, key_valid=valid),) if kernel is eager else (valid, window)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kernel(q, k, v, *args, 1.0, 50.0)
    return saved


@pytest.mark.parametrize("block", [4, 16, 128])
@pytest.mark.parametrize("window", [4, None])
def test_banded_keeps_only_q_k_v_for_backward(window, block, monkeypatch):
    """Regression guard for O(T * W) training memory (O(T) here: the backward recomputes the
    scores): nothing of a block's scores is kept, whatever the window and block size."""
    monkeypatch.setattr(attention, "BLOCK", block)
    T = 64
    assert sorted(saved_for_backward(banded, T, window)) == [T, T * 8, T * 8, T * 8]  # key_valid, q, k, v
    assert max(saved_for_backward(eager, T, window)) >= T * T  # what the guard would see of a score matrix


def test_auto_picks_per_call():
    _, model = hf_twin(CONFIG, seed=12)  # window 7
    model.attention = "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with torch.no_grad():
        assert model.kernel_for(1, False, cpu) == "eager"  # one-token decode
        assert model.kernel_for(64, False, cpu) == "eager"  # chunked prefill: keys are not the queries'
        assert model.kernel_for(14, True, cpu) == "banded"  # within two windows it still skips the causal half
        assert model.kernel_for(15, True, cpu) == "banded"  # CPU compiles only when asked
        assert model.kernel_for(15, True, cuda) == "flex"
        model.compile_attention = True
        assert model.kernel_for(64, True, cpu) == "banded"  # faster on CPU than compiled flex
    assert model.kernel_for(64, True, cpu) == "banded"  # no FlexAttention backward on CPU
    assert model.kernel_for(64, True, cuda) == "flex"
    model.compile_attention = False
    assert model.kernel_for(64, True, cuda) == "banded"  # unfused flex is slower than banded
    # Compiled FlexAttention's CUDA kernel refuses heads below 16 (torch 2.13's Triton lowering).
    _, narrow = hf_twin(tiny_config(head_dim=8, query_pre_attn_scalar=8), seed=12)
    narrow.attention = "auto"
    assert narrow.kernel_for(64, True, cuda) == "banded" and narrow.kernel_for(64, True, cpu) == "banded"
    narrow.attention = "flex"
    assert narrow.kernel_for(64, True, cpu) == "flex"  # CPU's compiled kernel takes them
    with pytest.raises(ValueError, match="needs head_dim >= 16 .* this model's is 8: use attention='auto'"):
        narrow.kernel_for(64, True, cuda)
    narrow.compile_attention = False
    assert narrow.kernel_for(64, True, cuda) == "flex"  # unfused: no Triton kernel


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


@pytest.mark.slow
def test_compiled_flex_stays_compiled_past_dynamos_trace_limit(monkeypatch):
    """Each batch size is a shape the kernel is compiled for; prompt rows cut per batch make
    several per run. Dynamo's limit (1 here, 8 by default) must not send the kernel to flex's
    unfused fallback, which holds the whole score matrix (flex warns when it runs, once per
    process: its record of warnings shown is emptied first)."""
    from torch.nn.attention import flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_WARNINGS_SHOWN", set(), raising=False)
    g = torch.Generator().manual_seed(4)
    H, KV, T, hd = 4, 2, 29, 8
    cols = torch.arange(T)
    with torch._dynamo.config.patch(cache_size_limit=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for B in (5, 6, 7):  # batch sizes no other test compiles
            q, k, v = (torch.randn(B, n, T, hd, generator=g) for n in (H, KV, KV))
            valid = torch.ones(B, T, dtype=torch.bool)
            want = eager(q, k, v, may_attend(cols, cols, window=7, key_valid=valid), 0.35, 2.0)
            got = flex(q, k, v, flex_block_mask(cols, cols, 7, valid), 0.35, 2.0, compiled=True)
            assert (got - want).abs().max() <= 1e-5
    assert not [w for w in caught if "without torch.compile" in str(w.message)]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["flex", "banded"])
def test_cuda_training_paths_match_eager(impl):
    """Compiled FlexAttention forward and backward on CUDA (and banded), fp32: as close to the eager
    reference in fp64 as eager's own fp32 rounding is, up to 3x (see the module docstring: a whole
    fp32 model's rounding alone is ~1e-5 here)."""
    _, model = hf_twin(CONFIG, seed=14)
    ids, mask = (t.cuda() for t in left_padded([23, 17, 9], CONFIG.vocab_size))
    exact, exact_grads = logits_and_grads(model.double().cuda(), ids, mask)
    model = model.float()
    runs = {"eager": logits_and_grads(model, ids, mask)}
    model.attention = impl
    runs[impl] = logits_and_grads(model, ids, mask)
    real = mask.bool()
    errors = {name: (logits.double() - exact)[real].abs().max() for name, (logits, _) in runs.items()}
    assert errors[impl] <= 3 * errors["eager"] + 1e-7, errors
    for name, want in exact_grads.items():
        rounding = (runs["eager"][1][name].double() - want).abs().max()
        assert (runs[impl][1][name].double() - want).abs().max() <= 3 * rounding + 1e-7 * want.abs().max(), name


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
