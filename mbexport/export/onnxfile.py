"""Reading and writing ONNX files a tensor at a time; every write staged, shape-inferred, fully checked, then
moved into place.

Every ONNX file mbexport writes goes through ``checked_onnx``, so no file under its final name was ever
unchecked or half written, external data included. Writers stage the weights as external data: the checks
then load only the graph, and a model under 2 GB is assembled into one file a tensor at a time. Readers that
rewrite a model (the fp16 pass) take its graph without the weights (``read_weightless``) and each weight's
bytes only when they write it (``Weight.read``, ``save_with_weights``), whether the weights are inside the
file or in external data. So no step holds a second copy of the weights, or even a first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mbexport.errors import MbexportError, first_line
from mbexport.fsutil import temp_prefix
from mbexport.manifest import external_data_name

PROTOBUF_LIMIT = 2**31  # a ModelProto cannot serialize beyond 2 GB: weights go to external data
EXTERNAL_THRESHOLD = PROTOBUF_LIMIT - (64 << 20)  # leave room for the graph itself
# External data layout: tensors under 1 KB stay in the graph; those over 1 MiB start on a 4 KiB page, so
# ONNX Runtime can memory-map them (onnxruntime's ModelSavingOptions: align_threshold, on_disk_alignment).
INLINE_BELOW = 1024
ALIGN_ABOVE, ALIGNMENT = 1 << 20, 4096
_GRAPH_FIELD = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_INITIALIZER_FIELD = b"\x2a"  # GraphProto.initializer: field 5, length-delimited
_RAW_DATA_FIELD = b"\x4a"  # TensorProto.raw_data: field 9, length-delimited
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9
_TYPED_DATA = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
_LENGTH_DELIMITED = 2


def readers(graph) -> dict[str, list]:
    """For an ONNX GraphProto: each value name -> the nodes that read it, in graph order."""
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def head_nodes(graph, source) -> set[int]:
    """Positions in ``graph.node`` of every node after the trunk's final LayerNormalization (the task head), found
    by the pre-LN structure: inside the trunk each LayerNorm's input, the residual stream, also feeds the
    residual Add; the final LayerNorm's input feeds only it. (Positions, not ids: protobuf hands out a new
    wrapper per access, and a freed wrapper's id is reused.)"""
    nodes = list(graph.node)
    position = {id(node): i for i, node in enumerate(nodes)}
    consumers = readers(graph)
    final = next((n for n in nodes if n.op_type == "LayerNormalization" and len(consumers[n.input[0]]) == 1), None)
    if final is None:
        raise MbexportError("no final LayerNormalization: not a pre-LN Megatron-BERT export", source)
    head, frontier = set(), list(final.output)
    while frontier:
        for node in consumers.get(frontier.pop(), ()):
            if position[id(node)] not in head:
                head.add(position[id(node)])
                frontier += node.output
    return head


@contextlib.contextmanager
def checked_onnx(out_path: str | Path) -> Iterator[Path]:
    """Yield a path in a private temporary folder; write the model there (external data beside it or not).

    On success the file gets ONNX shape inference (saved into it) and ``onnx.checker``'s full check; then it
    lands at ``out_path``: as one file when its weights fit in 2 GB, else with ``external_data_name`` beside
    it (renamed first). On any failure nothing changes at ``out_path``.
    """
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out_path), dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        yield staged
        try:
            onnx.shape_inference.infer_shapes_path(str(staged), str(staged), check_type=True, strict_mode=True)
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise MbexportError(f"the written ONNX model fails onnx.checker ({first_line(error)})",
                                out_path) from None
        data, final_data = tmp / external_data_name(out_path), out_path.parent / external_data_name(out_path)
        if data.exists() and data.stat().st_size > EXTERNAL_THRESHOLD:
            os.replace(data, final_data)
        else:
            if data.exists():
                _inline(staged, tmp / "inlined.onnx")
                os.replace(tmp / "inlined.onnx", staged)
            final_data.unlink(missing_ok=True)  # a stale file from an earlier, larger export
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Weight:
    """An initializer of an ONNX file without its bytes: ``tensor`` holds its name, type and shape, no data;
    the bytes stay in ``file`` (a tensor the file stores in typed fields, always small, keeps them in ``inline``),
    or, for one a rewrite derives from others (ONNX Runtime's packed QKV weight), ``compute`` makes them."""

    tensor: object  # onnx.TensorProto
    file: Path | None = None
    offset: int = 0
    length: int = 0
    external: bool = False  # in an external data file, not inside the model file
    inline: bytes = b""
    compute: Callable[[], bytes] | None = None

    def read(self) -> bytes:
        """The tensor's raw little-endian bytes, read (or computed) now."""
        if self.compute is not None:
            return self.compute()
        if self.file is None:
            return self.inline
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise MbexportError(f"{self.tensor.name}: the data ends {self.length - len(data)} bytes early", self.file)
        return data


