"""Model cards for distilled students, rendered from `model_cards/` with `huggingface_hub.ModelCard`.

The card is built from what a run leaves in its output folder:
`distillation/recipe.json` (method and hyperparameters), `all_results.json` / `eval_results.json`
(evaluation metrics) and `report.json` / `report.png` (teacher vs student vs int8 benchmark).
Every key is optional: the card renders what is present.

Safety: everything read is scrubbed before rendering. Keys that name a secret (`token`, `secret`,
`password`, `api_key`) are dropped, values that look like a Hugging Face token are redacted, and
absolute or home paths are replaced by their last component. The teacher's weights never enter the
card (it is text); `base_model` is set only when the teacher is a Hub id, never a local path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

__all__ = ["render_model_card", "write_model_card", "scrub", "is_hub_id", "DEFAULT_TEMPLATE"]

#: The template shipped in the repository's `model_cards/` folder.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "distilled_model.md"
CARD_TAGS = ("distillation", "knowledge-distillation", "hf_distill")

_TOKEN_VALUE = re.compile(r"hf_[A-Za-z0-9]{16,}")
_SECRET_KEY = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
# An absolute POSIX path, a home path (~/x, ~user/x) or a Windows drive path, not inside a URL or word.
_PATH_IN_TEXT = re.compile(r"""(?<![\w.:/\\~-])(?:~[\w.-]*|[A-Za-z]:)?[/\\](?=[\w.~-])[^\s'"`<>|,;()\[\]{}]*""")
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")

_TASK_TO_PIPELINE = {
    "sequence-classification": "text-classification",
    "text-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "causal-lm": "text-generation",
    "text-generation": "text-generation",
    "masked-lm": "fill-mask",
    "fill-mask": "fill-mask",
    "seq2seq-lm": "text2text-generation",
    "feature-extraction": "feature-extraction",
    "sentence-embedding": "sentence-similarity",
}
# Eval keys that describe the run, not the model's quality.
_NOT_QUALITY = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")

# Citation keys (the template holds the BibTeX) and the words in a loss term (its name or a string
# setting such as `divergence` or `type`) that call for them. A term that names a specific method is
# cited for that method; otherwise hidden-state, attention and embedding terms cite TinyBERT.
_CITATION_TRIGGERS: dict[str, tuple[str, ...]] = {
    "tinybert": ("tinybert",),
    "pkd": ("pkd", "patient"),
    "minilm": ("minilm", "value_relation", "self_attention_relation"),
    "rkd": ("rkd",),
    "gkd": ("gkd", "jsd", "on_policy"),
    "distillm": ("distillm", "skew"),
}
_GENERIC_TRIGGERS: dict[str, tuple[str, ...]] = {"tinybert": ("hidden", "attention", "embedding")}


# --------------------------------------------------------------------------------------------
# Scrubbing
# --------------------------------------------------------------------------------------------
def _path_tail(path: str) -> str:
    parts = [part for part in re.split(r"[/\\]", path) if part and not part.startswith("~")]
    return parts[-1] if parts else "<path>"


def _scrub_text(text: str) -> str:
    text = _TOKEN_VALUE.sub("<redacted>", text)
    return _PATH_IN_TEXT.sub(lambda match: _path_tail(match.group(0)), text)


def scrub(value: Any) -> Any:
    """A copy of `value` with secrets removed and local absolute paths reduced to their last part.

    Mapping entries whose key names a secret (token, secret, password, api key) are dropped unless
    their value is a number or a boolean (`max_new_tokens: 128` stays; `hub_token: "hf_..."` goes).
    """
    if isinstance(value, Mapping):
        kept = {}
        for key, item in value.items():
            if _SECRET_KEY.search(str(key)) and not isinstance(item, (bool, int, float)):
                continue
            kept[_scrub_text(str(key))] = scrub(item)
        return kept
    if isinstance(value, (list, tuple)):
        return [scrub(item) for item in value]
    if isinstance(value, str):
        return _scrub_text(value)
    return value


def is_hub_id(name: str | None) -> bool:
    """True when `name` reads as a Hub repo id (`org/name` or `name`), not a local path."""
    if not name or not isinstance(name, str) or not _HUB_ID.match(name):
        return False
    if "--" in name or ".." in name or name.endswith((".", "-")):
        return False
    return not Path(name).exists()


# --------------------------------------------------------------------------------------------
# Reading a run's folder
# --------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path.name} in {path.parent.name!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object, found {type(data).__name__}")
    return data


def _read_eval_results(output_dir: Path) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in ("all_results.json", "eval_results.json"):
        merged.update(_read_json(output_dir / name) or {})
    return merged


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if _is_number(value):
        if isinstance(value, int):
            return str(value)
        text = f"{value:.{digits}g}"
        return f"{value:.0f}" if "e+" in text else text
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value).replace("|", "\\|")


