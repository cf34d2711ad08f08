"""Data for cross-tokenizer distillation: prompt/completion rows tokenized by both sides, aligned, and padded.

:func:`tokenize_aligned` maps prompt/completion rows (the format of
:func:`hf_distill.lm.data.tokenize_completions`: plain-text prompts, each side with its own special tokens,
or chat messages, each side with its own chat template) through
:func:`hf_distill.lm.alignment.align_example`. Each row gets

* the student's ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on the prompt), as
  ``tokenize_completions`` writes them;
* the teacher's ``teacher_input_ids`` / ``teacher_attention_mask`` (its own tokenization of the same text);
* the alignment: ``student_group_ids`` / ``teacher_group_ids`` (the aligned group of each token, -1 for
  none) and ``student_unaligned`` / ``teacher_unaligned`` (completion tokens that could not be aligned).

Beyond the content groups of ``align_example``, the EOS that ends the completion on both sides forms one
more group (both sides predict "the text ends here" from the same text), so with identical tokenizers the
groups are exactly the completion tokens the same-tokenizer loss covers. :class:`CrossTokenizerCollator`
pads a batch of such rows (right padding on both sides).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from .alignment import IGNORE_INDEX, NO_GROUP, AlignedExample, _pad, align_example

logger = logging.getLogger(__name__)

ALIGNMENT_COLUMNS = ("student_group_ids", "teacher_group_ids", "student_unaligned", "teacher_unaligned")
TEACHER_COLUMNS = ("teacher_input_ids", "teacher_attention_mask")


def _eos_group(example: AlignedExample, student_eos: Any, teacher_eos: Any) -> None:
    """Make the completion-ending EOS of both sides one more group (in place)."""
    s, t = example.student, example.teacher
    ends = [side.labels[-1] if side.labels else None for side in (s, t)]
    if ends == [student_eos, teacher_eos] and student_eos is not None and teacher_eos is not None \
            and s.group_ids[-1] == NO_GROUP and t.group_ids[-1] == NO_GROUP:
        groups = max([*s.group_ids, *t.group_ids, -1]) + 1
        s.group_ids[-1] = t.group_ids[-1] = groups


def _truncate(example: AlignedExample, max_length: int) -> dict[str, list]:
    """Cut both sides to ``max_length`` tokens; a group cut on either side leaves both (no group)."""
    s, t = example.student, example.teacher
    cut = set()
    for side in (s, t):
        cut |= {g for g in side.group_ids[max_length:] if g != NO_GROUP}
    row: dict[str, list] = {}
    for name, side in (("student", s), ("teacher", t)):
        groups = [NO_GROUP if g in cut else g for g in side.group_ids[:max_length]]
        row[f"{name}_group_ids"] = groups
        row[f"{name}_unaligned"] = list(side.unaligned[:max_length])
    ids = s.input_ids[:max_length]
    row.update(input_ids=ids, attention_mask=[1] * len(ids), labels=s.labels[:max_length])
    teacher_ids = t.input_ids[:max_length]
    row.update(teacher_input_ids=teacher_ids, teacher_attention_mask=[1] * len(teacher_ids))
    return row


def align_row(student_tokenizer: Any, teacher_tokenizer: Any, prompt: Any, completion: Any, *, max_length: int,
              add_eos: bool = True) -> dict[str, list]:
    """One prompt/completion pair as the columns listed in the module docstring (plain lists)."""
    example = align_example(student_tokenizer, teacher_tokenizer, prompt, str(completion), add_eos=add_eos)
    if add_eos:
        _eos_group(example, student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id)
    return _truncate(example, max_length)


def tokenize_aligned(
    dataset: datasets.Dataset | datasets.DatasetDict | Sequence[Mapping[str, Any]],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    max_length: int,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    add_eos: bool = True,
) -> datasets.Dataset | datasets.DatasetDict:
    """Tokenize prompt/completion rows with both tokenizers and align them (see the module docstring).

    Both tokenizers must be fast (offset mappings). Each side is cut at ``max_length`` tokens on the right;
    a group that loses a token on either side is dropped from the distillation loss (its student tokens keep
    their CE). The source columns are removed; other columns are kept.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2, got {max_length}.")
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({k: tokenize_aligned(v, student_tokenizer, teacher_tokenizer, max_length=max_length,
                                                         prompt_column=prompt_column, completion_column=completion_column,
                                                         add_eos=add_eos) for k, v in dataset.items()})
    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))
    missing = [c for c in (prompt_column, completion_column) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"tokenize_aligned needs prompt/completion columns; {missing} not in {dataset.column_names}. Name them "
            "with prompt_column=/completion_column= (chat `messages` rows: split them into prompt and completion)."
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [align_row(student_tokenizer, teacher_tokenizer, p, c, max_length=max_length, add_eos=add_eos)
                for p, c in zip(batch[prompt_column], batch[completion_column])]
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

    produced = {"input_ids", "attention_mask", "labels", *TEACHER_COLUMNS, *ALIGNMENT_COLUMNS}
    remove = [c for c in dataset.column_names if c in (prompt_column, completion_column) or c in produced]
    return dataset.map(encode, batched=True, remove_columns=remove, desc="Tokenizing and aligning completions")


@dataclass
class CrossTokenizerCollator:
    """Right-pad rows of :func:`tokenize_aligned`: each side with its own pad id, labels with -100, group ids
    with -1, the unaligned flags with False. Other columns are dropped."""

    student_pad_token_id: int
    teacher_pad_token_id: int

    def padding(self) -> dict[str, tuple[Any, torch.dtype]]:
        """Each column's pad value and dtype."""
        return {
            "input_ids": (self.student_pad_token_id, torch.long), "attention_mask": (0, torch.long),
            "labels": (IGNORE_INDEX, torch.long), "teacher_input_ids": (self.teacher_pad_token_id, torch.long),
            "teacher_attention_mask": (0, torch.long), "student_group_ids": (NO_GROUP, torch.long),
            "teacher_group_ids": (NO_GROUP, torch.long), "student_unaligned": (False, torch.bool),
            "teacher_unaligned": (False, torch.bool),
        }

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        columns = self.padding()
        missing = [c for c in columns if c not in features[0]]
        if missing:
            raise ValueError(
                f"Cross-tokenizer batches need the columns {missing}: tokenize the data with "
                "hf_distill.lm.cross_tokenizer_data.tokenize_aligned(dataset, student_tokenizer, teacher_tokenizer, "
                "max_length=...) (or scripts/distill_causal_lm.py --teacher_tokenizer)."
            )
        return {name: _pad([f[name] for f in features], value, dtype) for name, (value, dtype) in columns.items()}
