"""Offline distillation: precompute the teacher's outputs once and store them as dataset columns.

Columns written (per example, unpadded):

* classification: ``teacher_logits`` = [num_labels]
* token classification: ``teacher_logits`` = [seq_len, num_labels]
* question answering: ``teacher_logits`` = [seq_len, 2] (start, end)
* causal LM, full: ``teacher_logits`` = [seq_len, vocab]
* causal LM, top-k: ``teacher_topk_log_probs`` and ``teacher_topk_indices`` = [seq_len, k], log-probabilities at
  ``temperature``, plus ``teacher_topk_temperature`` (a scalar) so the trainer can check it matches; with
  ``token_log_probs=True`` also ``teacher_topk_token_log_probs`` = [seq_len], the log-probability of the next
  input token (0 at the last position): the aligned top-k cache of cross-tokenizer mode, made on
  ``teacher_input_ids`` (``hf_distill.cross_tokenizer.cache_aligned_teacher_topk``).

Values are stored as float32 (token ids as int32); per-token columns are ``Array2D`` of shape [seq_len, width],
so that :func:`with_fast_teacher_columns` (the trainer calls it) can read a batch as numpy arrays without
building Python lists.

The map goes through ``datasets.Dataset.map`` with a fingerprint derived from the dataset, the teacher's
weights and the settings, so a second call with the same inputs is served from the `datasets` cache when
the dataset lives on disk (or when ``cache_file_name`` is given).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .tasks import detect_task, task_logits

TOPK_SUFFIXES = ("log_probs", "indices", "temperature")
TOKEN_LOG_PROBS_SUFFIX = "token_log_probs"  # the aligned (cross-tokenizer) top-k cache's own-token column
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
CACHE_FORMAT = 2  # part of the fingerprint: 2 = float32 / int32 Array2D columns (1 was nested float64 lists)


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
    token_log_probs: bool = False,
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
        return {logits_column: list(logits.numpy())}
    per_example = [logits[i, :n] for i, n in enumerate(lengths)]
    if top_k is None:
        return {logits_column: [x.numpy() for x in per_example]}
    log_probs, indices, own = [], [], []
    for i, x in enumerate(per_example):
        all_log_probs = torch.log_softmax(x / temperature, dim=-1)
        values, idx = all_log_probs.topk(top_k, dim=-1)
        log_probs.append(values.numpy())
        indices.append(idx.int().numpy())
        following = inputs["input_ids"][i, 1 : lengths[i]].cpu().long().unsqueeze(-1)
        own.append(torch.cat([all_log_probs[:-1].gather(-1, following).squeeze(-1), torch.zeros(1)]).numpy())
    columns = {
        f"{prefix}_log_probs": log_probs,
        f"{prefix}_indices": indices,
        f"{prefix}_temperature": [float(temperature)] * len(lengths),
    }
    return {**columns, f"{prefix}_{TOKEN_LOG_PROBS_SUFFIX}": own} if token_log_probs else columns


def _output_features(
    dataset: "datasets.Dataset", task: str, width: int, top_k: Optional[int], prefix: str, logits_column: str,  # noqa: F821
    token_log_probs: bool = False,
) -> "datasets.Features":  # noqa: F821
    """The dataset's features plus the teacher columns: float32 values, int32 token ids, [seq_len, width] arrays."""
    from datasets import Array2D, Sequence, Value

    features = dataset.features.copy()
    if task == "sequence-classification":
        features[logits_column] = Sequence(Value("float32"))
    elif top_k is None:
        features[logits_column] = Array2D(shape=(None, width), dtype="float32")
    else:
        features[f"{prefix}_log_probs"] = Array2D(shape=(None, top_k), dtype="float32")
        features[f"{prefix}_indices"] = Array2D(shape=(None, top_k), dtype="int32")
        features[f"{prefix}_temperature"] = Value("float32")
        if token_log_probs:
            features[f"{prefix}_{TOKEN_LOG_PROBS_SUFFIX}"] = Sequence(Value("float32"))
    return features


def with_fast_teacher_columns(dataset: Any, columns: Sequence[str]) -> Any:
    """``dataset`` reading the cached teacher ``columns`` as numpy arrays (other columns unchanged).

    A `datasets.Dataset` in its default (Python) format builds nested lists for every cached value, which
    costs tens of milliseconds per batch of top-k columns; numpy arrays come straight from Arrow. Anything
    else (other formats, iterable or torch datasets) is returned as is.
    """
    present = [c for c in columns if c in (getattr(dataset, "column_names", None) or [])]
    fmt = getattr(dataset, "format", None)
    if not present or not hasattr(dataset, "with_format") or not isinstance(fmt, dict) or fmt.get("type") is not None:
        return dataset
    return dataset.with_format("numpy", columns=present, output_all_columns=True)


