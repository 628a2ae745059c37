"""Unpickling checkpoints without ever running code from them.

``torch.load(weights_only=True)`` (which handles both the zip and the pre-1.6 serialization) only rebuilds
tensors and plain containers. Megatron checkpoints also pickle ``argparse.Namespace`` (allowed), Megatron
and Apex enums, NumPy RNG state and Transformer Engine buffers: those become inert ``Inert`` objects that
run nothing. Any other global means the file wants to execute something, and it is refused.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import BinaryIO

import torch

from mbexport.errors import CheckpointError, UnsafeCheckpointError

# Globals we never need the value of (enums in ``args``, RNG state, TE extra state): stand-ins are safe.
INERT = re.compile(r"^(megatron|apex|numpy|transformer_engine)\.|^_io\.BytesIO$")


class Inert:
    """Takes the place of an ignorable global: keeps its arguments, executes nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def torch_load(source: Path | BinaryIO, path: Path, *, mmap: bool = False):
    """``torch.load`` with ``weights_only`` and inert stand-ins; ``path`` names the file in errors.

    ``weights_only`` stops at the first unknown global, so stand-ins are added one global at a time.
    """
    stand_ins: dict[str, type] = {}
    while True:
        allowed = [argparse.Namespace, *((cls, name) for name, cls in stand_ins.items())]
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            name = _refused_global(str(error))
            if name and INERT.match(name) and name not in stand_ins:
                stand_ins[name] = type(name.rpartition(".")[2], (Inert,), {})
                if not isinstance(source, Path):
                    source.seek(0)
                continue
            if name or "Weights only load failed" in str(error):
                what = f"global {name}" if name else _reason(str(error))
                raise UnsafeCheckpointError(
                    f"refused to load: the pickle asks for {what}, which could run code "
                    "(only tensors, containers, argparse.Namespace and Megatron/Apex enums are allowed)", path
                ) from None
            raise CheckpointError(f"corrupt checkpoint: {_reason(str(error))}", path) from None
        except CheckpointError:
            raise
        except Exception as error:  # torch and zipfile report damaged data with many exception types
            reason = _reason(str(error)) or type(error).__name__
            raise CheckpointError(f"cannot read checkpoint (truncated or corrupt?): {reason}",
                                  path) from None


def _refused_global(message: str) -> str | None:
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match[1] if match else None


def _reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    specific = [line for line in lines if re.search(r"nsupported|not an allowed|blocked", line)]
    return (specific or lines[-1:] or [""])[0]


# What a torch.distributed.checkpoint ``.metadata`` pickle may contain (PyTorch's own dataclasses).
_DIST_METADATA = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _DistMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DIST_METADATA or dtype:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"refused to load: the pickle asks for global {module}.{name}, "
                                    "which is not part of torch.distributed.checkpoint metadata", self.path)


def check_dist_metadata(path: Path) -> None:
    """Unpickle a ``.metadata`` file with only PyTorch's checkpoint dataclasses allowed, before dcp reads it."""
    try:
        with open(path, "rb") as f:
            _DistMetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"corrupt torch_dist metadata: {error}", path) from None
