"""Benchmark (not a test): memory and time of one training step's token-level loss, logits included.

N loss tokens with hidden states of width H (student and teacher), both ``lm_head`` weights [V, H], fp32 on CPU.
The loss is ``alpha · forward-KL(T) · T² + (1 − alpha) · CE`` summed over tokens and divided by N; one forward and
one backward (gradients for the student's hidden states and ``lm_head`` weight). Variants:

* ``naive``: full logits from both heads (h Wᵀ), ``F.log_softmax`` + ``F.kl_div`` + ``F.cross_entropy``, autograd;
* ``current``: full logits from both heads + :func:`hf_distill.losses.logits.fused_forward_kl_and_ce` (today's trainer);
* ``fused``: :func:`hf_distill.losses.fused_linear.fused_linear_distillation_loss` from the hidden states and weights;
* ``fused_kd``: the same, forward KL(T) only, mean over tokens, no T²: exactly the loss of ``trl``;
* ``trl``: TRL 1.16's ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (beta = 0, forward KL), if TRL
  imports (``--trl_path`` adds a folder, e.g. one made with ``pip install --no-deps --target /tmp/trl trl==1.16.0``).

Each measurement is a fresh subprocess: the inputs are created, the variant is warmed up on 8 rows, the peak-RSS
counter is reset, then one step runs; "extra peak" is peak RSS after minus RSS before (the inputs, i.e. the hidden
states and weights, are not counted; the weight gradient [V, H] is, in every variant). Variants alternate within
each repeat; medians over repeats. A naive step whose logits would exceed ``--naive_max_logits`` is measured at two
smaller N and extrapolated linearly to N (its memory and time are affine in N); the table says so.

    .venv/bin/python benchmarks/bench_lm_memory.py --trl_path /tmp/trl --repeats 3 1   # V = 32,000 and 128,256
    .venv/bin/python benchmarks/bench_lm_memory.py --quick                              # tiny sizes, seconds

Prints a markdown table and writes ``bench_results/lm_memory.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loss_memory import peak_kb, reset_peak, rss_kb  # noqa: E402

VARIANTS = ("naive", "current", "fused", "fused_kd", "trl")
#: The loss each variant computes ("mix": alpha·KD·T² + (1 − alpha)·CE; "kd": mean forward KL(T), TRL's loss).
LOSS_OF = {"naive": "mix", "current": "mix", "fused": "mix", "fused_kd": "kd", "trl": "kd"}
GOALS = {"naive_ratio": {32000: 0.10, 128256: 0.05}, "trl_memory_ratio": 1.0, "trl_speed_ratio": 1.0}


# ----------------------------------------------------------------------------------------------
# One step of each variant
# ----------------------------------------------------------------------------------------------
def make_inputs(tokens: int, hidden: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    """Student/teacher hidden states [N, H] and lm_head weights [V, H] (logits of std ≈ 2), labels, unit weights."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = 2.0 / hidden**0.5
    return {
        "student_hidden": torch.randn(tokens, hidden, generator=g).requires_grad_(True),
        "student_weight": (scale * torch.randn(vocab, hidden, generator=g)).requires_grad_(True),
        "teacher_hidden": torch.randn(tokens, hidden, generator=g),
        "teacher_weight": scale * torch.randn(vocab, hidden, generator=g),
        "labels": torch.randint(0, vocab, (tokens,), generator=g),
        "weights": torch.ones(tokens),
    }


def _trl_loss():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


