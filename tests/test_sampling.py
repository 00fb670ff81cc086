"""Sampling: filters keep exactly the allowed tokens, sampling follows the filtered distribution,
and a seeded generator makes it reproducible."""

import math

import pytest
import torch

from gemma2.sampling import apply_temperature, probabilities, sample, top_k_filter, top_p_filter

N = 4000  # draws per distribution: rows of one batched call


def draws(logits: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    """N samples from one row of logits `[V]`."""
    g = torch.Generator().manual_seed(seed)
    return sample(logits.expand(N, -1), generator=g, **kwargs)


def kept(filtered: torch.Tensor) -> set[int]:
    """The token ids a filter left in a single row `[1, V]`."""
    return set(torch.nonzero(filtered[0].isfinite()).flatten().tolist())


def test_top_k_keeps_the_k_highest_with_ties_broken_by_id():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.5, 3.0]])
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 2)) == {1, 3}  # three tied at 3.0: the lowest ids win
    assert kept(top_k_filter(logits, 4)) == {1, 2, 3, 5}
    assert torch.equal(top_k_filter(logits, 6), logits)
    assert torch.equal(top_k_filter(logits, 100), logits)
    # Survivors keep their values.
    assert torch.equal(top_k_filter(logits, 2)[0, [1, 3]], logits[0, [1, 3]])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 1, 3, 2, 0
    logits = probs.log()[None]
    assert kept(top_p_filter(logits, 0.4)) == {1}
    assert kept(top_p_filter(logits, 0.6)) == {1, 3}
    assert kept(top_p_filter(logits, 0.9)) == {1, 3, 2}
    assert kept(top_p_filter(logits, 0.99)) == {0, 1, 2, 3}
    assert kept(top_p_filter(logits, 1e-9)) == {1}  # always at least the top token
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_ties_are_deterministic():
    logits = torch.zeros(1, 8)  # eight equal tokens: 1/8 each
    assert kept(top_p_filter(logits, 0.3)) == {0, 1, 2}  # 3/8 >= 0.3: the lowest ids
    batch = torch.tensor([[0.0, 0.0, 5.0, 0.0], [5.0, 0.0, 0.0, 0.0]])
    out = top_p_filter(batch, 0.5)  # rows are filtered independently
    assert kept(out[:1]) == {2} and kept(out[1:]) == {0}


@pytest.mark.parametrize(
    "kwargs, allowed",
    [
        (dict(top_k=3), {2, 5, 7}),
        (dict(top_p=0.5), {7, 2}),  # probabilities 0.36, 0.22, 0.13, ...
        (dict(top_p=0.6), {7, 2, 5}),
        (dict(top_k=3, top_p=0.7), {7, 2}),  # renormalised over three: 0.51, 0.31, 0.19
        (dict(top_k=2, top_p=0.99), {7, 2}),  # top-p acts on what top-k left
    ],
)
def test_filtered_sampling_never_leaves_the_allowed_set(kwargs, allowed):
    logits = torch.tensor([0.0, 0.1, 2.0, 0.2, 0.3, 1.5, 0.4, 2.5, 0.5, 0.6])
    got = draws(logits, temperature=1.0, **kwargs)
    assert set(got.tolist()) == allowed  # every allowed token drawn, nothing else


def test_samples_follow_the_renormalised_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0])
    got = draws(logits, temperature=1.0, top_k=3)
    want = logits[[1, 2, 3]].softmax(-1)
    freq = torch.bincount(got, minlength=5).float() / N
    assert freq[[0, 4]].sum() == 0
    # Binomial standard error at N = 4000 is <= 0.008: 5 sigma.
    assert (freq[[1, 2, 3]] - want).abs().max() < 0.04


def test_probabilities_are_the_filtered_renormalised_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0], [0.5, 0.0, 0.0, 0.0, 0.0]])
    got = probabilities(logits, temperature=0.5, top_k=3, top_p=0.8)
    # Row 0 at temperature 0.5: top-3 keeps e^2, e^4, e^6, renormalised 0.016, 0.117, 0.867; the
    # smallest set reaching 0.8 is token 3 alone.
    assert torch.equal(got[0], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))
    # Row 1: 0.5 / 0.5 = 1 against four zeros; top-3 keeps ids 0, 1, 2 (ties by id): e, 1, 1,
    # renormalised 0.58, 0.21, 0.21, and top-p needs all three to reach 0.8.
    e = math.e
    assert torch.allclose(got[1], torch.tensor([e / (e + 2), 1 / (e + 2), 1 / (e + 2), 0.0, 0.0]))
    assert torch.equal(probabilities(logits, temperature=0.0), torch.eye(5)[[3, 0]])  # greedy: the argmax


def test_temperature_scales_and_approaches_greedy():
    logits = torch.tensor([[0.3, 2.0, 1.9, -1.0]])
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    share_of_argmax = [(draws(logits[0], temperature=t) == 1).float().mean().item() for t in (2.0, 1.0, 0.3, 0.05)]
    assert share_of_argmax == sorted(share_of_argmax)  # colder is greedier
    # The gap of 0.1 becomes 2000 at temperature 5e-5: the second token has probability e^-2000.
    assert (draws(logits[0], temperature=5e-5) == 1).all()
    random_logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(random_logits, temperature=1e-6, generator=g), random_logits.argmax(-1))


def test_temperature_zero_is_argmax_and_consumes_no_randomness():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    got = sample(logits, temperature=0.0, top_k=1, top_p=0.1, generator=g)
    assert got.tolist() == [1, 0]  # the first of two equal maxima
    assert torch.equal(g.get_state(), state)


def test_same_seed_same_samples_different_seed_different_samples():
    logits = torch.zeros(50)
    a, b = draws(logits, seed=7, temperature=1.0), draws(logits, seed=7, temperature=1.0)
    c = draws(logits, seed=8, temperature=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=math.nan), "temperature must be >= 0"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(top_k=2.5), "top_k must be an integer >= 1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(torch.zeros(1, 4), **({"temperature": 1.0} | kwargs))
