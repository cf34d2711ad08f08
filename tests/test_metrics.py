"""Metrics: entity-level precision / recall / F1 for token classification, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

import hf_distill
from hf_distill.metrics import entity_scores, iob2_entities, token_classification_metrics

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def test_entities_are_read_like_seqeval_default_mode():
    assert iob2_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert iob2_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]  # B starts a new entity
    assert iob2_entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]  # I after O starts one
    assert iob2_entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]  # a type change too
    assert iob2_entities(["O", "O"]) == []
    with pytest.raises(ValueError, match="IOB2 labels .* 'PER'"):
        iob2_entities(["PER"])


def test_entity_scores_by_hand():
    # seqeval's README example: 2 true entities, 2 predicted, 1 exact match (MISC starts one token early).
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert entity_scores(true, pred) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    # 3 true (PER, LOC, ORG), 2 predicted (PER exact, ORG one token short): P = 1/2, R = 1/3, F1 = 2/5.
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "I-ORG", "O"]]
    assert entity_scores(true, pred) == pytest.approx({"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5})
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def _one_hot(ids: list[list[int]]) -> np.ndarray:
    return np.eye(len(LABELS))[np.array(ids)]


def test_compute_metrics_scores_entities_and_skips_ignored_positions():
    compute = token_classification_metrics(dict(enumerate(LABELS)))
    # -100 marks [CLS], [SEP] and continuation sub-tokens; the model's predictions there do not count.
    labels = np.array([[-100, 1, 2, 0, 3, -100], [-100, 3, -100, 4, 0, -100]])
    #  sentence 1: true PER(0-1), LOC(3); predicted PER(0-1), O at the LOC -> 1 of 2 found
    #  sentence 2: true LOC(0-1); predicted B-LOC, I-PER -> LOC(0) and PER(1): 0 of 1 found, 2 predicted
    predicted = [[3, 1, 2, 0, 0, 4], [1, 3, 1, 2, 0, 0]]
    scores = compute((_one_hot(predicted), labels))
    assert scores == pytest.approx({"precision": 1 / 3, "recall": 1 / 3, "f1": 1 / 3, "accuracy": 5 / 7})
    token_macro_f1 = (4 / 5 + 1 + 2 / 3 + 2 / 3 + 0) / 5  # per tag O, B-PER, I-PER, B-LOC, I-LOC: not what users mean
    assert scores["f1"] != pytest.approx(token_macro_f1)
    assert token_classification_metrics(LABELS)((_one_hot(predicted), labels)) == scores  # a list of names works too


def test_the_label_names_are_required_and_load_metric_is_gone():
    with pytest.raises(TypeError, match=r"token_classification_metrics\(model.config.id2label\)"):
        token_classification_metrics((np.zeros((1, 2, 5)), np.zeros((1, 2), dtype=int)))
    assert "load_metric" not in hf_distill.__all__
    assert not hasattr(hf_distill.metrics, "load_metric")
