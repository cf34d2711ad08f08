"""Preflight checks run before the first training step: memory, teacher quality, loss terms, one report.

The report (:class:`PreflightReport`) and the memory estimate (:mod:`hf_distill.memory`) know nothing of the
Trainer: they take models, numbers and plain mappings and return numbers, booleans and text.
:func:`run_preflight`, the one function the trainer calls, gathers their inputs from a
:class:`~hf_distill.trainer.DistillationTrainer`'s public methods and decides what to log and refuse.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .arguments import TEACHER_DTYPES
from .intermediate import accumulation_warnings
from .memory import MemoryEstimate, available_memory_bytes, estimate_peak_memory, format_bytes, saved_activation_bytes
from .tasks import ENCODER_TASKS, TARGET_KEYS, logit_rows, unwrap_model

logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """A preflight check refused the run; the message names the fix (or ``force`` to override)."""


# ----------------------------------------------------------------------------------------------
# Teacher at chance
# ----------------------------------------------------------------------------------------------
def chance_level(num_labels: int) -> float:
    """Accuracy of a uniform random guess over ``num_labels`` classes."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
    return 1.0 / num_labels


def majority_fraction(labels: Iterable[int], ignore_index: int = -100) -> Optional[float]:
    """Share of the most frequent label (what always predicting it scores), or None without labels."""
    values = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).flatten()
    values = values[values != ignore_index]
    if values.numel() == 0:
        return None
    return float(torch.unique(values, return_counts=True)[1].max()) / values.numel()


