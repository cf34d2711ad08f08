"""Resume and crash safety: N steps straight == N/2 steps, then resume to N; atomic checkpoints and saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_distill import DistillationTrainer, cache_teacher_outputs
from hf_distill.io import last_complete_checkpoint
from single_thread import one_thread  # noqa: F401  (autouse)
from tiny_models import distill_args, lm_collator, lm_dataset, sentiment_dataset, tiny_bert, tiny_gpt2

N = 8  # optimizer steps; the first run stops (and saves) at N // 2, mid-epoch



class StopAt(TrainerCallback):
    """Stop (after the save of that step) at ``step``: an interrupted run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _with_dropout(model, p=0.1):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p  # dropout draws random numbers: the RNG state must be restored too
    return model


def _classification_trainer(out: Path, cached: bool, callbacks=()) -> DistillationTrainer:
    data, tokenizer = sentiment_dataset(20)  # batch 4 x GA 2: 2.5 steps per epoch, so epochs and resume cross
    teacher = tiny_bert(layers=3, seed=2)
    if cached:
        data = cache_teacher_outputs(teacher, data, batch_size=8)
        teacher = None
    args = distill_args(out.parent, output_dir=str(out), max_steps=N, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2,
                        save_strategy="steps", save_steps=N // 2, logging_steps=1)
    return DistillationTrainer(_with_dropout(tiny_bert(seed=1)), teacher, args, train_dataset=data,
                               processing_class=tokenizer, callbacks=list(callbacks))


def _lm_trainer(out: Path, cached: bool, callbacks=()) -> DistillationTrainer:
    data = lm_dataset(12)
    teacher = tiny_gpt2(layers=3, seed=2)
    if cached:
        data = cache_teacher_outputs(teacher, data, batch_size=4, top_k=8, temperature=2.0, pad_token_id=1)
        teacher = None
    args = distill_args(out.parent, output_dir=str(out), max_steps=N, per_device_train_batch_size=4,
                        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, save_strategy="steps",
                        save_steps=N // 2, logging_steps=1, temperature=2.0)
    return DistillationTrainer(_with_dropout(tiny_gpt2(seed=1)), teacher, args, train_dataset=data,
                               data_collator=lm_collator, callbacks=list(callbacks))


def _curve(trainer: DistillationTrainer) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["learning_rate"]) for e in trainer.state.log_history if "loss" in e]


def _assert_same_terms(straight: DistillationTrainer, resumed: DistillationTrainer) -> None:
    """The logged loss_<term> values (the resumed run's history holds the first half too) equal the straight run's."""
    def terms(trainer):
        return {e["step"]: {k: v for k, v in e.items() if k.startswith("loss_")}
                for e in trainer.state.log_history if "loss" in e}

    a, b = terms(straight), terms(resumed)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    for step in b:
        assert b[step].keys() == a[step].keys() and b[step], step
        for name, value in a[step].items():
            assert b[step][name] == pytest.approx(value, rel=1e-4, abs=1e-6), f"{name} differs at step {step}"


@pytest.mark.parametrize("make,cached", [(_classification_trainer, False), (_classification_trainer, True),
                                         (_lm_trainer, False), (_lm_trainer, True)],
                         ids=["classification-online", "classification-cache", "lm-online", "lm-topk-cache"])
def test_half_then_resume_equals_straight(tmp_path, make, cached):
    straight = make(tmp_path / "straight", cached)
    straight.train()

    first = make(tmp_path / "resumed", cached, callbacks=[StopAt(N // 2)])
    first.train()
    assert first.state.global_step == N // 2
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == [f"checkpoint-{N // 2}"]
    second = make(tmp_path / "resumed", cached)  # a new process would build everything again
    second.train(resume_from_checkpoint=True)  # picks the last complete checkpoint
    assert second.state.global_step == N

    a, b = _curve(straight), _curve(second)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, N + 1))
    for (step, loss_a, lr_a), (_, loss_b, lr_b) in zip(a, b):
        assert lr_b == pytest.approx(lr_a, rel=1e-6), f"learning rate schedule differs at step {step}"
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-6), f"loss differs at step {step}"
    for (name, wa), wb in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-4, msg=name)
    # The optimizer state came back too: AdamW counted N steps although the second run made N / 2.
    steps = {float(state["step"]) for state in second.optimizer.state.values()}
    assert steps == {float(N)}
    _assert_same_terms(straight, second)


class FailSecondCheckpoint(RuntimeError):
    pass


def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = _classification_trainer(out, cached=False)
    stock = trainer._save_optimizer_and_scheduler
    seen = []

    def save_optimizer(output_dir):
        seen.append(Path(output_dir))
        # Atomic: while a checkpoint is being written, no folder of its final name exists.
        assert not (out / Path(output_dir).name).exists()
        assert Path(output_dir).parent.name.startswith(".checkpoint-")
        if trainer.state.global_step == N:
            raise FailSecondCheckpoint("killed while writing optimizer.pt")
        stock(output_dir)

    trainer._save_optimizer_and_scheduler = save_optimizer
    with pytest.raises(FailSecondCheckpoint):
        trainer.train()
    assert len(seen) == 2
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == [f"checkpoint-{N // 2}"]  # the half-written one never got its final name
    assert last_complete_checkpoint(out) == get_last_checkpoint(str(out)) == str(out / f"checkpoint-{N // 2}")
    state = json.loads((out / f"checkpoint-{N // 2}" / "trainer_state.json").read_text())
    assert state["global_step"] == N // 2

    resumed = _classification_trainer(out, cached=False)
    resumed.train(resume_from_checkpoint=True)  # also removes the stale staging folder
    straight = _classification_trainer(tmp_path / "straight", cached=False)
    straight.train()
    for (name, wa), wb in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-4, msg=name)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"


