"""The architecture of a Megatron-BERT, as read from a checkpoint and written to ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MEGATRON_LAYERNORM_EPS = 1e-5  # Megatron-LM's default; Hugging Face's MegatronBertConfig says 1e-12


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
        """Read a Hugging Face ``config.json`` (missing keys take Hugging Face's defaults)."""
        id2label = {int(k): v for k, v in (data.get("id2label") or {}).items()}
        num_labels = data.get("num_labels") or len(id2label) or 2
        return cls(
            vocab_size=int(data.get("vocab_size", 29056)),
            hidden_size=int(data.get("hidden_size", 1024)),
            num_hidden_layers=int(data.get("num_hidden_layers", 24)),
            num_attention_heads=int(data.get("num_attention_heads", 16)),
            intermediate_size=int(data.get("intermediate_size", 4096)),
            max_position_embeddings=int(data.get("max_position_embeddings", 512)),
            type_vocab_size=int(data.get("type_vocab_size", 2)),
            layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(data.get("pad_token_id", 0) or 0),
            num_labels=int(num_labels),
            id2label=id2label,
        )
