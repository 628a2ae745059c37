"""The PyTorch reference as export built it, and the Polygraphy runner that puts it beside the artifacts."""

from __future__ import annotations

import json
import time
from collections import ChainMap, OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from mbexport.checkpoint import load_checkpoint
from mbexport.errors import MbexportError
from mbexport.export import source_sha256
from mbexport.manifest import Manifest
from mbexport.model import MegatronBert, build_reference
from mbexport.tasks import Task, get_task


def load_reference(manifest: Manifest, task: str | Task, *, streamed: bool = True) -> MegatronBert:
    """The fp32 reference for ``task``: the recorded checkpoint (hash-checked) plus any seeded head weights.

    Export saved seeded heads beside the artifacts, so the reference is rebuilt bit for bit, not re-seeded.
    ``streamed``: its encoder blocks are streamed from the checkpoint (``build_reference(streamed=True)``): it
    holds one; without it, the whole model, for a caller that moves it to a device or casts it (bench).
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(manifest.source.get("path", ""))
    if not manifest.source or not path.exists():
        raise MbexportError(f"the checkpoint this folder was exported from is not there ({path}); "
                            "the reference cannot be rebuilt", manifest.root)
    if source_sha256(path) != manifest.source.get("sha256"):
        raise MbexportError("the checkpoint changed since the export (sha256 mismatch)", path)
    checkpoint = load_checkpoint(path, lazy=True)
    if manifest.config and json.loads(json.dumps(checkpoint.config.to_hf_dict())) != manifest.config:
        raise MbexportError("the manifest's config does not match the checkpoint's", manifest.root)
    seeded = {}
    for weights in manifest.find(task.name, kind="weights"):
        from safetensors.torch import load_file

        seeded.update(load_file(manifest.trusted_path(weights)))
    model, _ = build_reference(task, checkpoint.config, ChainMap(seeded, checkpoint.weights_for(task)), source=path,
                               streamed=streamed)
    return model


class TorchRunner(BaseRunner):
    """Polygraphy runner for the reference (Polygraphy's own PytRunner insists on CUDA)."""

    def __init__(self, model: MegatronBert, name: str = "pytorch"):
        super().__init__(name=name, prefix="pytorch-runner")
        self.model = model

    def activate_impl(self):
        self.model.eval()

    def get_input_metadata_impl(self):
        metadata = TensorMetadata()
        for spec in self.model.task.inputs:
            metadata.add(spec.name, dtype=np.dtype(spec.dtype), shape=list(spec.shape(self.model.config)))
        return metadata

    def infer_impl(self, feed_dict):
        task = self.model.task
        start = time.perf_counter()
        with torch.no_grad():
            outputs = self.model(*(torch.from_numpy(np.asarray(feed_dict[name])) for name in task.input_names))
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, out.numpy()) for name, out in zip(task.output_names, outputs))

    def deactivate_impl(self):
        pass
