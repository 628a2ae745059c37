"""The precision registry: one description per precision, read by every stage.

A ``Precision`` says how it is made from the fp32 export (its transform, named not imported, and whether it
needs calibration data), what the build shows while making it, its validation tolerances, the GPU it needs
as a TensorRT engine, the datasheet peak its matmuls run at (bench's percent of peak), the dtype the PyTorch
reference runs it in, and its file names. ``Runtime`` says which artifacts a runtime runs and which built
precision it prefers. Nothing else in mbexport spells out a precision.

Every artifact today is shaped for TensorRT (plain standard ops, Q/DQ where TensorRT places it), and ONNX
Runtime runs the same files. Artifacts shaped for ONNX Runtime instead (its fused operators, its integer
kernels) are a runtime dimension on top of this one: a Precision entry would then name the runtime its
transform shapes for, ``file_name`` would carry it, and the manifest would record it on the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass

from mbexport.errors import MbexportError
from mbexport.lazy import Ref

EXPORTED = "fp32"  # what export traces the reference to; every other precision is made from it
OPSET = 17  # ONNX opset of every artifact: the oldest with native LayerNormalization, which TensorRT fuses
CALIBRATION_METHODS = ("max", "entropy")  # activation ranges: absolute maximum, or an entropy (KL) threshold
SUFFIXES = {"onnx": "onnx", "engine": "plan"}  # file suffix per manifest artifact kind


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
    extra: str | None = None  # the pip extra its transform needs
    min_capability: tuple[int, int] | None = None  # the oldest GPU (compute capability) its engine kernels run on
    math: str | None = None  # the datasheet peak its matmuls run at; None: no single honest peak
    torch_dtype: str | None = None  # the dtype the PyTorch reference runs it in; None: no plain equivalent

    def file_name(self, kind: str) -> str:
        """The artifact's file name in its task's folder: ``model.fp16.onnx``, ``model.int8.plan``."""
        return f"model.{self.name}.{SUFFIXES[kind]}"


# Quantized logits legitimately move by more than any useful elementwise bound (a 1.3 shift on a trained MLM's
# vocab logits with 96% argmax agreement), so their elementwise difference is reported, not gated: cosine and
# task-level agreement decide. Set int8.atol in a recipe to gate it anyway. ``agreement`` is the minimum
# fraction of rows/tokens whose answer matches the reference; ``cosine`` applies to outputs and rows.
QUANTIZED_TOLERANCES = {"atol": None, "rtol": None, "cosine": 0.98, "agreement": 0.85}
QDQ = Ref("mbexport.quantize.qdq:quantize_onnx")

PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", "export", "export", "reading the checkpoint, exporting ONNX with torch.onnx, checking it",
                  None, {"atol": 1e-4, "rtol": 1e-4, "cosine": 0.99999, "agreement": 0.99},
                  # TensorRT may run fp32 matmuls in TF32
                  engine_tolerances={"atol": 5e-3, "rtol": 5e-3, "cosine": 0.9999, "agreement": 0.98},
                  torch_dtype="float32"),
        Precision("fp16", "export", "convert", "converting the fp32 graph to strongly typed fp16",
                  Ref("mbexport.export.fp16:convert_fp16"),
                  {"atol": 0.05, "rtol": 0.05, "cosine": 0.999, "agreement": 0.95}, math="fp16", torch_dtype="float16"),
        Precision("int8", "quantize", "quantize", "placing Q/DQ with Model Optimizer", QDQ, QUANTIZED_TOLERANCES,
                  calibrated=True, extra="quant", math="int8"),
        Precision("fp8", "quantize", "quantize", "placing Q/DQ with Model Optimizer", QDQ, QUANTIZED_TOLERANCES,
                  calibrated=True, extra="quant", min_capability=(8, 9), math="fp8"),  # Ada, Hopper
    )
}


def get_precision(name: str) -> Precision:
    """Resolve a precision name, in any case (``FP16``)."""
    try:
        return PRECISIONS[name.strip().lower()]
    except KeyError:
        raise MbexportError(f"unknown precision '{name}' (choose {', '.join(PRECISIONS)})") from None


def made_by(stage: str) -> list[str]:
    """The precisions a stage writes (``export``: fp32 and fp16; ``quantize``: int8 and fp8)."""
    return [p.name for p in PRECISIONS.values() if p.stage == stage]


@dataclass(frozen=True)
class Runtime:
    """Something that runs built artifacts (``mbexport run --backend NAME``)."""

    name: str
    kind: str  # the manifest artifact kind it runs
    preference: tuple[str, ...]  # every precision, in the order it is picked when several were built


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("tensorrt", "engine", ("fp16", "fp8", "int8", "fp32")),  # fp16 is TensorRT's usual pick
        Runtime("onnxruntime", "onnx", ("fp32", "fp16", "int8", "fp8")),  # on a CPU fp32 is the fastest and exact
    )
}
