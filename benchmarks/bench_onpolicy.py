"""Benchmark (not a test): on-policy distillation against TRL's stable ``DistillationTrainer`` (issue 13, item 3).

Setup (the same for both trainers)
    * Teacher: ``../shared/data/models/stories260K`` converted on the fly (``llama2c:`` path of
      ``scripts/distill_causal_lm.py``); student: 2 of its 5 blocks copied (:func:`hf_distill.create_student`).
    * Training data: the story openings of ``hf_distill.lm.evaluation`` as a prompt-only dataset (plain strings);
      every step the student completes ``--batch_size`` prompts (sampling at T = 1, full distribution, at most
      ``--completion_length`` new tokens, KV cache) and is trained on them with JSD(β = 0.5) at T = 1 (lmbda = 1).
    * Ours: :class:`hf_distill.DistillationTrainer` (``lmbda=1, alpha=1, distillation_loss=jsd, jsd_beta=0.5``).
      TRL: ``trl.trainer.distillation_trainer.DistillationTrainer`` (``beta=0.5``; ``bf16`` and gradient
      checkpointing off, as ours). Same steps, batch, learning rate and schedule, seed, threads.
    * Runs alternate ours, TRL, TRL, ours, … (``--repeats`` pairs, each pair with its own seed), each in a fresh
      process.

Measured per run
    * tokens/s = (tokens generated + tokens trained on) / seconds of the training loop (``on_train_begin`` to
      ``on_train_end``, so model loading and our preflight are outside): generated = completion tokens up to and
      including the first EOS; trained = prompt + completion tokens of the training forward (no padding). Counted
      the same way for both, from each trainer's generated batch. Also the share of the loop spent generating.
    * peak RSS of the process (VmHWM) and its increase over the loop.
    * held-out KL(teacher ‖ student) per completion token on teacher samples of other openings
      (:func:`hf_distill.lm.evaluation.heldout_metrics`, independent of both trainers' losses).
    Noise: min–max over the repeats (seeds) of each trainer, and of the paired ratios.

    PYTHONPATH=.:/tmp/trl .venv/bin/python benchmarks/bench_onpolicy.py              # 100 steps × 3 pairs
    PYTHONPATH=.:/tmp/trl .venv/bin/python benchmarks/bench_onpolicy.py --quick      # a smoke run (seconds)

Prints a markdown table and writes ``bench_results/onpolicy.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_causal_lm import spawn_worker  # noqa: E402
from bench_loss_memory import peak_kb, reset_peak, status_kb  # noqa: E402
from distill_causal_lm import DEFAULT_TEACHER_DIR, load_llama2c_teacher  # noqa: E402

from hf_distill.lm.evaluation import HELDOUT_OPENINGS, STORY_OPENINGS, heldout_metrics  # noqa: E402

MB = 1024.0
TRAINERS = ("ours", "trl")


def trl_available() -> bool:
    """Whether TRL's stable DistillationTrainer imports (TRL >= 1.16)."""
    try:
        from trl.trainer.distillation_trainer import DistillationTrainer  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Counting what each trainer generated and trained on
