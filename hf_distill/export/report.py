"""Latency, size and accuracy of teacher fp32, student fp32 (PyTorch), student fp32 and int8 (ONNX Runtime).

`benchmark_models` measures; `write_report` writes `report.json`, `report.md` (a markdown table) and
`report.png` (accuracy against batch-1 latency, marker area proportional to size on disk).
The JSON rows are what `hf_distill.cards` reads: `name`, `accuracy` (a fraction), `size_mb`,
`num_parameters`, `latency_ms: {"batch_<n>": {"median", "p90", "runs"}}`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..inference import (FP32_FILE_NAME, INT8_FILE_NAME, build_feed, create_session, detect_task, int8_rejection,
                         load_tokenizer, read_export_info)
from .evaluation import label_ids
from .quantization import onnx_size_bytes
from .torch_backend import load_torch_model

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ROW_NAMES = {
    "teacher": "teacher fp32 PyTorch",
    "student": "student fp32 PyTorch",
    "student_onnx": "student fp32 ONNX",
    "student_int8": "student int8 ONNX",
}


@dataclass
class BenchmarkSettings:
    """Timing settings of `benchmark_models`, as a dataclass the scripts parse with `HfArgumentParser`."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 32], metadata={"help": "Batch sizes to time."})
    sequence_length: int = field(default=128, metadata={"help": "Sequence length to time."})
    warmup: int = field(default=3, metadata={"help": "Warm-up calls per model before timing."})
    runs: int = field(default=20, metadata={"help": "Timed calls per model and batch size."})
    max_seconds_per_case: float = field(default=30.0, metadata={
        "help": "Stop timing a batch size after this many seconds per model (at least 5 runs)."})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch threads = ONNX Runtime intra-op threads (default: torch's current count)."})


@dataclass
class BenchmarkRow:
    """One model in the report. `to_dict` gives the JSON row; `details` stay out of the table."""

    name: str
    size_mb: float
    num_parameters: int | None
    accuracy: float | None
    latency_ms: dict[str, dict[str, float]]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "accuracy": self.accuracy, "size_mb": self.size_mb,
                "num_parameters": self.num_parameters, "latency_ms": self.latency_ms}


def load_eval_jsonl(path: str | os.PathLike, text_field: str = "text", label_field: str = "label",
                    limit: int | None = None) -> tuple[list[str], list[Any]]:
    """Texts and labels from a JSON-lines file with one `{"text": ..., "label": ...}` object per line."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record or label_field not in record:
                raise ValueError(f"{path}:{number}: expected fields {text_field!r} and {label_field!r}, "
                                 f"found {sorted(record)}")
            texts.append(record[text_field])
            labels.append(record[label_field])
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


def folder_weights_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in a `save_pretrained` folder."""
    return sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def time_interleaved(functions: Sequence[Callable[[], Any]], warmup: int, runs: int, max_seconds: float,
                     min_runs: int = 5) -> list[dict[str, float]]:
    """Median and p90 milliseconds of each function over up to `runs` calls after `warmup` calls each.

    The functions take turns (one call each per round), so background load on a shared machine slows them
    alike and their ratios stay fair. Rounds stop after `runs`, or once `max_seconds` per function have
    passed, but never before `min_runs` rounds."""
    for function in functions:
        for _ in range(warmup):
            function()
    times: list[list[float]] = [[] for _ in functions]
    budget_end = time.perf_counter() + max_seconds * len(functions)
    rounds = 0
    while rounds < runs and (rounds < min_runs or time.perf_counter() < budget_end):
        for function, samples in zip(functions, times):
            started = time.perf_counter()
            function()
            samples.append((time.perf_counter() - started) * 1000)
        rounds += 1
    return [{"median": float(np.median(samples)), "p90": float(np.percentile(samples, 90)), "runs": len(samples)}
            for samples in times]


def fixed_batch(tokenizer: Any, config: Any, texts: Sequence[str] | None, batch_size: int, sequence_length: int
                ) -> dict[str, np.ndarray]:
    """A `batch_size` x `sequence_length` batch: texts padded (or cut) to the length, else random ids."""
    if tokenizer is not None:
        texts = list(texts or ["a short sentence to time the model with ."])
        batch = [texts[index % len(texts)] for index in range(batch_size)]
        encoded = tokenizer(batch, padding="max_length", truncation=True, max_length=sequence_length,
                            return_tensors="np")
        return {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}
    vocab_size = int(getattr(config, "vocab_size", 100))
    ids = np.random.default_rng(0).integers(min(5, vocab_size - 1), vocab_size, (batch_size, sequence_length))
    return {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, dtype=np.int64)}


