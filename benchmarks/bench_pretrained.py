#!/usr/bin/env python
"""Pretrained MiniLM on SST-2 (issue 11 item 5): DistilBERT- and TinyBERT-style students, int8 ONNX, embeddings.

The teacher is ``../shared/data/models/all-MiniLM-L6-v2`` (6 layers x 384, 22.7M parameters) with a classification
head fine-tuned on the SST-2 training set (cached in ``--work_dir``/teacher, keyed by its settings). Groups:

* (a) DistilBERT-style: ``create_student(teacher, num_layers=3)``, soft labels + hidden-state term, against the
  same student on hard labels only, at equal steps and on the same seeds;
* (b) (a) with its vocabulary trimmed to the training texts (``trim_vocabulary``): each (a) KD student trimmed
  after distillation (group ``b``, as ``distill_classification.py --trim_vocabulary`` does; its outputs on every
  training text are unchanged), and, group ``b_before``, seed 0 trimmed before distillation with the teacher
  trimmed the same way;
* (c) TinyBERT-style: a narrow student (``--narrow_layers`` x ``--narrow_hidden``, trimmed vocabulary, embedding
  rows initialised from the teacher's through PCA), general distillation on unlabelled text (SST-2 training
  sentences without labels + hf_distill.augmentation variants; hidden states through projections + MiniLM
  relations), then task distillation with augmentation; against the same student trained on hard labels;
* (d) int8 ONNX of (a), (b), (c) (seed 0): ``export_onnx(..., eval_dataset=test)``, size, accuracy change and
  latency at batch 1 against the fp32 PyTorch student;
* (e) sentence embeddings: 3-layer and trimmed 3-layer students of the (untuned) MiniLM sentence embedder
  (mean pooling, L2), distilled on unlabelled text; mean cosine and pairwise-similarity Spearman against the
  teacher on the test sentences, and a logistic-regression probe (train embeddings -> test accuracy).

Every finished run is written to ``--output`` at once, and a restarted benchmark skips it (resume), so two
invocations with different ``--only`` can share the JSON::

    S="--steps 866 --general_steps 600 --task_steps 300 --embed_steps 3000 --embed_lr 4e-4 --embed_augment 8"
    nice python benchmarks/bench_pretrained.py $S --only a --seeds 0   # one process per seed (1 and 2 beside it)
    nice python benchmarks/bench_pretrained.py $S --only a,b           # (b): the (a) KD students trimmed
    nice python benchmarks/bench_pretrained.py $S --only c,c_try,e     # another process, beside them
    nice python benchmarks/bench_pretrained.py $S --only latency,d     # then timing and exports
    nice python benchmarks/bench_pretrained.py $S --only a --seeds 0 --try soft:hidden_weight=0   # a recipe try
    python benchmarks/bench_pretrained.py --quick --output /tmp/p.json --work_dir /tmp/p   # smoke run, tiny BERT

Each invocation rewrites the report (JSON + markdown) from everything stored; ``--only ""`` only rewrites it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset, concatenate_datasets  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_distill import DistillationArguments, DistillationTrainer, create_student, trim_vocabulary  # noqa: E402
from hf_distill.arguments import TASKS  # noqa: E402
from hf_distill.classification import (  # noqa: E402
    count_parameters,
    load_text_classification,
    markdown_table,
    narrow_student,
)

logger = logging.getLogger("bench_pretrained")
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GROUPS = ("a", "b", "b_before", "c", "c_try", "d", "e", "latency")
HARD = dict(alpha=0.0, temperature=2.0)  # hard labels only (the temperature is then irrelevant)


# --------------------------------------------------------------------------------------------- options
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", default=str(DATA / "sst2"))
    p.add_argument("--model", default=str(DATA / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--output", default="bench_results/pretrained.json", help="JSON (the markdown goes beside it).")
    p.add_argument("--work_dir", default="bench_results/pretrained", help="Teacher, saved students, exports.")
    p.add_argument("--only", default="a,b,c,d,e,latency", help=f"Groups to run, any of {GROUPS}.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="Smoke run: random tiny BERT, 64 rows, a few steps.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_train_rows", type=int, default=None)
    p.add_argument("--max_eval_rows", type=int, default=None)
    p.add_argument("--teacher_epochs", type=float, default=2.0)
    p.add_argument("--teacher_lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=300, help="Optimizer steps of every (a)/(b) student and its twin.")
    p.add_argument("--lr", type=float, default=1e-4, help="(a), (b) learning rate.")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--hidden_weight", type=float, default=1.0)
    p.add_argument("--hidden_loss", default="mse", choices=["mse", "cosine", "pkd"])
    p.add_argument("--attention_weight", type=float, default=0.0)
    p.add_argument("--relation_weight", type=float, default=0.0)
    p.add_argument("--kd_augment", type=int, default=0,
                   help="(a)/(b) KD students: add this many augment_texts variants of each training sentence "
                        "(teacher soft labels only) to their training set.")
    p.add_argument("--try", dest="tries", action="append", default=[],
                   help="(a) extra recipe on --try_seeds: NAME:key=value,key=value (DistillationArguments fields).")
    p.add_argument("--try_seeds", type=int, nargs="+", default=[0])
    # (c)
    p.add_argument("--narrow_layers", type=int, default=4)
    p.add_argument("--narrow_hidden", type=int, default=128)
    p.add_argument("--narrow_heads", type=int, default=4)
    p.add_argument("--pca_init", type=int, default=1, help="(c) embedding rows from the teacher's via PCA (0: random).")
    p.add_argument("--augment", type=int, default=4, help="(c), (e) augmented variants per training sentence.")
    p.add_argument("--general_steps", type=int, default=1000)
    p.add_argument("--general_lr", type=float, default=1e-3)
    p.add_argument("--task_steps", type=int, default=400, help="(c) task stage and its hard-label twin.")
    p.add_argument("--narrow_lr", type=float, default=5e-4)
    p.add_argument("--narrow_relation_weight", type=float, default=1.0)
    p.add_argument("--narrow_hidden_weight", type=float, default=1.0)
    p.add_argument("--narrow_alpha", type=float, default=1.0)
    # (e)
    p.add_argument("--embed_steps", type=int, default=400)
    p.add_argument("--embed_lr", type=float, default=1e-4)
    p.add_argument("--embed_augment", type=int, default=None, help="(e) augmented variants per sentence (default: --augment).")
    # timing
    p.add_argument("--latency_repeats", type=int, default=30)
    args = p.parse_args(argv)
    if args.quick:
        args.max_train_rows, args.max_eval_rows = args.max_train_rows or 64, args.max_eval_rows or 48
        args.seeds, args.teacher_epochs, args.steps, args.general_steps = args.seeds[:1], 1.0, 3, 3
        args.task_steps, args.embed_steps, args.augment, args.latency_repeats = 3, 3, 1, 3
        args.narrow_hidden, args.narrow_heads, args.narrow_layers = 16, 2, 2
        if args.output == "bench_results/pretrained.json":
            raise SystemExit("--quick needs its own --output and --work_dir (a temporary folder), not the real ones")
    args.groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if set(args.groups) - set(GROUPS):
        p.error(f"--only takes {GROUPS}, got {args.only!r}")
    return args


def fingerprint(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def parse_try(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` -> (name, {key: number or string})."""
    name, _, body = text.partition(":")
    out = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            out[key] = value
    if not name or not out:
        raise SystemExit(f"--try {text!r}: expected NAME:key=value[,key=value]")
    return name, out


