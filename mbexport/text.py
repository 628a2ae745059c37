"""WordPiece tokenization shared by calibration, ``mbexport run`` and the Triton tokenizer model.

Megatron-BERT uses BERT's WordPiece vocab (``vocab.txt``, not inside NGC zips: the user supplies it).
One function encodes text the same way everywhere, so calibration data, local answers and Triton answers
all see identical token ids. That function lives in ``mbexport.deploy.serving``, the file Triton's Python
models run without mbexport; this module adds the checks a user's files get.
"""

from __future__ import annotations

from pathlib import Path

from mbexport.deploy.serving import CLS, MASK, PAD, SEP, UNK, VOCAB, encode, wordpiece
from mbexport.errors import MbexportError

__all__ = ["CLS", "MASK", "PAD", "SEP", "UNK", "VOCAB", "encode", "load_tokenizer", "read_lines"]


def load_tokenizer(vocab: str | Path, lowercase: bool = True):
    """A fast ``tokenizers`` WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] template."""
    vocab = Path(vocab)
    if not vocab.is_file():
        raise MbexportError("vocab file not found", vocab)
    tokens = _read_text(vocab).splitlines()
    missing = [t for t in (CLS, SEP, PAD, UNK) if t not in tokens]
    if missing:
        raise MbexportError(f"not a BERT WordPiece vocab (no {missing[0]})", vocab)
    return wordpiece(vocab, lowercase)


def read_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a text file (one example per line)."""
    path = Path(path)
    if not path.is_file():
        raise MbexportError("text file not found", path)
    lines = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not lines:
        raise MbexportError("no text in it", path)
    return lines[:limit] if limit else lines


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents; a binary file (NUL bytes, invalid UTF-8) is refused in one line."""
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise MbexportError(f"not a text file (binary data: a NUL byte at offset {nul})", path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MbexportError(f"not a text file (invalid UTF-8 at byte {error.start})", path) from None
