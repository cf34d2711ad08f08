"""Progressive distillation: teacher → assistant(s) → student, one DistillationTrainer run per stage.

Teacher-assistant KD (Mirzadeh et al. 2020): a large gap between teacher and student is bridged by
intermediate models. Stage i distils the model trained at stage i − 1 (the teacher for stage 0) into
``models[i]``; each stage writes its own ``<output_dir>/stage-<i>-<name>`` folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from torch import nn

from .arguments import DistillationArguments


def distill_progressively(
    teacher: Union[nn.Module, str],
    models: Sequence[nn.Module],
    args: DistillationArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    stage_names: Optional[Sequence[str]] = None,
    stage_args: Optional[Callable[[int, DistillationArguments], DistillationArguments]] = None,
    **trainer_kwargs: Any,
) -> list[Any]:
    """Run the chain and return the trainers, one per stage (the last one holds the final student).

    ``stage_args(i, args)`` may change the arguments per stage (e.g. more epochs for the small model);
    by default every stage uses ``args`` with its own output folder.
    """
    from .trainer import DistillationTrainer

    if not models:
        raise ValueError("distill_progressively needs at least one model to train (the student).")
    names = list(stage_names) if stage_names else [f"assistant{i}" for i in range(len(models) - 1)] + ["student"]
    if len(names) != len(models):
        raise ValueError(f"Got {len(names)} stage names for {len(models)} models.")
    trainers, current_teacher = [], teacher
    for i, (model, name) in enumerate(zip(models, names)):
        stage = dataclasses.replace(args, output_dir=str(Path(args.output_dir) / f"stage-{i}-{name}"))
        if stage_args is not None:
            stage = stage_args(i, stage)
        trainer = DistillationTrainer(
            model=model, teacher_model=current_teacher, args=stage,
            train_dataset=train_dataset, eval_dataset=eval_dataset, **trainer_kwargs,
        )
        trainer.train()
        trainer.save_model()
        trainers.append(trainer)
        current_teacher = trainer.model
    return trainers
