"""DistillationTrainer extensions: intermediate terms, several teachers, schedules, self-distillation,
on-policy batches, LoRA students, vocabulary checks."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding, TrainerCallback

from hf_distill import DistillationTrainer
from hf_distill.layer_map import FeatureProjections
from hf_distill.losses.logits import soft_label_loss
from hf_distill.tasks import unwrap_model
from tiny_models import distill_args, lm_collator, lm_dataset, sentiment_dataset, tiny_bert, tiny_gpt2


def _batch(trainer, dataset, n):
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))


def _narrow_pair():
    return tiny_bert(seed=1, hidden=16), tiny_bert(layers=4, hidden=32, seed=2)


def test_hidden_term_trains_projections_and_saves_them_beside_the_student(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    student, teacher = _narrow_pair()
    args = distill_args(tmp_path, hidden_weight=1.0, hidden_loss="mse", max_steps=3, logging_steps=1)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer)
    before = copy.deepcopy(trainer.intermediate.projections.state_dict())
    trainer.train()
    after = trainer.intermediate.projections.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "projections must be in the optimizer"
    assert all("loss_hidden" in e for e in trainer.state.log_history if "loss" in e)
    trainer.save_model()
    out = tmp_path / "out"
    weights = load_file(str(out / "model.safetensors"))
    assert not any("projection" in k for k in weights)
    loaded = FeatureProjections.load(out / "distillation" / "projections.safetensors")
    for key, value in after.items():
        torch.testing.assert_close(loaded.state_dict()[key], value.cpu())
    recipe = json.loads((out / "distillation" / "recipe.json").read_text())
    assert recipe["layer_map"]["hidden_layer_map"] == {"0": 0, "1": 2, "2": 4}
    assert recipe["losses"]["hidden"] == {"weight": 1.0, "loss": "mse"}
    type(student).from_pretrained(out)  # still a plain from_pretrained folder


def test_each_optimizer_step_uses_its_own_projection_gradients_only(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    student, teacher = _narrow_pair()
    seen = []

    class GradientsBeforeTheStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen.append([p.grad.clone() for p in trainer.intermediate.projections.parameters()])

    # Learning rate 0 and one batch of all 8 examples: every step computes the same gradient g.
    args = distill_args(tmp_path, hidden_weight=1.0, max_steps=3, per_device_train_batch_size=8, learning_rate=0.0)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer,
                                  callbacks=[GradientsBeforeTheStep()])
    trainer.train()
    assert len(seen) == 3 and float(sum(g.abs().sum() for g in seen[0])) > 0
    for step in seen[1:]:  # g each time, not g, 2g, 3g (gradients left over from the previous steps)
        for got, first in zip(step, seen[0]):
            torch.testing.assert_close(got, first, rtol=1e-5, atol=1e-7)


def test_loss_adds_weighted_intermediate_terms_per_example(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    student, teacher = _narrow_pair()
    plain = DistillationTrainer(copy.deepcopy(student), copy.deepcopy(teacher), distill_args(tmp_path / "a", alpha=0.5),
                                train_dataset=data, processing_class=tokenizer)
    mixed = DistillationTrainer(student, teacher, distill_args(tmp_path / "b", alpha=0.5, hidden_weight=0.7,
                                relation_weight=0.3, relation_loss="rkd_distance"),
                                train_dataset=data, processing_class=tokenizer)
    batch = _batch(mixed, data, 8)
    base = plain.compute_loss(plain.model, batch)
    total = mixed.compute_loss(mixed.model, batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    s = mixed.model(**inputs, output_hidden_states=True)
    t = mixed.teacher(**inputs, output_hidden_states=True)
    mask = batch["attention_mask"].float()
    assert mask.min() == 0  # padded: the masks matter

    def token_mean(per_token):  # [B, T] -> [B], over valid tokens
        return (per_token * mask).sum(1) / mask.sum(1)

    # hidden: uniform map with embeddings, 0->0, 1->2, 2->4; each student state through its own Linear(16, 32).
    linear = {int(k): m for k, m in mixed.intermediate.projections.projections.items()}
    hidden = sum(token_mean((s.hidden_states[i] @ linear[i].weight.T + linear[i].bias - t.hidden_states[j])
                            .pow(2).mean(-1)) for i, j in {0: 0, 1: 2, 2: 4}.items()) / 3
    # relation: RKD distance of the masked mean-pooled last states, over the 8 * 7 ordered pairs, times 8.
    def distances(states):
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        d = torch.cdist(pooled, pooled)[~torch.eye(8, dtype=torch.bool)]
        return d / d.mean()

    diff = (distances(s.hidden_states[-1]) - distances(t.hidden_states[-1])).abs()
    relation = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean() * 8
    torch.testing.assert_close(total, base + (0.7 * hidden.sum() + 0.3 * relation) / 8)


def test_attention_term_switches_to_eager_and_says_so(tmp_path, caplog):
    data, tokenizer = sentiment_dataset(8)
    student = tiny_bert(seed=1, attn_implementation="sdpa")
    teacher = tiny_bert(layers=4, seed=2, attn_implementation="sdpa", heads=8)
    with caplog.at_level(logging.WARNING, logger="hf_distill.trainer"):
        trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, attention_weight=1.0, max_steps=2),
                                      train_dataset=data, processing_class=tokenizer)
    assert student.config._attn_implementation == "eager" and teacher.config._attn_implementation == "eager"
    assert sum("eager" in r.getMessage() for r in caplog.records) == 1
    trainer.train()
    assert all(e["loss_attention"] > 0 for e in trainer.state.log_history if "loss" in e)


def test_gradient_accumulation_is_exact_with_intermediate_terms(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    collator = DataCollatorWithPadding(tokenizer)

    def run(name, batch, steps):
        student, teacher = _narrow_pair()
        args = distill_args(tmp_path / name, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
                            lr_scheduler_type="constant", hidden_weight=1.0, attention_weight=0.5,
                            per_device_train_batch_size=batch, gradient_accumulation_steps=steps)
        trainer = DistillationTrainer(student, teacher, args, train_dataset=data, data_collator=collator)
        trainer.train()
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        state.update({f"proj.{k}": v.detach().clone() for k, v in trainer.intermediate.projections.state_dict().items()})
        return state

    full, accumulated = run("full", 8, 1), run("ga", 4, 2)
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], atol=1e-5, rtol=1e-4, msg=key)


def test_intermediate_terms_need_a_live_teacher_and_valid_maps(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    student, teacher = _narrow_pair()
    with pytest.raises(ValueError, match="out of range|range"):
        DistillationTrainer(student, teacher, distill_args(tmp_path, hidden_weight=1.0, hidden_layer_map='{"2": 7}'),
                            train_dataset=data)
    with pytest.raises(ValueError, match="projection"):
        DistillationTrainer(student, teacher, distill_args(tmp_path, hidden_weight=1.0, hidden_projection=False),
                            train_dataset=data)
    from hf_distill import cache_teacher_outputs

    cached = cache_teacher_outputs(teacher, data)
    with pytest.raises(ValueError, match="live teacher"):
        DistillationTrainer(student, None, distill_args(tmp_path, hidden_weight=1.0), train_dataset=cached)


def test_two_teachers_average_their_softened_distributions(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    t1, t2 = tiny_bert(seed=2), tiny_bert(layers=3, seed=3)
    student = tiny_bert(seed=1)
    trainer = DistillationTrainer(student, [t1, t2], distill_args(tmp_path, alpha=1.0, temperature=2.0,
                                  teacher_weights=[0.25, 0.75]), train_dataset=data, processing_class=tokenizer)
    batch = _batch(trainer, data, 8)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    p = 0.25 * torch.softmax(t1(**inputs).logits / 2, -1) + 0.75 * torch.softmax(t2(**inputs).logits / 2, -1)
    log_q = torch.log_softmax(student(**inputs).logits / 2, -1)
    expected = 4 * (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch), expected)

    summed = DistillationTrainer(tiny_bert(seed=1), [t1, t2], distill_args(tmp_path / "s", alpha=1.0,
                                 teacher_weights=[0.25, 0.75], multi_teacher_mode="sum"), train_dataset=data)
    s = summed.model(**inputs).logits
    expected_sum = 0.25 * soft_label_loss(s, t1(**inputs).logits, temperature=2.0).mean() + 0.75 * soft_label_loss(
        s, t2(**inputs).logits, temperature=2.0).mean()
    torch.testing.assert_close(summed.compute_loss(summed.model, batch), expected_sum)


def test_teachers_with_other_label_maps_or_weights_are_refused(tmp_path):
    data, _ = sentiment_dataset(8)
    with pytest.raises(ValueError, match="labels"):
        DistillationTrainer(tiny_bert(seed=1), [tiny_bert(seed=2), tiny_bert(seed=3, num_labels=3)],
                            distill_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="one weight per teacher"):
        DistillationTrainer(tiny_bert(seed=1), [tiny_bert(seed=2), tiny_bert(seed=3)],
                            distill_args(tmp_path, teacher_weights=[1.0]), train_dataset=data)
    with pytest.raises(ValueError, match="sum to 1"):
        distill_args(tmp_path, teacher_weights=[0.5, 0.6])


class _Record(TrainerCallback):
    def __init__(self, trainer_ref):
        self.trainer, self.values = trainer_ref, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.values.append((self.trainer[0].current_alpha(), self.trainer[0].current_temperature()))


def test_alpha_and_temperature_follow_their_schedules(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    args = distill_args(tmp_path, max_steps=4, per_device_train_batch_size=4, alpha=1.0, alpha_end=0.0,
                        alpha_schedule="linear", temperature=4.0, temperature_end=1.0, temperature_schedule="cosine")
    ref = []
    recorder = _Record(ref)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(seed=2), args, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[recorder])
    ref.append(trainer)
    trainer.train()
    alphas = [a for a, _ in recorder.values]
    temps = [t for _, t in recorder.values]
    assert alphas == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert temps[0] == pytest.approx(4.0) and temps[2] == pytest.approx(2.5)
    assert all(a > b for a, b in zip(temps, temps[1:]))


def test_ema_self_distillation_moves_the_teacher_towards_the_student(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    args = distill_args(tmp_path, self_distillation="ema", ema_decay=0.9, max_steps=1, optim="sgd", learning_rate=0.5)
    trainer = DistillationTrainer(tiny_bert(seed=1), None, args, train_dataset=data, processing_class=tokenizer)
    teacher = unwrap_model(trainer.teacher)  # compile state left in the process by another test may wrap it
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    trainer.train()
    student = unwrap_model(trainer.model).state_dict()
    key = "classifier.weight"
    expected = 0.9 * start[key] + 0.1 * student[key]
    torch.testing.assert_close(teacher.state_dict()[key], expected)
    assert not torch.equal(start[key], student[key])


def test_snapshot_self_distillation_starts_at_zero_soft_loss(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    trainer = DistillationTrainer(tiny_bert(seed=1), None, distill_args(tmp_path, self_distillation="snapshot", alpha=1.0),
                                  train_dataset=data, processing_class=tokenizer)
    assert trainer.teacher is not trainer.model
    loss = trainer.compute_loss(trainer.model, _batch(trainer, data, 8))
    assert abs(loss.item()) < 1e-6


def _lm_with_prompt_length(n=8):
    data = lm_dataset(n, seed=5)
    return data.add_column("prompt_length", [3] * n)


def _lm_collate(features):
    batch = lm_collator(features)
    if "prompt_length" in features[0]:
        batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features])
    return batch


class _Tokenizer:  # the two ids on-policy generation needs
    pad_token_id, eos_token_id = 1, 1


def test_on_policy_steps_follow_lmbda_and_train_on_generations(tmp_path, monkeypatch):
    data = _lm_with_prompt_length(8)
    calls = []
    original = DistillationTrainer.on_policy_inputs

    def spy(self, model, inputs):
        out = original(self, model, inputs)
        calls.append(out)
        return out

    monkeypatch.setattr(DistillationTrainer, "on_policy_inputs", spy)

    def run(lmbda, name):
        calls.clear()
        args = distill_args(tmp_path / name, lmbda=lmbda, max_steps=4, per_device_train_batch_size=4,
                            max_completion_length=5, alpha=1.0)
        trainer = DistillationTrainer(tiny_gpt2(seed=1), tiny_gpt2(layers=3, seed=2), args, train_dataset=data,
                                      data_collator=_lm_collate, processing_class=_Tokenizer())
        trainer.train()
        return len(calls), trainer

    assert run(0.0, "off")[0] == 0
    count, trainer = run(1.0, "on")
    assert count == 4
    generated = calls[-1]
    assert (generated["labels"][:, :3] == -100).all() and (generated["labels"] != -100).any()
    assert all(e["loss_kd"] > 0 for e in trainer.state.log_history if "loss" in e)
    first, _ = run(0.5, "half1")
    second, _ = run(0.5, "half2")
    assert first == second and 0 < first < 4  # seeded per step: the same draws every run


def test_lora_student_trains_adapters_only_and_saves_the_adapter(tmp_path):
    import peft

    data = _lm_with_prompt_length(8)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    teacher = tiny_gpt2(layers=3, seed=2)
    trainer = DistillationTrainer(tiny_gpt2(seed=1), teacher, distill_args(tmp_path, max_steps=2), train_dataset=data,
                                  data_collator=_lm_collate, peft_config=config)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n, _ in teacher.named_parameters())
    frozen_before = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    trainer.save_model()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_teacher_vocabulary_padding_is_explicit(tmp_path):
    data = lm_dataset(8)
    student = tiny_gpt2(seed=1, vocab_size=64)
    padded_teacher = tiny_gpt2(layers=3, seed=2, vocab_size=72)
    with pytest.raises(ValueError, match="truncate_teacher_vocab"):
        DistillationTrainer(student, padded_teacher, distill_args(tmp_path), train_dataset=data, data_collator=lm_collator)
    trainer = DistillationTrainer(student, padded_teacher, distill_args(tmp_path, truncate_teacher_vocab=True, alpha=1.0,
                                  temperature=1.0), train_dataset=data, data_collator=lm_collator)
    batch = _batch(trainer, data, 4)
    loss = trainer.compute_loss(trainer.model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = padded_teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :64]
    keep = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(loss, soft_label_loss(s[keep], t[keep], temperature=1.0).mean())


def test_different_tokenizers_without_aligned_data_are_refused_for_causal_lm(tmp_path):
    """Different tokenizers choose cross-tokenizer mode, which needs both tokenizations aligned in the data."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    def tok(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="a")))

    with pytest.raises(ValueError, match="tokenizers differ.*tokenize_aligned"):
        DistillationTrainer(tiny_gpt2(seed=1), tiny_gpt2(seed=2), distill_args(tmp_path), train_dataset=lm_dataset(4),
                            data_collator=lm_collator, processing_class=tok(["a", "b", "c"]),
                            teacher_processing_class=tok(["a", "c", "b"]))
