"""Checkpoint writers for tests and benchmarks: every Megatron layout mbexport reads, built from Hugging Face names.

The real checkpoints cannot be downloaded here, so these writers implement the inverse of each transform in
docs/megatron-checkpoints.md: era renames, QKV row layouts, tensor-parallel splits, pipeline stages, virtual
pipeline chunks, Megatron-Core (incl. Transformer Engine names), and the ``torch.distributed.checkpoint``
formats (``torch_dist`` with or without ``common.pt``, ``torch_dcp``, ``fsdp_dtensor``). They extend the
package's example writer (``mbexport.checkpoint.example``) and walk the readers' tables (``names``) backwards.
Benchmarks import this module by putting ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.example import fused_ranks, legacy_key, megatron_args as example_args, nest
from mbexport.checkpoint.megatron import TRACKER, qkv_layout
from mbexport.config import MegatronBertConfig

STYLES = ("2020", "2021", "2023", "mcore", "mcore-te")  # legacy eras (section 2) and Megatron-Core (section 5)
# Canonical module -> Megatron-Core module ("layers.N." modules under "encoder.layers.N.").
MCORE_GLOBAL = {
    "word_embeddings": "embedding.word_embeddings", "position_embeddings": "embedding.position_embeddings",
    "tokentype_embeddings": "embedding.tokentype_embeddings", "final_layernorm": "encoder.final_layernorm",
    "pooler.dense": "pooler.dense", "lm_head": "output_layer", "lm_head.dense": "lm_head.dense",
    "lm_head.layernorm": "lm_head.layer_norm", "binary_head": "binary_head",
}
MCORE_LAYER = {
    "input_layernorm": "input_layernorm", names.QKV: "self_attention.linear_qkv",
    "attention.dense": "self_attention.linear_proj", "post_attention_layernorm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
TE_FUSED_NORMS = {"input_layernorm": "self_attention.linear_qkv.layer_norm_",
                  "post_attention_layernorm": "mlp.linear_fc1.layer_norm_"}
# What Transformer Engine's get_extra_state pickles for delayed FP8 scaling (Megatron-LM's
# _FP8_PERSISTENT_EXTRA_STATE_MARKERS name these keys), and for a model trained without FP8.
FP8_EXTRA_STATE = {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3), "scale_bwd": torch.ones(2)}


class ModelType(enum.Enum):
    """Pickles as Megatron-Core's enum, as real ``args`` do, so tests exercise the loader's stand-ins."""

    encoder_or_decoder = 1


ModelType.__module__ = "megatron.core.enums"


@contextlib.contextmanager
def _megatron_importable():
    """Let pickle find ``megatron.core.enums.ModelType`` while saving (pickle looks the class up by name)."""
    fake = {"megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
            "megatron.core.enums": types.ModuleType("megatron.core.enums")}
    fake["megatron.core.enums"].ModelType = ModelType
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        yield
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def megatron_args(config: MegatronBertConfig, *, tp: int = 1, pp: int = 1, virtual: int = 1, **more):
    """The example's ``args`` plus the parallel sizes and an enum, like real checkpoints carry."""
    return example_args(config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
                        model_type=ModelType.encoder_or_decoder, **more)


def save(obj, f, old_serialization: bool = False) -> None:
    with _megatron_importable():
        torch.save(obj, f, _use_new_zipfile_serialization=not old_serialization)


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    save(obj, buffer)
    return buffer.getvalue()


