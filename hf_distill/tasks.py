"""Output shapes and masks per task: the one place that knows how logits line up with targets.

Every task is reduced to *rows*: pairs of student/teacher distributions with a target and a weight.

=========================  ================================  ==========================================
task                       rows                              weight (mask)
=========================  ================================  ==========================================
sequence-classification    one per example, over labels      1
token-classification       one per token, over labels        labels != -100, else the attention mask
question-answering         start and end per example,        ½ each (so an example weighs 1); padded
                           over positions                    positions are removed from the softmax
causal-lm                  one per position t, predicting    shifted labels != -100, else the shifted
                           token t + 1, over the vocabulary  attention mask
feature-extraction,        none: a headless student has no   (the loss is the intermediate terms and, for
sentence-embedding         logits                            sentence embeddings, the pooled embedding)
=========================  ================================  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

TASK_BY_CLASS_SUFFIX = {
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
}
TARGET_KEYS = {
    "sequence-classification": ("labels",),
    "token-classification": ("labels",),
    "question-answering": ("start_positions", "end_positions"),
    "causal-lm": ("labels",),
    # No targets: a labelled dataset's labels are only kept out of the headless models' inputs.
    "feature-extraction": ("labels",),
    "sentence-embedding": ("labels",),
}
ENCODER_TASKS = ("feature-extraction", "sentence-embedding")  # tasks without logits (encoder_tasks.py)
IGNORE_INDEX = -100
_MASKED_LOGIT = -1e4

Targets = Union[torch.Tensor, Sequence[torch.Tensor]]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a DDP/compiled/PEFT wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def task_of_class_name(name: str) -> Optional[str]:
    """The task of a model class name (``BertForSequenceClassification`` -> ``sequence-classification``), or None."""
    return next((task for suffix, task in TASK_BY_CLASS_SUFFIX.items() if name.endswith(suffix)), None)


def detect_task(model: nn.Module) -> str:
    """Infer the distillation task from the model class name (e.g. ``BertForSequenceClassification``); a
    headless transformers model (``AutoModel``, its own ``base_model``) is ``feature-extraction``."""
    model = unwrap_model(model)
    name = type(model).__name__
    task = task_of_class_name(name)
    if task is None and getattr(model, "base_model", None) is model:
        return "feature-extraction"
    if task is None:
        raise ValueError(
            f"Cannot tell the task of a {name}: use a *ForSequenceClassification, *ForTokenClassification, "
            "*ForQuestionAnswering or *ForCausalLM model, or set `distillation_task` explicitly."
        )
    return task


def task_logits(outputs: Any, task: str) -> Optional[torch.Tensor]:
    """The logits of a model output; for QA the start and end logits stacked as [B, T, 2]; None for the
    encoder tasks (a headless model has no logits)."""
    if task in ENCODER_TASKS:
        return None
    if task == "question-answering":
        return torch.stack([outputs["start_logits"], outputs["end_logits"]], dim=-1)
    return outputs["logits"]


def _shift_left(x: torch.Tensor, fill: int) -> torch.Tensor:
    """x[:, t] <- x[:, t + 1], last column filled: position t predicts token t + 1."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def token_targets(batch: Mapping[str, torch.Tensor], task: str) -> Optional[torch.Tensor]:
    """Per-position integer targets for token tasks (shifted for causal LM), or None without labels."""
    labels = batch.get("labels")
    if labels is None:
        return None
    return _shift_left(labels, IGNORE_INDEX) if task == "causal-lm" else labels


def token_weights(batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """Per-position weights [B, T] for token tasks: where a target exists, else the (shifted) attention mask."""
    targets = token_targets(batch, task)
    if targets is not None:
        return (targets != IGNORE_INDEX).float()
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    return (_shift_left(mask, 0) if task == "causal-lm" else mask).float()


def count_items(batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """How many items the loss averages over: examples, or weighted tokens for token tasks."""
    if task in ("token-classification", "causal-lm"):
        return token_weights(batch, task).sum()
    return torch.tensor(float(len(batch["input_ids"])), device=batch["input_ids"].device)


@dataclass
class LogitRows:
    """Aligned rows: student logits [N, V], teacher targets ([N, V] logits or (log_probs, indices) [N, k]),
    hard labels [N] (or None) and per-row weights [N]."""

    student: torch.Tensor
    teacher: tuple[torch.Tensor, ...]
    labels: Optional[torch.Tensor]
    weights: torch.Tensor


def agreement_counts(rows: Sequence[LogitRows]) -> dict[str, torch.Tensor]:
    """Counts for evaluation: rows where student and teacher top-1 agree, and the teacher's correct rows.

    Returns ``{"agree", "rows", "teacher_correct", "labelled"}`` (tensors; a top-k teacher's top-1 is its first index).
    """
    counts: dict[str, torch.Tensor] = {}
    for r in rows:
        teacher_top1 = r.teacher[1][..., 0] if len(r.teacher) != 1 else r.teacher[0].argmax(-1)
        valid = r.weights > 0
        new = {"agree": ((r.student.argmax(-1) == teacher_top1) & valid).sum(), "rows": valid.sum()}
        if r.labels is not None:
            labelled = valid & (r.labels != IGNORE_INDEX)
            new.update(teacher_correct=((teacher_top1 == r.labels) & labelled).sum(), labelled=labelled.sum())
        for name, value in new.items():
            counts[name] = counts.get(name, 0) + value
    return counts


def _rows(x: torch.Tensor, n_leading: int) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if n_leading > 1 else x


def logit_rows(
    task: str, student_logits: torch.Tensor, teacher: Optional[Targets], batch: Mapping[str, torch.Tensor]
) -> list[LogitRows]:
    """Split task logits into rows (see the module table). ``teacher`` is a tensor shaped like
    ``student_logits`` or a tuple of tensors sharing its leading dims (top-k log-probs and indices)."""
    teacher_parts: tuple[torch.Tensor, ...] = () if teacher is None else (
        (teacher,) if isinstance(teacher, torch.Tensor) else tuple(teacher)
    )
    if task == "sequence-classification":
        labels = batch.get("labels")
        weights = torch.ones(student_logits.shape[0], device=student_logits.device)
        return [LogitRows(student_logits, teacher_parts, labels, weights)]
    if task in ("token-classification", "causal-lm"):
        targets = token_targets(batch, task)
        return [
            LogitRows(
                _rows(student_logits, 2),
                tuple(_rows(t, 2) for t in teacher_parts),
                None if targets is None else targets.reshape(-1),
                token_weights(batch, task).reshape(-1),
            )
        ]
    if task == "question-answering":
        mask = batch.get("attention_mask")
        rows = []
        for j, key in enumerate(TARGET_KEYS[task]):
            parts = (student_logits[..., j],) + tuple(t[..., j] for t in teacher_parts)
            if mask is not None:
                parts = tuple(p.float().masked_fill(mask == 0, _MASKED_LOGIT) for p in parts)
            labels = batch.get(key)
            if labels is not None:
                length = student_logits.shape[1]
                labels = torch.where((labels >= 0) & (labels < length), labels, torch.full_like(labels, IGNORE_INDEX))
            weights = torch.full((student_logits.shape[0],), 0.5, device=student_logits.device)
            rows.append(LogitRows(parts[0], parts[1:], labels, weights))
        return rows
    raise ValueError(f"Unknown task {task!r}.")
