"""Seeded, realistic model inputs for validation, calibration fallback, benchmarks and warm-up.

Polygraphy's default data (0/1 ids) exercises one embedding row; real traffic has [CLS] ... [SEP] ...
[SEP], two segments, varied lengths and padding. Everything here is numpy, keyed by registry input name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbexport.config import MegatronBertConfig
from mbexport.deploy.serving import CLS, PAD, SEP
from mbexport.tasks import Task


def special_ids(vocab: str | Path | None, config: MegatronBertConfig) -> dict[str, int]:
    """[PAD]/[CLS]/[SEP] ids from a vocab file, else the BERT WordPiece defaults (0/101/102) when they fit."""
    if vocab is not None:
        index = {tok: i for i, tok in enumerate(Path(vocab).read_text(encoding="utf-8").splitlines())}
        return {"pad": index.get(PAD, 0), "cls": index.get(CLS, 1), "sep": index.get(SEP, 2)}
    if config.vocab_size > 1000:
        return {"pad": 0, "cls": 101, "sep": 102}
    return {"pad": 0, "cls": 2, "sep": 3}


def sample_batch(task: Task, config: MegatronBertConfig, batch: int, sequence: int, *, seed: int = 0,
                 num_choices: int = 2, vocab: str | Path | None = None, all_padding_row: bool = False
                 ) -> dict[str, np.ndarray]:
    """One feed dict: rows of random length (the first full), two segments, right padding.

    ``all_padding_row`` makes the last row pure padding, which must still give finite outputs.
    """
    rng = np.random.default_rng(seed)
    ids = special_ids(vocab, config)
    rows = batch * (num_choices if task.has_choices else 1)
    first_word = max(ids.values()) + 1
    input_ids = np.full((rows, sequence), ids["pad"], dtype=np.int64)
    attention_mask = np.zeros((rows, sequence), dtype=np.int64)
    token_type_ids = np.zeros((rows, sequence), dtype=np.int64)
    for row in range(rows):
        length = sequence if row == 0 else int(rng.integers(min(sequence, 3), sequence + 1))
        # Zipf-like ids: frequent tokens dominate, as in text.
        words = first_word + (rng.zipf(1.3, size=length) - 1) % (config.vocab_size - first_word)
        words[0], words[length - 1] = ids["cls"], ids["sep"]
        split = max(1, length // 2)
        if length > 3:
            words[split] = ids["sep"]
            token_type_ids[row, split + 1:length] = 1 if config.type_vocab_size > 1 else 0
        input_ids[row, :length] = words
        attention_mask[row, :length] = 1
    if all_padding_row and rows > 1:
        input_ids[-1], attention_mask[-1], token_type_ids[-1] = ids["pad"], 0, 0
    feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if task.has_choices:
        feed = {name: array.reshape(batch, num_choices, sequence) for name, array in feed.items()}
    return {name: feed[name] for name in task.input_names}
