"""Smoke tests of the overhead and scaling benchmarks: each runs at tiny sizes (--quick), its JSON is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


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


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_what_if_matches_the_library_loss_and_gradient(temperature):
    """The fused KD + CE reference of bench_overhead.py (the speed-up it reports) computes the same thing."""
    import torch

    sys.path.insert(0, str(SCRIPTS))
    import bench_overhead
    from hf_distill.losses.logits import chunked_weighted_sums, hard_label_loss, soft_label_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(64, 50, dtype=torch.float64, generator=g), torch.randn(64, 50, dtype=torch.float64, generator=g)
    labels, weights = torch.randint(0, 50, (64,), generator=g), torch.rand(64, dtype=torch.float64, generator=g)
    labels[3] = -100

    def rows(x, t, y):
        return torch.stack([soft_label_loss(x, t, temperature=temperature), hard_label_loss(x, y)])

    x_lib, x_fused = student.clone().requires_grad_(), student.clone().requires_grad_()
    lib = chunked_weighted_sums(rows, (0.3, 0.7), x_lib, weights, teacher, labels, chunk_size=0)[0]
    fused = bench_overhead.FusedForwardKLAndCE.apply(x_fused, teacher, labels, weights, 0.3, temperature)[0]
    lib.backward()
    fused.backward()
    torch.testing.assert_close(fused, lib)
    torch.testing.assert_close(x_fused.grad, x_lib.grad)
