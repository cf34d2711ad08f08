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

from hf_distill import (  # noqa: E402
    DistillationArguments,
    DistillationTrainer,
    bert_to_distilbert,
    cache_teacher_outputs,
    classification_metrics,
    create_student,
)
from hf_distill.augmentation import augment_texts  # noqa: E402
from hf_distill.classification import (  # noqa: E402
    accuracy_on,
    count_parameters,
    load_text_classification,
    load_tokenizer,
    markdown_table,
    measure_latency,
    narrow_student,
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
    student_hidden_size: Optional[int] = field(
        default=None,
        metadata={"help": "Build a narrower, randomly initialised student of this width instead (TinyBERT-style)."},
    )
    student_type: str = field(
        default="same",
        metadata={"help": "'same': the teacher's class; 'distilbert': convert the BERT-built student to DistilBert*.",
                  "choices": ["same", "distilbert"]},
    )
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
    teacher_train_size: int = field(
        default=2000, metadata={"help": "Synthetic task: clean examples the teacher is trained on."}
    )
    measure_speed: bool = field(default=True, metadata={"help": "Time each model at batch 1 and 32 for the table."})
    compare_baseline: bool = field(
        default=True, metadata={"help": "Also train the same student on hard labels only, for the same steps."}
    )
    augment_factor: int = field(
        default=0,
        metadata={"help": "Add this many augmented variants per training text (masking, replacement, n-grams), "
                  "labelled by the teacher only (Tang et al. 2019 / TinyBERT). 0: off."},
    )
    augment_replace_with: str = field(
        default="mask", metadata={"help": "Token replacement of the augmentation: mask, vocab or mlm.",
                                  "choices": ["mask", "vocab", "mlm"]},
    )
    augment_mlm: Optional[str] = field(
        default=None, metadata={"help": "Masked-LM (Hub id or folder) for --augment_replace_with mlm."}
    )
    cache_teacher: bool = field(
        default=False,
        metadata={"help": "Run the teacher once over the training set and train from the cached logits "
                  "(offline distillation; logit terms only)."},
    )
    export_onnx: bool = field(
        default=True,
        metadata={"help": "Export the student to ONNX fp32 + int8, check parity, and write report.{json,md,png} "
                  "(teacher vs student vs ONNX: accuracy, size, latency)."},
    )
    report_threads: int = field(default=1, metadata={"help": "Threads for the latency report (stated in it)."})
    model_card: bool = field(default=True, metadata={"help": "Write the distillation model card (README.md)."})
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


def add_augmented_examples(train, texts, tokenizer, teacher, script: ScriptArguments, seed: int):
    """Append teacher-labelled augmented texts (label -100: they have no ground truth)."""
    from datasets import Dataset, concatenate_datasets

    mlm = None
    if script.augment_replace_with == "mlm":
        from transformers import AutoModelForMaskedLM

        if not script.augment_mlm:
            raise ValueError("--augment_replace_with mlm needs --augment_mlm, a masked LM sharing the tokenizer.")
        mlm = AutoModelForMaskedLM.from_pretrained(script.augment_mlm)
    new_texts = augment_texts(texts, tokenizer, num_per_example=script.augment_factor,
                              replace_with=script.augment_replace_with, mlm_model=mlm, seed=seed)
    extra = Dataset.from_dict({"text": new_texts, "label": [-100] * len(new_texts)})
    extra = extra.map(lambda b: tokenizer(b["text"], truncation=True, max_length=script.max_length), batched=True)
    extra = extra.remove_columns("text").cast(train.features)
    logger.info("Augmentation: %d new texts from %d (x%d requested).", len(extra), len(texts), script.augment_factor)
    return concatenate_datasets([train, extra]).shuffle(seed=seed)


def export_and_report(output_dir: str, teacher, tokenizer, eval_split, script: ScriptArguments) -> dict:
    """ONNX fp32 + int8 export with parity checks, then the latency/size/accuracy report and plot.

    The teacher is saved beside the run (``<output_dir>-teacher``), not inside the student's folder.
    """
    from hf_distill.export import export_onnx
    from hf_distill.export.report import benchmark_models, write_report

    exported = export_onnx(output_dir, sample_texts=eval_split["text"][:8])
    teacher_dir = Path(f"{str(output_dir).rstrip('/')}-teacher")
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rows = benchmark_models(
        output_dir, teacher_dir=teacher_dir, eval_texts=eval_split["text"], eval_labels=eval_split["label"],
        threads=script.report_threads, sequence_length=script.max_length,
    )
    write_report(output_dir, rows, title="Distilled student: accuracy, size and latency")
    logger.info("ONNX export (%s backend) and report written to %s", exported.backend, output_dir)
    return exported.to_dict()


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
                "synthetic", seed=args.seed + 100, synthetic_label_noise=0.0, synthetic_train_size=script.teacher_train_size
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
        if script.student_hidden_size:
            return narrow_student(teacher, script.student_layers, script.student_hidden_size)
        student = create_student(teacher, num_layers=script.student_layers)
        return bert_to_distilbert(student) if script.student_type == "distilbert" else student

    distill_train = train
    if script.augment_factor:
        distill_train = add_augmented_examples(train, data["train"]["text"], tokenizer, teacher, script, args.seed)
    if script.cache_teacher:
        distill_train = cache_teacher_outputs(teacher, distill_train, batch_size=args.per_device_eval_batch_size)
    collator = DataCollatorWithPadding(tokenizer)
    common = dict(eval_dataset=data["validation"].remove_columns("text"),
                  processing_class=tokenizer, data_collator=collator, compute_metrics=classification_metrics)
    student = build_student()
    trainer = DistillationTrainer(student, None if script.cache_teacher else teacher, args,
                                  train_dataset=distill_train, **common)
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
        if script.measure_speed:
            latency = measure_latency(model, tokenizer, texts, max_length=script.max_length)
            row["latency b1 (ms)"], row["latency b32 (ms)"] = latency["batch_1"]["median"], latency["batch_32"]["median"]
        return row

    rows.append(describe("teacher", teacher))
    rows.append(describe(f"student ({args.distillation_loss}, alpha={args.alpha}, T={args.temperature})", trainer.model))
    if script.compare_baseline:
        baseline_args = dataclasses.replace(args, alpha=0.0, output_dir=str(Path(args.output_dir) / "baseline"))
        baseline = DistillationTrainer(build_student(), teacher, baseline_args, train_dataset=train, **common)
        baseline.train()
        rows.append(describe("student, hard labels only", baseline.model))
    columns = ["model", "parameters"] + [f"{s} accuracy" for s in evaluation_splits] + ["latency b1 (ms)", "latency b32 (ms)"]
    table = markdown_table(rows, columns)
    results = {"rows": rows, "threads": torch.get_num_threads(), "eval_metrics": metrics}
    if script.export_onnx and trainer.is_world_process_zero():
        results["export"] = export_and_report(args.output_dir, teacher, tokenizer, data["validation"], script)
    if trainer.is_world_process_zero():
        Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=2, default=str))
        if script.model_card:
            trainer.create_model_card(dataset_name=script.dataset)
        print(f"\nDistillation results ({torch.get_num_threads()} CPU threads)\n{table}\n")
        print(f"Student saved to {args.output_dir}")
    return results


if __name__ == "__main__":
    main()
