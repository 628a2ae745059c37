"""WordPiece tokenization shared by calibration, ``mbexport run`` and the Triton tokenizer model.

Megatron-BERT uses BERT's WordPiece vocab (``vocab.txt``, not inside NGC zips: the user supplies it).
One function encodes text the same way everywhere, so calibration data, local answers and Triton answers
all see identical token ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbexport.errors import MbexportError


def load_tokenizer(vocab: str | Path, lowercase: bool = True):
    """A fast ``tokenizers`` WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] template."""
    from tokenizers import BertWordPieceTokenizer

    vocab = Path(vocab)
    if not vocab.is_file():
        raise MbexportError("vocab file not found", vocab)
    tokens = _read_text(vocab).splitlines()
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in tokens]
    if missing:
        raise MbexportError(f"not a BERT WordPiece vocab (no {missing[0]})", vocab)
    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase)


def encode(tokenizer, texts: list[str], pairs: list[str] | None = None, *, max_length: int = 128,
           pad_to_max: bool = True) -> dict[str, np.ndarray]:
    """Encode a batch: truncate to ``max_length`` (the second text first for pairs), pad with [PAD]."""
    tokenizer.enable_truncation(max_length, strategy="only_second" if pairs else "longest_first")
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=max_length if pad_to_max else None)
    batch = tokenizer.encode_batch(list(zip(texts, pairs)) if pairs else list(texts))
    return {
        "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
    }


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
