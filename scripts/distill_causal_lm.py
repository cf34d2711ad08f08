#!/usr/bin/env python
"""Distil a causal language model into a smaller one on completion tokens, then measure it against the teacher.

Default (offline): the real TinyStories teacher ``stories260K`` (../shared/data/models/stories260K, converted
from llama2.c), a 2-layer student copied from its blocks, and sequence-level KD data: story openings
completed by teacher samples (cached on disk). The student is evaluated on held-out teacher samples before
and after training: per-token KL(teacher ‖ student), perplexity and top-1 agreement.

    python scripts/distill_causal_lm.py --output_dir runs/stories --max_steps 300
    python scripts/distill_causal_lm.py --teacher llama2c:../shared/data/models/stories260K \\
        --student_hidden_size 32 --student_layers 2 --distillation_loss jsd --alpha 1 --output_dir runs/narrow
    python scripts/distill_causal_lm.py --teacher_topk 32 --output_dir runs/topk   # cached top-k, no teacher at train time
    python scripts/distill_causal_lm.py --student path/to/small --use_lora --merge_lora --output_dir runs/lora
    python scripts/distill_causal_lm.py --teacher org/big-lm --dataset data.jsonl --max_length 512 --output_dir runs/x
    python scripts/distill_causal_lm.py --dataset prompts.jsonl --lmbda 1 --alpha 1 --distillation_loss jsd \
        --max_completion_length 64 --output_dir runs/onpolicy   # prompts only: the student completes them (TRL-style)
    python scripts/distill_causal_lm.py --student path/to/other --teacher_tokenizer path/to/teacher_tokenizer \\
        --dataset data.jsonl --output_dir runs/xtok      # a student with its own tokenizer (cross-tokenizer)
    accelerate launch scripts/distill_causal_lm.py --output_dir runs/ddp      # same flags, several processes

Every ``DistillationArguments`` / ``TrainingArguments`` field is a flag too (``--alpha``, ``--temperature``,
``--distillation_loss``, ``--jsd_beta``, ``--max_steps``, ``--lmbda`` for on-policy mixing, ...). This script
changes a few defaults for small causal LMs: ``--distillation_task causal-lm --temperature 1 --learning_rate 1e-3
--per_device_train_batch_size 8 --report_to none --save_strategy no --logging_steps 10``.

Written to ``output_dir``: the student (or, with ``--use_lora``, its adapter) with the tokenizer,
``training_args.bin`` and ``distillation/recipe.json``; ``merged/`` with ``--merge_lora``; ``results.json`` and
``results.md``; ``cache/`` (teacher completions, unless ``--completions_cache_dir``); ``checkpoint-N/`` with
``--save_strategy steps`` or after SIGTERM/SIGINT: continue with ``--resume_from_checkpoint true``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

try:
    import hf_distill  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_distill.lm.evaluation import HELDOUT_OPENINGS, STORY_OPENINGS, heldout_metrics  # noqa: E402,F401
from hf_distill.students import narrow_causal_student  # noqa: E402

logger = logging.getLogger("distill_causal_lm")

DEFAULT_TEACHER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K"
LLAMA2C_PREFIX = "llama2c:"


#: Defaults of DistillationArguments that this script changes (flags still override them).
SCRIPT_DEFAULTS = {
    "distillation_task": "causal-lm", "temperature": 1.0, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
    "report_to": "none", "save_strategy": "no", "logging_steps": 10,
}


@dataclass
class ScriptArguments:
    """What to distil: the teacher, the student, the data, LoRA, the top-k cache and the evaluation."""

    teacher: Optional[str] = field(
        default=None,
        metadata={"help": "Teacher: a local folder or Hub id of a causal LM, or 'llama2c:<dir>' (a llama2.c checkpoint "
                  "*.bin and tok*.model, converted on the fly). Default: the stories260K model in "
                  "../shared/data/models/stories260K. A LoRA adapter folder is accepted only with its base."},
    )
    teacher_base_model: Optional[str] = field(
        default=None, metadata={"help": "Base model of a teacher given as a LoRA adapter folder (merged before use)."}
    )
    student: Optional[str] = field(
        default=None,
        metadata={"help": "Student: a local folder or Hub id sharing the teacher's tokenizer. Default: built from the "
                  "teacher (--student_layers, or a narrower random init with --student_hidden_size)."},
    )
    student_layers: int = field(
        default=2, metadata={"help": "Blocks of a student built from the teacher (copied from evenly spaced blocks)."}
    )
    student_layer_indices: Optional[list[int]] = field(
        default=None,
        metadata={"help": "The teacher blocks a student built from the teacher copies, 0-based and in order "
                          "(e.g. 0 3 5); overrides --student_layers."},
    )
    student_hidden_size: Optional[int] = field(
        default=None,
        metadata={"help": "Build a narrower, randomly initialised student of this width (the teacher's config "
                  "otherwise, --student_layers blocks)."},
    )
    student_intermediate_size: Optional[int] = field(
        default=None, metadata={"help": "MLP width of the narrow student (default: the teacher's ratio)."}
    )
    student_num_heads: Optional[int] = field(
        default=None, metadata={"help": "Attention heads of the narrow student (default: keep the head size)."}
    )
    dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Training data with prompt/completion columns (or chat 'messages'), or prompts only "
                  "(a 'prompt' column of text or chat messages, completed by the student at every step: --lmbda 1): "
                  "a .json/.jsonl file, a folder saved with save_to_disk, or a Hub dataset id. Default: story "
                  "openings completed by the teacher (sequence-level KD)."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --dataset to train on."})
    eval_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out data (same formats; split --eval_split). Default: --heldout_fraction of "
                  "--dataset, or teacher samples from held-out openings."},
    )
    eval_split: str = field(default="validation", metadata={"help": "Split of --eval_dataset."})
    heldout_fraction: float = field(default=0.1, metadata={"help": "Fraction of --dataset held out for evaluation."})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt column (text or chat messages)."})
    completion_column: str = field(default="completion", metadata={"help": "Completion column."})
    messages_column: str = field(default="messages", metadata={"help": "Chat column, used without prompt/completion."})
    max_length: int = field(default=128, metadata={"help": "Prompt + completion tokens per example."})
    truncation_side: str = field(
        default="right",
        metadata={"help": "Examples longer than --max_length: 'right' cuts the end of the completion (a prompt that "
                  "leaves no room for a completion is an error); 'left' drops the oldest prompt tokens.",
                  "choices": ["right", "left"]},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on at most this many rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    teacher_completions: bool = field(
        default=False,
        metadata={"help": "Replace the completions of --dataset by teacher samples of its prompts (sequence-level KD). "
                  "Always on for the default story openings."},
    )
    samples_per_prompt: int = field(default=4, metadata={"help": "Teacher samples per prompt for the transfer set."})
    heldout_samples_per_prompt: int = field(default=2, metadata={"help": "Teacher samples per held-out opening."})
    teacher_max_new_tokens: int = field(default=64, metadata={"help": "Length of teacher completions (tokens)."})
    teacher_sample_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of teacher completions (0: greedy)."}
    )
    teacher_batch_size: int = field(default=32, metadata={"help": "Batch size of teacher generation and caching."})
    completions_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where teacher completions are cached (default: <output_dir>/cache)."}
    )
    teacher_topk: int = field(
        default=0,
        metadata={"help": "Cache the teacher's top-k log-probabilities per token (at --temperature) and train from "
                  "them without running the teacher. 0: run the teacher at every step."},
    )
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters on the student instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules to adapt, e.g. q_proj v_proj; 'all-linear': every linear layer but the LM head."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "After training, merge the adapter into a plain model in <output_dir>/merged."}
    )
    skip_initial_eval: bool = field(default=False, metadata={"help": "Do not evaluate the student before training."})
    teacher_tokenizer: Optional[str] = field(
        default=None,
        metadata={"help": "Cross-tokenizer distillation: the teacher's tokenizer (a folder, a Hub id, llama2c:<folder>, "
                  "or the --teacher value itself for the tokenizer loaded with it) when the --student "
                  "folder has a tokenizer of its own; both tokenize each prompt/completion and the loss compares "
                  "character-aligned groups (--cross_tokenizer_loss). Held-out metrics are then the student's only."},
    )


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def parse_arguments(argv: Sequence[str]) -> tuple[ScriptArguments, Any]:
    """ScriptArguments and DistillationArguments from the command line (with this script's defaults)."""
    from transformers import HfArgumentParser

    from hf_distill import DistillationArguments

    argv = list(argv)
    parser = HfArgumentParser((ScriptArguments, DistillationArguments))
    parser.set_defaults(**SCRIPT_DEFAULTS)
    if "--output_dir" not in argv:
        argv += ["--output_dir", "runs/distill_causal_lm"]
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if args.distillation_task != "causal-lm":
        raise ValueError(f"This script distils causal LMs; --distillation_task must be causal-lm, got {args.distillation_task!r}.")
    if not 0.0 <= script.heldout_fraction < 1.0:
        raise ValueError(f"--heldout_fraction must be in [0, 1), got {script.heldout_fraction}.")
    if script.teacher_topk < 0:
        raise ValueError(f"--teacher_topk must be >= 0, got {script.teacher_topk}.")
    if script.teacher_topk and args.lmbda > 0:
        raise ValueError("--teacher_topk trains without the teacher, but on-policy steps (--lmbda > 0) need it to score "
                         "the student's own samples. Use one or the other.")
    if script.merge_lora and not script.use_lora:
        raise ValueError("--merge_lora needs --use_lora.")
    return script, args


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def _with_pad_token(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token; set one before distilling.")
        tokenizer.pad_token = tokenizer.eos_token  # stories260K: EOS id 2
    return tokenizer


def load_llama2c_teacher(folder: str | Path) -> tuple[Any, Any]:
    """A llama2.c folder as (teacher, tokenizer with a pad token), converted on the fly."""
    from hf_distill.teachers import load_llama2c_teacher as load

    if not Path(folder).expanduser().is_dir():
        raise FileNotFoundError(
            f"llama2.c teacher folder {str(folder)!r} does not exist. The default teacher lives in "
            f"{DEFAULT_TEACHER_DIR}; pass --teacher <folder, Hub id or llama2c:<dir>>."
        )
    teacher, tokenizer = load(folder)
    return teacher, _with_pad_token(tokenizer)


def load_causal_teacher(spec: Optional[str], base_model: Optional[str] = None,
                        allow_pickle_weights: bool = False) -> tuple[Any, Any]:
    """The teacher (eval mode) and its tokenizer from ``--teacher`` (see its help)."""
    from transformers import AutoTokenizer

    from hf_distill.peft_students import load_adapter_model, refuse_adapter_without_base
    from hf_distill.teachers import load_teacher

    if spec is None:
        return load_llama2c_teacher(DEFAULT_TEACHER_DIR)
    if spec.startswith(LLAMA2C_PREFIX):
        return load_llama2c_teacher(spec[len(LLAMA2C_PREFIX):])
    base = refuse_adapter_without_base(spec, role="teacher", base_model=base_model)
    if base is None:
        refuse_non_causal_teacher(spec)
    if base is not None:  # an adapter with a reachable base: the teacher is the merged full model
        teacher = load_adapter_model(spec, base_model=base, role="teacher").merge_and_unload()
        tokenizer_source = spec if any((Path(spec) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")) else base
    else:
        teacher = load_teacher(spec, "causal-lm", allow_pickle_weights=allow_pickle_weights)
        tokenizer_source = spec
    return teacher.eval(), _with_pad_token(AutoTokenizer.from_pretrained(tokenizer_source))


def refuse_non_causal_teacher(spec: str) -> None:
    """A checkpoint saved without a language-model head (an encoder such as BERT) cannot teach next tokens."""
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        return  # a Hub id, or a folder load_teacher explains
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(
            f"--teacher {spec} is a {', '.join(architectures)} checkpoint, not a causal language model (no *ForCausalLM "
            "head). Distil encoders for classification with scripts/distill_classification.py --teacher "
            f"{spec}; this script needs a decoder such as stories260K or a *ForCausalLM folder."
        )


def build_causal_student(script: ScriptArguments, teacher: Any, teacher_tokenizer: Any, seed: int = 0,
                         allow_pickle_weights: bool = False) -> Any:
    """The student from ``--student`` (vocabulary checked), a narrow random init, or the teacher's blocks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill import create_student
    from hf_distill.peft_students import load_adapter_model, refuse_adapter_without_base
    from hf_distill.safe_loading import from_pretrained_safely
    from hf_distill.teachers import check_same_tokenizer

    if script.student:
        path = Path(script.student).expanduser()
        if refuse_adapter_without_base(script.student, role="student") is not None:
            student = load_adapter_model(script.student, role="student").merge_and_unload()
        else:
            from hf_distill.data import explain_model_load_errors

            with explain_model_load_errors(script.student, "--student"):
                student = from_pretrained_safely(AutoModelForCausalLM, script.student, allow_pickle_weights)
        has_tokenizer = path.is_dir() and any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
        if has_tokenizer or not path.exists():
            try:
                student_tokenizer = AutoTokenizer.from_pretrained(script.student)
            except (OSError, ValueError):
                student_tokenizer = None
            if student_tokenizer is not None:
                check_same_tokenizer(teacher_tokenizer, student_tokenizer)
        return student
    if script.student_hidden_size:
        student = narrow_causal_student(teacher, script.student_hidden_size, script.student_layers,
                                        script.student_intermediate_size, script.student_num_heads, seed=seed)
    elif script.student_layer_indices:
        student = create_student(teacher, layers=script.student_layer_indices)
    else:
        student = create_student(teacher, num_layers=script.student_layers)
    # Built here, so not loadable from the teacher's path (a LoRA adapter would record that path as its base).
    student.config._name_or_path = student.name_or_path = ""
    return student


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def load_prompt_completion_data(name: str, split: str, config: Optional[str] = None, flag: str = "--dataset") -> Any:
    """A Dataset from a .json/.jsonl file, a save_to_disk folder, a folder of <split>.jsonl, or a Hub id; errors
    name the flag, the file and the fix (an empty file, a local path that does not exist)."""
    import datasets

    from hf_distill.data import load_hub_dataset, load_json_dataset

    example = '{"prompt": ..., "completion": ...}'
    path = Path(name).expanduser()
    if path.is_file():
        return load_json_dataset(path, flag=flag, example=example)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{flag} {path} has splits {list(loaded)}, not {split!r}; pass the split to use.")
                return loaded[split]
            return loaded
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                return load_json_dataset(path / f"{split}{suffix}", flag=flag, example=example)
        raise FileNotFoundError(f"{flag} {path} holds neither a saved dataset nor {split}.jsonl.")
    return load_hub_dataset(name, flag=flag, name=config, split=split)


def _teacher_samples(teacher: Any, tokenizer: Any, prompts: Sequence[Any], script: ScriptArguments, cache_dir: Path,
                     seed: int) -> Any:
    from hf_distill.causal_lm import cache_teacher_completions

    sample = script.teacher_sample_temperature > 0
    return cache_teacher_completions(
        teacher, tokenizer, list(prompts), cache_dir=cache_dir, max_new_tokens=script.teacher_max_new_tokens,
        batch_size=script.teacher_batch_size, do_sample=sample,
        temperature=script.teacher_sample_temperature if sample else 1.0, seed=seed, show_progress=True,
    )


def build_datasets(script: ScriptArguments, teacher: Any, tokenizer: Any, cache_dir: Path, seed: int,
                   lmbda: float = 0.0) -> tuple[Any, Any]:
    """(train, held-out) text datasets with prompt/completion (or messages) columns; prompt-only training data
    (with ``lmbda`` = 1) stays prompt-only, and its held-out prompts are completed by teacher samples."""
    if script.dataset is None:
        train = _teacher_samples(teacher, tokenizer, STORY_OPENINGS * script.samples_per_prompt, script, cache_dir, seed)
        heldout = _teacher_samples(teacher, tokenizer, HELDOUT_OPENINGS * script.heldout_samples_per_prompt, script,
                                   cache_dir, seed + 1)
        return train, heldout
    train = load_prompt_completion_data(script.dataset, script.dataset_split, script.dataset_config)
    if script.eval_dataset:
        heldout = load_prompt_completion_data(script.eval_dataset, script.eval_split, script.dataset_config,
                                              flag="--eval_dataset")
    elif script.heldout_fraction > 0:
        parts = train.train_test_split(test_size=script.heldout_fraction, seed=seed)
        train, heldout = parts["train"], parts["test"]
    else:
        heldout = None
    prompt_only = check_columns(train, script, lmbda)
    if script.max_train_samples:
        train = train.select(range(min(script.max_train_samples, len(train))))
    if heldout is not None and is_prompt_only_text(heldout, script):  # held-out teacher samples of the prompts
        heldout = _teacher_samples(teacher, tokenizer, heldout[script.prompt_column], script, cache_dir, seed + 1)
    if script.teacher_completions and not prompt_only:
        if script.prompt_column not in train.column_names:
            raise ValueError(f"--teacher_completions needs a '{script.prompt_column}' column; the data has "
                             f"{train.column_names}.")
        train = _teacher_samples(teacher, tokenizer, train[script.prompt_column], script, cache_dir, seed)
    return train, heldout


def is_prompt_only_text(dataset: Any, script: ScriptArguments) -> bool:
    """A prompt column (text or chat messages) without completions or chat ``messages``."""
    columns = set(dataset.column_names)
    return script.prompt_column in columns and not {script.completion_column, script.messages_column} & columns


def check_columns(dataset: Any, script: ScriptArguments, lmbda: float = 0.0) -> bool:
    """Refuse data without prompt/completion (or chat) columns, naming the columns found and the flags; True for
    prompt-only data that the student completes at every step (``--lmbda 1``; else refused, naming the flag)."""
    columns = set(dataset.column_names)
    if is_prompt_only_text(dataset, script) and not script.teacher_completions:
        if lmbda < 1:
            raise ValueError(
                f"--dataset {script.dataset} has prompts only ('{script.prompt_column}', no "
                f"'{script.completion_column}'): the student must complete them at every step. Pass --lmbda 1 "
                "(on-policy, as TRL's DistillationTrainer), or --teacher_completions true to train on teacher samples."
            )
        return True
    if script.messages_column in columns or script.prompt_column in columns and (
            script.completion_column in columns or script.teacher_completions):
        return False
    raise ValueError(
        f"--dataset {script.dataset} has columns {sorted(columns)}, but this script trains on prompt/completion pairs "
        f"('{script.prompt_column}' + '{script.completion_column}'), chat '{script.messages_column}', or prompts only "
        "with --lmbda 1 (on-policy). Name yours with --prompt_column / --completion_column / --messages_column "
        "(--teacher_completions: complete the prompts with teacher samples)."
    )


def tokenize(dataset: Any, tokenizer: Any, script: ScriptArguments, limit: Optional[int] = None,
             teacher_tokenizer: Any = None) -> Any:
    from hf_distill import tokenize_completions
    from hf_distill.lm.cross_tokenizer_data import tokenize_aligned

    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if teacher_tokenizer is not None:  # cross-tokenizer: each side's own tokens, and the aligned groups
        return tokenize_aligned(dataset, tokenizer, teacher_tokenizer, max_length=script.max_length,
                                prompt_column=script.prompt_column, completion_column=script.completion_column)
    return tokenize_completions(dataset, tokenizer, max_length=script.max_length, prompt_column=script.prompt_column,
                                completion_column=script.completion_column, messages_column=script.messages_column,
                                truncation_side=script.truncation_side)


# ----------------------------------------------------------------------------------------------
# Evaluation (independent of hf_distill.losses)
# ----------------------------------------------------------------------------------------------
def student_heldout_metrics(student: Any, dataset: Any, tokenizer: Any, batch_size: int = 16) -> dict[str, float]:
    """Cross-tokenizer runs: the student's perplexity of the held-out completions, on its own tokens."""
    from hf_distill.causal_lm import CompletionCollator

    collate, nll, tokens = CompletionCollator(tokenizer), 0.0, 0.0
    device, was_training = next(student.parameters()).device, student.training
    student.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([{k: dataset[i][k] for k in ("input_ids", "attention_mask", "labels")}
                             for i in range(start, min(start + batch_size, len(dataset)))])
            logits = student(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
            targets = batch["labels"][:, 1:].to(device)
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            tokens += float((targets != -100).sum())
    student.train(was_training)
    return {"ppl": math.exp(nll / max(tokens, 1.0)), "tokens": tokens}


def results_table(results: dict[str, Any]) -> str:
    rows = ["| model | held-out KL(teacher ‖ model) | held-out perplexity | top-1 agreement | parameters |",
            "|---|---:|---:|---:|---:|"]
    final = results["final"]
    rows.append(f"| teacher | 0 | {final['teacher_ppl']:.3f} | 1 | {results['teacher_parameters']:,} |")
    if results.get("initial"):
        i = results["initial"]
        rows.append(f"| student before training | {i['kl']:.4f} | {i['ppl']:.3f} | {i['top1_agreement']:.3f} | "
                    f"{results['student_parameters']:,} |")
    rows.append(f"| student after training | {final['kl']:.4f} | {final['ppl']:.3f} | {final['top1_agreement']:.3f} | "
                f"{results['student_parameters']:,} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def load_teacher_and_tokenizer(script: ScriptArguments, args: Any) -> tuple[Any, Any]:
    """The teacher on ``args.device`` and its tokenizer (a damaged weights file is named in the error)."""
    from hf_distill.data import explain_model_load_errors

    with explain_model_load_errors(script.teacher or DEFAULT_TEACHER_DIR, "--teacher"):
        teacher, tokenizer = load_causal_teacher(script.teacher, script.teacher_base_model, args.allow_pickle_weights)
    teacher.to(args.device)
    logger.info("Teacher %s: %d parameters, vocabulary %d", getattr(teacher.config, "_name_or_path", None),
                sum(p.numel() for p in teacher.parameters()), teacher.config.vocab_size)
    return teacher, tokenizer


def cross_tokenizers(script: ScriptArguments, loaded_teacher_tokenizer: Any = None) -> tuple[Any, Any]:
    """--teacher_tokenizer: (the student's tokenizer from --student, the teacher's from --teacher_tokenizer: the one
    loaded with the teacher when it names the teacher itself, ``llama2c:<folder>`` included)."""
    from transformers import AutoTokenizer

    from hf_distill.teachers import load_llama2c_teacher

    if not script.student or script.teacher_topk:
        raise ValueError("--teacher_tokenizer needs --student (a folder or Hub id with the student's own tokenizer) and "
                         "a live teacher (not --teacher_topk, whose cache indexes the teacher's vocabulary).")
    name = script.teacher_tokenizer
    if name == script.teacher and loaded_teacher_tokenizer is not None:
        teacher_tokenizer = loaded_teacher_tokenizer
    elif name.startswith("llama2c:"):
        teacher_tokenizer = load_llama2c_teacher(name[len("llama2c:"):])[1]
    else:
        teacher_tokenizer = AutoTokenizer.from_pretrained(name)
    return _with_pad_token(AutoTokenizer.from_pretrained(script.student)), _with_pad_token(teacher_tokenizer)


def prepare_data(script: ScriptArguments, args: Any, teacher: Any, tokenizer: Any,
                 teacher_tokenizer: Any = None) -> tuple[Any, Any]:
    """Tokenized (train, held-out); teacher completions and the top-k cache are made on the main process first."""
    from hf_distill import cache_teacher_outputs

    cache_dir = Path(script.completions_cache_dir) if script.completions_cache_dir else Path(args.output_dir) / "cache"
    with args.main_process_first(desc="teacher completions and tokenization"):
        train_text, heldout_text = build_datasets(script, teacher, teacher_tokenizer or tokenizer, cache_dir, args.seed,
                                                  args.lmbda)
        train = tokenize(train_text, tokenizer, script, teacher_tokenizer=teacher_tokenizer)
        heldout = tokenize(heldout_text, tokenizer, script, script.max_eval_samples) if heldout_text is not None else None
        if script.teacher_topk:
            train = cache_teacher_outputs(teacher, train, top_k=script.teacher_topk, temperature=args.temperature,
                                          batch_size=script.teacher_batch_size)
    logger.info("Data: %d training rows, %d held-out rows%s", len(train), 0 if heldout is None else len(heldout),
                f", top-{script.teacher_topk} teacher cache" if script.teacher_topk else "")
    return train, heldout


def make_trainer(script: ScriptArguments, args: Any, student: Any, teacher: Any, tokenizer: Any, train: Any,
                 teacher_tokenizer: Any = None) -> Any:
    """The DistillationTrainer (LoRA-wrapped with --use_lora). Built before any model runs, so that it refuses a
    mismatched teacher/student pair with its own message first."""
    from hf_distill import DistillationTrainer
    from hf_distill.causal_lm import CompletionCollator
    from hf_distill.peft_students import lora_config

    trainer_kwargs: dict[str, Any] = {}
    if script.use_lora:  # the trainer wraps the student: only the adapters train
        trainer_kwargs["peft_config"] = lora_config(r=script.lora_r, alpha=script.lora_alpha,
                                                    dropout=script.lora_dropout, target_modules=script.lora_target_modules)
    return DistillationTrainer(
        model=student, teacher_model=None if script.teacher_topk else teacher, args=args, train_dataset=train,
        data_collator=None if teacher_tokenizer else CompletionCollator(tokenizer), processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer or tokenizer,
        **trainer_kwargs,
    )


def evaluate_on_heldout(model: Any, teacher: Any, heldout: Any, tokenizer: Any, args: Any, when: str,
                        cross_tokenizer: bool = False) -> Optional[dict]:
    """Held-out metrics on the main process (None without held-out data); the student's only across tokenizers."""
    if heldout is None or args.process_index != 0:
        return None
    if cross_tokenizer:
        metrics = student_heldout_metrics(model, heldout, tokenizer, args.per_device_eval_batch_size)
        logger.info("%s: held-out perplexity %.3f (student tokens)", when, metrics["ppl"])
        return metrics
    metrics = heldout_metrics(model, teacher, heldout, tokenizer, args.per_device_eval_batch_size)
    logger.info("%s: held-out KL %.4f, perplexity %.3f", when, metrics["kl"], metrics["ppl"])
    return metrics


def train_and_save(trainer: Any, args: Any, resume: Any) -> dict[str, Any]:
    """Train (resuming when asked), save the student; the facts of the run for results.json."""
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - start
    trainer.save_model(str(args.output_dir))
    return {"steps": trainer.state.global_step, "train_loss": train_output.training_loss, "train_seconds": seconds,
            "teacher_at_train_time": trainer.teacher is not None, "resumed_from": resume}


def describe_run(script: ScriptArguments, args: Any, teacher: Any, student: Any, train: Any, heldout: Any) -> dict:
    """Models, data sizes and arguments of the run."""
    return {
        "teacher": getattr(teacher.config, "_name_or_path", None) or script.teacher,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "train_examples": len(train), "heldout_examples": len(heldout) if heldout is not None else 0,
        "teacher_topk": script.teacher_topk or None, "lora": script.use_lora,
        "arguments": {"script": dataclasses.asdict(script), "distillation": args.distillation_dict()},
    }


def merge_adapter(student: Any, tokenizer: Any, output_dir: Path) -> dict[str, Any]:
    """--merge_lora: the adapter merged into a plain model in ``<output_dir>/merged`` (with the recipe)."""
    from hf_distill.peft_students import merge_lora_student

    merged_dir = output_dir / "merged"
    merged = merge_lora_student(student, merged_dir, tokenizer=tokenizer)
    if (output_dir / "distillation").is_dir():
        shutil.copytree(output_dir / "distillation", merged_dir / "distillation", dirs_exist_ok=True)
    return {"merged_dir": str(merged_dir), "merged_parameters": sum(p.numel() for p in merged.parameters())}


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """``results.json`` and, with held-out metrics, ``results.md`` (printed too)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if results["final"] is not None and "kl" in results["final"]:  # not in cross-tokenizer runs
        table = results_table(results)
        (output_dir / "results.md").write_text(table + "\n")
        print(table)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse, load the teacher, build the data and the student, build the trainer (it checks the pair), evaluate,
    distil (resuming when asked), evaluate again, save; returns the results written to ``results.json``."""
    import datasets
    from transformers import set_seed

    from hf_distill.data import resume_argument
    from hf_distill.students import check_layer_choice

    script, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if args.disable_tqdm:
        datasets.disable_progress_bars()
    set_seed(args.seed)
    resume, output_dir = resume_argument(args.resume_from_checkpoint), Path(args.output_dir)
    teacher, tokenizer = load_teacher_and_tokenizer(script, args)
    check_layer_choice(teacher.config.num_hidden_layers, script.student_layers, script.student_layer_indices,
                       script.student, script.student_hidden_size)
    # --teacher_tokenizer: cross-tokenizer distillation, and from here on `tokenizer` is the student's
    tokenizer, teacher_tokenizer = cross_tokenizers(script, tokenizer) if script.teacher_tokenizer else (tokenizer, None)
    cross = teacher_tokenizer is not None
    train, heldout = prepare_data(script, args, teacher, tokenizer, teacher_tokenizer)
    set_seed(args.seed)
    student = build_causal_student(script, teacher, tokenizer, args.seed, args.allow_pickle_weights).to(args.device)
    trainer = make_trainer(script, args, student, teacher, tokenizer, train, teacher_tokenizer)
    initial = None if script.skip_initial_eval else evaluate_on_heldout(trainer.model, teacher, heldout, tokenizer,
                                                                        args, "Before training", cross)
    results = {**describe_run(script, args, teacher, trainer.model, train, heldout), "initial": initial,
               **train_and_save(trainer, args, resume)}
    results["final"] = evaluate_on_heldout(trainer.model, teacher, heldout, tokenizer, args, "After training", cross)
    if args.process_index == 0:
        write_results(results, output_dir)  # before the merge: a failed merge keeps the results and the card
        trainer.create_model_card(dataset_name=Path(script.dataset).name if script.dataset else "teacher-generated stories")
        if script.merge_lora:
            results.update(merge_adapter(trainer.model, tokenizer, output_dir))
            write_results(results, output_dir)
    return results


if __name__ == "__main__":
    main()
