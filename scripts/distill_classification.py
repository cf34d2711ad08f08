#!/usr/bin/env python
"""Distil a text-classification teacher into a smaller student, evaluate both, report size and speed.

Offline default (``make demo``): a negation-sentiment task made in code. A 4-layer BERT teacher is
trained on it, a 2-layer student is built from the teacher's layers and distilled on noisy labels, and
the same student trained on hard labels only is the baseline.

    python scripts/distill_classification.py --output_dir runs/demo
    python scripts/distill_classification.py --teacher textattack/bert-base-uncased-SST-2 \\
        --dataset glue_sst2_folder --output_dir runs/sst2 --alpha 0.9 --temperature 2
    accelerate launch scripts/distill_classification.py --recipe recipes/distilbert.yaml --output_dir runs/x
    python scripts/distill_classification.py ... --resume_from_checkpoint true   # continue from the last checkpoint

Every `DistillationArguments` / `TrainingArguments` field is a flag; ``--recipe file.{json,yaml}`` sets
defaults that flags on the command line override.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
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
    align_labels,
    count_parameters,
    hard_label_arguments,
    has_label_names,
    load_text_classification,
    load_tokenizer,
    markdown_table,
    measure_latency,
    narrow_student,
    remap_labels,
    synthetic_setup,
    tokenize_splits,
)
from hf_distill.data import explain_model_load_errors, resume_argument  # noqa: E402
from hf_distill.vocabulary import trim_vocabulary  # noqa: E402
from hf_distill.preflight import configured_loss_terms  # noqa: E402
from hf_distill.safe_loading import from_pretrained_safely  # noqa: E402
from hf_distill.students import check_layer_choice  # noqa: E402

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
    student_layers: int = field(
        default=2,
        metadata={"help": "How many layers a student built from the teacher has: a count, the teacher's layers "
                          "evenly spread, first and last included (choose them with --student_layer_indices)."},
    )
    student_layer_indices: Optional[list[int]] = field(
        default=None,
        metadata={"help": "The teacher layers a student built from the teacher copies, 0-based and in order "
                          "(e.g. 0 3 5); overrides --student_layers."},
    )
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
    max_eval_samples: Optional[int] = field(default=None, metadata={
        "help": "Use at most this many validation rows (evaluation, preflight, the int8 check), as in run_glue."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many test rows."})
    teacher_train_epochs: float = field(
        default=0.0,
        metadata={"help": "Fine-tune the teacher on the training split first (epochs). The synthetic task uses 4."},
    )
    teacher_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of that teacher fine-tuning. Default: 5e-5 for a pretrained teacher (--teacher), "
                  "1e-3 for the synthetic task's teacher trained from scratch."},
    )
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
    trim_vocabulary: bool = field(
        default=False,
        metadata={"help": "After distillation, keep only the student's vocabulary rows that the training texts use "
                  "(plus special tokens), with its tokenizer rewritten to match (hf_distill.trim_vocabulary), before "
                  "saving and export. Outputs on texts whose tokens are all kept are unchanged."},
    )
    export_onnx: bool = field(
        default=True,
        metadata={"help": "After saving the run, export the student to ONNX fp32 + int8, judge int8 on the validation "
                  "split, and write report.{json,md,png} (teacher vs student vs ONNX: accuracy, size, latency). "
                  "An export that fails is reported and leaves the saved run as it is."},
    )
    int8_min_agreement: Optional[float] = field(
        default=None, metadata={"help": "Export: argmax agreement of int8 with PyTorch required (default: the export's)."}
    )
    int8_max_accuracy_drop: Optional[float] = field(
        default=None,
        metadata={"help": "Export: accuracy points int8 may lose against PyTorch on the validation split "
                  "(default: the export's)."},
    )
    report_threads: int = field(default=1, metadata={"help": "Threads for the latency report (stated in it)."})
    model_card: bool = field(default=True, metadata={"help": "Write the distillation model card (README.md)."})
    recipe: Optional[str] = field(
        default=None, metadata={"help": "A JSON or YAML file of argument values; command-line flags override it."}
    )


TEACHER_RECORD = "teacher_training.json"  # in <output_dir>-teacher: the settings the teacher was fine-tuned with


@dataclass
class Models:
    """The models of one run and their tokenizers (the student's is the teacher's unless --student has its own)."""

    teacher: torch.nn.Module
    tokenizer: Any
    student: Optional[torch.nn.Module] = None
    student_tokenizer: Any = None
    fine_tuned: bool = False  # the teacher was fine-tuned (or reloaded fine-tuned) into <output_dir>-teacher
    untrained_weights: list = field(default_factory=list)  # teacher weights the checkpoint lacked (a new head)
    label_mapping: Optional[dict] = None  # dataset label id -> teacher id, when the two orders differ


def parse_arguments(argv: list[str]) -> tuple[ScriptArguments, DistillationArguments]:
    """ScriptArguments and DistillationArguments from the command line, over the defaults of ``--recipe``."""
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


def teacher_dir_of(output_dir: str) -> Path:
    """``<output_dir>-teacher``: the teacher used for the report, beside (never inside) the student's folder."""
    return Path(f"{str(output_dir).rstrip('/')}-teacher")


