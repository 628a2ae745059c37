"""INT8 for ONNX Runtime's integer kernels: the fused model (``export.ort``) with int8 matmuls in its trunk.

Each encoder matmul becomes ONNX Runtime's integer operator with int8 weights (symmetric, per output channel)
and uint8 activations (per tensor, ranges from calibration): the QKV projection ``QAttention`` (the attention
itself stays fp32 inside it), the others ``MatMulIntegerToFloat`` with their bias folded in. GELU stays
ORT's ``Gelu``, LayerNorm and the residual adds fp32, and so does everything after the trunk's final
LayerNorm (the head), as in the TensorRT int8 artifact.

Static, calibrated activation ranges rather than ``quantize_dynamic``'s ranges taken at run time: with those, a
row's numbers depend on what else is in its batch (padding and the other rows widen the range every row is
quantized with), so Triton's dynamic batcher would change answers; measured on the 345M QA head
(benchmarks/README.md), the calibrated graph also ran as fast or up to 3% faster, at the same accuracy on
the trained fixture. Activation ranges are ``max`` (the smallest and largest value seen) or ``entropy`` (ONNX
Runtime's KL-divergence threshold over histograms), gathered on the memory-mapped fp32 file a few rows at a
time (``calibration.activation_ranges``); the fused graph is rewritten without its weights, and each int8
weight is made from its fp32 one as it is written, so memory stays about the fp32 file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError
from mbexport.export.onnxfile import array, checked_onnx, head_nodes, held, readers, save_with_weights
from mbexport.export.ort import MS, fused_model, prune
from mbexport.precisions import ONNXRUNTIME
from mbexport.quantize.calibration import activation_ranges, check_request
from mbexport.quantize.weights import quantize_linear, symmetric_scales


def quantize_for_ort(fp32_path: str | Path, out_path: str | Path, *, mode: str = "int8",
                     calibration: list[dict[str, np.ndarray]], method: str = "max") -> Path:
    """Write the int8 version of ``fp32_path`` for ONNX Runtime to ``out_path`` (checked, atomic), its activation
    ranges the ``method`` statistic over ``calibration`` (feed dicts, see ``calibration_batches``)."""
    from onnx import helper

    check_request(fp32_path, mode, method, calibration, ONNXRUNTIME)
    model, kept = fused_model(fp32_path)
    graph = model.graph
    weights = {weight.tensor.name: weight for weight in kept}
    consumers = readers(graph)
    head = head_nodes(graph, fp32_path)
    targets = [n for position, n in enumerate(graph.node) if position not in head
               and (n.op_type == "Attention" or (n.op_type == "MatMul" and n.input[1] in weights))]
    # The fused operators read the tensors the fp32 export names the same: ranges come from the fp32 file.
    ranges = activation_ranges(fp32_path, sorted({n.input[0] for n in targets}), calibration, method)
    replaced, folded, quantized_weights, added = {}, set(), {}, []
    for index, node in enumerate(targets):
        name, x, output = f"mbexport_int8_{index}", node.input[0], node.output[0]
        weight = weights[node.input[1]]
        channels = weight.tensor.dims[1]
        low, high = min(ranges[x][0], 0.0), max(ranges[x][1], 0.0)  # zero must be exact (padding, ReLU-like)
        x_scale = max(high - low, np.finfo(np.float32).tiny) / 255
        quantized_weights[f"{name}_w"] = (weight, f"{name}_w_scale")
        added += [held(f"{name}_w_zero", np.zeros(channels, np.int8)),
                  held(f"{name}_x_scale", np.array(x_scale, np.float32)),
                  held(f"{name}_x_zero", np.array(np.rint(-low / x_scale), np.uint8))]
        quantized = [f"{name}_x", f"{name}_x_scale", f"{name}_x_zero"]
        nodes = [helper.make_node("QuantizeLinear", [x, *quantized[1:]], quantized[:1], name=f"{name}_quantize")]
        if node.op_type == "Attention":  # input, weight, bias, input scale, weight scale, mask, zero points
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            nodes.append(helper.make_node("QAttention", [quantized[0], f"{name}_w", node.input[2], quantized[1],
                                                         f"{name}_w_scale", node.input[3], quantized[2],
                                                         f"{name}_w_zero"],
                                          [output], name=name, domain=MS, **attributes))
        else:
            bias = _bias(consumers.get(output, []), output, weights, channels)
            if bias is not None:
                folded.add(id(bias))
                output = bias.output[0]
            nodes.append(helper.make_node("MatMulIntegerToFloat", [
                quantized[0], f"{name}_w", quantized[1], f"{name}_w_scale", quantized[2], f"{name}_w_zero",
                *([n for n in bias.input if n in weights] if bias is not None else [])], [output], name=name,
                domain=MS))
        replaced[id(node)] = nodes
    if not replaced:
        raise MbexportError("no encoder matmul to quantize: not a Megatron-BERT export", fp32_path)
    nodes = [new for node in graph.node if id(node) not in folded for new in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    live = prune(graph)  # drops the fp32 weights the integer operators replaced

    def written():  # one weight at a time, each int8 one made from its fp32 source as it is written
        for weight in [w for w in kept if w.tensor.name in live] + added:
            yield weight.tensor, weight.read()
        for name, (weight, scale_name) in quantized_weights.items():  # per output channel, symmetric
            values = array(weight)
            scales = symmetric_scales(np.abs(values).max(axis=0), "int8")
            for made in (held(scale_name, scales), held(name, quantize_linear(values, scales, "int8", axis=1))):
                yield made.tensor, made.inline

    with checked_onnx(out_path) as staged:
        save_with_weights(model, written(), staged)
    return Path(out_path)


def _bias(after: list, output: str, weights: dict, width: int):
    """The Add that adds a constant fp32 [width] bias to a matmul's ``output`` and nothing else reads, or None."""
    from onnx import TensorProto

    if len(after) != 1 or after[0].op_type != "Add":
        return None
    other = [name for name in after[0].input if name != output]
    bias = weights.get(other[0]) if len(other) == 1 else None
    if bias is None or tuple(bias.tensor.dims) != (width,) or bias.tensor.data_type != TensorProto.FLOAT:
        return None
    return after[0]
