"""The encoder tasks wired through the trainer: general distillation (feature-extraction) and sentence-embedding
distillation, their refusals, saving/resuming the embedding projection, and the general-then-task flow."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, BertModel

from hf_distill import DistillationArguments, DistillationTrainer
from hf_distill.data import synthetic_sentiment, synthetic_tokenizer
from hf_distill.preflight import configured_loss_terms
from hf_distill.sentence_embeddings import write_sentence_transformers_files
from hf_distill.tasks import detect_task

from tiny_models import tiny_bert


def _bert(hidden=32, layers=2, seed=0, vocab_size=None):
    torch.manual_seed(seed)
    tokenizer = synthetic_tokenizer()
    config = BertConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(config)


def _data(n=32, seed=0):
    """Synthetic sentences, tokenized; the label column is kept (a labelled set reused without its labels)."""
    tokenizer = synthetic_tokenizer()
    rows = Dataset.from_list(synthetic_sentiment(n, seed=seed)).remove_columns("clean_label")
    return rows.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True), tokenizer


def _args(tmp_path, task, **kwargs):
    base = dict(output_dir=str(tmp_path / "out"), distillation_task=task, per_device_train_batch_size=8,
                per_device_eval_batch_size=16, max_steps=12, learning_rate=2e-3, report_to=[], logging_steps=4,
                use_cpu=True, save_strategy="no", seed=0)
    return DistillationArguments(**{**base, **kwargs})


def _mean_embeddings(model, data, tokenizer):
    """Mean-pooled, L2-normalised last hidden states, written out independently of hf_distill."""
    batch = tokenizer(list(data["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return mean / mean.norm(dim=-1, keepdim=True)


def _losses(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


# ---------------------------------------------------------------- general distillation
def test_feature_extraction_trains_on_the_intermediate_terms_only(tmp_path):
    data, tokenizer = _data()
    teacher, student = _bert(hidden=48, seed=0), _bert(hidden=32, layers=1, seed=1)
    assert detect_task(student) == "feature-extraction"  # headless: detected
    args = _args(tmp_path, None, hidden_weight=1.0, relation_weight=1.0, relation_heads=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    assert trainer.task == "feature-extraction"
    trainer.train()
    hidden, relation = _losses(trainer, "loss_hidden"), _losses(trainer, "loss_relation")
    assert len(hidden) == 3 and hidden[-1] < 0.85 * hidden[0] and relation[-1] < relation[0]
    assert not any("loss_kd" in e or "loss_ce" in e for e in trainer.state.log_history)
    report = trainer.preflight_report
    assert report.active_terms() == {"hidden": 1.0, "relation": 1.0} and report.teacher_metric is None
    assert any("no logits, so no KD or CE term" in note for note in report.notes)
    # the projections (32 -> 48) trained beside the student and are saved apart, as before
    trainer.save_model(str(tmp_path / "student"))
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert not any("projection" in key for key in saved)
    assert (tmp_path / "student" / "distillation" / "projections.safetensors").is_file()
    assert not (tmp_path / "student" / "modules.json").exists()
    recipe = json.loads((tmp_path / "student" / "distillation" / "recipe.json").read_text())
    assert recipe["task"] == "feature-extraction" and set(recipe["losses"]) == {"hidden", "relation"}  # no kd / ce


def test_general_then_task_distillation_on_a_tiny_bert(tmp_path):
    """Stage 1 distils a headless student; stage 2 loads it with a classification head and distils the task."""
    data, tokenizer = _data()
    general = _args(tmp_path, "feature-extraction", hidden_weight=1.0, attention_weight=1.0, max_steps=6)
    trainer = DistillationTrainer(model=_bert(hidden=32, layers=1, seed=1), teacher_model=_bert(hidden=32, seed=0),
                                  args=general, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "general"))
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    headless = AutoModel.from_pretrained(tmp_path / "general")
    assert type(headless).__name__ == "BertModel"
    assert all(torch.equal(headless.state_dict()[k], v) for k, v in trained.items())
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "general", num_labels=2)
    assert torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                       trained["encoder.layer.0.attention.self.query.weight"])
    teacher = tiny_bert(hidden=32, vocab_size=len(tokenizer), seed=3)
    task = _args(tmp_path / "task", "sequence-classification", alpha=0.9, max_steps=4, eval_strategy="no")
    second = DistillationTrainer(model=student, teacher_model=teacher, args=task, train_dataset=data,
                                 processing_class=tokenizer)
    second.train()
    assert _losses(second, "loss_kd") and _losses(second, "loss_ce")


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("setting", [{"alpha": 0.9}, {"temperature": 4.0}, {"distillation_loss": "reverse_kl"},
                                     {"alpha_schedule": "linear", "alpha_end": 0.0}])
def test_logit_term_settings_are_refused_for_the_encoder_tasks(tmp_path, setting):
    name = next(iter(setting))
    for task, extra in (("feature-extraction", {"hidden_weight": 1.0}), ("sentence-embedding", {})):
        with pytest.raises(ValueError, match=f"has no logits.*--{name}"):
            _args(tmp_path, task, **extra, **setting)


def test_encoder_task_refusals(tmp_path):
    with pytest.raises(ValueError, match="--hidden_weight, --attention_weight or --relation_weight"):
        _args(tmp_path, "feature-extraction")  # every intermediate weight 0
    with pytest.raises(ValueError, match="--embedding_pooling apply to distillation_task='sentence-embedding'"):
        _args(tmp_path, "sequence-classification", embedding_pooling="mean")
    with pytest.raises(ValueError, match="--embedding_normalize needs --embedding_pooling"):
        _args(tmp_path, "sentence-embedding", embedding_normalize=True)
    with pytest.raises(ValueError, match="--embedding_weight above 0"):
        _args(tmp_path, "sentence-embedding", embedding_weight=0.0)
    data, tokenizer = _data(8)
    # detected task (headless student, distillation_task unset): the same refusal, at construction
    with pytest.raises(ValueError, match="has no logits.*--alpha 0.9"):
        DistillationTrainer(model=_bert(seed=1), teacher_model=_bert(seed=0), train_dataset=data,
                            args=_args(tmp_path, None, hidden_weight=1.0, alpha=0.9))
    headed = tiny_bert(hidden=32, vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="teacher is a BertForSequenceClassification: pass its .base_model"):
        DistillationTrainer(model=_bert(seed=1), teacher_model=headed, train_dataset=data,
                            args=_args(tmp_path, "sentence-embedding", embedding_pooling="mean"))


def test_sentence_embedding_teacher_without_pooling_fails_before_training(tmp_path):
    data, tokenizer = _data(8)
    _bert(hidden=32, seed=0).save_pretrained(tmp_path / "teacher")  # no sentence-transformers files
    with pytest.raises(ValueError, match="--embedding_pooling mean --embedding_normalize true"):
        DistillationTrainer(model=_bert(seed=1), teacher_model=str(tmp_path / "teacher"), train_dataset=data,
                            args=_args(tmp_path, "sentence-embedding"), processing_class=tokenizer)


def test_configured_loss_terms_of_the_encoder_tasks(tmp_path):
    args = _args(tmp_path, "sentence-embedding", embedding_pooling="mean", hidden_weight=0.5)
    assert configured_loss_terms(args) == {"hidden": 0.5, "attention": 0.0, "relation": 0.0, "embedding": 1.0}
    plain = _args(tmp_path, None)
    assert configured_loss_terms(plain, "feature-extraction") == {"hidden": 0.0, "attention": 0.0, "relation": 0.0}
    assert set(configured_loss_terms(plain)) == {"kd", "ce", "hidden", "attention", "relation"}


# ---------------------------------------------------------------- sentence embeddings
def test_sentence_embedding_distillation_reduces_the_cosine_gap(tmp_path):
    data, tokenizer = _data(48)
    held_out, _ = _data(32, seed=1)  # two full eval batches: the mean of batch means is the mean
    teacher, student = _bert(hidden=32, seed=0), _bert(hidden=32, layers=1, seed=5)
    cosine = lambda: float((_mean_embeddings(student, held_out, tokenizer)  # noqa: E731
                            * _mean_embeddings(teacher, held_out, tokenizer)).sum(-1).mean())
    before = cosine()
    args = _args(tmp_path, "sentence-embedding", embedding_pooling="mean", embedding_normalize=True, max_steps=18,
                 eval_strategy="no")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=held_out.remove_columns("text"), processing_class=tokenizer)
    trainer.train()
    student.eval()
    after = cosine()
    assert after > before + 0.1 and after > 0.8, (before, after)
    metrics = trainer.evaluate()
    assert metrics["eval_mean_cosine"] == pytest.approx(after, abs=1e-4)
    assert -1.0 <= metrics["eval_similarity_spearman"] <= 1.0
    assert metrics["eval_loss_embedding"] == pytest.approx(1 - after, abs=1e-4)  # cosine loss = 1 - cos
    embedding = _losses(trainer, "loss_embedding")
    assert embedding[-1] < 0.5 * embedding[0]


def test_sentence_embedding_projection_trains_saves_apart_and_resumes(tmp_path):
    data, tokenizer = _data(32)
    teacher, student = _bert(hidden=48, seed=0), _bert(hidden=32, layers=1, seed=1)
    args = _args(tmp_path, "sentence-embedding", embedding_pooling="cls", embedding_loss="mse", max_steps=4,
                 save_strategy="steps", save_steps=4)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    projection = trainer.encoder.embedding.projection
    initial = projection.linear.weight.detach().clone()
    trainer.train()
    assert not torch.equal(projection.linear.weight, initial)  # in the optimizer
    checkpoint = tmp_path / "out" / "checkpoint-4"
    saved = load_file(str(checkpoint / "distillation" / "projections.safetensors"))
    assert torch.equal(saved["embedding.linear.weight"], projection.linear.weight.detach())
    assert not any("linear" in key for key in load_file(str(checkpoint / "model.safetensors")))
    pooling = json.loads((checkpoint / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
    assert pooling["word_embedding_dimension"] == 32 and not (checkpoint / "2_Normalize").exists()
    recipe = json.loads((checkpoint / "distillation" / "recipe.json").read_text())
    assert recipe["losses"] == {"embedding": {"pooling": {"mode": "cls", "normalize": False}, "loss": "mse",
                                              "weight": 1.0, "projection": [32, 48]}}
    fresh = DistillationTrainer(model=_bert(hidden=32, layers=1, seed=1), teacher_model=teacher, args=args,
                                train_dataset=data, processing_class=tokenizer)
    assert not torch.equal(fresh.encoder.embedding.projection.linear.weight, projection.linear.weight)
    fresh._load_from_checkpoint(str(checkpoint))
    assert torch.equal(fresh.encoder.embedding.projection.linear.weight, projection.linear.weight)


# ---------------------------------------------------------------- the shared MiniLM
def test_shared_minilm_distil_save_reload_trim_export(tmp_path):
    """Teacher: the shared MiniLM (loaded by path, as AutoModel); student: its 3-layer copy. A few steps of
    sentence-embedding distillation with the hidden-state term, then save, reload, trim and export."""
    from conftest import shared_data_dir
    from transformers import AutoTokenizer

    from hf_distill import create_student, trim_vocabulary
    from hf_distill.export import export_onnx
    from hf_distill.inference import load_onnx_pipeline
    from hf_distill.sentence_embeddings import read_pooling

    folder = shared_data_dir() / "models" / "all-MiniLM-L6-v2"
    if not folder.is_dir():
        pytest.skip(f"shared MiniLM not found at {folder}")
    with open(shared_data_dir() / "sst2" / "train.jsonl", encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for _, line in zip(range(96), handle)]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = Dataset.from_dict({"text": texts[:64]}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=16), batched=True, remove_columns=["text"])
    teacher = AutoModel.from_pretrained(folder)
    student = create_student(teacher, num_layers=3)
    args = _args(tmp_path, "sentence-embedding", embedding_pooling="mean", embedding_normalize=True, hidden_weight=1.0,
                 max_steps=3, logging_steps=1, learning_rate=1e-4, per_device_train_batch_size=8)
    trainer = DistillationTrainer(model=student, teacher_model=str(folder), args=args, train_dataset=data,
                                  processing_class=tokenizer)
    assert trainer.intermediate.hidden_map == {0: 0, 1: 2, 2: 4, 3: 6}
    trainer.train()
    hidden = _losses(trainer, "loss_hidden")
    embedding = _losses(trainer, "loss_embedding")
    assert len(hidden) == 3 and all(0 < h < 10 for h in hidden) and embedding[-1] < embedding[0]
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModel.from_pretrained(tmp_path / "student").eval()
    batch = tokenizer(texts[64:72], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).last_hidden_state, student.eval()(**batch).last_hidden_state, atol=1e-5)
    pooling = read_pooling(tmp_path / "student")
    assert (pooling.mode, pooling.normalize) == ("mean", True)
    expected = _mean_embeddings(reloaded, Dataset.from_dict({"text": texts[64:72]}), tokenizer).numpy()
    trimmed, trimmed_tokenizer = trim_vocabulary(reloaded, tokenizer, texts)
    assert trimmed.config.vocab_size == len(trimmed_tokenizer) < 30522 / 4
    trimmed.save_pretrained(tmp_path / "trimmed")
    trimmed_tokenizer.save_pretrained(tmp_path / "trimmed")
    write_sentence_transformers_files(tmp_path / "trimmed", pooling, 384)
    result = export_onnx(tmp_path / "trimmed", backend="torch", per_channel=True,
                         eval_dataset=[{"text": t} for t in texts[64:]])
    assert result.task == "feature-extraction" and result.parity["fp32"].passed
    assert result.parity["int8"].mean_cosine > 0.9 and result.pooling == {"mode": "mean", "normalize": True}
    got = load_onnx_pipeline(tmp_path / "trimmed" / "onnx", quantized=False)(texts[64:72])
    assert abs(got - expected).max() < 1e-4  # trimming and export change nothing on text whose tokens are kept


def test_sentence_embedding_step_is_the_same_with_gradient_accumulation(tmp_path):
    """Batch 8 in one micro-batch or 4 × 2 accumulated: the same SGD step of the student and the projection."""
    data, tokenizer = _data(8)
    teacher = _bert(hidden=48, seed=0)
    results = []
    for batch, steps in ((8, 1), (4, 2)):
        args = _args(tmp_path / str(batch), "sentence-embedding", embedding_pooling="mean", hidden_weight=0.5,
                     per_device_train_batch_size=batch, gradient_accumulation_steps=steps, max_steps=1, optim="sgd",
                     learning_rate=0.5, logging_steps=1)
        trainer = DistillationTrainer(model=_bert(hidden=32, layers=1, seed=1), teacher_model=teacher, args=args,
                                      train_dataset=data, processing_class=tokenizer)
        initial = trainer.encoder.embedding.projection.linear.weight.detach().clone()
        trainer.train()
        assert (trainer.encoder.embedding.projection.linear.weight - initial).abs().max() > 1e-4  # it trained
        results.append((dict(trainer.model.named_parameters()), trainer.encoder.embedding.projection.linear.weight,
                        _losses(trainer, "loss_embedding")[0]))
    (one, p_one, l_one), (two, p_two, l_two) = results
    assert l_one == pytest.approx(l_two, rel=1e-5)
    assert torch.allclose(p_one, p_two, atol=1e-6)
    assert all(torch.allclose(one[name], two[name], atol=1e-6) for name in one)


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False), ("max", True)])
def test_saved_student_loads_in_sentence_transformers(tmp_path, pooling, normalize):
    """The folder the trainer saves loads with ``SentenceTransformer(folder)``, which then embeds as the student
    did in training (pooling and normalisation read from the files the trainer wrote)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    data, tokenizer = _data(16)
    teacher, student = _bert(hidden=32, seed=0), _bert(hidden=32, layers=1, seed=5)
    args = _args(tmp_path, "sentence-embedding", embedding_pooling=pooling, embedding_normalize=normalize,
                 max_steps=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    loaded = sentence_transformers.SentenceTransformer(str(tmp_path / "student"), device="cpu")
    texts = list(data["text"][:6])
    got = torch.as_tensor(loaded.encode(texts, convert_to_numpy=True))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    student.eval()
    with torch.no_grad():
        hidden = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).bool()
    expected = {"mean": (hidden * mask).sum(1) / mask.sum(1), "cls": hidden[:, 0],
                "max": hidden.masked_fill(~mask, float("-inf")).max(1).values}[pooling]
    if normalize:
        expected = expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