def _fmt_params(count: Any) -> str | None:
    if not _is_number(count):
        return None
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(int(count))


def _fmt_latency(cell: Any) -> str:
    if isinstance(cell, Mapping):
        parts = [_fmt(cell[k], 3) for k in ("median", "p90") if _is_number(cell.get(k))]
        return " / ".join(parts) if parts else _fmt(dict(cell))
    return _fmt(cell, 3)


def _label(key: str) -> str:
    return key.replace("_", " ").strip().capitalize()


def _row_role(name: str) -> str:
    lowered = name.lower()
    if "teacher" in lowered:
        return "teacher"
    if any(word in lowered for word in ("int8", "quant", "qint", "uint8")):
        return "int8"
    if "onnx" in lowered:
        return "student_onnx"
    return "student"


# --------------------------------------------------------------------------------------------
# Building the template's context
# --------------------------------------------------------------------------------------------
def _model_entry(spec: Any) -> dict[str, Any]:
    """Display fields for a teacher/student spec; hub-ness is judged on the raw name, before scrubbing."""
    spec = spec if isinstance(spec, Mapping) else {"name_or_path": spec} if spec else {}
    raw_name = spec.get("name_or_path")
    hub = is_hub_id(raw_name)
    name = scrub(raw_name) if raw_name else None
    spec = scrub(dict(spec))
    return {
        "name": name,
        "hub_id": name if hub else None,
        "link": f"https://huggingface.co/{name}" if hub else None,
        "num_parameters": spec.get("num_parameters"),
        "params": _fmt_params(spec.get("num_parameters")),
        "model_type": spec.get("model_type"),
        "fingerprint": spec.get("fingerprint"),
    }


