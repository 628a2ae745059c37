"""The built-in example (``mbexport example``): a seeded random Megatron-BERT as an NGC-layout zip, and a vocab.

It is written the way Megatron-LM writes a single-rank checkpoint, by walking the readers' name tables
(``names``) backwards, so the example exercises the same reading path as a real NGC zip. The same bytes come
out of every run with the same seed (fixed zip timestamps, PyTorch's deterministic zip serialization), so a
rebuild never sees "the checkpoint changed". Writers for the other layouts live with the tests
(``tests/checkpoints.py``), which extend these.
"""

from __future__ import annotations

import argparse
import math
import re
import zipfile
from pathlib import Path

import torch

from mbexport.checkpoint import names
from mbexport.checkpoint.megatron import TRACKER, interleave_qkv, qkv_layout
from mbexport.config import MegatronBertConfig
from mbexport.text import VOCAB

ZIP_TIMESTAMP = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: members carry no time of writing
RENAMES_2023 = (("input_layernorm.", "input_norm."), ("post_attention_layernorm.", "post_attention_norm."),
                ("final_layernorm.", "final_norm."), ("lm_head.layernorm.", "lm_head.norm."))  # Sept 2023


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


def megatron_args(config: MegatronBertConfig, **more) -> argparse.Namespace:
    """The subset of Megatron's ``args`` the readers use (``more`` adds or replaces entries)."""
    return argparse.Namespace(**{
        "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads, "ffn_hidden_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings, "seq_length": config.max_position_embeddings,
        "padded_vocab_size": config.vocab_size, "make_vocab_size_divisible_by": 128,
        "layernorm_epsilon": config.layer_norm_eps, "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1, "params_dtype": torch.float32, "bert_binary_head": True, **more})


def fused_ranks(state_dict: dict, config: MegatronBertConfig, tp: int, layout: str) -> list[dict[str, torch.Tensor]]:
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


def legacy_key(name: str, era: str) -> str:
    """A canonical name as Megatron-LM's ``era`` (2020, 2021 or 2023) spelled it, ``language_model.`` included."""
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


def nest(flat: dict) -> dict:
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


def write_ngc_zip(path: str | Path, state_dict: dict, config: MegatronBertConfig, *, args: bool = False,
                  version=None, old_serialization: bool = True, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """An NGC-style zip (like ``megatron_bert_345m_v0_1_uncased.zip``): by default no args, version 0, old pickle.

    PyTorch's old serialization keys storages by memory address, so only the zip serialization
    (``old_serialization=False``) gives the same bytes on every run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (canonical,) = fused_ranks(state_dict, config, 1, qkv_layout(version))
    checkpoint = {"model": nest({legacy_key(n, "2020"): t for n, t in canonical.items()}), "iteration": 0}
    if args:
        checkpoint["args"] = megatron_args(config)
    if version is not None:
        checkpoint["checkpoint_version"] = version
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(zipfile.ZipInfo(TRACKER, ZIP_TIMESTAMP), "release", compress_type=compression)
        member = zipfile.ZipInfo("release/mp_rank_00/model_optim_rng.pt", ZIP_TIMESTAMP)
        member.compress_type = compression
        with archive.open(member, "w", force_zip64=True) as f:
            torch.save(checkpoint, f, _use_new_zipfile_serialization=not old_serialization)
    return path


def example_config(vocab_size: int) -> MegatronBertConfig:
    """The built-in example's tiny shape (hidden 64, 2 layers, 4 heads, FFN 256, 128 positions)."""
    return MegatronBertConfig(vocab_size=padded_vocab_size(vocab_size), hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)


def make_example(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny seeded random NGC zip with ``lm_head``, ``binary_head`` and ``args``, and a small WordPiece vocab;
    the same bytes for the same seed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = out_dir / VOCAB
    tokens = example_vocab()
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    config = example_config(len(tokens))
    state_dict = random_state_dict(config, seed=seed)
    # args make the example self-describing (4 heads, where hidden/64 would guess 1).
    return write_ngc_zip(out_dir / "example_bert_tiny_uncased.zip", state_dict, config, args=True,
                         old_serialization=False), vocab


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
