"""``mbexport build``: checkpoint -> reference -> fp32 ONNX -> precision -> TensorRT engine -> validation.

Every stage's output is cached by content: its manifest entry records a key, the sha256 of everything the
stage read (the checkpoint's or upstream artifact's sha256, the stage's parameters, mbexport's version). A
stage is skipped when the recorded key matches and the file still hashes to its recorded sha256, so a re-run
with nothing changed does no work and a changed parameter redoes only the stages downstream of it. Files are
written atomically and recorded only once complete, so an interrupted build leaves nothing a later run trusts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import mbexport
from mbexport import engine
from mbexport.config import MegatronBertConfig
from mbexport.deploy.triton import REQUESTED
from mbexport.errors import CheckpointError, MbexportError, ValidationFailed, own_warning
from mbexport.export import export, source_sha256
from mbexport.fsutil import output_folder, sha256_file
from mbexport.manifest import MANIFEST, Artifact, Manifest
from mbexport.precisions import EXPORTED, OPSET, PRECISIONS, get_precision
from mbexport.quantize import calibration_batches
from mbexport.recipes import Recipe
from mbexport.runtime import providers
from mbexport.tasks import Task, get_task
from mbexport.text import load_tokenizer, read_lines
from mbexport.validate import Report, tolerances_for, up_to_date, validate

Busy = Callable[[str, str], ContextManager]  # (stage, what it is doing) -> context around the stage's work


@dataclass
class BuildResult:
    out_dir: Path
    target: str
    steps: list[tuple[str, str]] = field(default_factory=list)  # (stage, "built in 1.2 s" | "cached")
    report: Report | None = None  # None when validation was cached

    @property
    def built(self) -> list[str]:
        return [stage for stage, status in self.steps if status != "cached"]


def build(source: str | Path, recipe: Recipe, *, out_dir: str | Path | None = None, vocab: str | Path | None = None,
          init_missing_head: int | None = None, device: str = "cpu", overwrite: bool = False,
          log: Callable[[str], None] = lambda line: None, busy: Busy = lambda stage, doing: contextlib.nullcontext(),
          ) -> BuildResult:
    """Run the pipeline for ``recipe`` on the checkpoint at ``source``; only stale stages do work.

    ``out_dir`` follows fsutil's overwrite rule (an mbexport output folder is updated in place; any other
    non-empty folder needs ``overwrite``, which replaces it) and is locked while the build runs. ``log`` gets
    one line per finished stage; ``busy(stage, what it is doing)`` wraps each stage's work (a live display).
    """
    source = Path(source).resolve()
    if not source.exists():
        raise CheckpointError("no such file or directory", source)
    task, precision = get_task(recipe.task), get_precision(recipe.precision)
    try:  # bad tolerances are bad input: say so before the export, not after
        tolerances_for(recipe.precision, "onnx", recipe.tolerances)
    except MbexportError as error:
        raise MbexportError(str(error), recipe.path) from None
    providers(device)  # validation's device: an unknown one, or CUDA without onnxruntime-gpu, fails before the export
    target = recipe.target or ("engine" if engine.tensorrt_available() else "onnx")
    if target == "engine":
        engine.require_tensorrt()  # fail before any work, not after the export
    text = recipe.calibration.text if precision.calibrated else None
    if vocab is not None:
        load_tokenizer(vocab)  # a missing or binary vocab fails here, before any work
    if text is not None:
        read_lines(text)
    out_dir = Path(out_dir or recipe.out.format(checkpoint=source.stem if source.is_file() else source.name))
    with output_folder(out_dir, overwrite=overwrite, sources=(source, vocab, text), marker=MANIFEST,
                       keep_on=(ValidationFailed,), log=log):
        manifest = Manifest.load(out_dir) if (out_dir / MANIFEST).is_file() else Manifest(out_dir)
        if vocab is None:  # copied by an earlier build: same key, no re-export
            vocab = next((manifest.path_of(a) for a in manifest.find(kind="vocab") if manifest.verify(a) is None),
                         None)
        if text is not None and vocab is None:
            raise MbexportError("calibration text needs --vocab to tokenize it", text)
        run = _Run(manifest, BuildResult(out_dir, target), log, busy)
        run.total = 2 + (precision.transform is not None) + (target == "engine")
        exported = PRECISIONS[EXPORTED]

        def make_fp32(path: Path) -> dict:
            run.manifest = export(source, task, out_dir, init_missing_head=init_missing_head, vocab=vocab,
                                  opset=OPSET)
            return run.manifest.find(task.name, EXPORTED, "onnx")[0].details

        fp32 = run.stage(f"{exported.step} {task.name} {EXPORTED}", exported.doing, task, EXPORTED, "onnx",
                         _key("export", source_sha256(source), task.name, OPSET, init_missing_head,
                              sha256_file(vocab) if vocab else None), make_fp32)
        config = MegatronBertConfig.from_hf_dict(run.manifest.config)
        recipe, notes = recipe.fit_positions(config.max_position_embeddings)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        onnx = fp32 if precision.transform is None else _precision(run, task, config, fp32, recipe, vocab)
        final = _engine(run, task, config, onnx, recipe) if target == "engine" else onnx
        _validate(run, task, recipe, device)
        if not final.details.get(REQUESTED):  # what this build was for: `mbexport triton` deploys it, not its fp32
            final.details[REQUESTED] = True
            run.manifest.save()
    return run.result


def _key(*parts) -> str:
    text = json.dumps([mbexport.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _Run:
    """One build's manifest and log; ``stage`` is the cache check around every artifact."""

    def __init__(self, manifest: Manifest, result: BuildResult, log: Callable[[str], None],
                 busy: Busy = lambda stage, doing: contextlib.nullcontext()):
        self.manifest, self.result, self.log, self.busy = manifest, result, log, busy
        self.total = 0  # stages this build runs (for "step 2/4")

    def stage(self, name: str, doing: str, task: Task, precision: str, kind: str, key: str,
              make: Callable[[Path], dict], upstream: Artifact | None = None) -> Artifact:
        path = self.manifest.root / task.name / get_precision(precision).file_name(kind)
        for artifact in self.manifest.find(task.name, precision, kind):
            if artifact.details.get("cache_key") == key and self.manifest.verify(artifact) is None:
                for note in artifact.details.get("warnings", []):  # what this stage said when it ran
                    warnings.warn(note, stacklevel=2)
                self.note(name, "cached")
                return artifact
        start = time.perf_counter()
        with self.working(name, doing), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            details = make(path)  # writes ``path`` atomically
        for warning in caught:  # shown now and recorded, so a cached re-run says it again
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        notes = [str(w.message) for w in caught if own_warning(w.filename)]
        made_from = {"made_from": {"path": upstream.path, "sha256": upstream.sha256}} if upstream else {}
        artifact = self.manifest.record(task, precision, kind, path, **details, **made_from, cache_key=key,
                                        **({"warnings": notes} if notes else {}))
        self._drop_stale()
        self.manifest.save()
        self.note(name, f"built in {time.perf_counter() - start:.1f} s")
        return artifact

    def working(self, name: str, doing: str):
        return self.busy(f"{name} ({len(self.result.steps) + 1}/{self.total})", doing)

    def _drop_stale(self) -> None:
        """Forget (and delete) artifacts made from a file that has since changed, e.g. the engine of a
        re-quantized int8 ONNX (export itself forgets what was made from an fp32 it replaces)."""
        while True:
            current = {(a.path, a.sha256) for a in self.manifest.artifacts}
            stale = [a for a in self.manifest.artifacts if "made_from" in a.details
                     and (a.details["made_from"]["path"], a.details["made_from"]["sha256"]) not in current]
            if not stale:
                return
            for artifact in stale:
                self.manifest.discard(artifact)
                self.log(f"removed {artifact.path}: made from an earlier {artifact.details['made_from']['path']}")

    def note(self, name: str, status: str) -> None:
        self.result.steps.append((name, status))
        self.log(f"{name}: {status}")


