"""Preflight: the memory estimate against a measured peak, chance-level teachers, loss terms, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorWithPadding

from hf_distill.preflight import (
    MemoryEstimate,
    PreflightError,
    PreflightReport,
    available_memory_bytes,
    chance_level,
    compatibility_summary,
    configured_loss_terms,
    estimate_peak_memory,
    format_preflight_report,
    majority_fraction,
    saved_activation_bytes,
    teacher_is_at_chance,
)
from single_thread import one_thread  # noqa: F401  (autouse)
from tiny_models import sentiment_dataset, tiny_bert, tiny_gpt2

MiB = 1024**2


# Measured in a child process: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus the RSS before
# the models exist, over 2 DistillationTrainer steps (AdamW states exist from step 2 on). glibc would keep
# freed blocks in its heap (its mmap threshold grows with use), so RSS would overstate live memory; a fixed
# MALLOC_MMAP_THRESHOLD_ makes large tensors go back to the system when freed, and RSS tracks live tensors.
MEMORY_CASES = [
    # BERT classifier with BERT's vocabulary, hidden 64, 4 layers, batch 16 × 128 tokens (SDPA, dropout 0.1):
    # activations dominate; weights, AdamW states and the teacher are the rest.
    dict(kind="bert", hidden=64, layers=4, heads=4, vocab=30522, batch=16, seq=128),
    # GPT-2 LM, vocabulary 16384, batch 2 × 128: the [N, V] logits and loss buffers dominate.
    # (on the full-logit path: --fused_lm_loss false)
    dict(kind="gpt2", hidden=64, layers=2, heads=4, vocab=16384, batch=2, seq=128, fused="false"),
    # The same on the fused-linear path, batch 8: no [N, V] logits, one loss block; activations and weights dominate.
    dict(kind="gpt2", hidden=64, layers=2, heads=4, vocab=16384, batch=8, seq=128, fused="true"),
    # BERT with hidden-state and attention terms: a 2x wider, 8-head teacher returns its hidden states and
    # eager attention maps ([16, 8, 256, 256] per layer), the student's states go through projections.
    dict(kind="bert", hidden=64, layers=4, heads=8, vocab=8192, batch=16, seq=256, teacher_hidden=128,
         intermediate=True),
]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child_measure(case: dict) -> dict:
    """One case, in the child: returns measured and estimated bytes."""
    import gc

    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    from hf_distill import DistillationArguments, DistillationTrainer

    g = torch.Generator().manual_seed(0)
    batch, seq, vocab = case["batch"], case["seq"], case["vocab"]
    ids = torch.randint(5, vocab, (2 * batch, seq), generator=g)
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    columns["labels"] = torch.randint(0, 2, (2 * batch,), generator=g).tolist() if case["kind"] == "bert" else ids.tolist()
    data = Dataset.from_dict(columns).with_format("torch")
    gc.collect()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS

    def model(seed, hidden=None):
        torch.manual_seed(seed)
        h, n, a = hidden or case["hidden"], case["layers"], case["heads"]
        if case["kind"] == "bert":
            return BertForSequenceClassification(BertConfig(
                vocab_size=vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, intermediate_size=4 * h))
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=h, n_layer=n, n_head=a, n_positions=seq,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0))

    student, teacher = model(1), model(2, case.get("teacher_hidden"))
    terms = dict(hidden_weight=1.0, attention_weight=1.0) if case.get("intermediate") else {}
    args = DistillationArguments(output_dir="unused", per_device_train_batch_size=batch, max_steps=2, report_to=[],
                                 save_strategy="no", use_cpu=True, disable_tqdm=True, optim="adamw_torch",
                                 fused_lm_loss=case.get("fused", "auto"), **terms)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data)
    trainer.train()
    measured = _status_bytes("VmHWM") - before
    if case.get("intermediate"):  # the trainer's own estimate (its preflight), with the intermediate parts
        estimate = trainer.preflight_report.memory
        assert estimate.intermediate_outputs > 0
    else:
        estimate = estimate_peak_memory(student, teacher, batch_size=batch, seq_length=seq, optimizer="adamw_torch",
                                        fused_lm_loss=case.get("fused") == "true")
    return {"measured": measured, "estimate": estimate.as_dict()}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_memory_estimate_is_within_30_percent_of_the_measured_peak(tmp_path):
    out = tmp_path / "memory.json"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")  # 1 thread: fast on a busy machine
    subprocess.run([sys.executable, __file__, str(out)], check=True, env=env, cwd=Path(__file__).parent, timeout=300)
    for case, result in zip(MEMORY_CASES, json.loads(out.read_text())):
        measured, estimated = result["measured"], result["estimate"]["total"]
        assert measured > 100 * MiB, "the case must be large enough for tensors to dominate the measurement"
        ratio = estimated / measured
        assert 0.7 <= ratio <= 1.3, f"{case['kind']}: estimate {estimated / MiB:.0f} MiB vs measured {measured / MiB:.0f} MiB"


def test_estimate_parts_follow_the_models_and_settings():
    student, teacher = tiny_bert(layers=2, hidden=32), tiny_bert(layers=4, hidden=64)
    n_student = sum(p.numel() for p in student.parameters())
    base = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16)
    assert base.student_gradients == 4 * n_student
    assert base.optimizer_states == 8 * n_student  # AdamW: two fp32 states
    teacher_tensors = list(teacher.parameters()) + list(teacher.buffers())
    assert base.teacher_weights == sum(t.numel() * t.element_size() for t in teacher_tensors)
    assert base.activations > 0 and base.total == base.as_dict()["total"]
    assert estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, optimizer="sgd").optimizer_states == 0
    bf16 = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, teacher_dtype_bytes=2)
    assert bf16.teacher_weights == sum(t.numel() * (2 if t.is_floating_point() else 8) for t in teacher_tensors)
    offline = estimate_peak_memory(student, None, batch_size=4, seq_length=16)
    assert offline.teacher_weights == 0 and offline.teacher_forward == 0
    # Activations grow with the batch; accumulation keeps gradients resident beside them.
    double = estimate_peak_memory(student, teacher, batch_size=8, seq_length=16)
    assert double.activations == pytest.approx(2 * base.activations, rel=0.01)
    accumulated = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, gradient_accumulation_steps=4)
    assert accumulated.total - base.total == pytest.approx(min(base.student_gradients, base.activations + base.teacher_forward + base.logits_and_loss), rel=0.01)
    # Frozen student parameters have neither gradients nor optimizer states.
    student.bert.embeddings.requires_grad_(False)
    frozen = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16)
    assert frozen.student_gradients < base.student_gradients and frozen.student_weights == base.student_weights
    # The analytic rule lands in the same range as the probe.
    analytic = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, activation_method="analytic")
    assert 0.5 < analytic.activations / base.activations < 2.0


def test_intermediate_outputs_count_teacher_states_maps_and_projections():
    student, teacher = tiny_bert(layers=2, hidden=32), tiny_bert(layers=4, hidden=64)
    base = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16)
    assert base.intermediate_outputs == 0
    heads = teacher.config.num_attention_heads
    states = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, teacher_hidden_states=True)
    assert states.intermediate_outputs == 5 * 4 * 16 * 64 * 4  # (4 layers + embeddings) x b x s x h, fp32
    maps = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, teacher_attentions=True)
    assert maps.intermediate_outputs == 4 * 4 * heads * 16 * 16 * 4
    projection = torch.nn.Linear(32, 64)
    projected = estimate_peak_memory(student, teacher, batch_size=4, seq_length=16, projected_layers=2,
                                     extra_parameters=list(projection.parameters()))
    assert projected.intermediate_outputs == 2 * 4 * 16 * 64 * 4
    n_projection = sum(p.numel() for p in projection.parameters())
    assert projected.student_gradients - base.student_gradients == 4 * n_projection
    assert projected.total > base.total


def test_causal_lm_logits_scale_with_vocabulary_and_topk_cache():
    student = tiny_gpt2(vocab_size=64)
    full = estimate_peak_memory(student, tiny_gpt2(layers=3, vocab_size=64), batch_size=2, seq_length=32)
    assert full.logits_and_loss >= 2 * 32 * 64 * 8
    topk = estimate_peak_memory(student, None, batch_size=2, seq_length=32, cached_topk=4)
    assert topk.logits_and_loss < full.logits_and_loss


def test_activation_probe_leaves_rng_and_mode_untouched():
    model = tiny_bert()
    model.config.hidden_dropout_prob = 0.1
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1  # dropout draws random numbers: the probe must not move the RNG
    model.eval()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ids = torch.randint(0, 64, (1, 8))
    torch.manual_seed(123)
    assert saved_activation_bytes(model, {"input_ids": ids}) > 0
    torch.testing.assert_close(torch.rand(3), expected)
    assert not model.training


def test_available_memory_is_positive_and_below_the_total():
    available = available_memory_bytes("cpu")
    assert available is not None and available > 0
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert available <= total


def test_chance_level_and_majority():
    assert chance_level(4) == 0.25
    with pytest.raises(ValueError):
        chance_level(0)
    assert majority_fraction([0, 0, 0, 1, -100]) == 0.75
    assert majority_fraction([-100]) is None
    assert teacher_is_at_chance(0.51, 2)
    assert not teacher_is_at_chance(0.80, 2)
    assert teacher_is_at_chance(0.90, 2, majority_fraction=0.9)  # always predicting the majority class
    assert not teacher_is_at_chance(0.30, 10)


def test_an_untrained_teacher_is_at_chance_on_the_synthetic_task():
    data, tokenizer = sentiment_dataset(64, seed=3)
    teacher = tiny_bert(seed=7).eval()
    batch = DataCollatorWithPadding(tokenizer)([{"input_ids": ids} for ids in data["input_ids"]])
    with torch.no_grad():
        predictions = teacher(**batch).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(data["label"])).float().mean().item()
    report = PreflightReport(teacher_metric={"accuracy": accuracy}, num_labels=2,
                             majority=majority_fraction(data["label"]), loss_weights={"kd": 0.5, "ce": 0.5})
    assert report.teacher_at_chance()
    assert any("at chance" in w for w in report.warnings())
    assert "AT CHANCE" in report.format()


def test_report_flags_unused_terms_and_refuses_when_memory_does_not_fit():
    memory = MemoryEstimate(student_weights=100 * MiB, student_gradients=100 * MiB, optimizer_states=200 * MiB,
                            teacher_weights=300 * MiB, activations=400 * MiB, teacher_forward=10 * MiB,
                            logits_and_loss=1 * MiB, resident=400 * MiB)
    fields = dict(
        teacher_metric={"accuracy": 0.91}, num_labels=2, compatibility="2 labels (neg, pos); teacher label map [match]",
        loss_weights={"kd": 0.5, "ce": 0.5, "hidden": 1.0, "attention": 0.0},
        inactive_terms={"hidden": "teacher outputs are cached (logits only)"}, memory=memory,
    )
    text = format_preflight_report(**fields, available_bytes=64 * 1024 * MiB)
    assert text.startswith("=== hf_distill preflight ===")
    assert "accuracy 0.9100 [ok" in text
    assert "loss terms active: kd=0.5, ce=0.5" in text
    assert "!! configured but inactive: hidden=1" in text and "cached" in text
    assert "loss terms off (weight 0): attention" in text
    assert "[fits]" in text and "ERROR" not in text
    PreflightReport(**fields, available_bytes=64 * 1024 * MiB).check()

    small = PreflightReport(**fields, available_bytes=300 * MiB)
    assert memory.additional == memory.total - 400 * MiB
    assert "[EXCEEDS]" in small.format()
    with pytest.raises(PreflightError, match="Lower the batch size"):
        small.check()
    small.check(force=True)

    nothing = PreflightReport(loss_weights={"kd": 0.0, "ce": 0.0})
    with pytest.raises(PreflightError, match="No loss term is active"):
        nothing.check()
    assert isinstance(PreflightError("x"), ValueError)


def test_compatibility_summary():
    student, teacher = tiny_bert(), tiny_bert(layers=3)
    assert "[match]" in compatibility_summary(teacher, student, "sequence-classification")
    teacher.config.id2label = {0: "neg", 1: "pos"}
    assert "[MISMATCH]" in compatibility_summary(teacher, student, "sequence-classification")
    assert "vocabulary teacher 64 / student 64 [match]" in compatibility_summary(tiny_gpt2(), tiny_gpt2(), "causal-lm")
    assert "cached" in compatibility_summary(None, student, "sequence-classification")


# ---------------------------------------------------------------- the trainer's preflight
def _trainer(tmp_path, data=None, eval_data=None, teacher="random", **overrides):
    from hf_distill import DistillationTrainer
    from tiny_models import distill_args

    if data is None:
        data, _ = sentiment_dataset(32)
    _, tokenizer = sentiment_dataset(1)
    teacher_model = tiny_bert(layers=3, seed=2) if teacher == "random" else teacher
    args = distill_args(tmp_path, max_steps=2, **overrides)
    return DistillationTrainer(tiny_bert(seed=1), teacher_model, args, train_dataset=data, eval_dataset=eval_data,
                               processing_class=tokenizer)


def test_preflight_warns_about_an_untrained_teacher_in_one_block(tmp_path, caplog):
    data, _ = sentiment_dataset(32)
    trainer = _trainer(tmp_path, data, eval_data=data)
    with caplog.at_level("INFO", logger="hf_distill.trainer"):
        trainer.train()
    report = trainer.preflight_report
    assert report.teacher_at_chance() and report.num_labels == 2
    assert "eval set" in report.teacher_metric_source
    blocks = [r for r in caplog.records if "=== hf_distill preflight ===" in r.getMessage()]
    assert len(blocks) == 1 and blocks[0].levelname == "WARNING"
    text = blocks[0].getMessage()
    for line in ("[AT CHANCE]", "labels / vocabulary: 2 labels", "loss terms active: kd=0.5, ce=0.5", "memory estimate"):
        assert line in text
    assert trainer.state.global_step == 2  # a warning, not a refusal


def test_preflight_passes_a_teacher_that_knows_the_labels(tmp_path, caplog):
    from datasets import Dataset

    data, _ = sentiment_dataset(32)
    labels = torch.tensor(data["label"])
    oracle = (torch.nn.functional.one_hot(labels, 2).float() * 6 - 3).tolist()  # cached logits of a perfect teacher
    cached = data.add_column("teacher_logits", oracle)
    assert isinstance(cached, Dataset)
    trainer = _trainer(tmp_path, cached, eval_data=cached, teacher=None)
    with caplog.at_level("INFO", logger="hf_distill.trainer"):
        trainer.train()
    report = trainer.preflight_report
    assert report.teacher_metric == {"accuracy": 1.0} and not report.teacher_at_chance()
    assert not report.warnings() and "[ok" in report.format()
    assert all(r.levelname == "INFO" for r in caplog.records if "preflight" in r.getMessage())


def test_preflight_reports_unused_and_zero_weight_terms(tmp_path):
    data, _ = sentiment_dataset(32)
    unlabelled = _trainer(tmp_path / "a", data.remove_columns("label"))
    assert configured_loss_terms(unlabelled.args) == {"kd": 0.5, "ce": 0.5, "hidden": 0.0, "attention": 0.0, "relation": 0.0}
    unlabelled.train()
    report = unlabelled.preflight_report
    assert set(report.unused_terms()) == {"ce"} and report.active_terms() == {"kd": 0.5}
    assert "!! configured but inactive: ce=0.5 (no labels" in report.format()
    assert any("'ce' has weight 0.5 but will not run" in w for w in report.warnings())

    pure_kd = _trainer(tmp_path / "b", data, alpha=1.0)
    pure_kd.train()
    assert "loss terms off (weight 0): ce" in pure_kd.preflight_report.format()

    hard_only_without_labels = _trainer(tmp_path / "c", data.remove_columns("label"), alpha=0.0)
    with pytest.raises(PreflightError, match="No loss term is active"):
        hard_only_without_labels.train()
    assert hard_only_without_labels.state.global_step == 0


def test_preflight_refuses_when_memory_does_not_fit_unless_forced(tmp_path, monkeypatch):
    import hf_distill.preflight as preflight_module

    monkeypatch.setattr(preflight_module, "available_memory_bytes", lambda device=None: 1024)
    refused = _trainer(tmp_path / "a")
    with pytest.raises(PreflightError, match="estimated peak memory .* only 0.0 MiB is available"):
        refused.train()
    assert refused.state.global_step == 0
    forced = _trainer(tmp_path / "b", preflight_force=True)
    forced.train()
    assert forced.state.global_step == 2 and forced.preflight_report.memory_exceeded()
    off = _trainer(tmp_path / "c", preflight=False)
    off.train()
    assert off.preflight_report is None and off.state.global_step == 2


def test_preflight_leaves_training_unchanged(tmp_path):
    from tiny_models import distill_args

    weights = {}
    for preflight in (True, False):
        data, tokenizer = sentiment_dataset(32)
        student = tiny_bert(seed=1)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1  # the memory probe runs the student in training mode: RNG must be untouched
        from hf_distill import DistillationTrainer

        args = distill_args(tmp_path / str(preflight), max_steps=3, preflight=preflight, per_device_train_batch_size=4)
        trainer = DistillationTrainer(student, tiny_bert(layers=3, seed=2), args, train_dataset=data,
                                      eval_dataset=data, processing_class=tokenizer)
        trainer.train()
        weights[preflight] = trainer.model.state_dict()
    for name, value in weights[True].items():
        torch.testing.assert_close(value, weights[False][name], msg=name)


if __name__ == "__main__":  # the child of the memory test: measure every case, write JSON
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results = []
    for case in MEMORY_CASES:
        import gc

        gc.collect()
        results.append(_child_measure(case))
    Path(sys.argv[1]).write_text(json.dumps(results))


def test_on_policy_memory_counts_the_completion_the_student_will_generate(tmp_path):
    from datasets import Dataset

    from hf_distill import DistillationArguments, DistillationTrainer
    from hf_distill.preflight import _memory_estimate

    ids = torch.randint(5, 64, (4, 8)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 8] * 4, "labels": ids,
                              "prompt_length": [4] * 4})
    estimates = {}
    for lmbda in (0.0, 1.0):
        args = DistillationArguments(output_dir=str(tmp_path / str(lmbda)), report_to=[], use_cpu=True, lmbda=lmbda,
                                     max_completion_length=56, per_device_train_batch_size=2)
        trainer = DistillationTrainer(tiny_gpt2(seed=1), tiny_gpt2(), args, train_dataset=data)
        estimates[lmbda] = _memory_estimate(trainer, None)
    # 8 tokens per row off-policy; 8 + 56 = 64 on-policy: activations grow with the length (8x, attention more).
    assert estimates[1.0].activations > 6 * estimates[0.0].activations
