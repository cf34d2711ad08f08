"""ONNX export of a saved student: fp32 + dynamic int8, parity against PyTorch, and a latency/size/accuracy report.

int8 is judged on an evaluation set when one is given (accuracy change against PyTorch fp32), and a rejected
int8 file is set aside in `onnx/rejected/` while the fp32 export and every other file are kept.
`export_onnx` uses Optimum (`optimum-onnx`) where it imports with the installed transformers, otherwise
`torch.onnx.export` + `onnxruntime.quantization`; both write the folder layout Optimum's `ORTModelFor*` load.
"""

from ..inference import SUPPORTED_TASKS, RejectedModelError, UnsupportedTaskError, detect_task, load_onnx_pipeline
from .core import BACKENDS, ExportResult, choose_backend, export_onnx
from .evaluation import build_eval_set
from .parity import ParityCriteria, ParityError, ParityResult
from .quantization import detect_quantization_preset
from .report import BenchmarkRow, BenchmarkSettings, benchmark_models, load_eval_jsonl, write_report

__all__ = [
    "BACKENDS",
    "SUPPORTED_TASKS",
    "BenchmarkRow",
    "BenchmarkSettings",
    "ExportResult",
    "ParityCriteria",
    "ParityError",
    "ParityResult",
    "RejectedModelError",
    "UnsupportedTaskError",
    "benchmark_models",
    "build_eval_set",
    "choose_backend",
    "detect_quantization_preset",
    "detect_task",
    "export_onnx",
    "load_eval_jsonl",
    "load_onnx_pipeline",
    "write_report",
]
