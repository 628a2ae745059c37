"""Task accuracy on labelled text, the trained fixture's protocol: what quantization costs where it matters.

Agreement with the fp32 reference (validate) says whether an artifact picks the same answers; accuracy on
held-out text says whether the answers it changes were right. Random weights cannot show this, so
quantization is judged on a trained model: masked-LM top-1 and sequence-classification accuracy, measured
as in ``fixtures/tiny-trained/README.md`` (the MLPerf bar: keep 99% of fp32's accuracy).

Rows are run in length order, each batch padded only to its longest row: with the finite attention mask
this gives the same predictions as padding everything to ``sequence`` at a fraction of the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from mbexport.deploy.serving import MASK
from mbexport.errors import MbexportError
from mbexport.runtime import ort_session
from mbexport.tasks import Task, get_task
from mbexport.text import encode, load_tokenizer

MASK_EVERY, MASK_AT = 7, 3  # masked-LM: mask every content position i with i % 7 == 3, all at once


@dataclass(frozen=True)
class Score:
    correct: int
    total: int

    @property
    def value(self) -> float:
        return self.correct / self.total

    def __str__(self) -> str:
        return f"{100 * self.value:.2f}% of {self.total}"


def accuracy(model: str | Path | Callable[[dict[str, np.ndarray]], np.ndarray], task: str | Task,
             vocab: str | Path, texts: list[str], labels: list[int] | None = None, *, sequence: int = 128,
             batch: int = 32) -> Score:
    """Masked-LM top-1 (over the masked tokens) or classification accuracy (against ``labels``).

    ``model`` is an ONNX file (run with ONNX Runtime on the CPU, exact Q/DQ) or a function from a feed dict
    to the task's first output. Each text is encoded as ``[CLS] text [SEP]``, truncated to ``sequence``.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.name not in ("masked-lm", "sequence-classification"):
        raise MbexportError(f"accuracy is measured for masked-lm and sequence-classification, not {task.name}")
    if task.name == "sequence-classification" and (labels is None or len(labels) != len(texts)):
        raise MbexportError(f"classification accuracy needs one label per text ({len(texts)})")
    tokenizer = load_tokenizer(vocab)
    feed = encode(tokenizer, texts, max_length=sequence)
    lengths = feed["attention_mask"].sum(axis=1)
    targets = feed["input_ids"]
    positions = np.arange(sequence)
    masked = (positions >= 1) & (positions < lengths[:, None] - 1) & (positions % MASK_EVERY == MASK_AT)
    if task.name == "masked-lm":
        feed["input_ids"] = np.where(masked, tokenizer.token_to_id(MASK), targets)
    run = _onnx_runner(model) if isinstance(model, (str, Path)) else model
    order = np.argsort(lengths, kind="stable")
    correct = 0
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = int(lengths[rows].max())
        predicted = np.asarray(run({name: feed[name][rows, :width] for name in task.input_names})).argmax(-1)
        if task.name == "masked-lm":
            hits = (predicted == targets[rows, :width]) & masked[rows, :width]
        else:
            hits = predicted == np.asarray(labels)[rows]
        correct += int(hits.sum())
    return Score(correct, int(masked.sum()) if task.name == "masked-lm" else len(texts))


def _onnx_runner(path: str | Path) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    session = ort_session(path)
    return lambda feed: session.run(None, feed)[0]
