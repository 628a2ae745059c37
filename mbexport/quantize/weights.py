"""Quantized weights stored quantized: each weight's QuantizeLinear computed once, into an int8 or fp8 initializer.

Model Optimizer leaves every weight it quantizes as a high-precision initializer feeding QuantizeLinear ->
DequantizeLinear, so an int8 or fp8 file would carry fp16 weights and quantize them on every run. TensorRT
takes pre-quantized weights (INT8 and FP8 constants into DequantizeLinear; its quantization guide, "Quantized
Weights", and onnx-tensorrt's operator matrix) and so does ONNX Runtime. Folding each weight's QuantizeLinear,
computed exactly as the ONNX operator defines it, changes no output and stores one byte per weight.

Model Optimizer also duplicates a weight that two nodes read (the masked-LM decoder shares the word
embeddings); identical initializers are stored once again.
"""

from __future__ import annotations

import hashlib

import numpy as np

FP8_MAX = 448.0  # float8e4m3fn's largest finite value: where a saturating QuantizeLinear stops


def store_weights_quantized(graph) -> int:
    """Replace every QuantizeLinear whose inputs are all initializers (a weight, its scale and zero point) by
    the int8 / float8e4m3fn initializer it computes, and drop weights nothing else reads; then merge
    identical initializers. Returns the number of weights folded."""
    from onnx.helper import get_attribute_value

    initializers = {t.name: t for t in graph.initializer}
    folded = []
    for node in graph.node:
        attributes = {a.name: get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "QuantizeLinear" or len(node.input) != 3 or attributes.get("saturate", 1) != 1
                or not all(name in initializers for name in node.input)):
            continue  # an activation's quantizer, or a form Model Optimizer does not write
        values = quantize_linear(*(initializers[name] for name in node.input), axis=attributes.get("axis", 1))
        if values is None:
            continue
        graph.initializer.append(_tensor(values, node.output[0]))
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    for name in {node.input[0] for node in folded} - read:
        graph.initializer.remove(initializers[name])
    _merge_duplicates(graph)
    return len(folded)


def quantize_linear(weight, scale, zero_point, *, axis: int = 1) -> np.ndarray | None:
    """ONNX QuantizeLinear (opset 19, saturating) of initializer tensors, as numpy int8 or float8_e4m3fn;
    None for anything else: a zero point of another type, a non-zero float8 one (TensorRT takes only zero),
    an int8 weight holding NaN (which has no int8 value).

    ``y = saturate(round(x / y_scale) + y_zero_point)``: for int8, rounding half to even and saturating to
    [-128, 127]; for float8e4m3fn, saturating to +-448 (infinities too, NaN stays NaN, -0 stays -0), then the
    cast's rounding to nearest even. The quotient is taken in float64, where the quotient of two fp16 or fp32
    values never lands on the other side of a rounding boundary (or on one) than the exact quotient.
    """
    from onnx import TensorProto, numpy_helper

    integer = zero_point.data_type == TensorProto.INT8
    if not integer and zero_point.data_type != TensorProto.FLOAT8E4M3FN:
        return None
    x, s, z = (numpy_helper.to_array(t) for t in (weight, scale, zero_point))
    if (np.isnan(x).any() if integer else z.astype(np.float32).any()):
        return None
    shape = [1] * x.ndim
    if s.ndim == 1:  # per channel along axis
        shape[axis] = -1
    q = x.astype(np.float64) / s.astype(np.float64).reshape(shape)
    if integer:
        return np.clip(np.rint(q) + z.astype(np.float64).reshape(shape), -128, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(q, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def _tensor(values: np.ndarray, name: str):
    from onnx import TensorProto, numpy_helper

    if values.dtype == np.int8:
        return numpy_helper.from_array(values, name)
    tensor = numpy_helper.from_array(values.view(np.uint8), name)  # float8: the same bytes, typed as such
    tensor.data_type = TensorProto.FLOAT8E4M3FN
    return tensor


def _merge_duplicates(graph) -> None:
    """Point every reader of an initializer at the first one with the same type, shape and bytes."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    named_outside = {v.name for v in (*graph.input, *graph.output)}
    for tensor in graph.initializer:
        if tensor.name in named_outside or not tensor.raw_data:
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
        rename[tensor.name] = first.setdefault(key, tensor.name)
    rename = {old: new for old, new in rename.items() if old != new}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    for tensor in [t for t in graph.initializer if t.name in rename]:
        graph.initializer.remove(tensor)
