"""Benchmark (not a test): distil the real stories260K TinyStories Llama into small students (issue 4).

Setup
    * Teacher: ``../shared/data/models/stories260K`` converted with :func:`hf_distill.convert_llama2c`
      (5 layers, dim 64, vocabulary 512).
    * Prompts: the story openings of ``scripts/distill_causal_lm.py``. Transfer set: teacher samples (temperature 1, full
      distribution, ``--samples_per_prompt`` per opening, cached on disk). Held-out set: teacher samples
      from *other* openings with another seed.
    * Students: ``layers``, 2 of the teacher's 5 blocks copied by :func:`hf_distill.create_student`;
      ``narrow``, a random-init Llama with dim 32 and 2 layers on the same vocabulary.

Runs, all at the same number of optimizer steps, batch size and learning rate, with
:class:`hf_distill.DistillationTrainer`:
    ``sft`` (alpha=0, CE on the teacher samples), ``fkl`` / ``rkl`` / ``jsd`` (alpha=1, forward KL, reverse KL,
    JSD(0.5)), ``topk<k>`` (forward KL against the top-k cache made by
    :func:`hf_distill.cache_teacher_outputs`, no teacher at train time), ``onpolicy_jsd`` (JSD(0.5) with
    ``lmbda=0.5``),
    ``init`` (the student before training), and with ``--with_trl`` the same JSD(0.5) task with TRL's
    ``GKDTrainer`` (``trl_jsd``, lmbda=0; ``trl_onpolicy_jsd`` with the same lmbda).

Measured per run, each in a fresh subprocess, one after the other:
    KL(teacher ‖ student) per completion token and student perplexity on the held-out teacher samples
    (and KL on the transfer set), by ``distill_causal_lm.heldout_metrics``, independent of the library's losses; training tokens/s
    (non-padding tokens of the collated batches / wall time of ``train()``); the peak RSS of the process
    and its increase during trainer construction + training. Also the top-k cache size per token against
    full logits, the gap of top-k training to full-logit training for k = 8, 32, 128, and the
    approximation gap of the top-k loss itself at initialisation.

    .venv/bin/python benchmarks/bench_causal_lm.py                 # both students, 300 steps (~10 min on 2 cores)
    .venv/bin/python benchmarks/bench_causal_lm.py --with_trl      # + TRL's GKDTrainer as a peer
    .venv/bin/python benchmarks/bench_causal_lm.py --quick         # one student, 20 steps, a smoke run

Prints markdown tables and writes ``bench_results/causal_lm.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRL_EXPERIMENTAL_SILENCE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # distill_causal_lm's openings and metrics

from bench_loss_memory import peak_kb, reset_peak, status_kb  # noqa: E402
from distill_causal_lm import DEFAULT_TEACHER_DIR, load_llama2c_teacher  # noqa: E402  (the script's defaults)

from hf_distill.lm.evaluation import HELDOUT_OPENINGS, STORY_OPENINGS, heldout_metrics  # noqa: E402
from hf_distill.students import narrow_causal_student  # noqa: E402

KD_METHODS = {  # method -> DistillationArguments overrides
    "sft": {"alpha": 0.0},
    "fkl": {"alpha": 1.0, "distillation_loss": "forward_kl"},
    "rkl": {"alpha": 1.0, "distillation_loss": "reverse_kl"},
    "jsd": {"alpha": 1.0, "distillation_loss": "jsd", "jsd_beta": 0.5},
    "onpolicy_jsd": {"alpha": 1.0, "distillation_loss": "jsd", "jsd_beta": 0.5},
}
MB = 1024.0


# ----------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------
def on_policy_fields(args: argparse.Namespace) -> dict[str, Any]:
    """On-policy overrides: ``lmbda`` and the generation settings."""
    return {"lmbda": args.lmbda, "max_completion_length": args.max_new_tokens,
            "generation_temperature": args.sample_temperature, "top_p": 1.0, "top_k": 0}


def load_teacher(model_dir: Path) -> tuple[Any, Any]:
    """The converted stories260K teacher (eval mode) and its tokenizer (pad = EOS)."""
    return load_llama2c_teacher(model_dir)


def build_student(kind: str, teacher: Any, seed: int = 0) -> Any:
    """``layers``: 2 teacher blocks copied; ``narrow``: random-init Llama, dim 32 (4 heads), 2 layers, same vocabulary."""
    from hf_distill import create_student

    if kind == "layers":
        return create_student(teacher, num_layers=2)
    if kind == "narrow":
        return narrow_causal_student(teacher, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    raise ValueError(f"unknown student {kind!r}; use 'layers' or 'narrow'")


class CountingCollator:
    """Wrap a collator and count the non-padding tokens of every batch it builds."""

    def __init__(self, base: Callable[[list], dict]) -> None:
        self.base = base
        self.tokens = 0
        self.batches = 0
        self.on_policy_steps = 0

    def __call__(self, features: list) -> dict:
        batch = self.base(features)
        self.tokens += int(batch["attention_mask"].sum())
        self.batches += 1
        return batch


def count_on_policy_tokens(trainer: Any, counter: CountingCollator) -> None:
    """Make ``counter.tokens`` count the tokens actually trained on: on-policy steps replace the collated batch by
    the student's generations (ours: ``on_policy_inputs``; TRL: ``generate_on_policy_outputs``)."""
    counter.on_policy_steps = 0
    if hasattr(trainer, "on_policy_inputs"):
        original = trainer.on_policy_inputs

        def ours(model: Any, inputs: dict) -> dict:
            new = original(model, inputs)
            counter.tokens += int(new["attention_mask"].sum()) - int(inputs["attention_mask"].sum())
            counter.on_policy_steps += 1
            return new

        trainer.on_policy_inputs = ours
    elif hasattr(trainer, "generate_on_policy_outputs"):
        original_trl = trainer.generate_on_policy_outputs

        def trl(model: Any, inputs: dict, generation_config: Any) -> tuple:
            ids, mask, labels = original_trl(model, inputs, generation_config)
            counter.tokens += int(mask.sum()) - int(inputs["attention_mask"].sum())
            counter.on_policy_steps += 1
            return ids, mask, labels

        trainer.generate_on_policy_outputs = trl


