"""Write Hugging Face-named weights back out in every Megatron layout, for tests and the built-in example.

The real checkpoints cannot be downloaded here, so these writers implement the inverse of each transform
in docs/megatron-checkpoints.md: era renames, QKV row layouts, tensor-parallel splits, pipeline stages,
virtual pipeline chunks, Megatron-Core (incl. Transformer Engine names) and ``torch_dist``. They walk the
same tables as the readers (``names``), backwards.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import json
import math
import re
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.megatron import interleave_qkv, qkv_layout
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
# Sept 2023 renames, applied to 2021-era names.
RENAMES_2023 = (("input_layernorm.", "input_norm."), ("post_attention_layernorm.", "post_attention_norm."),
                ("final_layernorm.", "final_norm."), ("lm_head.layernorm.", "lm_head.norm."))


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


def random_state_dict(config: MegatronBertConfig, *, seed: int = 0, heads: tuple[str, ...] = ("pooler", "lm", "nsp"),
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights in Hugging Face names: the trunk plus ``heads`` groups of ``names.expected_shapes``."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for group, shapes in names.expected_shapes(config, {}).items():
        if group != "trunk" and group not in heads:
            continue
        for name, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator) * 0.02
            if len(shape) == 1 and ("ln." in name or "LayerNorm." in name) and name.endswith("weight"):
                tensor += 1.0
            state_dict[name] = tensor.to(dtype)
    return state_dict


def padded_vocab_size(real: int, *, divisible_by: int = 128, tensor_parallel: int = 1) -> int:
    """Megatron's padding: ``ceil(V / (divisible_by * TP)) * divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel
    return math.ceil(real / multiple) * multiple


def megatron_args(config: MegatronBertConfig, *, tp: int = 1, pp: int = 1, virtual: int = 1) -> argparse.Namespace:
    """The subset of Megatron's ``args`` the readers use, plus an enum like real checkpoints carry."""
    return argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, ffn_hidden_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        padded_vocab_size=config.vocab_size, make_vocab_size_divisible_by=128, layernorm_epsilon=config.layer_norm_eps,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None, params_dtype=torch.float32,
        model_type=ModelType.encoder_or_decoder, bert_binary_head=True,
    )


def _split_tp(state_dict: dict, config: MegatronBertConfig, tp: int, layout: str) -> list[dict[str, torch.Tensor]]:
    """Hugging Face tensors -> per-rank canonical tensors (QKV fused in ``layout``, split by ``TP_SPLIT_DIM``)."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    fused: dict[str, list] = {}
    for hf_name, tensor in state_dict.items():
        name = names.from_hf(hf_name)
        layer, rest = names.split_layer(name)
        if rest.startswith(names.QKV):
            module = hf_name.split(".", 4)[4].rpartition(".")[0]  # attention.self.{query,key,value}
            fused.setdefault(name, [None] * 3)[names.QKV_TO_HF.index(module)] = tensor
            continue
        dim = names.TP_SPLIT_DIM.get(rest)
        for rank, piece in zip(ranks, tensor.chunk(tp, dim) if dim is not None else [tensor] * tp):
            rank[name] = piece.clone()
    for name, qkv in fused.items():
        heads_first = torch.stack(qkv).reshape(3, config.num_attention_heads, config.head_dim, *qkv[0].shape[1:])
        for rank, piece in zip(ranks, heads_first.chunk(tp, 1)):
            rank[name] = interleave_qkv(piece, layout).clone()
    return ranks


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


def _legacy_key(name: str, era: str) -> str:
    layer, _ = names.split_layer(name)
    if era != "2020" and layer is not None:
        name = name.replace(".attention.", ".self_attention.")
    if era == "2023":
        for old, new in RENAMES_2023:
            name = re.sub(rf"(^|\.){re.escape(old)}", rf"\g<1>{new}", name)
    if name.split(".")[0].endswith("_embeddings"):
        return f"language_model.embedding.{name}"
    if layer is not None or name.startswith("final_"):
        return f"language_model.{'transformer' if era == '2020' else 'encoder'}.{name}"
    return f"language_model.{name}" if name.startswith("pooler.") else name


def _mcore_key(name: str, te: bool) -> str:
    layer, rest = names.split_layer(name)
    module, _, param = rest.rpartition(".")
    if layer is None:
        return f"{MCORE_GLOBAL[module]}.{param}"
    if te and module in TE_FUSED_NORMS:
        return f"encoder.layers.{layer}.{TE_FUSED_NORMS[module]}{param}"
    return f"encoder.layers.{layer}.{MCORE_LAYER[module]}.{param}"


def _nest(flat: dict) -> dict:
    """Legacy Megatron's nesting: ``language_model`` -> ``embedding`` -> module -> param; the rest flat below."""
    tree: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        levels = 3 if parts[:2] == ["language_model", "embedding"] else 2 if parts[0] == "language_model" else 1
        node = tree
        for part in parts[:levels]:
            node = node.setdefault(part, {})
        node[".".join(parts[levels:])] = value
    return tree


