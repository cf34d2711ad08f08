"""Loading weights without pickle: safetensors only, unless pickle weights are explicitly allowed.

``pytorch_model.bin`` files are pickles, and unpickling can run code. Every model this package loads from a
name or a folder (teachers, students, LoRA bases and adapters) goes through :func:`from_pretrained_safely` or
:func:`refuse_pickle_only_folder`: a local folder with pickle weights and no safetensors is refused with the
way to convert it, unless ``allow_pickle_weights=True`` (``--allow_pickle_weights``), and then the weights are
read by ``torch.load(weights_only=True)`` (transformers and PEFT both load ``.bin`` files that way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

# Weight files by format, for full models and for PEFT adapters (shards are listed by their index file).
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


class PickleWeightsError(ValueError):
    """A folder holds only pickle weights and pickle weights were not allowed."""


def weight_formats(folder: Union[str, Path]) -> tuple[bool, bool]:
    """(has safetensors weights, has pickle weights) of a local folder."""
    folder = Path(folder)
    return (any((folder / name).is_file() for name in SAFE_WEIGHT_FILES),
            any((folder / name).is_file() for name in PICKLE_WEIGHT_FILES))


def refuse_pickle_only_folder(folder: Union[str, Path], allow_pickle_weights: bool = False, what: str = "model") -> bool:
    """Raise :class:`PickleWeightsError` when ``folder`` has pickle weights and no safetensors.

    Returns True when the folder is to be loaded from its pickle weights (allowed, and no safetensors).
    """
    has_safe, has_pickle = weight_formats(folder)
    if has_safe or not has_pickle:
        return False
    if allow_pickle_weights:
        return True
    found = ", ".join(name for name in PICKLE_WEIGHT_FILES if (Path(folder) / name).is_file())
    raise PickleWeightsError(
        f"The {what} folder {str(folder)!r} holds only pickle weights ({found}), and unpickling can run code; "
        "this package loads safetensors only. Convert the folder once, where you trust its origin: "
        f"`AutoModel.from_pretrained({str(folder)!r}, use_safetensors=False).save_pretrained(new_folder)` (the "
        "matching AutoModelFor* class; PEFT: `PeftModel.from_pretrained(base, folder).save_pretrained(new_folder)`) "
        "writes model.safetensors. Or pass allow_pickle_weights=True (--allow_pickle_weights) to read them with "
        "torch.load(weights_only=True)."
    )


def from_pretrained_safely(
    auto_class: Any, name_or_path: Union[str, Path], allow_pickle_weights: bool = False, **kwargs: Any
) -> Any:
    """``auto_class.from_pretrained(name_or_path, use_safetensors=True, **kwargs)``, refusing pickle weights.

    A local folder with only ``pytorch_model.bin`` raises :class:`PickleWeightsError` naming the conversion,
    unless ``allow_pickle_weights``; a Hub name is loaded with ``use_safetensors=True`` (a repository
    without safetensors then fails in transformers). ``use_safetensors=False`` needs ``allow_pickle_weights``.
    """
    if kwargs.get("use_safetensors") is False and not allow_pickle_weights:
        raise PickleWeightsError(
            "use_safetensors=False loads pickle weights; pass allow_pickle_weights=True (--allow_pickle_weights) "
            "to allow it, or convert the weights to safetensors."
        )
    path = Path(name_or_path).expanduser()
    folder = path / kwargs.get("subfolder", "")
    pickle_only = folder.is_dir() and refuse_pickle_only_folder(folder, allow_pickle_weights)
    kwargs["use_safetensors"] = not pickle_only
    return auto_class.from_pretrained(str(path) if path.is_dir() else name_or_path, **kwargs)


__all__ = ["PickleWeightsError", "from_pretrained_safely", "refuse_pickle_only_folder", "weight_formats"]
