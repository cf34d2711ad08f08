"""Smoke tests of the benchmark scripts: each runs at tiny sizes (--quick) and its JSON is well formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_loss_memory.py"


@pytest.mark.skipif(not SCRIPT.exists(), reason="scripts/bench_loss_memory.py is not in this checkout")
def test_bench_loss_memory_quick(tmp_path: Path) -> None:
    output = tmp_path / "loss_memory.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--with_inplace_variant", "--output", str(output)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| naive |" in done.stdout and "| chunked-32 |" in done.stdout

    report = json.loads(output.read_text())
    assert {"config", "results", "goal", "grad_max_abs"} <= set(report)
    assert report["config"]["quick"] is True
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"naive", "chunked-32", "chunked-32-inplace"}
    expected = {"extra_peak_mb", "ratio_to_naive", "seconds", "loss", "loss_abs_diff", "grad_max_abs_diff",
                "extra_peak_without_grad_mb", "malloc", "chunk_size", "runs"}
    for row in rows.values():
        assert expected <= set(row)
        assert row["extra_peak_mb"] >= 0 and row["seconds"] > 0
    naive, chunked = rows["naive"], rows["chunked-32"]
    assert naive["ratio_to_naive"] == 1.0 and chunked["chunk_size"] == 32
    # Chunked and naive agree in value and gradient.
    assert abs(chunked["loss"] - naive["loss"]) <= 1e-5 * abs(naive["loss"])
    assert chunked["loss_abs_diff"] <= 1e-5 * abs(naive["loss"])
    assert report["grad_max_abs"] > 0
    for row in (chunked, rows["chunked-32-inplace"]):
        assert row["grad_max_abs_diff"] <= 1e-6 * report["grad_max_abs"] + 1e-12
        assert row["loss_abs_diff"] <= 1e-5 * abs(naive["loss"])
    # Chunking saves memory even at this size (naive holds several fp32 [N, V] intermediates at once).
    assert chunked["extra_peak_mb"] < naive["extra_peak_mb"]
    goal = report["goal"]["mmap"]
    assert {"target_ratio", "met", "best_shipped_variant", "best_inplace_variant", "inplace_met"} <= set(goal)
    assert goal["best_shipped_variant"] == "chunked-32" and goal["best_inplace_variant"] == "chunked-32-inplace"

