"""Megatron checkpoints in ``torch.distributed.checkpoint`` (DCP) folders, read in this one process.

Three of Megatron-LM's ``--ckpt-format`` choices write DCP folders (``.metadata`` plus ``__*_*.distcp`` files;
megatron/training/checkpointing.py, ``_get_checkpoint_format``):

- ``torch_dist`` (Megatron-Core >= 0.6, the default since): ``metadata.json`` names the backend; tensors are
  global, layers stacked on a leading dim; the common state (``args``, ``checkpoint_version``, ``iteration``)
  is ``common.pt`` up to Megatron-Core 0.18, and from 0.19 (July 2026) the ``common_state`` sharded object in
  the DCP payload, a ``torch.save``d one-item list (megatron/core/dist_checkpointing/serialization.py).
  Optional ``integrity.json`` (Megatron-Core >= 0.18) and ``tokenizer/`` (main, August 2026).
- ``torch_dcp`` (Megatron-Core >= 0.12, with PyTorch FSDP2) and ``fsdp_dtensor`` (>= 0.15, Megatron-FSDP): no
  ``metadata.json``; the whole training state dict through ``dcp.save``, so the model's per-layer tensors are
  under ``model.`` (``module.`` wrappers too) and ``args`` etc. are pickled bytes items. DTensor shards are
  chunks of the global tensor, which ``dcp.load`` joins.

Every pickle here is read safely: ``.metadata`` through an allowlist, and bytes items (the common state,
``args``) as raw bytes (``_RawBytesPlanner``) handed to ``safe_load.torch_load``; dcp's own load planner would
unpickle them with ``torch.load(weights_only=False)``, which runs whatever code they carry.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch

from mbexport.checkpoint.megatron import (TRACKER, Shard, checkpoint_version, extra_state_bytes, fp8_scaling,
                                          read_tracker, whole_number)
from mbexport.checkpoint.safe_load import dist_metadata, read_json, torch_load
from mbexport.errors import CheckpointError, first_line
from mbexport.fsutil import sha256_file

METADATA_JSON, DCP_METADATA, COMMON_PT, INTEGRITY = "metadata.json", ".metadata", "common.pt", "integrity.json"
COMMON_STATE = "common_state/shard_0_1"  # ShardedObject("common_state", ..., (1,), (0,)).unique_key
COMMON_ITEMS = ("args", "checkpoint_version", "iteration")  # torch_dcp / fsdp_dtensor: top-level bytes items
BYTES_ITEM_LIMIT = 1 << 26  # a pickled common state or args: 64 MiB
STACKED = re.compile(r"^(encoder\.layers)\.(?!\d)(.+)$")
SKIPPED = re.compile(r"^(optimizer|rng_state|rerun_state_machine|opt_param_scheduler)")
EXTRA_STATE = re.compile(r"_extra_state(/shard_[0-9._]+)?$")
WRAPPERS = re.compile(r"^(module\.)+")  # DDP / FSDP / Float16Module wrappers' prefixes (Megatron strips them too)
FORMATS = {"torch_dist": "megatron-core-dist", "torch_dcp": "megatron-core-dcp",
           "fsdp_dtensor": "megatron-core-fsdp-dtensor"}


def dcp_folder(path: Path) -> Path | None:
    """The DCP iteration folder ``path`` is, or that its tracker names; None when it is no DCP checkpoint."""
    if not path.is_dir():
        return None
    if (path / DCP_METADATA).is_file() or (path / METADATA_JSON).is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        folder = path / read_tracker(tracker)
        if (folder / DCP_METADATA).is_file() or (folder / METADATA_JSON).is_file():
            return folder
    return None


def read_dcp(folder: Path) -> tuple[Shard, str, dict]:
    """One Megatron-Core shard with per-layer views, its mbexport format name, and what ``inspect`` reports:
    where ``args`` came from, the integrity check, Megatron's format name."""
    backend = _sharded_backend(folder)
    integrity = verify_integrity(folder)
    metadata = _metadata(folder / DCP_METADATA)
    entries = metadata.state_dict_metadata
    tensors = {key: meta for key, meta in entries.items() if hasattr(meta, "size") and not SKIPPED.search(key)}
    raw_keys = [key for key in entries if not hasattr(entries[key], "size")
                and (key == COMMON_STATE or key in COMMON_ITEMS or EXTRA_STATE.search(key))]
    if backend is None:  # torch_dcp / fsdp_dtensor: the model is one entry of the training state dict
        tensors = {key: meta for key, meta in tensors.items() if key.startswith("model.")}
    _check_storage(folder, metadata, tensors, raw_keys)
    loaded, raw = _load(folder, metadata, tensors, raw_keys)
    common, source, where = _common_state(folder, backend, raw)
    ckpt_format = backend or ("fsdp_dtensor" if getattr(common.get("args"), "ckpt_format", None) == "fsdp_dtensor"
                              or any(WRAPPERS.match(k[6:]) for k in loaded) else "torch_dcp")
    flat = {}
    for key, tensor in loaded.items():
        key = key if backend else WRAPPERS.sub("", key[len("model."):])
        match = STACKED.match(key)
        if match:
            flat.update({f"{match[1]}.{i}.{match[2]}": layer for i, layer in enumerate(tensor)})
        else:
            flat[key] = tensor
    extra = [raw[key] for key in raw if EXTRA_STATE.search(key)]
    extra += [extra_state_bytes(t) for k, t in flat.items() if k.endswith("_extra_state")]
    version = checkpoint_version(common.get("checkpoint_version", 3.0), where)
    shard = Shard(folder / DCP_METADATA, 0, 0, [flat], common.get("args"), version,
                  whole_number(common.get("iteration")), mcore=True, fp8_scaling=fp8_scaling(extra))
    return shard, FORMATS[ckpt_format], {"ckpt_format": ckpt_format, "args_source": source if "args" in common
                                         else None, "integrity": integrity}


