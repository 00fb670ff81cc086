"""Distillation losses against textbook formulas written here (float64 softmax and explicit sums),
and the chunked loss against the unchunked one in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from gemma2.distill import (
    TeacherHead,
    chunked_distill_loss,
    distill_sums,
    kd_loss,
    teacher_topk,
    topk_kd_loss,
)

# ------------------------------------------------------------------------------------------------
# Textbook definitions (float64, no helpers from the module under test)


def probs(logits, T=1.0):
    return torch.softmax(logits.double() / T, dim=-1)


def kl(p, q):
    """KL(p || q) per row: sum_x p(x) log(p(x) / q(x))."""
    return (p * (p.log() - q.log())).sum(-1)


def textbook(student, teacher, objective, T=1.0, beta=0.5):
    """Per-token loss before the temperature**2 factor."""
    q, p = probs(student, T), probs(teacher, T)
    if objective == "forward_kl":
        return kl(p, q)
    if objective == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))


def softcap(x, cap):
    return cap * torch.tanh(x / cap)


def logits_pair(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


OBJECTIVES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


# ------------------------------------------------------------------------------------------------
# kd_loss identities


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
def test_nonnegative_and_zero_on_equal(objective, beta):
    s, t = logits_pair(4, 7, 33)
    assert kd_loss(s, t, objective=objective, beta=beta) > 0
    assert kd_loss(s, s.clone(), objective=objective, beta=beta).abs() < 1e-6


@pytest.mark.parametrize("objective,beta", OBJECTIVES)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_value_and_grad_match_textbook(objective, beta, T):
    s, t = logits_pair(5, 40, seed=1)
    s.requires_grad_(True)
    ours = kd_loss(s, t, objective=objective, temperature=T, beta=beta)
    ours.backward()
    s_ref = s.detach().double().requires_grad_(True)
    ref = textbook(s_ref, t, objective, T, beta).mean() * T**2
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-5)


def test_temperature_scaling():
    s, t = logits_pair(3, 50, seed=2)
    T = 3.0
    tempered = kl(probs(t / T), probs(s / T)).mean()
    torch.testing.assert_close(kd_loss(s, t, temperature=T).double(), T**2 * tempered, atol=1e-6, rtol=1e-5)


def test_jsd_endpoints_are_the_kls():
    s, t = logits_pair(6, 30, seed=3, scale=1.5)
    fwd = kd_loss(s, t, objective="forward_kl")
    rev = kd_loss(s, t, objective="reverse_kl")
    assert not torch.allclose(fwd, rev, rtol=0.05)  # the checks below would be vacuous otherwise
    torch.testing.assert_close(kd_loss(s, t, objective="jsd", beta=0.0), fwd)
    torch.testing.assert_close(kd_loss(s, t, objective="jsd", beta=1.0), rev)
    # ... and those are the formula's limits, not special values: approach them continuously.
    torch.testing.assert_close(kd_loss(s, t, objective="jsd", beta=3e-4), fwd, rtol=1e-2, atol=0)
    torch.testing.assert_close(kd_loss(s, t, objective="jsd", beta=1 - 3e-4), rev, rtol=1e-2, atol=0)


def test_jsd_half_is_four_times_textbook_jsd():
    s, t = logits_pair(6, 30, seed=4)
    p, q = probs(t), probs(s)
    m = (p + q) / 2
    jsd = (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean()
    ours = kd_loss(s, t, objective="jsd", beta=0.5)
    torch.testing.assert_close(ours.double(), 4 * jsd, atol=1e-6, rtol=1e-5)
    # symmetric at beta = 0.5
    torch.testing.assert_close(kd_loss(s, t, objective="jsd"), kd_loss(t, s, objective="jsd"))


def test_mask_excludes_tokens_from_value_and_gradient():
    s, t = logits_pair(2, 5, 20, seed=5)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]])
    s.requires_grad_(True)
    loss = kd_loss(s, t, mask)
    loss.backward()
    keep = mask.bool()
    ref = kl(probs(t[keep]), probs(s.detach()[keep])).mean()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-5)
    assert (s.grad[~keep] == 0).all() and (s.grad[keep] != 0).any()
    # garbage in ignored rows changes nothing; a bool mask means the same as a 0/1 mask
    s2 = s.detach().clone()
    s2[~keep] = 1e4
    torch.testing.assert_close(kd_loss(s2, t, keep), loss.detach())


# ------------------------------------------------------------------------------------------------
# Top-k


def test_topk_with_k_equal_vocab_is_forward_kl():
    s, t = logits_pair(3, 4, 25, seed=6)
    ids, lp, tail = teacher_topk(t, k=25, temperature=2.0)
    assert torch.isneginf(tail).all()
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    a = topk_kd_loss(s1, ids, lp, tail, temperature=2.0)
    b = kd_loss(s2, t, temperature=2.0)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_teacher_topk_is_a_distribution():
    _, t = logits_pair(5, 40, seed=7)
    ids, lp, tail = teacher_topk(t, k=6, temperature=1.5)
    p = probs(t, 1.5)
    torch.testing.assert_close(ids, p.topk(6, dim=-1).indices)
    torch.testing.assert_close(lp.double(), p.gather(-1, ids).log(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tail.double(), (1 - p.gather(-1, ids).sum(-1)).log(), atol=1e-6, rtol=1e-5)


def test_topk_tail_bucket_matches_textbook():
    s, t = logits_pair(6, 30, seed=8)
    T, k = 2.0, 5
    ids, lp, tail = teacher_topk(t, k, temperature=T)
    lp, tail = lp.half(), tail.half()  # as stored in a cache
    s.requires_grad_(True)
    ours = topk_kd_loss(s, ids.int(), lp, tail, temperature=T)
    ours.backward()
    # k + 1 buckets: teacher's cached probs vs the student's probs on the ids and off them
    s_ref = s.detach().double().requires_grad_(True)
    q = probs(s_ref, T)
    q_k = q.gather(-1, ids)
    q_tail = 1 - q_k.sum(-1)
    p_k, p_tail = lp.double().exp(), tail.double().exp()
    per_token = (p_k * (p_k.log() - q_k.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    ref = per_token.mean() * T**2
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Chunked loss == unchunked loss


V, D, D_T, CAP, T_CAP = 40, 12, 16, 5.0, 7.0  # small softcaps so they bite at these scales


def problem(shape=(3, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 2).requires_grad_(True)
    teacher = TeacherHead(torch.randn(*shape, D_T, generator=g), torch.randn(V, D_T, generator=g) * 2, T_CAP)
    targets = torch.randint(0, V, shape, generator=g)
    mask = torch.rand(shape, generator=g) > 0.3
    return h, w, teacher, targets, mask


def unchunked(h, w, teacher, targets, mask, objective, T, beta, alpha, cap=CAP):
    """The naive computation: full softcapped logits, kd_loss, plain cross-entropy."""
    logits = softcap(h @ w.T, cap) if cap else h @ w.T
    t_logits = softcap(teacher.hidden @ teacher.weight.T, teacher.final_softcap)
    loss = alpha * kd_loss(logits, t_logits, mask, objective=objective, temperature=T, beta=beta)
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(logits[mask], targets[mask])
    return loss


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("objective,beta", OBJECTIVES + [("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("T,alpha", [(1.0, 1.0), (2.0, 0.6)])
def test_chunked_matches_unchunked(objective, beta, T, alpha):
    h, w, teacher, targets, mask = problem()
    ref = unchunked(h, w, teacher, targets, mask, objective, T, beta, alpha)
    # chunk_size 4 does not divide the 20 counted tokens
    loss, stats = chunked_distill_loss(h, w, teacher, targets, mask, final_softcap=CAP, objective=objective,
                                       temperature=T, beta=beta, alpha=alpha, chunk_size=4)
    assert stats.tokens == int(mask.sum()) == 20
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for ours, want in zip(grads(loss, h, w), grads(ref, h, w)):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_chunked_teacher_logits_and_ignore_index():
    h, w, teacher, targets, mask = problem(seed=1)
    t_logits = softcap(teacher.hidden @ teacher.weight.T, teacher.final_softcap)
    ref = unchunked(h, w, teacher, targets, mask, "forward_kl", 1.0, 0.5, 0.3)
    targets = targets.masked_fill(~mask, -100)  # ignore_index instead of a mask
    loss, _ = chunked_distill_loss(h, w, t_logits, targets, final_softcap=CAP, alpha=0.3, chunk_size=5)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for ours, want in zip(grads(loss, h, w), grads(ref, h, w)):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_chunked_topk_matches_topk_kd_loss():
    h, w, teacher, targets, mask = problem(seed=2)
    T = 1.5
    t_logits = softcap(teacher.hidden @ teacher.weight.T, teacher.final_softcap)
    for k in (6, V):
        cache = teacher_topk(t_logits, k, temperature=T)
        ref = topk_kd_loss(softcap(h @ w.T, CAP), *cache, mask, temperature=T)
        loss, _ = chunked_distill_loss(h, w, cache, None, mask, final_softcap=CAP, temperature=T,
                                       chunk_size=7)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        for ours, want in zip(grads(loss, h, w), grads(ref, h, w)):
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_plain_cross_entropy_and_stats():
    h, w, teacher, targets, mask = problem(seed=7)
    logits = softcap(h @ w.T, CAP)
    ce = F.cross_entropy(logits[mask], targets[mask])
    loss, stats = chunked_distill_loss(h, w, None, targets, mask, final_softcap=CAP, alpha=0.0, chunk_size=6)
    torch.testing.assert_close(loss, ce)
    for ours, want in zip(grads(loss, h, w), grads(ce, h, w)):
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    # the stats are unnormalised sums: KD without temperature**2, CE at temperature 1
    T = 2.0
    _, stats = chunked_distill_loss(h, w, teacher, targets, mask, final_softcap=CAP, alpha=0.5, temperature=T)
    t_logits = softcap(teacher.hidden @ teacher.weight.T, T_CAP)
    kd = kd_loss(logits, t_logits, mask, temperature=T)
    torch.testing.assert_close(stats.kd_sum / stats.tokens, kd / T**2)
    torch.testing.assert_close(stats.ce_sum / stats.tokens, ce)



@pytest.mark.parametrize("objective", ["forward_kl", "jsd"])
def test_distill_sums_measure_what_the_textbook_says(objective):
    """Evaluation's sums: CE always, KD only with a teacher, no loss weighting, no gradient."""
    h, w, teacher, targets, mask = problem(seed=11)
    h.requires_grad_(True)
    T = 2.0
    logits = softcap(h @ w.T, CAP)
    t_logits = softcap(teacher.hidden @ teacher.weight.T, T_CAP)
    stats = distill_sums(h, w, teacher, targets, mask, final_softcap=CAP, objective=objective, temperature=T,
                         chunk_size=5)  # fmt: skip
    assert stats.tokens == int(mask.sum()) and not stats.ce_sum.requires_grad
    torch.testing.assert_close(stats.ce_sum / stats.tokens, F.cross_entropy(logits[mask], targets[mask]))
    kd = kd_loss(logits, t_logits, mask, objective=objective, temperature=T)
    torch.testing.assert_close(stats.kd_sum / stats.tokens, kd / T**2)
    no_teacher = distill_sums(h, w, None, targets, mask, final_softcap=CAP, chunk_size=5)
    assert no_teacher.kd_sum == 0 and torch.equal(no_teacher.ce_sum, stats.ce_sum)