def fit_sequence_length(sequence_length: int, configs: Sequence[Any]) -> int:
    """`sequence_length`, or the longest input every model in `configs` takes when that is shorter (with a
    warning: the report states the length actually timed)."""
    limits = [int(limit) for config in configs if config is not None
              for limit in [getattr(config, "max_position_embeddings", None)] if limit]
    if limits and min(limits) < sequence_length:
        logger.warning("sequence length %d is longer than the models take (max_position_embeddings %d); timing "
                       "at %d instead", sequence_length, min(limits), min(limits))
        return min(limits)
    return sequence_length


class _TorchRunner:
    def __init__(self, model_dir: Path, task: str) -> None:
        import inspect

        self.model = load_torch_model(model_dir, task)
        self.accepted = set(inspect.signature(self.model.forward).parameters)
        self.task = task

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {key: torch.from_numpy(value) for key, value in batch.items() if key in self.accepted}
        if self.task == "causal-lm":
            inputs["use_cache"] = False
        with torch.inference_mode():
            outputs = self.model(**inputs, return_dict=True)
        for key in ("logits", "start_logits", "last_hidden_state"):  # the first output, as the ONNX runner's
            if key in outputs:
                return outputs[key].numpy()
        raise KeyError(f"{type(self.model).__name__} returned none of logits, start_logits, last_hidden_state")


class _OnnxRunner:
    def __init__(self, path: Path, threads: int) -> None:
        self.session = create_session(path, threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, build_feed(self.session, batch))[0]


@dataclass
class _Candidate:
    name: str
    runner: Callable[[dict[str, np.ndarray]], np.ndarray]
    size_bytes: int
    num_parameters: int | None
    tokenizer: Any
    details: dict[str, Any]


def _accuracy(runner: Callable, tokenizer: Any, texts: Sequence[str], label_ids: np.ndarray,
              sequence_length: int, batch_size: int = 32) -> float:
    predictions = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=sequence_length, return_tensors="np")
        predictions.append(runner({key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}).argmax(-1))
    return float((np.concatenate(predictions) == label_ids).mean())


def _eval_label_ids(task: str, tokenizer: Any, config: Any, eval_texts: Sequence[str] | None,
                    eval_labels: Sequence[Any] | None) -> np.ndarray | None:
    """Class ids to score accuracy against, or None when accuracy cannot be measured."""
    if eval_texts is None or eval_labels is None:
        return None
    if len(eval_texts) != len(eval_labels):
        raise ValueError(f"{len(eval_texts)} eval texts but {len(eval_labels)} labels")
    if task == "sequence-classification" and tokenizer is not None:
        return label_ids(eval_labels, config)
    logger.warning("accuracy is only measured for sequence classification with a tokenizer (task: %s)", task)
    return None


def _torch_candidate(name: str, model_dir: Path, task: str, tokenizer: Any) -> _Candidate:
    runner = _TorchRunner(model_dir, task)
    return _Candidate(name, runner, folder_weights_bytes(model_dir), runner.model.num_parameters(), tokenizer,
                      {"runtime": "pytorch"})


def _onnx_candidates(onnx_dir: Path, num_parameters: int | None, tokenizer: Any, threads: int) -> list[_Candidate]:
    """The fp32 and int8 files in `onnx_dir` (each when present); the int8 row records a rejection at export."""
    export_info = read_export_info(onnx_dir) if onnx_dir.is_dir() else {}
    candidates = []
    for key, file_name in (("student_onnx", FP32_FILE_NAME), ("student_int8", INT8_FILE_NAME)):
        if (onnx_dir / file_name).is_file():
            details = {"runtime": "onnxruntime", "backend": export_info.get("backend"),
                       "backend_reason": export_info.get("backend_reason"),
                       "quantization_preset": export_info.get("quantization_preset") if key == "student_int8" else None}
            if key == "student_onnx" and int8_rejection(export_info):
                details["int8_rejected"] = int8_rejection(export_info)
            candidates.append(_Candidate(ROW_NAMES[key], _OnnxRunner(onnx_dir / file_name, threads),
                                         onnx_size_bytes(onnx_dir / file_name), num_parameters, tokenizer, details))
    return candidates