# --------------------------------------------------------------------------------------------- results store
class Store:
    """The JSON report: every finished run is merged in at once (under a file lock, atomic rename)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.is_file() else {"runs": {}}

    def get(self, key: str) -> Optional[dict]:
        return self.read()["runs"].get(key)

    def update(self, change: Callable[[dict], None]) -> None:
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self.read()
            change(data)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2, default=str))
            tmp.replace(self.path)

    def put(self, key: str, result: dict) -> None:
        self.update(lambda data: data["runs"].__setitem__(key, result))


def cached_run(ctx: SimpleNamespace, name: str, seed: int, recipe: dict, run: Callable[[], dict]) -> dict:
    """``run()`` unless the store holds this (name, seed, recipe) already; the result is stored at once."""
    key = f"{name}-seed{seed}-{fingerprint({**recipe, **ctx.data_recipe})}"
    found = ctx.store.get(key)
    if found is not None:
        logger.info("%s: finished earlier (%s), skipped.", key, found.get("accuracy"))
        return found
    start = time.perf_counter()
    result = {"name": name, "seed": seed, "recipe": recipe, **run()}
    result["wall_seconds"] = time.perf_counter() - start
    ctx.store.put(key, result)
    logger.info("%s: %s (%.0f s)", key, result.get("accuracy", result.get("metrics")), result["wall_seconds"])
    return result


# --------------------------------------------------------------------------------------------- data
def tokenize(texts_and_labels: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """input_ids/attention_mask (+ labels kept as ``label``), no padding; the text column is dropped."""
    return texts_and_labels.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
                                batched=True, remove_columns=["text"])


def load_data(args: argparse.Namespace) -> tuple[dict, Any]:
    splits, _ = load_text_classification(args.data_dir)
    if args.max_train_rows:
        splits["train"] = splits["train"].shuffle(seed=0).select(range(min(args.max_train_rows, len(splits["train"]))))
    if args.max_eval_rows:
        for name in ("validation", "test"):
            splits[name] = splits[name].select(range(min(args.max_eval_rows, len(splits[name]))))
    return splits, AutoTokenizer.from_pretrained(args.model)


def quick_model(folder: Path, tokenizer: Any) -> str:
    """A random tiny BERT saved as the 'pretrained' encoder of a smoke run."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------------------------- training
class StepTimer(TrainerCallback):
    """Logs seconds per optimizer step, to size the runs early."""

    def __init__(self, every: int = 50) -> None:
        self.every, self.start = every, None

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, D102
        if self.start is None:
            self.start = time.perf_counter()
        elif state.global_step % self.every == 0:
            per = (time.perf_counter() - self.start) / (state.global_step - 1)
            logger.info("  step %d/%d: %.2f s/step", state.global_step, state.max_steps, per)


