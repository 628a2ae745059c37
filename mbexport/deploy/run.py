"""``mbexport run``: text in, answer out, locally: the twin of the Triton ensemble.

Tokenize with the artifacts' vocab, run one artifact on the best backend available here (a TensorRT engine,
else ONNX Runtime, else the PyTorch reference), and postprocess with the same code Triton's Python models use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.deploy.pipeline import TextPipeline, text_task
from mbexport.engine import tensorrt_available, trt_runner
from mbexport.errors import MbexportError
from mbexport.manifest import Artifact, Manifest
from mbexport.runtime import ort_session
from mbexport.tasks import Task, get_task

BACKENDS = ("tensorrt", "onnxruntime", "pytorch")
# Which precision a backend prefers when several were built: fp16 is TensorRT's usual pick; on the CPU fp32
# is both the fastest and the exact one.
PREFERENCE = {"tensorrt": ("fp16", "fp8", "int8", "fp32"), "onnxruntime": ("fp32", "fp16", "int8", "fp8")}


def answer(artifacts: str | Path, task: str, texts: Mapping[str, str], *, backend: str = "auto",
           precision: str | None = None, vocab: str | Path | None = None, top_k: int = 5, device: str = "cpu") -> dict:
    """The answer for one example, plus which backend and artifact produced it."""
    manifest = Manifest.load(artifacts)
    task = get_task(task)
    text_task(task)  # fail before loading anything for heads without a text pipeline
    runner, used, artifact = _backend(manifest, task, backend, precision, device)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    # An engine only accepts sequences inside its profiles: pad to the longest one, as Triton's tokenizer does.
    max_length = (max(p["sequence"][2] for p in artifact.details["profiles"]) if used == "tensorrt"
                  else min(512, config.max_position_embeddings))
    pipeline = TextPipeline.for_artifacts(manifest, task, vocab=vocab, max_length=max_length, top_k=top_k)
    feed = pipeline.encode({field: [text] for field, text in texts.items()}, pad_to_max=used == "tensorrt")
    with runner:
        outputs = {name: np.asarray(value) for name, value in runner.infer(feed).items()}
    result = pipeline.answers(feed, outputs)[0]
    return {"task": task.name, "backend": used, "precision": artifact.precision if artifact else "fp32",
            "artifact": artifact.path if artifact else None, **result}


def _backend(manifest: Manifest, task: Task, backend: str, precision: str | None, device: str
             ) -> tuple[object, str, Artifact | None]:
    """A Polygraphy runner for the first usable backend, its name, and the artifact it runs."""
    if backend not in ("auto", *BACKENDS):
        raise MbexportError(f"unknown backend '{backend}' (choose auto, {', '.join(BACKENDS)})")
    candidates = BACKENDS if backend == "auto" else (backend,)
    reasons = []
    for name in candidates:
        if name == "pytorch":
            from mbexport.validate import TorchRunner, load_reference  # on demand: brings the checkpoint readers

            try:
                return TorchRunner(load_reference(manifest, task)), name, None
            except MbexportError as error:
                reasons.append(f"PyTorch reference: {error}")
                continue
        kind = "engine" if name == "tensorrt" else "onnx"
        if name == "tensorrt" and not tensorrt_available():
            reasons.append("TensorRT is not installed")
            continue
        found = _pick(manifest, task, kind, precision, PREFERENCE[name])
        if found is None:
            reasons.append(f"no {kind}{f' {precision}' if precision else ''} artifact for {task.name}")
            continue
        path = manifest.trusted_path(found)
        if name == "tensorrt":
            return trt_runner(path), name, found
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(lambda: ort_session(path, device)), name, found
    raise MbexportError(f"no backend can run '{task.name}' ({'; '.join(reasons)})", manifest.root)


def _pick(manifest: Manifest, task: Task, kind: str, precision: str | None, order: tuple[str, ...]
          ) -> Artifact | None:
    found = {a.precision: a for a in manifest.find(task=task.name, kind=kind)}
    if precision is not None:
        return found.get(precision)
    return next((found[p] for p in order if p in found), None)
