"""Benchmark (not a test): distillation across tokenizers, stories260K into a student with its own tokenizer (issue 14).

Setup
    * Teacher: ``../shared/data/models/stories260K`` (llama2.c, vocabulary 512, SentencePiece with byte fallback).
    * Data: teacher samples (temperature 1, from BOS, ``--max_new_tokens``): ``--train_samples`` for training and
      ``--heldout_samples`` with another seed for evaluation. Rows are ``{"prompt": "", "completion": text}``.
    * Student tokenizer: byte-level BPE with ``--student_vocab`` entries, trained here with ``tokenizers`` on the
      training samples (BOS ``<s>``, EOS ``</s>``).
    * Students: a random-init Llama (``--dim``, ``--layers``), the same size for every run; only the vocabulary
      (and so the embedding rows) differs between the BPE and the SentencePiece student.

Runs (``--seeds`` each, the same steps, batch and learning rate, all with :class:`hf_distill.DistillationTrainer`):
    ``seqkd``   BPE student, alpha = 0: CE on the teacher samples (sequence-level KD, the only option before);
    ``uld``     BPE student, cross-tokenizer mode, ``cross_tokenizer_loss=uld``, alpha = ``--alpha``;
    ``hybrid``  BPE student, cross-tokenizer mode, ``cross_tokenizer_loss=hybrid``, alpha = ``--alpha``;
    ``same_seqkd`` SentencePiece student (the teacher's tokenizer), alpha = 0: sequence-level KD on that tokenizer;
    ``same_fkl`` SentencePiece student, forward KL, alpha = ``--alpha`` (the reference the issue names).

The summary gives the share of the seqkd → same_fkl gap that hybrid closes, and, since the two tokenizers give
students of different quality on their own, also hybrid's gain over seqkd against forward KL's gain over
sequence-level KD on the teacher's tokenizer (same_seqkd → same_fkl).

Metric (independent of both tokenizers): held-out bits per character, the student's NLL of each held-out
completion's tokens (EOS excluded) in bits, summed, over the completions' characters. Each tokenizer encodes the
whole text, so the measure is the code length of the same characters. Also train tokens/s (student completion
tokens / train wall time) and characters/s (the same for the text's characters: equal work whatever the
tokenizer), and the hybrid run's ratios to the same-tokenizer run (the cost of alignment and the group loss).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cross_tokenizer.py            # 3 seeds x 4 runs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cross_tokenizer.py --quick    # a smoke run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cross_tokenizer.py --speed    # the step-cost comparison

Speed mode (``--speed``): the cost of alignment and the group loss in one run. The same BPE student (same init),
the same rows in the same order, the same steps; the cross-tokenizer step (stories260K teacher on its own
SentencePiece tokens, hybrid loss) against the same-tokenizer forward-KL step (a teacher of stories260K's shape
whose vocabulary is the student's BPE, random weights: the same compute but for the vocabulary). The two
alternate, ``--speed_repeats`` times (after one warm-up each) for ``--speed_steps`` optimizer steps; the report
gives each one's median student completion tokens/s and their ratio (cross / same; the cost is 1 / ratio − 1).
The teacher's forward is timed apart: on its own SentencePiece tokens it reads longer sequences than on the
student's BPE (more tokens per character), which is not alignment or loss; ``alignment_and_loss_cost`` is the
step-time difference less the teacher-forward difference, over the same-tokenizer step time.

Prints a markdown table and writes ``bench_results/cross_tokenizer.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

RUNS = ("seqkd", "uld", "hybrid", "same_seqkd", "same_fkl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--train_samples", type=int, default=512)
    p.add_argument("--heldout_samples", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--student_vocab", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="T of the KD terms; at 1 the KL groups (scaled by T²) and the ULD groups weigh alike")
    p.add_argument("--no_temperature_squared", action="store_true",
                   help="KD runs without the T² factor (scale_by_temperature_squared=False)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke run")
    p.add_argument("--output", default="bench_results/cross_tokenizer.json")
    p.add_argument("--add_to", help="the JSON of an earlier run with the same settings: its runs join this one's")
    p.add_argument("--speed", action="store_true", help="compare step cost only (see the module docstring)")
    p.add_argument("--speed_repeats", type=int, default=5)
    p.add_argument("--speed_steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.quick:
        args.train_samples, args.heldout_samples, args.max_new_tokens, args.steps, args.seeds = 48, 16, 32, 6, [0]
        args.student_vocab, args.speed_repeats, args.speed_steps = 300, 2, 2
    return args


def teacher_and_tokenizer(data: Path):
    from hf_distill.llama2c import convert_llama2c_checkpoint, convert_llama2c_tokenizer

    folder = data / "models" / "stories260K"
    return convert_llama2c_checkpoint(folder / "stories260K.bin"), convert_llama2c_tokenizer(folder / "tok512.model")


def teacher_samples(teacher, tokenizer, n: int, max_new_tokens: int, seed: int) -> list[str]:
    torch.manual_seed(seed)
    texts = []
    for start in range(0, n, 64):
        prompt = torch.full((min(64, n - start), 1), tokenizer.bos_token_id)
        with torch.no_grad():
            out = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                   top_k=0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
        texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return [t for t in texts if t]


def byte_bpe(vocab_size: int, corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def student(vocab_size: int, args: argparse.Namespace, seed: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.dim, intermediate_size=args.dim * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def bits_per_character(model, data, texts: list[str], eos_id: int) -> float:
    """Σ NLL of the completion tokens (EOS excluded), in bits, / Σ characters of the completions."""
    total = 0.0
    model.eval()
    with torch.no_grad():
        for row in data:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            labels = labels.masked_fill(labels == eos_id, -100)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                       ignore_index=-100, reduction="sum").item()
    return total / math.log(2) / sum(len(t) for t in texts)


def one_run(name: str, seed: int, ctx: dict, args: argparse.Namespace) -> dict:
    from hf_distill import DistillationArguments, DistillationTrainer
    from hf_distill.lm.data import CompletionCollator

    same = name.startswith("same_")
    tok = ctx["sp"] if same else ctx["bpe"]
    train, held = (ctx["sp_train"], ctx["sp_held"]) if same else (ctx["x_train"], ctx["x_held"])
    model = student(len(tok), args, seed, tok)
    with tempfile.TemporaryDirectory() as out:
        targs = DistillationArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
            alpha=0.0 if name in ("seqkd", "same_seqkd") else args.alpha, temperature=args.temperature, cross_tokenizer_loss="uld" if name == "uld" else "hybrid",
            scale_by_temperature_squared=not args.no_temperature_squared,
            report_to=[], save_strategy="no", logging_steps=max(1, args.steps // 5), use_cpu=True, seed=seed,
            disable_tqdm=True, preflight=False, dataloader_num_workers=0)
        extra = dict(data_collator=CompletionCollator(tok)) if same else dict(teacher_processing_class=ctx["sp"])
        trainer = DistillationTrainer(model, ctx["teacher"], targs, train_dataset=train, processing_class=tok, **extra)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = sum(sum(1 for x in r["labels"] if x != -100) for r in train)
    epochs = args.steps * args.batch_size / len(train)  # every row the same number of times, on average
    return {"bpc": bits_per_character(trainer.model, held, ctx["held_texts"], tok.eos_token_id),
            "train_seconds": seconds, "tokens_per_second": tokens * epochs / seconds,
            "characters_per_second": sum(len(t) for t in ctx["train_texts"]) * epochs / seconds,
            "cross_tokenizer": trainer.cross is not None}


def _speed_trainer(kind: str, ctx: dict, args: argparse.Namespace, out: str):
    """A trainer for ``--speed_steps`` steps: ``cross`` (stories260K on its own tokens, hybrid) or ``same``
    (the teacher of stories260K's shape over the student's BPE, forward KL); the same student init and rows."""
    from hf_distill import DistillationArguments, DistillationTrainer
    from hf_distill.lm.data import CompletionCollator

    bpe = ctx["bpe"]
    targs = DistillationArguments(
        output_dir=out, max_steps=args.speed_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, alpha=args.alpha, temperature=args.temperature, report_to=[],
        save_strategy="no", logging_steps=args.speed_steps, use_cpu=True, seed=0, disable_tqdm=True, preflight=False,
        dataloader_num_workers=0)
    model = student(len(bpe), args, 0, bpe)
    if kind == "cross":
        return DistillationTrainer(model, ctx["teacher"], targs, train_dataset=ctx["x_train"], processing_class=bpe,
                                   teacher_processing_class=ctx["sp"])
    return DistillationTrainer(model, ctx["bpe_teacher"], targs, train_dataset=ctx["bpe_train"], processing_class=bpe,
                               data_collator=CompletionCollator(bpe))


def speed(ctx: dict, args: argparse.Namespace) -> dict:
    """Median student completion tokens/s of the two steps, alternating (module docstring), and their ratio."""
    from transformers import LlamaForCausalLM

    from hf_distill.lm.data import tokenize_completions

    torch.manual_seed(0)
    ctx["bpe_teacher"] = LlamaForCausalLM(ctx["teacher"].config.__class__(
        **{**ctx["teacher"].config.to_dict(), "vocab_size": len(ctx["bpe"]), "bos_token_id": ctx["bpe"].bos_token_id,
           "eos_token_id": ctx["bpe"].eos_token_id, "pad_token_id": ctx["bpe"].pad_token_id})).eval()
    rows = [{"prompt": "", "completion": t} for t in ctx["train_texts"]]
    ctx["bpe_train"] = tokenize_completions(rows, ctx["bpe"], max_length=2 * args.max_new_tokens + 8)
    assert ctx["bpe_train"]["input_ids"] == ctx["x_train"]["input_ids"]  # the same student rows
    per_row = statistics.mean(sum(1 for x in r if x != -100) for r in ctx["bpe_train"]["labels"])
    tokens = per_row * args.speed_steps * args.batch_size
    times: dict[str, list[float]] = {"same": [], "cross": []}
    teacher_times: dict[str, list[float]] = {"same": [], "cross": []}
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.speed_repeats + 1):  # the first round warms up
            for kind in ("same", "cross"):
                trainer = _speed_trainer(kind, ctx, args, out)
                spent = _time_teacher_forward(trainer)
                start = time.perf_counter()
                trainer.train()
                if repeat:
                    times[kind].append(time.perf_counter() - start)
                    teacher_times[kind].append(sum(spent))
    same_s, cross_s = (statistics.median(times[k]) for k in ("same", "cross"))
    teacher_extra = statistics.median(teacher_times["cross"]) - statistics.median(teacher_times["same"])
    return {"same_tokens_per_second": tokens / same_s, "cross_tokens_per_second": tokens / cross_s,
            "ratio": same_s / cross_s, "cost": cross_s / same_s - 1,
            "teacher_forward_extra": teacher_extra / same_s,
            "alignment_and_loss_cost": (cross_s - same_s - teacher_extra) / same_s,
            "seconds": times, "teacher_forward_seconds": teacher_times, "steps": args.speed_steps,
            "repeats": args.speed_repeats}


def _time_teacher_forward(trainer) -> list[float]:
    """Wrap the trainer's teacher forward to record the seconds of each call."""
    spent: list[float] = []
    forward = trainer.teacher_forward

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return forward(*a, **k)
        finally:
            spent.append(time.perf_counter() - start)

    trainer.teacher_forward = timed
    return spent


