"""Export with `torch.onnx.export(dynamo=False)`: works under transformers 4.57 and 5.x alike.

It writes the file layout and the input/output names Optimum's exporter writes, so that the
`ORTModelFor*` classes load the folder: `input_ids`, `attention_mask`, `token_type_ids` (when the model takes
it), and for causal LMs `position_ids`, `past_key_values.{i}.key|value` in and `present.{i}.key|value` out.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..inference import SUPPORTED_TASKS

logger = logging.getLogger(__name__)

ENCODER_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EXTERNAL_DATA_FILE_SUFFIX = "_data"  # model.onnx -> model.onnx_data, as Optimum names it
# protobuf cannot serialize more than 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 128 * 1024**2


def auto_model_class(task: str) -> type:
    """The `AutoModelFor*` class that loads a model for `task`."""
    import transformers

    names = {
        "sequence-classification": "AutoModelForSequenceClassification",
        "token-classification": "AutoModelForTokenClassification",
        "question-answering": "AutoModelForQuestionAnswering",
        "causal-lm": "AutoModelForCausalLM",
        "feature-extraction": "AutoModel",  # headless: last_hidden_state
    }
    return getattr(transformers, names[task])


def load_torch_model(model_dir: Path, task: str) -> nn.Module:
    """The saved model for `task`, in float32 and eval mode."""
    return auto_model_class(task).from_pretrained(model_dir, dtype=torch.float32).eval()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def model_input_names(model: nn.Module, task: str) -> list[str]:
    """Inputs to export: the encoder inputs the model's forward accepts, or the decoder inputs for LMs."""
    accepted = inspect.signature(model.forward).parameters
    if task == "causal-lm":
        return [name for name in ("input_ids", "attention_mask", "position_ids") if name in accepted]
    return [name for name in ENCODER_INPUT_NAMES if name in accepted]


class _EncoderWrapper(nn.Module):
    """Positional inputs in, the task's output tensors out, as a tuple."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)
        return tuple(outputs[name] for name in self.output_names)


class _DecoderWithPastWrapper(nn.Module):
    """Decoder inputs plus the flat past cache in; logits plus the flat present cache out."""

    def __init__(self, model: nn.Module, input_names: list[str], num_layers: int) -> None:
        super().__init__()
        self.model, self.input_names, self.num_layers = model, input_names, num_layers

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        named = dict(zip(self.input_names, inputs))
        flat_past = inputs[len(self.input_names):]
        pairs = [(flat_past[2 * layer], flat_past[2 * layer + 1]) for layer in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        outputs = self.model(**named, past_key_values=cache, use_cache=True, return_dict=True)
        return (outputs.logits, *flatten_cache(outputs.past_key_values))


def flatten_cache(cache: Any) -> list[torch.Tensor]:
    """[key_0, value_0, key_1, value_1, ...] from a transformers cache object or legacy tuples."""
    if hasattr(cache, "layers"):
        return [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
    return [tensor for layer in cache for tensor in layer[:2]]


def dummy_inputs(model: nn.Module, input_names: list[str], batch_size: int = 2, sequence_length: int = 8
                 ) -> dict[str, torch.Tensor]:
    """Inputs to trace with: random ids and a padded second row, so mask code paths are traced."""
    generator = torch.Generator().manual_seed(0)
    vocab_size = int(getattr(model.config, "vocab_size", 100))
    input_ids = torch.randint(min(5, vocab_size - 1), vocab_size, (batch_size, sequence_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, -2:] = 0
    values = {"input_ids": input_ids, "attention_mask": attention_mask,
              "token_type_ids": torch.zeros_like(input_ids),
              "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    return {name: values[name] for name in input_names}


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Hide the TorchScript tracer's warnings about Python-side branches: the parity check after the export
    is what tells whether the traced graph generalizes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(advanced indexing|legacy|dynamo=False|TorchScript).*")
        yield


@contextlib.contextmanager
def traceable_masks() -> Iterator[None]:
    """transformers 4.5x builds attention masks with `torch.vmap`, which TorchScript tracing cannot follow.
    Swap in mask builders that evaluate the mask function on broadcast index tensors instead, for the
    duration of an export. transformers 5 needs no patch and is left alone."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        yield
        return
    try:
        from transformers import masking_utils
    except ImportError:  # older releases build masks without vmap
        yield
        return

    def broadcast_sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0,
                            mask_function=masking_utils.causal_mask_function, attention_mask=None,
                            local_size=None, allow_is_causal_skip=True, **kwargs):
        padding_mask = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
        if padding_mask is not None:
            mask_function = masking_utils.and_masks(mask_function, masking_utils.padding_mask_function(padding_mask))
        device = cache_position.device
        batch_index = torch.arange(batch_size, device=device)[:, None, None, None]
        head_index = torch.zeros(1, dtype=torch.long, device=device)[None, :, None, None]
        query_index = cache_position[None, None, :, None]
        kv_index = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
        mask = mask_function(batch_index, head_index, query_index, kv_index)
        return mask.expand(batch_size, 1, cache_position.shape[0], kv_length)

    def broadcast_eager_mask(*args, dtype=torch.float32, **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = broadcast_sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
        return torch.where(mask, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))

    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    saved = {name: registry[name] for name in ("sdpa", "eager") if name in registry}
    registry.register("sdpa", broadcast_sdpa_mask)
    registry.register("eager", broadcast_eager_mask)
    try:
        yield
    finally:
        for name, function in saved.items():
            registry.register(name, function)


