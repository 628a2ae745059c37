"""Tensor names: every Megatron era's spelling, one canonical spelling, and Hugging Face's.

Readers rename a checkpoint's keys to *canonical* names (Megatron-LM's 2020 names without the
``language_model.{embedding,transformer}.`` prefixes, e.g. ``layers.3.attention.query_key_value.weight``),
merge tensor-parallel ranks there, then map to Hugging Face MegatronBert names. The example writer
(``example.py``) and the tests' writers walk the same tables backwards, so one table serves both directions.
"""

from __future__ import annotations

import re

from mbexport.config import MegatronBertConfig
from mbexport.errors import CheckpointError
from mbexport.tasks import module_groups

# Any era's key -> canonical key; applied in order (docs/megatron-checkpoints.md sections 1, 2 and 5).
ALIASES: tuple[tuple[str, str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^(language_model\.)?embedding\.", ""),
    (r"^(language_model\.)?(transformer|encoder)\.", ""),
    (r"^language_model\.pooler\.", "pooler."),
    (r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1"),  # Transformer Engine
    (r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".post_attention_layernorm.\1"),  # Transformer Engine
    (r"\.self_attention\.linear_qkv\.", ".attention.query_key_value."),
    (r"\.self_attention\.linear_proj\.", ".attention.dense."),
    (r"\.self_attention\.", ".attention."),  # Jan 2021
    (r"\.mlp\.linear_fc1\.", ".mlp.dense_h_to_4h."),
    (r"\.mlp\.linear_fc2\.", ".mlp.dense_4h_to_h."),
    (r"\.input_norm\.", ".input_layernorm."),  # Sept 2023
    (r"\.(post_attention_norm|pre_mlp_layernorm)\.", ".post_attention_layernorm."),
    (r"^final_norm\.", "final_layernorm."),
    (r"^lm_head\.(norm|layer_norm)\.", "lm_head.layernorm."),
    (r"^output_layer\.bias$", "lm_head.bias"),
))
# Keys that hold nothing we need: a pipeline's copy of the tied embeddings, Transformer Engine state.
IGNORED = re.compile(r"^word_embeddings_for_head\.|(^|\.)_extra_state$")

# Canonical module -> Hugging Face module (``layers.N.`` modules map under ``bert.encoder.layer.N.``).
GLOBAL_TO_HF = {
    "word_embeddings": "bert.embeddings.word_embeddings",
    "position_embeddings": "bert.embeddings.position_embeddings",
    "tokentype_embeddings": "bert.embeddings.token_type_embeddings",
    "final_layernorm": "bert.encoder.ln",
    "pooler.dense": "bert.pooler.dense",
    "lm_head": "cls.predictions",
    "lm_head.dense": "cls.predictions.transform.dense",
    "lm_head.layernorm": "cls.predictions.transform.LayerNorm",
    "binary_head": "cls.seq_relationship",
}
LAYER_TO_HF = {
    "input_layernorm": "attention.ln",
    "attention.dense": "attention.output.dense",
    "post_attention_layernorm": "ln",
    "mlp.dense_h_to_4h": "intermediate.dense",
    "mlp.dense_4h_to_h": "output.dense",
}
QKV = "attention.query_key_value"
QKV_TO_HF = tuple(f"attention.self.{p}" for p in ("query", "key", "value"))
UNTIED_OUTPUT = "output_layer.weight"  # Megatron-Core's LM output when it does not share the embeddings

# Canonical name without ``layers.N.`` -> the dim tensor-parallel ranks split it along; the rest is replicated.
TP_SPLIT_DIM = {
    "word_embeddings.weight": 0, UNTIED_OUTPUT: 0, f"{QKV}.weight": 0, f"{QKV}.bias": 0,
    "mlp.dense_h_to_4h.weight": 0, "mlp.dense_h_to_4h.bias": 0, "lm_head.bias": 0,
    "attention.dense.weight": 1, "mlp.dense_4h_to_h.weight": 1,
}
LAYER = re.compile(r"^layers\.([0-9]{1,6})\.(.+)$")

# Hugging Face keys that are not parameters of their own: the decoder is tied to the word embeddings.
HF_DROPPED = re.compile(r"^cls\.predictions\.decoder\.|(^|\.)position_ids$")


def canonical(key: str) -> str | None:
    """The canonical name of a Megatron key (any era, legacy or Core), None if it is ignored."""
    for pattern, replacement in ALIASES:
        key = pattern.sub(replacement, key)
    return None if IGNORED.search(key) else key


def split_layer(name: str) -> tuple[int | None, str]:
    match = LAYER.match(name)
    return (int(match[1]), match[2]) if match else (None, name)


def is_known(name: str) -> bool:
    """Whether a canonical name is a Megatron-BERT parameter we know how to convert."""
    layer, rest = split_layer(name)
    module, _, param = rest.rpartition(".")
    table = GLOBAL_TO_HF if layer is None else {**LAYER_TO_HF, QKV: None}
    return param in ("weight", "bias") and module in table or (layer is None and rest == UNTIED_OUTPUT)


def to_hf(name: str) -> str:
    """Hugging Face name of a canonical name (not the fused QKV, which becomes three tensors)."""
    layer, rest = split_layer(name)
    module, _, param = rest.rpartition(".")
    if layer is None:
        return f"{GLOBAL_TO_HF[module]}.{param}"
    return f"bert.encoder.layer.{layer}.{LAYER_TO_HF[module]}.{param}"


def from_hf(name: str) -> str:
    """Canonical name of a Hugging Face name (the writers' direction; Q, K, V map to the fused QKV)."""
    match = re.match(r"^bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if match:
        layer, module, param = match.groups()
        return f"layers.{layer}.{QKV if module in QKV_TO_HF else _LAYER_FROM_HF[module]}.{param}"
    module, _, param = name.rpartition(".")
    return f"{_GLOBAL_FROM_HF[module]}.{param}"


_LAYER_FROM_HF = {hf: c for c, hf in LAYER_TO_HF.items()}
_GLOBAL_FROM_HF = {hf: c for c, hf in GLOBAL_TO_HF.items()}


def expected_shapes(config: MegatronBertConfig, state_dict: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every tensor by group: ``trunk`` is required; each other group, the pooler and the head modules
    of the task registry, is all-or-nothing. A module heads declare with different sizes (the classifier: labels
    or one score) takes the checkpoint's own row count: which head it serves is ``tasks.modules_in``'s call."""
    h, f = config.hidden_size, config.intermediate_size
    trunk = {
        "bert.embeddings.word_embeddings.weight": (config.vocab_size, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
    }
    layer = {"attention.ln": (h,), "attention.self.query": (h, h), "attention.self.key": (h, h),
             "attention.self.value": (h, h), "attention.output.dense": (h, h), "ln": (h,),
             "intermediate.dense": (f, h), "output.dense": (h, f)}
    for i in range(config.num_hidden_layers):
        for module, shape in layer.items():
            trunk.update({f"bert.encoder.layer.{i}.{module}.weight": shape,
                          f"bert.encoder.layer.{i}.{module}.bias": shape[:1]})
    trunk.update({"bert.encoder.ln.weight": (h,), "bert.encoder.ln.bias": (h,)})
    groups = {"trunk": trunk}
    for group, declared in module_groups().items():
        weight = state_dict.get(f"{declared[0].name}.weight")
        varies = len({tuple(m.shapes(config).items()) for m in declared}) > 1
        rows = weight.shape[0] if varies and getattr(weight, "ndim", 0) == 2 else None
        groups[group] = declared[0].shapes(config, rows)
    return groups


def check_state_dict(state_dict: dict, config: MegatronBertConfig, path) -> list[str]:
    """Refuse missing, extra, mis-shaped or non-tensor entries, naming the first few; return the names in order."""
    groups = expected_shapes(config, state_dict)
    expected = {}
    for group, shapes in groups.items():
        if group == "trunk" or any(name in state_dict for name in shapes):
            expected.update(shapes)
    problems = [f"missing tensor {n}" for n in expected if n not in state_dict]
    problems += [f"unexpected tensor {n}" for n in state_dict if n not in expected]
    problems += [
        f"{n} has shape {list(getattr(t, 'shape', ['not a tensor']))}, expected {list(expected[n])}"
        for n, t in state_dict.items()
        if n in expected and (not hasattr(t, "shape") or tuple(t.shape) != expected[n])
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError("; ".join(problems[:3]) + more, path)
    return list(expected)
