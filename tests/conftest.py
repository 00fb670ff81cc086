"""Shared test helpers: tiny random configs and a transformers twin with the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from gemma2 import Gemma2Config, Gemma2ForCausalLM
from gemma2.prompts import Examples, PromptRows


TIMINGS = ("tokens_per_s", "tokens_per_s_per_device", "mfu")  # metrics that measure the clock


def assert_same_metrics(got: list[dict], expected: list[dict], rel: float, abs: float, skip: tuple = ()) -> None:
    """Two runs' metrics records agree: the same steps and keys, every value but the clock's (and
    `skip`'s) close."""
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for a, b in zip(got, expected):
        assert a.keys() == b.keys(), a["step"]
        for key in a.keys() - {*TIMINGS, *skip}:
            if b[key] is None:
                assert a[key] is None, (a["step"], key)
            else:
                assert a[key] == pytest.approx(b[key], rel=rel, abs=abs), (a["step"], key)


def tiny_config(**overrides) -> Gemma2Config:
    """A tiny Gemma 2: GQA (4 / 2 heads), H * head_dim != D, window well below the context."""
    values = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=24,
        sliding_window=8, max_position_embeddings=128,
    )  # fmt: skip
    return Gemma2Config(**(values | overrides))


def tiny_training_config(**overrides) -> Gemma2Config:
    """A still smaller Gemma 2 for training tests (hundreds of steps in seconds): GQA, two layers
    (one local, one global), a window below the context."""
    values = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
        sliding_window=8, max_position_embeddings=64,
    )  # fmt: skip
    return Gemma2Config(**(values | overrides))


def hf_config(cfg: Gemma2Config):
    """The oracle's config, written field by field (not through our own config.json writer)."""
    import transformers

    return transformers.Gemma2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        max_position_embeddings=cfg.max_position_embeddings,
        attn_logit_softcapping=cfg.attn_logit_softcapping,
        final_logit_softcapping=cfg.final_logit_softcapping, rms_norm_eps=cfg.rms_norm_eps,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation="eager",
    )  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Every parameter random, norm weights included, large enough that both softcaps bite.

    The embedding is also the output head: a larger scale there pushes logits past the final cap.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.5 if "embed" in name else 0.5 if "norm" in name else std
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def hf_twin(cfg: Gemma2Config, seed: int = 0):
    """A random transformers Gemma2ForCausalLM (eager, fp32) and our model with its weights."""
    import transformers

    hf = transformers.Gemma2ForCausalLM(hf_config(cfg)).eval()
    randomize_(hf, seed)
    ours = Gemma2ForCausalLM(cfg).eval()
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids `[B, max(lengths)]` left-padded with 0, and the 1/0 attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, T - n :] = 1
        ids[row, : T - n] = 0
    return ids, mask


def random_prompt_rows(n: int, seed: int, vocab: int, stop_ids: tuple[int, ...] = ()) -> PromptRows:
    """n random examples as prompt rows: prompts of 2-8 tokens left-padded to 8, completions of 1-8
    tokens cut to 6 (gemma2.prompts), ids 3 .. vocab - 1."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=rng.integers(2, 9)).tolist() for _ in range(n)]
    completions = [rng.integers(3, vocab, size=rng.integers(1, 9)).tolist() for _ in range(n)]
    examples = Examples.of(zip(prompts, completions))
    return PromptRows(examples, prompt_len=8, max_new_tokens=6, pad_id=0, stop_ids=stop_ids)


@contextmanager
def failing(module: torch.nn.Module, on_call: int = 1) -> Iterator[None]:
    """While inside: the `on_call`-th forward of `module` raises RuntimeError("injected") once it
    has run (a failure in the middle of a model, or at its end)."""
    calls = 0

    def hook(*_):
        nonlocal calls
        calls += 1
        if calls == on_call:
            raise RuntimeError("injected")

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def until_injected(steps: Iterator[torch.Tensor]) -> list[int]:
    """The tokens a stream yields before its injected failure, which must come."""
    got: list[int] = []
    with pytest.raises(RuntimeError, match="injected"):
        for token in steps:
            got.append(int(token))
    return got


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test model is tiny: extra threads only add hand-offs, which on a busy 2-core machine
    cost more than the matmuls (several times slower per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
