#!/usr/bin/env python
"""SST-2 distillation benchmark: students against the same student on hard labels, 3 seeds, equal steps.

Everything runs offline from ``../shared/data``: SST-2 (Kim 2014 sentence splits) and the
bert-base-uncased WordPiece vocabulary. No pretrained encoder can be loaded here, so the teachers are
BERTs trained from scratch on the training split (cached on disk and reused by later runs).

Students (each compared, at the same number of optimizer steps and on the same seeds, with the same
architecture trained on hard labels only):

* (a) a 2-layer student copied from the teacher's layers (``create_student``), logit KD;
* (b) a narrow, randomly initialised student (<= 40% of the teacher's parameters, embeddings
  included) trained with logit KD + hidden-state matching through learned projections + attention
  (or relation) matching;
* (c) the 2-layer student of (a) distilled from an ensemble of 3 teachers (seeds 0, 1, 2).

Beside them: the teachers, their ensemble, and TF-IDF + logistic regression (scikit-learn, when
installed: ``pip install -e .[bench]``) as a sanity baseline. It writes ``bench_results/sst2.json``
and prints a markdown table.

    nice python benchmarks/bench_sst2.py                      # full benchmark (about 30-60 min on 2 cores)
    nice python benchmarks/bench_sst2.py --quick              # a smoke run on 200 rows (under a minute)
    nice python benchmarks/bench_sst2.py --only a --seeds 0   # one group, one seed

Finished student runs are cached as JSON in ``--runs_dir`` (keyed by their full recipe), so an
interrupted benchmark resumes where it stopped; ``--fresh`` ignores that cache (not the teachers').
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from types import SimpleNamespace  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, concatenate_datasets  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_distill import DistillationArguments, DistillationTrainer, cache_teacher_outputs, create_student  # noqa: E402
from hf_distill.classification import (  # noqa: E402
    accuracy_on,
    count_parameters,
    load_text_classification,
    load_tokenizer,
    markdown_table,
    measure_latency,
    narrow_student,
    tokenize_splits,
)

logger = logging.getLogger("bench_sst2")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
# alpha = 0 leaves only the hard-label term; the temperature is then irrelevant and fixed, so that every
# KD variant reuses the same cached hard-label runs.
HARD_T = 2.0
_TRAINING_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}


# --------------------------------------------------------------------------------------------- options
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default=str(DATA / "sst2"))
    p.add_argument("--vocab", default=str(DATA / "tokenizers" / "bert-base-uncased" / "vocab.txt"))
    p.add_argument("--output", default="bench_results/sst2.json", help="JSON report (the markdown table goes beside it).")
    p.add_argument("--teachers_dir", default="bench_results/sst2_teachers", help="Trained teachers, reused by later runs.")
    p.add_argument("--runs_dir", default="bench_results/sst2_runs", help="One JSON per finished student run (resume).")
    p.add_argument("--fresh", action="store_true", help="Retrain the students even when a finished run is cached.")
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: 200 training rows, tiny models, 1 seed, a few steps (numbers mean nothing).")
    p.add_argument("--only", default="a,b,c", help="Student groups to run: any of a, b, c.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Student seeds.")
    p.add_argument("--teacher_seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="Teachers (ensemble of (c)); the first is the teacher of (a) and (b).")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--max_train_rows", type=int, default=None)
    p.add_argument("--max_eval_rows", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). On a busy 2-core machine 1 is fastest: with 2, OpenMP "
                   "threads waiting for each other made a training step 4-5x slower in wall time.")
    p.add_argument("--skip_tfidf", action="store_true")
    p.add_argument("--teachers_only", action="store_true",
                   help="Train (or load) the --teacher_seeds teachers, cache their logits and stop: run one such "
                   "process per teacher seed beside another to prepare the teachers in parallel.")
    # teacher
    p.add_argument("--teacher_layers", type=int, default=4)
    p.add_argument("--teacher_hidden", type=int, default=256)
    p.add_argument("--teacher_heads", type=int, default=4)
    p.add_argument("--teacher_intermediate", type=int, default=1024)
    p.add_argument("--teacher_epochs", type=float, default=2.0)
    p.add_argument("--teacher_lr", type=float, default=5e-4)
    # students, all groups
    p.add_argument("--student_epochs", type=float, default=2.0,
                   help="Optimizer steps of every student = this many epochs of the original training split.")
    p.add_argument("--student_layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4, help="Learning rate of the students copied from the teacher.")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--augment", type=int, default=0,
                   help="(a), (c): add this many teacher-labelled augmented variants per training text "
                   "(hf_distill.augmentation; label -100, soft targets only). Steps stay equal.")
    p.add_argument("--ensemble", choices=["live", "cached"], default="live",
                   help="(c): run the 3 teachers live in DistillationTrainer (multi_teacher_mode average), or train "
                   "from their cached mixture (teacher_mixture_logits, the same targets at a constant T).")
    p.add_argument("--multi_teacher_mode", choices=["average", "sum"], default="average")
    # narrow student (b)
    p.add_argument("--narrow_hidden", type=int, default=128)
    p.add_argument("--narrow_layers", type=int, default=2)
    p.add_argument("--narrow_heads", type=int, default=4)
    p.add_argument("--narrow_lr", type=float, default=1e-3)
    p.add_argument("--narrow_alpha", type=float, default=0.9)
    p.add_argument("--narrow_hidden_weight", type=float, default=1.0)
    p.add_argument("--narrow_hidden_loss", default="mse", choices=["mse", "cosine", "pkd"])
    p.add_argument("--narrow_hidden_layer_map", default="uniform")
    p.add_argument("--narrow_attention_weight", type=float, default=1.0)
    p.add_argument("--narrow_attention_loss", default="kl", choices=["kl", "mse"])
    p.add_argument("--narrow_relation_weight", type=float, default=0.0)
    p.add_argument("--narrow_relation_loss", default="minilm", choices=["minilm", "rkd_distance", "rkd_angle"])
    p.add_argument("--latency_repeats", type=int, default=10)
    p.add_argument("--latency_rounds", type=int, default=3,
                   help="Teacher and students are timed in turn this many times; each keeps its fastest median.")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train_rows, args.max_eval_rows = args.max_train_rows or 200, args.max_eval_rows or 100
        args.seeds = args.seeds[:1]
        args.teacher_layers, args.teacher_hidden, args.teacher_intermediate = 4, 64, 128
        args.narrow_hidden, args.narrow_heads = 32, 4
        args.teacher_epochs = args.student_epochs = 1.0
        args.latency_repeats, args.latency_rounds = 2, 1
        # Nothing of a smoke run is cached unless asked for.
        args.teachers_dir = None if args.teachers_dir == "bench_results/sst2_teachers" else args.teachers_dir
        args.runs_dir = None if args.runs_dir == "bench_results/sst2_runs" else args.runs_dir
    args.groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if set(args.groups) - {"a", "b", "c"}:
        p.error(f"--only takes a, b and/or c, got {args.only!r}")
    if "c" in args.groups and len(args.teacher_seeds) < 2 and not args.teachers_only:
        p.error("(c) needs at least 2 --teacher_seeds")
    return args


def fingerprint(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def sampling_args() -> dict:
    """Length-grouped batches (less padding): ``train_sampling_strategy`` on transformers 5, ``group_by_length`` on 4."""
    if "train_sampling_strategy" in _TRAINING_FIELDS:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in _TRAINING_FIELDS else {}


def common_training_args(output_dir: str, seed: int, steps: int, lr: float, batch_size: int) -> dict:
    return dict(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        warmup_steps=max(1, steps // 10), weight_decay=0.01, lr_scheduler_type="linear", save_strategy="no",
        eval_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True, logging_steps=max(1, steps // 4),
        **sampling_args(),
    )


# --------------------------------------------------------------------------------------------- data
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        splits, self.label_names = load_text_classification(args.data_dir)
        if "test" not in splits:
            raise FileNotFoundError(f"{args.data_dir} has no test.jsonl")
        if args.max_train_rows:
            splits["train"] = splits["train"].shuffle(seed=0).select(range(min(args.max_train_rows, len(splits["train"]))))
        if args.max_eval_rows:
            for name in ("validation", "test"):
                splits[name] = splits[name].select(range(min(args.max_eval_rows, len(splits[name]))))
        self.raw = splits
        self.tokenizer = load_tokenizer(args.vocab)
        if args.vocab.endswith("bert-base-uncased/vocab.txt") and len(self.tokenizer) != 30522:
            raise RuntimeError(f"The bert-base-uncased tokenizer has {len(self.tokenizer)} tokens, expected 30522.")
        self.data = tokenize_splits(splits, self.tokenizer, args.max_length)
        self.train = self.data["train"].remove_columns("text")
        self.steps = max(1, math.ceil(args.student_epochs * len(self.train) / args.batch_size))
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.data_recipe = {"data": str(Path(args.data_dir).resolve()), "train_rows": len(self.train),
                            "max_length": args.max_length}

    def accuracy(self, model: torch.nn.Module) -> dict[str, float]:
        return {split: accuracy_on(model, self.data[split], self.tokenizer, batch_size=128, max_length=self.args.max_length)
                for split in ("validation", "test")}


# --------------------------------------------------------------------------------------------- baselines
def tfidf_baseline(bench: Bench) -> Optional[dict]:
    """TF-IDF (uni+bigrams) + logistic regression; C chosen on validation."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        logger.warning("scikit-learn is not installed (pip install -e .[bench]): no TF-IDF line.")
        return None
    raw = bench.raw
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vectorizer.fit_transform(raw["train"]["text"])
    x_val, x_test = vectorizer.transform(raw["validation"]["text"]), vectorizer.transform(raw["test"]["text"])
    best = None
    for c in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        clf = LogisticRegression(C=c, max_iter=2000).fit(x_train, raw["train"]["label"])
        val = float((clf.predict(x_val) == np.array(raw["validation"]["label"])).mean())
        if best is None or val > best[0]:
            test = float((clf.predict(x_test) == np.array(raw["test"]["label"])).mean())
            best = (val, test, c)
    return {"validation": best[0], "test": best[1], "C": best[2]}


