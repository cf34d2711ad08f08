"""Divergences between teacher and student output distributions.

Conventions used throughout:

* ``p`` is the teacher distribution, ``q`` the student distribution, both over the last dimension.
* Every divergence returns one value per row (shape ``logits.shape[:-1]``); masking and
  normalisation are the caller's job, so that padding and gradient accumulation are handled
  in one place.
* ``temperature`` softens both distributions: ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``.
  The Hinton ``T**2`` factor is *not* applied here; see :func:`soft_label_loss`.

Only ``torch`` is imported here.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# Divergences on log-probabilities (rows of the last dimension)
# ----------------------------------------------------------------------------------------------
def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v), per row. Terms with p_v = 0 contribute 0."""
    p = log_p.exp()
    return (p * (log_p - log_q)).masked_fill(p == 0, 0.0).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w p + (1 − w) q), computed stably; w ∈ (0, 1)."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Forward KL(p ‖ q): mode-covering, the Hinton et al. (2015) distillation loss."""
    return kl_divergence(teacher_log_probs, student_log_probs)


def reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Reverse KL(q ‖ p): mode-seeking."""
    return kl_divergence(student_log_probs, teacher_log_probs)


def generalized_jsd(student_log_probs: Tensor, teacher_log_probs: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1), ``beta`` ∈ [0, 1].

    JSD_β(p, q) = β KL(p ‖ m) + (1 − β) KL(q ‖ m),   m = β p + (1 − β) q,

    with p the teacher and q the student, the convention of TRL's ``GKDTrainer.generalized_jsd_loss``.
    The formula vanishes at both ends (JSD_β ≈ β KL(p ‖ q) near β = 0, ≈ (1 − β) KL(q ‖ p) near β = 1),
    so, as in TRL, β = 0 is defined as forward KL(p ‖ q) and β = 1 as reverse KL(q ‖ p).
    β = 0.5 is the symmetric JSD.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1], got {beta}; fix --jsd_beta.")
    if beta == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    log_m = _log_mixture(teacher_log_probs, student_log_probs, beta)
    return beta * kl_divergence(teacher_log_probs, log_m) + (1.0 - beta) * kl_divergence(student_log_probs, log_m)


def skew_forward_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, skew: float = 0.1) -> Tensor:
    """Skew forward KL (DistiLLM): KL(p ‖ λ p + (1 − λ) q), λ = ``skew`` ∈ [0, 1). λ = 0 is forward KL."""
    if skew <= 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    return kl_divergence(teacher_log_probs, _log_mixture(teacher_log_probs, student_log_probs, skew))


def skew_reverse_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, skew: float = 0.1) -> Tensor:
    """Skew reverse KL (DistiLLM): KL(q ‖ λ q + (1 − λ) p), λ = ``skew`` ∈ [0, 1). λ = 0 is reverse KL."""
    if skew <= 0.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    return kl_divergence(student_log_probs, _log_mixture(student_log_probs, teacher_log_probs, skew))


def total_variation(student_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """Total variation distance TV(p, q) = ½ Σ_v |p_v − q_v|."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": total_variation,
}
#: Losses that compare raw logits instead of distributions.
LOGIT_LOSSES = ("mse",)
LOSS_NAMES = tuple(DIVERGENCES) + LOGIT_LOSSES


def logit_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared error between raw logits, per row: mean_v (z_s,v − z_t,v)². No temperature."""
    return (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)


# ----------------------------------------------------------------------------------------------
# From logits to a per-row soft-label loss
# ----------------------------------------------------------------------------------------------
def soft_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    jsd_beta: float = 0.5,
    skew_lambda: float = 0.1,
) -> Tensor:
    """Per-row soft-label loss between logits, computed in fp32.

    ``loss(softmax(z_s / T), softmax(z_t / T)) · T²`` for the divergences (the T² keeps gradient
    magnitudes comparable across temperatures, Hinton et al. 2015), and ``mean (z_s − z_t)²`` for
    ``"mse"``.
    """
    if loss == "mse":
        return logit_mse(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    values = divergence_from_log_probs(log_q, log_p, loss=loss, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
    return values * temperature**2 if scale_by_temperature_squared else values


def divergence_from_log_probs(
    student_log_probs: Tensor, teacher_log_probs: Tensor, *, loss: str, jsd_beta: float = 0.5, skew_lambda: float = 0.1
) -> Tensor:
    """Dispatch to the named divergence with its extra parameter."""
    if loss not in DIVERGENCES:
        raise ValueError(f"Unknown distillation loss {loss!r}; choose one of {', '.join(LOSS_NAMES)}.")
    if loss == "jsd":
        return generalized_jsd(student_log_probs, teacher_log_probs, beta=jsd_beta)
    if loss.startswith("skew_"):
        return DIVERGENCES[loss](student_log_probs, teacher_log_probs, skew=skew_lambda)
    return DIVERGENCES[loss](student_log_probs, teacher_log_probs)


def hard_label_loss(student_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Per-row cross-entropy −log q_y against integer labels; rows with ``ignore_index`` give 0."""
    flat = F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    )
    return flat.reshape(labels.shape)


