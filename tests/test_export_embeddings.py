"""ONNX export of headless and sentence-embedding students as feature extraction: `last_hidden_state` with parity
against PyTorch, int8 judged by the cosine of its token vectors, and a pipeline that returns pooled embeddings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_distill.data import synthetic_tokenizer
from hf_distill.export import export_onnx
from hf_distill.export.parity import ParityCriteria, Tally, judge
from hf_distill.inference import detect_task, load_onnx_pipeline, pool_numpy, resolve_task
from hf_distill.sentence_embeddings import PoolingSettings, write_sentence_transformers_files

TEXTS = ["the movie was great", "the plot was bad and boring", "great acting", "bad", "a funny , gripping film"]


def _save_headless(folder, pooling=None, hidden=64, seed=0):
    torch.manual_seed(seed)
    tokenizer = synthetic_tokenizer()
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if pooling is not None:
        write_sentence_transformers_files(folder, pooling, hidden)
    return model.eval(), tokenizer


def _torch_embeddings(model, tokenizer, texts, mode, normalize):
    """Pooled last hidden states, written out with a loop over real tokens (independent of hf_distill)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    rows = []
    for b, mask in enumerate(batch["attention_mask"]):
        real = [hidden[b, t] for t in range(len(mask)) if mask[t] == 1]
        vector = {"mean": sum(real) / len(real), "cls": real[0], "max": torch.stack(real).max(0).values}[mode]
        rows.append(vector / vector.norm() if normalize else vector)
    return torch.stack(rows).numpy(), hidden.numpy(), batch


def test_task_detection_and_aliases():
    assert detect_task({"architectures": ["BertModel"]}) == "feature-extraction"
    assert detect_task({"architectures": ["GPT2LMHeadModel"]}) == "causal-lm"  # a head still wins
    assert resolve_task("sentence-embedding") == resolve_task("feature-extraction") == "feature-extraction"


@pytest.mark.parametrize("pooling", [PoolingSettings("mean", True), PoolingSettings("cls", False)])
def test_sentence_embedding_student_exports_with_parity_and_pools_in_the_pipeline(tmp_path, pooling):
    model, tokenizer = _save_headless(tmp_path / "student", pooling)
    result = export_onnx(tmp_path / "student", backend="torch", eval_dataset=[{"text": t} for t in TEXTS * 8])
    assert result.task == "feature-extraction" and result.pooling == pooling.to_dict()
    fp32, int8 = result.parity["fp32"], result.parity["int8"]
    assert fp32.passed and fp32.max_abs_diff <= 1e-4 * fp32.logit_scale
    assert int8.min_mean_cosine == 0.98 and int8.mean_cosine > 0.98 and result.int8_accepted
    info = json.loads((tmp_path / "student" / "onnx" / "export_info.json").read_text())
    assert info["pooling"] == pooling.to_dict()
    expected, hidden, batch = _torch_embeddings(model, tokenizer, TEXTS, pooling.mode, pooling.normalize)
    pipe = load_onnx_pipeline(tmp_path / "student" / "onnx", quantized=False)
    embeddings = pipe(TEXTS)
    assert embeddings.shape == (len(TEXTS), 64) and np.abs(embeddings - expected).max() <= 1e-5
    raw = pipe.run(**{k: v.numpy() for k, v in batch.items()})["last_hidden_state"]
    real = batch["attention_mask"].numpy() == 1
    assert np.abs(raw[real] - hidden[real]).max() <= 1e-4 * np.abs(hidden[real]).max()
    quantized = load_onnx_pipeline(tmp_path / "student" / "onnx")(TEXTS)
    cosines = (quantized * expected).sum(-1) / (np.linalg.norm(quantized, axis=-1) * np.linalg.norm(expected, axis=-1))
    assert cosines.min() > 0.98


def test_headless_model_without_pooling_gets_mean_pooling(tmp_path):
    model, tokenizer = _save_headless(tmp_path / "general")
    result = export_onnx(tmp_path / "general", backend="torch")  # built-in sample texts
    assert result.pooling is None and result.parity["fp32"].passed and result.parity["int8"].mean_cosine > 0.98
    expected, _, _ = _torch_embeddings(model, tokenizer, TEXTS, "mean", False)
    assert np.abs(load_onnx_pipeline(tmp_path / "general" / "onnx", quantized=False)(TEXTS) - expected).max() <= 1e-5


