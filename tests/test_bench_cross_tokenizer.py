"""Smoke test of benchmarks/bench_cross_tokenizer.py (``--quick``): both modes run and write their JSON."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import shared_data_dir
from single_thread import one_thread  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cross_tokenizer.py"
STORIES = shared_data_dir() / "models" / "stories260K"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cross_tokenizer", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="../shared/data is not staged")
def test_the_quick_benchmark_runs_both_modes(tmp_path):
    bench = _bench()
    data = ["--data", str(shared_data_dir()), "--quick"]
    assert bench.main([*data, "--runs", "hybrid", "--output", str(tmp_path / "runs.json")]) == 0
    report = json.loads((tmp_path / "runs.json").read_text())
    assert "hybrid" in report["summary"]
    assert 0 < report["summary"]["hybrid"]["bpc_mean"] < 20
    assert report["results"]["hybrid"][0]["cross_tokenizer"] is True
    assert bench.main([*data, "--speed", "--output", str(tmp_path / "speed.json")]) == 0
    speed = json.loads((tmp_path / "speed.json").read_text())["speed"]
    assert len(speed["seconds"]["same"]) == len(speed["seconds"]["cross"]) == speed["repeats"] == 2
    assert speed["ratio"] > 0 and math.isclose(speed["cost"], 1 / speed["ratio"] - 1, rel_tol=1e-9)
    assert speed["same_tokens_per_second"] > 0 and speed["cross_tokens_per_second"] > 0
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in speed["teacher_forward_seconds"].values())
