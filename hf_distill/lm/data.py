"""Causal-LM data: completion-only tokenization (prompt tokens masked with -100) and collation.

- :func:`tokenize_completions` turns prompt/completion columns, or chat ``messages``, into
  ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on the prompt) plus ``prompt_length``; a ``prompt``
  column alone gives prompt-only rows, completed by the student at every step (on-policy, ``lmbda = 1``).
- :class:`CompletionCollator` pads a batch of those rows (labels with -100) or, with
  ``prompt_only=True``, returns the left-padded prompts for generation.

Prompts and completions are tokenized separately and concatenated, so the prompt tokens a
model is trained on are exactly the tokens it conditions on at generation time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_LENGTH_COLUMN = "prompt_length"
FINISHED_COLUMN = "completion_finished"
_RAW_PROMPT_LENGTH = "__hf_distill_raw_prompt_length"
_COMPLETION_LENGTH = "__hf_distill_completion_length"


# --------------------------------------------------------------------------------------------
# Prompt / completion rendering
# --------------------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    """True for a chat conversation: a list of {"role", "content"} mappings."""
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _require_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Chat messages need a tokenizer with a chat template, but `tokenizer.chat_template` is not set. "
            "Set `tokenizer.chat_template` to a Jinja template, or pass prompt/completion text columns."
        )


def _render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # defensive: some versions may wrap the string
        text = text[0] if isinstance(text, (list, tuple)) else str(text)
    return text


def _split_conversation(tokenizer: Any, messages: Sequence[Mapping[str, Any]], index: int) -> tuple[str, str]:
    """Render a conversation into (prompt text, completion text) around its last assistant message."""
    _require_chat_template(tokenizer)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ValueError(
            f"Example {index}: the chat messages contain no assistant message, so there is no completion to "
            "train on. Each conversation must end with (or contain) a message with role 'assistant'."
        )
    prompt = _render(tokenizer, messages[:last], add_generation_prompt=True) if last > 0 else ""
    full = _render(tokenizer, messages[: last + 1], add_generation_prompt=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt) :]
    logger.warning(
        "Example %d: the chat template renders the prompt (with add_generation_prompt=True) differently from the "
        "start of the full conversation; using the last assistant message's content as the completion.",
        index,
    )
    return prompt, str(messages[last].get("content", ""))


def _encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a prompt: plain text (with the tokenizer's special tokens, e.g. BOS) or chat messages."""
    if _is_messages(prompt):
        _require_chat_template(tokenizer)
        text = _render(tokenizer, prompt, add_generation_prompt=True) if len(prompt) else ""
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return _encode_plain_prompt(tokenizer, str(prompt))


