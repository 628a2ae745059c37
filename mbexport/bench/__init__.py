"""``mbexport bench``: latency, throughput and percent of peak for every artifact in an output folder.

Users choose a deployment by these numbers, so each backend is timed the way it would be served (see
``timing``) and the PyTorch reference is timed beside the artifacts as the baseline. A backend this machine
cannot run is reported as skipped, with the reason, rather than silently left out.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from mbexport.bench.flops import dense_peak, model_flops
from mbexport.bench.report import plot, summary
from mbexport.bench.timing import cpu_name, measure, ort_timer, summarize, torch_timer, trt_timer
from mbexport.config import MegatronBertConfig
from mbexport.engine import gpu_info, tensorrt_available, trt_runner
from mbexport.errors import MbexportError, first_line
from mbexport.fsutil import write_json_atomic
from mbexport.inputs import sample_batch
from mbexport.manifest import Artifact, Manifest, library_versions
from mbexport.precisions import EXPORTED, NAMES, get_precision
from mbexport.runtime import cpu_flags, ort_session
from mbexport.tasks import Task, get_task

__all__ = ["BACKENDS", "Settings", "bench", "default_settings", "dense_peak", "model_flops", "plot", "summary"]

BACKENDS = ("torch", "ort-cpu", "ort-cuda", "trt")
BENCH_JSON, BENCH_PNG = "bench.json", "bench.png"


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...]
    sequences: tuple[int, ...]
    warmup: int
    iters: int


def default_settings(gpu: bool, max_positions: int) -> Settings:
    """The full sweep on a GPU; on a CPU one shape and few runs (a 345M pass takes about half a second)."""
    if gpu:
        sequences = tuple(s for s in (128, 384) if s <= max_positions) or (max_positions,)
        return Settings((1, 8, 32), sequences, warmup=10, iters=100)
    return Settings((1,), (min(128, max_positions),), warmup=2, iters=10)


def bench(root: str | Path, *, task: str | None = None, backends: tuple[str, ...] = BACKENDS,
          batches: tuple[int, ...] | None = None, sequences: tuple[int, ...] | None = None,
          warmup: int | None = None, iters: int | None = None) -> dict:
    """Time every artifact of ``root`` on every backend; write ``bench.json`` and ``bench.png`` there.

    Unset options take ``default_settings`` for this machine. Returns the report written to bench.json.
    """
    manifest = Manifest.load(root)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise MbexportError(f"unknown backend '{unknown[0] if unknown else ''}'; choose from {', '.join(BACKENDS)}")
    gpu = gpu_info()["gpu"]
    gpu = None if gpu == "unknown" else gpu
    defaults = default_settings(gpu is not None, config.max_position_embeddings)
    settings = Settings(tuple(batches or defaults.batches), tuple(sequences or defaults.sequences),
                        defaults.warmup if warmup is None else warmup, defaults.iters if iters is None else iters)
    _check(settings, config, manifest.root)
    tasks = _tasks(manifest, task)
    for artifact in manifest.artifacts:
        if artifact.task in {t.name for t in tasks} and artifact.kind in ("onnx", "engine"):
            manifest.trusted_path(artifact)
    results = [row for t in tasks for backend in backends
               for row in _bench_backend(backend, manifest, t, config, settings, gpu)]
    report = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "cpu_flags": list(cpu_flags()), "gpu": gpu},
        "versions": library_versions(),
        "settings": {**asdict(settings), "backends": list(backends), "tasks": [t.name for t in tasks]},
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                     "intermediate_size", "vocab_size")},
        "results": results,
    }
    report["plot"] = BENCH_PNG if plot(report, manifest.root / BENCH_PNG) else None
    write_json_atomic(manifest.root / BENCH_JSON, report)
    return report


def _check(settings: Settings, config: MegatronBertConfig, root: Path) -> None:
    if not settings.batches or min(settings.batches) < 1:
        raise MbexportError(f"batch sizes must be positive, got {list(settings.batches)}", root)
    if not settings.sequences or min(settings.sequences) < 1:
        raise MbexportError(f"sequence lengths must be positive, got {list(settings.sequences)}", root)
    if max(settings.sequences) > config.max_position_embeddings:
        raise MbexportError(f"sequence {max(settings.sequences)} is longer than the model's "
                            f"{config.max_position_embeddings} positions", root)
    if settings.warmup < 0 or settings.iters < 1:
        raise MbexportError(f"need warmup >= 0 and iters >= 1, got {settings.warmup} and {settings.iters}", root)


def _tasks(manifest: Manifest, name: str | None) -> list[Task]:
    task = get_task(name) if name is not None else None
    present = list(dict.fromkeys(a.task for a in manifest.artifacts if a.kind in ("onnx", "engine")))
    if not present:
        raise MbexportError("the manifest lists no ONNX model or engine to benchmark", manifest.root)
    if task is None:
        return [get_task(t) for t in present]
    if task.name not in present:
        raise MbexportError(f"no '{task.name}' artifacts here (found: {', '.join(present)})", manifest.root)
    return [task]


# A target opens what it times (model, session, engine) inside an ExitStack and returns feed -> timer.
Opener = Callable[[contextlib.ExitStack], Callable[[dict], Callable[[], float]]]


def _bench_backend(backend: str, manifest: Manifest, task: Task, config: MegatronBertConfig, settings: Settings,
                   gpu: str | None) -> list[dict]:
    base = {"task": task.name, "backend": backend}
    try:
        targets = _targets(backend, manifest, task, gpu is not None)
    except _Unavailable as reason:
        return [{**base, "status": "skipped", "reason": str(reason)}]
    rows = []
    for path, precision, label, device, opener, fits in targets:
        where = {**base, "artifact": path, "precision": precision, "label": label, "device": device}
        with contextlib.ExitStack() as stack:
            try:
                make_timer = opener(stack)
            except Exception as error:  # a runtime refusing an artifact is a finding, not a crash
                rows.append({**where, "status": "failed", "reason": first_line(error)})
                continue
            for batch in settings.batches:
                for sequence in settings.sequences:
                    shape = {"batch": batch, "sequence": sequence}
                    if not fits(batch, sequence):
                        rows.append({**where, **shape, "status": "skipped",
                                     "reason": "outside the engine's optimization profiles"})
                        continue
                    feed = sample_batch(task, config, batch, sequence)
                    try:
                        latencies = measure(make_timer(feed), settings.warmup, settings.iters)
                    except Exception as error:
                        rows.append({**where, **shape, "status": "failed", "reason": first_line(error)})
                        continue
                    rows.append({**where, **shape, **_figures(latencies, config, task, batch, sequence,
                                                              gpu if device == "cuda" else None, precision)})
    return rows


def _figures(latencies: list[float], config: MegatronBertConfig, task: Task, batch: int, sequence: int,
             gpu: str | None, precision: str) -> dict:
    latency = summarize(latencies)
    flops = model_flops(config, task, batch, sequence)
    tflops = flops / (latency["p50"] * 1e-3) / 1e12
    peak = dense_peak(gpu, precision)
    return {"status": "ok", "latency_ms": latency, "sequences_per_s": batch * 1e3 / latency["p50"],
            "gflop": flops / 1e9, "tflops_per_s": tflops,
            "percent_of_peak": None if peak is None else 100.0 * tflops / peak}


class _Unavailable(Exception):
    """This backend cannot run here, or has nothing to run; the message says why."""


def _targets(backend: str, manifest: Manifest, task: Task, has_gpu: bool):
    """(artifact, precision, its label, device, opener, fits(batch, sequence)) for everything ``backend`` times."""
    def always(batch, sequence):
        return True

    if backend == "torch":
        source = manifest.source.get("path")
        if not source or not Path(source).exists():
            raise _Unavailable(f"the source checkpoint is not at {source}, so there is no reference to time")
        device = "cuda" if has_gpu and _torch_cuda() else "cpu"
        precisions = ([p for p in NAMES if get_precision(p).torch_dtype] if device == "cuda"
                      else [EXPORTED])  # fp16 matmuls on a CPU are no target
        return [("reference", p, p, device, _torch_opener(manifest, task, device, p), always) for p in precisions]
    if backend in ("ort-cpu", "ort-cuda"):
        device = backend.removeprefix("ort-")
        if device == "cuda" and not _ort_cuda():
            raise _Unavailable("ONNX Runtime has no CUDA provider here (needs onnxruntime-gpu and a GPU)")
        artifacts = manifest.find(task=task.name, kind="onnx")
        if not artifacts:
            raise _Unavailable("no ONNX artifact for this task")
        return [(a.path, a.precision, a.label, device, _ort_opener(manifest, a, device), always) for a in artifacts]
    if not tensorrt_available():  # trt
        raise _Unavailable("TensorRT is not installed (pip install tensorrt-cu12, on a GPU machine)")
    engines = manifest.find(task=task.name, kind="engine")
    if not engines:
        raise _Unavailable("no TensorRT engine in the manifest (mbexport build)")
    return [(a.path, a.precision, a.label, "cuda", _trt_opener(manifest, a), _profile_check(a)) for a in engines]


def _torch_opener(manifest: Manifest, task: Task, device: str, precision: str) -> Opener:
    def open_(stack):
        import torch

        from mbexport.validate import load_reference

        model = load_reference(manifest, task, streamed=False)  # moved to the device and cast: held whole
        model.export_form = False  # scaled_dot_product_attention and F.gelu: PyTorch's fast path
        model.to(device=device, dtype=getattr(torch, get_precision(precision).torch_dtype))
        return lambda feed: torch_timer(model, feed, device)
    return open_


def _ort_opener(manifest: Manifest, artifact: Artifact, device: str) -> Opener:
    def open_(stack):
        session = ort_session(manifest.path_of(artifact), device, shaped_for=artifact.runtime)
        if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise MbexportError("ONNX Runtime fell back to the CPU: its CUDA provider could not load",
                                artifact.path)
        return lambda feed: ort_timer(session, feed)
    return open_


def _trt_opener(manifest: Manifest, artifact: Artifact) -> Opener:
    def open_(stack):
        runner = stack.enter_context(trt_runner(manifest.path_of(artifact)))
        return lambda feed: trt_timer(runner, feed)
    return open_


def _profile_check(artifact: Artifact):
    """Whether a shape lies inside one of the engine's optimization profiles (as the manifest records them)."""
    profiles = artifact.details.get("profiles") or []

    def fits(batch: int, sequence: int) -> bool:
        return not profiles or any(p["batch"][0] <= batch <= p["batch"][2]
                                   and p["sequence"][0] <= sequence <= p["sequence"][2] for p in profiles)
    return fits


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_cuda() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu finds the CUDA/cuDNN libraries of pip wheels this way
        ort.preload_dlls()
    return True
