"""Megatron-LM and Megatron-Core ``mp_rank_*`` checkpoints (folders, single files, NGC zips) to HF tensors.

Every shard is renamed to canonical names (``names.ALIASES``), pipeline stages are joined by renumbering
layers, tensor-parallel ranks are merged by ``names.TP_SPLIT_DIM`` and the fused QKV is de-interleaved
by ``checkpoint_version``'s row layout. Tensors stay views of what was loaded wherever the layout allows.
"""

from __future__ import annotations

import io
import lzma
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.lazy import LazyTensors
from mbexport.checkpoint.safe_load import ZIP_MAGIC, torch_load
from mbexport.config import shown
from mbexport.errors import CheckpointError, first_line

TRACKER = "latest_checkpointed_iteration.txt"
TRACKER_LIMIT = 64  # bytes: "release" or an iteration number
ITERATION = re.compile(r"^(release|[0-9]{1,12})$")
SHARD_DIR = re.compile(r"^mp_rank_([0-9]{2})(?:_([0-9]{3}))?$")
# A rank's file (Megatron-LM has called it both names) and the iteration folder that holds it.
SHARD_FILE = re.compile(r"^(?:(.*)/)?mp_rank_([0-9]{2})(?:_([0-9]{3}))?/(?:model_optim_rng|model_rng)\.pt$")
FOLDER_DEPTH = 3  # tracker, iteration folder, rank folder: files deeper than this are not looked at
CHECKPOINT_VERSIONS = (0, 1, 2, 3)  # 1.0, 2.0 and 3.0 as Megatron wrote them; 0 when absent

# Row layout of the fused QKV by checkpoint_version (s: which of Q/K/V, n: head, d: dim within the head).
QKV_LAYOUTS = {0: "snd", 1: "nds", 2: "nsd"}


def qkv_layout(version) -> str:
    """Layout for a ``checkpoint_version`` (absent = 0; 1.0 may be stored as int 1; 3.0 and Core = 2.0's)."""
    return QKV_LAYOUTS[min(int(version or 0), 2)]