def step_loss(variant: str, x: dict[str, Any], *, temperature: float, alpha: float, chunk_size: int) -> "Any":
    """The variant's loss (a differentiable scalar) on inputs from :func:`make_inputs`."""
    import torch
    import torch.nn.functional as F

    from hf_distill.losses.fused_linear import fused_linear_distillation_loss
    from hf_distill.losses.logits import fused_forward_kl_and_ce

    n, t = x["labels"].shape[0], temperature
    teacher = dict(teacher_hidden=x["teacher_hidden"], teacher_weight=x["teacher_weight"])
    if variant in ("naive", "current"):
        student_logits = x["student_hidden"] @ x["student_weight"].t()
        with torch.no_grad():
            teacher_logits = x["teacher_hidden"] @ x["teacher_weight"].t()
    if variant == "naive":
        log_q, log_p = F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1)
        kd = F.kl_div(log_q, log_p, reduction="sum", log_target=True) * t**2
        return (alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, x["labels"], reduction="sum")) / n
    if variant == "current":
        total, _ = fused_forward_kl_and_ce(student_logits, teacher_logits, x["labels"], x["weights"], (alpha, 1 - alpha),
                                           temperature=t, chunk_size=chunk_size)
        return total / n
    if variant in ("fused", "fused_kd"):
        kd_only = variant == "fused_kd"
        total, _ = fused_linear_distillation_loss(
            x["student_hidden"], x["student_weight"], None if kd_only else x["labels"], x["weights"],
            (1.0, 0.0) if kd_only else (alpha, 1 - alpha), **teacher, loss="forward_kl", temperature=t,
            scale_by_temperature_squared=not kd_only, chunk_size=chunk_size)
        return total / n
    if variant == "trl":
        loss, _entropy, _count = _trl_loss()(
            x["student_hidden"][None], x["teacher_hidden"][None], x["student_weight"], x["teacher_weight"],
            torch.ones(1, n, dtype=torch.long), beta=0.0, temperature=t)
        return loss
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this fresh process: extra peak RSS and time of one step, the loss, gradient samples."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    options = dict(temperature=args.temperature, alpha=args.alpha, chunk_size=args.chunk_size)
    small = make_inputs(8, args.hidden, args.vocab, seed=1)  # warm-up: kernels, thread pools, imports
    step_loss(args.variant, small, **options).backward()
    del small
    gc.collect()
    x = make_inputs(args.tokens, args.hidden, args.vocab, seed=args.seed)
    reset = reset_peak()
    before = rss_kb()
    start = time.perf_counter()
    loss = step_loss(args.variant, x, **options)
    loss.backward()
    seconds = time.perf_counter() - start
    extra_kb = max(peak_kb() - before, 0)
    if args.save_grad:
        np.savez(args.save_grad, hidden=x["student_hidden"].grad.numpy(), weight=x["student_weight"].grad[:256].numpy())
    return {"extra_peak_mb": extra_kb / 1024.0, "seconds": seconds, "loss": float(loss.detach()), "peak_reset": reset}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def trl_status(trl_path: Optional[str]) -> dict[str, Any]:
    """Whether ``_chunked_divergence_loss`` imports (in a subprocess), with TRL's version and the signature."""
    code = ("import inspect, json, trl; from trl.trainer.distillation_trainer import _chunked_divergence_loss as f; "
            "print(json.dumps({'version': trl.__version__, 'signature': str(inspect.signature(f))}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(trl_path), check=False)
    if done.returncode != 0:
        return {"available": False, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
    return {"available": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def _env(trl_path: Optional[str]) -> dict[str, str]:
    env = dict(os.environ)
    if trl_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (trl_path, env.get("PYTHONPATH")) if p)
    return env


def measured_rows(tokens: int, vocab: int, max_logits: int) -> list[int]:
    """The N at which naive is measured: N itself, or two smaller N (cap // V and half that) to extrapolate from."""
    if max_logits <= 0 or tokens * vocab <= max_logits:
        return [tokens]
    largest = max(2, max_logits // vocab)
    return [largest // 2, largest]


def extrapolate(points: Sequence[tuple[int, float]], tokens: int) -> float:
    """The value at ``tokens`` of the line through two (N, value) points (the value itself for one point)."""
    if len(points) == 1:
        return points[0][1]
    (n1, v1), (n2, v2) = points
    return v1 + (v2 - v1) * (tokens - n1) / (n2 - n1)


def _spawn(args: argparse.Namespace, variant: str, vocab: int, tokens: int, save_grad: Optional[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--vocabs", str(vocab),
               "--tokens", str(tokens), "--hidden", str(args.hidden), "--chunk_size", str(args.chunk_size),
               "--temperature", str(args.temperature), "--alpha", str(args.alpha), "--threads", str(args.threads),
               "--seed", str(args.seed)] + (["--save_grad", save_grad] if save_grad else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=_env(args.trl_path if variant == "trl" else None))
    if done.returncode != 0:
        raise RuntimeError(f"worker {variant} V={vocab} N={tokens} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_vocab(args: argparse.Namespace, vocab: int, variants: Sequence[str], repeats: int, tmp: str) -> list[dict]:
    """Every variant ``repeats`` times, alternating, in fresh processes; medians (extrapolated for a capped naive)."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(repeats):
        for variant in variants:
            sizes = measured_rows(args.tokens, vocab, args.naive_max_logits) if variant == "naive" else [args.tokens]
            for n in sizes:
                save = os.path.join(tmp, f"{variant}-{vocab}.npz") if repeat == 0 and n == args.tokens else None
                result = _spawn(args, variant, vocab, n, save)
                runs.setdefault((variant, n), []).append(result)
                print(f"  V={vocab} {variant} N={n} #{repeat}: +{result['extra_peak_mb']:.0f} MB, "
                      f"{result['seconds']:.2f} s", file=sys.stderr, flush=True)
    rows = []
    for variant in variants:
        sizes = sorted(n for v, n in runs if v == variant)
        median = {key: [(n, statistics.median(r[key] for r in runs[(variant, n)])) for n in sizes]
                  for key in ("extra_peak_mb", "seconds")}
        full = runs.get((variant, args.tokens))
        rows.append({
            "vocab": vocab, "variant": variant, "loss_kind": LOSS_OF[variant], "measured_tokens": sizes,
            "extrapolated": sizes != [args.tokens],
            "extra_peak_mb": extrapolate(median["extra_peak_mb"], args.tokens),
            "seconds": extrapolate(median["seconds"], args.tokens),
            "loss": full[0]["loss"] if full else None,
            "grad_file": os.path.join(tmp, f"{variant}-{vocab}.npz") if full else None,
            "runs": {str(n): runs[(variant, n)] for n in sizes},
        })
    return rows


def _reference(rows: list[dict], row: dict) -> Optional[dict]:
    """The row a variant's loss and gradients are compared with: naive (or current, when naive was extrapolated)
    for the mixed loss, fused_kd for TRL's loss."""
    order = ("naive", "current") if row["loss_kind"] == "mix" else ("fused_kd",)
    for name in order:
        for other in rows:
            if other["vocab"] == row["vocab"] and other["variant"] == name and other["grad_file"]:
                return other
    return None


def _grad_diff(path_a: str, path_b: str) -> dict[str, float]:
    a, b = np.load(path_a), np.load(path_b)
    return {key: float(np.abs(a[key] - b[key]).max()) for key in ("hidden", "weight")}


def summarise(rows: list[dict]) -> None:
    """Add ratios to naive and to TRL (memory, speed = TRL time / time) and the agreement with the reference row."""
    for row in rows:
        same = {r["variant"]: r for r in rows if r["vocab"] == row["vocab"]}
        naive, trl = same.get("naive"), same.get("trl")
        row["ratio_to_naive"] = row["extra_peak_mb"] / naive["extra_peak_mb"] if naive else None
        row["ratio_to_trl"] = row["extra_peak_mb"] / trl["extra_peak_mb"] if trl else None
        row["speed_vs_trl"] = trl["seconds"] / row["seconds"] if trl else None
        ref = _reference(rows, row)
        agree = ref is not None and ref is not row and row["grad_file"] is not None
        row["reference"] = ref["variant"] if agree else None
        row["loss_abs_diff"] = abs(row["loss"] - ref["loss"]) if agree else None
        row["grad_max_abs_diff"] = _grad_diff(ref["grad_file"], row["grad_file"]) if agree else None


def goals(rows: list[dict]) -> dict[str, Any]:
    """The issue's goals per vocabulary: fused ≤ 10% (32k) / 5% (128k) of naive; fused_kd ≤ 1.0× TRL's memory at
    ≥ 1.0× its speed (None where a variant was not run)."""
    out: dict[str, Any] = {}
    for vocab in sorted({r["vocab"] for r in rows}):
        same = {r["variant"]: r for r in rows if r["vocab"] == vocab}
        limit = GOALS["naive_ratio"].get(vocab, GOALS["naive_ratio"][128256] if vocab > 32000 else 0.10)
        fused, kd = same.get("fused"), same.get("fused_kd")
        goal: dict[str, Any] = {"naive_ratio_limit": limit}
        goal["fused_vs_naive_met"] = (fused["ratio_to_naive"] <= limit
                                      if fused and fused["ratio_to_naive"] is not None else None)
        has_trl = kd is not None and kd["ratio_to_trl"] is not None
        goal["fused_kd_vs_trl_memory_met"] = kd["ratio_to_trl"] <= GOALS["trl_memory_ratio"] if has_trl else None
        goal["fused_kd_vs_trl_speed_met"] = kd["speed_vs_trl"] >= GOALS["trl_speed_ratio"] if has_trl else None
        out[str(vocab)] = goal
    return out


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = ["| V | variant | loss | extra peak MB | × naive | × TRL | time s | speed vs TRL | vs | abs Δ loss "
             "| max abs Δ ∂h | max abs Δ ∂W |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        note = f" (extrapolated from N = {', '.join(map(str, r['measured_tokens']))})" if r["extrapolated"] else ""
        diff = r["grad_max_abs_diff"] or {}
        lines.append(
            f"| {r['vocab']:,} | {r['variant']}{note} | {r['loss_kind']} | {r['extra_peak_mb']:.0f} | "
            f"{_fmt(r['ratio_to_naive'], '.3f')} | {_fmt(r['ratio_to_trl'], '.3f')} | {r['seconds']:.2f} | "
            f"{_fmt(r['speed_vs_trl'], '.2f')} | {r['reference'] or '—'} | {_fmt(r['loss_abs_diff'], '.1e')} | "
            f"{_fmt(diff.get('hidden'), '.1e')} | {_fmt(diff.get('weight'), '.1e')} |")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every vocabulary and variant (TRL only if it imports); medians, ratios, agreement, goals."""
    trl = trl_status(args.trl_path)
    variants = [v for v in args.variants if v != "trl" or trl["available"]]
    repeats = list(args.repeats) + [args.repeats[-1]] * (len(args.vocabs) - len(args.repeats))
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_lm_memory_") as tmp:
        for vocab, count in zip(args.vocabs, repeats):
            rows += measure_vocab(args, vocab, variants, count, tmp)
        summarise(rows)
        for row in rows:
            row.pop("grad_file")
    return {
        "config": {
            "tokens": args.tokens, "hidden": args.hidden, "vocabs": args.vocabs, "repeats": repeats,
            "temperature": args.temperature, "alpha": args.alpha, "chunk_size": args.chunk_size,
            "threads": args.threads, "naive_max_logits": args.naive_max_logits, "dtype": "float32", "device": "cpu",
            "losses": {"mix": "(alpha * forward_kl(T) * T^2 + (1 - alpha) * CE) summed / N",
                       "kd": "forward_kl(T) summed / N (TRL's _chunked_divergence_loss, beta = 0)"},
            "trl": trl, "quick": args.quick, "wall_seconds": time.perf_counter() - started,
            "peak_reset": all(run["peak_reset"] for r in rows for runs in r["runs"].values() for run in runs),
        },
        "results": rows,
        "goals": goals(rows),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags (``--quick`` shrinks everything for a smoke test)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, loss tokens (rows).")
    parser.add_argument("--hidden", type=int, default=512, help="H, hidden size of student and teacher.")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256], help="V, one run per vocabulary.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="Fresh processes per variant, one number per vocabulary (the last one repeats).")
    parser.add_argument("--chunk_size", type=int, default=1024, help="chunk_size of the current and fused paths.")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="Weight of the KD term; CE gets 1 - alpha.")
    parser.add_argument("--naive_max_logits", type=int, default=1 << 28,
                        help="Naive steps with more logits (N·V) are measured at two smaller N and extrapolated; "
                             "0: always measure at N (about 4 fp32 [N, V] copies of memory per 2^28).")
    parser.add_argument("--trl_path", default=None, help="A folder prepended to PYTHONPATH for the trl variant.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (N=64, H=16, V=500 and 2000, 1 repeat).")
    parser.add_argument("--output", default="bench_results/lm_memory.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save_grad", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and not args.worker:
        args.tokens, args.hidden, args.vocabs, args.repeats, args.chunk_size = 64, 16, [500, 2000], [1], 16
        args.naive_max_logits = 64 * 1000  # exercises the extrapolation at the larger vocabulary
    if args.worker:
        args.vocab = args.vocabs[0]
        if args.variant == "trl" and args.trl_path:
            sys.path.insert(0, args.trl_path)
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark (or, with the hidden ``--worker`` flag, one measurement) and report it."""
    args = parse_args(argv)
    if args.worker:
        result = run_worker(args)
        print(json.dumps(result))
        return result
    report = run_benchmark(args)
    cfg = report["config"]
    trl = cfg["trl"]
    print(f"One step's token-level loss from hidden states: N={cfg['tokens']}, H={cfg['hidden']}, fp32 CPU, "
          f"T={cfg['temperature']}, alpha={cfg['alpha']}; extra peak RSS of forward+backward beyond the inputs, "
          f"median of {cfg['repeats']} fresh processes per V; {cfg['threads']} thread(s); "
          + (f"TRL {trl['version']}" if trl["available"] else f"TRL not importable ({trl['error']})"))
    print()
    print(markdown_table(report["results"]))
    for vocab, goal in report["goals"].items():
        print(f"\nV={vocab}: fused ≤ {goal['naive_ratio_limit']:.0%} of naive: {goal['fused_vs_naive_met']}; "
              f"fused_kd ≤ 1.0× TRL memory: {goal['fused_kd_vs_trl_memory_met']}; "
              f"≥ 1.0× TRL speed: {goal['fused_kd_vs_trl_speed_met']}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {output} ({cfg['wall_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
