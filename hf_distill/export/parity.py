"""Parity between the PyTorch model and an exported ONNX file on one sample batch."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..inference import SUPPORTED_TASKS, build_feed, create_session, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_TEXTS = (
    "a gripping and often funny film .",
    "the plot is thin , but the acting is good and the score is wonderful to hear .",
    "boring .",
    "it never quite decides what it wants to be , and the last hour drags on and on without a point .",
)
FP32_ATOL = {"text-generation": 1e-3}  # vocabulary-sized logits of larger magnitude
FP32_DEFAULT_ATOL = 1e-4
INT8_DEFAULT_ATOL = 1.0
INT8_MIN_ARGMAX_AGREEMENT = 0.9


class ParityError(ValueError):
    """ONNX Runtime outputs differ from PyTorch's by more than the allowed tolerance."""


@dataclass
class ParityResult:
    """How closely one ONNX file reproduces PyTorch on the sample batch."""

    precision: str  # "fp32" or "int8"
    max_abs_diff: float
    argmax_agreement: float  # fraction of predictions (examples, tokens or span ends) that agree
    atol: float
    min_argmax_agreement: float
    num_predictions: int
    passed: bool
    inputs: str  # where the sample batch came from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_atol(task: str, precision: str) -> float:
    """The default max abs diff allowed for `task` at `precision` ("fp32" or "int8")."""
    return FP32_ATOL.get(task, FP32_DEFAULT_ATOL) if precision == "fp32" else INT8_DEFAULT_ATOL


def sample_inputs(model_dir: Path, config: Any, sample_texts: Sequence[str] | None) -> tuple[dict[str, np.ndarray], str]:
    """The sample batch: `sample_texts` (or built-in sentences) through the folder's tokenizer, or random
    ids from the config (with a padded second row) when the folder has no tokenizer."""
    tokenizer = load_tokenizer(model_dir, for_batching=True)
    if tokenizer is not None:
        texts = list(sample_texts or DEFAULT_SAMPLE_TEXTS)
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="np")
        source = "sample_texts" if sample_texts else "built-in sample texts"
        return {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}, source
    logger.info("no tokenizer in %s: parity runs on random token ids", model_dir)
    generator = np.random.default_rng(0)
    vocab_size = int(getattr(config, "vocab_size", 100))
    input_ids = generator.integers(min(5, vocab_size - 1), vocab_size, size=(2, 16), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, -4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}, "random token ids"


def _torch_outputs(model: torch.nn.Module, feed: dict[str, np.ndarray], output_names: Sequence[str],
                   past: Any = None) -> tuple[list[np.ndarray], Any]:
    inputs = {name: torch.from_numpy(value) for name, value in feed.items() if not name.startswith("past_key_values.")}
    with torch.inference_mode():
        if past is not None or any(name.startswith("past_key_values.") for name in feed):
            outputs = model(**inputs, past_key_values=past, use_cache=True, return_dict=True)
            return [outputs.logits.numpy()], outputs.past_key_values
        outputs = model(**inputs, return_dict=True)
    return [outputs[name].numpy() for name in output_names], None


def _predictions(task: str, outputs: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    if task == "sequence-classification":
        return outputs[0].argmax(-1)
    if task == "question-answering":  # start and end position per example, padding excluded
        return np.stack([np.where(mask == 1, logits, -np.inf).argmax(-1) for logits in outputs])
    return outputs[0].argmax(-1)[mask == 1]


def _max_abs_diff(task: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], mask: np.ndarray) -> float:
    diffs = []
    for expected, actual in zip(reference, candidate):
        difference = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
        if task != "sequence-classification":  # per-position outputs: padded positions carry no meaning
            difference = difference[mask == 1]
        diffs.append(float(difference.max()) if difference.size else 0.0)
    return max(diffs)


def measure_parity(model: torch.nn.Module, onnx_path: Path, task: str, inputs: dict[str, np.ndarray],
                   precision: str, atol: float, min_argmax_agreement: float, source: str) -> ParityResult:
    """Run PyTorch and ONNX Runtime on `inputs` and compare. Causal LMs exported with a cache are also
    compared on a second step that feeds the first step's cache back with one more token."""
    session = create_session(onnx_path)
    output_names = SUPPORTED_TASKS[task].output_names
    feed = build_feed(session, inputs)
    mask = feed.get("attention_mask", inputs["attention_mask"])
    onnx_outputs = session.run(None, feed)
    torch_outputs, torch_cache = _torch_outputs(model, feed, output_names)
    count = len(output_names)
    max_diff = _max_abs_diff(task, torch_outputs, onnx_outputs[:count], mask)
    reference_predictions = _predictions(task, torch_outputs, mask)
    onnx_predictions = _predictions(task, onnx_outputs[:count], mask)
    if torch_cache is not None:  # second step through the cache
        next_ids = np.asarray(torch_outputs[0][:, -1].argmax(-1), dtype=np.int64)[:, None]
        step_mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        step_feed = build_feed(session, {"input_ids": next_ids, "attention_mask": step_mask}, onnx_outputs[1:])
        step_onnx = session.run(None, step_feed)[:1]
        step_torch, _ = _torch_outputs(model, {k: v for k, v in step_feed.items()
                                              if not k.startswith("past_key_values.")}, output_names, torch_cache)
        step_valid = np.ones_like(next_ids)
        max_diff = max(max_diff, _max_abs_diff(task, step_torch, step_onnx, step_valid))
        reference_predictions = np.concatenate([reference_predictions, _predictions(task, step_torch, step_valid)])
        onnx_predictions = np.concatenate([onnx_predictions, _predictions(task, step_onnx, step_valid)])
    agreement = float((reference_predictions == onnx_predictions).mean()) if reference_predictions.size else 1.0
    passed = max_diff <= atol and agreement >= min_argmax_agreement
    return ParityResult(precision, max_diff, agreement, atol, min_argmax_agreement, int(reference_predictions.size),
                        passed, source)


def raise_on_failure(result: ParityResult, onnx_path: Path) -> None:
    """Raise `ParityError` naming the flag to loosen when `result` did not pass."""
    if result.passed:
        return
    atol_flag = "parity_atol (--parity_atol)" if result.precision == "fp32" else "int8_parity_atol (--int8_parity_atol)"
    problems = []
    if result.max_abs_diff > result.atol:
        problems.append(f"max abs diff {result.max_abs_diff:.3g} > {atol_flag}={result.atol:g}")
    if result.argmax_agreement < result.min_argmax_agreement:
        problems.append(f"argmax agreement {result.argmax_agreement:.1%} < int8_min_agreement "
                        f"(--int8_min_agreement)={result.min_argmax_agreement:.1%}")
    raise ParityError(
        f"{result.precision} ONNX parity check failed for {onnx_path.name}: {'; '.join(problems)} "
        f"(on {result.num_predictions} predictions from {result.inputs}). The file is kept at {onnx_path} for "
        "inspection; if the difference is acceptable, raise the tolerance named above."
    )
