"""Writing ONNX files: staged in a hidden folder, shape-inferred, fully checked, then moved into place.

Every ONNX file mbexport writes (fp32, fp16, and the quantizer's Q/DQ models) goes through ``checked_onnx``,
so no file under its final name was ever unchecked or half written, external data included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from mbexport.errors import MbexportError

PROTOBUF_LIMIT = 2**31  # a ModelProto cannot serialize beyond 2 GB: weights go to external data
EXTERNAL_THRESHOLD = PROTOBUF_LIMIT - (64 << 20)  # leave room for the graph itself


def external_data_name(onnx_path: str | Path) -> str:
    """The one external data file name mbexport uses: ``model.fp32.onnx.data`` beside ``model.fp32.onnx``."""
    return Path(onnx_path).name + ".data"


@contextlib.contextmanager
def checked_onnx(out_path: str | Path) -> Iterator[Path]:
    """Yield a path in a private temporary folder; write the model (and external data) there.

    On success the file gets ONNX shape inference (saved into it) and ``onnx.checker``'s full check, then it
    and its external data are renamed into ``out_path``'s folder, the data first. On any failure nothing
    changes at ``out_path``.
    """
    import onnx

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        staged = tmp / out_path.name
        yield staged
        try:
            onnx.shape_inference.infer_shapes_path(str(staged), str(staged), check_type=True, strict_mode=True)
            onnx.checker.check_model(str(staged), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise MbexportError(f"the written ONNX model fails onnx.checker ({str(error).splitlines()[0]})",
                                out_path) from None
        data = out_path.parent / external_data_name(out_path)
        if (tmp / data.name).exists():
            os.replace(tmp / data.name, data)
        else:
            data.unlink(missing_ok=True)  # a stale file from an earlier, larger export
        os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, path: str | Path) -> Path:
    """Save a ModelProto, with external data (one file, ``external_data_name``) when it would pass 2 GB."""
    import onnx

    path = Path(path)
    size = sum(len(t.raw_data) or 0 for t in model.graph.initializer)
    onnx.save_model(model, str(path), save_as_external_data=size > EXTERNAL_THRESHOLD,
                    all_tensors_to_one_file=True, location=external_data_name(path), size_threshold=1024)
    return path
