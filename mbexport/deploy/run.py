"""``mbexport run``: text in, answer out, locally: the twin of the Triton ensemble.

Tokenize with the artifacts' vocab, run one built artifact (a TensorRT engine when TensorRT is here, else the
ONNX file in ONNX Runtime; the PyTorch reference only when asked for), and postprocess with the same file
Triton's Python models run (``serving.py``). Nothing is substituted: an artifact that was asked for and is
not there is an error naming what is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.deploy.serving import RequestError, TextPipeline
from mbexport.engine import tensorrt_available, trt_runner
from mbexport.errors import MbexportError
from mbexport.manifest import Artifact, Manifest
from mbexport.precisions import EXPORTED, RUNTIMES, get_precision
from mbexport.runtime import ort_session, providers
from mbexport.tasks import TASKS, Task, get_task
from mbexport.text import VOCAB, load_tokenizer

BACKENDS = (*RUNTIMES, "pytorch")  # the runtimes of built artifacts, and the checkpoint's reference
KINDS = {name: runtime.kind for name, runtime in RUNTIMES.items()}
DEFAULT_SEQUENCE = 384  # without an engine's profiles: the default engine profile's max (SQuAD's usual length)
PAD_LENGTHS = (16, 32, 64, 128, 256)  # shorter lengths a padded request may take below the longest
SOURCE = ("task", "backend", "device", "precision", "artifact")  # an answer's fields saying where it came from


def sequence_length(config: MegatronBertConfig, artifact: Artifact | None) -> int:
    """The length texts are truncated to (and padded to, for Triton's batcher and for engines), the same here and
    in Triton: the longest sequence an engine's profiles accept, else min(384, the model's positions)."""
    if artifact is not None and artifact.kind == "engine":
        return max(p["sequence"][2] for p in artifact.details["profiles"])
    return min(DEFAULT_SEQUENCE, config.max_position_embeddings)


def padded_lengths(config: MegatronBertConfig, artifact: Artifact | None) -> list[int]:
    """The lengths a padded request takes (the shortest that holds it): PAD_LENGTHS below the longest sequence
    (for an engine, those inside one of its profiles), and the longest."""
    longest = sequence_length(config, artifact)
    profiles = artifact.details["profiles"] if artifact is not None and artifact.kind == "engine" else None
    return [n for n in PAD_LENGTHS if n < longest and (profiles is None or any(
        p["sequence"][0] <= n <= p["sequence"][2] for p in profiles))] + [longest]


def text_pipeline(manifest: Manifest, task: Task, *, vocab: str | Path | None = None, max_length: int = 128,
                  pad_lengths: Sequence[int] = (), top_k: int = 5) -> tuple[TextPipeline, Path]:
    """The serving pipeline for an output folder's head: its vocab (unless ``vocab`` is given) and its label
    names; and the vocab file it read."""
    _require_text_head(task)
    if vocab is None:
        recorded = manifest.find(kind="vocab")
        vocab = manifest.trusted_path(recorded[0]) if recorded else manifest.root / VOCAB
        if not Path(vocab).is_file():
            raise MbexportError("no vocab.txt in this output folder; pass --vocab FILE (the checkpoint's "
                                "WordPiece vocab)", manifest.root)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    pipeline = TextPipeline(task.serving, load_tokenizer(vocab), labels=labels, max_length=max_length,
                            pad_lengths=pad_lengths, top_k=top_k)
    return pipeline, Path(vocab)


def _require_text_head(task: Task) -> None:
    if task.serving is None:
        supported = ", ".join(t.name for t in TASKS.values() if t.serving)
        raise MbexportError(f"no text-in, answer-out pipeline for '{task.name}' (supported: {supported})")


def answer(artifacts: str | Path, task: str, texts: Mapping[str, str], *, backend: str = "auto",
           precision: str | None = None, vocab: str | Path | None = None, top_k: int = 5, device: str = "cpu") -> dict:
    """The answer for one example, plus which backend and artifact produced it."""
    manifest = Manifest.load(artifacts)
    task = get_task(task)
    precision = get_precision(precision).name if precision is not None else None
    _require_text_head(task)  # before loading anything
    used, artifact = choose(manifest, task, backend, precision)
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    pipeline, _ = text_pipeline(manifest, task, vocab=vocab, max_length=sequence_length(config, artifact),
                                pad_lengths=padded_lengths(config, artifact), top_k=top_k)
    try:  # an engine only accepts sequences inside its profiles: pad as Triton's tokenizer does
        feed = pipeline.encode({field: [text] for field, text in texts.items()}, pad_to_max=used == "tensorrt")
    except RequestError as error:
        raise MbexportError(str(error)) from None
    with _runner(manifest, task, used, artifact, device) as runner:
        outputs = {name: np.asarray(value) for name, value in runner.infer(feed).items()}
    source = (task.name, used, _device(used, device), artifact.precision if artifact else EXPORTED,
              artifact.path if artifact else None)
    return {**dict(zip(SOURCE, source)), **pipeline.answers(feed, outputs)[0]}


def choose(manifest: Manifest, task: Task, backend: str = "auto", precision: str | None = None
           ) -> tuple[str, Artifact | None]:
    """The backend and the built artifact it runs (None for the PyTorch reference), exactly as asked.

    ``auto`` picks a TensorRT engine when TensorRT is installed, else an ONNX file, at ``precision`` or the
    backend's preferred built one. Asking for what was not built is an error that names what was."""
    if backend not in ("auto", *BACKENDS):
        raise MbexportError(f"unknown backend '{backend}' (choose auto, {', '.join(BACKENDS)})")
    if backend == "pytorch":
        if precision not in (None, EXPORTED):
            raise MbexportError(f"the PyTorch reference runs {EXPORTED} only, not {precision}")
        return backend, None
    built = [a for a in manifest.artifacts if a.kind in KINDS.values()]
    if not any(a.task == task.name for a in built):
        raise MbexportError(f"{task.name} was not built here (built: {describe(built) or 'nothing'}); build it, "
                            f"or pass --backend pytorch to answer from the checkpoint's reference", manifest.root)
    own = [a for a in built if a.task == task.name]
    if precision is not None and not any(a.precision == precision for a in own):
        raise MbexportError(f"no {precision} artifact for {task.name} (built: {describe(own)})", manifest.root)
    reasons = []
    for name in ("tensorrt", "onnxruntime") if backend == "auto" else (backend,):
        if name == "tensorrt" and not tensorrt_available():
            reasons.append("TensorRT is not installed")
            continue
        found = {a.precision: a for a in own if a.kind == KINDS[name]}
        preferred = (precision,) if precision else RUNTIMES[name].preference
        pick = next((found[p] for p in preferred if p in found), None)
        if pick is not None:
            return name, pick
        reasons.append(f"no {KINDS[name]}{f' {precision}' if precision else ''} artifact (built: {describe(own)})")
    raise MbexportError(f"cannot run {task.name} with --backend {backend}: {'; '.join(reasons)}", manifest.root)