def training_args(output_dir: str, seed: int, steps: int, lr: float, batch_size: int) -> dict:
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                warmup_steps=max(1, steps // 10), weight_decay=0.01, lr_scheduler_type="linear", save_strategy="no",
                eval_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True,
                logging_steps=max(1, steps // 5), **sampling_args())


def sampling_args() -> dict:
    """Length-grouped batches: ``train_sampling_strategy`` on transformers 5, ``group_by_length`` on 4."""
    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in fields else {}


def distill(student: Any, teacher: Any, train: Dataset, tokenizer: Any, seed: int, steps: int, lr: float,
            batch_size: int, **recipe: Any) -> tuple[Any, float, list]:
    """Train ``student`` for ``steps`` steps with DistillationTrainer; (model, seconds, log history)."""
    with tempfile.TemporaryDirectory() as tmp:
        dargs = DistillationArguments(**training_args(tmp, seed, steps, lr, batch_size), **recipe)
        trainer = DistillationTrainer(student, teacher, dargs, train_dataset=train, processing_class=tokenizer,
                                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[StepTimer()])
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    history = [{k: v for k, v in row.items() if k.startswith("loss") or k in ("step", "loss")}
               for row in trainer.state.log_history]
    return trainer.model, seconds, history


@torch.inference_mode()
def accuracy(ctx: SimpleNamespace, model: Any, tokenizer: Any) -> dict[str, float]:
    """Validation and test accuracy; batches of similar lengths (less padding, same predictions)."""
    model.eval()
    out = {}
    for split in ("validation", "test"):
        texts, labels = list(ctx.raw[split]["text"]), list(ctx.raw[split]["label"])
        order = sorted(range(len(texts)), key=lambda i: len(tokenizer.tokenize(texts[i])))
        correct = 0
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=ctx.args.max_length,
                            return_tensors="pt")
            predictions = model(**enc).logits.argmax(-1)
            correct += int((predictions == torch.tensor([labels[i] for i in rows])).sum())
        out[split] = correct / len(texts)
    return out


def save_model(ctx: SimpleNamespace, model: Any, tokenizer: Any, name: str) -> str:
    folder = Path(ctx.args.work_dir) / "models" / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def get_teacher(ctx: SimpleNamespace) -> None:
    """MiniLM + a classification head fine-tuned on the training set (stock Trainer), or read from the cache."""
    args = ctx.args
    train = tokenize(ctx.raw["train"], ctx.tokenizer, args.max_length)
    steps = max(1, math.ceil(args.teacher_epochs * len(train) / args.batch_size))
    recipe = {"model": Path(args.model).name, "steps": steps, "lr": args.teacher_lr, "batch_size": args.batch_size,
              "max_length": args.max_length, "train_rows": len(train), "seed": 0}
    folder = Path(args.work_dir) / "teacher" / fingerprint(recipe)
    if not (folder / "bench_teacher.json").is_file():
        set_seed(0)
        teacher = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(**training_args(tmp, 0, steps, args.teacher_lr, args.batch_size))
            start = time.perf_counter()
            Trainer(teacher, targs, train_dataset=train, processing_class=ctx.tokenizer,
                    data_collator=DataCollatorWithPadding(ctx.tokenizer), callbacks=[StepTimer(10)]).train()
            seconds = time.perf_counter() - start
        meta = {"recipe": {**recipe, "epochs": args.teacher_epochs, "warmup": "10%", "schedule": "linear",
                           "weight_decay": 0.01, "padding": "dynamic, length-grouped batches"},
                "train_seconds": seconds, "seconds_per_step": seconds / steps,
                "accuracy": accuracy(ctx, teacher, ctx.tokenizer), "folder": str(folder)}
        teacher.save_pretrained(folder)
        ctx.tokenizer.save_pretrained(folder)
        (folder / "bench_teacher.json").write_text(json.dumps(meta, indent=2))
    ctx.teacher = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ctx.teacher_meta = json.loads((folder / "bench_teacher.json").read_text())
    ctx.store.update(lambda data: data.__setitem__("teacher", ctx.teacher_meta))
    logger.info("Teacher: %s (%s)", ctx.teacher_meta["accuracy"], folder)


def with_teacher_logits(ctx: SimpleNamespace, train: Dataset) -> Dataset:
    """``train`` (the training split, any tokenizer) with the teacher's cached logits: the trainer wants a teacher
    or its outputs even when alpha = 0, and a cached column spares the hard-label runs a live teacher."""
    path = Path(ctx.teacher_meta["folder"]) / "train_logits.npy"
    if not path.is_file():
        from hf_distill import cache_teacher_outputs

        data = tokenize(ctx.raw["train"], ctx.tokenizer, ctx.args.max_length).remove_columns("label")
        np.save(path, np.asarray(cache_teacher_outputs(ctx.teacher, data, batch_size=128)["teacher_logits"],
                                 dtype=np.float32))
    logits = np.load(path)
    if len(logits) != len(train):
        raise RuntimeError(f"{path} has {len(logits)} rows, the training set {len(train)}: delete it")
    return train.add_column("teacher_logits", [row.tolist() for row in logits])


def trimmed(ctx: SimpleNamespace, model: Any) -> tuple[Any, Any]:
    """A trimmed copy of ``model`` (to the training texts) and the trimmed tokenizer."""
    model, tokenizer, report = trim_vocabulary(copy.deepcopy(model), ctx.tokenizer, ctx.raw["train"]["text"],
                                               held_out_texts=ctx.raw["validation"]["text"], return_report=True)
    ctx.trim_report = {"kept": report.kept_size, "original": report.original_size,
                       "validation_unk_rate": report.held_out_unk_rate,
                       "validation_changed_share": report.held_out_changed_share}
    if ctx.trim_tokenizer is not None and tokenizer.get_vocab() != ctx.trim_tokenizer.get_vocab():
        raise RuntimeError("two trims of the same texts kept different vocabularies")
    ctx.trim_tokenizer = ctx.trim_tokenizer or tokenizer
    return model, ctx.trim_tokenizer


# --------------------------------------------------------------------------------------------- (a), (b)
def kd_recipe(args: argparse.Namespace) -> dict:
    recipe = dict(temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight,
                  hidden_loss=args.hidden_loss, attention_weight=args.attention_weight,
                  relation_weight=args.relation_weight, augment=args.kd_augment)
    return {k: v for k, v in recipe.items() if not ((k.endswith("_weight") or k == "augment") and v == 0)}


def copied_run(ctx: SimpleNamespace, name: str, seed: int, trim: bool, recipe: dict, save: bool) -> dict:
    """One 3-layer copied student (trimmed or not) for ``ctx.args.steps`` steps of ``recipe``."""
    args = ctx.args
    full = {"student": "create_student/3", "trim": trim, "steps": args.steps, "lr": args.lr,
            "batch_size": args.batch_size, **recipe}

    def run() -> dict:
        teacher, tokenizer = (ctx.trim_teacher, ctx.trim_tokenizer) if trim else (ctx.teacher, ctx.tokenizer)
        train = tokenize(ctx.raw["train"], tokenizer, args.max_length)
        set_seed(seed)
        student = create_student(teacher, num_layers=3)
        terms = {k: v for k, v in recipe.items() if k != "augment"}
        live = teacher if terms.get("alpha", 0) > 0 or any(k.endswith("_weight") for k in terms) else None
        train = train if live is not None else with_teacher_logits(ctx, train)
        if recipe.get("augment"):
            train = concatenate_datasets([train, augmented_rows(ctx, tokenizer, recipe["augment"], train.features)])
        model, seconds, history = distill(student, live, train, tokenizer, seed, args.steps, args.lr,
                                          args.batch_size, **terms)
        out = {"accuracy": accuracy(ctx, model, tokenizer), "train_seconds": seconds,
               "seconds_per_step": seconds / args.steps, "log": history}
        if save:
            out["folder"] = save_model(ctx, model, tokenizer, f"{name}-s{args.steps}-seed{seed}")
        return out

    return cached_run(ctx, name, seed, full, run)


def augmented_rows(ctx: SimpleNamespace, tokenizer: Any, per_sentence: int, features: Any) -> Dataset:
    """``per_sentence`` augment_texts variants of each training sentence, tokenized, label -100 (the teacher's
    soft labels are their only target): TinyBERT's transfer-set augmentation."""
    texts = unlabelled_texts(ctx, per_sentence)[len(ctx.raw["train"]):]
    rows = tokenize(Dataset.from_dict({"text": texts, "label": [-100] * len(texts)}), tokenizer, ctx.args.max_length)
    return rows.cast(features)


def trimmed_after_training(ctx: SimpleNamespace, name: str, seed: int, source: dict, folder_name: str) -> dict:
    """The student of the stored run ``source`` with its vocabulary trimmed to the training texts after
    distillation (on those texts the trimmed model's outputs are the untrimmed one's), saved as ``folder_name``;
    a classifier is also scored (validation and test), a headless encoder is not."""
    recipe = {**source["recipe"], "trim": "after training", "from": source["folder"]}
    classifier = "accuracy" in source

    def run() -> dict:
        auto = AutoModelForSequenceClassification if classifier else AutoModel
        model, tokenizer = trimmed(ctx, auto.from_pretrained(source["folder"]))
        out = {"train_seconds": 0.0, "folder": save_model(ctx, model, tokenizer, folder_name)}
        return {**out, "accuracy": accuracy(ctx, model, tokenizer), "seconds_per_step": 0.0} if classifier else out

    return cached_run(ctx, name, seed, recipe, run)


def group_ab(ctx: SimpleNamespace) -> None:
    """(a) hard twin and KD (and the --try recipes), (b) the trimmed KD student, seed by seed."""
    args = ctx.args
    for seed in args.seeds:
        if "a" in args.groups:
            copied_run(ctx, "a_hard", seed, False, dict(HARD), save=seed == args.seeds[0])
            kd = copied_run(ctx, "a_kd", seed, False, kd_recipe(args), save=True)
            if "b" in args.groups and kd.get("folder"):
                trimmed_after_training(ctx, "b_after", seed, kd, f"b_after-seed{seed}")
            for text in ctx.args.tries:
                if seed in args.try_seeds:
                    name, change = parse_try(text)
                    copied_run(ctx, f"a_try_{name}", seed, False, {**kd_recipe(args), **change}, save=False)
        if "b_before" in args.groups and seed == args.seeds[0]:  # trimmed before distillation: one seed
            copied_run(ctx, "b_kd", seed, True, kd_recipe(args), save=True)


# --------------------------------------------------------------------------------------------- (c)
@torch.no_grad()
def pca_init(student: Any, teacher: Any) -> None:
    """Student embedding rows (words, positions, token types) = the teacher's projected on the top principal
    components of the teacher's word embeddings (one basis for all three, so their sums stay comparable)."""
    s_emb, t_emb = student.base_model.embeddings, teacher.base_model.embeddings
    words = t_emb.word_embeddings.weight.float()
    width = s_emb.word_embeddings.weight.shape[1]
    _, _, v = torch.linalg.svd(words - words.mean(0), full_matrices=False)
    basis = v[:width].T  # [teacher width, student width]
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        source = getattr(t_emb, name).weight
        target = getattr(s_emb, name).weight
        target.copy_((source @ basis)[: target.shape[0]])


def narrow_shape(ctx: SimpleNamespace) -> Any:
    """The (c) student: narrow, trimmed vocabulary, PCA-initialised embeddings when --pca_init."""
    a = ctx.args
    student = narrow_student(ctx.trim_teacher, a.narrow_layers, a.narrow_hidden, a.narrow_heads)
    if a.pca_init:
        pca_init(student, ctx.trim_teacher)
    return student


def unlabelled_texts(ctx: SimpleNamespace, per_sentence: Optional[int] = None) -> list[str]:
    """SST-2 training sentences without labels + ``per_sentence`` (default ``--augment``) hf_distill.augmentation
    variants of each (masking and crops: the same texts with the trimmed tokenizer or the full one)."""
    from hf_distill.augmentation import augment_texts

    n = ctx.args.augment if per_sentence is None else per_sentence
    ctx.unlabelled = getattr(ctx, "unlabelled", None) or {}
    if n not in ctx.unlabelled:
        train = list(ctx.raw["train"]["text"])
        extra = augment_texts(train, ctx.tokenizer, num_per_example=n, seed=0) if n else []
        ctx.unlabelled[n] = train + extra
        logger.info("Unlabelled text: %d training sentences + %d augmented.", len(train), len(extra))
    return ctx.unlabelled[n]


def general_distillation(ctx: SimpleNamespace) -> dict:
    """Stage 1 of (c): the narrow encoder learns the untuned MiniLM's hidden states (projected) and MiniLM
    relations on unlabelled text (``feature-extraction``); the fallback without that task distils through the
    classification task from the fine-tuned teacher's soft labels."""
    a = ctx.args
    feature = "feature-extraction" in TASKS
    recipe = {"stage": "general", "task": "feature-extraction" if feature else "sequence-classification (fallback)",
              "shape": [a.narrow_layers, a.narrow_hidden, a.narrow_heads], "pca_init": a.pca_init, "augment": a.augment,
              "steps": a.general_steps, "lr": a.general_lr, "hidden_weight": a.narrow_hidden_weight,
              "relation_weight": a.narrow_relation_weight, "batch_size": a.batch_size}

    def run() -> dict:
        texts = unlabelled_texts(ctx)
        set_seed(0)
        student = narrow_shape(ctx)
        terms = dict(hidden_weight=a.narrow_hidden_weight, relation_weight=a.narrow_relation_weight, relation_heads=4)
        if feature:
            student, teacher = student.base_model, ctx.trim_base_teacher
            data = tokenize(Dataset.from_dict({"text": texts}), ctx.trim_tokenizer, a.max_length)
            terms.update(distillation_task="feature-extraction")
        else:
            teacher = ctx.trim_teacher
            data = tokenize(Dataset.from_dict({"text": texts, "label": [-100] * len(texts)}), ctx.trim_tokenizer,
                            a.max_length)
            terms.update(alpha=1.0, temperature=a.temperature)
        model, seconds, history = distill(student, teacher, data, ctx.trim_tokenizer, 0, a.general_steps,
                                          a.general_lr, a.batch_size, **terms)
        folder = save_model(ctx, model, ctx.trim_tokenizer, "c_general")
        return {"folder": folder, "train_seconds": seconds, "seconds_per_step": seconds / a.general_steps,
                "rows": len(texts), "log": history}

    return cached_run(ctx, "c_general", 0, recipe, run)


def narrow_run(ctx: SimpleNamespace, name: str, seed: int, general: Optional[dict], save: bool) -> dict:
    """Stage 2 of (c) (``general`` given: KD + hidden + relation on train + augmented text), or the hard twin."""
    a = ctx.args
    kd = general is not None
    recipe = {"student": f"narrow/{a.narrow_layers}x{a.narrow_hidden}/{a.narrow_heads}h", "pca_init": a.pca_init,
              "general": general["recipe"] if kd else None, "steps": a.task_steps, "lr": a.narrow_lr,
              "augment": a.augment if kd else 0, "batch_size": a.batch_size}
    terms = (dict(temperature=a.temperature, alpha=a.narrow_alpha, hidden_weight=a.narrow_hidden_weight,
                  relation_weight=a.narrow_relation_weight, relation_heads=4) if kd else dict(HARD))
    recipe.update(terms)

    def run() -> dict:
        tok = ctx.trim_tokenizer
        set_seed(seed)
        student = narrow_shape(ctx)
        train = tokenize(ctx.raw["train"], tok, a.max_length)
        train = train if kd else with_teacher_logits(ctx, train)
        if kd:
            student.base_model.load_state_dict(AutoModel.from_pretrained(general["folder"]).state_dict())
            train = concatenate_datasets([train, augmented_rows(ctx, tok, a.augment, train.features)])
        model, seconds, history = distill(student, ctx.trim_teacher if kd else None, train, tok, seed, a.task_steps,
                                          a.narrow_lr, a.batch_size, **terms)
        out = {"accuracy": accuracy(ctx, model, tok), "train_seconds": seconds,
               "seconds_per_step": seconds / a.task_steps, "log": history}
        if save:
            out["folder"] = save_model(ctx, model, tok, f"{name}-seed{seed}")
        return out

    return cached_run(ctx, name, seed, recipe, run)


def narrow_try(ctx: SimpleNamespace, name: str, seed: int, general: Optional[dict], terms: dict) -> dict:
    """A (c) variant on the training set only, from the cached teacher logits (no live teacher: logit terms only),
    starting from the general-distilled encoder (``general``) or from the PCA initialisation."""
    a = ctx.args
    recipe = {"student": f"narrow/{a.narrow_layers}x{a.narrow_hidden}/{a.narrow_heads}h", "pca_init": a.pca_init,
              "general": general["recipe"] if general else None, "steps": a.task_steps, "lr": a.narrow_lr,
              "augment": 0, "batch_size": a.batch_size, "teacher_logits": "cached", **terms}

    def run() -> dict:
        tok = ctx.trim_tokenizer
        set_seed(seed)
        student = narrow_shape(ctx)
        if general is not None:
            student.base_model.load_state_dict(AutoModel.from_pretrained(general["folder"]).state_dict())
        train = with_teacher_logits(ctx, tokenize(ctx.raw["train"], tok, a.max_length))
        model, seconds, history = distill(student, None, train, tok, seed, a.task_steps, a.narrow_lr, a.batch_size,
                                          **terms)
        return {"accuracy": accuracy(ctx, model, tok), "train_seconds": seconds,
                "seconds_per_step": seconds / a.task_steps, "log": history}

    return cached_run(ctx, name, seed, recipe, run)


def group_c_tries(ctx: SimpleNamespace) -> None:
    """(c) variants: what the general stage gives alone (hard labels from it), and logit KD on the training set."""
    general = general_distillation(ctx)
    for seed in ctx.args.seeds:
        narrow_run(ctx, "c_hard", seed, None, save=seed == ctx.args.seeds[0])
        narrow_try(ctx, "c_try_general_hard", seed, general, dict(HARD))
        narrow_try(ctx, "c_try_general_kd", seed, general, dict(temperature=ctx.args.temperature, alpha=0.9))
        narrow_try(ctx, "c_try_pca_kd", seed, None, dict(temperature=ctx.args.temperature, alpha=0.9))


def group_c(ctx: SimpleNamespace) -> None:
    general = general_distillation(ctx)
    for seed in ctx.args.seeds:
        narrow_run(ctx, "c_kd", seed, general, save=seed == ctx.args.seeds[0])
        narrow_run(ctx, "c_hard", seed, None, save=seed == ctx.args.seeds[0])


# --------------------------------------------------------------------------------------------- timing, (d)
def time_alternating(functions: dict[str, Callable[[], Any]], repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Median and p90 (ms) of each function, called in turn (one call each per round) so load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for i in range(warmup + repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"median": statistics.median(values), "p90": values[min(len(values) - 1, int(0.9 * len(values)))]}
    return out


def latency_texts(ctx: SimpleNamespace) -> dict[int, list[str]]:
    texts = list(ctx.raw["validation"]["text"])
    median = sorted(texts, key=len)[len(texts) // 2]
    return {1: [median], 32: [texts[i % len(texts)] for i in range(32)]}


def torch_forward(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> Callable[[], Any]:
    model.eval()
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def run() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return run


def onnx_forward(path: Path, tokenizer: Any, texts: list[str], max_length: int) -> Callable[[], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    feed = {k: v.astype(np.int64) for k, v in encoded.items() if k in names}
    return lambda: session.run(None, feed)


def disk_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def headline_folders(ctx: SimpleNamespace) -> dict[str, str]:
    """Saved seed-0 students of (a), (b), (c) found in the store."""
    runs = ctx.store.read()["runs"]
    found = {}
    for key, name in (("a", "a_kd"), ("b", "b_after"), ("b", "b_kd"), ("c", "c_kd"), ("a_hard", "a_hard"),
                      ("c_hard", "c_hard")):
        rows = [r for r in runs.values() if r["name"] == name and r.get("folder") and Path(r["folder"]).is_dir()
                and all(r["recipe"].get(k) == v for k, v in ctx.headline.get(name, {}).items())]
        if rows and key not in found:
            found[key] = sorted(rows, key=lambda r: r["seed"])[0]["folder"]
    return found


def export_group(ctx: SimpleNamespace) -> None:
    """(d): int8 ONNX of the seed-0 (a), (b), (c) students, judged on the test set; latency at batch 1."""
    from hf_distill.export import export_onnx

    a = ctx.args
    test_rows = [{"text": t, "label": l} for t, l in zip(ctx.raw["test"]["text"], ctx.raw["test"]["label"])]
    texts = latency_texts(ctx)[1]
    for key, folder in headline_folders(ctx).items():
        if key not in ("a", "b", "c"):
            continue

        def run(folder: str = folder) -> dict:
            result = export_onnx(folder, Path(a.work_dir) / "onnx" / Path(folder).name, eval_dataset=test_rows)
            int8 = result.quantized_path or result.rejected_int8_path
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            lat = time_alternating({"pytorch_fp32": torch_forward(model, tokenizer, texts, a.max_length),
                                    "onnx_fp32": onnx_forward(result.model_path, tokenizer, texts, a.max_length),
                                    "onnx_int8": onnx_forward(int8, tokenizer, texts, a.max_length)},
                                   a.latency_repeats * 3)
            return {"export": result.to_dict(), "latency_batch1_ms": lat, "pytorch_bytes": disk_bytes(folder)}

        cached_run(ctx, f"d_{key}", 0, {"folder": folder, "mtime": Path(folder).stat().st_mtime}, run)


def latency_group(ctx: SimpleNamespace) -> None:
    """CPU latency (1 thread) of the teacher and the seed-0 students, batch 1 and 32, models alternating."""
    a = ctx.args
    models = {"teacher": (ctx.teacher, ctx.tokenizer)}
    for key, folder in headline_folders(ctx).items():
        if key in ("a", "b", "c"):
            models[key] = (AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    result = {"threads": torch.get_num_threads()}
    for batch, texts in latency_texts(ctx).items():
        fns = {name: torch_forward(m, tok, texts, a.max_length) for name, (m, tok) in models.items()}
        result[f"batch_{batch}"] = time_alternating(fns, a.latency_repeats if batch == 32 else 3 * a.latency_repeats)
    result["parameters"] = {name: {"total": count_parameters(m), "non_embedding": count_parameters(m, True)}
                            for name, (m, _) in models.items()}
    ctx.store.update(lambda data: data.__setitem__("latency", result))
    logger.info("Latency: %s", json.dumps(result))


# --------------------------------------------------------------------------------------------- (e)
@torch.no_grad()
def embeddings_of(model: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's pooling)."""
    from hf_distill.sentence_embeddings import PoolingSettings, embed

    model.eval()
    pooling, chunks = PoolingSettings(mode="mean", normalize=True), []
    for start in range(0, len(texts), 128):
        batch = tokenizer(texts[start : start + 128], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        chunks.append(embed(model, dict(batch), pooling).float())
    return torch.cat(chunks)


def probe(train_x: torch.Tensor, train_y: list[int], val_x: torch.Tensor, val_y: list[int], test_x: torch.Tensor,
          test_y: list[int]) -> dict:
    """Logistic regression (L-BFGS, L2 penalty chosen on validation) on frozen embeddings: test accuracy."""
    ys = [torch.tensor(y) for y in (train_y, val_y, test_y)]
    best = None
    for l2 in (1e-4, 1e-3, 1e-2):
        torch.manual_seed(0)
        linear = torch.nn.Linear(train_x.shape[1], 2)
        opt = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(train_x), ys[0]) + l2 * linear.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val, test = ((linear(x).argmax(-1) == y).float().mean().item() for x, y in ((val_x, ys[1]), (test_x, ys[2])))
        if best is None or val > best["probe_validation"]:
            best = {"probe_validation": val, "probe_test": test, "probe_l2": l2}
    return best


def embedding_student(ctx: SimpleNamespace, name: str, trim: bool) -> dict:
    """A 3-layer copy of the MiniLM sentence embedder (trimmed or not), distilled on unlabelled text."""
    a = ctx.args
    augment = a.augment if a.embed_augment is None else a.embed_augment
    recipe = {"student": "create_student/3", "trim": trim, "steps": a.embed_steps, "lr": a.embed_lr,
              "augment": augment, "loss": "cosine", "batch_size": a.batch_size}

    def run() -> dict:
        teacher, tok = (ctx.trim_base_teacher, ctx.trim_tokenizer) if trim else (ctx.base_teacher, ctx.tokenizer)
        data = tokenize(Dataset.from_dict({"text": unlabelled_texts(ctx, augment)}), tok, a.max_length)
        set_seed(0)
        model, seconds, history = distill(create_student(teacher, num_layers=3), teacher, data, tok, 0, a.embed_steps,
                                          a.embed_lr, a.batch_size, distillation_task="sentence-embedding",
                                          embedding_pooling="mean", embedding_normalize=True, embedding_loss="cosine")
        return {"folder": save_model(ctx, model, tok, name), "train_seconds": seconds,
                "seconds_per_step": seconds / a.embed_steps, "log": history}

    return cached_run(ctx, name, 0, recipe, run)


def group_e(ctx: SimpleNamespace) -> None:
    """(e): distil the two students, then cosine / Spearman against the teacher on the test sentences and a
    logistic-regression probe for the teacher and each student."""
    from hf_distill.sentence_embeddings import embedding_metrics

    a = ctx.args
    ctx.base_teacher = AutoModel.from_pretrained(a.model)
    if getattr(ctx, "trim_base_teacher", None) is None:
        ctx.trim_base_teacher, _ = trimmed(ctx, ctx.base_teacher)
    models = {"teacher": (ctx.base_teacher, ctx.tokenizer)}
    if "sentence-embedding" not in TASKS:
        logger.warning("distillation_task='sentence-embedding' is not in this hf_distill: (e) skipped.")
        return
    student = embedding_student(ctx, "e_3layer", trim=False)
    trimmed_student = trimmed_after_training(ctx, "e_3layer_trimmed", 0, student, "e_3layer_trimmed")
    for name, folder in (("e_3layer", student["folder"]), ("e_3layer_trimmed", trimmed_student["folder"])):
        models[name] = (AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))
    split_texts = {s: list(ctx.raw[s]["text"]) for s in ("train", "validation", "test")}
    labels = [list(ctx.raw[s]["label"]) for s in ("train", "validation", "test")]
    out = {}
    for name, (model, tok) in models.items():
        emb = {s: embeddings_of(model, tok, t, a.max_length) for s, t in split_texts.items()}
        out[name] = {**probe(emb["train"], labels[0], emb["validation"], labels[1], emb["test"], labels[2]),
                     "parameters": count_parameters(model), "embeddings": emb}
    teacher_emb = out["teacher"].pop("embeddings")
    for name in out:
        if name != "teacher":
            emb = out[name].pop("embeddings")
            out[name].update(embedding_metrics(emb["test"], teacher_emb["test"]))
            # the sentences it was distilled on (augmented variants aside): the held-out gap is generalisation.
            # Only the cosine: the pairwise Spearman of 6,920 sentences would need tens of GB.
            out[name]["train_mean_cosine"] = float(torch.nn.functional.cosine_similarity(
                emb["train"].double(), teacher_emb["train"].double(), dim=-1).mean())
    ctx.store.update(lambda d: d.__setitem__("embeddings", {"models": out, "held_out": "SST-2 test sentences"}))


def embedding_table(emb: dict) -> str:
    rows = []
    for name, m in emb["models"].items():
        rows.append({"model": name, "params": f"{m['parameters'] / 1e6:.2f}M",
                     "mean cosine to teacher": f"{m['mean_cosine']:.4f}" if "mean_cosine" in m else "1",
                     "(on the training sentences)": f"{m['train_mean_cosine']:.4f}" if "train_mean_cosine" in m
                     else "1" if name == "teacher" else "",
                     "similarity Spearman": f"{m['similarity_spearman']:.4f}" if "similarity_spearman" in m else "1",
                     "probe test": f"{100 * m['probe_test']:.2f}",
                     "probe vs teacher": f"{100 * m['probe_test'] / emb['models']['teacher']['probe_test']:.1f}%"})
    return markdown_table(rows, ["model", "params", "mean cosine to teacher", "(on the training sentences)",
                                 "similarity Spearman", "probe test", "probe vs teacher"])


# --------------------------------------------------------------------------------------------- report
LABELS = {
    "a_hard": "(a) 3-layer copied student, hard labels only",
    "a_kd": "(a) 3-layer copied student, KD",
    "b_kd": "(b) (a) with vocabulary trimmed, KD",
    "b_after": "(b) the (a) KD students, vocabulary trimmed after distillation",
    "c_hard": "(c) narrow student, hard labels only",
    "c_kd": "(c) narrow student, general + task distillation",
    "c_try_general_hard": "(c) variant: general distillation, then hard labels only",
    "c_try_general_kd": "(c) variant: general distillation, then logit KD (alpha 0.9) on the training set",
    "c_try_pca_kd": "(c) variant: no general distillation, logit KD (alpha 0.9) on the training set",
}
SHAPE = {"a_hard": "a", "a_kd": "a", "b_kd": "b", "b_after": "b", "c_hard": "c", "c_kd": "c", "c_try_general_hard": "c",
         "c_try_general_kd": "c", "c_try_pca_kd": "c"}


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values, "n": len(values)}


def group_runs(data: dict, headline: dict[str, dict]) -> dict[str, dict]:
    """Test/validation summaries per run name, for the runs whose recipe is this invocation's headline one."""
    out: dict[str, dict] = {}
    for run in data["runs"].values():
        name = run["name"]
        if "accuracy" not in run or (name in headline and any(run["recipe"].get(k) != v
                                                              for k, v in headline[name].items())):
            continue
        out.setdefault(name, []).append(run)
    return {name: {"test": summarise([r["accuracy"]["test"] for r in rs]),
                   "validation": summarise([r["accuracy"]["validation"] for r in rs]),
                   "seeds": sorted(r["seed"] for r in rs), "recipe": rs[0]["recipe"],
                   "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in rs)}
            for name, rs in out.items()}


def _pm(s: dict) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s["n"] > 1 else f"{100 * s['mean']:.2f}"


def _shape_cells(data: dict, shape: str, folders: dict) -> dict:
    lat, cells = data.get("latency"), {}
    if lat and shape in lat["parameters"]:
        p, t = lat["parameters"][shape], lat["parameters"]["teacher"]
        cells["params"] = f"{p['total'] / 1e6:.2f}M ({p['total'] / t['total']:.3f})"
        cells["non-emb params"] = f"{p['non_embedding'] / 1e6:.2f}M ({p['non_embedding'] / t['non_embedding']:.3f})"
        for b in (1, 32):
            m, tm = lat[f"batch_{b}"][shape], lat[f"batch_{b}"]["teacher"]
            cells[f"b{b} ms (median / p90)"] = f"{m['median']:.1f} / {m['p90']:.1f} ({tm['median'] / m['median']:.2f}x)"
    if shape in folders:
        cells["disk"] = f"{disk_bytes(folders[shape]) / 2**20:.1f} MB"
    return cells


def accuracy_table(ctx: SimpleNamespace, data: dict, groups: dict) -> str:
    t_acc = data["teacher"]["accuracy"]
    folders = {**headline_folders(ctx), "teacher": data["teacher"]["folder"]}
    rows = [{"model": f"teacher: {Path(ctx.args.model).name}, fine-tuned", "validation": f"{100 * t_acc['validation']:.2f}",
             "test": f"{100 * t_acc['test']:.2f}", "retention": "100%", **_shape_cells(data, "teacher", folders)}]
    for name in [n for n in LABELS if n in groups] + sorted(n for n in groups if n.startswith("a_try_")):
        g = groups[name]
        twin = {"a_kd": "a_hard", "b_kd": "a_hard", "b_after": "a_hard"}.get(name, "c_hard" if name.startswith("c_") else None)
        gain = f"{100 * (g['test']['mean'] - groups[twin]['test']['mean']):+.2f}" if twin in groups and twin != name else ""
        changed = {k: v for k, v in g["recipe"].items()
                   if (k in DistillationArguments.__dataclass_fields__ or k == "augment")
                   and kd_recipe(ctx.args).get(k) != v}
        if g["recipe"].get("steps") != ctx.args.steps:
            changed["steps"] = g["recipe"].get("steps")
        label = LABELS.get(name, f"(a) try {name[6:]}: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        rows.append({"model": f"{label} [seeds {g['seeds']}]", "validation": _pm(g["validation"]),
                     "test": _pm(g["test"]), "retention": f"{100 * g['test']['mean'] / t_acc['test']:.1f}%",
                     "vs hard twin": gain, **_shape_cells(data, SHAPE.get(name, "a"), folders)})
    columns = ["model", "validation", "test", "retention", "vs hard twin", "params", "non-emb params", "disk",
               "b1 ms (median / p90)", "b32 ms (median / p90)"]
    return markdown_table(rows, columns)


def export_run(data: dict, key: str, folders: dict[str, str]) -> Optional[dict]:
    """The stored (d) export of the headline ``key`` student (its folder as saved now), or None."""
    runs = [v for k, v in data["runs"].items() if k.startswith(f"d_{key}-")
            and v["recipe"].get("folder") == folders.get(key)
            and v["recipe"].get("mtime") == Path(folders[key]).stat().st_mtime]
    return runs[-1] if runs else None


def export_table(data: dict, folders: dict[str, str]) -> str:
    rows = []
    for key in ("a", "b", "c"):
        run = export_run(data, key, folders)
        if run is None:
            continue
        e, lat = run["export"], run["latency_batch1_ms"]
        int8 = e["parity"].get("int8", {})
        rows.append({"student": key, "fp32 ONNX": f"{e['fp32_size_bytes'] / 2**20:.1f} MB",
                     "int8 ONNX": f"{(e['int8_size_bytes'] or 0) / 2**20:.1f} MB ({e['size_ratio']:.3f})",
                     "test fp32 -> int8": f"{100 * (int8.get('reference_accuracy') or 0):.2f} -> "
                                          f"{100 * (int8.get('accuracy') or 0):.2f}",
                     "int8 accepted": str(e["int8_accepted"]),
                     "b1 PyTorch fp32 / ORT fp32 / ORT int8 (ms)":
                         " / ".join(f"{lat[k]['median']:.2f}" for k in ("pytorch_fp32", "onnx_fp32", "onnx_int8")),
                     "int8 vs PyTorch": f"{lat['pytorch_fp32']['median'] / lat['onnx_int8']['median']:.2f}x"})
    columns = ["student", "fp32 ONNX", "int8 ONNX", "test fp32 -> int8", "int8 accepted",
               "b1 PyTorch fp32 / ORT fp32 / ORT int8 (ms)", "int8 vs PyTorch"]
    return markdown_table(rows, columns) if rows else ""


def goals_of(data: dict, groups: dict, folders: dict[str, str]) -> list[str]:
    """Issue 11's goals, each with its figures and met / not met (only those whose figures exist)."""
    t = data["teacher"]["accuracy"]["test"]
    lat, lines = data.get("latency"), []

    def speed(shape: str, b: int) -> float:
        return lat[f"batch_{b}"]["teacher"]["median"] / lat[f"batch_{b}"][shape]["median"]

    def share(shape: str) -> float:
        return lat["parameters"][shape]["total"] / lat["parameters"]["teacher"]["total"]

    def line(name: str, goal: str, met: bool, figures: str) -> None:
        lines.append(f"- ({name}) {goal}: **{'met' if met else 'not met'}** ({figures})")

    if {"a_kd", "a_hard"} <= set(groups) and lat and "a" in lat["parameters"]:
        r, gain = groups["a_kd"]["test"]["mean"] / t, groups["a_kd"]["test"]["mean"] - groups["a_hard"]["test"]["mean"]
        line("a", "retention >= 97%, >= +1.0 point over the hard twin, >= 1.9x faster at batch 32",
             r >= 0.97 and gain >= 0.01 and speed("a", 32) >= 1.9,
             f"{100 * r:.1f}%, {100 * gain:+.2f} points, {speed('a', 32):.2f}x")
    b_name = "b_after" if "b_after" in groups else "b_kd"
    if {"a_kd", b_name} <= set(groups) and lat and "b" in lat["parameters"]:
        diff = groups[b_name]["test"]["mean"] - groups["a_kd"]["test"]["mean"]
        line("b", "within 0.3 points of (a) at <= 60% of the teacher's parameters",
             (abs(diff) <= 0.003 or diff > 0) and share("b") <= 0.6, f"{100 * diff:+.2f} points, {100 * share('b'):.1f}%")
    if {"c_kd", "c_hard"} <= set(groups) and lat and "c" in lat["parameters"]:
        r = groups["c_kd"]["test"]["mean"] / t
        gain = groups["c_kd"]["test"]["mean"] - groups["c_hard"]["test"]["mean"]
        line("c", "retention >= 96.8% at <= 1/7.5 of the parameters, >= 9.4x faster at batch 32, beats its hard twin",
             r >= 0.968 and share("c") <= 1 / 7.5 and speed("c", 32) >= 9.4 and gain > 0,
             f"{100 * r:.1f}%, 1/{1 / share('c'):.1f} of the parameters, {speed('c', 32):.2f}x, {100 * gain:+.2f} points")
    for key in ("a", "b", "c"):
        run = export_run(data, key, folders)
        if run is None:
            continue
        e, lat1 = run["export"], run["latency_batch1_ms"]
        drop = e["parity"].get("int8", {}).get("accuracy_drop")
        sp = lat1["pytorch_fp32"]["median"] / lat1["onnx_int8"]["median"]
        line(f"d, {key}", "int8 <= 0.30 of fp32 size, within 1 point, >= 2x faster than fp32 PyTorch at batch 1",
             (e["size_ratio"] or 1) <= 0.30 and drop is not None and abs(drop) <= 1.0 and sp >= 2,
             f"size {e['size_ratio']:.3f}, {-(drop or 0):+.2f} points, {sp:.2f}x")
    emb = data.get("embeddings")
    if emb and "e_3layer" in emb.get("models", {}):
        s, te = emb["models"]["e_3layer"], emb["models"]["teacher"]
        line("e", "3-layer student: mean cosine >= 0.95, probe >= 97% of the teacher's",
             s["mean_cosine"] >= 0.95 and s["probe_test"] >= 0.97 * te["probe_test"],
             f"cosine {s['mean_cosine']:.3f}, probe {100 * s['probe_test']:.2f} vs {100 * te['probe_test']:.2f}")
    return lines


def settings_line(a: argparse.Namespace, data: dict) -> str:
    kd = ", ".join(f"{k} {v}" for k, v in kd_recipe(a).items())
    trim = data.get("trim", {})
    return (f"Settings: batch {a.batch_size}, max_length {a.max_length}, 1 thread per run. (a)/(b): {a.steps} steps "
            f"at lr {a.lr} for each student and its twin; KD = {kd}. (b): vocabulary {trim.get('original')} -> "
            f"{trim.get('kept')} tokens (validation [UNK] rate {100 * (trim.get('validation_unk_rate') or 0):.3f}%; "
            f"{100 * (trim.get('validation_changed_share') or 0):.1f}% of the validation sentences tokenized "
            f"otherwise, words split into kept pieces). "
            f"(c): {a.narrow_layers} layers x {a.narrow_hidden} ({a.narrow_heads} heads), PCA-initialised embeddings: "
            f"{a.general_steps} steps of general distillation (lr {a.general_lr}; hidden {a.narrow_hidden_weight} + "
            f"MiniLM relations {a.narrow_relation_weight}, 4 relation heads) on the training sentences + "
            f"{a.augment} augmented variants each, then {a.task_steps} task steps (lr {a.narrow_lr}; KD T "
            f"{a.temperature}, alpha {a.narrow_alpha}, same intermediate terms) on train + augmented rows; the hard "
            f"twin gets the same {a.task_steps} steps on the training set only. (e): {a.embed_steps} steps, lr "
            f"{a.embed_lr}, cosine loss on pooled embeddings, the training sentences + "
            f"{a.augment if a.embed_augment is None else a.embed_augment} augmented variants each; its trimmed copy "
            f"is trimmed after distillation.")


def headline_recipes(a: argparse.Namespace) -> dict[str, dict]:
    """The recipe keys a stored run must match to be this invocation's headline (a), (b) or (c) run."""
    kd = {**kd_recipe(a), "augment": a.kd_augment or None, "steps": a.steps}
    return {"a_kd": kd, "b_kd": kd, "b_after": kd, "a_hard": {"steps": a.steps}, "c_kd": {"steps": a.task_steps},
            "c_hard": {"steps": a.task_steps}}


def write_report(ctx: SimpleNamespace) -> str:
    """The markdown (accuracy, export and embedding tables, goals) from everything in the store."""
    a = ctx.args
    data = ctx.store.read()
    if "teacher" not in data:
        return ""
    groups = group_runs(data, ctx.headline)
    t = data["teacher"]
    parts = [f"Teacher: {Path(a.model).name} + classification head, {t['recipe']['steps']} steps "
             f"(lr {t['recipe']['lr']}, batch {t['recipe']['batch_size']}, max_length {t['recipe']['max_length']}), "
             f"validation {100 * t['accuracy']['validation']:.2f} / test {100 * t['accuracy']['test']:.2f}. "
             f"Accuracy in % (mean ± std over seeds); ratios against the teacher; latency: 1 CPU thread, models "
             f"alternating, (speed-up vs the teacher).", "", settings_line(a, data), "",
             accuracy_table(ctx, data, groups)]
    folders = headline_folders(ctx)
    if export_table(data, folders):
        parts += ["", "Int8 ONNX (dynamic quantization, judged on the test set), batch-1 latency medians, 1 thread:",
                  "", export_table(data, folders)]
    if data.get("embeddings"):
        parts += ["", "Sentence embeddings (test sentences held out):", "", embedding_table(data["embeddings"])]
    parts += ["", "Goals (issue 11):", *goals_of(data, groups, folders)]
    markdown = "\n".join(parts)
    ctx.store.update(lambda d: d.update({"groups": groups, "markdown": markdown, "config": vars(a)}))
    Path(a.output).with_suffix(".md").write_text(markdown + "\n")
    return markdown


def main(argv: Optional[list[str]] = None) -> str:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    hf_logging.set_verbosity_warning()
    torch.set_num_threads(args.threads)
    ctx = SimpleNamespace(args=args, store=Store(args.output), trim_tokenizer=None, headline=headline_recipes(args))
    ctx.raw, ctx.tokenizer = load_data(args)
    if args.quick and args.model == str(DATA / "models" / "all-MiniLM-L6-v2"):
        args.model = quick_model(Path(args.work_dir) / "tiny_bert", ctx.tokenizer)
    ctx.data_recipe = {"data": Path(args.data_dir).name, "train_rows": len(ctx.raw["train"]),
                       "max_length": args.max_length, "model": Path(args.model).name}
    get_teacher(ctx)
    if set(args.groups) & {"b", "b_before", "c", "c_try", "e"}:
        ctx.trim_teacher, _ = trimmed(ctx, ctx.teacher)
        ctx.store.update(lambda d: d.__setitem__("trim", ctx.trim_report))
    if set(args.groups) & {"c", "c_try"}:
        ctx.trim_base_teacher, _ = trimmed(ctx, AutoModel.from_pretrained(args.model))
    if set(args.groups) & {"a", "b", "b_before"}:
        group_ab(ctx)
    if "c" in args.groups:
        group_c(ctx)
    if "c_try" in args.groups:
        group_c_tries(ctx)
    if "e" in args.groups:
        group_e(ctx)
    if "latency" in args.groups:
        latency_group(ctx)
    if "d" in args.groups:
        export_group(ctx)
    markdown = write_report(ctx)
    print("\n" + markdown + "\n")
    return markdown


if __name__ == "__main__":
    main()
