"""LoRA students through PEFT: building the adapter config, merging a trained adapter into a plain model,
and refusing a LoRA adapter folder where a full model (a teacher) is expected.

A LoRA student trains only its adapter weights; the teacher stays the full model. After training,
:func:`merge_lora_student` folds the adapter into the base weights (``merge_and_unload``) and returns a
plain ``PreTrainedModel`` that loads with ``from_pretrained`` and needs no PEFT at inference time.

``peft`` is imported lazily, so that the rest of ``hf_distill`` works without it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from .safe_loading import from_pretrained_safely, refuse_pickle_only_folder

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
#: PEFT task types -> the transformers auto class of the base model.
AUTO_CLASS_BY_PEFT_TASK = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "TOKEN_CLS": AutoModelForTokenClassification,
    "QUESTION_ANS": AutoModelForQuestionAnswering,
}
#: Files of a training run that belong beside the merged model too (the recipe, the card).
_RUN_EXTRAS = ("distillation", "README.md")

__all__ = [
    "ADAPTER_CONFIG",
    "is_adapter_folder",
    "lora_config",
    "merge_lora_student",
    "read_adapter_config",
    "refuse_adapter_without_base",
]


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - peft is a dependency of the LoRA features only
        raise ImportError("LoRA students need the `peft` package: pip install peft") from error
    return peft


def is_adapter_folder(path: Union[str, Path]) -> bool:
    """True when ``path`` is a folder written by a PEFT adapter's ``save_pretrained`` (it has adapter_config.json)."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def read_adapter_config(path: Union[str, Path]) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json`` as a dict."""
    return json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text())


def lora_config(
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Union[str, Sequence[str], None] = "all-linear",
    task_type: str = "CAUSAL_LM",
    bias: str = "none",
) -> Any:
    """A ``peft.LoraConfig`` for a student, checked here so that bad flags fail before any model is built.

    ``target_modules``: module names (``q_proj``, ``v_proj``, ...), ``"all-linear"`` (every linear layer
    except the output head), or None for PEFT's per-architecture default.
    """
    peft = _require_peft()
    if r < 1:
        raise ValueError(f"LoRA rank `r` must be at least 1, got {r}.")
    if alpha <= 0:
        raise ValueError(f"LoRA `alpha` must be > 0, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA `dropout` must be in [0, 1), got {dropout}.")
    if task_type not in AUTO_CLASS_BY_PEFT_TASK:
        raise ValueError(f"`task_type` must be one of {sorted(AUTO_CLASS_BY_PEFT_TASK)}, got {task_type!r}.")
    if isinstance(target_modules, (list, tuple)):
        target_modules = [str(m) for m in target_modules]
        if len(target_modules) == 1 and target_modules[0] == "all-linear":
            target_modules = "all-linear"
    return peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type, bias=bias
    )


def _base_exists(name_or_path: Optional[str]) -> bool:
    """Whether the adapter's recorded base can be loaded: a local folder with a config, or a Hub id in the cache."""
    if not name_or_path:
        return False
    path = Path(name_or_path).expanduser()
    if path.exists():
        return (path / "config.json").is_file()
    if name_or_path.startswith((".", "/", "~")):
        return False
    try:  # a Hub id: only if its config is in the local cache (offline) or downloadable (online)
        from transformers.utils import cached_file

        return cached_file(name_or_path, "config.json", _raise_exceptions_for_missing_entries=False) is not None
    except Exception:  # noqa: BLE001 - any failure means "cannot be loaded here"
        return False


def refuse_adapter_without_base(
    name_or_path: Union[str, Path], role: str = "teacher", base_model: Union[str, nn.Module, None] = None
) -> Optional[str]:
    """Check a model path given as ``role``; raise a clear error for a LoRA adapter whose base is unavailable.

    Returns None for anything that is not an adapter folder, else the base to load it on (``base_model``
    when given, else the ``base_model_name_or_path`` the adapter recorded). A LoRA adapter holds only
    low-rank deltas: it is not a model, and using it as a teacher needs its base weights.
    """
    if not is_adapter_folder(name_or_path):
        return None
    config = read_adapter_config(name_or_path)
    recorded = config.get("base_model_name_or_path")
    if base_model is not None:
        return base_model if isinstance(base_model, str) else "<model object>"
    if _base_exists(recorded):
        return recorded
    raise ValueError(
        f"The {role} {str(name_or_path)!r} is a {config.get('peft_type', 'PEFT')} adapter folder (it has "
        f"{ADAPTER_CONFIG} and adapter weights, no full model), and its base model "
        f"{recorded!r} cannot be found here. A {role} must be a full model: pass the base model as well "
        f"(--{role}_base_model <path or hub id>, or merge_lora_student(adapter, base_model=...)), or merge the "
        f"adapter into its base first with hf_distill.peft_students.merge_lora_student and pass the merged folder."
    )


