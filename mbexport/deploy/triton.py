"""``mbexport triton``: a Triton model repository that starts as is, with text in and answers out.

For each deployed head and precision ``<task>-<precision>`` it writes the inference model (the TensorRT
engine, or the ONNX file when no engine was built; a file shaped for ONNX Runtime is ``<task>-<precision>-ort``,
which Triton's ONNX Runtime backend runs on the kernels validation ran it on) and, for heads that take text, a
Python tokenizer, a Python postprocessor and an ensemble ``<task>-<precision>-text`` wiring the three. The
Python models are ``serving.py`` itself (numpy and ``tokenizers`` only), the code ``mbexport run`` answers
with. Names, dtypes and ranks come from the artifact itself (the ONNX graph's IO) and the task registry; batch
and sequence limits from the engine's optimization profiles. By default a head deploys what its builds were
asked for (``build`` marks it), not the fp32 export they started from. The repository is written in a
temporary folder, given the modes the user's umask gives new files (a server running as another user must
read it), and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.deploy import serving
from mbexport.deploy.run import describe, padded_lengths, sequence_length, text_pipeline
from mbexport.errors import MbexportError
from mbexport.fsutil import atomic_dir, check_output
from mbexport.inputs import sample_batch
from mbexport.manifest import Artifact, Manifest
from mbexport.precisions import get_precision
from mbexport.tasks import Task, get_task

REQUESTED = "requested"  # artifact detail `build` sets on what it was asked for: deployed by default
# Instance kinds: auto lets Triton put an ONNX model on every GPU it finds and on the CPU where there is none.
DEVICES = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MARKER = ".mbexport-triton.json"  # says a folder is ours to replace
DEFAULT_MAX_BATCH = 32  # ONNX models have no profile to take it from; the default engine profile's max
QUEUE_DELAY_US = 100
TRITON_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "float16": "TYPE_FP16",
                "bfloat16": "TYPE_BF16", "bool": "TYPE_BOOL", "string": "TYPE_STRING"}
ANSWER = "answer"  # the ensemble's output: one JSON document per row, as `mbexport run --json` prints


class Enum(str):
    """A protobuf enum value: written bare in text format."""


def write_repository(artifacts: str | Path, repo: str | Path, *, tasks: list[str] | None = None,
                     precisions: list[str] | None = None, max_batch: int | None = None, instances: int = 1,
                     vocab: str | Path | None = None, device: str = "auto", overwrite: bool = False) -> list[str]:
    """Write (or replace) the model repository ``repo``; returns the model names in it."""
    manifest = Manifest.load(artifacts)
    repo = Path(repo)
    check_output(repo, overwrite=overwrite, sources=(manifest.root,), marker=MARKER)  # before any work
    if instances < 1 or (max_batch is not None and max_batch < 1):
        raise MbexportError("--instances and --max-batch must be at least 1")
    if device not in DEVICES:
        raise MbexportError(f"unknown device '{device}' (choose {', '.join(DEVICES)})")
    heads = _heads(manifest, tasks, precisions)
    for task, artifact in heads:
        if artifact.kind == "engine" and device == "cpu":
            raise MbexportError(f"{task.name} {artifact.precision} is a TensorRT plan, which runs on a GPU only; "
                                f"use --device gpu or auto", manifest.path_of(artifact))
    config = MegatronBertConfig.from_hf_dict(manifest.config)
    names: list[str] = []
    with atomic_dir(repo, overwrite=overwrite, sources=(manifest.root,), marker=MARKER) as tmp:
        for task, artifact in heads:
            head = _Head(manifest, config, task, artifact, max_batch, instances, device)
            text = (text_pipeline(manifest, task, vocab=vocab, max_length=head.sequence,
                                  pad_lengths=padded_lengths(config, artifact))
                    if task.serving else None)
            names += head.write(tmp, text)
        (tmp / MARKER).write_text(json.dumps({"artifacts": str(manifest.root.resolve()), "models": names}, indent=2))
    return names


def _heads(manifest: Manifest, tasks: list[str] | None, precisions: list[str] | None) -> list[tuple[Task, Artifact]]:
    """One (task, artifact) per deployed head, precision and the runtime its file is shaped for: the engine when
    there is one, else the ONNX file.

    Without ``precisions``, a head deploys the artifacts its builds were asked for, or everything it has when
    none was (a folder that was only exported)."""
    wanted = {get_task(t).name for t in tasks} if tasks else None
    built = [a for kind in ("onnx", "engine") for a in manifest.find(kind=kind) if wanted is None or a.task in wanted]
    if precisions:
        names = {get_precision(p).name for p in precisions}
        selected = [a for a in built if a.precision in names]
    else:
        requested = {a.task for a in built if a.details.get(REQUESTED)}
        selected = [a for a in built if a.task not in requested or a.details.get(REQUESTED)]
    chosen: dict[tuple[str, str, str], Artifact] = {}
    for artifact in selected:  # engines (listed last) replace the ONNX files they were built from
        chosen[(artifact.task, artifact.precision, artifact.runtime)] = artifact
    if not chosen:
        raise MbexportError(f"no ONNX model or engine matches --task/--precision (built: "
                            f"{describe(manifest.find(kind='onnx') + manifest.find(kind='engine')) or 'nothing'})",
                            manifest.root)
    return [(get_task(key[0]), chosen[key]) for key in sorted(chosen)]


class _Head:
    """The models of one head and precision: inference, and the text ensemble when the head has one."""

    def __init__(self, manifest: Manifest, config: MegatronBertConfig, task: Task, artifact: Artifact,
                 max_batch: int | None, instances: int, device: str):
        self.manifest, self.config, self.task, self.artifact = manifest, config, task, artifact
        self.name = f"{task.name}-{artifact.label}"
        self.instances = instances
        self.engine = artifact.kind == "engine"
        self.kind = "KIND_GPU" if self.engine else DEVICES[device]
        self.dtypes = self._dtypes()
        profiles = (artifact.details.get("profiles") or []) if self.engine else []
        if self.engine and not profiles:
            raise MbexportError(f"{artifact.path}: the manifest records no optimization profiles", manifest.root)
        limit = min(p["batch"][2] for p in profiles) if profiles else None
        if limit is not None and max_batch is not None and max_batch > limit:
            raise MbexportError(f"--max-batch {max_batch} exceeds the engine's profile max batch {limit}",
                                manifest.path_of(artifact))
        self.max_batch = max_batch or limit or DEFAULT_MAX_BATCH
        opt_batch = min(p["batch"][1] for p in profiles) if profiles else max(1, self.max_batch // 4)
        self.preferred = sorted({min(opt_batch, self.max_batch), self.max_batch})
        self.profiles = len(profiles)
        # Requests are padded to a few lengths, so the dynamic batcher can stack requests of similar length.
        self.sequence = sequence_length(config, artifact)
        self.choices = max(p["num_choices"][1] for p in profiles) if profiles and task.has_choices else 2

    def write(self, repo: Path, text: tuple[serving.TextPipeline, Path] | None) -> list[str]:
        """The inference model, and with ``text`` (the head's pipeline and vocab file) its text ensemble."""
        self._write_inference(repo / self.name, text[1] if text else None)
        if text is None:
            return [self.name]
        spec = text[0].head
        inputs = [_tensor(f, "string", [1]) for f in spec.fields]
        encoded = [_tensor(s.name, self.dtypes[s.name], self._dims(s)) for s in self.task.inputs]
        outputs = [_tensor(s.name, self.dtypes[s.name], self._dims(s)) for s in self.task.outputs]
        needed = [t for t in encoded if t["name"] in spec.needs]
        answer = [_tensor(ANSWER, "string", [1])]
        tokenizer, postprocess, ensemble = (f"{self.name}-{suffix}" for suffix in ("tokenizer", "postprocess", "text"))
        self._write_python(repo / tokenizer, "tokenizer", inputs, encoded, text)
        self._write_python(repo / postprocess, "postprocess", outputs + needed, answer, text)
        steps = [(tokenizer, inputs, encoded), (self.name, encoded, outputs), (postprocess, outputs + needed, answer)]
        _write_config(repo / ensemble, {
            "name": ensemble, "platform": "ensemble", "max_batch_size": self.max_batch,
            "input": inputs, "output": answer,
            "ensemble_scheduling": {"step": [
                {"model_name": model, "model_version": -1,
                 "input_map": [{"key": t["name"], "value": t["name"]} for t in ins],
                 "output_map": [{"key": t["name"], "value": t["name"]} for t in outs]}
                for model, ins, outs in steps]},
        })
        (repo / ensemble / "1").mkdir()  # Triton wants a version folder even for an ensemble
        return [self.name, tokenizer, postprocess, ensemble]

    def _write_inference(self, folder: Path, vocab: Path | None) -> None:
        source = self.manifest.trusted_path(self.artifact)  # hashes checked, external data included
        (folder / "1").mkdir(parents=True)
        shutil.copyfile(source, folder / "1" / ("model.plan" if self.engine else "model.onnx"))
        data = self.manifest.external_data_of(self.artifact)  # checked: a bare name beside the model
        if data is not None:  # the graph refers to its data file by this bare name, beside it
            shutil.copyfile(data, folder / "1" / data.name)
        inputs = [_tensor(s.name, self.dtypes[s.name], self._dims(s)) for s in self.task.inputs]
        warmup = self._write_warmup(folder / "warmup", vocab)
        group = {"count": self.instances, "kind": Enum(self.kind)}
        if self.profiles > 1:  # otherwise Triton uses only the first profile
            group["profile"] = [str(i) for i in range(self.profiles)]
        _write_config(folder, {
            "name": self.name, "platform": "tensorrt_plan" if self.engine else "onnxruntime_onnx",
            "max_batch_size": self.max_batch,
            "input": inputs,
            "output": [_tensor(s.name, self.dtypes[s.name], self._dims(s)) for s in self.task.outputs],
            "instance_group": [group],
            "dynamic_batching": {"preferred_batch_size": self.preferred,
                                 "max_queue_delay_microseconds": QUEUE_DELAY_US},
            "model_warmup": [
                {"name": f"{self.name}-batch-{batch}", "batch_size": batch,
                 "inputs": [{"key": t["name"], "value": {"data_type": t["data_type"], "dims": list(shape),
                                                          "input_data_file": file}}
                            for t, (file, shape) in zip(inputs, warmup)]}
                for batch in sorted({1, self.max_batch})],
        })

    def _write_warmup(self, folder: Path, vocab: Path | None) -> list[tuple[str, tuple[int, ...]]]:
        """One realistic example row per input as raw row-major bytes (Triton repeats it to the batch size)."""
        folder.mkdir()
        feed = sample_batch(self.task, self.config, 1, self.sequence, num_choices=self.choices, vocab=vocab)
        files = []
        for spec in self.task.inputs:
            row = feed[spec.name][0].astype(self.dtypes[spec.name])
            (folder / spec.name).write_bytes(row.tobytes())
            files.append((spec.name, row.shape))
        return files

    def _write_python(self, folder: Path, role: str, inputs: list[dict], outputs: list[dict],
                      text: tuple[serving.TextPipeline, Path]) -> None:
        """A Python-backend model: ``serving.py`` as ``model.py``, beside the vocab and the pipeline's settings."""
        pipeline, vocab = text
        version = folder / "1"
        version.mkdir(parents=True)
        shutil.copyfile(serving.__file__, version / "model.py")
        shutil.copyfile(vocab, version / serving.VOCAB)
        (version / serving.SETTINGS).write_text(json.dumps(pipeline.settings, indent=2), encoding="utf-8")
        _write_config(folder, {
            "name": folder.name, "backend": "python", "max_batch_size": self.max_batch,
            "input": inputs, "output": outputs,
            "instance_group": [{"count": self.instances, "kind": Enum("KIND_CPU")}],
            "parameters": [{"key": "role", "value": {"string_value": role}}],
        })

    def _dims(self, spec) -> list[int]:
        """Triton dims: the registry's shape without the batch dim (max_batch_size > 0), -1 where dynamic."""
        return list(spec.shape(self.config))[1:]

    def _dtypes(self) -> dict[str, str]:
        """IO dtypes as the model really has them: from the ONNX graph (an engine's own ONNX), else the registry."""
        onnx_artifacts = self.manifest.find(task=self.task.name, precision=self.artifact.precision, kind="onnx",
                                            runtime=self.artifact.runtime)
        declared = {t.name: t.dtype for t in (*self.task.inputs, *self.task.outputs)}
        if not onnx_artifacts:
            return declared
        path = self.manifest.path_of(onnx_artifacts[0])
        found = _onnx_io(path)
        if set(found) != set(declared):
            raise MbexportError(f"its inputs/outputs {sorted(found)} are not the registry's {sorted(declared)} for "
                                f"{self.task.name}", path)
        return found


def _onnx_io(path: Path) -> dict[str, str]:
    """Graph input and output names -> numpy dtype names, read without loading any weights."""
    import onnx

    from mbexport.export.onnxfile import read_weightless

    model, initializers = read_weightless(path)
    graph, weights = model.graph, {w.tensor.name for w in initializers}
    return {v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
            for v in (*graph.input, *graph.output) if v.name not in weights}


def _tensor(name: str, dtype: str, dims: list[int]) -> dict:
    if dtype not in TRITON_TYPES:
        raise MbexportError(f"tensor {name} has dtype {dtype}, which Triton has no type for")
    return {"name": name, "data_type": Enum(TRITON_TYPES[dtype]), "dims": dims}


def _write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(to_pbtxt(config))


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format for a dict: nested dicts are messages, lists of dicts repeated messages (and map
    entries as key/value dicts), other lists repeated scalars, :class:`Enum` values bare."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        items = value if isinstance(value, list) and value and isinstance(value[0], dict) else None
        if isinstance(value, dict) or items is not None:
            for item in items if items is not None else [value]:
                lines += [f"{pad}{key} {{", to_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line) + ("\n" if indent == 0 else "")


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)
