"""Distillation losses for Gemma 2 (pure functions; the trainer owns the loop).

Gemma 2's 2B and 9B were trained on the teacher's next-token distribution (report, section 3.2):
minimise KL(p_teacher || p_student) per token. This file holds:

- `kd_loss`: forward KL, reverse KL or generalized JSD between two logit tensors (plain autograd;
  the readable reference); `divergence`, its per-token definition from log-probs.
- `topk_kd_loss` / `teacher_topk`: forward KL against an offline cache of the teacher's top-k
  log-probs plus one bucket for the remaining tail mass.
- `chunked_distill_loss`: the same losses (plus the CE mix) from the student's final hidden states
  and the tied embedding, chunk by chunk, never materialising the [N, V] logits: 4096 tokens of
  256000-way fp32 logits are 3.9 GiB per tensor, and naive autograd keeps several of them.
- `distill_sums`: what an evaluation measures (the KD and CE sums), the same way, no gradient.

Dtype policy: matmuls run in the input dtype; softcap, softmax, losses and the gradient with
respect to the logits are fp32. Logits are assumed finite (Gemma 2's softcap guarantees it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

OBJECTIVES = ("forward_kl", "reverse_kl", "jsd")


# ------------------------------------------------------------------------------------------------
# Checks shared by every entry point


def _check_options(objective: str, temperature: float, beta: float) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")


def _check_vocab(student_vocab: int, teacher_vocab: int) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"student vocab size {student_vocab} != teacher vocab size {teacher_vocab}: "
            "the student and teacher tokenizers must match (same vocabulary, same ids)"
        )


def _counted(mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Bool tensor of the tokens that count; a 0/1 mask is read as bool."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the token shape {tuple(shape)}")
    return mask != 0


def _masked_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    counted = _counted(mask, per_token.shape, per_token.device)
    n = int(counted.sum())  # one host sync: the price of a clear error instead of a NaN
    if n == 0:
        raise ValueError("the mask selects no tokens: pass a mask with at least one nonzero entry")
    # Indexing (not multiplying by the mask) keeps NaN/inf in ignored rows out of the value.
    return per_token[counted].sum() / n


# ------------------------------------------------------------------------------------------------
# Full-logits losses (autograd)


def divergence(ls: Tensor, lt: Tensor, objective: str, beta: float) -> Tensor:
    """Per-token divergence [...] from student / teacher log-probs [..., V] (fp32)."""
    if objective == "forward_kl" or (objective == "jsd" and beta == 0.0):
        return torch.sum(lt.exp() * (lt - ls), dim=-1)
    if objective == "reverse_kl" or (objective == "jsd" and beta == 1.0):
        return torch.sum(ls.exp() * (ls - lt), dim=-1)
    # log M with M = beta p_T + (1 - beta) p_S, in log space so tiny probabilities don't underflow.
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))
    kl_t = torch.sum(lt.exp() * (lt - lm), dim=-1)  # KL(p_T || M)
    kl_s = torch.sum(ls.exp() * (ls - lm), dim=-1)  # KL(p_S || M)
    # (beta kl_t + (1 - beta) kl_s) / (beta (1 - beta)), written without the cancelling factors.
    return kl_t / (1.0 - beta) + kl_s / beta


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """Mean over counted tokens of a divergence between teacher and student, times temperature**2.

    student_logits, teacher_logits: [..., V]; mask: [...] (bool or 0/1), None = every token counts.
    With p = softmax(logits / temperature) in fp32 (p_S student, p_T teacher):

    - "forward_kl": KL(p_T || p_S), the Gemma 2 objective (mode-covering).
    - "reverse_kl": KL(p_S || p_T) (mode-seeking).
    - "jsd": the generalized Jensen-Shannon divergence, normalised so its endpoints are the KLs:
          M = beta p_T + (1 - beta) p_S
          JSD_beta = (beta KL(p_T || M) + (1 - beta) KL(p_S || M)) / (beta (1 - beta))
      As beta -> 0, M -> p_S and the numerator -> beta KL(p_T || p_S) (the other term is
      O(beta^2)), so JSD_0 = forward_kl; symmetrically JSD_1 = reverse_kl. The endpoints are
      evaluated as those limits (the formula itself is 0/0 there). The division also gives every
      beta the same local scale as KL (for p_S near p_T all of them are chi^2 / 2), so changing
      beta needs no retuning of alpha or the learning rate. At beta = 0.5 this is 4x the textbook
      JSD. The approach to the endpoints is slow where p_T / p_S is huge (beta p_T still
      dominates M there), so for the KLs themselves pass beta = 0 or 1 exactly.

    Multiplying by temperature**2 keeps gradient magnitudes independent of the temperature
    (Hinton et al., 2015). The teacher is a fixed target: no gradient flows into teacher_logits.
    """
    _check_options(objective, temperature, beta)
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return _masked_mean(divergence(ls, lt, objective, beta), mask) * temperature**2


# ------------------------------------------------------------------------------------------------
# Top-k teacher cache


class TopK(NamedTuple):
    """The teacher's top-k next-token log-probs, for an offline cache (what `teacher_topk` returns).

    ids: [..., k] distinct token ids (int32 or int64); logprobs: [..., k] (fp16 or fp32) teacher
    log-probs at those ids; tail_logprob: [...] log of the teacher mass outside them (-inf if none).
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopK:
    """Top-k targets from teacher logits [..., V] at `temperature` (ids int64, the rest fp32).

    The tail is the logsumexp of the log-probs outside the top-k rather than log(1 - sum(top-k)):
    the subtraction would cancel catastrophically when the top-k hold nearly all the mass, and
    with k = V it is exactly -inf instead of the log of a rounding error.
    """
    if not 1 <= k <= teacher_logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocab size {teacher_logits.shape[-1]}], got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [..., V]
    logprobs, ids = lp.topk(k, dim=-1)  # [..., k]
    tail = lp.scatter_(-1, ids, float("-inf")).logsumexp(dim=-1)  # [...]
    return TopK(ids, logprobs, tail)