def prepare(args: argparse.Namespace) -> dict:
    from hf_distill.lm.cross_tokenizer_data import tokenize_aligned
    from hf_distill.lm.data import tokenize_completions

    teacher, sp = teacher_and_tokenizer(Path(args.data))
    train_texts = teacher_samples(teacher, sp, args.train_samples, args.max_new_tokens, seed=1234)
    held_texts = teacher_samples(teacher, sp, args.heldout_samples, args.max_new_tokens, seed=5678)
    bpe = byte_bpe(args.student_vocab, train_texts)
    rows = lambda texts: [{"prompt": "", "completion": t} for t in texts]  # noqa: E731
    length = 2 * args.max_new_tokens + 8
    ctx = dict(teacher=teacher, sp=sp, bpe=bpe, held_texts=held_texts, train_texts=train_texts,
               x_train=tokenize_aligned(rows(train_texts), bpe, sp, max_length=length),
               x_held=tokenize_aligned(rows(held_texts), bpe, sp, max_length=length),
               sp_train=tokenize_completions(rows(train_texts), sp, max_length=length),
               sp_held=tokenize_completions(rows(held_texts), sp, max_length=length))
    return ctx


def summarise(results: dict, args: argparse.Namespace) -> dict:
    summary = {}
    for name, runs in results.items():
        values = [r["bpc"] for r in runs]
        summary[name] = {"bpc_mean": statistics.mean(values), "bpc_std": statistics.pstdev(values),
                         "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in runs),
                         "characters_per_second": statistics.mean(r["characters_per_second"] for r in runs)}
    if {"seqkd", "hybrid", "same_fkl"} <= set(summary):
        gap = summary["seqkd"]["bpc_mean"] - summary["same_fkl"]["bpc_mean"]
        closed = summary["seqkd"]["bpc_mean"] - summary["hybrid"]["bpc_mean"]
        summary["hybrid_gap_closed"] = closed / gap if gap > 0 else None
    if {"seqkd", "hybrid", "same_seqkd", "same_fkl"} <= set(summary):
        same_gain = summary["same_seqkd"]["bpc_mean"] - summary["same_fkl"]["bpc_mean"]
        gain = summary["seqkd"]["bpc_mean"] - summary["hybrid"]["bpc_mean"]
        summary["hybrid_gain_over_same_tokenizer_kd_gain"] = gain / same_gain if same_gain > 0 else None
    if "hybrid" in summary and "same_fkl" in summary:
        for unit in ("tokens", "characters"):  # the same text is fewer BPE tokens: characters/s compares equal work
            summary[f"hybrid_{unit}_per_second_vs_same"] = (summary["hybrid"][f"{unit}_per_second"]
                                                          / summary["same_fkl"][f"{unit}_per_second"])
    return summary


def table(summary: dict) -> str:
    lines = ["| run | held-out bits/char (mean ± sd) | train tokens/s | train characters/s |", "|---|---|---|---|"]
    for name in RUNS:
        if name in summary:
            s = summary[name]
            lines.append(f"| {name} | {s['bpc_mean']:.4f} ± {s['bpc_std']:.4f} | {s['tokens_per_second']:.0f} | "
                         f"{s['characters_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ctx = prepare(args)
    if args.speed:
        report = {"config": vars(args), "speed": speed(ctx, args)}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print({k: v for k, v in report["speed"].items() if k != "seconds"})
        return 0
    results = {name: [] for name in args.runs}
    for seed in args.seeds:
        for name in args.runs:
            results[name].append(one_run(name, seed, ctx, args) | {"seed": seed})
            print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
    if args.add_to:
        results = {**json.loads(Path(args.add_to).read_text())["results"], **results}
    summary = summarise(results, args)
    report = {"config": vars(args), "vocab": {"teacher": len(ctx["sp"]), "student_bpe": len(ctx["bpe"])},
              "results": results, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(table(summary))
    print({k: v for k, v in summary.items() if not isinstance(v, dict)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