def test_softcap_is_applied():
    h, w, teacher, targets, mask = problem(seed=3)
    loss, _ = chunked_distill_loss(h, w, teacher, final_softcap=CAP)
    capped = unchunked(h, w, teacher, targets, torch.ones_like(mask), "forward_kl", 1.0, 0.5, 1.0)
    uncapped = unchunked(h, w, teacher, targets, torch.ones_like(mask), "forward_kl", 1.0, 0.5, 1.0, cap=None)
    torch.testing.assert_close(loss, capped, atol=1e-5, rtol=1e-5)
    assert (loss - uncapped).abs() > 0.1


def test_microbatch_accumulation_with_global_normalizer():
    h, w, teacher, targets, mask = problem(shape=(4, 6), seed=4)
    mask[1] = False  # one micro-batch (rows 0-1) is half empty, one row counts nothing
    full, _ = chunked_distill_loss(h, w, teacher, targets, mask, final_softcap=CAP, alpha=0.5)
    want = grads(full, h, w)
    n = int(mask.sum())
    total = 0
    for rows in (slice(0, 2), slice(2, 4)):
        part = TeacherHead(teacher.hidden[rows], teacher.weight, teacher.final_softcap)
        loss, _ = chunked_distill_loss(h[rows], w, part, targets[rows], mask[rows], final_softcap=CAP,
                                       alpha=0.5, normalizer=n)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(h.grad, want[0])
    torch.testing.assert_close(w.grad, want[1])
    # an all-padding micro-batch with an explicit normalizer is a zero, not an error
    empty, stats = chunked_distill_loss(h, w, teacher, targets, torch.zeros_like(mask), final_softcap=CAP,
                                        normalizer=n)
    assert empty.item() == 0 and stats.tokens == 0


