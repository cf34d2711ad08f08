"""Causal-LM building blocks: completion-only data, sequence-level and on-policy generation.

- :func:`tokenize_completions` turns prompt/completion columns, or chat ``messages``, into
  ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on the prompt) plus ``prompt_length``.
- :class:`CompletionCollator` pads a batch of those rows (labels with -100) or, with
  ``prompt_only=True``, returns the left-padded prompts for generation.
- :func:`generate_teacher_completions` / :func:`cache_teacher_completions` build a
  sequence-level KD transfer set (teacher completions as text), cached on disk.
- :func:`generate_on_policy_batch` lets the student complete a batch's prompts (GKD-style
  on-policy distillation) and returns a batch ready for the teacher and student forward.

Prompts and completions are tokenized separately and concatenated, so the prompt tokens a
model is trained on are exactly the tokens it conditions on at generation time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from .teacher_cache import model_fingerprint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CACHE_FORMAT = 1
_PROMPT_LENGTH_COLUMN = "prompt_length"
_RAW_PROMPT_LENGTH = "__hf_distill_raw_prompt_length"
_COMPLETION_LENGTH = "__hf_distill_completion_length"
_FINISHED_COLUMN = "completion_finished"

__all__ = [
    "CompletionCollator",
    "GenerationSettings",
    "IGNORE_INDEX",
    "cache_teacher_completions",
    "generate_on_policy_batch",
    "generate_teacher_completions",
    "tokenize_completions",
]


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
      last assistant message (what the template writes for it). Later messages are ignored.

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
    if truncation_side not in ("right", "left"):
        raise ValueError(f"`truncation_side` must be 'right' or 'left', got {truncation_side!r}.")
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2 (one prompt and one completion token), got {max_length}.")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError(
            "`add_eos=True` but the tokenizer has no EOS token; set `tokenizer.eos_token` or pass add_eos=False."
        )
    if isinstance(dataset, datasets.DatasetDict):
        splits = {}
        for split, part in dataset.items():
            try:
                splits[split] = tokenize_completions(
                    part,
                    tokenizer,
                    max_length=max_length,
                    prompt_column=prompt_column,
                    completion_column=completion_column,
                    messages_column=messages_column,
                    add_eos=add_eos,
                    truncation_side=truncation_side,
                    num_proc=num_proc,
                )
            except ValueError as error:
                raise ValueError(f"Split '{split}': {error}") from error
        return datasets.DatasetDict(splits)
    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))

    columns = list(dataset.column_names)
    if prompt_column in columns and completion_column in columns:
        source = [prompt_column, completion_column]
    elif messages_column in columns:
        source = [messages_column]
    else:
        raise ValueError(
            f"tokenize_completions expects either both a '{prompt_column}' and a '{completion_column}' column "
            f"(text, or chat messages as the prompt), or a '{messages_column}' column (a list of "
            f"{{'role', 'content'}} chat messages ending with an assistant turn). The dataset has the columns "
            f"{columns}. Rename your columns, or pass prompt_column=/completion_column=/messages_column=."
        )
    finished_column = _FINISHED_COLUMN if _FINISHED_COLUMN in columns and len(source) == 2 else None
    if finished_column:
        source.append(finished_column)
    produced = {"input_ids", "attention_mask", "labels", _PROMPT_LENGTH_COLUMN}
    remove = [c for c in columns if c in source or c in produced]
    eos = tokenizer.eos_token_id

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in ("input_ids", "attention_mask", "labels", _PROMPT_LENGTH_COLUMN)}
        out[_RAW_PROMPT_LENGTH], out[_COMPLETION_LENGTH] = [], []
        for row, index in enumerate(indices):
            if source[0] == messages_column:
                prompt_ids, completion_ids = _example_to_ids(tokenizer, None, None, batch[messages_column][row], index)
            else:
                prompt_ids, completion_ids = _example_to_ids(
                    tokenizer, batch[prompt_column][row], batch[completion_column][row], None, index
                )
            finished = batch[finished_column][row] if finished_column else True
            if add_eos and finished is not False and (not completion_ids or completion_ids[-1] != eos):
                completion_ids.append(eos)
            out[_RAW_PROMPT_LENGTH].append(len(prompt_ids))
            if len(prompt_ids) + len(completion_ids) > max_length:
                if truncation_side == "left":
                    keep = max(max_length - len(completion_ids), min(len(prompt_ids), 1))
                    prompt_ids = prompt_ids[len(prompt_ids) - keep :]
                elif len(prompt_ids) >= max_length:  # reported after the map, with every offender
                    prompt_ids = prompt_ids[: max_length - 1]
                completion_ids = completion_ids[: max_length - len(prompt_ids)]
            ids = prompt_ids + completion_ids
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * len(prompt_ids) + completion_ids)
            out[_PROMPT_LENGTH_COLUMN].append(len(prompt_ids))
            out[_COMPLETION_LENGTH].append(len(completion_ids))
        return out

    tokenized = dataset.map(
        encode,
        batched=True,
        with_indices=True,
        remove_columns=remove,
        num_proc=num_proc,
        desc="Tokenizing completions",
    )
    raw = tokenized[_RAW_PROMPT_LENGTH]
    if truncation_side == "right":
        too_long = [(i, n) for i, n in enumerate(raw) if n >= max_length]
        if too_long:
            index, length = too_long[0]
            longest = max(n for _, n in too_long)
            listed = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:10])
            more = f" and {len(too_long) - 10} more" if len(too_long) > 10 else ""
            raise ValueError(
                f"Example {index} has a prompt of {length} tokens, which leaves no room for a completion token at "
                f"max_length={max_length}. {len(too_long)} example(s) are affected: {listed}{more}. Raise max_length "
                f"to at least {longest + 1}, or shorten (or filter out) these prompts, or pass "
                f"truncation_side='left' to cut prompts from the start."
            )
    empty = sum(1 for n in tokenized[_COMPLETION_LENGTH] if n == 0)
    if empty:
        logger.warning("%d example(s) have no completion tokens and contribute nothing to the loss.", empty)
    return tokenized.remove_columns([_RAW_PROMPT_LENGTH, _COMPLETION_LENGTH])


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
        if any(_PROMPT_LENGTH_COLUMN not in f for f in features):
            raise ValueError("prompt_only=True needs a 'prompt_length' in every row (see tokenize_completions).")
        lengths = [int(f[_PROMPT_LENGTH_COLUMN]) for f in features]
        prompts = [r[:n] for r, n in zip(ids, lengths)]
        width = self._width(max(lengths))
        return {
            "prompt_input_ids": _pad(prompts, self.pad_token_id, "left", width),
            "prompt_attention_mask": _pad([torch.ones_like(p) for p in prompts], 0, "left", width),
            _PROMPT_LENGTH_COLUMN: torch.tensor(lengths, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------
# Generation shared by sequence-level and on-policy KD
# --------------------------------------------------------------------------------------------


def _check_generation(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be at least 1, got {max_new_tokens}.")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}; use do_sample=False for greedy decoding.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}.")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 disables it), got {top_k}.")


@dataclass
class GenerationSettings:
    """How completions are sampled. ``top_k=0`` and ``top_p=1`` sample from the full distribution.

    ``generate_on_policy_batch(student, batch, pad_token_id=..., eos_token_id=..., **settings.to_kwargs())``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    top_k: int = 0

    def __post_init__(self) -> None:
        _check_generation(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    def to_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of the generation functions."""
        return asdict(self)


def _generate_kwargs(
    *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, top_k: int, pad: int, eos: list[int]
) -> dict[str, Any]:
    # Explicit values, so that a model's own generation_config (e.g. top_k=50, a repetition
    # penalty, beams) does not silently change the distribution that is sampled.
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "use_cache": True,  # a Trainer with gradient checkpointing turns it off in the config
        "repetition_penalty": 1.0,
        "pad_token_id": pad,
        "eos_token_id": eos if len(eos) != 1 else eos[0],
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    return kwargs


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP-like wrappers (anything with ``.module`` and no ``generate``)."""
    while not hasattr(model, "generate") and hasattr(model, "module"):
        model = model.module
    return model


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _id_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def _sequences(output: Any) -> torch.Tensor:
    return output.sequences if hasattr(output, "sequences") else output


def _after_first_eos(generated: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Boolean mask of the generated tokens strictly after each row's first EOS."""
    if not eos:
        return torch.zeros_like(generated, dtype=torch.bool)
    is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device)).long()
    return (is_eos.cumsum(dim=1) - is_eos) > 0


