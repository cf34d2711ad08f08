"""`DistillationTrainer`: the stock `transformers.Trainer` loop with a teacher in the loss.

One training step (see DESIGN.md)::

    batch ─► student(**inputs)                 ─► student logits ─┐
          └► teacher(**teacher_inputs) or cache ─► teacher targets ┴► rows (tasks.py) ─► loss terms ─► loss

    loss = alpha · KD(teacher ‖ student; T) · T² + (1 − alpha) · CE(student, labels)
         + w_hidden · L_hidden + w_attention · L_attention + w_relation · L_relation

alpha and T may follow schedules; with several teachers KD reads their mixture (or sums one KD per
teacher); the intermediate terms read ``hidden_states`` / ``attentions`` of the same two forwards.

Normalisation: every term is a sum over items (examples, or tokens for token tasks) divided by the
number of items in the whole optimizer step, counted across gradient-accumulation micro-batches and
processes. So batch 8 and 4 × 2 accumulation give the same gradients, on one process or many.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    Trainer,
)

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import __version__
from .arguments import DistillationArguments
from .callbacks import NonFiniteLossCounter, SignalCheckpointCallback
from .collator import TeacherColumnsCollator
from .distributed import place_teacher
from .intermediate import IntermediateSettings, IntermediateTerms, use_eager_attention
from .losses.logits import (
    chunked_weighted_sums,
    fused_forward_kl_and_ce,
    hard_label_loss,
    soft_label_loss,
    teacher_mixture_logits,
    topk_soft_label_loss,
)
from .schedules import scheduled_value
from .tasks import TARGET_KEYS, LogitRows, count_items, detect_task, logit_rows, task_logits, unwrap_model
from .io import atomic_contents, last_complete_checkpoint, replace_directory
from .preflight import (
    MemoryEstimate,
    PreflightReport,
    available_memory_bytes,
    compatibility_summary,
    estimate_peak_memory,
)
from .teacher_cache import model_fingerprint, with_fast_teacher_columns

logger = logging.getLogger(__name__)

AUTO_CLASS_BY_TASK = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
}
PROJECTIONS_FILE = "projections.safetensors"
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Columns that describe a batch but are not model inputs (causal-LM prompts and generation bookkeeping).
NON_MODEL_KEYS = ("prompt_length", "completion_finished", "prompt_input_ids", "prompt_attention_mask")
DISTILLATION_STATE_NAME = "distillation_state.json"  # in checkpoints: non-finite loss counts
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_teacher(name_or_path: str, task: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a teacher for ``task`` from a local folder or a Hub id, with a clear error when neither works."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        from .peft_students import merge_lora_student, refuse_adapter_without_base

        if refuse_adapter_without_base(path, role="teacher") is not None:  # a LoRA adapter whose base is here
            logger.info("Teacher %s is a LoRA adapter: merged into its base for distillation.", path)
            return merge_lora_student(str(path))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"Teacher folder {path} has no config.json; save the teacher with save_pretrained().")
        return AUTO_CLASS_BY_TASK[task].from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not _REPO_ID.match(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"Teacher path {name_or_path!r} does not exist. Pass a folder written by save_pretrained() "
            "or a Hub model id such as 'bert-base-uncased'."
        )
    try:
        return AUTO_CLASS_BY_TASK[task].from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"Could not load teacher {name_or_path!r}: it is not a local folder and could not be loaded from the "
            f"Hub ({error.__class__.__name__}: {error}). Check the name and your network, or pass a local folder."
        ) from error


def _default_label_map(id2label: dict) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Token-level distillation needs the same token ids: compare the two vocabularies entry by entry."""
    if teacher_tokenizer is None or student_tokenizer is None or teacher_tokenizer is student_tokenizer:
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:5]
        raise ValueError(
            f"The teacher's and the student's tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} entries; e.g. "
            f"{differing}). Token-level distillation compares distributions over the same token ids: give the student "
            "the teacher's tokenizer."
        )


