"""Export a saved student folder to ONNX (fp32 + dynamic int8) with a parity check, and optionally write the
latency / size / accuracy report against a teacher.

    python scripts/export_onnx.py --model_dir outputs/student
    python scripts/export_onnx.py --model_dir outputs/student --teacher outputs/teacher \
        --eval_file ../shared/data/sst2/validation.jsonl

With `--eval_file`, int8 is judged by its accuracy change against PyTorch fp32 on those rows
(`--int8_max_accuracy_drop` points); without it, by argmax agreement on sample texts (`--int8_min_agreement`).
A rejected int8 file is moved to `<output_dir>/rejected/`; the fp32 export is kept either way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from hf_distill.export import BenchmarkSettings, ExportResult, benchmark_models, export_onnx, write_report  # noqa: E402
from hf_distill.export.parity import INT8_MAX_ACCURACY_DROP, INT8_MIN_ARGMAX_AGREEMENT, INT8_MIN_COSINE  # noqa: E402


@dataclass
class ExportArguments:
    model_dir: str = field(metadata={"help": "Saved model folder (config.json, weights, tokenizer)."})
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where to write; default <model_dir>/onnx."})
    task: Optional[str] = field(default=None, metadata={
        "help": "sequence-classification, token-classification, question-answering, causal-lm (alias text-generation), "
                "feature-extraction or sentence-embedding (last_hidden_state; pooled by load_onnx_pipeline); "
                "default: from config.architectures."})
    quantize: bool = field(default=True, metadata={"help": "Also write the dynamic int8 model_quantized.onnx."})
    per_channel: bool = field(default=False, metadata={"help": "Per-channel weight quantization."})
    backend: str = field(default="auto", metadata={"help": "auto (Optimum when it imports, else torch), optimum or torch."})
    opset: int = field(default=17, metadata={"help": "ONNX opset."})
    parity_atol: Optional[float] = field(default=None, metadata={
        "help": "fp32 max abs diff allowed (default 1e-4 x the largest PyTorch logit)."})
    int8_parity_atol: Optional[float] = field(default=None, metadata={
        "help": "int8 max abs diff allowed (default: 0.5 x the largest PyTorch logit on sample texts; with "
                "--eval_file, judged only when given)."})
    int8_max_accuracy_drop: float = field(default=INT8_MAX_ACCURACY_DROP, metadata={
        "help": "With --eval_file: accuracy points int8 may lose against PyTorch fp32 and still be kept."})
    int8_min_agreement: float = field(default=INT8_MIN_ARGMAX_AGREEMENT, metadata={
        "help": "Without --eval_file: int8 argmax agreement with PyTorch required on the sample texts."})
    int8_min_cosine: float = field(default=INT8_MIN_COSINE, metadata={
        "help": "Feature extraction / sentence embeddings: mean cosine of int8 sentence embeddings to PyTorch fp32's "
                "required to keep int8 (per-channel quantization usually needs it: --per_channel true)."})
    ort_format: bool = field(default=False, metadata={"help": "Also write .ort files for mobile runtimes."})
    teacher: Optional[str] = field(default=None, metadata={"help": "Teacher folder: adds the report."})
    eval_file: Optional[str] = field(default=None, metadata={
        "help": "JSON lines with text and label (text only for text generation): judges int8 and gives the "
                "report's accuracy."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N eval rows."})
    report: bool = field(default=False, metadata={"help": "Write the report even without --teacher."})
    report_dir: Optional[str] = field(default=None, metadata={"help": "Where the report goes; default <model_dir>."})


def read_eval_rows(path: str, limit: int | None = None) -> list[dict]:
    """The rows of a JSON-lines file (the first `limit` when given)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not valid JSON ({error}); --eval_file takes JSON lines") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def print_result(result: ExportResult) -> None:
    print(f"exported with {result.backend} ({result.backend_reason}) to {result.output_dir}")
    for precision, parity in result.parity.items():
        accuracy = (f", accuracy {100 * parity.accuracy:.2f}% (PyTorch fp32 {100 * parity.reference_accuracy:.2f}%)"
                    if parity.accuracy is not None else "")
        print(f"  {precision} on {parity.inputs}: max abs diff {parity.max_abs_diff:.3g} (logit scale "
              f"{parity.logit_scale:.3g}), argmax agreement {parity.argmax_agreement:.1%}{accuracy}")
        if parity.mean_cosine is not None:
            print(f"  {precision}: mean cosine of sentence embeddings to PyTorch fp32 {parity.mean_cosine:.6f}")
    if result.int8_size_bytes:
        print(f"  size: {result.fp32_size_bytes / 1e6:.2f} MB fp32 -> {result.int8_size_bytes / 1e6:.2f} MB int8 "
              f"({result.quantization_preset} preset)")
    if result.rejected_int8_path:
        print(f"  int8 rejected ({'; '.join(result.parity['int8'].problems)}): moved to {result.rejected_int8_path}")


def run(args: ExportArguments, settings: BenchmarkSettings) -> ExportResult:
    """Export (int8 judged on `--eval_file` when given), then report when asked (`--teacher`, `--eval_file` or
    `--report`)."""
    rows = read_eval_rows(args.eval_file, args.max_eval_samples) if args.eval_file else None
    result = export_onnx(args.model_dir, args.output_dir, task=args.task, quantize=args.quantize,
                         per_channel=args.per_channel, backend=args.backend, opset=args.opset, eval_dataset=rows,
                         int8_max_accuracy_drop=args.int8_max_accuracy_drop, parity_atol=args.parity_atol,
                         int8_parity_atol=args.int8_parity_atol, int8_min_agreement=args.int8_min_agreement,
                         int8_min_cosine=args.int8_min_cosine, ort_format=args.ort_format)
    print_result(result)
    if args.teacher or args.eval_file or args.report:
        labelled = bool(rows) and all("label" in row for row in rows)
        texts, labels = ([row["text"] for row in rows], [row["label"] for row in rows]) if labelled else (None, None)
        report_rows = benchmark_models(args.model_dir, teacher_dir=args.teacher, onnx_dir=result.output_dir,
                                       eval_texts=texts, eval_labels=labels, **asdict(settings))
        paths = write_report(args.report_dir or args.model_dir, report_rows)
        print(paths["markdown"].read_text())
    return result


def main(argv: Sequence[str] | None = None) -> ExportResult:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_distill").setLevel(logging.INFO)  # not onnxruntime.quantization's per-node chatter
    args, settings = HfArgumentParser((ExportArguments, BenchmarkSettings)).parse_args_into_dataclasses(args=argv)
    return run(args, settings)


if __name__ == "__main__":
    main()
