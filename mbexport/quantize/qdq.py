"""fp32 ONNX -> Q/DQ ONNX with NVIDIA Model Optimizer, calibrated on the CPU.

Placement is TensorRT's: symmetric per-channel weights and per-tensor activations on the encoder's
MatMuls and nothing else: not Gather, Softmax or LayerNormalization, not the residual stream (Model
Optimizer would put Q/DQ on residual Adds, so LayerNorm would read int8 values of a stream whose outliers
grow with depth in a pre-LN model), not the task head (everything after the trunk's final LayerNorm: LM
transform and decoder, pooler, classifier, span head). Whether attention's two batched MatMuls get Q/DQ is
Model Optimizer's call (it checks the shapes TensorRT's fused attention takes). ONNX Runtime's default
``quantize_static`` quantizes Gather, LayerNorm and Softmax too and costs the trained fixture most of its
masked-LM accuracy.

What is not quantized runs in fp16, with the fp16 export's fp32 islands (LayerNorm, Softmax, the Adds
feeding them): TensorRT 11 builds strongly typed, so an fp32 remainder would stay fp32 on the GPU. Model
Optimizer's own ``high_precision_dtype="fp16"`` would put LayerNorm and the residual stream in fp16 too;
instead the fp32-remainder output goes through the fp16 export's conversion. On the trained fixture both
remainders keep the same accuracy (within a few masked tokens of 7191). Then each weight's QuantizeLinear is
computed once and stored as int8 / fp8 (``weights.py``): the file holds one byte per quantized weight.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError, MissingDependencyError, first_line
from mbexport.export import convert_graph_fp16
from mbexport.export.onnxfile import checked_onnx, read_weightless, readers, save_model
from mbexport.fsutil import temp_prefix
from mbexport.manifest import external_data_name
from mbexport.precisions import CALIBRATION_METHODS, made_by
from mbexport.quantize.weights import store_weights_quantized


def quantize_onnx(fp32_onnx: str | Path, out_path: str | Path, *, mode: str = "int8",
                  calibration: list[dict[str, np.ndarray]], method: str = "max") -> Path:
    """Write the ``mode`` (int8 or fp8) Q/DQ version of ``fp32_onnx`` to ``out_path`` (checked, atomic).

    ``calibration`` is a list of feed dicts (see ``calibration_batches``); activation ranges are their
    ``method`` statistic: ``max`` (absolute maximum) or ``entropy`` (KL-divergence threshold).
    """
    if mode not in made_by("quantize"):
        raise MbexportError(f"cannot quantize to '{mode}'; choose one of: {', '.join(made_by('quantize'))}")
    if method not in CALIBRATION_METHODS:
        raise MbexportError(f"unknown calibration method '{method}'; choose one of: {', '.join(CALIBRATION_METHODS)}")
    if not calibration:
        raise MbexportError("no calibration batches", fp32_onnx)
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise MbexportError("ONNX file not found", fp32_onnx)
    import onnx

    quantize = _modelopt_quantize()
    head = _head_nodes(fp32_onnx)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Model Optimizer rewrites its input in place (shape inference) and writes intermediate models beside
    # it: give it a private copy, so the recorded fp32 file keeps its hash.
    with tempfile.TemporaryDirectory(prefix=temp_prefix(out_path), dir=out_path.parent) as tmp:
        source, quantized = Path(tmp) / "source.onnx", Path(tmp) / "quantized.onnx"
        shutil.copyfile(fp32_onnx, source)
        data = fp32_onnx.parent / external_data_name(fp32_onnx)
        if data.exists():
            shutil.copyfile(data, Path(tmp) / data.name)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # logs, bars
                quantize(str(source), quantize_mode=mode, calibration_data_reader=_Batches(calibration),
                         calibration_method=method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=head,
                         output_path=str(quantized), log_level="CRITICAL")
        except Exception as error:  # Model Optimizer raises assertions and its own types alike
            raise MbexportError(f"Model Optimizer could not quantize it to {mode} "
                                f"({first_line(error)})",
                                fp32_onnx) from error
        model = onnx.load(str(quantized))
        convert_graph_fp16(model.graph)
        store_weights_quantized(model.graph)
        with checked_onnx(out_path) as staged:
            save_model(model, staged)
        return out_path


def _head_nodes(onnx_path: str | Path) -> list[str]:
    """Name patterns of every node after the trunk's final LayerNorm, found by the pre-LN structure.

    Inside the trunk, each LayerNorm's input (the residual stream) also feeds the residual Add; the final
    LayerNorm's input feeds only it. Everything downstream of that LayerNorm is the head.
    """
    graph = read_weightless(onnx_path)[0].graph
    consumers = readers(graph)
    final = next((n for n in graph.node if n.op_type == "LayerNormalization" and len(consumers[n.input[0]]) == 1),
                 None)
    if final is None:
        raise MbexportError("no final LayerNormalization: not a pre-LN Megatron-BERT export", onnx_path)
    head, frontier = {}, list(final.output)
    while frontier:
        for node in consumers.get(frontier.pop(), ()):
            if node.name not in head:
                head[node.name] = node
                frontier += node.output
    return [f"^{re.escape(name)}$" for name in head]


class _Batches:
    """The calibration data reader Model Optimizer expects (ONNX Runtime's protocol plus get_first/rewind)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return self.batches[0]

    def rewind(self) -> None:
        self._iter = iter(self.batches)


def _modelopt_quantize():
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as error:
        raise MissingDependencyError(f"INT8/FP8 quantization needs NVIDIA Model Optimizer ({error}); "
                                     "install it with: pip install 'mbexport[quant]'") from None
    return quantize
