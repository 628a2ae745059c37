"""Megatron-Core ``torch_dist`` checkpoints, read with ``torch.distributed.checkpoint`` in this one process.

Tensors are stored whole (no tensor-parallel merge) with layers stacked on a leading dim, so the result is
a single Megatron-Core shard with per-layer views, which ``megatron.merge_shards`` handles like any other.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from mbexport.checkpoint.megatron import Shard
from mbexport.checkpoint.safe_load import check_dist_metadata, torch_load
from mbexport.errors import CheckpointError

STACKED = re.compile(r"^(encoder\.layers)\.(?!\d)(.+)$")
SKIPPED = re.compile(r"^(optimizer|rng_state|rerun_state_machine)|_extra_state")


def is_torch_dist(folder: Path) -> bool:
    metadata = folder / "metadata.json"
    if (folder / ".metadata").is_file():
        return True
    try:
        return json.loads(metadata.read_text()).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError, AttributeError):
        return False


def read_torch_dist(folder: Path) -> Shard:
    import torch.distributed.checkpoint as dcp

    check_dist_metadata(folder / ".metadata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        reader = dcp.FileSystemReader(str(folder))
        metadata = reader.read_metadata()
        tensors = {
            key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size") and not SKIPPED.search(key)
        }
        try:
            dcp.load(tensors, storage_reader=reader, no_dist=True)
        except Exception as error:  # dcp wraps per-file failures in its own exception types
            reason = " ".join(str(error).split())[:300]
            raise CheckpointError(f"cannot read torch_dist data: {reason}", folder) from None
    common = folder / "common.pt"
    extra = torch_load(common, common) if common.is_file() else {}
    if not isinstance(extra, dict):
        raise CheckpointError("not a Megatron common state (top level is not a dict)", common)
    flat = {}
    for key, tensor in tensors.items():
        match = STACKED.match(key)
        if match:
            flat.update({f"{match[1]}.{i}.{match[2]}": layer for i, layer in enumerate(tensor)})
        else:
            flat[key] = tensor
    return Shard(folder / ".metadata", 0, 0, [flat], extra.get("args"), extra.get("checkpoint_version", 3.0),
                 extra.get("iteration"), mcore=True)
