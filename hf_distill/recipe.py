"""What a run did, as plain data: ``distillation/recipe.json`` beside the saved student.

The ``distillation/`` folder holds what the student does not need to run: the recipe, learned projections
and, in checkpoints, the EMA teacher of self-distillation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from . import __version__
from .tasks import unwrap_model

PROJECTIONS_FILE = "projections.safetensors"
RECIPE_FILE = "recipe.json"


def loss_recipe(args: Any, intermediate: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Every loss term with its weight, divergence, temperature and schedules."""
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
    if intermediate is not None:
        for name, weight in intermediate["active"].items():
            losses[name] = {"weight": weight, "loss": intermediate["settings"].get(f"{name}_loss")}
    return losses


def _model_summary(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "name_or_path": getattr(config, "_name_or_path", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "model_type": getattr(config, "model_type", None),
    }


def build_recipe(trainer: Any) -> dict[str, Any]:
    """The recipe of a DistillationTrainer run: task, teacher(s) and student, losses, layer map, arguments."""
    args = trainer.args
    teacher = unwrap_model(trainer.teacher) if trainer.teacher is not None else None
    intermediate = None if trainer.intermediate is None else trainer.intermediate.describe()
    several = len(trainer.teachers) > 1
    teacher_entry = None
    if teacher is not None:
        teacher_entry = {**_model_summary(teacher), "name_or_path": trainer.teacher_name_or_path,
                         **trainer.teacher_summary()}
    return {
        "hf_distill_version": __version__,
        "task": trainer.task,
        "teacher": teacher_entry,
        "student": _model_summary(unwrap_model(trainer.model)),
        "teachers": [{"name_or_path": n, "weight": w} for n, w in zip(trainer.teacher_names, trainer.teacher_weights)]
        if several else None,
        "multi_teacher_mode": args.multi_teacher_mode if several else None,
        "self_distillation": None if args.self_distillation == "none" else args.self_distillation,
        "losses": loss_recipe(args, intermediate),
        "layer_map": None if intermediate is None else {
            k: v for k, v in intermediate.items() if k.endswith("layer_map") or k == "projections"
        },
        "datasets": list(getattr(trainer, "dataset_names", []) or []),
        "lm_loss_path": _lm_loss_path(trainer),
        "arguments": {k: v for k, v in args.to_dict().items() if not k.endswith("_token")},
    }


def _lm_loss_path(trainer: Any) -> Optional[str]:
    """Causal LM: which path computed the token-level loss (``--fused_lm_loss`` records only what was asked)."""
    if trainer.task != "causal-lm":
        return None
    if getattr(trainer, "cross", None) is not None:
        return "cross-tokenizer (aligned groups)"
    fused = getattr(trainer, "fused_lm", None)
    if fused is None:
        return None
    return "fused (hidden states through each lm_head)" if fused.enabled else f"full logits ({fused.reason})"


def write_distillation_folder(output_dir: str | Path, recipe: dict[str, Any], projections: Optional[nn.Module] = None,
                              ema_teacher: Optional[nn.Module] = None) -> Path:
    """Write ``distillation/`` (recipe, projections, EMA teacher) into a saved student's folder."""
    folder = Path(output_dir) / "distillation"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str))
    if projections is not None:
        projections.save(folder / PROJECTIONS_FILE)
    if ema_teacher is not None:
        from .self_distillation import EMA_FILE, save_ema_teacher

        save_ema_teacher(ema_teacher, folder / EMA_FILE)  # a resumed run continues the same average
    return folder


def restore_distillation_folder(checkpoint: str | Path, projections: Optional[nn.Module], ema_teacher: Optional[nn.Module],
                                device: str) -> None:
    """Load the projections and the EMA teacher a checkpoint's ``distillation/`` holds (if any)."""
    path = Path(checkpoint) / "distillation" / PROJECTIONS_FILE
    if projections is not None and path.is_file():
        from safetensors.torch import load_file

        projections.load_state_dict(load_file(str(path), device=device))
    if ema_teacher is not None:
        from .self_distillation import load_ema_teacher

        load_ema_teacher(ema_teacher, checkpoint)
