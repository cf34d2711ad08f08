"""`DistillationTrainer`: the stock `transformers.Trainer` loop with a teacher in the loss.

One training step (see DESIGN.md)::

    batch ─► student(**inputs)                 ─► student logits ─┐
          └► teacher(**teacher_inputs) or cache ─► teacher targets ┴► rows (tasks.py) ─► loss terms ─► loss

    loss = alpha · KD(teacher ‖ student; T) · T² + (1 − alpha) · CE(student, labels)

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
from .losses.logits import chunked_weighted_sums, hard_label_loss, soft_label_loss, topk_soft_label_loss
from .tasks import TARGET_KEYS, LogitRows, count_items, detect_task, logit_rows, task_logits, unwrap_model
from .io import atomic_contents, last_complete_checkpoint, replace_directory
from .preflight import (
    MemoryEstimate,
    PreflightReport,
    available_memory_bytes,
    compatibility_summary,
    estimate_peak_memory,
)
from .teacher_cache import model_fingerprint

logger = logging.getLogger(__name__)

AUTO_CLASS_BY_TASK = {
    "sequence-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "causal-lm": AutoModelForCausalLM,
}
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DISTILLATION_STATE_NAME = "distillation_state.json"  # in checkpoints: non-finite loss counts
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_teacher(name_or_path: str, task: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a teacher for ``task`` from a local folder or a Hub id, with a clear error when neither works."""
    path = Path(name_or_path).expanduser()
    if path.exists():
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


