"""Fault handling for long runs: a checkpoint on SIGTERM/SIGINT, and a guard against non-finite losses.

* :class:`SignalCheckpointCallback` (a `transformers.TrainerCallback`): a signal asks the Trainer to save a
  normal, resumable ``checkpoint-<step>`` at the end of the current optimizer step and to stop; the
  process then exits with ``128 + signal`` (143 for SIGTERM), as a signalled process does.
* :class:`NonFiniteLossCounter`: a pure helper the trainer calls on each loss; it says whether to skip the
  step and raises :class:`NonFiniteLossError` once too many were bad.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any, Callable, Iterable, Optional, Union

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

SignalHandler = Union[Callable[[int, Any], Any], int, None]


class SignalCheckpointCallback(TrainerCallback):
    """Save a checkpoint and stop when the process receives one of ``signals``.

    From ``on_train_begin`` to ``on_train_end`` the handlers of ``signals`` are replaced (and then
    restored). A handled signal only records itself; at the next ``on_step_end`` the callback sets
    ``control.should_save`` and ``control.should_training_stop``, so the Trainer writes the usual
    ``checkpoint-<global_step>`` (model, optimizer, scheduler, RNG and trainer state: what
    ``train(resume_from_checkpoint=...)`` needs) whatever ``save_strategy`` is, then leaves its loop. With
    gradient accumulation the save waits for the end of the optimizer step, so the checkpoint never
    holds half-accumulated gradients.

    Args:
        signals: the signals to handle (SIGTERM: schedulers and ``kill``; SIGINT: Ctrl-C).
        exit_after_save: raise ``SystemExit(128 + signum)`` at ``on_train_end`` once the checkpoint is
            written, so scripts do not go on to evaluate or push after a preemption. When False,
            ``train()`` returns normally and :attr:`received_signal` tells the caller what happened.
        sync_every: in multi-process runs, how often (in steps) the ranks agree on whether any of them
            got a signal (one all-reduce of a single number); every rank then saves and stops at the
            same step.

    A second signal while the first is pending restores the previous handlers and re-raises the signal:
    press Ctrl-C twice to quit without waiting for the step to end.
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
        *,
        exit_after_save: bool = True,
        sync_every: int = 1,
    ) -> None:
        self.signals = tuple(signals)
        self.exit_after_save = exit_after_save
        self.sync_every = max(int(sync_every), 1)
        self.received_signal: Optional[int] = None
        self.stopped_at_step: Optional[int] = None
        self._previous: dict[int, SignalHandler] = {}

    # ---------------------------------------------------------------- handlers
    def _handle(self, signum: int, frame: Any) -> None:
        if self.received_signal is not None:  # a second signal: stop waiting
            self._restore()
            signal.raise_signal(signum)
            return
        self.received_signal = signum
        logger.warning(
            "Received %s: a checkpoint will be saved at the end of this step, then training stops. "
            "Send it again to quit at once.", signal.Signals(signum).name,
        )

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("SignalCheckpointCallback: not in the main thread, signal handlers not installed.")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _any_rank_signalled(self, args: Any, step: int) -> bool:
        local = self.received_signal is not None
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return local
        if torch.distributed.get_world_size() < 2:
            return local
        if step % self.sync_every:
            return False  # ranks decide together, on sync steps only
        backend = torch.distributed.get_backend()
        device = getattr(args, "device", torch.device("cpu")) if backend != "gloo" else torch.device("cpu")
        flag = torch.tensor([float(self.received_signal or 0)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received_signal is None:
            self.received_signal = int(flag.item())  # another rank got it: stop here too
        return bool(flag.item())

    # ---------------------------------------------------------------- Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.received_signal = None
        self.stopped_at_step = None
        self._install()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._any_rank_signalled(args, state.global_step):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at_step = state.global_step
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._restore()
        if self.received_signal is not None:
            logger.warning(
                "Stopped by %s at step %s after saving checkpoint-%s; resume with --resume_from_checkpoint true "
                "(scripts) or train(resume_from_checkpoint=True) (Python).", signal.Signals(self.received_signal).name,
                self.stopped_at_step, self.stopped_at_step,
            )
            if self.exit_after_save:
                raise SystemExit(128 + self.received_signal)


class NonFiniteLossError(RuntimeError):
    """Raised when more non-finite losses were seen than ``--max_non_finite_losses`` allows."""


class NonFiniteLossCounter:
    """Count non-finite (NaN/inf) training losses; the caller skips those steps; too many raise.

    Args:
        max_nonfinite_steps: how many bad steps are tolerated (skipped). The next one raises
            :class:`NonFiniteLossError`. 0 raises on the first non-finite loss.
        mode: ``"total"`` (default, as ``--non_finite_loss_count``) counts every bad step since the start;
            ``"consecutive"`` counts bad steps in a row, and a finite loss resets the run, so an occasional
            overflow is skipped while a diverged model (NaN from then on) stops quickly.

    In multi-process runs every rank must take the same decision, or ranks skip different steps and
    deadlock in the next all-reduce: pass the gathered losses (``accelerator.gather(loss.detach())``),
    which are finite only if every rank's loss is.
    """

    MODES = ("consecutive", "total")

    def __init__(self, max_nonfinite_steps: int = 10, mode: str = "total") -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}.")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}.")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.mode = mode
        self.total = 0
        self.consecutive = 0
        self.last_bad_step: Optional[int] = None

    @property
    def count(self) -> int:
        """The number compared with ``max_nonfinite_steps``: consecutive or total bad steps, per ``mode``."""
        return self.consecutive if self.mode == "consecutive" else self.total

    def check(self, loss: Union[torch.Tensor, float], step: Optional[int] = None) -> bool:
        """True when ``loss`` (every element of it) is finite. Otherwise count it, and return False
        (skip the step) or raise :class:`NonFiniteLossError` when the count exceeds the limit."""
        if isinstance(loss, torch.Tensor):
            finite = bool(torch.isfinite(loss.detach()).all())
        else:
            finite = math.isfinite(float(loss))
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        self.last_bad_step = step
        where = f" at step {step}" if step is not None else ""
        logger.warning(
            "Non-finite loss%s (%s in a row, %s in total): the step is skipped.", where, self.consecutive, self.total
        )
        if self.count > self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"The loss was NaN or infinite{where}: {self.consecutive} bad step(s) in a row, {self.total} in total, "
                f"more than --max_non_finite_losses {self.max_nonfinite_steps} (--non_finite_loss_count {self.mode}). "
                "Training stopped rather than train on NaN. Lower the learning rate, enable gradient clipping (max_grad_norm), use bf16 instead of "
                "fp16, check the inputs and teacher outputs for NaN, or resume from the last checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, Any]:
        """Counts, for saving with a checkpoint."""
        return {"total": self.total, "consecutive": self.consecutive, "last_bad_step": self.last_bad_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counts saved by :meth:`state_dict`."""
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.last_bad_step = state.get("last_bad_step")


__all__ = ["NonFiniteLossCounter", "NonFiniteLossError", "SignalCheckpointCallback"]