class _EvalMode:
    """Put a module in eval mode and restore every submodule's own mode on exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


# --------------------------------------------------------------------------------------------
# 4. On-policy (GKD-style) generation
# --------------------------------------------------------------------------------------------


def _batch_prompts(batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's prompt tokens, from ``prompt_input_ids`` or from ``input_ids`` + ``prompt_length``."""
    if "prompt_input_ids" in batch:
        ids = batch["prompt_input_ids"]
        mask = batch.get("prompt_attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        return [row[m.bool()] for row, m in zip(ids, mask)]
    missing = [k for k in ("input_ids", _PROMPT_LENGTH_COLUMN) if k not in batch]
    if missing:
        raise ValueError(
            f"generate_on_policy_batch needs 'input_ids' and 'prompt_length' (or 'prompt_input_ids') in the batch; "
            f"missing {missing}. Build the data with tokenize_completions and batch it with CompletionCollator, and "
            f"keep 'prompt_length' (Trainer's remove_unused_columns drops it unless it is a signature column)."
        )
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    lengths = torch.as_tensor(batch[_PROMPT_LENGTH_COLUMN]).reshape(-1).tolist()
    # Non-padding tokens in order, whatever the padding side; the prompt is their start.
    return [row[m.bool()][: int(n)] for row, m, n in zip(ids, mask, lengths)]


def generate_on_policy_batch(
    student: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    pad_token_id: int | None,
    eos_token_id: int | Sequence[int] | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    top_k: int = 0,
) -> dict[str, torch.Tensor]:
    """Let the student complete the batch's prompts; return a new batch to distil on.

    The prompts come from ``prompt_input_ids``/``prompt_attention_mask`` if present, else from
    each row's first ``prompt_length`` non-padding tokens (either padding side). The student
    (unwrapped from DDP-style wrappers) generates in eval mode under ``torch.no_grad``; the mode
    of each of its modules is restored afterwards. Sampling uses the global torch RNG.

    Returns right-padded ``input_ids`` (prompt + completion), ``attention_mask``, ``labels``
    (-100 on the prompt, on padding and on anything after a row's first EOS; the EOS itself is a
    label) and ``prompt_length``, on the student's device. Right padding keeps plain forwards
    (no ``position_ids``) position-correct. Other columns of ``batch`` are not carried over:
    they describe the old completions.
    """
    _check_generation(max_new_tokens, temperature, top_p, top_k)
    eos = _id_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ValueError("generate_on_policy_batch needs a pad_token_id or an eos_token_id.")
    model = _unwrap(student)
    device = _device(model)
    prompts = [p.to(device) for p in _batch_prompts(batch)]
    empty = [i for i, p in enumerate(prompts) if p.numel() == 0]
    if empty:
        raise ValueError(
            f"Rows {empty} of the batch have an empty prompt; on-policy generation needs at least one prompt token."
        )
    prompt_ids = _pad(prompts, pad, "left")
    prompt_mask = _pad([torch.ones_like(p) for p in prompts], 0, "left")
    kwargs = _generate_kwargs(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        pad=pad, eos=eos,
    )
    with _EvalMode(model), torch.no_grad():
        sequences = _sequences(model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs))
    generated = sequences[:, prompt_ids.shape[1] :]
    keep = ~_after_first_eos(generated, eos)
    completion_lengths = keep.sum(dim=1).tolist()
    rows = [torch.cat([p, g[:n]]) for p, g, n in zip(prompts, generated, completion_lengths)]
    labels = [
        torch.cat([torch.full_like(p, IGNORE_INDEX), g[:n]]) for p, g, n in zip(prompts, generated, completion_lengths)
    ]
    return {
        "input_ids": _pad(rows, pad, "right"),
        "attention_mask": _pad([torch.ones_like(r) for r in rows], 0, "right"),
        "labels": _pad(labels, IGNORE_INDEX, "right"),
        _PROMPT_LENGTH_COLUMN: torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device),
    }