# ----------------------------------------------------------------------------------------------
class Counter:
    """Generated and trained tokens, generation seconds, and the training loop's wall time (a callback)."""

    def __init__(self) -> None:
        self.generated = self.trained = self.batches = 0
        self.generation_seconds = 0.0
        self.loop_start = self.loop_end = 0.0

    def add(self, generated: int, trained: int, seconds: float) -> None:
        self.generated += generated
        self.trained += trained
        self.batches += 1
        self.generation_seconds += seconds

    def callback(self) -> Any:
        from transformers import TrainerCallback

        counter = self

        class LoopClock(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                counter.loop_start = time.perf_counter()

            def on_train_end(self, *args: Any, **kwargs: Any) -> None:
                counter.loop_end = time.perf_counter()

        return LoopClock()


def count_ours(trainer: Any, counter: Counter) -> None:
    """Wrap ``on_policy_inputs``: the generated batch has labels on the completion (EOS included) only."""
    original = trainer.on_policy_inputs

    def counted(model: Any, inputs: dict) -> dict:
        start = time.perf_counter()
        batch = original(model, inputs)
        counter.add(int((batch["labels"] != -100).sum()), int(batch["attention_mask"].sum()), time.perf_counter() - start)
        return batch

    trainer.on_policy_inputs = counted


def count_trl(trainer: Any, counter: Counter) -> None:
    """Wrap ``_generate_and_score_completions``: its masks mark the prompt and the completion (EOS included)."""
    original = trainer._generate_and_score_completions

    def counted(inputs: Any) -> dict:
        start = time.perf_counter()
        batch = original(inputs)
        completion = int(batch["completion_mask"].sum())
        counter.add(completion, int(batch["prompt_mask"].sum()) + completion, time.perf_counter() - start)
        return batch

    trainer._generate_and_score_completions = counted


# ----------------------------------------------------------------------------------------------
# One run (worker subprocess)
# ----------------------------------------------------------------------------------------------
def _common(args: argparse.Namespace, output_dir: str, seed: int) -> dict[str, Any]:
    return dict(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 20),
                weight_decay=0.0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none",
                use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0)


def make_ours(args: argparse.Namespace, student: Any, teacher: Any, tokenizer: Any, prompts: list[str],
              output_dir: str, seed: int, counter: Counter) -> Any:
    """Our DistillationTrainer on the prompt-only data, always on-policy, JSD(0.5)."""
    import datasets

    from hf_distill import CompletionCollator, DistillationArguments, DistillationTrainer, tokenize_completions

    data = tokenize_completions(datasets.Dataset.from_dict({"prompt": prompts}), tokenizer, max_length=args.max_length)
    arguments = DistillationArguments(
        **_common(args, output_dir, seed), distillation_task="causal-lm", lmbda=1.0, alpha=1.0,
        distillation_loss="jsd", jsd_beta=0.5, temperature=args.temperature,
        generation_temperature=args.temperature, max_completion_length=args.completion_length, top_p=1.0, top_k=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=arguments, train_dataset=data,
                                  data_collator=CompletionCollator(tokenizer), processing_class=tokenizer,
                                  callbacks=[counter.callback()])
    count_ours(trainer, counter)
    return trainer


def make_trl(args: argparse.Namespace, student: Any, teacher: Any, tokenizer: Any, prompts: list[str],
             output_dir: str, seed: int, counter: Counter) -> Any:
    """TRL's stable DistillationTrainer on the same prompts and settings."""
    import datasets
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    config = DistillationConfig(
        **_common(args, output_dir, seed), bf16=False, gradient_checkpointing=False, beta=0.5,
        temperature=args.temperature, max_completion_length=args.completion_length, top_p=1.0, top_k=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config,
                                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tokenizer, callbacks=[counter.callback()])
    count_trl(trainer, counter)
    return trainer


