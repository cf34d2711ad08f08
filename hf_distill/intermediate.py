"""Intermediate-layer terms: hidden states, attention maps and relations, read from model outputs.

:class:`IntermediateTerms` is built once from plain settings (:class:`IntermediateSettings`) and the two
model configs. It resolves the layer maps, checks widths and head counts, and owns the learned
projections (an ``nn.Module`` trained with the student but saved on its own). Each step it reads the
``hidden_states`` / ``attentions`` tuples of one student and one teacher output and returns, per term,
the loss **summed over the examples of the batch** (the trainer divides by the examples of the whole
optimizer step, so gradient accumulation and processes stay exact):

    hidden     Σ_b mean_{(s,t) in map} L(P_s(h^S_s), h^T_t)_b          L = MSE | cosine | PKD [CLS]
    attention  Σ_b mean_{(s,t) in map} L(a^S_s, a^T_t)_b               L = KL | MSE (head-averaged if asked)
    relation   Σ_b MiniLM(h^S_last, h^T_r)_b        or   B · RKD(pool(h^S_last), pool(h^T_r))

Models are never patched: the trainer asks for ``output_hidden_states`` / ``output_attentions``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, field, fields, make_dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .layer_map import (
    FeatureProjections,
    check_widths,
    parse_layer_map_spec,
    resolve_attention_layer_map,
    resolve_layer_map,
)
from .losses.features import attention_kl, attention_mse, hidden_cosine, hidden_mse, pkd_cls
from .losses.relations import minilm_relation, rkd_angle, rkd_distance
from .tasks import unwrap_model

logger = logging.getLogger(__name__)

HIDDEN_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"mse": hidden_mse, "cosine": hidden_cosine, "pkd": pkd_cls}
ATTENTION_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"kl": attention_kl, "mse": attention_mse}
RELATION_LOSSES = ("minilm", "rkd_distance", "rkd_angle")
RKD_LOSSES = ("rkd_distance", "rkd_angle")  # relate the examples of a micro-batch to each other
HEAD_MISMATCH = ("mean", "error")


INTERMEDIATE_PREFIXES = ("hidden_", "attention_", "relation_")


class _IntermediateSettingsBase:
    """What :class:`IntermediateSettings` does; its fields are generated from the arguments (below)."""

    hidden_weight: float
    attention_weight: float
    relation_weight: float

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def from_args(cls, args: Any) -> Any:
        """Pick the matching fields off an arguments object (checked on construction)."""
        return cls(**{name: getattr(args, name) for name in cls.__dataclass_fields__ if hasattr(args, name)})

    def check(self) -> None:
        """Range, choice and layer-map syntax checks, with the flag to fix in the message."""
        for name in ("hidden_weight", "attention_weight", "relation_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}. Use --{name} 0 to turn the term off.")
        choices = {
            "hidden_loss": tuple(HIDDEN_LOSSES),
            "attention_loss": tuple(ATTENTION_LOSSES),
            "relation_loss": RELATION_LOSSES,
            "attention_head_mismatch": HEAD_MISMATCH,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(allowed)}; got {getattr(self, name)!r} (--{name}).")
        if self.relation_heads < 1:
            raise ValueError(f"`relation_heads` must be >= 1, got {self.relation_heads} (--relation_heads).")
        for name in ("hidden_layer_map", "attention_layer_map"):
            parse_layer_map_spec(getattr(self, name), flag=f"--{name}")

    @property
    def active(self) -> dict[str, float]:
        """{term: weight} of the terms with a non-zero weight."""
        weights = {"hidden": self.hidden_weight, "attention": self.attention_weight, "relation": self.relation_weight}
        return {name: w for name, w in weights.items() if w > 0}


def _settings_fields() -> list[tuple[str, Any, Any]]:
    """The ``hidden_*``, ``attention_*`` and ``relation_*`` fields of DistillationArguments (defaults, help)."""
    from .arguments import DistillationArguments

    return [
        (f.name, f.type, field(default=f.default, metadata=f.metadata))
        for f in fields(DistillationArguments)
        if f.name.startswith(INTERMEDIATE_PREFIXES)
    ]


IntermediateSettings = make_dataclass(
    "IntermediateSettings",
    _settings_fields(),
    bases=(_IntermediateSettingsBase,),
    namespace={
        "__module__": __name__,
        "__doc__": "The intermediate-term part of the recipe: the ``hidden_*``, ``attention_*`` and ``relation_*`` "
        "fields of :class:`~hf_distill.DistillationArguments`, with their defaults, generated from it (one "
        "declaration, one validation: :meth:`check`, run on construction, also by DistillationArguments).",
    },
)


def accumulation_warnings(args: Any) -> list[str]:
    """Warnings for recipes whose loss is not the same with gradient accumulation (or several processes).

    ``rkd_distance`` / ``rkd_angle`` relate the examples of one micro-batch to each other, so a batch of 8 is
    not 4 × 2 accumulation (nor 2 processes × 4): the pairs across micro-batches are never compared.
    """
    if getattr(args, "relation_weight", 0.0) <= 0 or getattr(args, "relation_loss", "") not in RKD_LOSSES:
        return []
    steps = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    processes = int(getattr(args, "world_size", 1) or 1)
    if steps <= 1 and processes <= 1:
        return []
    micro = getattr(args, "per_device_train_batch_size", None)
    return [
        f"--relation_loss {args.relation_loss} relates the examples of one micro-batch"
        + (f" ({micro} per process)" if micro else "")
        + f" to each other; with --gradient_accumulation_steps {steps} and {processes} process(es) it is not the "
        "loss of one batch of the global size. Raise --per_device_train_batch_size and use "
        "--gradient_accumulation_steps 1 for that, or use --relation_loss minilm, which is per example."
    ]


def model_dims(model: nn.Module) -> tuple[int, int, int]:
    """(layers, width, attention heads) of a transformers model, whatever the family's attribute names."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("Intermediate-layer terms need transformers models with a `config`.")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        raise ValueError(f"{type(config).__name__} has none of {names}; pass an explicit layer map and widths.")

    return (
        first("num_hidden_layers", "n_layer", "n_layers"),
        first("hidden_size", "dim", "n_embd", "d_model"),
        first("num_attention_heads", "n_head", "n_heads"),
    )