def load_data(script: ScriptArguments, args: DistillationArguments):
    """Raw splits (text, label) and the dataset's label names."""
    splits, label_names = load_text_classification(
        script.dataset, text_column=script.text_column, label_column=script.label_column, seed=args.seed
    )
    limits = {"train": script.max_train_samples, "validation": script.max_eval_samples, "test": script.max_predict_samples}
    for name, limit in limits.items():
        if limit and name in splits:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    return splits, label_names


def load_teacher(script: ScriptArguments, args: DistillationArguments, label_names: list[str]) -> Models:
    """The teacher and its tokenizer, its labels compared with the dataset's (:func:`align_labels`, logged): a
    teacher with label names keeps them (the dataset is remapped by name), one without takes the dataset's."""
    if script.teacher is None:
        if script.dataset != "synthetic":
            raise ValueError("--teacher is required unless --dataset synthetic.")
        tokenizer, teacher = synthetic_setup()
        return Models(teacher, tokenizer, label_mapping=align_and_log(label_names, teacher.config.id2label))
    with explain_model_load_errors(script.teacher, "--teacher"):
        config = AutoConfig.from_pretrained(script.teacher, trust_remote_code=args.teacher_trust_remote_code)
        named = has_label_names(config.id2label)
        mapping = align_and_log(label_names, config.id2label, named)
        labels = {} if named else dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                                       label2id={n: i for i, n in enumerate(label_names)})
        teacher, info = from_pretrained_safely(AutoModelForSequenceClassification, script.teacher,
                                               args.allow_pickle_weights, trust_remote_code=args.teacher_trust_remote_code,
                                               output_loading_info=True, **labels)
    models = Models(teacher, load_tokenizer(script.tokenizer or script.teacher), label_mapping=mapping)
    models.untrained_weights = sorted(info.get("missing_keys") or [])
    return models


def align_and_log(label_names: list[str], teacher_id2label: dict, named: bool = True) -> Optional[dict]:
    """Refuse, keep or remap the dataset's label ids against the teacher's (see :func:`align_labels`); logged."""
    if not named:
        logger.info("Labels: the teacher has no label names: it takes the dataset's %s.", label_names)
        return None
    mapping, decision = align_labels(label_names, teacher_id2label)
    logger.info("Labels: %s.", decision)
    return mapping


def teacher_settings(script: ScriptArguments, args: DistillationArguments, epochs: float) -> dict:
    """What a fine-tuned teacher depends on; a saved teacher is reused only when all of it matches."""
    return {"teacher": script.teacher, "dataset": script.dataset, "epochs": epochs, "seed": args.seed,
            "learning_rate": teacher_learning_rate(script), "max_train_samples": script.max_train_samples,
            "teacher_train_size": script.teacher_train_size, "max_length": script.max_length,
            "batch_size": args.per_device_train_batch_size}


def train_teacher(teacher, tokenizer, data, args: DistillationArguments, epochs: float, learning_rate: float,
                  output_dir: Path) -> None:
    """Fine-tune the teacher with the stock Trainer (nothing saved by the Trainer itself)."""
    teacher_args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs,
        per_device_train_batch_size=args.per_device_train_batch_size, learning_rate=learning_rate, warmup_steps=10,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
        logging_steps=args.logging_steps,
    )
    Trainer(teacher, teacher_args, train_dataset=data, processing_class=tokenizer).train()


