"""ONNX Runtime's fused-operator variant of our ONNX: an ORT-only artifact, never what TensorRT builds from.

ORT's transformer optimizer alone does not fuse our attention (it expects the 1/sqrt(d) scale after
Q @ K^T; ours is on Q because that is the pattern TensorRT fuses), so each attention block is first rewritten
to ``com.microsoft.Attention`` here, the way ORT's own BERT fusion would emit it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def ort_fused_variant(fp32_onnx: str | Path, out_path: str | Path, num_heads: int, hidden_size: int,
                      fp16: bool = True) -> dict:
    """Our fp32 ONNX with each attention block replaced by ``com.microsoft.Attention`` (packed QKV, the mask
    as right-padding lengths), then ORT's transformer optimizer (SkipLayerNorm, BiasGelu) and, with ``fp16``,
    its fp16 conversion (fp32 inputs/outputs). Returns the fused op counts. Assumes right padding, as ORT's
    BERT fusion does.
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.transformers.onnx_model import OnnxModel
    from onnxruntime.transformers.optimizer import optimize_model

    from mbexport.export.onnxfile import readers

    model = onnx.load(str(fp32_onnx))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = readers(graph)
    weights = {init.name: init for init in graph.initializer}

    def up(node, index, op):
        parent = producer.get(node.input[index])
        if parent is None or parent.op_type != op:
            raise ValueError(f"unexpected attention pattern at {node.name or node.op_type}: wanted {op}")
        return parent

    def down(node, op):
        (child,) = consumers[node.output[0]]
        if child.op_type != op:
            raise ValueError(f"unexpected attention pattern after {node.name or node.op_type}: wanted {op}")
        return child

    def projection(head):  # head: the Transpose feeding the attention matmul -> (x, MatMul, Add, Reshape)
        reshape = up(head, 0, "Reshape")
        add = up(reshape, 0, "Add")
        matmul = up(add, 0, "MatMul")
        return matmul, add, reshape

    mask_index = "mbexport_mask_index"  # right-padding lengths [batch], int32: ORT's MaskIndexEnd format
    new_nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "mbexport_axis1"], ["mbexport_lengths"], keepdims=0),
        helper.make_node("Cast", ["mbexport_lengths"], [mask_index], to=onnx.TensorProto.INT32),
    ]
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "mbexport_axis1"))
    dead = set()
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add_mask = up(softmax, 0, "Add")
        qk = up(add_mask, 0, "MatMul")
        scale = up(qk, 0, "Mul")
        q_matmul, q_add, q_reshape = projection(up(scale, 0, "Transpose"))
        k_transpose = up(qk, 1, "Transpose")
        k_matmul, k_add, k_reshape = projection(k_transpose)
        pv = down(softmax, "MatMul")
        v_transpose = up(pv, 1, "Transpose")
        v_matmul, v_add, v_reshape = projection(v_transpose)
        out_transpose = down(pv, "Transpose")
        out_reshape = down(out_transpose, "Reshape")
        q_transpose = up(scale, 0, "Transpose")
        packed_w = np.concatenate([numpy_helper.to_array(weights[m.input[1]]) for m in (q_matmul, k_matmul, v_matmul)], 1)
        packed_b = np.concatenate([numpy_helper.to_array(weights[a.input[1]]) for a in (q_add, k_add, v_add)])
        name = f"mbexport_attention_{len(new_nodes)}"
        graph.initializer.extend([numpy_helper.from_array(packed_w, name + "_qkv_weight"),
                                  numpy_helper.from_array(packed_b, name + "_qkv_bias")])
        new_nodes.append(helper.make_node("Attention", [q_matmul.input[0], name + "_qkv_weight", name + "_qkv_bias",
                                                        mask_index], [out_reshape.output[0]], name=name,
                                          domain="com.microsoft", num_heads=num_heads))
        dead.update(id(n) for n in (softmax, add_mask, qk, scale, q_transpose, q_matmul, q_add, q_reshape,
                                    k_transpose, k_matmul, k_add, k_reshape, pv, v_transpose, v_matmul, v_add,
                                    v_reshape, out_transpose, out_reshape))
    if not dead:
        raise ValueError(f"{fp32_onnx}: no attention block found")
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept + new_nodes)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    wrapped = OnnxModel(model)
    wrapped.prune_graph(allow_remove_graph_inputs=False)
    wrapped.topological_sort()
    optimized = optimize_model(wrapped.model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0)
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out_path))
    counts: dict[str, int] = {}
    for node in optimized.model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {op: counts.get(op, 0) for op in ("Attention", "SkipLayerNormalization", "BiasGelu", "LayerNormalization")}