def _stages(rank: dict, layers: int, pp: int, virtual: int) -> dict[tuple[int, int], dict]:
    """``(stage, chunk) -> tensors`` with local layer numbers; embeddings first, heads on the last chunk."""
    per_chunk = layers // (pp * virtual)
    out = {(s, v): {} for s in range(pp) for v in range(virtual)}
    for name, tensor in rank.items():
        layer, rest = names.split_layer(name)
        if layer is None:
            embedding = name.split(".")[0].endswith("_embeddings")
            out[(0, 0) if embedding else (pp - 1, virtual - 1)][name] = tensor
        else:
            stage, chunk = (layer // per_chunk) % pp, layer // (per_chunk * pp)
            out[(stage, chunk)][f"layers.{layer % per_chunk}.{rest}"] = tensor
    return out


def mcore_key(name: str, te: bool) -> str:
    layer, rest = names.split_layer(name)
    module, _, param = rest.rpartition(".")
    if layer is None:
        return f"{MCORE_GLOBAL[module]}.{param}"
    if te and module in TE_FUSED_NORMS:
        return f"encoder.layers.{layer}.{TE_FUSED_NORMS[module]}{param}"
    return f"encoder.layers.{layer}.{MCORE_LAYER[module]}.{param}"


def megatron_shards(state_dict: dict, config: MegatronBertConfig, *, style: str = "2020", version=3.0, tp: int = 1,
                    pp: int = 1, virtual: int = 1, args: bool = True, iteration: int | None = None) -> dict[str, dict]:
    """``mp_rank_*/model_optim_rng.pt`` relative path -> the dict Megatron would have saved there."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    mcore = style.startswith("mcore")
    layout = "nsd" if mcore else qkv_layout(version)
    files = {}
    for t, rank in enumerate(fused_ranks(state_dict, config, tp, layout)):
        for (s, v), tensors in sorted(_stages(rank, config.num_hidden_layers, pp, virtual).items()):
            if mcore:
                model = {mcore_key(n, style == "mcore-te"): x for n, x in tensors.items()}
                te_state = io.BytesIO(b"fp8-meta") if style == "mcore-te" else None  # TE pickles a buffer
                model.update({k.replace("linear_fc1.weight", "linear_fc1._extra_state"): te_state
                              for k in model if k.endswith("linear_fc1.weight")})
            else:
                model = nest({legacy_key(n, style): x for n, x in tensors.items()})
                if pp > 1 and s == pp - 1 and v == virtual - 1:  # the pipeline's copy of the tied embeddings
                    model["word_embeddings_for_head"] = {"weight": rank["word_embeddings.weight"].clone()}
            rel = f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") + "/model_optim_rng.pt"
            checkpoint = files.setdefault(rel, {})
            if args:
                checkpoint["args"] = megatron_args(config, tp=tp, pp=pp, virtual=virtual)
            if version is not None:
                checkpoint["checkpoint_version"] = version
            checkpoint["iteration"] = iteration or 0
            checkpoint["model" if virtual == 1 else f"model{v}"] = model
            checkpoint["rng_state"] = [{"np_rng_state": np.random.RandomState(t).get_state()}]
    return files


def write_megatron(out_dir: str | Path, state_dict: dict, config: MegatronBertConfig, *,
                   old_serialization: bool = False, **layout) -> Path:
    """A Megatron checkpoint folder: tracker file plus ``{release|iter_*}/mp_rank_*`` (see ``megatron_shards``)."""
    out_dir = Path(out_dir)
    iteration = layout.get("iteration")
    folder = out_dir / ("release" if iteration is None else f"iter_{iteration:07d}")
    for rel, checkpoint in megatron_shards(state_dict, config, **layout).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        save(checkpoint, folder / rel, old_serialization)
    (out_dir / TRACKER).write_text("release" if iteration is None else str(iteration))
    return out_dir


def mcore_tensors(state_dict: dict, config: MegatronBertConfig, *, te: bool) -> dict[str, torch.Tensor]:
    """One rank's Megatron-Core names (per-layer keys ``encoder.layers.N.``), QKV in Core's layout."""
    (canonical,) = fused_ranks(state_dict, config, 1, "nsd")
    return {mcore_key(n, te): t for n, t in canonical.items()}


def _dcp_save(state: dict, folder: Path, *, prepickled: bool = False) -> None:
    """``dcp.save`` in this one process. ``prepickled``: bytes items are written as they are, as Megatron-Core's
    ``MCoreSavePlanner`` does (its ShardedObjects come already ``torch.save``d); dcp's default planner pickles
    every non-tensor value itself."""
    import torch.distributed.checkpoint as dcp

    class AsIs(dcp.DefaultSavePlanner):
        def transform_object(self, write_item, object):
            return object

    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _megatron_importable():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process": it is
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), planner=AsIs() if prepickled else None,
                 no_dist=True)


def write_torch_dist(out_dir: str | Path, state_dict: dict, config: MegatronBertConfig, *, te: bool = False,
                     iteration: int = 100, common_pt: bool = True, fp8: bool = False, integrity: bool = False,
                     vocab: Path | None = None, args: bool = True, tp: int = 1, pp: int = 1) -> Path:
    """Megatron-Core ``torch_dist``: global tensors, layers stacked on dim 0, TE ``_extra_state`` as bytes.

    ``common_pt``: the common state (args, checkpoint_version, iteration) in ``common.pt``, as Megatron-Core
    wrote it until 0.19; otherwise inside the DCP payload as the ``common_state`` sharded object (a
    ``torch.save``d one-item list, ``megatron/core/dist_checkpointing/serialization.py``). ``integrity``
    adds ``integrity.json``, ``vocab`` a ``tokenizer/vocab.txt``, as Megatron-LM's main branch (2026) does.
    ``tp`` and ``pp`` are what ``args`` say the model was trained with (the tensors are global all the same).
    """
    out_dir = Path(out_dir)
    folder = out_dir / f"iter_{iteration:07d}"
    stacked: dict = {}
    for key, tensor in mcore_tensors(state_dict, config, te=te).items():
        parts = key.split(".")
        if parts[:2] == ["encoder", "layers"]:
            stacked.setdefault(".".join(parts[:2] + parts[3:]), []).append((int(parts[2]), tensor))
        else:
            stacked[key] = tensor
    state = {k: torch.stack([t for _, t in sorted(v)]) if isinstance(v, list) else v for k, v in stacked.items()}
    extra = pickled(FP8_EXTRA_STATE if fp8 else None)
    for layer in range(config.num_hidden_layers):  # ShardedObjects: one bytes item per layer
        state[f"encoder.layers.self_attention.linear_qkv._extra_state/shard_{layer}_{config.num_hidden_layers}"] = \
            io.BytesIO(extra)
    common = {"checkpoint_version": 3.0, "iteration": iteration}
    if args:
        common["args"] = megatron_args(config, tp=tp, pp=pp)
    if not common_pt:
        state["common_state/shard_0_1"] = io.BytesIO(pickled([common]))
    _dcp_save(state, folder, prepickled=True)
    if common_pt:
        save(common, folder / "common.pt")
    backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    if common_pt:
        backend.update({"common_backend": "torch", "common_backend_version": 1})
    (folder / "metadata.json").write_text(json.dumps(backend))
    if vocab is not None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer/vocab.txt").write_bytes(Path(vocab).read_bytes())
    if integrity:
        write_integrity(folder)
    (out_dir / TRACKER).write_text(str(iteration))
    return out_dir


def write_integrity(folder: Path) -> None:
    """``integrity.json`` as Megatron-Core's ``save_integrity_manifest`` writes it (top-level files, sha256)."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
    (folder / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))


