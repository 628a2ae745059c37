"""The precision registry: one description per precision and runtime, read by every stage.

A ``Precision`` says how it is made from the fp32 export (its transform, named not imported, and whether it
needs calibration data), what the build shows while making it, its validation tolerances, the GPU it needs
as a TensorRT engine, the datasheet peak its matmuls run at (bench's percent of peak), the dtype the PyTorch
reference runs it in, its file names, and the runtime its file is shaped for. ``Runtime`` says which
artifacts a runtime runs, which built precision it prefers, and how files shaped for it are marked.
Nothing else in mbexport spells out a precision.

The runtime dimension: by default an artifact is shaped for TensorRT (plain standard ops, Q/DQ where TensorRT
places it), and ONNX Runtime runs the same files (Q/DQ as exact emulation of TensorRT's math). An entry shaped
for ONNX Runtime instead (``runtime="onnxruntime"``: its fused operators, its integer kernels) has its own
transform; ``file_name`` marks it (``model.int8.ort.onnx``), the manifest records it on the artifact
(``"runtime": "onnxruntime"``), and every stage reads it from there. Entries are keyed by (name, runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from mbexport.errors import MbexportError
from mbexport.lazy import Ref

EXPORTED = "fp32"  # what export traces the reference to; every other precision is made from it
OPSET = 17  # ONNX opset of every artifact: the oldest with native LayerNormalization, which TensorRT fuses
CALIBRATION_METHODS = ("max", "entropy")  # activation ranges: absolute maximum, or an entropy (KL) threshold
SUFFIXES = {"onnx": "onnx", "engine": "plan"}  # file suffix per manifest artifact kind
DEFAULT_RUNTIME = "tensorrt"  # what artifacts are shaped for unless a build asks for another runtime


@dataclass(frozen=True)
class Precision:
    name: str
    stage: str  # the pipeline stage that writes it: export (the fp32 trace and its fp16 pass) or quantize
    step: str  # the build step that makes it, as the build shows it: export, convert or quantize
    doing: str  # what that step is doing, for the build's live display
    # fp32 ONNX -> this precision's ONNX: transform(fp32_path, out_path), calibrated ones also with mode=
    # (this name), calibration= (feed dicts) and method= (CALIBRATION_METHODS); None for the export itself
    transform: Ref | None
    tolerances: dict  # validate's defaults: atol, rtol (None: reported, not gated), cosine, agreement
    engine_tolerances: dict | None = None  # where a TensorRT engine of it may differ more than its ONNX
    calibrated: bool = False  # needs calibration data (--calib-text, a recipe's [calibration])
    min_capability: tuple[int, int] | None = None  # the oldest GPU (compute capability) its engine kernels run on
    math: str | None = None  # the datasheet peak its matmuls run at; None: no single honest peak
    torch_dtype: str | None = None  # the dtype the PyTorch reference runs it in; None: no plain equivalent
    runtime: str = DEFAULT_RUNTIME  # the runtime its file is shaped for (RUNTIMES)

    def file_name(self, kind: str) -> str:
        """The artifact's file name in its task's folder: ``model.fp16.onnx``, ``model.int8.plan``,
        ``model.int8.ort.onnx``."""
        tag = RUNTIMES[self.runtime].tag
        return f"model.{self.name}.{f'{tag}.' if tag else ''}{SUFFIXES[kind]}"

    @property
    def label(self) -> str:
        """Its name, marked with the runtime it is shaped for unless that is the default: ``int8``, ``int8-ort``."""
        return label(self.name, self.runtime)


# Quantized logits legitimately move by more than any useful elementwise bound (a 1.3 shift on a trained MLM's
# vocab logits with 96% argmax agreement), so their elementwise difference is reported, not gated: cosine and
# task-level agreement decide. Set int8.atol in a recipe to gate it anyway. ``agreement`` is the minimum
# fraction of rows/tokens whose answer matches the reference; ``cosine`` applies to outputs and rows.
QUANTIZED_TOLERANCES = {"atol": None, "rtol": None, "cosine": 0.98, "agreement": 0.85}
FP32_TOLERANCES = {"atol": 1e-4, "rtol": 1e-4, "cosine": 0.99999, "agreement": 0.99}
FP16_TOLERANCES = {"atol": 0.05, "rtol": 0.05, "cosine": 0.999, "agreement": 0.95}
QDQ = Ref("mbexport.quantize.qdq:quantize_onnx")
ONNXRUNTIME = "onnxruntime"  # ONNX Runtime, as a runtime that artifacts are shaped for

PRECISIONS: dict[tuple[str, str], Precision] = {
    (p.name, p.runtime): p
    for p in (
        Precision("fp32", "export", "export", "reading the checkpoint, exporting ONNX with torch.onnx, checking it",
                  None, FP32_TOLERANCES,
                  # TensorRT may run fp32 matmuls in TF32
                  engine_tolerances={"atol": 5e-3, "rtol": 5e-3, "cosine": 0.9999, "agreement": 0.98},
                  torch_dtype="float32"),
        Precision("fp16", "export", "convert", "converting the fp32 graph to strongly typed fp16",
                  Ref("mbexport.export.fp16:convert_fp16"), FP16_TOLERANCES, math="fp16", torch_dtype="float16"),
        Precision("int8", "quantize", "quantize", "placing Q/DQ on the encoder MatMuls", QDQ, QUANTIZED_TOLERANCES,
                  calibrated=True, math="int8"),
        Precision("fp8", "quantize", "quantize", "placing Q/DQ on the encoder MatMuls", QDQ, QUANTIZED_TOLERANCES,
                  calibrated=True, min_capability=(8, 9), math="fp8"),  # Ada, Hopper
        # Shaped for ONNX Runtime (export/ort.py): its fused attention (any padding, no causal mask) and GELU;
        # fp16 through the same fp16 pass as TensorRT's, for ORT's CUDA provider
        Precision("fp32", "export", "fuse", "rewriting attention to ONNX Runtime's fused operators",
                  Ref("mbexport.export.ort:fuse_for_ort"), FP32_TOLERANCES, torch_dtype="float32",
                  runtime=ONNXRUNTIME),
        Precision("fp16", "export", "fuse", "fusing for ONNX Runtime, converting to fp16",
                  Ref("mbexport.export.ort:fuse_fp16_for_ort"), FP16_TOLERANCES, math="fp16",
                  torch_dtype="float16", runtime=ONNXRUNTIME),
        # ONNX Runtime's integer kernels (quantize/ort.py): int8 weights, calibrated uint8 activations
        Precision("int8", "quantize", "quantize", "quantizing for ONNX Runtime's integer kernels",
                  Ref("mbexport.quantize.ort:quantize_for_ort"), QUANTIZED_TOLERANCES, calibrated=True,
                  math="int8", runtime=ONNXRUNTIME),
    )
}
NAMES = tuple(dict.fromkeys(name for name, _ in PRECISIONS))  # every precision name, for messages and checks


def get_precision(name: str, runtime: str = DEFAULT_RUNTIME) -> Precision:
    """Resolve a precision name, in any case (``FP16``), shaped for ``runtime``."""
    key = (name.strip().lower(), get_runtime(runtime).name)
    if key[0] not in NAMES:
        raise MbexportError(f"unknown precision '{name}' (choose {', '.join(NAMES)})")
    if key not in PRECISIONS:
        shaped = ", ".join(n for n, r in PRECISIONS if r == key[1])
        raise MbexportError(f"no {key[0]} artifact is shaped for {key[1]} (it has {shaped})")
    return PRECISIONS[key]


def made_by(stage: str, runtime: str = DEFAULT_RUNTIME) -> list[str]:
    """The precisions a stage writes for a runtime (TensorRT: export fp32 and fp16, quantize int8 and fp8)."""
    return [p.name for p in PRECISIONS.values() if p.stage == stage and p.runtime == runtime]


def label(name: str, runtime: str) -> str:
    """A precision's name, marked with the runtime its file is shaped for unless that is the default."""
    tag = RUNTIMES[runtime].tag if runtime in RUNTIMES else ""
    return f"{name}-{tag}" if tag else name


