"""Writing ONNX files: staged in a hidden folder, shape-inferred, fully checked, then moved into place.

Every ONNX file mbexport writes goes through ``checked_onnx``, so no file under its final name was ever
unchecked or half written, external data included. Writers stage the weights as external data: the checks
then load only the graph, and a model under 2 GB is assembled into one file a tensor at a time, so at the
345M shape no step holds a second or third copy of the weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mbexport.errors import MbexportError, first_line
from mbexport.fsutil import temp_prefix
from mbexport.manifest import external_data_name

PROTOBUF_LIMIT = 2**31  # a ModelProto cannot serialize beyond 2 GB: weights go to external data
EXTERNAL_THRESHOLD = PROTOBUF_LIMIT - (64 << 20)  # leave room for the graph itself
_GRAPH_FIELD = b"\x3a"  # ModelProto.graph: field 7, length-delimited
_INITIALIZER_FIELD = b"\x2a"  # GraphProto.initializer: field 5, length-delimited
_RAW_DATA_FIELD = b"\x4a"  # TensorProto.raw_data: field 9, length-delimited


def readers(graph) -> dict[str, list]:
    """For an ONNX GraphProto: each value name -> the nodes that read it, in graph order."""
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


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


def save_model(model, path: str | Path) -> Path:
    """Save a ModelProto for ``checked_onnx``: weights as external data, which it inlines when they fit."""
    import onnx

    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external_data_name(path), size_threshold=1024)
    return path


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
                tensor.data_location = onnx.TensorProto.DEFAULT
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