def _metadata(path: Path):
    """``.metadata`` through the allowlist, then checked to be the dataclasses dcp wrote."""
    from torch.distributed.checkpoint.metadata import Metadata

    metadata = dist_metadata(path)
    if not (isinstance(metadata, Metadata) and isinstance(metadata.state_dict_metadata, dict)
            and isinstance(metadata.storage_data, dict)
            and all(isinstance(key, str) for key in metadata.state_dict_metadata)):
        raise CheckpointError("not torch.distributed.checkpoint metadata (unexpected structure)", path)
    return metadata


def _sharded_backend(folder: Path) -> str | None:
    """``torch_dist`` when ``metadata.json`` says so; None for a bare DCP folder; other backends are refused."""
    path = folder / METADATA_JSON
    if not path.is_file():
        if not (folder / DCP_METADATA).is_file():
            raise CheckpointError(f"no {DCP_METADATA}: not a complete torch.distributed.checkpoint folder", folder)
        return None
    data = read_json(path)
    backend = data.get("sharded_backend") if isinstance(data, dict) else None
    if backend != "torch_dist":
        raise CheckpointError(f"sharded_backend {str(backend)[:40]!r} is not read (only torch_dist; Megatron-Core's "
                              "older zarr backend is not)", path)
    if not (folder / DCP_METADATA).is_file():
        raise CheckpointError(f"no {DCP_METADATA} beside it: an incomplete torch_dist checkpoint", path)
    return backend


def verify_integrity(folder: Path) -> str:
    """Check ``integrity.json`` (``{"algorithm": "sha256", "files": {name: hex}}`` over the folder's top-level
    files, Megatron-Core's ``save_integrity_manifest``) when there is one; say what was found."""
    path = folder / INTEGRITY
    if not path.is_file():
        return "no integrity.json"
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError("not an integrity manifest (expected a JSON object)", path)
    if data.get("algorithm", "sha256") != "sha256":
        raise CheckpointError(f"algorithm {str(data.get('algorithm'))[:20]!r} is not sha256", path)
    files = data.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise CheckpointError("'files' must map file names to sha256 hex digests", path)
    for name, digest in files.items():
        if not _plain_name(name) or not (folder / name).is_file():
            raise CheckpointError(f"lists {name[:60]!r}, which is not a file in this folder", path)
        actual = sha256_file(folder / name)
        if actual != digest.lower():
            raise CheckpointError(f"sha256 differs from {INTEGRITY} ({actual[:16]}... vs {digest[:16]}...): the file "
                                  "changed after it was saved", folder / name)
    return f"integrity.json verified ({len(files)} files, sha256)"


def _plain_name(name: str) -> bool:
    """A file name within the folder itself: no separators, no '..', not hidden-dot tricks like '.' alone."""
    return bool(name) and name not in (".", "..") and not re.search(r"[/\\\0]", name)


