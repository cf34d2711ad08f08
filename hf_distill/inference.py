"""Run an exported ONNX folder on raw text with ONNX Runtime: no PyTorch model, no Optimum.

The folder is the one `hf_distill.export.export_onnx` writes (`model.onnx`, `model_quantized.onnx`,
`config.json` and the tokenizer files), which is also the layout Optimum's `ORTModelFor*` classes load.

    from hf_distill.export import export_onnx
    from hf_distill.inference import load_onnx_pipeline

    export_onnx("outputs/student")                       # writes outputs/student/onnx/
    classify = load_onnx_pipeline("outputs/student/onnx")  # int8 by default
    classify("a gripping, funny film")                     # [{'label': 'positive', 'score': 0.97}]

A headless or sentence-embedding student exports as ``feature-extraction`` (``last_hidden_state``); its pipeline
returns one sentence embedding per text, pooled as the student's folder recorded (sentence-transformers files),
or mean-pooled without normalisation when it recorded none.

An int8 file that failed the export's check is moved to `rejected/` and is never loaded by default: asking for
int8 from such a folder raises an error that says why it was rejected and how to load fp32.

This module also holds the pieces the exporter, the parity check and the benchmark share and that must
not need torch: the task table, task detection from a config, and building ONNX Runtime feeds.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

FP32_FILE_NAME = "model.onnx"
INT8_FILE_NAME = "model_quantized.onnx"
EXPORT_INFO_FILE_NAME = "export_info.json"
REJECTED_FOLDER_NAME = "rejected"  # where the exporter moves an int8 file that failed its check
DEFAULT_POOLING = {"mode": "mean", "normalize": False}  # feature extraction, when the folder records no pooling


@dataclass(frozen=True)
class TaskSpec:
    """What one supported task exports: its outputs, and the names other tools use for it."""

    name: str
    architecture_suffixes: tuple[str, ...]
    output_names: tuple[str, ...]
    optimum_task: str
    token_level: bool  # one prediction per token (argmax over the last axis at every position)


SUPPORTED_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("sequence-classification", ("ForSequenceClassification",), ("logits",), "text-classification", False),
        TaskSpec("token-classification", ("ForTokenClassification",), ("logits",), "token-classification", True),
        TaskSpec("question-answering", ("ForQuestionAnswering",), ("start_logits", "end_logits"),
                 "question-answering", False),
        TaskSpec("causal-lm", ("ForCausalLM", "LMHeadModel"), ("logits",), "text-generation-with-past", True),
        TaskSpec("feature-extraction", ("Model",), ("last_hidden_state",), "feature-extraction", True),
    )
}
TASK_ALIASES = {
    "text-classification": "sequence-classification",
    "sentiment-analysis": "sequence-classification",
    "ner": "token-classification",
    "qa": "question-answering",
    "text-generation": "causal-lm",
    "text-generation-with-past": "causal-lm",
    "sentence-embedding": "feature-extraction",
    "sentence-similarity": "feature-extraction",
}


class UnsupportedTaskError(ValueError):
    """The model's task (from `config.architectures` or `task=`) is not one the exporter supports."""


def resolve_task(task: str) -> str:
    """Canonical task name for `task` or one of its aliases; raises `UnsupportedTaskError` otherwise."""
    name = TASK_ALIASES.get(task, task)
    if name not in SUPPORTED_TASKS:
        raise UnsupportedTaskError(
            f"unsupported task {task!r}. Supported tasks: {', '.join(SUPPORTED_TASKS)} "
            f"(aliases: {', '.join(TASK_ALIASES)})."
        )
    return name


def detect_task(config: Any) -> str:
    """The supported task of a model, read from `config.architectures` (a config object or a dict), with the
    names training uses (:func:`hf_distill.tasks.task_of_class_name`)."""
    from .tasks import task_of_class_name

    architectures = (config.get("architectures") if isinstance(config, Mapping)
                     else getattr(config, "architectures", None)) or []
    for architecture in architectures:
        task = task_of_class_name(architecture)
        if task in SUPPORTED_TASKS:
            return task
    if any(str(architecture).endswith("Model") for architecture in architectures):
        return "feature-extraction"  # a headless model (BertModel, ...): its last hidden state
    suffixes = ", ".join(suffix for spec in SUPPORTED_TASKS.values() for suffix in spec.architecture_suffixes)
    raise UnsupportedTaskError(
        f"cannot export architecture(s) {architectures or 'none listed in config.json'}: supported model classes "
        f"end with one of {suffixes} (tasks: {', '.join(SUPPORTED_TASKS)}). If the weights hold one of these "
        "heads, pass task= (--task) explicitly."
    )


TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                        "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(folder: str | os.PathLike, for_batching: bool = False) -> Any | None:
    """The folder's tokenizer, or None when the folder holds no tokenizer files. (transformers 5 builds a
    5-token BertTokenizer from nothing instead of failing, so the files are checked first.) With
    `for_batching`, a missing pad token is set to eos/unk; None if neither exists."""
    from transformers import AutoTokenizer

    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILE_NAMES):
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if for_batching and tokenizer.pad_token is None:
        if tokenizer.eos_token is None and tokenizer.unk_token is None:
            return None
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def read_export_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The `export_info.json` the exporter left in `folder`, or {} for a folder from elsewhere (e.g. Optimum)."""
    path = Path(folder) / EXPORT_INFO_FILE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


class RejectedModelError(FileNotFoundError):
    """The int8 model of an export failed the export's check and was set aside."""


def int8_rejection(info: Mapping[str, Any]) -> str | None:
    """Why the export recorded in `info` (an `export_info.json`) rejected its int8 model, or None if it did not."""
    if info.get("int8_accepted", True) or not info.get("rejected_int8_path"):
        return None
    problems = (info.get("parity", {}).get("int8") or {}).get("problems") or ["the fp32 export failed parity"]
    return "; ".join(problems)


def _check_int8_file(folder: Path, model_path: Path) -> None:
    """Refuse a missing int8 file that the export rejected; warn when a rejected file was put back in place."""
    info = read_export_info(folder)
    reason = int8_rejection(info)
    if reason is None:
        return
    if not model_path.is_file():
        raise RejectedModelError(
            f"the int8 model of {folder} was rejected at export ({reason}) and moved to "
            f"{folder / info['rejected_int8_path']}. Load the fp32 model with quantized=False, or re-export with a "
            "larger int8_max_accuracy_drop (--int8_max_accuracy_drop) if that change is acceptable.")
    warnings.warn(f"{model_path} is an int8 model the export rejected ({reason}); loading it anyway", stacklevel=3)


def create_session(onnx_path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session; `threads` sets the intra-op thread count (inter-op stays 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])