class TrlPromptCollator:
    """Add the left-padded ``prompts`` / ``prompt_attention_mask`` that TRL's on-policy GKD step needs."""

    def __init__(self, tokenizer: Any) -> None:
        from hf_distill.causal_lm import CompletionCollator

        self.full = CompletionCollator(tokenizer)
        self.prompts = CompletionCollator(tokenizer, prompt_only=True)

    def __call__(self, features: list) -> dict:
        batch = self.full(features)
        prompts = self.prompts(features)
        batch["prompts"] = prompts["prompt_input_ids"]
        batch["prompt_attention_mask"] = prompts["prompt_attention_mask"]
        return batch


# ----------------------------------------------------------------------------------------------
# Evaluation (independent of hf_distill.losses)
# ----------------------------------------------------------------------------------------------
def topk_loss_gap(student: Any, teacher: Any, dataset: Any, tokenizer: Any, ks: Sequence[int], temperature: float,
                  batch_size: int = 16) -> dict[int, dict[str, float]]:
    """Per-token forward KL with full teacher logits vs the top-k coarsened loss, for the same student."""
    import torch

    from hf_distill.causal_lm import CompletionCollator
    from hf_distill.losses.logits import soft_label_loss, topk_soft_label_loss

    collate = CompletionCollator(tokenizer)
    full, coarse, tokens = 0.0, {k: 0.0 for k in ks}, 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = batch["labels"][:, 1:] != -100
            s = student(**inputs).logits[:, :-1].float()[mask]
            t = teacher(**inputs).logits[:, :-1].float()[mask]
            full += float(soft_label_loss(s, t, temperature=temperature).sum())
            log_p = torch.log_softmax(t / temperature, dim=-1)
            for k in ks:
                values, indices = log_p.topk(k, dim=-1)
                coarse[k] += float(topk_soft_label_loss(s, values, indices, temperature=temperature).sum())
            tokens += float(mask.sum())
    return {k: {"full": full / tokens, "topk": coarse[k] / tokens, "gap": (full - coarse[k]) / tokens} for k in ks}


