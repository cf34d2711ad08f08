"""Benchmark (not a test): export a student to ONNX fp32 + int8, then time and score teacher fp32 PyTorch,
student fp32 PyTorch, student fp32 ONNX and student int8 ONNX; print the table and this project's deployment goals
(the goals live here, not in the report a user's run writes).

    python benchmarks/bench_export.py --teacher_dir runs/sst2/teacher --student_dir runs/sst2/student \
        --eval_file ../shared/data/sst2/validation.jsonl --output_dir bench_results/export_sst2
    python benchmarks/bench_export.py --synthetic --output_dir bench_results/export_synthetic

`--synthetic` first trains the demo's pair offline: a 4-layer BERT teacher (hidden 64) on the negation-sentiment
task made in code, and a 2-layer student built from its layers and distilled on noisy labels (position
embeddings for 128 tokens, so the timing runs at sequence length 128). It saves them under `<output_dir>`.

Writes `<output_dir>/onnx/`, `report.json`, `report.md`, `report.png` and `bench_export.json` (the export
result, parity, the report and the goals in one file). int8 is judged on the eval file (accuracy change).
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import HfArgumentParser  # noqa: E402

from hf_distill.export import BenchmarkSettings, benchmark_models, export_onnx, load_eval_jsonl, write_report  # noqa: E402


DEPLOYMENT_GOALS = (  # (report summary key, comparison, target, description) from the deployment issue
    ("int8_speedup_vs_student_batch_1", ">=", 2.0, "int8 ONNX at least 2x faster than the fp32 PyTorch student, batch 1"),
    ("int8_size_fraction_of_student", "<=", 0.30, "int8 ONNX at most 30% of the fp32 student's size"),
    ("int8_accuracy_delta_vs_student_points", ">=", -1.0, "int8 ONNX within 1 accuracy point of the fp32 student"),
    ("int8_speedup_vs_teacher_batch_1", ">=", 10.0, "int8 ONNX at least 10x faster than the fp32 teacher, batch 1"),
)


def check_goals(summary: dict[str, float]) -> list[dict]:
    """Each deployment goal with the measured value and whether it is met (goals not measured are left out)."""
    goals = []
    for key, comparison, target, description in DEPLOYMENT_GOALS:
        if key in summary:
            value = summary[key]
            met = value >= target if comparison == ">=" else value <= target
            goals.append({"goal": description, "key": key, "value": value, "target": f"{comparison} {target:g}",
                          "met": bool(met)})
    return goals


@dataclass
class BenchArguments:
    teacher_dir: Optional[str] = field(default=None, metadata={"help": "Teacher folder (save_pretrained layout)."})
    student_dir: Optional[str] = field(default=None, metadata={"help": "Student folder (save_pretrained layout)."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "JSON lines with text and label, for accuracy."})
    synthetic: bool = field(default=False, metadata={
        "help": "Train the demo's teacher and distilled student on the synthetic task first (replaces the three "
                "flags above)."})
    output_dir: str = field(default="bench_results/export", metadata={"help": "Where the ONNX files and report go."})
    backend: str = field(default="auto", metadata={"help": "auto, optimum or torch."})
    per_channel: bool = field(default=False, metadata={"help": "Per-channel weight quantization."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N eval rows."})
    int8_max_accuracy_drop: float = field(default=1.0, metadata={
        "help": "Accuracy points int8 may lose against PyTorch fp32 on the eval file and still be kept."})
    int8_min_agreement: float = field(default=0.9, metadata={
        "help": "Only used without an eval set (never here): int8 argmax agreement on sample texts."})
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic training."})


def train_synthetic_pair(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """(teacher folder, student folder, eval JSON lines) for the demo's synthetic task, trained here."""
    from transformers import (BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments,
                              set_seed)

    from hf_distill import DistillationArguments, DistillationTrainer, create_student
    from hf_distill.classification import load_text_classification, synthetic_setup, tokenize_splits

    set_seed(seed)
    tokenizer, demo_teacher = synthetic_setup()
    config = demo_teacher.config
    config.max_position_embeddings = 128  # the demo's sizes, with room for sequence length 128
    teacher = BertForSequenceClassification(config)
    clean, _ = load_text_classification("synthetic", seed=seed + 100, synthetic_label_noise=0.0,
                                        synthetic_train_size=2000)
    noisy, _ = load_text_classification("synthetic", seed=seed)
    clean_train = tokenize_splits(clean, tokenizer, 128)["train"].remove_columns("text")
    noisy_data = tokenize_splits(noisy, tokenizer, 128)
    common = dict(per_device_train_batch_size=32, warmup_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                  disable_tqdm=True, seed=seed, logging_steps=50)
    Trainer(teacher, TrainingArguments(output_dir=str(root / "teacher_training"), num_train_epochs=4,
                                       learning_rate=1e-3, **common),
            train_dataset=clean_train, processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer)).train()
    teacher.eval().save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")

    student_args = DistillationArguments(output_dir=str(root / "student"), num_train_epochs=3, learning_rate=2e-3,
                                         alpha=0.9, temperature=2.0, distillation_loss="forward_kl", **common)
    trainer = DistillationTrainer(create_student(teacher, num_layers=2), teacher, student_args,
                                  train_dataset=noisy_data["train"].remove_columns("text"), processing_class=tokenizer,
                                  data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    trainer.save_model()
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": row["text"], "label": row["label"]}) + "\n"
                                 for row in noisy["validation"]))
    return root / "teacher", root / "student", eval_file


def main(argv: Sequence[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_distill").setLevel(logging.INFO)  # not onnxruntime.quantization's per-node chatter
    args, settings = HfArgumentParser((BenchArguments, BenchmarkSettings)).parse_args_into_dataclasses(args=argv)
    output_dir = Path(args.output_dir)
    if args.synthetic:
        teacher_dir, student_dir, eval_file = train_synthetic_pair(output_dir, args.seed)
    elif args.teacher_dir and args.student_dir and args.eval_file:
        teacher_dir, student_dir, eval_file = Path(args.teacher_dir), Path(args.student_dir), Path(args.eval_file)
    else:
        raise SystemExit("give --teacher_dir, --student_dir and --eval_file, or --synthetic")
    texts, labels = load_eval_jsonl(eval_file, limit=args.max_eval_samples)
    result = export_onnx(student_dir, output_dir / "onnx", backend=args.backend, per_channel=args.per_channel,
                         eval_dataset=[{"text": text, "label": label} for text, label in zip(texts, labels)],
                         int8_max_accuracy_drop=args.int8_max_accuracy_drop, int8_min_agreement=args.int8_min_agreement)
    rows = benchmark_models(student_dir, teacher_dir=teacher_dir, onnx_dir=result.output_dir,
                            eval_texts=texts, eval_labels=labels, **asdict(settings))
    paths = write_report(output_dir, rows, title=f"Export benchmark: {student_dir.name}",
                         meta={"eval_examples": len(texts), "eval_file": eval_file.name})
    report = json.loads(paths["json"].read_text())
    goals = check_goals(report["summary"])
    combined = {"export": result.to_dict(), "report": report, "goals": goals}
    (output_dir / "bench_export.json").write_text(json.dumps(combined, indent=2) + "\n")
    print(paths["markdown"].read_text())
    for goal in goals:
        print(f"- {'met' if goal['met'] else 'NOT met'}: {goal['goal']} (measured {goal['value']:.2f}, "
              f"target {goal['target']})")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']} and {output_dir / 'bench_export.json'}")
    return combined


if __name__ == "__main__":
    main()
