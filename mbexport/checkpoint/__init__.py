"""Read any Megatron-BERT checkpoint into Hugging Face names, and write a Hugging Face folder.

``load_checkpoint`` auto-detects the format (docs/megatron-checkpoints.md): NGC zips, Megatron-LM and
Megatron-Core ``mp_rank_*`` folders or single files, Megatron-Core ``torch_dist`` and Hugging Face folders.
Every reader ends in the same ``state_dict`` naming, so the rest of mbexport never sees a Megatron name.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.dist import is_torch_dist, read_torch_dist
from mbexport.checkpoint.huggingface import is_hf_folder, read_hf_folder, write_safetensors, write_tokenizer
from mbexport.checkpoint.lazy import LazyTensors, described
from mbexport.checkpoint.megatron import (SHARD_DIR, TRACKER, Files, Shard, iteration_folder, load_file, merge_shards,
                                          read_shard, shard_files)
from mbexport.checkpoint.progress import status
from mbexport.config import MEGATRON_LAYERNORM_EPS, MegatronBertConfig
from mbexport.errors import CheckpointError
from mbexport.fsutil import atomic_dir, write_json_atomic
from mbexport.tasks import TASKS

__all__ = ["Checkpoint", "load_checkpoint", "save_hf_folder"]

# config.json's architecture: the richest head present (classifier weights fit several tasks: keep the first).
ARCHITECTURE_PREFERENCE = ("pretraining", "question-answering", "sequence-classification", "masked-lm",
                           "next-sentence", "model")


@dataclass
class Checkpoint:
    path: Path
    format: str  # ngc-zip | megatron-lm | megatron-core | megatron-core-dist | huggingface
    config: MegatronBertConfig
    # Hugging Face names with "bert."; no tied decoder, no buffers. A LazyTensors when loaded ``lazy``.
    state_dict: Mapping[str, torch.Tensor]
    heads: tuple[str, ...]  # mbexport.tasks names whose weights are all present
    info: dict

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in described(self.state_dict).values())


def load_checkpoint(path: str | Path, *, num_attention_heads: int | None = None, lazy: bool = False) -> Checkpoint:
    """Read ``path`` in whatever layout it has. ``num_attention_heads`` overrides args and the hidden/64 guess.

    ``lazy``: Megatron tensor-parallel merges happen when a tensor is read (see ``LazyTensors``), for callers
    that take the weights one at a time; the files themselves are memory-mapped where their format allows.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file or directory", path)
    if path.is_dir() and is_hf_folder(path):
        state_dict, config, info = read_hf_folder(path)
        if num_attention_heads:
            config = _config(lambda: config.replace(num_attention_heads=num_attention_heads), path)
        info = {"checkpoint_version": None, "tensor_parallel": 1, "pipeline_parallel": 1, "iteration": None,
                **info, "layer_norm_eps_source": "config"}
        return _finish(path, "huggingface", config, state_dict, info)
    if path.is_dir() and SHARD_DIR.match(path.name):
        path = path.parent  # one rank's folder: read all ranks of its iteration
    dist_folder = _dist_folder(path)
    if dist_folder:
        shards, fmt = [read_torch_dist(dist_folder)], "megatron-core-dist"
    elif path.is_file() and path.suffix != ".zip" and not _is_archive(path):
        shards, fmt = [read_shard(load_file(path), path, 0, 0)], None
    else:
        files = Files(path)
        found = shard_files(files)
        with status(f"Reading {len(found)} checkpoint file(s)"):
            shards = [read_shard(files.load(name), files.display(name), tp, pp)
                      for (tp, pp), name in sorted(found.items())]
        fmt = "ngc-zip" if files.archive else None
    fmt = fmt or ("megatron-core" if shards[0].mcore else "megatron-lm")
    return _from_megatron(path, fmt, shards, num_attention_heads, lazy)


