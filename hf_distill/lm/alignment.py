"""Align two tokenizations of the same completion by character spans (cross-tokenizer distillation).

Each side (student, teacher) tokenizes the example its own way, exactly as
:func:`hf_distill.causal_lm.tokenize_completions` does: the prompt (plain text with the tokenizer's
special tokens, or chat messages through the side's own chat template) and the completion are
tokenized separately and concatenated, and EOS is appended to the completion. The completion's
*content* (the assistant text) is then located in each side's completion text, and the content tokens
of the two sides are grouped by their character offsets:

* a side has a *cut* at character position ``c`` when none of its tokens straddles ``c``
  (``start < c < end``); the groups are the intervals between consecutive cuts common to both
  sides, so each group covers the same characters on both sides, and no smaller grouping does;
* tokens of one multi-byte character (byte-level BPE, SentencePiece byte fallback) share or overlap
  offsets and never straddle a character boundary, so they stay in one group;
* an interval covered by one side only is merged into the next group (else the previous) when its
  text is whitespace (a WordPiece side drops spaces); otherwise one side dropped real characters (a
  normaliser) and its tokens are marked *unaligned*: they belong to no group, and are counted;
* when both sides have the same token strings with the same offsets in an interval (identical
  tokenizers), each token is its own group, so identical tokenizers give one-to-one groups.

Prompt tokens, chat-template tokens around the content, special tokens and EOS belong to no group
(group id ``-1``); the loss covers completion content only. Tokens that straddle the content's edge or
are special tokens inside it make their interval unaligned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
NO_GROUP = -1

__all__ = [
    "AlignedExample",
    "SideEncoding",
    "align_example",
    "align_offsets",
    "collate_aligned",
    "check_unaligned_share",
    "require_fast_tokenizer",
    "tokenizer_scheme",
    "unaligned_share",
]


def require_fast_tokenizer(tokenizer: Any, role: str) -> None:
    """Raise a clear error unless ``tokenizer`` is a fast (Rust) tokenizer that returns offset mappings."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Cross-tokenizer alignment needs character offsets, but the {role} tokenizer "
            f"({type(tokenizer).__name__}) is a slow tokenizer without `return_offsets_mapping`. Load the fast "
            "tokenizer instead: `AutoTokenizer.from_pretrained(path, use_fast=True)` (needs a tokenizer.json or a "
            "convertible vocabulary), or wrap a `tokenizers.Tokenizer` in `PreTrainedTokenizerFast(tokenizer_object=...)`."
        )


def tokenizer_scheme(tokenizer: Any) -> str:
    """The token-string convention of a fast tokenizer: "byte_level", "sentencepiece", "wordpiece" or "raw".

    Read from the backend's model and decoder; :func:`hf_distill.losses.cross_tokenizer.build_vocab_mapping`
    uses it to map token strings of the two vocabularies to the bytes they stand for.
    """
    require_fast_tokenizer(tokenizer, "given")
    backend = tokenizer.backend_tokenizer
    model = type(backend.model).__name__
    decoder = repr(backend.decoder) if backend.decoder is not None else ""
    if model == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in decoder or "ByteLevel" in repr(backend.pre_tokenizer):
        return "byte_level"
    if "▁" in decoder or "Metaspace" in decoder or "ByteFallback" in decoder:
        return "sentencepiece"
    return "raw"


# --------------------------------------------------------------------------------------------
# Pure alignment of two lists of character spans
# --------------------------------------------------------------------------------------------


def _cuts(spans: Sequence[tuple[int, int]], length: int) -> list[bool]:
    """cut[c] is True when no span straddles position c (start < c < end), for c in 0..length."""
    depth = [0] * (length + 2)
    for start, end in spans:
        if end - start > 1:
            depth[start + 1] += 1
            depth[end] -= 1
    cuts, running = [], 0
    for c in range(length + 1):
        running += depth[c]
        cuts.append(running == 0)
    return cuts


def _intervals(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], length: int):
    """Consecutive common cuts as intervals, with the tokens of each side that fall in each one.

    A token goes to the interval holding its start; a zero-width token at a cut goes to the interval that
    starts there (or the last one at the end of the text).
    """
    s_cuts, t_cuts = _cuts(student, length), _cuts(teacher, length)
    bounds = [c for c in range(length + 1) if s_cuts[c] and t_cuts[c]]
    if not bounds or bounds[-1] != length:
        bounds.append(length)
    index = [0] * (length + 1)  # interval index of every character position
    for k in range(len(bounds) - 1):
        for c in range(bounds[k], bounds[k + 1]):
            index[c] = k
    last = max(len(bounds) - 2, 0)
    index[length] = last
    members: list[tuple[list[int], list[int]]] = [([], []) for _ in range(max(len(bounds) - 1, 1))]
    for side, spans in ((0, student), (1, teacher)):
        for i, (start, _end) in enumerate(spans):
            members[index[min(start, length)]][side].append(i)
    return [(bounds[k], bounds[k + 1], *members[k]) for k in range(len(bounds) - 1)] or [(0, length, *members[0])]


