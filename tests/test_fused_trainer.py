"""`DistillationTrainer` on the fused-linear LM loss (``--fused_lm_loss``) against its full-logit path.

Each comparison builds two trainers on copies of the same models, one with ``fused_lm_loss="true"`` and one with
``"false"`` (the path that exists without the fused wiring), and compares the loss, every ``loss_<name>`` term
and the student's gradients. A forward hook on the student records the width of its logits, so the tests see
that the fused path really ran without [B, L, V] logits.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import hf_distill.lm.fused_step as fused_step
from hf_distill import DistillationTrainer, cache_teacher_outputs
from test_fused_linear import FAMILIES
from tiny_models import distill_args, lm_collator, lm_dataset

FAMILY_NAMES = list(FAMILIES)


def _pair(name: str, teacher_vocab: int | None = None):
    """A student (hidden 32) and a teacher (hidden 48) of one family, with widened random weights."""
    torch.manual_seed(0)
    student, teacher = FAMILIES[name](32), FAMILIES[name](48)
    if teacher_vocab is not None:  # a padded teacher head: extra rows beyond the shared vocabulary
        teacher.resize_token_embeddings(teacher_vocab)
    for model in (student, teacher):
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3) if p.dim() > 1 else None
    return student, teacher


def _trainer(tmp_path, mode, student, teacher, data=None, **args):
    data = data if data is not None else lm_dataset(6, seed=3)
    args = distill_args(tmp_path / mode, fused_lm_loss=mode, loss_chunk_size=4, **args)
    return DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher) if teacher is not None else None, args,
                               train_dataset=data, data_collator=lm_collator)


def _step(trainer, n=6):
    """(loss, {loss_<name>: value}, {param: grad}, widths of the student's logits) of one compute_loss + backward."""
    widths = []
    hook = trainer.model.register_forward_hook(lambda _m, _i, out: widths.append(out.logits.shape[1]))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))
    torch.manual_seed(0)
    try:
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        hook.remove()
    loss.backward()
    terms = {k: v.item() for k, v in trainer.term_log._train.items()}
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), terms, grads, widths


