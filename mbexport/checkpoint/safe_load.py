"""Unpickling checkpoints without ever running code from them, and without memory beyond what they hold.

``torch.load(weights_only=True)`` (which handles both the zip and the pre-1.6 serialization) only rebuilds
tensors and plain containers. Megatron checkpoints also pickle ``argparse.Namespace`` (allowed), Megatron
and Apex enums, NumPy RNG state and Transformer Engine buffers: those become inert ``Inert`` objects that
run nothing. Any other global means the file wants to execute something, and it is refused.

Before that, ``check_declared_sizes`` reads only the pickle at the start of the file (inert stubs for every
global) and adds up the tensor storages it declares: they must fit in the bytes the file (or zip member) has,
and the file must hold little beyond them, so neither a lying pickle nor a zip member that inflates to junk
is ever allocated or inflated.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import torch

from mbexport.errors import CheckpointError, UnsafeCheckpointError, first_line

JSON_LIMIT = 1 << 25  # config.json, shard indexes, tokenizer.json, DCP's metadata.json: 32 MiB (they are smaller)
PICKLE_LIMIT = 1 << 28  # 256 MiB of pickled structure (Megatron's args and dicts are kilobytes)
# What a file may hold beyond its tensor data: its pickles plus, per storage, a zip record's headers.
SLACK_BYTES, SLACK_PER_STORAGE = 1 << 20, 1024
ZIP_MAGIC, PICKLE_PROTOCOL_2 = b"PK\x03\x04", b"\x80\x02"
_STORAGE_BYTES = {name: dtype.itemsize for dtype, name in torch.storage._dtype_to_storage_type_map().items()} | {
    "UntypedStorage": 1}

# Globals we never need the value of (enums in ``args``, RNG state, TE extra state): stand-ins are safe.
INERT = re.compile(r"^(megatron|apex|numpy|transformer_engine)\.|^_io\.BytesIO$")


class Inert:
    """Takes the place of an ignorable global: keeps its arguments, executes nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def read_json(path: Path):
    """A small JSON file (at most ``JSON_LIMIT`` bytes), refused in one line when it is not one."""
    if path.stat().st_size > JSON_LIMIT:
        raise CheckpointError(f"is over {JSON_LIMIT >> 20} MiB; not the small JSON file expected here", path)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"not valid JSON: {first_line(error, 100)}", path) from None


def torch_load(source: Path | BinaryIO, path: Path, *, size: int | None = None, mmap: bool = False):
    """``torch.load`` with ``weights_only`` and inert stand-ins; ``path`` names the file in errors, ``size`` is a
    stream's length (a file's is its own). The declared tensor sizes are checked first.

    ``weights_only`` stops at the first unknown global, so stand-ins are added one global at a time.
    """
    try:
        if isinstance(source, Path):
            with open(source, "rb") as f:
                check_declared_sizes(f, source.stat().st_size, path)
        else:
            check_declared_sizes(source, size, path)
            source.seek(0)
    except CheckpointError:
        raise
    except Exception as error:  # a damaged zip member (bad CRC, bad deflate data) while reading the pickle
        raise CheckpointError(f"cannot read checkpoint (truncated or corrupt?): {first_line(error, 200)}",
                              path) from None
    stand_ins: dict[str, type] = {}
    while True:
        allowed = [argparse.Namespace, *((cls, name) for name, cls in stand_ins.items())]
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on old pickle protocols: not the user's business
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


