"""ONNX Runtime sessions configured the way every stage needs them.

Q/DQ graphs shaped for TensorRT are executed as exact fake-quantization (``session.disable_quant_qdq``): with
default optimizations ONNX Runtime fuses INT8 Q/DQ into MatMulIntegerToFloat, which on CPUs without VNNI
saturates and differs from the math TensorRT does, and older releases reject FP8 Q/DQ outright. Files shaped
for ONNX Runtime run as ONNX Runtime runs them, on its integer kernels. On an x86 CPU without VNNI (or AMX)
those kernels multiply u8 x s8 with ``VPMADDUBSW``, whose 16-bit pair sums saturate (255 x 127 x 2 > 32767),
so there the sessions set ``session.x64quantprecision``: ORT rewrites the weights to u8 and multiplies u8 x u8,
exact and slower. Where VNNI is the option is not set: ORT would take the same slower u8 x u8 path, which has
no VNNI kernel (measured on the 345M QA head, AVX-512 VNNI: 352 ms with it, 152 ms without).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

from mbexport.errors import MbexportError, first_line
from mbexport.precisions import DEFAULT_RUNTIME, RUNTIMES

DEVICES = ("cpu", "cuda", "auto")
# The vector extensions that decide CPU kernel speed (the fp16 and int8 paths above all): printed with figures.
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
             "amx_int8")
EXACT_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8")  # any of these: u8 x s8 products summed in 32 bits
X86 = ("x86_64", "amd64", "i386", "i686")


def cpu_flags() -> tuple[str, ...]:
    """The ``CPU_FLAGS`` this CPU has (Linux's /proc/cpuinfo; none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ()
    flags = set(line.partition(":")[2].split())
    return tuple(flag for flag in CPU_FLAGS if flag in flags)


def int8_saturates() -> bool:
    """Whether ORT's u8 x s8 kernels can saturate here: an x86 CPU not known to have VNNI or AMX."""
    return platform.machine().lower() in X86 and not set(EXACT_INT8) & set(cpu_flags())


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
                shaped_for: str = DEFAULT_RUNTIME, lean: bool = False, edit: Callable[[object], None] | None = None):
    """An InferenceSession for an ONNX file shaped for ``shaped_for`` (its Q/DQ emulated exactly, if TensorRT's).

    ``lean``, for a session that runs a few times (validation): the weights are memory-mapped from the file,
    whether they are inside it or in external data (``weights_by_reference``), instead of parsed into a
    copy, and the CPU kernels do not copy MatMul weights into their packed layout. Measured on the 345M fp32
    file: 0.3 GB of anonymous memory instead of 2.2 GB, for a few percent more time per run. A lean session may
    ``edit`` the model (its graph, without the weights) before it is made: calibration adds outputs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if RUNTIMES[shaped_for].emulated_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    elif int8_saturates():
        options.add_session_config_entry("session.x64quantprecision", "1")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    model = str(path)
    if lean:
        from mbexport.export.onnxfile import weights_by_reference

        options.add_session_config_entry("session.disable_prepacking", "1")
        # Run nodes in the order given, so a tensor an added output reads is freed as soon as its readers ran:
        # ORT's default order kept all 200 of the 345M calibration's probed tensors alive (4.1 GB, not 1.8).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(path).parent))
        model = weights_by_reference(path, edit)
    chosen = providers(device)
    try:
        return ort.InferenceSession(model, sess_options=options, providers=chosen)
    except Exception as error:  # ORT raises its own exception types for unreadable or invalid models
        raise MbexportError(f"ONNX Runtime cannot load it ({first_line(error)})", path) from None