def check_teacher_student_compatible(
    teacher: nn.Module, student: nn.Module, task: str, truncate_teacher_vocab: bool = False
) -> None:
    """Refuse pairs whose outputs cannot be compared: label counts or maps, or vocabulary sizes."""
    t_config, s_config = unwrap_model(teacher).config, unwrap_model(student).config
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
    if task == "question-answering":
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


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose loss distils a frozen teacher into the student ``model``.

    Args:
        model: the student.
        teacher_model: a model, a local folder or a Hub id, or a list of them (several teachers, weighted by
            ``args.teacher_weights``); ``None`` when the datasets carry cached teacher outputs (see
            :func:`hf_distill.cache_teacher_outputs`) or with ``args.self_distillation``.
        args: :class:`DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer, when it is a separate object (checked to have the
            student's vocabulary for causal LMs; used to pad ``teacher_``-prefixed inputs).
        peft_config: a PEFT config (e.g. ``LoraConfig``): the student is wrapped with ``get_peft_model`` so that
            only its adapters train; saving writes the adapter. The teacher stays the full model.
        Every other argument is passed to `transformers.Trainer`.
    """

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, None] = None,
        teacher_model: Union[PreTrainedModel, nn.Module, str, list, None] = None,
        args: Optional[DistillationArguments] = None,
        *trainer_args: Any,
        teacher_processing_class: Any = None,
        peft_config: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DistillationTrainer needs the student as `model`.")
        if args is None:
            args = DistillationArguments(output_dir="distilled")
        if not isinstance(args, DistillationArguments):
            raise TypeError("`args` must be DistillationArguments (a TrainingArguments subclass with the recipe).")
        self.task = args.distillation_task or detect_task(model)
        teachers = list(teacher_model) if isinstance(teacher_model, (list, tuple)) else (
            [] if teacher_model is None else [teacher_model]
        )
        if not teachers and args.self_distillation != "none":
            from .self_distillation import snapshot_teacher

            teachers = [snapshot_teacher(model)]
        self.teacher_names = [
            str(t) if isinstance(t, (str, os.PathLike)) else getattr(getattr(t, "config", None), "_name_or_path", None)
            for t in teachers
        ]
        self.teacher_name_or_path = self.teacher_names[0] if self.teacher_names else None
        teachers = [
            load_teacher(str(t), self.task, args.teacher_trust_remote_code) if isinstance(t, (str, os.PathLike)) else t
            for t in teachers
        ]
        self.teacher_weights = self._resolve_teacher_weights(len(teachers), args)
        if peft_config is not None:
            model = self._wrap_with_peft(model, peft_config)
        self.intermediate = self._build_intermediate(args, model, teachers)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._check_datasets()
        if self.task == "causal-lm":
            check_same_tokenizer(teacher_processing_class, self.processing_class)
        self._teacher_summaries: list[dict[str, Any]] = []  # per teacher, taken before sharding (_prepare_teacher)
        self.teachers = [self._prepare_teacher(t) for t in teachers]
        self.teacher = self.teachers[args.intermediate_teacher] if self.teachers else None
        if self.teacher is None and not self._has_cached_teacher():
            raise ValueError(
                "No teacher: pass `teacher_model` (a model, folder or Hub id), or cache its outputs into the "
                "datasets with hf_distill.cache_teacher_outputs() and train from those."
            )
        self._check_cached_outputs()
        self._read_cached_columns_as_arrays()
        if self.intermediate is not None:
            self.intermediate.to(self.args.device)
        if args.self_distillation == "ema":
            from .self_distillation import EMATeacherCallback

            self.add_callback(EMATeacherCallback(self.teacher, self.model, args.ema_decay))
        self.data_collator = TeacherColumnsCollator(
            self.data_collator,
            cached_columns=self._cached_columns(),
            padding_side=getattr(self.processing_class, "padding_side", "right"),
            teacher_pad_token_id=getattr(teacher_processing_class, "pad_token_id", None) or 0,
        )
        # The loss below is normalised by the item count of the whole step (see module doc), so the
        # Trainer must neither divide by the accumulation steps nor count items its own way.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._term_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._eval_counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._last_term_log_step = 0
        self._init_production()

    # ------------------------------------------------------------------ several teachers, PEFT, intermediate terms
    @staticmethod
    def _resolve_teacher_weights(count: int, args: DistillationArguments) -> list[float]:
        if args.teacher_weights is None:
            return [1.0 / count] * count if count else []
        if len(args.teacher_weights) != count:
            raise ValueError(f"Got {len(args.teacher_weights)} teacher_weights for {count} teachers; give one weight per teacher.")
        if count and not 0 <= args.intermediate_teacher < count:
            raise ValueError(f"`intermediate_teacher` {args.intermediate_teacher} is out of range for {count} teachers.")
        return list(args.teacher_weights)

    @staticmethod
    def _wrap_with_peft(model: nn.Module, peft_config: Any) -> nn.Module:
        try:
            from peft import get_peft_model
        except ImportError as error:  # pragma: no cover - peft is a dependency
            raise ImportError("peft_config needs the `peft` package: pip install peft") from error
        model = get_peft_model(model, peft_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        logger.info("LoRA student: %d of %d parameters train (%.2f%%).", trainable, total, 100.0 * trainable / max(total, 1))
        return model

    def _build_intermediate(self, args: DistillationArguments, student: nn.Module, teachers: list) -> Optional[IntermediateTerms]:
        """Resolve layer maps and projections of the hidden/attention/relation terms, before training starts."""
        settings = IntermediateSettings.from_args(args)
        if not settings.active:
            return None
        if not teachers:
            raise ValueError(
                "Hidden-state, attention and relation terms need a live teacher: cached outputs hold logits only. "
                "Pass `teacher_model`, or set hidden_weight/attention_weight/relation_weight to 0."
            )
        teacher = teachers[args.intermediate_teacher]
        terms = IntermediateTerms(settings, unwrap_model(student), unwrap_model(teacher))
        if terms.needs_attentions:
            changed = use_eager_attention(unwrap_model(student), *[unwrap_model(t) for t in teachers])
            if changed:
                logger.warning(
                    "Attention terms need attention weights, which only eager attention returns: switched %s to "
                    "eager for this run.", ", ".join(changed)
                )
        logger.info("Intermediate terms: %s", json.dumps(terms.describe(), default=str))
        return terms

    def _output_flags(self) -> dict[str, bool]:
        if self.intermediate is None:
            return {}
        flags = {}
        if self.intermediate.needs_hidden_states:
            flags["output_hidden_states"] = True
        if self.intermediate.needs_attentions:
            flags["output_attentions"] = True
        return flags

    def create_optimizer(self, *args: Any, **kwargs: Any):
        """The stock optimizer, plus a parameter group for the learned projections (no weight decay)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        projections = None if self.intermediate is None else self.intermediate.projections
        if projections is not None and not getattr(self, "_projections_in_optimizer", False):
            optimizer.add_param_group({"params": list(projections.parameters()), "weight_decay": 0.0})
            self._projections_in_optimizer = True
        return optimizer

    def _sync_projection_gradients(self) -> None:
        """DDP averages the student's gradients; the projections live outside it, so average theirs here."""
        projections = None if self.intermediate is None else self.intermediate.projections
        if projections is None or self.accelerator.num_processes < 2 or not self.accelerator.sync_gradients:
            return
        for p in projections.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.accelerator.num_processes

    # ------------------------------------------------------------------ schedules
    def _progress(self) -> float:
        max_steps = getattr(self.state, "max_steps", 0) or 0
        return self.state.global_step / max_steps if max_steps > 0 else 0.0

    def current_temperature(self) -> float:
        """The temperature at this step (``temperature_schedule``)."""
        a = self.args
        end = a.temperature if a.temperature_end is None else a.temperature_end
        return scheduled_value(a.temperature_schedule, a.temperature, end, self._progress())

    def current_alpha(self) -> float:
        """alpha at this step (``alpha_schedule``)."""
        a = self.args
        end = a.alpha if a.alpha_end is None else a.alpha_end
        return scheduled_value(a.alpha_schedule, a.alpha, end, self._progress())

    # ------------------------------------------------------------------ set-up and checks
    def _cached_columns(self) -> tuple[str, ...]:
        prefix = self.args.teacher_topk_column_prefix
        return (self.args.teacher_logits_column, f"{prefix}_log_probs", f"{prefix}_indices", f"{prefix}_temperature")

    def _dataset_columns(self) -> set[str]:
        columns: set[str] = set()
        datasets_ = [self.train_dataset]
        datasets_ += list(self.eval_dataset.values()) if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for dataset in datasets_:
            columns.update(getattr(dataset, "column_names", None) or [])
        return columns

    def _check_datasets(self) -> None:
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            if dataset is not None and hasattr(dataset, "__len__") and not isinstance(dataset, dict) and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty: there is nothing to distil on. Check the data loading and filters.")

    def _student_output_width(self) -> int:
        student = unwrap_model(self.model)
        if self.task == "causal-lm":
            return student.get_output_embeddings().weight.shape[0]
        return 2 if self.task == "question-answering" else student.config.num_labels

    def _check_cached_outputs(self) -> None:
        """Cached teacher outputs must have the student's output width (labels, positions or vocabulary)."""
        dataset = self.train_dataset
        columns = getattr(dataset, "column_names", None) or []
        width = self._student_output_width()
        if self.args.teacher_logits_column in columns:
            cached = torch.as_tensor(dataset[0][self.args.teacher_logits_column])
            if cached.shape[-1] != width:
                raise ValueError(
                    f"Cached teacher logits have {cached.shape[-1]} values per row but the student outputs {width}. "
                    "Re-cache with cache_teacher_outputs() using a teacher that matches the student."
                )
        indices = f"{self.args.teacher_topk_column_prefix}_indices"
        if indices in columns and int(torch.as_tensor(dataset[0][indices]).max()) >= width:
            raise ValueError(
                f"Cached top-k token ids go beyond the student's vocabulary of {width}. Re-cache with a teacher "
                "that shares the student's tokenizer and vocabulary."
            )

    def _read_cached_columns_as_arrays(self) -> None:
        """Cached teacher columns come out of the datasets as numpy arrays, not Python lists (see teacher_cache)."""
        columns = self._cached_columns()
        self.train_dataset = with_fast_teacher_columns(self.train_dataset, columns)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {k: with_fast_teacher_columns(v, columns) for k, v in self.eval_dataset.items()}
        else:
            self.eval_dataset = with_fast_teacher_columns(self.eval_dataset, columns)

    def _has_cached_teacher(self) -> bool:
        columns = self._dataset_columns()
        return self.args.teacher_logits_column in columns or f"{self.args.teacher_topk_column_prefix}_indices" in columns

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        student_params = {id(p) for p in self.model.parameters()}
        if any(id(p) in student_params for p in teacher.parameters()):
            raise ValueError(
                "The teacher shares parameters with the student, so freezing it would freeze the student. "
                "Pass a separate copy (copy.deepcopy(student)) or a different model as the teacher."
            )
        if self.args.freeze_teacher:
            teacher.requires_grad_(False)
        elif any(p.requires_grad for p in teacher.parameters()):
            raise ValueError(
                "The teacher has parameters that require gradients. Freeze it with teacher.requires_grad_(False) "
                "or keep `freeze_teacher=True` so the trainer does it."
            )
        check_teacher_student_compatible(teacher, self.model, self.task, self.args.truncate_teacher_vocab)
        teacher.eval()
        if self.args.teacher_dtype != "auto":
            teacher.to(TEACHER_DTYPES[self.args.teacher_dtype])
        self._teacher_summaries.append(self._teacher_summary(teacher))  # a shard's weights are not the teacher's
        return self._compile_teacher(place_teacher(teacher, self.accelerator, self.args))

    @staticmethod
    def _teacher_summary(teacher: nn.Module) -> dict[str, Any]:
        return {"fingerprint": model_fingerprint(teacher), "num_parameters": sum(p.numel() for p in teacher.parameters())}

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher columns (cached outputs, ``teacher_``-prefixed inputs) through remove_unused_columns."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            columns = self._dataset_columns()
            extra = set(self._cached_columns()) | {c for c in columns if c.startswith("teacher_")}
            extra |= {c for c in NON_MODEL_KEYS if c in columns}
            self._signature_columns += sorted(extra - set(self._signature_columns))

    # ------------------------------------------------------------------ item counting (normalisation)
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Optional[torch.Tensor]:
        """Items (examples or weighted tokens) in the whole optimizer step, summed over processes."""
        if not batch_samples:
            return None
        num_items = sum(count_items(batch, self.task).to(device) for batch in batch_samples)
        num_examples = torch.tensor(float(sum(len(b["input_ids"]) for b in batch_samples)), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.reshape(1)).sum()
            num_examples = self.accelerator.gather(num_examples.reshape(1)).sum()
        self._examples_in_step = num_examples  # the intermediate terms average over examples, not tokens
        self._on_policy_step = self._draw_on_policy()
        return num_items

    # ------------------------------------------------------------------ the loss
    def _split_inputs(self, inputs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """(student inputs, teacher inputs, cached teacher outputs) from one batch; targets are left out."""
        cached_names = set(self._cached_columns())
        cached = {k: v for k, v in inputs.items() if k in cached_names}
        prefixed = {k[len("teacher_"):]: v for k, v in inputs.items() if k.startswith("teacher_") and k not in cached_names}
        targets = set(TARGET_KEYS[self.task]) | {"label", "label_ids"} | set(NON_MODEL_KEYS)
        student_inputs = {k: v for k, v in inputs.items() if k not in targets and not k.startswith("teacher_")}
        return student_inputs, (prefixed or student_inputs), cached

    def _cached_targets(self, cached: dict, temperature: float) -> Optional[tuple[torch.Tensor, ...]]:
        """Cached teacher outputs of the batch (full logits, or top-k log-probs and indices), if any."""
        prefix = self.args.teacher_topk_column_prefix
        if self.args.teacher_logits_column in cached:
            return (cached[self.args.teacher_logits_column],)
        if f"{prefix}_indices" in cached:
            cache_temperature = cached.get(f"{prefix}_temperature")
            if cache_temperature is not None and not torch.allclose(cache_temperature.float(), torch.tensor(temperature)):
                raise ValueError(
                    f"The top-k cache was made at temperature {cache_temperature.flatten()[0].item()} but training uses "
                    f"{temperature}; re-cache with the training temperature or set --temperature to match (and keep "
                    "--temperature_schedule constant)."
                )
            return cached[f"{prefix}_log_probs"], cached[f"{prefix}_indices"]
        return None

    def live_teacher_outputs(self, teacher_inputs: dict, cached: dict) -> list[Any]:
        """The teachers' outputs for this batch, or [] when its cached outputs serve (logit terms only)."""
        return [] if cached and self.intermediate is None else self.teacher_forward(teacher_inputs)

    def teacher_forward(self, teacher_inputs: dict) -> list[Any]:
        """One forward of each teacher under no_grad; the intermediate teacher also returns its internals."""
        flags = self._output_flags()
        with torch.no_grad():
            return [
                teacher(**teacher_inputs, **(flags if i == self.args.intermediate_teacher else {}))
                for i, teacher in enumerate(self.teachers)
            ]

    def teacher_targets(
        self, teacher_outputs: list[Any], cached: dict, temperature: float, student_width: int
    ) -> list[tuple[tuple[torch.Tensor, ...], float]]:
        """[(targets, weight)]: the soft-label targets of the batch and the weight of their KD term.

        Cached outputs when the batch has them (and no teacher ran); else the live teachers: one target,
        their mixture (``multi_teacher_mode="average"``), or one per teacher (``"sum"``).
        """
        if not teacher_outputs:
            targets = self._cached_targets(cached, temperature)
            if targets is None:
                raise ValueError(
                    "No teacher outputs for this batch: pass `teacher_model` or cache its outputs into the dataset "
                    "with hf_distill.cache_teacher_outputs()."
                )
            return [(targets, 1.0)]
        logits = [task_logits(out, self.task)[..., :student_width] for out in teacher_outputs]
        if len(logits) == 1:
            return [((logits[0],), 1.0)]
        if self.args.multi_teacher_mode == "average":
            return [((teacher_mixture_logits(logits, self.teacher_weights, temperature),), 1.0)]
        return [((z,), w) for z, w in zip(logits, self.teacher_weights)]

    def _row_losses(self, has_labels: bool, topk: bool, temperature: float):
        """f(student_rows, *teacher_rows, labels) -> [2, N]: the soft and hard per-row losses."""
        args = self.args
        options = dict(
            loss=args.distillation_loss,
            temperature=temperature,
            scale_by_temperature_squared=args.scale_by_temperature_squared,
            jsd_beta=args.jsd_beta,
            skew_lambda=args.skew_lambda,
        )

        def rows(student, *rest):
            teacher, labels = (rest[:-1], rest[-1]) if has_labels else (rest, None)
            soft = topk_soft_label_loss(student, *teacher, **options) if topk else soft_label_loss(student, *teacher, **options)
            hard = hard_label_loss(student, labels) if has_labels else torch.zeros_like(soft)
            return torch.stack([soft, hard])

        return rows

    def logit_terms(
        self, rows_per_target: list[tuple[list[LogitRows], float]], alpha: float, temperature: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """alpha · Σ_i w_i Σ soft_i + (1 − alpha) · Σ hard over all rows (unnormalised), and each sum for logging."""
        has_labels = all(r.labels is not None for rows, _ in rows_per_target for r in rows)
        alpha = alpha if has_labels else 1.0
        weighted, sums = torch.zeros(()), torch.zeros(2)
        for i, (rows, weight) in enumerate(rows_per_target):
            hard_weight = 1.0 - alpha if i == 0 else 0.0  # CE reads the labels once, whatever the teachers
            for r in rows:
                if self.args.distillation_loss == "forward_kl":
                    # The common case (full logits or a top-k cache), fused: one pass per chunk, gradient written
                    # directly, one student softmax for both terms at T = 1 (same values as the generic path).
                    w_sum, term = fused_forward_kl_and_ce(
                        r.student, r.teacher, r.labels if has_labels else None, r.weights,
                        (alpha * weight, hard_weight), temperature=temperature,
                        scale_by_temperature_squared=self.args.scale_by_temperature_squared,
                        chunk_size=self.args.loss_chunk_size,
                    )
                else:
                    row_fn = self._row_losses(has_labels, topk=len(r.teacher) == 2, temperature=temperature)
                    targets = r.teacher + ((r.labels,) if has_labels else ())
                    w_sum, term = chunked_weighted_sums(
                        row_fn, (alpha * weight, hard_weight), r.student, r.weights, *targets,
                        chunk_size=self.args.loss_chunk_size,
                    )
                scale = term.new_tensor([weight, 1.0 if i == 0 else 0.0])  # on the loss's device: no host sync
                weighted, sums = weighted.to(w_sum.device) + w_sum, sums.to(term.device) + term * scale
        terms = {"kd": sums[0]}
        if has_labels:
            terms["ce"] = sums[1]
        return weighted, terms

    # ------------------------------------------------------------------ on-policy data (GKD)
    def _draw_on_policy(self) -> bool:
        """Whether this optimizer step trains on student generations: a coin of probability lmbda, seeded by
        (seed, step), so every process and a resumed run draw the same."""
        if self.args.lmbda <= 0 or self.task != "causal-lm":
            return False
        rng = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        return bool(torch.rand((), generator=rng) < self.args.lmbda)

    def on_policy_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace the batch's completions by the student's own (prompts kept)."""
        from .causal_lm import generate_on_policy_batch

        tokenizer = self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        eos = getattr(tokenizer, "eos_token_id", None) or getattr(unwrap_model(model).config, "eos_token_id", None)
        a = self.args
        return generate_on_policy_batch(
            model, inputs, pad_token_id=pad if pad is not None else eos, eos_token_id=eos,
            max_new_tokens=a.generation_max_new_tokens, temperature=a.generation_temperature,
            top_p=a.generation_top_p, top_k=a.generation_top_k, do_sample=True,
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ):
        if model.training and getattr(self, "_on_policy_step", False):
            inputs = self.on_policy_inputs(model, inputs)
            num_items_in_batch = None  # the generated batch has its own token count (see _normaliser)
        student_inputs, teacher_inputs, cached = self._split_inputs(inputs)
        # The teacher first: its activations are freed before the student's (kept for backward) are made.
        teacher_outputs = self.live_teacher_outputs(teacher_inputs, cached)
        student_outputs = model(**student_inputs, **self._output_flags())
        student_logits = task_logits(student_outputs, self.task)
        temperature, alpha = self.current_temperature(), self.current_alpha()
        targets = self.teacher_targets(teacher_outputs, cached, temperature, student_logits.shape[-1])
        rows = [(logit_rows(self.task, student_logits, t, inputs), w) for t, w in targets]

        items, examples = self._normalisers(inputs, num_items_in_batch, model.training)
        loss_sum, term_sums = self.logit_terms(rows, alpha, temperature)  # alpha · KD + (1 − alpha) · CE
        loss = loss_sum / items
        if self.intermediate is not None:  # + Σ w_term · term, averaged over examples
            attention_mask = student_inputs.get("attention_mask")
            feature_sums = self.intermediate(student_outputs, teacher_outputs[self.args.intermediate_teacher], attention_mask)
            weights = self.intermediate.settings.active
            loss = loss + sum(weights[name] * value for name, value in feature_sums.items()) / examples
            self._record_terms(feature_sums, examples, prefix="eval_" if not model.training else "")

        self._record_terms(term_sums, items, prefix="eval_" if not model.training else "")
        if model.training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if return_outputs:
            first = targets[0][0]  # for agreement metrics: the (mixed) teacher logits, or the top-k pair
            return loss, {"logits": student_logits, "teacher_logits": first[0] if len(first) == 1 else first}
        return loss

    def _normalisers(self, inputs: dict, num_items_in_batch: Optional[torch.Tensor], training: bool) -> tuple:
        """(items, examples) that the summed losses are divided by.

        In the training loop, the counts of the whole optimizer step (all accumulation micro-batches and
        processes), from ``_get_num_items_in_batch``. Outside it (evaluation), and for an on-policy batch whose
        completions were just generated, the batch's own counts, scaled by the accumulation steps so that
        the step still averages over its micro-batches.
        """
        if num_items_in_batch is not None:
            examples = getattr(self, "_examples_in_step", None)
            return num_items_in_batch, examples if examples is not None else float(len(inputs["input_ids"]))
        items = count_items(inputs, self.task).clamp_min(1)
        examples = float(len(inputs["input_ids"]))
        if training:
            scale = self.args.gradient_accumulation_steps * (
                self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            )
            items, examples = items * scale, examples * scale
        return items, examples

    # ------------------------------------------------------------------ logging of each term
    def _record_terms(self, term_sums: dict[str, torch.Tensor], num_items: torch.Tensor, prefix: str) -> None:
        for name, value in term_sums.items():
            self._term_sums[f"{prefix}loss_{name}"] += (value / num_items).detach().to(self.args.device)

    def _reduce(self, value: torch.Tensor, reduction: str) -> torch.Tensor:
        return self.accelerator.reduce(value, reduction) if self.accelerator.num_processes > 1 else value

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the averaged loss terms (loss_kd, loss_ce, ...) to training logs."""
        if "loss" in logs:
            steps = max(self.state.global_step - self._last_term_log_step, 1)
            # Each micro-batch recorded its local sum / global item count: sum over processes when
            # items were counted globally, else average the per-process means.
            reduction = "sum" if self.args.average_tokens_across_devices else "mean"
            for name in sorted(k for k in self._term_sums if not k.startswith("eval_")):
                logs[name] = round(self._reduce(self._term_sums.pop(name), reduction).item() / steps, 6)
            self._last_term_log_step = self.state.global_step
            if self._non_finite.total:
                logs["non_finite_losses"] = self._non_finite.total
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list] = None
    ):
        """Student loss and logits for `compute_metrics`, plus teacher agreement, with one teacher forward."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        student_logits = outputs["logits"]
        self._count_agreement(logit_rows(self.task, student_logits, outputs["teacher_logits"], inputs))
        if prediction_loss_only:
            return loss.detach(), None, None
        label_keys = [k for k in TARGET_KEYS[self.task] if k in inputs]
        labels = tuple(inputs[k] for k in label_keys) if label_keys else None
        if labels is not None and len(labels) == 1:
            labels = labels[0]
        logits = (student_logits[..., 0], student_logits[..., 1]) if self.task == "question-answering" else student_logits
        return loss.detach(), logits, labels

    def _count_agreement(self, rows: list[LogitRows]) -> None:
        for r in rows:
            if len(r.teacher) != 1:  # top-k cache: compare with the teacher's top-1 index
                teacher_top1 = r.teacher[1][..., 0]
            else:
                teacher_top1 = r.teacher[0].argmax(-1)
            student_top1 = r.student.argmax(-1)
            valid = r.weights > 0
            self._eval_counts["agree"] += ((student_top1 == teacher_top1) & valid).sum()
            self._eval_counts["rows"] += valid.sum()
            if r.labels is not None:
                labelled = valid & (r.labels != -100)
                self._eval_counts["teacher_correct"] += ((teacher_top1 == r.labels) & labelled).sum()
                self._eval_counts["labelled"] += labelled.sum()

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        """Run the stock loop, then add teacher agreement, teacher accuracy and the eval loss terms."""
        self._eval_counts.clear()
        for name in [k for k in self._term_sums if k.startswith("eval_")]:
            del self._term_sums[name]
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        counts = {k: self._reduce(v, "sum").item() for k, v in self._eval_counts.items()}
        if counts.get("rows"):
            output.metrics[f"{prefix}_teacher_agreement"] = counts["agree"] / counts["rows"]
        if counts.get("labelled"):
            output.metrics[f"{prefix}_teacher_accuracy"] = counts["teacher_correct"] / counts["labelled"]
        batches = max(len(args[0]) if args and hasattr(args[0], "__len__") else 1, 1)
        for name in [k for k in self._term_sums if k.startswith("eval_")]:
            value = self._reduce(self._term_sums.pop(name), "mean").item() / batches
            output.metrics[f"{prefix}_{name[len('eval_'):]}"] = value
        return output

    # ------------------------------------------------------------------ saving
    def recipe(self) -> dict[str, Any]:
        """What the run did, as plain data: written to ``distillation/recipe.json`` beside the student."""
        args = self.args
        arguments = {k: v for k, v in args.to_dict().items() if not k.endswith("_token")}
        student = unwrap_model(self.model)
        teacher = unwrap_model(self.teacher) if self.teacher is not None else None
        losses: dict[str, Any] = {
            "kd": {"weight": args.alpha, "divergence": args.distillation_loss, "temperature": args.temperature},
            "ce": {"weight": round(1.0 - args.alpha, 10)},
        }
        if args.alpha_schedule != "constant" or args.temperature_schedule != "constant":
            losses["kd"]["schedules"] = {
                "alpha": [args.alpha_schedule, args.alpha, args.alpha if args.alpha_end is None else args.alpha_end],
                "temperature": [args.temperature_schedule, args.temperature,
                                args.temperature if args.temperature_end is None else args.temperature_end],
            }
        intermediate = None if self.intermediate is None else self.intermediate.describe()
        if intermediate is not None:
            settings = intermediate["settings"]
            for name, weight in intermediate["active"].items():
                losses[name] = {"weight": weight, "loss": settings.get(f"{name}_loss")}
        extra_teachers = [
            {"name_or_path": name, "weight": w} for name, w in zip(self.teacher_names, self.teacher_weights)
        ] if len(self.teachers) > 1 else None
        return {
            "hf_distill_version": __version__,
            "task": self.task,
            "teacher": None if teacher is None else {
                "name_or_path": self.teacher_name_or_path,
                # as loaded (a sharded teacher's local weights are a shard), except an EMA teacher, which moves
                **(self._teacher_summary(teacher) if self.args.self_distillation == "ema"
                   else self._teacher_summaries[self.args.intermediate_teacher]),
                "model_type": getattr(getattr(teacher, "config", None), "model_type", None),
            },
            "student": {
                "name_or_path": getattr(student.config, "_name_or_path", None),
                "num_parameters": sum(p.numel() for p in student.parameters()),
                "model_type": getattr(student.config, "model_type", None),
            },
            "teachers": extra_teachers,
            "multi_teacher_mode": args.multi_teacher_mode if extra_teachers else None,
            "self_distillation": None if args.self_distillation == "none" else args.self_distillation,
            "losses": losses,
            "layer_map": None if intermediate is None else {
                k: v for k, v in intermediate.items() if k.endswith("layer_map") or k == "projections"
            },
            "datasets": list(getattr(self, "dataset_names", []) or []),
            "arguments": arguments,
        }

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save the student as a plain `from_pretrained` folder, and the recipe under ``distillation/``."""
        with self._atomic_target(output_dir or self.args.output_dir) as target:  # temp folder, renamed in
            super()._save(target, state_dict=state_dict)
            folder = Path(target) / "distillation"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "recipe.json").write_text(json.dumps(self.recipe(), indent=2, default=str))
            projections = None if self.intermediate is None else self.intermediate.projections
            if projections is not None:
                projections.save(folder / PROJECTIONS_FILE)
            if self._saving_checkpoint and self.args.self_distillation == "ema" and self.teacher is not None:
                from .self_distillation import EMA_FILE, save_ema_teacher

                save_ema_teacher(self.teacher, folder / EMA_FILE)  # a resumed run continues the same average

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Restore the student (stock), and the learned projections and EMA teacher of the checkpoint."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        projections = None if self.intermediate is None else self.intermediate.projections
        path = Path(resume_from_checkpoint) / "distillation" / PROJECTIONS_FILE
        if projections is not None and path.is_file():
            from safetensors.torch import load_file

            projections.load_state_dict(load_file(str(path), device=str(self.args.device)))
        if self.args.self_distillation == "ema" and self.teacher is not None:
            from .self_distillation import load_ema_teacher

            load_ema_teacher(self.teacher, resume_from_checkpoint)

    # ------------------------------------------------------------------ model card and Hub
    def create_model_card(self, model_name: Optional[str] = None, dataset_name: Optional[str] = None, **kwargs: Any) -> None:
        """Write the distillation model card (``model_cards/`` template) instead of the generic Trainer card."""
        if not self.is_world_process_zero():
            return
        from .cards import write_model_card

        if dataset_name:
            self.dataset_names = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name)
            recipe_path = Path(self.args.output_dir) / "distillation" / "recipe.json"
            if recipe_path.parent.is_dir():
                recipe_path.write_text(json.dumps(self.recipe(), indent=2, default=str))
        write_model_card(self.args.output_dir, model_name=model_name or self.args.hub_model_id)

    def push_to_hub(self, commit_message: Optional[str] = "End of training", blocking: bool = True,
                    token: Optional[str] = None, **kwargs: Any) -> Any:
        """Save the student and card, then upload only the allowlisted files (student, card, plot, onnx/).

        Returns the commit URL, or a Future of it when ``blocking=False``; ``token`` overrides ``hub_token``."""
        from .hub import push_distilled_to_hub

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        self.save_model(_internal_call=True)  # not a second push (save_model pushes when args.push_to_hub)
        self.create_model_card(model_name=repo_id, dataset_name=kwargs.get("dataset_name"))
        if not self.is_world_process_zero():
            return ""
        return push_distilled_to_hub(
            self.args.output_dir, repo_id, token=token or self.args.hub_token,
            private=bool(self.args.hub_private_repo), commit_message=commit_message or "Upload distilled model",
            revision=kwargs.get("revision") or self.args.hub_revision, blocking=blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """hub_strategy pushes upload the checkpoint's student through the allowlist (hf_distill.hub)."""
        from .hub import push_checkpoint_allowlisted

        push_checkpoint_allowlisted(self, checkpoint_folder)

    # ---- production: preflight, fault handling, atomic saving ----------------------------------------
    # Preflight (train() → run_preflight), the non-finite loss guard (training_step), the signal checkpoint
    # (SignalCheckpointCallback, registered in _init_production), atomic checkpoints and saves
    # (_save_checkpoint, _atomic_target), resume from the last complete checkpoint and the teacher compile.
    def _init_production(self) -> None:
        args = self.args
        self.preflight_report: Optional[PreflightReport] = None
        self._preflight_done = False
        self._non_finite = NonFiniteLossCounter(args.max_non_finite_losses, args.non_finite_loss_count)
        self._step_has_bad_loss = False
        self._step_term_sums: Optional[dict[str, torch.Tensor]] = None
        self.skipped_optimizer_steps = 0
        self._staging_run_dir: Optional[str] = None
        self._saving_checkpoint = False
        if args.save_on_signal and not any(isinstance(c, SignalCheckpointCallback) for c in self.callback_handler.callbacks):
            self.add_callback(SignalCheckpointCallback())

    def active_loss_terms(self) -> dict[str, float]:
        """Every configured loss term and its weight ({name: weight}); weight 0 means off."""
        a = self.args
        terms = {"kd": float(a.alpha), "ce": round(1.0 - float(a.alpha), 10)}
        if a.alpha_schedule != "constant" and a.alpha_end is not None:  # a term is active if it is ever weighted
            terms = {"kd": max(a.alpha, a.alpha_end), "ce": round(1.0 - min(a.alpha, a.alpha_end), 10)}
        terms.update({"hidden": a.hidden_weight, "attention": a.attention_weight, "relation": a.relation_weight})
        return terms

    def inactive_loss_terms(self, batch: Optional[dict[str, Any]] = None) -> dict[str, str]:
        """Configured terms that cannot apply with this data or teacher: {name: why}. ``batch``: one collated
        training batch (None when unknown). Extend per term (e.g. hidden states with a cached teacher)."""
        inactive: dict[str, str] = {}
        if batch is not None and not any(k in batch for k in TARGET_KEYS[self.task]):
            inactive["ce"] = "no labels in the training batches, so the soft term gets weight 1"
        return inactive

    def _compile_teacher(self, teacher: nn.Module) -> nn.Module:
        if not self.args.torch_compile_teacher or hasattr(teacher, "_orig_mod"):  # Accelerate compiles every
            return teacher  # prepared model, the teacher too, when torch_compile (the student's switch) is on
        return torch.compile(teacher, backend=self.args.torch_compile_backend or "inductor",
                             mode=self.args.torch_compile_mode)

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, after the preflight; ``resume_from_checkpoint=True`` picks the last *complete*
        checkpoint, and the distillation state (non-finite counts) is restored with it."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output directory ({self.args.output_dir}).")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            state_file = Path(resume_from_checkpoint) / DISTILLATION_STATE_NAME
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                self._non_finite.load_state_dict(state.get("non_finite", {}))
                self.skipped_optimizer_steps = int(state.get("skipped_optimizer_steps", 0))
        if self.args.should_save and self.args.atomic_save:
            for stale in Path(self.args.output_dir).glob(".checkpoint-*.staging"):  # left by a crash while saving
                shutil.rmtree(stale, ignore_errors=True)
        if self.args.preflight and not self._preflight_done:
            self.run_preflight()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- preflight
    def run_preflight(self) -> PreflightReport:
        """Measure the teacher, list labels and loss terms, estimate peak memory; log one block; refuse
        (PreflightError) when the run cannot work unless ``preflight_force``. RNG states are left untouched."""
        devices = [self.args.device.index or 0] if self.args.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batch = self._preflight_batch()
            metric, source, num_labels, majority = self._preflight_teacher_metric()
            report = PreflightReport(
                teacher_metric=metric, teacher_metric_source=source, num_labels=num_labels, majority=majority,
                compatibility=compatibility_summary(self.teacher, self.model, self.task),
                loss_weights=self.active_loss_terms(), inactive_terms=self.inactive_loss_terms(batch),
                memory=self._preflight_memory(batch), available_bytes=available_memory_bytes(self.args.device),
            )
        self.preflight_report, self._preflight_done = report, True
        if self.is_world_process_zero():
            problems = report.warnings() or report.errors()
            (logger.warning if problems else logger.info)("%s", report.format())
        if report.errors() and self.args.preflight_force:
            logger.warning("Preflight errors ignored because preflight_force is set.")
        report.check(force=self.args.preflight_force)
        return report

    def _preflight_batch(self) -> Optional[dict[str, Any]]:
        if self.train_dataset is None:
            return None
        try:
            return next(iter(self.get_train_dataloader()))
        except StopIteration:
            return None

    def _preflight_teacher_metric(self):
        """(metric, source, num_labels, majority): teacher top-1 accuracy against the labels."""
        limit = self.args.preflight_eval_batches
        dataset = self.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()), None)
        where = "eval set" if dataset is not None else "training batches (no eval_dataset)"
        if limit == 0:
            return None, "preflight_eval_batches=0", None, None
        width = self._student_output_width()
        num_labels = None if self.task == "question-answering" else width
        correct = torch.zeros((), device=self.args.device)
        labelled = torch.zeros((), device=self.args.device)
        histogram = torch.zeros(width if num_labels else 1, device=self.args.device)
        loader = self.get_eval_dataloader(dataset) if dataset is not None else self.get_train_dataloader()
        batches = 0
        try:
            for batches, inputs in enumerate(loader, start=1):
                inputs = self._prepare_inputs(inputs)
                _, teacher_inputs, cached = self._split_inputs(inputs)
                outputs = self.live_teacher_outputs(teacher_inputs, cached)
                targets = self.teacher_targets(outputs, cached, self.current_temperature(), width)
                parts = targets[0][0]
                teacher = parts[0] if len(parts) == 1 else parts
                for r in logit_rows(self.task, parts[0], teacher, inputs):
                    if r.labels is None:
                        continue
                    top1 = r.teacher[1][..., 0] if len(r.teacher) == 2 else r.teacher[0].argmax(-1)
                    valid = (r.weights > 0) & (r.labels != -100)
                    correct += ((top1 == r.labels) & valid).sum()
                    labelled += valid.sum()
                    if num_labels:
                        histogram += torch.bincount(r.labels[valid].long(), minlength=width)[:width].float()
                if batches >= limit:
                    break
        except ValueError as error:  # e.g. no teacher and no cached outputs in the eval set
            return None, f"{where}: {error}", None, None
        correct, labelled, histogram = (self._reduce(t, "sum") for t in (correct, labelled, histogram))
        if labelled.item() == 0:
            return None, f"{where}: no labels", None, None
        majority = (histogram.max() / histogram.sum()).item() if num_labels else None
        source = f"{where}, {batches} batch(es), {int(labelled.item())} labelled rows"
        return {"accuracy": correct.item() / labelled.item()}, source, num_labels, majority

    def _preflight_memory(self, batch: Optional[dict[str, Any]]) -> MemoryEstimate:
        seq_length = 1
        if batch is not None and torch.is_tensor(batch.get("input_ids")) and batch["input_ids"].dim() > 1:
            seq_length = batch["input_ids"].shape[-1]
        data = self.train_dataset
        if hasattr(data, "column_names") and "input_ids" in (data.column_names or []) and hasattr(data, "__len__"):
            seq_length = max([seq_length] + [len(ids) for ids in data[: min(len(data), 1024)]["input_ids"]])
        topk = None
        indices = f"{self.args.teacher_topk_column_prefix}_indices"
        if self.teacher is None and batch is not None and indices in batch:
            topk = batch[indices].shape[-1]
        return estimate_peak_memory(
            self.model, self.teacher, batch_size=self.args.per_device_train_batch_size, seq_length=seq_length,
            optimizer=str(self.args.optim), gradient_accumulation_steps=self.args.gradient_accumulation_steps,
            task=self.task, vocab_or_labels=self._student_output_width(),
            teacher_dtype_bytes={"float32": 4, "bfloat16": 2, "float16": 2}.get(self.args.teacher_dtype),
            cached_topk=topk, loss_chunk_size=self.args.loss_chunk_size, device=self.args.device,
            **self._intermediate_memory_settings(),
        )

    def _intermediate_memory_settings(self) -> dict[str, Any]:
        """What the intermediate terms add to the step's memory, in estimate_peak_memory's terms."""
        terms = self.intermediate
        if terms is None:
            return {}
        projections = terms.projections
        return dict(
            teacher_hidden_states=terms.needs_hidden_states, teacher_attentions=terms.needs_attentions,
            projected_layers=0 if projections is None else len(terms.hidden_map),
            extra_parameters=() if projections is None else list(projections.parameters()),
        )

    # -- non-finite loss guard
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[torch.Tensor] = None):
        """The stock step, except that a NaN/inf loss (on any process) is not back-propagated, and the whole
        optimizer step it belongs to is skipped: gradients of the step's other micro-batches are dropped, so
        the optimizer sees no gradient and updates nothing. Counted; too many raise NonFiniteLossError."""
        accelerator = self.accelerator
        own_backward = "backward" in vars(accelerator)
        stock_backward = accelerator.backward
        if self._step_term_sums is None:  # the step's first micro-batch: its loss terms so far
            self._step_term_sums = {k: v.clone() for k, v in self._term_sums.items()}

        def guarded_backward(loss: torch.Tensor, **kwargs: Any) -> None:
            finite = torch.isfinite(loss.detach()).all().float().reshape(1)
            if accelerator.num_processes > 1:  # every rank takes the same decision, or DDP hangs in backward
                finite = accelerator.reduce(finite, "sum") / accelerator.num_processes
            if finite.item() == 1.0:
                return stock_backward(loss, **kwargs)
            self._step_has_bad_loss = True

        accelerator.backward = guarded_backward
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            if own_backward:
                accelerator.backward = stock_backward
            else:
                del accelerator.backward
        if accelerator.sync_gradients:  # the step's last micro-batch: clip and optimizer step follow
            bad, self._step_has_bad_loss = self._step_has_bad_loss, False
            if bad:
                model.zero_grad(set_to_none=True)
                if self.intermediate is not None:
                    self.intermediate.zero_grad(set_to_none=True)
                self._term_sums.clear()
                self._term_sums.update(self._step_term_sums or {})  # a skipped step leaves no loss_<term> either
                self.skipped_optimizer_steps += 1
            self._step_term_sums = None
            self._non_finite.check(float("nan") if bad else 0.0, step=self.state.global_step + 1)
            if not bad:
                self._sync_projection_gradients()
        return loss

    # -- atomic saving
    @contextmanager
    def _atomic_target(self, output_dir: str):
        """Where _save writes: a temporary folder moved into ``output_dir`` on success (atomic_save)."""
        if not self.args.atomic_save or self._saving_checkpoint:  # a checkpoint is staged as a whole
            yield output_dir
            return
        with atomic_contents(output_dir) as staging:
            yield str(staging)

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write ``checkpoint-<step>`` into ``.checkpoint-<step>.staging/`` (every process writes its part
        there), then the main process renames it into place and rotates old checkpoints."""
        if not self.args.atomic_save:
            super()._save_checkpoint(model, trial)
            return
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_run_dir = os.path.join(run_dir, f".{name}.staging")
        if self.args.should_save:
            shutil.rmtree(staging_run_dir, ignore_errors=True)
            os.makedirs(staging_run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir, self._saving_checkpoint = staging_run_dir, True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir, self._saving_checkpoint = None, False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(staging_run_dir, name), os.path.join(run_dir, name)
            best = self.state.best_model_checkpoint
            if best and os.path.abspath(best).startswith(os.path.abspath(staging_run_dir)):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            state = {"non_finite": self._non_finite.state_dict(), "skipped_optimizer_steps": self.skipped_optimizer_steps}
            Path(staged, DISTILLATION_STATE_NAME).write_text(json.dumps(state))
            replace_directory(staged, final)
            shutil.rmtree(staging_run_dir, ignore_errors=True)
            if hasattr(self, "_rotate_checkpoints"):  # transformers 4.x
                self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
            else:
                from transformers.trainer import rotate_checkpoints

                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