def teacher_is_at_chance(
    teacher_accuracy: float, num_labels: int, majority_fraction: Optional[float] = None, margin: float = 0.02
) -> bool:
    """True when the teacher does no better than guessing: accuracy ≤ max(1/num_labels, majority) + margin."""
    baseline = max(chance_level(num_labels), majority_fraction or 0.0)
    return teacher_accuracy <= baseline + margin


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
@dataclass
class PreflightReport:
    """What the preflight found, as data; :meth:`format` renders one block of text, :meth:`check` refuses.

    Fields (all optional):
        teacher_metric: ``{"accuracy": 0.93}`` measured on the eval set (first item is the one judged).
        teacher_metric_source: where it was measured (``"eval set, 8 batches, 256 rows"``) or why it was not.
        num_labels / majority: for the at-chance judgement of an accuracy metric.
        compatibility: a line on label maps or vocabularies (e.g. from :func:`compatibility_summary`).
        loss_weights: every configured loss term and its weight (``{"kd": 0.5, "ce": 0.5, "hidden": 0.0}``).
        inactive_terms: term name → why it cannot run here (e.g. ``"no labels in the dataset"``).
        memory / available_bytes: the estimate and what the device has left.
        notes: further warnings about the recipe (e.g. terms that are not exact under accumulation).
    """

    teacher_metric: Optional[Mapping[str, float]] = None
    teacher_metric_source: Optional[str] = None
    num_labels: Optional[int] = None
    majority: Optional[float] = None
    compatibility: Optional[str] = None
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    inactive_terms: Mapping[str, str] = field(default_factory=dict)
    memory: Optional[MemoryEstimate] = None
    available_bytes: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    margin: float = 0.02

    def teacher_at_chance(self) -> bool:
        """True when the judged teacher metric is an accuracy at chance level."""
        if not self.teacher_metric or not self.num_labels:
            return False
        name, value = next(iter(self.teacher_metric.items()))
        if "acc" not in name:
            return False
        return teacher_is_at_chance(value, self.num_labels, self.majority, self.margin)

    def active_terms(self) -> dict[str, float]:
        """Terms with a non-zero weight that can run."""
        return {k: w for k, w in self.loss_weights.items() if w != 0 and k not in self.inactive_terms}

    def unused_terms(self) -> dict[str, str]:
        """Terms configured with a non-zero weight that will not run, and why."""
        return {k: why for k, why in self.inactive_terms.items() if self.loss_weights.get(k, 0) != 0}

    def memory_exceeded(self) -> bool:
        """True when the estimate needs more than the device has left."""
        return self.memory is not None and self.available_bytes is not None and self.memory.additional > self.available_bytes

    def warnings(self) -> list[str]:
        """Problems worth a loud log line that do not stop the run."""
        found = []
        if self.teacher_at_chance():
            name, value = next(iter(self.teacher_metric.items()))  # type: ignore[union-attr]
            baseline = max(chance_level(self.num_labels or 1), self.majority or 0.0)
            found.append(
                f"The teacher's {name} {value:.4f} is at chance (baseline {baseline:.4f} for {self.num_labels} labels): "
                "is it trained? Distilling an untrained teacher teaches the student nothing."
            )
        for name, why in self.unused_terms().items():
            found.append(f"Loss term '{name}' has weight {self.loss_weights[name]:g} but will not run: {why}.")
        found.extend(self.notes)
        if (
            self.memory is not None and self.available_bytes is not None and not self.memory_exceeded()
            and self.memory.additional > 0.8 * self.available_bytes
        ):
            found.append(
                f"The estimated peak needs {format_bytes(self.memory.additional)} of the "
                f"{format_bytes(self.available_bytes)} left: little headroom."
            )
        return found

    def errors(self) -> list[str]:
        """Problems that refuse the run unless forced."""
        found = []
        if self.loss_weights and not self.active_terms():
            found.append(
                "No loss term is active: every term has weight 0 or cannot run "
                f"({', '.join(f'{k}={w:g}' for k, w in self.loss_weights.items())}). Give one term a non-zero weight."
            )
        if self.memory_exceeded():
            assert self.memory is not None and self.available_bytes is not None
            found.append(
                f"The estimated peak memory {format_bytes(self.memory.total)} needs {format_bytes(self.memory.additional)} "
                f"more than is resident, but only {format_bytes(self.available_bytes)} is available. Lower the batch size "
                "or sequence length, use gradient accumulation, a bf16 teacher or cached teacher outputs, or force "
                "the run if the estimate is wrong."
            )
        return found

    def format(self) -> str:
        """The report as one block of text."""
        lines = ["=== hf_distill preflight ==="]
        if self.teacher_metric:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.teacher_metric.items())
            verdict = "AT CHANCE" if self.teacher_at_chance() else "ok"
            if self.num_labels and self.teacher_at_chance() is False and "acc" in next(iter(self.teacher_metric)):
                verdict += f" (chance {max(chance_level(self.num_labels), self.majority or 0.0):.4f})"
            source = f" ({self.teacher_metric_source})" if self.teacher_metric_source else ""
            lines.append(f"teacher{source}: {metrics} [{verdict}]")
        else:
            lines.append(f"teacher: not measured{f' ({self.teacher_metric_source})' if self.teacher_metric_source else ''}")
        lines.append(f"labels / vocabulary: {self.compatibility or 'not checked'}")
        if self.loss_weights:
            active = self.active_terms()
            lines.append("loss terms active: " + (", ".join(f"{k}={w:g}" for k, w in active.items()) or "NONE"))
            for name, why in self.unused_terms().items():
                lines.append(f"  !! configured but inactive: {name}={self.loss_weights[name]:g} ({why})")
            off = [k for k, w in self.loss_weights.items() if w == 0]
            if off:
                lines.append("loss terms off (weight 0): " + ", ".join(off))
        if self.memory is not None:
            lines.append(f"memory estimate: peak {self.memory.summary()}")
            if self.available_bytes is not None:
                verdict = "EXCEEDS" if self.memory_exceeded() else "fits"
                lines.append(
                    f"memory available: {format_bytes(self.available_bytes)}; still to allocate "
                    f"{format_bytes(self.memory.additional)} [{verdict}]"
                )
        for warning in self.warnings():
            lines.append(f"WARNING: {warning}")
        for error in self.errors():
            lines.append(f"ERROR: {error}")
        return "\n".join(lines)

    def check(self, force: bool = False) -> None:
        """Raise :class:`PreflightError` listing every error, unless ``force``."""
        errors = self.errors()
        if errors and not force:
            raise PreflightError("Preflight refused the run:\n- " + "\n- ".join(errors))