class _Scanned(Inert):
    """What a global becomes during the size scan: accepts every pickle operation, runs nothing."""

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _SizeScan(pickle.Unpickler):
    """Unpickles a checkpoint's structure with inert stubs, recording each storage's declared bytes."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, int] = {}
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        return self._stubs.setdefault((module, name), type(name, (_Scanned,), {"global_name": name}))

    def persistent_load(self, pid):
        kind = getattr(pid[1], "global_name", None) if isinstance(pid, tuple) and len(pid) >= 5 else None
        numel = pid[4] if kind else None
        if pid[0] != "storage" or kind not in _STORAGE_BYTES or type(numel) is not int or numel < 0:
            raise CheckpointError(f"not a PyTorch checkpoint: unknown storage reference {str(pid)[:80]}", self.path)
        self.storages[str(pid[2])] = numel * _STORAGE_BYTES[kind]
        return _Scanned()


class _Bounded:
    """The pickle's reads from ``f``, at most ``PICKLE_LIMIT`` bytes: a pickle that wants more is refused
    before it is read (``count``: the bytes it took)."""

    def __init__(self, f: BinaryIO, path: Path):
        self._f, self._path = f, path
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        return self._took(self._f.read(self._allowed(n)))

    def readline(self) -> bytes:
        return self._took(self._f.readline(self._allowed(PICKLE_LIMIT - self.count)))

    def _allowed(self, n: int) -> int:
        if n < 0 or self.count + n > PICKLE_LIMIT:
            raise CheckpointError(f"its pickled structure is over {PICKLE_LIMIT >> 20} MiB (tensors are stored "
                                  "apart from it): not a checkpoint", self._path)
        return n

    def _took(self, data: bytes) -> bytes:
        self.count += len(data)
        return data


def check_declared_sizes(f: BinaryIO, size: int, path: Path) -> None:
    """Refuse, before anything is allocated, a file that is no PyTorch checkpoint, whose pickle declares more
    tensor bytes than the file's ``size`` holds, or that holds much more than its tensors (junk to inflate)."""
    head = f.read(4)
    f.seek(0)
    if head == ZIP_MAGIC:
        pickles, header = 1, _skip_to_data_pkl(f, path)
    elif head[:2] == PICKLE_PROTOCOL_2:
        pickles, header = 5, 0  # magic number, protocol, system info, the object, its storage keys; then storages
    elif not head:
        raise CheckpointError("not a PyTorch checkpoint (the file is empty)", path)
    else:
        text = "; a text file?" if _printable(head) else ""
        raise CheckpointError(f"not a PyTorch checkpoint (it starts with {head!r}, neither PyTorch's zip nor its "
                              f"pickle format{text})", path)
    bounded = _Bounded(f, path)
    scan = _SizeScan(bounded, path)
    try:
        for _ in range(pickles):
            scan.load()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"not a PyTorch checkpoint (its pickle is damaged: {_reason(str(error)) or error!r})",
                              path) from None
    tensors = sum(scan.storages.values())
    need = tensors + (8 * len(scan.storages) if pickles > 1 else 0)  # the old format prefixes storages' lengths
    structure = header + bounded.count
    if structure + need > size:
        raise CheckpointError(f"truncated or lying: its pickle declares {need:,} bytes of tensors, but it holds only "
                              f"{size - structure:,} after the pickle", path)
    if size > structure + need + SLACK_BYTES + SLACK_PER_STORAGE * len(scan.storages):
        raise CheckpointError(f"holds {size:,} bytes, but its tensors need only {tensors:,}: refusing to read "
                              "what is not a tensor", path)


def _skip_to_data_pkl(f: BinaryIO, path: Path) -> int:
    """Read past the local header of PyTorch's first zip record, ``*/data.pkl`` (stored); return its length."""
    header = f.read(30)
    if len(header) < 30:
        raise CheckpointError("truncated checkpoint (a zip header cut short)", path)
    method, (name_length, extra_length) = struct.unpack("<H", header[8:10])[0], struct.unpack("<HH", header[26:30])
    name = f.read(name_length)
    if not name.endswith(b"data.pkl") or method != 0:
        raise CheckpointError("not a PyTorch checkpoint (a zip whose first record is not a stored data.pkl)", path)
    f.read(extra_length)
    return 30 + name_length + extra_length


def _printable(data: bytes) -> bool:
    return all(32 <= b < 127 or b in b"\t\r\n" for b in data)


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


def dist_metadata(path: Path):
    """A ``.metadata`` file unpickled with only PyTorch's checkpoint dataclasses allowed (dcp itself would use
    plain ``pickle.load``)."""
    try:
        with open(path, "rb") as f:
            return _DistMetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"corrupt torch.distributed.checkpoint metadata: {first_line(error, 200)}",
                              path) from None
