"""WordPiece tokenization shared by calibration, ``mbexport run`` and the Triton tokenizer model.

Megatron-BERT uses BERT's WordPiece vocab (``vocab.txt``, not inside NGC zips: the user supplies it).
One function encodes text the same way everywhere, so calibration data, local answers and Triton answers
all see identical token ids. That function lives in ``mbexport.deploy.serving``, the file Triton's Python
models run without mbexport; this module adds the checks a user's files get.
"""

from __future__ import annotations

from pathlib import Path

from mbexport.deploy.serving import encode, wordpiece
from mbexport.errors import MbexportError

__all__ = ["encode", "load_tokenizer", "read_lines"]


def load_tokenizer(vocab: str | Path, lowercase: bool = True):
    """A fast ``tokenizers`` WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] template."""
    vocab = Path(vocab)
    if not vocab.is_file():
        raise MbexportError("vocab file not found", vocab)
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in tokens]
    if missing:
        raise MbexportError(f"not a BERT WordPiece vocab (no {missing[0]})", vocab)
    return wordpiece(vocab, lowercase)


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a text file (one example per line)."""
    path = Path(path)
    if not path.is_file():
        raise MbexportError("text file not found", path)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise MbexportError("no text in it", path)
    return lines[:limit] if limit else lines
