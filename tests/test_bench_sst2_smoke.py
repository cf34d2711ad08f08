"""Smoke test of the SST-2 benchmark script: ``--quick`` runs every group on a few rows and reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_sst2.py"
DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not (DATA / "sst2" / "train.jsonl").is_file(), reason="../shared/data/sst2 is not staged here")
def test_bench_sst2_quick(tmp_path: Path) -> None:
    output = tmp_path / "sst2.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--max_train_rows", "64", "--max_eval_rows", "32", "--teacher_seeds", "0", "1",
         "--skip_tfidf", "--threads", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| teacher (seed 0" in done.stdout and "hard labels only" in done.stdout

    report = json.loads(output.read_text())
    assert output.with_suffix(".md").read_text().startswith("SST-2")
    keys = [row["key"] for row in report["students"]]
    assert keys == ["a_hard", "a_kd", "b_hard", "b_kd", "c_ens"]
    for row in report["students"]:
        assert 0.0 <= row["test"]["mean"] <= 1.0 and row["test_retention"] > 0
        assert row["seeds"] == [0]
    assert set(report["goals"]) == {"a", "b", "c"}
    assert all(isinstance(goal["met"], bool) for goal in report["goals"].values())
    # Sizes: the narrow student is narrower, the copied one shares the embeddings; latency was measured.
    sizes = report["parameters"]
    assert sizes["narrow"]["total"] < sizes["copied"]["total"] < sizes["teacher"]["total"]
    assert all(report["latency_ms"][m]["batch_32"] > 0 for m in ("teacher", "copied", "narrow"))
    assert len(report["teachers"]) == 2 and report["teacher_ensemble"] is not None