# ----------------------------------------------------------------------------------------------
# Data (parent process)
# ----------------------------------------------------------------------------------------------
def _arrow_bytes(dataset: Any, columns: Sequence[str]) -> int:
    return sum(dataset.data.column(c).nbytes for c in columns)


def prepare_data(args: argparse.Namespace, teacher: Any, tokenizer: Any) -> dict[str, Any]:
    """Teacher samples (cached), tokenized splits and top-k caches on disk; cache sizes per token."""
    from hf_distill import cache_teacher_outputs, tokenize_completions
    from hf_distill.causal_lm import cache_teacher_completions

    cache = Path(args.cache_dir)
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=64, do_sample=True, temperature=args.sample_temperature,
               show_progress=False)
    train_prompts = STORY_OPENINGS[: args.num_prompts] * args.samples_per_prompt
    heldout_prompts = HELDOUT_OPENINGS * args.heldout_samples_per_prompt
    transfer = cache_teacher_completions(teacher, tokenizer, train_prompts, cache_dir=cache / "completions", seed=0, **gen)
    heldout = cache_teacher_completions(teacher, tokenizer, heldout_prompts, cache_dir=cache / "completions", seed=1,
                                        **gen)
    paths = {"train": str(cache / "data" / "train"), "heldout": str(cache / "data" / "heldout")}
    train_tok = tokenize_completions(transfer, tokenizer, max_length=args.max_length)
    heldout_tok = tokenize_completions(heldout, tokenizer, max_length=args.max_length)
    train_tok.save_to_disk(paths["train"])
    heldout_tok.save_to_disk(paths["heldout"])
    positions = sum(len(ids) for ids in train_tok["input_ids"])
    completion_tokens = sum(sum(1 for x in labels if x != -100) for labels in train_tok["labels"])

    vocab = teacher.config.vocab_size
    full = cache_teacher_outputs(teacher, train_tok, top_k=None, batch_size=32)
    sizes: dict[str, Any] = {
        "positions": positions,
        "full": {
            "bytes_per_token_stored": _arrow_bytes(full, ["teacher_logits"]) / positions,
            "bytes_per_token_fp32": 4 * vocab,
            "bytes_per_token_fp16": 2 * vocab,
            "stored_dtype": str(full.features["teacher_logits"]),
        },
        "topk": {},
    }
    del full
    ks = sorted(set(args.topk_ks) | {args.main_k})
    for k in ks:
        topk = cache_teacher_outputs(teacher, train_tok, top_k=k, temperature=args.temperature, batch_size=32)
        path = str(cache / "data" / f"topk{k}")
        topk.save_to_disk(path)
        paths[f"topk{k}"] = path
        stored = _arrow_bytes(topk, ["teacher_topk_log_probs", "teacher_topk_indices"]) / positions
        sizes["topk"][k] = {
            "bytes_per_token_stored": stored,
            "fraction_of_full_stored": stored / sizes["full"]["bytes_per_token_stored"],
            "bytes_per_token_compact": k * (2 + 2),  # fp16 log-prob + int16 id (V <= 65536)
            "fraction_of_full_fp16": k * 4 / (2 * vocab),
            "stored_dtypes": [str(topk.features[c]) for c in ("teacher_topk_log_probs", "teacher_topk_indices")],
        }
    return {
        "paths": paths,
        "train_examples": len(train_tok),
        "heldout_examples": len(heldout_tok),
        "train_positions": positions,
        "train_completion_tokens": completion_tokens,
        "heldout_completion_tokens": sum(sum(1 for x in labels if x != -100) for labels in heldout_tok["labels"]),
        "cache_sizes": sizes,
        "example": {"prompt": transfer[0]["prompt"], "completion": transfer[0]["completion"]},
    }