def test_no_gradient_to_teacher_and_no_grad_mode():
    h, w, teacher, targets, mask = problem(seed=5)
    teacher.hidden.requires_grad_(True)
    teacher.weight.requires_grad_(True)
    loss, _ = chunked_distill_loss(h, w, teacher, final_softcap=CAP)
    loss.backward()
    assert teacher.hidden.grad is None and teacher.weight.grad is None
    assert h.grad is not None and w.grad is not None
    with torch.no_grad():
        again, _ = chunked_distill_loss(h, w, teacher, final_softcap=CAP)
    assert not again.requires_grad
    torch.testing.assert_close(again, loss.detach())


def test_chunked_bf16_close_to_fp32():
    h, w, teacher, targets, mask = problem(seed=6)
    ref, _ = chunked_distill_loss(h, w, teacher, targets, alpha=0.5, final_softcap=CAP)
    g_ref = grads(ref, h, w)
    hb = h.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    tb = TeacherHead(teacher.hidden.bfloat16(), teacher.weight.bfloat16(), T_CAP)
    loss, _ = chunked_distill_loss(hb, wb, tb, targets, alpha=0.5, final_softcap=CAP)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.02)
    for ours, want in zip(grads(loss, hb, wb), g_ref):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours.float(), want, atol=0.02, rtol=0.05)