class CachedTeacherColumns:
    """The cached teacher columns of a run's datasets: their names (from the arguments), whether the datasets
    have them, the checks against the student, and the targets of one batch."""

    def __init__(self, args: Any, train_dataset: Any, eval_dataset: Any) -> None:
        self.args = args
        prefix = args.teacher_topk_column_prefix
        self.logits_column, self.topk_prefix = args.teacher_logits_column, prefix
        self.columns = (args.teacher_logits_column,) + tuple(
            f"{prefix}_{suffix}" for suffix in (*TOPK_SUFFIXES, TOKEN_LOG_PROBS_SUFFIX))
        self.train_dataset = train_dataset
        datasets_ = [train_dataset] + (list(eval_dataset.values()) if isinstance(eval_dataset, dict) else [eval_dataset])
        self.dataset_columns = {c for d in datasets_ for c in (getattr(d, "column_names", None) or [])}

    @property
    def present(self) -> bool:
        """Whether some dataset carries cached teacher outputs (full logits or top-k)."""
        return self.logits_column in self.dataset_columns or f"{self.topk_prefix}_indices" in self.dataset_columns

    @property
    def aligned(self) -> bool:
        """Whether the cache is the aligned top-k of cross-tokenizer mode (over the teacher's own tokens)."""
        return f"{self.topk_prefix}_{TOKEN_LOG_PROBS_SUFFIX}" in self.dataset_columns

    def check_width(self, width: int) -> None:
        """Cached teacher outputs must have the student's output width (labels, positions or vocabulary); an
        aligned top-k cache indexes the teacher's vocabulary (cross-tokenizer mode checks it)."""
        dataset = self.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        if self.logits_column in columns:
            cached = torch.as_tensor(dataset[0][self.logits_column])
            if cached.shape[-1] != width:
                raise ValueError(
                    f"Cached teacher logits have {cached.shape[-1]} values per row but the student outputs {width}. "
                    "Re-cache with cache_teacher_outputs() using a teacher that matches the student."
                )
        indices = f"{self.topk_prefix}_indices"
        if indices in columns and not self.aligned and int(torch.as_tensor(dataset[0][indices]).max()) >= width:
            raise ValueError(
                f"Cached top-k token ids go beyond the student's vocabulary of {width}. Re-cache with a teacher "
                "that shares the student's tokenizer and vocabulary."
            )

    def fast(self, dataset: Any) -> Any:
        """``dataset`` (or a dict of them) reading the cached columns as numpy arrays."""
        if isinstance(dataset, dict):
            return {k: with_fast_teacher_columns(v, self.columns) for k, v in dataset.items()}
        return with_fast_teacher_columns(dataset, self.columns)

    def targets(self, cached: dict, temperature: float) -> tuple[torch.Tensor, ...]:
        """The batch's cached teacher targets: (full logits,) or (top-k log-probs, indices)."""
        if self.logits_column in cached:
            return (cached[self.logits_column],)
        prefix = self.topk_prefix
        if f"{prefix}_indices" not in cached:
            raise ValueError(
                "No teacher outputs for this batch: pass `teacher_model` or cache its outputs into the dataset "
                "with hf_distill.cache_teacher_outputs()."
            )
        cache_temperature = cached.get(f"{prefix}_temperature")
        if cache_temperature is not None and not torch.allclose(cache_temperature.float(), torch.tensor(temperature)):
            raise ValueError(
                f"The top-k cache was made at temperature {cache_temperature.flatten()[0].item()} but training uses "
                f"{temperature}; re-cache with the training temperature or set --temperature to match (and keep "
                "--temperature_schedule constant)."
            )
        return cached[f"{prefix}_log_probs"], cached[f"{prefix}_indices"]


def _check_cache_arguments(teacher: nn.Module, dataset: Any, task: Optional[str], top_k: Optional[int],
                           temperature: float, input_prefix: str, token_log_probs: bool = False) -> str:
    """Refuse what cannot be cached, with the fix; returns the task."""
    if token_log_probs and top_k is None:
        raise ValueError("token_log_probs=True goes with a top-k cache: pass top_k.")
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
    return task


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
    token_log_probs: bool = False,
) -> "datasets.Dataset":  # noqa: F821
    """Run ``teacher`` over a tokenized ``dataset`` and add its outputs as columns (see module doc).

    Args:
        teacher: a model whose outputs match the student's task head.
        dataset: tokenized examples (``input_ids`` at least; ``teacher_input_ids`` etc. with
            ``input_prefix="teacher_"`` when teacher and student tokenize differently).
        top_k: for language models, keep only the k most likely tokens per position (and the tail mass
            implicitly, as 1 − their sum). ``None`` stores full logits.
        temperature: temperature of the stored top-k log-probabilities; training must use the same.
        token_log_probs: with ``top_k``, also store the log-probability of each next input token (cross-tokenizer).
    """
    task = _check_cache_arguments(teacher, dataset, task, top_k, temperature, input_prefix, token_log_probs)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(teacher, "config", None), "pad_token_id", None) or 0
    was_training = teacher.training
    teacher.eval()
    settings = json.dumps(
        [CACHE_FORMAT, task, top_k, temperature, pad_token_id, input_prefix, logits_column, topk_column_prefix]
        + [True] * token_log_probs,
        sort_keys=True,
    )
    fingerprint = hashlib.sha256(
        f"{dataset._fingerprint}-{model_fingerprint(teacher)}-{settings}".encode()
    ).hexdigest()[:16]
    settings_kwargs = dict(task=task, input_prefix=input_prefix, pad_token_id=pad_token_id, temperature=temperature,
                           prefix=topk_column_prefix, logits_column=logits_column)
    try:
        width = 0  # only full per-token logits need it (Array2D [seq, width]): read off one example
        if top_k is None and task != "sequence-classification":
            probe = _teacher_batch_outputs(dataset[:1], teacher=teacher, top_k=None, **settings_kwargs)
            width = probe[logits_column][0].shape[-1]
        return dataset.map(
            _teacher_batch_outputs,
            batched=True,
            batch_size=batch_size,
            fn_kwargs=dict(teacher=teacher, top_k=top_k, token_log_probs=token_log_probs, **settings_kwargs),
            features=_output_features(dataset, task, width, top_k, topk_column_prefix, logits_column, token_log_probs),
            new_fingerprint=fingerprint,
            cache_file_name=cache_file_name,
            load_from_cache_file=load_from_cache_file,
            desc="Caching teacher outputs",
        )
    finally:
        teacher.train(was_training)