# ----------------------------------------------------------------------------------------------
# One run (worker subprocess)
# ----------------------------------------------------------------------------------------------
def _common_training_kwargs(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0, logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none",
        use_cpu=True, seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
    )


def _make_trainer(spec: dict, args: argparse.Namespace, student: Any, teacher: Any, tokenizer: Any, data: dict,
                  output_dir: str) -> tuple[Any, CountingCollator]:
    from datasets import load_from_disk

    from hf_distill.causal_lm import CompletionCollator

    method = spec["method"]
    common = _common_training_kwargs(args, output_dir)
    if method.startswith("trl_"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        lmbda = args.lmbda if method == "trl_onpolicy_jsd" else 0.0
        collator = CountingCollator(TrlPromptCollator(tokenizer) if lmbda else CompletionCollator(tokenizer))
        config = GKDConfig(
            **common, bf16=False, gradient_checkpointing=False, lmbda=lmbda, beta=0.5, temperature=args.sample_temperature,
            max_new_tokens=args.max_new_tokens, max_length=args.max_length,
        )
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collator,
                             train_dataset=load_from_disk(data["paths"]["train"]), processing_class=tokenizer)
        return trainer, collator

    from hf_distill import DistillationArguments, DistillationTrainer

    collator = CountingCollator(CompletionCollator(tokenizer))
    if method.startswith("topk"):
        overrides = {"alpha": 1.0, "distillation_loss": "forward_kl"}
        dataset = load_from_disk(data["paths"][method])
        teacher_model = None
    else:
        overrides = dict(KD_METHODS[method])
        dataset = load_from_disk(data["paths"]["train"])
        teacher_model = teacher
    if method == "onpolicy_jsd":
        overrides.update(on_policy_fields(args))
    arguments = DistillationArguments(**common, temperature=args.temperature, distillation_task="causal-lm",
                                      fused_lm_loss=args.fused_lm_loss, **overrides)
    trainer = DistillationTrainer(model=student, teacher_model=teacher_model, args=arguments, train_dataset=dataset,
                                  data_collator=collator, processing_class=tokenizer)
    return trainer, collator


def run_worker(spec: dict, args: argparse.Namespace, data: dict) -> dict[str, Any]:
    """Build, train (unless ``init``) and evaluate one student; memory and speed of this process."""
    import datasets
    import torch
    from datasets import load_from_disk

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_teacher(Path(args.model_dir))
    student = build_student(spec["student"], teacher, seed=args.seed)
    heldout = load_from_disk(data["paths"]["heldout"])
    train = load_from_disk(data["paths"]["train"])
    result: dict[str, Any] = {"student_parameters": sum(p.numel() for p in student.parameters())}
    if spec["method"] != "init":
        with tempfile.TemporaryDirectory(prefix="bench_causal_lm_") as output_dir:
            reset_peak()
            rss_before = status_kb("VmRSS") or 0
            trainer, collator = _make_trainer(spec, args, student, teacher, tokenizer, data, output_dir)
            count_on_policy_tokens(trainer, collator)
            start = time.perf_counter()
            output = trainer.train()
            seconds = time.perf_counter() - start
            peak = peak_kb()
        fused = getattr(trainer, "fused_lm", None)
        result["fused_lm_loss"] = None if fused is None else (fused.enabled, fused.reason)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result.update(
            train_seconds=seconds,
            train_tokens=collator.tokens,
            tokens_per_second=collator.tokens / seconds,
            steps=trainer.state.global_step,
            on_policy_steps=collator.on_policy_steps,
            extra_peak_mb=(peak - rss_before) / MB,
            peak_rss_mb=peak / MB,
            train_loss=output.training_loss,
            final_logged_loss=losses[-1] if losses else None,
        )
    student.eval()
    result["heldout"] = heldout_metrics(student, teacher, heldout, tokenizer)
    result["transfer"] = heldout_metrics(student, teacher, train, tokenizer)
    return result


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def planned_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (student, method) to run, in order."""
    runs = []
    for student in args.students:
        methods = list(args.methods)
        if "topk" in methods:
            index = methods.index("topk")
            ks = [args.main_k] + [k for k in sorted(args.topk_ks) if k != args.main_k]
            methods[index : index + 1] = [f"topk{k}" for k in ks]
        runs += [{"student": student, "method": method} for method in methods]
    return runs


def planned_trl_pairs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Back-to-back (ours, TRL) runs of the same task, ``--trl_repeats`` times, the order alternating."""
    tasks = list(args.trl_tasks)
    runs = []
    for student in args.trl_students or args.students:
        for task in tasks:
            for repeat in range(args.trl_repeats):
                pair = [task, f"trl_{task}"] if repeat % 2 == 0 else [f"trl_{task}", task]
                runs += [{"student": student, "method": m, "repeat": repeat, "pair_task": task}
                         for m in pair]
    return runs


