"""PyTorch reference -> fp32 ONNX, with the registry's names and named dynamic axes.

Uses ``torch.export`` (the dynamo exporter): it yields plain standard ops with initializers instead of
Constant nodes, native LayerNormalization at opset 17, and keeps the dynamic dims named as in the registry.
The model is switched to its export form: explicit attention (MatMul(Q * scale, K^T) + mask -> Softmax ->
MatMul, finite mask value), the pattern TensorRT fuses, and a GELU ONNX Runtime fuses. Only the first encoder
block is traced and optimized; the others are copies of its graph (``export.blocks``), which cuts a 345M
export from 34 s to 16.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx_ir
import torch

from mbexport.errors import MbexportError
from mbexport.export.blocks import first_block_only, repeat_first_block, weights_as_inputs
from mbexport.export.onnxfile import ALIGN_ABOVE, ALIGNMENT, checked_onnx
from mbexport.inputs import sample_batch
from mbexport.manifest import external_data_name
from mbexport.model import MegatronBert, parameter
from mbexport.precisions import OPSET

NATIVE_OPSET = 18  # what torch's exporter writes without a version conversion
# Example sizes for tracing: distinct and > 1, so torch.export neither specializes nor ties any dim.
EXAMPLE = {"batch": 2, "num_choices": 3, "sequence": 7}


def export_onnx(model: MegatronBert, out_path: str | Path, *, opset: int = OPSET) -> Path:
    """Write ``model`` as a checked fp32 ONNX file (external data when > 2 GB); returns ``out_path``."""
    if opset < OPSET:
        raise MbexportError(f"opset {opset} is too old: {OPSET}+ has the LayerNormalization TensorRT fuses")
    form, model.export_form = model.export_form, True
    try:
        with checked_onnx(out_path) as staged, _quiet():
            _write(model.eval(), staged, opset)  # returns before the checks, freeing the exporter's copies
            gc.collect()  # its graphs are reference cycles: free them (and what they held) now
    finally:
        model.export_form = form
    return Path(out_path)


def _write(model: MegatronBert, path: Path, opset: int) -> None:
    task = model.task
    args, dynamic_shapes = trace_inputs(model)
    with first_block_only(model) as count:  # the other blocks are copies of its graph: see export.blocks
        program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=task.input_names, output_names=task.output_names,
                                    opset_version=max(opset, NATIVE_OPSET), optimize=False, verbose=False)
    with weights_as_inputs(program.model.graph):
        program.optimize()  # the exporter's own optimizer, on one block
    repeat_first_block(program.model, count, functools.partial(parameter, model))
    _retarget(program.model, opset)
    _contiguous(program.model.graph)
    onnx_ir.save(program.model, path, external_data=external_data_name(path),  # streamed, one tensor at a time
                 alignment=ALIGNMENT, align_threshold=ALIGN_ABOVE)
    for value in program.model.graph.initializers.values():  # onnxscript's rewrite rules keep the last graph
        value.const_value = None  # they matched (module state): it must not keep the weights, or the checkpoint


def trace_inputs(model: MegatronBert) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The example inputs and ``dynamic_shapes`` that ``torch.onnx.export`` traces ``model`` with."""
    task, config = model.task, model.config
    example = sample_batch(task, config, EXAMPLE["batch"], EXAMPLE["sequence"], num_choices=EXAMPLE["num_choices"])
    dims = {name: torch.export.Dim(name, min=1, max=config.max_position_embeddings if name == "sequence" else None)
            for name in ("batch", "num_choices", "sequence")}
    return (tuple(torch.from_numpy(example[name]) for name in task.input_names),
            {spec.name: {axis: dims[dim] for axis, dim in spec.dynamic_axes().items()} for spec in task.inputs})


def _contiguous(graph: onnx_ir.Graph) -> None:
    """Make strided weights (the folded transposes are numpy views) C-ordered, one at a time as they are saved.

    onnx_ir writes a strided array with ``ndarray.tofile``, element by element: saving the 345M model took 5.5 s
    that way, 3.6 s with the copies.
    """
    for value in graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = onnx_ir.LazyTensor(lambda array=tensor.raw: onnx_ir.Tensor(np.ascontiguousarray(array)),
                                                   dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)


def _retarget(model: onnx_ir.Model, opset: int) -> None:
    """Lower the default-domain opset to ``opset``.

    When every op in the graph has the same definition at both versions (true for this model at 17, which
    differs from 18 only in ops such as Split and ReduceMean), relabelling is exact and copies no weights;
    otherwise the ONNX version converter runs, which serializes the whole model once.
    """
    import onnx.defs

    current = model.opset_imports.get("", opset)
    if opset >= current:
        return

    def same(node) -> bool:
        try:
            return (onnx.defs.get_schema(node.op_type, opset, node.domain).since_version
                    == onnx.defs.get_schema(node.op_type, current, node.domain).since_version)
        except onnx.defs.SchemaError:
            return False

    if all(same(node) for node in model.graph.all_nodes() if node.domain in ("", "ai.onnx")):
        model.opset_imports[""] = opset
    else:
        from onnxscript import version_converter

        version_converter.convert_version(model, opset, fallback=True)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and logs opset/axis-renaming notes; none of it is for our users."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
