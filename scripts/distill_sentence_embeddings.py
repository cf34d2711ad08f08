#!/usr/bin/env python
"""Distil a sentence embedder (e.g. all-MiniLM-L6-v2) into a shallower copy on unlabelled sentences.

The student is ``create_student(teacher, num_layers=N)``; it learns the teacher's pooled embedding
(``distillation_task="sentence-embedding"``, plus any intermediate term) or, with
``--distillation_task feature-extraction``, the teacher's internals only (general distillation). The last
``--eval_size`` sentences are held out: mean cosine to the teacher and Spearman of pairwise similarities, before and
after. The student is saved with its sentence-transformers files; ``--trim_vocabulary`` and ``--export`` follow.

    python scripts/distill_sentence_embeddings.py --teacher ../shared/data/models/all-MiniLM-L6-v2 \\
        --sentences ../shared/data/sst2/train.jsonl --embedding_pooling mean --embedding_normalize true \\
        --hidden_weight 1 --num_layers 3 --max_steps 300 --output_dir runs/minilm-l3 --export true

``--sentences``: a ``.txt`` file (one sentence a line) or a ``.jsonl`` file (``--text_field``, default ``text``;
other fields such as labels are ignored). Every ``DistillationArguments`` field is a flag.
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
from typing import Any, Optional  # noqa: E402

from datasets import Dataset  # noqa: E402
from transformers import AutoModel, AutoTokenizer, HfArgumentParser  # noqa: E402

from hf_distill import DistillationArguments, DistillationTrainer, create_student  # noqa: E402

logger = logging.getLogger("distill_sentence_embeddings")


@dataclass
class ScriptArguments:
    teacher: str = field(metadata={"help": "Teacher folder (a headless encoder, e.g. a sentence-transformers model)."})
    sentences: str = field(metadata={"help": "Unlabelled sentences: a .txt file (one a line) or a .jsonl file."})
    text_field: str = field(default="text", metadata={"help": "The .jsonl field that holds the sentence."})
    num_layers: int = field(default=3, metadata={"help": "Student layers, copied from the teacher's (create_student)."})
    max_length: int = field(default=128, metadata={"help": "Tokens per sentence at most."})
    max_sentences: Optional[int] = field(default=None, metadata={"help": "Use only the first N sentences."})
    eval_size: int = field(default=64, metadata={"help": "The last N sentences are held out for the metrics (>= 3)."})
    trim_vocabulary: bool = field(default=False, metadata={
        "help": "Trim the saved student's vocabulary to the tokens of the training sentences."})
    export: bool = field(default=False, metadata={
        "help": "Export to <output_dir>/onnx (per-channel int8, judged by the cosine on the held-out sentences)."})


def read_sentences(path: str, text_field: str = "text", limit: Optional[int] = None) -> list[str]:
    """The sentences of a .txt (one a line, blank lines skipped) or .jsonl (``text_field``) file."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"--sentences {path}: no such file (give a .txt or .jsonl file)")
    sentences: list[str] = []
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(sentences) >= limit:
                break
            if not line.strip():
                continue
            if source.suffix != ".jsonl":
                sentences.append(line.strip())
                continue
            row = json.loads(line)
            if text_field not in row:
                raise ValueError(f"{path}:{number} has no field {text_field!r} (fields: {sorted(row)}); "
                                 "pass --text_field")
            sentences.append(str(row[text_field]))
    return sentences


def parse_arguments(argv: list[str]) -> tuple[ScriptArguments, DistillationArguments]:
    script, args = HfArgumentParser((ScriptArguments, DistillationArguments)).parse_args_into_dataclasses(args=argv)
    if args.distillation_task is None:
        args.distillation_task = "sentence-embedding"
    if args.distillation_task not in ("sentence-embedding", "feature-extraction"):
        raise ValueError("--distillation_task must be sentence-embedding or feature-extraction for this script, "
                         f"got {args.distillation_task!r}; use scripts/distill_classification.py for a task head")
    if script.eval_size < 3:
        raise ValueError(f"--eval_size must be >= 3 (the Spearman of pairwise similarities), got {script.eval_size}")
    return script, args


