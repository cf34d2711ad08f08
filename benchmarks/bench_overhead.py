#!/usr/bin/env python
"""Distillation overhead against its floor: steps/s of four runs on the same batches, in one process.

    (a) the student fine-tuned on hard labels (stock `transformers.Trainer`, the model's own loss)
    (b) the teacher's forward alone (inference_mode, over the same collated batches)
    (c) online distillation (`DistillationTrainer` with the teacher): logits only, and with hidden +
        attention terms when the trainer has them (`hidden_weight` / `attention_weight` arguments)
    (d) offline distillation from the cache (`cache_teacher_outputs`: full logits for the encoder pair,
        top-k for the causal-LM pair)

Online distillation cannot take less than a student step plus a teacher forward, offline not less than
a student step, so with step times t:

    c / (a + b) = (t_a + t_b) / t_c   (goal >= 0.90, logits only)      d / a = t_a / t_d   (goal >= 0.95)

A step time is the wall time between two consecutive ``on_step_end`` events (data loading, forward,
backward, optimizer: everything the loop does), after warm-up steps. The variants are interleaved
(a, b, c, d, a, b, ...) for ``--repeats`` rounds so that load from other processes spreads evenly, and the
reported figure is the median over all timed steps of all rounds.

    python benchmarks/bench_overhead.py --output runs/bench_overhead.json
    python benchmarks/bench_overhead.py --quick            # seconds, for the smoke test
    python benchmarks/bench_overhead.py --profile          # also: where the time of (c) goes, per op
    python benchmarks/bench_overhead.py --loss_profile     # also: the logits loss alone, generic and fused
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional, Sequence  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_distill import DistillationArguments, DistillationTrainer, cache_teacher_outputs  # noqa: E402

GOALS = {"online_logits": 0.90, "offline": 0.95}

# Sizes: the teacher about 4x the student's depth and 2x its width, as in DistilBERT/TinyBERT recipes.
PAIRS = {
    "encoder": dict(kind="bert", teacher=dict(layers=6, hidden=256), student=dict(layers=2, hidden=128),
                    vocab=8192, num_labels=2, batch=16, seq=128, examples=256, top_k=None),
    "causal-lm": dict(kind="gpt2", teacher=dict(layers=6, hidden=256), student=dict(layers=2, hidden=128),
                      vocab=8192, batch=8, seq=128, examples=128, top_k=32),
}
QUICK = dict(teacher=dict(layers=2, hidden=64), student=dict(layers=1, hidden=32), vocab=256, batch=4, seq=16,
             examples=32)


# ------------------------------------------------------------------------------------------------ models, data
def build_model(pair: dict, role: str, attn: str = "eager") -> torch.nn.Module:
    size = pair[role]
    torch.manual_seed(0 if role == "teacher" else 1)
    if pair["kind"] == "bert":
        config = BertConfig(vocab_size=pair["vocab"], hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                            num_attention_heads=4, intermediate_size=4 * size["hidden"], num_labels=pair["num_labels"],
                            max_position_embeddings=max(pair["seq"], 64))
        model = BertForSequenceClassification(config)
    else:
        config = GPT2Config(vocab_size=pair["vocab"], n_embd=size["hidden"], n_layer=size["layers"], n_head=4,
                            n_positions=max(pair["seq"], 64), bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = GPT2LMHeadModel(config)
    model.config._attn_implementation = attn  # eager: attention weights exist for the attention term
    return model


def build_dataset(pair: dict) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, pair["vocab"], (pair["examples"], pair["seq"]), generator=g)
    columns = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    if pair["kind"] == "bert":
        columns["labels"] = torch.randint(0, pair["num_labels"], (pair["examples"],), generator=g).tolist()
    else:
        columns["labels"] = ids.tolist()
    return Dataset.from_dict(columns)


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Every example has the same length: stack each column (cached teacher columns included)."""
    return {key: torch.tensor([f[key] for f in features]) for key in features[0]}


