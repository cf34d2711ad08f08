"""Faults: SIGTERM saves a resumable checkpoint, the non-finite loss counter, atomic folders."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.callbacks import NonFiniteLossCounter, NonFiniteLossError, SignalCheckpointCallback
from hf_distill.io import atomic_directory, last_complete_checkpoint
from hf_distill.teachers import compile_teacher
from single_thread import one_thread  # noqa: F401  (autouse)
from tiny_models import distill_args, sentiment_dataset, tiny_bert

MAX_STEPS = 6
CHECKPOINT_FILES = {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"}


class SignalAtStep(TrainerCallback):
    """Send ``signum`` to this process when step ``step`` begins (a signal arriving mid-step)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)



def _trainer(output_dir: Path, callbacks=()) -> DistillationTrainer:
    data, tokenizer = sentiment_dataset(48)
    args = distill_args(output_dir.parent, output_dir=str(output_dir), max_steps=MAX_STEPS, save_strategy="no",
                        per_device_train_batch_size=8)
    return DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=3, seed=2), args, train_dataset=data,
                               processing_class=tokenizer, callbacks=list(callbacks))


def test_sigterm_saves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path):
    out = tmp_path / "interrupted"
    child = subprocess.run([sys.executable, __file__, str(out)], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == 128 + signal.SIGTERM, child.stderr[-3000:]
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-3"], checkpoints  # saved although save_strategy="no"
    assert CHECKPOINT_FILES <= {p.name for p in (out / "checkpoint-3").iterdir()}
    assert last_complete_checkpoint(out) == str(out / "checkpoint-3")

    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed.state.global_step == MAX_STEPS
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps[0] == 1 and steps[-1] == MAX_STEPS  # history restored from the checkpoint, then continued

    straight = _trainer(tmp_path / "straight")
    straight.train()
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_signal_without_exit_returns_and_restores_the_handlers(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    callback = SignalCheckpointCallback(exit_after_save=False)
    trainer = _trainer(tmp_path / "run", callbacks=[callback, SignalAtStep(2)])
    trainer.train()
    assert callback.received_signal == signal.SIGTERM and callback.stopped_at_step == 2
    assert trainer.state.global_step == 2
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_no_signal_no_checkpoint(tmp_path):
    callback = SignalCheckpointCallback()
    trainer = _trainer(tmp_path / "run", callbacks=[callback])
    trainer.train()
    assert callback.received_signal is None and trainer.state.global_step == MAX_STEPS
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_nonfinite_counter_consecutive():
    counter = NonFiniteLossCounter(2, "consecutive")
    assert counter.check(torch.tensor(1.0))
    assert not counter.check(torch.tensor(float("nan")), step=1)
    assert not counter.check(torch.tensor([1.0, float("inf")]), step=2)
    assert counter.check(0.5)  # a finite loss resets the run
    assert counter.count == 0 and counter.total == 2
    assert not counter.check(math.nan)
    assert not counter.check(math.inf)
    with pytest.raises(NonFiniteLossError, match=r"3 bad step\(s\) in a row") as error:
        counter.check(float("nan"), step=9)
    assert "--max_non_finite_losses 2 (--non_finite_loss_count consecutive)" in str(error.value)  # the flags to change
    assert counter.last_bad_step == 9


def test_nonfinite_counter_counts_like_the_arguments_by_default(tmp_path):
    from hf_distill import DistillationArguments

    defaults = DistillationArguments(output_dir=str(tmp_path), report_to=[])
    assert (defaults.max_non_finite_losses, defaults.non_finite_loss_count) == (10, "total")
    counter = NonFiniteLossCounter()  # as --non_finite_loss_count total: finite steps between do not reset the count
    for _ in range(10):
        assert not counter.check(math.nan)
        assert counter.check(1.0)
    with pytest.raises(NonFiniteLossError, match="11 in total") as error:
        counter.check(math.nan)
    assert "--max_non_finite_losses 10 (--non_finite_loss_count total)" in str(error.value)


def test_nonfinite_counter_total_and_zero():
    counter = NonFiniteLossCounter(2, "total")
    for value in (math.nan, 1.0, math.nan, 1.0):
        counter.check(value)
    with pytest.raises(NonFiniteLossError, match="3 in total"):
        counter.check(-math.inf)
    strict = NonFiniteLossCounter(0)
    with pytest.raises(NonFiniteLossError):
        strict.check(torch.tensor(float("nan")))
    restored = NonFiniteLossCounter(5)
    restored.load_state_dict(counter.state_dict())
    assert restored.total == counter.total and restored.consecutive == counter.consecutive
    with pytest.raises(ValueError):
        NonFiniteLossCounter(max_nonfinite_steps=-1)
    with pytest.raises(ValueError):
        NonFiniteLossCounter(mode="sometimes")


def test_atomic_directory_renames_on_success(tmp_path):
    target = tmp_path / "save"
    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".save.tmp-")
        (staging / "weights.bin").write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "weights.bin").read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)
    with atomic_directory(target) as staging:  # replaces an existing folder whole
        (staging / "other.bin").write_bytes(b"v2")
    assert sorted(p.name for p in target.iterdir()) == ["other.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]  # no temporary or old folders left


def test_atomic_directory_failure_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "checkpoint-4"
    target.mkdir()
    (target / "trainer_state.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as staging:
            (staging / "trainer_state.json").write_text("partial")
            raise RuntimeError("disk full")
    assert (target / "trainer_state.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
    with pytest.raises(FileExistsError):
        with atomic_directory(target, overwrite=False):
            pass
    assert (target / "trainer_state.json").read_text() == "{}"


def test_last_complete_checkpoint_skips_half_written_folders(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / ".checkpoint-14.tmp-abc").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


if __name__ == "__main__":  # the child of the SIGTERM test: SIGTERM arrives during step 3 of 6
    trainer = _trainer(Path(sys.argv[1]), callbacks=[SignalCheckpointCallback(), SignalAtStep(3)])
    trainer.train()
    raise SystemExit("training finished without being stopped by the signal")


# ---------------------------------------------------------------- the trainer's guards and defaults
class NaNTeacherTrainer(DistillationTrainer):
    """Teacher outputs are NaN on the chosen micro-batches (counted from 1)."""

    bad_micro_batches: tuple[int, ...] = ()

    def teacher_targets(self, teacher_outputs, cached, temperature, student_width):
        targets = super().teacher_targets(teacher_outputs, cached, temperature, student_width)
        if self.model.training:
            self.micro_batch = getattr(self, "micro_batch", 0) + 1
            if self.micro_batch in self.bad_micro_batches:
                return [(tuple(torch.full_like(t, float("nan")) for t in parts), w) for parts, w in targets]
        return targets


class WeightsPerStep(TrainerCallback):
    def __init__(self):
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = [p.detach().clone() for p in model.parameters()]


def _nan_trainer(tmp_path, bad, ga=1, **overrides):
    data, tokenizer = sentiment_dataset(48)
    args = distill_args(tmp_path, max_steps=MAX_STEPS, per_device_train_batch_size=8 // ga,
                        gradient_accumulation_steps=ga, preflight=False, **overrides)
    trainer = NaNTeacherTrainer(tiny_bert(seed=1), tiny_bert(layers=3, seed=2), args, train_dataset=data,
                                processing_class=tokenizer)
    trainer.bad_micro_batches = bad
    recorder = WeightsPerStep()
    trainer.add_callback(recorder)
    return trainer, recorder


@pytest.mark.parametrize("ga,bad,skipped_steps", [(1, (2, 5), {2, 5}), (2, (4,), {2})], ids=["ga1", "ga2"])
def test_non_finite_loss_skips_the_whole_optimizer_step(tmp_path, ga, bad, skipped_steps):
    trainer, recorder = _nan_trainer(tmp_path, bad, ga=ga)
    trainer.train()
    assert trainer.skipped_optimizer_steps == len(skipped_steps)
    assert trainer._non_finite.total == len(skipped_steps)
    weights = recorder.weights
    for step in range(2, MAX_STEPS + 1):
        unchanged = all(torch.equal(a, b) for a, b in zip(weights[step - 1], weights[step]))
        # GA=2, NaN in the 2nd micro-batch of step 2: the 1st micro-batch's gradients are dropped too.
        assert unchanged == (step in skipped_steps), step
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    optimizer_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert optimizer_steps == {float(MAX_STEPS - len(skipped_steps))}  # AdamW never stepped on them
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged[-1]["non_finite_losses"] == len(skipped_steps)
    assert all(math.isfinite(v) for e in logged for k, v in e.items() if k.startswith("loss"))  # no NaN logged
    assert sum("loss_kd" in e for e in logged) == MAX_STEPS - len(skipped_steps)


def test_too_many_non_finite_losses_stop_with_a_clear_error(tmp_path):
    trainer, _ = _nan_trainer(tmp_path, bad=(2, 3, 4), max_non_finite_losses=2)
    with pytest.raises(NonFiniteLossError, match="--max_non_finite_losses 2"):
        trainer.train()
    assert trainer.state.global_step == 3 and trainer.skipped_optimizer_steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_trainer_registers_the_signal_callback_by_default(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    make = lambda **kw: DistillationTrainer(tiny_bert(seed=1), tiny_bert(seed=2), distill_args(tmp_path, **kw),
                                            train_dataset=data, processing_class=tokenizer)
    assert sum(isinstance(c, SignalCheckpointCallback) for c in make().callback_handler.callbacks) == 1
    assert not any(isinstance(c, SignalCheckpointCallback) for c in make(save_on_signal=False).callback_handler.callbacks)


def test_compiled_teacher_and_student_give_the_same_losses(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    losses = {}
    for compiled in (False, True):
        options = dict(torch_compile_teacher=True, torch_compile_backend="eager") if compiled else {}
        args = distill_args(tmp_path / str(compiled), max_steps=2, preflight=False, **options)
        trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=3, seed=2), args, train_dataset=data,
                                      processing_class=tokenizer)
        assert hasattr(trainer.teacher, "_orig_mod") == compiled
        trainer.train()
        losses[compiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert hasattr(compile_teacher(tiny_bert(seed=3), trainer.args), "_orig_mod")


def test_saved_weights_are_readable_as_the_umask_allows(tmp_path):
    import os
    import stat

    data, tokenizer = sentiment_dataset(8)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(seed=2), distill_args(tmp_path, max_steps=2, save_steps=2,
                                                                                     save_strategy="steps"),
                                  train_dataset=data, processing_class=tokenizer)
    old = os.umask(0o022)
    try:
        trainer.train()
        trainer.save_model()
    finally:
        os.umask(old)
    for weights in (tmp_path / "out" / "model.safetensors", tmp_path / "out" / "checkpoint-2" / "model.safetensors"):
        assert stat.S_IMODE(weights.stat().st_mode) == 0o644, weights  # safetensors alone writes 0600
