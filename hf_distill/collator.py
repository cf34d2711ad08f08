"""A collator wrapper that carries teacher columns through batching.

Stock collators pad only the model inputs, and choke on ragged cached teacher outputs. This wrapper takes
the teacher columns out, lets the wrapped collator build the batch, then pads each teacher column to the
batch's sequence length on the tokenizer's padding side and adds it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

def _pad_value(column: str, teacher_pad_token_id: int) -> float:
    """Padding for a teacher column; padded rows stay finite, since they are multiplied by a zero weight."""
    if column.endswith("input_ids"):
        return teacher_pad_token_id
    if column.endswith("log_probs"):
        return -1e4
    return 0


def pad_to_length(values: Sequence[Any], length: int, pad_value: float, side: str = "right") -> torch.Tensor:
    """Stack ragged per-example tensors along dim 0 of each, padded to ``length`` positions."""
    tensors = [torch.as_tensor(v) for v in values]
    out = tensors[0].new_full((len(tensors), length) + tuple(tensors[0].shape[1:]), pad_value)
    for i, t in enumerate(tensors):
        n = min(t.shape[0], length)
        if side == "left":
            out[i, length - n :] = t[-n:] if n else t[:0]
        else:
            out[i, :n] = t[:n]
    return out


@dataclass
class TeacherColumnsCollator:
    """Wrap ``base_collator``; pad ``cached_columns`` and ``teacher_*`` inputs to the batch length."""

    base_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    cached_columns: Sequence[str] = ()
    padding_side: str = "right"
    teacher_pad_token_id: int = 0

    def _is_teacher_column(self, name: str) -> bool:
        return name in self.cached_columns or name.startswith("teacher_")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        names = [k for k in features[0] if self._is_teacher_column(k)]
        if not names:
            return self.base_collator(features)
        teacher_columns = {k: [f[k] for f in features] for k in names}
        batch = self.base_collator([{k: v for k, v in f.items() if k not in names} for f in features])
        for name, values in teacher_columns.items():
            if name not in self.cached_columns:  # teacher_-prefixed inputs: pad to their own longest length
                length = max(len(v) for v in values)
                batch[name] = pad_to_length(values, length, _pad_value(name, self.teacher_pad_token_id), self.padding_side)
            elif torch.as_tensor(values[0]).dim() <= 1:  # per-example logits [C] or a scalar
                batch[name] = torch.stack([torch.as_tensor(v) for v in values])
            else:  # per-token outputs [T_i, ...]: align with the student's padded input_ids
                length = batch["input_ids"].shape[1]
                batch[name] = pad_to_length(values, length, _pad_value(name, 0), self.padding_side)
        return batch