# --------------------------------------------------------------------------------------------
# 3. Sequence-level KD: teacher completions, cached
# --------------------------------------------------------------------------------------------


def _prompt_list(prompts: Sequence[Any] | datasets.Dataset, prompt_column: str) -> list[Any]:
    if isinstance(prompts, datasets.Dataset):
        if prompt_column not in prompts.column_names:
            raise ValueError(
                f"The prompts dataset has no '{prompt_column}' column (columns: {prompts.column_names}); "
                f"pass prompt_column=."
            )
        return list(prompts[prompt_column])
    if isinstance(prompts, str):
        raise TypeError("`prompts` must be a list of prompts (or a Dataset), not a single string.")
    return list(prompts)


def _default_eos(model: torch.nn.Module, tokenizer: Any, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is not None:
        return _id_list(eos_token_id)
    eos = _id_list(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None)
    for i in _id_list(getattr(config, "eos_token_id", None)):
        if i not in eos and i < len(tokenizer):
            eos.append(i)
    return eos


def _decode_completion(tokenizer: Any, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """Completion text as it continues the prompt (keeps a leading space that SentencePiece drops)."""
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    prefix = tokenizer.decode(prompt_ids, **options)
    full = tokenizer.decode(prompt_ids + completion_ids, **options)
    return full[len(prefix) :] if full.startswith(prefix) else tokenizer.decode(completion_ids, **options)


def generate_teacher_completions(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any] | datasets.Dataset,
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    prompt_column: str = "prompt",
) -> datasets.Dataset:
    """Generate the teacher's completion of every prompt: a sequence-level KD transfer set.

    ``prompts`` are texts or chat conversations (rendered with ``add_generation_prompt=True``),
    as a list or a Dataset's ``prompt_column``. They are encoded like :func:`tokenize_completions`
    encodes prompts, sorted by length and generated in left-padded batches under a tqdm bar; the
    torch RNG is seeded with ``seed`` inside a forked RNG state, so results are reproducible for
    the same arguments and the caller's RNG is untouched.

    Returns a Dataset with ``prompt`` (as given), ``completion`` (text up to the first EOS,
    special tokens removed) and ``completion_finished`` (False when ``max_new_tokens`` cut it;
    :func:`tokenize_completions` then does not add an EOS). EOS ids default to the tokenizer's
    plus those in the teacher's ``generation_config``.
    """
    _check_generation(max_new_tokens, temperature, top_p, top_k)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
    prompt_list = _prompt_list(prompts, prompt_column)
    model = _unwrap(teacher)
    device = _device(model)
    eos = _default_eos(model, tokenizer, eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    encoded = []
    for i, prompt in enumerate(prompt_list):
        ids = _encode_prompt(tokenizer, prompt)
        if not ids:
            if tokenizer.bos_token_id is None:
                raise ValueError(f"Prompt {i} is empty and the tokenizer has no BOS token to start generation from.")
            ids = [tokenizer.bos_token_id]
        encoded.append(ids)
    kwargs = _generate_kwargs(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
        pad=pad, eos=eos,
    )
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    completions: list[str] = [""] * len(encoded)
    finished: list[bool] = [False] * len(encoded)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), _EvalMode(model), torch.no_grad(), tqdm(
        total=len(encoded), desc="Teacher completions", unit="prompt", disable=not show_progress
    ) as bar:
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [torch.tensor(encoded[i], dtype=torch.long) for i in chunk]
            input_ids = _pad(rows, pad, "left").to(device)
            attention_mask = _pad([torch.ones_like(r) for r in rows], 0, "left").to(device)
            sequences = _sequences(model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs))
            generated = sequences[:, input_ids.shape[1] :]
            after = _after_first_eos(generated, eos)
            for row, i in enumerate(chunk):
                tokens = generated[row][~after[row]].tolist()
                done = bool(tokens) and tokens[-1] in eos
                finished[i] = done
                completions[i] = _decode_completion(tokenizer, encoded[i], tokens[:-1] if done else tokens)
            bar.update(len(chunk))
    return datasets.Dataset.from_dict(
        {"prompt": prompt_list, "completion": completions, "completion_finished": finished}
    )


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(f"hf_distill-tokenizer-v1|{type(tokenizer).__name__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    special = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def cache_teacher_completions(
    teacher: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any] | datasets.Dataset,
    *,
    cache_dir: str | os.PathLike[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    show_progress: bool = True,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    prompt_column: str = "prompt",
    overwrite: bool = False,
) -> datasets.Dataset:
    """:func:`generate_teacher_completions`, saved under ``cache_dir`` and reused.

    The cache key digests the teacher (``hf_distill.teacher_cache.model_fingerprint``), the tokenizer (vocabulary,
    chat template, special tokens), the prompts and every generation argument (batch size
    included: it changes padding, hence sampled tokens). A hit loads the dataset with
    ``datasets.load_from_disk`` without calling ``generate``; a miss generates, writes with
    ``save_to_disk`` into a temporary folder and renames it into place (so a crash never leaves
    a half-written cache). ``overwrite=True`` regenerates. Each folder holds
    ``hf_distill_cache.json`` with the key's inputs. In multi-process runs, call it on the main
    process first (e.g. ``with training_args.main_process_first():``).
    """
    prompt_list = _prompt_list(prompts, prompt_column)
    settings = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "eos_token_id": _id_list(eos_token_id) if eos_token_id is not None else None,
    }
    key = {
        "format": _CACHE_FORMAT,
        "teacher": model_fingerprint(_unwrap(teacher)),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "prompts": hashlib.sha256(json.dumps(prompt_list, sort_keys=True, default=str).encode()).hexdigest(),
        "num_prompts": len(prompt_list),
        "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"teacher-completions-{digest}"
    if path.is_dir() and (path / "hf_distill_cache.json").is_file() and not overwrite:
        logger.info("Loading cached teacher completions from %s", path)
        return datasets.load_from_disk(str(path))
    dataset = generate_teacher_completions(
        teacher, tokenizer, prompt_list, show_progress=show_progress, prompt_column=prompt_column, **settings
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    dataset.save_to_disk(str(tmp))
    (tmp / "hf_distill_cache.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    if overwrite and path.exists():
        shutil.rmtree(path)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Saved teacher completions to %s", path)
    return datasets.load_from_disk(str(path))
