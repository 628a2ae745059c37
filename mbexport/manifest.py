"""``manifest.json``: the list of artifacts in an output folder, and the only thing later stages trust.

An artifact counts only once it is in the manifest with its sha256; the manifest itself is rewritten
atomically after the artifact's file is complete, so an interrupted run can never produce an entry whose
file is half written. ``validate`` re-hashes every file, which is how tampering is caught.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError, first_line
from mbexport.fsutil import sha256_file, write_json_atomic
from mbexport.precisions import PRECISIONS
from mbexport.tasks import TASKS, Task

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
    precision: str  # a PRECISIONS name; "-" for files of no precision (the vocab)
    kind: str  # one of KINDS
    path: str  # relative to the manifest's folder
    sha256: str
    io: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # opset, profiles, TensorRT version, build time, ...

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.precision, self.kind)


@dataclass
class Manifest:
    """An output folder's manifest. It is user-editable input, so ``load`` checks every field's type and every
    path in it (artifact, external data, ``made_from``) stays inside the folder; callers reach files only
    through ``path_of``, ``external_data_of`` and ``discard``, never by joining paths themselves."""

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
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise MbexportError(f"malformed manifest: not JSON ({first_line(error)})", path) from None
        try:
            manifest = _parse(root, data)
            MegatronBertConfig.from_hf_dict(manifest.config)
        except _Malformed as error:
            raise MbexportError(f"malformed manifest: {error}", path) from None
        except (ValueError, TypeError, AttributeError, ArithmeticError) as error:
            raise MbexportError(f"malformed manifest: config: {first_line(error)}", path) from None
        for artifact in manifest.artifacts:  # symbolic links inside the folder that lead out of it
            manifest.path_of(artifact, source=path)
            manifest.external_data_of(artifact, source=path)
        return manifest

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
        try:
            rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise MbexportError(f"is outside the output folder {self.root}", path) from None
        data = (self.root / rel).parent / external_data_name(rel)
        if kind == "onnx" and data.is_file():
            details["external_data"] = {"path": data.name, "sha256": sha256_file(data)}
        return self.add(Artifact(task.name, precision, kind, rel, sha256_file(self.root / rel),
                                 io_spec(task), details))

    def find(self, task: str | None = None, precision: str | None = None, kind: str | None = None) -> list[Artifact]:
        return [a for a in self.artifacts
                if (task is None or a.task == task) and (precision is None or a.precision == precision)
                and (kind is None or a.kind == kind)]

    def path_of(self, artifact: Artifact, *, source: Path | None = None) -> Path:
        """The artifact's file, checked to lie inside the folder (after following symbolic links)."""
        return self._inside(artifact.path, source)

    def external_data_of(self, artifact: Artifact, *, source: Path | None = None) -> Path | None:
        """The artifact's external data file (weights of a > 2 GB ONNX model), checked like ``path_of``."""
        data = artifact.details.get("external_data")
        if not data:
            return None
        return self._inside((PurePosixPath(artifact.path).parent / data["path"]).as_posix(), source)

    def discard(self, artifact: Artifact) -> None:
        """Forget an artifact and delete its file(s): only ever files inside the folder."""
        for path in (self.path_of(artifact), self.external_data_of(artifact)):
            if path is not None:
                path.unlink(missing_ok=True)
        self.artifacts.remove(artifact)

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
        data = self.external_data_of(artifact)
        if data is not None and (not data.is_file() or sha256_file(data) != artifact.details["external_data"]["sha256"]):
            return f"{artifact.details['external_data']['path']} (external data) is missing or changed (sha256 mismatch)"
        return None

    def _inside(self, rel: str, source: Path | None) -> Path:
        problem = _relative_problem(rel)
        path = self.root / rel
        if problem is None:
            root = self.root.resolve()
            if path.resolve() != root and root not in path.resolve().parents:
                problem = "leads outside the folder through a symbolic link"
        if problem is not None:
            raise MbexportError(f"path '{rel}' {problem}; refusing to use it", source or self.root / MANIFEST)
        return path