def read_weightless(path: str | Path):
    """``path``'s ModelProto without initializers, and its initializers as ``Weight``s, in file order.

    Reads the protobuf framing itself and skips over every tensor's bytes, so memory stays the size of the
    graph however large the weights, inside the file or in external data beside it.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    skeleton, graph, weights = bytearray(), bytearray(), []
    try:
        with open(path, "rb") as f:
            for number, wire, head, start, end in _fields(f, 0, os.fstat(f.fileno()).st_size):
                if number != _GRAPH or wire != _LENGTH_DELIMITED:
                    skeleton += head + _read(f, start, end)
                    continue
                for number2, wire2, head2, start2, end2 in _fields(f, start, end):
                    if number2 == _INITIALIZER and wire2 == _LENGTH_DELIMITED:
                        weights.append(_weight(f, path, start2, end2))
                    else:
                        graph += head2 + _read(f, start2, end2)
        model = onnx.ModelProto.FromString(bytes(skeleton + _GRAPH_FIELD + _varint(len(graph)) + graph))
    except (ValueError, EOFError, DecodeError) as error:
        raise MbexportError(f"not an ONNX model ({first_line(error)})", path) from None
    return model, weights


def save_model(model, path: str | Path) -> Path:
    """Save a ModelProto held in memory with its weights for ``checked_onnx``: weights as external data, which
    it inlines when they fit (for stages that rewrite the whole model in memory: quantization, ORT's shape)."""
    import onnx

    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data_name(path), size_threshold=INLINE_BELOW)
    return path


def save_with_weights(model, weights: Iterable[tuple[object, bytes]], path: str | Path) -> Path:
    """Save ``model`` with its initializers, (TensorProto without data, raw bytes) pairs taken one at a time,
    as ``checked_onnx`` expects: bytes from 1 KB as external data beside ``path`` (large ones page-aligned),
    which ``checked_onnx`` inlines when they fit in one file."""
    import onnx

    path = Path(path)
    location = external_data_name(path)
    with open(path.parent / location, "wb") as data:
        for tensor, raw in weights:
            if len(raw) < INLINE_BELOW:
                tensor.raw_data = raw
            else:
                if len(raw) > ALIGN_ABOVE:
                    data.seek(-data.tell() % ALIGNMENT, os.SEEK_CUR)
                offset = data.tell()
                data.write(raw)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    tensor.external_data.add(key=key, value=str(value))
            model.graph.initializer.append(tensor)
            del raw  # before the next tensor is made
    onnx.save_model(model, str(path))
    return path


def weights_by_reference(path: str | Path, edit: Callable[[object], None] | None = None) -> bytes:
    """``path``'s model, serialized with every weight from 1 KB on as external data that points at its bytes
    where they are: inside the model file itself, or in its external data file. ONNX Runtime, given these
    bytes and the file's folder (session.model_external_initializers_file_folder_path), memory-maps the
    weights instead of parsing them into a copy. ``edit`` may change the model (without its weights) first:
    calibration adds the outputs it reads."""
    import onnx

    path = Path(path)
    model, weights = read_weightless(path)
    if edit is not None:
        edit(model)
    for weight in weights:
        tensor = weight.tensor
        if weight.file is None or weight.length < INLINE_BELOW:  # shape constants: ORT's checks read them
            tensor.raw_data = weight.read()
        else:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", weight.file.name), ("offset", weight.offset), ("length", weight.length)):
                tensor.external_data.add(key=key, value=str(value))
        model.graph.initializer.append(tensor)
    return model.SerializeToString()


def held(name: str, values: np.ndarray, data_type: int | None = None) -> Weight:
    """``values`` (small, or computed now) as a ``Weight`` for ``save_with_weights``; ``data_type`` where numpy's
    type does not say it (float8e4m3fn)."""
    from onnx import TensorProto, helper

    data_type = helper.np_dtype_to_tensor_dtype(values.dtype) if data_type is None else data_type
    return Weight(TensorProto(name=name, dims=values.shape, data_type=data_type), inline=values.tobytes())