def masked_mean_pool(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]``: the mean over valid tokens."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class IntermediateTerms(nn.Module):
    """Resolved layer maps + projections; computes the per-batch sums of the active intermediate terms.

    Raises ValueError before training for a layer map out of range, widths that differ with the
    projection off, head counts that differ with ``attention_head_mismatch="error"``, or relation
    heads that do not divide both widths.
    """

    def __init__(self, settings: Any, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        settings.check()  # again: a settings object may have been changed after it was built
        self.settings = settings
        ls, ws, hs = model_dims(student)
        lt, wt, ht = model_dims(teacher)
        self.hidden_map: dict[int, int] = {}
        self.attention_map: dict[int, int] = {}
        self.projections: Optional[FeatureProjections] = None
        if settings.hidden_weight > 0:
            strategy, count = parse_layer_map_spec(settings.hidden_layer_map, "--hidden_layer_map")
            self.hidden_map = resolve_layer_map(  # last / last:N: the last layers only, never the embeddings
                strategy, ls, lt, include_embeddings=settings.hidden_include_embeddings and strategy != "last",
                num_layers=count if strategy == "last" else None, step=count if strategy == "skip" else None,
            )
            try:
                needs_projection = check_widths(ws, wt, settings.hidden_projection)
            except ValueError as error:
                raise ValueError(f"{error} (--hidden_projection true)") from None
            if needs_projection:
                self.projections = FeatureProjections(ws, wt, self.hidden_map, shared=settings.hidden_shared_projection)
        if settings.attention_weight > 0:
            strategy, count = parse_layer_map_spec(settings.attention_layer_map, "--attention_layer_map")
            self.attention_map = resolve_attention_layer_map(
                strategy, ls, lt, num_layers=count if strategy == "last" else None, step=count if strategy == "skip" else None
            )
            if hs != ht and settings.attention_head_mismatch == "error":
                raise ValueError(
                    f"The student has {hs} attention heads and the teacher {ht}. Set --attention_head_mismatch mean "
                    "to compare head-averaged maps, or use --relation_loss minilm, which works across head counts."
                )
            self.head_reduction = "mean" if hs != ht else None
        if settings.relation_weight > 0:
            self.relation_teacher_layer = settings.relation_teacher_layer % (lt + 1)
            if settings.relation_loss == "minilm" and (ws % settings.relation_heads or wt % settings.relation_heads):
                raise ValueError(
                    f"--relation_heads {settings.relation_heads} must divide both widths (student {ws}, teacher {wt})."
                )
        self.num_student_layers = ls

    # ------------------------------------------------------------------ what the trainer must ask for
    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_map) or self.settings.relation_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return bool(self.attention_map)

    def describe(self) -> dict[str, Any]:
        """The resolved recipe of the active terms, for the log and ``distillation/recipe.json``."""
        out: dict[str, Any] = {"settings": asdict(self.settings), "active": self.settings.active}
        if self.hidden_map:
            out["hidden_layer_map"] = {str(s): t for s, t in self.hidden_map.items()}
            out["projections"] = None if self.projections is None else {
                "student_width": self.projections.student_width,
                "teacher_width": self.projections.teacher_width,
                "shared": self.projections.shared,
            }
        if self.attention_map:
            out["attention_layer_map"] = {str(s): t for s, t in self.attention_map.items()}
            out["attention_head_reduction"] = self.head_reduction
        if self.settings.relation_weight > 0:
            out["relation_layers"] = {"student": self.num_student_layers, "teacher": self.relation_teacher_layer}
        return out

    # ------------------------------------------------------------------ the terms
    def _project(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return hidden if self.projections is None else self.projections(hidden, layer)

    def hidden_sum(self, student_hidden, teacher_hidden, attention_mask) -> torch.Tensor:
        loss_fn = HIDDEN_LOSSES[self.settings.hidden_loss]
        per_example = [
            loss_fn(self._project(student_hidden[s], s), teacher_hidden[t].to(student_hidden[s].dtype), attention_mask)
            for s, t in self.hidden_map.items()
        ]
        return torch.stack(per_example).mean(0).sum()

    def attention_sum(self, student_attn, teacher_attn, attention_mask) -> torch.Tensor:
        loss_fn = ATTENTION_LOSSES[self.settings.attention_loss]
        per_example = [
            loss_fn(student_attn[s], teacher_attn[t].to(student_attn[s].dtype), attention_mask, self.head_reduction)
            for s, t in self.attention_map.items()
        ]
        return torch.stack(per_example).mean(0).sum()

    def relation_sum(self, student_hidden, teacher_hidden, attention_mask) -> torch.Tensor:
        s_states = student_hidden[-1]
        t_states = teacher_hidden[self.relation_teacher_layer].to(s_states.dtype)
        if self.settings.relation_loss == "minilm":
            return minilm_relation(s_states, t_states, attention_mask, self.settings.relation_heads).sum()
        relation = rkd_distance if self.settings.relation_loss == "rkd_distance" else rkd_angle
        pooled_s, pooled_t = masked_mean_pool(s_states, attention_mask), masked_mean_pool(t_states, attention_mask)
        return relation(pooled_s, pooled_t) * s_states.shape[0]

    def forward(self, student_outputs: Any, teacher_outputs: Any, attention_mask: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{term: loss summed over the batch's examples} for every active term."""
        sums: dict[str, torch.Tensor] = {}
        s_hidden, t_hidden = _get(student_outputs, "hidden_states"), _get(teacher_outputs, "hidden_states")
        if self.hidden_map:
            sums["hidden"] = self.hidden_sum(_require(s_hidden, "hidden_states"), _require(t_hidden, "hidden_states"), attention_mask)
        if self.attention_map:
            s_attn, t_attn = _get(student_outputs, "attentions"), _get(teacher_outputs, "attentions")
            sums["attention"] = self.attention_sum(_require(s_attn, "attentions"), _require(t_attn, "attentions"), attention_mask)
        if self.settings.relation_weight > 0:
            sums["relation"] = self.relation_sum(_require(s_hidden, "hidden_states"), _require(t_hidden, "hidden_states"), attention_mask)
        return sums


def _get(outputs: Any, name: str) -> Any:
    return outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)


def _require(value: Any, name: str) -> Any:
    if value is None or any(v is None for v in value):
        raise ValueError(
            f"The model output has no `{name}`. The trainer asks for them with output_{name}=True; a model whose "
            "forward ignores that flag cannot be used for this loss term."
        )
    return value


def use_eager_attention(*models: nn.Module) -> list[str]:
    """Switch models whose attention does not return weights (SDPA, flash) to eager; return the ones changed.

    Attention weights only exist in the eager implementation, so the attention terms need it.
    """
    changed = []
    for model in models:
        config = getattr(model, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if config is None or current in (None, "eager"):
            continue
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        if getattr(config, "_attn_implementation", None) != "eager":
            # Older model classes pick their attention module at init (and fall back to eager themselves when
            # asked for weights); newer ones read the config at each forward. Setting the config covers both.
            config._attn_implementation = "eager"
        changed.append(f"{type(model).__name__} ({current} -> eager)")
    return changed


def build_intermediate_terms(args: Any, student: nn.Module, teachers: list) -> Optional["IntermediateTerms"]:
    """The hidden/attention/relation terms of a run (layer maps and projections resolved before training
    starts), or None when all their weights are 0; switches the models to eager attention when needed."""
    settings = IntermediateSettings.from_args(args)
    if not settings.active:
        return None
    if not teachers:
        raise ValueError(
            "Hidden-state, attention and relation terms need a live teacher: cached outputs hold logits only. "
            "Pass `teacher_model`, or set hidden_weight/attention_weight/relation_weight to 0."
        )
    terms = IntermediateTerms(settings, unwrap_model(student), unwrap_model(teachers[args.intermediate_teacher]))
    if terms.needs_attentions:
        changed = use_eager_attention(unwrap_model(student), *[unwrap_model(t) for t in teachers])
        if changed:
            logger.warning("Attention terms need attention weights, which only eager attention returns: switched "
                           "%s to eager for this run.", ", ".join(changed))
    logger.info("Intermediate terms: %s", json.dumps(terms.describe(), default=str))
    return terms
