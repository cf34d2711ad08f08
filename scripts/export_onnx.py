"""Export a saved student folder to ONNX (fp32 + dynamic int8) with a parity check, and optionally write the
latency / size / accuracy report against a teacher.

    python scripts/export_onnx.py --model_dir outputs/student
    python scripts/export_onnx.py --model_dir outputs/student --teacher outputs/teacher \
        --eval_file ../shared/data/sst2/validation.jsonl
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from hf_distill.export import BenchmarkSettings, ExportResult, benchmark_models, export_onnx, load_eval_jsonl, write_report  # noqa: E402


@dataclass
class ExportArguments:
    model_dir: str = field(metadata={"help": "Saved model folder (config.json, weights, tokenizer)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write; default <model_dir>/onnx."})
    task: Optional[str] = field(default=None, metadata={
        "help": "sequence-classification, token-classification, question-answering or text-generation; "
                "default: from config.architectures."})
    quantize: bool = field(default=True, metadata={"help": "Also write the dynamic int8 model_quantized.onnx."})
    per_channel: bool = field(default=False, metadata={"help": "Per-channel weight quantization."})
    backend: str = field(default="auto", metadata={"help": "auto (Optimum when it imports, else torch), optimum or torch."})
    opset: int = field(default=17, metadata={"help": "ONNX opset."})
    parity_atol: Optional[float] = field(default=None, metadata={"help": "fp32 max abs diff allowed (default 1e-4)."})
    int8_parity_atol: Optional[float] = field(default=None, metadata={"help": "int8 max abs diff allowed (default 1.0)."})
    int8_min_agreement: float = field(default=0.9, metadata={"help": "int8 argmax agreement required."})
    ort_format: bool = field(default=False, metadata={"help": "Also write .ort files for mobile runtimes."})
    teacher: Optional[str] = field(default=None, metadata={"help": "Teacher folder: adds the report."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "JSON lines with text and label, for accuracy."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N eval rows."})
    report: bool = field(default=False, metadata={"help": "Write the report even without --teacher."})
    report_dir: Optional[str] = field(default=None, metadata={"help": "Where the report goes; default <model_dir>."})


def run(args: ExportArguments, settings: BenchmarkSettings) -> ExportResult:
    """Export, then report when asked (`--teacher`, `--eval_file` or `--report`)."""
    result = export_onnx(args.model_dir, args.output_dir, task=args.task, quantize=args.quantize,
                         per_channel=args.per_channel, backend=args.backend, opset=args.opset,
                         parity_atol=args.parity_atol, int8_parity_atol=args.int8_parity_atol,
                         int8_min_agreement=args.int8_min_agreement, ort_format=args.ort_format)
    print(f"exported with {result.backend} ({result.backend_reason}) to {result.output_dir}")
    for precision, parity in result.parity.items():
        print(f"  {precision}: max abs diff {parity.max_abs_diff:.3g}, argmax agreement {parity.argmax_agreement:.1%}")
    if result.int8_size_bytes:
        print(f"  size: {result.fp32_size_bytes / 1e6:.2f} MB fp32 -> {result.int8_size_bytes / 1e6:.2f} MB int8 "
              f"({result.quantization_preset} preset)")
    if args.teacher or args.eval_file or args.report:
        texts, labels = load_eval_jsonl(args.eval_file, limit=args.max_eval_samples) if args.eval_file else (None, None)
        rows = benchmark_models(args.model_dir, teacher_dir=args.teacher, onnx_dir=result.output_dir,
                                eval_texts=texts, eval_labels=labels, **asdict(settings))
        paths = write_report(args.report_dir or args.model_dir, rows)
        print(paths["markdown"].read_text())
    return result


def main(argv: Sequence[str] | None = None) -> ExportResult:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_distill").setLevel(logging.INFO)  # not onnxruntime.quantization's per-node chatter
    args, settings = HfArgumentParser((ExportArguments, BenchmarkSettings)).parse_args_into_dataclasses(args=argv)
    return run(args, settings)


if __name__ == "__main__":
    main()
