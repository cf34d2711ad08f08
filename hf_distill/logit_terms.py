"""The logit terms of one batch: alpha · KD(teacher ‖ student) + (1 − alpha) · CE, summed over the rows that
`tasks.logit_rows` lines up (unnormalised: the trainer divides by the step's item count).

Forward KL takes the fused KD + CE path (one pass per chunk, gradient written in the forward); the other
divergences take the generic chunked path of `losses/logits.py`.
"""

from __future__ import annotations

from typing import Any

import torch

from .losses.logits import (
    chunked_weighted_sums,
    fused_forward_kl_and_ce,
    hard_label_loss,
    soft_label_loss,
    topk_soft_label_loss,
)
from .tasks import LogitRows


def logit_terms(
    rows_per_target: list[tuple[list[LogitRows], float]], alpha: float, temperature: float, args: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha · Σ_i w_i Σ soft_i + (1 − alpha) · Σ hard over all rows (unnormalised), and each sum for logging."""
    has_labels = all(r.labels is not None for rows, _ in rows_per_target for r in rows)
    alpha = alpha if has_labels else 1.0
    weighted, sums = torch.zeros(()), torch.zeros(2)
    for i, (rows, weight) in enumerate(rows_per_target):
        hard_weight = 1.0 - alpha if i == 0 else 0.0  # CE reads the labels once, whatever the teachers
        for r in rows:
            w_sum, term = row_sums(r, has_labels, (alpha * weight, hard_weight), temperature, args)
            scale = term.new_tensor([weight, 1.0 if i == 0 else 0.0])  # on the loss's device: no host sync
            weighted, sums = weighted.to(w_sum.device) + w_sum, sums.to(term.device) + term * scale
    terms = {"kd": sums[0]}
    if has_labels:
        terms["ce"] = sums[1]
    return weighted, terms


def row_sums(
    r: LogitRows, has_labels: bool, weights: tuple[float, float], temperature: float, args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum, [soft sum, hard sum]) of one set of rows: the fused forward-KL + CE path (one pass per
    chunk, gradient written directly), or the generic chunked path for the other divergences."""
    a = args
    labels = r.labels if has_labels else None
    if a.distillation_loss == "forward_kl":
        return fused_forward_kl_and_ce(r.student, r.teacher, labels, r.weights, weights, temperature=temperature,
                                       scale_by_temperature_squared=a.scale_by_temperature_squared,
                                       chunk_size=a.loss_chunk_size)
    options = dict(loss=a.distillation_loss, temperature=temperature, jsd_beta=a.jsd_beta,
                   skew_lambda=a.skew_lambda, scale_by_temperature_squared=a.scale_by_temperature_squared)
    soft_loss = topk_soft_label_loss if len(r.teacher) == 2 else soft_label_loss

    def row_losses(student: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        teacher, row_labels = (rest[:-1], rest[-1]) if has_labels else (rest, None)
        soft = soft_loss(student, *teacher, **options)
        hard = hard_label_loss(student, row_labels) if has_labels else torch.zeros_like(soft)
        return torch.stack([soft, hard])

    return chunked_weighted_sums(row_losses, weights, r.student, r.weights, *r.teacher, *((labels,) if has_labels else ()),
                                 chunk_size=a.loss_chunk_size)
