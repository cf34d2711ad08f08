"""`DistillationArguments`: every distillation knob, on top of `transformers.TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from transformers import TrainingArguments

from .distributed import TEACHER_SHARDING_MODES
from .losses.logits import LOSS_NAMES

# --teacher_dtype value -> the dtype the teacher is cast to (None: "auto", keep the loaded dtype). The one table:
# the trainer casts with it and the memory estimate reads its element size (``dtype.itemsize``).
TEACHER_DTYPES: dict[str, Optional[torch.dtype]] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
TASKS = ("sequence-classification", "token-classification", "question-answering", "causal-lm",
         "feature-extraction", "sentence-embedding")
# The knobs of the logit terms (KD and CE). The encoder tasks have no logits: setting one of these away from its
# default asks for a logit term that cannot exist there, and is refused (see `logit_settings_changed`).
LOGIT_TERM_FIELDS = ("alpha", "alpha_end", "alpha_schedule", "temperature", "temperature_end", "temperature_schedule",
                     "distillation_loss", "jsd_beta", "skew_lambda", "scale_by_temperature_squared")
EMBEDDING_FIELDS = ("embedding_weight", "embedding_loss", "embedding_pooling", "embedding_normalize")
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
        metadata={
            "help": "β in [0, 1] of GKD's generalised JSD (as TRL): β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m), "
            "m = β·teacher + (1 − β)·student; 0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD."
        },
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
    teacher_sharding: str = field(
        default="auto",
        metadata={
            "help": "Where the teacher lives on several processes: auto (sharded like the student under FSDP and "
            "DeepSpeed ZeRO-3, a full copy per process otherwise), none (a full copy per process), fsdp (FSDP2 "
            "shards per transformer block, also beside a DDP student), deepspeed (a ZeRO-3 inference engine).",
            "choices": list(TEACHER_SHARDING_MODES),
        },
    )
    teacher_trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code when loading the teacher from a path or Hub name."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Also load model folders that hold only pickle weights (pytorch_model.bin, read with "
                  "torch.load(weights_only=True)). Off: safetensors only, and such a folder is refused."},
    )
    # --- task and data -------------------------------------------------------------------------
    distillation_task: Optional[str] = field(
        default=None,
        metadata={
            "help": "Output shape to distil; detected from the student class when unset (a headless AutoModel: "
            "feature-extraction). feature-extraction: general distillation of a headless student on unlabelled "
            "text with the hidden/attention/relation terms only; sentence-embedding: the pooled sentence embedding "
            "(embedding_*), intermediate terms optional. Neither has logits: setting alpha, temperature, "
            "distillation_loss or their schedules is refused for them, as is feature-extraction with every "
            "intermediate weight 0.",
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
    truncate_teacher_vocab: bool = field(
        default=False,
        metadata={"help": "Causal LM: when the teacher's output layer has extra (padding) rows beyond the student's "
                  "vocabulary, drop them from its logits. Off: differing sizes are an error."},
    )
    cross_tokenizer_loss: str = field(
        default="hybrid",
        metadata={"help": "Causal LM with a teacher tokenizer of another vocabulary (cross-tokenizer mode): hybrid "
                  "(forward KL over the shared vocabulary plus an 'other' bin for groups of one shared token per "
                  "side, ULD for the other aligned groups) or uld (ULD for every group)."},
    )
    max_unaligned_share: float = field(
        default=0.1,
        metadata={"help": "Cross-tokenizer mode: refuse a batch whose share of completion tokens that cannot be "
                  "aligned between the two tokenizers exceeds this, in [0, 1] (any share above 0 is warned)."},
    )
    # --- schedules -----------------------------------------------------------------------------
    temperature_schedule: str = field(
        default="constant",
        metadata={"help": "Temperature over training: constant, linear or cosine, from temperature to temperature_end.",
                  "choices": list(SCHEDULES)},
    )
    temperature_end: Optional[float] = field(
        default=None, metadata={"help": "Temperature at the last step (> 0); default: temperature."}
    )
    alpha_schedule: str = field(
        default="constant",
        metadata={"help": "alpha over training: constant, linear or cosine, from alpha to alpha_end.",
                  "choices": list(SCHEDULES)},
    )
    alpha_end: Optional[float] = field(default=None, metadata={"help": "alpha at the last step, in [0, 1]; default: alpha."})
    # --- sentence embeddings (distillation_task="sentence-embedding") -----------------------------
    embedding_weight: float = field(
        default=1.0,
        metadata={"help": "sentence-embedding: weight (> 0) of loss_embedding, the distance between the student's "
                  "pooled embedding (projected when the widths differ) and the teacher's."},
    )
    embedding_loss: str = field(
        default="cosine",
        metadata={"help": "sentence-embedding: mse or cosine, between the pooled embeddings.", "choices": ["mse", "cosine"]},
    )
    embedding_pooling: Optional[str] = field(
        default=None,
        metadata={"help": "sentence-embedding: mean, cls or max pooling of the last hidden states; default: read "
                  "from the teacher's sentence-transformers files (an error names this flag when it has none). "
                  "Written into the student's folder.", "choices": ["mean", "cls", "max"]},
    )
    embedding_normalize: Optional[bool] = field(
        default=None,
        metadata={"help": "sentence-embedding: L2-normalise the pooled embedding; needs --embedding_pooling "
                  "(default false with it; read from the teacher without it)."},
    )
    # --- intermediate layers: hidden states ------------------------------------------------------
    hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight (>= 0) of the hidden-state term loss_hidden; 0: off."}
    )
    hidden_loss: str = field(
        default="mse", metadata={"help": "Hidden-state loss: mse, cosine or pkd (normalised [CLS], Sun et al. 2019).",
                                 "choices": ["mse", "cosine", "pkd"]},
    )
    hidden_layer_map: str = field(
        default="uniform",
        metadata={"help": "Student→teacher hidden-state layers: uniform, last, last:N (the last N layers only), skip, "
                  "skip:N, or a JSON map '{\"2\": 4}' (0 = embeddings, i = output of layer i). Checked when the "
                  "arguments are built."},
    )
    hidden_include_embeddings: bool = field(
        default=True,
        metadata={"help": "Also match the embedding outputs (0 → 0) under uniform and skip (never under last / last:N)."},
    )
    hidden_projection: bool = field(
        default=True,
        metadata={"help": "Learn linear projections student width → teacher width when they differ; saved to "
                  "distillation/projections.safetensors, never in the student."},
    )
    hidden_shared_projection: bool = field(
        default=False, metadata={"help": "One projection shared by all mapped layers (TinyBERT's W_h) instead of one each."}
    )
    # --- intermediate layers: attention maps -----------------------------------------------------
    attention_weight: float = field(
        default=0.0,
        metadata={"help": "Weight (>= 0) of the attention-map term loss_attention; 0: off. Switches models to eager attention."},
    )
    attention_loss: str = field(
        default="kl", metadata={"help": "Attention loss: kl (teacher ‖ student per query row) or mse.", "choices": ["kl", "mse"]}
    )
    attention_layer_map: str = field(
        default="uniform", metadata={"help": "Student→teacher attention layers (0-based): as hidden_layer_map."}
    )
    attention_head_mismatch: str = field(
        default="mean",
        metadata={"help": "When head counts differ: mean (compare head-averaged maps) or error.", "choices": ["mean", "error"]},
    )
    # --- intermediate layers: relations ----------------------------------------------------------
    relation_weight: float = field(
        default=0.0, metadata={"help": "Weight (>= 0) of the relation term loss_relation; 0: off."}
    )
    relation_loss: str = field(
        default="minilm",
        metadata={"help": "minilm (token-token relations of the last hidden states, any widths/heads), rkd_distance or "
                  "rkd_angle (sample relations of mean-pooled states).", "choices": ["minilm", "rkd_distance", "rkd_angle"]},
    )
    relation_teacher_layer: int = field(
        default=-1, metadata={"help": "Teacher hidden-state index the student's last layer relates to (-1: last)."}
    )
    relation_heads: int = field(
        default=1, metadata={"help": "MiniLM relation heads; must divide both widths."}
    )
    # --- several teachers, self-distillation -----------------------------------------------------
    teacher_weights: Optional[list[float]] = field(
        default=None,
        metadata={"help": "Weights in [0, 1] of several teachers (summing to 1); default: equal."},
    )
    multi_teacher_mode: str = field(
        default="average",
        metadata={"help": "average: distil the weighted mixture of the teachers' softened distributions; sum: the "
                  "weighted sum of one soft loss per teacher.", "choices": ["average", "sum"]},
    )
    intermediate_teacher: int = field(
        default=0, metadata={"help": "Index of the teacher that intermediate (hidden/attention/relation) terms match."}
    )
    self_distillation: str = field(
        default="none",
        metadata={"help": "With no teacher: snapshot (the student before training) or ema (a moving average of the "
                  "student, updated every step) is the teacher.", "choices": ["none", "snapshot", "ema"]},
    )
    ema_decay: float = field(default=0.999, metadata={"help": "Decay d in [0, 1) of the EMA teacher."})
    # --- causal LM: on-policy data (GKD) ---------------------------------------------------------
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability in [0, 1], per optimizer step, that the student generates the completions it "
                  "is trained on (on-policy, GKD). 0: the dataset's completions only."},
    )
    generation_max_new_tokens: int = field(default=64, metadata={"help": "On-policy generation: new tokens at most."})
    generation_temperature: float = field(default=1.0, metadata={"help": "On-policy generation: sampling temperature (> 0)."})
    generation_top_p: float = field(default=1.0, metadata={"help": "On-policy generation: nucleus top-p in (0, 1]."})
    generation_top_k: int = field(default=0, metadata={"help": "On-policy generation: top-k (0: off)."})

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
            raise ValueError(
                f"`teacher_dtype` must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r} (--teacher_dtype)."
            )
        if self.teacher_sharding not in TEACHER_SHARDING_MODES:
            raise ValueError(f"`teacher_sharding` must be one of {TEACHER_SHARDING_MODES}, got {self.teacher_sharding!r}.")
        if self.distillation_task is not None and self.distillation_task not in TASKS:
            raise ValueError(f"`distillation_task` must be one of {TASKS}, got {self.distillation_task!r}.")
        if self.loss_chunk_size < 0:
            raise ValueError("`loss_chunk_size` must be >= 0 (0 turns chunking off).")
        if self.cross_tokenizer_loss not in ("hybrid", "uld"):
            raise ValueError(f"`cross_tokenizer_loss` must be 'hybrid' or 'uld', got {self.cross_tokenizer_loss!r}.")
        _unit_interval("max_unaligned_share", self.max_unaligned_share)
        self._check_encoder_tasks()
        # --- production
        if self.preflight_eval_batches < 0:
            raise ValueError(f"`preflight_eval_batches` must be >= 0, got {self.preflight_eval_batches}.")
        if self.max_non_finite_losses < 0:
            raise ValueError(f"`max_non_finite_losses` must be >= 0, got {self.max_non_finite_losses}.")
        if self.non_finite_loss_count not in ("total", "consecutive"):
            raise ValueError(
                f"`non_finite_loss_count` must be 'total' or 'consecutive', got {self.non_finite_loss_count!r}."
            )
        self._check_recipe_extensions()

    def _check_recipe_extensions(self) -> None:
        """Range checks of schedules, intermediate terms, several teachers, self-distillation, on-policy data."""
        for name in ("temperature_schedule", "alpha_schedule"):
            if getattr(self, name) not in SCHEDULES:
                raise ValueError(f"`{name}` must be one of {SCHEDULES}, got {getattr(self, name)!r}.")
        if self.temperature_end is not None and not self.temperature_end > 0:
            raise ValueError(f"`temperature_end` must be > 0, got {self.temperature_end}.")
        if self.alpha_end is not None:
            _unit_interval("alpha_end", self.alpha_end)
        from .intermediate import IntermediateSettings

        IntermediateSettings.from_args(self)  # validates the hidden_*, attention_* and relation_* fields
        if self.teacher_weights is not None:
            for w in self.teacher_weights:
                _unit_interval("teacher_weights", w)
            if abs(sum(self.teacher_weights) - 1.0) > 1e-6:
                raise ValueError(f"`teacher_weights` must sum to 1, got {self.teacher_weights} (sum {sum(self.teacher_weights)}).")
        if self.multi_teacher_mode not in ("average", "sum"):
            raise ValueError(f"`multi_teacher_mode` must be 'average' or 'sum', got {self.multi_teacher_mode!r}.")
        if self.self_distillation not in ("none", "snapshot", "ema"):
            raise ValueError(f"`self_distillation` must be none, snapshot or ema, got {self.self_distillation!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        _unit_interval("lmbda", self.lmbda)
        if self.generation_max_new_tokens < 1:
            raise ValueError(f"`generation_max_new_tokens` must be >= 1, got {self.generation_max_new_tokens}.")
        if not self.generation_temperature > 0:
            raise ValueError(f"`generation_temperature` must be > 0, got {self.generation_temperature}.")
        if not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"`generation_top_p` must be in (0, 1], got {self.generation_top_p}.")
        if self.generation_top_k < 0:
            raise ValueError(f"`generation_top_k` must be >= 0, got {self.generation_top_k}.")

    def _check_encoder_tasks(self) -> None:
        """The embedding_* fields, and the encoder tasks' refusals: logit-term settings, no active term."""
        if self.embedding_weight < 0:
            raise ValueError(f"`embedding_weight` must be >= 0, got {self.embedding_weight} (--embedding_weight).")
        if self.embedding_loss not in ("mse", "cosine"):
            raise ValueError(f"`embedding_loss` must be mse or cosine, got {self.embedding_loss!r} (--embedding_loss).")
        if self.embedding_pooling not in (None, "mean", "cls", "max"):
            raise ValueError(f"`embedding_pooling` must be mean, cls or max, got {self.embedding_pooling!r}.")
        if self.embedding_normalize is not None and self.embedding_pooling is None:
            raise ValueError("--embedding_normalize needs --embedding_pooling (mean, cls or max) beside it.")
        task = self.distillation_task
        changed = [name for name in EMBEDDING_FIELDS if getattr(self, name) != _DEFAULTS[name]]
        if task not in (None, "sentence-embedding") and changed:
            raise ValueError(f"{', '.join('--' + n for n in changed)} apply to distillation_task="
                             f"'sentence-embedding' only, not {task!r}: remove them.")
        if task in ("feature-extraction", "sentence-embedding"):
            from .encoder_tasks import check_encoder_arguments

            check_encoder_arguments(task, self)

    def distillation_dict(self) -> dict[str, Any]:
        """The arguments this class adds to TrainingArguments, as plain data."""
        own = {f.name for f in fields(DistillationArguments)} - {f.name for f in fields(TrainingArguments)}
        return {name: getattr(self, name) for name in sorted(own)}


_DEFAULTS = {f.name: f.default for f in fields(DistillationArguments)}


def logit_settings_changed(args: Any) -> dict[str, Any]:
    """{field: value} of the logit-term settings (``LOGIT_TERM_FIELDS``) that differ from their defaults."""
    return {name: getattr(args, name) for name in LOGIT_TERM_FIELDS
            if hasattr(args, name) and getattr(args, name) != _DEFAULTS[name]}