def teacher_training_data(script: ScriptArguments, args: DistillationArguments, tokenizer, train):
    """What the teacher learns from: the training split, or (synthetic task) a separate clean split."""
    if script.dataset != "synthetic":
        return train
    clean, _ = load_text_classification(
        "synthetic", seed=args.seed + 100, synthetic_label_noise=0.0, synthetic_train_size=script.teacher_train_size
    )
    return tokenize_splits(clean, tokenizer, script.max_length)["train"].remove_columns("text")


def teacher_learning_rate(script: ScriptArguments) -> float:
    """--teacher_learning_rate, else 5e-5 for a pretrained teacher and 1e-3 for the synthetic one from scratch."""
    if script.teacher_learning_rate is not None:
        return script.teacher_learning_rate
    return 1e-3 if script.teacher is None else 5e-5


def refuse_untrained_teacher(models: Models, script: ScriptArguments) -> None:
    """A teacher whose checkpoint lacks weights (a pretrained encoder without a task head gets a random one) teaches
    nothing unless it is fine-tuned first: refuse before anything trains."""
    if models.untrained_weights:
        raise ValueError(
            f"The teacher {script.teacher} has newly initialised weights ({', '.join(models.untrained_weights[:4])}"
            f"{', ...' if len(models.untrained_weights) > 4 else ''}): it has no trained task head, and a random head "
            "teaches the student nothing. Fine-tune it first with --teacher_train_epochs 2 (learning rate "
            "--teacher_learning_rate, default 5e-5), or pass a teacher already fine-tuned on this task."
        )


def fine_tune_teacher(models: Models, script: ScriptArguments, args: DistillationArguments, train) -> None:
    """Fine-tune the teacher when asked (the synthetic task always) and save it to ``<output_dir>-teacher``.
    A teacher saved there with the same settings is loaded instead, so a resumed run distils the same one."""
    epochs = script.teacher_train_epochs or (4.0 if script.dataset == "synthetic" and script.teacher is None else 0)
    if not epochs:
        refuse_untrained_teacher(models, script)
        return
    folder, settings = teacher_dir_of(args.output_dir), teacher_settings(script, args, epochs)
    record = folder / TEACHER_RECORD
    if record.is_file() and json.loads(record.read_text()) == settings:
        logger.info("Reusing the teacher fine-tuned with the same settings in %s (delete it to train again).", folder)
        models.teacher, models.fine_tuned = from_pretrained_safely(type(models.teacher), folder), True
        models.teacher.config._name_or_path = str(folder)  # the recipe and card name the teacher actually used
        return
    data = teacher_training_data(script, args, models.tokenizer, train)
    train_teacher(models.teacher, models.tokenizer, data, args, epochs, teacher_learning_rate(script), folder)
    models.fine_tuned = True
    models.teacher.config._name_or_path = str(folder)  # the recipe and card name the teacher actually used
    if args.should_save:
        models.teacher.save_pretrained(folder)
        models.tokenizer.save_pretrained(folder)
        record.write_text(json.dumps(settings, indent=2) + "\n")


def build_student(models: Models, script: ScriptArguments, args: DistillationArguments):
    """The student: ``--student`` (with its own tokenizer when its folder has one), a narrow random init, or
    the teacher's layers. It takes the teacher's label maps."""
    set_seed(args.seed)
    teacher = models.teacher
    if script.student:
        with explain_model_load_errors(script.student, "--student"):
            student = from_pretrained_safely(
                AutoModelForSequenceClassification, script.student, args.allow_pickle_weights,
                num_labels=teacher.config.num_labels, id2label=teacher.config.id2label, label2id=teacher.config.label2id)
        has_tokenizer = any((Path(script.student) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                            "vocab.txt"))
        return student, load_tokenizer(script.student) if has_tokenizer else models.tokenizer
    if script.student_hidden_size:
        return narrow_student(teacher, script.student_layers, script.student_hidden_size), models.tokenizer
    if script.student_layer_indices:
        student = create_student(teacher, layers=script.student_layer_indices)
    else:
        student = create_student(teacher, num_layers=script.student_layers)
    return (bert_to_distilbert(student) if script.student_type == "distilbert" else student), models.tokenizer


