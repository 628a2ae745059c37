"""Hugging Face MegatronBert folders: reading fine-tuned ones and writing ``convert``'s output.

The safetensors file is written tensor by tensor (8-byte header length, JSON header, raw bytes) so a 345M
conversion never holds a second copy of the weights, as a whole-file serializer would.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path, PurePath

import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.lazy import described
from mbexport.checkpoint.megatron import load_file
from mbexport.checkpoint.safe_load import read_json
from mbexport.checkpoint.progress import progress
from mbexport.config import MegatronBertConfig
from mbexport.errors import CheckpointError, first_line
from mbexport.text import CLS, MASK, PAD, SEP, UNK, VOCAB

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Hugging Face's names for BERT's special tokens (tokenizer_config.json, special_tokens_map.json)
SPECIAL_TOKENS = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}


def is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], MegatronBertConfig, dict]:
    config_file = folder / "config.json"
    data = read_json(config_file)
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a JSON object, got {type(data).__name__}", config_file)
    if data.get("model_type") != "megatron-bert":
        raise CheckpointError(f"model_type is {str(data.get('model_type'))[:40]!r}, expected 'megatron-bert'",
                              config_file)
    architectures = data.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise CheckpointError("architectures must be a list of class names", config_file)
    try:
        config = MegatronBertConfig.from_hf_dict(data)
    except (ValueError, TypeError) as error:
        raise CheckpointError(str(error), config_file) from None
    state_dict = {}
    for file in _weight_files(folder):
        state_dict.update(_read_weights(file))
    state_dict = {_with_prefix(k): t for k, t in state_dict.items() if not names.HF_DROPPED.search(k)}
    return state_dict, config, {"architectures": architectures}


def _weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        index = folder / f"{name}.index.json"
        if index.is_file():
            return [_shard(folder, shard, index) for shard in sorted(set(_weight_map(index).values()))]
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"no {' or '.join(WEIGHT_FILES)} next to config.json", folder)


def _weight_map(index: Path) -> dict[str, str]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError("not a shard index: 'weight_map' must map tensor names to shard file names", index)
    return weight_map


def _shard(folder: Path, name: str, index: Path) -> Path:
    """A shard file the index names, which must be a file inside ``folder`` (symbolic links followed)."""
    path = folder / name
    inside = not PurePath(name).is_absolute() and "\0" not in name
    try:
        inside = inside and path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        inside = False
    if not inside:
        raise CheckpointError(f"names the shard {name[:80]!r}, which is outside the folder", index)
    return path


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError("missing weight file", file)
    if file.suffix != ".safetensors":
        data = load_file(file)
        if not isinstance(data, dict):
            raise CheckpointError("not a state dict", file)
        return data
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"corrupt safetensors file: {first_line(error, 200)}", file) from None


def _with_prefix(key: str) -> str:
    """A base MegatronBertModel saves ``embeddings.*`` where the task models save ``bert.embeddings.*``."""
    return f"bert.{key}" if key.split(".")[0] in ("embeddings", "encoder", "pooler") else key


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Stream ``tensors`` into a safetensors file, holding at most one at a time (non-contiguous or lazy ones)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in described(tensors).items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{name} has dtype {tensor.dtype}, which safetensors cannot store", path)
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f, progress("Writing model.safetensors", total=offset) as advance:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for tensor in tensors.values():
            raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            f.write(raw.numpy().data)
            advance(raw.numel())


def write_tokenizer(folder: Path, vocab: Path, *, lowercase: bool, max_length: int, vocab_size: int) -> None:
    """``vocab.txt`` plus the two small files that make ``AutoTokenizer`` build a BERT WordPiece tokenizer."""
    try:
        tokens = vocab.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"unreadable vocab: {error}", vocab) from None
    if not tokens or len(tokens) > vocab_size:
        raise CheckpointError(f"vocab has {len(tokens)} tokens; the checkpoint's embeddings have {vocab_size} rows",
                              vocab)
    missing = [t for t in SPECIAL_TOKENS.values() if t not in tokens]
    if missing:
        raise CheckpointError(f"vocab lacks the special tokens {', '.join(missing)}", vocab)
    shutil.copyfile(vocab, folder / VOCAB)
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                        "model_max_length": max_length, **SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
