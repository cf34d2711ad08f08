"""An evaluation set for the export's parity check: rows from a `datasets.Dataset` or a list of dicts, tokenized
into batches with the labels each task is scored on.

- sequence-classification: `text` (+ optional `text_pair`) and `label` (an id, or a name from `config.label2id`);
  one prediction per row.
- token-classification: `tokens` (a list of words) and `labels` or `ner_tags` (one per word); scored on the
  first sub-token of each word.
- causal-lm: `text` (or `prompt` and `completion`, joined); scored on next-token prediction at every
  position that has a next token.
- feature-extraction: `text`; no labels (the int8 model is judged by how closely its token vectors match).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
EVAL_BATCH_SIZE = {"causal-lm": 4}  # vocabulary-sized logits per position: small batches
DEFAULT_EVAL_BATCH_SIZE = 32
MAX_EVAL_LENGTH = 512
COLUMNS = {  # task -> (required columns, optional columns, alternatives for the label column)
    "sequence-classification": (("text", "label"), ("text_pair",), {"label": ("label", "labels")}),
    "token-classification": (("tokens", "labels"), (), {"labels": ("labels", "ner_tags")}),
    "causal-lm": (("text",), (), {}),
    "feature-extraction": (("text",), (), {}),
}


@dataclass
class EvalSet:
    """Tokenized batches (numpy, as ONNX Runtime takes them) and per-batch labels (`IGNORE_INDEX` = not scored)."""

    batches: list[dict[str, np.ndarray]]
    labels: list[np.ndarray | None]  # None: the batch is compared with PyTorch, not scored (feature extraction)
    num_rows: int

    @property
    def source(self) -> str:
        return f"eval_dataset ({self.num_rows} rows)"


def eval_columns(eval_dataset: Any, task: str) -> dict[str, list]:
    """The columns `task` needs from a `datasets.Dataset` or a list of dicts, as lists (label column renamed to
    the canonical name). Raises a ValueError naming the missing column and the columns found."""
    if task not in COLUMNS:
        raise ValueError(
            f"judging the export on an evaluation set supports {', '.join(COLUMNS)}, not {task}: pass "
            "eval_dataset=None (--eval_file unset) to check it on sample texts instead")
    required, optional, alternatives = COLUMNS[task]
    if not hasattr(eval_dataset, "column_names"):
        eval_dataset = list(eval_dataset)
    if hasattr(eval_dataset, "column_names"):
        found = list(eval_dataset.column_names)
        get = lambda name: list(eval_dataset[name])  # noqa: E731
    else:
        rows = eval_dataset
        if not all(isinstance(row, Mapping) for row in rows):
            raise TypeError("eval_dataset must be a datasets.Dataset or a list of dicts (one per row)")
        found = sorted(set.intersection(*(set(row) for row in rows))) if rows else []
        get = lambda name: [row[name] for row in rows]  # noqa: E731
    if len(eval_dataset) == 0:
        raise ValueError("eval_dataset is empty: give it the rows of your validation split, or pass eval_dataset=None")
    if task == "causal-lm" and "text" not in found and {"prompt", "completion"} <= set(found):
        return {"text": [prompt + completion for prompt, completion in zip(get("prompt"), get("completion"))]}
    columns = {}
    for name in required:
        options = alternatives.get(name, (name,))
        present = [option for option in options if option in found]
        if not present:
            raise ValueError(f"eval_dataset for {task} needs a column {' or '.join(map(repr, options))}; it has "
                             f"{found}. Rename the column (datasets: dataset.rename_column(old, new)).")
        columns[name] = get(present[0])
    columns.update({name: get(name) for name in optional if name in found})
    return columns


def label_ids(labels: Sequence[Any], config: Any) -> np.ndarray:
    """Integer class ids for `labels` given as ids or as names from `config.label2id`."""
    label2id = {str(key): int(value) for key, value in (getattr(config, "label2id", None) or {}).items()}
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    ids = []
    for label in labels:
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if label not in label2id:
                raise ValueError(f"eval label {label!r} is not in the model's label2id {sorted(label2id)}")
            ids.append(label2id[label])
        else:
            ids.append(int(label))
    bad = sorted({label for label in ids if label < 0 or (num_labels and label >= num_labels)})
    if bad:
        raise ValueError(f"eval labels {bad[:5]} are outside the model's {num_labels} classes (0..{num_labels - 1}); "
                         "unlabelled rows (e.g. GLUE test splits, label -1) cannot be scored: drop them")
    return np.asarray(ids, dtype=np.int64)


def max_eval_length(tokenizer: Any, config: Any) -> int:
    """The longest input to tokenize: the model's and the tokenizer's limits, at most `MAX_EVAL_LENGTH`."""
    limits = [MAX_EVAL_LENGTH, getattr(config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    return int(min(limit for limit in limits if isinstance(limit, int) and limit > 0))


def _numpy(encoded: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}


def _classification(columns: dict[str, list], tokenizer: Any, config: Any, start: int, stop: int,
                    max_length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    pair = columns["text_pair"][start:stop] if "text_pair" in columns else None
    encoded = tokenizer(columns["text"][start:stop], pair, padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
    return _numpy(encoded), label_ids(columns["label"][start:stop], config)


def _token_classification(columns: dict[str, list], tokenizer: Any, config: Any, start: int, stop: int,
                          max_length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    words = [list(row) for row in columns["tokens"][start:stop]]
    encoded = tokenizer(words, is_split_into_words=True, padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
    labels = np.full(encoded["input_ids"].shape, IGNORE_INDEX, dtype=np.int64)
    for row, word_labels in enumerate(columns["labels"][start:stop]):
        ids, previous = label_ids(word_labels, config), None
        for position, word in enumerate(encoded.word_ids(row)):
            if word is not None and word != previous:
                labels[row, position] = ids[word]
            previous = word
    return _numpy(encoded), labels


def _text_generation(columns: dict[str, list], tokenizer: Any, config: Any, start: int, stop: int,
                     max_length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    encoded = _numpy(tokenizer(columns["text"][start:stop], padding=True, truncation=True, max_length=max_length,
                               return_tensors="np"))
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)  # position t predicts token t + 1
    labels[:, :-1] = np.where((mask[:, :-1] == 1) & (mask[:, 1:] == 1), ids[:, 1:], IGNORE_INDEX)
    return encoded, labels


def _feature_extraction(columns: dict[str, list], tokenizer: Any, config: Any, start: int, stop: int,
                        max_length: int) -> tuple[dict[str, np.ndarray], None]:
    encoded = tokenizer(columns["text"][start:stop], padding=True, truncation=True, max_length=max_length,
                        return_tensors="np")
    return _numpy(encoded), None


BATCH_BUILDERS = {"sequence-classification": _classification, "token-classification": _token_classification,
                  "causal-lm": _text_generation, "feature-extraction": _feature_extraction}


def build_eval_set(eval_dataset: Any, task: str, tokenizer: Any, config: Any,
                   batch_size: int | None = None) -> EvalSet:
    """Tokenize `eval_dataset` for `task` with the model folder's tokenizer (see the module docstring for the
    columns each task needs)."""
    columns = eval_columns(eval_dataset, task)
    if tokenizer is None:
        raise ValueError("eval_dataset needs the tokenizer: save it in the model folder (tokenizer.save_pretrained) "
                         "before exporting, or pass eval_dataset=None")
    num_rows = len(next(iter(columns.values())))
    batch_size = batch_size or EVAL_BATCH_SIZE.get(task, DEFAULT_EVAL_BATCH_SIZE)
    max_length = max_eval_length(tokenizer, config)
    builder = BATCH_BUILDERS[task]
    batches, labels = [], []
    for start in range(0, num_rows, batch_size):
        batch, batch_labels = builder(columns, tokenizer, config, start, min(start + batch_size, num_rows), max_length)
        batches.append(batch)
        labels.append(batch_labels)
    return EvalSet(batches, labels, num_rows)