def format_preflight_report(**fields: Any) -> str:
    """``PreflightReport(**fields).format()``: one block of text (see :class:`PreflightReport` for the fields)."""
    return PreflightReport(**fields).format()


def compatibility_summary(teacher: Optional[nn.Module], student: nn.Module, task: str) -> str:
    """A line describing label maps or vocabularies of the pair (informational; mismatches are the trainer's)."""
    student = unwrap_model(student)
    s_config = getattr(student, "config", None)
    if task == "causal-lm":
        s_vocab = student.get_output_embeddings().weight.shape[0]
        if teacher is None:
            return f"vocabulary {s_vocab} (student; teacher outputs cached)"
        t_vocab = unwrap_model(teacher).get_output_embeddings().weight.shape[0]
        return f"vocabulary teacher {t_vocab} / student {s_vocab} [{'match' if t_vocab == s_vocab else 'MISMATCH'}]"
    if task == "question-answering":
        return "start/end positions (no label map)"
    if task in ENCODER_TASKS:
        from .intermediate import model_dims

        widths = [model_dims(m)[1] for m in (unwrap_model(teacher), student)] if teacher is not None else None
        return f"{task}: no labels; hidden width teacher {widths[0]} / student {widths[1]}" if widths else task
    s_map = {int(k): str(v) for k, v in (getattr(s_config, "id2label", None) or {}).items()}
    names = ", ".join(s_map[k] for k in sorted(s_map))
    if teacher is None:
        return f"{len(s_map)} labels ({names}); teacher outputs cached"
    t_config = getattr(unwrap_model(teacher), "config", None)
    t_map = {int(k): str(v) for k, v in (getattr(t_config, "id2label", None) or {}).items()}
    verdict = "match" if t_map == s_map else "MISMATCH"
    return f"{len(s_map)} labels ({names}); teacher label map [{verdict}]"


# ----------------------------------------------------------------------------------------------
# Gathering the inputs from a trainer
# ----------------------------------------------------------------------------------------------
def run_preflight(trainer: Any) -> PreflightReport:
    """Measure the teacher, list labels and loss terms, estimate peak memory for a DistillationTrainer; log
    one block; refuse (PreflightError) when the run cannot work unless ``preflight_force``. RNG states are
    left untouched."""
    args = trainer.args
    devices = [args.device.index or 0] if args.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        batch = _first_training_batch(trainer)
        metric, source, num_labels, majority = _teacher_metric(trainer)
        report = PreflightReport(
            teacher_metric=metric, teacher_metric_source=source, num_labels=num_labels, majority=majority,
            compatibility=_compatibility(trainer),
            loss_weights=configured_loss_terms(args, trainer.task), inactive_terms=inactive_loss_terms(trainer.task, batch),
            memory=_memory_estimate(trainer, batch), available_bytes=available_memory_bytes(args.device),
            notes=accumulation_warnings(args) + encoder_task_notes(trainer.task),
        )
    if trainer.is_world_process_zero():
        problems = report.warnings() or report.errors()
        (logger.warning if problems else logger.info)("%s", report.format())
    if report.errors() and args.preflight_force:
        logger.warning("Preflight errors ignored because preflight_force is set.")
    report.check(force=args.preflight_force)
    return report


