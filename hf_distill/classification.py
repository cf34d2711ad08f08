"""Building blocks of the classification scripts: data loading, a teacher trained on the spot, latency."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from .data import (
    SYNTHETIC_LABELS,
    bert_tokenizer_from_vocab,
    load_hub_dataset,
    load_json_dataset,
    synthetic_sentiment,
    synthetic_tokenizer,
)

logger = logging.getLogger(__name__)

#: Every argument that makes the teacher part of the loss, and its value in a hard-labels-only baseline.
TEACHER_TERMS_OFF = {"alpha": 0.0, "alpha_schedule": "constant", "alpha_end": None, "hidden_weight": 0.0,
                     "attention_weight": 0.0, "relation_weight": 0.0}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a ``vocab.txt`` file (WordPiece), a local folder or a Hub id."""
    if name_or_path.endswith(".txt") and Path(name_or_path).is_file():
        return bert_tokenizer_from_vocab(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def load_text_classification(
    dataset: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    synthetic_train_size: int = 1000,
    synthetic_label_noise: float = 0.3,
) -> tuple[DatasetDict, list[str]]:
    """Raw splits (``train``, ``validation``[, ``test``]) with ``text`` and ``label`` columns, and label names.

    ``dataset`` is ``"synthetic"`` (a negation-sentiment task made in code, with noisy training labels
    and clean evaluation labels), a local folder of ``{train,validation,test}.jsonl`` (with an optional
    ``labels.json``), or a Hub dataset id.
    """
    if dataset == "synthetic":
        def split(n: int, noise: float, split_seed: int) -> Dataset:
            rows = synthetic_sentiment(n, label_noise=noise, seed=split_seed, num_clauses=1)
            return Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows])

        splits = DatasetDict(
            train=split(synthetic_train_size, synthetic_label_noise, seed + 2),
            validation=split(400, 0.0, seed + 3),
            test=split(400, 0.0, seed + 4),
        )
        return splits, list(SYNTHETIC_LABELS)
    path = Path(dataset).expanduser()
    if path.is_dir():
        files = {name: path / f"{name}.jsonl" for name in ("train", "validation", "test") if (path / f"{name}.jsonl").is_file()}
        if "train" not in files:
            raise FileNotFoundError(f"--dataset {path} has no train.jsonl; expected train/validation/test .jsonl files.")
        splits = load_json_dataset(files, flag="--dataset")
        names_file = path / "labels.json"
        names = json.loads(names_file.read_text()) if names_file.is_file() else None
    else:
        splits = load_hub_dataset(dataset, flag="--dataset")
        feature = splits["train"].features.get(label_column)
        names = list(getattr(feature, "names", []) or []) or None
    for name in splits:
        missing = {text_column, label_column} - set(splits[name].column_names)
        if missing:
            raise ValueError(f"Split {name!r} of {dataset} lacks columns {sorted(missing)}; set --text_column/--label_column.")
        if text_column != "text":
            splits[name] = splits[name].rename_column(text_column, "text")
        if label_column != "label":
            splits[name] = splits[name].rename_column(label_column, "label")
    if names is None:
        names = [str(i) for i in sorted(set(splits["train"]["label"]) - {-100})]
    if "validation" not in splits:
        held_out = splits["train"].train_test_split(test_size=0.1, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
        logger.info("%s has no validation split: 10%% of train (%d rows) is held out for evaluation.", dataset,
                    len(splits["validation"]))
    return splits, names


def has_label_names(id2label: dict) -> bool:
    """False for transformers' placeholder names (``LABEL_0``, ``LABEL_1``, ...) and for bare numbers."""
    return not all(str(name) in (f"LABEL_{i}", str(i)) for i, name in id2label.items())


def align_labels(dataset_names: Sequence[str], teacher_id2label: dict) -> tuple[Optional[dict[int, int]], str]:
    """How the dataset's label ids relate to the teacher's output ids: ``(mapping, decision)``.

    ``mapping`` sends a dataset label id to the teacher's id of the same class (None: the ids already agree),
    and ``decision`` says in words what was decided. Names are compared case-insensitively. When only one
    side has names, ids are taken to agree. Raises ValueError when the counts differ, or when both sides have
    names and they are not the same classes.
    """
    teacher = {int(i): str(name) for i, name in teacher_id2label.items()}
    dataset = {i: str(name) for i, name in enumerate(dataset_names)}
    if len(teacher) != len(dataset):
        raise ValueError(
            f"The teacher has {len(teacher)} labels {list(teacher.values())} but the dataset has {len(dataset)} "
            f"{list(dataset.values())}. Pass a teacher trained on these classes, or a teacher without a trained "
            "classification head (its head is then sized to the dataset and trained with --teacher_train_epochs)."
        )
    if not has_label_names(teacher):
        return None, f"the teacher has no label names: it takes the dataset's {list(dataset.values())}"
    if not has_label_names(dataset):
        return None, (f"the dataset's labels have no names (no labels.json): label i is taken to be the teacher's "
                      f"id2label[i] {teacher}")
    by_name = {name.lower(): i for i, name in teacher.items()}
    if set(by_name) != {name.lower() for name in dataset.values()}:
        raise ValueError(
            f"The teacher's labels {teacher} are not the dataset's {dataset}. Pass the teacher trained on this task, "
            "or write the dataset's labels.json with the teacher's names in the dataset's id order."
        )
    mapping = {i: by_name[name.lower()] for i, name in dataset.items()}
    if all(i == j for i, j in mapping.items()):
        return None, f"the teacher's and the dataset's label names agree: {teacher}"
    return mapping, f"dataset labels remapped to the teacher's ids by name: {mapping} (teacher: {teacher})"


def remap_labels(splits: DatasetDict, mapping: Optional[dict[int, int]]) -> DatasetDict:
    """Rewrite the ``label`` column with ``mapping`` (ids not in it, e.g. -100, are kept)."""
    if not mapping:
        return splits
    from datasets import Value

    splits = DatasetDict({name: split.cast_column("label", Value("int64")) for name, split in splits.items()})
    return splits.map(lambda batch: {"label": [mapping.get(label, label) for label in batch["label"]]}, batched=True)


def hard_label_arguments(args: Any, output_dir: str) -> Any:
    """``args`` for a hard-labels-only baseline: every teacher term off (:data:`TEACHER_TERMS_OFF`), nothing
    saved (no checkpoints, no signal checkpoint) and its own ``output_dir``."""
    return dataclasses.replace(args, **TEACHER_TERMS_OFF, output_dir=output_dir, save_strategy="no",
                               save_on_signal=False, resume_from_checkpoint=None, push_to_hub=False)


def tokenize_splits(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """Tokenize the ``text`` column (kept for later evaluation) with truncation, no padding."""
    return splits.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length), batched=True)


