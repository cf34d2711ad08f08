"""Export and quantize through Optimum (`optimum-onnx`): `main_export` and `ORTQuantizer`.

`optimum-onnx` 0.1.0 pins transformers < 4.58 and fails to import under transformers 5, so availability is
probed at run time and the exporter falls back to `torch.onnx.export` where it does not import.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from ..inference import FP32_FILE_NAME, SUPPORTED_TASKS
from .quantization import quiet_onnxruntime_quantizer

logger = logging.getLogger(__name__)

OPTIMUM_INSTALL_HINT = (
    "install it in an environment with transformers 4.57.x: pip install 'optimum-onnx[onnxruntime]>=0.1.0' "
    "'transformers>=4.57,<4.58' (or pip install 'hf_distill[optimum]'), or pass backend='torch' (--backend torch) "
    "to export with torch.onnx and onnxruntime instead"
)


@functools.lru_cache(maxsize=1)
def optimum_import_error() -> str | None:
    """None when `optimum.exporters.onnx` and `optimum.onnxruntime` import here, else why they do not."""
    try:
        from optimum.exporters.onnx import main_export  # noqa: F401
        from optimum.onnxruntime import ORTQuantizer  # noqa: F401
        from optimum.onnxruntime.configuration import AutoQuantizationConfig  # noqa: F401
    except Exception as error:  # noqa: BLE001 - an ImportError or whatever a version clash raises
        return f"{type(error).__name__}: {error}"
    return None


def export_with_optimum(model_dir: Path, output_dir: Path, task: str, opset: int) -> dict[str, Any]:
    """`main_export` of `model_dir` into `output_dir/model.onnx` (config and tokenizer saved beside it)."""
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), output=str(output_dir), task=SUPPORTED_TASKS[task].optimum_task, opset=opset,
                device="cpu", do_validation=False, local_files_only=True, library_name="transformers")
    import onnx

    graph = onnx.load(str(output_dir / FP32_FILE_NAME), load_external_data=False).graph
    input_names = [value.name for value in graph.input]
    return {
        "with_past": any(name.startswith("past_key_values.") for name in input_names),
        "external_data": any(tensor.external_data for tensor in graph.initializer),
        "input_names": [name for name in input_names if not name.startswith("past_key_values.")],
    }


def quantize_with_optimum(output_dir: Path, preset: str, per_channel: bool, use_external_data: bool) -> None:
    """`ORTQuantizer` with the `AutoQuantizationConfig` preset, dynamic: writes `model_quantized.onnx`."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantization_config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=per_channel)
    quantizer = ORTQuantizer.from_pretrained(output_dir, file_name=FP32_FILE_NAME)
    with quiet_onnxruntime_quantizer():
        quantizer.quantize(quantization_config=quantization_config, save_dir=output_dir,
                           use_external_data_format=use_external_data)
