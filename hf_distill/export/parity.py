"""Parity between the PyTorch model and its exported ONNX files, on an evaluation set or a sample batch.

Tolerances on the max abs diff are fractions of the logit scale (the largest |PyTorch output| compared), so that
a tolerance cannot hide a 2x error whatever the model's logit magnitude. The int8 verdict is the accuracy change
on the evaluation set when there is one (the max abs diff is then recorded, and judged only against an explicit
`int8_parity_atol`: int8 noise can exceed half the logit scale of a model whose logits are all near zero while
its predictions stay the same), else argmax agreement and the max abs diff on the sample batch.

Feature extraction (a headless or sentence-embedding student, output ``last_hidden_state``) has no predictions:
int8 is judged by the mean cosine between its sentence embeddings and PyTorch fp32's (the folder's pooling, mean
pooling when it records none) of at least ``int8_min_cosine`` (default 0.98), and fp32 by the max abs diff as
every task. Measured on the shared MiniLM (64 SST-2 sentences, mean pooling): dynamic int8 reaches 0.955 per
tensor (rejected) and 0.990 per channel.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..inference import DEFAULT_POOLING, SUPPORTED_TASKS, build_feed, create_session, load_tokenizer, pool_numpy
from .evaluation import IGNORE_INDEX, EvalSet

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_TEXTS = (
    "a gripping and often funny film .",
    "the plot is thin , but the acting is good and the score is wonderful to hear .",
    "boring .",
    "it never quite decides what it wants to be , and the last hour drags on and on without a point .",
)
# Max abs diff allowed, as a fraction of the logit scale: float rounding for fp32; int8 rounding for int8, which
# stays well below half the largest logit on real models while a 2x logit error reaches the whole scale.
RELATIVE_ATOL = {"fp32": 1e-4, "int8": 0.5}
MIN_ATOL = 1e-5  # floor for models whose logits are all near zero
FP32_MIN_ARGMAX_AGREEMENT = 1.0
INT8_MIN_ARGMAX_AGREEMENT = 0.9
INT8_MAX_ACCURACY_DROP = 1.0  # accuracy points
INT8_MIN_COSINE = 0.98  # feature extraction: mean cosine of int8 sentence embeddings to PyTorch fp32's


class ParityError(ValueError):
    """ONNX Runtime outputs differ from PyTorch's by more than the allowed tolerance."""


@dataclass(frozen=True)
class ParityCriteria:
    """What `judge` requires. `None` atols mean `RELATIVE_ATOL` times the logit scale."""

    fp32_atol: float | None = None
    int8_atol: float | None = None
    int8_min_agreement: float = INT8_MIN_ARGMAX_AGREEMENT
    int8_max_accuracy_drop: float = INT8_MAX_ACCURACY_DROP
    int8_min_cosine: float = INT8_MIN_COSINE

    def __post_init__(self) -> None:
        if not -1.0 <= self.int8_min_cosine <= 1.0:
            raise ValueError(f"int8_min_cosine (--int8_min_cosine) must be in [-1, 1], got {self.int8_min_cosine}")
        if not 0.0 <= self.int8_min_agreement <= 1.0:
            raise ValueError(f"int8_min_agreement (--int8_min_agreement) must be in [0, 1], got {self.int8_min_agreement}")
        if self.int8_max_accuracy_drop < 0:
            raise ValueError("int8_max_accuracy_drop (--int8_max_accuracy_drop) is in accuracy points and must be "
                             f">= 0, got {self.int8_max_accuracy_drop}")


@dataclass
class Tally:
    """Running comparison of one ONNX file with PyTorch over batches."""

    max_abs_diff: float = 0.0
    logit_scale: float = 0.0
    agreeing: int = 0
    predictions: int = 0
    reference_correct: int = 0
    correct: int = 0
    scored: int = 0
    pooling: Mapping[str, Any] | None = None  # feature extraction: how embeddings are pooled (None: DEFAULT_POOLING)
    cosine_sum: float = 0.0  # feature extraction: sum of the embeddings' cosines to PyTorch's, and their count
    vectors: int = 0

    def add(self, task: str, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], mask: np.ndarray,
            labels: np.ndarray | None = None) -> None:
        """Fold one batch in: outputs of PyTorch and ONNX Runtime, the attention mask, the labels if scored."""
        for expected, actual in zip(reference, candidate):
            valid = (expected if task == "sequence-classification" else expected[mask == 1]).astype(np.float64)
            other = (actual if task == "sequence-classification" else actual[mask == 1]).astype(np.float64)
            if valid.size:
                self.max_abs_diff = max(self.max_abs_diff, float(np.abs(valid - other).max()))
                self.logit_scale = max(self.logit_scale, float(np.abs(valid).max()))
        if task == "feature-extraction":  # no predictions: how closely the sentence embeddings point the same way
            pooling = self.pooling or DEFAULT_POOLING
            expected, actual = (pool_numpy(o[0], mask, pooling["mode"], pooling["normalize"]) for o in (reference, candidate))
            self.cosine_sum += float(_cosines(expected, actual).sum())
            self.vectors += len(expected)
            return
        expected_ids, actual_ids = _predictions(task, reference, mask), _predictions(task, candidate, mask)
        self.agreeing += int((expected_ids == actual_ids).sum())
        self.predictions += int(expected_ids.size)
        if labels is not None:
            scored = labels != IGNORE_INDEX
            self.reference_correct += int((reference[0].argmax(-1) == labels)[scored].sum())
            self.correct += int((candidate[0].argmax(-1) == labels)[scored].sum())
            self.scored += int(scored.sum())


