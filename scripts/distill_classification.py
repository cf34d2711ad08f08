#!/usr/bin/env python
"""Distil a text-classification teacher into a smaller student, evaluate both, report size and speed.

Offline default (``make demo``): a negation-sentiment task made in code. A 4-layer BERT teacher is
trained on it, a 2-layer student is built from the teacher's layers and distilled on noisy labels, and
the same student trained on hard labels only is the baseline.

    python scripts/distill_classification.py --output_dir runs/demo
    python scripts/distill_classification.py --teacher textattack/bert-base-uncased-SST-2 \\
        --dataset glue_sst2_folder --output_dir runs/sst2 --alpha 0.9 --temperature 2
    accelerate launch scripts/distill_classification.py --recipe recipes/distilbert.yaml --output_dir runs/x

Every `DistillationArguments` / `TrainingArguments` field is a flag; ``--recipe file.{json,yaml}`` sets
defaults that flags on the command line override.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_distill import DistillationArguments, DistillationTrainer, classification_metrics, create_student  # noqa: E402
from hf_distill.classification import (  # noqa: E402
    accuracy_on,
    count_parameters,
    load_text_classification,
    load_tokenizer,
    markdown_table,
    measure_latency,
    synthetic_setup,
    tokenize_splits,
)

logger = logging.getLogger("distill_classification")


@dataclass
class ScriptArguments:
    """What to distil: models, data and the extras of this script."""

    teacher: Optional[str] = field(
        default=None, metadata={"help": "Teacher: a Hub id or local folder. Default: train one on the synthetic task."}
    )
    student: Optional[str] = field(
        default=None,
        metadata={"help": "Student: a Hub id or local folder. Default: built from the teacher's layers (--student_layers)."},
    )
    student_layers: int = field(default=2, metadata={"help": "Layers of a student built from the teacher."})
    tokenizer: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer: Hub id, folder or a WordPiece vocab.txt. Default: the teacher's."}
    )
    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic', a folder of {train,validation,test}.jsonl, or a Hub dataset id."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the integer label."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per example."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training rows."})
    teacher_train_epochs: float = field(
        default=0.0,
        metadata={"help": "Fine-tune the teacher on the training split first (epochs). The synthetic task uses 4."},
    )
    teacher_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of that teacher fine-tuning."})
    compare_baseline: bool = field(
        default=True, metadata={"help": "Also train the same student on hard labels only, for the same steps."}
    )
    export_onnx: bool = field(default=True, metadata={"help": "Export the student to ONNX fp32 + int8 at the end."})
    recipe: Optional[str] = field(
        default=None, metadata={"help": "A JSON or YAML file of argument values; command-line flags override it."}
    )


def parse_arguments(argv: list[str]) -> tuple[ScriptArguments, DistillationArguments]:
    parser = HfArgumentParser((ScriptArguments, DistillationArguments))
    recipe_defaults = {}
    if "--recipe" in argv:
        path = Path(argv[argv.index("--recipe") + 1])
        text = path.read_text()
        recipe_defaults = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        parser.set_defaults(**recipe_defaults)
    if "--output_dir" not in argv and "output_dir" not in recipe_defaults:
        argv = argv + ["--output_dir", "runs/distill_classification"]
    script_args, distill_args = parser.parse_args_into_dataclasses(args=argv)
    return script_args, distill_args


def train_teacher(teacher, tokenizer, data, args: DistillationArguments, epochs: float, learning_rate: float) -> None:
    """Fine-tune the teacher with the stock Trainer (its own output folder, nothing saved)."""
    teacher_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "teacher_training"), num_train_epochs=epochs,
        per_device_train_batch_size=args.per_device_train_batch_size, learning_rate=learning_rate, warmup_steps=10,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
        logging_steps=args.logging_steps,
    )
    Trainer(teacher, teacher_args, train_dataset=data, processing_class=tokenizer).train()


def main(argv: Optional[list[str]] = None) -> dict:
    script, args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    synthetic = script.dataset == "synthetic"

    splits, label_names = load_text_classification(
        script.dataset, text_column=script.text_column, label_column=script.label_column, seed=args.seed
    )
    if script.max_train_samples:
        splits["train"] = splits["train"].select(range(min(script.max_train_samples, len(splits["train"]))))
    if synthetic and script.teacher is None:
        tokenizer, teacher = synthetic_setup()
        teacher_epochs = script.teacher_train_epochs or 4.0
    else:
        if script.teacher is None:
            raise ValueError("--teacher is required unless --dataset synthetic.")
        tokenizer = load_tokenizer(script.tokenizer or script.teacher)
        teacher = AutoModelForSequenceClassification.from_pretrained(
            script.teacher, num_labels=len(label_names), trust_remote_code=args.teacher_trust_remote_code,
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        )
        teacher_epochs = script.teacher_train_epochs
    data = tokenize_splits(splits, tokenizer, script.max_length)
    train = data["train"].remove_columns("text")
    if teacher_epochs:
        # The teacher learns from clean labels where there are some (synthetic: a separate clean split).
        teacher_data = train
        if synthetic:
            clean, _ = load_text_classification(
                "synthetic", seed=args.seed + 100, synthetic_label_noise=0.0, synthetic_train_size=2000
            )
            teacher_data = tokenize_splits(clean, tokenizer, script.max_length)["train"].remove_columns("text")
        train_teacher(teacher, tokenizer, teacher_data, args, teacher_epochs, script.teacher_learning_rate)

    def build_student():
        set_seed(args.seed)
        if script.student:
            return AutoModelForSequenceClassification.from_pretrained(
                script.student, num_labels=len(label_names), id2label=teacher.config.id2label,
                label2id=teacher.config.label2id,
            )
        return create_student(teacher, num_layers=script.student_layers)

    collator = DataCollatorWithPadding(tokenizer)
    common = dict(train_dataset=train, eval_dataset=data["validation"].remove_columns("text"),
                  processing_class=tokenizer, data_collator=collator, compute_metrics=classification_metrics)
    student = build_student()
    trainer = DistillationTrainer(student, teacher, args, **common)
    trainer.train()
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)

    rows = []
    texts = data["validation"]["text"][:64]
    evaluation_splits = {"validation": data["validation"]}
    if "test" in data:
        evaluation_splits["test"] = data["test"]

    def describe(name: str, model: torch.nn.Module) -> dict:
        row = {"model": name, "parameters": count_parameters(model)}
        for split, dataset in evaluation_splits.items():
            row[f"{split} accuracy"] = accuracy_on(model, dataset, tokenizer, max_length=script.max_length)
        latency = measure_latency(model, tokenizer, texts, max_length=script.max_length)
        row["latency b1 (ms)"], row["latency b32 (ms)"] = latency["batch_1"]["median"], latency["batch_32"]["median"]
        return row

    rows.append(describe("teacher", teacher))
    rows.append(describe(f"student ({args.distillation_loss}, alpha={args.alpha}, T={args.temperature})", trainer.model))
    if script.compare_baseline:
        baseline_args = dataclasses.replace(args, alpha=0.0, output_dir=str(Path(args.output_dir) / "baseline"))
        baseline = DistillationTrainer(build_student(), teacher, baseline_args, **common)
        baseline.train()
        rows.append(describe("student, hard labels only", baseline.model))
    columns = ["model", "parameters"] + [f"{s} accuracy" for s in evaluation_splits] + ["latency b1 (ms)", "latency b32 (ms)"]
    table = markdown_table(rows, columns)
    results = {"rows": rows, "threads": torch.get_num_threads(), "eval_metrics": metrics}
    if trainer.is_world_process_zero():
        Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nDistillation results ({torch.get_num_threads()} CPU threads)\n{table}\n")
        print(f"Student saved to {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
