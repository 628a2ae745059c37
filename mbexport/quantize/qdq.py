"""fp32 ONNX -> Q/DQ ONNX for TensorRT (INT8 or FP8), calibrated on the CPU, written one weight at a time.

Placement is the one NVIDIA Model Optimizer 0.47 chooses for this export (``tests/test_quantize.py`` runs Model
Optimizer as the oracle and compares): a Q/DQ pair on both inputs of every MatMul of the trunk and nowhere
else. Not on Gather, Softmax or LayerNormalization, not on the residual stream (LayerNorm would read int8
values of a stream whose outliers grow with depth in a pre-LN model), not in the task head (everything after
the trunk's final LayerNorm: LM transform and decoder, pooler, classifier, span head). A weight gets
symmetric per-output-channel scales, an activation one symmetric per-tensor scale (one pair per tensor,
shared by its readers): amax / 127 for INT8, amax / 448 for FP8; Softmax's output has the range [0, 1]. The
attention's two batched MatMuls (the only ones without a weight) get Q/DQ in INT8, which TensorRT's INT8
fused attention takes, and not in FP8, where Model Optimizer finds no FP8 fused-attention pattern in this
graph. A MatMul with a static dimension under 16 gets none (Model Optimizer's small-GEMM rule). Model
Optimizer also leaves out the batched MatMuls when its first calibration batch has fewer than 16 tokens;
here the model decides, not the batch.

Why not Model Optimizer itself: it loads, checks, shape-infers and saves the whole model about ten times
over. On the 345M QA head it held 12.7 GB for 4 calibration rows and took 290 s; at 1.3B it ran out of 24
GB. Here the graph is rewritten without its weights, the activation ranges come from ONNX Runtime running
the fp32 file with memory-mapped weights a few rows at a time (``calibration.activation_ranges``), and each
weight is then read, quantized and written on its own.

What is not quantized runs in fp16, with the fp16 export's fp32 islands (``export.fp16``): TensorRT 11
builds strongly typed, so an fp32 remainder would stay fp32 on the GPU. Quantized weights are stored as int8
or float8e4m3fn (``weights.py``), computed from the fp16 weight and fp16 scale the graph holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError
from mbexport.export.fp16 import convert_graph_fp16, saturated_fp16, stored
from mbexport.export.onnxfile import (Weight, array, checked_onnx, head_nodes, held, read_weightless,
                                      save_with_weights)
from mbexport.precisions import DEFAULT_RUNTIME
from mbexport.quantize.calibration import activation_ranges, check_request
from mbexport.quantize.weights import quantize_linear, symmetric_scales

QDQ_OPSET = 19  # QuantizeLinear of float8e4m3fn, saturating
MIN_GEMM = 16  # Model Optimizer's _MIN_MATMUL_DIM: a MatMul with a smaller static dimension stays unquantized


def quantize_onnx(fp32_onnx: str | Path, out_path: str | Path, *, mode: str = "int8",
                  calibration: list[dict[str, np.ndarray]], method: str = "max") -> Path:
    """Write the ``mode`` (int8 or fp8) Q/DQ version of ``fp32_onnx`` to ``out_path`` (checked, atomic).

    ``calibration`` is a list of feed dicts (see ``calibration_batches``); activation ranges are their
    ``method`` statistic: ``max`` (absolute maximum) or ``entropy`` (KL-divergence threshold).
    """
    from onnx import TensorProto

    fp32_onnx, out_path = check_request(fp32_onnx, mode, method, calibration, DEFAULT_RUNTIME), Path(out_path)
    model, weights = read_weightless(fp32_onnx)
    graph = model.graph
    by_name = {w.tensor.name: w for w in weights}
    inputs = _placement(graph, by_name, mode, fp32_onnx)
    if not inputs:
        raise MbexportError("no encoder MatMul to quantize: not a Megatron-BERT export", fp32_onnx)
    for node, index in inputs:
        weight = by_name.get(node.input[index])
        if weight is not None and weight.tensor.data_type != TensorProto.FLOAT:
            raise MbexportError(f"weight {weight.tensor.name} is not fp32: not an fp32 export", fp32_onnx)
    activations = sorted({node.input[i] for node, i in inputs if node.input[i] not in by_name})
    ranges = activation_ranges(fp32_onnx, activations, calibration, method)
    softmax = {out for node in graph.node if node.op_type == "Softmax" for out in node.output}
    amax = {name: 1.0 if name in softmax else max(abs(low), abs(high)) for name, (low, high) in ranges.items()}
    quantized, added = _insert(graph, inputs, by_name, amax, mode)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, QDQ_OPSET)
    read = {name for node in graph.node for name in node.input}
    kept = [w for w in weights if w.tensor.name in read] + added
    halved = convert_graph_fp16(graph, [w.tensor for w in kept] + [t for pair in quantized.values() for t in pair])

    def written():
        for weight in kept:
            yield stored(weight, weight.tensor.name in halved)
        for name, (scale, quantized_weight) in quantized.items():
            yield from _stored_quantized(by_name[name], scale, quantized_weight, mode, fp32_onnx)

    with checked_onnx(out_path) as staged:
        save_with_weights(model, written(), staged)
    return out_path


def _placement(graph, weights: dict[str, Weight], mode: str, source) -> list[tuple[object, int]]:
    """(MatMul node, input index) of every input that gets a Q/DQ pair: both inputs of each trunk MatMul the
    rules in the module docstring quantize."""
    head = head_nodes(graph, source)
    static = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in graph.value_info}
    inputs = []
    for position, node in enumerate(graph.node):
        if node.op_type != "MatMul" or position in head or node.input[0] in weights:
            continue
        weight = weights.get(node.input[1])
        if weight is None:  # attention's batched MatMul: [.., K, N] from shape inference, where it is static
            if mode != "int8":
                continue
            k_n = static.get(node.input[1], [None, None])[-2:]
        elif len(weight.tensor.dims) == 2:
            k_n = list(weight.tensor.dims)
        else:
            continue  # not a linear layer's [in, out] weight: this export has none
        if not any(d is not None and d < MIN_GEMM for d in k_n):
            inputs += [(node, 0), (node, 1)]
    return inputs


def _insert(graph, inputs, weights: dict[str, Weight], amax: dict[str, float], mode: str):
    """Put a DequantizeLinear (and, for activations, a QuantizeLinear) before each input in ``inputs``.

    Returns {weight name: (its scale, its quantized tensor)}, TensorProtos without data that
    ``_stored_quantized`` fills, and the activations' scales and zero points as ``Weight``s held inline.
    """
    from onnx import TensorProto, helper

    zero_type = TensorProto.INT8 if mode == "int8" else TensorProto.FLOAT8E4M3FN
    dequantized, before, quantized, added = {}, {}, {}, []
    for node, index in inputs:
        name = node.input[index]
        if name not in dequantized:
            dequantized[name], nodes = f"{name}.dequantized", []
            scale, zero = f"{name}.scale", f"{name}.zero"
            weight = weights.get(name)
            if weight is None:  # an activation: per tensor, its scale from calibration
                nodes.append(helper.make_node("QuantizeLinear", [name, scale, zero], [f"{name}.quantized"],
                                              name=f"{name}.quantize"))
                added += [held(scale, symmetric_scales(amax[name], mode)),
                          held(zero, np.zeros((), np.uint8), zero_type)]
                axis = {}
            else:  # a weight, [in, out]: per output channel, stored quantized
                channels = weight.tensor.dims[1]
                quantized[name] = (TensorProto(name=scale, dims=[channels], data_type=TensorProto.FLOAT16),
                                   TensorProto(name=f"{name}.quantized", dims=weight.tensor.dims, data_type=zero_type))
                added.append(held(zero, np.zeros(channels, np.uint8), zero_type))
                axis = {"axis": 1}
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}.quantized", scale, zero], [dequantized[name]],
                                          name=f"{name}.dequantize", **axis))
            before.setdefault(id(node), []).extend(nodes)
        node.input[index] = dequantized[name]
    nodes = [new for node in graph.node for new in (*before.get(id(node), ()), node)]
    del graph.node[:]
    graph.node.extend(nodes)
    return quantized, added


def _stored_quantized(weight: Weight, scale, quantized, mode: str, source):
    """A weight's (scale, quantized weight) for ``save_with_weights``: fp32 per-channel scales from the fp32
    weight, then both in fp16 as the graph holds them, and QuantizeLinear of one by the other."""
    values = array(weight)
    if not np.isfinite(values).all():
        raise MbexportError(f"weight {weight.tensor.name} holds NaN or infinity", source)
    scales = symmetric_scales(np.abs(values).max(axis=0), mode).astype(np.float16)
    halved = saturated_fp16(values)
    yield scale, scales.tobytes()
    yield quantized, quantize_linear(halved, scales, mode, axis=1).view(np.uint8).tobytes()
