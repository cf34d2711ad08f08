"""Smoke tests of the overhead and scaling benchmarks: each runs at tiny sizes (--quick), its JSON is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_overhead_quick(tmp_path: Path) -> None:
    output = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_overhead.py"), "--quick", "--pairs", "causal-lm",
                           "--output", str(output)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| pair | (a) student, hard labels |" in done.stdout and "| causal-lm |" in done.stdout
    report = json.loads(output.read_text())
    assert report["config"]["quick"] is True and report["goals"] == {"online_logits": 0.9, "offline": 0.95}
    for name in ("causal-lm",):  # the encoder pair runs the same code, with full cached logits
        result = report["results"][name]
        steps = result["step_ms"]
        assert {"a_student_hard_labels", "b_teacher_forward", "c_online_logits", "d_offline_cache"} <= set(steps)
        assert all(v > 0 for v in steps.values())
        floor = steps["a_student_hard_labels"] + steps["b_teacher_forward"]
        assert result["ratios"]["online_logits"] == pytest.approx(floor / steps["c_online_logits"], rel=1e-3)
        assert result["ratios"]["offline"] == pytest.approx(
            steps["a_student_hard_labels"] / steps["d_offline_cache"], rel=1e-3)
        assert len(result["samples_ms"]["c_online_logits"]) == 3  # quick: 1 warm-up + 3 timed steps


def test_bench_scaling_quick(tmp_path: Path) -> None:
    output = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_scaling.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    rows = report["results"]
    assert set(rows) == {"1 proc x 1 thread", "2 proc x 1 thread"}  # quick leaves the threads layout out
    assert rows["2 proc x 1 thread"]["global_batch"] == 2 * rows["1 proc x 1 thread"]["global_batch"]
    assert rows["1 proc x 1 thread"]["speedup"] == 1.0
    assert report["allreduce_ms"] is not None and report["allreduce_ms"] > 0
    assert "| 2 proc x 1 thread |" in done.stdout


def test_loss_profile_times_every_variant_and_checks_fused_against_generic():
    """bench_overhead.py --loss_profile: the fused losses it times give the generic path's loss and gradient
    (loss_profile asserts it), and every variant gets a time."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_overhead

    pair = dict(kind="gpt2", batch=2, seq=16, vocab=64, top_k=5)
    result = bench_overhead.loss_profile(pair, repeats=1)
    assert result["rows"] == 32 and result["width"] == 64
    assert set(result["forward_backward_ms"]) == {
        "a_hard_label_ce", "generic_kd_plus_ce", "fused_kd_plus_ce", "generic_topk_kd_plus_ce", "fused_topk_kd_plus_ce"
    }
    assert all(ms > 0 for ms in result["forward_backward_ms"].values())
