"""`scripts/distill_sentence_embeddings.py`: unlabelled sentences in, a sentence-transformers student out."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_distill.data import synthetic_sentiment, synthetic_tokenizer
from hf_distill.sentence_embeddings import PoolingSettings, read_pooling

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "distill_sentence_embeddings.py"


def _script():
    spec = importlib.util.spec_from_file_location("distill_sentence_embeddings", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the field types through it
    spec.loader.exec_module(module)
    return module


def _setup(tmp_path):
    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    rows = synthetic_sentiment(40, seed=0)
    (tmp_path / "sentences.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                                      for r in rows))
    return [r["text"] for r in rows]


def test_cli_distils_saves_trims_and_exports(tmp_path):
    texts = _setup(tmp_path)
    out = tmp_path / "student"
    results = _script().main([
        "--teacher", str(tmp_path / "teacher"), "--sentences", str(tmp_path / "sentences.jsonl"), "--num_layers", "1",
        "--max_sentences", "20", "--eval_size", "8", "--embedding_pooling", "mean", "--embedding_normalize", "true", "--max_steps", "8",
        "--learning_rate", "2e-3", "--per_device_train_batch_size", "8", "--output_dir", str(out), "--use_cpu", "true",
        "--report_to", "none", "--save_strategy", "no", "--trim_vocabulary", "true", "--export", "true", "--max_length", "48"])
    assert results["train_sentences"] == 12 and results["eval_sentences"] == 8
    # the student is a copy of the teacher's layers, already close: the metrics are reported before and after
    assert 0.5 < results["before"]["before_mean_cosine"] <= 1 + 1e-9 and 0.5 < results["after"]["eval_mean_cosine"]
    assert {"before_similarity_spearman", "before_loss_embedding"} <= set(results["before"])
    assert read_pooling(out) == PoolingSettings("mean", True)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48  # as distilled
    tokenizer = synthetic_tokenizer()
    kept = {token for text in texts[:12] for token in tokenizer.tokenize(text)} | set(tokenizer.all_special_tokens)
    assert results["vocabulary_size"] == len(kept) < len(tokenizer)  # the training sentences' tokens + specials
    assert (out / "onnx" / "model.onnx").is_file() and results["onnx"]["int8_mean_cosine"] > 0.9
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "sentence-embedding"
    assert saved["arguments"]["script"]["num_layers"] == 1 and saved["arguments"]["distillation"]["embedding_pooling"] == "mean"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: sentence-similarity" in card and "library_name: sentence-transformers" in card
    assert "SentenceTransformer(" in card and "pipeline(" not in card  # transformers has no such pipeline
    assert json.loads((out / "eval_results.json").read_text())["eval_mean_cosine"] == results["after"]["eval_mean_cosine"]


def test_cli_failed_export_keeps_the_student_its_results_and_card(tmp_path, monkeypatch):
    _setup(tmp_path)
    out = tmp_path / "student"
    import hf_distill.export

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(hf_distill.export, "export_onnx", broken)
    results = _script().main([
        "--teacher", str(tmp_path / "teacher"), "--sentences", str(tmp_path / "sentences.jsonl"), "--num_layers",
        "1", "--eval_size", "8", "--embedding_pooling", "mean", "--max_steps", "2", "--output_dir", str(out),
        "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--export", "true"])
    assert results["onnx"] == {"error": "RuntimeError: exporter crashed"}  # logged; the run itself stands
    assert (out / "model.safetensors").is_file() and read_pooling(out) == PoolingSettings("mean", False)
    assert (out / "README.md").is_file() and (out / "eval_results.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["onnx"] == {"error": "RuntimeError: exporter crashed"} and "eval_mean_cosine" in saved["after"]


def test_cli_teacher_without_pooling_exits_with_the_fix(tmp_path):
    _setup(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), "--teacher", str(tmp_path / "teacher"), "--sentences",
                           str(tmp_path / "sentences.jsonl"), "--output_dir", str(tmp_path / "out"), "--eval_size", "8", "--num_layers", "1",
                           "--use_cpu", "true", "--report_to", "none"], capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert "--embedding_pooling mean --embedding_normalize true" in done.stderr
