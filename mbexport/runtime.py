"""ONNX Runtime sessions configured the way every stage needs them.

Q/DQ graphs shaped for TensorRT are executed as exact fake-quantization (``session.disable_quant_qdq``): with
default optimizations ONNX Runtime fuses INT8 Q/DQ into MatMulIntegerToFloat, which on CPUs without VNNI
saturates and differs from the math TensorRT does, and older releases reject FP8 Q/DQ outright. Files shaped
for ONNX Runtime run as ONNX Runtime runs them: with its integer kernels.
"""

from __future__ import annotations

from pathlib import Path

from mbexport.errors import MbexportError, first_line
from mbexport.precisions import DEFAULT_RUNTIME, RUNTIMES

DEVICES = ("cpu", "cuda", "auto")


def providers(device: str = "cpu") -> list[str]:
    """Execution providers for ``device`` ('cpu', 'cuda', or 'auto' = CUDA when onnxruntime-gpu has it)."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise MbexportError(f"unknown device '{device}' ({', '.join(DEVICES)})")
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise MbexportError("ONNX Runtime has no CUDA provider here; install onnxruntime-gpu or use --device cpu")
    return ["CPUExecutionProvider"]


def ort_session(path: str | Path, device: str = "cpu", threads: int | None = None, *,
                shaped_for: str = DEFAULT_RUNTIME):
    """An InferenceSession for an ONNX file shaped for ``shaped_for`` (its Q/DQ emulated exactly, if TensorRT's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if RUNTIMES[shaped_for].emulated_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    chosen = providers(device)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    except Exception as error:  # ORT raises its own exception types for unreadable or invalid models
        raise MbexportError(f"ONNX Runtime cannot load it ({first_line(error)})", path) from None
