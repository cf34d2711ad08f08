"""Teachers: loading, checking against the student, freezing, dtype, placement, compiling, summarising.

One way for every entry point: :func:`load_teacher` takes a local folder, a Hub id, a LoRA adapter folder
(merged into its base) or ``llama2c:<dir>`` (a llama2.c checkpoint, converted); :func:`prepare_teacher`
freezes, checks, casts, shards and compiles it for a run. The trainer calls nothing else of this module
but :func:`check_vocabularies` and :func:`teacher_summary`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
)

from .arguments import TEACHER_DTYPES
from .safe_loading import from_pretrained_safely
from .tasks import unwrap_model

logger = logging.getLogger(__name__)

AUTO_CLASS_BY_TASK = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
    "feature-extraction": AutoModel,  # headless: general distillation of hidden states, attentions, relations
    "sentence-embedding": AutoModel,
}
LLAMA2C_PREFIX = "llama2c:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
def _load_local(path: Path, task: str, trust_remote_code: bool, allow_pickle_weights: bool) -> PreTrainedModel:
    from .peft_students import merge_lora_student, refuse_adapter_without_base

    if refuse_adapter_without_base(path, role="teacher") is not None:  # a LoRA adapter whose base is here
        logger.info("Teacher %s is a LoRA adapter: merged into its base for distillation.", path)
        return merge_lora_student(str(path), allow_pickle_weights=allow_pickle_weights)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"Teacher folder {path} has no config.json; save the teacher with save_pretrained().")
    return from_pretrained_safely(AUTO_CLASS_BY_TASK[task], path, allow_pickle_weights, trust_remote_code=trust_remote_code)


def load_llama2c_teacher(folder: str | Path) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) of a llama2.c folder (one checkpoint ``*.bin`` and its SentencePiece ``*.model``),
    converted on the fly; the model's name is ``llama2c:<folder>``."""
    from .llama2c import convert_llama2c

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"llama2.c teacher folder {str(folder)!r} does not exist; pass llama2c:<folder>.")
    checkpoints = sorted(p for p in folder.glob("*.bin") if not p.name.startswith("tok"))
    tokenizers = sorted(folder.glob("*.model")) or sorted(folder.glob("tok*.bin"))
    if len(checkpoints) != 1 or not tokenizers:
        raise FileNotFoundError(
            f"{folder} must hold one llama2.c checkpoint (*.bin) and its SentencePiece tokenizer (*.model); found "
            f"checkpoints {[p.name for p in checkpoints]} and tokenizers {[p.name for p in tokenizers]}."
        )
    model, tokenizer = convert_llama2c(checkpoints[0], tokenizers[0])
    model.config._name_or_path = f"{LLAMA2C_PREFIX}{folder}"
    return model.eval(), tokenizer


def load_teacher(name_or_path: str, task: str, trust_remote_code: bool = False,
                 allow_pickle_weights: bool = False) -> PreTrainedModel:
    """Load a teacher for ``task``: a local folder (safetensors only unless ``allow_pickle_weights``), a LoRA
    adapter folder (merged into its base), ``llama2c:<dir>``, or a Hub id; with an error naming the fix when none
    of them works."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith(LLAMA2C_PREFIX):
        return load_llama2c_teacher(name_or_path[len(LLAMA2C_PREFIX):])[0]
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _load_local(path, task, trust_remote_code, allow_pickle_weights)
    if not _REPO_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"Teacher path {name_or_path!r} does not exist. Pass a folder written by save_pretrained() "
            "or a Hub model id such as 'bert-base-uncased'."
        )
    try:
        return from_pretrained_safely(AUTO_CLASS_BY_TASK[task], name_or_path, allow_pickle_weights,
                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not load teacher {name_or_path!r}: it is not a local folder and could not be loaded from the "
            f"Hub ({error.__class__.__name__}: {error}). Check the name and your network, or pass a local folder."
        ) from error


def load_teachers(teacher_model: Any, task: str, trust_remote_code: bool = False,
                  self_distillation_of: Optional[nn.Module] = None,
                  allow_pickle_weights: bool = False) -> tuple[list[nn.Module], list]:
    """(models, names): ``teacher_model`` (one or a list; models, folders or Hub ids) loaded, with the names the
    recipe records. Without a teacher, ``self_distillation_of`` (the student) gives a frozen snapshot of it."""
    teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else (
        [] if teacher_model is None else [teacher_model]
    )
    if not teachers and self_distillation_of is not None:
        from .self_distillation import snapshot_teacher

        teachers = [snapshot_teacher(self_distillation_of)]
    names = [
        str(t) if isinstance(t, (str, os.PathLike)) else getattr(getattr(t, "config", None), "_name_or_path", None)
        for t in teachers
    ]
    models = [
        load_teacher(str(t), task, trust_remote_code, allow_pickle_weights) if isinstance(t, (str, os.PathLike)) else t
        for t in teachers
    ]
    return models, names


def resolve_teacher_weights(count: int, weights: Optional[Sequence[float]], intermediate_teacher: int = 0) -> list[float]:
    """One weight per teacher (equal by default); the intermediate teacher's index is checked too."""
    if weights is None:
        return [1.0 / count] * count if count else []
    if len(weights) != count:
        raise ValueError(f"Got {len(weights)} teacher_weights for {count} teachers; give one weight per teacher.")
    if count and not 0 <= intermediate_teacher < count:
        raise ValueError(f"`intermediate_teacher` {intermediate_teacher} is out of range for {count} teachers.")
    return list(weights)


