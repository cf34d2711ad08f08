"""Metrics that work with no network (accuracy, F1), and the `evaluate` path for users online."""

from __future__ import annotations

import os
from typing import Any, Callable

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


def token_classification_metrics(eval_pred: Any) -> dict[str, float]:
    """`compute_metrics` for token classification: token accuracy and macro F1, ignoring label -100."""
    logits, labels = _logits_and_labels(eval_pred)
    predictions = logits.argmax(-1)
    keep = labels != -100
    return {"accuracy": accuracy(predictions[keep], labels[keep]), "f1": f1(predictions[keep], labels[keep], "macro")}


BUILTIN_METRICS: dict[str, Callable[..., float]] = {"accuracy": accuracy, "f1": f1}


def load_metric(name: str) -> Callable[..., float]:
    """``evaluate.load(name)`` when online; the built-in metric of that name when offline or unreachable.

    Returns a function ``metric(predictions, references, **kwargs) -> float``.
    """
    offline = os.environ.get("HF_EVALUATE_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline:
        try:
            import evaluate

            module = evaluate.load(name)
            return lambda predictions, references, **kwargs: module.compute(
                predictions=predictions, references=references, **kwargs
            )[name]
        except Exception:  # noqa: BLE001 - no network, no script: fall back to the built-in metric
            pass
    if name not in BUILTIN_METRICS:
        raise ValueError(
            f"Metric {name!r} is not available offline; built-in metrics: {', '.join(BUILTIN_METRICS)}. "
            "Online, any `evaluate` metric name works."
        )
    return BUILTIN_METRICS[name]