def spawn_worker(script: str, spec: dict, args: argparse.Namespace, data_file: str) -> dict[str, Any]:
    """Run one ``spec`` in a fresh process of ``script`` (its ``--worker_*`` mode, ``args.threads`` threads); its
    result dict, or ``{"error": ...}`` with the end of its output."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_file = handle.name
    command = [sys.executable, os.path.abspath(script), "--worker_spec", json.dumps(spec), "--worker_data", data_file,
               "--worker_result", result_file, "--worker_args", json.dumps(vars(args))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    try:
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-3000:]
            return {"error": f"exit {done.returncode}: {tail}"}
        return json.loads(Path(result_file).read_text())
    finally:
        Path(result_file).unlink(missing_ok=True)


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_tables(report: dict[str, Any]) -> str:
    """Main table, top-k table and the TRL comparison as markdown."""
    out = ["| student | method | held-out KL(t‖s) | held-out ppl | top-1 agree | transfer KL | tokens/s | train s "
           "| extra peak MB | peak RSS MB | final loss | on-policy steps |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    teacher_ppl = None
    for run in report["runs"]:
        r = run.get("result") or {}
        if "error" in r:
            out.append(f"| {run['student']} | {run['method']} | error (see JSON) | | | | | | | | | |")
            continue
        h, t = r["heldout"], r["transfer"]
        teacher_ppl = h["teacher_ppl"]
        out.append(
            f"| {run['student']} | {run['method']} | {h['kl']:.4f} | {h['ppl']:.3f} | {h['top1_agreement']:.3f} | "
            f"{t['kl']:.4f} | {_fmt(r.get('tokens_per_second'), '.0f')} | {_fmt(r.get('train_seconds'), '.1f')} | "
            f"{_fmt(r.get('extra_peak_mb'), '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(r.get('final_logged_loss'), '.4f')} | {_fmt(r.get('on_policy_steps'), 'd')} |"
        )
    if teacher_ppl is not None:
        out.append(f"\nTeacher perplexity on the held-out samples: {teacher_ppl:.3f} (KL 0 by definition).")

    sizes = report["data"]["cache_sizes"]
    full = sizes["full"]
    out += ["", f"Top-k cache size per token (full logits as stored: {full['bytes_per_token_stored']:.0f} B, "
            f"{full['stored_dtype']}; fp16 would be {full['bytes_per_token_fp16']} B):", "",
            "| k | stored B/token | fraction of full (stored) | compact B/token (fp16+int16) | fraction of fp16 full |",
            "|---:|---:|---:|---:|---:|"]
    for k, s in sorted(sizes["topk"].items(), key=lambda kv: int(kv[0])):
        out.append(f"| {k} | {s['bytes_per_token_stored']:.0f} | {s['fraction_of_full_stored']:.4f} | "
                   f"{s['bytes_per_token_compact']} | {s['fraction_of_full_fp16']:.4f} |")

    gaps = report.get("topk_gap", {})
    if gaps:
        out += ["", "Top-k training vs full-logit forward-KL training (same steps); loss approximation gap at init "
                "(full forward KL − top-k coarsened KL, same student, transfer set):", "",
                "| student | k | held-out KL (top-k) | held-out KL (full) | KL gap | ppl gap | transfer KL gap "
                "| loss approx gap at init |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for student, per_k in gaps.items():
            for k, g in sorted(per_k.items(), key=lambda kv: int(kv[0])):
                out.append(
                    f"| {student} | {k} | {_fmt(g.get('heldout_kl_topk'), '.4f')} | {_fmt(g.get('heldout_kl_full'), '.4f')} "
                    f"| {_fmt(g.get('heldout_kl_gap'), '+.4f')} | {_fmt(g.get('heldout_ppl_gap'), '+.4f')} | "
                    f"{_fmt(g.get('transfer_kl_gap'), '+.4f')} | {_fmt(g.get('init_loss_gap'), '.4f')} |")

    trl = report.get("trl_comparison", [])
    if trl:
        out += ["", f"hf_distill vs TRL {report.get('trl_version')} GKDTrainer, same task, data, steps and settings "
                "(medians of back-to-back pairs; ratios ours / TRL):", "",
                "| student | task | pairs | our tokens/s | TRL tokens/s | tokens/s ratio | our extra peak MB | TRL extra peak MB "
                "| extra peak ratio | peak RSS ratio | our held-out KL | TRL held-out KL | on-policy steps ours / TRL |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in trl:
            out.append(
                f"| {c['student']} | {c['task']} | {c['repeats']} | {c['ours_tokens_per_second']:.0f} | {c['trl_tokens_per_second']:.0f} | "
                f"{c['tokens_per_second_ratio']:.2f} | {c['ours_extra_peak_mb']:.1f} | {c['trl_extra_peak_mb']:.1f} | "
                f"{c['extra_peak_ratio']:.2f} | {c['peak_rss_ratio']:.2f} | {c['ours_heldout_kl']:.4f} | "
                f"{c['trl_heldout_kl']:.4f} | {c['ours_on_policy_steps']} / {c['trl_on_policy_steps']} |")
    return "\n".join(out)


def _summaries(report: dict[str, Any], init_gaps: dict[str, dict[int, dict[str, float]]], main_k: int) -> None:
    by_key = {(r["student"], r["method"]): r.get("result") or {} for r in report["runs"]}
    gaps: dict[str, dict[int, dict[str, Any]]] = {}
    for (student, method), r in by_key.items():
        if not method.startswith("topk") or "heldout" not in r:
            continue
        k = int(method[4:])
        full = by_key.get((student, "fkl"), {})
        g: dict[str, Any] = {"heldout_kl_topk": r["heldout"]["kl"],
                             "init_loss_gap": init_gaps.get(student, {}).get(k, {}).get("gap")}
        if "heldout" in full:
            g.update(heldout_kl_full=full["heldout"]["kl"], heldout_kl_gap=r["heldout"]["kl"] - full["heldout"]["kl"],
                     heldout_ppl_gap=r["heldout"]["ppl"] - full["heldout"]["ppl"],
                     transfer_kl_gap=r["transfer"]["kl"] - full["transfer"]["kl"])
        gaps.setdefault(student, {})[k] = g
    report["topk_gap"] = gaps
    comparison = []
    pairs = [r for r in report.get("trl_runs", []) if "tokens_per_second" in (r.get("result") or {})]
    for student, task in sorted({(r["student"], r["pair_task"]) for r in pairs}):
        ours = [r["result"] for r in pairs if (r["student"], r["method"]) == (student, task)]
        trl = [r["result"] for r in pairs if (r["student"], r["method"]) == (student, f"trl_{task}")]
        if not ours or not trl:
            continue

        def med(results: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in results)

        comparison.append({
            "student": student, "task": task, "repeats": min(len(ours), len(trl)),
            "ours_tokens_per_second": med(ours, "tokens_per_second"), "trl_tokens_per_second": med(trl, "tokens_per_second"),
            "tokens_per_second_ratio": med(ours, "tokens_per_second") / med(trl, "tokens_per_second"),
            "ours_extra_peak_mb": med(ours, "extra_peak_mb"), "trl_extra_peak_mb": med(trl, "extra_peak_mb"),
            "extra_peak_ratio": med(ours, "extra_peak_mb") / med(trl, "extra_peak_mb") if med(trl, "extra_peak_mb") > 0
            else None,
            "peak_rss_ratio": med(ours, "peak_rss_mb") / med(trl, "peak_rss_mb"),
            "ours_heldout_kl": statistics.median(r["heldout"]["kl"] for r in ours),
            "trl_heldout_kl": statistics.median(r["heldout"]["kl"] for r in trl),
            "ours_on_policy_steps": sum(r.get("on_policy_steps", 0) for r in ours),
            "trl_on_policy_steps": sum(r.get("on_policy_steps", 0) for r in trl),
            "ours_tokens_per_second_runs": [r["tokens_per_second"] for r in ours],
            "trl_tokens_per_second_runs": [r["tokens_per_second"] for r in trl],
        })
    report["trl_comparison"] = comparison


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare the data once, then run every planned run in its own subprocess."""
    import datasets
    import torch

    datasets.disable_progress_bars()

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    teacher, tokenizer = load_teacher(Path(args.model_dir))
    data = prepare_data(args, teacher, tokenizer)
    print(f"data: {data['train_examples']} transfer samples ({data['train_completion_tokens']} completion tokens), "
          f"{data['heldout_examples']} held-out samples; prepared in {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    from datasets import load_from_disk

    train = load_from_disk(data["paths"]["train"])
    ks = sorted(set(args.topk_ks) | {args.main_k})
    init_gaps = {s: topk_loss_gap(build_student(s, teacher), teacher, train, tokenizer, ks, args.temperature)
                 for s in args.students}
    trl_version = None
    if args.with_trl:
        import trl

        trl_version = trl.__version__
    report: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
        "teacher": {"parameters": sum(p.numel() for p in teacher.parameters()), "config": teacher.config.to_dict()},
        "data": data, "trl_version": trl_version, "init_topk_loss_gap": init_gaps,
        "runs": [],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(data, handle)
        data_file = handle.name
    report["trl_runs"] = []
    try:
        plans = [("runs", spec) for spec in planned_runs(args)]
        if args.with_trl:
            plans += [("trl_runs", spec) for spec in planned_trl_pairs(args)]
        for key, spec in plans:
            run = dict(spec, result=spawn_worker(__file__, spec, args, data_file))
            r = run["result"]
            summary = r.get("error", "")[:300] or (
                f"held-out KL {r['heldout']['kl']:.4f}, ppl {r['heldout']['ppl']:.3f}"
                + (f", {r['tokens_per_second']:.0f} tok/s, +{r['extra_peak_mb']:.1f} MB" if "tokens_per_second" in r else ""))
            print(f"  [{key}] {spec['student']}/{spec['method']}: {summary}", file=sys.stderr, flush=True)
            report[key].append(run)
    finally:
        Path(data_file).unlink(missing_ok=True)
    _summaries(report, init_gaps, args.main_k)
    report["wall_seconds"] = time.perf_counter() - started
    return report


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` shrinks the run to a smoke test."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", default=str(DEFAULT_TEACHER_DIR), help="Folder with stories260K.bin and tok512.model.")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps of every run.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=1.0, help="Distillation temperature (and of the top-k cache).")
    parser.add_argument("--sample_temperature", type=float, default=1.0, help="Sampling temperature of the teacher.")
    parser.add_argument("--num_prompts", type=int, default=len(STORY_OPENINGS), help="Transfer-set openings to use.")
    parser.add_argument("--samples_per_prompt", type=int, default=4, help="Teacher samples per transfer opening.")
    parser.add_argument("--heldout_samples_per_prompt", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Teacher (and on-policy) completion length.")
    parser.add_argument("--max_length", type=int, default=96, help="Prompt + completion tokens.")
    parser.add_argument("--students", nargs="+", default=["layers", "narrow"], choices=["layers", "narrow"])
    parser.add_argument("--methods", nargs="+", default=["init", "sft", "fkl", "rkl", "jsd", "topk", "onpolicy_jsd"],
                        help="Runs per student; 'topk' expands to --main_k and every --topk_ks.")
    parser.add_argument("--main_k", type=int, default=32, help="k of the top-k row in the main comparison.")
    parser.add_argument("--topk_ks", type=int, nargs="+", default=[8, 32, 128], help="k values of the top-k gap study.")
    parser.add_argument("--lmbda", type=float, default=0.5, help="On-policy probability per step of the on-policy runs.")
    parser.add_argument("--with_trl", action="store_true", help="Also run JSD(0.5) with TRL's GKDTrainer as a peer.")
    parser.add_argument("--trl_repeats", type=int, default=3,
                        help="Back-to-back (ours, TRL) pairs per task for the ratios (medians; order alternates).")
    parser.add_argument("--trl_students", nargs="*", default=["layers"], help="Students of the TRL comparison.")
    parser.add_argument("--trl_tasks", nargs="+", default=["jsd", "onpolicy_jsd"], choices=["jsd", "onpolicy_jsd"],
                        help="Tasks of the TRL comparison.")
    parser.add_argument("--fused_lm_loss", default="auto", choices=["auto", "true", "false"],
                        help="Our runs' --fused_lm_loss: the loss from hidden states through each lm_head, or full logits.")
    parser.add_argument("--seed", type=int, default=0, help="Training seed of every run (and the narrow student's init).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 keeps timings stable).")
    parser.add_argument("--cache_dir", default="bench_results/causal_lm_cache")
    parser.add_argument("--output", default="bench_results/causal_lm.json")
    parser.add_argument("--quick", action="store_true", help="One student, 20 steps, 10 openings × 1 sample, k = 8/32.")
    parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker_data", help=argparse.SUPPRESS)
    parser.add_argument("--worker_result", help=argparse.SUPPRESS)
    parser.add_argument("--worker_args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker_spec:
        args.steps, args.num_prompts, args.samples_per_prompt, args.heldout_samples_per_prompt = 20, 10, 1, 1
        args.students, args.topk_ks = args.students[:1], [8, 32]
        args.methods, args.trl_repeats = ["init", "sft", "jsd", "topk", "onpolicy_jsd"], 1
        args.cache_dir = str(Path(args.cache_dir).with_name(Path(args.cache_dir).name + "_quick"))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    """Run the benchmark, or (with the hidden worker flags) one run."""
    args = parse_args(argv)
    if args.worker_spec:
        run_args = argparse.Namespace(**json.loads(args.worker_args))
        data = json.loads(Path(args.worker_data).read_text())
        result = run_worker(json.loads(args.worker_spec), run_args, data)
        Path(args.worker_result).write_text(json.dumps(result))
        return None
    report = run_benchmark(args)
    print(f"stories260K distillation, {args.steps} steps × batch {args.batch_size}, lr {args.learning_rate}, "
          f"T={args.temperature}, {args.threads} thread(s); command: "
          f"python benchmarks/bench_causal_lm.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print()
    print(markdown_tables(report))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nWrote {output} in {report['wall_seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
