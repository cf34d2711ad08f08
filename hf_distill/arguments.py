"""`DistillationArguments`: every distillation knob, on top of `transformers.TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from transformers import TrainingArguments

from .losses.logits import LOSS_NAMES

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
TASKS = ("sequence-classification", "token-classification", "question-answering", "causal-lm")
SCHEDULES = ("constant", "linear", "cosine")


def _unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}. Pass --{name} with a value between 0 and 1.")


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments plus the distillation recipe.

    Loss: ``alpha · soft + (1 − alpha) · hard`` (+ weighted intermediate terms), where ``soft`` is the
    chosen divergence between temperature-softened teacher and student distributions.
    """

    # --- soft / hard labels -------------------------------------------------------------------
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T > 0 applied to teacher and student logits."}
    )
    alpha: float = field(
        default=0.5,
        metadata={"help": "Weight of the soft-label term in [0, 1]; the hard-label cross-entropy gets 1 - alpha."},
    )
    distillation_loss: str = field(
        default="forward_kl",
        metadata={"help": f"Soft-label loss, one of: {', '.join(LOSS_NAMES)}.", "choices": list(LOSS_NAMES)},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "β of the generalised JSD in [0, 1]: 0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD."},
    )
    skew_lambda: float = field(
        default=0.1, metadata={"help": "λ of the skew KL losses (DistiLLM) in [0, 1): the mixing weight."}
    )
    scale_by_temperature_squared: bool = field(
        default=True, metadata={"help": "Multiply the soft-label term by T² (Hinton et al. 2015)."}
    )
    # --- teacher -------------------------------------------------------------------------------
    teacher_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the teacher forward: auto (keep the loaded dtype), float32, bfloat16 or float16.",
            "choices": list(TEACHER_DTYPES),
        },
    )
    freeze_teacher: bool = field(
        default=True,
        metadata={"help": "Freeze the teacher's parameters. When off, a teacher that requires gradients is an error."},
    )
    teacher_trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code when loading the teacher from a path or Hub name."}
    )
    # --- task and data -------------------------------------------------------------------------
    distillation_task: Optional[str] = field(
        default=None,
        metadata={
            "help": "Output shape to distil; detected from the student class when unset.",
            "choices": list(TASKS),
        },
    )
    teacher_logits_column: str = field(
        default="teacher_logits", metadata={"help": "Dataset column holding cached full teacher logits."}
    )
    teacher_topk_column_prefix: str = field(
        default="teacher_topk",
        metadata={"help": "Prefix of the cached top-k columns (<prefix>_log_probs, <prefix>_indices)."},
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Rows (tokens) per chunk for token-level losses; bounds memory at large vocabularies. 0: off."},
    )

    # --- production: preflight, fault handling, atomic saving, compile ---------------------------
    preflight: bool = field(
        default=True,
        metadata={"help": "Before the first step, log one preflight block (teacher metric on the eval set, label "
                  "maps / vocabularies, active loss terms, peak-memory estimate) and refuse runs that cannot work."},
    )
    preflight_force: bool = field(
        default=False,
        metadata={"help": "Run even when the preflight refuses (estimated memory above what is available, no "
                  "active loss term); the problems are still logged."},
    )
    preflight_eval_batches: int = field(
        default=8,
        metadata={"help": "Eval batches (per process) on which the preflight measures the teacher; 0 skips it."},
    )
    max_non_finite_losses: int = field(
        default=10,
        metadata={"help": "Optimizer steps with a NaN/inf loss that are skipped (no update) before training stops "
                  "with an error; 0 stops at the first one."},
    )
    non_finite_loss_count: str = field(
        default="total",
        metadata={"help": "How bad steps are counted against max_non_finite_losses: total (since the start) or "
                  "consecutive (a finite step resets the count).", "choices": ["total", "consecutive"]},
    )
    save_on_signal: bool = field(
        default=True,
        metadata={"help": "On SIGTERM/SIGINT, save a resumable checkpoint at the end of the current optimizer step, "
                  "then exit with 128 + signal number."},
    )
    atomic_save: bool = field(
        default=True,
        metadata={"help": "Write checkpoints and the final student into a temporary folder and rename them into "
                  "place, so a run killed while saving leaves the previous save loadable."},
    )
    torch_compile_teacher: bool = field(
        default=False,
        metadata={"help": "torch.compile the teacher (backend and mode from torch_compile_backend / "
                  "torch_compile_mode, default inductor). torch_compile compiles the student."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}. Use e.g. --temperature 2.0.")
        _unit_interval("alpha", self.alpha)
        _unit_interval("jsd_beta", self.jsd_beta)
        if not 0.0 <= self.skew_lambda < 1.0:
            raise ValueError(f"`skew_lambda` must be in [0, 1), got {self.skew_lambda}.")
        if self.distillation_loss not in LOSS_NAMES:
            raise ValueError(
                f"Unknown distillation_loss {self.distillation_loss!r}; choose one of {', '.join(LOSS_NAMES)}."
            )
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"`teacher_dtype` must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        if self.distillation_task is not None and self.distillation_task not in TASKS:
            raise ValueError(f"`distillation_task` must be one of {TASKS}, got {self.distillation_task!r}.")
        if self.loss_chunk_size < 0:
            raise ValueError("`loss_chunk_size` must be >= 0 (0 turns chunking off).")
        # --- production
        if self.preflight_eval_batches < 0:
            raise ValueError(f"`preflight_eval_batches` must be >= 0, got {self.preflight_eval_batches}.")
        if self.max_non_finite_losses < 0:
            raise ValueError(f"`max_non_finite_losses` must be >= 0, got {self.max_non_finite_losses}.")
        if self.non_finite_loss_count not in ("total", "consecutive"):
            raise ValueError(
                f"`non_finite_loss_count` must be 'total' or 'consecutive', got {self.non_finite_loss_count!r}."
            )

    def distillation_dict(self) -> dict[str, Any]:
        """The arguments this class adds to TrainingArguments, as plain data."""
        own = {f.name for f in fields(DistillationArguments)} - {f.name for f in fields(TrainingArguments)}
        return {name: getattr(self, name) for name in sorted(own)}