def _check_storage(folder: Path, metadata, tensors: dict, raw_keys: list[str]) -> None:
    """Every storage item a read needs lies inside one of the folder's own files, and the tensors declared for
    reading fit in the data files: nothing outside the folder is opened, nothing beyond the data is allocated."""
    sizes: dict[str, int] = {}
    wanted = set(tensors) | set(raw_keys)
    for index, info in metadata.storage_data.items():
        if getattr(index, "fqn", None) not in wanted:
            continue
        name, offset, length = (getattr(info, attr, None) for attr in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or not _plain_name(name):
            raise CheckpointError(f"names the data file {str(name)[:60]!r}, which is not a file in this folder",
                                  folder / DCP_METADATA)
        if name not in sizes:
            file = folder / name
            sizes[name] = file.stat().st_size if file.is_file() else -1
        if sizes[name] < 0:
            raise CheckpointError(f"missing data file {name}", folder)
        if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length
                and offset + length <= sizes[name]):
            raise CheckpointError(f"{index.fqn} lies outside {name} ({offset}+{length} bytes; the file has "
                                  f"{sizes[name]:,}): truncated or corrupt", folder / DCP_METADATA)
        if index.fqn in raw_keys and length > BYTES_ITEM_LIMIT:
            raise CheckpointError(f"{index.fqn} is {length:,} bytes; Megatron pickles a few kilobytes there",
                                  folder / DCP_METADATA)
    declared = 0
    for key, meta in tensors.items():
        size = getattr(meta, "size", None)
        dtype = getattr(getattr(meta, "properties", None), "dtype", None)
        if not (isinstance(size, (tuple, torch.Size)) and all(type(d) is int and d >= 0 for d in size)
                and isinstance(dtype, torch.dtype)) or len(size) > 8:
            raise CheckpointError(f"{key} has a malformed shape or dtype", folder / DCP_METADATA)
        declared += torch.Size(size).numel() * dtype.itemsize
    if declared > sum(sizes.values()):
        raise CheckpointError(f"declares {declared:,} bytes of tensors, but the data files hold only "
                              f"{sum(sizes.values()):,}: truncated or lying", folder / DCP_METADATA)


def _load(folder: Path, metadata, tensors: dict, raw_keys: list[str]) -> tuple[dict, dict[str, bytes]]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    class CheckedReader(dcp.FileSystemReader):
        """dcp's reader, handed the metadata the allowlist already read (dcp would ``pickle.load`` it again)."""

        def read_metadata(self, *args, **kwargs):
            return metadata

    class RawBytesPlanner(dcp.DefaultLoadPlanner):
        """dcp's load planner, except that bytes items stay the raw bytes they are: its own ``load_bytes`` would
        unpickle them with ``torch.load(weights_only=False)``."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.raw: dict[str, bytes] = {}

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.raw[read_item.dest_index.fqn] = value.getvalue()

    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in tensors.items()}
    state.update({key: io.BytesIO() for key in raw_keys})
    planner = RawBytesPlanner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        try:
            dcp.load(state, storage_reader=CheckedReader(str(folder)), planner=planner, no_dist=True)
        except (Exception, CheckpointException) as error:  # dcp's CheckpointException is a BaseException
            raise CheckpointError(f"a data file (*.distcp) holds something that is not a saved tensor or is damaged: "
                                  f"{_dcp_reason(error)}", folder) from None
    return {key: state[key] for key in tensors}, planner.raw


def _dcp_reason(error: BaseException) -> str:
    """The first underlying failure, in short (dcp wraps each rank's (exception, traceback) in its own)."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))
        error = error[0] if isinstance(error, tuple) and error else error
    return f"{type(error).__name__} ({first_line(error, 120)})"


def _common_state(folder: Path, backend: str | None, raw: dict[str, bytes]) -> tuple[dict, str | None, Path]:
    """The common state, where it came from (said by ``inspect``) and the path that names it in errors:
    ``common.pt``, the ``common_state`` object, or (torch_dcp, fsdp_dtensor) bytes items."""
    if not backend:
        common = {key: _unpickle(raw[key], folder / key) for key in COMMON_ITEMS if key in raw}
        return common, "the DCP payload's args item", folder / "checkpoint_version"
    if (folder / COMMON_PT).is_file():
        common, source, where = torch_load(folder / COMMON_PT, folder / COMMON_PT), COMMON_PT, folder / COMMON_PT
    elif COMMON_STATE in raw:
        where = folder / COMMON_STATE
        common, source = _unpickle(raw[COMMON_STATE], where), "the DCP payload's common_state"
        if not (isinstance(common, list) and len(common) == 1):
            raise CheckpointError("not a Megatron common state (expected a one-item list)", where)
        common = common[0]
    else:
        return {}, None, folder / DCP_METADATA
    if not isinstance(common, dict):
        raise CheckpointError("not a Megatron common state (top level is not a dict)", where)
    return common, source, where


def _unpickle(data: bytes, where: Path):
    return torch_load(io.BytesIO(data), where, size=len(data))
