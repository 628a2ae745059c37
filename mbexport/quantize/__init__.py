"""Explicit INT8/FP8 quantization: Q/DQ nodes in the ONNX, placed the way TensorRT wants them.

TensorRT 11 has no INT8 calibrator and no precision flags: an INT8 or FP8 engine is built from an ONNX
graph that already carries QuantizeLinear/DequantizeLinear pairs. ``qdq.py`` inserts them where NVIDIA Model
Optimizer would (symmetric per-channel weights, per-tensor activations, Softmax/LayerNorm/Gather left alone,
the output head kept in high precision), after calibrating activation ranges on the CPU with ONNX Runtime,
one batch and one weight at a time; ``ort.py`` writes INT8 for ONNX Runtime's integer kernels.
"""

from mbexport.quantize.calibration import calibration_batches
from mbexport.quantize.qdq import quantize_onnx

__all__ = ["calibration_batches", "quantize_onnx"]