# --------------------------------------------------------------------------------------------- teachers
def teacher_config(bench: Bench) -> BertConfig:
    a, names = bench.args, bench.label_names
    return BertConfig(
        vocab_size=len(bench.tokenizer), hidden_size=a.teacher_hidden, num_hidden_layers=a.teacher_layers,
        num_attention_heads=a.teacher_heads, intermediate_size=a.teacher_intermediate,
        max_position_embeddings=max(128, a.max_length), num_labels=len(names),
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        pad_token_id=bench.tokenizer.pad_token_id,
    )


def get_teacher(bench: Bench, seed: int) -> tuple[BertForSequenceClassification, dict]:
    """Train a teacher from scratch with the stock Trainer, or load it from ``--teachers_dir``."""
    a = bench.args
    config = teacher_config(bench)
    recipe = {"config": config.to_diff_dict(), "seed": seed, "epochs": a.teacher_epochs, "lr": a.teacher_lr,
              "batch_size": a.batch_size, **bench.data_recipe}
    folder = Path(a.teachers_dir) / f"seed{seed}-{fingerprint(recipe)}" if a.teachers_dir else None
    if folder is not None and (folder / "bench_teacher.json").is_file():
        meta = json.loads((folder / "bench_teacher.json").read_text())
        teacher = BertForSequenceClassification.from_pretrained(folder)
        logger.info("Teacher seed %d loaded from %s (val %.4f, test %.4f).", seed, folder,
                    meta["accuracy"]["validation"], meta["accuracy"]["test"])
        return teacher, meta
    set_seed(seed)
    teacher = BertForSequenceClassification(config)
    steps = max(1, math.ceil(a.teacher_epochs * len(bench.train) / a.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(**common_training_args(tmp, seed, steps, a.teacher_lr, a.batch_size))
        start = time.perf_counter()
        Trainer(teacher, targs, train_dataset=bench.train, processing_class=bench.tokenizer,
                data_collator=bench.collator).train()
        seconds = time.perf_counter() - start
    meta = {"recipe": recipe, "steps": steps, "train_seconds": seconds, "accuracy": bench.accuracy(teacher),
            "folder": str(folder) if folder else None}
    logger.info("Teacher seed %d: %d steps in %.0f s, val %.4f, test %.4f.", seed, steps, seconds,
                meta["accuracy"]["validation"], meta["accuracy"]["test"])
    if folder is not None:
        teacher.save_pretrained(folder)
        (folder / "bench_teacher.json").write_text(json.dumps(meta, indent=2))
    return teacher, meta


def teacher_logits(bench: Bench, teacher: torch.nn.Module, dataset: Dataset, meta: dict, name: str) -> np.ndarray:
    """The teacher's logits on ``dataset`` (hf_distill.cache_teacher_outputs), cached beside the teacher."""
    folder = meta.get("folder")
    path = Path(folder) / f"logits-{name}.npy" if folder else None
    if path is not None and path.is_file():
        cached = np.load(path)
        if len(cached) == len(dataset):
            return cached
    teacher.eval()
    logits = np.asarray(cache_teacher_outputs(teacher, dataset, batch_size=128)["teacher_logits"], dtype=np.float32)
    if path is not None:
        np.save(path, logits)
    return logits


@torch.no_grad()
def ensemble_accuracy(bench: Bench, teachers: list[torch.nn.Module]) -> dict[str, float]:
    """Accuracy of the teachers' averaged probabilities."""
    out = {}
    for split in ("validation", "test"):
        ds = bench.data[split]
        probs = 0
        for teacher in teachers:
            teacher.eval()
            chunks = []
            for start in range(0, len(ds), 128):
                rows = ds[start : start + 128]
                enc = bench.tokenizer(rows["text"], padding=True, truncation=True, max_length=bench.args.max_length,
                                      return_tensors="pt")
                chunks.append(teacher(**enc).logits.softmax(-1))
            probs = probs + torch.cat(chunks)
        out[split] = float((probs.argmax(-1) == torch.tensor(ds["label"])).float().mean())
    return out


# --------------------------------------------------------------------------------------------- students
def run_student(bench: Bench, name: str, seed: int, build: Callable[[], torch.nn.Module], teacher: Any,
                train: Dataset, recipe: dict, lr: float, **distill: Any) -> dict:
    """Train one student for ``bench.steps`` steps with DistillationTrainer; cache the result as JSON."""
    a = bench.args
    full = {"name": name, "seed": seed, "lr": lr, "steps": bench.steps, "batch_size": a.batch_size, **recipe,
            **distill, **bench.data_recipe}
    path = Path(a.runs_dir) / f"{name}-seed{seed}-{fingerprint(full)}.json" if a.runs_dir else None
    if path is not None and path.is_file() and not a.fresh:
        return json.loads(path.read_text())
    set_seed(seed)
    student = build()
    with tempfile.TemporaryDirectory() as tmp:
        dargs = DistillationArguments(**common_training_args(tmp, seed, bench.steps, lr, a.batch_size), **distill)
        trainer = DistillationTrainer(student, teacher, dargs, train_dataset=train, processing_class=bench.tokenizer,
                                      data_collator=bench.collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {"name": name, "seed": seed, "accuracy": bench.accuracy(trainer.model), "train_seconds": seconds,
              "recipe": full}
    logger.info("%s seed %d: val %.4f, test %.4f (%.0f s).", name, seed, result["accuracy"]["validation"],
                result["accuracy"]["test"], seconds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    return result


def with_logits(dataset: Dataset, logits: np.ndarray) -> Dataset:
    return dataset.add_column("teacher_logits", [row.tolist() for row in logits])


def augmented_rows(bench: Bench, seed: int) -> Dataset:
    """Teacher-labelled transfer examples (label -100: no ground truth) made by hf_distill.augmentation."""
    from hf_distill.augmentation import augment_texts

    texts = augment_texts(bench.raw["train"]["text"], bench.tokenizer, num_per_example=bench.args.augment, seed=seed)
    extra = Dataset.from_dict({"text": texts, "label": [-100] * len(texts)})
    extra = extra.map(lambda b: bench.tokenizer(b["text"], truncation=True, max_length=bench.args.max_length),
                      batched=True, remove_columns=["text"])
    return extra.cast(bench.train.features)


# --------------------------------------------------------------------------------------------- report
def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def latencies(bench: Bench, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, float]]:
    """Median CPU forward latency (ms) at batch 1 and 32; models timed in turn, fastest round kept."""
    texts = bench.raw["validation"]["text"][:64]
    best: dict[str, dict[str, float]] = {}
    for _ in range(bench.args.latency_rounds):
        for name, model in models.items():
            lat = measure_latency(model, bench.tokenizer, texts, batch_sizes=(1, 32), max_length=bench.args.max_length,
                                  repeats=bench.args.latency_repeats, warmup=2)
            for key in ("batch_1", "batch_32"):
                value = lat[key]["median"]
                best.setdefault(name, {})[key] = min(best.get(name, {}).get(key, math.inf), value)
    return best


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def mean_std(s: dict) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def main(argv: Optional[list[str]] = None) -> dict:
    """Teachers, transfer sets, the student runs of each group, then the table, goals and report."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = SimpleNamespace(args=args, wall=time.perf_counter(), bench=Bench(args))
    logger.info("SST-2: %d train / %d validation / %d test rows; %d steps per student run.", len(ctx.bench.train),
                len(ctx.bench.data["validation"]), len(ctx.bench.data["test"]), ctx.bench.steps)
    load_teachers(ctx)
    if args.teachers_only:
        for seed in ctx.need:
            teacher_logits(ctx.bench, ctx.teachers[seed], ctx.bench.train, ctx.metas[seed], "train")
            print(f"teacher seed {seed}: {json.dumps(ctx.metas[seed]['accuracy'])} ({ctx.metas[seed].get('folder')})")
        return {"teachers": ctx.metas}
    ctx.tfidf = None if args.skip_tfidf else tfidf_baseline(ctx.bench)
    measure_shapes(ctx)
    prepare_transfer_sets(ctx)
    ctx.runs = {}
    for seed in args.seeds:
        run_groups(ctx, seed)
    table, report_rows = results_table(ctx)
    goals = goals_of(ctx, report_rows)
    return write_report(ctx, table, report_rows, goals)


def load_teachers(ctx: SimpleNamespace) -> None:
    """The teachers the groups need (all seeds for the ensemble), trained or read from the cache."""
    args = ctx.args
    ctx.need = args.teacher_seeds if "c" in args.groups or args.teachers_only else args.teacher_seeds[:1]
    ctx.teachers, ctx.metas = {}, {}
    for seed in ctx.need:
        ctx.teachers[seed], ctx.metas[seed] = get_teacher(ctx.bench, seed)
    ctx.main_seed = args.teacher_seeds[0]
    ctx.teacher = ctx.teachers[ctx.main_seed]


def measure_shapes(ctx: SimpleNamespace) -> None:
    """Student builders, and latency and size per architecture (they depend on the shapes only)."""
    args, teacher = ctx.args, ctx.teacher
    ctx.copied_student = lambda: create_student(teacher, num_layers=args.student_layers)
    ctx.narrow = lambda: narrow_student(teacher, args.narrow_layers, args.narrow_hidden, args.narrow_heads)
    shapes = {"teacher": teacher, "copied": ctx.copied_student(), "narrow": ctx.narrow()}
    ctx.lat = latencies(ctx.bench, shapes)
    ctx.size = {name: {"total": count_parameters(m), "non_embedding": count_parameters(m, exclude_embeddings=True)}
                for name, m in shapes.items()}


def prepare_transfer_sets(ctx: SimpleNamespace) -> None:
    """Cached teacher logits of the training set (and of augmented rows), per teacher."""
    args, bench, need = ctx.args, ctx.bench, ctx.need
    ctx.logits = {seed: teacher_logits(bench, ctx.teachers[seed], bench.train, ctx.metas[seed], "train") for seed in need}
    ctx.kd_train = with_logits(bench.train, ctx.logits[ctx.main_seed])
    ctx.augmented, ctx.aug_logits = None, {}
    if args.augment and set(args.groups) & {"a", "c"}:
        ctx.augmented = augmented_rows(bench, seed=0)
        ctx.aug_logits = {seed: teacher_logits(bench, ctx.teachers[seed], ctx.augmented, ctx.metas[seed],
                                               f"aug{args.augment}") for seed in need}
        logger.info("Augmentation: %d teacher-labelled rows added to the KD transfer set.", len(ctx.augmented))
    ctx.teacher_ids = {seed: Path(ctx.metas[seed]["folder"]).name if ctx.metas[seed].get("folder") else f"seed{seed}"
                       for seed in need}
    # Augmented rows exist once, so their teacher logits are cached: with --augment (c) uses the cached mixture.
    ctx.ensemble_mode = "live" if args.ensemble == "live" and ctx.augmented is None else "cached"
    if "c" in args.groups and ctx.ensemble_mode != args.ensemble:
        logger.info("(c) trains from the cached teacher mixture: --augment needs cached teacher outputs.")


def _add(ctx: SimpleNamespace, key: str, result: dict) -> None:
    ctx.runs.setdefault(key, []).append(result)


def run_groups(ctx: SimpleNamespace, seed: int) -> None:
    """One seed of each group: (a) copied student, (b) narrow student, (c) ensemble."""
    args, bench = ctx.args, ctx.bench
    kd = dict(temperature=args.temperature, alpha=args.alpha)
    base = {"teacher": ctx.teacher_ids[ctx.main_seed], "student": f"create_student/{args.student_layers}"}
    if set(args.groups) & {"a", "c"}:
        _add(ctx, "a_hard", run_student(bench, "a_hard", seed, ctx.copied_student, None, ctx.kd_train, base, args.lr,
                                        alpha=0.0, temperature=HARD_T))
    if "a" in args.groups:
        train = ctx.kd_train
        if ctx.augmented is not None:
            train = concatenate_datasets([ctx.kd_train, with_logits(ctx.augmented, ctx.aug_logits[ctx.main_seed])])
        _add(ctx, "a_kd", run_student(bench, "a_kd", seed, ctx.copied_student, None, train,
                                      {**base, "augment": args.augment}, args.lr, **kd))
    if "b" in args.groups:
        run_narrow_group(ctx, seed)
    if "c" in args.groups:
        run_ensemble_group(ctx, seed, kd)


def run_narrow_group(ctx: SimpleNamespace, seed: int) -> None:
    """(b): the narrow student on hard labels, and with KD + the intermediate terms."""
    args, bench = ctx.args, ctx.bench
    nbase = {"teacher": ctx.teacher_ids[ctx.main_seed],
             "student": f"narrow/{args.narrow_layers}x{args.narrow_hidden}/{args.narrow_heads}h"}
    _add(ctx, "b_hard", run_student(bench, "b_hard", seed, ctx.narrow, None, ctx.kd_train, nbase, args.narrow_lr,
                                    alpha=0.0, temperature=HARD_T))
    terms = dict(hidden_weight=args.narrow_hidden_weight, hidden_loss=args.narrow_hidden_loss,
                 hidden_layer_map=args.narrow_hidden_layer_map, attention_weight=args.narrow_attention_weight,
                 attention_loss=args.narrow_attention_loss, relation_weight=args.narrow_relation_weight,
                 relation_loss=args.narrow_relation_loss)
    _add(ctx, "b_kd", run_student(bench, "b_kd", seed, ctx.narrow, ctx.teacher, bench.train, nbase, args.narrow_lr,
                                  temperature=args.temperature, alpha=args.narrow_alpha, **terms))


def run_ensemble_group(ctx: SimpleNamespace, seed: int, kd: dict) -> None:
    """(c): the copied student distilled from every teacher, live or from the cached mixture."""
    args, bench, need = ctx.args, ctx.bench, ctx.need
    cbase = {"teachers": [ctx.teacher_ids[s] for s in need], "student": f"create_student/{args.student_layers}",
             "ensemble": ctx.ensemble_mode, "augment": args.augment}
    weights = [1.0 / len(need)] * len(need)
    if ctx.ensemble_mode == "live":
        _add(ctx, "c_ens", run_student(bench, "c_ens", seed, ctx.copied_student, [ctx.teachers[s] for s in need],
                                       bench.train, cbase, args.lr, teacher_weights=weights,
                                       multi_teacher_mode=args.multi_teacher_mode, **kd))
        return
    from hf_distill.losses.logits import teacher_mixture_logits

    def mixture(per_teacher: dict) -> np.ndarray:
        return teacher_mixture_logits([torch.from_numpy(per_teacher[s]) for s in need], weights,
                                      args.temperature).numpy()

    train = with_logits(bench.train, mixture(ctx.logits))
    if ctx.augmented is not None:
        train = concatenate_datasets([train, with_logits(ctx.augmented, mixture(ctx.aug_logits))])
    _add(ctx, "c_ens", run_student(bench, "c_ens", seed, ctx.copied_student, None, train, cbase, args.lr, **kd))


def _row_labels(ctx: SimpleNamespace) -> dict[str, str]:
    args = ctx.args
    augment = f", +{args.augment}x augmentation" if args.augment else ""
    return {
        "a_hard": f"(a) {args.student_layers}-layer copied student, hard labels only",
        "a_kd": f"(a) {args.student_layers}-layer copied student, logit KD (T={args.temperature}, alpha={args.alpha})"
                + augment,
        "b_hard": f"(b) narrow {args.narrow_layers}x{args.narrow_hidden} student, hard labels only",
        "b_kd": f"(b) narrow {args.narrow_layers}x{args.narrow_hidden} student, KD + hidden"
                + (f" + attention ({args.narrow_attention_loss})" if args.narrow_attention_weight else "")
                + (f" + relation ({args.narrow_relation_loss})" if args.narrow_relation_weight else ""),
        "c_ens": f"(c) {args.student_layers}-layer copied student, {len(ctx.need)}-teacher ensemble KD "
                 f"({ctx.ensemble_mode})" + augment,
    }


def _ratio_cells(ctx: SimpleNamespace, shape: str) -> dict:
    size, lat = ctx.size, ctx.lat
    return {
        "params (total)": f"{size[shape]['total'] / 1e6:.2f}M ({size[shape]['total'] / size['teacher']['total']:.2f}x)",
        "non-emb params": f"{size[shape]['non_embedding'] / 1e6:.2f}M "
                          f"({size[shape]['non_embedding'] / size['teacher']['non_embedding']:.2f}x)",
        "latency b1": f"{lat[shape]['batch_1']:.1f} ms ({lat[shape]['batch_1'] / lat['teacher']['batch_1']:.2f}x)",
        "latency b32": f"{lat[shape]['batch_32']:.1f} ms ({lat[shape]['batch_32'] / lat['teacher']['batch_32']:.2f}x)",
    }


def _reference_rows(ctx: SimpleNamespace) -> list[dict]:
    """Teachers, their ensemble and the TF-IDF line."""
    args, need, single = ctx.args, ctx.need, ctx.single
    t_acc = ctx.metas[ctx.main_seed]["accuracy"]
    rows = [{"model": f"teacher (seed {ctx.main_seed}, {args.teacher_layers}x{args.teacher_hidden}, from scratch)",
             "validation": pct(t_acc["validation"]), "test": pct(t_acc["test"]), "test retention": "100.0%",
             **_ratio_cells(ctx, "teacher")}]
    for seed in need[1:]:
        rows.append({"model": f"teacher (seed {seed})", "validation": pct(single[seed]["validation"]),
                     "test": pct(single[seed]["test"])})
    if ctx.ens is not None:
        rows.append({"model": f"ensemble of {len(need)} teachers (mean probabilities)",
                     "validation": pct(ctx.ens["validation"]), "test": pct(ctx.ens["test"])})
    if ctx.tfidf is not None:
        rows.append({"model": f"TF-IDF (1-2 grams) + logistic regression (C={ctx.tfidf['C']})",
                     "validation": pct(ctx.tfidf["validation"]), "test": pct(ctx.tfidf["test"])})
    return rows


def results_table(ctx: SimpleNamespace) -> tuple[str, list[dict]]:
    """(markdown table, one summary per student group)."""
    ctx.single = {seed: ctx.metas[seed]["accuracy"] for seed in ctx.need}
    ctx.best_seed = max(ctx.single, key=lambda s: ctx.single[s]["test"])
    ctx.ens = ensemble_accuracy(ctx.bench, [ctx.teachers[s] for s in ctx.need]) if len(ctx.need) > 1 else None
    labels, t_test = _row_labels(ctx), ctx.metas[ctx.main_seed]["accuracy"]["test"]
    shape_of = {"a_hard": "copied", "a_kd": "copied", "c_ens": "copied", "b_hard": "narrow", "b_kd": "narrow"}
    rows, report_rows = _reference_rows(ctx), []
    for key in [k for k in ("a_hard", "a_kd", "b_hard", "b_kd", "c_ens") if k in ctx.runs]:
        runs = ctx.runs[key]
        val = summarise([r["accuracy"]["validation"] for r in runs])
        test = summarise([r["accuracy"]["test"] for r in runs])
        reference = ctx.single[ctx.best_seed]["test"] if key == "c_ens" else t_test
        retention = test["mean"] / reference
        report_rows.append({"key": key, "label": labels[key], "validation": val, "test": test,
                            "test_retention": retention, "retention_reference_test": reference,
                            "seeds": [r["seed"] for r in runs], "train_seconds": [r["train_seconds"] for r in runs],
                            "shape": shape_of[key]})
        rows.append({"model": labels[key] + f" [{len(runs)} seeds]", "validation": mean_std(val), "test": mean_std(test),
                     "test retention": f"{100 * retention:.1f}%" + (" (vs best teacher)" if key == "c_ens" else ""),
                     **_ratio_cells(ctx, shape_of[key])})
    columns = ["model", "validation", "test", "test retention", "params (total)", "non-emb params", "latency b1",
               "latency b32"]
    return markdown_table(rows, columns), report_rows


def goals_of(ctx: SimpleNamespace, report_rows: list[dict]) -> dict:
    """This benchmark's goals, each with its figures and whether it is met."""
    by_key, size = {r["key"]: r for r in report_rows}, ctx.size
    goals = {}
    if "a_kd" in by_key and "a_hard" in by_key:
        gain = by_key["a_kd"]["test"]["mean"] - by_key["a_hard"]["test"]["mean"]
        goals["a"] = {"goal": "KD beats hard labels by >= 1.5 test points (3-seed mean) and retains >= 99% of the teacher",
                      "gain_points": 100 * gain, "retention": by_key["a_kd"]["test_retention"],
                      "met": gain >= 0.015 and by_key["a_kd"]["test_retention"] >= 0.99}
    if "b_kd" in by_key:
        share = size["narrow"]["total"] / size["teacher"]["total"]
        goals["b"] = {"goal": "narrow student (<= 40% of the teacher's parameters) retains >= 98%",
                      "parameter_share": share, "retention": by_key["b_kd"]["test_retention"],
                      "gain_over_hard_points": 100 * (by_key["b_kd"]["test"]["mean"] - by_key["b_hard"]["test"]["mean"])
                      if "b_hard" in by_key else None,
                      "met": share <= 0.40 and by_key["b_kd"]["test_retention"] >= 0.98}
    if "c_ens" in by_key:
        best = ctx.single[ctx.best_seed]["test"]
        goals["c"] = {"goal": "ensemble-distilled student beats the best single teacher (test, 3-seed mean)",
                      "student_test": by_key["c_ens"]["test"]["mean"], "best_teacher_test": best,
                      "best_teacher_seed": ctx.best_seed, "met": by_key["c_ens"]["test"]["mean"] > best}
    return goals


def _goal_lines(goals: dict) -> list[str]:
    detail = {"a": lambda g: f"gain {g['gain_points']:+.2f} points, retention {100 * g['retention']:.1f}%",
              "b": lambda g: f"{100 * g['parameter_share']:.1f}% of the parameters, retention {100 * g['retention']:.1f}%",
              "c": lambda g: f"student {pct(g['student_test'])} vs best teacher {pct(g['best_teacher_test'])}"}
    return [f"- ({name}) {g['goal']}: **{'met' if g['met'] else 'not met'}** ({detail[name](g)})"
            for name, g in goals.items()]


def write_report(ctx: SimpleNamespace, table: str, report_rows: list[dict], goals: dict) -> dict:
    """JSON + markdown next to --output, printed too."""
    args, bench = ctx.args, ctx.bench
    runtime = time.perf_counter() - ctx.wall
    header = (f"SST-2 (sentence level): {len(bench.train)} train / {len(bench.data['validation'])} validation / "
              f"{len(bench.data['test'])} test rows, max_length {args.max_length}, {bench.steps} steps of batch "
              f"{args.batch_size} per student, seeds {args.seeds}, {torch.get_num_threads()} CPU threads; "
              f"accuracy in %, mean ± std over seeds; latency ratios vs the teacher.")
    train_seconds = {"teachers": sum(m.get("train_seconds", 0.0) for m in ctx.metas.values()),
                     "students": sum(r["train_seconds"] for rs in ctx.runs.values() for r in rs)}
    markdown = "\n".join([header, "", table, "", *_goal_lines(goals), "",
                          f"Runtime: {runtime / 60:.1f} min for this invocation; training time of every run in the table "
                          f"(cached ones included, as measured when they ran): teachers {train_seconds['teachers'] / 60:.1f} "
                          f"min, students {train_seconds['students'] / 60:.1f} min."])
    report = {
        "config": dict(vars(args)), "steps_per_student": bench.steps, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "teachers": {str(s): ctx.metas[s] for s in ctx.need}, "teacher_ensemble": ctx.ens,
        "tfidf_logreg": ctx.tfidf, "parameters": ctx.size, "latency_ms": ctx.lat, "students": report_rows,
        "runs": dict(ctx.runs), "goals": goals, "runtime_seconds": runtime, "train_seconds": train_seconds,
        "markdown": markdown,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    output.with_suffix(".md").write_text(markdown + "\n")
    print("\n" + markdown + "\n")
    print(f"Wrote {output} and {output.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
