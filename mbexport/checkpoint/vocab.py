"""The vocab a checkpoint brings with it: used unless ``--vocab`` overrides it, and the user is told which one.

A Hugging Face folder ships ``vocab.txt``, or only ``tokenizer.json``. Megatron-LM's main branch (August 2026,
``save_tokenizer_assets`` in megatron/training/checkpointing.py) writes the tokenizer into a ``torch_dist``
iteration folder's ``tokenizer/``: ``vocab.txt`` for BERT's WordPiece tokenizers, a Hugging Face tokenizer's own
files for the others. NGC zips and older folders bring none: the user supplies ``--vocab``.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from mbexport.checkpoint.huggingface import is_hf_folder
from mbexport.checkpoint.megatron import SHARD_DIR, TRACKER, read_tracker
from mbexport.checkpoint.safe_load import read_json
from mbexport.errors import CheckpointError
from mbexport.text import VOCAB

VOCAB_FILES = (VOCAB, "tokenizer.json")  # in order of preference
TOKENIZER_FOLDER = "tokenizer"  # Megatron-LM's, inside the iteration folder


def bundled_vocab(src: str | Path) -> Path | None:
    """The checkpoint's own vocab file (``vocab.txt`` or ``tokenizer.json``), or None when it brings none."""
    src = Path(src)
    if not src.is_dir():
        return None
    if is_hf_folder(src):
        folders = [src]
    else:
        iteration = src.parent if SHARD_DIR.match(src.name) else src
        if (iteration / TRACKER).is_file():
            iteration = iteration / read_tracker(iteration / TRACKER)
        folders = [iteration / TOKENIZER_FOLDER]
    return next((folder / name for folder in folders for name in VOCAB_FILES if (folder / name).is_file()), None)


@contextlib.contextmanager
def resolved_vocab(src: str | Path, vocab: str | Path | None, log: Callable[[str], None]) -> Iterator[Path | None]:
    """The vocab.txt to use: ``vocab`` when given, else the checkpoint's own (a ``tokenizer.json`` is turned into
    a temporary vocab.txt, removed on exit), else None. Says on ``log`` which one it is."""
    own = bundled_vocab(src)
    if vocab is not None:
        if own is not None:
            log(f"vocab: {vocab} (--vocab, instead of the checkpoint's own {own})")
        yield Path(vocab)
        return
    if own is None:
        yield None
        return
    tokens = wordpiece_tokens(own) if own.name != VOCAB else None
    log(f"vocab: {own} (the checkpoint's own; --vocab overrides it)")
    if tokens is None:
        yield own
        return
    with tempfile.TemporaryDirectory(prefix="mbexport-vocab-") as folder:
        path = Path(folder) / VOCAB
        path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
        yield path


def wordpiece_tokens(tokenizer_json: Path) -> list[str]:
    """The tokens of a Hugging Face ``tokenizer.json``'s WordPiece model, in id order (a vocab.txt's lines)."""
    data = read_json(tokenizer_json)
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "WordPiece":
        raise CheckpointError(f"not a WordPiece tokenizer (model type {str(kind)[:30]!r}), which BERT needs; give "
                              "--vocab", tokenizer_json)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(t, str) and "\n" not in t and "\r" not in t
                                              and type(i) is int for t, i in vocab.items()):
        raise CheckpointError("its WordPiece vocab must map tokens (one line each) to ids", tokenizer_json)
    by_id = {i: token for token, i in vocab.items()}
    if sorted(by_id) != list(range(len(vocab))):
        raise CheckpointError("its WordPiece ids are not 0 to N-1, each once", tokenizer_json)
    return [by_id[i] for i in range(len(vocab))]
