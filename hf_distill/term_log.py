"""Running sums of the loss terms (``loss_kd``, ``loss_ce``, ``loss_hidden``, ...) between two log lines."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor, str], torch.Tensor]


class TermLog:
    """Each micro-batch adds ``sum / items`` per term; a log line reads the sums of the steps since the last.

    Training and evaluation keep separate sums. Every process adds its local sums; ``reduce`` (the
    accelerator's reduce, or identity on one process) combines them when read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._train: dict[str, torch.Tensor] = defaultdict(self._zero)
        self._eval: dict[str, torch.Tensor] = defaultdict(self._zero)
        self._mark: dict[str, torch.Tensor] = {}
        self._steps = 0  # optimizer steps begun since the last log line (this process's own count: right after a resume too)

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    def add(self, term_sums: dict[str, torch.Tensor], items: torch.Tensor | float, training: bool) -> None:
        """Add each term's ``sum / items`` (items: the normaliser of the step, so the sums are the step's mean)."""
        target = self._train if training else self._eval
        for name, value in term_sums.items():
            target[f"loss_{name}"] += (value / items).detach().to(self.device)

    def mark(self) -> None:
        """At the start of an optimizer step: count it, and remember the training sums so far."""
        self._steps += 1
        self._mark = {k: v.clone() for k, v in self._train.items()}

    def drop_step(self) -> None:
        """Forget what the current optimizer step added (a skipped step logs nothing)."""
        self._train.clear()
        self._train.update(self._mark)

    def pop_train(self, reduce: Reduce, reduction: str) -> dict[str, float]:
        """{loss_<term>: mean per optimizer step} over the steps begun since the last call; the sums restart at 0."""
        steps = max(self._steps, 1)
        values = {name: round(reduce(value, reduction).item() / steps, 6) for name, value in sorted(self._train.items())}
        self._train.clear()
        self._steps = 0
        return values

    def clear_eval(self) -> None:
        self._eval.clear()

    def pop_eval(self, reduce: Reduce, batches: int) -> dict[str, float]:
        """{loss_<term>: mean per batch} of an evaluation loop."""
        values = {name: reduce(value, "mean").item() / max(batches, 1) for name, value in self._eval.items()}
        self._eval.clear()
        return values
