"""The architecture of a Megatron-BERT, as read from a checkpoint and written to ``config.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MEGATRON_LAYERNORM_EPS = 1e-5  # Megatron-LM's default; Hugging Face's MegatronBertConfig says 1e-12

# Sanity limits for architecture values read from files (config.json, args) and options: far above any released
# BERT or GPT (Megatron-BERT 3.9B: 48 layers, hidden 2560, 40 heads; the largest GPTs: ~128 layers, hidden
# 25600, vocab 256k), far below what makes a loop over layers or an allocation run away. README's Safety section
# states them.
LIMITS = {
    "vocab_size": 1 << 22,  # 4,194,304 embedding rows
    "hidden_size": 1 << 16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "intermediate_size": 1 << 18,
    "max_position_embeddings": 1 << 20,
    "type_vocab_size": 1024,
    "num_labels": 1 << 16,
}


def check_count(value, limit: int) -> int:
    """``value`` when it is a whole number from 1 to ``limit``; else ValueError saying what it should be."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"must be a whole number from 1 to {limit:,}, got {shown(value)}")
    return value


def check_epsilon(value) -> float:
    """A LayerNorm epsilon: a finite number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"must be a number between 0 and 1, got {shown(value)}")
    return float(value)


def shown(value) -> str:
    """A value as an error message quotes it: its repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


@dataclass(frozen=True)
class MegatronBertConfig:
    """Shapes and constants of the network. ``vocab_size`` is the embedding's row count (padded vocab)."""

    vocab_size: int
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = MEGATRON_LAYERNORM_EPS
    pad_token_id: int = 0
    num_labels: int = 2
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        """Every value within ``LIMITS`` and of the right type, so nothing downstream loops or allocates on a
        hostile config; the errors name the field."""
        for name, limit in LIMITS.items():
            _named(name, check_count, getattr(self, name), limit)
        _named("layer_norm_eps", check_epsilon, self.layer_norm_eps)
        if type(self.pad_token_id) is not int or not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be a token id from 0 to {self.vocab_size - 1:,}, got "
                             f"{shown(self.pad_token_id)}")
        if not isinstance(self.id2label, dict) or not all(type(k) is int and isinstance(v, str)
                                                          for k, v in self.id2label.items()):
            raise ValueError(f"id2label must map label numbers to names, got {shown(self.id2label)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "MegatronBertConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, architectures: list[str] | None = None) -> dict:
        """A ``config.json`` that ``transformers.MegatronBertConfig`` reads unchanged."""
        labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_labels)}
        return {
            "architectures": architectures or ["MegatronBertForPreTraining"],
            "model_type": "megatron-bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": 0.02,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "id2label": {str(i): name for i, name in labels.items()},
            "label2id": {name: i for i, name in labels.items()},
        }

    @classmethod
    def from_hf_dict(cls, data: dict) -> "MegatronBertConfig":
        """Read a Hugging Face ``config.json`` (missing keys take Hugging Face's defaults). Values of the wrong
        type or beyond ``LIMITS`` raise ValueError naming the key."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        labels = data.get("id2label") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 7
                                                   for k in labels):
            raise ValueError(f"id2label must map label numbers to names, got {shown(labels)}")
        id2label = {int(k): v for k, v in labels.items()}
        return cls(
            vocab_size=data.get("vocab_size", 29056),
            hidden_size=data.get("hidden_size", 1024),
            num_hidden_layers=data.get("num_hidden_layers", 24),
            num_attention_heads=data.get("num_attention_heads", 16),
            intermediate_size=data.get("intermediate_size", 4096),
            max_position_embeddings=data.get("max_position_embeddings", 512),
            type_vocab_size=data.get("type_vocab_size", 2),
            layer_norm_eps=data.get("layer_norm_eps", 1e-12),
            pad_token_id=data.get("pad_token_id", 0) or 0,
            num_labels=data.get("num_labels") or len(id2label) or 2,
            id2label=id2label,
        )


def _named(name: str, check, value, *limit):
    try:
        return check(value, *limit)
    except ValueError as error:
        raise ValueError(f"{name} {error}") from None
