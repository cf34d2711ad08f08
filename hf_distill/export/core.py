"""`export_onnx`: a saved student folder to ONNX fp32 and dynamic int8, checked against PyTorch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..inference import (EXPORT_INFO_FILE_NAME, FP32_FILE_NAME, INT8_FILE_NAME, REJECTED_FOLDER_NAME, detect_task,
                         load_tokenizer, resolve_task)
from . import optimum_backend, parity, quantization, torch_backend
from .evaluation import EvalSet, build_eval_set

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "optimum", "torch")
# Files copied next to the ONNX model so that tokenizers, configs and ORTModelFor* load the folder.
COPIED_FILE_NAMES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
    "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)


@dataclass
class ExportResult:
    """What `export_onnx` wrote and measured."""

    output_dir: Path
    model_path: Path
    quantized_path: Path | None
    task: str
    backend: str  # "optimum" or "torch"
    backend_reason: str
    opset: int
    with_past: bool
    external_data: bool
    quantization_preset: str | None
    per_channel: bool
    fp32_size_bytes: int
    int8_size_bytes: int | None
    parity: dict[str, parity.ParityResult] = field(default_factory=dict)
    rejected_int8_path: Path | None = None  # where a rejected int8 file was moved (never loaded by default)
    ort_paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    pooling: dict[str, Any] | None = None  # feature extraction: the sentence-transformers pooling of the model folder

    @property
    def int8_accepted(self) -> bool:
        """True when `model_quantized.onnx` was written and passed its check (False too when not quantized)."""
        return self.quantized_path is not None and "int8" in self.parity and self.parity["int8"].passed

    @property
    def size_ratio(self) -> float | None:
        """int8 size / fp32 size on disk."""
        return self.int8_size_bytes / self.fp32_size_bytes if self.int8_size_bytes else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; paths are given relative to `output_dir` (no absolute local paths)."""
        data = asdict(self)
        data["output_dir"] = self.output_dir.name
        data["model_path"] = self.model_path.name
        data["quantized_path"] = self.quantized_path.name if self.quantized_path else None
        data["rejected_int8_path"] = (self.rejected_int8_path.relative_to(self.output_dir).as_posix()
                                      if self.rejected_int8_path else None)
        data["int8_accepted"] = self.int8_accepted
        data["ort_paths"] = [path.name for path in self.ort_paths]
        data["parity"] = {name: result.to_dict() for name, result in self.parity.items()}
        data["size_ratio"] = self.size_ratio
        return data


def choose_backend(backend: str) -> tuple[str, str]:
    """(backend to use, why) for `backend` in auto / optimum / torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", "requested backend='torch'"
    error = optimum_backend.optimum_import_error()
    if backend == "optimum":
        if error:
            raise ImportError(f"backend='optimum' was requested but optimum-onnx does not import here ({error}). "
                              f"To fix: {optimum_backend.OPTIMUM_INSTALL_HINT}.")
        return "optimum", "requested backend='optimum'"
    if error:
        import transformers

        return "torch", (f"optimum-onnx does not import with transformers {transformers.__version__} ({error}); "
                         "using torch.onnx.export + onnxruntime.quantization")
    return "optimum", "optimum-onnx imports with the installed transformers"


def copy_model_files(model_dir: Path, output_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files from `model_dir` into `output_dir`."""
    copied = []
    for name in COPIED_FILE_NAMES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
            copied.append(name)
    return copied


def _load_config(model_dir: Path) -> Any:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir}: export_onnx expects a folder written by save_pretrained "
            "(config.json, weights and, ideally, the tokenizer), such as a DistillationTrainer output_dir"
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _is_export_file(path: Path) -> bool:
    return path.is_file() and (path.name.startswith(("model.", "model_quantized.")) or path.name == EXPORT_INFO_FILE_NAME)


def _remove_stale_outputs(output_dir: Path) -> None:
    """Earlier export files (a rejected int8 file included), so that a failed export never leaves an old model."""
    rejected = output_dir / REJECTED_FOLDER_NAME
    for folder in (output_dir, rejected) if rejected.is_dir() else (output_dir,):
        for path in folder.iterdir():
            if _is_export_file(path):
                path.unlink()
    if rejected.is_dir() and not any(rejected.iterdir()):
        rejected.rmdir()


def set_aside_int8(output_dir: Path) -> Path:
    """Move `model_quantized.onnx` (and its external data) into `<output_dir>/rejected/`, where
    `load_onnx_pipeline` does not look; returns the new path of the model file."""
    rejected = output_dir / REJECTED_FOLDER_NAME
    rejected.mkdir(exist_ok=True)
    for path in output_dir.glob(INT8_FILE_NAME.split(".")[0] + ".*"):
        path.replace(rejected / path.name)
    return rejected / INT8_FILE_NAME


