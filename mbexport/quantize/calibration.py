"""Calibration batches: real text tokenized with the checkpoint's vocab, or seeded token ids as a fallback.

Activation ranges decide INT8/FP8 accuracy, so they should come from text like the model will see. Without
text, ``mbexport.inputs.sample_batch`` supplies realistic-looking ids; the quantized model then runs, but
its accuracy says little about real traffic, hence the warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.errors import MbexportError
from mbexport.inputs import sample_batch
from mbexport.tasks import Task, get_task
from mbexport.text import encode, load_tokenizer, read_lines

BATCH = 16  # rows per calibration batch: enough for stable ranges, small enough for large vocabularies


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