def topk_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL over k + 1 buckets, mean over counted tokens, times temperature**2.

    student_logits: [..., V]; topk_ids, topk_logprobs: [..., k]; tail_logprob: [...]. The buckets
    are the teacher's k ids plus "everything else", whose student probability is the student's
    mass off those ids (a logsumexp over the rest of the vocabulary, so no cancellation) and whose
    teacher probability is exp(tail_logprob). A tail bucket with zero teacher mass contributes 0.
    With k = V (or a zero tail) this is exactly kd_loss(..., objective="forward_kl").
    The student is tempered here; the cached teacher log-probs must already be at `temperature`.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_topk_shapes(student_logits.shape, topk_ids, topk_logprobs, tail_logprob)
    ls = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # [..., V]
    ids = topk_ids.long()
    lp = topk_logprobs.float()
    tail = tail_logprob.float()
    # A finite sentinel instead of -inf: with k = V the whole row is masked, and logsumexp's
    # backward over an all -inf row is NaN (0 * exp(-inf + inf)) even though its weight is 0.
    rest = ls.scatter(-1, ids, torch.finfo(ls.dtype).min)
    ls_tail = rest.logsumexp(dim=-1)  # [...] student log-mass off the top-k
    p_tail = tail.exp()
    tail_term = torch.where(p_tail > 0, p_tail * (tail - ls_tail), 0.0)
    per_token = torch.sum(lp.exp() * (lp - ls.gather(-1, ids)), dim=-1) + tail_term
    return _masked_mean(per_token, mask) * temperature**2


def _check_topk_shapes(student_shape: torch.Size, ids: Tensor, lp: Tensor, tail: Tensor) -> None:
    tokens = student_shape[:-1]
    if ids.shape != lp.shape or ids.shape[:-1] != tokens or tail.shape != tokens:
        raise ValueError(
            f"top-k shapes ids {tuple(ids.shape)}, logprobs {tuple(lp.shape)}, tail "
            f"{tuple(tail.shape)} must be [..., k], [..., k], [...] with ... = {tuple(tokens)}"
        )
    if ids.shape[-1] > student_shape[-1]:
        raise ValueError(f"k = {ids.shape[-1]} exceeds the student vocab size {student_shape[-1]}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top-k ids must be int32 or int64, got {ids.dtype}")


# ------------------------------------------------------------------------------------------------
# Chunked loss from hidden states: never materialises [N, V]