def _precision(run: _Run, task: Task, config: MegatronBertConfig, fp32: Artifact, recipe: Recipe,
               vocab: Path | None) -> Artifact:
    """The recipe's precision made from the fp32 export by its registry transform, calibrated where it needs it."""
    precision, fp32_path = get_precision(recipe.precision), run.manifest.path_of(fp32)
    name = f"{precision.step} {task.name} {precision.name}"
    if not precision.calibrated:
        def make(path: Path) -> dict:
            precision.transform(fp32_path, path)
            return {}

        return run.stage(name, precision.doing, task, precision.name, "onnx", _key(precision.name, fp32.sha256),
                         make, fp32)
    calib = recipe.calibration
    inputs = (sha256_file(calib.text), sha256_file(vocab)) if calib.text is not None else None
    key = _key(precision.step, precision.name, fp32.sha256, inputs, calib.size, calib.method, calib.sequence)

    def make_calibrated(path: Path) -> dict:
        batches = calibration_batches(task, config, text=calib.text, vocab=vocab, size=calib.size,
                                      sequence=calib.sequence)
        precision.transform(fp32_path, path, mode=precision.name, calibration=batches, method=calib.method)
        return {"calibration": {"text": str(calib.text) if calib.text else None, "size": calib.size,
                                "method": calib.method, "sequence": calib.sequence}}

    data = f"{calib.size} lines of {calib.text.name}" if calib.text is not None else f"{calib.size} seeded examples"
    doing = f"calibrating on {data} x {calib.sequence} tokens ({calib.method}), {precision.doing}"
    return run.stage(name, doing, task, precision.name, "onnx", key, make_calibrated, fp32)


