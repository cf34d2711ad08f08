"""Sentence embeddings: pooling of token vectors, and the loss between student and teacher embeddings.

Hidden states are ``[B, T, H]``; ``attention_mask`` is ``[B, T]`` with 1 for real tokens and 0 for padding
(``None``: every position is real). Padded positions never change a pooled vector, whatever they hold
(inf and NaN included). An example with no real token pools to the zero vector.
The losses return one value per example, ``[B]``; the caller sums them and divides by its example count.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "max")
EMBEDDING_LOSSES = ("mse", "cosine")
_EPS = 1e-12


def _real_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The ``[B, T, 1]`` boolean mask of real tokens."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [batch, tokens, width], got shape {tuple(hidden.shape)}")
    if attention_mask is None:
        return torch.ones(*hidden.shape[:2], 1, dtype=torch.bool, device=hidden.device)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(hidden.shape[:2])}")
    return (attention_mask.to(hidden.device) > 0).unsqueeze(-1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the real tokens' vectors: ``e_b = sum_t m_bt h_bt / max(1, sum_t m_bt)``. Returns ``[B, H]``."""
    real = _real_tokens(hidden, attention_mask)
    total = torch.where(real, hidden, hidden.new_zeros(())).sum(1)
    return total / real.sum(1).clamp_min(1).to(hidden.dtype)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The vector of the first real token: ``e_b = h_{b, t0(b)}`` with ``t0(b) = min{t : m_bt = 1}``
    (position 0 with right padding; the first unpadded position with left padding). Returns ``[B, H]``."""
    real = _real_tokens(hidden, attention_mask).squeeze(-1)
    first = real.to(torch.int32).argmax(dim=1)  # 0 for an example with no real token
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    return torch.where(real.any(1, keepdim=True), picked, picked.new_zeros(()))


def max_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feature-wise maximum over the real tokens: ``e_bh = max_{t : m_bt = 1} h_bth``. Returns ``[B, H]``."""
    real = _real_tokens(hidden, attention_mask)
    lowest = torch.finfo(hidden.dtype).min
    pooled = torch.where(real, hidden, hidden.new_full((), lowest)).amax(1)
    return torch.where(real.any(1), pooled, pooled.new_zeros(()))


POOLERS = {"mean": mean_pool, "cls": cls_pool, "max": max_pool}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str, normalize: bool = False) -> torch.Tensor:
    """``POOLERS[mode](hidden, attention_mask)``, then ``e / max(||e||_2, 1e-12)`` when ``normalize``."""
    if mode not in POOLERS:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    pooled = POOLERS[mode](hidden, attention_mask)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1, eps=_EPS) if normalize else pooled


def embedding_loss(
    student_emb: torch.Tensor, teacher_emb: torch.Tensor, loss: str = "mse", normalize: bool = False
) -> torch.Tensor:
    """Per-example distance between sentence embeddings ``[B, D]``. Returns ``[B]``.

    With ``normalize`` both vectors are first divided by their L2 norm (``s <- s / ||s||``, ``t <- t / ||t||``).
    ``mse``: ``L_b = 1/D * ||s_b - t_b||^2`` (sentence-transformers' MSELoss per example).
    ``cosine``: ``L_b = 1 - <s_b, t_b> / (||s_b|| ||t_b||)``.
    """
    if loss not in EMBEDDING_LOSSES:
        raise ValueError(f"embedding loss must be one of {EMBEDDING_LOSSES}, got {loss!r}")
    if student_emb.dim() != 2 or student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"embeddings must both be [batch, width] of one shape, got student {tuple(student_emb.shape)} and "
            f"teacher {tuple(teacher_emb.shape)}; project the student to the teacher's width first (EmbeddingProjection)"
        )
    teacher_emb = teacher_emb.to(student_emb.dtype)
    if normalize:
        student_emb = torch.nn.functional.normalize(student_emb, p=2.0, dim=-1, eps=_EPS)
        teacher_emb = torch.nn.functional.normalize(teacher_emb, p=2.0, dim=-1, eps=_EPS)
    if loss == "mse":
        return (student_emb - teacher_emb).pow(2).mean(-1)
    return 1.0 - torch.nn.functional.cosine_similarity(student_emb, teacher_emb, dim=-1, eps=1e-8)