def synthetic_setup() -> tuple[PreTrainedTokenizerBase, BertForSequenceClassification]:
    """The tokenizer and an untrained 4-layer BERT teacher for the synthetic task."""
    tokenizer = synthetic_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.1,
        id2label=dict(enumerate(SYNTHETIC_LABELS)), label2id={n: i for i, n in enumerate(SYNTHETIC_LABELS)},
    )
    return tokenizer, BertForSequenceClassification(config)


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of parameters, optionally without the input embeddings."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        embeddings = [m for name, m in model.named_modules() if name.endswith("embeddings")]
        total -= sum(p.numel() for m in embeddings[:1] for p in m.parameters())
    return total


@torch.no_grad()
def measure_latency(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    max_length: int = 128,
    repeats: int = 20,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Median and p90 forward latency (ms) per batch size on CPU, after warm-up."""
    model.eval()
    results = {}
    for batch_size in batch_sizes:
        batch = [texts[i % len(texts)] for i in range(batch_size)]
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(**inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
        times.sort()
        results[f"batch_{batch_size}"] = {
            "median": statistics.median(times),
            "p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        }
    return results


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (floats to 4 significant digits)."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_on(model: torch.nn.Module, dataset: Dataset, tokenizer: PreTrainedTokenizerBase,
                batch_size: int = 64, max_length: int = 128) -> float:
    """Accuracy of ``model`` on a tokenized split with a ``label`` column."""
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        inputs = tokenizer(rows["text"], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            predictions = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.argmax(-1).cpu()
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct / len(dataset)



def narrow_student(teacher: PreTrainedModel, num_layers: int, hidden_size: int, num_heads: Optional[int] = None) -> PreTrainedModel:
    """A randomly initialised model of the teacher's family, narrower and shallower (TinyBERT-style).

    Keeps the teacher's vocabulary, positions and label maps; ``intermediate_size`` scales with the width.
    """
    config = copy.deepcopy(teacher.config)
    ratio = hidden_size / config.hidden_size
    config.hidden_size, config.num_hidden_layers = hidden_size, num_layers
    config.num_attention_heads = num_heads or config.num_attention_heads
    if hidden_size % config.num_attention_heads:
        raise ValueError(f"--student_hidden_size {hidden_size} must be divisible by the {config.num_attention_heads} heads.")
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = max(1, int(round(config.intermediate_size * ratio)))
    return type(teacher)(config)