def write_torch_dcp(out_dir: str | Path, state_dict: dict, config: MegatronBertConfig, *, ckpt_format="torch_dcp",
                    iteration: int = 100, te: bool = False, ranks: int = 1) -> Path:
    """Megatron-LM's ``torch_dcp`` / ``fsdp_dtensor`` save (``megatron/training/checkpointing.py``): the whole
    training state dict through ``torch.distributed.checkpoint.save`` with dcp's default planner, so ``args``,
    ``checkpoint_version`` and ``iteration`` are pickled bytes items and the model's per-layer tensors sit under
    ``model.``; Megatron-FSDP's wrapper adds ``module.``. ``ranks`` > 1: each tensor is a DTensor sharded on
    dim 0 over that many data-parallel ranks, each rank saving its own chunk (``__<rank>_0.distcp``), as FSDP
    does; the ranks are played one after another in this process on PyTorch's fake process group."""
    tensors = mcore_tensors(state_dict, config, te=te)
    prefix = "module." if ckpt_format == "fsdp_dtensor" else ""
    folder = Path(out_dir) / f"iter_{iteration:07d}"
    common = {"args": megatron_args(config, ckpt_format=ckpt_format), "checkpoint_version": 3.0,
              "iteration": iteration, "rng_state": [{"np_rng_state": np.random.RandomState(0).get_state()}],
              "optimizer": {"param_groups": [{"lr": 1e-4}]}}
    if ranks == 1:
        _dcp_save({**common, "model": {prefix + k: t for k, t in tensors.items()}}, folder)
    else:
        _save_ranks(common, {prefix + k: t for k, t in tensors.items()}, folder, ranks)
    (Path(out_dir) / TRACKER).write_text(str(iteration))
    return Path(out_dir)


def _save_ranks(common: dict, model: dict, folder: Path, ranks: int) -> None:
    """Each rank's ``dcp.save`` of its DTensor chunks, then one ``.metadata`` listing every rank's chunks (what
    dcp's coordinator writes after gathering the ranks' plans)."""
    import pickle

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    merged = None
    for rank in range(ranks):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ranks)
        try:
            mesh = init_device_mesh("cpu", (ranks,))
            shards = {k: DTensor.from_local(t.chunk(ranks)[rank].clone(), mesh, [Shard(0)], run_check=False,
                                            shape=t.shape, stride=t.stride()) for k, t in model.items()}
            _dcp_save({**common, "model": shards}, folder / f"rank{rank}")
        finally:
            dist.destroy_process_group()
        data = f"__{rank}_0.distcp"
        (folder / f"rank{rank}/__0_0.distcp").rename(folder / data)
        with open(folder / f"rank{rank}/.metadata", "rb") as f:
            metadata = pickle.load(f)  # written just now by dcp itself
        for index, info in metadata.storage_data.items():
            info.relative_path = data
        if merged is None:
            merged = metadata
        else:
            for key, meta in metadata.state_dict_metadata.items():
                if hasattr(meta, "chunks"):
                    merged.state_dict_metadata[key].chunks.extend(meta.chunks)
            merged.storage_data.update({i: info for i, info in metadata.storage_data.items()
                                        if hasattr(metadata.state_dict_metadata[i.fqn], "chunks")})
        for leftover in (folder / f"rank{rank}").iterdir():
            leftover.unlink()
        (folder / f"rank{rank}").rmdir()
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(merged, f)


def torch_saved(obj) -> bytes:
    """``obj`` as ``torch.save`` writes it (no stand-in modules: what a hostile writer would produce)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def replace_bytes_item(folder: Path, key: str, data: bytes) -> None:
    """Append ``data`` to a DCP folder's data file and point its bytes item ``key`` at it, as a hostile writer
    could (``.metadata`` is rewritten with plain pickle here: it holds only dcp's own dataclasses)."""
    import pickle

    from mbexport.checkpoint.safe_load import dist_metadata

    metadata = dist_metadata(folder / ".metadata")
    (info,) = [info for index, info in metadata.storage_data.items() if index.fqn == key]
    path = folder / info.relative_path
    info.offset, info.length = path.stat().st_size, len(data)
    with open(path, "ab") as f:
        f.write(data)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
