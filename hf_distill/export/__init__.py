"""ONNX export of a saved student: fp32 + dynamic int8, parity against PyTorch, and a latency/size/accuracy report.

`export_onnx` uses Optimum (`optimum-onnx`) where it imports with the installed transformers, otherwise
`torch.onnx.export` + `onnxruntime.quantization`; both write the folder layout Optimum's `ORTModelFor*` load.
"""

from ..inference import SUPPORTED_TASKS, UnsupportedTaskError, detect_task, load_onnx_pipeline
from .core import BACKENDS, ExportResult, choose_backend, export_onnx
from .parity import ParityError, ParityResult
from .quantization import detect_quantization_preset
from .report import BenchmarkRow, BenchmarkSettings, benchmark_models, load_eval_jsonl, write_report

__all__ = [
    "BACKENDS",
    "SUPPORTED_TASKS",
    "BenchmarkRow",
    "BenchmarkSettings",
    "ExportResult",
    "ParityError",
    "ParityResult",
    "UnsupportedTaskError",
    "benchmark_models",
    "choose_backend",
    "detect_quantization_preset",
    "detect_task",
    "export_onnx",
    "load_eval_jsonl",
    "load_onnx_pipeline",
    "write_report",
]