def _auto_class(adapter_config: dict[str, Any]) -> Any:
    task_type = adapter_config.get("task_type") or "CAUSAL_LM"
    if task_type not in AUTO_CLASS_BY_PEFT_TASK:
        raise ValueError(
            f"Adapter task_type {task_type!r} is not supported; expected one of {sorted(AUTO_CLASS_BY_PEFT_TASK)}."
        )
    return AUTO_CLASS_BY_PEFT_TASK[task_type]


def load_adapter_model(
    adapter_dir: Union[str, Path],
    base_model: Union[str, PreTrainedModel, None] = None,
    role: str = "student",
    allow_pickle_weights: bool = False,
) -> Any:
    """A ``PeftModel``: the adapter in ``adapter_dir`` on its base (``base_model``, else the recorded base).

    Adapter and base load from safetensors; pickle-only folders are refused unless ``allow_pickle_weights``.
    """
    peft = _require_peft()
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"Adapter folder {str(adapter_dir)!r} does not exist.")
    if not is_adapter_folder(adapter_dir):
        raise ValueError(
            f"{str(adapter_dir)!r} is not a PEFT adapter folder (no {ADAPTER_CONFIG}). "
            + ("It holds a full model already: load it with from_pretrained, there is nothing to merge."
               if (adapter_dir / "config.json").is_file() else "Pass the folder the LoRA training run saved.")
        )
    base_name = refuse_adapter_without_base(adapter_dir, role=role, base_model=base_model)
    refuse_pickle_only_folder(adapter_dir, allow_pickle_weights, what=f"{role} adapter")
    config = read_adapter_config(adapter_dir)
    if isinstance(base_model, nn.Module):
        base = base_model
    else:
        base = from_pretrained_safely(_auto_class(config), base_name, allow_pickle_weights)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir))


def _copy_run_extras(source: Path, target: Path) -> None:
    for name in _RUN_EXTRAS:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, target / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, target / name)


def merge_lora_student(
    adapter_dir_or_model: Union[str, Path, Any],
    output_dir: Union[str, Path, None] = None,
    *,
    base_model: Union[str, PreTrainedModel, None] = None,
    tokenizer: Any = None,
    allow_pickle_weights: bool = False,
) -> PreTrainedModel:
    """Fold a LoRA student's adapter into its base weights; return (and optionally save) a plain model.

    Args:
        adapter_dir_or_model: a ``PeftModel`` (merged in place: it must not be used afterwards), or a folder
            written by its ``save_pretrained`` (a training run's ``output_dir`` with ``use_lora``).
        output_dir: when given, the merged model is written there with ``save_pretrained`` (safetensors),
            with the tokenizer (``tokenizer``, else the one saved in the adapter folder, if any) and the
            run's ``distillation/`` recipe folder.
        base_model: the base to load a folder's adapter on (a model or a path / Hub id); default: the
            ``base_model_name_or_path`` recorded in ``adapter_config.json``.
        allow_pickle_weights: also load an adapter or base folder that has only pickle weights (``*.bin``).

    Returns:
        The merged ``PreTrainedModel`` (no PEFT layers left), in eval mode.
    """
    peft = _require_peft()
    source_dir: Optional[Path] = None
    if isinstance(adapter_dir_or_model, (str, Path)):
        source_dir = Path(adapter_dir_or_model).expanduser()
        model = load_adapter_model(source_dir, base_model=base_model, allow_pickle_weights=allow_pickle_weights)
    elif isinstance(adapter_dir_or_model, peft.PeftModel):
        model = adapter_dir_or_model
    elif isinstance(adapter_dir_or_model, PreTrainedModel):
        raise ValueError(
            f"merge_lora_student got a plain {type(adapter_dir_or_model).__name__}, not a PEFT model: it has no "
            "adapter to merge. Pass the PeftModel (or the adapter folder) from the LoRA training run."
        )
    else:
        raise TypeError(
            f"merge_lora_student expects an adapter folder or a peft.PeftModel, got {type(adapter_dir_or_model)!r}."
        )
    merged = model.merge_and_unload()
    merged.eval()
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(output_dir), safe_serialization=True)
        if tokenizer is None and source_dir is not None and _has_tokenizer(source_dir):
            tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(output_dir))
        if source_dir is not None:
            _copy_run_extras(source_dir, output_dir)
    return merged


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def wrap_with_peft(model: nn.Module, peft_config: Any) -> nn.Module:
    """``get_peft_model(model, peft_config)``: only the adapters train; logs the trainable share."""
    from peft import get_peft_model

    model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA student: %d of %d parameters train (%.2f%%).", trainable, total, 100.0 * trainable / max(total, 1))
    return model
