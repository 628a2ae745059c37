"""Artifacts shaped for ONNX Runtime: the fp32 export with ORT's fused operators, in fp32 or fp16.

The export keeps attention as plain MatMul -> add mask -> Softmax -> MatMul with the 1/sqrt(d) scale on Q,
the pattern TensorRT fuses. ONNX Runtime's transformer optimizer does not recognise it (it expects the scale
after Q @ K^T and its own mask subgraph), so each attention block is rewritten here to
``com.microsoft.Attention``: the three projections packed into one weight, and the padding mask passed raw
([rows, keys], int32) with the export's own mask value, which ORT adds exactly where the export adds it, so
any padding (an all-padding row included) gives what the export gives. ORT's optimizer then fuses what it
does recognise (SkipLayerNormalization, BiasGelu); it runs with ``opt_level=0`` (its Python fusions only),
so the file stays free of one provider's kernel layouts and serves on the CPU and on CUDA.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError
from mbexport.export.onnxfile import checked_onnx, readers, save_model

MASK_INDEX = "mbexport_attention_mask"  # the padding mask as Attention takes it: [rows, keys], int32


def fuse_for_ort(fp32_path: str | Path, out_path: str | Path) -> Path:
    """Write ``fp32_path`` with ONNX Runtime's fused operators to ``out_path`` (checked, atomic)."""
    model = fused_model(fp32_path, skip_layer_norm=False, bias_gelu=True)
    with checked_onnx(out_path) as staged:
        save_model(model, staged)
    return Path(out_path)


def fuse_fp16_for_ort(fp32_path: str | Path, out_path: str | Path) -> Path:
    """The fused model in fp16 (ORT's converter: fp16 weights and compute, fp32 inputs and outputs), for CUDA."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(fused_model(fp32_path, skip_layer_norm=True, bias_gelu=True))
    wrapped.convert_float_to_float16(keep_io_types=True)
    with checked_onnx(out_path) as staged:
        save_model(wrapped.model, staged)
    return Path(out_path)


def fused_model(fp32_path: str | Path, *, skip_layer_norm: bool, bias_gelu: bool):
    """The ModelProto of ``fp32_path`` with every attention block as ``com.microsoft.Attention`` and ORT's
    optimizer's fusions: GELU with its bias (BiasGelu) or without (Gelu, its bias left to the matmul before
    it), residual Add and LayerNormalization as SkipLayerNormalization or not. Refuses a graph whose attention
    it does not recognise (a causal mask, say)."""
    import onnx
    from onnx import helper
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    if not Path(fp32_path).is_file():
        raise MbexportError("ONNX file not found", fp32_path)
    model = onnx.load(str(fp32_path))
    heads, hidden = _fuse_attention(model.graph, fp32_path)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    wrapped = OnnxModel(model)
    wrapped.prune_graph(allow_remove_graph_inputs=False)
    wrapped.topological_sort()
    options = FusionOptions("bert")
    options.enable_attention = False  # done above; ORT's matcher would only look for its own pattern
    options.enable_embed_layer_norm = False  # it would replace the raw mask by right-padding lengths
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = skip_layer_norm
    options.enable_bias_gelu = bias_gelu
    optimized = optimize_model(wrapped.model, model_type="bert", num_heads=heads, hidden_size=hidden,
                               optimization_options=options, opt_level=0)
    wanted = ("Attention", "BiasGelu" if bias_gelu else "Gelu") + (("SkipLayerNormalization",) if skip_layer_norm
                                                                    else ())
    counts = {op: sum(n.op_type == op for n in optimized.model.graph.node) for op in wanted}
    if not all(counts.values()):
        raise MbexportError(f"ONNX Runtime's optimizer left it unfused ({counts}): not a Megatron-BERT export",
                            fp32_path)
    return optimized.model


def _fuse_attention(graph, source) -> tuple[int, int]:
    """Replace each attention block of ``graph`` in place; returns (heads, hidden size)."""
    from onnx import TensorProto, helper, numpy_helper

    producer = {out: node for node in graph.node for out in node.output}
    consumers = readers(graph)
    weights = {init.name: init for init in graph.initializer}

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

    def constant(name: str) -> np.ndarray:
        if name not in weights:
            refuse(f"{name} is not a constant")
        return numpy_helper.to_array(weights[name])

    def projection(head):  # the Transpose of one head split -> its (MatMul, Add, Reshape, Transpose)
        reshape = up(head, 0, "Reshape")
        add = up(reshape, 0, "Add")
        return [up(add, 0, "MatMul"), add, reshape, head]

    masks, dead, added, heads, hidden = {}, set(), [], 0, 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
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
        keep, fill = constant(where.input[1]), constant(where.input[2])
        cast = up(where, 0, "Cast")
        unsqueeze = producer.get(cast.input[0])
        if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or keep.size != 1 or float(keep) != 0.0:
            refuse("the mask is not where(padding mask, 0, value) over keys (a causal head?)")
        packed_weight = np.concatenate([constant(p[0].input[1]) for p in (q, k, v)], axis=1)
        packed_bias = np.concatenate([constant(p[1].input[1]) for p in (q, k, v)])
        hidden = packed_weight.shape[0]
        head_size = round(float(constant(scale.input[1])) ** -2)
        if head_size < 1 or hidden % head_size or not math.isclose(float(constant(scale.input[1])),
                                                                    head_size ** -0.5, rel_tol=1e-5):
            refuse("the query scale is not 1/sqrt(head size)")
        heads = hidden // head_size
        mask = unsqueeze.input[0]  # the [rows, keys] attention mask, as the graph reads it
        if mask not in masks:
            masks[mask] = f"{MASK_INDEX}_{len(masks)}"
            added.append(helper.make_node("Cast", [mask], [masks[mask]], to=TensorProto.INT32,
                                          name=masks[mask]))
        name = f"mbexport_attention_{len(dead)}"
        graph.initializer.extend([numpy_helper.from_array(packed_weight, f"{name}_qkv_weight"),
                                  numpy_helper.from_array(packed_bias, f"{name}_qkv_bias")])
        added.append(helper.make_node("Attention", [q[0].input[0], f"{name}_qkv_weight", f"{name}_qkv_bias",
                                                    masks[mask]], [out.output[0]], name=name,
                                      domain="com.microsoft", num_heads=heads, mask_filter_value=float(fill)))
        dead.update(id(n) for n in (*q, *k, *v, scale, scores, add_mask, softmax, context, merge, out))
    if not dead:
        refuse("no attention block found")
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept + added)
    return heads, hidden
