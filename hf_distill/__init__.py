"""hf_distill: knowledge distillation for Hugging Face Transformers on the stock Trainer.

Public names are imported lazily, so that ``import hf_distill.losses`` (or the card helpers) does not
pay for transformers' Trainer and its optional integrations.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "DistillationArguments": "arguments",
    "DistillationTrainer": "trainer",
    "load_teacher": "teachers",
    "TeacherColumnsCollator": "collator",
    "cache_teacher_outputs": "teacher_cache",
    "model_fingerprint": "teacher_cache",
    "detect_task": "tasks",
    "classification_metrics": "metrics",
    "token_classification_metrics": "metrics",
    "create_student": "students",
    "bert_to_distilbert": "students",
    "resolve_layer_map": "layer_map",
    "FeatureProjections": "layer_map",
    "export_onnx": "export",
    "load_onnx_pipeline": "inference",
    "render_model_card": "cards",
    "write_model_card": "cards",
    "push_distilled_to_hub": "hub",
    "convert_llama2c": "llama2c",
    "tokenize_completions": "causal_lm",
    "tokenize_aligned": "lm.cross_tokenizer_data",
    "cache_aligned_teacher_topk": "cross_tokenizer",
    "CompletionCollator": "causal_lm",
    "generate_teacher_completions": "causal_lm",
    "cache_teacher_completions": "causal_lm",
    "distill_progressively": "progressive",
    "augment_texts": "augmentation",
    "augment_and_cache": "augmentation",
    "IntermediateSettings": "intermediate",
    "trim_vocabulary": "vocabulary",
    "unk_rate": "vocabulary",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