def convert_to_ort_format(output_dir: Path, onnx_paths: Sequence[Path]) -> list[Path]:
    """ORT-format copies (`.ort`) of `onnx_paths` for mobile runtimes, beside them."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    written = []
    for onnx_path in onnx_paths:
        convert_onnx_models_to_ort(onnx_path, output_dir=output_dir, optimization_styles=[OptimizationStyle.Fixed])
        written.append(output_dir / (onnx_path.stem + ".ort"))
    missing = [path for path in written if not path.is_file()]
    if missing:
        raise RuntimeError(f"ORT-format conversion did not write {[path.name for path in missing]} in {output_dir}")
    return written


@dataclass
class _Plan:
    """The resolved inputs of one export."""

    model_dir: Path
    output_dir: Path
    config: Any
    task: str
    backend: str
    backend_reason: str
    pooling: dict[str, Any] | None = None


def _plan(model_dir: str | os.PathLike, output_dir: str | os.PathLike | None, task: str | None, backend: str) -> _Plan:
    model_dir = Path(model_dir)
    config = _load_config(model_dir)
    task = resolve_task(task) if task else detect_task(config)
    chosen, reason = choose_backend(backend)
    logger.info("ONNX export backend: %s (%s)", chosen, reason)
    output_dir = Path(output_dir) if output_dir is not None else model_dir / "onnx"
    return _Plan(model_dir, output_dir, config, task, chosen, reason, _folder_pooling(model_dir, task))


def _folder_pooling(model_dir: Path, task: str) -> dict[str, Any] | None:
    """The pooling a sentence-embedding student's folder records (sentence-transformers files), else None."""
    if task != "feature-extraction":
        return None
    from ..sentence_embeddings import read_pooling

    try:
        return read_pooling(model_dir).to_dict()
    except ValueError:
        return None


def _prepare_eval_set(plan: _Plan, eval_dataset: Any, criteria: parity.ParityCriteria) -> EvalSet | None:
    if eval_dataset is None:
        return None
    eval_set = build_eval_set(eval_dataset, plan.task, load_tokenizer(plan.model_dir, for_batching=True), plan.config)
    if plan.task == "sequence-classification" and 100 / eval_set.num_rows > criteria.int8_max_accuracy_drop:
        logger.warning("one changed prediction out of %d eval rows moves accuracy by %.2f points, more than "
                       "int8_max_accuracy_drop %g: a single flip rejects int8 (give more rows)",
                       eval_set.num_rows, 100 / eval_set.num_rows, criteria.int8_max_accuracy_drop)
    return eval_set


def _export_fp32(plan: _Plan, opset: int, per_channel: bool) -> tuple[ExportResult, dict[str, Any]]:
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_outputs(plan.output_dir)
    model_path = plan.output_dir / FP32_FILE_NAME
    if plan.backend == "optimum":
        facts = optimum_backend.export_with_optimum(plan.model_dir, plan.output_dir, plan.task, opset)
    else:
        facts = torch_backend.export_with_torch(plan.model_dir, model_path, plan.task, opset)
    copy_model_files(plan.model_dir, plan.output_dir)
    logger.info("exported %s (%s, opset %d, with past: %s, external data: %s)", model_path, plan.task, opset,
                facts["with_past"], facts["external_data"])
    result = ExportResult(
        output_dir=plan.output_dir, model_path=model_path, quantized_path=None, task=plan.task, backend=plan.backend,
        backend_reason=plan.backend_reason, opset=opset, with_past=facts["with_past"],
        external_data=facts["external_data"], quantization_preset=None, per_channel=per_channel,
        fp32_size_bytes=quantization.onnx_size_bytes(model_path), int8_size_bytes=None, pooling=plan.pooling,
    )
    return result, facts


def _quantize(result: ExportResult, facts: dict[str, Any]) -> None:
    preset = quantization.detect_quantization_preset()
    quantized_path = result.output_dir / INT8_FILE_NAME
    if result.backend == "optimum":
        optimum_backend.quantize_with_optimum(result.output_dir, preset, result.per_channel, facts["external_data"])
    else:
        quantization.quantize_with_onnxruntime(result.model_path, quantized_path, preset, result.per_channel,
                                               facts["external_data"])
    result.quantized_path, result.quantization_preset = quantized_path, preset
    result.int8_size_bytes = quantization.onnx_size_bytes(quantized_path)
    logger.info("int8 (%s preset, per-channel %s): %.2f MB -> %.2f MB", preset, result.per_channel,
                result.fp32_size_bytes / 1e6, result.int8_size_bytes / 1e6)


