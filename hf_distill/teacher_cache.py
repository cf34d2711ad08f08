"""Offline distillation: precompute the teacher's outputs once and store them as dataset columns.

Columns written (per example, unpadded):

* classification: ``teacher_logits`` = [num_labels]
* token classification: ``teacher_logits`` = [seq_len, num_labels]
* question answering: ``teacher_logits`` = [seq_len, 2] (start, end)
* causal LM, full: ``teacher_logits`` = [seq_len, vocab]
* causal LM, top-k: ``teacher_topk_log_probs`` and ``teacher_topk_indices`` = [seq_len, k], log-probabilities at
  ``temperature``, plus ``teacher_topk_temperature`` (a scalar) so the trainer can check it matches.

The map goes through ``datasets.Dataset.map`` with a fingerprint derived from the dataset, the teacher's
weights and the settings, so a second call with the same inputs is served from the `datasets` cache when
the dataset lives on disk (or when ``cache_file_name`` is given).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Optional

import torch
from torch import nn

from .tasks import detect_task, task_logits

TOPK_SUFFIXES = ("log_probs", "indices", "temperature")
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_fingerprint(model: nn.Module, max_elements_per_tensor: int = 65536) -> str:
    """A short sha256 of a model's config and weights (the first elements of every tensor)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        head = tensor.detach().reshape(-1)[:max_elements_per_tensor].to("cpu", torch.float32)
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def _pad(sequences: list[list[Any]], pad_value: Any) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_value] * (longest - len(s)) for s in sequences])


def _forward_columns(teacher: nn.Module) -> list[str]:
    params = inspect.signature(teacher.forward).parameters
    return [name for name in MODEL_INPUT_NAMES if name in params]


@torch.no_grad()
def _teacher_batch_outputs(
    batch: dict[str, list],
    *,
    teacher: nn.Module,
    task: str,
    input_prefix: str,
    pad_token_id: int,
    top_k: Optional[int],
    temperature: float,
    prefix: str,
    logits_column: str,
) -> dict[str, list]:
    device = next(teacher.parameters()).device
    inputs = {}
    for name in _forward_columns(teacher):
        column = input_prefix + name
        if column in batch:
            inputs[name] = _pad(batch[column], pad_token_id if name == "input_ids" else 0).to(device)
    lengths = [len(ids) for ids in batch[input_prefix + "input_ids"]]
    if "attention_mask" not in inputs:
        positions = torch.arange(max(lengths))
        inputs["attention_mask"] = (positions[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    logits = task_logits(teacher(**inputs), task).float().cpu()
    if task == "sequence-classification":
        return {logits_column: logits.tolist()}
    per_example = [logits[i, :n] for i, n in enumerate(lengths)]
    if top_k is None:
        return {logits_column: [x.tolist() for x in per_example]}
    log_probs, indices = [], []
    for x in per_example:
        values, idx = torch.log_softmax(x / temperature, dim=-1).topk(top_k, dim=-1)
        log_probs.append(values.tolist())
        indices.append(idx.int().tolist())
    return {
        f"{prefix}_log_probs": log_probs,
        f"{prefix}_indices": indices,
        f"{prefix}_temperature": [float(temperature)] * len(lengths),
    }


def cache_teacher_outputs(
    teacher: nn.Module,
    dataset: "datasets.Dataset",  # noqa: F821
    *,
    task: Optional[str] = None,
    batch_size: int = 32,
    top_k: Optional[int] = None,
    temperature: float = 1.0,
    pad_token_id: Optional[int] = None,
    input_prefix: str = "",
    logits_column: str = "teacher_logits",
    topk_column_prefix: str = "teacher_topk",
    cache_file_name: Optional[str] = None,
    load_from_cache_file: Optional[bool] = None,
) -> "datasets.Dataset":  # noqa: F821
    """Run ``teacher`` over a tokenized ``dataset`` and add its outputs as columns (see module doc).

    Args:
        teacher: a model whose outputs match the student's task head.
        dataset: tokenized examples (``input_ids`` at least; ``teacher_input_ids`` etc. with
            ``input_prefix="teacher_"`` when teacher and student tokenize differently).
        top_k: for language models, keep only the k most likely tokens per position (and the tail mass
            implicitly, as 1 − their sum). ``None`` stores full logits.
        temperature: temperature of the stored top-k log-probabilities; training must use the same.
    """
    if len(dataset) == 0:
        raise ValueError("The dataset to cache teacher outputs for is empty.")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    task = task or detect_task(teacher)
    if top_k is not None and task != "causal-lm":
        raise ValueError("top_k caching is for causal language models; classification heads are cached in full.")
    if input_prefix + "input_ids" not in dataset.column_names:
        raise ValueError(f"The dataset has no {input_prefix}input_ids column; tokenize it before caching.")
    if pad_token_id is None:
        pad_token_id = getattr(getattr(teacher, "config", None), "pad_token_id", None) or 0
    was_training = teacher.training
    teacher.eval()
    settings = json.dumps(
        [task, top_k, temperature, pad_token_id, input_prefix, logits_column, topk_column_prefix], sort_keys=True
    )
    fingerprint = hashlib.sha256(
        f"{dataset._fingerprint}-{model_fingerprint(teacher)}-{settings}".encode()
    ).hexdigest()[:16]
    try:
        return dataset.map(
            _teacher_batch_outputs,
            batched=True,
            batch_size=batch_size,
            fn_kwargs=dict(
                teacher=teacher,
                task=task,
                input_prefix=input_prefix,
                pad_token_id=pad_token_id,
                top_k=top_k,
                temperature=temperature,
                prefix=topk_column_prefix,
                logits_column=logits_column,
            ),
            new_fingerprint=fingerprint,
            cache_file_name=cache_file_name,
            load_from_cache_file=load_from_cache_file,
            desc="Caching teacher outputs",
        )
    finally:
        teacher.train(was_training)