def deinterleave_qkv(tensor: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """``[3*heads*d, ...]`` rows in ``layout`` -> a ``[3, heads, d, ...]`` view ([Q, K, V] first)."""
    sizes = {"s": 3, "n": heads, "d": tensor.shape[0] // (3 * heads)}
    grid = tensor.reshape(*(sizes[axis] for axis in layout), *tensor.shape[1:])
    return grid.permute(*(layout.index(axis) for axis in "snd"), *range(3, grid.dim()))


def interleave_qkv(qkv: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of ``deinterleave_qkv``: ``[3, heads, d, ...]`` -> fused rows in ``layout``."""
    return qkv.permute(*("snd".index(axis) for axis in layout), *range(3, qkv.dim())).reshape(-1, *qkv.shape[3:])


class Files:
    """A checkpoint's files in a folder or inside a zip archive, which is read in place (no extraction)."""

    def __init__(self, path: Path):
        self.path = path
        self.archive = None
        if path.is_dir():
            self.names = sorted(_files_under(path, FOLDER_DEPTH))
        else:
            try:
                self.archive = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise CheckpointError(f"not a valid zip archive (truncated or corrupt?): {error}", path) from None
            self.names = sorted(n for n in self.archive.namelist() if not n.endswith("/"))

    def display(self, name: str) -> Path:
        return self.path / name

    def read_tracker(self, name: str) -> str:
        """The iteration folder a ``latest_checkpointed_iteration.txt`` names (read at most TRACKER_LIMIT bytes)."""
        if not self.archive:
            return read_tracker(self.path / name)
        info = self._member(name)
        if info.file_size > TRACKER_LIMIT:
            raise CheckpointError(f"is {info.file_size:,} bytes; a tracker file is 'release' or an iteration number",
                                  self.display(name))
        try:
            with self._open(info) as f:
                data = f.read(TRACKER_LIMIT + 1)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as error:
            raise CheckpointError(f"cannot read the zip member: {first_line(error, 200)}", self.display(name)) from None
        return iteration_folder(data, self.display(name))

    def load(self, name: str):
        if not self.archive:
            return load_file(self.path / name)
        info = self._member(name)
        with self._open(info) as f:
            return torch_load(f, self.display(name), size=info.file_size)

    def _member(self, name: str) -> zipfile.ZipInfo:
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError("missing member", self.display(name)) from None
        if info.flag_bits & 1:
            raise CheckpointError("the zip member is encrypted; mbexport reads only unencrypted archives",
                                  self.display(name))
        if info.file_size > INFLATE_FLOOR and info.file_size > INFLATE_RATIO * info.compress_size:
            raise CheckpointError(f"the zip member would inflate {info.file_size // max(info.compress_size, 1):,}x "
                                  f"({info.compress_size:,} to {info.file_size:,} bytes); model weights barely "
                                  "compress, so this is not read (a zip bomb?)", self.display(name))
        if info.compress_type not in ZIP_METHODS:
            raise CheckpointError(f"the zip member uses compression method {info.compress_type}, which mbexport "
                                  "cannot read (stored, deflate, bzip2 and lzma are read)", self.display(name))
        return info

    def _open(self, info: zipfile.ZipInfo):
        """A stored member straight from the archive; others through zipfile (seekable, but slower)."""
        if info.compress_type == zipfile.ZIP_STORED:
            return io.BufferedReader(StoredMember(self.path, info), 1 << 20)
        return self.archive.open(info)


ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
# A zip member over INFLATE_FLOOR bytes may inflate at most INFLATE_RATIO times: weights (floats) barely
# compress (about 1.1x with deflate), zeros and junk a thousandfold.
INFLATE_FLOOR, INFLATE_RATIO = 1 << 26, 10


def _files_under(folder: Path, depth: int) -> list[str]:
    """Relative paths of the files at most ``depth`` levels down (a checkpoint is never deeper)."""
    found, level = [], [folder]
    for _ in range(depth):
        below = []
        for directory in level:
            for entry in sorted(directory.iterdir()):
                if entry.is_file():
                    found.append(entry.relative_to(folder).as_posix())
                elif entry.is_dir() and not entry.name.startswith("."):
                    below.append(entry)
        level = below
    return found


class StoredMember(io.RawIOBase):
    """An uncompressed zip member as a seekable file: reads go from the archive into torch's storages."""

    def __init__(self, archive: Path, info: zipfile.ZipInfo):
        super().__init__()
        self._file = open(archive, "rb", buffering=0)
        self._file.seek(info.header_offset)
        header = self._file.read(30)  # local file header: its name and extra lengths can differ from the index
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            self._file.close()
            raise CheckpointError(f"corrupt zip: bad local header for {info.filename}", archive)
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        self._start = info.header_offset + 30 + name_length + extra_length
        self._size = info.file_size
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._position))
        self._file.seek(self._start + self._position)
        read = self._file.readinto(memoryview(buffer).cast("B")[:count]) if count else 0
        self._position += read
        return read

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass
class Shard:
    """One rank's file: its model chunks flattened (one per virtual pipeline stage) and its metadata."""

    file: Path
    tp: int
    pp: int
    chunks: list[dict[str, torch.Tensor]]
    args: object = None
    version: float | None = None
    iteration: int | None = None
    mcore: bool = field(default=False)
    fp8_scaling: bool = False  # Transformer Engine _extra_state holds FP8 scaling factors (not used)


def read_tracker(path: Path) -> str:
    """The iteration folder a tracker file on disk names."""
    size = path.stat().st_size
    if size > TRACKER_LIMIT:
        raise CheckpointError(f"is {size:,} bytes; a tracker file is 'release' or an iteration number", path)
    with open(path, "rb") as f:
        return iteration_folder(f.read(TRACKER_LIMIT + 1), path)


def iteration_folder(data: bytes, path: Path) -> str:
    """The folder a tracker file's bytes name: ``release`` or ``iter_0000123`` (ASCII digits only)."""
    text = data.strip().decode("utf-8", errors="replace")
    if len(data) > TRACKER_LIMIT or not ITERATION.match(text):
        raise CheckpointError(f"{TRACKER} says {shown(text)}, expected 'release' or an iteration number (ASCII "
                              "digits)", path)
    return "release" if text == "release" else f"iter_{int(text):07d}"


def shard_files(files: Files) -> dict[tuple[int, int], str]:
    """``(tp, pp) -> file name`` in the iteration folder the tracker names, or in the only one there is."""
    by_folder: dict[str, dict[tuple[int, int], str]] = {}
    for name in files.names:
        match = SHARD_FILE.match(name)
        if match:
            by_folder.setdefault(match[1] or "", {})[(int(match[2]), int(match[3] or 0))] = name
    trackers = sorted((n for n in files.names if PurePosixPath(n).name == TRACKER), key=len)
    if trackers:
        iteration = files.read_tracker(trackers[0])
        folder = (PurePosixPath(trackers[0]).parent / iteration).as_posix()
        if folder not in by_folder:
            raise CheckpointError(f"{TRACKER} names {iteration}, which has no mp_rank_*/model_optim_rng.pt "
                                  "(missing member?)", files.path)
        return by_folder[folder]
    if len(by_folder) != 1:
        problem = "several iterations and no " + TRACKER if by_folder else "no mp_rank_*/model_optim_rng.pt"
        raise CheckpointError(f"{problem}: missing member or not a Megatron checkpoint", files.path)
    return next(iter(by_folder.values()))


def load_file(path: Path):
    with open(path, "rb") as f:
        is_zip_format = f.read(4) == ZIP_MAGIC  # mmap works only with PyTorch's zip serialization
    return torch_load(path, path, mmap=is_zip_format)


def read_shard(data, path: Path, tp: int, pp: int) -> Shard:
    """Keep only what conversion needs from one rank's file (the model, args, version, iteration)."""
    if not isinstance(data, dict):
        raise CheckpointError("not a Megatron checkpoint (top level is not a dict)", path)
    keys = ["model"] if "model" in data else sorted((k for k in data if re.fullmatch(r"model[0-9]{1,3}", str(k))),
                                                    key=lambda k: int(k[5:]))
    if not keys:
        raise CheckpointError("not a Megatron checkpoint (no 'model' entry)", path)
    chunks = [flatten(data[k], path) for k in keys]
    mcore = not any(key.startswith("language_model.") for chunk in chunks for key in chunk)
    extra_states = [extra_state_bytes(v) for chunk in chunks for k, v in chunk.items() if k.endswith("_extra_state")]
    return Shard(path, tp, pp, chunks, data.get("args"), checkpoint_version(data.get("checkpoint_version"), path),
                 whole_number(data.get("iteration")), mcore, fp8_scaling(extra_states))


def checkpoint_version(value, path: Path) -> float | None:
    """``checkpoint_version`` as Megatron-LM wrote it (absent, 0, 1.0, 2.0 or 3.0); anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in CHECKPOINT_VERSIONS:
        raise CheckpointError(f"checkpoint_version {shown(value)} is not one Megatron-LM writes (absent, 0, 1.0, 2.0, "
                              "3.0)", path)
    return float(value)


def whole_number(value) -> int | None:
    """A recorded count (iteration, real vocab size) when it is a plain non-negative int; None otherwise, since it
    is only reported."""
    return value if type(value) is int and 0 <= value < 1 << 63 else None


# Keys Transformer Engine pickles into _extra_state only for delayed FP8 scaling (amax history and scales), as
# Megatron-LM's _FP8_PERSISTENT_EXTRA_STATE_MARKERS (megatron/training/checkpointing.py) recognizes them.
FP8_MARKERS = (b"amax_history_fwd", b"scale_fwd", b"scale_bwd")


def extra_state_bytes(value) -> bytes:
    """The serialized bytes of a Transformer Engine ``_extra_state``: a uint8 tensor, a pickled BytesIO (an inert
    stand-in here) or raw bytes; nothing of it is unpickled."""
    if isinstance(value, torch.Tensor):
        return value.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    state = getattr(value, "state", None) or getattr(value, "args", None) or ()
    return b"".join(part for part in state if isinstance(part, (bytes, bytearray)))


def fp8_scaling(extra_states: list[bytes]) -> bool:
    return any(marker in blob for blob in extra_states for marker in FP8_MARKERS)


def flatten(tree, path: Path, prefix: str = "", depth: int = 0) -> dict:
    if not isinstance(tree, dict):
        raise CheckpointError(f"'{prefix or 'model'}' is not a dict of tensors", path)
    if depth > 8:
        raise CheckpointError(f"'{prefix}' is nested deeper than any Megatron model", path)
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, path, f"{name}.", depth + 1) if isinstance(value, dict) else {name: value})
    return flat


def merge_shards(shards: list[Shard], heads: int, *, lazy: bool = False
                 ) -> tuple[dict[str, torch.Tensor] | LazyTensors, list[str]]:
    """Join pipeline stages and merge tensor-parallel ranks into Hugging Face names (consumes ``shards``); also
    return notes on what was read differently from the file (see ``_to_hf_names``).

    ``lazy``: merge each tensor only when it is read (``LazyTensors``), so the merged model is never held whole.
    """
    tp = 1 + max(s.tp for s in shards)
    pp = 1 + max(s.pp for s in shards)
    grid = {(s.tp, s.pp) for s in shards}
    missing = sorted({(t, p) for t in range(tp) for p in range(pp)} - grid)
    if missing:
        t, p = missing[0]
        rank = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
        raise CheckpointError(f"missing shard {rank}", shards[0].file.parent.parent)
    versions = {str(s.version) for s in shards}
    if len(versions) > 1:
        raise CheckpointError(f"shards disagree on checkpoint_version ({', '.join(sorted(versions))})", shards[0].file)
    layout = "nsd" if shards[0].mcore else qkv_layout(shards[0].version)
    ranks = [_join_stages([s for s in shards if s.tp == t], pp) for t in range(tp)]
    if heads % tp:
        raise CheckpointError(f"{heads} attention heads cannot be split over {tp} tensor-parallel ranks "
                              "(set the head count with --num-heads)", shards[0].file)
    shards.clear()
    merged, notes = _merge_ranks(ranks, heads, layout)
    return (merged if lazy else merged.materialized()), notes


def _join_stages(stages: list[Shard], pp: int) -> tuple[Path, dict[str, torch.Tensor]]:
    """One tensor-parallel rank's canonical tensors with global layer numbers.

    Chunk ``v`` of stage ``s`` holds layers ``(v * pp + s) * per_chunk + local`` (Megatron's interleaving).
    """
    per_chunk = 1 + max((names.split_layer(n)[0] or 0 for s in stages for c in s.chunks for k in c
                         if (n := names.canonical(k))), default=0)
    joined: dict[str, torch.Tensor] = {}
    for stage in sorted(stages, key=lambda s: s.pp):
        for v, chunk in enumerate(stage.chunks):
            for key, tensor in chunk.items():
                name = names.canonical(key)
                if name is None:
                    continue
                if not names.is_known(name):
                    raise CheckpointError(f"unexpected tensor {key[:200]}{'...' if len(key) > 200 else ''}", stage.file)
                layer, rest = names.split_layer(name)
                if layer is not None:
                    name = f"layers.{(v * pp + stage.pp) * per_chunk + layer}.{rest}"
                if name in joined:
                    raise CheckpointError(f"{key} appears twice (in two pipeline stages?)", stage.file)
                joined[name] = tensor
            chunk.clear()
    return stages[0].file, joined


def _merge_ranks(ranks: list[tuple[Path, dict]], heads: int, layout: str) -> tuple[LazyTensors, list[str]]:
    """Check the ranks against each other and list how each Hugging Face tensor is made from their parts."""
    (file0, first), tp = ranks[0], len(ranks)
    for file, rank in ranks[1:]:
        if rank.keys() != first.keys():
            odd = sorted(rank.keys() ^ first.keys())[0]
            raise CheckpointError(f"tensor-parallel shards disagree: {odd} is not in every rank", file)
    merged = LazyTensors()
    for name in list(first):
        parts = [rank.pop(name) for _, rank in ranks]
        files = [file for file, _ in ranks]
        layer, rest = names.split_layer(name)
        for file, part in zip(files, parts):
            if not isinstance(part, torch.Tensor):
                raise CheckpointError(f"{name} is not a tensor ({type(part).__name__})", file)
        if rest.startswith(names.QKV):
            per_rank = 3 * (heads // tp)
            bad = [f for f, p in zip(files, parts) if p.shape[0] % per_rank]
            if bad:
                raise CheckpointError(f"{name} has {parts[0].shape[0]} rows, not a multiple of 3 x {heads // tp} "
                                      "heads", bad[0])
            _check_concat(parts, None, name, files)  # every rank: 3 x heads/tp x the same head dim
            param = rest.rpartition(".")[2]
            for index, module in enumerate(names.QKV_TO_HF):
                merged.add(f"bert.encoder.layer.{layer}.{module}.{param}", _qkv_part(index, heads // tp, layout),
                           *parts)
        elif rest in names.TP_SPLIT_DIM:
            dim = names.TP_SPLIT_DIM[rest]
            _check_concat(parts, dim, name, files)
            merged.add(name, _cat(dim) if tp > 1 else _first, *parts)
        else:
            for file, part in zip(files[1:], parts[1:]):
                if part.shape != parts[0].shape or not torch.equal(part, parts[0]):
                    raise CheckpointError(f"tensor-parallel shards disagree on replicated tensor {name}", file)
            merged.add(name, _first, parts[0])
    return _to_hf_names(merged, file0)


# How each merged tensor is made from the ranks' parts (``LazyTensors`` recipes: ``out`` receives it, if given).
def _first(tensor: torch.Tensor, *others: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return tensor if out is None else out.copy_(tensor)


def _cat(dim: int):
    return lambda *parts, out=None: torch.cat(parts, dim, out=out)


def _qkv_part(index: int, heads: int, layout: str):
    """The recipe of Q (0), K (1) or V (2) from every rank's fused QKV rows."""
    def make(*parts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        pieces = [deinterleave_qkv(part, heads, layout)[index] for part in parts]  # [heads, d, ...] views
        shape = (len(pieces) * heads, *pieces[0].shape[1:])
        if out is not None:
            torch.cat(pieces, 0, out=out.view(shape))
            return out
        whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        return whole.reshape(-1, *whole.shape[2:])
    return make


def _check_concat(parts: list[torch.Tensor], dim: int | None, name: str, files: list[Path]) -> None:
    """Parts that ``torch.cat`` joins along ``dim`` (None: of one shape) must agree on every other dim."""
    for file, part in zip(files[1:], parts[1:]):
        same_dims = [size for i, size in enumerate(part.shape) if i != dim]
        if part.dim() != parts[0].dim() or same_dims != [size for i, size in enumerate(parts[0].shape) if i != dim]:
            raise CheckpointError(f"tensor-parallel shards disagree on the shape of {name}: "
                                  f"{list(part.shape)} vs {list(parts[0].shape)}", file)


def _to_hf_names(merged: LazyTensors, file: Path) -> tuple[LazyTensors, list[str]]:
    """Hugging Face names, with Megatron-Core's optional output layer made to fit Hugging Face's MLM head.

    ``BertModel(apply_lm_head=False)`` projects the encoder output straight to the vocab: no ``lm_head``, an
    ``output_layer`` Hugging Face's MegatronBert cannot express, so it is left out (no masked-LM head).
    ``output_layer_bias=False`` has no bias: a zero bias is the same function."""
    notes = []
    if not any(name.startswith("lm_head.dense.") for name in merged):
        if {"lm_head.bias", names.UNTIED_OUTPUT} & merged.keys():
            notes.append("the checkpoint's output_layer has no BertLMHead (apply_lm_head=False): it is not read, and "
                         "there is no masked-LM head")
        merged = merged.selected([name for name in merged if name not in ("lm_head.bias", names.UNTIED_OUTPUT)])
    untied = merged.pop(names.UNTIED_OUTPUT, None)
    zero_bias = "lm_head.dense.weight" in merged and "lm_head.bias" not in merged
    word = merged.get("word_embeddings.weight") if untied is not None or zero_bias else None  # made only if needed
    if untied is not None and (word is None or untied.shape != word.shape or not torch.equal(untied, word)):
        raise CheckpointError("output_layer.weight is not tied to the word embeddings, which Hugging Face's "
                              "MegatronBert requires", file)
    if zero_bias and isinstance(word, torch.Tensor):
        merged.add("lm_head.bias", _first, torch.zeros(word.shape[0], dtype=word.dtype))
        notes.append("output_layer has no bias (output_layer_bias=False): read as a zero bias")
    return merged.renamed(lambda name: name if name.startswith("bert.") else names.to_hf(name)), notes
