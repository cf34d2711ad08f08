"""Smoke test of benchmarks/bench_pretrained.py (``--quick``: random tiny BERT), its resume, and its helpers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_pretrained.py"
DATA = REPO.parent / "shared" / "data"
STAGED = (DATA / "sst2" / "train.jsonl").is_file() and (DATA / "models" / "all-MiniLM-L6-v2" / "tokenizer.json").is_file()


def _module():
    spec = importlib.util.spec_from_file_location("bench_pretrained", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(tmp_path / "p.json"), "--work_dir",
         str(tmp_path / "w"), *extra], capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)


@pytest.mark.skipif(not STAGED, reason="../shared/data (SST-2 and the MiniLM tokenizer) is not staged here")
def test_quick_run_reports_every_group_and_resumes(tmp_path: Path) -> None:
    done = _run(tmp_path, "--only", "a,b,b_before,c,d,latency", "--try", "soft:hidden_weight=0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "p.json").read_text())
    names = sorted({run["name"] for run in report["runs"].values()})
    assert names == ["a_hard", "a_kd", "a_try_soft", "b_after", "b_kd", "c_general", "c_hard", "c_kd", "d_a", "d_b",
                     "d_c"]
    after = next(run for run in report["runs"].values() if run["name"] == "b_after")  # (a)'s KD student, trimmed
    assert after["recipe"]["trim"] == "after training" and after["recipe"]["from"].endswith("a_kd-s3-seed0")
    assert "hidden_weight" not in report["runs"][next(k for k in report["runs"] if k.startswith("a_try_soft"))]["recipe"] \
        or report["runs"][next(k for k in report["runs"] if k.startswith("a_try_soft"))]["recipe"]["hidden_weight"] == 0
    params = report["latency"]["parameters"]
    # (b) keeps (a)'s blocks with a smaller vocabulary; (c) is narrower still.
    assert params["b"]["non_embedding"] == params["a"]["non_embedding"]
    assert params["c"]["total"] < params["b"]["total"] < params["a"]["total"] < params["teacher"]["total"]
    assert report["trim"]["kept"] < report["trim"]["original"]
    assert all(report["latency"][f"batch_{b}"][m]["p90"] >= report["latency"][f"batch_{b}"][m]["median"] > 0
               for b in (1, 32) for m in ("teacher", "a", "b", "c"))
    assert all(0 <= g["test"]["mean"] <= 1 for g in report["groups"].values())
    markdown = (tmp_path / "p.md").read_text()
    assert "(a) 3-layer copied student, KD" in markdown and "Int8 ONNX" in markdown and "Goals (issue 11)" in markdown

    again = _run(tmp_path, "--only", "a,b,b_before")  # resumed: every run of (a) and (b) is read back, none retrained
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished earlier") == 4
    assert json.loads((tmp_path / "p.json").read_text())["runs"] == report["runs"]


@pytest.mark.skipif(not STAGED, reason="../shared/data (SST-2 and the MiniLM tokenizer) is not staged here")
def test_quick_embedding_group_reports_held_out_and_training_sentence_cosines(tmp_path: Path) -> None:
    done = _run(tmp_path, "--only", "e")
    assert done.returncode == 0, done.stderr[-3000:]
    models = json.loads((tmp_path / "p.json").read_text())["embeddings"]["models"]
    full, trimmed = models["e_3layer"], models["e_3layer_trimmed"]
    assert all(-1 <= m[k] <= 1 for m in (full, trimmed) for k in ("mean_cosine", "train_mean_cosine"))
    # trimmed on the training sentences, the student embeds them exactly as before: same cosine there, not held out
    assert trimmed["train_mean_cosine"] == pytest.approx(full["train_mean_cosine"], abs=1e-6)
    assert trimmed["mean_cosine"] != pytest.approx(full["mean_cosine"], abs=1e-6)
    assert "(on the training sentences)" in (tmp_path / "p.md").read_text()


def test_store_merges_runs_and_cached_run_skips_finished_ones(tmp_path: Path) -> None:
    bench = _module()
    store = bench.Store(tmp_path / "r.json")
    ctx = type("Ctx", (), {})()
    ctx.store, ctx.data_recipe = store, {"data": "x"}
    calls = []

    def run() -> dict:
        calls.append(1)
        return {"accuracy": {"test": 0.5}}

    first = bench.cached_run(ctx, "a_kd", 0, {"alpha": 0.9}, run)
    second = bench.cached_run(ctx, "a_kd", 0, {"alpha": 0.9}, run)
    bench.cached_run(ctx, "a_kd", 0, {"alpha": 0.5}, run)  # another recipe: a new run
    assert len(calls) == 2 and first == second
    assert len(bench.Store(tmp_path / "r.json").read()["runs"]) == 2


def test_parse_try() -> None:
    bench = _module()
    assert bench.parse_try("t4:temperature=4.0,alpha=1,hidden_loss=cosine") == (
        "t4", {"temperature": 4.0, "alpha": 1, "hidden_loss": "cosine"})
    with pytest.raises(SystemExit, match="NAME:key=value"):
        bench.parse_try("nothing")


def test_pca_init_projects_the_teacher_embeddings_on_their_top_components() -> None:
    bench = _module()
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))
    student = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=4, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=8))
    bench.pca_init(student, teacher)
    words = teacher.bert.embeddings.word_embeddings.weight.detach().double().numpy()
    _, _, vt = np.linalg.svd(words - words.mean(0), full_matrices=False)
    projector = vt[:4].T @ vt[:4]  # sign-free: V_k V_k^T
    for name in ("word_embeddings", "position_embeddings"):
        t = getattr(teacher.bert.embeddings, name).weight.detach().double().numpy()
        s = getattr(student.bert.embeddings, name).weight.detach().double().numpy()
        np.testing.assert_allclose(s @ s.T, t @ projector @ t.T, atol=1e-4)
