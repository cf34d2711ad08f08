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

from ..inference import EXPORT_INFO_FILE_NAME, FP32_FILE_NAME, INT8_FILE_NAME, detect_task, resolve_task
from . import optimum_backend, parity, quantization, torch_backend

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
    ort_paths: list[Path] = field(default_factory=list)
    seconds: float = 0.0

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


def _remove_stale_outputs(output_dir: Path) -> None:
    """Earlier export files, so that a failed export never leaves an old model behind."""
    for path in output_dir.iterdir():
        if path.is_file() and (path.name.startswith(("model.", "model_quantized.")) or path.name == EXPORT_INFO_FILE_NAME):
            path.unlink()


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


def export_onnx(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    task: str | None = None,
    quantize: bool = True,
    per_channel: bool = False,
    backend: str = "auto",
    opset: int = 17,
    parity_atol: float | None = None,
    int8_parity_atol: float | None = None,
    int8_min_agreement: float = parity.INT8_MIN_ARGMAX_AGREEMENT,
    sample_texts: Sequence[str] | None = None,
    ort_format: bool = False,
) -> ExportResult:
    """Export the saved model in `model_dir` to `output_dir` (default `<model_dir>/onnx/`).

    Writes `model.onnx` (fp32) and, with `quantize`, `model_quantized.onnx` (dynamic int8, preset from this
    CPU), plus config and tokenizer files, so the folder loads with `hf_distill.inference.load_onnx_pipeline`
    and with Optimum's `ORTModelFor*` (`file_name="model_quantized.onnx"` for int8). `backend="auto"` uses
    Optimum when it imports, else `torch.onnx.export` + `onnxruntime.quantization`. Each file is compared
    with PyTorch on a sample batch; `ParityError` is raised past `parity_atol` (fp32) or past
    `int8_parity_atol` / below `int8_min_agreement` argmax agreement (int8).
    """
    started = time.perf_counter()
    model_dir = Path(model_dir)
    config = _load_config(model_dir)
    task = resolve_task(task) if task else detect_task(config)
    chosen, reason = choose_backend(backend)
    logger.info("ONNX export backend: %s (%s)", chosen, reason)
    output_dir = Path(output_dir) if output_dir is not None else model_dir / "onnx"
    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_outputs(output_dir)
    model_path = output_dir / FP32_FILE_NAME

    if chosen == "optimum":
        facts = optimum_backend.export_with_optimum(model_dir, output_dir, task, opset)
    else:
        facts = torch_backend.export_with_torch(model_dir, model_path, task, opset)
    copy_model_files(model_dir, output_dir)
    logger.info("exported %s (%s, opset %d, with past: %s, external data: %s)", model_path, task, opset,
                facts["with_past"], facts["external_data"])

    reference = torch_backend.load_torch_model(model_dir, task)
    inputs, source = parity.sample_inputs(model_dir, config, sample_texts)
    result = ExportResult(
        output_dir=output_dir, model_path=model_path, quantized_path=None, task=task, backend=chosen,
        backend_reason=reason, opset=opset, with_past=facts["with_past"], external_data=facts["external_data"],
        quantization_preset=None, per_channel=per_channel, fp32_size_bytes=quantization.onnx_size_bytes(model_path),
        int8_size_bytes=None,
    )
    fp32_atol = parity_atol if parity_atol is not None else parity.default_atol(task, "fp32")
    result.parity["fp32"] = parity.measure_parity(reference, model_path, task, inputs, "fp32", fp32_atol, 1.0, source)
    logger.info("fp32 parity: max abs diff %.3g, argmax agreement %.1f%%", result.parity["fp32"].max_abs_diff,
                100 * result.parity["fp32"].argmax_agreement)
    _write_export_info(result)
    parity.raise_on_failure(result.parity["fp32"], model_path)

    if quantize:
        preset = quantization.detect_quantization_preset()
        quantized_path = output_dir / INT8_FILE_NAME
        if chosen == "optimum":
            optimum_backend.quantize_with_optimum(output_dir, preset, per_channel, facts["external_data"])
        else:
            quantization.quantize_with_onnxruntime(model_path, quantized_path, preset, per_channel,
                                                   facts["external_data"])
        result.quantized_path, result.quantization_preset = quantized_path, preset
        result.int8_size_bytes = quantization.onnx_size_bytes(quantized_path)
        int8_atol = int8_parity_atol if int8_parity_atol is not None else parity.default_atol(task, "int8")
        result.parity["int8"] = parity.measure_parity(reference, quantized_path, task, inputs, "int8", int8_atol,
                                                      int8_min_agreement, source)
        logger.info("int8 (%s preset, per-channel %s): %.2f MB -> %.2f MB; max abs diff %.3g, argmax agreement "
                    "%.1f%%", preset, per_channel, result.fp32_size_bytes / 1e6, result.int8_size_bytes / 1e6,
                    result.parity["int8"].max_abs_diff, 100 * result.parity["int8"].argmax_agreement)
        _write_export_info(result)
        parity.raise_on_failure(result.parity["int8"], quantized_path)

    if ort_format:
        onnx_paths = [model_path] + ([result.quantized_path] if result.quantized_path else [])
        result.ort_paths = convert_to_ort_format(output_dir, onnx_paths)
    result.seconds = time.perf_counter() - started
    _write_export_info(result)
    return result


def _write_export_info(result: ExportResult) -> None:
    (result.output_dir / EXPORT_INFO_FILE_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