def _latencies(candidates: Sequence[_Candidate], config: Any, eval_texts: Sequence[str] | None,
               settings: BenchmarkSettings) -> list[dict[str, dict[str, float]]]:
    """Median / p90 ms of every candidate at every batch size, the candidates taking turns."""
    latencies: list[dict[str, dict[str, float]]] = [{} for _ in candidates]
    for batch_size in settings.batch_sizes:
        calls = []
        for candidate in candidates:
            batch = fixed_batch(candidate.tokenizer, config, eval_texts, batch_size, settings.sequence_length)
            calls.append(lambda runner=candidate.runner, batch=batch: runner(batch))
        timings = time_interleaved(calls, settings.warmup, settings.runs, settings.max_seconds_per_case)
        for latency, timing in zip(latencies, timings):
            latency[f"batch_{batch_size}"] = timing
    return latencies


def _measure(candidates: Sequence[_Candidate], config: Any, eval_texts: Sequence[str] | None,
             labels: np.ndarray | None, settings: BenchmarkSettings) -> list[BenchmarkRow]:
    rows = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        latencies = _latencies(candidates, config, eval_texts, settings)
        for candidate, latency in zip(candidates, latencies):
            accuracy = (_accuracy(candidate.runner, candidate.tokenizer, eval_texts, labels, settings.sequence_length)
                        if labels is not None else None)
            candidate.details.update(threads=settings.threads, sequence_length=settings.sequence_length,
                                     warmup=settings.warmup)
            size_mb = candidate.size_bytes / 1e6
            rows.append(BenchmarkRow(candidate.name, size_mb, candidate.num_parameters, accuracy, latency,
                                     candidate.details))
            logger.info("%s: %s, accuracy %s, %.1f MB", candidate.name, latency, accuracy, size_mb)
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def benchmark_models(
    student_dir: str | os.PathLike,
    *,
    teacher_dir: str | os.PathLike | None = None,
    onnx_dir: str | os.PathLike | None = None,
    eval_texts: Sequence[str] | None = None,
    eval_labels: Sequence[Any] | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    sequence_length: int = 128,
    warmup: int = 3,
    runs: int = 20,
    max_seconds_per_case: float = 30.0,
    threads: int | None = None,
) -> list[BenchmarkRow]:
    """Time and measure teacher fp32 PyTorch (when `teacher_dir` is given), student fp32 PyTorch, and the
    student's fp32 and int8 ONNX files in `onnx_dir` (default `<student_dir>/onnx`, each when present).

    Latency: median and p90 over `runs` repeated calls (fewer once `max_seconds_per_case` per model is spent,
    at least 5) after `warmup` calls, on fixed `batch_size` x `sequence_length` inputs; the models take turns
    call by call, so background load hits them alike. torch and ONNX Runtime
    (intra-op) use the same `threads` (default: torch's current thread count). Accuracy: argmax against
    `eval_labels` (ints, or names from `config.label2id`) for sequence classification.
    """
    from transformers import AutoConfig

    student_dir = Path(student_dir)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else student_dir / "onnx"
    config = AutoConfig.from_pretrained(student_dir)
    task = detect_task(config)
    tokenizer = load_tokenizer(student_dir, for_batching=True)
    labels = _eval_label_ids(task, tokenizer, config, eval_texts, eval_labels)
    teacher_config = AutoConfig.from_pretrained(teacher_dir) if teacher_dir is not None else None
    settings = BenchmarkSettings(list(batch_sizes), fit_sequence_length(sequence_length, [config, teacher_config]),
                                 warmup, runs, max_seconds_per_case, int(threads or torch.get_num_threads()))
    candidates: list[_Candidate] = []
    if teacher_dir is not None:
        teacher_tokenizer = load_tokenizer(teacher_dir, for_batching=True) or tokenizer
        candidates.append(_torch_candidate(ROW_NAMES["teacher"], Path(teacher_dir), detect_task(teacher_config),
                                           teacher_tokenizer))
    candidates.append(_torch_candidate(ROW_NAMES["student"], student_dir, task, tokenizer))
    candidates += _onnx_candidates(onnx_dir, candidates[-1].num_parameters, tokenizer, settings.threads)
    return _measure(candidates, config, eval_texts, labels, settings)


def _find(rows: Sequence[BenchmarkRow], key: str) -> BenchmarkRow | None:
    return next((row for row in rows if row.name == ROW_NAMES[key]), None)


def summarize(rows: Sequence[BenchmarkRow]) -> dict[str, float]:
    """Ratios of the int8 ONNX student against the fp32 PyTorch student and teacher (speed-ups, size, accuracy)."""
    int8, student, teacher = _find(rows, "student_int8"), _find(rows, "student"), _find(rows, "teacher")
    summary: dict[str, float] = {}
    if int8 is None:
        return summary
    for key, other in (("student", student), ("teacher", teacher)):
        if other is None:
            continue
        for batch, cell in int8.latency_ms.items():
            if batch in other.latency_ms and cell["median"] > 0:
                summary[f"int8_speedup_vs_{key}_{batch}"] = other.latency_ms[batch]["median"] / cell["median"]
        if other.size_mb:
            summary[f"int8_size_fraction_of_{key}"] = int8.size_mb / other.size_mb
        if other.accuracy is not None and int8.accuracy is not None:
            summary[f"int8_accuracy_delta_vs_{key}_points"] = 100 * (int8.accuracy - other.accuracy)
    return summary


