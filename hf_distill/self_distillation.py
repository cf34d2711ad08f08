"""Self-distillation: the teacher is a frozen snapshot of the student, or an exponential moving average of it.

* ``snapshot``: a copy of the student taken before training (Furlanello et al. 2018, born-again networks);
  run again with the result as teacher for further generations.
* ``ema``: after every optimizer step ``θ_T ← d · θ_T + (1 − d) · θ_S`` (mean teacher, Tarvainen &
  Valpola 2017). The EMA state is written into each checkpoint so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .tasks import unwrap_model

MODES = ("none", "snapshot", "ema")
EMA_FILE = "ema_teacher.safetensors"


def snapshot_teacher(student: nn.Module) -> nn.Module:
    """A frozen, independent copy of the student."""
    teacher = copy.deepcopy(unwrap_model(student))
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``θ_T ← decay · θ_T + (1 − decay) · θ_S`` for every parameter (buffers are copied)."""
    student = unwrap_model(student)
    for t, s in zip(unwrap_model(teacher).parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach().to(t.dtype), alpha=1.0 - decay)
    for t, s in zip(unwrap_model(teacher).buffers(), student.buffers()):
        t.copy_(s)


class EMATeacherCallback(TrainerCallback):
    """Update the EMA teacher after each optimizer step (the trainer saves it into each checkpoint)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, decay: float) -> None:
        self.teacher, self.student, self.decay = teacher, student, decay

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ema_update(self.teacher, self.student, self.decay)


def save_ema_teacher(teacher: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(teacher).state_dict().items()}
    save_file(state, str(path))


def load_ema_teacher(teacher: nn.Module, checkpoint: str | Path) -> bool:
    """Restore the EMA teacher from a checkpoint folder; False when it holds none."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "distillation" / EMA_FILE
    if not path.is_file():
        return False
    unwrap_model(teacher).load_state_dict(load_file(str(path)), strict=False)
    return True
