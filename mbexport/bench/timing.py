"""Timing one forward pass per backend, so that what is measured is the model and not the plumbing.

Each ``*_timer`` prepares its inputs once (on the GPU for GPU backends) and returns a callable that runs
one inference and returns its latency in milliseconds:

- PyTorch on CUDA: CUDA events around the forward pass, read after the end event completes.
- ONNX Runtime: IO binding with device-resident inputs and outputs (on CUDA a plain ``session.run`` would
  copy them to and from the host every call); ``run_with_iobinding`` synchronizes the stream before it
  returns, so a host clock around it is exact.
- TensorRT: Polygraphy's ``TrtRunner`` fed CUDA tensors with ``copy_outputs_to_host=False``; ``infer``
  synchronizes its stream before returning.
- PyTorch on the CPU: ``perf_counter`` around the call.
"""

from __future__ import annotations

import platform
import time
from typing import Callable, Mapping

import numpy as np

Timer = Callable[[], float]


def measure(run: Timer, warmup: int, iters: int) -> list[float]:
    """Latencies in ms of ``iters`` runs after ``warmup`` untimed ones (allocator, autotuning, caches)."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(iters)]


def summarize(latencies_ms: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "min": float(ms.min()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99)}


def _host_clock(call: Callable[[], object]) -> Timer:
    def run() -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    return run


def torch_timer(model, feed: Mapping[str, np.ndarray], device: str = "cpu") -> Timer:
    """Time ``model(*inputs)`` (any module taking the feed's tensors positionally, in the feed's order)."""
    import torch

    tensors = [torch.from_numpy(array).to(device) for array in feed.values()]

    def forward():
        with torch.inference_mode():
            return model(*tensors)

    if device == "cpu":
        return _host_clock(forward)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record()
        forward()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    return run


def ort_timer(session, feed: Mapping[str, np.ndarray]) -> Timer:
    """Time ``session`` through IO binding: inputs and outputs stay on the provider's device.

    The same code runs on the CPU provider (where it saves only the output allocations), so the CUDA path
    is the one the CPU tests exercise, with the device name swapped.
    """
    import onnxruntime as ort

    device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    binding = session.io_binding()
    inputs = [ort.OrtValue.ortvalue_from_numpy(array, device, 0) for array in feed.values()]
    for name, value in zip(feed, inputs):
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    session.run_with_iobinding(binding)
    # Re-bind the buffers ORT just allocated, so no timed run allocates (the binding shares ownership).
    for output, value in zip(session.get_outputs(), binding.get_outputs()):
        binding.bind_ortvalue_output(output.name, value)
    return _host_clock(lambda: session.run_with_iobinding(binding))


def trt_timer(runner, feed: Mapping[str, np.ndarray]) -> Timer:
    """Time an activated Polygraphy ``TrtRunner`` on CUDA-resident inputs, leaving outputs on the GPU."""
    import torch

    tensors = {name: torch.from_numpy(array).cuda() for name, array in feed.items()}
    torch.cuda.synchronize()
    return _host_clock(lambda: runner.infer(tensors, copy_outputs_to_host=False))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