# ---------------------------------------------------------------------------------------------- checks
def _default_label_map(id2label: dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def _embedding_rows(model: nn.Module) -> Optional[int]:
    embeddings = unwrap_model(model).get_input_embeddings() if hasattr(unwrap_model(model), "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else int(weight.shape[0])


def _tokenizer_difference(teacher_tokenizer: Any, student_tokenizer: Any) -> Optional[str]:
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return None
    differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:5]
    return f"the tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} entries; e.g. {differing})"


SAME_TOKENIZER, CROSS_TOKENIZER = "same-tokenizer", "cross-tokenizer"


def check_vocabularies(
    teacher: Optional[nn.Module], student: nn.Module, teacher_tokenizer: Any = None, student_tokenizer: Any = None,
    *, separate_teacher_inputs: bool = False, allow_larger_teacher: bool = False, task: Optional[str] = None,
) -> str:
    """Choose and log the mode: ``"cross-tokenizer"`` for a causal-LM ``task`` whose two tokenizers (both given)
    differ in vocabulary, else ``"same-tokenizer"``, where teacher and student must read the same token ids:
    the tokenizers are compared entry by entry when both are given, else the input-embedding sizes. Skipped
    when the batches carry the teacher's own ``teacher_input_ids`` (``separate_teacher_inputs``);
    ``allow_larger_teacher`` accepts a teacher padded with extra rows (``truncate_teacher_vocab``). Raises
    ValueError naming the fix."""
    problem = None
    if teacher_tokenizer is not None and student_tokenizer is not None and teacher_tokenizer is not student_tokenizer:
        problem = _tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if problem is not None and task == "causal-lm":
        logger.info("Teacher and student tokenizers differ (%s): cross-tokenizer mode (each side reads its own "
                    "tokens; the loss compares character-aligned groups).", problem)
        return CROSS_TOKENIZER
    if separate_teacher_inputs:
        return SAME_TOKENIZER
    if problem is None and teacher is not None:
        t_rows, s_rows = _embedding_rows(teacher), _embedding_rows(student)
        padded = allow_larger_teacher and t_rows is not None and s_rows is not None and t_rows > s_rows
        if t_rows is not None and s_rows is not None and t_rows != s_rows and not padded:
            problem = f"the input embeddings differ ({t_rows} teacher rows vs {s_rows} student rows)"
            if t_rows > s_rows:
                problem += "; if the teacher's extra rows only pad the same vocabulary, pass --truncate_teacher_vocab"
    if problem is not None:
        across = " (distillation across tokenizers is only for causal-lm)" if task not in (None, "causal-lm") else ""
        raise ValueError(
            f"Teacher and student vocabularies differ: {problem}. Distillation compares outputs on the same token ids, "
            f"so both sides need the same tokenizer{across}: give the student the teacher's tokenizer (create_student(teacher), "
            "or a --student folder with the teacher's vocabulary), or give the teacher its own ids as "
            "`teacher_input_ids` columns. For a causal LM, pass the teacher's tokenizer as `teacher_processing_class` "
            "(--teacher_tokenizer) for cross-tokenizer mode."
        )
    logger.info("Teacher and student read the same token ids: same-tokenizer mode.")
    return SAME_TOKENIZER


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """The two tokenizers map the same strings to the same ids (ValueError naming the fix otherwise)."""
    check_vocabularies(None, None, teacher_tokenizer, student_tokenizer)


def check_teacher_student_compatible(
    teacher: nn.Module, student: nn.Module, task: str, truncate_teacher_vocab: bool = False,
    cross_tokenizer: bool = False,
) -> None:
    """Refuse pairs whose outputs cannot be compared: label counts or maps, or vocabulary sizes (not compared in
    cross-tokenizer mode, where each side has its own vocabulary)."""
    t_config, s_config = unwrap_model(teacher).config, unwrap_model(student).config
    if task == "causal-lm" and cross_tokenizer:
        return
    if task == "causal-lm":
        t_vocab = unwrap_model(teacher).get_output_embeddings().weight.shape[0]
        s_vocab = unwrap_model(student).get_output_embeddings().weight.shape[0]
        if t_vocab > s_vocab and truncate_teacher_vocab:
            logger.info("Teacher has %d output rows, the student %d: the extra teacher rows are dropped.", t_vocab, s_vocab)
        elif t_vocab != s_vocab:
            raise ValueError(
                f"Teacher and student vocabularies differ ({t_vocab} vs {s_vocab} output rows). Token-level "
                "distillation needs the same tokenizer and vocabulary; build the student with the teacher's tokenizer. "
                "If the teacher's extra rows are only padding of the same vocabulary, pass --truncate_teacher_vocab."
            )
        return
    if task in ("question-answering", "feature-extraction", "sentence-embedding"):
        return
    if t_config.num_labels != s_config.num_labels:
        raise ValueError(
            f"Teacher has {t_config.num_labels} labels but the student has {s_config.num_labels}. Create the student "
            "with the teacher's num_labels, id2label and label2id (create_student() copies them)."
        )
    t_map = {int(k): v for k, v in t_config.id2label.items()}
    s_map = {int(k): v for k, v in s_config.id2label.items()}
    if t_map != s_map and not (_default_label_map(t_map) or _default_label_map(s_map)):
        raise ValueError(
            f"Teacher and student label maps differ: teacher {t_map}, student {s_map}. Give the student the "
            "teacher's id2label/label2id so that logit i means the same class in both."
        )


# ---------------------------------------------------------------------------------------------- preparing
def freeze_teacher(teacher: nn.Module, student: nn.Module, freeze: bool = True) -> None:
    """Freeze the teacher (or check it is frozen); refuse a teacher that shares parameters with the student."""
    student_params = {id(p) for p in student.parameters()}
    if any(id(p) in student_params for p in teacher.parameters()):
        raise ValueError(
            "The teacher shares parameters with the student, so freezing it would freeze the student. "
            "Pass a separate copy (copy.deepcopy(student)) or a different model as the teacher."
        )
    if freeze:
        teacher.requires_grad_(False)
    elif any(p.requires_grad for p in teacher.parameters()):
        raise ValueError(
            "The teacher has parameters that require gradients. Freeze it with teacher.requires_grad_(False) "
            "or keep `freeze_teacher=True` so the trainer does it."
        )


def teacher_summary(teacher: nn.Module) -> dict[str, Any]:
    """What the recipe records of a teacher: a weight fingerprint and the parameter count."""
    from .teacher_cache import model_fingerprint

    return {"fingerprint": model_fingerprint(teacher), "num_parameters": sum(p.numel() for p in teacher.parameters())}


def compile_teacher(teacher: nn.Module, args: Any) -> nn.Module:
    """``torch.compile`` the teacher when ``torch_compile_teacher`` is on (once: Accelerate compiles every
    prepared model, the teacher too, when ``torch_compile``, the student's switch, is on)."""
    if not args.torch_compile_teacher or hasattr(teacher, "_orig_mod"):
        return teacher
    return torch.compile(teacher, backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)


def prepare_teacher(teacher: nn.Module, student: nn.Module, task: str, accelerator: Any, args: Any,
                    cross_tokenizer: bool = False) -> tuple[nn.Module, dict]:
    """(teacher ready for the run, its summary): frozen, checked against the student (its own vocabulary in
    ``cross_tokenizer`` mode), in eval mode and ``teacher_dtype``, placed (replicated or sharded, see
    distributed.py) and compiled if asked. The summary is taken before sharding, since a shard's weights are
    not the teacher's."""
    from .distributed import place_teacher

    freeze_teacher(teacher, student, args.freeze_teacher)
    check_teacher_student_compatible(teacher, student, task, args.truncate_teacher_vocab, cross_tokenizer)
    teacher.eval()
    if args.teacher_dtype != "auto":
        teacher.to(TEACHER_DTYPES[args.teacher_dtype])
    summary = teacher_summary(teacher)
    return compile_teacher(place_teacher(teacher, accelerator, args), args), summary


__all__ = [
    "AUTO_CLASS_BY_TASK", "TEACHER_DTYPES", "check_teacher_student_compatible", "check_vocabularies", "load_teacher",
    "load_teachers", "prepare_teacher", "resolve_teacher_weights", "teacher_summary",
]