# ------------------------------------------------------------------------------------------------
# Errors that name the fix


def test_errors():
    s, t = logits_pair(2, 10)
    with pytest.raises(ValueError, match=r"10 != teacher vocab size 12.*tokenizers must match"):
        kd_loss(s, torch.zeros(2, 12))
    with pytest.raises(ValueError, match="no tokens"):
        kd_loss(s, t, torch.zeros(2))
    with pytest.raises(ValueError, match="unknown objective 'kl'.*forward_kl"):
        kd_loss(s, t, objective="kl")
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, t, objective="jsd", beta=1.5)
    h, w, teacher, targets, mask = problem()
    bad = TeacherHead(teacher.hidden, torch.zeros(V + 1, D_T))
    with pytest.raises(ValueError, match=f"{V} != teacher vocab size {V + 1}.*tokenizers must match"):
        chunked_distill_loss(h, w, bad)
    with pytest.raises(ValueError, match="no counted tokens"):
        chunked_distill_loss(h, w, teacher, mask=torch.zeros_like(mask))
    with pytest.raises(ValueError, match="pass targets"):
        chunked_distill_loss(h, w, teacher, alpha=0.5)
    with pytest.raises(ValueError, match="forward_kl"):
        chunked_distill_loss(h, w, teacher_topk(torch.randn(3, 9, V), 4), objective="reverse_kl")
    with pytest.raises(ValueError, match="needs a teacher"):
        chunked_distill_loss(h, w, None)