@dataclass
class ParityResult:
    """How closely one ONNX file reproduces PyTorch, and the verdict on it."""

    precision: str  # "fp32" or "int8"
    max_abs_diff: float
    logit_scale: float  # largest |PyTorch output| compared
    argmax_agreement: float  # fraction of predictions (examples, tokens or span ends) that agree
    atol: float | None  # None: the max abs diff is recorded, not judged (int8 on an evaluation set)
    relative_atol: float | None  # atol / logit_scale when the default tolerance was used
    min_argmax_agreement: float | None  # None: agreement is recorded, not judged
    num_predictions: int
    passed: bool
    inputs: str  # where the compared inputs came from
    reference_accuracy: float | None = None  # PyTorch fp32 on the evaluation set
    accuracy: float | None = None  # this ONNX file on the evaluation set
    max_accuracy_drop: float | None = None  # points; None: accuracy is not judged
    mean_cosine: float | None = None  # feature extraction: mean cosine of the sentence embeddings to PyTorch fp32's
    min_mean_cosine: float | None = None  # None: the cosine is not judged
    problems: list[str] = field(default_factory=list)  # why it did not pass

    @property
    def accuracy_drop(self) -> float | None:
        """Accuracy points lost against PyTorch fp32 (negative: gained)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100 * (self.reference_accuracy - self.accuracy)

    @property
    def relative_diff(self) -> float | None:
        """max abs diff / logit scale: 1.0 for a 2x logit error."""
        return self.max_abs_diff / self.logit_scale if self.logit_scale else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, "relative_diff": self.relative_diff}


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


def _cosines(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[N, H]`` arrays (float64; 1 where both rows are zero)."""
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    norms = np.linalg.norm(expected, axis=-1) * np.linalg.norm(actual, axis=-1)
    dots = (expected * actual).sum(-1)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-300), np.where(dots == 0, 1.0, 0.0))