def distillation_data(models: Models, script: ScriptArguments, args: DistillationArguments, data):
    """The training set of the distillation: augmented and/or with cached teacher outputs when asked."""
    train = data["train"].remove_columns("text")
    if script.augment_factor:
        train = add_augmented_examples(train, data["train"]["text"], models.tokenizer, models.teacher, script, args.seed)
    if script.cache_teacher:
        train = cache_teacher_outputs(models.teacher, train, batch_size=args.per_device_eval_batch_size)
    return train


def add_augmented_examples(train, texts, tokenizer, teacher, script: ScriptArguments, seed: int):
    """Append teacher-labelled augmented texts (label -100: they have no ground truth)."""
    from datasets import Dataset, concatenate_datasets

    mlm = None
    if script.augment_replace_with == "mlm":
        from transformers import AutoModelForMaskedLM

        if not script.augment_mlm:
            raise ValueError("--augment_replace_with mlm needs --augment_mlm, a masked LM sharing the tokenizer.")
        mlm = from_pretrained_safely(AutoModelForMaskedLM, script.augment_mlm)
    new_texts = augment_texts(texts, tokenizer, num_per_example=script.augment_factor,
                              replace_with=script.augment_replace_with, mlm_model=mlm, seed=seed)
    extra = Dataset.from_dict({"text": new_texts, "label": [-100] * len(new_texts)})
    extra = extra.map(lambda b: tokenizer(b["text"], truncation=True, max_length=script.max_length), batched=True)
    extra = extra.remove_columns("text").cast(train.features)
    logger.info("Augmentation: %d new texts from %d (x%d requested).", len(extra), len(texts), script.augment_factor)
    return concatenate_datasets([train, extra]).shuffle(seed=seed)


def make_trainer(student, models: Models, args: DistillationArguments, train, data, teacher=True):
    """A DistillationTrainer; it checks the pair (labels, vocabularies) before any model runs."""
    return DistillationTrainer(
        student, models.teacher if teacher else None, args, train_dataset=train,
        eval_dataset=data["validation"].remove_columns("text"), processing_class=models.student_tokenizer,
        teacher_processing_class=models.tokenizer, data_collator=DataCollatorWithPadding(models.student_tokenizer),
        compute_metrics=classification_metrics,
    )


def describe(name: str, model: torch.nn.Module, models: Models, data, script: ScriptArguments) -> dict:
    """One row of the comparison table: parameters, accuracy per split, latency (when measured)."""
    row = {"model": name, "parameters": count_parameters(model)}
    tokenizer = models.tokenizer if name == "teacher" else models.student_tokenizer
    for split in ("validation", "test"):
        if split in data:
            row[f"{split} accuracy"] = accuracy_on(model, data[split], tokenizer, max_length=script.max_length)
    if script.measure_speed:
        latency = measure_latency(model, tokenizer, data["validation"]["text"][:64], max_length=script.max_length)
        row["latency b1 (ms)"], row["latency b32 (ms)"] = latency["batch_1"]["median"], latency["batch_32"]["median"]
    return row


def train_baseline(student, models: Models, args: DistillationArguments, data) -> tuple[torch.nn.Module, dict]:
    """The same student on hard labels only, for the same steps: every teacher term off, nothing saved (its
    Trainer works in a temporary folder, so no ``baseline/`` is left behind)."""
    with tempfile.TemporaryDirectory(prefix="hf_distill_baseline_") as folder:
        trainer = make_trainer(student, models, hard_label_arguments(args, folder), data["train"].remove_columns("text"),
                               data)
        active = {name: weight for name, weight in configured_loss_terms(trainer.args).items() if weight}
        logger.info("Baseline (hard labels only): loss terms %s.", active)
        trainer.train()
    return trainer.model, {"loss_terms": active, "steps": trainer.state.global_step}


