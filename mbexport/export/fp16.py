"""fp32 ONNX -> strongly typed fp16 ONNX: fp16 weights and compute, fp32 where fp16 would overflow.

TensorRT 11 takes precision only from the graph, so this file is what an FP16 engine is built from. Kept in
fp32 (cast in, computed, cast out): LayerNormalization, Softmax, and every Add that feeds one of them, which
in a pre-LN BERT is exactly the residual stream (whose magnitude grows with depth), the embedding sum and
the attention-mask add. Inputs and outputs keep their fp32 types, as usual for BERT.

A tensor is stored in the precision of the node that produces it; a Cast is inserted only where a consumer
runs in the other precision, one per tensor and direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbexport.export.onnxfile import Weight, checked_onnx, read_weightless, readers, save_with_weights

FP32_OPS = ("LayerNormalization", "Softmax")
FP16_MAX = float(np.finfo(np.float16).max)


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Write the fp16 version of ``fp32_path`` (checked, atomic) to ``out_path``.

    The graph is converted without its weights; each weight is then read, halved if it is to be, and
    written, one at a time, so the pass holds about one tensor whatever the model's size.
    """
    model, weights = read_weightless(fp32_path)
    halved = convert_graph_fp16(model.graph, [w.tensor for w in weights])
    with checked_onnx(out_path) as staged:
        save_with_weights(model, (stored(w, w.tensor.name in halved) for w in weights), staged)
    return Path(out_path)


def stored(weight: Weight, halve: bool) -> tuple[object, bytes]:
    """(TensorProto without data, raw bytes) of one initializer for ``save_with_weights``, halved or as it is."""
    from onnx import TensorProto

    raw = weight.read()
    if not halve:
        return weight.tensor, raw
    tensor = TensorProto(name=weight.tensor.name, dims=weight.tensor.dims, data_type=TensorProto.FLOAT16)
    return tensor, saturated_fp16(np.frombuffer(raw, dtype="<f4")).tobytes()


def convert_graph_fp16(graph, initializers: list) -> set[str]:
    """Convert ``graph`` (without its initializers, which ``initializers`` describe: TensorProtos, their data
    not needed) in place; returns the names of the fp32 initializers to store in fp16 (``stored``)."""
    from onnx import TensorProto, helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    floats = {v.name for v in (*graph.input, *graph.value_info, *graph.output)
              if v.type.tensor_type.elem_type == FLOAT}
    floats |= {t.name for t in initializers if t.data_type == FLOAT}
    consumers = readers(graph)

    def runs_fp32(node) -> bool:
        return node.op_type in FP32_OPS or (node.op_type == "Add" and any(
            c.op_type in FP32_OPS for out in node.output for c in consumers.get(out, ())))

    fp32_nodes = {id(node) for node in graph.node if runs_fp32(node)}
    home = {v.name: FLOAT for v in graph.input}  # the precision each float tensor is stored in
    halved = set()
    for init in initializers:
        if init.data_type == FLOAT:
            if all(id(c) in fp32_nodes for c in consumers.get(init.name, ())):
                home[init.name] = FLOAT
            else:
                halved.add(init.name)
                home[init.name] = HALF

    outputs = {v.name for v in graph.output if v.name in floats}
    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            casts[(name, to)] = f"{name}.{'fp32' if to == FLOAT else 'fp16'}"
            nodes.append(helper.make_node("Cast", [name], [casts[(name, to)]], to=to, name=f"cast.{casts[(name, to)]}"))
        return casts[(name, to)]

    for node in graph.node:
        precision = FLOAT if id(node) in fp32_nodes else HALF
        for i, name in enumerate(node.input):
            if name in floats and home.get(name, precision) != precision:
                node.input[i] = cast(name, precision)
        if precision == HALF:
            _retype_attributes(node)
        out_casts = []
        for i, name in enumerate(node.output):
            if name in outputs and precision == HALF:  # graph outputs stay fp32
                node.output[i] = f"{name}.fp16"
                out_casts.append(helper.make_node("Cast", [node.output[i]], [name], to=FLOAT, name=f"cast.{name}"))
                home[name] = FLOAT
            elif name in floats:
                home[name] = precision
        nodes += [node, *out_casts]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # re-inferred when the file is checked
    return halved


def _retype_attributes(node) -> None:
    """A node moved to fp16 must also make its own float constants and Cast targets fp16."""
    from onnx import AttributeProto, TensorProto

    for attr in node.attribute:
        if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            attr.t.CopyFrom(_halved(attr.t))
        elif attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16


def _halved(tensor):
    """An fp32 TensorProto (a node's attribute) as fp16, saturated like the weights."""
    from onnx import numpy_helper

    return numpy_helper.from_array(saturated_fp16(numpy_helper.to_array(tensor)), tensor.name)


def saturated_fp16(array: np.ndarray) -> np.ndarray:
    """fp32 values as fp16, saturated at fp16's largest finite value rather than turned into inf."""
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
