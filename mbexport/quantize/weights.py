"""Quantized weights stored quantized: int8 or float8e4m3fn initializers into DequantizeLinear, one byte each.

TensorRT takes pre-quantized weights (INT8 and FP8 constants into DequantizeLinear; its quantization guide,
"Quantized Weights", and onnx-tensorrt's operator matrix) and so does ONNX Runtime: a file whose weights
fed QuantizeLinear at run time would carry them in fp16 and quantize them on every run. Each weight's
QuantizeLinear is computed here once, exactly as the ONNX operator defines it, so no output changes.
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0  # float8e4m3fn's largest finite value: where a saturating QuantizeLinear stops
QMAX = {"int8": 127.0, "fp8": FP8_MAX}  # symmetric scales are amax / QMAX[mode]


def symmetric_scales(amax: np.ndarray, mode: str) -> np.ndarray:
    """fp32 scales that map ``amax`` (per tensor or per channel) to the largest value of ``mode``'s type; 1 where
    amax is 0 (an all-zero channel quantizes to 0 whatever its scale)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / np.float32(QMAX[mode]), np.float32(1)).astype(np.float32)


def quantize_linear(x: np.ndarray, scale: np.ndarray, mode: str, *, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear (opset 19, saturating, zero point 0) of ``x`` as numpy int8 or float8_e4m3fn, ``scale``
    per tensor or per channel along ``axis``.

    ``y = saturate(round(x / y_scale))``: for int8, rounding half to even and saturating to [-128, 127]; for
    float8e4m3fn, saturating to +-448 (infinities too, NaN stays NaN, -0 stays -0), then the cast's rounding to
    nearest even. The quotient is taken in float64, where the quotient of two fp16 or fp32 values never lands
    on the other side of a rounding boundary (or on one) than the exact quotient.
    """
    shape = [1] * x.ndim
    if np.ndim(scale) == 1:  # per channel along axis
        shape[axis] = -1
    q = x.astype(np.float64) / np.asarray(scale, dtype=np.float64).reshape(shape)
    if mode == "int8":
        return np.clip(np.rint(q), -128, 127).astype(np.int8)
    import ml_dtypes

    return np.clip(q, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