@dataclass(frozen=True)
class Runtime:
    """Something that runs built artifacts (``mbexport run --backend NAME``), and that artifacts are shaped for
    (``mbexport build --runtime NAME``)."""

    name: str
    kind: str  # the manifest artifact kind it runs
    # every precision, in the order it is picked when several were built; at one precision, the file shaped
    # for this runtime first
    preference: tuple[str, ...]
    tag: str  # marks the files (model.int8.ort.onnx) and Triton models shaped for it; "" for the default
    causal: bool  # whether files shaped for it may hold causal heads
    # whether ONNX Runtime runs its Q/DQ graphs as exact emulation (TensorRT's math) rather than with its own
    # integer kernels
    emulated_qdq: bool


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        # fp16 is TensorRT's usual pick
        Runtime("tensorrt", "engine", ("fp16", "fp8", "int8", "fp32"), "", causal=True, emulated_qdq=True),
        # on a CPU fp32 is exact and fast; int8 shaped for ONNX Runtime is faster but must be asked for
        Runtime(ONNXRUNTIME, "onnx", ("fp32", "fp16", "int8", "fp8"), "ort", causal=False, emulated_qdq=False),
    )
}


def get_runtime(name: str) -> Runtime:
    """Resolve a runtime name, in any case."""
    try:
        return RUNTIMES[name.strip().lower()]
    except KeyError:
        raise MbexportError(f"unknown runtime '{name}' (choose {', '.join(RUNTIMES)})") from None
