"""DistillationTrainer: loss composition per task, normalisation, logging, evaluation, saving."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorForTokenClassification

from hf_distill import DistillationTrainer, cache_teacher_outputs, classification_metrics
from hf_distill.losses.logits import hard_label_loss, soft_label_loss
from tiny_models import distill_args, lm_collator, lm_dataset, sentiment_dataset, tiny_bert, tiny_gpt2


def _batch(trainer, dataset, n):
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))


def test_classification_loss_is_alpha_mix_of_t2_kd_and_ce(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    student, teacher = tiny_bert(seed=1), tiny_bert(layers=3, seed=2)
    args = distill_args(tmp_path, alpha=0.3, temperature=3.0)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data, processing_class=tokenizer)
    batch = _batch(trainer, data, 8)
    loss = trainer.compute_loss(trainer.model, batch)
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    s, t = student(**model_inputs).logits, teacher(**model_inputs).logits
    kl = (torch.softmax(t / 3, -1) * (torch.log_softmax(t / 3, -1) - torch.log_softmax(s / 3, -1))).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, batch["labels"])
    torch.testing.assert_close(loss, 0.3 * 9 * kl.mean() + 0.7 * ce)


def test_batch_without_labels_uses_soft_term_only(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    data = data.remove_columns("label")
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(seed=2), distill_args(tmp_path, alpha=0.2),
                                  train_dataset=data, processing_class=tokenizer)
    batch = _batch(trainer, data, 8)
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    expected = soft_label_loss(trainer.model(**inputs).logits, trainer.teacher(**inputs).logits, temperature=2.0).mean()
    torch.testing.assert_close(loss, expected)


def test_causal_lm_loss_is_normalised_by_completion_tokens(tmp_path):
    data = lm_dataset(6)
    student, teacher = tiny_gpt2(seed=1), tiny_gpt2(layers=3, seed=2)
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, alpha=0.5, temperature=1.0),
                                  train_dataset=data, data_collator=lm_collator)
    batch = _batch(trainer, data, 6)
    loss = trainer.compute_loss(trainer.model, batch)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    kd = soft_label_loss(s[keep], t[keep], temperature=1.0)
    ce = hard_label_loss(s[keep], targets[keep])
    torch.testing.assert_close(loss, 0.5 * kd.mean() + 0.5 * ce.mean())


def test_padding_changes_nothing(tmp_path):
    for task in ("sequence-classification", "token-classification", "question-answering"):
        data, tokenizer = sentiment_dataset(4)
        if task == "token-classification":
            data = data.map(lambda ex: {"label": [i % 2 for i in range(len(ex["input_ids"]))]})
        if task == "question-answering":
            data = data.map(lambda ex: {"start_positions": 1, "end_positions": 3}).remove_columns("label")
        collator = DataCollatorForTokenClassification(tokenizer) if task == "token-classification" else None
        trainer = DistillationTrainer(tiny_bert(task, seed=1), tiny_bert(task, seed=2), distill_args(tmp_path),
                                      train_dataset=data, processing_class=tokenizer, data_collator=collator)
        batch = _batch(trainer, data, 4)
        extra = 5
        padded = {}
        for key, value in batch.items():
            if value.dim() == 2:
                fill = -100 if key == "labels" else 0
                padded[key] = torch.cat([value, value.new_full((value.shape[0], extra), fill)], dim=1)
            else:
                padded[key] = value
        torch.testing.assert_close(
            trainer.compute_loss(trainer.model, padded), trainer.compute_loss(trainer.model, batch), msg=task
        )


def _one_step_weights(tmp_path, name, model_fn, teacher, data, collator, **args):
    trainer = DistillationTrainer(model_fn(), teacher, distill_args(tmp_path / name, max_steps=1, optim="sgd",
                                  learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant", **args),
                                  train_dataset=data, data_collator=collator)
    trainer.train()
    loss = trainer.state.log_history[0]["loss"]
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, loss


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, task):
    if task == "causal-lm":
        data, collator = lm_dataset(8, seed=3), lm_collator  # lengths differ: token counts per micro-batch differ
        model_fn, teacher = (lambda: tiny_gpt2(seed=1)), tiny_gpt2(layers=3, seed=2)
    else:
        data, tokenizer = sentiment_dataset(8)
        from transformers import DataCollatorWithPadding

        collator = DataCollatorWithPadding(tokenizer)
        model_fn, teacher = (lambda: tiny_bert(seed=1)), tiny_bert(layers=3, seed=2)
    full, full_loss = _one_step_weights(tmp_path, "full", model_fn, teacher, data, collator,
                                        per_device_train_batch_size=8, gradient_accumulation_steps=1)
    accumulated, acc_loss = _one_step_weights(tmp_path, "ga", model_fn, teacher, data, collator,
                                              per_device_train_batch_size=4, gradient_accumulation_steps=2)
    start = model_fn().state_dict()
    moved = max((full[k] - start[k]).abs().max().item() for k in full)
    assert moved > 1e-3, "the step must change the weights for the comparison to mean anything"
    for key in full:
        torch.testing.assert_close(accumulated[key], full[key], atol=1e-5, rtol=1e-4, msg=key)
    assert acc_loss == pytest.approx(full_loss, rel=1e-4)


def test_each_term_is_logged_and_mixes_into_the_loss(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    args = distill_args(tmp_path, alpha=0.25, max_steps=4, logging_steps=2, learning_rate=0.0)
    trainer = DistillationTrainer(tiny_bert(seed=1), tiny_bert(seed=2), args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.25 * entry["loss_kd"] + 0.75 * entry["loss_ce"], rel=1e-3)


def test_offline_cache_gives_the_online_loss(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    teacher = tiny_bert(layers=3, seed=2)
    cached = cache_teacher_outputs(teacher, data, batch_size=3)
    assert len(cached[0]["teacher_logits"]) == 2
    online = DistillationTrainer(tiny_bert(seed=1), teacher, distill_args(tmp_path), train_dataset=data,
                                 processing_class=tokenizer)
    offline = DistillationTrainer(tiny_bert(seed=1), None, distill_args(tmp_path), train_dataset=cached,
                                  processing_class=tokenizer)
    assert offline.teacher is None
    batch_online, batch_offline = _batch(online, data, 8), _batch(offline, cached, 8)
    assert "teacher_logits" in batch_offline
    torch.testing.assert_close(offline.compute_loss(offline.model, batch_offline),
                               online.compute_loss(online.model, batch_online))
    offline.train()  # trains from the column alone: remove_unused_columns must keep it


def test_offline_topk_cache_is_close_to_online_for_causal_lm(tmp_path):
    data = lm_dataset(6, vocab_size=64)
    teacher = tiny_gpt2(layers=3, seed=2)
    with torch.no_grad():  # a trained LM is peaked; a random one is near uniform and no top-k fits it
        teacher.transformer.ln_f.weight.mul_(30.0)
    args = distill_args(tmp_path, temperature=2.0, alpha=1.0)
    online = DistillationTrainer(tiny_gpt2(seed=1), teacher, args, train_dataset=data, data_collator=lm_collator)
    full_loss = online.compute_loss(online.model, _batch(online, data, 6))
    gaps = []
    for k in (8, 32, 64):
        cached = cache_teacher_outputs(teacher, data, top_k=k, temperature=2.0)
        offline = DistillationTrainer(tiny_gpt2(seed=1), None, args, train_dataset=cached, data_collator=lm_collator)
        gaps.append(abs(offline.compute_loss(offline.model, _batch(offline, cached, 6)).item() - full_loss.item()))
    assert gaps[-1] < 1e-4  # k = vocabulary: exact
    assert gaps[0] < 0.25 * full_loss.item()
    assert gaps[0] >= gaps[1] >= gaps[2]


def test_evaluation_returns_student_logits_and_teacher_agreement(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    teacher = tiny_bert(seed=2)
    trainer = DistillationTrainer(copy.deepcopy(teacher), teacher, distill_args(tmp_path), train_dataset=data,
                                  eval_dataset=data, processing_class=tokenizer, compute_metrics=classification_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_teacher_agreement"] == 1.0  # a copy of the teacher agrees everywhere
    assert metrics["eval_loss_kd"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_accuracy"] == pytest.approx(metrics["eval_teacher_accuracy"])
    other = DistillationTrainer(tiny_bert(seed=5), teacher, distill_args(tmp_path), train_dataset=data,
                                eval_dataset=data, processing_class=tokenizer, compute_metrics=classification_metrics)
    predictions = other.predict(data)
    assert predictions.predictions.shape == (16, 2)
    expected = (predictions.predictions.argmax(-1) == predictions.label_ids).mean()
    assert predictions.metrics["test_accuracy"] == pytest.approx(expected)


def test_saved_folder_holds_the_student_and_recipe_only(tmp_path):
    data, tokenizer = sentiment_dataset(16)
    student, teacher = tiny_bert(seed=1), tiny_bert(layers=3, hidden=64, seed=2)
    trainer = DistillationTrainer(student, teacher, distill_args(tmp_path, max_steps=2), train_dataset=data,
                                  processing_class=tokenizer)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "distillation/recipe.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) and "training_args" not in f for f in files)
    weights = load_file(out / "model.safetensors")
    assert set(weights) <= set(student.state_dict())
    assert sum(t.numel() for t in weights.values()) <= sum(p.numel() for p in student.parameters())
    recipe = json.loads((out / "distillation" / "recipe.json").read_text())
    assert recipe["losses"]["kd"]["temperature"] == 2.0
    assert recipe["teacher"]["num_parameters"] == sum(p.numel() for p in teacher.parameters())
    assert "hub_token" not in recipe["arguments"]
    reloaded = type(student).from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