def _check_parity(result: ExportResult, plan: _Plan, criteria: parity.ParityCriteria, eval_set: EvalSet | None,
                  sample_texts: Sequence[str] | None) -> None:
    """Compare every written file with PyTorch and record the verdicts in `result.parity`."""
    reference = torch_backend.load_torch_model(plan.model_dir, plan.task)
    paths = {"fp32": result.model_path, **({"int8": result.quantized_path} if result.quantized_path else {})}
    if eval_set is not None:
        tallies, source = parity.tally_eval_set(reference, paths, plan.task, eval_set, plan.pooling), eval_set.source
    else:
        inputs, source = parity.sample_inputs(plan.model_dir, plan.config, sample_texts)
        tallies = {name: parity.tally_samples(reference, path, plan.task, inputs, plan.pooling)
                   for name, path in paths.items()}
    for precision, tally in tallies.items():
        verdict = parity.judge(tally, precision, criteria, source, on_eval_set=eval_set is not None)
        result.parity[precision] = verdict
        accuracy = (f", accuracy {100 * verdict.accuracy:.2f}% (PyTorch fp32 {100 * verdict.reference_accuracy:.2f}%)"
                    if verdict.accuracy is not None else "")
        logger.info("%s parity on %s: max abs diff %.3g (logit scale %.3g), argmax agreement %.1f%%%s", precision,
                    source, verdict.max_abs_diff, verdict.logit_scale, 100 * verdict.argmax_agreement, accuracy)


def _apply_verdicts(result: ExportResult) -> None:
    """Set a failed int8 file aside (the fp32 export and every other file stay), write `export_info.json`, and
    raise `ParityError` when fp32 parity failed (then the export itself is wrong)."""
    fp32, int8 = result.parity["fp32"], result.parity.get("int8")
    if result.quantized_path is not None and not (fp32.passed and int8 is not None and int8.passed):
        result.rejected_int8_path, result.quantized_path = set_aside_int8(result.output_dir), None
        reasons = "; ".join(int8.problems) if int8 is not None and int8.problems else "the fp32 export failed parity"
        logger.warning("int8 model rejected (%s): moved to %s, where load_onnx_pipeline does not load it%s", reasons,
                       result.rejected_int8_path, "; the fp32 model.onnx is kept and usable" if fp32.passed else "")
    _write_export_info(result)
    parity.raise_on_failure(fp32, result.model_path)


def export_onnx(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    quantize: bool = True,
    per_channel: bool = False,
    backend: str = "auto",
    opset: int = 17,
    eval_dataset: Any = None,
    int8_max_accuracy_drop: float = parity.INT8_MAX_ACCURACY_DROP,
    parity_atol: float | None = None,
    int8_parity_atol: float | None = None,
    int8_min_agreement: float = parity.INT8_MIN_ARGMAX_AGREEMENT,
    int8_min_cosine: float = parity.INT8_MIN_COSINE,
    sample_texts: Sequence[str] | None = None,
    ort_format: bool = False,
) -> ExportResult:
    """Export the saved model in `model_dir` to `output_dir` (default `<model_dir>/onnx/`).

    Writes `model.onnx` (fp32) and, with `quantize`, `model_quantized.onnx` (dynamic int8, preset from this
    CPU), plus config and tokenizer files, so the folder loads with `hf_distill.inference.load_onnx_pipeline`
    and with Optimum's `ORTModelFor*`. `backend="auto"` uses Optimum when it imports, else `torch.onnx.export`
    + `onnxruntime.quantization`.

    Each file is compared with PyTorch fp32 on `eval_dataset` (a `datasets.Dataset` or list of dicts; columns in
    `hf_distill.export.evaluation`) when given, else on `sample_texts` (or built-in sentences). Max abs diff
    tolerances default to a fraction of the logit scale (`parity_atol` / `int8_parity_atol` set absolute ones).
    int8 is accepted when its accuracy on the eval set is at most `int8_max_accuracy_drop` points below
    PyTorch's (without an eval set: argmax agreement >= `int8_min_agreement`). A headless or sentence-embedding
    model (task `feature-extraction`, alias `sentence-embedding`) exports `last_hidden_state`; its int8 file is
    accepted when the mean cosine of its sentence embeddings to PyTorch fp32's is >= `int8_min_cosine`, and the
    folder's sentence-transformers pooling is recorded in `export_info.json` for `load_onnx_pipeline`.
    A rejected int8 file is moved to
    `<output_dir>/rejected/`; the verdict is `result.int8_accepted` and `result.parity["int8"]`, and nothing
    else is removed. `ParityError` is raised only when fp32 parity fails.
    """
    started = time.perf_counter()
    criteria = parity.ParityCriteria(parity_atol, int8_parity_atol, int8_min_agreement, int8_max_accuracy_drop,
                                     int8_min_cosine)
    plan = _plan(model_dir, output_dir, task, backend)
    eval_set = _prepare_eval_set(plan, eval_dataset, criteria)
    result, facts = _export_fp32(plan, opset, per_channel)
    if quantize:
        _quantize(result, facts)
    _check_parity(result, plan, criteria, eval_set, sample_texts)
    _apply_verdicts(result)
    if ort_format:
        onnx_paths = [result.model_path] + ([result.quantized_path] if result.quantized_path else [])
        result.ort_paths = convert_to_ort_format(result.output_dir, onnx_paths)
    result.seconds = time.perf_counter() - started
    _write_export_info(result)
    return result


def _write_export_info(result: ExportResult) -> None:
    (result.output_dir / EXPORT_INFO_FILE_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
