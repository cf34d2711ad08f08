"""Smoke test of benchmarks/bench_onpolicy.py: one quick run per trainer, in this process (a few seconds each).

Our side always runs; TRL's stable DistillationTrainer runs where it imports (it is not a dependency: put it on
PYTHONPATH, e.g. ``PYTHONPATH=.:/tmp/trl``).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from single_thread import one_thread  # noqa: E402,F401  (autouse)


@pytest.fixture(scope="module")
def bench():
    import bench_onpolicy

    return bench_onpolicy


def test_runs_alternate_and_each_pair_shares_a_seed(bench) -> None:
    args = bench.parse_args(["--trainers", "ours", "--repeats", "3"])
    args.trainers = ["ours", "trl"]
    plan = [(r["trainer"], r["seed"]) for r in bench.planned_runs(args)]
    assert plan == [("ours", 0), ("trl", 0), ("trl", 1), ("ours", 1), ("ours", 2), ("trl", 2)]


def test_quick_runs_measure_the_same_quantities_for_both_trainers(bench, tmp_path) -> None:
    from conftest import shared_data_dir

    stories = shared_data_dir() / "models" / "stories260K"
    if not (stories / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found in {stories}")
    args = bench.parse_args(["--quick", "--trainers", "ours", "--model_dir", str(stories),
                             "--cache_dir", str(tmp_path / "cache")])
    args.trainers = ["ours"] + (["trl"] if bench.trl_available() else [])
    data = bench.prepare_data(args)
    assert data["heldout_examples"] == len(bench.HELDOUT_OPENINGS) and len(data["prompts"]) == 6
    runs = [dict(spec, result=bench.run_worker(spec, args, data)) for spec in bench.planned_runs(args)]
    for run in runs:
        r = run["result"]
        assert r["steps"] == 3 and r["generations"] == 3, run["trainer"]  # one generation per step (batch 2)
        assert 3 * 2 <= r["generated_tokens"] <= 3 * 2 * 8  # 1..8 new tokens per completion
        assert r["trained_tokens"] > r["generated_tokens"]  # prompts are trained on as context too
        expected = (r["generated_tokens"] + r["trained_tokens"]) / r["loop_seconds"]
        assert r["tokens_per_second"] == pytest.approx(expected)
        assert 0 < r["generation_share"] < 1 and r["peak_rss_mb"] > 0
        assert math.isfinite(r["heldout"]["kl"]) and r["heldout"]["kl"] > 0 and r["heldout"]["tokens"] > 0
    report = {"runs": runs, "summary": bench.summarise(runs)}
    table = bench.markdown_table(report)
    assert "| 0 | ours | 0 |" in table
    if "trl" in args.trainers:
        assert "Paired (ours / TRL" in table and "| 0 | trl | 0 |" in table
