"""``mbexport validate``: every artifact in an output folder against the PyTorch reference, via Polygraphy.

The reference runs once per task (a ``TorchRunner``), then each artifact alone (ONNX Runtime, or TensorRT
when installed) on the same seeded feeds through Polygraphy's ``Comparator.run``, so one artifact that
cannot even load fails on its own and only one model is in memory beside the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError, ValidationFailed, first_line
from mbexport.inputs import sample_batch
from mbexport.manifest import RUNNABLE, Artifact, Manifest, external_data_name
from mbexport.precisions import get_precision
from mbexport.runtime import ort_session, providers
from mbexport.tasks import Task, get_task
from mbexport.validate.checks import Check, compare, tolerances_for
from mbexport.validate.reference import TorchRunner, load_reference
from mbexport.validate.report import ArtifactResult, Report

# (batch, sequence, all-padding last row): batch 1 and larger, short and long, padding everywhere but row 0.
# The 16-row batch gives row-level heads (classification, NSP) enough rows that one flipped near-tie on a
# random head cannot decide agreement alone.
SHAPES = ((1, 16, False), (4, 48, True), (2, 128, False), (16, 32, False))
NUM_CHOICES = 2


def validate(out_dir: str | Path, *, device: str = "cpu", tasks=None, precisions=None,
             tolerances: dict | None = None) -> Report:
    """Check every artifact (or those of ``tasks``/``precisions``), write validation.json/.md, return the report.

    Raises ValidationFailed (exit 1), with the report as ``.report``, when any check fails.
    """
    manifest = Manifest.load(out_dir)
    used = ", ".join(providers(device))  # an unknown device is bad input: refuse it before any work
    selected = _select(manifest, tasks, precisions)
    runnable = [a for a in selected if a.kind in RUNNABLE]
    if not runnable:
        raise MbexportError("nothing to validate: no ONNX or engine artifact in the manifest"
                            + (" matches --task/--precision" if tasks or precisions else ""), manifest.root)
    for a in runnable:
        tolerances_for(a.precision, a.kind, tolerances)  # bad overrides are bad input: fail before running
    results = []
    for task in dict.fromkeys(a.task for a in runnable):
        results += validate_task(manifest, get_task(task), [a for a in selected if a.task == task],
                                 device=device, tolerances=tolerances)
    if tasks or precisions:  # a partial run keeps the earlier results of files it did not look at
        results += _still_valid(manifest, {r.path for r in results})
    report = Report(manifest.root, used, _shapes(), results)
    report.save()
    if not report.passed:
        failed = [a.path for a in results if not a.passed]
        error = ValidationFailed(f"{len(failed)} artifact(s) failed validation: {', '.join(failed)} "
                                 "(see validation.md)", manifest.root)
        error.report = report
        raise error
    return report


def up_to_date(manifest: Manifest, *, device: str = "cpu", tasks=None, precisions=None,
               tolerances: dict | None = None) -> bool:
    """Whether validation.json already holds a non-failing result, under these tolerances and on this
    device, for every file ``validate`` would check with the same arguments (so it can be skipped)."""
    used_device, previous = _previous(manifest)
    if used_device != ", ".join(providers(device)):
        return False
    for artifact in _select(manifest, tasks, precisions):
        result = previous.get(artifact.path)
        wanted = tolerances_for(artifact.precision, artifact.kind, tolerances) if artifact.kind in RUNNABLE else {}
        if result is None or result.status == "FAIL" or result.tolerances != wanted:
            return False
    return True


def _select(manifest: Manifest, tasks, precisions) -> list[Artifact]:
    """The artifacts of ``tasks`` at ``precisions`` (None: all), with every non-runnable file they rely on."""
    task_names = {get_task(t).name for t in tasks} if tasks else None
    names = {get_precision(p).name for p in precisions} if precisions else None
    return [a for a in manifest.artifacts
            if (task_names is None or a.task in task_names)
            and (names is None or a.precision in names or a.kind not in RUNNABLE)]


def _previous(manifest: Manifest) -> tuple[str | None, dict[str, ArtifactResult]]:
    """validation.json's device, and its results by path for files that are still as they were validated."""
    try:
        data = json.loads((manifest.root / "validation.json").read_text())
        entries = [ArtifactResult.from_dict(a) for a in data["artifacts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}  # none or unreadable: everything is validated again
    current = {(a.path, a.sha256) for a in manifest.artifacts}
    return data.get("device"), {e.path: e for e in entries if (e.path, e.sha256) in current}


def _still_valid(manifest: Manifest, validated: set[str]) -> list[ArtifactResult]:
    return [r for path, r in _previous(manifest)[1].items() if path not in validated]


def validate_artifact(manifest: Manifest, artifact: Artifact, *, device: str = "cpu",
                      tolerances: dict | None = None) -> ArtifactResult:
    """One artifact's result (for callers that cache per artifact); writes no report."""
    task = get_task(artifact.task)
    weights = manifest.find(task.name, kind="weights")
    return validate_task(manifest, task, [*weights, artifact], device=device, tolerances=tolerances)[-1]


def validate_task(manifest: Manifest, task: Task, artifacts: list[Artifact], *, device: str = "cpu",
                  tolerances: dict | None = None) -> list[ArtifactResult]:
    """Results for ``artifacts`` of one task: integrity for all, numbers for ONNX files and engines."""
    from polygraphy.logger import G_LOGGER

    results = [_integrity(manifest, a, tolerances) for a in artifacts]
    broken_weights = [r for r in results if r.kind == "weights" and not r.passed]
    candidates = [r for r in results if r.kind in RUNNABLE and r.passed]
    if not candidates:
        return results
    if broken_weights:
        for r in candidates:
            r.checks.append(Check("-", "reference", False, {"problem": f"{broken_weights[0].path} changed"}))
        return results
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    vocab = next((manifest.path_of(a) for a in manifest.find(kind="vocab") if manifest.verify(a) is None), None)
    fit = _fitter(config, [a for a in artifacts if a.kind == "engine"])
    feeds = [sample_batch(task, config, fit("batch", batch), fit("sequence", sequence), seed=i,
                          num_choices=fit("num_choices", NUM_CHOICES), vocab=vocab, all_padding_row=padding)
             for i, (batch, sequence, padding) in enumerate(SHAPES)]
    shapes = [{name: list(array.shape) for name, array in feed.items()} for feed in feeds]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        # The reference's outputs first; the model (and the checkpoint it streams from) is freed on return,
        # before any artifact is loaded, so the two are never in memory together.
        reference = _run(TorchRunner(load_reference(manifest, task)), feeds)
        for result in candidates:
            artifact = next(a for a in artifacts if a.path == result.path)
            runner, skipped = _runner(manifest, artifact, device)
            if skipped:
                result.skipped = skipped
                continue
            try:
                outputs = _run(runner, feeds)
            except Exception as error:  # ONNX Runtime/TensorRT refusing the file is a failed artifact
                result.checks.append(Check("-", "run", False, {"problem": first_line(error)}))
                continue
            result.checks += compare(task, feeds, reference, outputs, result.tolerances)
            result.inputs = shapes
    return results


def _fitter(config: MegatronBertConfig, engines: list[Artifact]):
    """Clamp a dim to the position limit and to every engine's first optimization profile."""
    limits = {"sequence": (1, config.max_position_embeddings)}
    for engine in engines:
        for dim, (low, _, high) in (engine.details.get("profiles") or [{}])[0].items():
            old_low, old_high = limits.get(dim, (1, high))
            limits[dim] = (max(low, old_low), min(high, old_high))

    def fit(dim: str, value: int) -> int:
        low, high = limits.get(dim, (1, value))
        return min(max(value, low), high)

    return fit


def _integrity(manifest: Manifest, artifact: Artifact, overrides: dict | None) -> ArtifactResult:
    result = ArtifactResult(artifact.task, artifact.precision, artifact.kind, artifact.path, artifact.sha256)
    if artifact.kind in RUNNABLE:
        result.tolerances = tolerances_for(artifact.precision, artifact.kind, overrides)
    problem = manifest.verify(artifact)  # the file, and its external data when the manifest records one
    if problem is None and artifact.kind == "onnx" and "external_data" not in artifact.details:
        stray = manifest.path_of(artifact).parent / external_data_name(artifact.path)
        if stray.exists() and _references_external_data(manifest.path_of(artifact)):
            problem = "refers to external data the manifest does not record"
    result.checks.append(Check("-", "integrity", problem is None, {"problem": problem} if problem else {}))
    return result


def _references_external_data(path: Path) -> bool:
    from mbexport.export.onnxfile import read_weightless

    return any(weight.external for weight in read_weightless(path)[1])


def _runner(manifest: Manifest, artifact: Artifact, device: str):
    """(runner, None), or (None, why it cannot run here)."""
    path = manifest.path_of(artifact)
    if artifact.kind == "engine":
        from mbexport.engine import tensorrt_available, trt_runner

        if not tensorrt_available():
            return None, "TensorRT is not installed here"
        runner = trt_runner(path)
        runner.name = artifact.path
        return runner, None
    from polygraphy.backend.onnxrt import OnnxrtRunner

    return OnnxrtRunner(lambda: ort_session(path, device, shaped_for=artifact.runtime, lean=True),
                        name=artifact.path), None


def _run(runner, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    from polygraphy.comparator import Comparator

    results = Comparator.run([runner], data_loader=feeds)
    return [{name: np.asarray(iteration[name]) for name in iteration.keys()} for iteration in results[runner.name]]


def _shapes() -> list[dict]:
    return [{"batch": b, "sequence": s, "all_padding_row": p} for b, s, p in SHAPES]
