"""Artifacts shaped for ONNX Runtime: the fp32 export with ORT's fused operators, in fp32 or fp16.

The export keeps attention as plain MatMul -> add mask -> Softmax -> MatMul with the 1/sqrt(d) scale on Q,
the pattern TensorRT fuses. ONNX Runtime's transformer optimizer does not recognise it (it expects the scale
after Q @ K^T and its own mask subgraph), so each attention block is rewritten here to
``com.microsoft.Attention``: the three projections packed into one weight, and the padding mask passed raw
([rows, keys], int32) with the export's own mask value, which ORT adds exactly where the export adds it, so
any padding (an all-padding row included) gives what the export gives. The export's GELU becomes ORT's
``Gelu`` (its bias Add before it ORT fuses into BiasGelu when it loads the file). That is all: the rewrite
works on the graph mbexport exported and needs none of ORT's optimizer, whose copies of the model cost
several times its size in memory; ORT's own load-time optimizations do the rest on whichever provider runs it.
The graph is rewritten without its weights, and each weight (the packed QKV ones made from the three it
replaces) is read and written one at a time.
SkipLayerNormalization is left out on purpose: ORT's CPU kernel runs it slower than LayerNormalization and
an Add (0.9 against 0.17 ms at 128 x 1024), and in fp16 it would carry the residual stream in fp16, which
the fp16 pass (``export.fp16``, shared with TensorRT's fp16 file) keeps in fp32.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError
from mbexport.export.fp16 import convert_fp16
from mbexport.export.onnxfile import Weight, array, checked_onnx, read_weightless, readers, save_with_weights
from mbexport.fsutil import temp_prefix

MS = "com.microsoft"  # ONNX Runtime's operator domain
MASK_INDEX = "mbexport_attention_mask"  # the padding mask as Attention takes it: [rows, keys], int32


def fuse_for_ort(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Write ``fp32_path`` with ONNX Runtime's fused operators to ``out_path`` (checked, atomic)."""
    model, weights = fused_model(fp32_path)
    with checked_onnx(out_path) as staged:
        save_with_weights(model, ((weight.tensor, weight.read()) for weight in weights), staged)
    return Path(out_path)


