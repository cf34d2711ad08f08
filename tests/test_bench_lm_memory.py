"""Smoke tests of benchmarks/bench_lm_memory.py's helpers, in-process at tiny sizes (the benchmark itself is not run)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lm_memory.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_lm_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loss_and_grads(bench, variant, **options):
    x = bench.make_inputs(24, 8, 50, seed=3)
    loss = bench.step_loss(variant, x, temperature=2.0, alpha=0.25, chunk_size=5, **options)
    loss.backward()
    return float(loss.detach()), x["student_hidden"].grad, x["student_weight"].grad


def test_variants_compute_the_loss_they_claim(bench):
    x = bench.make_inputs(24, 8, 50, seed=3)
    z_s, z_t = x["student_hidden"] @ x["student_weight"].T, x["teacher_hidden"] @ x["teacher_weight"].T
    p, log_q = F.softmax(z_t / 2.0, -1), F.log_softmax(z_s / 2.0, -1)
    kd = (p * (p.log() - log_q)).sum(-1)  # per token, by hand
    ce = -F.log_softmax(z_s, -1).gather(-1, x["labels"][:, None]).squeeze(-1)
    mix = (0.25 * 4.0 * kd + 0.75 * ce).mean()
    reference = torch.autograd.grad(mix, [x["student_hidden"], x["student_weight"]])
    for variant in ("naive", "current", "fused"):
        value, grad_h, grad_w = _loss_and_grads(bench, variant)
        assert value == pytest.approx(float(mix.detach()), rel=1e-5)
        torch.testing.assert_close(grad_h, reference[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_w, reference[1], atol=1e-6, rtol=1e-5)
    value, _, _ = _loss_and_grads(bench, "fused_kd")
    assert value == pytest.approx(float(kd.mean().detach()), rel=1e-5)  # TRL's loss: mean KL, no T², no CE
    with pytest.raises(ValueError, match="unknown variant"):
        _loss_and_grads(bench, "liger")


def test_naive_extrapolation(bench):
    assert bench.measured_rows(4096, 32000, 1 << 28) == [4096]
    assert bench.measured_rows(4096, 32000, 0) == [4096]
    assert bench.measured_rows(4096, 128256, 1 << 28) == [1046, 2092]  # 2^28 // 128256 = 2092
    assert bench.extrapolate([(1000, 10.0), (2000, 18.0)], 4000) == pytest.approx(34.0)
    assert bench.extrapolate([(4096, 7.0)], 4096) == 7.0


def _row(variant, extra, seconds, kind="mix"):
    return {"vocab": 32000, "variant": variant, "loss_kind": kind, "measured_tokens": [4096], "extrapolated": False,
            "extra_peak_mb": extra, "seconds": seconds, "loss": 1.0, "grad_file": None, "runs": {}}


def test_summary_goals_and_table(bench):
    rows = [_row("naive", 1000.0, 10.0), _row("fused", 90.0, 4.0), _row("fused_kd", 80.0, 3.0, "kd"),
            _row("trl", 100.0, 3.3, "kd")]
    bench.summarise(rows)
    fused, kd = rows[1], rows[2]
    assert fused["ratio_to_naive"] == pytest.approx(0.09) and kd["ratio_to_trl"] == pytest.approx(0.8)
    assert kd["speed_vs_trl"] == pytest.approx(1.1)
    goal = bench.goals(rows)["32000"]
    assert goal == {"naive_ratio_limit": 0.10, "fused_vs_naive_met": True, "fused_kd_vs_trl_memory_met": True,
                    "fused_kd_vs_trl_speed_met": True}
    rows[1]["extra_peak_mb"] = 110.0
    bench.summarise(rows)
    assert bench.goals(rows)["32000"]["fused_vs_naive_met"] is False
    table = bench.markdown_table(rows)
    assert "| 32,000 | fused | mix | 110 | 0.110 | 1.100 | 4.00 | 0.82 |" in table


def test_worker_reports_one_measurement(bench):
    args = argparse.Namespace(threads=1, temperature=2.0, alpha=0.5, chunk_size=8, variant="fused", hidden=8,
                              vocab=40, tokens=16, seed=0, save_grad=None)
    result = bench.run_worker(args)
    assert set(result) == {"extra_peak_mb", "seconds", "loss", "peak_reset"}
    assert result["extra_peak_mb"] >= 0 and result["seconds"] > 0 and result["loss"] > 0
