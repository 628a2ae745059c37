"""Read any Megatron-BERT checkpoint into Hugging Face names, and write a Hugging Face folder.

``load_checkpoint`` auto-detects the format (docs/megatron-checkpoints.md): NGC zips, Megatron-LM and
Megatron-Core ``mp_rank_*`` folders or single files, Megatron-Core ``torch_dist`` and Hugging Face folders.
Every reader ends in the same ``state_dict`` naming, so the rest of mbexport never sees a Megatron name.
"""

from __future__ import annotations

import argparse
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.dist import dcp_folder, read_dcp
from mbexport.checkpoint.huggingface import is_hf_folder, read_hf_folder, write_safetensors, write_tokenizer
from mbexport.checkpoint.lazy import LazyTensors, described
from mbexport.checkpoint.megatron import (SHARD_DIR, Files, Shard, load_file, merge_shards, read_shard, shard_files,
                                          whole_number)
from mbexport.checkpoint.progress import status
from mbexport.config import LIMITS, MEGATRON_LAYERNORM_EPS, MegatronBertConfig, check_count, check_epsilon
from mbexport.errors import CheckpointError, MbexportError
from mbexport.fsutil import atomic_dir, write_json_atomic
from mbexport.tasks import TASKS, Task, heads_in, modules_in, richest

__all__ = ["Checkpoint", "load_checkpoint", "save_hf_folder"]


# Megatron's args name -> the MegatronBertConfig field whose limit (config.LIMITS) it obeys.
ARGS_LIMITS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
               "num_attention_heads": "num_attention_heads", "ffn_hidden_size": "intermediate_size",
               "max_position_embeddings": "max_position_embeddings", "padded_vocab_size": "vocab_size",
               "tensor_model_parallel_size": "num_attention_heads", "pipeline_model_parallel_size": "num_hidden_layers"}


@dataclass
class Checkpoint:
    path: Path
    # ngc-zip | megatron-lm | megatron-core | megatron-core-dist | megatron-core-dcp | megatron-core-fsdp-dtensor
    # | huggingface
    format: str
    config: MegatronBertConfig
    # Hugging Face names with "bert."; no tied decoder, no buffers. A LazyTensors when loaded ``lazy``.
    state_dict: Mapping[str, torch.Tensor]
    heads: tuple[str, ...]  # mbexport.tasks names whose weights are present, with their shapes and meaning
    info: dict

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in described(self.state_dict).values())

    def weights_for(self, task: Task) -> Mapping[str, torch.Tensor]:
        """The state dict ``task``'s reference may use: without those of its head modules the checkpoint does not
        hold with their shape and meaning, so they count as missing (a sentence classifier is no token
        classifier). Lazy tensors stay lazy."""
        held = modules_in(_shapes(self.state_dict), self.config, self.info.get("architectures"))
        foreign = tuple(f"{module.name}." for module in task.modules if module not in held)
        kept = [name for name in self.state_dict if not name.startswith(foreign)]
        if isinstance(self.state_dict, LazyTensors):
            return self.state_dict.selected(kept)
        return {name: self.state_dict[name] for name in kept}


def load_checkpoint(path: str | Path, *, num_attention_heads: int | None = None, lazy: bool = False) -> Checkpoint:
    """Read ``path`` in whatever layout it has. ``num_attention_heads`` overrides args and the hidden/64 guess.

    ``lazy``: Megatron tensor-parallel merges happen when a tensor is read (see ``LazyTensors``), for callers
    that take the weights one at a time; the files themselves are memory-mapped where their format allows.
    """
    path = Path(path)
    if num_attention_heads is not None:
        try:
            check_count(num_attention_heads, LIMITS["num_attention_heads"])
        except ValueError as error:
            raise MbexportError(f"--num-heads {error}") from None
    if not path.exists():
        raise CheckpointError("no such file or directory", path)
    if path.is_dir() and is_hf_folder(path):
        state_dict, config, info = read_hf_folder(path)
        if num_attention_heads:
            config = _config(lambda: config.replace(num_attention_heads=num_attention_heads), path)
        info = {"checkpoint_version": None, "tensor_parallel": 1, "pipeline_parallel": 1, "iteration": None,
                **info, "layer_norm_eps_source": "config", "args_source": None}
        return _finish(path, "huggingface", config, state_dict, info)
    if path.is_dir() and SHARD_DIR.match(path.name):
        path = path.parent  # one rank's folder: read all ranks of its iteration
    folder, details = dcp_folder(path), {}
    if folder:
        shard, fmt, details = read_dcp(folder)
        shards = [shard]
    elif path.is_file() and path.suffix != ".zip" and not _is_archive(path):
        shards, fmt = [read_shard(load_file(path), path, 0, 0)], None
    else:
        files = Files(path)
        found = shard_files(files)
        with status(f"Reading {len(found)} checkpoint file(s)"):
            shards = [read_shard(files.load(name), files.display(name), tp, pp)
                      for (tp, pp), name in sorted(found.items())]
        fmt = "ngc-zip" if files.archive else None
    if not folder:
        details = {"ckpt_format": "torch", "args_source": shards[0].file.name if shards[0].args is not None else None,
                   "integrity": None}
    fmt = fmt or ("megatron-core" if shards[0].mcore else "megatron-lm")
    return _from_megatron(path, fmt, shards, num_attention_heads, details, lazy)


