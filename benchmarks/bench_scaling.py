#!/usr/bin/env python
"""Throughput of online distillation on 1 process against 2 DDP processes (gloo, CPU), same per-process batch.

Three layouts, interleaved for ``--repeats`` rounds so that load from other processes spreads evenly:

    1 proc x 1 thread     the unit
    1 proc x N threads    the same cores used by intra-op threads instead of processes (N = --processes)
    N proc x 1 thread     DDP over gloo, started with ``torchrun --standalone --nproc_per_node N``

Each rank trains the encoder pair of ``bench_overhead.py`` (the student with the teacher online) with the same
per-process batch, so the global batch grows with the processes (weak scaling). Throughput is examples per
second of the whole job (global batch / median step time); the scaling efficiency is

    efficiency = throughput(N processes) / (N x throughput(1 process, 1 thread))

On a machine with N cores or fewer, the N ranks share them with everything else on the machine (the data
loading, the launcher, other jobs), so the efficiency measures contention as much as DDP's cost; the
all-reduce itself is timed separately (``allreduce_ms``: one gloo all-reduce of the student's gradient size).

    python benchmarks/bench_scaling.py --output runs/bench_scaling.json
    python benchmarks/bench_scaling.py --quick            # tiny models, 1 round, without the threads layout
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))


def worker(args: argparse.Namespace) -> None:
    """One rank: train, time the steps, time one all-reduce; rank 0 writes the JSON."""
    import torch

    import bench_overhead as bo  # the models, data and step timer of the overhead benchmark
    from hf_distill import DistillationArguments, DistillationTrainer

    torch.set_num_threads(args.threads)
    pair = dict(bo.PAIRS["encoder"], **(bo.QUICK if args.quick else {}))
    pair["examples"] = max(pair["examples"], pair["batch"] * args.world * (args.steps + args.warmup))
    data = bo.build_dataset(pair)
    timer = bo.StepTimer()
    with tempfile.TemporaryDirectory() as out:
        training = DistillationArguments(**bo.common_args(out, pair, args.steps + args.warmup), preflight=False,
                                         save_on_signal=False, temperature=1.0)
        trainer = DistillationTrainer(bo.build_model(pair, "student"), bo.build_model(pair, "teacher"), training,
                                      train_dataset=data, data_collator=bo.collate, callbacks=[timer])
        trainer.train()
        world = trainer.args.world_size
        allreduce_ms = None
        if world > 1:
            grads = torch.zeros(sum(p.numel() for p in trainer.model.parameters()))
            torch.distributed.all_reduce(grads)
            start = time.perf_counter()
            for _ in range(5):
                torch.distributed.all_reduce(grads)
            allreduce_ms = (time.perf_counter() - start) / 5 * 1e3
    if int(os.environ.get("RANK", "0")) == 0:
        times = timer.times[args.warmup:]
        Path(args.result).write_text(json.dumps({"world_size": world, "threads": args.threads, "step_s": times,
                                                 "global_batch": pair["batch"] * world, "allreduce_ms": allreduce_ms}))
    if torch.distributed.is_initialized():  # gloo can abort at interpreter exit with a live process group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, processes: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = [__file__, "--worker", "--result", str(result), "--threads", str(threads), "--steps", str(args.steps),
                  "--warmup", str(args.warmup), "--world", str(processes)] + (["--quick"] if args.quick else [])
        if processes == 1:
            command = [sys.executable] + common
        else:
            command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node",
                       str(processes)] + common
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="Tiny models, 3 steps, 1 round: a smoke test.")
    parser.add_argument("--output", default="runs/bench_scaling.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    n = args.processes
    layouts = {"1 proc x 1 thread": (1, 1), f"1 proc x {n} threads": (1, n), f"{n} proc x 1 thread": (n, 1)}
    if args.quick:  # the smoke test: the unit and DDP only
        del layouts[f"1 proc x {n} threads"]
    samples: dict[str, list[float]] = {k: [] for k in layouts}
    runs: dict[str, list[dict]] = {k: [] for k in layouts}
    for round_ in range(args.repeats):
        for name, (processes, threads) in layouts.items():
            result = launch(args, processes, threads)
            samples[name] += result["step_s"]
            runs[name].append(result)
            print(f"  round {round_ + 1}/{args.repeats} {name}: median {statistics.median(result['step_s']) * 1e3:.0f} ms/step"
                  f" (global batch {result['global_batch']})", flush=True)
    rows = {}
    for name, (processes, threads) in layouts.items():
        step = statistics.median(samples[name])
        batch = runs[name][0]["global_batch"]
        rows[name] = {"processes": processes, "threads": threads, "global_batch": batch, "step_ms": round(step * 1e3, 1),
                      "examples_per_s": round(batch / step, 2)}
    unit = rows["1 proc x 1 thread"]["examples_per_s"]
    for name, row in rows.items():
        row["speedup"] = round(row["examples_per_s"] / unit, 3)
        row["efficiency"] = round(row["speedup"] / (row["processes"] * row["threads"]), 3)
    allreduce = [r["allreduce_ms"] for r in runs[f"{n} proc x 1 thread"] if r["allreduce_ms"] is not None]
    report = {"config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
                         "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()},
              "results": rows, "allreduce_ms": round(statistics.median(allreduce), 2) if allreduce else None,
              "samples_ms": {k: [round(t * 1e3, 1) for t in v] for k, v in samples.items()}}
    print("\n| layout | global batch | step (ms) | examples/s | speedup | efficiency |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['global_batch']} | {row['step_ms']} | {row['examples_per_s']} | {row['speedup']} | "
              f"{row['efficiency']} |")
    print(f"\ngloo all-reduce of the student's gradients: {report['allreduce_ms']} ms; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    out = Path(args.output)  # (the orchestrating process imports no ML library: it only launches and reads)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