def write_results(args: DistillationArguments, results: dict) -> None:
    """``results.json``: the comparison rows, evaluation metrics and, after export, its summary."""
    Path(args.output_dir, "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def export_keywords(export_onnx, eval_split, script: ScriptArguments) -> dict:
    """Keywords for ``export_onnx``: int8 judged on the evaluation split where the installed version can."""
    accepted = inspect.signature(export_onnx).parameters
    keywords = {"sample_texts": eval_split["text"][:8]}
    if "eval_dataset" in accepted:
        keywords["eval_dataset"] = eval_split.select_columns(["text", "label"])
    for name in ("int8_min_agreement", "int8_max_accuracy_drop"):
        value = getattr(script, name)
        if value is not None:
            if name not in accepted:
                raise TypeError(f"--{name} needs a newer hf_distill.export.export_onnx (it has no {name}).")
            keywords[name] = value
    return keywords


def export_and_report(output_dir: str, models: Models, eval_split, script: ScriptArguments) -> dict:
    """ONNX fp32 + int8 export judged on ``eval_split``, then the latency/size/accuracy report and plot.

    Called after the run is saved: any failure is logged and returned as ``{"error": ...}``, never raised, so
    a finished run is never lost to its export. The teacher is saved to ``<output_dir>-teacher`` for the report.
    """
    from hf_distill.export import export_onnx
    from hf_distill.export.report import benchmark_models, write_report

    try:
        exported = export_onnx(output_dir, **export_keywords(export_onnx, eval_split, script))
    except Exception as error:  # noqa: BLE001 - reported in results.json and the log, the run stays saved
        logger.warning("ONNX export failed (%s: %s). The student, results.json and the model card are saved in %s; "
                       "export again with scripts/export_onnx.py --model_dir %s.", type(error).__name__, error,
                       output_dir, output_dir)
        return {"error": f"{type(error).__name__}: {error}"}
    summary = exported.to_dict()
    summary["int8_accepted"] = bool(getattr(exported, "int8_accepted", True))
    if not summary["int8_accepted"]:
        logger.warning("int8 export NOT accepted (see onnx/export_info.json): use onnx/model.onnx (fp32).")
    teacher_dir = teacher_dir_of(output_dir)
    if not models.fine_tuned:  # a fine-tuned teacher is there already
        models.teacher.save_pretrained(teacher_dir)
        models.tokenizer.save_pretrained(teacher_dir)
        (teacher_dir / TEACHER_RECORD).unlink(missing_ok=True)
    rows = benchmark_models(output_dir, teacher_dir=teacher_dir, eval_texts=eval_split["text"],
                            eval_labels=eval_split["label"], threads=script.report_threads,
                            sequence_length=script.max_length)
    write_report(output_dir, rows, title="Distilled student: accuracy, size and latency")
    logger.info("ONNX export (%s backend) and report written to %s", exported.backend, output_dir)
    return summary


def distill(models: Models, script: ScriptArguments, args: DistillationArguments, data, resume: Any):
    """Build the trainer (it refuses a mismatched pair before any model runs), train, save, evaluate."""
    trainer = make_trainer(models.student, models, args, distillation_data(models, script, args, data), data,
                           teacher=not script.cache_teacher)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)  # eval_results.json + all_results.json, read by the model card
    return trainer, metrics


def compare(trainer, models: Models, script: ScriptArguments, args: DistillationArguments, data, metrics) -> dict:
    """The results: teacher, student and (with --compare_baseline) the student on hard labels only."""
    rows = [describe("teacher", models.teacher, models, data, script),
            describe(f"student ({args.distillation_loss}, alpha={args.alpha}, T={args.temperature})", trainer.model,
                     models, data, script)]
    results = {"rows": rows, "threads": torch.get_num_threads(), "eval_metrics": metrics,
               "steps": trainer.state.global_step,
               "arguments": {"script": dataclasses.asdict(script), "distillation": args.distillation_dict()}}
    if script.compare_baseline:
        baseline, results["baseline"] = train_baseline(build_student(models, script, args)[0], models, args, data)
        rows.append(describe("student, hard labels only", baseline, models, data, script))
    return results


UNK_WARNING_SHARE = 0.01  # of validation tokens mapped to the unknown token by the trimmed tokenizer