def build(script: ScriptArguments, args: DistillationArguments) -> tuple[DistillationTrainer, list[str], list[str]]:
    """The trainer over the sentences (the last ``eval_size`` held out), and the two lists of sentences."""
    sentences = read_sentences(script.sentences, script.text_field, script.max_sentences)
    if len(sentences) <= script.eval_size:
        raise ValueError(f"{script.sentences} has {len(sentences)} sentences: more than --eval_size "
                         f"{script.eval_size} are needed")
    train_texts, eval_texts = sentences[:-script.eval_size], sentences[-script.eval_size:]
    tokenizer = AutoTokenizer.from_pretrained(script.teacher)
    tokenizer.model_max_length = script.max_length  # the saved student embeds no longer inputs than it was distilled on
    encode = lambda b: tokenizer(b["text"], truncation=True, max_length=script.max_length)  # noqa: E731
    train, held_out = (Dataset.from_dict({"text": texts}).map(encode, batched=True, remove_columns=["text"])
                       for texts in (train_texts, eval_texts))
    teacher = AutoModel.from_pretrained(script.teacher)
    student = create_student(teacher, num_layers=script.num_layers)
    del teacher  # the trainer loads the teacher from its folder, where the pooling may be recorded
    trainer = DistillationTrainer(model=student, teacher_model=script.teacher, args=args, train_dataset=train,
                                  eval_dataset=held_out, processing_class=tokenizer)
    return trainer, train_texts, eval_texts


def finish(trainer: DistillationTrainer, script: ScriptArguments, train_texts: list[str],
           eval_texts: list[str], results: dict[str, Any]) -> dict[str, Any]:
    """Save the student (trimmed when asked), its metrics, ``results.json`` and its model card; then export when
    asked and record the export in ``results.json`` (a failed export leaves everything before it on disk)."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    if script.trim_vocabulary:
        from hf_distill import trim_vocabulary

        model, tokenizer = trim_vocabulary(trainer.model, trainer.processing_class, train_texts)
        model.save_pretrained(output_dir)  # the sentence-transformers files written beside it stay valid
        tokenizer.save_pretrained(output_dir)
        results["vocabulary_size"] = len(tokenizer)
    trainer.save_metrics("eval", results["after"])
    write_results = lambda: Path(output_dir, "results.json").write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    write_results()
    trainer.create_model_card(dataset_name=Path(script.sentences).stem)
    if script.export:
        from hf_distill.export import export_onnx

        try:
            exported = export_onnx(output_dir, per_channel=True, eval_dataset=[{"text": t} for t in eval_texts])
            results["onnx"] = {"int8_accepted": exported.int8_accepted, "int8_mean_cosine":
                               exported.parity["int8"].mean_cosine if "int8" in exported.parity else None}
        except Exception as error:  # as distill_classification.py: the student stands, export again later
            results["onnx"] = {"error": f"{type(error).__name__}: {error}"}
            logger.warning("ONNX export failed (%s); the student, results.json and the card are saved: export again "
                           "with scripts/export_onnx.py %s", results["onnx"]["error"], output_dir)
        write_results()
    return results


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    script, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    trainer, train_texts, eval_texts = build(script, args)
    before = trainer.evaluate(metric_key_prefix="before")
    trainer.train()
    after = trainer.evaluate()
    results = {"task": args.distillation_task, "train_sentences": len(train_texts), "eval_sentences": len(eval_texts),
               "before": before, "after": after,
               "arguments": {"script": dataclasses.asdict(script), "distillation": args.distillation_dict()}}
    results = finish(trainer, script, train_texts, eval_texts, results)
    print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after", "arguments")}
                     | {"before": {k: v for k, v in before.items() if "cosine" in k or "spearman" in k},
                        "after": {k: v for k, v in after.items() if "cosine" in k or "spearman" in k}}, indent=2))
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
