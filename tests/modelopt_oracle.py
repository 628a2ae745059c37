"""NVIDIA Model Optimizer's own Q/DQ ONNX, the oracle ``mbexport.quantize.qdq`` is checked against.

``model_optimizer_qdq`` runs ``modelopt.onnx.quantization.quantize`` the way mbexport used to (its CPU
calibration in ONNX Runtime, MatMuls only, the task head excluded by name) on a copy of the fp32 file, and
``placement`` reads any Q/DQ file back as {(MatMul name, input index): (is a weight, fp32 scales)}.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from mbexport.export.onnxfile import head_nodes


def model_optimizer_qdq(fp32: Path, out: Path, *, mode: str, calibration: list[dict], method: str = "max") -> Path:
    from modelopt.onnx.quantization import quantize

    graph = onnx.load(str(fp32), load_external_data=False).graph
    head = [f"^{re.escape(graph.node[i].name)}$" for i in head_nodes(graph, fp32)]
    with tempfile.TemporaryDirectory() as tmp:  # Model Optimizer rewrites its input and writes beside it
        source = Path(tmp) / "source.onnx"
        shutil.copyfile(fp32, source)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantize(str(source), quantize_mode=mode, calibration_data_reader=_Batches(calibration),
                     calibration_method=method, calibration_eps=["cpu"], high_precision_dtype="fp32",
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=head, output_path=str(out),
                     log_level="CRITICAL")
    return out


def placement(path: Path) -> dict[tuple[str, int], tuple[bool, np.ndarray]]:
    """{(MatMul node name, input index): (whether it is a weight, its scales as fp32)} of a Q/DQ file."""
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}

    def weight(name: str) -> bool:  # an initializer, possibly through Model Optimizer's QuantizeLinear
        node = producer.get(name)
        return name in inits or (node is not None and node.op_type == "QuantizeLinear" and node.input[0] in inits)

    found = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            if node.op_type == "MatMul" and dq is not None and dq.op_type == "DequantizeLinear":
                found[(node.name, index)] = (weight(dq.input[0]),
                                             numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32))
    return found


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