def unk_warning(held_out_unk_rate: Optional[float]) -> Optional[str]:
    """The warning for a trimmed vocabulary that leaves many validation tokens unknown, or None."""
    if held_out_unk_rate is None or held_out_unk_rate <= UNK_WARNING_SHARE:
        return None
    return (f"The trimmed vocabulary maps {100 * held_out_unk_rate:.1f}% of the validation tokens to the unknown token "
            f"(over {100 * UNK_WARNING_SHARE:.0f}%): the training texts did not cover them. Trim on more text (leave "
            "--max_train_samples unset) or drop --trim_vocabulary; the trimmed student's row in results.json shows "
            "the accuracy it costs.")


def trim_student(trainer, models: Models, script: ScriptArguments, splits, results: dict) -> dict:
    """Trim the student's vocabulary to the training texts, save it over the distilled student, and add its row
    (accuracy with its own, trimmed tokenizer) to the results; returns what was kept."""
    student, tokenizer, report = trim_vocabulary(
        trainer.model, models.student_tokenizer, splits["train"]["text"], return_report=True,
        held_out_texts=splits["validation"]["text"],
    )
    trainer.processing_class = models.student_tokenizer = tokenizer
    trainer.save_model()
    data = tokenize_splits(splits, tokenizer, script.max_length)
    results["rows"].append(describe("student, vocabulary trimmed", student, models, data, script))
    logger.info("Vocabulary trimmed: %d -> %d rows, %d -> %d parameters, [UNK] share on validation %.3f%%; "
                "%.1f%% of the validation texts are tokenized otherwise (unknown, or words split into kept pieces).",
                report.original_size, report.kept_size, report.parameters_before, report.parameters_after,
                100 * (report.held_out_unk_rate or 0.0), 100 * (report.held_out_changed_share or 0.0))
    warning = unk_warning(report.held_out_unk_rate)
    if warning:
        logger.warning(warning)
    return {"original_size": report.original_size, "kept_size": report.kept_size,
            "parameters_before": report.parameters_before, "parameters_after": report.parameters_after,
            "validation_unk_rate": report.held_out_unk_rate,
            "validation_changed_share": report.held_out_changed_share}


def finish(trainer, models: Models, script: ScriptArguments, args: DistillationArguments, splits, results) -> None:
    """Save results.json and the card first, then export (a failed export leaves them in place) and write both
    again with the export's summary and report, then print the table."""
    if script.trim_vocabulary:
        results["trim_vocabulary"] = trim_student(trainer, models, script, splits, results)
    write_results(args, results)
    if script.model_card:
        trainer.create_model_card(dataset_name=script.dataset)
    if script.export_onnx:
        results["export"] = export_and_report(args.output_dir, models, splits["validation"], script)
        write_results(args, results)
        if script.model_card and "error" not in results["export"]:
            trainer.create_model_card(dataset_name=script.dataset)  # now with the report's table and plot
    splits_shown = [s for s in ("validation", "test") if s in splits]
    columns = ["model", "parameters"] + [f"{s} accuracy" for s in splits_shown] + ["latency b1 (ms)", "latency b32 (ms)"]
    print(f"\nDistillation results ({torch.get_num_threads()} CPU threads)\n{markdown_table(results['rows'], columns)}\n")
    if "error" in results.get("export", {}):
        print(f"WARNING: the ONNX export failed ({results['export']['error']}); the run itself is saved.")
    print(f"Student saved to {args.output_dir}")


def main(argv: Optional[list[str]] = None) -> dict:
    """Load data and teacher, match labels, fine-tune the teacher if asked, build the student, distil, compare,
    save, export. Returns what is written to ``results.json``."""
    script, args = parse_arguments(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    resume = resume_argument(args.resume_from_checkpoint)
    splits, label_names = load_data(script, args)
    models = load_teacher(script, args, label_names)
    check_layer_choice(models.teacher.config.num_hidden_layers, script.student_layers, script.student_layer_indices,
                       script.student, script.student_hidden_size)
    splits = remap_labels(splits, models.label_mapping)
    data = tokenize_splits(splits, models.tokenizer, script.max_length)
    fine_tune_teacher(models, script, args, data["train"].remove_columns("text"))
    models.student, models.student_tokenizer = build_student(models, script, args)
    trainer, metrics = distill(models, script, args, data, resume)
    results = compare(trainer, models, script, args, data, metrics)
    if trainer.is_world_process_zero():
        finish(trainer, models, script, args, splits, results)
    return results


if __name__ == "__main__":
    main()