def align_offsets(
    student: Sequence[tuple[int, int]],
    teacher: Sequence[tuple[int, int]],
    text: str,
    student_strings: Sequence[str] | None = None,
    teacher_strings: Sequence[str] | None = None,
    student_bad: Sequence[bool] | None = None,
    teacher_bad: Sequence[bool] | None = None,
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Group two tokenizations of ``text`` given as character spans (see the module docstring).

    Returns (student group ids, teacher group ids, group spans); a token in no group has id ``-1``.
    ``*_strings`` (the token strings) enable the one-to-one split of identical intervals; a token flagged in
    ``*_bad`` makes its whole interval unaligned.
    """
    s_bad = list(student_bad) if student_bad is not None else [False] * len(student)
    t_bad = list(teacher_bad) if teacher_bad is not None else [False] * len(teacher)
    merged: list[list[Any]] = []  # [start, end, student indices, teacher indices, aligned]
    pending: list[Any] | None = None  # one side's whitespace, waiting for the next interval
    for start, end, s_idx, t_idx in _intervals(student, teacher, len(text)):
        if not s_idx and not t_idx:
            continue
        if pending:
            start, s_idx, t_idx, pending = pending[0], pending[1] + s_idx, pending[2] + t_idx, None
        ok = not any(s_bad[i] for i in s_idx) and not any(t_bad[i] for i in t_idx)
        if ok and bool(s_idx) != bool(t_idx) and not text[start:end].strip():
            pending = [start, s_idx, t_idx]
            continue
        merged.append([start, end, s_idx, t_idx, ok and bool(s_idx) and bool(t_idx)])
    if pending:  # trailing one-sided whitespace joins the previous group, or stays unaligned
        if merged and merged[-1][4]:
            merged[-1][1], merged[-1][2], merged[-1][3] = len(text), merged[-1][2] + pending[1], merged[-1][3] + pending[2]
        else:
            merged.append([pending[0], len(text), pending[1], pending[2], False])
    return _number_groups(merged, student, teacher, student_strings, teacher_strings)


def _identical(s_idx, t_idx, student, teacher, student_strings, teacher_strings) -> bool:
    """Both sides hold the same token strings with the same spans (identical tokenizers)."""
    if student_strings is None or teacher_strings is None or len(s_idx) != len(t_idx):
        return False
    return all(student[i] == teacher[j] and student_strings[i] == teacher_strings[j] for i, j in zip(s_idx, t_idx))


def _number_groups(merged, student, teacher, student_strings, teacher_strings):
    s_group, t_group = [NO_GROUP] * len(student), [NO_GROUP] * len(teacher)
    spans: list[tuple[int, int]] = []
    for start, end, s_idx, t_idx, aligned in merged:
        if not aligned:
            continue
        s_idx, t_idx = sorted(s_idx), sorted(t_idx)
        if _identical(s_idx, t_idx, student, teacher, student_strings, teacher_strings):
            parts = [([i], [j], tuple(student[i])) for i, j in zip(s_idx, t_idx)]
        else:
            parts = [(s_idx, t_idx, (start, end))]
        for s_part, t_part, span in parts:
            for i in s_part:
                s_group[i] = len(spans)
            for j in t_part:
                t_group[j] = len(spans)
            spans.append(span)
    return s_group, t_group, spans


# --------------------------------------------------------------------------------------------
# One example: each side's own prompt rendering and tokenization, then the alignment
# --------------------------------------------------------------------------------------------


@dataclass
class SideEncoding:
    """One side of an aligned example: the full sequence (prompt + completion + EOS) and its groups.

    ``group_ids[i]`` is the group of token ``i`` (``-1``: prompt, template, special token, EOS, or
    unaligned); ``unaligned[i]`` is True for completion-content tokens that could not be aligned.
    ``strings``/``spans`` list the content tokens that took part in the alignment (spans relative to
    the content text) and ``positions`` their indices in ``input_ids``.
    """

    input_ids: list[int]
    labels: list[int]
    group_ids: list[int]
    unaligned: list[bool]
    positions: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)


@dataclass
class AlignedExample:
    """A prompt + completion tokenized by both sides, with the completion content grouped by characters."""

    student: SideEncoding
    teacher: SideEncoding
    text: str
    group_spans: list[tuple[int, int]]

    @property
    def num_groups(self) -> int:
        return len(self.group_spans)

    def to_features(self) -> dict[str, list]:
        """Plain lists for a dataset row; :func:`collate_aligned` pads a batch of them."""
        return {
            f"{name}_{key}": getattr(side, key)
            for name, side in (("student", self.student), ("teacher", self.teacher))
            for key in ("input_ids", "labels", "group_ids", "unaligned")
        }


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], role: str, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The prompt is a list of chat messages but the {role} tokenizer has no chat template. Set "
            f"`{role}_tokenizer.chat_template` (each side renders its own template), or pass plain-text prompts."
        )
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)
    return text if isinstance(text, str) else str(text[0])


def _side_texts(tokenizer: Any, prompt: Any, content: str, role: str) -> tuple[list[int], str, int]:
    """(prompt ids, completion text, where the content starts in it), the way ``tokenize_completions`` renders."""
    if _is_messages(prompt):
        prompt_text = _render(tokenizer, prompt, role, True) if len(prompt) else ""
        full = _render(tokenizer, [*prompt, {"role": "assistant", "content": content}], role, False)
        completion = full[len(prompt_text):] if full.startswith(prompt_text) else content
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]) if prompt_text else []
        start = completion.find(content)
        if start < 0:
            raise ValueError(
                f"The {role} chat template changes the assistant content (e.g. trims it), so it cannot be found in "
                f"the rendered completion {completion[:120]!r}; strip the completion text before aligning."
            )
        return prompt_ids, completion, start
    prompt_ids = list(tokenizer(str(prompt), add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and prompt_ids and prompt_ids[-1] == eos:
        bare = tokenizer(str(prompt), add_special_tokens=False)["input_ids"]
        if not bare or bare[-1] != eos:
            prompt_ids = prompt_ids[:-1]
    return prompt_ids, content, 0


def _encode_side(tokenizer: Any, prompt: Any, content: str, role: str, add_eos: bool) -> tuple[SideEncoding, list[bool]]:
    """Tokenize one side and pick the completion tokens that take part in the alignment.

    Also returns, per such token, whether it must stay unaligned (it straddles the content's edge, or is a
    special token inside the content).
    """
    require_fast_tokenizer(tokenizer, role)
    prompt_ids, completion, start = _side_texts(tokenizer, prompt, content, role)
    return encode_completion(tokenizer, prompt_ids, completion, start, len(content), add_eos)


def encode_completion(tokenizer: Any, prompt_ids: list[int], completion: str, start: int, length: int,
                      add_eos: bool) -> tuple[SideEncoding, list[bool]]:
    """``prompt_ids`` + the tokens of ``completion`` (+ EOS), whose content is ``completion[start:start + length]``;
    and per content token whether it must stay unaligned (see :func:`_encode_side`)."""
    enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True) if completion else None
    ids = list(enc["input_ids"]) if enc else []
    offsets = [tuple(o) for o in enc["offset_mapping"]] if enc else []
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        offsets.append((len(completion), len(completion)))
    side = SideEncoding(prompt_ids + ids, [IGNORE_INDEX] * len(prompt_ids) + ids,
                        [NO_GROUP] * (len(prompt_ids) + len(ids)), [False] * (len(prompt_ids) + len(ids)))
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # [UNK] stands for real text
    end = start + length
    strings = tokenizer.convert_ids_to_tokens(ids)
    bad: list[bool] = []
    for i, (token_id, (lo, hi)) in enumerate(zip(ids, offsets)):
        inside = start <= lo and hi <= end and (lo < end or hi > lo)
        if not inside and not (lo < end and hi > start):
            continue  # template text, or EOS / a special token outside the content
        if token_id in special and not inside:
            continue
        side.positions.append(len(prompt_ids) + i)
        side.spans.append((max(lo, start) - start, min(hi, end) - start))
        side.strings.append(strings[i])
        bad.append(not inside or token_id in special)
    return side, bad


def group_sides(student: SideEncoding, teacher: SideEncoding, content: str, s_bad: list[bool],
                t_bad: list[bool]) -> AlignedExample:
    """Align the content tokens of two encoded sides (:func:`align_offsets`) and write their group ids."""
    s_group, t_group, spans = align_offsets(student.spans, teacher.spans, content, student.strings, teacher.strings,
                                            s_bad, t_bad)
    for side, groups in ((student, s_group), (teacher, t_group)):
        for position, group in zip(side.positions, groups):
            side.group_ids[position] = group
            side.unaligned[position] = group == NO_GROUP
    return AlignedExample(student, teacher, content, spans)


def align_example(student_tokenizer: Any, teacher_tokenizer: Any, prompt: Any, completion: str,
                  add_eos: bool = True) -> AlignedExample:
    """Tokenize ``prompt`` + ``completion`` with both tokenizers and group the completion tokens by characters.

    ``prompt`` is text (each side adds its own special tokens, e.g. BOS) or a list of chat messages (each side
    renders its own chat template); ``completion`` is the assistant text. Both tokenizers must be fast.
    """
    content = completion if isinstance(completion, str) else str(completion)
    student, s_bad = _encode_side(student_tokenizer, prompt, content, "student", add_eos)
    teacher, t_bad = _encode_side(teacher_tokenizer, prompt, content, "teacher", add_eos)
    return group_sides(student, teacher, content, s_bad, t_bad)


# --------------------------------------------------------------------------------------------
# Batching and the unaligned share
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [[*row, *([value] * (width - len(row)))] for row in rows]  # one tensor call, not one per row
    return torch.tensor(padded, dtype=dtype).reshape(len(rows), width)


def collate_aligned(features: Sequence[Mapping[str, Sequence[Any]]], student_pad_id: int,
                    teacher_pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows of :meth:`AlignedExample.to_features` into tensors.

    Per side: ``*_input_ids``, ``*_attention_mask``, ``*_labels`` (-100 padded), ``*_group_ids`` (-1 padded),
    ``*_unaligned`` (bool); and ``group_student_counts`` / ``group_teacher_counts`` ([B, G], tokens per group,
    0 for padding groups). Group ids are per example (0..G_b-1).
    """
    batch: dict[str, torch.Tensor] = {}
    for side, pad_id in (("student", student_pad_id), ("teacher", teacher_pad_id)):
        ids = [f[f"{side}_input_ids"] for f in features]
        batch[f"{side}_input_ids"] = _pad(ids, pad_id, torch.long)
        batch[f"{side}_attention_mask"] = _pad([[1] * len(r) for r in ids], 0, torch.long)
        batch[f"{side}_labels"] = _pad([f[f"{side}_labels"] for f in features], IGNORE_INDEX, torch.long)
        batch[f"{side}_group_ids"] = _pad([f[f"{side}_group_ids"] for f in features], NO_GROUP, torch.long)
        batch[f"{side}_unaligned"] = _pad([f[f"{side}_unaligned"] for f in features], False, torch.bool)
    groups = max((max([*f["student_group_ids"], *f["teacher_group_ids"]], default=-1) for f in features), default=-1) + 1
    for side in ("student", "teacher"):
        ids = batch[f"{side}_group_ids"]
        counts = torch.zeros(len(features), groups + 1, dtype=torch.long)
        counts.scatter_add_(1, torch.where(ids >= 0, ids, groups), torch.ones_like(ids))
        batch[f"group_{side}_counts"] = counts[:, :groups]
    return batch


def unaligned_share(batch: Mapping[str, Any]) -> float:
    """The larger of the two sides' shares of completion-content tokens that could not be aligned.

    Works on a collated batch or on one :meth:`AlignedExample.to_features` row; 0.0 when there is no content.
    """
    shares = []
    for side in ("student", "teacher"):
        unaligned = torch.as_tensor(batch[f"{side}_unaligned"], dtype=torch.bool)
        grouped = torch.as_tensor(batch[f"{side}_group_ids"]) >= 0
        total = int(unaligned.sum()) + int(grouped.sum())
        shares.append(int(unaligned.sum()) / total if total else 0.0)
    return max(shares)


def check_unaligned_share(batch: Mapping[str, Any], max_share: float) -> float:
    """Return :func:`unaligned_share`, raising a ``ValueError`` when it exceeds ``max_share``."""
    share = unaligned_share(batch)
    if share > max_share:
        raise ValueError(
            f"{share:.1%} of the completion tokens in this batch could not be aligned between the student and teacher "
            f"tokenizers (limit {max_share:.1%}): one tokenizer's normaliser drops or rewrites characters the other "
            "keeps. Use tokenizers without such normalisers, clean the text, or raise `max_unaligned_share`."
        )
    return share