def _device(backend: str, device: str) -> str:
    """Where the backend runs: TensorRT on the GPU, the reference on the CPU, ONNX Runtime where --device put it."""
    if backend == "onnxruntime":
        return "cuda" if providers(device)[0] == "CUDAExecutionProvider" else "cpu"
    return "cuda" if backend == "tensorrt" else "cpu"


def describe(artifacts: list[Artifact]) -> str:
    """What was built, grouped by head and kind: ``question-answering fp32, int8 (onnx)``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for a in artifacts:
        groups.setdefault((a.task, a.kind), []).append(a.precision)
    return "; ".join(f"{task} {', '.join(sorted(precisions))} ({kind})"
                     for (task, kind), precisions in sorted(groups.items()))


def _runner(manifest: Manifest, task: Task, backend: str, artifact: Artifact | None, device: str):
    """A Polygraphy runner for the chosen backend."""
    if backend == "pytorch":
        from mbexport.validate import TorchRunner, load_reference  # on demand: brings the checkpoint readers

        return TorchRunner(load_reference(manifest, task))
    path = manifest.trusted_path(artifact)
    if backend == "tensorrt":
        return trt_runner(path)
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: ort_session(path, device))


def summary(answer: dict) -> str:
    """One human line for an answer (``mbexport run`` without ``--json``)."""
    if "answer" in answer:
        return f"{answer['answer']!r} (score {answer['score']:.3f})"
    if "label" in answer:
        return f"{answer['label']} (score {answer['score']:.3f})"
    if "masks" in answer:
        tops = ", ".join("/".join(c["token"] for c in m["candidates"][:3]) for m in answer["masks"])
        return f"{answer['text']!r} [{tops}]"
    return " ".join(f"{t['token']}/{t['label']}" for t in answer["tokens"])