# ----------------------------------------------------------------------------------------------
# Top-k teacher targets (cached logits for language models)
# ----------------------------------------------------------------------------------------------
TOPK_MASS_CAP = 1.0 - 1e-6  # the top-k mass is clamped here, so that the tail bin keeps a finite log


def _log_tail(log_probs_topk: Tensor) -> Tensor:
    """log(1 − Σ_k exp(log_probs_topk)), the log mass outside the top-k bins (clamped for stability)."""
    mass = log_probs_topk.exp().sum(-1, keepdim=True)
    return torch.log1p(-mass.clamp(max=TOPK_MASS_CAP))


def topk_soft_label_loss(
    student_logits: Tensor, teacher_topk_log_probs: Tensor, teacher_topk_indices: Tensor, *, loss: str = "forward_kl",
    temperature: float = 1.0, scale_by_temperature_squared: bool = True, jsd_beta: float = 0.5, skew_lambda: float = 0.1,
) -> Tensor:
    """Per-row divergence against a top-k teacher, with the tail mass as one explicit extra bin.

    The teacher is stored as its k largest log-probabilities at temperature ``T`` and their token
    ids. Both distributions are coarsened to k + 1 bins (the k teacher tokens and "everything
    else"); the divergence is computed over those bins. It equals the full divergence when the
    teacher's tail mass is 0 and is never larger than it otherwise (data processing inequality).
    """
    if loss == "mse":
        raise ValueError("loss='mse' needs full teacher logits; cache the teacher without top_k or pick a divergence.")
    log_q_all = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_topk = log_q_all.gather(-1, teacher_topk_indices.long())
    log_q = torch.cat([log_q_topk, _log_tail(log_q_topk)], dim=-1)
    log_p_topk = teacher_topk_log_probs.float()
    log_p = torch.cat([log_p_topk, _log_tail(log_p_topk)], dim=-1)
    values = divergence_from_log_probs(log_q, log_p, loss=loss, jsd_beta=jsd_beta, skew_lambda=skew_lambda)
    return values * temperature**2 if scale_by_temperature_squared else values


# ----------------------------------------------------------------------------------------------
# Memory-bounded weighted sums over many rows (token-level losses with large vocabularies)
# ----------------------------------------------------------------------------------------------
MAX_CHUNK_ELEMENTS = 1 << 21