def _markdown(rows: Sequence[BenchmarkRow], meta: dict[str, Any]) -> str:
    batches = list(dict.fromkeys(batch for row in rows for batch in row.latency_ms))
    header = ["Model", "Size (MB)", "Accuracy"] + [
        f"{batch.replace('_', ' ')} median / p90 (ms)" for batch in batches]
    lines = [f"# {meta.get('title', 'Export report')}", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        accuracy = f"{100 * row.accuracy:.2f}%" if row.accuracy is not None else "n/a"
        cells = [row.name, f"{row.size_mb:.2f}", accuracy]
        for batch in batches:
            cell = row.latency_ms.get(batch)
            cells.append(f"{cell['median']:.2f} / {cell['p90']:.2f}" if cell else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Sequence length {meta['sequence_length']}; torch threads = ONNX Runtime intra-op threads = "
              f"{meta['threads']}; median and p90 over up to {meta['runs']} runs after {meta['warmup']} warm-up "
              f"runs. Export backend: {meta.get('backend') or 'n/a'}"
              f"{' (' + meta['backend_reason'] + ')' if meta.get('backend_reason') else ''}; int8 preset: "
              f"{meta.get('quantization_preset') or 'n/a'}. CPU: {meta.get('cpu')}."]
    if meta.get("int8_rejected"):
        lines += ["", f"No int8 row: the int8 model was rejected at export ({meta['int8_rejected']}) and set aside "
                      "in onnx/rejected/."]
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[BenchmarkRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    batch = next(iter(rows[0].latency_ms))
    have_accuracy = any(row.accuracy is not None for row in rows)
    largest = max(row.size_mb for row in rows) or 1.0
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x = row.latency_ms[batch]["median"]
        y = 100 * row.accuracy if have_accuracy and row.accuracy is not None else row.size_mb
        axes.scatter([x], [y], s=80 + 1500 * row.size_mb / largest, alpha=0.55, edgecolors="black",
                     label=f"{row.name}: {row.size_mb:.1f} MB, {x:.1f} ms")
    legend = axes.legend(fontsize=8, loc="best", markerscale=1.0)
    for handle in legend.legend_handles:
        handle.set_sizes([60])
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel(f"latency, {batch.replace('_', ' ')} median (ms, log scale)")
    axes.set_ylabel("accuracy (%)" if have_accuracy else "size on disk (MB)")
    axes.set_title(f"{title}: marker area ~ size on disk")
    axes.margins(0.25)
    if have_accuracy:  # the margins may run past 100%; no tick should claim an accuracy above it
        bottom, top = axes.get_ylim()
        axes.set_yticks([tick for tick in axes.get_yticks() if bottom <= tick <= 100])
        axes.set_ylim(bottom, top)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_report(output_dir: str | os.PathLike, rows: Sequence[BenchmarkRow], *, title: str = "Export report",
                 meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write `report.json`, `report.md` and `report.png` into `output_dir`; returns their paths."""
    import onnxruntime

    if not rows:
        raise ValueError("write_report needs at least one benchmark row")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    details = rows[0].details
    onnx_details = next((row.details for row in rows if row.details.get("runtime") == "onnxruntime"), {})
    int8_details = next((row.details for row in rows if row.details.get("quantization_preset")), {})
    summary = summarize(rows)
    report = {
        "title": title,
        "threads": details.get("threads"),
        "sequence_length": details.get("sequence_length"),
        "warmup": details.get("warmup"),
        "runs": max(cell["runs"] for row in rows for cell in row.latency_ms.values()),
        "backend": onnx_details.get("backend"),
        "backend_reason": onnx_details.get("backend_reason"),
        "quantization_preset": int8_details.get("quantization_preset"),
        "cpu": _cpu_name(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                     "transformers": __import__("transformers").__version__},
        **(meta or {}),
        "rows": [row.to_dict() for row in rows],
        "summary": summary,
    }
    if onnx_details.get("int8_rejected"):
        report["int8_rejected"] = onnx_details["int8_rejected"]
    paths = {"json": output_dir / "report.json", "markdown": output_dir / "report.md", "plot": output_dir / "report.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(_markdown(rows, report))
    _plot(rows, paths["plot"], title)
    return paths