def test_checkpoint_rotation_and_best_checkpoint_name_the_final_folders(tmp_path):
    out = tmp_path / "run"
    data, tokenizer = sentiment_dataset(16)
    args = distill_args(tmp_path, output_dir=str(out), max_steps=6, save_strategy="steps", save_steps=2,
                        eval_strategy="steps", eval_steps=2, save_total_limit=2, load_best_model_at_end=True,
                        metric_for_best_model="loss", greater_is_better=False, per_device_train_batch_size=8)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=3, seed=2), args, train_dataset=data,
                                  eval_dataset=data, processing_class=tokenizer)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and Path(best).parent == out and Path(best).is_dir() and ".staging" not in best
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(kept) == 2 and "checkpoint-6" in kept and Path(best).name in kept
    for name in kept:
        saved = json.loads((out / name / "trainer_state.json").read_text())
        assert saved["best_model_checkpoint"] is None or ".staging" not in saved["best_model_checkpoint"]
        assert (out / name / "distillation_state.json").is_file()


def test_final_save_is_atomic(tmp_path):
    out = tmp_path / "run"
    data, tokenizer = sentiment_dataset(16)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=3, seed=2),
                                  distill_args(tmp_path, output_dir=str(out), max_steps=1, preflight=False),
                                  train_dataset=data, processing_class=tokenizer)
    trainer.save_model()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors"} <= set(before)
    assert (out / "distillation" / "recipe.json").is_file()

    trainer.train()  # the weights change
    stock = trainer.processing_class.save_pretrained

    def broken(*args, **kwargs):
        stock(*args, **kwargs)
        raise OSError("disk full")

    trainer.processing_class.save_pretrained = broken
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # untouched: the failed save wrote into a temporary folder only
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    trainer.processing_class.save_pretrained = stock
    trainer.save_model()
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _projection_trainer(out: Path, callbacks=()) -> DistillationTrainer:
    """A narrower student than its teacher: learned hidden-state projections (their own optimizer group)."""
    data, tokenizer = sentiment_dataset(20)
    args = distill_args(out.parent, output_dir=str(out), max_steps=N, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=2,
                        save_strategy="steps", save_steps=N // 2, hidden_weight=1.0, hidden_loss="mse")
    return DistillationTrainer(_with_dropout(tiny_bert(seed=1, hidden=16)), tiny_bert(layers=4, hidden=32, seed=2), args,
                               train_dataset=data, processing_class=tokenizer, callbacks=list(callbacks))


def _ema_trainer(out: Path, callbacks=()) -> DistillationTrainer:
    """Self-distillation from an EMA of the student (no teacher given)."""
    data, tokenizer = sentiment_dataset(20)
    args = distill_args(out.parent, output_dir=str(out), max_steps=N, per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, learning_rate=5e-3, save_strategy="steps", save_steps=N // 2,
                        self_distillation="ema", ema_decay=0.5)
    return DistillationTrainer(_with_dropout(tiny_bert(seed=1)), None, args, train_dataset=data,
                               processing_class=tokenizer, callbacks=list(callbacks))


def _extra_state(trainer: DistillationTrainer) -> dict[str, torch.Tensor]:
    """What the student's checkpoint does not hold: the projections, or the EMA teacher."""
    if trainer.args.self_distillation == "ema":
        return {f"ema.{k}": v for k, v in trainer.teacher.state_dict().items()}
    return {f"projection.{k}": v for k, v in trainer.intermediate.projections.state_dict().items()}


@pytest.mark.parametrize("make", [_projection_trainer, _ema_trainer], ids=["projections", "ema-teacher"])
def test_half_then_resume_restores_projections_and_the_ema_teacher(tmp_path, make):
    straight = make(tmp_path / "straight")
    straight.train()
    first = make(tmp_path / "resumed", callbacks=[StopAt(N // 2)])
    first.train()
    half = _extra_state(first)
    second = make(tmp_path / "resumed")
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == N

    initial = _extra_state(make(tmp_path / "fresh"))
    assert any(not torch.equal(half[k], initial[k]) for k in half), "the first half changed the state to restore"
    a, b = _curve(straight), _curve(second)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == list(range(1, N + 1))
    for (step, loss_a, _), (_, loss_b, _) in zip(a, b):
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-6), f"loss differs at step {step}"
    _assert_same_terms(straight, second)
    for (name, wa), wb in zip(straight.model.state_dict().items(), second.model.state_dict().values()):
        torch.testing.assert_close(wb, wa, atol=1e-5, rtol=1e-4, msg=name)
    extra_a, extra_b = _extra_state(straight), _extra_state(second)
    assert extra_a.keys() == extra_b.keys() and extra_a
    for name in extra_a:
        torch.testing.assert_close(extra_b[name], extra_a[name], atol=1e-5, rtol=1e-4, msg=name)
