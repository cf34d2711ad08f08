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

On-policy batches: :func:`align_generated` turns a completion the student generated into such a row. The
student keeps the ids it sampled; their text (decoded as it continues the prompt) is tokenized by the teacher
after the teacher's own prompt tokens, and the two are aligned like any row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy
import torch

from .alignment import (IGNORE_INDEX, NO_GROUP, AlignedExample, SideEncoding, _pad, align_example, encode_completion,
                        group_sides)
from .data import PROMPT_LENGTH_COLUMN

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


def _generated_spans(tokenizer: Any, prompt_ids: list[int], content_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of generated tokens as they continue the prompt, and each token's character span in it.

    Token i ends where the decoding of the prompt + the first i + 1 tokens ends; a token that ends inside a
    multi-byte character (its decoding is not a prefix of the whole text) is zero-width at the character the next
    token completes (they share its group); a token that adds no character (a special token, which decodes to
    nothing, or a stray byte after one already shown as U+FFFD) shares the previous token's span.
    """
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prefixes = [prompt_ids + content_ids[: i + 1] for i in range(len(content_ids))]
    context = tokenizer.decode(prompt_ids, **options)
    decoded = tokenizer.batch_decode(prefixes, **options)
    if not all(d.startswith(context) for d in decoded):  # the decoder rewrote the prompt's end: decode alone
        context, decoded = "", tokenizer.batch_decode([content_ids[: i + 1] for i in range(len(content_ids))], **options)
    texts = [d[len(context):] for d in decoded]
    final = texts[-1] if texts else ""
    spans: list[tuple[int, int]] = []
    end = 0
    for text in texts:
        if len(text) < end or not final.startswith(text):  # ends inside a character: zero-width, joins the next
            spans.append((end, end))
        elif len(text) == end and spans:  # adds no character (a special token, a byte after a replaced one)
            spans.append((spans[-1][0], end))  # joins the previous token
        else:
            spans.append((end, len(text)))
            end = len(text)
    return final, spans


def align_generated(student_tokenizer: Any, teacher_tokenizer: Any, student_prompt_ids: list[int],
                    completion_ids: list[int], teacher_prompt_ids: list[int], same_tokenizer: bool = False) -> dict[str, list]:
    """A student-generated completion as a row of :func:`tokenize_aligned` (the module docstring's on-policy part).

    ``completion_ids`` ends with the student's EOS when it stopped; then the teacher's side ends with its EOS.
    With ``same_tokenizer`` the teacher reads the student's ids as they are (as the same-tokenizer path does).
    """
    eos = student_tokenizer.eos_token_id
    ended = bool(completion_ids) and completion_ids[-1] == eos
    content = completion_ids[:-1] if ended else completion_ids
    text, spans = _generated_spans(student_tokenizer, student_prompt_ids, content)
    n, ids = len(student_prompt_ids), student_prompt_ids + completion_ids
    student = SideEncoding(ids, [IGNORE_INDEX] * n + completion_ids, [NO_GROUP] * len(ids), [False] * len(ids),
                           list(range(n, n + len(content))), spans, student_tokenizer.convert_ids_to_tokens(content))
    special = set(student_tokenizer.all_special_ids) - {student_tokenizer.unk_token_id}
    s_bad = [i in special for i in content]
    if same_tokenizer:
        teacher = SideEncoding(list(ids), list(student.labels), list(student.group_ids), list(student.unaligned),
                               list(student.positions), list(spans), list(student.strings))
        t_bad = list(s_bad)
    else:
        teacher, t_bad = encode_completion(teacher_tokenizer, teacher_prompt_ids, text, 0, len(text), ended)
    example = group_sides(student, teacher, text, s_bad, t_bad)
    _eos_group(example, eos, teacher_tokenizer.eos_token_id)
    return _truncate(example, max(len(example.student.input_ids), len(example.teacher.input_ids)))


def teacher_prompt_ids(row: Mapping[str, Any], eos_token_id: Any) -> list[int]:
    """The teacher's tokens before the completion content of one padded batch row (its prompt, with its own
    special tokens or chat template up to the assistant text): those before its first grouped or unaligned
    token; when the completion had no content, all of them but a final EOS."""
    ids = torch.as_tensor(row["teacher_input_ids"])[torch.as_tensor(row["teacher_attention_mask"]).bool()].tolist()
    content = (torch.as_tensor(row["teacher_group_ids"]) >= 0) | torch.as_tensor(row["teacher_unaligned"]).bool()
    where = content[: len(ids)].nonzero()
    if where.numel():
        return ids[: int(where[0])]
    return ids[:-1] if len(ids) > 1 and ids[-1] == eos_token_id else ids


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
    prompt_only = prompt_column in dataset.column_names and completion_column not in dataset.column_names
    missing = [c for c in (prompt_column, completion_column) if c not in dataset.column_names and not prompt_only]
    if missing:
        raise ValueError(
            f"tokenize_aligned needs a prompt column (and a completion column, unless every completion is generated "
            f"on-policy); {missing} not in {dataset.column_names}. Name them with prompt_column=/completion_column= "
            "(chat `messages` rows: split them into prompt and completion)."
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        completions = [""] * len(batch[prompt_column]) if prompt_only else batch[completion_column]
        rows = [align_row(student_tokenizer, teacher_tokenizer, p, c, max_length=max_length,
                          add_eos=add_eos and not prompt_only) for p, c in zip(batch[prompt_column], completions)]
        if prompt_only:  # no completion tokens: only on-policy steps (lmbda = 1) can train (lm/on_policy.py)
            for row in rows:
                row[PROMPT_LENGTH_COLUMN] = len(row["input_ids"])
        return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}

    produced = {"input_ids", "attention_mask", "labels", *TEACHER_COLUMNS, *ALIGNMENT_COLUMNS}
    remove = [c for c in dataset.column_names if c in (prompt_column, completion_column) or c in produced]
    return dataset.map(encode, batched=True, remove_columns=remove, desc="Tokenizing and aligning completions")


@dataclass
class CrossTokenizerCollator:
    """Right-pad rows of :func:`tokenize_aligned`: each side with its own pad id, labels with -100, group ids
    with -1, the unaligned flags with False; add ``prompt_length`` (tokens before the first label, for on-policy
    generation). Other columns are dropped."""

    student_pad_token_id: int
    teacher_pad_token_id: int
    topk_prefix: str = "teacher_topk"  # the aligned top-k cache's columns, padded when the rows carry them

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
        batch = {name: _pad([f[name] for f in features], value, dtype) for name, (value, dtype) in columns.items()}
        batch[PROMPT_LENGTH_COLUMN] = torch.tensor([_prompt_length(f["labels"]) for f in features], dtype=torch.long)
        return {**batch, **self._cached(features, batch["teacher_input_ids"].shape[1])}

    def _cached(self, features: Sequence[Mapping[str, Any]], length: int) -> dict[str, torch.Tensor]:
        """The aligned top-k cache columns (``cache_aligned_teacher_topk``), padded to the teacher's length."""
        out = {}
        for suffix, dtype in (("log_probs", torch.float32), ("indices", torch.long), ("token_log_probs", torch.float32)):
            name = f"{self.topk_prefix}_{suffix}"
            if name in features[0]:
                values = [torch.as_tensor(numpy.asarray(f[name])).to(dtype) for f in features]
                padded = values[0].new_zeros((len(values), length, *values[0].shape[1:]))
                for b, v in enumerate(values):
                    padded[b, : len(v)] = v
                out[name] = padded
        name = f"{self.topk_prefix}_temperature"
        if name in features[0]:
            out[name] = torch.tensor([float(f[name]) for f in features])
        return out


def _prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first label (the prompt, which on-policy generation continues)."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