def capped_chunk_rows(chunk_size: int, x: Tensor) -> int:
    """Rows per chunk: at most ``chunk_size`` and at most ``MAX_CHUNK_ELEMENTS`` values of ``x``'s rows."""
    return max(1, min(chunk_size, MAX_CHUNK_ELEMENTS // max(x.shape[-1], 1)))


class _ChunkedWeightedSums(torch.autograd.Function):
    """S_k = Σ_n w_n f_k(x_n, targets_n) chunk by chunk; the gradient of Σ_k c_k S_k is formed in forward.

    Peak extra memory is one gradient buffer the size of ``x`` (in ``x``'s dtype) plus the
    intermediates of a single chunk, instead of several fp32 copies of the whole [N, V] tensor.
    """

    @staticmethod
    def forward(ctx, row_losses, coefficients, chunk_size, x, weights, *targets):  # type: ignore[override]
        sums = torch.zeros(len(coefficients), dtype=torch.float32, device=x.device)
        coeffs = torch.tensor(coefficients, dtype=torch.float32, device=x.device)
        grad = torch.zeros_like(x) if x.requires_grad else None
        for start in range(0, x.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            w = weights[rows]
            if not bool((w != 0).any()):
                continue
            with torch.enable_grad():
                x_chunk = x[rows].detach().requires_grad_(grad is not None)
                chunk_sums = (row_losses(x_chunk, *(t[rows] for t in targets)) * w).sum(-1)
                if grad is not None:
                    (grad[rows],) = torch.autograd.grad((coeffs * chunk_sums).sum(), x_chunk)
            sums += chunk_sums.detach()
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        total = (coeffs * sums).sum()
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        # Scaled in place: a second [N, V] buffer would double the peak. The buffer is used once; a second
        # backward (retain_graph=True) is refused by autograd's version counter rather than silently wrong.
        grad_x = grad.mul_(grad_total.to(grad.dtype)) if grad.numel() else None
        return (None, None, None, grad_x, None) + (None,) * (len(ctx.needs_input_grad) - 5)


def chunked_weighted_sums(
    row_losses: Callable[..., Tensor],
    coefficients: Sequence[float],
    x: Tensor,
    weights: Tensor,
    *targets: Tensor,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Weighted sums of several per-row losses over the rows of a 2-D ``x``, computed in chunks of rows.

    ``row_losses(x, *targets)`` returns a [K, N] stack of per-row losses f_k. With
    S_k = Σ_n weights_n · f_k(x_n), this returns ``(Σ_k coefficients_k · S_k, S.detach())``: the first
    differentiable w.r.t. ``x`` (``targets`` get no gradient), the second for logging. Values and
    gradients equal the unchunked computation; memory does not grow with N beyond one gradient buffer.
    ``chunk_size <= 0`` computes everything at once. Chunks are also capped at ``MAX_CHUNK_ELEMENTS``
    (2²¹ values, 8 MiB in fp32 per intermediate), so that a large vocabulary gets short chunks.
    """
    if chunk_size > 0:
        chunk_size = capped_chunk_rows(chunk_size, x)
    if chunk_size <= 0 or x.shape[0] <= chunk_size:
        sums = (row_losses(x, *targets) * weights).sum(-1)
        coeffs = torch.tensor(list(coefficients), dtype=sums.dtype, device=sums.device)
        return (coeffs * sums).sum(), sums.detach()
    return _ChunkedWeightedSums.apply(row_losses, tuple(coefficients), chunk_size, x, weights, *targets)


def teacher_mixture_logits(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float) -> torch.Tensor:
    """Logits whose softened distribution is the weighted mixture of the teachers' softened distributions.

    ``p = Σ_i w_i softmax(z_i / T)`` with ``Σ w_i = 1``; returns ``T · log p``, so that
    ``softmax(result / T) = p`` and every soft-label loss above can use the mixture unchanged.
    """
    stacked = torch.stack([z.float() / temperature for z in teacher_logits])  # [M, ..., V]
    log_w = torch.log(torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device))
    log_w = log_w.reshape(-1, *([1] * (stacked.dim() - 1)))
    return temperature * torch.logsumexp(log_w + torch.log_softmax(stacked, dim=-1), dim=0)


class _ChunkBuffers:
    """Scratch [rows, width] fp32 buffers reused by every chunk of one call, handed out as [n, width] views.

    Fresh vocabulary-wide tensors per chunk cost more than the arithmetic on CPU (each large allocation is
    new pages to fault in); on GPU the caching allocator makes this moot, and reuse is harmless.
    """

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.rows, self.width, self.device = rows, width, device
        self._buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, n: int) -> Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.rows, self.width, dtype=torch.float32, device=self.device)
        return self._buffers[name][:n]

    def as_float(self, name: str, x: Tensor, divide_by: float = 1.0) -> Tensor:
        """``x.float() / divide_by`` in the named buffer (``x`` itself when that is a no-op); widened first,
        so that a bf16 / fp16 input is rounded once, as ``x.float() / divide_by`` does."""
        if x.dtype == torch.float32 and divide_by == 1.0:
            return x
        out = self(name, x.shape[0]).copy_(x)
        return out.div_(divide_by) if divide_by != 1.0 else out


def _softmax_into(logits: Tensor, out: Tensor) -> Tensor:
    """softmax over the last dimension, written into ``out`` (fp32 in, fp32 out)."""
    return torch.ops.aten._softmax.out(logits, -1, False, out=out)


class _Normaliser:
    """log-sum-exp of rows of z from their softmax: lse(z) = max z − log max softmax(z), two cheap reductions
    instead of another exp pass. ``log_softmax_at`` reads log softmax(z) at given indices as
    (z_i − max z) + log max softmax(z), which stays exact when max z is large."""

    def __init__(self, scaled_logits: Tensor, probs: Tensor) -> None:
        self.logits = scaled_logits
        self.max = scaled_logits.amax(-1, keepdim=True)
        self.log_max_prob = probs.amax(-1, keepdim=True).log()

    @property
    def lse(self) -> Tensor:
        return self.max - self.log_max_prob

    def log_softmax_at(self, indices: Tensor) -> Tensor:
        return (self.logits.gather(-1, indices) - self.max) + self.log_max_prob


def _full_teacher_kd(student_scaled: Tensor, student_norm: _Normaliser, teacher_scaled: Tensor, buffers: _ChunkBuffers):
    """KL(p ‖ q) per row against full teacher logits z_t/T, and the KD gradient's target.

    KL = Σ p (z_t − z_s)/T − lse(z_t/T) + lse(z_s/T): one softmax and one dot product per row. Rows where that
    is not finite (−inf logits) fall back to Σ p (log p − log q) with 0 · log 0 = 0.
    Returns (kl [n], a = 1, add_target) where ∂KL/∂(z_s/T) = a · q − p and add_target(g, c) does g −= c · p.
    """
    n = teacher_scaled.shape[0]
    p = _softmax_into(teacher_scaled, buffers("p", n))
    teacher_norm = _Normaliser(teacher_scaled, p)
    difference = torch.sub(teacher_scaled, student_scaled, out=buffers("scratch", n)).mul_(p)
    kl = difference.sum(-1) - (teacher_norm.lse - student_norm.lse).squeeze(-1)
    if not bool(torch.isfinite(kl).all()):
        kl = kl_divergence(F.log_softmax(teacher_scaled, dim=-1), F.log_softmax(student_scaled, dim=-1))
    return kl, 1.0, lambda g, c: g.addcmul_(p, -c)


def _topk_teacher_kd(student_scaled: Tensor, student_norm: _Normaliser, teacher_topk_log_probs: Tensor,
                     teacher_topk_indices: Tensor):
    """KL over the k + 1 bins of :func:`topk_soft_label_loss` (k teacher tokens and the tail), and its gradient.

    With q_K, p_K the top-k bins, q̄ = 1 − Σ q_K and p̄ = 1 − Σ p_K the tails, ∂KL/∂(z_s/T) is q_j − p_j on the
    k tokens and q_j (1 − p̄ / q̄) elsewhere; where q̄ hits its clamp the tail bin passes no gradient (as in the
    generic path), leaving (1 − p̄) q − p_K. Returns (kl [n], a [n, 1], add_target) with
    ∂KL/∂(z_s/T) = a · q + scatter_K(r) and add_target(g, c) doing g += c · scatter_K(r).
    """
    indices = teacher_topk_indices.long()
    log_q_topk = student_norm.log_softmax_at(indices)
    log_p_topk = teacher_topk_log_probs.float()
    q_mass = log_q_topk.exp().sum(-1, keepdim=True)
    log_q_tail, log_p_tail = _log_tail(log_q_topk), _log_tail(log_p_topk)
    kl = kl_divergence(torch.cat([log_p_topk, log_p_tail], -1), torch.cat([log_q_topk, log_q_tail], -1))
    p_tail = log_p_tail.exp()
    tail_open = (q_mass < TOPK_MASS_CAP).to(p_tail.dtype)  # 0 where the clamp of _log_tail is active
    ratio = p_tail / log_q_tail.exp()
    a = 1.0 - p_tail + tail_open * (p_tail - ratio)
    r = tail_open * ratio * log_q_topk.exp() - log_p_topk.exp()
    return kl, a, lambda g, c: g.scatter_add_(-1, indices, r * c)


class _FusedForwardKLAndCE(torch.autograd.Function):
    """Forward KL + cross-entropy over weighted rows, chunked, with the gradient written in forward."""

    @staticmethod
    def forward(ctx, x, teacher, labels, weights, coefficients, temperature, scale, chunk_size):  # type: ignore[override]
        c_kd, c_ce = coefficients
        kd_factor = temperature if scale else 1.0 / temperature  # d(T^s · KL(p_T ‖ q_T)) / dz = factor · (q_T − p_T)
        sums = torch.zeros(2, dtype=torch.float32, device=x.device)
        grad = torch.empty_like(x) if x.requires_grad else None
        buffers = _ChunkBuffers(min(chunk_size, x.shape[0]), x.shape[-1], x.device)
        for start in range(0, x.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            w = weights[rows].float()[:, None]
            if not bool((w != 0).any()):
                if grad is not None:
                    grad[rows].zero_()
                continue
            n = w.shape[0]
            s = buffers.as_float("s", x[rows])
            s_t = buffers.as_float("s_t", s, temperature)
            # q_T goes where the gradient will be (it becomes the gradient in place below).
            direct = grad is not None and grad.dtype == torch.float32
            q = _softmax_into(s_t, grad[rows] if direct else buffers("q", n))
            norm_q = _Normaliser(s_t, q)
            if len(teacher) == 1:
                t_t = buffers.as_float("t_t", teacher[0][rows], temperature)
                kd, a, add_target = _full_teacher_kd(s_t, norm_q, t_t, buffers)
            else:
                kd, a, add_target = _topk_teacher_kd(s_t, norm_q, *(part[rows] for part in teacher))
            sums[0] += (kd * w.squeeze(-1)).sum() * (temperature**2 if scale else 1.0)
            kd_coef = (c_kd * kd_factor) * w  # [n, 1]
            ce_coef = q1 = None
            if labels is not None:
                y = labels[rows]
                valid = (y != -100)[:, None].to(w.dtype)
                safe = y.clamp(min=0)[:, None]
                q1 = q if temperature == 1 else _softmax_into(s, buffers("q1", n))
                norm_q1 = norm_q if temperature == 1 else _Normaliser(s, q1)
                ce = -norm_q1.log_softmax_at(safe)  # CE = −log softmax(z)_y; 0 on ignored rows, whatever z_0 is
                sums[1] += (ce.masked_fill(valid == 0, 0.0) * w).sum()
                ce_coef = c_ce * w * valid
            if grad is None:
                continue
            # grad_n = kd_coef_n (a_n q_T + target_n) + ce_coef_n (q − onehot(y_n)), built in q_T's storage.
            if ce_coef is not None and temperature == 1:
                step = q.mul_(a * kd_coef + ce_coef)
            else:
                step = q.mul_(a * kd_coef)
                if ce_coef is not None:
                    step.addcmul_(q1, ce_coef)
            add_target(step, kd_coef)
            if ce_coef is not None:
                step.scatter_add_(-1, safe, -ce_coef)
            if not direct:
                grad[rows] = step
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.mark_non_differentiable(sums)
        return c_kd * sums[0] + c_ce * sums[1], sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_x = grad.mul_(grad_total.to(grad.dtype)) if grad.numel() else None
        return grad_x, None, None, None, None, None, None, None


def fused_forward_kl_and_ce(
    student_logits: Tensor,
    teacher: Tensor | Sequence[Tensor],
    labels: Tensor | None,
    weights: Tensor,
    coefficients: Sequence[float],
    *,
    temperature: float = 1.0,
    scale_by_temperature_squared: bool = True,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """``c_kd · Σ_n w_n T²·KL(p_T ‖ q_T)_n + c_ce · Σ_n w_n CE_n`` and the two sums, in one pass per chunk.

    ``teacher`` is full teacher logits shaped like ``student_logits``, or the pair (top-k log-probabilities
    at T, their token ids) of a top-k cache; the values equal :func:`chunked_weighted_sums` over
    :func:`soft_label_loss` (or :func:`topk_soft_label_loss`) and :func:`hard_label_loss`. The gradient is
    written directly, ``∂/∂z_n = w_n (c_kd · T · ∂KL/∂(z_n/T) + c_ce · 1[y_n ≠ −100] (q − onehot(y_n)))``
    (``1/T`` instead of ``T`` without the T² scaling), where ∂KL/∂(z/T) is q_T − p_T for full logits, so
    autograd keeps nothing of the vocabulary-wide intermediates. With T = 1 one softmax of the student
    serves both terms. ``labels=None`` drops the CE term. ``chunk_size <= 0`` asks for one chunk; chunks
    are capped at ``MAX_CHUNK_ELEMENTS`` logits either way (the result does not depend on the chunking).
    """
    parts = (teacher,) if isinstance(teacher, Tensor) else tuple(teacher)
    if len(parts) not in (1, 2):
        raise ValueError("teacher must be full logits or a (top-k log-probs, top-k indices) pair.")
    chunk_size = capped_chunk_rows(chunk_size if chunk_size > 0 else student_logits.shape[0], student_logits)
    return _FusedForwardKLAndCE.apply(
        student_logits, parts, labels, weights, tuple(float(c) for c in coefficients),
        float(temperature), bool(scale_by_temperature_squared), int(chunk_size),
    )