def _export_decoder_with_past(model: nn.Module, input_names: list[str], path: Path, opset: int) -> None:
    inputs = dummy_inputs(model, input_names)
    with torch.no_grad():  # a real cache from a short prefix gives the past tensors their shapes
        prefix = model(input_ids=inputs["input_ids"][:, :3], use_cache=True)
    past = flatten_cache(prefix.past_key_values)
    num_layers = len(past) // 2
    past_length = past[0].shape[2]
    batch_size, sequence_length = inputs["input_ids"].shape
    inputs["attention_mask"] = torch.ones(batch_size, past_length + sequence_length, dtype=torch.long)
    inputs["attention_mask"][-1, -2:] = 0
    if "position_ids" in inputs:
        inputs["position_ids"] = torch.arange(past_length, past_length + sequence_length).expand(batch_size, -1)
    past_names = [f"past_key_values.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]
    present_names = [name.replace("past_key_values", "present") for name in past_names]
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
    }
    dynamic_axes.update({name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names})
    dynamic_axes.update({name: {0: "batch_size", 2: "past_sequence_length + sequence_length"}
                         for name in present_names})
    wrapper = _DecoderWithPastWrapper(model, input_names, num_layers).eval()
    with quiet_tracing(), traceable_masks(), torch.no_grad():
        torch.onnx.export(wrapper, (*inputs.values(), *past), str(path), input_names=[*input_names, *past_names],
                          output_names=["logits", *present_names],
                          dynamic_axes={name: axes for name, axes in dynamic_axes.items() if name in
                                        {*input_names, *past_names, "logits", *present_names}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def _export_plain(model: nn.Module, task: str, input_names: list[str], path: Path, opset: int) -> None:
    spec = SUPPORTED_TASKS[task]
    output_axes = {0: "batch_size", 1: "sequence_length"} if spec.token_level or task == "question-answering" \
        else {0: "batch_size"}
    dynamic_axes = {name: {0: "batch_size", 1: "sequence_length"} for name in input_names}
    dynamic_axes.update({name: output_axes for name in spec.output_names})
    # The legacy exporter restores the wrapper's training flag afterwards: a fresh module is in training
    # mode, so set eval first or later PyTorch calls would run with dropout on.
    wrapper = _EncoderWrapper(model, input_names, spec.output_names).eval()
    inputs = dummy_inputs(model, input_names)
    with quiet_tracing(), traceable_masks(), torch.no_grad():
        torch.onnx.export(wrapper, tuple(inputs.values()), str(path), input_names=input_names,
                          output_names=list(spec.output_names), dynamic_axes=dynamic_axes,
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def export_with_torch(model_dir: Path, output_path: Path, task: str, opset: int,
                      external_data: bool | None = None) -> dict[str, Any]:
    """Export the model in `model_dir` for `task` to `output_path`. Returns facts about the export:
    `with_past`, `external_data`, `input_names`."""
    model = load_torch_model(model_dir, task)
    if external_data is None:
        external_data = parameter_bytes(model) >= EXTERNAL_DATA_THRESHOLD_BYTES
    input_names = model_input_names(model, task)
    with_past = False
    # Write to a scratch folder first: past 2 GiB the legacy exporter scatters one file per tensor.
    with tempfile.TemporaryDirectory(dir=output_path.parent) as scratch:
        scratch_path = Path(scratch) / output_path.name
        if task == "causal-lm":
            try:
                _export_decoder_with_past(model, input_names, scratch_path, opset)
                with_past = True
            except Exception as error:  # noqa: BLE001 - any tracing failure falls back to plain logits
                logger.warning("export with past key values failed for %s (%s: %s); exporting plain logits "
                               "without a cache instead", type(model).__name__, type(error).__name__, error)
        if not with_past:
            _export_plain(model, task, input_names, scratch_path, opset)
        _save_onnx(scratch_path, output_path, external_data)
    return {"with_past": with_past, "external_data": external_data, "input_names": input_names}


def _save_onnx(source: Path, destination: Path, external_data: bool) -> None:
    import onnx

    if not external_data:
        if any(path.name != source.name for path in source.parent.iterdir()):
            raise RuntimeError(f"the ONNX export of {source.name} wrote external data unexpectedly; "
                               "the model is too large for a single file")
        source.replace(destination)
        return
    model = onnx.load(str(source), load_external_data=True)
    onnx.save_model(model, str(destination), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=destination.name + EXTERNAL_DATA_FILE_SUFFIX, size_threshold=1024)