def _predictions(task: str, outputs: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    if task == "sequence-classification":
        return outputs[0].argmax(-1)
    if task == "question-answering":  # start and end position per example, padding excluded
        return np.stack([np.where(mask == 1, logits, -np.inf).argmax(-1) for logits in outputs])
    return outputs[0].argmax(-1)[mask == 1]


def tally_samples(model: torch.nn.Module, onnx_path: Path, task: str, inputs: dict[str, np.ndarray],
                  pooling: Mapping[str, Any] | None = None) -> Tally:
    """Compare PyTorch and ONNX Runtime on the sample batch. Causal LMs exported with a cache are also
    compared on a second step that feeds the first step's cache back with one more token."""
    session = create_session(onnx_path)
    output_names = SUPPORTED_TASKS[task].output_names
    feed = build_feed(session, inputs)
    mask = feed.get("attention_mask", inputs["attention_mask"])
    onnx_outputs = session.run(None, feed)
    torch_outputs, torch_cache = _torch_outputs(model, feed, output_names)
    tally = Tally(pooling=pooling)
    tally.add(task, torch_outputs, onnx_outputs[:len(output_names)], mask)
    if torch_cache is not None:  # second step through the cache
        next_ids = np.asarray(torch_outputs[0][:, -1].argmax(-1), dtype=np.int64)[:, None]
        step_mask = np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        step_feed = build_feed(session, {"input_ids": next_ids, "attention_mask": step_mask}, onnx_outputs[1:])
        step_onnx = session.run(None, step_feed)[:1]
        step_torch, _ = _torch_outputs(model, {k: v for k, v in step_feed.items()
                                              if not k.startswith("past_key_values.")}, output_names, torch_cache)
        tally.add(task, step_torch, step_onnx, np.ones_like(next_ids))
    return tally


def tally_eval_set(model: torch.nn.Module, onnx_paths: Mapping[str, Path], task: str, eval_set: EvalSet,
                   pooling: Mapping[str, Any] | None = None) -> dict[str, Tally]:
    """Compare each ONNX file with PyTorch on every batch of `eval_set` (PyTorch runs once per batch), scoring
    both against the labels."""
    sessions = {name: create_session(path) for name, path in onnx_paths.items()}
    output_names = SUPPORTED_TASKS[task].output_names
    tallies = {name: Tally(pooling=pooling) for name in onnx_paths}
    for batch, labels in zip(eval_set.batches, eval_set.labels):
        reference = None
        for name, session in sessions.items():
            feed = build_feed(session, batch)
            if reference is None:
                reference, _ = _torch_outputs(model, feed, output_names)
            outputs = session.run(None, feed)[:len(output_names)]
            tallies[name].add(task, reference, outputs, feed.get("attention_mask", batch["attention_mask"]), labels)
    return tallies


def _default_atol(precision: str, logit_scale: float) -> float:
    return max(RELATIVE_ATOL[precision] * logit_scale, MIN_ATOL)


def judge(tally: Tally, precision: str, criteria: ParityCriteria, source: str, on_eval_set: bool) -> ParityResult:
    """The verdict on one file. fp32: max abs diff within tolerance (and full argmax agreement on samples).
    int8 on the evaluation set: accuracy drop within `int8_max_accuracy_drop` points (and the max abs diff
    within `int8_atol` when one is given); on samples: max abs diff within tolerance and argmax agreement of at
    least `int8_min_agreement`. Feature extraction, int8: the mean cosine of the sentence embeddings of at least
    `int8_min_cosine` (and the max abs diff when `int8_atol` is given)."""
    given = criteria.fp32_atol if precision == "fp32" else criteria.int8_atol
    vectors = tally.vectors > 0
    judged = precision == "fp32" or given is not None or not (on_eval_set or vectors)
    atol = given if given is not None else _default_atol(precision, tally.logit_scale) if judged else None
    min_agreement = None if on_eval_set or vectors else (FP32_MIN_ARGMAX_AGREEMENT if precision == "fp32"
                                              else criteria.int8_min_agreement)
    result = ParityResult(
        precision=precision, max_abs_diff=tally.max_abs_diff, logit_scale=tally.logit_scale,
        argmax_agreement=tally.agreeing / tally.predictions if tally.predictions else 1.0, atol=atol,
        relative_atol=RELATIVE_ATOL[precision] if judged and given is None else None,
        min_argmax_agreement=min_agreement,
        num_predictions=tally.predictions, passed=True, inputs=source,
        reference_accuracy=tally.reference_correct / tally.scored if tally.scored else None,
        accuracy=tally.correct / tally.scored if tally.scored else None,
        max_accuracy_drop=criteria.int8_max_accuracy_drop if on_eval_set and precision == "int8" and not vectors else None,
        mean_cosine=tally.cosine_sum / tally.vectors if vectors else None,
        min_mean_cosine=criteria.int8_min_cosine if vectors and precision == "int8" else None,
    )
    result.problems = _problems(result)
    result.passed = not result.problems
    return result


def _problems(result: ParityResult) -> list[str]:
    atol_flag = "parity_atol (--parity_atol)" if result.precision == "fp32" else "int8_parity_atol (--int8_parity_atol)"
    problems = []
    if result.atol is not None and result.max_abs_diff > result.atol:
        scale = f" = {result.relative_atol:g} x logit scale {result.logit_scale:.3g}" if result.relative_atol else ""
        problems.append(f"max abs diff {result.max_abs_diff:.3g} > {atol_flag}={result.atol:.3g}{scale}")
    if result.min_argmax_agreement is not None and result.argmax_agreement < result.min_argmax_agreement:
        problems.append(f"argmax agreement {result.argmax_agreement:.1%} < "
                        f"{'int8_min_agreement (--int8_min_agreement)=' if result.precision == 'int8' else ''}"
                        f"{result.min_argmax_agreement:.1%} on {result.num_predictions} predictions")
    drop = result.accuracy_drop
    if result.max_accuracy_drop is not None and drop is not None and drop > result.max_accuracy_drop:
        problems.append(f"accuracy {100 * result.accuracy:.2f}% vs PyTorch fp32 {100 * result.reference_accuracy:.2f}%"
                        f": drop of {drop:.2f} points > int8_max_accuracy_drop (--int8_max_accuracy_drop)="
                        f"{result.max_accuracy_drop:g}")
    if result.min_mean_cosine is not None and result.mean_cosine is not None and result.mean_cosine < result.min_mean_cosine:
        problems.append(f"mean cosine of the sentence embeddings to PyTorch fp32's {result.mean_cosine:.4f} < "
                        f"int8_min_cosine (--int8_min_cosine)={result.min_mean_cosine:g} (per_channel=True, "
                        "--per_channel, usually keeps embeddings closer)")
    return problems


def raise_on_failure(result: ParityResult, onnx_path: Path) -> None:
    """Raise `ParityError` naming the flag to loosen when `result` did not pass."""
    if result.passed:
        return
    raise ParityError(
        f"{result.precision} ONNX parity check failed for {onnx_path.name}: {'; '.join(result.problems)} "
        f"(compared on {result.inputs}). The file is kept at {onnx_path} for inspection; if the difference is "
        "acceptable, raise the tolerance named above."
    )