def _engine(run: _Run, task: Task, config: MegatronBertConfig, onnx: Artifact, recipe: Recipe) -> Artifact:
    profiles = recipe.profiles or engine.default_profiles(config.max_position_embeddings)
    engine.check_profiles(profiles, task, max_positions=config.max_position_embeddings, source=recipe.path)
    settings = recipe.engine
    if settings.timing_cache:
        settings = dataclasses.replace(settings, timing_cache=str(run.manifest.root / settings.timing_cache))
    key = _key("engine", onnx.sha256, [p.as_dict(task) for p in profiles], settings.builder_optimization_level,
               settings.workspace_mib, engine.environment())
    doing = f"building a TensorRT engine ({len(profiles)} profile(s), level {settings.builder_optimization_level})"
    return run.stage(f"engine {task.name} {onnx.precision}", doing, task, onnx.precision, "engine", key,
                     lambda path: engine.build_engine(run.manifest.path_of(onnx), path, task, profiles,
                                                      precision=onnx.precision, settings=settings,
                                                      root=run.manifest.root), onnx)


def _validate(run: _Run, task: Task, recipe: Recipe, device: str) -> None:
    """Validate what this build made (the task's fp32 and ``recipe.precision`` artifacts) under the recipe's
    tolerances, unless validation.json already passed exactly these files under them.

    Other builds' artifacts in the folder keep the results their own builds recorded (``mbexport validate``
    re-checks everything)."""
    scope = {"device": device, "tasks": [task.name], "precisions": sorted({EXPORTED, recipe.precision}),
             "tolerances": recipe.tolerances or None}
    if up_to_date(run.manifest, **scope):
        run.note("validate", "cached")
        return
    start = time.perf_counter()
    with run.working("validate", f"comparing {task.name} {' and '.join(scope['precisions'])} with the PyTorch "
                     f"reference on ONNX Runtime ({device})"):
        run.result.report = validate(run.manifest.root, **scope)
    run.note("validate", f"done in {time.perf_counter() - start:.1f} s")
