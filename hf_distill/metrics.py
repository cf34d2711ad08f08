"""Metrics computed here, with no network: accuracy, F1, and entity-level scores for token classification."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of predictions equal to the references."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean()) if references.size else 0.0


def f1(predictions: np.ndarray, references: np.ndarray, average: str = "binary", positive_label: int = 1) -> float:
    """F1 score: ``binary`` (of ``positive_label``) or ``macro`` (unweighted mean over the labels seen)."""
    predictions, references = np.asarray(predictions), np.asarray(references)

    def f1_of(label: Any) -> float:
        tp = np.sum((predictions == label) & (references == label))
        fp = np.sum((predictions == label) & (references != label))
        fn = np.sum((predictions != label) & (references == label))
        return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0

    if average == "binary":
        return f1_of(positive_label)
    if average == "macro":
        labels = np.union1d(np.unique(references), np.unique(predictions))
        return float(np.mean([f1_of(label) for label in labels])) if labels.size else 0.0
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}.")


def _logits_and_labels(eval_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = eval_pred[0], eval_pred[1]
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return np.asarray(logits), np.asarray(labels)


def classification_metrics(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics` for sequence classification: accuracy and F1 (binary for 2 classes, else macro)."""
    logits, labels = _logits_and_labels(eval_pred)
    predictions = logits.argmax(-1)
    average = "binary" if logits.shape[-1] == 2 else "macro"
    return {"accuracy": accuracy(predictions, labels), "f1": f1(predictions, labels, average=average)}


def iob2_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities ``(type, first, last)`` of one sequence of IOB2 tags, read as seqeval's default mode does.

    ``B-X`` starts an entity of type X. ``I-X`` continues the entity the previous tag opened when it has type X,
    and starts a new one otherwise (after ``O`` or after a tag of another type). ``O`` ends an entity.
    """
    entities: list[tuple[str, int, int]] = []
    current: Optional[tuple[str, int]] = None  # (type, first token) of the open entity
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, kind = tag.partition("-")
        if tag != "O" and (prefix not in ("B", "I") or not kind):
            raise ValueError(
                f"Entity-level metrics read IOB2 labels (O, B-<type>, I-<type>); got {tag!r}. Name the model's labels "
                "that way in config.id2label, or compute token-level metrics instead."
            )
        continues = prefix == "I" and current is not None and current[0] == kind
        if current is not None and not continues:
            entities.append((current[0], current[1], i - 1))
            current = None
        if tag != "O" and not continues:
            current = (kind, i)
    return entities


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1, micro-averaged over all entities of all sequences.

    An entity counts as found only when type, first and last token all match:
    ``P = |found| / |predicted|``, ``R = |found| / |true|``, ``F1 = 2PR / (P + R)`` (0 when a denominator is 0).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} reference sequences but {len(predictions)} predicted ones.")
    true, predicted = set(), set()
    for n, (ref, pred) in enumerate(zip(references, predictions)):
        if len(ref) != len(pred):
            raise ValueError(f"Sequence {n}: {len(ref)} reference tags but {len(pred)} predicted ones.")
        true.update((n, *entity) for entity in iob2_entities(ref))
        predicted.update((n, *entity) for entity in iob2_entities(pred))
    found = len(true & predicted)
    precision = found / len(predicted) if predicted else 0.0
    recall = found / len(true) if true else 0.0
    f1_score = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1_score}


def token_classification_metrics(id2label: Union[Mapping[int, str], Sequence[str]]) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` for token classification with IOB2 labels: entity-level precision, recall and F1
    (:func:`entity_scores`, as seqeval's default mode) and token accuracy; positions labelled -100 are skipped.

    Usage: ``compute_metrics=token_classification_metrics(model.config.id2label)``.
    """
    if isinstance(id2label, Mapping):
        names = {int(k): v for k, v in id2label.items()}
    else:
        names = dict(enumerate(id2label)) if isinstance(id2label, Sequence) and not isinstance(id2label, str) else {}
    if not names or not all(isinstance(v, str) for v in names.values()):
        raise TypeError(
            "token_classification_metrics takes the label names and returns the compute_metrics function: "
            "compute_metrics=token_classification_metrics(model.config.id2label)."
        )

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = _logits_and_labels(eval_pred)
        predictions = logits.argmax(-1)
        references, predicted = [], []
        for row_labels, row_predictions in zip(labels, predictions):
            keep = row_labels != -100
            references.append([names[int(i)] for i in row_labels[keep]])
            predicted.append([names[int(i)] for i in row_predictions[keep]])
        keep = labels != -100
        return {**entity_scores(references, predicted), "accuracy": accuracy(predictions[keep], labels[keep])}

    return compute