def test_int8_is_rejected_when_its_vectors_turn_away(tmp_path):
    _save_headless(tmp_path / "student", PoolingSettings("mean", True))
    result = export_onnx(tmp_path / "student", backend="torch", int8_min_cosine=1.0,
                         eval_dataset=[{"text": t} for t in TEXTS])
    assert not result.int8_accepted and result.rejected_int8_path.is_file()
    assert "int8_min_cosine (--int8_min_cosine)=1" in result.parity["int8"].problems[0]
    with pytest.raises(ValueError, match="int8_min_cosine"):
        ParityCriteria(int8_min_cosine=1.5)


def test_the_cosine_judge_reads_the_pooled_embeddings():
    """Two sentences; the second one's vectors negated: mean cosine (1 + (-1)) / 2 = 0, whatever the scale."""
    reference = np.array([[[1.0, 2.0, 3.0], [4.0, -1.0, 0.5], [9.0, 9.0, 9.0]],
                          [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [3.0, -3.0, 3.0]]])
    candidate = reference.copy()
    candidate[1] *= -1
    candidate[0, 2] = 0.0  # padding: ignored
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    tally = Tally()
    tally.add("feature-extraction", [reference], [candidate], mask)
    verdict = judge(tally, "int8", ParityCriteria(), "test", on_eval_set=True)
    assert verdict.mean_cosine == pytest.approx(0.0, abs=1e-12) and not verdict.passed
    # cls pooling reads the first token only: a change to the others does not count
    changed = reference.copy()
    changed[:, 1:] = -changed[:, 1:]
    for mode, expected in (("cls", 1.0), ("mean", None)):
        tally = Tally(pooling={"mode": mode, "normalize": True})
        tally.add("feature-extraction", [reference], [changed], mask)
        cosine = tally.cosine_sum / tally.vectors
        assert cosine == pytest.approx(expected, abs=1e-12) if expected else cosine < 0.9


def test_pool_numpy_by_hand():
    hidden = np.array([[[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 0.0], [2.0, 1.0], [5.0, -7.0]]])
    mask = np.array([[1, 1, 0], [0, 1, 1]])  # right padding, then left padding
    np.testing.assert_allclose(pool_numpy(hidden, mask, "mean"), [[2.0, 1.0], [3.5, -3.0]])
    np.testing.assert_allclose(pool_numpy(hidden, mask, "cls"), [[1.0, -2.0], [2.0, 1.0]])
    np.testing.assert_allclose(pool_numpy(hidden, mask, "max"), [[3.0, 4.0], [5.0, 1.0]])
    np.testing.assert_allclose(pool_numpy(hidden, mask, "mean", True), [[2 / 5 ** 0.5, 1 / 5 ** 0.5],
                                                                       [3.5 / 4.6097722, -3.0 / 4.6097722]], rtol=1e-6)


def test_a_classifier_still_exports_as_before(tmp_path):
    torch.manual_seed(0)
    tokenizer = synthetic_tokenizer()
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    result = export_onnx(tmp_path, backend="torch", quantize=False)
    assert result.task == "sequence-classification" and result.pooling is None
    assert result.parity["fp32"].mean_cosine is None


def test_export_script_takes_int8_min_cosine_and_prints_the_cosine(tmp_path, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    _save_headless(tmp_path / "student", PoolingSettings("mean", True))
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    path = Path(__file__).resolve().parents[1] / "scripts" / "export_onnx.py"
    spec = importlib.util.spec_from_file_location("export_onnx", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules["export_onnx"] = script
    spec.loader.exec_module(script)
    result = script.main(["--model_dir", str(tmp_path / "student"), "--backend", "torch", "--task", "feature-extraction",
                          "--eval_file", str(eval_file), "--int8_min_cosine", "1.0", "--batch_sizes", "1",
                          "--sequence_length", "16", "--runs", "3", "--warmup", "1"])
    assert not result.int8_accepted  # the flag reached the judge: no int8 file has cosine 1.0 exactly
    out = capsys.readouterr().out
    assert re.search(r"int8: mean cosine of sentence embeddings to PyTorch fp32 [01]\.\d{6}", out), out[:3000]
