"""Smoke tests of the benchmark scripts: each runs at tiny sizes (--quick) and its JSON is well formed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loss_memory.py"


def test_bench_loss_memory_quick(tmp_path: Path) -> None:
    output = tmp_path / "loss_memory.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| naive |" in done.stdout and "| chunked-32 |" in done.stdout

    report = json.loads(output.read_text())
    assert {"config", "results", "goal", "grad_max_abs"} <= set(report)
    assert report["config"]["quick"] is True
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"naive", "chunked-32", "fused-32"}
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
    for row in (chunked, rows["fused-32"]):
        assert row["grad_max_abs_diff"] <= 1e-6 * report["grad_max_abs"] + 1e-12
        assert row["loss_abs_diff"] <= 1e-5 * abs(naive["loss"])
    # Chunking saves memory even at this size (naive holds several fp32 [N, V] intermediates at once).
    assert chunked["extra_peak_mb"] < naive["extra_peak_mb"]
    goal = report["goal"]["mmap"]
    assert {"target_ratio", "met", "best_shipped_variant", "best_fused_variant", "fused_met"} <= set(goal)
    assert goal["best_shipped_variant"] == "chunked-32" and goal["best_fused_variant"] == "fused-32"



# ---------------------------------------------------------------------------------------------- bench_causal_lm
def _bench_causal_lm():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_causal_lm

    return bench_causal_lm


def test_topk_loss_gap_is_nonnegative_shrinks_with_k_and_vanishes_at_full_vocabulary() -> None:
    import torch
    from tiny_models import lm_dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = _bench_causal_lm()

    def llama(seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=64)
        return LlamaForCausalLM(config).eval()

    class PadOnly:
        pad_token_id, eos_token_id, padding_side = 1, 1, "right"

    gaps = bench.topk_loss_gap(llama(1), llama(2), lm_dataset(12), PadOnly(), ks=[2, 8, 32, 64], temperature=2.0)
    values = [gaps[k]["gap"] for k in (2, 8, 32, 64)]
    assert all(v >= -1e-6 for v in values)  # coarsening never increases the divergence
    assert values == sorted(values, reverse=True) and values[0] > 1e-3
    assert abs(values[-1]) < 1e-4  # k = V: the top-k loss is the full loss
    assert len({round(g["full"], 6) for g in gaps.values()}) == 1


def test_planned_runs_expand_topk() -> None:
    bench = _bench_causal_lm()
    args = bench.parse_args([])
    runs = bench.planned_runs(args)
    methods = [r["method"] for r in runs if r["student"] == "layers"]
    assert methods == ["init", "sft", "fkl", "rkl", "jsd", "topk32", "topk8", "topk128", "onpolicy_jsd"]
    assert {r["student"] for r in runs} == {"layers", "narrow"}
    pairs = bench.planned_trl_pairs(args)
    assert [p["method"] for p in pairs[:4]] == ["jsd", "trl_jsd", "trl_jsd", "jsd"]  # order alternates


def test_on_policy_token_count_follows_the_generated_batch() -> None:
    import torch

    bench = _bench_causal_lm()

    class FakeTrainer:
        def on_policy_inputs(self, model, inputs):
            return {"attention_mask": torch.ones(2, 10)}

    counter = bench.CountingCollator(lambda features: {"attention_mask": torch.ones(2, 4)})
    trainer = FakeTrainer()
    bench.count_on_policy_tokens(trainer, counter)
    batch = counter([{}, {}])
    trainer.on_policy_inputs(None, batch)
    assert counter.tokens == 20 and counter.on_policy_steps == 1  # 8 collated, replaced by 20 generated
