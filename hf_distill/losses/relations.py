"""Relation losses: they compare how representations relate to each other, not the vectors themselves.

So the student and teacher may have different widths and head counts, with no projection.

- :func:`minilm_relation`: MiniLM (Wang et al., 2020/2021) self-attention and value relations between the
  tokens of one example. Returns ``[B]`` (averaged over relation heads and valid query tokens).
- :func:`rkd_distance`, :func:`rkd_angle`: relational KD (Park et al., 2019) between the examples of a
  batch, on pooled ``[B, D]`` vectors. They relate samples to each other, so they return a scalar for the
  whole batch, not a per-example tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-12


def _split_heads(states: torch.Tensor, num_heads: int, role: str) -> torch.Tensor:
    """``[B, T, W]`` -> ``[B, R, T, W/R]``; ValueError when R does not divide W."""
    if states.dim() != 3:
        raise ValueError(f"{role} must be [B, T, width], got shape {tuple(states.shape)}")
    batch, length, width = states.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"num_relation_heads={num_heads} must be >= 1 and divide the {role} width {width}")
    return states.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def _log_relation(
    queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor, num_heads: int, role: str
) -> torch.Tensor:
    """``log softmax_k(q . k / sqrt(d))`` per relation head, padded keys excluded: ``[B, R, T, T]``."""
    q = _split_heads(queries, num_heads, role)
    k = _split_heads(keys, num_heads, role)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


def minilm_relation(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_relation_heads: int,
    student_keys: torch.Tensor | None = None,
    teacher_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM relation loss: KL(teacher || student) between scaled dot-product relation distributions.

    Both ``[B, T, W]`` inputs are split into R = ``num_relation_heads`` heads (R must divide both widths,
    which may differ); per head ``Rel = softmax_k(X_q . X_k / sqrt(W/R))`` over the valid keys, and
    ``L_b = 1/(R |V_b|) * sum_r sum_{q in V_b} KL(Rel^T_rq || Rel^S_rq)``.
    Pass the values (or hidden states) for the value relation; pass queries as ``*_states`` and keys as
    ``*_keys`` for the query-key (self-attention) relation of MiniLMv2. Returns ``[B]``.
    """
    mask = (
        torch.ones(student_states.shape[:2], dtype=torch.bool, device=student_states.device)
        if attention_mask is None
        else attention_mask.to(student_states.device) > 0
    )
    if student_states.shape[:2] != teacher_states.shape[:2] or mask.shape != student_states.shape[:2]:
        raise ValueError(
            f"batch/length mismatch: student {tuple(student_states.shape)}, teacher {tuple(teacher_states.shape)}, "
            f"attention_mask {tuple(mask.shape)}"
        )
    s_keys = student_states if student_keys is None else student_keys
    t_keys = teacher_states if teacher_keys is None else teacher_keys
    log_s = _log_relation(student_states, s_keys, mask, num_relation_heads, "student")
    log_t = _log_relation(teacher_states, t_keys, mask, num_relation_heads, "teacher")
    pointwise = log_t.exp() * (log_t - log_s)
    key_mask = mask[:, None, None, :]
    per_row = torch.where(key_mask, pointwise, pointwise.new_zeros(())).sum(-1).mean(1)  # [B, T]
    per_row = torch.where(mask, per_row, per_row.new_zeros(()))
    return per_row.sum(-1) / mask.sum(-1).clamp_min(1).to(per_row.dtype)


def _check_pooled(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"expected pooled [B, D] inputs, got student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` -> ``[B, B]`` Euclidean distances (gradient-safe at 0)."""
    return (x[:, None, :] - x[None, :, :]).pow(2).sum(-1).clamp_min(_EPS).sqrt()


def rkd_distance(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """RKD distance loss over the batch (a scalar: it relates samples to each other).

    ``psi(i, j) = ||x_i - x_j|| / mu`` with ``mu`` the mean distance over pairs i != j;
    ``L = mean_{i != j} smooth_l1(psi_S(i, j) - psi_T(i, j))`` (smooth L1 with beta = 1).
    Widths may differ. Fewer than 2 examples give 0.
    """
    _check_pooled(student_pooled, teacher_pooled)
    batch = student_pooled.shape[0]
    if batch < 2:
        return student_pooled.sum() * 0.0
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=student_pooled.device)
    s = _pairwise_distances(student_pooled)[off_diagonal]
    t = _pairwise_distances(teacher_pooled)[off_diagonal]
    return F.smooth_l1_loss(s / s.mean().clamp_min(_EPS), t / t.mean().clamp_min(_EPS), beta=1.0)


def _angles(x: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` -> ``[B, B, B]`` with entry (i, j, k) = cos of the angle at x_j: <e(x_i - x_j), e(x_k - x_j)>."""
    diff = x[:, None, :] - x[None, :, :]  # (i, j) -> x_i - x_j
    unit = diff / diff.pow(2).sum(-1, keepdim=True).clamp_min(_EPS).sqrt()
    return torch.einsum("ijd,kjd->ijk", unit, unit)


def rkd_angle(student_pooled: torch.Tensor, teacher_pooled: torch.Tensor) -> torch.Tensor:
    """RKD angle loss over the batch (a scalar: it relates triplets of samples).

    ``cos_ijk = <(x_i - x_j)/||x_i - x_j||, (x_k - x_j)/||x_k - x_j||>``;
    ``L = mean_{i, j, k distinct} smooth_l1(cos^S_ijk - cos^T_ijk)`` (smooth L1 with beta = 1).
    Widths may differ. Fewer than 3 examples give 0.
    """
    _check_pooled(student_pooled, teacher_pooled)
    batch = student_pooled.shape[0]
    if batch < 3:
        return student_pooled.sum() * 0.0
    idx = torch.arange(batch, device=student_pooled.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[None, :, None] != idx[None, None, :])
    distinct &= idx[:, None, None] != idx[None, None, :]
    return F.smooth_l1_loss(_angles(student_pooled)[distinct], _angles(teacher_pooled)[distinct], beta=1.0)
