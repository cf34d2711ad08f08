"""Intermediate-feature losses: hidden states and attention maps.

Every function returns a per-example tensor of shape ``[B]``: each example's value is averaged over
its valid tokens (or attention rows), so padded positions change nothing and the caller chooses the
batch reduction. ``attention_mask`` is ``[B, T]`` with 1 for real tokens and 0 for padding; ``None``
means every position is real. Hidden states are ``[B, T, H]``; attention maps are ``[B, heads, T, T]``
probabilities (rows over keys), as returned by ``output_attentions=True`` with eager attention.
Student and teacher widths must already match (project the student first when they differ).
"""

from __future__ import annotations

import torch

HEAD_REDUCTIONS = ("mean",)
_EPS = 1e-12


def _token_mask(reference: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The ``[B, T]`` boolean mask of real tokens (all True when ``attention_mask`` is None)."""
    if attention_mask is None:
        return torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
    if attention_mask.shape != reference.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(reference.shape[:2])}")
    return attention_mask.to(reference.device) > 0


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True; masked entries count as 0 even when they are inf or NaN."""
    return torch.where(mask, values, values.new_zeros(())).sum(dims)


def _masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` values -> ``[B]`` mean over the positions where ``mask`` is True (0 for an empty row)."""
    return _masked_sum(values, mask, (-1,)) / mask.sum(-1).clamp_min(1).to(values.dtype)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor, ndim: int, what: str) -> None:
    if student.dim() != ndim or teacher.dim() != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}")
    if ndim == 3 and student.shape != teacher.shape:
        raise ValueError(
            f"{what} shapes differ: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "project the student to the teacher's width first (FeatureProjections)"
        )


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per valid token, averaged over tokens.

    ``L_b = 1/|V_b| * sum_{t in V_b} 1/H * ||s_bt - t_bt||^2`` with ``V_b`` the valid tokens of example b.
    Returns ``[B]``.
    """
    _check_pair(student_hidden, teacher_hidden, 3, "hidden states")
    per_token = (student_hidden - teacher_hidden).pow(2).mean(-1)
    return _masked_token_mean(per_token, _token_mask(student_hidden, attention_mask))


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine distance per valid token, averaged over tokens.

    ``L_b = 1/|V_b| * sum_{t in V_b} (1 - <s_bt, t_bt> / (||s_bt|| ||t_bt||))``. Returns ``[B]``.
    """
    _check_pair(student_hidden, teacher_hidden, 3, "hidden states")
    per_token = 1.0 - torch.nn.functional.cosine_similarity(student_hidden, teacher_hidden, dim=-1, eps=1e-8)
    return _masked_token_mean(per_token, _token_mask(student_hidden, attention_mask))


def pkd_cls(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cls_index: int = 0,
) -> torch.Tensor:
    """Patient-KD loss (Sun et al., 2019) on the [CLS] vector: squared distance of L2-normalised vectors.

    ``L_b = || s_bc / ||s_bc|| - t_bc / ||t_bc|| ||_2^2`` with c = ``cls_index`` (summed over H, as in the
    paper; it lies in [0, 4]). Only position c is read, so padding elsewhere changes nothing; an example
    whose position c is padding raises ValueError. Returns ``[B]``.
    """
    _check_pair(student_hidden, teacher_hidden, 3, "hidden states")
    if attention_mask is not None and not bool(_token_mask(student_hidden, attention_mask)[:, cls_index].all()):
        raise ValueError(f"position cls_index={cls_index} is padding in some example; pass the right cls_index")
    s = torch.nn.functional.normalize(student_hidden[:, cls_index], dim=-1, eps=1e-8)
    t = torch.nn.functional.normalize(teacher_hidden[:, cls_index], dim=-1, eps=1e-8)
    return (s - t).pow(2).sum(-1)


def _match_heads(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, head_reduction: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the attention shapes; average over heads when the head counts differ and that is allowed."""
    _check_pair(student_attn, teacher_attn, 4, "attention maps")
    if head_reduction is not None and head_reduction not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduction={head_reduction!r} is not one of {HEAD_REDUCTIONS} or None")
    s_shape, t_shape = student_attn.shape, teacher_attn.shape
    if (s_shape[0], *s_shape[2:]) != (t_shape[0], *t_shape[2:]) or s_shape[-1] != s_shape[-2]:
        raise ValueError(f"attention shapes do not match: student {tuple(s_shape)} vs teacher {tuple(t_shape)}")
    if s_shape[1] != t_shape[1]:
        if head_reduction != "mean":
            raise ValueError(
                f"student has {s_shape[1]} attention heads and teacher {t_shape[1]}; "
                "pass head_reduction='mean' to compare head-averaged attention maps"
            )
        return student_attn.mean(1, keepdim=True), teacher_attn.mean(1, keepdim=True)
    return student_attn, teacher_attn


def attention_kl(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_reduction: str | None = None,
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, per query row over valid keys.

    ``L_b = 1/(N |V_b|) * sum_n sum_{q in V_b} sum_{k in V_b} a^T_nqk (log a^T_nqk - log a^S_nqk)``, N heads.
    Padded keys and padded query rows are ignored. When the head counts differ, ``head_reduction='mean'``
    compares head-averaged maps (N = 1); otherwise ValueError. Returns ``[B]``.
    """
    student_attn, teacher_attn = _match_heads(student_attn, teacher_attn, head_reduction)
    mask = _token_mask(student_attn[:, 0], attention_mask)  # [B, T]
    pointwise = torch.xlogy(teacher_attn, teacher_attn) - teacher_attn * student_attn.clamp_min(_EPS).log()
    per_row = _masked_sum(pointwise, mask[:, None, None, :], (-1,)).mean(1)  # [B, T]
    return _masked_token_mean(per_row, mask)


def attention_mse(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    head_reduction: str | None = None,
) -> torch.Tensor:
    """Mean squared error between attention maps over the valid query x key block.

    ``L_b = 1/(N |V_b|^2) * sum_n sum_{q, k in V_b} (a^S_nqk - a^T_nqk)^2``. Head counts as in
    :func:`attention_kl`. Returns ``[B]``.
    """
    student_attn, teacher_attn = _match_heads(student_attn, teacher_attn, head_reduction)
    mask = _token_mask(student_attn[:, 0], attention_mask)
    block = mask[:, None, :, None] & mask[:, None, None, :]  # [B, 1, T, T]
    squared = _masked_sum((student_attn - teacher_attn).pow(2), block, (-1, -2)).mean(1)  # [B]
    return squared / mask.sum(-1).pow(2).clamp_min(1).to(squared.dtype)
