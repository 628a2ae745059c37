"""From logits to answers, in numpy only: the same functions serve ``mbexport run`` and Triton's postprocessor.

Each function takes a batch and returns one plain dict per row (JSON-ready), so a Triton response and a
local answer are byte-for-byte the same document.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, allowed: np.ndarray, max_tokens: int = 30
              ) -> list[tuple[int, int, float]]:
    """Per row, the (start, end, probability) maximizing start + end logits with start <= end < start + max_tokens.

    ``allowed`` marks the positions an answer may cover (the context's word pieces). The probability is
    P(start) * P(end), each a softmax over the allowed positions. A row with no allowed position gives
    (-1, -1, 0.0).
    """
    spans = []
    for start, end, ok in zip(start_logits.astype(np.float64), end_logits.astype(np.float64), allowed.astype(bool)):
        if not ok.any():
            spans.append((-1, -1, 0.0))
            continue
        start, end = np.where(ok, start, -np.inf), np.where(ok, end, -np.inf)
        n = len(start)
        offset = np.arange(n)[None, :] - np.arange(n)[:, None]  # j - i
        pair = np.where((offset >= 0) & (offset < max_tokens), start[:, None] + end[None, :], -np.inf)
        i, j = np.unravel_index(int(np.argmax(pair)), pair.shape)
        p_start, p_end = (np.exp(x[k] - _logsumexp(x[ok])) for x, k in ((start, i), (end, j)))
        spans.append((int(i), int(j), float(p_start * p_end)))
    return spans


def _logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(top + np.log(np.exp(x - top).sum()))


def classify(logits: np.ndarray, labels: list[str]) -> list[dict]:
    """Label, its probability, and every label's probability, per row of [batch, classes] logits."""
    probs = softmax(logits.astype(np.float64))
    return [{"label": labels[int(row.argmax())], "score": float(row.max()),
             "probabilities": {label: float(p) for label, p in zip(labels, row)}} for row in probs]


def top_tokens(logits: np.ndarray, positions: np.ndarray, k: int, vocab_size: int) -> list[list[tuple[int, float]]]:
    """(token id, probability) of the ``k`` likeliest tokens at each position of one row's [sequence, vocab] logits.

    Only the first ``vocab_size`` ids count: Megatron pads the embedding past the real vocab.
    """
    probs = softmax(logits[positions, :vocab_size].astype(np.float64))
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return [[(int(t), float(p[t])) for t in row] for p, row in zip(probs, best)]


def tag(logits: np.ndarray, keep: np.ndarray, labels: list[str]) -> list[list[tuple[int, str, float]]]:
    """(position, label, probability) for each kept position, per row of [batch, sequence, labels] logits."""
    probs = softmax(logits.astype(np.float64))
    return [[(int(i), labels[int(row[i].argmax())], float(row[i].max())) for i in np.flatnonzero(ok)]
            for row, ok in zip(probs, keep.astype(bool))]