class _Malformed(ValueError):
    """A manifest field with the wrong type or value; ``load`` reports it in one line."""


def _relative_problem(rel) -> str | None:
    """What is wrong with a path a manifest gives (relative to its folder), or None."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\\" in rel or "\0" in rel or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        return "is absolute or not a plain relative path"
    if any(part in ("..", ".") for part in rel.split("/")) or "//" in rel or rel.endswith("/"):
        return "leaves its folder or is not normalized"
    return None


def _typed(value, kind, where: str):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise _Malformed(f"{where} must be {names}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _parse(root: Path, data) -> Manifest:
    _typed(data, dict, "the manifest")
    artifacts = []
    for i, entry in enumerate(_typed(data.get("artifacts"), list, "artifacts")):
        where = f"artifacts[{i}]"
        _typed(entry, dict, where)
        missing = [name for name in _ARTIFACT_FIELDS if name not in entry]
        unknown = [name for name in entry if name not in _ARTIFACT_FIELDS]
        if missing or unknown:
            raise _Malformed(f"{where} {'lacks' if missing else 'has unknown field'} '{(missing or unknown)[0]}'")
        for name, kind in _ARTIFACT_FIELDS.items():
            _typed(entry[name], kind, f"{where}.{name}")
        if entry["task"] not in TASKS:
            raise _Malformed(f"{where}.task '{entry['task']}' is not a task")
        if entry["kind"] not in KINDS:
            raise _Malformed(f"{where}.kind '{entry['kind']}' is not one of {', '.join(KINDS)}")
        if entry["precision"] not in (*PRECISIONS, "-"):
            raise _Malformed(f"{where}.precision {entry['precision']!r} is not one of {', '.join(PRECISIONS)}")
        if not _SHA256.match(entry["sha256"]):
            raise _Malformed(f"{where}.sha256 is not a sha256 hex digest")
        problem = _relative_problem(entry["path"])
        if problem:
            raise _Malformed(f"{where}.path '{entry['path']}' {problem}")
        _check_details(entry["details"], f"{where}.details")
        artifacts.append(Artifact(**entry))
    fields = {name: _typed(data.get(name, {}), dict, name) for name in ("source", "config", "versions")}
    for name in ("path", "format", "sha256"):
        if name in fields["source"]:
            _typed(fields["source"][name], str, f"source.{name}")
    return Manifest(root, fields["source"], fields["config"], artifacts, fields["versions"])


def _check_details(details: dict, where: str) -> None:
    """The details other stages read: external data and made_from (paths), profiles, cache key, warnings."""
    for name in ("external_data", "made_from"):
        if name in details:
            entry = _typed(details[name], dict, f"{where}.{name}")
            path, digest = entry.get("path"), entry.get("sha256")
            problem = _relative_problem(path)
            if name == "external_data" and problem is None and "/" in path:
                problem = "is not a file name beside its model"
            if problem:
                raise _Malformed(f"{where}.{name}.path {str(path)[:60]!r} {problem}")
            if not isinstance(digest, str) or not _SHA256.match(digest):
                raise _Malformed(f"{where}.{name}.sha256 is not a sha256 hex digest")
    for name in ("cache_key", "converted_from"):
        if name in details:
            _typed(details[name], str, f"{where}.{name}")
    if not all(isinstance(note, str) for note in _typed(details.get("warnings", []), list, f"{where}.warnings")):
        raise _Malformed(f"{where}.warnings must be a list of strings")
    for i, profile in enumerate(_typed(details.get("profiles", []), list, f"{where}.profiles")):
        for dim, values in _typed(profile, dict, f"{where}.profiles[{i}]").items():
            if (not isinstance(values, list) or len(values) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
                raise _Malformed(f"{where}.profiles[{i}].{dim} must be three positive integers (min, opt, max)")


KINDS = ("onnx", "engine", "weights", "vocab")
_ARTIFACT_FIELDS = {"task": str, "precision": str, "kind": str, "path": str, "sha256": str, "io": dict,
                    "details": dict}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("mbexport", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "nvidia-modelopt",
                 "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions
