"""Export: the PyTorch reference to checked ONNX files (fp32, fp16), recorded in the output's manifest."""

from mbexport.export.fp32 import export_onnx

__all__ = ["export_onnx"]
