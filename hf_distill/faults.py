"""Faults in long runs: the non-finite loss guard, atomic checkpoints, and the state a resume restores.

:class:`FaultToleranceMixin` is mixed into :class:`~hf_distill.trainer.DistillationTrainer`. It overrides
three stock ``Trainer`` methods, each because no callback event sits at that point:

* ``training_step``: a NaN/inf loss must cancel the whole optimizer step before gradient clipping and
  ``optimizer.step``, which run right after the step's last micro-batch returns and before any
  ``on_step_end``. The loss is back-propagated as usual; when any micro-batch of the step (on any process)
  was non-finite, every gradient of the step is dropped, so the optimizer sees none and updates nothing.
* ``_save_checkpoint``: the stock method writes ``checkpoint-<step>`` in place; a crash half-way leaves a
  folder that looks complete. It is written into ``.checkpoint-<step>.staging/`` and renamed into place.
* ``_get_output_dir``: points the stock ``_save_checkpoint`` at that staging folder.

The signal checkpoint is a plain callback (:class:`~hf_distill.callbacks.SignalCheckpointCallback`).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import NonFiniteLossCounter, SignalCheckpointCallback
from .io import atomic_contents, last_complete_checkpoint, replace_directory

DISTILLATION_STATE_NAME = "distillation_state.json"  # in checkpoints: non-finite loss counts


class FaultToleranceMixin:
    """Non-finite guard, atomic checkpoints and their resumable state, for a ``transformers.Trainer``.

    The host calls :meth:`init_fault_tolerance` at the end of ``__init__`` and :meth:`prepare_resume` at the
    start of ``train``; it provides ``term_log`` (a :class:`~hf_distill.term_log.TermLog`) and
    ``extra_trainable`` (modules trained beside the model, or None) so that a skipped step leaves no trace.
    """

    def init_fault_tolerance(self) -> None:
        args = self.args
        self._non_finite = NonFiniteLossCounter(args.max_non_finite_losses, args.non_finite_loss_count)
        self._step_has_bad_loss, self._in_step = False, False
        self.skipped_optimizer_steps = 0
        self._staging_run_dir: Optional[str] = None
        self._saving_checkpoint = False
        if args.save_on_signal and not any(isinstance(c, SignalCheckpointCallback) for c in self.callback_handler.callbacks):
            self.add_callback(SignalCheckpointCallback())

    def prepare_resume(self, resume_from_checkpoint: Union[str, bool, None]) -> Union[str, bool, None]:
        """``True`` becomes the last *complete* checkpoint; its distillation state (non-finite counts) is
        restored; staging folders left by a crash while saving are removed."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint found in output directory ({self.args.output_dir}) to resume from: "
                    "drop --resume_from_checkpoint, or pass the path of a checkpoint-<step> folder."
                )
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            state_file = Path(resume_from_checkpoint) / DISTILLATION_STATE_NAME
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                self._non_finite.load_state_dict(state.get("non_finite", {}))
                self.skipped_optimizer_steps = int(state.get("skipped_optimizer_steps", 0))
        if self.args.should_save and self.args.atomic_save:
            for stale in Path(self.args.output_dir).glob(".checkpoint-*.staging"):
                shutil.rmtree(stale, ignore_errors=True)
        return resume_from_checkpoint

    # -- the non-finite guard
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Optional[torch.Tensor] = None):
        """The stock step; on the step's last micro-batch, drop the step's gradients and logged terms when any
        of its losses was NaN/inf on any process (counted; too many raise NonFiniteLossError)."""
        if not self._in_step:  # the step's first micro-batch
            self.term_log.mark()
            if self.extra_trainable is not None:  # the stock loop zeroes the model's gradients, not these
                self.extra_trainable.zero_grad(set_to_none=True)
            self._in_step = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_has_bad_loss |= not bool(torch.isfinite(loss).all())
        if self.accelerator.sync_gradients:  # the step's last micro-batch: clip and optimizer step follow
            bad = self._any_process(self._step_has_bad_loss)
            self._step_has_bad_loss, self._in_step = False, False
            if bad:
                self._drop_step(model)
            self._non_finite.check(float("nan") if bad else 0.0, step=self.state.global_step + 1)
            if not bad:
                self._sync_extra_gradients()
        return loss

    def _any_process(self, flag: bool) -> bool:
        """One decision for every process (ranks that skip different steps would deadlock)."""
        if self.accelerator.num_processes < 2:
            return flag
        value = torch.tensor([float(flag)], device=self.args.device)
        return bool(self.accelerator.reduce(value, "sum").item() > 0)

    def _drop_step(self, model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        if self.extra_trainable is not None:
            self.extra_trainable.zero_grad(set_to_none=True)
        self.term_log.drop_step()  # a skipped step leaves no loss_<term> either
        self.skipped_optimizer_steps += 1

    def _sync_extra_gradients(self) -> None:
        """DDP averages the model's gradients; modules trained beside it (projections) are averaged here."""
        extra = self.extra_trainable
        if extra is None or self.accelerator.num_processes < 2:
            return
        for p in extra.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.accelerator.num_processes

    # -- atomic saving
    @contextmanager
    def atomic_target(self, output_dir: str) -> Iterator[str]:
        """Where ``_save`` writes: a temporary folder moved into ``output_dir`` on success (``atomic_save``);
        inside a checkpoint the whole checkpoint is staged already."""
        if not self.args.atomic_save or self._saving_checkpoint:
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
            self._publish_checkpoint(os.path.join(staging_run_dir, name), os.path.join(run_dir, name), run_dir)
            shutil.rmtree(staging_run_dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _publish_checkpoint(self, staged: str, final: str, run_dir: str) -> None:
        """Add the distillation state, rename the staged checkpoint into place, rotate old ones."""
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(os.path.dirname(staged))):
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        state = {"non_finite": self._non_finite.state_dict(), "skipped_optimizer_steps": self.skipped_optimizer_steps}
        Path(staged, DISTILLATION_STATE_NAME).write_text(json.dumps(state))
        replace_directory(staged, final)
        if hasattr(self, "_rotate_checkpoints"):  # transformers 4.x
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
        else:
            from transformers.trainer import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