def check_teacher_student_compatible(teacher: nn.Module, student: nn.Module, task: str) -> None:
    """Refuse pairs whose outputs cannot be compared: label counts or maps, or vocabulary sizes."""
    t_config, s_config = unwrap_model(teacher).config, unwrap_model(student).config
    if task == "causal-lm":
        t_vocab = unwrap_model(teacher).get_output_embeddings().weight.shape[0]
        s_vocab = unwrap_model(student).get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise ValueError(
                f"Teacher and student vocabularies differ ({t_vocab} vs {s_vocab} output rows). Token-level "
                "distillation needs the same tokenizer and vocabulary; build the student with the teacher's tokenizer."
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
        teacher_model: a model, a local folder or a Hub id; ``None`` when the datasets carry cached
            teacher outputs (see :func:`hf_distill.cache_teacher_outputs`).
        args: :class:`DistillationArguments`.
        teacher_processing_class: the teacher's tokenizer, when it differs from the student's (used to
            pad ``teacher_``-prefixed inputs).
        Every other argument is passed to `transformers.Trainer`.
    """

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, None] = None,
        teacher_model: Union[PreTrainedModel, nn.Module, str, None] = None,
        args: Optional[DistillationArguments] = None,
        *trainer_args: Any,
        teacher_processing_class: Any = None,
        **trainer_kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("DistillationTrainer needs the student as `model`.")
        if args is None:
            args = DistillationArguments(output_dir="distilled")
        if not isinstance(args, DistillationArguments):
            raise TypeError("`args` must be DistillationArguments (a TrainingArguments subclass with the recipe).")
        self.task = args.distillation_task or detect_task(model)
        if isinstance(teacher_model, (str, os.PathLike)):
            self.teacher_name_or_path = str(teacher_model)
            teacher_model = load_teacher(str(teacher_model), self.task, args.teacher_trust_remote_code)
        else:
            self.teacher_name_or_path = getattr(getattr(teacher_model, "config", None), "_name_or_path", None)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._check_datasets()
        self.teacher = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        if self.teacher is None and not self._has_cached_teacher():
            raise ValueError(
                "No teacher: pass `teacher_model` (a model, folder or Hub id), or cache its outputs into the "
                "datasets with hf_distill.cache_teacher_outputs() and train from those."
            )
        self._check_cached_outputs()
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
        check_teacher_student_compatible(teacher, self.model, self.task)
        teacher.eval()
        if self.args.teacher_dtype != "auto":
            teacher.to(TEACHER_DTYPES[self.args.teacher_dtype])
        return self._compile_teacher(self.accelerator.prepare_model(teacher, evaluation_mode=True))

    def _set_signature_columns_if_needed(self) -> None:
        """Keep teacher columns (cached outputs, ``teacher_``-prefixed inputs) through remove_unused_columns."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = set(self._cached_columns()) | {c for c in self._dataset_columns() if c.startswith("teacher_")}
            self._signature_columns += sorted(extra - set(self._signature_columns))

    # ------------------------------------------------------------------ item counting (normalisation)
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Optional[torch.Tensor]:
        """Items (examples or weighted tokens) in the whole optimizer step, summed over processes."""
        if not batch_samples:
            return None
        num_items = sum(count_items(batch, self.task).to(device) for batch in batch_samples)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items.reshape(1)).sum()
        return num_items

    # ------------------------------------------------------------------ the loss
    def _split_inputs(self, inputs: dict[str, Any]) -> tuple[dict, dict, dict]:
        """(student inputs, teacher inputs, cached teacher outputs) from one batch; targets are left out."""
        cached_names = set(self._cached_columns())
        cached = {k: v for k, v in inputs.items() if k in cached_names}
        prefixed = {k[len("teacher_"):]: v for k, v in inputs.items() if k.startswith("teacher_") and k not in cached_names}
        targets = set(TARGET_KEYS[self.task]) | {"label", "label_ids"}
        student_inputs = {k: v for k, v in inputs.items() if k not in targets and not k.startswith("teacher_")}
        return student_inputs, (prefixed or student_inputs), cached

    def teacher_targets(self, teacher_inputs: dict, cached: dict) -> Union[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Cached teacher outputs if the batch has them, else one teacher forward under no_grad."""
        prefix = self.args.teacher_topk_column_prefix
        if self.args.teacher_logits_column in cached:
            return cached[self.args.teacher_logits_column]
        if f"{prefix}_indices" in cached:
            temperature = cached.get(f"{prefix}_temperature")
            if temperature is not None and not torch.allclose(temperature.float(), torch.tensor(self.args.temperature)):
                raise ValueError(
                    f"The top-k cache was made at temperature {temperature.flatten()[0].item()} but training uses "
                    f"{self.args.temperature}; re-cache with the training temperature or set --temperature to match."
                )
            return cached[f"{prefix}_log_probs"], cached[f"{prefix}_indices"]
        if self.teacher is None:
            raise ValueError(
                "No teacher outputs for this batch: pass `teacher_model` or cache its outputs into the dataset "
                "with hf_distill.cache_teacher_outputs()."
            )
        with torch.no_grad():
            return task_logits(self.teacher(**teacher_inputs), self.task)

    def _row_losses(self, has_labels: bool, topk: bool):
        """f(student_rows, *teacher_rows, labels) -> [2, N]: the soft and hard per-row losses."""
        args = self.args
        options = dict(
            loss=args.distillation_loss,
            temperature=args.temperature,
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

    def logit_terms(self, rows: list[LogitRows]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """alpha · Σ soft + (1 − alpha) · Σ hard over all rows (unnormalised), and each sum for logging."""
        has_labels = all(r.labels is not None for r in rows)
        alpha = self.args.alpha if has_labels else 1.0
        weighted, sums = torch.zeros(()), torch.zeros(2)
        for r in rows:
            row_fn = self._row_losses(has_labels, topk=len(r.teacher) == 2)
            targets = r.teacher + ((r.labels,) if has_labels else ())
            w_sum, s = chunked_weighted_sums(
                row_fn, (alpha, 1.0 - alpha), r.student, r.weights, *targets, chunk_size=self.args.loss_chunk_size
            )
            weighted, sums = weighted.to(w_sum.device) + w_sum, sums.to(s.device) + s
        terms = {"kd": sums[0]}
        if has_labels:
            terms["ce"] = sums[1]
        return weighted, terms

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ):
        student_inputs, teacher_inputs, cached = self._split_inputs(inputs)
        student_outputs = model(**student_inputs)
        student_logits = task_logits(student_outputs, self.task)
        teacher = self.teacher_targets(teacher_inputs, cached)
        rows = logit_rows(self.task, student_logits, teacher, inputs)

        loss_sum, term_sums = self.logit_terms(rows)  # alpha · KD + (1 − alpha) · CE, summed over items
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            num_items_in_batch = count_items(inputs, self.task)
        loss = loss_sum / num_items_in_batch

        self._record_terms(term_sums, num_items_in_batch, prefix="eval_" if not model.training else "")
        if model.training and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        if return_outputs:
            return loss, {"logits": student_logits, "teacher_logits": teacher}
        return loss

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
        arguments = {k: v for k, v in args.to_dict().items() if "token" not in k}
        student = unwrap_model(self.model)
        teacher = unwrap_model(self.teacher) if self.teacher is not None else None
        losses: dict[str, Any] = {
            "kd": {"weight": args.alpha, "divergence": args.distillation_loss, "temperature": args.temperature},
            "ce": {"weight": round(1.0 - args.alpha, 10)},
        }
        return {
            "hf_distill_version": __version__,
            "task": self.task,
            "teacher": None if teacher is None else {
                "name_or_path": self.teacher_name_or_path,
                "fingerprint": model_fingerprint(teacher),
                "num_parameters": sum(p.numel() for p in teacher.parameters()),
                "model_type": getattr(teacher.config, "model_type", None),
            },
            "student": {
                "name_or_path": getattr(student.config, "_name_or_path", None),
                "num_parameters": sum(p.numel() for p in student.parameters()),
                "model_type": getattr(student.config, "model_type", None),
            },
            "losses": losses,
            "arguments": arguments,
        }

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Save the student as a plain `from_pretrained` folder, and the recipe under ``distillation/``."""
        with self._atomic_target(output_dir or self.args.output_dir) as target:  # temp folder, renamed in
            super()._save(target, state_dict=state_dict)
            folder = Path(target) / "distillation"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "recipe.json").write_text(json.dumps(self.recipe(), indent=2, default=str))

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
        """Every configured loss term and its weight ({name: weight}); weight 0 means off. Extend per term."""
        return {"kd": float(self.args.alpha), "ce": round(1.0 - float(self.args.alpha), 10)}

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
                with torch.no_grad():
                    teacher = self.teacher_targets(teacher_inputs, cached)
                parts = (teacher,) if isinstance(teacher, torch.Tensor) else tuple(teacher)
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
                self._term_sums.clear()
                self._term_sums.update(self._step_term_sums or {})  # a skipped step leaves no loss_<term> either
                self.skipped_optimizer_steps += 1
            self._step_term_sums = None
            self._non_finite.check(float("nan") if bad else 0.0, step=self.state.global_step + 1)
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
