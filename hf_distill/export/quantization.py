"""Dynamic int8 quantization with onnxruntime, an instruction-set preset chosen from this CPU, and sizes on disk.

The presets mirror Optimum's `AutoQuantizationConfig` (dynamic mode): activations uint8 asymmetric,
weights symmetric; int8 weights except on AVX2, where Optimum uses uint8 weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

QUANTIZATION_PRESETS = ("avx512_vnni", "avx512", "avx2", "arm64")


def cpu_flags(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags listed in /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path(cpuinfo_path).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def detect_quantization_preset(flags: set[str] | None = None, machine: str | None = None) -> str:
    """`avx512_vnni`, `avx512`, `avx2` or `arm64`: the best int8 instruction set this CPU has."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64") or machine.startswith("armv8"):
        return "arm64"
    flags = cpu_flags() if flags is None else flags
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    if "avx2" not in flags:
        logger.warning("no AVX2 flag found on this CPU (%s); using the avx2 quantization preset", machine)
    return "avx2"


class _DropOnnxRuntimeQuantizerRecords(logging.Filter):
    """onnxruntime.quantization logs one line per node on the root logger; keep it out of the user's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"onnxruntime{os.sep}quantization" not in record.pathname


@contextlib.contextmanager
def quiet_onnxruntime_quantizer() -> Iterator[None]:
    """Drop onnxruntime.quantization's root-logger records while the block runs."""
    record_filter = _DropOnnxRuntimeQuantizerRecords()
    logging.getLogger().addFilter(record_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(record_filter)


def quantize_with_onnxruntime(model_path: Path, output_path: Path, preset: str, per_channel: bool,
                              use_external_data: bool) -> None:
    """Dynamic int8 quantization of `model_path` into `output_path` with `onnxruntime.quantization`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if preset not in QUANTIZATION_PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}; choose one of {QUANTIZATION_PRESETS}")
    weight_type = QuantType.QUInt8 if preset == "avx2" else QuantType.QInt8
    with quiet_onnxruntime_quantizer():
        quantize_dynamic(
            model_path,
            output_path,
            per_channel=per_channel,
            reduce_range=False,
            weight_type=weight_type,
            use_external_data_format=use_external_data,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )


def onnx_size_bytes(onnx_path: str | os.PathLike) -> int:
    """Bytes on disk of an ONNX model, counting the external data files it points to."""
    import onnx

    path = Path(onnx_path)
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)