def _loss_rows(losses: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, spec in losses.items():
        spec = spec if isinstance(spec, Mapping) else {"weight": spec}
        settings = ", ".join(f"{key}={_fmt(value)}" for key, value in spec.items() if key != "weight")
        rows.append({"name": name, "logged": f"loss_{name}", "weight": _fmt(spec.get("weight")), "settings": settings})
    return rows


def _key_hyperparameters(losses: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[tuple[str, str]]:
    kd = losses.get("kd") if isinstance(losses.get("kd"), Mapping) else {}
    ce = losses.get("ce") if isinstance(losses.get("ce"), Mapping) else {}
    found: list[tuple[str, str]] = []
    if arguments.get("distillation_task") in ("feature-extraction", "sentence-embedding") and not kd:
        arguments = {k: v for k, v in arguments.items()  # no logit terms: their settings are unused
                     if k not in ("temperature", "alpha", "kd_temperature", "kd_alpha", "kd_divergence", "divergence")}
    temperature = kd.get("temperature", arguments.get("temperature", arguments.get("kd_temperature")))
    if temperature is not None:
        found.append(("Temperature", _fmt(temperature)))
    divergence = kd.get("divergence", arguments.get("kd_divergence", arguments.get("divergence")))
    if divergence is not None:
        found.append(("Divergence", _fmt(divergence)))
    alpha = arguments.get("alpha", arguments.get("kd_alpha"))
    if alpha is not None:
        found.append(("Alpha", _fmt(alpha)))
    elif _is_number(kd.get("weight")) and _is_number(ce.get("weight")) and kd["weight"] + ce["weight"] > 0:
        share = kd["weight"] / (kd["weight"] + ce["weight"])
        found.append(("Alpha (KD share of KD + CE weights)", _fmt(share)))
    for label, key in (("Learning rate", "learning_rate"), ("Epochs", "num_train_epochs"), ("Max steps", "max_steps"),
                       ("Batch size per device", "per_device_train_batch_size"), ("Seed", "seed")):
        steps_rule = _is_number(arguments.get("max_steps")) and arguments["max_steps"] > 0  # max_steps overrides epochs
        if arguments.get(key) is not None and not (key == "max_steps" and not steps_rule) and not (
                key == "num_train_epochs" and steps_rule):
            found.append((label, _fmt(arguments[key])))
    return found


def _layer_map_rows(layer_map: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for kind, mapping in layer_map.items():
        if isinstance(mapping, Mapping):
            pairs = ", ".join(f"{student} → {teacher}" for student, teacher in mapping.items())
        elif isinstance(mapping, (list, tuple)):
            pairs = ", ".join(" → ".join(map(str, pair)) if isinstance(pair, (list, tuple)) else str(pair)
                              for pair in mapping)
        else:
            pairs = _fmt(mapping)
        rows.append({"kind": kind, "pairs": pairs})
    return rows


def _distillation_argument_names() -> set[str]:
    """Fields that `DistillationArguments` adds to `TrainingArguments` (empty if it cannot be imported)."""
    try:
        from transformers import TrainingArguments

        from hf_distill.arguments import DistillationArguments
    except ImportError:  # pragma: no cover - the words below still sort the arguments
        return set()
    return set(DistillationArguments.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)


def _split_arguments(arguments: Mapping[str, Any], loss_names: list[str]) -> tuple[list, list]:
    """(distillation arguments, other training arguments) as sorted (key, text) pairs, None values left out."""
    own = _distillation_argument_names()
    words = ("teacher", "student", "temperature", "alpha", "distil", "layer_map", "projection", "divergence")
    prefixes = tuple(f"{name}_" for name in loss_names)
    distill, training = [], []
    for key in sorted(arguments):
        value = arguments[key]
        if value is None or value == [] or value == {}:
            continue
        is_distill = key in own or key.startswith(prefixes) or any(word in key for word in words)
        (distill if is_distill else training).append((key, _fmt(value)))
    return distill, training


def _citations(losses: Mapping[str, Any], arguments: Mapping[str, Any]) -> list[str]:
    def matches(words: list[str], triggers: dict[str, tuple[str, ...]]) -> set[str]:
        return {key for key, found in triggers.items() if any(t in word for word in words for t in found)}

    cited: set[str] = set()
    for name, spec in losses.items():
        words = [str(name).lower()]
        if isinstance(spec, Mapping):
            words += [str(value).lower() for value in spec.values() if isinstance(value, str)]
        cited |= matches(words, _CITATION_TRIGGERS) or matches(words, _GENERIC_TRIGGERS)
    if _is_number(arguments.get("lmbda")) and arguments["lmbda"] > 0:  # on-policy fraction, as in GKD
        cited.add("gkd")
    return ["hinton", "distilbert", *sorted(cited)]


def _metric_rows(eval_results: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for key, value in eval_results.items():
        if key.startswith("eval_") and _is_number(value) and not key.endswith(_NOT_QUALITY):
            rows.append((key[len("eval_"):], _fmt(value)))
    return rows


def _report_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [row for row in report.get("rows", []) if isinstance(row, Mapping)]
    if not rows:
        return [], []
    latency_keys: list[str] = []
    extra_keys: list[str] = []
    known = ("name", "accuracy", "size_mb", "num_parameters", "latency_ms")
    for row in rows:
        for key in (row.get("latency_ms") or {}) if isinstance(row.get("latency_ms"), Mapping) else ():
            latency_keys += [key] if key not in latency_keys else []
        extra_keys += [key for key in row if key not in known and key not in extra_keys]
    header = ["Model", "Accuracy", "Size (MB)", "Parameters"]
    header += [f"Latency {key.replace('_', ' ')} (ms, median / p90)" for key in latency_keys]
    header += [_label(key) for key in extra_keys]
    table = []
    for row in rows:
        latency = row.get("latency_ms") if isinstance(row.get("latency_ms"), Mapping) else {}
        cells = [_fmt(row.get("name")), _fmt(row.get("accuracy")), _fmt(row.get("size_mb"), 4),
                 _fmt_params(row.get("num_parameters")) or ""]
        cells += [_fmt_latency(latency.get(key)) if key in latency else "" for key in latency_keys]
        cells += [_fmt(row.get(key)) for key in extra_keys]
        table.append(cells)
    return header, table


def _median(row: Mapping[str, Any], batch: str) -> float | None:
    cell = (row.get("latency_ms") or {}).get(batch) if isinstance(row.get("latency_ms"), Mapping) else None
    value = cell.get("median") if isinstance(cell, Mapping) else cell
    return value if _is_number(value) and value > 0 else None


def _report_summary(report: Mapping[str, Any]) -> list[str]:
    by_role: dict[str, Mapping[str, Any]] = {}
    for row in report.get("rows", []):
        if isinstance(row, Mapping):
            by_role.setdefault(_row_role(str(row.get("name", ""))), row)
    teacher, best = by_role.get("teacher"), by_role.get("int8") or by_role.get("student")
    if not teacher or not best:
        return []
    sentences = []
    t_lat, s_lat = _median(teacher, "batch_1"), _median(best, "batch_1")
    if t_lat and s_lat:
        sentences.append(f"At batch 1, {best.get('name')} is {t_lat / s_lat:.1f}× faster than the teacher.")
    if _is_number(teacher.get("size_mb")) and _is_number(best.get("size_mb")) and teacher["size_mb"] > 0:
        sentences.append(f"It is {100 * best['size_mb'] / teacher['size_mb']:.0f}% of the teacher's size on disk.")
    if _is_number(teacher.get("accuracy")) and _is_number(best.get("accuracy")):
        gap = 100 * (best["accuracy"] - teacher["accuracy"])
        sentences.append(f"Accuracy differs from the teacher's by {gap:+.2f} points.")
    return sentences


def _eval_results(task: str | None, dataset: str | None, eval_results: Mapping[str, Any],
                  report: Mapping[str, Any]) -> list[EvalResult]:
    """model-index entries: the student's metrics, the teacher's and the int8 student's."""
    if not task or not dataset:
        return []
    found: list[tuple[str, str, float]] = []  # (metric type, display name, value)
    for key, value in eval_results.items():
        if not (key.startswith("eval_") and _is_number(value)) or key.endswith(_NOT_QUALITY):
            continue
        metric = key[len("eval_"):]
        if metric == "loss" or metric.startswith("loss_"):
            continue
        if metric.startswith("teacher_") and metric != "teacher_agreement":
            found.append((metric, f"{_label(metric[len('teacher_'):])} (teacher)", float(value)))
        elif metric == "teacher_agreement":
            found.append((metric, "Agreement with the teacher (student)", float(value)))
        else:
            found.append((metric, f"{_label(metric)} (student)", float(value)))
    types = {metric_type for metric_type, _, _ in found}
    for row in report.get("rows", []):
        if not isinstance(row, Mapping) or not _is_number(row.get("accuracy")):
            continue
        role = _row_role(str(row.get("name", "")))
        metric_type = {"teacher": "teacher_accuracy", "int8": "int8_accuracy", "student": "accuracy"}.get(role)
        if metric_type and metric_type not in types:
            found.append((metric_type, f"Accuracy, {row.get('name')}", float(row["accuracy"])))
            types.add(metric_type)
    return [EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=metric_type,
                       metric_value=value, metric_name=name) for metric_type, name, value in found]


def _resolve_template(template_path: str | os.PathLike | None) -> Path:
    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(
            f"model-card template not found: {path}. Pass template_path= or run from a checkout that has "
            "model_cards/distilled_model.md."
        )
    return path


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def render_model_card(
    output_dir: str | os.PathLike,
    *,
    recipe: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    template_path: str | os.PathLike | None = None,
    model_name: str | None = None,
    license: str | None = None,  # noqa: A002 (the card field's name)
) -> ModelCard:
    """Render the distillation model card for the student saved in `output_dir`.

    Inputs left as None are read from the folder: `distillation/recipe.json`,
    `all_results.json` + `eval_results.json`, `report.json`. `model_name` defaults to the folder's
    name (pass the repo id when pushing); `license` is written to the card data when given.
    """
    output_dir = Path(output_dir)
    recipe, eval_results, report = _card_inputs(output_dir, recipe, eval_results, report)
    # Names are judged (Hub id or local path) before scrubbing, which turns a path into its last part.
    teacher, student = _model_entry(recipe.get("teacher")), _model_entry(recipe.get("student"))
    dataset_rows = _dataset_rows(recipe.get("datasets") or [])
    recipe, eval_results, report = scrub(dict(recipe)), scrub(dict(eval_results)), scrub(dict(report))
    model_name = scrub(model_name or output_dir.resolve().name)
    losses = recipe.get("losses") if isinstance(recipe.get("losses"), Mapping) else {}
    arguments = recipe.get("arguments") if isinstance(recipe.get("arguments"), Mapping) else {}
    layer_map = recipe.get("layer_map") if isinstance(recipe.get("layer_map"), Mapping) else {}
    task = recipe.get("task")
    pipeline_tag = _TASK_TO_PIPELINE.get(str(task), task if isinstance(task, str) else None)
    datasets = [row["name"] for row in dataset_rows]
    sentence_transformers = (output_dir / "modules.json").is_file()  # loads with SentenceTransformer(folder)
    card_data = ModelCardData(
        model_name=model_name, base_model=teacher["hub_id"],
        datasets=[row["name"] for row in dataset_rows if row["link"]] or None, tags=list(CARD_TAGS),
        library_name="sentence-transformers" if sentence_transformers else "transformers", pipeline_tag=pipeline_tag, license=license or recipe.get("license"),
        eval_results=_eval_results(pipeline_tag, datasets[0] if datasets else None, eval_results, report) or None,
    )
    ratio = None
    if _is_number(teacher["num_parameters"]) and _is_number(student["num_parameters"]) and student["num_parameters"]:
        ratio = f"{teacher['num_parameters'] / student['num_parameters']:.1f}"
    distill_args, training_args = _split_arguments(arguments, list(losses))
    header, table = _report_table(report)
    card = ModelCard.from_template(
        card_data, template_path=str(_resolve_template(template_path)), model_title=model_name, task=task,
        hf_distill_version=recipe.get("hf_distill_version"), teacher=teacher, student=student, param_ratio=ratio,
        dataset_rows=dataset_rows, loss_rows=_loss_rows(losses), key_hyperparameters=_key_hyperparameters(losses, arguments),
        layer_map_rows=_layer_map_rows(layer_map), distill_arguments=distill_args, training_arguments=training_args,
        metric_rows=_metric_rows(eval_results), report_header=header, report_table=table,
        report_summary=_report_summary(report), report_threads=report.get("threads"),
        report_backend=report.get("backend"), plot="report.png" if (output_dir / "report.png").is_file() else None,
        has_onnx=(output_dir / "onnx").is_dir(), has_int8=any(_row_role(str(row[0])) == "int8" for row in table),
        citations=_citations(losses, arguments), sentence_transformers=sentence_transformers,
    )
    return _final_scrub(card, output_dir)


def _card_inputs(output_dir: Path, recipe: Mapping[str, Any] | None, eval_results: Mapping[str, Any] | None,
                 report: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """The recipe, eval results and report given, or read from the folder when None."""
    if recipe is None:
        recipe = _read_json(output_dir / "distillation" / "recipe.json") or {}
        if not recipe:
            logger.warning("no distillation/recipe.json in %s: the card will not describe the method", output_dir)
    if eval_results is None:
        eval_results = _read_eval_results(output_dir)
    if report is None:
        report = _read_json(output_dir / "report.json") or {}
    return recipe, eval_results, report


def _dataset_rows(names: Any) -> list[dict[str, Any]]:
    """One row per dataset: its (scrubbed) name and a Hub link when it is a Hub id."""
    names = [names] if isinstance(names, str) else [str(name) for name in names]
    return [
        {"name": scrub(name), "link": f"https://huggingface.co/datasets/{name}" if is_hub_id(name) else None}
        for name in names
    ]


def _final_scrub(card: ModelCard, output_dir: Path) -> ModelCard:
    """Belt and braces: no token-looking string and no known local prefix survives rendering."""
    text = _TOKEN_VALUE.sub("<redacted>", str(card))
    for prefix in {str(output_dir.resolve()), str(Path.home())}:
        if len(prefix) > 1:
            pattern = re.escape(prefix) + r"""[^\s'"`<>|,;()\[\]{}]*"""
            text = re.sub(pattern, lambda match: _path_tail(match.group(0)), text)
    return card if text == str(card) else ModelCard(text)


def write_model_card(output_dir: str | os.PathLike, **card_inputs: Any) -> Path:
    """Render the card and write it to `output_dir/README.md`; `card_inputs` are `render_model_card`'s keyword
    arguments (recipe, eval_results, report, template_path, model_name, license)."""
    card = render_model_card(output_dir, **card_inputs)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path