@dataclass
class TeacherHead:
    """A teacher whose logits are computed chunk by chunk (under no_grad) from its hidden states:
    final_softcap * tanh(hidden @ weight.T / final_softcap), as the Gemma 2 model does.

    hidden: [..., D_T] (the teacher's final-normed hidden states, same tokens as the student's);
    weight: [V, D_T] (its tied embedding); final_softcap: None to skip the softcap.
    """

    hidden: Tensor
    weight: Tensor
    final_softcap: float | None = 30.0


@dataclass(frozen=True)
class DistillStats:
    """Unnormalised sums over this call's counted tokens, detached, for logging.

    kd_sum: sum of per-token KD (no temperature**2, no alpha); ce_sum: sum of per-token CE at
    temperature 1 (0 when alpha == 1: not computed, targets or not); tokens: number of counted tokens.
    """

    kd_sum: Tensor
    ce_sum: Tensor
    tokens: int


def _softcap_(x: Tensor, cap: float | None) -> Tensor:
    return x if cap is None else x.div_(cap).tanh_().mul_(cap)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product [C, V] x [C, V] -> [C]; einsum avoids the [C, V] product temporary."""
    return torch.einsum("cv,cv->c", a, b)


def _kd_rows(ls: Tensor, lt: Tensor, objective: str, beta: float) -> tuple[Tensor, Tensor]:
    """Per-row divergence [C] and its gradient [C, V] w.r.t. the tempered student logits.

    ls, lt: fp32 student / teacher log-probs [C, V]; both are overwritten (the gradient is
    returned in ls's storage). Same definitions as `divergence`; the gradients are derived by
    hand so no autograd intermediates are kept. With q = p_S, for the tempered logits s:
      forward KL: q - p_T
      reverse KL: q * (log q - log p_T - KL)
      JSD_beta:   q * (g - <q, g>) / beta, g = log q - log M
    """
    if objective == "forward_kl" or (objective == "jsd" and beta == 0.0):
        p = lt.exp()
        loss = _rowdot(p, lt.sub_(ls))
        return loss, ls.exp_().sub_(p)
    if objective == "reverse_kl" or (objective == "jsd" and beta == 1.0):
        q = ls.exp()
        d = ls.sub_(lt)  # log q - log p_T
        loss = _rowdot(q, d)
        return loss, d.sub_(loss[:, None]).mul_(q)
    lm = lt + math.log(beta)
    torch.logaddexp(lm, ls + math.log1p(-beta), out=lm)  # log M
    p = lt.exp()
    kl_t = _rowdot(p, lt.sub_(lm))
    q = torch.exp(ls, out=p)
    g = ls.sub_(lm)
    kl_s = _rowdot(q, g)
    loss = kl_t / (1.0 - beta) + kl_s / beta
    return loss, g.sub_(kl_s[:, None]).mul_(q).div_(beta)


def _topk_rows(ls: Tensor, ids: Tensor, lp: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row top-k forward KL [C] and its gradient [C, V] w.r.t. the tempered student logits.

    ls: [C, V] fp32 student log-probs (overwritten); ids [C, k] int64; lp [C, k], tail [C] fp32.
    With S the student mass on the ids and mass = sum(p_k) + p_tail (1 up to cache rounding):
      grad_j = mass q_j - p_j [j in ids] - p_tail q_j / (1 - S) [j not in ids]
    i.e. the student is pulled toward the teacher's top-k, and the tail mass is spread over the
    rest of the vocabulary in proportion to the student's own probabilities there.
    """
    rest = ls.scatter(1, ids, float("-inf"))  # [C, V]
    ls_tail = rest.logsumexp(dim=1)  # [C], -inf when k = V
    p = lp.exp()
    p_tail = tail.exp()
    tail_term = torch.where(p_tail > 0, p_tail * (tail - ls_tail), 0.0)
    loss = _rowdot(p, lp - ls.gather(1, ids)) + tail_term
    # q_j / (1 - S) off the ids, 0 on them; the clamp keeps an empty tail at 0 rather than NaN.
    off = rest.sub_(ls_tail.clamp(min=torch.finfo(ls.dtype).min)[:, None]).exp_()
    mass = p.sum(dim=1) + p_tail
    grad = ls.exp_().mul_(mass[:, None]).sub_(off.mul_(p_tail[:, None]))
    return loss, grad.scatter_add_(1, ids, -p)


def _loss_and_grads(
    h: Tensor,  # [N, D]
    w: Tensor,  # [V, D]
    teacher: Tensor | TeacherHead | TopK | None,  # flattened to N rows
    targets: Tensor | None,  # [N]
    rows: Tensor,  # [n] indices of the counted tokens
    scale: float | Tensor,  # 1 / normalizer
    cap: float | None,
    objective: str,
    temperature: float,
    beta: float,
    alpha: float,
    with_kd: bool,
    with_ce: bool,
    chunk_size: int,
    want_gh: bool,
    want_gw: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Loop over chunks of counted rows: the KD and CE sums (each when asked), and the gradients of
    (alpha T^2 KD_sum + (1 - alpha) CE_sum) * scale w.r.t. h and w (None where not wanted).

    The gradient is computed here, in forward, so backward has nothing to recompute: the logits
    matmul runs once per chunk, as in the unfused forward. Only the current chunk's [C, V] fp32
    buffers (about four at a time) and the [V, D] weight gradient are alive.
    grad_w accumulates in w's dtype with addmm_ (no [V, D] temporary); in bf16 that rounds once
    per chunk, so prefer large chunks there.
    """
    kd_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    gh = torch.zeros_like(h) if want_gh else None  # uncounted rows keep a zero gradient
    gw = None  # [V, D], written by the first chunk's matmul: a zero fill would cost a full pass
    want_grad = want_gh or want_gw
    T = temperature
    for start in range(0, rows.numel(), chunk_size):
        r = rows[start : start + chunk_size]  # [C]
        h_c = h[r]  # [C, D]
        z = _softcap_((h_c @ w.T).float(), cap)  # [C, V] student logits, fp32
        g = None  # gradient w.r.t. z
        if with_kd:
            ls = torch.log_softmax(z if T == 1.0 else z / T, dim=1)
            if isinstance(teacher, TopK):
                kd, g = _topk_rows(ls, teacher.ids[r].long(), teacher.logprobs[r].float(),
                                   teacher.tail_logprob[r].float())
            else:
                if isinstance(teacher, TeacherHead):
                    t = _softcap_((teacher.hidden[r] @ teacher.weight.T).float(), teacher.final_softcap)
                else:
                    t = teacher[r].float()
                lt = torch.log_softmax(t if T == 1.0 else t.div_(T), dim=1)
                del t
                kd, g = _kd_rows(ls, lt, objective, beta)
                del lt
            kd_sum += kd.sum()
            if alpha * T != 1.0:
                g.mul_(alpha * T)  # d(alpha T^2 KD)/dz = alpha T^2 * (1/T) dKD/ds
        if with_ce:
            tgt = targets[r]  # [C]
            lp1 = torch.log_softmax(z, dim=1)  # CE is at temperature 1
            ce_sum -= lp1.gather(1, tgt[:, None]).sum()
            if want_grad:
                d_ce = lp1.exp_().scatter_add_(1, tgt[:, None], lp1.new_full((len(r), 1), -1.0))
                g = d_ce.mul_(1 - alpha) if g is None else g.add_(d_ce, alpha=1 - alpha)
            del lp1
        if not want_grad:
            continue
        if cap is not None:  # softcap'(x) = 1 - tanh^2 = 1 - (z / cap)^2; fold the scale in
            g.mul_(z.square_().mul_(-scale / cap**2).add_(scale))
        else:
            g.mul_(scale)
        del z
        g = g.to(w.dtype)
        if gh is not None:
            gh[r] = g @ w
        if want_gw:
            gw = g.T @ h_c if gw is None else gw.addmm_(g.T, h_c)
    if want_gw and gw is None:  # no counted tokens
        gw = torch.zeros_like(w)
    return kd_sum, ce_sum, gh, gw


class _PrecomputedGrads(torch.autograd.Function):
    """Attach gradients computed during forward; backward only scales them by the incoming grad
    (1 for a plain loss.backward(), so the multiply is in place to avoid a [V, D] copy)."""

    @staticmethod
    def forward(ctx, hidden, weight, loss, grad_hidden, grad_weight):  # type: ignore[override]
        ctx.grads = (grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "chunked_distill_loss computes its gradients in forward and supports one backward: "
                "call the loss function again instead of backward(retain_graph=True)"
            )
        gh, gw = ctx.grads
        ctx.grads = None
        gh = None if gh is None else gh.mul_(grad_loss)
        gw = None if gw is None else gw.mul_(grad_loss)
        return gh, gw, None, None, None


def chunked_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor | TeacherHead | TopK | None,
    targets: Tensor | None = None,
    mask: Tensor | None = None,
    *,
    final_softcap: float | None = 30.0,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 1.0,
    normalizer: float | Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> tuple[Tensor, DistillStats]:
    """(alpha * T^2 * KD_sum + (1 - alpha) * CE_sum) / normalizer, without the [N, V] logits.

    student_hidden: [..., D] the student's final-normed hidden states (the tokens ... are
    flattened); student_weight: [V, D] the tied embedding. Student logits are
    final_softcap * tanh(hidden @ weight.T / final_softcap), matmul in the input dtype, the rest
    in fp32. Gradients flow to student_hidden and student_weight, never to the teacher.

    teacher: where the KD targets come from, for the same tokens:
      - TeacherHead(hidden [..., D_T], weight [V, D_T], final_softcap): logits chunk by chunk;
      - a Tensor [..., V] of precomputed (already softcapped) teacher logits;
      - TopK(ids, logprobs, tail_logprob) from a cache: top-k forward KL (objective "forward_kl");
      - None, only with alpha = 0 (plain chunked cross-entropy).
    targets: [...] next-token ids for the CE term (needed when alpha < 1); ignore_index entries
    don't count. mask: [...] bool or 0/1. A token counts for both terms iff mask != 0 and
    targets != ignore_index; KD and CE per token are as in kd_loss / topk_kd_loss and F.cross_entropy
    (CE at temperature 1).

    Normalisation contract: the loss is a SUM over this call's counted tokens divided by
    `normalizer` (a number or a 0-dim tensor). Default: this call's counted-token count, i.e. a
    per-token mean. When accumulating gradients over micro-batches, pass every call the counted
    tokens of the WHOLE accumulated batch and backward each loss as is (no further division):
    the summed gradients are then those of the mean over all counted tokens, however unevenly
    the micro-batches are padded. (Under data parallelism that averages gradients over R ranks,
    pass the global count / R.) With an explicit normalizer a micro-batch with no counted tokens
    is fine (loss 0, zero gradients); without one it raises.

    chunk_size: counted tokens per chunk. Peak memory beyond the inputs is the [V, D] weight
    gradient plus about four [chunk_size, V] fp32 buffers (256 x 256000 x 4 B = 250 MiB each;
    five for JSD). Larger chunks amortise the per-chunk read-modify-write of the [V, D] weight
    gradient, which matters on GPUs (1024 there); on CPU the time hardly depends on it.
    Returns (loss, DistillStats of unnormalised sums for logging). Gradients are computed during
    the forward pass (so backward is nearly free and may run only once).
    """
    _check_options(objective, temperature, beta)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1 = pure KD, 0 = pure CE), got {alpha}")
    if alpha < 1 and targets is None:
        raise ValueError(f"alpha = {alpha} < 1 mixes in cross-entropy: pass targets")
    h, teacher, targets, rows = _counted_rows(student_hidden, student_weight, teacher, targets, mask,
                                              objective, chunk_size, ignore_index, with_kd=alpha > 0)  # fmt: skip
    n = rows.numel()
    if normalizer is None:
        if n == 0:
            raise ValueError(
                "no counted tokens (mask all zero or every target == ignore_index): pass a mask "
                "with at least one counted token, or an explicit normalizer for an empty micro-batch"
            )
        normalizer = n
    elif not isinstance(normalizer, Tensor) and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (counted tokens of the whole batch), got {normalizer}")

    grad_on = torch.is_grad_enabled()
    want_gh = grad_on and student_hidden.requires_grad
    want_gw = grad_on and student_weight.requires_grad
    with torch.no_grad():
        kd_sum, ce_sum, gh, gw = _loss_and_grads(
            h.detach(), student_weight.detach(), teacher, targets, rows, 1.0 / normalizer,
            final_softcap, objective, temperature, beta, alpha, alpha > 0, alpha < 1, chunk_size, want_gh, want_gw,
        )
        loss = (alpha * temperature**2 * kd_sum + (1 - alpha) * ce_sum) / normalizer
    if want_gh or want_gw:
        loss = _PrecomputedGrads.apply(h, student_weight, loss, gh, gw)
    return loss, DistillStats(kd_sum, ce_sum, n)


@torch.no_grad()
def distill_sums(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor | TeacherHead | TopK | None,
    targets: Tensor,
    mask: Tensor | None = None,
    *,
    final_softcap: float | None = 30.0,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    chunk_size: int = 256,
    ignore_index: int = -100,
) -> DistillStats:
    """What an evaluation measures: the CE sum and, when `teacher` is given, the KD sum over the
    counted tokens, as chunked_distill_loss computes them (same arguments), with no loss to weigh
    and no gradient."""
    _check_options(objective, temperature, beta)
    with_kd = teacher is not None
    h, teacher, targets, rows = _counted_rows(student_hidden, student_weight, teacher, targets, mask,
                                              objective, chunk_size, ignore_index, with_kd=with_kd)  # fmt: skip
    kd_sum, ce_sum, _, _ = _loss_and_grads(
        h, student_weight, teacher, targets, rows, 1.0, final_softcap, objective, temperature, beta,
        1.0, with_kd, True, chunk_size, False, False,
    )  # fmt: skip
    return DistillStats(kd_sum, ce_sum, rows.numel())


def _counted_rows(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor | TeacherHead | TopK | None,
    targets: Tensor | None,
    mask: Tensor | None,
    objective: str,
    chunk_size: int,
    ignore_index: int,
    *,
    with_kd: bool,
) -> tuple[Tensor, Tensor | TeacherHead | TopK | None, Tensor | None, Tensor]:
    """Check the shapes; flatten to rows: (hidden [N, D], teacher (checked when with_kd),
    targets [N], the indices of the counted rows [n])."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V, D = student_weight.shape
    if student_hidden.shape[-1] != D:
        raise ValueError(
            f"student hidden size {student_hidden.shape[-1]} != student weight's {D}: pass the "
            "final-normed hidden states [..., D] and the embedding [V, D]"
        )
    tokens = student_hidden.shape[:-1]
    h = student_hidden.reshape(-1, D)  # [N, D]
    if with_kd:
        teacher = _flatten_teacher(teacher, tokens, V, objective)
    if targets is not None and targets.shape != tokens:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be {tuple(tokens)}")
    counted = _counted(mask, tokens, h.device)
    if targets is not None:
        counted = counted & (targets != ignore_index)
        targets = targets.reshape(-1).long()
    rows = counted.reshape(-1).nonzero().squeeze(1)  # [n]
    return h, teacher, targets, rows


def _flatten_teacher(
    teacher: Tensor | TeacherHead | TopK | None, tokens: torch.Size, V: int, objective: str
) -> Tensor | TeacherHead | TopK:
    """Validate the teacher source against the student's tokens and vocab; flatten to N rows."""
    if teacher is None:
        raise ValueError("alpha > 0 needs a teacher (TeacherHead, logits or TopK); use alpha=0 for CE only")
    if isinstance(teacher, TopK):
        if objective != "forward_kl":
            raise ValueError(f"a top-k teacher supports only objective='forward_kl', got {objective!r}")
        _check_topk_shapes(torch.Size((*tokens, V)), *teacher)
        k = teacher.ids.shape[-1]
        return TopK(teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k),
                    teacher.tail_logprob.reshape(-1))
    if isinstance(teacher, TeacherHead):
        _check_vocab(V, teacher.weight.shape[0])
        if teacher.hidden.shape[:-1] != tokens or teacher.hidden.shape[-1] != teacher.weight.shape[1]:
            raise ValueError(
                f"teacher hidden {tuple(teacher.hidden.shape)} must be [{', '.join(map(str, tokens))}, "
                f"D_T] with D_T = teacher weight's {teacher.weight.shape[1]}"
            )
        D_T = teacher.weight.shape[1]
        return TeacherHead(teacher.hidden.detach().reshape(-1, D_T), teacher.weight.detach(),
                           teacher.final_softcap)
    _check_vocab(V, teacher.shape[-1])
    if teacher.shape[:-1] != tokens:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} must be [..., V] with ... = {tuple(tokens)}")
    return teacher.detach().reshape(-1, V)
