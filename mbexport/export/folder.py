"""``mbexport export``: a checkpoint and a task to ONNX files in an output folder, listed in its manifest."""

from __future__ import annotations

import functools
import hashlib
import shutil
import warnings
from pathlib import Path

from mbexport.checkpoint import Checkpoint, load_checkpoint
from mbexport.errors import MbexportError
from mbexport.export.fp32 import export_onnx
from mbexport.fsutil import atomic_file, sha256_file
from mbexport.manifest import MANIFEST, Manifest
from mbexport.model import build_reference
from mbexport.precisions import EXPORTED, OPSET, get_precision, made_by
from mbexport.tasks import Task, get_task
from mbexport.text import VOCAB

SEEDED_HEAD = "seeded-head.safetensors"


def export(source: str | Path, task: str | Task, out_dir: str | Path, *, precisions=(EXPORTED,),
           init_missing_head: int | None = None, vocab: str | Path | None = None, opset: int = OPSET) -> Manifest:
    """Write ``out_dir/<task>/model.<precision>.onnx`` for each precision and record them in the manifest.

    Every precision is converted from the fp32 file, so fp32 is always written too. A folder that already
    holds another checkpoint's artifacts is refused rather than mixed.
    """
    task = get_task(task) if isinstance(task, str) else task
    wanted = {p.name: p for p in map(get_precision, precisions)}.values()
    other = next((p for p in wanted if p.stage != "export"), None)
    if other is not None:
        raise MbexportError(f"export writes {' and '.join(made_by('export'))}, not '{other.name}' (the "
                            f"{other.stage} stage makes it: mbexport build --precision {other.name})")
    if vocab is not None and not Path(vocab).is_file():
        raise MbexportError("vocab file not found", vocab)
    checkpoint = load_checkpoint(source, lazy=True)
    if task.name not in checkpoint.heads and init_missing_head is None:
        raise MbexportError(f"the checkpoint has no '{task.name}' head (it holds: {', '.join(checkpoint.heads)}); "
                            "pass --init-missing-head SEED to start it from seeded random weights", source)
    out_dir = Path(out_dir)
    manifest = _open_manifest(out_dir, checkpoint)
    # Blocks 1 and up stream their weights from the checkpoint as they are saved: one block at a time.
    model, seeded = build_reference(task, checkpoint.config, checkpoint.weights_for(task),
                                    init_missing_head=init_missing_head, source=source, streamed=True)
    del checkpoint  # the model keeps what it reads from
    folder = out_dir / task.name
    previous = {a.sha256 for a in manifest.find(task.name, EXPORTED, "onnx")}
    fp32 = export_onnx(model, folder / get_precision(EXPORTED).file_name("onnx"), opset=opset)
    if manifest.record(task, EXPORTED, "onnx", fp32, opset=opset).sha256 not in previous:
        # other precisions' files and engines made from an earlier, different fp32 no longer match the reference
        manifest.artifacts = [a for a in manifest.artifacts if not (
            a.task == task.name and a.kind in ("onnx", "engine") and (a.precision, a.kind) != (EXPORTED, "onnx"))]
    manifest.artifacts = [a for a in manifest.artifacts if not (a.task == task.name and a.kind == "weights")]
    if seeded:
        warnings.warn(f"{task.name}: the checkpoint has no {', '.join(seeded)}; they are random "
                      f"(seed {init_missing_head}) and saved in {task.name}/{SEEDED_HEAD}", stacklevel=2)
        from safetensors.torch import save_file

        params = dict(model.named_parameters())
        with atomic_file(folder / SEEDED_HEAD) as tmp:
            save_file({name: params[name].detach().contiguous() for name in seeded}, str(tmp))
        manifest.record(task, EXPORTED, "weights", folder / SEEDED_HEAD, seed=init_missing_head, tensors=seeded)
    if vocab is not None:
        with atomic_file(out_dir / VOCAB) as tmp:
            shutil.copyfile(vocab, tmp)
        manifest.record(task, "-", "vocab", out_dir / VOCAB)
    for precision in wanted:
        if precision.transform is not None:
            converted = precision.transform(fp32, folder / precision.file_name("onnx"))
            manifest.record(task, precision.name, "onnx", converted, opset=opset, converted_from=fp32.name)
    manifest.save()
    return manifest


def source_sha256(path: str | Path) -> str:
    """A file's sha256, or for a folder the sha256 of its files' relative paths and hashes.

    One build asks three times (its cache key, the manifest, the reference's check), so each file's hash is
    remembered for the process while the file keeps its inode, size and modification time.
    """
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{_file_sha256(file)}  {file.relative_to(path).as_posix()}\n".encode())
    return digest.hexdigest()


def _file_sha256(file: Path) -> str:
    stat = file.stat()
    return _remembered_sha256(str(file.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _remembered_sha256(path: str, device: int, inode: int, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _open_manifest(out_dir: Path, checkpoint: Checkpoint) -> Manifest:
    source = {"path": str(Path(checkpoint.path).resolve()), "format": checkpoint.format,
              "sha256": source_sha256(checkpoint.path)}
    manifest = Manifest.load(out_dir) if (out_dir / MANIFEST).is_file() else Manifest(out_dir)
    if manifest.source and manifest.source.get("sha256") != source["sha256"]:
        raise MbexportError(f"already holds artifacts of another checkpoint ({manifest.source.get('path')}); "
                            "export into a new folder", out_dir)
    manifest.source, manifest.config = source, checkpoint.config.to_hf_dict()
    return manifest

