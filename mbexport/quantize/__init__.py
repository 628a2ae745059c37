"""Explicit INT8/FP8 quantization: Q/DQ nodes in the ONNX, placed the way TensorRT wants them.

TensorRT 11 has no INT8 calibrator and no precision flags: an INT8 or FP8 engine is built from an ONNX
graph that already carries QuantizeLinear/DequantizeLinear pairs. NVIDIA Model Optimizer inserts them
(symmetric per-channel weights, per-tensor activations, Softmax/LayerNorm/Gather left alone, the output
head kept in high precision) after calibrating activation ranges on the CPU with ONNX Runtime.
"""

from mbexport.quantize.calibration import calibration_batches
from mbexport.quantize.qdq import quantize_onnx

__all__ = ["calibration_batches", "quantize_onnx"]
