"""Bad input is refused before any training step, with a message that names the fix."""

import copy

import pytest
from transformers import BertForSequenceClassification

from hf_distill import DistillationArguments, DistillationTrainer, cache_teacher_outputs
from tiny_models import distill_args, lm_collator, lm_dataset, sentiment_dataset, tiny_bert, tiny_gpt2


def test_teacher_and_student_disagree_on_the_number_of_labels(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    with pytest.raises(ValueError, match="Teacher has 3 labels but the student has 2.*num_labels"):
        DistillationTrainer(tiny_bert(num_labels=2), tiny_bert(num_labels=3), distill_args(tmp_path), train_dataset=data)


def test_teacher_and_student_disagree_on_the_label_map(tmp_path):
    data, _ = sentiment_dataset(8)
    student = tiny_bert(id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    teacher = tiny_bert(id2label={0: "positive", 1: "negative"}, label2id={"positive": 0, "negative": 1})
    with pytest.raises(ValueError, match="label maps differ.*id2label"):
        DistillationTrainer(student, teacher, distill_args(tmp_path), train_dataset=data)


def test_teacher_and_student_disagree_on_the_vocabulary(tmp_path):
    with pytest.raises(ValueError, match="vocabularies differ.*same tokenizer"):
        DistillationTrainer(tiny_gpt2(vocab_size=64), tiny_gpt2(vocab_size=80), distill_args(tmp_path),
                            train_dataset=lm_dataset(4), data_collator=lm_collator)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_must_be_positive(tmp_path, temperature):
    with pytest.raises(ValueError, match="temperature.*> 0"):
        DistillationArguments(output_dir=str(tmp_path), temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_must_be_in_unit_interval(tmp_path, alpha):
    with pytest.raises(ValueError, match=r"alpha.*\[0, 1\]"):
        DistillationArguments(output_dir=str(tmp_path), alpha=alpha)


def test_unknown_loss_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown distillation_loss 'kl_div'.*forward_kl"):
        DistillationArguments(output_dir=str(tmp_path), distillation_loss="kl_div")


def test_teacher_that_needs_gradients(tmp_path):
    data, _ = sentiment_dataset(8)
    with pytest.raises(ValueError, match="require gradients.*requires_grad_\\(False\\)"):
        DistillationTrainer(tiny_bert(), tiny_bert(seed=3), distill_args(tmp_path, freeze_teacher=False),
                            train_dataset=data)


def test_teacher_sharing_the_students_parameters(tmp_path):
    data, _ = sentiment_dataset(8)
    student = tiny_bert()
    with pytest.raises(ValueError, match="shares parameters.*deepcopy"):
        DistillationTrainer(student, student, distill_args(tmp_path), train_dataset=data)


def test_frozen_teacher_is_accepted_when_freezing_is_off(tmp_path):
    data, _ = sentiment_dataset(8)
    teacher = tiny_bert(seed=3).requires_grad_(False)
    trainer = DistillationTrainer(tiny_bert(), teacher, distill_args(tmp_path, freeze_teacher=False), train_dataset=data)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_cached_logits_that_do_not_match_the_student(tmp_path):
    data, _ = sentiment_dataset(8)
    cached = cache_teacher_outputs(tiny_bert(num_labels=3), data)
    with pytest.raises(ValueError, match="Cached teacher logits have 3 values per row but the student outputs 2"):
        DistillationTrainer(tiny_bert(num_labels=2), None, distill_args(tmp_path), train_dataset=cached)


def test_empty_dataset(tmp_path):
    data, _ = sentiment_dataset(8)
    with pytest.raises(ValueError, match="train_dataset` is empty"):
        DistillationTrainer(tiny_bert(), tiny_bert(seed=3), distill_args(tmp_path), train_dataset=data.select([]))


def test_teacher_path_that_does_not_exist(tmp_path):
    data, _ = sentiment_dataset(8)
    missing = str(tmp_path / "no" / "such" / "teacher")
    with pytest.raises(FileNotFoundError, match="does not exist.*save_pretrained"):
        DistillationTrainer(tiny_bert(), missing, distill_args(tmp_path), train_dataset=data)


def test_teacher_folder_without_config(tmp_path):
    data, _ = sentiment_dataset(8)
    (tmp_path / "empty_teacher").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DistillationTrainer(tiny_bert(), str(tmp_path / "empty_teacher"), distill_args(tmp_path), train_dataset=data)


def test_no_teacher_and_no_cache(tmp_path):
    data, _ = sentiment_dataset(8)
    with pytest.raises(ValueError, match="No teacher.*cache_teacher_outputs"):
        DistillationTrainer(tiny_bert(), None, distill_args(tmp_path), train_dataset=data)


def test_teacher_loaded_from_a_saved_folder(tmp_path):
    data, _ = sentiment_dataset(8)
    teacher = tiny_bert(seed=3)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(tiny_bert(), str(tmp_path / "teacher"), distill_args(tmp_path), train_dataset=data)
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert trainer.recipe()["teacher"]["name_or_path"].endswith("teacher")
    assert copy.deepcopy(trainer.teacher.config.num_labels) == 2


class _NoAttentionBert(BertForSequenceClassification):
    """A model whose forward drops attention weights (as some custom kernels do)."""

    def forward(self, *args, output_attentions=None, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.attentions = None
        return outputs


def test_attention_requested_from_a_model_that_cannot_return_it(tmp_path):
    data, tokenizer = sentiment_dataset(8)
    student = _NoAttentionBert(tiny_bert(seed=1).config)
    trainer = DistillationTrainer(student, tiny_bert(seed=2), distill_args(tmp_path, attention_weight=1.0, preflight=False,
                                  distillation_task="sequence-classification"),
                                  train_dataset=data, processing_class=tokenizer)
    batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(4)]))
    with pytest.raises(ValueError, match="no `attentions`"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_weight": 1.0, "hidden_layer_map": '{"1": 12}'}, "range"),
        ({"hidden_weight": 1.0, "hidden_loss": "huber"}, "hidden_loss"),
        ({"relation_weight": 1.0, "relation_loss": "gram"}, "relation_loss"),
        ({"lmbda": 1.5}, "lmbda"),
        ({"jsd_beta": -0.1}, "jsd_beta"),
        ({"teacher_weights": [0.7, 0.7]}, "sum to 1"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"temperature_end": 0.0, "temperature_schedule": "linear"}, "temperature_end"),
    ],
)
def test_recipe_values_out_of_range_name_the_flag(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        args = distill_args(tmp_path, **overrides)
        DistillationTrainer(tiny_bert(seed=1), tiny_bert(layers=4, seed=2), args, train_dataset=sentiment_dataset(4)[0])
