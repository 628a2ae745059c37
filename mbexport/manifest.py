"""``manifest.json``: the list of artifacts in an output folder, and the only thing later stages trust.

An artifact counts only once it is in the manifest with its sha256; the manifest itself is rewritten
atomically after the artifact's file is complete, so an interrupted run can never produce an entry whose
file is half written. ``validate`` re-hashes every file, which is how tampering is caught.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from mbexport.errors import MbexportError
from mbexport.fsutil import sha256_file, write_json_atomic
from mbexport.tasks import Task

MANIFEST = "manifest.json"
SCHEMA = 1


def external_data_name(onnx_path: str | Path) -> str:
    """The one external data file name mbexport uses: ``model.fp32.onnx.data`` beside ``model.fp32.onnx``."""
    return Path(onnx_path).name + ".data"


def io_spec(task: Task) -> dict:
    """The IO description stored with each artifact (names, dtypes, symbolic dims)."""
    return {
        "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in task.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims)} for t in task.outputs],
    }


@dataclass
class Artifact:
    task: str  # canonical task name
    precision: str  # fp32 | fp16 | int8 | fp8
    kind: str  # onnx | engine | weights | vocab
    path: str  # relative to the manifest's folder
    sha256: str
    io: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # opset, profiles, TensorRT version, build time, ...

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.precision, self.kind)


@dataclass
class Manifest:
    root: Path
    source: dict = field(default_factory=dict)  # path, format, sha256 of the checkpoint
    config: dict = field(default_factory=dict)  # Hugging Face config.json of the model
    artifacts: list[Artifact] = field(default_factory=list)
    versions: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise MbexportError(f"no {MANIFEST} here; is this an mbexport output folder?", root)
        try:
            data = json.loads(path.read_text())
            artifacts = [Artifact(**a) for a in data["artifacts"]]
            return cls(root, data.get("source", {}), data.get("config", {}), artifacts, data.get("versions", {}))
        except (ValueError, KeyError, TypeError) as error:
            raise MbexportError(f"malformed manifest ({error})", path) from None

    def save(self) -> None:
        self.versions = library_versions()
        data = {"schema": SCHEMA, "source": self.source, "config": self.config, "versions": self.versions,
                "artifacts": [asdict(a) for a in self.artifacts]}
        write_json_atomic(self.root / MANIFEST, data)

    def add(self, artifact: Artifact) -> Artifact:
        """Record (or replace) an artifact whose file is already complete at ``root/artifact.path``."""
        self.artifacts = [a for a in self.artifacts if a.key != artifact.key]
        self.artifacts.append(artifact)
        return artifact

    def record(self, task: Task, precision: str, kind: str, path: str | Path, **details) -> Artifact:
        """Hash a finished file and add it; an ONNX model's external data file (> 2 GB models) is hashed too."""
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        data = (self.root / rel).parent / external_data_name(rel)
        if kind == "onnx" and data.is_file():
            details["external_data"] = {"path": data.name, "sha256": sha256_file(data)}
        return self.add(Artifact(task.name, precision, kind, rel, sha256_file(self.root / rel),
                                 io_spec(task), details))

    def find(self, task: str | None = None, precision: str | None = None, kind: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts
                if (task is None or a.task == task) and (precision is None or a.precision == precision)
                and (kind is None or a.kind == kind)]

    def path_of(self, artifact: Artifact) -> Path:
        return self.root / artifact.path

    def trusted_path(self, artifact: Artifact) -> Path:
        """``path_of(artifact)`` once ``verify`` passes; otherwise an MbexportError saying what is wrong."""
        problem = self.verify(artifact)
        if problem is not None:
            raise MbexportError(problem, self.root)
        return self.path_of(artifact)

    def verify(self, artifact: Artifact) -> str | None:
        """None when the file is present and unchanged, else what is wrong."""
        path = self.path_of(artifact)
        if not path.is_file():
            return f"{artifact.path} is missing"
        if sha256_file(path) != artifact.sha256:
            return f"{artifact.path} changed since it was written (sha256 mismatch)"
        data = artifact.details.get("external_data")
        if data and (not (path.parent / data["path"]).is_file()
                     or sha256_file(path.parent / data["path"]) != data["sha256"]):
            return f"{data['path']} (external data) is missing or changed (sha256 mismatch)"
        return None


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("mbexport", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "nvidia-modelopt",
                 "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