def fuse_fp16_for_ort(fp32_path: str | Path, out_path: str | Path) -> Path:
    """The fused model through the fp16 pass: fp16 weights and compute (Attention, GELU, the matmuls), LayerNorm
    and the residual stream in fp32, fp32 inputs and outputs; meant for ORT's CUDA provider."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out_path), dir=out_path.parent) as tmp:
        return convert_fp16(fuse_for_ort(fp32_path, Path(tmp) / "fused.onnx"), out_path)


def fused_model(fp32_path: str | Path) -> tuple[object, list[Weight]]:
    """``fp32_path``'s ModelProto without its weights, every attention block as ``com.microsoft.Attention`` and
    every GELU as ``com.microsoft.Gelu``, and the weights it reads (``Weight``s, read when written); refuses a
    graph whose attention it does not recognise (a causal mask, say)."""
    from onnx import helper

    if not Path(fp32_path).is_file():
        raise MbexportError("ONNX file not found", fp32_path)
    model, weights = read_weightless(fp32_path)
    by_name = {weight.tensor.name: weight for weight in weights}
    _fuse_attention(model.graph, by_name, fp32_path)
    _fuse_gelu(model.graph, by_name)
    live = prune(model.graph)
    model.opset_import.append(helper.make_opsetid(MS, 1))
    return model, [weight for name, weight in by_name.items() if name in live]


def _replace(graph, dead: set[int], at: dict[int, list]) -> None:
    """Drop the nodes in ``dead`` and put ``at[id(node)]`` where ``node`` was, which keeps the graph in
    topological order when each replacement sits where the last node it replaces was."""
    nodes = [new for node in graph.node for new in at.get(id(node), []) + ([] if id(node) in dead else [node])]
    del graph.node[:]
    graph.node.extend(nodes)


def prune(graph) -> set[str]:
    """Remove the nodes and initializers nothing reads any more (the export's additive mask, say); returns the
    names still read, which a caller holding the weights apart from the graph keeps."""
    live = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if live.intersection(node.output):
            kept.append(node)
            live.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [init for init in graph.initializer if init.name in live]
    del graph.initializer[:]
    graph.initializer.extend(used)
    return live


def _fuse_gelu(graph, weights: dict[str, Weight]) -> None:
    """The export's erf GELU, ``(x * (1 + erf(x / sqrt 2))) * 0.5`` (see ``model.modeling.gelu``), as ``Gelu``."""
    from onnx import helper

    producer = {out: node for node in graph.node for out in node.output}
    constants = {name: array(weight) for name, weight in weights.items() if math.prod(weight.tensor.dims) == 1}

    def is_constant(name: str, value: float) -> bool:
        return name in constants and math.isclose(float(constants[name]), value, rel_tol=1e-6)

    dead, at = set(), {}
    for half in [n for n in graph.node if n.op_type == "Mul" and is_constant(n.input[1], 0.5)]:
        product = producer.get(half.input[0])
        one_plus = producer.get(product.input[1]) if product is not None and product.op_type == "Mul" else None
        erf = producer.get(one_plus.input[0]) if one_plus is not None and one_plus.op_type == "Add" else None
        scaled = producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
        if (scaled is None or scaled.op_type != "Div" or not is_constant(scaled.input[1], math.sqrt(2))
                or not is_constant(one_plus.input[1], 1.0) or scaled.input[0] != product.input[0]):
            continue
        dead.update(id(n) for n in (scaled, erf, one_plus, product, half))
        at[id(half)] = [helper.make_node("Gelu", [product.input[0]], [half.output[0]], name=f"{half.name}_gelu",
                                         domain=MS)]
    _replace(graph, dead, at)


def _fuse_attention(graph, weights: dict[str, Weight], source) -> None:
    """Replace each attention block of ``graph`` in place by one ``Attention`` node, and add its packed weights
    to ``weights``."""
    from onnx import TensorProto, helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers = readers(graph)

    def refuse(why: str):
        raise MbexportError(f"its attention is not the export's padding-masked pattern ({why}); only heads with "
                            "a padding mask can be shaped for ONNX Runtime", source)

    def up(node, index: int, op: str):
        parent = producer.get(node.input[index])
        if parent is None or parent.op_type != op:
            refuse(f"{node.op_type} {node.name} does not read a {op}")
        return parent

    def down(node, op: str):
        found = consumers.get(node.output[0], [])
        if len(found) != 1 or found[0].op_type != op:
            refuse(f"{node.op_type} {node.name} does not feed one {op}")
        return found[0]

    def constant(name: str) -> Weight:
        if name not in weights:
            refuse(f"{name} is not a constant")
        return weights[name]

    def projection(head):  # the Transpose of one head split -> its (MatMul, Add, Reshape, Transpose)
        reshape = up(head, 0, "Reshape")
        add = up(reshape, 0, "Add")
        return [up(add, 0, "MatMul"), add, reshape, head]

    masks, dead, at = {}, set(), {}
    for index, softmax in enumerate(n for n in graph.node if n.op_type == "Softmax"):
        add_mask = up(softmax, 0, "Add")
        scores = up(add_mask, 0, "MatMul")
        scale = up(scores, 0, "Mul")
        q, k = projection(up(scale, 0, "Transpose")), projection(up(scores, 1, "Transpose"))
        context = down(softmax, "MatMul")
        v = projection(up(context, 1, "Transpose"))
        merge = down(context, "Transpose")
        out = down(merge, "Reshape")
        if len({q[0].input[0], k[0].input[0], v[0].input[0]}) != 1:
            refuse("Q, K and V are not projections of one input")
        where = up(add_mask, 1, "Where")  # where(mask, 0, MASK_VALUE): an additive padding mask
        keep, fill = array(constant(where.input[1])), array(constant(where.input[2]))
        cast = up(where, 0, "Cast")
        unsqueeze = producer.get(cast.input[0])
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or keep.size != 1 or float(keep) != 0.0:
            refuse("the mask is not where(padding mask, 0, value) over keys (a causal head?)")
        projections = [constant(p[0].input[1]) for p in (q, k, v)]
        biases = [constant(p[1].input[1]) for p in (q, k, v)]
        hidden = projections[0].tensor.dims[0]
        query_scale = float(array(constant(scale.input[1])))
        head_size = round(query_scale ** -2)
        if head_size < 1 or hidden % head_size or not math.isclose(query_scale, head_size ** -0.5, rel_tol=1e-5):
            refuse("the query scale is not 1/sqrt(head size)")
        mask, added = unsqueeze.input[0], []  # the [rows, keys] attention mask, as the graph reads it
        if mask not in masks:
            masks[mask] = f"{MASK_INDEX}_{len(masks)}"
            added.append(helper.make_node("Cast", [mask], [masks[mask]], to=TensorProto.INT32, name=masks[mask]))
        name = f"mbexport_attention_{index}"
        for part, parts, axis in (("weight", projections, 1), ("bias", biases, 0)):
            dims = list(parts[0].tensor.dims)
            dims[axis] = sum(p.tensor.dims[axis] for p in parts)
            weights[f"{name}_qkv_{part}"] = Weight(
                TensorProto(name=f"{name}_qkv_{part}", dims=dims, data_type=TensorProto.FLOAT),
                compute=lambda parts=parts, axis=axis: np.concatenate([array(p) for p in parts], axis=axis).tobytes())
        added.append(helper.make_node("Attention", [q[0].input[0], f"{name}_qkv_weight", f"{name}_qkv_bias",
                                                    masks[mask]], [out.output[0]], name=name, domain=MS,
                                      num_heads=hidden // head_size, mask_filter_value=float(fill)))
        at[id(out)] = added  # the block's last node: everything Attention reads is there before it
        dead.update(id(n) for n in (*q, *k, *v, scale, scores, add_mask, softmax, context, merge, out))
    if not dead:
        refuse("no attention block found")
    _replace(graph, dead, at)