def megatron_shards(state_dict: dict, config: MegatronBertConfig, *, style: str = "2020", version=3.0, tp: int = 1,
                    pp: int = 1, virtual: int = 1, args: bool = True, iteration: int | None = None) -> dict[str, dict]:
    """``mp_rank_*/model_optim_rng.pt`` relative path -> the dict Megatron would have saved there."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    mcore = style.startswith("mcore")
    layout = "nsd" if mcore else qkv_layout(version)
    files = {}
    for t, rank in enumerate(_split_tp(state_dict, config, tp, layout)):
        for (s, v), tensors in sorted(_stages(rank, config.num_hidden_layers, pp, virtual).items()):
            if mcore:
                model = {_mcore_key(n, style == "mcore-te"): x for n, x in tensors.items()}
                te_state = io.BytesIO(b"fp8-meta") if style == "mcore-te" else None  # TE pickles a buffer
                model.update({k.replace("linear_fc1.weight", "linear_fc1._extra_state"): te_state
                              for k in model if k.endswith("linear_fc1.weight")})
            else:
                model = _nest({_legacy_key(n, style): x for n, x in tensors.items()})
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


def _save(obj, f, old_serialization: bool) -> None:
    with _megatron_importable():
        torch.save(obj, f, _use_new_zipfile_serialization=not old_serialization)


def write_megatron(out_dir: str | Path, state_dict: dict, config: MegatronBertConfig, *,
                   old_serialization: bool = False, **layout) -> Path:
    """A Megatron checkpoint folder: tracker file plus ``{release|iter_*}/mp_rank_*`` (see ``megatron_shards``)."""
    out_dir = Path(out_dir)
    iteration = layout.get("iteration")
    folder = out_dir / ("release" if iteration is None else f"iter_{iteration:07d}")
    for rel, checkpoint in megatron_shards(state_dict, config, **layout).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _save(checkpoint, folder / rel, old_serialization)
    (out_dir / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    return out_dir


def write_ngc_zip(path: str | Path, state_dict: dict, config: MegatronBertConfig, *, args: bool = False,
                  version=None, old_serialization: bool = True, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """An NGC-style zip (like ``megatron_bert_345m_v0_1_uncased.zip``): by default no args, version 0, old pickle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shards = megatron_shards(state_dict, config, style="2020", version=version, args=args)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("latest_checkpointed_iteration.txt", "release")
        with archive.open("release/mp_rank_00/model_optim_rng.pt", "w", force_zip64=True) as member:
            _save(shards["mp_rank_00/model_optim_rng.pt"], member, old_serialization)
    return path


def write_torch_dist(out_dir: str | Path, state_dict: dict, config: MegatronBertConfig, *, te: bool = False,
                     iteration: int = 100) -> Path:
    """Megatron-Core ``torch_dist``: global tensors, layers stacked on dim 0, common state in ``common.pt``."""
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    folder = out_dir / f"iter_{iteration:07d}"
    (canonical,) = _split_tp(state_dict, config, 1, "nsd")
    flat = {_mcore_key(n, te): t for n, t in canonical.items()}
    stacked: dict = {}
    for key, tensor in flat.items():
        parts = key.split(".")
        if parts[:2] == ["encoder", "layers"]:
            stacked.setdefault(".".join(parts[:2] + parts[3:]), []).append((int(parts[2]), tensor))
        else:
            stacked[key] = tensor
    tensors = {k: torch.stack([t for _, t in sorted(v)]) if isinstance(v, list) else v for k, v in stacked.items()}
    tensors["encoder.layers.mlp.linear_fc1._extra_state"] = io.BytesIO(b"te-state")
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)
    common = {"args": megatron_args(config), "checkpoint_version": 3.0, "iteration": iteration}
    _save(common, folder / "common.pt", False)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                      "common_backend": "torch", "common_backend_version": 1}))
    (out_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return out_dir


def example_config(vocab_size: int) -> MegatronBertConfig:
    """The built-in example's tiny shape (hidden 64, 2 layers, 4 heads, FFN 256, 128 positions)."""
    return MegatronBertConfig(vocab_size=padded_vocab_size(vocab_size), hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)


def make_example(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny seeded random NGC zip with ``lm_head`` and ``binary_head``, and a small WordPiece ``vocab.txt``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / "vocab.txt"
    tokens = example_vocab()
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    config = example_config(len(tokens))
    state_dict = random_state_dict(config, seed=seed)
    # args make the example self-describing (4 heads, where hidden/64 would guess 1).
    return write_ngc_zip(out_dir / "example_bert_tiny_uncased.zip", state_dict, config, args=True), vocab


_WORDS = """the of and to in a is that for it as was with be by on not he i this are or his from at which but have
an they you were her she there been one all we their has would when if so no will more can about what up out said
them some could other into time only then these two may first new like do any my now over such our man me even most
made after also did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right used take three
house use during without again place around however home small found thought went say part once general high upon
school every does got united left number course war until always away something fact though water less public put
think almost hand enough far took head yet government system better set told nothing night end why called didn
eyes find going look asked later knew point next city give group toward young let room president side social given
present several order national second possible rather per face among form important often things looking large
question answer text model sentence word language train data test good bad happy movie film book read write""".split()
_PIECES = ["s", "ed", "ing", "ly", "er", "es", "est", "ion", "al", "ment", "ness", "able", "ful", "less", "ity",
           "ive", "ous", "ize", "en", "y", "d", "n", "t", "r", "e", "a", "o", "i"]


def example_vocab() -> list[str]:
    """A small BERT-style WordPiece vocab: specials, punctuation, digits, letters, words and ## pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    symbols = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + [str(d) for d in range(10)]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = list(dict.fromkeys(w for w in _WORDS if w not in letters))
    pieces = _PIECES + [c for c in letters if c not in _PIECES]
    return specials + symbols + letters + words + [f"##{p}" for p in pieces]