def run_worker(spec: dict, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    """Train one student with one trainer; tokens/s, memory, and held-out KL."""
    import datasets
    import torch
    from transformers import set_seed

    from hf_distill import create_student

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_llama2c_teacher(Path(args.model_dir))
    set_seed(spec["seed"])
    student = create_student(teacher, num_layers=2)
    heldout = datasets.load_from_disk(data["heldout"])
    counter = Counter()
    make = make_ours if spec["trainer"] == "ours" else make_trl
    with tempfile.TemporaryDirectory(prefix="bench_onpolicy_") as output_dir:
        trainer = make(args, student, teacher, tokenizer, data["prompts"], output_dir, spec["seed"], counter)
        reset_peak()
        rss_before = status_kb("VmRSS") or 0
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        peak = peak_kb()
    loop = counter.loop_end - counter.loop_start
    student.eval()
    return {
        "steps": trainer.state.global_step, "train_seconds": seconds, "loop_seconds": loop,
        "generated_tokens": counter.generated, "trained_tokens": counter.trained, "generations": counter.batches,
        "tokens_per_second": (counter.generated + counter.trained) / loop,
        "generation_share": counter.generation_seconds / loop,
        "mean_completion_length": counter.generated / max(1, counter.batches * args.batch_size),
        "peak_rss_mb": peak / MB, "extra_peak_mb": (peak - rss_before) / MB,
        "heldout": heldout_metrics(student, teacher, heldout, tokenizer),
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace) -> dict[str, Any]:
    """The training prompts, and held-out teacher samples of other openings (tokenized, on disk)."""
    import datasets

    from hf_distill import tokenize_completions
    from hf_distill.causal_lm import cache_teacher_completions

    datasets.disable_progress_bars()
    teacher, tokenizer = load_llama2c_teacher(Path(args.model_dir))
    cache = Path(args.cache_dir)
    heldout = cache_teacher_completions(
        teacher, tokenizer, HELDOUT_OPENINGS * args.heldout_samples_per_prompt, cache_dir=cache / "completions",
        max_new_tokens=args.completion_length, batch_size=64, do_sample=True, temperature=1.0, seed=1,
        show_progress=False)
    path = str(cache / f"heldout_{args.completion_length}_{args.heldout_samples_per_prompt}")
    tokenize_completions(heldout, tokenizer, max_length=args.max_length).save_to_disk(path)
    return {"prompts": STORY_OPENINGS[: args.num_prompts], "heldout": path, "heldout_examples": len(heldout)}


def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(trainer, seed) pairs: ours, TRL, TRL, ours, ... one seed per pair."""
    trainers = list(args.trainers)
    runs = []
    for repeat in range(args.repeats):
        order = trainers if repeat % 2 == 0 else trainers[::-1]
        runs += [{"trainer": t, "seed": args.seed + repeat, "repeat": repeat} for t in order]
    return runs


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Per trainer: the spread over repeats of tokens/s, peak RSS and held-out KL; paired ratios ours / TRL."""
    ok = [r for r in runs if "error" not in r["result"]]
    summary: dict[str, Any] = {}
    for name in TRAINERS:
        mine = [r["result"] for r in ok if r["trainer"] == name]
        if mine:
            summary[name] = {key: _spread([m[key] for m in mine]) for key in
                             ("tokens_per_second", "peak_rss_mb", "extra_peak_mb", "generation_share",
                              "mean_completion_length")}
            summary[name]["heldout_kl"] = _spread([m["heldout"]["kl"] for m in mine])
    pairs = {}
    for r in ok:
        pairs.setdefault(r["repeat"], {})[r["trainer"]] = r["result"]
    both = [p for p in pairs.values() if len(p) == 2]
    if both:
        summary["paired"] = {
            "tokens_per_second_ratio": _spread([p["ours"]["tokens_per_second"] / p["trl"]["tokens_per_second"] for p in both]),
            "peak_rss_ratio": _spread([p["ours"]["peak_rss_mb"] / p["trl"]["peak_rss_mb"] for p in both]),
            "heldout_kl_difference": _spread([p["ours"]["heldout"]["kl"] - p["trl"]["heldout"]["kl"] for p in both]),
        }
    return summary


def _range(s: dict[str, float], spec: str) -> str:
    return f"{format(s['median'], spec)} ({format(s['min'], spec)}–{format(s['max'], spec)})"


def markdown_table(report: dict[str, Any]) -> str:
    """Per-run rows, then medians (min–max over the repeats) per trainer and the paired ratios."""
    rows = ["| repeat | trainer | seed | tokens/s | generation share | mean completion | peak RSS MB | held-out KL |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        r = run["result"]
        if "error" in r:
            rows.append(f"| {run['repeat']} | {run['trainer']} | {run['seed']} | error | | | | |")
            continue
        rows.append(f"| {run['repeat']} | {run['trainer']} | {run['seed']} | {r['tokens_per_second']:.0f} | "
                    f"{r['generation_share']:.2f} | {r['mean_completion_length']:.1f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['heldout']['kl']:.4f} |")
    s = report["summary"]
    rows += ["", "| trainer | tokens/s | peak RSS MB | held-out KL(t‖s) |", "|---|---:|---:|---:|"]
    for name in TRAINERS:
        if name in s:
            t = s[name]
            rows.append(f"| {name} | {_range(t['tokens_per_second'], '.0f')} | {_range(t['peak_rss_mb'], '.0f')} | "
                        f"{_range(t['heldout_kl'], '.4f')} |")
    if "paired" in s:
        p = s["paired"]
        rows += ["", f"Paired (ours / TRL, same seed): tokens/s ratio {_range(p['tokens_per_second_ratio'], '.3f')}, "
                     f"peak RSS ratio {_range(p['peak_rss_ratio'], '.3f')}, held-out KL difference "
                     f"{_range(p['heldout_kl_difference'], '+.4f')}."]
    return "\n".join(rows)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data once, then every planned run in its own process."""
    started = time.perf_counter()
    data = prepare_data(args)
    trl_version = None
    if "trl" in args.trainers:
        import trl

        trl_version = trl.__version__
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(data, handle)
        data_file = handle.name
    runs = []
    try:
        for spec in planned_runs(args):
            run = dict(spec, result=spawn_worker(__file__, spec, args, data_file))
            r = run["result"]
            note = r.get("error", "")[:300] or f"{r['tokens_per_second']:.0f} tok/s, KL {r['heldout']['kl']:.4f}"
            print(f"  [{spec['repeat']}] {spec['trainer']} seed {spec['seed']}: {note}", file=sys.stderr, flush=True)
            runs.append(run)
    finally:
        Path(data_file).unlink(missing_ok=True)
    config = {k: v for k, v in vars(args).items() if not k.startswith("worker")}
    return {"config": config, "trl_version": trl_version, "data": data, "runs": runs, "summary": summarise(runs),
            "wall_seconds": time.perf_counter() - started}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` shrinks the run to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=str(DEFAULT_TEACHER_DIR), help="Folder with stories260K.bin and tok512.model.")
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps of every run.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts per step (each completed once).")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling and loss temperature (both trainers).")
    parser.add_argument("--completion_length", type=int, default=64, help="max_completion_length (new tokens).")
    parser.add_argument("--max_length", type=int, default=96, help="Prompt + completion tokens of the held-out samples.")
    parser.add_argument("--num_prompts", type=int, default=len(STORY_OPENINGS), help="Training openings.")
    parser.add_argument("--heldout_samples_per_prompt", type=int, default=4, help="Teacher samples per held-out opening.")
    parser.add_argument("--repeats", type=int, default=3, help="(ours, TRL) pairs, order alternating, seed per pair.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first pair (then +1 per pair).")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 keeps timings stable).")
    parser.add_argument("--cache_dir", default="bench_results/onpolicy_cache")
    parser.add_argument("--output", default="bench_results/onpolicy.json")
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 2, 8 new tokens, 1 pair: a smoke run.")
    for hidden in ("--worker_spec", "--worker_data", "--worker_result", "--worker_args"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker_spec:
        args.steps, args.batch_size, args.completion_length, args.repeats = 3, 2, 8, 1
        args.num_prompts, args.heldout_samples_per_prompt, args.max_length = 6, 1, 32
    if "trl" in args.trainers and not trl_available() and not args.worker_spec:
        raise SystemExit("TRL's stable DistillationTrainer (trl >= 1.16) is not importable: install it, put it on "
                         "PYTHONPATH (e.g. PYTHONPATH=.:/tmp/trl), or pass --trainers ours.")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    """Run the benchmark, or (with the hidden worker flags) one run."""
    args = parse_args(argv)
    if args.worker_spec:
        run_args = argparse.Namespace(**json.loads(args.worker_args))
        result = run_worker(json.loads(args.worker_spec), run_args, json.loads(Path(args.worker_data).read_text()))
        Path(args.worker_result).write_text(json.dumps(result))
        return None
    report = run_benchmark(args)
    print(f"On-policy JSD(0.5), lmbda 1, stories260K → 2-layer student: {args.steps} steps × {args.batch_size} prompts, "
          f"≤ {args.completion_length} new tokens, lr {args.learning_rate}, T={args.temperature}, {args.threads} "
          f"thread(s), TRL {report['trl_version']}; command: python benchmarks/bench_onpolicy.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(markdown_table(report))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nWrote {output} in {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