def position_ids_from_mask(attention_mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Position ids that skip padding, as Optimum's `ORTModelForCausalLM` computes them."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions = np.where(attention_mask == 0, 1, positions)
    return positions[:, past_length:].astype(np.int64)


def build_feed(session: Any, inputs: Mapping[str, Any], past: Sequence[np.ndarray] | None = None) -> dict:
    """Inputs for `session` from tokenizer outputs (numpy or torch): extra keys are dropped, and
    `token_type_ids`, `position_ids` and an empty (or the given) past key/value cache are filled in."""
    arrays = {key: np.asarray(value.cpu() if hasattr(value, "cpu") else value) for key, value in inputs.items()}
    input_ids = arrays["input_ids"].astype(np.int64)
    batch_size = input_ids.shape[0]
    past_names = [arg.name for arg in session.get_inputs() if arg.name.startswith("past_key_values.")]
    past_length = 0 if past is None else int(past[0].shape[2])
    feed: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        name = arg.name
        if name in arrays:
            feed[name] = arrays[name].astype(np.int64)
        elif name == "attention_mask":
            feed[name] = np.ones((batch_size, past_length + input_ids.shape[1]), dtype=np.int64)
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(input_ids)
        elif name == "position_ids":
            mask = feed.get("attention_mask", arrays.get("attention_mask"))
            if mask is None:
                mask = np.ones((batch_size, past_length + input_ids.shape[1]), dtype=np.int64)
            feed[name] = position_ids_from_mask(np.asarray(mask), past_length)
        elif name in past_names:
            if past is not None:
                feed[name] = past[past_names.index(name)]
            else:  # dims 1 and 3 (heads, head size) are static in the exported graph
                _, heads, _, head_size = arg.shape
                dtype = np.float16 if arg.type == "tensor(float16)" else np.float32
                feed[name] = np.zeros((batch_size, heads, 0, head_size), dtype=dtype)
        else:
            raise ValueError(f"the ONNX model needs input {name!r}, which the tokenizer did not produce")
    return feed


def _softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def pool_numpy(hidden: np.ndarray, attention_mask: np.ndarray, mode: str = "mean", normalize: bool = False
               ) -> np.ndarray:
    """``[B, T, H]`` token vectors to ``[B, H]``: the mean, the first real token (cls) or the feature-wise max of
    the real tokens (``attention_mask`` 1), then ``e / max(||e||, 1e-12)`` when ``normalize`` (as training pools)."""
    real = np.asarray(attention_mask)[..., None] > 0
    hidden = hidden.astype(np.float64)
    if mode == "mean":
        pooled = np.where(real, hidden, 0.0).sum(1) / np.maximum(real.sum(1), 1)
    elif mode == "cls":
        pooled = hidden[np.arange(hidden.shape[0]), real[..., 0].argmax(1)]
    elif mode == "max":
        pooled = np.where(real, hidden, -np.inf).max(1)
    else:
        raise ValueError(f"pooling mode must be mean, cls or max, got {mode!r} (export_info.json 'pooling')")
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class OnnxPipeline:
    """A `pipeline`-like callable over an exported folder, run with ONNX Runtime.

    - sequence-classification: `pipe("text")` -> `[{"label", "score"}]`; a list of texts gives one dict each.
    - token-classification: `pipe("text")` -> one `{"token", "label", "score", "start", "end"}` per token.
    - question-answering: `pipe(question=..., context=...)` -> `{"answer", "score", "start", "end"}`.
    - causal-lm (text generation): `pipe("prompt", max_new_tokens=20)` -> `[{"generated_text"}]` (greedy).
    - feature-extraction: `pipe("text")` or `pipe([...])` -> a `[N, H]` float32 array of sentence embeddings
      (`embed`); `run(**encoded)["last_hidden_state"]` gives the token vectors.
    """

    def __init__(self, folder: str | os.PathLike, quantized: bool = True, *, threads: int | None = None,
                 task: str | None = None, max_length: int = 512) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        file_name = INT8_FILE_NAME if quantized else FP32_FILE_NAME
        self.model_path = self.folder / file_name
        if quantized:
            _check_int8_file(self.folder, self.model_path)
        if not self.model_path.is_file():
            hint = " Export with quantize=True, or load with quantized=False." if quantized else ""
            raise FileNotFoundError(f"no {file_name} in {self.folder}: is this an exported ONNX folder?{hint}")
        self.config = AutoConfig.from_pretrained(self.folder)
        self.task = resolve_task(task) if task else read_export_info(self.folder).get("task") or detect_task(self.config)
        self.tokenizer = load_tokenizer(self.folder, for_batching=self.task != "causal-lm")
        if self.tokenizer is None:
            raise FileNotFoundError(
                f"no tokenizer files in {self.folder}: save the tokenizer with the model before exporting, or "
                "run the session yourself (hf_distill.inference.create_session + build_feed)"
            )
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)
        self.session = create_session(self.model_path, threads)
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.id2label = {int(key): value for key, value in (getattr(self.config, "id2label", None) or {}).items()}
        self.pooling = read_export_info(self.folder).get("pooling") or DEFAULT_POOLING

    def run(self, **encoded: Any) -> dict[str, np.ndarray]:
        """Raw outputs by name for already tokenized inputs."""
        return dict(zip(self.output_names, self.session.run(None, build_feed(self.session, encoded))))

    def __call__(self, inputs: Any = None, **kwargs: Any) -> Any:
        if self.task == "sequence-classification":
            return self.classify(inputs)
        if self.task == "token-classification":
            return self.tag_tokens(inputs)
        if self.task == "feature-extraction":
            return self.embed(inputs)
        if self.task == "question-answering":
            if isinstance(inputs, Mapping):
                kwargs = {**inputs, **kwargs}
            return self.answer(kwargs["question"], kwargs["context"], max_answer_length=kwargs.get("max_answer_length", 30))
        return self.generate(inputs, max_new_tokens=kwargs.get("max_new_tokens", 20))

    def _encode(self, texts: Sequence[str], **kwargs: Any) -> Any:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="np", **kwargs)

    def _label(self, index: int) -> str:
        return self.id2label.get(index, f"LABEL_{index}")

    def classify(self, texts: str | Sequence[str]) -> list[dict[str, Any]]:
        """Top label and its probability, one dict per text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        probabilities = _softmax(self.run(**self._encode(batch))["logits"])
        best = probabilities.argmax(-1)
        return [{"label": self._label(int(index)), "score": float(row[index])}
                for row, index in zip(probabilities, best)]

    def embed(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings ``[N, H]``: the last hidden state pooled (``self.pooling``: mode, normalize)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        parts = []
        for start in range(0, len(batch), batch_size):
            encoded = self._encode(batch[start:start + batch_size])
            hidden = self.run(**encoded)["last_hidden_state"]
            parts.append(pool_numpy(hidden, encoded["attention_mask"], self.pooling["mode"], self.pooling["normalize"]))
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), dtype=np.float32)

    def tag_tokens(self, texts: str | Sequence[str]) -> list:
        """Per-token labels (special tokens left out); a list of texts gives one list per text."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encoded = self._encode(batch, return_offsets_mapping=True, return_special_tokens_mask=True)
        offsets, special = encoded.pop("offset_mapping"), encoded.pop("special_tokens_mask")
        probabilities = _softmax(self.run(**encoded)["logits"])
        results = []
        for row, text in enumerate(batch):
            tokens = []
            for position in np.flatnonzero((encoded["attention_mask"][row] == 1) & (special[row] == 0)):
                start, end = (int(value) for value in offsets[row, position])
                index = int(probabilities[row, position].argmax())
                tokens.append({"token": text[start:end], "label": self._label(index),
                               "score": float(probabilities[row, position, index]), "start": start, "end": end})
            results.append(tokens)
        return results[0] if isinstance(texts, str) else results

    def answer(self, question: str, context: str, max_answer_length: int = 30) -> dict[str, Any]:
        """The most probable answer span inside `context` (no document stride: long contexts are truncated)."""
        encoded = self.tokenizer(question, context, truncation="only_second", max_length=self.max_length,
                                 return_offsets_mapping=True, return_tensors="np")
        in_context = np.array([sequence == 1 for sequence in encoded.sequence_ids(0)])
        offsets = encoded.pop("offset_mapping")[0]
        outputs = self.run(**encoded)
        start_probs = _softmax(np.where(in_context, outputs["start_logits"][0], -np.inf))
        end_probs = _softmax(np.where(in_context, outputs["end_logits"][0], -np.inf))
        span_scores = np.triu(np.outer(start_probs, end_probs))
        span_scores = np.tril(span_scores, max_answer_length - 1)
        start, end = np.unravel_index(int(span_scores.argmax()), span_scores.shape)
        char_start, char_end = int(offsets[start][0]), int(offsets[end][1])
        return {"answer": context[char_start:char_end], "score": float(span_scores[start, end]),
                "start": char_start, "end": char_end}

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 20) -> list[dict[str, str]]:
        """Greedy continuation, one `{"generated_text"}` per prompt, reusing the past key/value cache when
        the export has one."""
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        results = []
        for prompt in batch:  # one at a time: no padding inside a generated sequence
            encoded = self.tokenizer(prompt, return_tensors="np", add_special_tokens=False)
            input_ids = encoded["input_ids"].astype(np.int64)
            all_ids, mask, past = input_ids, np.ones_like(input_ids), None
            uses_past = any(name.startswith("present.") for name in self.output_names)
            for _ in range(max_new_tokens):
                feed = build_feed(self.session, {"input_ids": input_ids, "attention_mask": mask}, past)
                outputs = self.session.run(None, feed)
                next_id = outputs[0][:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
                all_ids = np.concatenate([all_ids, next_id], axis=1)
                if next_id.item() == getattr(self.config, "eos_token_id", None):
                    break
                mask = np.ones_like(all_ids)
                if uses_past:
                    past, input_ids = outputs[1:], next_id
                else:
                    input_ids = all_ids
            results.append({"generated_text": self.tokenizer.decode(all_ids[0], skip_special_tokens=True)})
        return results


def load_onnx_pipeline(folder: str | os.PathLike, quantized: bool = True, **kwargs: Any) -> OnnxPipeline:
    """Load an exported folder (int8 `model_quantized.onnx` by default) as an `OnnxPipeline`. Raises
    `RejectedModelError` when int8 is asked for and the export rejected it (use `quantized=False`)."""
    return OnnxPipeline(folder, quantized=quantized, **kwargs)