def configured_loss_terms(args: Any, task: Optional[str] = None) -> dict[str, float]:
    """Every configured loss term and its weight ({name: weight}); weight 0 means off. With an alpha schedule a
    term counts as active if it is ever weighted. The encoder tasks (``task``, default ``args.distillation_task``)
    have no kd/ce terms: their intermediate terms, and ``embedding`` for sentence-embedding."""
    task = task or getattr(args, "distillation_task", None)
    if task in ENCODER_TASKS:
        terms = {"hidden": args.hidden_weight, "attention": args.attention_weight, "relation": args.relation_weight}
        return {**terms, "embedding": args.embedding_weight} if task == "sentence-embedding" else terms
    alpha = float(args.alpha)
    terms = {"kd": alpha, "ce": round(1.0 - alpha, 10)}
    if args.alpha_schedule != "constant" and args.alpha_end is not None:
        terms = {"kd": max(alpha, args.alpha_end), "ce": round(1.0 - min(alpha, args.alpha_end), 10)}
    terms.update({"hidden": args.hidden_weight, "attention": args.attention_weight, "relation": args.relation_weight})
    return terms


def inactive_loss_terms(task: str, batch: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """Configured terms that cannot apply with this data: {name: why}."""
    if task in ENCODER_TASKS:  # no labelled term to miss
        return {}
    if batch is not None and not any(k in batch for k in TARGET_KEYS[task]):
        return {"ce": "no labels in the training batches, so the soft term gets weight 1"}
    return {}


def encoder_task_notes(task: str) -> list[str]:
    """The line that says an encoder task has no logit terms (so no teacher accuracy either)."""
    if task not in ENCODER_TASKS:
        return []
    what = "the pooled sentence embedding and any intermediate terms" if task == "sentence-embedding" else \
        "the intermediate terms (hidden states, attention maps, relations) only"
    return [f"distillation_task={task!r}: no logits, so no KD or CE term and no teacher accuracy; the loss is {what}."]


def _compatibility(trainer: Any) -> str:
    """The labels / vocabulary line; in cross-tokenizer mode, how many vocabulary entries the two sides share."""
    cross = getattr(trainer, "cross", None)
    if cross is None:
        return compatibility_summary(trainer.teacher, trainer.model, trainer.task)
    return f"cross-tokenizer mode: {len(cross.mapping)} vocabulary entries shared, loss {cross.mode}"


def _first_training_batch(trainer: Any) -> Optional[dict[str, Any]]:
    if trainer.train_dataset is None:
        return None
    try:
        return next(iter(trainer.get_train_dataloader()))
    except StopIteration:
        return None


def _teacher_metric(trainer: Any) -> tuple[Optional[dict], str, Optional[int], Optional[float]]:
    """(metric, source, num_labels, majority): the teacher's top-1 accuracy against the labels."""
    limit = trainer.args.preflight_eval_batches
    dataset = trainer.eval_dataset
    if isinstance(dataset, dict):
        dataset = next(iter(dataset.values()), None)
    where = "eval set" if dataset is not None else "training batches (no eval_dataset)"
    if limit == 0:
        return None, "preflight_eval_batches=0", None, None
    if trainer.task in ENCODER_TASKS:
        return None, f"{trainer.task}: no logits to score", None, None
    width = trainer.student_output_width()
    num_labels = None if trainer.task == "question-answering" else width
    counts = torch.zeros(2 + (width if num_labels else 1), device=trainer.args.device)  # correct, labelled, histogram
    loader = trainer.get_eval_dataloader(dataset) if dataset is not None else trainer.get_train_dataloader()
    batches = 0
    try:
        for batches, inputs in enumerate(loader, start=1):
            counts += _teacher_batch_counts(trainer, trainer._prepare_inputs(inputs), width, num_labels)
            if batches >= limit:
                break
    except ValueError as error:  # e.g. no teacher and no cached outputs in the eval set
        return None, f"{where}: {error}", None, None
    counts = trainer.accelerator.reduce(counts, "sum") if trainer.accelerator.num_processes > 1 else counts
    correct, labelled, histogram = counts[0].item(), counts[1].item(), counts[2:]
    if labelled == 0:
        return None, f"{where}: no labels", None, None
    majority = (histogram.max() / histogram.sum()).item() if num_labels else None
    source = f"{where}, {batches} batch(es), {int(labelled)} labelled rows"
    return {"accuracy": correct / labelled}, source, num_labels, majority


def _teacher_batch_counts(trainer: Any, inputs: dict, width: int, num_labels: Optional[int]) -> torch.Tensor:
    """[correct, labelled, histogram...] of the teacher's top-1 on one batch."""
    counts = torch.zeros(2 + (width if num_labels else 1), device=trainer.args.device)
    _, teacher_inputs, cached = trainer.split_inputs(inputs)
    outputs = trainer.live_teacher_outputs(teacher_inputs, cached)
    parts = trainer.teacher_targets(outputs, cached, trainer.current_temperature(), width)[0][0]
    for r in logit_rows(trainer.task, parts[0], parts[0] if len(parts) == 1 else parts, inputs):
        if r.labels is None:
            continue
        top1 = r.teacher[1][..., 0] if len(r.teacher) == 2 else r.teacher[0].argmax(-1)
        valid = (r.weights > 0) & (r.labels != -100)
        counts[0] += ((top1 == r.labels) & valid).sum()
        counts[1] += valid.sum()
        if num_labels:
            counts[2:] += torch.bincount(r.labels[valid].long(), minlength=width)[:width].float()
    return counts


def _memory_estimate(trainer: Any, batch: Optional[dict[str, Any]]) -> MemoryEstimate:
    """estimate_peak_memory with the trainer's models, batch shape, optimizer and intermediate terms."""
    args, seq_length = trainer.args, 1
    if batch is not None and torch.is_tensor(batch.get("input_ids")) and batch["input_ids"].dim() > 1:
        seq_length = batch["input_ids"].shape[-1]
    data = trainer.train_dataset
    if hasattr(data, "column_names") and "input_ids" in (data.column_names or []) and hasattr(data, "__len__"):
        seq_length = max([seq_length] + [len(ids) for ids in data[: min(len(data), 1024)]["input_ids"]])
    indices = f"{args.teacher_topk_column_prefix}_indices"
    topk = batch[indices].shape[-1] if trainer.teacher is None and batch is not None and indices in batch else None
    dtype = TEACHER_DTYPES.get(args.teacher_dtype)
    return estimate_peak_memory(
        trainer.model, trainer.teacher, batch_size=args.per_device_train_batch_size, seq_length=seq_length,
        optimizer=str(args.optim), gradient_accumulation_steps=args.gradient_accumulation_steps, task=trainer.task,
        vocab_or_labels=trainer.student_output_width(),
        teacher_dtype_bytes=None if dtype is None else torch.finfo(dtype).bits // 8,
        cached_topk=topk, loss_chunk_size=args.loss_chunk_size, device=args.device,
        **_intermediate_memory_settings(trainer.intermediate),
    )


def _intermediate_memory_settings(terms: Any) -> dict[str, Any]:
    """What the intermediate terms add to the step's memory, in estimate_peak_memory's terms."""
    if terms is None:
        return {}
    projections = terms.projections
    return dict(
        teacher_hidden_states=terms.needs_hidden_states, teacher_attentions=terms.needs_attentions,
        projected_layers=0 if projections is None else len(terms.hidden_map),
        extra_parameters=() if projections is None else list(projections.parameters()),
    )


__all__ = [
    "MemoryEstimate", "PreflightError", "PreflightReport", "available_memory_bytes", "chance_level",
    "compatibility_summary", "estimate_peak_memory", "format_bytes", "format_preflight_report",
    "configured_loss_terms", "inactive_loss_terms", "majority_fraction", "run_preflight", "saved_activation_bytes", "teacher_is_at_chance",
]