def _is_archive(path: Path) -> bool:
    """A zip that holds checkpoint files, as opposed to a ``.pt`` in PyTorch's zip serialization."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(".pt") or n.endswith(".txt") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _from_megatron(path: Path, fmt: str, shards: list[Shard], heads_option: int | None, details: dict,
                   lazy: bool) -> Checkpoint:
    first, last = shards[0], shards[-1]
    args = _args(first.args, first.file)
    arg = args.get
    tp, pp = 1 + max(s.tp for s in shards), 1 + max(s.pp for s in shards)
    if details["ckpt_format"] == "torch":  # a file per rank: args must agree with the files there are
        for name, found in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
            if arg(name) not in (None, found):
                raise CheckpointError(f"args say {name}={arg(name)} but the checkpoint has {found} such shard(s)",
                                      path)
    else:  # DCP formats hold global tensors, whatever parallelism they were trained with: report that
        tp, pp = arg("tensor_model_parallel_size") or 1, arg("pipeline_model_parallel_size") or 1
    word = next((t for key, t in first.chunks[0].items() if names.canonical(key) == "word_embeddings.weight"), None)
    hidden = arg("hidden_size") or (word.shape[1] if isinstance(word, torch.Tensor) and word.dim() == 2 else None)
    if hidden is None:
        raise CheckpointError("no word embeddings in the first shard: missing tensor or not a BERT", first.file)
    heads = heads_option or arg("num_attention_heads") or max(1, hidden // 64)
    heads_source = "option" if heads_option else "args" if arg("num_attention_heads") else "hidden/64"
    info = {"checkpoint_version": 0 if first.version is None else first.version, "tensor_parallel": tp,
            "pipeline_parallel": pp, "virtual_pipeline": len(first.chunks),
            "iteration": first.iteration or last.iteration, "has_args": first.args is not None,
            "num_attention_heads_source": heads_source, **details}
    if any(s.fp8_scaling for s in shards):
        info["fp8_scaling_ignored"] = True
        warnings.warn(f"{path}: Transformer Engine _extra_state holds FP8 scaling factors (trained with FP8); they "
                      "are not used: the export runs in the precision you build", stacklevel=2)
    state_dict, notes = merge_shards(shards, heads, lazy=lazy)
    for note in notes:
        warnings.warn(f"{path}: {note}", stacklevel=2)
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
    info["real_vocab_size"] = whole_number(arg("vocab_size"))
    info["make_vocab_size_divisible_by"] = whole_number(arg("make_vocab_size_divisible_by"))
    return _finish(path, fmt, config, state_dict, info)


def _args(args, file: Path) -> dict:
    """Megatron's ``args`` (an ``argparse.Namespace``; a dict is taken too) as a dict, the values the readers use
    checked against ``config.LIMITS``: a string or a negative count in args is refused here, in one line."""
    if args is None:
        return {}
    if not isinstance(args, (argparse.Namespace, dict)):
        raise CheckpointError(f"args is a {type(args).__name__}, not Megatron's argparse.Namespace", file)
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    for name, field in ARGS_LIMITS.items():
        if values.get(name) is not None:
            _checked_arg(name, check_count, values[name], file, LIMITS[field])
    if values.get("layernorm_epsilon") is not None:
        values["layernorm_epsilon"] = _checked_arg("layernorm_epsilon", check_epsilon, values["layernorm_epsilon"],
                                                   file)
    return values


def _checked_arg(name: str, check, value, file: Path, *limit):
    try:
        return check(value, *limit)
    except ValueError as error:
        raise CheckpointError(f"args.{name} {error}", file) from None


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
    heads = tuple(task.name for task in heads_in(_shapes(tensors), config, info.get("architectures")))
    dtypes = sorted({str(tensors[name].dtype).removeprefix("torch.") for name in wanted})
    info = {**info, "dtype": "/".join(dtypes), "padded_vocab_size": config.vocab_size}
    info.setdefault("real_vocab_size", None)
    return Checkpoint(path, fmt, config, state_dict, heads, info)


def _shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in described(state_dict).items()}


def save_hf_folder(ckpt: Checkpoint, out_dir: str | Path, *, vocab: Path | None = None, lowercase: bool = True,
                   overwrite: bool = False) -> Path:
    """Write ``out_dir`` atomically as a folder ``transformers.MegatronBertFor*.from_pretrained`` loads unchanged
    (fsutil's overwrite rule: a non-empty ``out_dir`` only with ``overwrite``, never the checkpoint's own)."""
    out_dir = Path(out_dir)
    architectures = ckpt.info.get("architectures") or [
        richest([TASKS[name] for name in ckpt.heads], ckpt.config).hf_class]
    with atomic_dir(out_dir, overwrite=overwrite, sources=(ckpt.path, vocab)) as tmp:
        write_json_atomic(tmp / "config.json", ckpt.config.to_hf_dict(architectures))
        write_safetensors(tmp / "model.safetensors", ckpt.state_dict)
        if vocab is not None:
            write_tokenizer(tmp, Path(vocab), lowercase=lowercase, max_length=ckpt.config.max_position_embeddings,
                            vocab_size=ckpt.config.vocab_size)
    return out_dir