def _dist_folder(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    if is_torch_dist(path):
        return path
    tracker = path / TRACKER
    iteration = iteration_folder(tracker.read_text()) if tracker.is_file() else None
    return path / iteration if iteration and is_torch_dist(path / iteration) else None


def _is_archive(path: Path) -> bool:
    """A zip that holds checkpoint files, as opposed to a ``.pt`` in PyTorch's zip serialization."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(".pt") or n.endswith(".txt") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _from_megatron(path: Path, fmt: str, shards: list[Shard], heads_option: int | None, lazy: bool) -> Checkpoint:
    first, last = shards[0], shards[-1]
    args = first.args
    arg = lambda name: getattr(args, name, None)  # noqa: E731 - args is an argparse.Namespace or absent
    tp, pp = 1 + max(s.tp for s in shards), 1 + max(s.pp for s in shards)
    for name, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
        if arg(name) not in (None, found):
            raise CheckpointError(f"args say {name}={arg(name)} but the checkpoint has {found} such shard(s)", path)
    word = next((t for key, t in first.chunks[0].items() if names.canonical(key) == "word_embeddings.weight"), None)
    hidden = arg("hidden_size") or (word.shape[1] if isinstance(word, torch.Tensor) and word.dim() == 2 else None)
    if hidden is None:
        raise CheckpointError("no word embeddings in the first shard: missing tensor or not a BERT", first.file)
    heads = heads_option or arg("num_attention_heads") or max(1, hidden // 64)
    heads_source = "option" if heads_option else "args" if arg("num_attention_heads") else "hidden/64"
    info = {"checkpoint_version": 0 if first.version is None else first.version, "tensor_parallel": tp,
            "pipeline_parallel": pp, "virtual_pipeline": len(first.chunks),
            "iteration": first.iteration or last.iteration, "has_args": args is not None,
            "num_attention_heads_source": heads_source}
    state_dict = merge_shards(shards, heads, lazy=lazy)
    layers = 1 + max((int(k.split(".")[3]) for k in state_dict if k.startswith("bert.encoder.layer.")), default=-1)
    tensors = described(state_dict)
    shape = lambda name, dim, default=0: tensors[name].shape[dim] if name in tensors else default  # noqa: E731
    config = _config(lambda: MegatronBertConfig(
        vocab_size=shape("bert.embeddings.word_embeddings.weight", 0),
        hidden_size=hidden,
        num_hidden_layers=arg("num_layers") or layers,
        num_attention_heads=heads,
        intermediate_size=arg("ffn_hidden_size")
        or shape("bert.encoder.layer.0.intermediate.dense.weight", 0, 4 * hidden),
        max_position_embeddings=arg("max_position_embeddings")
        or shape("bert.embeddings.position_embeddings.weight", 0),
        type_vocab_size=shape("bert.embeddings.token_type_embeddings.weight", 0, 2),
        layer_norm_eps=arg("layernorm_epsilon") or MEGATRON_LAYERNORM_EPS,
    ), path)
    if arg("padded_vocab_size") not in (None, config.vocab_size):
        raise CheckpointError(f"args say padded_vocab_size={arg('padded_vocab_size')} but the word embeddings "
                              f"have {config.vocab_size} rows", path)
    info["layer_norm_eps_source"] = "args" if arg("layernorm_epsilon") else "megatron-default"
    info["real_vocab_size"] = arg("vocab_size")
    info["make_vocab_size_divisible_by"] = arg("make_vocab_size_divisible_by")
    return _finish(path, fmt, config, state_dict, info)


def _config(build, path: Path) -> MegatronBertConfig:
    try:
        return build()
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"inconsistent architecture: {error}", path) from None


def _finish(path: Path, fmt: str, config: MegatronBertConfig, state_dict: Mapping, info: dict) -> Checkpoint:
    tensors = described(state_dict)  # shapes and dtypes: no lazy tensor is made for them
    wanted = names.check_state_dict(tensors, config, path)
    state_dict = (state_dict.selected(wanted) if isinstance(state_dict, LazyTensors)
                  else {name: state_dict[name] for name in wanted})
    present = set(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in present)  # noqa: E731
    heads = tuple(
        task.name for task in TASKS.values()
        if task.name == "model" or all(has(p) for p in task.head_prefixes)
    )
    dtypes = sorted({str(tensors[name].dtype).removeprefix("torch.") for name in wanted})
    info = {**info, "dtype": "/".join(dtypes), "padded_vocab_size": config.vocab_size}
    info.setdefault("real_vocab_size", None)
    return Checkpoint(path, fmt, config, state_dict, heads, info)


def save_hf_folder(ckpt: Checkpoint, out_dir: str | Path, *, vocab: Path | None = None, lowercase: bool = True,
                   overwrite: bool = False) -> Path:
    """Write ``out_dir`` atomically as a folder ``transformers.MegatronBertFor*.from_pretrained`` loads unchanged
    (fsutil's overwrite rule: a non-empty ``out_dir`` only with ``overwrite``, never the checkpoint's own)."""
    out_dir = Path(out_dir)
    architectures = ckpt.info.get("architectures") or [
        TASKS[next(t for t in ARCHITECTURE_PREFERENCE if t in ckpt.heads)].hf_class
    ]
    with atomic_dir(out_dir, overwrite=overwrite, sources=(ckpt.path, vocab)) as tmp:
        write_json_atomic(tmp / "config.json", ckpt.config.to_hf_dict(architectures))
        write_safetensors(tmp / "model.safetensors", ckpt.state_dict)
        if vocab is not None:
            write_tokenizer(tmp, Path(vocab), lowercase=lowercase, max_length=ckpt.config.max_position_embeddings,
                            vocab_size=ckpt.config.vocab_size)
    return out_dir