def array(weight: Weight) -> np.ndarray:
    """A weight's values as a numpy array of its type and shape, read now."""
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(weight.tensor.data_type)
    return np.frombuffer(weight.read(), dtype=dtype.newbyteorder("<")).reshape(tuple(weight.tensor.dims))


def _weight(f, path: Path, start: int, end: int) -> Weight:
    """An initializer's TensorProto read without its raw_data, and where that data lies."""
    import onnx

    head, raw = bytearray(), None
    for number, _, field_head, field_start, field_end in _fields(f, start, end):
        if number == _RAW_DATA:
            raw = (field_start, field_end)
        else:
            head += field_head + _read(f, field_start, field_end)
    tensor = onnx.TensorProto.FromString(bytes(head))
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        if raw:
            return Weight(tensor, path, raw[0], raw[1] - raw[0])
        from onnx import numpy_helper

        inline = numpy_helper.to_array(tensor).tobytes()
        for name in _TYPED_DATA:
            tensor.ClearField(name)
        return Weight(tensor, inline=inline)
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location or location != Path(location).name or location in (".", ".."):
        raise MbexportError(f"{tensor.name}: external data location '{location}' is not a file beside the model",
                            path)
    if "length" not in info:
        raise MbexportError(f"{tensor.name}: external data without a length", path)
    tensor.ClearField("data_location")
    del tensor.external_data[:]
    return Weight(tensor, path.parent / location, int(info.get("offset", 0)), int(info["length"]), external=True)


def _fields(f, start: int, end: int) -> Iterator[tuple[int, int, bytes, int, int]]:
    """Protobuf fields between ``start`` and ``end`` of ``f``: (number, wire type, key and length bytes, value
    start, value end); a length-delimited value is its payload, any other its encoded bytes."""
    position = start
    while position < end:
        f.seek(position)
        window = f.read(min(20, end - position))
        key, used = _read_varint(window, 0)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, size = _read_varint(window, used)
            value_start, value_end = position + used, position + size
        elif wire in (1, 5):
            value_start, value_end = position + used, position + used + (8 if wire == 1 else 4)
        elif wire == _LENGTH_DELIMITED:
            length, used_length = _read_varint(window, used)
            value_start = position + used_length
            value_end, used = value_start + length, used_length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {position}")
        if value_end > end:
            raise ValueError(f"truncated protobuf field at byte {position}")
        yield number, wire, window[:used], value_start, value_end
        position = value_end


def _read(f, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise EOFError("the file ends inside a field")
    return data


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("malformed protobuf varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if not byte & 0x80:
            return value, position


def _inline(path: Path, out: Path) -> None:
    """Write ``path`` (weights in external data) as one self-contained file, streaming the weights.

    Protobuf merges repeated occurrences of a message field, so the model without its weights followed by
    one ``graph`` fragment per initializer parses, in every ONNX reader, as the whole model. Each fragment's
    ``raw_data`` field is framed by hand and its bytes copied straight from the data file: weights never
    pass through a protobuf message, whose arena would keep every one of them alive until the end.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    del model.graph.initializer[:]
    with open(out, "wb") as f:
        f.write(model.SerializeToString())
        for tensor in tensors:
            size, source = 0, None
            if uses_external_data(tensor):
                info = {entry.key: entry.value for entry in tensor.external_data}
                size, source = int(info["length"]), (path.parent / info["location"], int(info.get("offset", 0)))
                tensor.ClearField("data_location")  # absent, as in a tensor that was never external
                del tensor.external_data[:]
            head = tensor.SerializeToString() + (_RAW_DATA_FIELD + _varint(size) if source else b"")
            tensor_size = len(head) + size
            initializer = _INITIALIZER_FIELD + _varint(tensor_size)
            f.write(_GRAPH_FIELD + _varint(len(initializer) + tensor_size) + initializer + head)
            if source:
                with open(source[0], "rb") as data:
                    data.seek(source[1])
                    _copy(data, f, size)


def _copy(src, dst, size: int, chunk: int = 16 << 20) -> None:
    while size:
        block = src.read(min(chunk, size))
        if not block:
            raise OSError(f"external data ends {size} bytes early")
        dst.write(block)
        size -= len(block)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