def _assert_same(fused, full):
    loss, terms, grads, widths = fused
    assert widths == [0], "the fused path must not make the student's [B, L, V] logits"
    assert full[3] and full[3][0] > 0
    torch.testing.assert_close(loss, full[0], atol=1e-5, rtol=1e-5)
    assert terms.keys() == full[1].keys()
    for name, value in terms.items():
        assert value == pytest.approx(full[1][name], rel=1e-5, abs=1e-6), name
    assert grads.keys() == full[2].keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full[2][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_fused_step_equals_the_full_logit_step_per_family(tmp_path, name):
    student, teacher = _pair(name)
    fused = _step(_trainer(tmp_path, "true", student, teacher, alpha=0.4, temperature=2.0))
    full = _step(_trainer(tmp_path, "false", student, teacher, alpha=0.4, temperature=2.0))
    assert set(fused[1]) == {"loss_kd", "loss_ce"}
    _assert_same(fused, full)
    head = student.get_output_embeddings().weight
    head_names = [k for k, p in student.named_parameters() if p is head]  # lm_head, or the tied embedding
    assert head_names and head_names[0] in fused[2], "the head must get a gradient"


@pytest.mark.parametrize("loss,alpha", [("reverse_kl", 0.5), ("jsd", 0.7), ("skew_forward_kl", 0.5),
                                        ("skew_reverse_kl", 1.0), ("tvd", 0.3), ("forward_kl", 1.0)])
def test_fused_step_equals_the_full_logit_step_per_divergence(tmp_path, loss, alpha):
    student, teacher = _pair("qwen2_bias")  # a head with a bias
    options = dict(distillation_loss=loss, alpha=alpha, jsd_beta=0.3, skew_lambda=0.2)
    _assert_same(_step(_trainer(tmp_path, "true", student, teacher, **options)),
                 _step(_trainer(tmp_path, "false", student, teacher, **options)))


def test_padded_teacher_head_is_sliced_to_the_student_vocabulary(tmp_path):
    student, teacher = _pair("llama", teacher_vocab=104)
    assert teacher.get_output_embeddings().weight.shape[0] == 104
    fused = _step(_trainer(tmp_path, "true", student, teacher, truncate_teacher_vocab=True))
    _assert_same(fused, _step(_trainer(tmp_path, "false", student, teacher, truncate_teacher_vocab=True)))


def test_teachers_summed_and_intermediate_terms_stay_exact(tmp_path):
    student, teacher = _pair("llama")
    other = _pair("llama")[1]
    data = lm_dataset(6, seed=3)
    pair = lambda mode: torch.manual_seed(1) and DistillationTrainer(  # noqa: E731  (the same projections)
        copy.deepcopy(student), [copy.deepcopy(teacher), copy.deepcopy(other)],
        distill_args(tmp_path / mode, fused_lm_loss=mode, multi_teacher_mode="sum", teacher_weights=[0.7, 0.3],
                     hidden_weight=0.5, alpha=0.6), train_dataset=data, data_collator=lm_collator)
    fused, full = _step(pair("true")), _step(pair("false"))
    assert "loss_hidden" in fused[1]
    _assert_same(fused, full)


def test_bf16_teacher_keeps_working(tmp_path):
    student, teacher = _pair("llama")
    fused = _step(_trainer(tmp_path, "true", student, teacher, teacher_dtype="bfloat16"))
    full = _step(_trainer(tmp_path, "false", student, teacher, teacher_dtype="bfloat16"))
    assert fused[3] == [0]
    # The teacher's logits are rounded to bf16 either way; only the order of fp32 sums differs.
    torch.testing.assert_close(fused[0], full[0], atol=1e-4, rtol=1e-4)
    for name, grad in fused[2].items():
        torch.testing.assert_close(grad, full[2][name], atol=1e-4, rtol=1e-3, msg=name)


def test_topk_cache_feeds_the_teacher_side(tmp_path):
    student, teacher = _pair("gpt2_tied")
    data = cache_teacher_outputs(teacher.eval(), lm_dataset(6, seed=3), task="causal-lm", top_k=5, temperature=2.0,
                                 pad_token_id=1)
    fused = _step(_trainer(tmp_path, "true", student, None, data=data, temperature=2.0))
    _assert_same(fused, _step(_trainer(tmp_path, "false", student, None, data=data, temperature=2.0)))


def _one_step(tmp_path, mode, student, teacher, **args):
    trainer = _trainer(tmp_path, mode, student, teacher, data=lm_dataset(8, seed=3), max_steps=1, optim="sgd",
                       learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", **args)
    widths = []
    trainer.model.register_forward_hook(lambda _m, _i, out: widths.append(out.logits.shape[1]))
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.state.log_history[0], widths


def test_gradient_accumulation_on_the_fused_path_equals_the_full_batch(tmp_path):
    student, teacher = _pair("llama")  # no dropout: the micro-batches draw no random numbers
    full, full_log, _ = _one_step(tmp_path / "a", "false", student, teacher, per_device_train_batch_size=8)
    acc, acc_log, widths = _one_step(tmp_path / "b", "true", student, teacher, per_device_train_batch_size=4,
                                     gradient_accumulation_steps=2, preflight=False)
    assert widths == [0, 0]
    moved = max((full[k] - student.state_dict()[k]).abs().max().item() for k in full)
    assert moved > 1e-3
    for key in full:
        torch.testing.assert_close(acc[key], full[key], atol=1e-5, rtol=1e-4, msg=key)
    for name in ("loss", "loss_kd", "loss_ce"):
        assert acc_log[name] == pytest.approx(full_log[name], rel=1e-4), name


def test_auto_names_the_fallback_once_and_keeps_the_full_logit_path(tmp_path, caplog):
    student, teacher = _pair("llama")
    with caplog.at_level(logging.INFO, logger="hf_distill.lm.fused_step"):
        trainer = DistillationTrainer(copy.deepcopy(student), [copy.deepcopy(teacher), copy.deepcopy(teacher)],
                                      distill_args(tmp_path, multi_teacher_mode="average"),
                                      train_dataset=lm_dataset(6, seed=3), data_collator=lm_collator)
        _step(trainer)
        widths = _step(trainer)[3]
    lines = [r.getMessage() for r in caplog.records if "fused LM loss" in r.getMessage()]
    assert lines == ["fused LM loss: off (teacher mixture average)"]
    assert widths[0] > 0
    with caplog.at_level(logging.INFO, logger="hf_distill.lm.fused_step"):
        caplog.clear()
        auto = _trainer(tmp_path, "auto", student, teacher)
    assert [r.getMessage() for r in caplog.records if "fused LM loss" in r.getMessage()] == ["fused LM loss: on"]
    assert _step(auto)[3] == [0]
    # the recipe (and so the card) records the path taken, not only the flag
    assert trainer.recipe()["lm_loss_path"] == "full logits (teacher mixture average)"
    assert auto.recipe()["lm_loss_path"].startswith("fused") and auto.recipe()["arguments"]["fused_lm_loss"] == "auto"


class _ScaledHead(nn.Linear):
    """A custom head: its forward is not nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_true_refuses_an_unfusable_head_and_auto_falls_back(tmp_path, caplog):
    student, teacher = _pair("llama")
    head = _ScaledHead(32, student.config.vocab_size, bias=False)
    head.weight = student.lm_head.weight
    student.lm_head = head
    with pytest.raises(ValueError, match=r"custom head \(_ScaledHead\).*--fused_lm_loss auto"):
        _trainer(tmp_path, "true", student, teacher)
    with caplog.at_level(logging.INFO, logger="hf_distill.lm.fused_step"):
        trainer = _trainer(tmp_path, "auto", student, teacher)
    assert "fused LM loss: off (student: LlamaForCausalLM has a custom head (_ScaledHead))" in caplog.text
    assert not trainer.fused_lm.enabled and _step(trainer)[3][0] > 0


def test_a_head_reading_something_else_than_the_last_hidden_state_is_refused(tmp_path, caplog):
    student, teacher = _pair("llama")
    teacher.lm_head.register_forward_pre_hook(lambda _m, args: (args[0] * 2.0,))  # the head reads 2·h, not h
    with pytest.raises(ValueError, match=r"teacher 0: LlamaForCausalLM: hidden_states\[-1\] through its lm_head"):
        _trainer(tmp_path, "true", student, teacher)
    with caplog.at_level(logging.INFO, logger="hf_distill.lm.fused_step"):
        assert not _trainer(tmp_path, "auto", student, teacher).fused_lm.enabled
    assert "does not give its logits" in caplog.text


def test_head_weights_are_gathered_once_per_step(tmp_path, monkeypatch):
    class FakeDTensor:
        calls = 0

        def __init__(self, tensor):
            self.tensor = tensor

        def full_tensor(self):
            FakeDTensor.calls += 1
            return self.tensor

    weight = torch.randn(3, 2)
    assert fused_step.full_weight(FakeDTensor(weight)) is weight and FakeDTensor.calls == 1
    assert fused_step.full_weight(weight) is weight and fused_step.full_weight(None) is None
    seen = []
    real = fused_step.full_weight
    monkeypatch.setattr(fused_step, "full_weight", lambda p: seen.append(p) or real(p))
    student, teacher = _pair("qwen2_bias")
    trainer = _trainer(tmp_path, "true", student, teacher)
    trainer.args.loss_chunk_size = 2  # many blocks
    _step(trainer)
    head, teacher_head = trainer.model.lm_head, trainer.teacher.lm_head
    assert [id(p) for p in seen] == [id(teacher_head.weight), id(teacher_head.bias), id(head.weight), id(head.bias)]


def test_bad_fused_lm_loss_value_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--fused_lm_loss"):
        distill_args(tmp_path, fused_lm_loss="sometimes")


def test_heads_on_two_devices_are_named(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "true", *_pair("llama"))
    monkeypatch.setattr(fused_step, "probe_hidden_states", lambda model, head: "")  # a meta head cannot run
    trainer.teacher.lm_head.to("meta")
    with pytest.raises(ValueError, match=r"teacher lm_head is on \[device\(type='meta'\)\] and the student lm_head on "
                                         r"cpu: put both heads on one device.*--fused_lm_loss auto"):
        fused_step.FusedLMLoss.for_trainer(trainer)


def test_zero3_partitioned_heads_are_gathered_once_around_the_loss(monkeypatch):
    """ZeRO-3 (``ds_id`` parameters): one GatheredParameters context over the partitioned heads, read-only
    (modifier_rank None); plain parameters need no deepspeed at all. deepspeed is faked: it is not installed here."""
    import contextlib
    import sys
    import types

    from hf_distill.lm.fused_step import gathered

    calls = []

    @contextlib.contextmanager
    def gathered_parameters(params, modifier_rank=0):
        calls.append(([id(p) for p in params], modifier_rank))
        yield

    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(GatheredParameters=gathered_parameters)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    plain, partitioned = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    partitioned.ds_id = 7
    with gathered([plain, None]):
        pass
    assert calls == []
    with gathered([plain, partitioned, None]):
        pass
    assert calls == [([id(partitioned)], None)]
