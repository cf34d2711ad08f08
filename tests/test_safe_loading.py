"""Safetensors only: a folder with only pickle weights is refused with the way out, or loaded when allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_distill.safe_loading import PickleWeightsError, from_pretrained_safely
from tiny_models import tiny_bert


def _pickle_only_folder(folder: Path):
    """A model folder as old checkpoints are: config.json and pytorch_model.bin (a pickle), no safetensors."""
    model = tiny_bert(seed=4)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


class RecordingAutoClass:
    """Stands in for an AutoModel class: records what from_pretrained was asked."""

    calls: list = []

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        cls.calls.append((name_or_path, kwargs))
        return "model"


def test_a_pickle_only_folder_is_refused_with_the_conversion_and_the_flag(tmp_path):
    _pickle_only_folder(tmp_path)
    RecordingAutoClass.calls = []
    with pytest.raises(PickleWeightsError) as error:
        from_pretrained_safely(RecordingAutoClass, tmp_path)
    message = str(error.value)
    assert "pytorch_model.bin" in message and str(tmp_path) in message
    assert "save_pretrained" in message and "--allow_pickle_weights" in message
    assert RecordingAutoClass.calls == []  # nothing was unpickled
    with pytest.raises(PickleWeightsError, match="allow_pickle_weights"):
        from_pretrained_safely(RecordingAutoClass, "org/model", use_safetensors=False)


def test_pickle_weights_load_when_explicitly_allowed(tmp_path):
    original = _pickle_only_folder(tmp_path)
    loaded = from_pretrained_safely(AutoModelForSequenceClassification, tmp_path, allow_pickle_weights=True)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_safetensors_folders_and_hub_names_load_with_use_safetensors(tmp_path):
    model = tiny_bert(seed=5)
    model.save_pretrained(tmp_path / "safe")
    torch.save(model.state_dict(), tmp_path / "safe" / "pytorch_model.bin")  # both formats: safetensors wins
    RecordingAutoClass.calls = []
    from_pretrained_safely(RecordingAutoClass, tmp_path / "safe", num_labels=2)
    from_pretrained_safely(RecordingAutoClass, "org/model", allow_pickle_weights=True)
    assert RecordingAutoClass.calls == [(str(tmp_path / "safe"), {"num_labels": 2, "use_safetensors": True}),
                                        ("org/model", {"use_safetensors": True})]
    loaded = from_pretrained_safely(AutoModelForSequenceClassification, tmp_path / "safe")
    assert torch.equal(loaded.classifier.weight, model.classifier.weight)