# ------------------------------------------------------------------------------------------------ timing
class StepTimer(TrainerCallback):
    """Wall time between consecutive on_step_end events (the first interval starts at on_train_begin)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: Optional[float] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def common_args(out: str, pair: dict, steps: int) -> dict[str, Any]:
    return dict(output_dir=out, per_device_train_batch_size=pair["batch"], max_steps=steps, learning_rate=1e-4,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, remove_unused_columns=False)


def run_trainer(kind: str, pair: dict, data: Dataset, steps: int, extra: Optional[dict] = None) -> list[float]:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        if kind == "student":
            args = TrainingArguments(**common_args(out, pair, steps))
            trainer = Trainer(build_model(pair, "student"), args, train_dataset=data, data_collator=collate,
                              callbacks=[timer])
        else:
            teacher = build_model(pair, "teacher") if kind == "online" else None
            args = DistillationArguments(**common_args(out, pair, steps), preflight=False, save_on_signal=False,
                                         temperature=1.0, **(extra or {}))
            trainer = DistillationTrainer(build_model(pair, "student"), teacher, args, train_dataset=data,
                                          data_collator=collate, callbacks=[timer])
        trainer.train()
    return timer.times


def run_teacher_forward(pair: dict, data: Dataset, steps: int) -> list[float]:
    """The teacher over the same batches as the trainers (same sampler seed), data loading included."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**common_args(out, pair, steps))
        loader = Trainer(build_model(pair, "student"), args, train_dataset=data,
                         data_collator=collate).get_train_dataloader()
    teacher = build_model(pair, "teacher").eval()
    times, batches = [], iter(loader)
    last = time.perf_counter()
    for _ in range(steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        with torch.inference_mode():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def bench_pair(name: str, pair: dict, steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    data = build_dataset(pair)
    teacher = build_model(pair, "teacher").eval()
    cached = cache_teacher_outputs(teacher, data, batch_size=pair["batch"], top_k=pair["top_k"],
                                   temperature=1.0, pad_token_id=1)
    del teacher
    intermediate = {"hidden_weight": 1.0, "attention_weight": 1.0}
    variants: dict[str, Callable[[], list[float]]] = {
        "a_student_hard_labels": lambda: run_trainer("student", pair, data, steps + warmup),
        "b_teacher_forward": lambda: run_teacher_forward(pair, data, steps + warmup),
        "c_online_logits": lambda: run_trainer("online", pair, data, steps + warmup),
        "d_offline_cache": lambda: run_trainer("offline", pair, cached, steps + warmup),
        "c_online_hidden_attention": lambda: run_trainer("online", pair, data, steps + warmup, intermediate),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for round_ in range(repeats):
        for key, run in variants.items():
            times = run()[warmup:]
            samples[key] += times
            print(f"  [{name}] round {round_ + 1}/{repeats} {key}: median {statistics.median(times) * 1e3:.1f} ms/step",
                  flush=True)
    median = {k: statistics.median(v) for k, v in samples.items()}
    t_a, t_b = median["a_student_hard_labels"], median["b_teacher_forward"]
    ratios = {
        "online_logits": (t_a + t_b) / median["c_online_logits"],
        "offline": t_a / median["d_offline_cache"],
        "online_hidden_attention": (t_a + t_b) / median["c_online_hidden_attention"],
    }
    return {
        "pair": {k: v for k, v in pair.items()},
        "step_ms": {k: round(v * 1e3, 3) for k, v in median.items()},
        "steps_per_s": {k: round(1.0 / v, 3) for k, v in median.items()},
        "floor_online_ms": round((t_a + t_b) * 1e3, 3),
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "goals_met": {k: ratios[k] >= goal for k, goal in GOALS.items()},
        "samples_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in samples.items()},
    }


# ------------------------------------------------------------------------------------------------ profile
def profile_online(pair: dict, steps: int) -> dict[str, Any]:
    """torch.profiler over (c) and over (a) + (b): self CPU time per op, and the ops (c) spends more on."""
    from torch.profiler import ProfilerActivity, profile

    data = build_dataset(pair)

    def ops(fn: Callable[[], Any]) -> dict[str, float]:
        fn()  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}  # ms

    online = ops(lambda: run_trainer("online", pair, data, steps))
    student = ops(lambda: run_trainer("student", pair, data, steps))
    teacher = ops(lambda: run_teacher_forward(pair, data, steps))
    floor = {k: student.get(k, 0.0) + teacher.get(k, 0.0) for k in set(student) | set(teacher)}
    extra = sorted(((k, online.get(k, 0.0) - floor.get(k, 0.0)) for k in set(online) | set(floor)),
                   key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "total_ms": {"online": round(sum(online.values()), 1), "floor": round(sum(floor.values()), 1)},
        "top_online_ops_ms": [(k, round(v, 2)) for k, v in sorted(online.items(), key=lambda kv: -kv[1])[:15]],
        "extra_over_floor_ms": [(k, round(v, 2)) for k, v in extra[:15]],
    }


# ------------------------------------------------------------------------------------------------ loss profile
def loss_profile(pair: dict, repeats: int = 5) -> dict[str, Any]:
    """Forward + backward time of the logits loss alone on a batch of this pair: the hard-label CE of (a),
    the generic chunked soft + hard terms (any divergence), and the fused forward-KL + CE the trainer uses,
    against full teacher logits and against a top-k teacher (checked to equal the generic path)."""
    from hf_distill.losses.logits import (chunked_weighted_sums, fused_forward_kl_and_ce, hard_label_loss,
                                          soft_label_loss, topk_soft_label_loss)

    if pair["kind"] == "bert":
        rows, width = pair["batch"], pair["num_labels"]
    else:
        rows, width = pair["batch"] * pair["seq"], pair["vocab"]
    g = torch.Generator().manual_seed(0)
    student = torch.randn(rows, width, generator=g)
    teacher = torch.randn(rows, width, generator=g)
    topk = torch.log_softmax(teacher, -1).topk(min(pair.get("top_k") or 32, width), dim=-1)
    labels = torch.randint(0, width, (rows,), generator=g)
    weights = torch.ones(rows)
    alpha = 0.5

    def generic(x, targets, soft):
        def row_losses(x, *rest):
            return torch.stack([soft(x, *rest[:-1]), hard_label_loss(x, rest[-1])])
        return chunked_weighted_sums(row_losses, (alpha, 1 - alpha), x, weights, *targets, labels, chunk_size=1024)[0]

    variants = {
        "a_hard_label_ce": lambda x: torch.nn.functional.cross_entropy(x, labels, reduction="sum"),
        "generic_kd_plus_ce": lambda x: generic(x, (teacher,), soft_label_loss),
        "fused_kd_plus_ce": lambda x: fused_forward_kl_and_ce(x, teacher, labels, weights, (alpha, 1 - alpha))[0],
        "generic_topk_kd_plus_ce": lambda x: generic(x, (topk.values, topk.indices), topk_soft_label_loss),
        "fused_topk_kd_plus_ce": lambda x: fused_forward_kl_and_ce(x, (topk.values, topk.indices), labels, weights,
                                                                   (alpha, 1 - alpha))[0],
    }

    def timed(fn):
        samples, result = [], None
        for _ in range(repeats + 1):
            x = student.clone().requires_grad_()
            start = time.perf_counter()
            loss = fn(x)
            loss.backward()
            samples.append(time.perf_counter() - start)
            result = (loss.detach(), x.grad)
        return statistics.median(samples[1:]) * 1e3, result

    results, outputs = {}, {}
    for name, fn in variants.items():
        ms, outputs[name] = timed(fn)
        results[name] = round(ms, 2)
    for fused, reference in (("fused_kd_plus_ce", "generic_kd_plus_ce"), ("fused_topk_kd_plus_ce", "generic_topk_kd_plus_ce")):
        torch.testing.assert_close(outputs[fused][0], outputs[reference][0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(outputs[fused][1], outputs[reference][1], rtol=1e-3, atol=1e-6)
    return {"rows": rows, "width": width, "forward_backward_ms": results}


# ------------------------------------------------------------------------------------------------ report
def table(results: dict[str, Any]) -> str:
    rows = ["| pair | (a) student, hard labels | (b) teacher forward | (c) online, logits | (c) online, + hidden/attention "
            "| (d) offline cache | c / (a+b) | d / a |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sps = r["steps_per_s"]
        cell = lambda k: f"{sps[k]:.2f}"  # noqa: E731
        ratio_ha = f" (h+a {r['ratios']['online_hidden_attention']:.2f})"
        rows.append(
            f"| {name} | {cell('a_student_hard_labels')} | {cell('b_teacher_forward')} | {cell('c_online_logits')} | "
            f"{cell('c_online_hidden_attention')} | {cell('d_offline_cache')} | "
            f"{r['ratios']['online_logits']:.3f}{ratio_ha} | {r['ratios']['offline']:.3f} |"
        )
    return "\n".join(rows)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=12, help="Timed optimizer steps per variant and round.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed first steps of each run.")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved rounds of all variants.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise on a shared CPU).")
    parser.add_argument("--quick", action="store_true", help="Tiny models and 3 steps: a smoke test, not a measurement.")
    parser.add_argument("--profile", action="store_true", help="Also profile (c) against (a) + (b), op by op.")
    parser.add_argument("--loss_profile", action="store_true",
                        help="Also time the logits loss alone: (a)'s CE, generic and fused KD + CE (full and top-k).")
    parser.add_argument("--output", default="runs/bench_overhead.json")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    results, profiles = {}, {}
    for name in args.pairs:
        pair = dict(PAIRS[name], **(QUICK if args.quick else {}))
        print(f"{name}: teacher {pair['teacher']}, student {pair['student']}, batch {pair['batch']} x {pair['seq']} "
              f"tokens, vocab {pair['vocab']}", flush=True)
        results[name] = bench_pair(name, pair, args.steps, args.warmup, args.repeats)
        if args.profile:
            profiles[name] = profile_online(pair, args.steps)
        if args.loss_profile:
            results[name]["loss_profile"] = loss_profile(pair)
    report = {
        "config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
                   "quick": args.quick, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": platform.python_version()},
        "goals": GOALS,
        "results": results,
    }
    if profiles:
        report["profile"] = profiles
    print()
    print(table(results))
    for name, r in results.items():
        if "loss_profile" in r:
            lp = r["loss_profile"]
            print(f"\nlogits loss alone, {name} ({lp['rows']} rows x {lp['width']}), forward + backward ms: "
                  + ", ".join(f"{k} {v}" for k, v in lp["forward_backward_ms"].items()))
    for name, prof in profiles.items():
        print(f"\nprofile {name}: online {prof['total_ms']['online']} ms vs floor {prof['total_ms']['floor']} ms "
              f"(self CPU over {prof['steps']} steps); extra time by op:")
        for op, ms in prof["extra_over_floor_ms"]:
            print(f"  {ms:9.2f} ms  {op}")
    write_report(args.output, report)
    return report


def write_report(path: str, report: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
