"""How much work one forward pass is, and how much the GPU could do: the two halves of "percent of peak".

FLOPs are counted from the config (two per multiply-add, matmuls only: LayerNorm, GELU, Softmax and the
embedding lookups are memory-bound noise next to them). Peaks are NVIDIA's dense (non-sparse) datasheet
figures for the precision the artifact's math runs in.
"""

from __future__ import annotations

import re

from mbexport.config import MegatronBertConfig
from mbexport.precisions import get_precision
from mbexport.tasks import Task


def model_flops(config: MegatronBertConfig, task: Task, batch: int, sequence: int, num_choices: int = 2) -> int:
    """Matmul FLOPs of one forward pass of ``task`` at ``batch`` x ``sequence``."""
    rows = batch * num_choices if task.has_choices else batch
    h, ffn, s = config.hidden_size, config.intermediate_size, sequence
    tokens = rows * s
    linears = 2 * tokens * (4 * h * h + 2 * h * ffn)  # Q, K, V, output projection; MLP up and down
    attention = 2 * 2 * rows * s * s * h  # Q @ K^T and probabilities @ V, all heads together
    trunk = config.num_hidden_layers * (linears + attention)
    head = sum(2 * (tokens if m.reads == "tokens" else rows) * m.multiply_adds(config) for m in task.weight_modules)
    return trunk + head


# (device-name pattern, {math: dense TFLOP/s (TOPS for int8)}); the first match wins, so the more specific
# names come first. A precision's ``math`` (the precision registry) picks the column; fp32 has none on purpose:
# whether TF32 tensor cores are used depends on the runtime's settings, so no single peak would be honest.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"fp16": 756.0, "int8": 1513.0, "fp8": 1513.0}),
    (r"H100.*NVL", {"fp16": 835.0, "int8": 1671.0, "fp8": 1671.0}),
    (r"H100|H200|GH200", {"fp16": 989.0, "int8": 1979.0, "fp8": 1979.0}),
    (r"A100", {"fp16": 312.0, "int8": 624.0}),
    (r"L40S", {"fp16": 362.0, "int8": 733.0, "fp8": 733.0}),
    (r"\bL4\b", {"fp16": 121.0, "int8": 242.5, "fp8": 242.5}),
    (r"\bA10\b", {"fp16": 125.0, "int8": 250.0}),
    (r"\bT4\b", {"fp16": 65.0, "int8": 130.0}),
)


def dense_peak(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak in TFLOP/s for ``precision``; None when unknown (CPUs, unlisted GPUs, fp32)."""
    math = get_precision(precision).math
    if not device_name or math is None:
        return None
    for pattern, peaks in _PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(math)
    return None
