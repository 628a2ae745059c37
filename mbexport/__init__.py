"""mbexport: Megatron-BERT checkpoints to validated ONNX, TensorRT and Triton artifacts."""

__version__ = "0.1.0"
