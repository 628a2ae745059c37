"""Calibration batches: real text tokenized with the checkpoint's vocab, or seeded token ids as a fallback.

Activation ranges decide INT8/FP8 accuracy, so they should come from text like the model will see. Without
text, ``mbexport.inputs.sample_batch`` supplies realistic-looking ids; the quantized model then runs, but
its accuracy says little about real traffic, hence the warning.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from pathlib import Path

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError, first_line
from mbexport.inputs import sample_batch
from mbexport.precisions import CALIBRATION_METHODS, DEFAULT_RUNTIME, made_by
from mbexport.tasks import Task, get_task
from mbexport.text import encode, load_tokenizer, read_lines

BATCH = 16  # rows per calibration batch: enough for stable ranges, small enough for large vocabularies
RUN_BYTES = 256 << 20  # a calibration run covers as many rows as keep its probed activations under this (one at least)


def calibration_batches(task: str | Task, config: MegatronBertConfig, *, text: str | Path | None = None,
                        vocab: str | Path | None = None, size: int = 64, sequence: int = 128, seed: int = 0
                        ) -> list[dict[str, np.ndarray]]:
    """``size`` examples as feed dicts of up to ``BATCH`` rows, each padded to its longest row.

    With ``text`` (one example per line), ``size`` lines (all, if it has fewer) are drawn with ``seed`` and
    encoded with ``vocab``; multiple-choice rows take two lines each, as two choices. Without text, seeded ids
    are used (with a warning).
    """
    task = get_task(task) if isinstance(task, str) else task
    if size < 1:
        raise MbexportError(f"calibration size must be at least 1, got {size}")
    if not 2 < sequence <= config.max_position_embeddings:
        raise MbexportError(f"calibration sequence length must be 3..{config.max_position_embeddings}, got {sequence}")
    if text is None:
        warnings.warn("no calibration text: calibrating on seeded random token ids, so the quantized model's "
                      "accuracy on real text is not represented", stacklevel=2)
        return [sample_batch(task, config, min(BATCH, size - start), sequence, seed=seed + start, vocab=vocab)
                for start in range(0, size, BATCH)]
    if vocab is None:
        raise MbexportError("calibration text needs the checkpoint's vocab (--vocab) to be tokenized", text)
    lines = read_lines(text)
    choices = 2 if task.has_choices else 1
    wanted = min(size, len(lines) // choices) * choices
    if not wanted:
        raise MbexportError(f"a multiple-choice example needs {choices} lines, it has {len(lines)}", text)
    picked = np.sort(np.random.default_rng(seed).choice(len(lines), wanted, replace=False))
    tokenizer = load_tokenizer(vocab)
    batches = []
    for start in range(0, wanted, BATCH * choices):
        feed = encode(tokenizer, [lines[i] for i in picked[start:start + BATCH * choices]], max_length=sequence,
                      pad_to_max=False)
        if choices > 1:
            feed = {name: array.reshape(-1, choices, array.shape[-1]) for name, array in feed.items()}
        batches.append({name: feed[name] for name in task.input_names})
    return batches


def check_request(fp32_path: str | Path, mode: str, method: str, calibration: list, runtime: str) -> Path:
    """Refuse, in one line, a quantization ``runtime``'s quantize stage does not make, an unknown method, no
    calibration or a missing fp32 file; the fp32 file's path."""
    made = made_by("quantize", runtime)
    if mode not in made:
        shaped = "" if runtime == DEFAULT_RUNTIME else f" for {runtime}"
        raise MbexportError(f"cannot quantize to '{mode}'{shaped}; choose one of: {', '.join(made)}")
    if method not in CALIBRATION_METHODS:
        raise MbexportError(f"unknown calibration method '{method}'; choose one of: {', '.join(CALIBRATION_METHODS)}")
    if not calibration:
        raise MbexportError("no calibration batches", fp32_path)
    if not Path(fp32_path).is_file():
        raise MbexportError("ONNX file not found", fp32_path)
    return Path(fp32_path)


def activation_ranges(fp32_path: str | Path, names: list[str], calibration: list[dict[str, np.ndarray]],
                      method: str) -> dict[str, tuple[float, float]]:
    """(low, high) of each tensor in ``names`` of the fp32 export over the calibration batches, in ONNX Runtime.

    The session memory-maps the file's weights (``runtime.ort_session(lean=True)``) and runs a batch in slices
    of rows whose probed activations fit ``RUN_BYTES`` (the whole batch for small models; one row at a time at
    345M), so memory is the weights plus a few rows' activations, whatever the calibration size. ``max``: each
    tensor's ReduceMin and ReduceMax run right after the node that makes it, and are folded into the running
    minimum and maximum (which slicing cannot change). ``entropy``: the tensors themselves are outputs, which
    ONNX Runtime's histogram collector folds in slice by slice (whole batches on small models, where the
    histograms grow exactly as Model Optimizer's do); the range is its KL-divergence threshold.
    """
    from onnx import helper
    from onnxruntime.quantization.calibrate import HistogramCollector

    from mbexport.runtime import ort_session

    wanted = set(names)
    reduced = {name: (f"mbexport_min_{i}", f"mbexport_max_{i}") for i, name in enumerate(names)}
    outputs = [out for pair in reduced.values() for out in pair] if method == "max" else names
    shapes = {}

    def reductions(names_made: list[str]) -> list:
        return [helper.make_node(op, [name], [out], keepdims=0) for name in names_made if name in wanted
                for op, out in zip(("ReduceMin", "ReduceMax"), reduced[name])]

    def probe(model) -> None:
        graph = model.graph
        shapes.update((v.name, [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                      for v in graph.value_info if v.name in wanted)
        if method == "max":  # each tensor's probes right after the node that makes it
            nodes = reductions([i.name for i in graph.input])
            for node in graph.node:
                nodes += [node, *reductions(node.output)]
            del graph.node[:]
            graph.node.extend(nodes)
        del graph.output[:]
        graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)

    session = ort_session(fp32_path, lean=True, edit=probe)

    def run(feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return session.run(outputs, feed)
        except Exception as error:  # ONNX Runtime raises its own types for a bad feed
            raise MbexportError(f"ONNX Runtime cannot run the calibration batches ({first_line(error)})",
                                fp32_path) from None

    def slices(feed: dict[str, np.ndarray]):
        rows, sequence = next(iter(feed.values())).shape[0], max(v.shape[-1] for v in feed.values())
        row_bytes = sum(4 * math.prod(d if isinstance(d, int) and d > 0 else 1 if d == "batch" else sequence
                                      for d in dims) for dims in shapes.values())
        step = max(1, RUN_BYTES // max(row_bytes, 1))
        for start in range(0, rows, step):
            yield run({name: array[start:start + step] for name, array in feed.items()})

    if method == "max":
        low, high = dict.fromkeys(names, np.inf), dict.fromkeys(names, -np.inf)
        for values in (values for feed in calibration for values in slices(feed)):
            for name, least, most in zip(names, values[0::2], values[1::2]):
                low[name], high[name] = min(low[name], float(least)), max(high[name], float(most))
        return {name: (low[name], high[name]) for name in names}
    collector = HistogramCollector("entropy", symmetric=False, num_bins=128, num_quantized_bins=128,
                                   percentile=99.999, scenario="same")
    with contextlib.redirect_stdout(io.StringIO()):  # the collector prints its progress
        for values in (values for feed in calibration for values in slices(feed)):
            collector.collect(dict(zip(names, values)))
        thresholds = collector.compute_collection_result()
    return {name: (float(thresholds[name][0]), float(thresholds[name][1])) for name in names}
