"""Trace and optimize one encoder block, then repeat it in the ONNX graph.

Two exporter costs grow with the number of blocks: torch.export traces each one (about 0.7 s per block at
the 345M shape on two cores: 17 of the 20 s a 24-block export took) and the onnxscript rewriter grows faster
than the graph (3.7 s over 24 blocks, 0.1 s over one). Yet the blocks are one graph with different weights.
So the model is traced with its first block only; the exporter's optimizer runs on that small graph, with
the block's weights made graph inputs so that nothing is folded into or merged with them; the block's nodes
are then copied once per further block, bound to that block's parameters, and a last pass of constant
folding, initializer deduplication and common-subexpression elimination runs over the whole graph, all
linear in its size.

The further blocks' weights are bound lazily (``onnx_ir.LazyTensor``): each is read (for a streamed
reference, from the checkpoint) and converted only when the model is saved, one at a time. The transpose
that constant folding would apply to a MatMul weight is applied there too, so folding never needs them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import onnx_ir as ir
import onnxscript.optimizer
import torch
from onnx_ir.passes import common
from torch import nn

from mbexport.errors import MbexportError
from mbexport.model import MegatronBert

SCOPES = "pkg.torch.onnx.name_scopes"  # node metadata: the module path the exporter traced the node in
BLOCK = "bert.encoder.layer.{}"


@contextlib.contextmanager
def first_block_only(model: MegatronBert) -> Iterator[int]:
    """Run the body with ``model`` cut to its first encoder block; yields how many blocks it has."""
    encoder = model.bert.encoder
    blocks = list(encoder.layer)
    encoder.layer = nn.ModuleList(blocks[:1])
    try:
        yield len(blocks)
    finally:
        encoder.layer = nn.ModuleList(blocks)


@contextlib.contextmanager
def weights_as_inputs(graph: ir.Graph) -> Iterator[None]:
    """Run the body with the first block's weights as graph inputs instead of initializers.

    An optimizer then leaves them alone: it folds no transpose into them and merges none of them with an
    equal tensor elsewhere (freshly initialised LayerNorm weights are all equal), so the block's graph
    still reads each of its weights by name and can be bound to another block's.
    """
    prefix = BLOCK.format(0) + "."
    weights = [value for name, value in graph.initializers.items() if name.startswith(prefix)]
    for value in weights:
        graph.initializers.pop(value.name)
        graph.inputs.append(value)
    try:
        yield
    finally:
        for value in weights:
            graph.inputs.remove(value)
            graph.register_initializer(value)


def repeat_first_block(model: ir.Model, count: int, weight: Callable[[str], torch.Tensor]) -> None:
    """Extend ``model``, traced with the first of ``count`` blocks only, by one copy of it per further block.

    The first block's nodes are those the exporter traced inside ``bert.encoder.layer.0``. Each copy reads
    the previous copy's output where the first block read the hidden state, its own block's weights where
    the first read ``bert.encoder.layer.0.*`` (``weight(name)`` gives one, as fp32, when it is saved), and
    everything else (mask, shapes, constants) as the first.
    """
    graph, first = model.graph, BLOCK.format(0)
    nodes = [node for node in graph if first in node.metadata_props.get(SCOPES, "")]
    inside = {value for node in nodes for value in node.outputs}
    leaving = [v for v in inside if v.is_graph_output() or any(user not in nodes for user, _ in v.uses())]
    if len(leaving) != 1 or leaving[0].is_graph_output():
        _unrecognized(f"{len(leaving)} values leave it, not one hidden state")
    (output,) = leaving
    entering = {v for node in nodes for v in node.inputs if v is not None and v not in inside}
    hidden = [v for v in entering if not v.is_initializer() and v.type == output.type and v.shape == output.shape]
    if len(hidden) != 1:
        _unrecognized(f"{len(hidden)} inputs look like the hidden state, not one")
    readers = [(user, position) for user, position in output.uses() if user not in nodes]
    weights = sorted((v for v in entering if v.is_initializer() and v.name.startswith(first + ".")),
                     key=lambda v: v.name)  # a set's order varies from run to run; the file must not
    transposes = {v: v.uses()[0].node for v in weights
                  if len(v.uses()) == 1 and v.uses()[0].node.op_type == "Transpose"}
    copied = [node for node in nodes if node not in transposes.values()]
    last, carried = nodes[-1], output  # copies go right after: everything they read is defined by then
    for index in range(1, count):
        values = {hidden[0]: carried}
        for value in weights:
            load = functools.partial(weight, value.name.replace(first, BLOCK.format(index), 1))
            if value in transposes:  # bound to the Transpose's output: the weight saved transposed
                node = transposes[value]
                perm = tuple(node.attributes["perm"].as_ints())
                values[node.outputs[0]] = _bind(graph, node.outputs[0], f"{node.outputs[0].name}.{index}",
                                                lambda load=load, perm=perm: load().permute(perm).contiguous())
            else:
                values[value] = _bind(graph, value, value.name.replace(first, BLOCK.format(index), 1), load)
        copies = [_copy(node, values, index) for node in copied]
        graph.insert_after(last, copies)
        last, carried = copies[-1], values[output]
    for user, position in readers:
        user.replace_input_with(position, carried)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.Sequential(common.RemoveUnusedNodesPass(), common.DeduplicateInitializersPass(),
                         common.CommonSubexpressionEliminationPass(), common.NameFixPass())(model)


def _copy(node: ir.Node, values: dict[ir.Value, ir.Value], index: int) -> ir.Node:
    """``node`` for block ``index``: it reads ``values``' replacements, and its outputs are added to them."""
    first, scope = BLOCK.format(0), BLOCK.format(index)
    copy = ir.Node(node.domain, node.op_type, [values.get(v, v) for v in node.inputs], node.attributes.values(),
                   overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                   name=f"{node.name}.{index}",
                   metadata_props={k: v.replace(first, scope) for k, v in node.metadata_props.items()})
    for old, new in zip(node.outputs, copy.outputs):
        new.name, new.type, new.shape = f"{old.name}.{index}", old.type, old.shape
        values[old] = new
    return copy


def _unrecognized(why: str):
    raise MbexportError(f"export cannot find encoder block 0 in the graph torch {torch.__version__} traced ({why}); "
                        "its exporter may not record module scopes as torch 2.13's does")


def _bind(graph: ir.Graph, template: ir.Value, name: str, load: Callable[[], torch.Tensor]) -> ir.Value:
    """A new initializer ``name`` typed like ``template`` (the first block's), whose data ``load`` makes when
    it is saved."""
    if template.shape is None or not template.shape.is_static():
        _unrecognized(f"{template.name} has no static shape")
    tensor = ir.LazyTensor(lambda: ir.Tensor(load().detach().numpy(), name=name), dtype=template.dtype,
                           shape=template.shape, name=name)
    value = ir.Value(name=name, type=template.type, shape=template.shape, const_value=tensor)
    graph.register_initializer(value)
    return value