def _encode_plain_prompt(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    # Some tokenizers append EOS as a special token; a prompt must not end the sequence.
    if eos is not None and ids and ids[-1] == eos:
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not bare or bare[-1] != eos:
            ids = ids[:-1]
    return ids


def _example_to_ids(
    tokenizer: Any, prompt: Any, completion: Any, messages: Any, index: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one example, in any of the supported formats."""
    if messages is not None:
        if not _is_messages(messages):
            raise ValueError(
                f"Example {index}: expected a list of {{'role', 'content'}} messages, got {messages!r:.200}."
            )
        prompt_text, completion_text = _split_conversation(tokenizer, messages, index)
        from_template = True
    elif _is_messages(prompt):  # conversational prompt/completion (TRL's format)
        tail = list(completion) if _is_messages(completion) else [{"role": "assistant", "content": str(completion)}]
        prompt_text, completion_text = _split_conversation(tokenizer, list(prompt) + tail, index)
        from_template = True
    else:
        prompt_text, completion_text, from_template = str(prompt), str(completion), False
    if from_template:  # the template already wrote any special tokens (BOS, role markers) as text
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"]) if prompt_text else []
    else:
        prompt_ids = _encode_plain_prompt(tokenizer, prompt_text)
    completion_ids = list(tokenizer(completion_text, add_special_tokens=False)["input_ids"]) if completion_text else []
    return prompt_ids, completion_ids


# --------------------------------------------------------------------------------------------
# 1. Tokenization
# --------------------------------------------------------------------------------------------


def tokenize_completions(
    dataset: datasets.Dataset | datasets.DatasetDict | Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    messages_column: str = "messages",
    add_eos: bool = True,
    truncation_side: str = "right",
    num_proc: int | None = None,
) -> datasets.Dataset | datasets.DatasetDict:
    """Tokenize prompt/completion pairs (or chat ``messages``) for completion-only training.

    Input formats, checked in this order:

    - ``prompt`` and ``completion`` columns: text, or (TRL's conversational format) a list of
      chat messages as the prompt and a string or assistant message(s) as the completion;
    - a ``messages`` column: the prompt is every message before the last assistant message,
      rendered with ``apply_chat_template(add_generation_prompt=True)``; the completion is the
      last assistant message (what the template writes for it). Later messages are ignored;
    - a ``prompt`` column alone (TRL's prompt-only format): text, or chat messages rendered with
      ``add_generation_prompt=True``. Rows hold the prompt only (all labels -100,
      ``prompt_length`` = the row's length): the student generates the completion at each step,
      so train with ``lmbda=1`` (the trainer refuses anything else).

    Plain-text prompts get the tokenizer's special tokens (e.g. BOS); chat-rendered text does
    not (the template writes them). ``add_eos`` appends ``tokenizer.eos_token_id`` to the
    completion unless it already ends with it, or a ``completion_finished`` column (written by
    :func:`generate_teacher_completions`) says the completion was cut by ``max_new_tokens``.

    Output columns: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt tokens, the
    completion tokens copied) and ``prompt_length``; the source columns are removed, any other
    columns are kept. Rows are not padded (see :class:`CompletionCollator`) nor packed.

    Sequences longer than ``max_length``:

    - ``truncation_side="right"`` (default) keeps the prompt and cuts the end of the completion
      (an EOS cut away is not re-added: the example is unfinished). When a prompt leaves no room
      for a single completion token, a ``ValueError`` names the examples before any training.
    - ``truncation_side="left"`` drops the oldest prompt tokens (BOS included) to fit the whole
      completion, keeping at least one prompt token; a completion that still does not fit is cut
      at its end.
    """
    _check_tokenize_arguments(tokenizer, max_length, truncation_side, add_eos)
    options = dict(max_length=max_length, prompt_column=prompt_column, completion_column=completion_column,
                   messages_column=messages_column, add_eos=add_eos, truncation_side=truncation_side, num_proc=num_proc)
    if isinstance(dataset, datasets.DatasetDict):
        return _tokenize_splits(dataset, tokenizer, options)
    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))
    columns = list(dataset.column_names)
    source = _source_columns(columns, prompt_column, completion_column, messages_column)
    produced = {"input_ids", "attention_mask", "labels", PROMPT_LENGTH_COLUMN}
    encoder = _CompletionEncoder(tokenizer, source, messages_column, max_length, add_eos, truncation_side)
    tokenized = dataset.map(encoder, batched=True, with_indices=True, num_proc=num_proc, desc="Tokenizing completions",
                            remove_columns=[c for c in columns if c in source or c in produced])
    _check_tokenized(tokenized, source == [prompt_column], max_length, truncation_side)
    return tokenized.remove_columns([_RAW_PROMPT_LENGTH, _COMPLETION_LENGTH])


def _check_tokenized(tokenized: datasets.Dataset, prompt_only: bool, max_length: int, truncation_side: str) -> None:
    """Refuse prompts without room for a completion (right truncation) or, prompt-only, empty prompts; warn of
    examples without completion tokens."""
    if truncation_side == "right":
        _refuse_prompts_without_room(tokenized[_RAW_PROMPT_LENGTH], max_length)
    if prompt_only:
        _refuse_empty_prompts(tokenized[_RAW_PROMPT_LENGTH])
        logger.info("Prompt-only data: %d prompts, completed by the student at each step (lmbda=1).", len(tokenized))
    elif empty := sum(1 for n in tokenized[_COMPLETION_LENGTH] if n == 0):
        logger.warning("%d example(s) have no completion tokens and contribute nothing to the loss.", empty)


def _check_tokenize_arguments(tokenizer: Any, max_length: int, truncation_side: str, add_eos: bool) -> None:
    if truncation_side not in ("right", "left"):
        raise ValueError(f"`truncation_side` must be 'right' or 'left', got {truncation_side!r}.")
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2 (one prompt and one completion token), got {max_length}.")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            "`add_eos=True` but the tokenizer has no EOS token; set `tokenizer.eos_token` or pass add_eos=False."
        )


def _tokenize_splits(dataset: datasets.DatasetDict, tokenizer: Any, options: dict[str, Any]) -> datasets.DatasetDict:
    splits = {}
    for split, part in dataset.items():
        try:
            splits[split] = tokenize_completions(part, tokenizer, **options)
        except ValueError as error:
            raise ValueError(f"Split '{split}': {error}") from error
    return datasets.DatasetDict(splits)


def _source_columns(columns: list[str], prompt_column: str, completion_column: str, messages_column: str) -> list[str]:
    """The columns an example is read from: prompt + completion (+ completion_finished), or messages."""
    if prompt_column in columns and completion_column in columns:
        return [prompt_column, completion_column] + ([FINISHED_COLUMN] if FINISHED_COLUMN in columns else [])
    if messages_column in columns:
        return [messages_column]
    if prompt_column in columns:  # prompt-only: the student completes the prompts (on-policy)
        return [prompt_column]
    raise ValueError(
        f"tokenize_completions expects either both a '{prompt_column}' and a '{completion_column}' column "
        f"(text, or chat messages as the prompt), or a '{messages_column}' column (a list of "
        f"{{'role', 'content'}} chat messages ending with an assistant turn), or a '{prompt_column}' column alone "
        f"(prompt-only, for on-policy training). The dataset has the columns {columns}. Rename your columns, or "
        "pass prompt_column=/completion_column=/messages_column=."
    )


def _refuse_empty_prompts(raw_prompt_lengths: Sequence[int]) -> None:
    """Prompt-only rows need at least one token to generate from."""
    empty = [i for i, n in enumerate(raw_prompt_lengths) if n == 0]
    if empty:
        raise ValueError(
            f"Prompt-only data: {len(empty)} example(s) have an empty prompt (no tokens to generate from), e.g. rows "
            f"{empty[:10]}. Remove them, or use a tokenizer that adds a BOS token."
        )


def _refuse_prompts_without_room(raw_prompt_lengths: Sequence[int], max_length: int) -> None:
    """With right truncation a prompt of max_length tokens or more leaves no completion token: name them all."""
    too_long = [(i, n) for i, n in enumerate(raw_prompt_lengths) if n >= max_length]
    if not too_long:
        return
    index, length = too_long[0]
    listed = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:10])
    more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
    raise ValueError(
        f"Example {index} has a prompt of {length} tokens, which leaves no room for a completion token at "
        f"max_length={max_length}. {len(too_long)} example(s) are affected: {listed}{more}. Raise max_length "
        f"to at least {max(n for _, n in too_long) + 1}, or shorten (or filter out) these prompts, or pass "
        "truncation_side='left' (--truncation_side left in scripts/distill_causal_lm.py) to cut prompts from the "
        "start."
    )


@dataclass
class _CompletionEncoder:
    """The batched map of :func:`tokenize_completions`: ids, mask, labels and lengths of each example."""

    tokenizer: Any
    source: list[str]
    messages_column: str
    max_length: int
    add_eos: bool
    truncation_side: str

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        names = ("input_ids", "attention_mask", "labels", PROMPT_LENGTH_COLUMN, _RAW_PROMPT_LENGTH, _COMPLETION_LENGTH)
        out: dict[str, list] = {k: [] for k in names}
        for row, index in enumerate(indices):
            prompt_ids, completion_ids = self._ids(batch, row, index)
            out[_RAW_PROMPT_LENGTH].append(len(prompt_ids))
            prompt_ids, completion_ids = self._truncate(prompt_ids, completion_ids)
            ids = prompt_ids + completion_ids
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * len(prompt_ids) + completion_ids)
            out[PROMPT_LENGTH_COLUMN].append(len(prompt_ids))
            out[_COMPLETION_LENGTH].append(len(completion_ids))
        return out

    def _ids(self, batch: dict[str, list], row: int, index: int) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids), with EOS appended unless the completion was cut by generation."""
        if len(self.source) == 1 and self.source[0] != self.messages_column:  # prompt-only
            return _encode_prompt(self.tokenizer, batch[self.source[0]][row]), []
        if self.source[0] == self.messages_column:
            prompt_ids, completion_ids = _example_to_ids(self.tokenizer, None, None, batch[self.messages_column][row], index)
        else:
            prompt, completion = (batch[c][row] for c in self.source[:2])
            prompt_ids, completion_ids = _example_to_ids(self.tokenizer, prompt, completion, None, index)
        finished = batch[FINISHED_COLUMN][row] if FINISHED_COLUMN in self.source else True
        eos = self.tokenizer.eos_token_id
        if self.add_eos and finished is not False and (not completion_ids or completion_ids[-1] != eos):
            completion_ids.append(eos)
        return prompt_ids, completion_ids

    def _truncate(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[int], list[int]]:
        if len(prompt_ids) + len(completion_ids) <= self.max_length:
            return prompt_ids, completion_ids
        if self.truncation_side == "left":
            keep = max(self.max_length - len(completion_ids), min(len(prompt_ids), 1))
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        elif len(prompt_ids) >= self.max_length:  # reported after the map, with every offender
            prompt_ids = prompt_ids[: self.max_length - 1]
        return prompt_ids, completion_ids[: self.max_length - len(prompt_ids)]


# --------------------------------------------------------------------------------------------
# 2. Collation
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[torch.Tensor], value: int | float, side: str, length: int | None = None) -> torch.Tensor:
    """Stack 1-D or N-D tensors, padding their first dimension to the longest (or ``length``)."""
    width = max((r.shape[0] for r in rows), default=0) if length is None else length
    out = rows[0].new_full((len(rows), width, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        n = r.shape[0]
        if n:
            if side == "left":
                out[i, width - n :] = r
            else:
                out[i, :n] = r
    return out


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


@dataclass
class CompletionCollator:
    """Pad rows from :func:`tokenize_completions` into a batch of tensors.

    ``input_ids`` are padded with the pad id (``pad_token_id``, else the tokenizer's pad token,
    else its EOS), ``attention_mask`` with 0 and ``labels`` with -100, on the padding side given
    here or by the tokenizer (right by default). Left padding keeps labels aligned with tokens.

    Other columns are kept when they convert to tensors: scalars are stacked, and per-token
    columns (the same length as ``input_ids`` in every row, e.g. cached teacher top-k) are padded
    like ``input_ids`` with ``feature_pad_value``. Columns that cannot be tensors (text) are dropped.

    With ``prompt_only=True`` the batch holds only ``prompt_input_ids`` / ``prompt_attention_mask``
    (each row's first ``prompt_length`` tokens, always left-padded, ready for ``generate``) and
    ``prompt_length``.
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    padding_side: str | None = None
    pad_to_multiple_of: int | None = None
    prompt_only: bool = False
    label_pad_token_id: int = IGNORE_INDEX
    feature_pad_value: int | float = 0

    def __post_init__(self) -> None:
        if self.pad_token_id is None and self.tokenizer is not None:
            self.pad_token_id = self.tokenizer.pad_token_id
            if self.pad_token_id is None:
                self.pad_token_id = self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError(
                "CompletionCollator needs a pad id: give a tokenizer with a pad (or EOS) token, or pass pad_token_id=."
            )
        if self.padding_side is None:
            self.padding_side = getattr(self.tokenizer, "padding_side", None) or "right"
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"`padding_side` must be 'right' or 'left', got {self.padding_side!r}.")

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CompletionCollator got an empty list of features.")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        if self.prompt_only:
            return self._prompts(features, ids)
        width = self._width(max(len(r) for r in ids))
        side = self.padding_side
        masks = [
            torch.as_tensor(f["attention_mask"], dtype=torch.long) if "attention_mask" in f else torch.ones_like(r)
            for f, r in zip(features, ids)
        ]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id, side, width),
            "attention_mask": _pad(masks, 0, side, width),
        }
        if "labels" in features[0]:
            labels = [torch.as_tensor(f["labels"], dtype=torch.long) for f in features]
            batch["labels"] = _pad(labels, self.label_pad_token_id, side, width)
        for key in features[0]:
            if key in batch:
                continue
            value = self._extra_column(key, [f.get(key) for f in features], [len(r) for r in ids], width)
            if value is not None:
                batch[key] = value
        return batch

    def _extra_column(self, key: str, values: list[Any], lengths: list[int], width: int) -> torch.Tensor | None:
        if any(v is None or isinstance(v, (str, bytes)) for v in values):
            return None
        tensors = [_as_tensor(v) for v in values]
        if any(t is None for t in tensors):
            logger.debug("CompletionCollator drops column %r: its values are not tensors.", key)
            return None
        per_token = all(t.dim() >= 1 and t.shape[0] == n for t, n in zip(tensors, lengths))
        if per_token and len({tuple(t.shape[1:]) for t in tensors}) == 1:
            return _pad(tensors, self.feature_pad_value, self.padding_side, width)
        if len({tuple(t.shape) for t in tensors}) == 1:
            return torch.stack(tensors)
        logger.debug("CompletionCollator drops column %r: ragged values that are not per-token.", key)
        return None

    def _prompts(self, features: Sequence[Mapping[str, Any]], ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(PROMPT_LENGTH_COLUMN not in f for f in features):
            raise ValueError("prompt_only=True needs a 'prompt_length' in every row (see tokenize_completions).")
        lengths = [int(f[PROMPT_LENGTH_COLUMN]) for f in features]
        prompts = [r[:n] for r, n in zip(ids, lengths)]
        width = self._width(max(lengths))
        return {
            "prompt_input_ids": _pad(prompts, self.pad_token_id, "left", width),
            "prompt_attention_mask": _pad([torch.ones_like(p) for p in prompts], 0, "left", width),
            PROMPT_LENGTH_COLUMN: torch.tensor(lengths, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------
# Generation shared by sequence-level and on-policy KD
# --------------------------------------------------------------------------------------------
