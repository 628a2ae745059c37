"""Accuracy on a trained model: fp16, int8 and fp8, and the files shaped for ONNX Runtime (fp32, fp16 and int8 on
its integer kernels), keep at least 99% of fp32's dev accuracy (MLPerf's bar).

Random weights hide quantization damage; ``../shared/fixtures/tiny-trained`` is a small trained Megatron-BERT
(an NGC zip with its masked-LM head, a fine-tuned classifier folder) with calibration text, a dev split and
the fp32 figures with their protocol (its README). Each artifact goes through the real stages: load_checkpoint,
build_reference, export_onnx, then its precision's registry transform (quantized ones calibrated on the
fixture's text), and is run in ONNX Runtime on the CPU as its runtime runs it (exact Q/DQ for TensorRT's files,
integer kernels for ONNX Runtime's). Every 8th dev line is used, to keep the suite fast.
"""

from pathlib import Path

import numpy as np
import pytest

from accuracy_protocol import accuracy  # tests/accuracy_protocol.py: the fixture README's protocol
from mbexport.checkpoint import load_checkpoint
from mbexport.export import export_onnx
from mbexport.model import build_reference
from mbexport.precisions import EXPORTED, PRECISIONS, get_precision
from mbexport.quantize import calibration_batches
from mbexport.text import read_lines

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-trained"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"the trained fixture is not here ({FIXTURE})")
SOURCES = {"masked-lm": "megatron_bert_tiny_uncased.zip", "sequence-classification": "seqcls-hf"}
README_FP32 = {"masked-lm": (0.4520, 7191), "sequence-classification": (0.9976, 1246)}  # full dev set
EVERY = 8  # 156 dev lines, 984 masked tokens
CALIBRATION = 32


def dev(every=1):
    texts = read_lines(FIXTURE / "dev.txt")
    labels = [int(x) for x in (FIXTURE / "dev.labels").read_text().split()]
    return texts[::every], labels[::every]


@pytest.fixture(scope="module", params=list(SOURCES))
def scores(request, tmp_path_factory):
    """{precision label: Score} for one task, every artifact built from the fixture by the real stages."""
    task = request.param
    checkpoint = load_checkpoint(FIXTURE / SOURCES[task])
    model, seeded = build_reference(task, checkpoint.config, checkpoint.state_dict)
    assert not seeded
    folder = tmp_path_factory.mktemp(task)
    fp32 = export_onnx(model, folder / "model.fp32.onnx")
    batches = calibration_batches(task, checkpoint.config, text=FIXTURE / "calib.txt", vocab=FIXTURE / "vocab.txt",
                                  size=CALIBRATION)
    paths = {EXPORTED: (fp32, get_precision(EXPORTED))}
    for precision in PRECISIONS.values():
        if precision.transform is None:
            continue
        calibrated = {"mode": precision.name, "calibration": batches} if precision.calibrated else {}
        paths[precision.label] = (precision.transform(fp32, folder / precision.file_name("onnx"), **calibrated),
                                  precision)
    texts, labels = dev(EVERY)
    return task, {name: accuracy(path, task, FIXTURE / "vocab.txt", texts, None if task == "masked-lm" else labels,
                                 shaped_for=precision.runtime)
                  for name, (path, precision) in paths.items()}


def test_the_protocol_counts_what_the_readme_counts():
    texts, labels = dev()
    for task, (_, total) in README_FP32.items():
        rank = 2 if task == "masked-lm" else 1  # logits per token, or per row
        silent = accuracy(lambda feed: np.zeros(feed["input_ids"].shape[:rank] + (2,)), task, FIXTURE / "vocab.txt",
                          texts, labels)
        assert silent.total == total


def test_fp32_onnx_reproduces_the_readme_figure(scores):
    task, by_precision = scores
    # Close on every 8th line (44.11% and 100%); the full dev set gives the README's figures exactly
    # (3250 of 7191 masked tokens, 1243 of 1246 rows).
    assert abs(by_precision["fp32"].value - README_FP32[task][0]) < 0.015, by_precision["fp32"]


@pytest.mark.parametrize("precision", [p.label for p in PRECISIONS.values() if p.transform is not None])
def test_precision_keeps_99_percent_of_fp32_accuracy(scores, precision):
    task, by_precision = scores
    assert by_precision[precision].value >= 0.99 * by_precision["fp32"].value, (
        f"{task} {precision}: {by_precision[precision]} vs fp32 {by_precision['fp32']}")
