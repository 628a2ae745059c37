"""Export: the PyTorch reference to checked ONNX files (fp32, fp16), recorded in the output's manifest."""

from mbexport.export.fp16 import convert_fp16
from mbexport.export.fp32 import export_onnx
from mbexport.export.folder import export, source_sha256

__all__ = ["convert_fp16", "export", "export_onnx", "source_sha256"]
